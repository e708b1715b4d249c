//! Accepting commands: validation against the engine's state (repeats, conflicts,
//! duplicate references, queue size, Response Topic verdict), refusals, answers to
//! queries, and admitting charges and cancels as stored requests.

use super::*;

impl<B: PointBackend> Engine<B> {
    pub(super) fn refuse(
        &mut self,
        station: &str,
        props: &CommandProps,
        refusal: Refusal,
        current: Option<Event>,
        now: i64,
    ) {
        tracing::info!(station, request_id = ?refusal.request_id, code = ?refusal.code, message = %refusal.message, "command refused");
        let mut ev = Event::new(
            refusal.request_id.clone(),
            refusal.kind,
            State::Refused,
            0,
            rfc3339(now),
        );
        ev.error = Some(ErrorInfo {
            code: refusal.code,
            message: refusal.message,
        });
        ev.current = current.map(Box::new);
        let address = Self::reply_address(station, props);
        self.push_outbox(address, ev.to_json(), props.correlation.clone());
    }

    pub(super) fn answer(&mut self, station: &str, props: &CommandProps, ev: Event) {
        let address = Self::reply_address(station, props);
        self.push_outbox(address, ev.to_json(), props.correlation.clone());
    }

    /// Where the answer to a command goes: its Response Topic if the link allowed it,
    /// else the station's event topic.
    pub(super) fn reply_address(station: &str, props: &CommandProps) -> Address {
        match Self::reply_topic(props) {
            Some(t) => Address::Reply(t),
            None => Address::Station(station.to_string()),
        }
    }

    /// The Response Topic of an MQTT 5 command, if it is an allowed one.
    pub(super) fn reply_topic(props: &CommandProps) -> Option<String> {
        props
            .response_topic
            .as_ref()
            .filter(|_| props.response_topic_allowed)
            .cloned()
    }

    pub(super) fn push_outbox(
        &mut self,
        address: Address,
        payload: Vec<u8>,
        correlation: Option<Vec<u8>>,
    ) {
        let id = self.store.next_outbox_id();
        self.writes.outbox.push((
            id,
            Outgoing {
                address,
                payload,
                correlation,
            },
        ));
    }

    pub(super) fn on_command(
        &mut self,
        station: &str,
        payload: &[u8],
        props: CommandProps,
        now: i64,
    ) {
        let listed: Option<HashSet<String>> =
            self.devices.as_ref().map(|d| d.keys().cloned().collect());
        let ctx = Context {
            site: self.s.site,
            station,
            stations: &self.s.stations,
            listed_terminals: listed.as_ref(),
            refund_ttl_max_s: (self.s.refund_ttl_ms / 1000) as u64,
        };
        let cmd = match validate::validate(payload, &ctx) {
            Ok(c) => c,
            Err(r) => return self.refuse(station, &props, r, None, now),
        };
        let kind = cmd.body.kind();
        let refusal = |code: ErrorCode, message: String| Refusal {
            request_id: Some(cmd.request_id.clone()),
            kind: Some(kind),
            code,
            message,
        };
        if let Some(rt) = &props.response_topic {
            if !props.response_topic_allowed {
                let r = refusal(
                    ErrorCode::BadField,
                    format!("response topic `{rt}` is not under this station's own topics"),
                );
                let props = CommandProps {
                    response_topic: None,
                    ..props
                };
                return self.refuse(station, &props, r, None, now);
            }
        }
        match &cmd.body {
            CommandBody::Query { target } => {
                match self.lookup(station, target) {
                    Some(t) => {
                        let mut ev = Event::new(
                            Some(cmd.request_id.clone()),
                            Some(kind),
                            State::Answered,
                            0,
                            rfc3339(now),
                        );
                        ev.target = serde_json::from_slice(&t.last_event).ok().map(Box::new);
                        self.answer(station, &props, ev);
                    }
                    None => {
                        let r = refusal(
                            ErrorCode::UnknownTarget,
                            format!("no request `{target}` of this station"),
                        );
                        self.refuse(station, &props, r, None, now);
                    }
                }
                return;
            }
            CommandBody::Terminals => {
                let mut ev = Event::new(
                    Some(cmd.request_id.clone()),
                    Some(kind),
                    State::Answered,
                    0,
                    rfc3339(now),
                );
                let bound = self
                    .s
                    .stations
                    .get(station)
                    .map(|s| s.terminals.clone())
                    .unwrap_or_default();
                ev.terminals = Some(bound.iter().map(|t| self.terminal_state(t)).collect());
                self.answer(station, &props, ev);
                return;
            }
            _ => {}
        }
        // A repeat of a remembered request id? (the dedup index; open ones in memory)
        let key = store::key(station, &cmd.request_id);
        let seen = match self.active.get(&key) {
            Some(r) => Some(store::content_hash(&r.body)),
            None => match self.store.dedup(station, &cmd.request_id) {
                Ok(d) => d.map(|d| d.hash),
                Err(e) => {
                    tracing::error!(error = %e, "store read failed");
                    let r = refusal(
                        ErrorCode::StorageUnavailable,
                        "the agent's store cannot be read; nothing was accepted".into(),
                    );
                    return self.refuse(station, &props, r, None, now);
                }
            },
        };
        if let (Some(hash), Some(existing)) = (seen, self.lookup(station, &cmd.request_id)) {
            if hash == store::content_hash(&cmd.body) {
                let out = Outgoing {
                    address: address_of(&existing),
                    payload: existing.last_event.clone(),
                    correlation: existing.reply.as_ref().and_then(|r| r.correlation.clone()),
                };
                let id = self.store.next_outbox_id();
                self.writes.outbox.push((id, out));
            } else {
                let current = serde_json::from_slice(&existing.last_event).ok();
                let r = refusal(
                    ErrorCode::Conflict,
                    format!(
                        "request_id `{}` was already used for another command",
                        cmd.request_id
                    ),
                );
                self.refuse(station, &props, r, current, now);
            }
            return;
        }
        let pending = self.active.len();
        if pending >= self.s.max_pending {
            let r = refusal(
                ErrorCode::QueueFull,
                format!("{pending} requests are pending; try again later"),
            );
            return self.refuse(station, &props, r, None, now);
        }
        match cmd.body.clone() {
            CommandBody::Charge(c) => self.accept_charge(station, &cmd, c, props, now),
            CommandBody::Cancel { target } => {
                self.accept_cancel(station, &cmd, &target, props, now)
            }
            CommandBody::Refund(r) => self.accept_refund(station, &cmd, r, props, now),
            CommandBody::Query { .. } | CommandBody::Terminals => {}
        }
    }

    /// Take a command in as a stored request: it becomes active, is told `accepted`, and
    /// counts as new in this batch (refused `storage_unavailable` if the batch cannot be
    /// made durable). Returns its key.
    pub(super) fn admit(
        &mut self,
        station: &str,
        cmd: &ValidCommand,
        props: &CommandProps,
        external_reference: Option<String>,
        progress: Progress,
        now: i64,
    ) -> Vec<u8> {
        let req = Request {
            station: station.to_string(),
            request_id: cmd.request_id.clone(),
            body: cmd.body.clone(),
            received_ms: now,
            reply: Self::reply_topic(props).map(|topic| ReplyTo {
                topic,
                correlation: props.correlation.clone(),
            }),
            external_reference,
            progress,
            seq: 0,
            last_event: Vec::new(),
            final_ms: None,
        };
        let key = req.key();
        self.active.insert(key.clone(), req);
        self.created.push(key.clone());
        self.emit(&key, Emit::state(State::Accepted), now);
        key
    }

    /// A request of this station, open or stored.
    pub(super) fn lookup(&self, station: &str, request_id: &str) -> Option<Request> {
        let key = store::key(station, request_id);
        if let Some(r) = self.active.get(&key) {
            return Some(r.clone());
        }
        match self.store.get(station, request_id) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "store read failed");
                None
            }
        }
    }

    pub(super) fn accept_charge(
        &mut self,
        station: &str,
        cmd: &ValidCommand,
        c: ChargeCmd,
        props: CommandProps,
        now: i64,
    ) {
        let refusal = |code: ErrorCode, message: String| Refusal {
            request_id: Some(cmd.request_id.clone()),
            kind: Some(CommandType::Charge),
            code,
            message,
        };
        if let Some(devices) = &self.devices {
            match devices.get(&c.terminal) {
                Some(mode) if mode.eq_ignore_ascii_case("STANDALONE") => {
                    let r = refusal(
                        ErrorCode::TerminalUnavailable,
                        format!(
                            "terminal `{}` is in STANDALONE mode; switch it to PDV",
                            c.terminal
                        ),
                    );
                    return self.refuse(station, &props, r, None, now);
                }
                Some(_) => {}
                None => {
                    let r = refusal(
                        ErrorCode::TerminalUnavailable,
                        format!("terminal `{}` is not among the devices Mercado Pago lists for this account", c.terminal),
                    );
                    return self.refuse(station, &props, r, None, now);
                }
            }
        }
        let ext_ref = c
            .external_reference
            .clone()
            .unwrap_or_else(|| derived_reference(&self.s.store_id, station, &cmd.request_id));
        let key = store::key(station, &cmd.request_id);
        let owner = self
            .writes
            .refs
            .iter()
            .find(|(r, _)| *r == ext_ref)
            .map(|(_, k)| k.clone());
        let owner = match owner {
            Some(o) => Some(o),
            None => self.store.ref_owner(&ext_ref).unwrap_or(None),
        };
        if owner.is_some_and(|o| o != key) {
            let r = refusal(
                ErrorCode::DuplicateReference,
                format!("external_reference `{ext_ref}` belongs to another request"),
            );
            return self.refuse(station, &props, r, None, now);
        }
        let ttl_ms = c
            .ttl_s
            .map(|s| s as i64 * 1000)
            .unwrap_or(self.s.charge_ttl_ms);
        let mut deadline = now + ttl_ms;
        if let Some(e) = c.expires_at_ms {
            deadline = deadline.min(e);
        }
        if let Some(x) = props.message_expiry_s {
            deadline = deadline.min(now + x as i64 * 1000);
        }
        let terminal = c.terminal.clone();
        let charge = Charge::new(c.amount, deadline);
        tracing::info!(station, request_id = %cmd.request_id, terminal = %terminal, amount = %c.amount.to_decimal(), "charge accepted");
        self.writes.refs.push((ext_ref.clone(), key.clone()));
        self.admit(
            station,
            cmd,
            &props,
            Some(ext_ref),
            Progress::Charge(charge),
            now,
        );
        self.terminals
            .entry(terminal)
            .or_default()
            .waiting
            .push_back(key.clone());
        self.set_wake(&key);
    }

    pub(super) fn accept_cancel(
        &mut self,
        station: &str,
        cmd: &ValidCommand,
        target: &str,
        props: CommandProps,
        now: i64,
    ) {
        let refusal = |code: ErrorCode, message: String| Refusal {
            request_id: Some(cmd.request_id.clone()),
            kind: Some(CommandType::Cancel),
            code,
            message,
        };
        let tkey = store::key(station, target);
        let Some(t) = self.lookup(station, target) else {
            let r = refusal(
                ErrorCode::UnknownTarget,
                format!("no request `{target}` of this station"),
            );
            return self.refuse(station, &props, r, None, now);
        };
        if matches!(t.progress, Progress::Refund(_)) {
            return self.accept_refund_cancel(station, cmd, &t, props, now);
        }
        let Progress::Charge(ch) = &t.progress else {
            let r = refusal(
                ErrorCode::UnknownTarget,
                format!("request `{target}` is not a charge"),
            );
            return self.refuse(station, &props, r, None, now);
        };
        use machine::{Remote, Stage};
        let known = match &ch.stage {
            Stage::Done { .. } => Some("the charge is already final"),
            Stage::Live {
                remote: Remote::OnTerminal | Remote::Processing,
                ..
            }
            | Stage::Confirming { .. } => {
                Some("the charge is already on the terminal: cancel it there")
            }
            Stage::NeedsAttention { .. } => {
                Some("the outcome of this charge is not known yet: staff must check the terminal")
            }
            _ if self.cancels.contains_key(&tkey) => {
                Some("a cancel of this charge is already under way")
            }
            _ => None,
        };
        if let Some(why) = known {
            let r = refusal(ErrorCode::NotCancelable, why.into());
            return self.refuse(station, &props, r, None, now);
        }
        let key = store::key(station, &cmd.request_id);
        let progress = Progress::Cancel {
            target: target.to_string(),
            done: false,
        };
        self.admit(station, cmd, &props, None, progress, now);
        self.cancels.insert(tkey.clone(), key);
        self.apply(&tkey, Input::CancelRequested, now);
    }

    pub(super) fn finish_cancel(
        &mut self,
        cancel_key: &[u8],
        result: Result<(), (ErrorCode, String)>,
        now: i64,
    ) {
        let emit = match result {
            Ok(()) => Emit::state(State::Done),
            Err((code, message)) => Emit {
                state: State::Failed,
                reason: None,
                error: Some((code, message)),
                resolved_by: None,
            },
        };
        if let Some(r) = self.active.get_mut(cancel_key) {
            if let Progress::Cancel { done, .. } = &mut r.progress {
                *done = true;
            }
        }
        self.emit(cancel_key, emit, now);
    }
}
