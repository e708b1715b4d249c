//! The end-to-end test harness, shared by every file under `tests/` (`mod common;`).
//!
//! - [`mosquitto`]: a real Mosquitto per test on a free port ([`Mosquitto`]), and the
//!   `mosquitto_pub` / `mosquitto_sub` clients ([`mosquitto_pub`], [`MosquittoSub`]).
//! - [`mqtt`]: test stations, MQTT 5 ([`MqttStation`]) and 3.1.1 ([`MqttStation311`]).
//! - [`pki`]: test certificates ([`TestPki`]).
//! - [`process`]: the agent binary as a separate process ([`process::ProcAgent`]), for
//!   crash, fail-point and strace tests.
//! - [`fleet`]: stations that keep charges flowing and re-send unacknowledged commands,
//!   and what each charge came to ([`fleet::Fleet`], [`fleet::Summary`]).
//! - [`util`]: [`free_port`], bounded polling ([`wait_until`], [`wait_until_async`]),
//!   scratch directories ([`Workdir`]).
//!
//! Rules the helpers keep: real sockets on port 0 or a port just found free, never a fixed
//! one; waits are for an observed condition with a deadline, never a bare sleep; a missing
//! Mosquitto fails the test with how to install it (run `.ci/run`), it never skips.
//! Not every test file uses every helper, hence the `dead_code` and `unused_imports`
//! allowances (each test file compiles this module on its own).

#![allow(dead_code, unused_imports)]

pub mod acl;
pub mod agent;
pub mod agent_proc;
pub mod cli;
pub mod fleet;
pub mod logs;
pub mod mosquitto;
pub mod mqtt;
pub mod pki;
pub mod process;
pub mod proxy;
pub mod util;

pub use mosquitto::{
    mosquitto_pub, mosquitto_pub_with, shipped_acl_path, shipped_config_template,
    try_mosquitto_pub, write_password_file, Mosquitto, MosquittoOpts, MosquittoSub, SubMsg,
};
pub use mqtt::{LinkStatus, MqttStation, MqttStation311, Msg, PubOpts, StationOpts};
pub use pki::{CertPaths, TestPki};
pub use util::{free_port, wait_until, wait_until_async, Workdir};
