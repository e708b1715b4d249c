//! The agent's status document (`agent/status`, and the `agent` part of `pointgate
//! status`).

use super::*;

impl<B: PointBackend> Engine<B> {
    /// The agent's status document (`agent/status`, and the `agent` part of `pointgate
    /// status`): health from the last API answers, with the caller's pending figures.
    pub(super) fn agent_status(&self, pending: u64, oldest_pending_s: u64) -> AgentStatus {
        let (state, api) = match self.health {
            ApiHealth::Ok => ("online", "ok"),
            ApiHealth::Unreachable => ("degraded", "unreachable"),
            ApiHealth::Unauthorized => ("degraded", "unauthorized"),
        };
        AgentStatus {
            v: 1,
            state: state.into(),
            version: Some(env!("CARGO_PKG_VERSION").into()),
            store: Some(self.s.store_id.clone()),
            backend: Some(self.s.backend.into()),
            api: Some(api.into()),
            pending: Some(pending),
            oldest_pending_s: Some(oldest_pending_s),
            since: Some(self.since.clone()),
        }
    }

    pub(super) fn publish_status(&mut self, force: bool) {
        let now = self.clock.now_ms();
        let mut pending = 0u64;
        let mut oldest: Option<i64> = None;
        for r in self.active.values() {
            if matches!(r.progress, Progress::Charge(_) | Progress::Refund(_)) {
                pending += 1;
            }
            oldest = Some(oldest.map_or(r.received_ms, |o| o.min(r.received_ms)));
        }
        let oldest = oldest.map(|t| ((now - t).max(0) / 1000) as u64);
        let status = self.agent_status(pending, oldest.unwrap_or(0));
        let changed = match &self.published_status {
            None => true,
            Some(p) => {
                p.state != status.state || p.api != status.api || p.pending != status.pending
            }
        };
        if !force && !changed {
            return;
        }
        self.published_status = Some(status.clone());
        let _ = self.link.send(ToLink::Publish(LinkPublish {
            outbox_id: None,
            dest: Dest::Status,
            payload: serde_json::to_vec(&status).unwrap_or_default(),
            correlation: None,
            retain: true,
        }));
    }
}
