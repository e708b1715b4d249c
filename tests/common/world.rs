//! One end-to-end world: a real Mosquitto on a free port (plain, with options, or the
//! shipped config and ACL), the Point simulator over real TLS, the agent (in-process
//! through `pointgate::run`, or the real binary through the one process harness), and
//! station clients, with the agent online before the test's first command.
//!
//! ```ignore
//! let w = World::builder()
//!     .agent(AgentOpts { queue_extra: vec!["charge_ttl = \"10s\""], ..AgentOpts::default() })
//!     .station("kiosk-1-test")  // every station's events and agent/status, online seen
//!     .start()
//!     .await;
//! ```
//!
//! Variations, all on [`World::builder`]:
//! - the broker: [`WorldBuilder::broker`] (Mosquitto options), [`WorldBuilder::acl`] (the
//!   shipped config and ACL, the agent logged in as `pointgate`),
//!   [`WorldBuilder::with_broker`] (one the test started) with [`WorldBuilder::agent_url`]
//!   (the agent behind a fault proxy), [`WorldBuilder::broker_url`] (none of the world's
//!   own: nothing listens there, or the test's TLS broker);
//! - the simulator and the config: [`WorldBuilder::agent`] with [`AgentOpts`] (terminal
//!   mode, stations and devices, tokens, `[point]`/`[queue]`/`[mqtt]` overrides, store id,
//!   state directory; the presets [`AgentOpts::crowd`] and [`AgentOpts::single`]); faults
//!   are set on `world.agent.sim` once the world runs;
//! - the agent: in-process (default), [`WorldBuilder::process`] (the binary, waited online
//!   through a [`StatusWatch`]), or [`WorldBuilder::setup_only`] (simulator and config, no
//!   agent yet: the test starts it, in-process or as a process, with its own environment
//!   or wrapper);
//! - the stations: [`WorldBuilder::station`], [`WorldBuilder::status_station`],
//!   [`WorldBuilder::acl_station`] (each waits until it saw the agent online,
//!   [`WorldBuilder::online_within`]), [`WorldBuilder::status_watch`].
//!
//! A test file whose own `World` holds more (an event log, a second station) builds it
//! from this one ([`World::take_station`], [`World::into_broker_and_agent`]).

#![allow(dead_code)]

use std::time::Duration;

use super::acl::AclBroker;
use super::agent::{AgentOpts, TestAgent};
use super::crowd::StatusWatch;
use super::mosquitto::{Mosquitto, MosquittoOpts};
use super::mqtt::MqttStation;
use super::util::unix_ms;

/// How long the world waits for the agent to come online.
pub const ONLINE: Duration = Duration::from_secs(30);

enum BrokerSpec {
    Default,
    Opts(MosquittoOpts),
    Given(Mosquitto),
    Acl(Vec<String>),
    /// No broker: the agent's `mqtt.url`.
    None(String),
}

enum Run {
    InProcess,
    Process,
    SetupOnly,
}

enum StationSpec {
    /// Every station's events and `agent/status`.
    All(String),
    /// `agent/status` only.
    Status(String),
    /// Logged in (ACL broker) as this station, its own events and `agent/status`.
    Acl(String),
}

/// How a [`World`] is made; [`World::builder`].
pub struct WorldBuilder {
    agent: AgentOpts,
    broker: BrokerSpec,
    run: Run,
    station: Option<StationSpec>,
    status_watch: bool,
    online: Duration,
    agent_url: Option<String>,
}

impl WorldBuilder {
    /// The agent's (and the simulator's) options.
    pub fn agent(mut self, opts: AgentOpts) -> Self {
        self.agent = opts;
        self
    }

    /// Mosquitto with these options (default: [`Mosquitto::start_default`]).
    pub fn broker(mut self, opts: MosquittoOpts) -> Self {
        self.broker = BrokerSpec::Opts(opts);
        self
    }

    /// Mosquitto with the shipped config and ACL, users `pointgate` (the agent, whose
    /// `[mqtt]` gets its username and password file) and each of `stations`.
    pub fn acl(mut self, stations: &[&str]) -> Self {
        self.broker = BrokerSpec::Acl(stations.iter().map(|s| s.to_string()).collect());
        self
    }

    /// This broker, started by the test (to put something in front of it, say).
    pub fn with_broker(mut self, broker: Mosquitto) -> Self {
        self.broker = BrokerSpec::Given(broker);
        self
    }

    /// The agent's `mqtt.url`, when not the broker's own (a fault proxy in front of it, a
    /// TLS listener); stations still use the broker's port.
    pub fn agent_url(mut self, url: &str) -> Self {
        self.agent_url = Some(url.to_owned());
        self
    }

    /// No broker of the world's own: the agent gets `url` (where nothing listens, or a
    /// broker the test set up itself, such as a TLS listener with its own PKI).
    pub fn broker_url(mut self, url: &str) -> Self {
        self.broker = BrokerSpec::None(url.to_owned());
        self
    }

    /// The agent as a process (`pointgate run`), started without extra environment.
    pub fn process(mut self) -> Self {
        self.run = Run::Process;
        self
    }

    /// The simulator and the config only: the test starts the agent.
    pub fn setup_only(mut self) -> Self {
        self.run = Run::SetupOnly;
        self
    }

    /// A [`StatusWatch`] on the agent's status (always with [`WorldBuilder::process`]).
    pub fn status_watch(mut self) -> Self {
        self.status_watch = true;
        self
    }

    /// An MQTT 5 station (`client_id`, clean start) subscribed to every station's events
    /// and to `agent/status`; the world waits until it saw the agent online.
    pub fn station(mut self, client_id: &str) -> Self {
        self.station = Some(StationSpec::All(client_id.to_owned()));
        self
    }

    /// [`WorldBuilder::station`] subscribed to `agent/status` only.
    pub fn status_station(mut self, client_id: &str) -> Self {
        self.station = Some(StationSpec::Status(client_id.to_owned()));
        self
    }

    /// With [`WorldBuilder::acl`]: a station logged in as `station` (also its client id),
    /// subscribed to its own events and to `agent/status`, the agent seen online.
    pub fn acl_station(mut self, station: &str) -> Self {
        self.station = Some(StationSpec::Acl(station.to_owned()));
        self
    }

    /// How long to wait for the agent to come online (default [`ONLINE`]).
    pub fn online_within(mut self, wait: Duration) -> Self {
        self.online = wait;
        self
    }

    pub async fn start(self) -> World {
        let mut opts = self.agent;
        let (broker, acl, url) = match self.broker {
            BrokerSpec::Default => {
                let b = Mosquitto::start_default();
                let url = b.url();
                (Some(b), None, url)
            }
            BrokerSpec::Opts(o) => {
                let b = Mosquitto::start(o);
                let url = b.url();
                (Some(b), None, url)
            }
            BrokerSpec::Given(b) => {
                let url = b.url();
                (Some(b), None, url)
            }
            BrokerSpec::Acl(stations) => {
                let users: Vec<&str> = stations.iter().map(String::as_str).collect();
                let acl = AclBroker::start(&users);
                opts.mqtt_extra.extend(acl.agent_mqtt_lines());
                let url = acl.url();
                (None, Some(acl), url)
            }
            BrokerSpec::None(url) => (None, None, url),
        };
        let url = self.agent_url.unwrap_or(url);
        let port = broker
            .as_ref()
            .map(Mosquitto::port)
            .or(acl.as_ref().map(AclBroker::port));
        let mut agent = TestAgent::setup(&url, opts).await;
        let watch_wanted = self.status_watch || matches!(self.run, Run::Process);
        let watch = match (watch_wanted, port) {
            (true, Some(port)) => Some(StatusWatch::start(port, &agent.prefix()).await),
            _ => None,
        };
        match self.run {
            Run::InProcess => agent.start_again(),
            Run::Process => {
                let spawned = unix_ms();
                agent.spawn(&[]);
                watch
                    .as_ref()
                    .expect("a broker to watch the agent on")
                    .wait_online_since(spawned, self.online)
                    .await
                    .expect("the agent comes online");
            }
            Run::SetupOnly => {}
        }
        let station = match self.station {
            None => None,
            Some(spec) => {
                let port = port.expect("a station needs the world's broker");
                let status = agent.status_topic();
                let mut s = match &spec {
                    StationSpec::All(id) => {
                        let mut s = MqttStation::connect(port, id, true).await;
                        s.subscribe(&format!("{}/station/+/evt", agent.prefix()))
                            .await;
                        s.subscribe(&status).await;
                        s
                    }
                    StationSpec::Status(id) => {
                        let mut s = MqttStation::connect(port, id, true).await;
                        s.subscribe(&status).await;
                        s
                    }
                    StationSpec::Acl(user) => {
                        let acl = acl.as_ref().expect("acl_station needs .acl(...)");
                        let mut s = acl.station(user, user, true).await;
                        s.subscribe(&agent.evt_topic(user)).await;
                        s.subscribe(&status).await;
                        s
                    }
                };
                s.wait_for(
                    |m| m.topic == status && m.json()["state"] == "online",
                    self.online,
                )
                .await;
                Some(s)
            }
        };
        World {
            broker,
            acl,
            agent,
            station,
            watch,
        }
    }
}

/// A broker, the simulator and the agent, and maybe a station and a status watch.
/// Fields drop in order: the broker first, then the agent and the simulator.
pub struct World {
    /// The plain Mosquitto (None with [`WorldBuilder::acl`] or [`WorldBuilder::broker_url`]).
    pub broker: Option<Mosquitto>,
    /// The shipped-ACL Mosquitto, with [`WorldBuilder::acl`].
    pub acl: Option<AclBroker>,
    pub agent: TestAgent,
    /// The station asked for, once it saw the agent online.
    pub station: Option<MqttStation>,
    /// Every `agent/status` message seen (with [`WorldBuilder::process`] or
    /// [`WorldBuilder::status_watch`]).
    pub watch: Option<StatusWatch>,
}

impl World {
    /// Defaults: plain Mosquitto, [`AgentOpts::default`], the agent in-process, no station.
    pub fn builder() -> WorldBuilder {
        WorldBuilder {
            agent: AgentOpts::default(),
            broker: BrokerSpec::Default,
            run: Run::InProcess,
            station: None,
            status_watch: false,
            online: ONLINE,
            agent_url: None,
        }
    }

    /// The plain broker; panics without one.
    pub fn broker(&self) -> &Mosquitto {
        self.broker.as_ref().expect("this world has a plain broker")
    }

    /// The broker's port (plain or ACL).
    pub fn port(&self) -> u16 {
        match (&self.broker, &self.acl) {
            (Some(b), _) => b.port(),
            (None, Some(a)) => a.port(),
            (None, None) => panic!("this world has no broker"),
        }
    }

    /// The plain broker and the agent, for a test that makes its own stations (the
    /// world's station, if any, is dropped).
    pub fn into_broker_and_agent(self) -> (Mosquitto, TestAgent) {
        (
            self.broker.expect("this world has a plain broker"),
            self.agent,
        )
    }

    /// The world's station; panics without one.
    pub fn take_station(&mut self) -> MqttStation {
        self.station.take().expect("this world has a station")
    }
}
