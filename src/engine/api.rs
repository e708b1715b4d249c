//! API calls: what the engine asks of the Point backend (`Op`), launching them under the
//! request limit and a 429's pause once their write-ahead is durable, and turning their
//! answers into machine inputs; the API's health for the status document.

use super::*;

#[derive(Debug)]
pub(super) enum Op {
    Create(CreateCharge),
    Poll(String),
    Payment(String),
    Search(String),
    List {
        from_ms: i64,
        /// The engine's clock when the listing was asked for: the last day to list.
        until_ms: i64,
        reference: String,
        terminal: String,
    },
    Cancel {
        terminal: String,
        intent_id: String,
    },
    Devices,
    Refund(refunds::RefundOp),
}

#[derive(Debug)]
pub(super) struct ApiCall {
    pub(super) key: Vec<u8>,
    pub(super) op: Op,
}

#[derive(Debug)]
pub(super) enum ApiAnswer {
    Create(Result<RemoteCharge, ApiError>),
    Poll(Result<RemoteCharge, ApiError>),
    Payment(Result<Payment, ApiError>),
    Search(Result<Vec<Payment>, ApiError>),
    List(Result<Option<Vec<Candidate>>, ApiError>),
    Cancel(Result<(), ApiError>),
    Devices(Result<Vec<Device>, ApiError>),
    Refund(refunds::RefundAnswer),
}

#[derive(Debug)]
pub(super) struct ApiResult {
    pub(super) key: Vec<u8>,
    pub(super) answer: ApiAnswer,
}

/// The API's health as the status topic reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ApiHealth {
    Ok,
    Unreachable,
    Unauthorized,
}

impl<B: PointBackend> Engine<B> {
    pub(super) fn on_api(&mut self, r: ApiResult) {
        let now = self.clock.now_ms();
        self.bucket.answered(now);
        self.inflight.remove(&r.key);
        let ok = match &r.answer {
            ApiAnswer::Create(x) | ApiAnswer::Poll(x) => x.as_ref().err().cloned(),
            ApiAnswer::Payment(x) => x.as_ref().err().cloned(),
            ApiAnswer::Search(x) => x.as_ref().err().cloned(),
            ApiAnswer::List(x) => x.as_ref().err().cloned(),
            ApiAnswer::Cancel(x) => x.as_ref().err().cloned(),
            ApiAnswer::Devices(x) => x.as_ref().err().cloned(),
            ApiAnswer::Refund(x) => x.error().cloned(),
        };
        self.note_health(ok.as_ref(), now);
        if let Some(ra) = ok
            .as_ref()
            .filter(|e| e.status() == Some(429))
            .and_then(|e| e.retry_after())
        {
            // Mercado Pago asked everyone to wait, not just this request.
            self.paused_until_ms = self.paused_until_ms.max(now + ra.as_millis() as i64);
        }
        let input = match r.answer {
            ApiAnswer::Devices(res) => {
                match res {
                    Ok(list) => {
                        let map: HashMap<String, String> = list
                            .into_iter()
                            .map(|d| (d.id, d.operating_mode.unwrap_or_else(|| "UNKNOWN".into())))
                            .collect();
                        tracing::info!(devices = map.len(), "device list refreshed");
                        self.devices = Some(map);
                        for q in self.terminals.values_mut() {
                            q.published = None;
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "device listing failed"),
                }
                return;
            }
            ApiAnswer::Create(res) => {
                if let Err(e) = &res {
                    tracing::warn!(error = %e, "create failed");
                }
                Input::CreateDone(res.map_err(|e| self.backend.failure(&e, true)))
            }
            ApiAnswer::Poll(res) => {
                Input::PollDone(res.map_err(|e| self.backend.failure(&e, false)))
            }
            ApiAnswer::Payment(res) => {
                Input::PaymentDone(res.map_err(|e| self.backend.failure(&e, false)))
            }
            ApiAnswer::Search(res) => {
                Input::SearchDone(res.map_err(|e| self.backend.failure(&e, false)))
            }
            ApiAnswer::List(res) => {
                match &res {
                    Ok(Some(c)) => tracing::info!(candidates = c.len(), "reconcile listed"),
                    Ok(None) => tracing::warn!("reconcile: the intent list is not served"),
                    Err(e) => tracing::warn!(error = %e, "reconcile listing failed"),
                }
                Input::ListDone(res.map_err(|e| self.backend.failure(&e, false)))
            }
            ApiAnswer::Cancel(res) => {
                Input::CancelDone(res.map_err(|e| self.backend.failure(&e, false)))
            }
            ApiAnswer::Refund(a) => return self.on_refund_answer(&r.key, a, now),
        };
        self.apply(&r.key, input, now);
    }

    pub(super) fn note_health(&mut self, err: Option<&ApiError>, now: i64) {
        match err {
            None => {
                self.health = ApiHealth::Ok;
                if self.failing_since_ms.take().is_some() {
                    self.api_back(now);
                }
            }
            Some(e) if e.is_unauthorized() || matches!(e, ApiError::Token(_)) => {
                self.health = ApiHealth::Unauthorized
            }
            Some(e) if e.is_unreachable() => {
                let since = *self.failing_since_ms.get_or_insert(now);
                if now - since > 10_000 {
                    self.health = ApiHealth::Unreachable;
                }
            }
            Some(_) => {}
        }
    }

    /// The API answered again after failing: what waits out a backoff (up to 30 s) goes
    /// again within the next 2 s instead, spread at random; the request limit (and a
    /// 429's pause) still paces them, so there is no storm, and a customer is not kept
    /// waiting by a backoff that outlived the outage.
    pub(super) fn api_back(&mut self, now: i64) {
        let keys: Vec<Vec<u8>> = self.active.keys().cloned().collect();
        for k in keys {
            let at = now + fastrand::i64(0..2_000);
            let hurried = match self.active.get_mut(&k).map(|r| &mut r.progress) {
                Some(Progress::Charge(ch)) => ch.hurry(at),
                Some(Progress::Refund(rf)) => rf.hurry(at),
                _ => false,
            };
            if hurried {
                self.dirty.insert(k.clone());
                self.set_wake(&k);
            }
        }
    }

    /// Let queued API calls leave, within the rate limit and one at a time per request.
    pub(super) fn launch(&mut self, now: i64) {
        if now < self.paused_until_ms {
            return;
        }
        let mut held = VecDeque::new();
        while let Some(call) = self.api_queue.pop_front() {
            if !call.key.is_empty() && self.inflight.contains(&call.key) {
                held.push_back(call);
                continue;
            }
            if !self.bucket.take(now) {
                held.push_back(call);
                held.extend(self.api_queue.drain(..));
                break;
            }
            if !call.key.is_empty() {
                self.inflight.insert(call.key.clone());
            }
            if matches!(call.op, Op::Create(_)) {
                failpoint::hit(failpoint::CREATE_BEFORE_SEND);
            }
            let backend = self.backend.clone();
            let tx = self.api_tx.clone();
            let pace =
                Duration::from_millis(1_000 / u64::from(self.s.max_requests_per_second.max(1)));
            tokio::spawn(async move {
                let answer = match call.op {
                    Op::Create(c) => {
                        let r = backend.create_charge(&c).await;
                        if r.is_ok() {
                            failpoint::hit(failpoint::CREATE_AFTER_SEND);
                        }
                        ApiAnswer::Create(r)
                    }
                    Op::Poll(id) => ApiAnswer::Poll(backend.get_charge(&id).await),
                    Op::Payment(id) => ApiAnswer::Payment(backend.get_payment(&id).await),
                    Op::Search(r) => ApiAnswer::Search(backend.search_payments(&r).await),
                    Op::List {
                        from_ms,
                        until_ms,
                        reference,
                        terminal,
                    } => ApiAnswer::List(
                        backend
                            .find_created(
                                from_ms - Timing::RECONCILE_SKEW_MS,
                                until_ms,
                                &reference,
                                &terminal,
                                pace,
                            )
                            .await,
                    ),
                    Op::Cancel {
                        terminal,
                        intent_id,
                    } => ApiAnswer::Cancel(backend.cancel_charge(&terminal, &intent_id).await),
                    Op::Devices => ApiAnswer::Devices(backend.list_devices().await),
                    Op::Refund(op) => ApiAnswer::Refund(op.run(backend.as_ref()).await),
                };
                let _ = tx.send(ApiResult {
                    key: call.key,
                    answer,
                });
            });
        }
        self.api_queue = held;
    }
}
