//! The engine's port: everything an adapter (the station link, the control socket, the
//! systemd watchdog, later the fleet link) may use to talk to the engine. Inputs go in
//! through `EngineHandle` as `ToEngine`; what the engine wants published comes out as
//! `ToLink` on the channel given to `Engine::new`. Adapters import this module and
//! `domain`, never the engine's internals (`tests/layering.rs`).

use std::collections::BTreeMap;

use tokio::sync::{mpsc, oneshot};

use crate::domain::command::StationSection;
use crate::domain::operator::{ControlReply, ControlRequest};
use crate::domain::outcome::Address;

/// MQTT 5 properties of a command that matter to the engine.
#[derive(Debug, Clone, Default)]
pub struct CommandProps {
    pub response_topic: Option<String>,
    /// The link's verdict on `response_topic` (its Response Topic policy): only an
    /// allowed one is used; a command naming another is refused `bad_field`.
    pub response_topic_allowed: bool,
    pub correlation: Option<Vec<u8>>,
    pub message_expiry_s: Option<u32>,
}

/// Messages to the engine task.
#[derive(Debug)]
pub enum ToEngine {
    /// A command from a station. `done` is answered once the command is durably stored
    /// or refused: then, and only then, the link acknowledges it to the broker.
    Command {
        station: String,
        payload: Vec<u8>,
        props: CommandProps,
        done: oneshot::Sender<()>,
    },
    /// The broker acknowledged an outbox event.
    Published { outbox_id: u64 },
    /// The link (re)connected: send it the whole outbox again, after a `Resync` marker.
    Connected { session_present: bool },
    /// An operator's request from the control socket (`engine/operator.rs`).
    Control {
        request: ControlRequest,
        reply: oneshot::Sender<ControlReply>,
    },
    /// SIGHUP: the `[stations.*]` tables, already validated, replace the current ones.
    Reload {
        stations: BTreeMap<String, StationSection>,
    },
    /// A liveness probe (the systemd watchdog): answered from the engine loop itself.
    Ping(oneshot::Sender<()>),
}

/// Messages to the link's publisher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToLink {
    /// Everything before this may be dropped: the full outbox follows.
    Resync,
    Publish(LinkPublish),
}

/// What a publish is about; the link renders it as a topic (`station::topics`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dest {
    /// A request's event (from the outbox, or a refusal sent outside it).
    Event(Address),
    /// The agent's status document (retained).
    Status,
    /// A terminal's state document (retained).
    Terminal(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkPublish {
    /// `Some` for outbox events (removed on PUBACK); `None` for retained status.
    pub outbox_id: Option<u64>,
    pub dest: Dest,
    pub payload: Vec<u8>,
    pub correlation: Option<Vec<u8>>,
    pub retain: bool,
}

/// The engine's cloneable handle.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<ToEngine>,
}

impl EngineHandle {
    pub async fn send(&self, msg: ToEngine) -> bool {
        self.tx.send(msg).await.is_ok()
    }
}

/// Create the engine's channel.
pub fn channel() -> (EngineHandle, mpsc::Receiver<ToEngine>) {
    let (tx, rx) = mpsc::channel(1024);
    (EngineHandle { tx }, rx)
}
