//! The store: the only code that touches sled. Everything the agent promised a station
//! lives here, and nothing is promised before it is here *and on disk*.
//!
//! # On-disk format (version 2)
//!
//! One sled database in `queue.dir`, with these trees:
//!
//! | tree       | key                                  | value |
//! |------------|--------------------------------------|-------|
//! | `requests` | `<station> 0x00 <request_id>`        | `Record` (postcard) |
//! | `dedup`    | the request's key                    | `DedupEntry` (postcard): SHA-256 of the normalised command, received time |
//! | `queue`    | `<terminal> 0x00 <received_ms u64 BE> <request key>` | empty: the per-terminal order of open charges |
//! | `done`     | `<final_ms u64 BE> <request key>`    | empty: final requests by end time (retention, republish) |
//! | `open`     | the request's key                    | empty: requests not final (recovery reads only these) |
//! | `refs`     | `external_reference` (UTF-8)         | the owning request's key |
//! | `outbox`   | outbox id, u64 big-endian            | `OutboxEntry` (postcard): `V1` the rendered topic (format 1), `V2` an `Address` the link renders (format 2) |
//! | `meta`     | `b"format"`                          | `FORMAT_VERSION` as one byte |
//! | `meta`     | `b"boot_id"`                         | the kernel boot id the agent last ran under (UTF-8) |
//! | `meta`     | `b"last_ms"`                         | the latest wall-clock time a batch was written at, i64 BE |
//!
//! `Progress` (inside `RequestV1`) is a postcard enum too: its variants, in order, are
//! `Charge(machine::Charge)`, `Cancel { target, done }`, `Refund(refund::Refund)`; new
//! kinds of request are appended, never inserted.
//!
//! Station and request ids never contain 0x00 (validation allows `A-Za-z0-9._:-` only),
//! so the key is unambiguous. Outbox ids grow monotonically, so iterating the outbox
//! replays events in the order they were recorded, hence in `seq` order per request.
//! `dedup`, `queue` and `done` are indexes kept by `Store::write` in the same transaction
//! as the request they index: a request's first write adds its `dedup`, `open` and (for a
//! charge or a refund via terminal) `queue` entries; its final write removes the `open` and
//! `queue` entries and adds the `done` entry.
//! `Store::prune` removes a request with all its index entries and its reference.
//!
//! Records are postcard, which is not self-describing: every value is an enum whose
//! variant index is its version (`Record::V1`, `OutboxEntry::V1`). **Migration rule:** a
//! new layout is a new variant appended at the end; old variants keep their decode path
//! and are upgraded in memory when read, and rewritten in the new variant on their next
//! write. Never reorder or change an existing variant. Inside a record, the command body
//! and the last event are JSON (self-describing), so they can gain optional fields freely.
//!
//! **Versions.** Format 1 (0.1 agents): `Record::V1`, `DedupEntry::V1`,
//! `OutboxEntry::V1` (the engine rendered the topic). Format 2: the outbox entry carries
//! an `Address` (`OutboxEntry::V2`) and the station link renders it; a format 1 store is
//! opened as it is (its `V1` entries read as `Address::Topic`) and its `format` byte is
//! raised to 2, so an older agent refuses it instead of misreading an entry.
//!
//! **The rule, from format 2 on.** Persisted enums are append-only: a variant is never
//! inserted, removed or reordered, and a field of a persisted struct is never inserted,
//! removed, reordered or retyped. Any change to a persisted type bumps the record's
//! version (a new variant appended to `Record`, `DedupEntry` or `OutboxEntry`) with a
//! decode path for the old one, bumps `FORMAT_VERSION`, and adds golden fixtures of the
//! new version beside the old ones, which keep decoding (`tests/fixtures/store/`,
//! `tests/store_format.rs`; fixtures are never regenerated). The JSON of `CommandBody`
//! (hashed into `dedup`) and the derived identifiers (`domain::ids`) are formats too.
//! Persisted: everything reachable from `Record` (`Progress`, `machine::charge::Charge`
//! and its `Stage`, `Remote`, `CancelMark`, `PaymentSeen`, `machine::refund::Refund` and
//! its `Stage`, `Via`, `State`, `WaitReason`, `Cents`), `Dedup`, `Outgoing`/`Address`,
//! the `meta` values and every key layout. (`Stage::Reconciling` sits in the middle of
//! the charge stages: it was inserted in commit bc64169, before any version was tagged
//! or packaged for a store, so no store with the older variant order exists to migrate;
//! the format 1 fixtures are of the order with it.)
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

use crate::domain::command::CommandBody;
use crate::domain::outcome::Address;
use crate::machine::charge::Charge;
use crate::machine::refund::Refund;

/// The on-disk format version written in `meta`.
pub const FORMAT_VERSION: u8 = 2;

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
// One per request, and most are charges: boxing the big variant would cost an allocation
// per request to save bytes on the rare cancel.
#[allow(clippy::large_enum_variant)]
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

/// What the dedup index remembers of a request: enough to answer a repeat of its
/// `request_id` (same content, or `conflict`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dedup {
    /// SHA-256 of the normalised command (`content_hash`).
    pub hash: [u8; 32],
    pub received_ms: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
enum DedupEntry {
    V1(Dedup),
}

/// SHA-256 of a normalised command: two commands are "the same content" (contract:
/// repeats) exactly when their hashes are equal. The body is validated and normalised
/// (`"15"` = `"15.00"`, defaults filled in) before it is hashed.
pub fn content_hash(body: &CommandBody) -> [u8; 32] {
    // A plain serde tree of strings, numbers and options: JSON encoding cannot fail.
    let json = serde_json::to_vec(body).unwrap_or_default();
    let d = ring::digest::digest(&ring::digest::SHA256, &json);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// The terminal a request occupies while it is open, if it queues on one: a charge's,
/// or the paying terminal of a refund via terminal.
pub fn terminal_of(r: &Request) -> Option<&str> {
    match (&r.body, &r.progress) {
        (CommandBody::Charge(c), _) => Some(&c.terminal),
        (_, Progress::Refund(rf)) => rf.terminal.as_deref(),
        _ => None,
    }
}

fn queue_key(terminal: &str, received_ms: i64, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(terminal.len() + 9 + key.len());
    k.extend_from_slice(terminal.as_bytes());
    k.push(0);
    k.extend_from_slice(&(received_ms.max(0) as u64).to_be_bytes());
    k.extend_from_slice(key);
    k
}

fn done_key(final_ms: i64, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + key.len());
    k.extend_from_slice(&(final_ms.max(0) as u64).to_be_bytes());
    k.extend_from_slice(key);
    k
}

/// An event waiting for the broker's PUBACK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// Where it goes; the station link renders the topic.
    pub address: Address,
    pub payload: Vec<u8>,
    pub correlation: Option<Vec<u8>>,
}

/// Version 1 of an outbox entry: the topic rendered by the engine. Field order is the
/// format: never reorder.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct OutgoingV1 {
    topic: String,
    payload: Vec<u8>,
    correlation: Option<Vec<u8>>,
}

/// Version 2 of an outbox entry: the destination as an `Address`, rendered by the link.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct OutgoingV2 {
    address: Address,
    payload: Vec<u8>,
    correlation: Option<Vec<u8>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
enum OutboxEntry {
    V1(OutgoingV1),
    V2(OutgoingV2),
}

impl OutboxEntry {
    fn into_outgoing(self) -> Outgoing {
        match self {
            // Written by a 0.1 agent: its rendered topic is kept as it was.
            OutboxEntry::V1(v) => Outgoing {
                address: Address::Topic(v.topic),
                payload: v.payload,
                correlation: v.correlation,
            },
            OutboxEntry::V2(v) => Outgoing {
                address: v.address,
                payload: v.payload,
                correlation: v.correlation,
            },
        }
    }

    fn of(o: &Outgoing) -> OutboxEntry {
        OutboxEntry::V2(OutgoingV2 {
            address: o.address.clone(),
            payload: o.payload.clone(),
            correlation: o.correlation.clone(),
        })
    }
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

/// Decode one postcard record, naming what it was in the error.
fn decode<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    what: &'static str,
) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|source| StoreError::Decode { what, source })
}

fn decode_request(bytes: &[u8]) -> Result<Request, StoreError> {
    let rec: Record = decode(bytes, "request")?;
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
    /// The wall-clock time of this batch (kept in `meta` for the clock check at start).
    pub now_ms: Option<i64>,
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
    dedup: sled::Tree,
    queue: sled::Tree,
    done: sled::Tree,
    open: sled::Tree,
    meta: sled::Tree,
    data_file: File,
    /// Test builds: writes fail (fail point `store_write_error`), as on a full or dead disk.
    fail_writes: bool,
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
            // Format 1 (0.1 agents) reads as it is: its outbox entries (`OutboxEntry::V1`)
            // keep their decode path. The byte is raised so that an older agent, which
            // cannot read `OutboxEntry::V2`, refuses the store (`TooNew`) instead of
            // failing on an entry.
            Some(v) if v.first().copied().unwrap_or(0) < FORMAT_VERSION => {
                meta.insert(b"format", &[FORMAT_VERSION])?;
            }
            Some(_) => {}
            None => {
                meta.insert(b"format", &[FORMAT_VERSION])?;
            }
        }
        let requests = db.open_tree("requests")?;
        let refs = db.open_tree("refs")?;
        let outbox = db.open_tree("outbox")?;
        let dedup = db.open_tree("dedup")?;
        let queue = db.open_tree("queue")?;
        let done = db.open_tree("done")?;
        let open = db.open_tree("open")?;
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
            dedup,
            queue,
            done,
            open,
            meta,
            data_file,
            fail_writes: crate::failpoint::armed(crate::failpoint::STORE_WRITE_ERROR),
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

    /// The dedup entry of a request id, if it is remembered.
    pub fn dedup(&self, station: &str, request_id: &str) -> Result<Option<Dedup>, StoreError> {
        match self.dedup.get(key(station, request_id))? {
            Some(bytes) => {
                let DedupEntry::V1(d) = decode(&bytes, "dedup")?;
                Ok(Some(d))
            }
            None => Ok(None),
        }
    }

    /// The open charges of every terminal in arrival order: `(terminal, request key)`.
    pub fn queue_order(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let mut out = Vec::new();
        for item in self.queue.iter() {
            let (k, _) = item?;
            if let Some(zero) = k.iter().position(|b| *b == 0) {
                if k.len() >= zero + 9 {
                    let terminal = String::from_utf8_lossy(&k[..zero]).into_owned();
                    out.push((terminal, k[zero + 9..].to_vec()));
                }
            }
        }
        Ok(out)
    }

    /// The boot id and wall-clock time of the agent's last run, as stored.
    pub fn last_run(&self) -> Result<(Option<String>, Option<i64>), StoreError> {
        let boot = self
            .meta
            .get(b"boot_id")?
            .map(|v| String::from_utf8_lossy(&v).into_owned());
        let last = self.meta.get(b"last_ms")?.and_then(|v| {
            let b: [u8; 8] = v.as_ref().try_into().ok()?;
            Some(i64::from_be_bytes(b))
        });
        Ok((boot, last))
    }

    /// Remember the boot id of this run (durable with the next `sync`).
    pub fn set_boot_id(&self, boot_id: &str) -> Result<(), StoreError> {
        self.meta.insert(b"boot_id", boot_id.as_bytes())?;
        Ok(())
    }

    /// Remove up to `limit` final requests that ended before `before_ms`, with their
    /// index entries and references (`queue.retention`). Returns how many went. Not
    /// durable until the next `sync`; a crash halfway leaves some to the next pass.
    pub fn prune(&self, before_ms: i64, limit: usize) -> Result<usize, StoreError> {
        let end = (before_ms.max(0) as u64).to_be_bytes();
        let mut n = 0;
        for item in self.done.range(..end.as_slice()).take(limit) {
            let (dk, _) = item?;
            let rkey = &dk[8..];
            if let Some(bytes) = self.requests.get(rkey)? {
                if let Ok(r) = decode_request(&bytes) {
                    if let Some(reference) = &r.external_reference {
                        if self.refs.get(reference.as_bytes())?.as_deref() == Some(rkey) {
                            self.refs.remove(reference.as_bytes())?;
                        }
                    }
                }
            }
            self.requests.remove(rkey)?;
            self.dedup.remove(rkey)?;
            self.done.remove(&dk)?;
            n += 1;
        }
        Ok(n)
    }

    /// Remove a request that was never durably accepted, with its index entries and
    /// reference (after a failed write).
    pub fn forget(&self, r: &Request) -> Result<(), StoreError> {
        let k = r.key();
        self.requests.remove(&k)?;
        self.dedup.remove(&k)?;
        self.open.remove(&k)?;
        if let Some(t) = terminal_of(r) {
            self.queue.remove(queue_key(t, r.received_ms, &k))?;
        }
        if let Some(reference) = &r.external_reference {
            if self.refs.get(reference.as_bytes())?.as_deref() == Some(k.as_slice()) {
                self.refs.remove(reference.as_bytes())?;
            }
        }
        Ok(())
    }

    /// Number of stored requests (open and final).
    pub fn request_count(&self) -> usize {
        self.requests.len()
    }

    /// Every request that is not final (for recovery at start): read through the `open`
    /// index, so a store full of final requests starts as fast as an empty one.
    pub fn open_requests(&self) -> Result<Vec<Request>, StoreError> {
        let mut out = Vec::new();
        for item in self.open.iter() {
            let (k, _) = item?;
            if let Some(v) = self.requests.get(&k)? {
                let r = decode_request(&v)?;
                if !r.is_final() {
                    out.push(r);
                }
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
        let start = (since_ms.max(0) as u64).to_be_bytes();
        for item in self.done.range(start.as_slice()..) {
            let (dk, _) = item?;
            if let Some(v) = self.requests.get(&dk[8..])? {
                out.push(decode_request(&v)?);
            }
        }
        Ok(out)
    }

    /// Apply a set of writes atomically (not yet durable: see `sync`).
    pub fn write(&self, w: &Writes) -> Result<(), StoreError> {
        if w.is_empty() {
            return Ok(());
        }
        if self.fail_writes {
            return Err(StoreError::Sync(std::io::Error::other(
                "fail point store_write_error",
            )));
        }
        let mut reqs = Vec::with_capacity(w.requests.len());
        // Index entries: (tree, key, value or None to remove).
        let mut index: Vec<(u8, Vec<u8>, Option<Vec<u8>>)> = Vec::new();
        for r in &w.requests {
            let k = r.key();
            if !self.requests.contains_key(&k)? {
                let d = DedupEntry::V1(Dedup {
                    hash: content_hash(&r.body),
                    received_ms: r.received_ms,
                });
                let bytes = postcard::to_stdvec(&d).map_err(StoreError::Encode)?;
                index.push((0, k.clone(), Some(bytes)));
                if r.final_ms.is_none() {
                    index.push((3, k.clone(), Some(Vec::new())));
                    if let Some(t) = terminal_of(r) {
                        index.push((1, queue_key(t, r.received_ms, &k), Some(Vec::new())));
                    }
                }
            }
            if let Some(f) = r.final_ms {
                if let Some(t) = terminal_of(r) {
                    index.push((1, queue_key(t, r.received_ms, &k), None));
                }
                index.push((3, k.clone(), None));
                index.push((2, done_key(f, &k), Some(Vec::new())));
            }
            reqs.push((k, encode_request(r)?));
        }
        let mut outs = Vec::with_capacity(w.outbox.len());
        for (id, o) in &w.outbox {
            let bytes = postcard::to_stdvec(&OutboxEntry::of(o)).map_err(StoreError::Encode)?;
            outs.push((id.to_be_bytes(), bytes));
        }
        use sled::Transactional;
        let last_ms = w.now_ms.map(|t| t.to_be_bytes());
        (
            &self.requests,
            &self.refs,
            &self.outbox,
            &self.dedup,
            &self.queue,
            &self.done,
            &self.open,
            &self.meta,
        )
            .transaction(|(rt, ft, ot, dt, qt, nt, pt, mt)| {
                for (k, v) in &reqs {
                    rt.insert(k.as_slice(), v.as_slice())?;
                }
                for (tree, k, v) in &index {
                    let t = match tree {
                        0 => dt,
                        1 => qt,
                        2 => nt,
                        _ => pt,
                    };
                    match v {
                        Some(v) => t.insert(k.as_slice(), v.as_slice())?,
                        None => t.remove(k.as_slice())?,
                    };
                }
                if let Some(ms) = &last_ms {
                    mt.insert(b"last_ms".as_slice(), ms.as_slice())?;
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
            let entry: OutboxEntry = decode(&v, "outbox")?;
            out.push((u64_from_key(&k), entry.into_outgoing()));
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
    use crate::domain::command::{ChargeCmd, CommandBody};
    use crate::machine::charge::Charge;
    use crate::money::Cents;

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
                        address: Address::Topic("t".into()),
                        payload: b"e1".to_vec(),
                        correlation: None,
                    },
                )],
                requests: vec![r],
                now_ms: Some(1),
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
                        address: Address::Topic("t".into()),
                        payload: vec![1],
                        correlation: Some(vec![9]),
                    },
                )],
                now_ms: None,
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

    #[test]
    fn indexes_follow_a_request_from_accepted_to_final_and_pruning_forgets_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut a = charge_request("a");
        a.received_ms = 2_000;
        let mut b = charge_request("b");
        b.received_ms = 1_000;
        let write = |reqs: Vec<Request>| {
            store
                .write(&Writes {
                    refs: reqs
                        .iter()
                        .map(|r| (format!("ref-{}", r.request_id), r.key()))
                        .collect(),
                    requests: reqs,
                    outbox: vec![],
                    now_ms: Some(9_000),
                })
                .unwrap()
        };
        write(vec![a.clone(), b.clone()]);
        // Queue order is arrival order, whatever the key order.
        let order: Vec<Vec<u8>> = store
            .queue_order()
            .unwrap()
            .into_iter()
            .map(|(_, k)| k)
            .collect();
        assert_eq!(order, vec![b.key(), a.key()]);
        let d = store.dedup("kiosk-1", "a").unwrap().expect("remembered");
        assert_eq!(d.hash, content_hash(&a.body));
        assert_eq!(d.received_ms, 2_000);
        // b ends: out of the queue, into `done`.
        b.final_ms = Some(5_000);
        write(vec![b.clone()]);
        let order: Vec<Vec<u8>> = store
            .queue_order()
            .unwrap()
            .into_iter()
            .map(|(_, k)| k)
            .collect();
        assert_eq!(order, vec![a.key()]);
        assert_eq!(store.recent_final(4_000).unwrap().len(), 1);
        assert_eq!(store.recent_final(6_000).unwrap().len(), 0);
        // Pruning before its end keeps it; after, forgets it, its id and its reference.
        assert_eq!(store.prune(5_000, 100).unwrap(), 0);
        assert_eq!(store.prune(5_001, 100).unwrap(), 1);
        assert!(store.get("kiosk-1", "b").unwrap().is_none());
        assert!(store.dedup("kiosk-1", "b").unwrap().is_none());
        assert!(store.ref_owner("ref-b").unwrap().is_none());
        // The open one is untouched.
        assert!(store.get("kiosk-1", "a").unwrap().is_some());
        assert_eq!(store.ref_owner("ref-a").unwrap(), Some(a.key()));
        assert_eq!(store.last_run().unwrap().1, Some(9_000));
    }

    #[test]
    fn the_content_hash_tells_same_content_from_other_content() {
        let a = charge_request("x");
        let mut b = charge_request("x");
        assert_eq!(content_hash(&a.body), content_hash(&b.body));
        if let CommandBody::Charge(c) = &mut b.body {
            c.amount = crate::money::Cents(c.amount.0 + 1);
        }
        assert_ne!(content_hash(&a.body), content_hash(&b.body));
    }

    #[test]
    fn a_stored_refund_reads_back_the_same_in_every_stage() {
        use crate::domain::remote::{Failure, Phase};
        use crate::machine::refund::tests::{api_sending, ctx, payment, remote, terminal_live};
        use crate::machine::refund::Input;
        let mut stages = vec![api_sending(), terminal_live()];
        let mut r = api_sending();
        r.step(Input::SendDone(Err(Failure::Ambiguous)), &ctx(1_100));
        stages.push(r);
        let mut r = terminal_live();
        r.step(Input::PollDone(Ok(remote(Phase::Ended))), &ctx(5_000));
        r.step(
            Input::PaymentDone(Ok(payment("refunded", 1500))),
            &ctx(5_100),
        );
        stages.push(r);
        for r in stages {
            let p = Progress::Refund(r);
            let bytes = postcard::to_stdvec(&p).unwrap();
            let back: Progress = postcard::from_bytes(&bytes).unwrap();
            assert_eq!(back, p);
        }
    }
}
