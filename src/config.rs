//! The agent's configuration: one TOML file, `POINTGATE_<SECTION>_<KEY>` environment
//! overrides, human durations, unknown keys refused. Loaded and validated once; every
//! error names the offending key so `pointgate check-config` can exit 78 with it.
//!
//! The shipped default file (`packaging/pointgate.toml`) is embedded and supplies the
//! defaults, so the file on disk only needs what differs.
//!
//! Loading, in order ([`Config::load`]):
//! 1. the embedded defaults, without their sample `[stations.*]`;
//! 2. the file, key by key over the defaults; its `[stations.*]` are the only stations;
//!    when a file is given it must name `store.id` (or the environment must);
//! 3. the environment: `POINTGATE_<SECTION>_<KEY>`, typed like the key's default
//!    (string, integer, bool); `POINTGATE_CONFIG` is the file's name, not a key, and
//!    `[stations.*]` cannot be set this way;
//! 4. deserialisation (`deny_unknown_fields`) and [`Config::validate`].
//!
//! Invariants: a `Config` returned by `load` has passed `validate`; empty paths mean
//! "unset" (use the `*_path()` helpers); no secret is read here except to check the token
//! file's permissions ([`check_token_file`]), and none is kept or printed.
//!
//! `point.base_url` must be `https://`, except for a loopback host (`localhost`,
//! `127.0.0.1`, `[::1]`), where `http://` is allowed for local test servers.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io::Read;
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::{Table, Value};

pub use crate::domain::command::StationSection;
use crate::money::Site;

/// The shipped default file, which is also the source of every default.
pub const DEFAULTS_TOML: &str = include_str!("../packaging/pointgate.toml");

/// Environment variables that configure keys start with this.
pub const ENV_PREFIX: &str = "POINTGATE_";

/// Variables with the prefix that are not key overrides: the config file's name, and the
/// fail point a test build arms (`crate::failpoint`; ignored by other builds).
const ENV_NOT_KEYS: &[&str] = &["POINTGATE_CONFIG", "POINTGATE_FAILPOINT"];

/// A configuration that cannot be used. Every variant names the key (or the file) at
/// fault; all of them mean exit 78.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the configuration file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{origin} is not valid TOML: {message}")]
    Syntax { origin: String, message: String },
    #[error("unknown key `{key}`")]
    UnknownKey { key: String },
    /// A `POINTGATE_*` variable that names no key, or one that cannot be set that way.
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    /// A value out of range or of the wrong form. `env` names the variable that set it.
    #[error("{key}: {message}{}", env.as_ref().map(|v| format!(" (set by {v})")).unwrap_or_default())]
    Invalid {
        key: String,
        message: String,
        env: Option<String>,
    },
}

impl ConfigError {
    /// The configuration key at fault, where there is one (`point.poll_interval`).
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::UnknownKey { key } | ConfigError::Invalid { key, .. } => Some(key),
            ConfigError::Read { .. } | ConfigError::Syntax { .. } | ConfigError::Env { .. } => None,
        }
    }

    /// Notes which environment variable set the key at fault, if one did.
    fn with_env_origin(self, set_by_env: &BTreeMap<String, String>) -> ConfigError {
        match self {
            ConfigError::Invalid {
                key,
                message,
                env: None,
            } => {
                let env = set_by_env.get(&key).cloned();
                ConfigError::Invalid { key, message, env }
            }
            other => other,
        }
    }
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        message: message.into(),
        env: None,
    }
}

/// The whole configuration tree, as the contract's `Config` section lays it out.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub store: StoreSection,
    pub point: PointSection,
    pub mqtt: MqttSection,
    pub queue: QueueSection,
    pub log: LogSection,
    pub control: ControlSection,
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

/// `[control]`: the operator commands' unix socket (an extension of the contract, see
/// `docs/contract-notes.md`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlSection {
    pub socket: PathBuf,
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

/// Loading.
impl Config {
    /// Loads the configuration: the embedded defaults, then the file at `path` (which
    /// must exist and be readable) if one is given, then the `POINTGATE_*` variables of
    /// `env`; then validates it. Without a file, the defaults stand and there are no
    /// stations.
    pub fn load(path: Option<&Path>, env: &HashMap<String, String>) -> Result<Config, ConfigError> {
        let file = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
                Some(parse_table(&text, &path.display().to_string())?)
            }
            None => None,
        };
        Config::assemble(file, env)
    }

    /// As [`Config::load`], with the file's text given in memory (for tests and tools).
    pub fn from_toml_str(text: &str, env: &HashMap<String, String>) -> Result<Config, ConfigError> {
        let file = parse_table(text, "the configuration")?;
        Config::assemble(Some(file), env)
    }

    fn assemble(file: Option<Table>, env: &HashMap<String, String>) -> Result<Config, ConfigError> {
        let mut defaults = parse_table(DEFAULTS_TOML, "the built-in defaults")?;
        // The defaults' stations are a sample for the reader of the shipped file.
        defaults.remove("stations");

        let mut tree = defaults.clone();
        let must_name_store = file.is_some();
        let mut store_named = false;
        if let Some(file) = file {
            check_known_keys(&file, &defaults)?;
            store_named = file.get("store").and_then(|s| s.get("id")).is_some();
            merge(&mut tree, file);
        }
        let set_by_env = apply_env(&mut tree, &defaults, env)?;
        if must_name_store && !store_named && !set_by_env.contains_key("store.id") {
            return Err(invalid(
                "store.id",
                "required: set it in the file or with POINTGATE_STORE_ID",
            ));
        }

        let config: Config = serde_path_to_error::deserialize(Value::Table(tree)).map_err(|e| {
            let key = e.path().to_string();
            invalid(&key, e.inner().message()).with_env_origin(&set_by_env)
        })?;
        config
            .validate()
            .map_err(|e| e.with_env_origin(&set_by_env))?;
        Ok(config)
    }
}

fn parse_table(text: &str, origin: &str) -> Result<Table, ConfigError> {
    text.parse::<Table>().map_err(|e| ConfigError::Syntax {
        origin: origin.to_string(),
        message: e.to_string().trim_end().to_string(),
    })
}

/// Refuses a key of the file that the defaults do not have. `[stations.*]` tables are
/// left to deserialisation, whose error names the path as well.
fn check_known_keys(file: &Table, defaults: &Table) -> Result<(), ConfigError> {
    for (section, value) in file {
        if section == "stations" {
            continue;
        }
        let Some(known) = defaults.get(section) else {
            return Err(ConfigError::UnknownKey {
                key: section.clone(),
            });
        };
        if let (Value::Table(keys), Value::Table(known)) = (value, known) {
            if let Some(key) = keys.keys().find(|k| !known.contains_key(*k)) {
                return Err(ConfigError::UnknownKey {
                    key: format!("{section}.{key}"),
                });
            }
        }
    }
    Ok(())
}

/// Lays `over` onto `base`, table into table; any other value replaces.
fn merge(base: &mut Table, over: Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(Value::Table(base)), Value::Table(over)) => merge(base, over),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// Applies the `POINTGATE_<SECTION>_<KEY>` variables to `tree`, each typed like its key
/// in `defaults`; returns which variable set which key (`point.poll_interval` →
/// `POINTGATE_POINT_POLL_INTERVAL`).
fn apply_env(
    tree: &mut Table,
    defaults: &Table,
    env: &HashMap<String, String>,
) -> Result<BTreeMap<String, String>, ConfigError> {
    // Sorted, so that the error reported first does not depend on hashing.
    let vars: BTreeMap<&String, &String> = env
        .iter()
        .filter(|(var, _)| var.starts_with(ENV_PREFIX) && !ENV_NOT_KEYS.contains(&var.as_str()))
        .collect();
    let mut set_by_env = BTreeMap::new();
    for (var, raw) in vars {
        let name = var[ENV_PREFIX.len()..].to_ascii_lowercase();
        let (section, key) = name.split_once('_').unwrap_or((name.as_str(), ""));
        if section == "stations" {
            return Err(ConfigError::Env {
                var: var.clone(),
                message: "[stations.*] can only be set in the configuration file".to_string(),
            });
        }
        let dotted = if key.is_empty() {
            section.to_string()
        } else {
            format!("{section}.{key}")
        };
        let default = defaults
            .get(section)
            .and_then(|t| t.get(key))
            .filter(|_| !key.is_empty());
        let Some(default) = default else {
            return Err(ConfigError::Env {
                var: var.clone(),
                message: format!("names no configuration key (`{dotted}`)"),
            });
        };
        let value = typed_like(default, raw).map_err(|message| ConfigError::Invalid {
            key: dotted.clone(),
            message,
            env: Some(var.clone()),
        })?;
        // When the file made the section something other than a table, deserialisation
        // reports that; there is nothing to set.
        if let Some(section) = tree.get_mut(section).and_then(Value::as_table_mut) {
            section.insert(key.to_string(), value);
        }
        set_by_env.insert(dotted, var.clone());
    }
    Ok(set_by_env)
}

/// An environment variable's text as a value of the same type as `default`.
fn typed_like(default: &Value, raw: &str) -> Result<Value, String> {
    match default {
        Value::String(_) => Ok(Value::String(raw.to_string())),
        Value::Integer(_) => raw
            .trim()
            .parse()
            .map(Value::Integer)
            .map_err(|_| format!("`{raw}` is not an integer")),
        Value::Boolean(_) => match raw.trim() {
            "true" => Ok(Value::Boolean(true)),
            "false" => Ok(Value::Boolean(false)),
            _ => Err(format!("`{raw}` is not a boolean (true or false)")),
        },
        Value::Float(_) => raw
            .trim()
            .parse()
            .map(Value::Float)
            .map_err(|_| format!("`{raw}` is not a number")),
        Value::Datetime(_) | Value::Array(_) | Value::Table(_) => {
            Err("cannot be set from the environment".to_string())
        }
    }
}

/// Where the broker is, from `mqtt.url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddr {
    pub host: String,
    pub port: u16,
    /// `mqtts://`
    pub tls: bool,
}

/// An empty path in the file means "unset".
fn optional_path(path: &Path) -> Option<&Path> {
    (!path.as_os_str().is_empty()).then_some(path)
}

impl PointSection {
    /// `point.extra_ca_file`, when set.
    pub fn extra_ca_path(&self) -> Option<&Path> {
        optional_path(&self.extra_ca_file)
    }
}

impl MqttSection {
    /// `mqtt.password_file`, when set.
    pub fn password_path(&self) -> Option<&Path> {
        optional_path(&self.password_file)
    }

    /// `mqtt.ca_file`, when set.
    pub fn ca_path(&self) -> Option<&Path> {
        optional_path(&self.ca_file)
    }

    /// `mqtt.cert_file`, when set.
    pub fn cert_path(&self) -> Option<&Path> {
        optional_path(&self.cert_file)
    }

    /// `mqtt.key_file`, when set.
    pub fn key_path(&self) -> Option<&Path> {
        optional_path(&self.key_file)
    }

    /// Host, port (default 1883, or 8883 for `mqtts://`) and TLS of `mqtt.url`.
    pub fn broker_addr(&self) -> Result<BrokerAddr, ConfigError> {
        const KEY: &str = "mqtt.url";
        let url = reqwest::Url::parse(&self.url)
            .map_err(|e| invalid(KEY, format!("`{}` is not a URL: {e}", self.url)))?;
        let tls = match url.scheme() {
            "mqtt" => false,
            "mqtts" => true,
            other => {
                return Err(invalid(
                    KEY,
                    format!("scheme `{other}` is not mqtt:// or mqtts://"),
                ))
            }
        };
        let host = match url.host_str() {
            Some(host) if !host.is_empty() => unbracket(host).to_string(),
            _ => return Err(invalid(KEY, format!("`{}` has no host", self.url))),
        };
        if !url.username().is_empty() || url.password().is_some() {
            return Err(invalid(
                KEY,
                "must not hold credentials: use mqtt.username and mqtt.password_file",
            ));
        }
        if !matches!(url.path(), "" | "/") || url.query().is_some() || url.fragment().is_some() {
            return Err(invalid(
                KEY,
                format!("`{}` must be only scheme, host and port", self.url),
            ));
        }
        let port = url.port().unwrap_or(if tls { 8883 } else { 1883 });
        Ok(BrokerAddr { host, port, tls })
    }
}

/// Validation: every rule names its key.
impl Config {
    /// Checks every value's range and form, and the stations' bindings. Offline, and
    /// touches no file (see [`Config::check_files`] for that).
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_store()?;
        self.validate_point()?;
        self.validate_mqtt()?;
        self.validate_queue()?;
        if self.control.socket.as_os_str().is_empty() {
            return Err(invalid("control.socket", "required"));
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.level).map_err(|e| {
            invalid(
                "log.level",
                format!("`{}` is not a tracing filter: {e}", self.log.level),
            )
        })?;
        self.validate_stations()
    }

    fn validate_store(&self) -> Result<(), ConfigError> {
        let id = &self.store.id;
        let ok = (1..=32).contains(&id.len())
            && id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !ok {
            return Err(invalid(
                "store.id",
                format!("`{id}` must be 1 to 32 of a-z 0-9 -"),
            ));
        }
        Ok(())
    }

    fn validate_point(&self) -> Result<(), ConfigError> {
        let p = &self.point;
        if p.backend == BackendKind::Orders {
            return Err(invalid(
                "point.backend",
                "the orders backend is not available in this version",
            ));
        }
        check_base_url(&p.base_url)?;
        if p.access_token_file.as_os_str().is_empty() {
            return Err(invalid("point.access_token_file", "required"));
        }
        within(
            "point.request_timeout",
            p.request_timeout,
            ms(100),
            secs(300),
        )?;
        if p.max_requests_per_second < 1 {
            return Err(invalid(
                "point.max_requests_per_second",
                "must be at least 1",
            ));
        }
        within("point.poll_interval", p.poll_interval, ms(100), secs(60))?;
        not_zero("point.terminal_timeout", p.terminal_timeout)?;
        not_zero("point.confirm_window", p.confirm_window)?;
        not_zero("point.devices_refresh", p.devices_refresh)?;
        if p.confirm_window_max < p.confirm_window {
            return Err(invalid(
                "point.confirm_window_max",
                format!(
                    "{} is below point.confirm_window ({})",
                    human(p.confirm_window_max),
                    human(p.confirm_window)
                ),
            ));
        }
        Ok(())
    }

    fn validate_mqtt(&self) -> Result<(), ConfigError> {
        let m = &self.mqtt;
        let broker = m.broker_addr()?;
        if !broker.tls {
            for (key, path) in [
                ("mqtt.ca_file", m.ca_path()),
                ("mqtt.cert_file", m.cert_path()),
                ("mqtt.key_file", m.key_path()),
            ] {
                if path.is_some() {
                    return Err(invalid(
                        key,
                        "is set but mqtt.url is not mqtts://: TLS would not be used",
                    ));
                }
            }
        }
        match (m.cert_path(), m.key_path()) {
            (Some(_), None) => {
                return Err(invalid(
                    "mqtt.key_file",
                    "required when mqtt.cert_file is set",
                ))
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "mqtt.cert_file",
                    "required when mqtt.key_file is set",
                ))
            }
            _ => {}
        }
        if m.password_path().is_some() && m.username.is_empty() {
            return Err(invalid(
                "mqtt.username",
                "required when mqtt.password_file is set",
            ));
        }
        if m.client_id.chars().any(char::is_control) {
            return Err(invalid(
                "mqtt.client_id",
                "must not hold control characters",
            ));
        }
        if !m.topic_prefix.is_empty() {
            let prefix = m.topic_prefix.trim_end_matches('/');
            let bad = prefix.is_empty()
                || prefix.starts_with('$')
                || prefix.contains(['+', '#'])
                || prefix.chars().any(char::is_control);
            if bad {
                return Err(invalid(
                    "mqtt.topic_prefix",
                    format!("`{}` is not a topic prefix: no + # or control characters, not starting with $", m.topic_prefix),
                ));
            }
        }
        // rumqttc refuses (panics on) a keep-alive under 5 s: refuse it here, with the key.
        within("mqtt.keep_alive", m.keep_alive, secs(5), secs(3600))?;
        if m.keep_alive.subsec_nanos() != 0 {
            return Err(invalid(
                "mqtt.keep_alive",
                format!("{} is not a whole number of seconds", human(m.keep_alive)),
            ));
        }
        Ok(())
    }

    fn validate_queue(&self) -> Result<(), ConfigError> {
        let q = &self.queue;
        if q.dir.as_os_str().is_empty() {
            return Err(invalid("queue.dir", "required"));
        }
        within("queue.charge_ttl", q.charge_ttl, secs(10), secs(15 * 60))?;
        within("queue.refund_ttl", q.refund_ttl, secs(10), days(30))?;
        if q.max_pending < 1 {
            return Err(invalid("queue.max_pending", "must be at least 1"));
        }
        within("queue.retention", q.retention, days(1), days(365))
    }

    fn validate_stations(&self) -> Result<(), ConfigError> {
        let mut bound: BTreeMap<&str, &str> = BTreeMap::new();
        for (station, section) in &self.stations {
            let key = format!("stations.{station}");
            let ok = (1..=64).contains(&station.len())
                && station
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
            if !ok {
                return Err(invalid(
                    &key,
                    format!("station id `{station}` must be 1 to 64 of A-Z a-z 0-9 _ - ."),
                ));
            }
            let key = format!("{key}.terminals");
            let mut own = BTreeSet::new();
            for terminal in &section.terminals {
                let ok = (1..=128).contains(&terminal.len())
                    && !terminal.contains(['/', '+', '#'])
                    && !terminal
                        .chars()
                        .any(|c| c.is_control() || c.is_whitespace());
                if !ok {
                    return Err(invalid(
                        &key,
                        format!("terminal id `{terminal}` must be 1 to 128 characters, without / + # spaces or control characters"),
                    ));
                }
                if !own.insert(terminal.as_str()) {
                    return Err(invalid(
                        &key,
                        format!("terminal `{terminal}` is listed twice"),
                    ));
                }
                if let Some(other) = bound.insert(terminal, station) {
                    return Err(invalid(
                        &key,
                        format!("terminal `{terminal}` is bound to two stations, `{other}` and `{station}`: a terminal belongs to one station"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The offline checks of `check-config` that need the disk: the token file (see
    /// [`check_token_file`]), every optional file that is set can be opened, and
    /// `queue.dir` is a directory if it exists.
    pub fn check_files(&self) -> Result<(), ConfigError> {
        check_token_file(&self.point.access_token_file)?;
        let optional = [
            ("point.extra_ca_file", self.point.extra_ca_path()),
            ("mqtt.password_file", self.mqtt.password_path()),
            ("mqtt.ca_file", self.mqtt.ca_path()),
            ("mqtt.cert_file", self.mqtt.cert_path()),
            ("mqtt.key_file", self.mqtt.key_path()),
        ];
        for (key, path) in optional {
            if let Some(path) = path {
                File::open(path)
                    .map_err(|e| invalid(key, format!("cannot read {}: {e}", path.display())))?;
            }
        }
        match std::fs::metadata(&self.queue.dir) {
            Ok(meta) if !meta.is_dir() => Err(invalid(
                "queue.dir",
                format!("{} is not a directory", self.queue.dir.display()),
            )),
            _ => Ok(()),
        }
    }
}

/// Checks the access token file without keeping or showing the token: it exists, is a
/// regular file, is neither group- nor world-writable nor world-readable (the owner is
/// not checked), can be read, and holds one non-empty token.
pub fn check_token_file(path: &Path) -> Result<(), ConfigError> {
    const KEY: &str = "point.access_token_file";
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| invalid(KEY, format!("{shown}: {e}")))?;
    if !meta.is_file() {
        return Err(invalid(KEY, format!("{shown} is not a regular file")));
    }
    let mode = meta.permissions().mode() & 0o777;
    let loose = [
        (0o020, "group-writable"),
        (0o002, "world-writable"),
        (0o004, "world-readable"),
    ];
    if let Some((_, what)) = loose.iter().find(|(bit, _)| mode & bit != 0) {
        return Err(invalid(
            KEY,
            format!(
                "{shown} is {what} (mode {mode:04o}): allow at most 0640, e.g. chmod 600 {shown}"
            ),
        ));
    }
    let mut token = String::new();
    File::open(path)
        .and_then(|mut f| f.read_to_string(&mut token))
        .map_err(|e| invalid(KEY, format!("cannot read {shown}: {e}")))?;
    let token = token.trim();
    if token.is_empty() {
        return Err(invalid(KEY, format!("{shown} is empty")));
    }
    if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid(
            KEY,
            format!("{shown} must hold one token: it has spaces or several lines"),
        ));
    }
    Ok(())
}

fn check_base_url(base_url: &str) -> Result<(), ConfigError> {
    const KEY: &str = "point.base_url";
    let url = reqwest::Url::parse(base_url)
        .map_err(|e| invalid(KEY, format!("`{base_url}` is not a URL: {e}")))?;
    let loopback = match url.host_str() {
        Some(host) if !host.is_empty() => {
            let host = unbracket(host);
            host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
        }
        _ => return Err(invalid(KEY, format!("`{base_url}` has no host"))),
    };
    match url.scheme() {
        "https" => {}
        "http" if loopback => {}
        "http" => {
            return Err(invalid(
                KEY,
                "must be https:// (http:// only for a loopback host)",
            ))
        }
        other => return Err(invalid(KEY, format!("scheme `{other}` is not https://"))),
    }
    if !url.username().is_empty()
        || url.password().is_some()
        || url.query().is_some()
        || url.fragment().is_some()
    {
        return Err(invalid(
            KEY,
            format!("`{base_url}` must not hold credentials, a query or a fragment"),
        ));
    }
    Ok(())
}

/// An IPv6 host as URLs write it (`[::1]`) without its brackets.
fn unbracket(host: &str) -> &str {
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

fn within(key: &str, value: Duration, min: Duration, max: Duration) -> Result<(), ConfigError> {
    if value < min {
        return Err(invalid(
            key,
            format!("{} is below {}", human(value), human(min)),
        ));
    }
    if value > max {
        return Err(invalid(
            key,
            format!("{} is above {}", human(value), human(max)),
        ));
    }
    Ok(())
}

fn not_zero(key: &str, value: Duration) -> Result<(), ConfigError> {
    if value.is_zero() {
        return Err(invalid(key, "must be more than 0s"));
    }
    Ok(())
}

fn human(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

const fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

const fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

const fn days(n: u64) -> Duration {
    Duration::from_secs(n * 86_400)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "[store]\nid = \"s1\"\n";

    fn env(vars: &[(&str, &str)]) -> HashMap<String, String> {
        vars.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn load(text: &str, vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_toml_str(text, &env(vars))
    }

    /// The minimal file with `lines` added to `[section]`.
    fn with(section: &str, lines: &str) -> String {
        format!("{MINIMAL}[{section}]\n{lines}\n")
    }

    /// Loads and expects a refusal naming `key`; returns the message.
    fn refused(text: &str, vars: &[(&str, &str)], key: &str) -> String {
        let err = load(text, vars).expect_err("should be refused");
        let message = err.to_string();
        assert!(message.contains(key), "`{message}` does not name `{key}`");
        message
    }

    /// An override of `key` by environment: accepted with `good`, refused with `bad`.
    fn env_range(var: &str, key: &str, good: &str, bad: &str) {
        load(MINIMAL, &[(var, good)]).unwrap_or_else(|e| panic!("{var}={good}: {e}"));
        let message = refused(MINIMAL, &[(var, bad)], key);
        assert!(message.contains(var), "`{message}` does not name {var}");
    }

    #[test]
    fn the_shipped_file_loads_and_its_values_are_the_defaults() {
        let shipped = Config::from_toml_str(DEFAULTS_TOML, &HashMap::new()).expect("shipped file");
        assert_eq!(shipped.store.id, "store-0001");
        assert_eq!(shipped.store.site, Site::MLA);
        assert_eq!(shipped.point.backend, BackendKind::Integrations);
        assert_eq!(shipped.point.poll_interval, secs(2));
        assert_eq!(shipped.point.max_requests_per_second, 5);
        assert_eq!(shipped.point.confirm_window_max, secs(24 * 3600));
        assert_eq!(shipped.queue.charge_ttl, secs(120));
        assert_eq!(shipped.queue.refund_ttl, days(7));
        assert_eq!(shipped.queue.retention, days(30));
        assert_eq!(shipped.queue.max_pending, 10_000);
        assert_eq!(shipped.mqtt.keep_alive, secs(10));
        assert_eq!(shipped.log.level, "info");
        assert_eq!(
            shipped.control.socket,
            PathBuf::from("/run/pointgate/control.sock")
        );
        assert_eq!(
            shipped
                .stations
                .get("kiosk-01")
                .map(|s| s.terminals.clone()),
            Some(vec!["PAX_A910__SMARTPOS1234345545".to_string()])
        );
        assert_eq!(shipped.topic_prefix(), "pointgate/store-0001");
        assert_eq!(shipped.client_id(), "pointgate-store-0001");
    }

    #[test]
    fn a_minimal_file_gets_every_default_and_no_stations() {
        let c = load(MINIMAL, &[]).expect("minimal");
        assert_eq!(c.store.id, "s1");
        assert_eq!(c.point.base_url, "https://api.mercadopago.com");
        assert_eq!(
            c.point.access_token_file,
            PathBuf::from("/etc/pointgate/access_token")
        );
        assert_eq!(c.point.extra_ca_path(), None);
        assert_eq!(c.mqtt.password_path(), None);
        assert!(c.stations.is_empty(), "the sample station must not leak in");
        assert_eq!(c.topic_prefix(), "pointgate/s1");
    }

    #[test]
    fn without_a_file_the_defaults_stand_and_there_are_no_stations() {
        let c = Config::load(None, &HashMap::new()).expect("defaults");
        assert_eq!(c.store.id, "store-0001");
        assert!(c.stations.is_empty());
    }

    #[test]
    fn the_file_s_stations_replace_the_sample() {
        let text = format!("{MINIMAL}[stations.lane-2]\nterminals = [\"T1\"]\n");
        let c = load(&text, &[]).expect("stations");
        assert_eq!(c.stations.keys().collect::<Vec<_>>(), ["lane-2"]);
        assert_eq!(c.station_of_terminal("T1"), Some("lane-2"));
        assert_eq!(c.station_of_terminal("PAX_A910__SMARTPOS1234345545"), None);
    }

    #[test]
    fn a_file_value_replaces_only_its_own_key() {
        let c = load(&with("point", "poll_interval = \"500ms\""), &[]).expect("override");
        assert_eq!(c.point.poll_interval, ms(500));
        assert_eq!(c.point.request_timeout, secs(10));
    }

    #[test]
    fn a_file_must_name_the_store() {
        refused("[log]\nlevel = \"debug\"\n", &[], "store.id");
        let c = load("", &[("POINTGATE_STORE_ID", "from-env")]).expect("env names it");
        assert_eq!(c.store.id, "from-env");
    }

    #[test]
    fn a_missing_file_is_refused_naming_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("absent.toml");
        let err = Config::load(Some(&path), &HashMap::new()).expect_err("missing");
        assert!(matches!(err, ConfigError::Read { .. }));
        assert!(err.to_string().contains("absent.toml"), "{err}");
    }

    #[test]
    fn a_file_is_read_from_disk() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("p.toml");
        std::fs::write(&path, with("queue", "max_pending = 7")).expect("write");
        let c = Config::load(Some(&path), &HashMap::new()).expect("load");
        assert_eq!(c.queue.max_pending, 7);
    }

    #[test]
    fn broken_toml_is_refused_naming_the_line() {
        let err = load("[store\nid = 1", &[]).expect_err("syntax");
        assert!(matches!(err, ConfigError::Syntax { .. }));
        assert!(err.to_string().contains("line 1"), "{err}");
    }

    #[test]
    fn unknown_keys_are_refused_by_their_path() {
        let err = load(&with("point", "pol_interval = \"2s\""), &[]).expect_err("unknown");
        assert_eq!(err.to_string(), "unknown key `point.pol_interval`");
        assert_eq!(err.key(), Some("point.pol_interval"));
        assert_eq!(
            load("[stor]\nid = \"s\"\n", &[])
                .expect_err("section")
                .to_string(),
            "unknown key `stor`"
        );
        let station = format!("{MINIMAL}[stations.k1]\nterminal = [\"T\"]\n");
        refused(&station, &[], "stations.k1.terminal");
    }

    #[test]
    fn a_value_of_the_wrong_form_is_refused_naming_its_key() {
        refused(
            &with("point", "poll_interval = 2"),
            &[],
            "point.poll_interval",
        );
        refused(
            &with("point", "poll_interval = \"2 parsecs\""),
            &[],
            "point.poll_interval",
        );
        refused(
            &with("queue", "max_pending = \"many\""),
            &[],
            "queue.max_pending",
        );
        refused(&with("queue", "max_pending = -1"), &[], "queue.max_pending");
        refused("[store]\nid = \"s\"\nsite = \"MLX\"\n", &[], "store.site");
        refused(&with("point", "backend = \"rest\""), &[], "point.backend");
        refused(
            &format!("{MINIMAL}[stations.k1]\nterminals = \"T\"\n"),
            &[],
            "stations.k1.terminals",
        );
    }

    #[test]
    fn environment_overrides_win_over_the_file_and_are_typed() {
        let text = with("point", "poll_interval = \"5s\"");
        let c = load(
            &text,
            &[
                ("POINTGATE_POINT_POLL_INTERVAL", "500ms"),
                ("POINTGATE_QUEUE_MAX_PENDING", "5"),
                ("POINTGATE_MQTT_CLIENT_ID", "edge-7"),
                ("POINTGATE_CONFIG", "/somewhere.toml"),
                ("UNRELATED", "x"),
            ],
        )
        .expect("overrides");
        assert_eq!(c.point.poll_interval, ms(500));
        assert_eq!(c.queue.max_pending, 5);
        assert_eq!(c.client_id(), "edge-7");
    }

    #[test]
    fn an_environment_value_is_typed_by_the_default_not_by_the_file() {
        let text = with("point", "poll_interval = 2");
        let c = load(&text, &[("POINTGATE_POINT_POLL_INTERVAL", "500ms")]).expect("env wins");
        assert_eq!(c.point.poll_interval, ms(500));
    }

    #[test]
    fn an_environment_variable_naming_no_key_is_refused_naming_it() {
        for var in [
            "POINTGATE_POINT_POL_INTERVAL",
            "POINTGATE_NOPE_X",
            "POINTGATE_POINT",
            "POINTGATE_",
        ] {
            let err = load(MINIMAL, &[(var, "1")]).expect_err(var);
            assert!(matches!(err, ConfigError::Env { .. }), "{var}: {err}");
            assert!(err.to_string().contains(var), "{err}");
        }
        let err = load(MINIMAL, &[("POINTGATE_POINT_POL_INTERVAL", "1s")]).expect_err("typo");
        assert!(err.to_string().contains("point.pol_interval"), "{err}");
    }

    #[test]
    fn stations_cannot_be_set_from_the_environment() {
        let err = load(MINIMAL, &[("POINTGATE_STATIONS_K1_TERMINALS", "T")]).expect_err("stations");
        assert!(err.to_string().contains("stations"), "{err}");
    }

    #[test]
    fn an_environment_value_of_the_wrong_type_names_key_and_variable() {
        let m = refused(
            MINIMAL,
            &[("POINTGATE_QUEUE_MAX_PENDING", "lots")],
            "queue.max_pending",
        );
        assert!(m.contains("POINTGATE_QUEUE_MAX_PENDING"), "{m}");
        let m = refused(
            MINIMAL,
            &[("POINTGATE_POINT_POLL_INTERVAL", "soon")],
            "point.poll_interval",
        );
        assert!(m.contains("POINTGATE_POINT_POLL_INTERVAL"), "{m}");
    }

    #[test]
    fn environment_values_follow_the_type_of_the_default() {
        assert_eq!(
            typed_like(&Value::Boolean(false), "true"),
            Ok(Value::Boolean(true))
        );
        assert!(typed_like(&Value::Boolean(false), "yes").is_err());
        assert_eq!(
            typed_like(&Value::Integer(1), " 42 "),
            Ok(Value::Integer(42))
        );
        assert!(typed_like(&Value::Integer(1), "4.2").is_err());
        assert_eq!(
            typed_like(&Value::String(String::new()), "a b"),
            Ok(Value::String("a b".into()))
        );
        assert!(typed_like(&Value::Array(vec![]), "x").is_err());
    }

    #[test]
    fn store_id_is_1_to_32_of_lowercase_digits_and_dashes() {
        for good in ["a", "store-0001", &"a".repeat(32)] {
            load(&format!("[store]\nid = \"{good}\"\n"), &[])
                .unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        for bad in ["", "Store", "store_1", "a/b", &"a".repeat(33)] {
            refused(&format!("[store]\nid = \"{bad}\"\n"), &[], "store.id");
        }
    }

    #[test]
    fn the_orders_backend_is_refused_for_now() {
        let m = refused(&with("point", "backend = \"orders\""), &[], "point.backend");
        assert_eq!(
            m,
            "point.backend: the orders backend is not available in this version"
        );
    }

    #[test]
    fn base_url_must_be_https_except_on_loopback() {
        for good in [
            "https://api.mercadopago.com",
            "https://10.0.0.1:8443/",
            "http://127.0.0.1:8080",
            "http://localhost:1",
            "http://[::1]:9",
        ] {
            load(&with("point", &format!("base_url = \"{good}\"")), &[])
                .unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        for bad in [
            "http://api.mercadopago.com",
            "http://10.0.0.1",
            "ftp://x",
            "not a url",
            "https://u:p@h",
            "https://h/?q=1",
        ] {
            refused(
                &with("point", &format!("base_url = \"{bad}\"")),
                &[],
                "point.base_url",
            );
        }
    }

    #[test]
    fn an_empty_token_file_setting_is_refused() {
        refused(
            &with("point", "access_token_file = \"\""),
            &[],
            "point.access_token_file",
        );
    }

    #[test]
    fn point_ranges_are_enforced() {
        env_range(
            "POINTGATE_POINT_POLL_INTERVAL",
            "point.poll_interval",
            "100ms",
            "50ms",
        );
        env_range(
            "POINTGATE_POINT_POLL_INTERVAL",
            "point.poll_interval",
            "60s",
            "61s",
        );
        env_range(
            "POINTGATE_POINT_MAX_REQUESTS_PER_SECOND",
            "point.max_requests_per_second",
            "1",
            "0",
        );
        env_range(
            "POINTGATE_POINT_REQUEST_TIMEOUT",
            "point.request_timeout",
            "1s",
            "0s",
        );
        env_range(
            "POINTGATE_POINT_TERMINAL_TIMEOUT",
            "point.terminal_timeout",
            "1s",
            "0s",
        );
        env_range(
            "POINTGATE_POINT_DEVICES_REFRESH",
            "point.devices_refresh",
            "1m",
            "0s",
        );
        env_range(
            "POINTGATE_POINT_CONFIRM_WINDOW",
            "point.confirm_window",
            "1s",
            "0s",
        );
        env_range(
            "POINTGATE_POINT_CONFIRM_WINDOW_MAX",
            "point.confirm_window_max",
            "60s",
            "59s",
        );
    }

    #[test]
    fn the_range_message_reads_as_the_contract_shows() {
        let m = refused(
            &with("point", "poll_interval = \"50ms\""),
            &[],
            "point.poll_interval",
        );
        assert_eq!(m, "point.poll_interval: 50ms is below 100ms");
    }

    #[test]
    fn queue_ranges_are_enforced() {
        env_range(
            "POINTGATE_QUEUE_CHARGE_TTL",
            "queue.charge_ttl",
            "10s",
            "9s",
        );
        env_range(
            "POINTGATE_QUEUE_CHARGE_TTL",
            "queue.charge_ttl",
            "15m",
            "16m",
        );
        env_range(
            "POINTGATE_QUEUE_REFUND_TTL",
            "queue.refund_ttl",
            "30d",
            "31d",
        );
        env_range("POINTGATE_QUEUE_RETENTION", "queue.retention", "1d", "23h");
        env_range(
            "POINTGATE_QUEUE_RETENTION",
            "queue.retention",
            "365d",
            "366d",
        );
        env_range("POINTGATE_QUEUE_MAX_PENDING", "queue.max_pending", "1", "0");
        env_range("POINTGATE_QUEUE_DIR", "queue.dir", "/tmp/q", "");
    }

    #[test]
    fn mqtt_url_is_mqtt_or_mqtts_with_a_host_and_an_optional_port() {
        let addr = |url: &str| {
            load(MINIMAL, &[("POINTGATE_MQTT_URL", url)])
                .map(|c| c.mqtt.broker_addr().expect("valid"))
        };
        let plain = addr("mqtt://broker.local").expect("mqtt");
        assert_eq!(
            plain,
            BrokerAddr {
                host: "broker.local".into(),
                port: 1883,
                tls: false
            }
        );
        let tls = addr("mqtts://10.1.2.3:9883").expect("mqtts");
        assert_eq!(
            tls,
            BrokerAddr {
                host: "10.1.2.3".into(),
                port: 9883,
                tls: true
            }
        );
        assert_eq!(addr("mqtts://[::1]").expect("v6").host, "::1");
        assert_eq!(addr("mqtts://b/").expect("slash").port, 8883);
        for bad in [
            "tcp://b:1883",
            "mqtt://",
            "mqtt://u:p@b",
            "mqtt://b/topic",
            "mqtt://b?client_id=x",
            "b:1883",
        ] {
            refused(MINIMAL, &[("POINTGATE_MQTT_URL", bad)], "mqtt.url");
        }
    }

    #[test]
    fn mqtt_tls_files_need_mqtts_and_come_in_pairs() {
        refused(&with("mqtt", "ca_file = \"/ca.pem\""), &[], "mqtt.ca_file");
        let tls = "url = \"mqtts://b\"\n";
        load(&with("mqtt", &format!("{tls}ca_file = \"/ca.pem\"")), &[]).expect("ca with mqtts");
        refused(
            &with("mqtt", &format!("{tls}cert_file = \"/c.pem\"")),
            &[],
            "mqtt.key_file",
        );
        refused(
            &with("mqtt", &format!("{tls}key_file = \"/k.pem\"")),
            &[],
            "mqtt.cert_file",
        );
        let pair = load(
            &with(
                "mqtt",
                &format!("{tls}cert_file = \"/c.pem\"\nkey_file = \"/k.pem\""),
            ),
            &[],
        )
        .expect("pair");
        assert_eq!(pair.mqtt.cert_path(), Some(Path::new("/c.pem")));
        assert_eq!(pair.mqtt.key_path(), Some(Path::new("/k.pem")));
    }

    #[test]
    fn an_mqtt_password_needs_a_username() {
        refused(
            &with("mqtt", "password_file = \"/p\""),
            &[],
            "mqtt.username",
        );
        load(
            &with("mqtt", "password_file = \"/p\"\nusername = \"agent\""),
            &[],
        )
        .expect("both");
    }

    #[test]
    fn mqtt_topic_prefix_must_be_usable_as_a_prefix() {
        let c = load(&with("mqtt", "topic_prefix = \"shops/mla/7/\""), &[]).expect("prefix");
        assert_eq!(c.topic_prefix(), "shops/mla/7");
        for bad in ["a/+/b", "a/#", "$SYS/x", "/"] {
            refused(
                &with("mqtt", &format!("topic_prefix = \"{bad}\"")),
                &[],
                "mqtt.topic_prefix",
            );
        }
    }

    #[test]
    fn mqtt_keep_alive_is_whole_seconds_from_5s_to_1h() {
        env_range("POINTGATE_MQTT_KEEP_ALIVE", "mqtt.keep_alive", "5s", "4s");
        env_range("POINTGATE_MQTT_KEEP_ALIVE", "mqtt.keep_alive", "1h", "61m");
        env_range(
            "POINTGATE_MQTT_KEEP_ALIVE",
            "mqtt.keep_alive",
            "6s",
            "5500ms",
        );
    }

    #[test]
    fn log_level_must_be_a_tracing_filter() {
        load(&with("log", "level = \"pointgate=debug,warn\""), &[]).expect("filter");
        refused(&with("log", "level = \"pointgate=loud\""), &[], "log.level");
    }

    #[test]
    fn station_ids_must_be_usable_as_a_topic_segment() {
        for good in ["kiosk-01", "Lane_2.a", &"k".repeat(64)] {
            load(&format!("{MINIMAL}[stations.\"{good}\"]\n"), &[])
                .unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        for bad in ["a/b", "a+", "a#", "a b", "", &"k".repeat(65)] {
            refused(
                &format!("{MINIMAL}[stations.\"{bad}\"]\n"),
                &[],
                "stations.",
            );
        }
    }

    #[test]
    fn terminal_ids_must_be_usable_as_a_topic_segment_and_listed_once() {
        for bad in ["", "a/b", "a+", "a#", "a b"] {
            refused(
                &format!("{MINIMAL}[stations.k1]\nterminals = [\"{bad}\"]\n"),
                &[],
                "stations.k1.terminals",
            );
        }
        let m = refused(
            &format!("{MINIMAL}[stations.k1]\nterminals = [\"T\", \"T\"]\n"),
            &[],
            "stations.k1.terminals",
        );
        assert!(m.contains("twice"), "{m}");
    }

    #[test]
    fn a_terminal_bound_to_two_stations_is_refused_naming_both() {
        let text = format!("{MINIMAL}[stations.kiosk-01]\nterminals = [\"T1\", \"T2\"]\n[stations.kiosk-02]\nterminals = [\"T2\"]\n");
        let m = refused(&text, &[], "stations.kiosk-02.terminals");
        assert!(m.contains("kiosk-01") && m.contains("`T2`"), "{m}");
        let apart = format!("{MINIMAL}[stations.kiosk-01]\nterminals = [\"T1\"]\n[stations.kiosk-02]\nterminals = [\"T2\"]\n");
        load(&apart, &[]).expect("distinct terminals");
    }

    #[test]
    fn errors_from_the_file_do_not_claim_an_environment_origin() {
        let m = refused(
            &with("point", "poll_interval = \"50ms\""),
            &[("POINTGATE_QUEUE_MAX_PENDING", "3")],
            "point.poll_interval",
        );
        assert!(!m.contains("set by"), "{m}");
    }

    fn token_file(dir: &Path, mode: u32, content: &str) -> PathBuf {
        let path = dir.join(format!("token-{mode:o}"));
        std::fs::write(&path, content).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        path
    }

    #[test]
    fn a_private_token_file_passes() {
        let dir = tempfile::tempdir().expect("tempdir");
        for mode in [0o600, 0o400, 0o640, 0o440] {
            check_token_file(&token_file(dir.path(), mode, "APP_USR-123\n"))
                .unwrap_or_else(|e| panic!("{mode:o}: {e}"));
        }
    }

    #[test]
    fn a_token_file_open_to_others_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (mode, what) in [
            (0o644, "world-readable"),
            (0o620, "group-writable"),
            (0o602, "world-writable"),
            (0o604, "world-readable"),
        ] {
            let err =
                check_token_file(&token_file(dir.path(), mode, "APP_USR-123")).expect_err("loose");
            let m = err.to_string();
            assert!(
                m.starts_with("point.access_token_file:") && m.contains(what),
                "{mode:o}: {m}"
            );
        }
    }

    #[test]
    fn a_missing_empty_or_multi_line_token_file_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = check_token_file(&dir.path().join("none")).expect_err("missing");
        assert_eq!(err.key(), Some("point.access_token_file"));
        check_token_file(&token_file(dir.path(), 0o600, " \n")).expect_err("empty");
        check_token_file(&token_file(dir.path(), 0o640, "a\nb\n")).expect_err("two lines");
        check_token_file(dir.path()).expect_err("a directory");
    }

    #[test]
    fn a_token_is_never_shown_in_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = check_token_file(&token_file(dir.path(), 0o600, "SECRET-CANARY other"))
            .expect_err("two words");
        assert!(!err.to_string().contains("SECRET-CANARY"), "{err}");
    }

    #[test]
    fn check_files_checks_the_token_and_every_set_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let token = token_file(dir.path(), 0o600, "APP_USR-1");
        let token_env = (
            "POINTGATE_POINT_ACCESS_TOKEN_FILE",
            token.to_str().expect("utf-8"),
        );
        let queue = ("POINTGATE_QUEUE_DIR", dir.path().to_str().expect("utf-8"));
        load(MINIMAL, &[token_env, queue])
            .expect("load")
            .check_files()
            .expect("files ok");

        let absent = dir.path().join("ca.pem");
        let ca = (
            "POINTGATE_POINT_EXTRA_CA_FILE",
            absent.to_str().expect("utf-8"),
        );
        let err = load(MINIMAL, &[token_env, queue, ca])
            .expect("load")
            .check_files()
            .expect_err("no ca");
        assert_eq!(err.key(), Some("point.extra_ca_file"));

        let not_dir = ("POINTGATE_QUEUE_DIR", token_env.1);
        let err = load(MINIMAL, &[token_env, not_dir])
            .expect("load")
            .check_files()
            .expect_err("queue");
        assert_eq!(err.key(), Some("queue.dir"));
    }

    #[test]
    fn the_control_socket_is_set_by_file_or_environment_and_never_empty() {
        let text = with("control", "socket = \"/tmp/pg/control.sock\"");
        let c = load(&text, &[]).expect("file sets it");
        assert_eq!(c.control.socket, PathBuf::from("/tmp/pg/control.sock"));
        let c = load(&text, &[("POINTGATE_CONTROL_SOCKET", "/tmp/x.sock")]).expect("env wins");
        assert_eq!(c.control.socket, PathBuf::from("/tmp/x.sock"));
        let message = refused(&with("control", "socket = \"\""), &[], "control.socket");
        assert!(message.contains("required"), "{message}");
        refused(&with("control", "sock = \"/x\""), &[], "control.sock");
    }
}
