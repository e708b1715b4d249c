//! The store: the only code that touches sled. Everything the agent promised a station
//! lives here, and nothing is promised before it is here *and on disk*.
//!
//! # On-disk format (version 1)
//!
//! One sled database in `queue.dir`, with these trees:
//!
//! | tree       | key                                  | value |
//! |------------|--------------------------------------|-------|
//! | `requests` | `<station> 0x00 <request_id>`        | `Record` (postcard) |
//! | `refs`     | `external_reference` (UTF-8)         | the owning request's key |
//! | `outbox`   | outbox id, u64 big-endian            | `OutboxEntry` (postcard) |
//! | `meta`     | `b"format"`                          | `FORMAT_VERSION` as one byte |
//!
//! `Progress` (inside `RequestV1`) is a postcard enum too: its variants, in order, are
//! `Charge(machine::Charge)`, `Cancel { target, done }`, `Refund(refund::Refund)`; new
//! kinds of request are appended, never inserted.
//!
//! Station and request ids never contain 0x00 (validation allows `A-Za-z0-9._:-` only),
//! so the key is unambiguous. Outbox ids grow monotonically, so iterating the outbox
//! replays events in the order they were recorded, hence in `seq` order per request.
//!
//! Records are postcard, which is not self-describing: every value is an enum whose
//! variant index is its version (`Record::V1`, `OutboxEntry::V1`). **Migration rule:** a
//! new layout is a new variant appended at the end; old variants keep their decode path
//! and are upgraded in memory when read, and rewritten in the new variant on their next
//! write. Never reorder or change an existing variant. Inside a record, the command body
//! and the last event are JSON (self-describing), so they can gain optional fields freely.
//!
//! # Durability
//!
//! sled's `flush()` on Linux is `sync_file_range`, which does not make data durable
//! across a power cut. `Store::sync` therefore flushes sled and then calls
//! `fdatasync` on sled's data file (`<dir>/db`), through a handle of our own: fsync acts
//! on the file, not the descriptor. The engine calls `sync` once per batch of writes
//! (group commit) and acknowledges nothing before it returns.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::engine::machine::Charge;
use crate::engine::refund::Refund;
use crate::station::validate::CommandBody;

/// The on-disk format version written in `meta`.
pub const FORMAT_VERSION: u8 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store at {path}: {source}")]
    Open { path: PathBuf, source: sled::Error },
    #[error("store: {0}")]
    Sled(#[from] sled::Error),
    #[error("store: syncing the data file: {0}")]
    Sync(std::io::Error),
    #[error("store: a record could not be decoded ({what}): {source}")]
    Decode {
        what: &'static str,
        source: postcard::Error,
    },
    #[error("store: a stored command body could not be decoded: {0}")]
    DecodeBody(serde_json::Error),
    #[error("store: a record could not be encoded: {0}")]
    Encode(postcard::Error),
    #[error(
        "store: format version {found} is newer than this build understands ({FORMAT_VERSION})"
    )]
    TooNew { found: u8 },
}

/// Where a request's events go: the MQTT 5 Response Topic and Correlation Data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplyTo {
    pub topic: String,
    pub correlation: Option<Vec<u8>>,
}

/// What a stored request is doing. The variant order is the format: append only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Progress {
    Charge(Charge),
    /// A station's cancel of `target` (a request id of the same station).
    Cancel {
        target: String,
        done: bool,
    },
    /// A refund of a charge of the same station (`CommandBody::Refund` names it).
    Refund(Refund),
}

/// One stored request: a command the agent accepted, and where it stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub station: String,
    pub request_id: String,
    /// The validated, normalised command.
    pub body: CommandBody,
    pub received_ms: i64,
    pub reply: Option<ReplyTo>,
    pub external_reference: Option<String>,
    pub progress: Progress,
    /// `seq` of the latest event (1, 2, 3...).
    pub seq: u32,
    /// The latest event, as published (JSON).
    pub last_event: Vec<u8>,
    /// When it became final, if it is.
    pub final_ms: Option<i64>,
}

impl Request {
    pub fn key(&self) -> Vec<u8> {
        key(&self.station, &self.request_id)
    }

    pub fn key_string(&self) -> String {
        format!("{}/{}", self.station, self.request_id)
    }

    pub fn is_final(&self) -> bool {
        self.final_ms.is_some()
    }
}

/// The key of a request in the `requests` tree.
pub fn key(station: &str, request_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(station.len() + 1 + request_id.len());
    k.extend_from_slice(station.as_bytes());
    k.push(0);
    k.extend_from_slice(request_id.as_bytes());
    k
}

/// Version 1 of a stored request. Field order is the format: never reorder.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RequestV1 {
    station: String,
    request_id: String,
    body_json: Vec<u8>,
    received_ms: i64,
    reply: Option<ReplyTo>,
    external_reference: Option<String>,
    progress: Progress,
    seq: u32,
    last_event: Vec<u8>,
    final_ms: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
enum Record {
    V1(RequestV1),
}

/// An event waiting for the broker's PUBACK.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outgoing {
    pub topic: String,
    pub payload: Vec<u8>,
    pub correlation: Option<Vec<u8>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
enum OutboxEntry {
    V1(Outgoing),
}

fn encode_request(r: &Request) -> Result<Vec<u8>, StoreError> {
    let rec = Record::V1(RequestV1 {
        station: r.station.clone(),
        request_id: r.request_id.clone(),
        // A plain serde tree of strings, numbers and options: JSON encoding cannot fail.
        body_json: serde_json::to_vec(&r.body).unwrap_or_default(),
        received_ms: r.received_ms,
        reply: r.reply.clone(),
        external_reference: r.external_reference.clone(),
        progress: r.progress.clone(),
        seq: r.seq,
        last_event: r.last_event.clone(),
        final_ms: r.final_ms,
    });
    postcard::to_stdvec(&rec).map_err(StoreError::Encode)
}

fn decode_request(bytes: &[u8]) -> Result<Request, StoreError> {
    let rec: Record = postcard::from_bytes(bytes).map_err(|source| StoreError::Decode {
        what: "request",
        source,
    })?;
    match rec {
        Record::V1(v) => {
            let body = serde_json::from_slice(&v.body_json).map_err(StoreError::DecodeBody)?;
            Ok(Request {
                station: v.station,
                request_id: v.request_id,
                body,
                received_ms: v.received_ms,
                reply: v.reply,
                external_reference: v.external_reference,
                progress: v.progress,
                seq: v.seq,
                last_event: v.last_event,
                final_ms: v.final_ms,
            })
        }
    }
}

/// A set of writes applied atomically by `Store::write`.
#[derive(Debug, Default)]
pub struct Writes {
    pub requests: Vec<Request>,
    pub refs: Vec<(String, Vec<u8>)>,
    pub outbox: Vec<(u64, Outgoing)>,
}

impl Writes {
    pub fn is_empty(&self) -> bool {
        self.requests.is_empty() && self.refs.is_empty() && self.outbox.is_empty()
    }
}

pub struct Store {
    dir: PathBuf,
    db: sled::Db,
    requests: sled::Tree,
    refs: sled::Tree,
    outbox: sled::Tree,
    data_file: File,
    next_outbox: AtomicU64,
}

impl Store {
    /// Open (or create) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Open {
            path: dir.to_path_buf(),
            source: sled::Error::Io(e),
        })?;
        let db = sled::Config::new()
            .path(dir)
            // Flushing is ours (group commit + fdatasync), not a background timer's.
            .flush_every_ms(None)
            .cache_capacity(8 * 1024 * 1024)
            .open()
            .map_err(|source| StoreError::Open {
                path: dir.to_path_buf(),
                source,
            })?;
        let meta = db.open_tree("meta")?;
        match meta.get(b"format")? {
            Some(v) if v.first().copied().unwrap_or(0) > FORMAT_VERSION => {
                return Err(StoreError::TooNew { found: v[0] });
            }
            Some(_) => {}
            None => {
                meta.insert(b"format", &[FORMAT_VERSION])?;
            }
        }
        let requests = db.open_tree("requests")?;
        let refs = db.open_tree("refs")?;
        let outbox = db.open_tree("outbox")?;
        let next = match outbox.last()? {
            Some((k, _)) => u64_from_key(&k) + 1,
            None => 1,
        };
        let data_file = File::open(dir.join("db")).map_err(StoreError::Sync)?;
        Ok(Store {
            dir: dir.to_path_buf(),
            db,
            requests,
            refs,
            outbox,
            data_file,
            next_outbox: AtomicU64::new(next),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A fresh outbox id (ids are never reused).
    pub fn next_outbox_id(&self) -> u64 {
        self.next_outbox.fetch_add(1, Ordering::Relaxed)
    }

    pub fn get(&self, station: &str, request_id: &str) -> Result<Option<Request>, StoreError> {
        match self.requests.get(key(station, request_id))? {
            Some(bytes) => Ok(Some(decode_request(&bytes)?)),
            None => Ok(None),
        }
    }

    /// The key of the request that owns `external_reference`, if any.
    pub fn ref_owner(&self, external_reference: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .refs
            .get(external_reference.as_bytes())?
            .map(|v| v.to_vec()))
    }

    /// Every request that is not final (for recovery at start).
    pub fn open_requests(&self) -> Result<Vec<Request>, StoreError> {
        let mut out = Vec::new();
        for item in self.requests.iter() {
            let (_, v) = item?;
            let r = decode_request(&v)?;
            if !r.is_final() {
                out.push(r);
            }
        }
        Ok(out)
    }

    /// Every stored request of one station (a refund sums the refunds of its charge).
    pub fn station_requests(&self, station: &str) -> Result<Vec<Request>, StoreError> {
        let mut prefix = station.as_bytes().to_vec();
        prefix.push(0);
        let mut out = Vec::new();
        for item in self.requests.scan_prefix(prefix) {
            let (_, v) = item?;
            out.push(decode_request(&v)?);
        }
        Ok(out)
    }

    /// Requests that ended at or after `since_ms` (republished after a session loss).
    pub fn recent_final(&self, since_ms: i64) -> Result<Vec<Request>, StoreError> {
        let mut out = Vec::new();
        for item in self.requests.iter() {
            let (_, v) = item?;
            let r = decode_request(&v)?;
            if r.final_ms.is_some_and(|f| f >= since_ms) {
                out.push(r);
            }
        }
        Ok(out)
    }

    /// Apply a set of writes atomically (not yet durable: see `sync`).
    pub fn write(&self, w: &Writes) -> Result<(), StoreError> {
        if w.is_empty() {
            return Ok(());
        }
        let mut reqs = Vec::with_capacity(w.requests.len());
        for r in &w.requests {
            reqs.push((r.key(), encode_request(r)?));
        }
        let mut outs = Vec::with_capacity(w.outbox.len());
        for (id, o) in &w.outbox {
            let bytes =
                postcard::to_stdvec(&OutboxEntry::V1(o.clone())).map_err(StoreError::Encode)?;
            outs.push((id.to_be_bytes(), bytes));
        }
        use sled::Transactional;
        (&self.requests, &self.refs, &self.outbox)
            .transaction(|(rt, ft, ot)| {
                for (k, v) in &reqs {
                    rt.insert(k.as_slice(), v.as_slice())?;
                }
                for (r, k) in &w.refs {
                    ft.insert(r.as_bytes(), k.as_slice())?;
                }
                for (k, v) in &outs {
                    ot.insert(k.as_slice(), v.as_slice())?;
                }
                Ok::<(), sled::transaction::ConflictableTransactionError<()>>(())
            })
            .map_err(|e| match e {
                sled::transaction::TransactionError::Storage(s) => StoreError::Sled(s),
                sled::transaction::TransactionError::Abort(()) => {
                    StoreError::Sled(sled::Error::Unsupported("transaction aborted".into()))
                }
            })?;
        Ok(())
    }

    /// Make every write so far durable: sled's flush, then fdatasync of its data file.
    pub fn sync(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        self.data_file.sync_data().map_err(StoreError::Sync)?;
        Ok(())
    }

    /// Every event still waiting for a PUBACK, oldest first.
    pub fn outbox(&self) -> Result<Vec<(u64, Outgoing)>, StoreError> {
        let mut out = Vec::new();
        for item in self.outbox.iter() {
            let (k, v) = item?;
            let entry: OutboxEntry =
                postcard::from_bytes(&v).map_err(|source| StoreError::Decode {
                    what: "outbox",
                    source,
                })?;
            let OutboxEntry::V1(o) = entry;
            out.push((u64_from_key(&k), o));
        }
        Ok(out)
    }

    /// The broker acknowledged this event.
    pub fn outbox_remove(&self, id: u64) -> Result<(), StoreError> {
        self.outbox.remove(id.to_be_bytes())?;
        Ok(())
    }

    pub fn outbox_len(&self) -> usize {
        self.outbox.len()
    }
}

fn u64_from_key(k: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = k.len().min(8);
    b[8 - n..].copy_from_slice(&k[k.len() - n..]);
    u64::from_be_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::machine::Charge;
    use crate::money::Cents;
    use crate::station::validate::{ChargeCmd, CommandBody};

    fn charge_request(id: &str) -> Request {
        Request {
            station: "kiosk-1".into(),
            request_id: id.into(),
            body: CommandBody::Charge(ChargeCmd {
                terminal: "T1".into(),
                amount: Cents(1500),
                description: None,
                external_reference: None,
                ticket_number: None,
                print_on_terminal: true,
                payment: None,
                ttl_s: None,
                expires_at_ms: None,
            }),
            received_ms: 1_000,
            reply: None,
            external_reference: Some(format!("ref-{id}")),
            progress: Progress::Charge(Charge::new(Cents(1500), 121_000)),
            seq: 1,
            last_event: b"{}".to_vec(),
            final_ms: None,
        }
    }

    #[test]
    fn a_written_and_synced_request_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            let r = charge_request("r1");
            let id = store.next_outbox_id();
            let w = Writes {
                refs: vec![("ref-r1".into(), r.key())],
                outbox: vec![(
                    id,
                    Outgoing {
                        topic: "t".into(),
                        payload: b"e1".to_vec(),
                        correlation: None,
                    },
                )],
                requests: vec![r],
            };
            store.write(&w).unwrap();
            store.sync().unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let back = store.get("kiosk-1", "r1").unwrap().expect("stored");
        assert_eq!(back, charge_request("r1"));
        assert_eq!(
            store.ref_owner("ref-r1").unwrap(),
            Some(key("kiosk-1", "r1"))
        );
        assert_eq!(store.open_requests().unwrap().len(), 1);
        let outbox = store.outbox().unwrap();
        assert_eq!(outbox.len(), 1);
        assert_eq!(outbox[0].1.payload, b"e1");
        // Ids keep growing across restarts.
        assert!(store.next_outbox_id() > outbox[0].0);
    }

    #[test]
    fn removed_outbox_entries_stay_removed_and_final_requests_are_not_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut r = charge_request("r2");
        r.final_ms = Some(5_000);
        let id = store.next_outbox_id();
        store
            .write(&Writes {
                requests: vec![r],
                refs: vec![],
                outbox: vec![(
                    id,
                    Outgoing {
                        topic: "t".into(),
                        payload: vec![1],
                        correlation: Some(vec![9]),
                    },
                )],
            })
            .unwrap();
        store.outbox_remove(id).unwrap();
        store.sync().unwrap();
        assert!(store.outbox().unwrap().is_empty());
        assert!(store.open_requests().unwrap().is_empty());
        assert_eq!(store.recent_final(4_000).unwrap().len(), 1);
        assert!(store.recent_final(6_000).unwrap().is_empty());
    }

    #[test]
    fn a_store_of_a_newer_format_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            store
                .db
                .open_tree("meta")
                .unwrap()
                .insert(b"format", &[FORMAT_VERSION + 1])
                .unwrap();
            store.sync().unwrap();
        }
        match Store::open(dir.path()) {
            Err(StoreError::TooNew { found }) => assert_eq!(found, FORMAT_VERSION + 1),
            other => panic!("expected TooNew, got {:?}", other.map(|_| ())),
        }
    }
}
