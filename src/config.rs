//! The agent's configuration: one TOML file, `POINTGATE_<SECTION>_<KEY>` environment
//! overrides, human durations, unknown keys refused. Loaded and validated once; every
//! error names the offending key so `pointgate check-config` can exit 78 with it.
//!
//! The shipped default file (`packaging/pointgate.toml`) is embedded and supplies the
//! defaults, so the file on disk only needs what differs.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::money::Site;

/// The whole configuration tree, as the contract's `Config` section lays it out.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub store: StoreSection,
    pub point: PointSection,
    pub mqtt: MqttSection,
    pub queue: QueueSection,
    pub log: LogSection,
    /// `[stations.<id>]` tables, by station id.
    #[serde(default)]
    pub stations: BTreeMap<String, StationSection>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    pub id: String,
    pub site: Site,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Integrations,
    Orders,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PointSection {
    pub backend: BackendKind,
    pub base_url: String,
    pub access_token_file: PathBuf,
    /// Empty string in the file means "none".
    pub extra_ca_file: PathBuf,
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    pub max_requests_per_second: u32,
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub terminal_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub confirm_window: Duration,
    #[serde(with = "humantime_serde")]
    pub confirm_window_max: Duration,
    #[serde(with = "humantime_serde")]
    pub devices_refresh: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttSection {
    pub url: String,
    pub client_id: String,
    pub username: String,
    pub password_file: PathBuf,
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub topic_prefix: String,
    #[serde(with = "humantime_serde")]
    pub keep_alive: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueSection {
    pub dir: PathBuf,
    #[serde(with = "humantime_serde")]
    pub charge_ttl: Duration,
    #[serde(with = "humantime_serde")]
    pub refund_ttl: Duration,
    pub max_pending: u32,
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    pub level: String,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StationSection {
    #[serde(default)]
    pub terminals: Vec<String>,
}

impl Config {
    /// The topic prefix in force: `mqtt.topic_prefix`, or `pointgate/<store.id>`.
    pub fn topic_prefix(&self) -> String {
        if self.mqtt.topic_prefix.is_empty() {
            format!("pointgate/{}", self.store.id)
        } else {
            self.mqtt.topic_prefix.trim_end_matches('/').to_string()
        }
    }

    /// The MQTT client id in force: `mqtt.client_id`, or `pointgate-<store.id>`.
    pub fn client_id(&self) -> String {
        if self.mqtt.client_id.is_empty() {
            format!("pointgate-{}", self.store.id)
        } else {
            self.mqtt.client_id.clone()
        }
    }

    /// The station a terminal is bound to, if any.
    pub fn station_of_terminal(&self, terminal: &str) -> Option<&str> {
        self.stations
            .iter()
            .find(|(_, s)| s.terminals.iter().any(|t| t == terminal))
            .map(|(id, _)| id.as_str())
    }
}
