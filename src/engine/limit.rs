//! The API request limit (`point.max_requests_per_second`) and the cap on requests in
//! flight.

use super::*;

/// The API request limit (`point.max_requests_per_second`) as a sliding window that
/// holds every request from the moment it leaves until a second after its answer came.
/// A request reaches Mercado Pago somewhere between those two instants, so however
/// connection set-up and latency vary, no 1-second window at Mercado Pago ever sees more
/// than `limit` requests (a token bucket that starts full allows twice that across an idle
/// edge; a window of launch times alone lets slow and fast requests bunch up on arrival).
pub(super) struct TokenBucket {
    pub(super) limit: usize,
    /// Requests that left and have not been answered.
    pub(super) inflight: usize,
    /// When the answers of the last second came, oldest first.
    pub(super) answered: VecDeque<i64>,
}

impl TokenBucket {
    pub(super) const WINDOW_MS: i64 = 1_000;

    pub(super) fn new(rate: u32) -> TokenBucket {
        TokenBucket {
            limit: rate.max(1) as usize,
            inflight: 0,
            answered: VecDeque::new(),
        }
    }

    pub(super) fn purge(&mut self, now: i64) {
        while self
            .answered
            .front()
            .is_some_and(|t| *t <= now - Self::WINDOW_MS)
        {
            self.answered.pop_front();
        }
    }

    /// Requests in flight at once, whatever the limit: each needs a connection (a TLS
    /// handshake, a file descriptor), and a few kept-alive ones serve a store.
    pub(super) const MAX_INFLIGHT: usize = 32;

    /// May a request leave now? If so it is counted.
    pub(super) fn take(&mut self, now: i64) -> bool {
        self.purge(now);
        if self.inflight < Self::MAX_INFLIGHT && self.inflight + self.answered.len() < self.limit {
            self.inflight += 1;
            true
        } else {
            false
        }
    }

    /// A request that left was answered (or failed).
    pub(super) fn answered(&mut self, now: i64) {
        self.inflight = self.inflight.saturating_sub(1);
        self.answered.push_back(now);
    }

    /// When the next request may leave, if no answer comes first (answers wake the
    /// engine anyway).
    pub(super) fn next_at(&self) -> i64 {
        if self.inflight >= Self::MAX_INFLIGHT {
            // An answer wakes the engine.
            return i64::MAX;
        }
        if self.inflight + self.answered.len() < self.limit {
            return 0;
        }
        self.answered
            .front()
            .map_or(i64::MAX, |t| t + Self::WINDOW_MS + 1)
    }
}
