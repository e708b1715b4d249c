//! The end-to-end test harness, shared by every file under `tests/` (`mod common;`).
//!
//! - [`world`]: one end-to-end world ([`World`], made with [`World::builder`]): a real
//!   Mosquitto on a free port (plain, with options, or the shipped config and ACL), the
//!   Point simulator over real TLS, the agent in-process or as a process, and a station
//!   that saw the agent online. Every end-to-end test file starts from it.
//! - [`agent`]: the agent under test ([`agent::TestAgent`]): the simulator, the config file
//!   rendered from [`agent::AgentOpts`], and the agent on it, in-process (`pointgate::run`)
//!   or as a process.
//! - [`process`]: the one process harness for the agent binary ([`process::AgentProc`]):
//!   start on a config (with more environment, or wrapped in `strace`/`unshare`), `kill
//!   -9`, SIGTERM, SIGHUP, restart on the same state directory, its log and exit status;
//!   `PG_TEST_AGENT_EXE` and `PG_TEST_AGENT_RUNNER` (qemu) pick the binary.
//! - [`mosquitto`]: a real Mosquitto per test on a free port ([`Mosquitto`]), and the
//!   `mosquitto_pub` / `mosquitto_sub` clients ([`mosquitto_pub`], [`MosquittoSub`]).
//! - [`acl`]: Mosquitto with the shipped config and ACL ([`acl::AclBroker`]).
//! - [`mqtt`]: test stations, MQTT 5 ([`MqttStation`]) and 3.1.1 ([`MqttStation311`]).
//! - [`crowd`]: stations that keep charges flowing and re-send unacknowledged commands,
//!   and what each charge came to ([`crowd::Crowd`], [`crowd::Summary`]); a watch on
//!   `agent/status` ([`crowd::StatusWatch`]).
//! - [`pki`]: test certificates ([`TestPki`]).
//! - [`cli`]: the `pointgate` command line against a running agent.
//! - [`logs`]: the in-process agent's log lines.
//! - [`proxy`]: a TCP proxy that can cut or stall a connection.
//! - [`util`]: [`free_port`], bounded polling ([`wait_until`], [`wait_until_async`]),
//!   scratch directories ([`Workdir`]), times and percentiles.
//!
//! Rules the helpers keep: real sockets on port 0 or a port just found free, never a fixed
//! one; waits are for an observed condition with a deadline, never a bare sleep; a missing
//! Mosquitto fails the test with how to install it (run `.ci/run`), it never skips.
//! Not every test file uses every helper, hence the `dead_code` and `unused_imports`
//! allowances (each test file compiles this module on its own).

#![allow(dead_code, unused_imports)]

pub mod acl;
pub mod agent;
pub mod cli;
pub mod crowd;
pub mod logs;
pub mod mosquitto;
pub mod mqtt;
pub mod pki;
pub mod process;
pub mod proxy;
pub mod util;
pub mod world;

pub use agent::{AgentOpts, TestAgent};
pub use mosquitto::{
    mosquitto_pub, mosquitto_pub_with, shipped_acl_path, shipped_config_template,
    try_mosquitto_pub, write_password_file, Mosquitto, MosquittoOpts, MosquittoSub, SubMsg,
};
pub use mqtt::{LinkStatus, MqttStation, MqttStation311, Msg, PubOpts, StationOpts};
pub use pki::{CertPaths, TestPki};
pub use util::{free_port, wait_until, wait_until_async, Workdir};
pub use world::World;
