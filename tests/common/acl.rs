//! The shipped broker setup for tests: Mosquitto with `packaging/mosquitto/pointgate.conf`
//! and `packaging/mosquitto/acl` (templated to a free port and a scratch persistence
//! directory), a password file made with `mosquitto_passwd`, the agent's user
//! `pointgate`, and one user per station (username = station id).

use std::path::PathBuf;
use std::time::Duration;

use super::mosquitto::{shipped_acl_path, shipped_config_template, write_password_file};
use super::mqtt::{MqttStation, StationOpts};
use super::util::Workdir;
use super::Mosquitto;

/// The agent's MQTT username in the shipped ACL.
pub const AGENT_USER: &str = "pointgate";

/// Each user's test password.
pub fn password(user: &str) -> String {
    format!("pw-{user}-secret")
}

/// Mosquitto running the shipped config and ACL.
pub struct AclBroker {
    pub broker: Mosquitto,
    /// Holds the password file and the agent's `mqtt.password_file`.
    pub auth: Workdir,
}

impl AclBroker {
    /// Users: the agent and each of `stations`.
    pub fn start(stations: &[&str]) -> AclBroker {
        let auth = Workdir::new();
        let mut users = vec![(AGENT_USER.to_owned(), password(AGENT_USER))];
        users.extend(stations.iter().map(|s| (s.to_string(), password(s))));
        let pairs: Vec<(&str, &str)> = users
            .iter()
            .map(|(u, p)| (u.as_str(), p.as_str()))
            .collect();
        let passwd = auth.join("passwd");
        write_password_file(&passwd, &pairs);
        let broker =
            Mosquitto::start_templated(shipped_config_template(&passwd, &shipped_acl_path()));
        AclBroker { broker, auth }
    }

    pub fn port(&self) -> u16 {
        self.broker.port()
    }

    pub fn url(&self) -> String {
        self.broker.url()
    }

    /// The agent's `[mqtt]` lines: username `pointgate` and its password file.
    pub fn agent_mqtt_lines(&self) -> Vec<String> {
        let file: PathBuf = self.auth.write("agent-password", password(AGENT_USER));
        vec![
            format!("username = \"{AGENT_USER}\""),
            format!("password_file = \"{}\"", file.display()),
        ]
    }

    /// A station logged in as `user` with its password.
    pub fn station_opts(&self, user: &str, client_id: &str, clean_start: bool) -> StationOpts {
        StationOpts::new(self.port(), client_id, clean_start).credentials(user, &password(user))
    }

    /// An MQTT 5 station logged in as `user`.
    pub async fn station(&self, user: &str, client_id: &str, clean_start: bool) -> MqttStation {
        MqttStation::connect_with(self.station_opts(user, client_id, clean_start)).await
    }
}

/// How long a test waits for something that should come.
pub const WAIT: Duration = Duration::from_secs(30);
