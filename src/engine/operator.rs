//! The engine's side of the control socket (`crate::control`, through `port`) and of SIGHUP: it answers
//! operators from the engine's own state (open requests, the store, terminal queues) and
//! applies their cancels and resolutions through the state machine, like any other input.
//!
//! Invariants:
//! - A cancel or resolve is answered only after the batch that carries it is written and
//!   synced (`commit`), and the answer reports the request as read back from the store,
//!   so an operator is never told of a change that is not durable.
//! - A resolve goes through `machine::Input::Resolve`, so the final event (with
//!   `resolved_by: "operator"`) is stored and published to the station like any other.
//! - Answers are built from stored requests and events only; none of them holds the
//!   access token.

use std::collections::BTreeMap;

use tokio::sync::oneshot;

use super::machine::Input;
use super::{rfc3339, Engine};
use crate::domain::command::CommandBody;
use crate::domain::command::StationSection;
use crate::domain::operator::{
    ChangeView, ControlFailure, ControlReply, ControlRequest, FailureCode, ListView, Outcome,
    PendingSummary, RequestDetail, RequestRow, StatusView,
};
use crate::point::PointBackend;
use crate::store::{self, Progress, Request};

/// How far back `queue list` shows requests that ended.
const RECENT_MS: i64 = 3_600_000;
/// At most this many ended requests in `queue list`.
const RECENT_MAX: usize = 200;

impl<B: PointBackend> Engine<B> {
    /// Answer one operator request.
    pub(crate) fn on_control(
        &mut self,
        request: ControlRequest,
        reply: oneshot::Sender<ControlReply>,
    ) {
        let now = self.clock.now_ms();
        let answer = match request {
            ControlRequest::Status => self.control_status(now),
            ControlRequest::List => self.control_list(now),
            ControlRequest::Show { id } => self.control_show(&id, now),
            ControlRequest::Cancel { id } => self.control_cancel(&id, now),
            ControlRequest::Resolve { id, outcome } => self.control_resolve(&id, outcome, now),
        };
        let _ = reply.send(answer);
    }

    /// SIGHUP: new `[stations.*]` tables (validated by the caller). Requests already
    /// accepted keep going; new commands are checked against the new tables, and newly
    /// bound terminals get their retained state on the next publish. The devices are
    /// listed again at once: new terminals need their mode, and the token may be new.
    pub(crate) fn on_reload(&mut self, stations: BTreeMap<String, StationSection>) {
        self.next_devices_ms = 0;
        if stations == self.s.stations {
            tracing::info!(stations = stations.len(), "stations reloaded: unchanged");
            return;
        }
        tracing::info!(
            stations = stations.len(),
            before = self.s.stations.len(),
            "stations reloaded"
        );
        self.s.stations = stations;
    }

    fn control_status(&self, now: i64) -> ControlReply {
        let mut pending = PendingSummary::default();
        let mut charges = 0u64;
        let mut oldest: Option<i64> = None;
        for r in self.active.values() {
            pending.total += 1;
            *pending.by_state.entry(event_state(r)).or_default() += 1;
            if matches!(r.progress, Progress::Charge(_)) {
                charges += 1;
            }
            oldest = Some(oldest.map_or(r.received_ms, |o| o.min(r.received_ms)));
        }
        pending.oldest_pending_s = oldest.map_or(0, |t| secs_since(t, now));
        let agent = self.agent_status(charges, pending.oldest_pending_s);
        let mut names: std::collections::BTreeSet<String> =
            self.terminals.keys().cloned().collect();
        for s in self.s.stations.values() {
            names.extend(s.terminals.iter().cloned());
        }
        ControlReply::Status(StatusView {
            agent,
            pending,
            terminals: names.iter().map(|t| self.terminal_state(t)).collect(),
            stations: self
                .s
                .stations
                .iter()
                .map(|(id, s)| (id.clone(), s.terminals.clone()))
                .collect(),
        })
    }

    fn control_list(&self, now: i64) -> ControlReply {
        let mut open: Vec<&Request> = self.active.values().collect();
        open.sort_by(|a, b| {
            a.received_ms
                .cmp(&b.received_ms)
                .then_with(|| a.key().cmp(&b.key()))
        });
        let mut requests: Vec<RequestRow> = open.iter().map(|r| row(r, now)).collect();
        let mut ended = match self.store.recent_final(now - RECENT_MS) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "control: store read failed");
                return ControlReply::error(FailureCode::Unavailable, format!("{e}"));
            }
        };
        ended.retain(|r| !self.active.contains_key(&r.key()));
        ended.sort_by_key(|r| std::cmp::Reverse(r.final_ms));
        requests.extend(ended.iter().take(RECENT_MAX).map(|r| row(r, now)));
        ControlReply::List(ListView { requests })
    }

    fn control_show(&self, id: &str, now: i64) -> ControlReply {
        let r = match self.control_find(id) {
            Ok(r) => r,
            Err(failure) => return ControlReply::Error(failure),
        };
        let stage = match &r.progress {
            Progress::Charge(ch) => Some(stage_name(&ch.stage)),
            Progress::Refund(rf) => Some(stage_name(&rf.stage)),
            Progress::Cancel { .. } => None,
        };
        let deadline_at = match &r.progress {
            Progress::Charge(ch) if stage.as_deref() == Some("queued") => {
                Some(rfc3339(ch.deadline_ms))
            }
            _ => None,
        };
        let latest = event_json(&r);
        ControlReply::Show(RequestDetail {
            row: row(&r, now),
            received_at: rfc3339(r.received_ms),
            final_at: r.final_ms.map(rfc3339),
            deadline_at,
            stage,
            external_reference: r.external_reference.clone(),
            reply_topic: r.reply.as_ref().map(|x| x.topic.clone()),
            command: serde_json::to_value(&r.body).unwrap_or_default(),
            events: if latest.is_null() {
                Vec::new()
            } else {
                vec![latest]
            },
        })
    }

    /// Cancel a charge as its station's `cancel` would: at once while it waits, through
    /// Mercado Pago while its intent is OPEN; refused once it is on the terminal.
    fn control_cancel(&mut self, id: &str, now: i64) -> ControlReply {
        let r = match self.control_find(id) {
            Ok(r) => r,
            Err(failure) => return ControlReply::Error(failure),
        };
        let Progress::Charge(ch) = &r.progress else {
            return ControlReply::error(FailureCode::NotAllowed, format!("`{id}` is not a charge"));
        };
        let state = event_state(&r);
        let stage = stage_name(&ch.stage);
        if r.is_final() {
            return ControlReply::error(
                FailureCode::NotAllowed,
                format!("`{id}` is already final ({state})"),
            );
        }
        if state == "needs_attention" || stage == "needs_attention" {
            return ControlReply::error(
                FailureCode::NotAllowed,
                format!("the outcome of `{id}` is not known: check the terminal, then use `pointgate queue resolve {id} --as approved|declined`"),
            );
        }
        let cancelable = matches!(stage.as_str(), "queued" | "send_begun" | "live")
            && !matches!(state.as_str(), "on_terminal" | "processing");
        if !cancelable {
            return ControlReply::error(
                FailureCode::NotAllowed,
                format!("`{id}` is already on the terminal ({state}): cancel it there"),
            );
        }
        let key = r.key();
        if !self.active.contains_key(&key) {
            return ControlReply::error(
                FailureCode::Unavailable,
                format!("`{id}` is not among the engine's open requests"),
            );
        }
        tracing::info!(station = %r.station, request_id = %r.request_id, "operator cancels a charge");
        self.apply(&key, Input::CancelRequested, now);
        self.control_commit(&r, now, |after| {
            if after.is_final {
                format!("`{id}` is {} (canceled by the operator)", after.state)
            } else {
                format!("cancel of `{id}` under way: Mercado Pago is asked to cancel its intent")
            }
        })
    }

    /// Resolve a `needs_attention` charge, after a person checked the terminal.
    fn control_resolve(&mut self, id: &str, outcome: Outcome, now: i64) -> ControlReply {
        let r = match self.control_find(id) {
            Ok(r) => r,
            Err(failure) => return ControlReply::Error(failure),
        };
        if !matches!(r.progress, Progress::Charge(_)) {
            return ControlReply::error(FailureCode::NotAllowed, format!("`{id}` is not a charge"));
        }
        let state = event_state(&r);
        if state != "needs_attention" || r.is_final() {
            return ControlReply::error(
                FailureCode::NotAllowed,
                format!("`{id}` is {state}, not needs_attention: only a needs_attention charge can be resolved"),
            );
        }
        let key = r.key();
        if !self.active.contains_key(&key) {
            return ControlReply::error(
                FailureCode::Unavailable,
                format!("`{id}` is not among the engine's open requests"),
            );
        }
        let approved = outcome == Outcome::Approved;
        tracing::warn!(station = %r.station, request_id = %r.request_id, approved, "operator resolves a needs_attention charge");
        self.apply(&key, Input::Resolve { approved }, now);
        self.control_commit(&r, now, |after| {
            if after.is_final {
                format!("`{id}` resolved by the operator: {}", after.state)
            } else {
                format!("`{id}` was not resolved: it is {}", after.state)
            }
        })
    }

    /// Write and sync the batch now, then answer from what the store holds.
    fn control_commit(
        &mut self,
        before: &Request,
        now: i64,
        message: impl FnOnce(&RequestRow) -> String,
    ) -> ControlReply {
        self.commit();
        match self.store.get(&before.station, &before.request_id) {
            Ok(Some(after)) if after.seq > before.seq || after.is_final() => {
                let request = row(&after, now);
                ControlReply::Changed(ChangeView {
                    message: message(&request),
                    request,
                })
            }
            Ok(Some(after)) if self.active.get(&after.key()).map(|a| a.seq) == Some(after.seq) => {
                // Nothing to store (a cancel waiting for Mercado Pago's answer).
                let request = row(&after, now);
                ControlReply::Changed(ChangeView {
                    message: message(&request),
                    request,
                })
            }
            Ok(_) => ControlReply::error(
                FailureCode::Unavailable,
                "the change could not be stored; see the agent's log",
            ),
            Err(e) => ControlReply::error(FailureCode::Unavailable, format!("{e}")),
        }
    }

    /// The request named `<station>/<request_id>`, open or stored.
    fn control_find(&self, id: &str) -> Result<Request, ControlFailure> {
        let Some((station, request_id)) = id.split_once('/') else {
            return Err(ControlFailure::new(
                FailureCode::BadRequest,
                format!("`{id}`: name a request as <station>/<request_id>"),
            ));
        };
        if let Some(r) = self.active.get(&store::key(station, request_id)) {
            return Ok(r.clone());
        }
        match self.store.get(station, request_id) {
            Ok(Some(r)) => Ok(r),
            Ok(None) => Err(ControlFailure::new(
                FailureCode::NotFound,
                format!("no request `{request_id}` of station `{station}`"),
            )),
            Err(e) => Err(ControlFailure::new(
                FailureCode::Unavailable,
                format!("{e}"),
            )),
        }
    }
}

/// The latest event of a request as JSON (`null` before its first).
fn event_json(r: &Request) -> serde_json::Value {
    serde_json::from_slice(&r.last_event).unwrap_or(serde_json::Value::Null)
}

/// The state of the latest event, or `unknown`.
fn event_state(r: &Request) -> String {
    event_json(r)["state"]
        .as_str()
        .unwrap_or("unknown")
        .to_string()
}

fn secs_since(t: i64, now: i64) -> u64 {
    ((now - t).max(0) / 1000) as u64
}

/// One line of `queue list`, from the request and its latest event.
fn row(r: &Request, now: i64) -> RequestRow {
    let ev = event_json(r);
    let text = |v: &serde_json::Value| v.as_str().map(str::to_string);
    RequestRow {
        id: r.key_string(),
        station: r.station.clone(),
        request_id: r.request_id.clone(),
        kind: r.body.kind(),
        state: text(&ev["state"]).unwrap_or_else(|| "unknown".into()),
        is_final: r.is_final(),
        age_s: secs_since(r.received_ms, now),
        terminal: text(&ev["terminal"]),
        amount: text(&ev["amount"]),
        detail: text(&ev["reason"]).or_else(|| text(&ev["error"]["code"])),
        target: match &r.body {
            CommandBody::Cancel { target } => Some(format!("{}/{target}", r.station)),
            _ => None,
        },
    }
}

/// The stage's variant name in snake case (`NeedsAttention { .. }` → `needs_attention`).
fn stage_name(stage: &impl std::fmt::Debug) -> String {
    let debug = format!("{stage:?}");
    let name = debug
        .split(|c: char| !c.is_ascii_alphanumeric())
        .next()
        .unwrap_or_default();
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::charge::Stage;

    #[test]
    fn stage_names_are_snake_case_variant_names() {
        assert_eq!(stage_name(&Stage::Queued { reason: None }), "queued");
        assert_eq!(stage_name(&Stage::SendBegun { at_ms: 1 }), "send_begun");
        assert_eq!(
            stage_name(&Stage::NeedsAttention {
                intent_id: None,
                payment_id: None,
                since_ms: 0
            }),
            "needs_attention"
        );
    }
}
