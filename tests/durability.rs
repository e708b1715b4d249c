//! Real durability, shown from the system calls: the agent binary runs under `strace`, a
//! station sends one charge, and the trace must show, in this order,
//!
//! 1. the command's PUBLISH read from the broker socket,
//! 2. an `fdatasync` (or `fsync`) of sled's data file `<queue.dir>/db` that returned 0,
//! 3. the PUBACK for that PUBLISH's packet id written to the broker socket.
//!
//! sled's own `flush()` is only `sync_file_range` on Linux; without the store's fdatasync a
//! power cut after the PUBACK could lose an accepted command. The trace is parsed as MQTT:
//! every read and write on the socket to the broker's port is reassembled into a byte
//! stream per direction and split into packets, so a PUBACK batched in one write with other
//! packets is still found. `strace -f` prints lines in the order it observed the calls;
//! the order of lines (not their timestamps) is what is checked. Negative controls run the
//! same checker on synthetic traces where the order is wrong and must see it fail.

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use common::util::unix_ms;
use common::MqttStation;
use common::{AgentOpts, World};

/// strace `-xx` writes every byte of strings and paths as `\xNN`; decode those (and
/// the few C escapes strace may still use), keep anything else as is.
fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len() / 4);
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 1 < b.len() {
            match b[i + 1] {
                b'x' if i + 3 < b.len() => {
                    let hex = std::str::from_utf8(&b[i + 2..i + 4]).unwrap_or("");
                    if let Ok(v) = u8::from_str_radix(hex, 16) {
                        out.push(v);
                        i += 4;
                        continue;
                    }
                    out.push(b[i]);
                    i += 1;
                }
                b'n' => {
                    out.push(b'\n');
                    i += 2;
                }
                b't' => {
                    out.push(b'\t');
                    i += 2;
                }
                b'"' | b'\\' => {
                    out.push(b[i + 1]);
                    i += 2;
                }
                _ => {
                    out.push(b[i]);
                    i += 1;
                }
            }
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// Every `"..."` string literal of a strace line, decoded and concatenated (the buffer of
/// a read/write, or the iov_base parts of a readv/writev, in order).
fn strings(line: &str) -> Vec<u8> {
    let b = line.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'"' {
            let start = i + 1;
            let mut j = start;
            while j < b.len() && b[j] != b'"' {
                if b[j] == b'\\' {
                    j += 1;
                }
                j += 1;
            }
            out.extend(unescape(&line[start..j.min(b.len())]));
            i = j + 1;
        } else {
            i += 1;
        }
    }
    out
}

/// One system call of interest, as reassembled from strace's lines.
#[derive(Debug, Clone)]
struct Call {
    /// Index of the line where the call returned (the order that matters).
    line: usize,
    name: String,
    /// The first argument's `<...>` annotation (`-yy`), decoded: a path or `TCP:[a->b]`.
    fd: String,
    /// Data strings of the call (buffers of reads on exit, writes on entry).
    data: Vec<u8>,
    /// What it returned, as printed (`0`, `4`, `-1 EAGAIN ...`).
    ret: String,
}

/// `PID  HH:MM:SS.ffffff rest` (strace -f -tt -o): the pid and the rest.
fn split_prefix(line: &str) -> Option<(&str, &str)> {
    let line = line.trim_start();
    let (pid, rest) = line.split_once(char::is_whitespace)?;
    let rest = rest.trim_start();
    let (time, rest) = rest.split_once(' ')?;
    if !time.contains(':') || !pid.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    Some((pid, rest))
}

/// The `<...>` annotation right after the first `(` (the first argument's fd), decoded.
fn fd_annotation(args: &str) -> String {
    let Some(start) = args.find('<') else {
        return String::new();
    };
    // The annotation ends at a `>` followed by `,`, `)` or a space (a socket's `TCP:[a->b]` has a
    // `>` of its own inside).
    let Some(end) = args[start..].match_indices('>').map(|(i, _)| i).find(|&i| {
        matches!(
            args.as_bytes().get(start + i + 1),
            Some(b',' | b')' | b' ') | None
        )
    }) else {
        return String::new();
    };
    String::from_utf8_lossy(&unescape(&args[start + 1..start + end])).into_owned()
}

/// Parses a `strace -f -tt -yy -xx -o FILE` trace into completed calls, joining
/// `<unfinished ...>` / `<... resumed>` pairs per pid.
fn parse_trace(text: &str) -> Vec<Call> {
    let mut pending: HashMap<String, (String, String, Vec<u8>)> = HashMap::new();
    let mut calls = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let Some((pid, rest)) = split_prefix(line) else {
            continue;
        };
        if let Some(resumed) = rest.strip_prefix("<... ") {
            let Some((name, tail)) = resumed.split_once(" resumed>") else {
                continue;
            };
            let Some((pname, fd, mut data)) = pending.remove(pid) else {
                continue;
            };
            if pname != name {
                continue;
            }
            data.extend(strings(tail));
            let ret = tail
                .rsplit_once(" = ")
                .map(|(_, r)| r.trim().to_string())
                .unwrap_or_default();
            calls.push(Call {
                line: i,
                name: name.to_string(),
                fd,
                data,
                ret,
            });
            continue;
        }
        let Some((name, args)) = rest.split_once('(') else {
            continue;
        };
        if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        let fd = fd_annotation(args);
        if let Some(head) = args.strip_suffix(" <unfinished ...>") {
            pending.insert(pid.to_string(), (name.to_string(), fd, strings(head)));
            continue;
        }
        let ret = args
            .rsplit_once(" = ")
            .map(|(_, r)| r.trim().to_string())
            .unwrap_or_default();
        calls.push(Call {
            line: i,
            name: name.to_string(),
            fd,
            data: strings(args),
            ret,
        });
    }
    calls
}

/// One MQTT control packet from a reassembled stream.
#[derive(Debug, Clone)]
struct Packet {
    /// The line of the call that completed it.
    line: usize,
    first: u8,
    body: Vec<u8>,
}

impl Packet {
    fn kind(&self) -> u8 {
        self.first >> 4
    }

    /// PUBLISH: (topic, packet id if QoS > 0, the rest: properties and payload).
    fn publish(&self) -> Option<(String, Option<u16>, &[u8])> {
        if self.kind() != 3 {
            return None;
        }
        let b = &self.body;
        let tlen = u16::from_be_bytes([*b.first()?, *b.get(1)?]) as usize;
        let topic = String::from_utf8_lossy(b.get(2..2 + tlen)?).into_owned();
        let qos = (self.first >> 1) & 3;
        let mut at = 2 + tlen;
        let pkid = if qos > 0 {
            let id = u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]);
            at += 2;
            Some(id)
        } else {
            None
        };
        Some((topic, pkid, b.get(at..)?))
    }

    /// PUBACK: its packet id.
    fn puback(&self) -> Option<u16> {
        if self.kind() != 4 {
            return None;
        }
        Some(u16::from_be_bytes([
            *self.body.first()?,
            *self.body.get(1)?,
        ]))
    }
}

/// Splits a byte stream into MQTT packets as chunks arrive.
#[derive(Default)]
struct Reassembler {
    buf: Vec<u8>,
    packets: Vec<Packet>,
}

impl Reassembler {
    fn push(&mut self, line: usize, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
        loop {
            let Some(&first) = self.buf.first() else {
                return;
            };
            // Remaining length: a variable byte integer of at most 4 bytes.
            let mut len = 0usize;
            let mut mult = 1usize;
            let mut at = 1;
            loop {
                let Some(&b) = self.buf.get(at) else {
                    return;
                };
                len += (b & 0x7f) as usize * mult;
                mult *= 128;
                at += 1;
                if b & 0x80 == 0 || at > 4 {
                    break;
                }
            }
            if self.buf.len() < at + len {
                return;
            }
            let body = self.buf[at..at + len].to_vec();
            self.buf.drain(..at + len);
            self.packets.push(Packet { line, first, body });
        }
    }
}

/// What the checker found.
#[derive(Debug)]
struct Order {
    command_line: usize,
    pkid: u16,
    sync_line: usize,
    puback_line: usize,
}

/// Checks the promise on a trace: after the PUBLISH to a `.../cmd` topic whose payload
/// holds `marker` was read from the socket to `broker_port`, a successful fdatasync/fsync
/// of a file ending in `/db` under `state_dir` returned before the PUBACK with the same
/// packet id was written to that socket.
fn check_order(
    trace: &str,
    broker_port: u16,
    state_dir: &str,
    marker: &str,
) -> Result<Order, String> {
    let calls = parse_trace(trace);
    let remote = format!("->127.0.0.1:{broker_port}]");
    let db = format!("{state_dir}/db");
    let mut rx = Reassembler::default();
    let mut tx = Reassembler::default();
    for c in &calls {
        if !c.fd.contains(&remote) || c.ret.starts_with('-') || c.data.is_empty() {
            continue;
        }
        match c.name.as_str() {
            "read" | "recvfrom" | "recvmsg" | "readv" => rx.push(c.line, &c.data),
            "write" | "sendto" | "sendmsg" | "writev" => tx.push(c.line, &c.data),
            _ => {}
        }
    }
    let (command_line, pkid) = rx
        .packets
        .iter()
        .find_map(|p| {
            let (topic, pkid, rest) = p.publish()?;
            let has_marker = rest.windows(marker.len()).any(|w| w == marker.as_bytes());
            (topic.ends_with("/cmd") && has_marker).then_some((p.line, pkid?))
        })
        .ok_or_else(|| {
            format!(
                "no PUBLISH of the command ({marker}) read from the broker socket ({} packets read)",
                rx.packets.len()
            )
        })?;
    let puback_line = tx
        .packets
        .iter()
        .find(|p| p.line > command_line && p.puback() == Some(pkid))
        .map(|p| p.line)
        .ok_or_else(|| format!("no PUBACK for packet id {pkid} written after the command"))?;
    let sync_line = calls
        .iter()
        .filter(|c| {
            matches!(c.name.as_str(), "fdatasync" | "fsync")
                && c.fd == db
                && c.ret == "0"
                && c.line > command_line
                && c.line < puback_line
        })
        .map(|c| c.line)
        .next_back()
        .ok_or_else(|| {
            format!(
                "no fdatasync/fsync of {db} returned between the command (line {}) and its PUBACK (line {})",
                command_line + 1,
                puback_line + 1
            )
        })?;
    Ok(Order {
        command_line,
        pkid,
        sync_line,
        puback_line,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_is_fdatasynced_to_disk_before_its_puback_leaves() {
    let strace = common::mosquitto::find_program("strace", "STRACE");
    let World {
        broker,
        mut agent,
        watch,
        ..
    } = World::builder()
        .agent(AgentOpts::crowd(1, 1))
        .setup_only()
        .status_watch()
        .start()
        .await;
    let (broker, watch) = (broker.expect("a broker"), watch.expect("a status watch"));
    let trace_path = agent.dir.join("strace.txt");
    let inner = agent.command();
    let mut cmd = Command::new(&strace);
    cmd.args(["-f", "-tt", "-yy", "-xx", "-s", "65536", "-o"])
        .arg(&trace_path)
        .args([
            "-e",
            "trace=fdatasync,fsync,sync_file_range,read,recvfrom,recvmsg,readv,write,sendto,sendmsg,writev",
        ])
        .arg(inner.get_program())
        .args(inner.get_args());
    for (k, v) in inner.get_envs() {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    let spawned = unix_ms();
    agent.spawn_command(cmd);
    watch
        .wait_online_since(spawned, Duration::from_secs(60))
        .await
        .expect("the agent comes online under strace");

    let mut station = MqttStation::connect(broker.port(), "durability-station", false).await;
    station.subscribe(&agent.evt_topic("st-1")).await;
    let marker = "durable-0001";
    station
        .publish(
            &agent.cmd_topic("st-1"),
            common::agent::charge(marker, "15.00"),
        )
        .await;
    station
        .wait_for(
            |m| m.json()["request_id"] == marker && m.json()["state"] == "accepted",
            Duration::from_secs(30),
        )
        .await;
    // Stop the agent itself (strace's child; a SIGTERM to strace would only detach it),
    // then strace ends with it and has written every line.
    let strace_pid = agent.pid().expect("strace runs");
    let children =
        std::fs::read_to_string(format!("/proc/{strace_pid}/task/{strace_pid}/children"))
            .unwrap_or_default();
    let agent_pid = children
        .split_whitespace()
        .next()
        .expect("the agent runs under strace")
        .to_string();
    let _ = Command::new("kill").args(["-TERM", &agent_pid]).status();
    let exited = agent.wait_exit(Duration::from_secs(20));
    if exited.is_none() {
        let _ = Command::new("kill").args(["-KILL", &agent_pid]).status();
        agent.kill9();
        panic!("the agent did not stop on SIGTERM within 20 s");
    }
    let trace = std::fs::read_to_string(&trace_path).expect("strace wrote its trace");
    let state = agent.state_dir().display().to_string();
    let order = check_order(&trace, broker.port(), &state, marker).unwrap_or_else(|e| {
        panic!(
            "{e}\n---- trace lines naming the db or the broker ----\n{}",
            trace
                .lines()
                .filter(|l| l.contains("fdatasync") || l.contains("fsync"))
                .take(50)
                .collect::<Vec<_>>()
                .join("\n")
        )
    });
    let lines: Vec<&str> = trace.lines().collect();
    println!(
        "command (packet id {}) read at line {}:\n  {}\nfdatasync at line {}:\n  {}\nPUBACK written at line {}:\n  {}",
        order.pkid,
        order.command_line + 1,
        &lines[order.command_line].chars().take(160).collect::<String>(),
        order.sync_line + 1,
        lines[order.sync_line],
        order.puback_line + 1,
        &lines[order.puback_line].chars().take(160).collect::<String>(),
    );
    assert!(order.command_line < order.sync_line && order.sync_line < order.puback_line);
}

/// A synthetic trace in strace's format: the command arrives on fd 9 (the broker socket
/// on port 1883), the data file is fd 7.
fn synthetic(lines: &[&str]) -> String {
    lines.join("\n")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("\\x{b:02x}")).collect()
}

fn command_publish(pkid: u16, marker: &str) -> Vec<u8> {
    let topic = b"pointgate/s/station/st-1/cmd";
    let payload = format!("{{\"request_id\":\"{marker}\"}}");
    let mut body = Vec::new();
    body.extend((topic.len() as u16).to_be_bytes());
    body.extend(topic);
    body.extend(pkid.to_be_bytes());
    body.push(0); // no properties
    body.extend(payload.as_bytes());
    let mut p = vec![0x32, body.len() as u8];
    p.extend(body);
    p
}

const SOCK: &str = "9<TCP:[127.0.0.1:40000->127.0.0.1:1883]>";

fn db_fd() -> String {
    format!("7<{}>", hex(b"/s/db"))
}

fn read_line(n: u32, data: &[u8]) -> String {
    format!(
        "100  10:00:0{n}.000000 recvfrom({SOCK}, \"{}\", 8192, 0, NULL, NULL) = {}",
        hex(data),
        data.len()
    )
}

fn write_line(n: u32, data: &[u8]) -> String {
    format!(
        "101  10:00:0{n}.000000 sendto({SOCK}, \"{}\", {}, MSG_NOSIGNAL, NULL, 0) = {}",
        hex(data),
        data.len(),
        data.len()
    )
}

fn sync_line(n: u32) -> String {
    format!("102  10:00:0{n}.000000 fdatasync({}) = 0", db_fd())
}

#[test]
fn the_checker_accepts_sync_before_puback_even_split_and_batched() {
    let publish = command_publish(7, "m-1");
    let (a, b) = publish.split_at(5);
    // The PUBACK batched in one write after an unrelated PUBLISH of an event.
    let mut out = command_publish(1, "other");
    out[0] = 0x32;
    out.extend([0x40, 0x02, 0x00, 0x07]);
    let trace = synthetic(&[
        &read_line(1, a),
        &read_line(2, b),
        &format!(
            "102  10:00:03.000000 fdatasync({} <unfinished ...>",
            db_fd()
        ),
        "103  10:00:03.100000 futex(0x1, FUTEX_WAKE, 1) = 0",
        "102  10:00:03.200000 <... fdatasync resumed>) = 0",
        &write_line(4, &out),
    ]);
    let order = check_order(&trace, 1883, "/s", "m-1").expect("the order holds");
    assert_eq!(order.pkid, 7);
    assert_eq!(
        (order.command_line, order.sync_line, order.puback_line),
        (1, 4, 5)
    );
}

#[test]
fn the_checker_fails_when_the_puback_leaves_before_the_sync() {
    let trace = synthetic(&[
        &read_line(1, &command_publish(7, "m-1")),
        &write_line(2, &[0x40, 0x02, 0x00, 0x07]),
        &sync_line(3),
    ]);
    let err = check_order(&trace, 1883, "/s", "m-1").expect_err("reversed order is caught");
    assert!(err.contains("no fdatasync"), "{err}");
}

#[test]
fn the_checker_fails_when_the_only_sync_came_before_the_command() {
    let trace = synthetic(&[
        &sync_line(1),
        &read_line(2, &command_publish(7, "m-1")),
        &write_line(3, &[0x40, 0x02, 0x00, 0x07]),
    ]);
    assert!(check_order(&trace, 1883, "/s", "m-1").is_err());
}

#[test]
fn the_checker_fails_on_a_sync_that_returned_an_error_or_another_file() {
    let other = format!(
        "102  10:00:02.000000 fdatasync(8<{}>) = 0",
        hex(b"/s/db.old")
    );
    let failed = format!(
        "102  10:00:02.000000 fdatasync({}) = -1 EIO (Input/output error)",
        db_fd()
    );
    for bad in [other, failed] {
        let trace = synthetic(&[
            &read_line(1, &command_publish(7, "m-1")),
            &bad,
            &write_line(3, &[0x40, 0x02, 0x00, 0x07]),
        ]);
        assert!(check_order(&trace, 1883, "/s", "m-1").is_err(), "{bad}");
    }
}

#[test]
fn the_checker_needs_the_puback_of_the_commands_packet_id() {
    let trace = synthetic(&[
        &read_line(1, &command_publish(7, "m-1")),
        &sync_line(2),
        &write_line(3, &[0x40, 0x02, 0x00, 0x08]),
    ]);
    let err = check_order(&trace, 1883, "/s", "m-1").expect_err("wrong packet id");
    assert!(err.contains("no PUBACK"), "{err}");
}
