//! Topic names of the contract, and parsing of a command topic. Pure.

/// The topics of one agent, under its prefix `P`.
#[derive(Debug, Clone)]
pub struct Topics {
    pub prefix: String,
}

impl Topics {
    pub fn new(prefix: impl Into<String>) -> Topics {
        Topics {
            prefix: prefix.into(),
        }
    }

    /// `P/station/+/cmd`: what the agent subscribes to.
    pub fn command_filter(&self) -> String {
        format!("{}/station/+/cmd", self.prefix)
    }

    pub fn events(&self, station: &str) -> String {
        format!("{}/station/{station}/evt", self.prefix)
    }

    pub fn status(&self) -> String {
        format!("{}/agent/status", self.prefix)
    }

    pub fn terminal_state(&self, terminal: &str) -> String {
        format!("{}/terminal/{terminal}/state", self.prefix)
    }

    /// The station of a command topic `P/station/<station>/cmd`, or `None`.
    pub fn station_of_command(&self, topic: &str) -> Option<String> {
        let rest = topic
            .strip_prefix(&self.prefix)?
            .strip_prefix("/station/")?;
        let station = rest.strip_suffix("/cmd")?;
        if station.is_empty() || station.contains('/') {
            return None;
        }
        Some(station.to_string())
    }

    /// True when `topic` lies under `P/station/<station>/` (allowed Response Topics).
    pub fn is_station_topic(&self, station: &str, topic: &str) -> bool {
        let own = format!("{}/station/{station}/", self.prefix);
        topic.starts_with(&own)
            && topic.len() > own.len()
            && !topic.contains('+')
            && !topic.contains('#')
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn station_is_parsed_from_a_command_topic() {
        let t = Topics::new("pointgate/s1");
        assert_eq!(
            t.station_of_command("pointgate/s1/station/k-1/cmd")
                .as_deref(),
            Some("k-1")
        );
        assert_eq!(t.station_of_command("pointgate/s1/station/k-1/evt"), None);
        assert_eq!(t.station_of_command("pointgate/s2/station/k-1/cmd"), None);
        assert_eq!(t.station_of_command("pointgate/s1/station//cmd"), None);
        assert_eq!(t.station_of_command("pointgate/s1/station/a/b/cmd"), None);
    }

    #[test]
    fn response_topics_must_lie_under_the_station_s_own_prefix() {
        let t = Topics::new("pointgate/s1");
        assert!(t.is_station_topic("k1", "pointgate/s1/station/k1/resp/7"));
        assert!(!t.is_station_topic("k1", "pointgate/s1/station/k2/resp"));
        assert!(!t.is_station_topic("k1", "pointgate/s1/station/k1/"));
        assert!(!t.is_station_topic("k1", "pointgate/s1/station/k1/#"));
        assert!(!t.is_station_topic("k1", "pointgate/s1/agent/status"));
    }
}
