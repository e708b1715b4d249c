//! Inputs applied to the machines and their effects performed; events rendered into the
//! outbox; the batch committed (one store transaction, one sync) before anything is
//! acknowledged, published or sent; retention pruning.

use super::*;

/// Where a request's events go: its MQTT 5 Response Topic, else the station's `evt`.
pub(super) fn address_of(r: &Request) -> Address {
    match &r.reply {
        Some(reply) => Address::Reply(reply.topic.clone()),
        None => Address::Station(r.station.clone()),
    }
}

impl LinkPublish {
    /// An outbox event, removed from the outbox on its PUBACK.
    pub(super) fn event(id: u64, o: Outgoing) -> LinkPublish {
        LinkPublish {
            outbox_id: Some(id),
            dest: Dest::Event(o.address),
            payload: o.payload,
            correlation: o.correlation,
            retain: false,
        }
    }
}

impl<B: PointBackend> Engine<B> {
    pub(super) fn wake_due(&mut self, now: i64) {
        let due: Vec<Vec<u8>> = self
            .wakes
            .iter()
            .take_while(|(at, _)| *at <= now)
            .map(|(_, k)| k.clone())
            .collect();
        for k in due {
            self.apply(&k, Input::Wake, now);
        }
    }

    /// Apply one input to a charge, then act on its effects.
    pub(super) fn apply(&mut self, key: &[u8], input: Input, now: i64) {
        if let Some(Progress::Refund(_)) = self.active.get(key).map(|r| &r.progress) {
            return self.apply_to_refund(key, input, now);
        }
        let ctx = self.ctx(now);
        let Some(req) = self.active.get_mut(key) else {
            return;
        };
        let Progress::Charge(ch) = &mut req.progress else {
            return;
        };
        let before = ch.clone();
        let fx = ch.step(input, &ctx);
        if *ch != before {
            self.dirty.insert(key.to_vec());
        }
        for e in fx {
            self.effect(key, e, now);
        }
        self.set_wake(key);
    }

    pub(super) fn effect(&mut self, key: &[u8], e: Effect, now: i64) {
        let Some(req) = self.active.get(key) else {
            return;
        };
        let CommandBody::Charge(c) = &req.body else {
            return;
        };
        let terminal = c.terminal.clone();
        match e {
            Effect::Emit(em) => self.emit(key, em, now),
            Effect::Create => {
                let site = self.s.site;
                let create = CreateCharge {
                    terminal: terminal.clone(),
                    amount: c.amount,
                    external_reference: req.external_reference.clone().unwrap_or_default(),
                    description: c.description.clone(),
                    ticket_number: site.allows_ticket_number().then(|| {
                        c.ticket_number
                            .clone()
                            .unwrap_or_else(|| derived_ticket(&req.request_id))
                    }),
                    print_on_terminal: c.print_on_terminal,
                    payment: c.payment.clone(),
                    idempotency_key: None,
                };
                self.terminals.entry(terminal).or_default().take_turn(key);
                self.dirty.insert(key.to_vec());
                self.calls.push(ApiCall {
                    key: key.to_vec(),
                    op: Op::Create(create),
                });
            }
            Effect::Poll { intent_id } => self.calls.push(ApiCall {
                key: key.to_vec(),
                op: Op::Poll(intent_id),
            }),
            Effect::LookupPayment { payment_id } => self.calls.push(ApiCall {
                key: key.to_vec(),
                op: Op::Payment(payment_id),
            }),
            Effect::SearchPayments => {
                let r = req.external_reference.clone().unwrap_or_default();
                self.calls.push(ApiCall {
                    key: key.to_vec(),
                    op: Op::Search(r),
                })
            }
            Effect::ListIntents { from_ms } => {
                let reference = req.external_reference.clone().unwrap_or_default();
                self.calls.push(ApiCall {
                    key: key.to_vec(),
                    op: Op::List {
                        from_ms,
                        until_ms: now,
                        reference,
                        terminal,
                    },
                })
            }
            Effect::CancelRemote { intent_id } => self.calls.push(ApiCall {
                key: key.to_vec(),
                op: Op::Cancel {
                    terminal,
                    intent_id,
                },
            }),
            Effect::ReleaseTerminal => {
                if let Some(q) = self.terminals.get_mut(&terminal) {
                    if q.holder.as_deref() == Some(key) {
                        q.holder = None;
                    }
                    q.waiting.retain(|k| k != key);
                    // A charge sent back to the queue after a failure keeps its place; one
                    // that left the queue for good (final, needs_attention) does not
                    // block those behind it.
                    if let Some(Progress::Charge(ch)) = self.active.get(key).map(|r| &r.progress) {
                        if matches!(ch.stage, machine::Stage::Queued { .. }) {
                            q.waiting.push_front(key.to_vec());
                        }
                    }
                }
            }
            Effect::CancelAnswer(result) => {
                if let Some(ck) = self.cancels.remove(key) {
                    self.finish_cancel(&ck, result, now);
                }
            }
        }
    }

    /// Record an event for a stored request: next seq, last event, outbox.
    pub(super) fn emit(&mut self, key: &[u8], em: Emit, now: i64) {
        let Some(req) = self.active.get_mut(key) else {
            return;
        };
        req.seq += 1;
        let mut ev = Event::new(
            Some(req.request_id.clone()),
            Some(req.body.kind()),
            em.state,
            req.seq,
            rfc3339(now),
        );
        if let CommandBody::Charge(c) = &req.body {
            ev.terminal = Some(c.terminal.clone());
            ev.amount = Some(c.amount.to_decimal());
        }
        if let Progress::Charge(ch) = &req.progress {
            ev.intent_id = ch.intent_id().map(str::to_string);
            if em.state.is_final() || em.state == State::NeedsAttention {
                ev.payment = ch.payment.as_ref().map(|p| PaymentInfo {
                    id: p.id.clone(),
                    status: p.status.clone(),
                    status_detail: p.status_detail.clone(),
                });
            }
        }
        if let Progress::Refund(rf) = &req.progress {
            rf.decorate(&mut ev);
        }
        ev.reason = em.reason;
        ev.error = em.error.map(|(code, message)| ErrorInfo { code, message });
        ev.resolved_by = em.resolved_by;
        let payload = ev.to_json();
        req.last_event = payload.clone();
        if em.state.is_final() {
            req.final_ms = Some(now);
        }
        tracing::info!(
            station = %req.station,
            request_id = %req.request_id,
            terminal = ev.terminal.as_deref().unwrap_or(""),
            intent_id = ev.intent_id.as_deref().unwrap_or(""),
            state = em.state.as_str(),
            seq = req.seq,
            "event"
        );
        let address = address_of(req);
        let correlation = req.reply.as_ref().and_then(|r| r.correlation.clone());
        self.dirty.insert(key.to_vec());
        self.push_outbox(address, payload, correlation);
    }

    pub(super) fn set_wake(&mut self, key: &[u8]) {
        if let Some(old) = self.wake_of.remove(key) {
            self.wakes.remove(&(old, key.to_vec()));
        }
        let at = match self.active.get(key).map(|r| &r.progress) {
            Some(Progress::Charge(ch)) => ch.next_at_ms,
            Some(Progress::Refund(rf)) => rf.next_at_ms,
            _ => None,
        };
        if let Some(at) = at {
            self.wakes.insert((at, key.to_vec()));
            self.wake_of.insert(key.to_vec(), at);
        }
    }

    /// Write the batch, sync once, then acknowledge and publish.
    pub(super) fn commit(&mut self) {
        let dirty = std::mem::take(&mut self.dirty);
        for k in &dirty {
            if let Some(t) = self.active.get(k).and_then(store::terminal_of) {
                self.touched_terminals.insert(t.to_string());
            }
        }
        for k in &dirty {
            if let Some(r) = self.active.get(k) {
                self.writes.requests.push(r.clone());
            }
        }
        let mut writes = std::mem::take(&mut self.writes);
        writes.now_ms = Some(self.clock.now_ms());
        if !self.replies.is_empty() {
            failpoint::hit(failpoint::COMMAND_BEFORE_STORE);
        }
        if !writes.is_empty() {
            // Requests this batch creates (accepted just now): refused if it fails.
            let new = std::mem::take(&mut self.created);
            let res = self.store.write(&writes).and_then(|_| self.store.sync());
            if let Err(e) = res {
                tracing::error!(error = %e, "store write failed; the batch's new commands are refused storage_unavailable");
                self.storage_failed(&new);
                return;
            }
            if dirty
                .iter()
                .any(|k| self.active.get(k).is_some_and(|r| r.is_final()))
            {
                failpoint::hit(failpoint::FINAL_BEFORE_PUBLISH);
            }
            for (id, o) in writes.outbox {
                self.publishes.push(LinkPublish::event(id, o));
            }
        }
        if !self.replies.is_empty() {
            failpoint::hit(failpoint::STORED_BEFORE_ACK);
        }
        for k in &dirty {
            if self.active.get(k).is_some_and(|r| r.is_final()) {
                self.active.remove(k);
                if let Some(at) = self.wake_of.remove(k) {
                    self.wakes.remove(&(at, k.clone()));
                }
            }
        }
        for done in self.replies.drain(..) {
            let _ = done.send(());
        }
        self.api_queue.extend(self.calls.drain(..));
    }

    /// A batch could not be made durable: its new commands are refused
    /// `storage_unavailable` (published without the outbox, which cannot be written) and
    /// acknowledged, nothing of it is sent to the API, and the in-memory view goes back
    /// to what the store holds.
    pub(super) fn storage_failed(&mut self, new: &[Vec<u8>]) {
        let now = self.clock.now_ms();
        self.calls.clear();
        for k in new {
            let Some(r) = self.active.get(k) else {
                continue;
            };
            let mut ev = Event::new(
                Some(r.request_id.clone()),
                Some(r.body.kind()),
                State::Refused,
                0,
                rfc3339(now),
            );
            ev.error = Some(ErrorInfo {
                code: ErrorCode::StorageUnavailable,
                message: "the agent cannot write its store (disk full or failing); nothing was accepted: try again later".into(),
            });
            self.publishes.push(LinkPublish {
                outbox_id: None,
                dest: Dest::Event(address_of(r)),
                payload: ev.to_json(),
                correlation: r.reply.as_ref().and_then(|x| x.correlation.clone()),
                retain: false,
            });
            // Whatever of it reached sled's memory must not come back at the next start.
            if let Err(e) = self.store.forget(r) {
                tracing::error!(error = %e, "could not forget a refused request");
            }
        }
        for done in self.replies.drain(..) {
            let _ = done.send(());
        }
        match self.load() {
            Ok(_) => self.resume(now),
            Err(e) => tracing::error!(error = %e, "store read failed after a failed write"),
        }
    }

    /// Forget final requests older than `queue.retention`, a bounded number per pass.
    pub(super) fn maybe_prune(&mut self, now: i64) {
        if now < self.next_prune_ms {
            return;
        }
        const PER_PASS: usize = 2_000;
        match self.store.prune(now - self.s.retention_ms, PER_PASS) {
            Ok(n) => {
                if n > 0 {
                    tracing::info!(pruned = n, "requests past retention forgotten");
                    if let Err(e) = self.store.sync() {
                        tracing::error!(error = %e, "store sync after pruning failed");
                    }
                }
                // More left: come back soon; else in an hour.
                self.next_prune_ms = now + if n == PER_PASS { 1_000 } else { 3_600_000 };
            }
            Err(e) => {
                tracing::error!(error = %e, "pruning failed");
                self.next_prune_ms = now + 60_000;
            }
        }
    }

    pub(super) fn flush_link(&mut self) {
        if std::mem::take(&mut self.resync) {
            let _ = self.link.send(ToLink::Resync);
            match self.store.outbox() {
                Ok(all) => {
                    for (id, o) in all {
                        let _ = self.link.send(ToLink::Publish(LinkPublish::event(id, o)));
                    }
                }
                Err(e) => tracing::error!(error = %e, "could not read the outbox"),
            }
            self.publishes.clear();
            self.publish_status(true);
            self.publish_terminals();
        }
        for p in self.publishes.drain(..) {
            let _ = self.link.send(ToLink::Publish(p));
        }
    }
}
