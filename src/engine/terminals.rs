//! Terminal queues: one request holds a terminal at a time, the others wait in arrival
//! order; the device listing behind `terminal_unavailable`; the retained terminal states.

use super::*;

#[derive(Debug, Default)]
pub(super) struct TermQueue {
    pub(super) holder: Option<Vec<u8>>,
    pub(super) waiting: VecDeque<Vec<u8>>,
    pub(super) published: Option<(bool, Option<String>, u32, String)>,
}

impl TermQueue {
    /// `key` holds the terminal now: it is no longer among those waiting.
    pub(super) fn take_turn(&mut self, key: &[u8]) {
        self.holder = Some(key.to_vec());
        self.waiting.retain(|k| k != key);
    }
}

impl<B: PointBackend> Engine<B> {
    pub(super) fn schedule_terminals(&mut self, now: i64) {
        // Only terminals with someone waiting have anything to schedule.
        let names: Vec<String> = self
            .terminals
            .iter()
            .filter(|(_, q)| !q.waiting.is_empty())
            .map(|(n, _)| n.clone())
            .collect();
        for name in names {
            // Drop entries that ended while waiting (expired, canceled).
            if let Some(q) = self.terminals.get_mut(&name) {
                let active = &self.active;
                q.waiting.retain(|k| active.contains_key(k));
                if q.holder.as_ref().is_some_and(|h| !active.contains_key(h)) {
                    q.holder = None;
                }
            }
            let (holder, waiting) = match self.terminals.get(&name) {
                Some(q) => (q.holder.clone(), q.waiting.clone()),
                None => continue,
            };
            let mut busy = holder.is_some();
            for k in waiting {
                if self.inflight.contains(&k) {
                    busy = true;
                    continue;
                }
                if busy {
                    self.apply(&k, Input::TerminalBusy, now);
                    continue;
                }
                self.apply(&k, Input::MayStart, now);
                busy = true;
            }
        }
    }

    pub(super) fn terminal_state(&self, terminal: &str) -> TerminalState {
        let q = self.terminals.get(terminal);
        let mode = match &self.devices {
            Some(d) => d.get(terminal).cloned().unwrap_or_else(|| "UNKNOWN".into()),
            None => "UNKNOWN".into(),
        };
        let current = q
            .and_then(|q| q.holder.as_ref())
            .and_then(|k| self.active.get(k))
            .map(|r| r.key_string());
        TerminalState {
            v: 1,
            terminal: terminal.to_string(),
            mode,
            busy: current.is_some(),
            current,
            waiting: q.map(|q| q.waiting.len() as u32).unwrap_or(0),
        }
    }

    /// Publish the retained state of every terminal whose state may have changed: those
    /// touched by this turn's writes, those never published (or to publish again after a
    /// reconnect or a device refresh), and bound terminals not seen yet.
    pub(super) fn publish_terminals(&mut self) {
        let touched = std::mem::take(&mut self.touched_terminals);
        let mut names: BTreeSet<String> = self
            .terminals
            .iter()
            .filter(|(n, q)| q.published.is_none() || touched.contains(*n))
            .map(|(n, _)| n.clone())
            .collect();
        for s in self.s.stations.values() {
            for t in &s.terminals {
                if !self.terminals.contains_key(t) {
                    names.insert(t.clone());
                }
            }
        }
        for name in names {
            let ts = self.terminal_state(&name);
            let sig = (ts.busy, ts.current.clone(), ts.waiting, ts.mode.clone());
            let q = self.terminals.entry(name.clone()).or_default();
            if q.published.as_ref() == Some(&sig) {
                continue;
            }
            q.published = Some(sig);
            let payload = serde_json::to_vec(&ts).unwrap_or_default();
            let _ = self.link.send(ToLink::Publish(LinkPublish {
                outbox_id: None,
                dest: Dest::Terminal(name.clone()),
                payload,
                correlation: None,
                retain: true,
            }));
        }
    }

    pub(super) fn maybe_refresh_devices(&mut self, now: i64) {
        if now >= self.next_devices_ms {
            self.next_devices_ms = now + self.s.devices_refresh.as_millis() as i64;
            self.calls.push(ApiCall {
                key: Vec::new(),
                op: Op::Devices,
            });
        }
    }

    // ---------------------------------------------------------------- outputs
}
