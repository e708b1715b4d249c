//! Golden bytes of everything pointgate persists or hashes (issue 11, "Storage before
//! anything moves"). The fixtures under `tests/fixtures/store/v1/` were written by the
//! code of store format version 1 (commit 615fdd9) and are never regenerated: see
//! `tests/fixtures/store/README.md`.
//!
//! Two halves, for every fixture:
//! - **encoding** (`todays_writes_match_the_fixtures`): a `Store` in a temporary
//!   directory writes every case through the public API (`Store::write`, `set_boot_id`,
//!   `sync`); sled is then opened directly and each raw value, and the key layout of
//!   every index tree, must equal the fixtures byte for byte.
//! - **decoding** (`the_fixtures_decode_to_the_expected_values`): the fixture bytes are
//!   put into a fresh sled database with sled alone, the directory is opened with
//!   `Store::open`, and what it reads back must equal the values spelled out below (not
//!   values produced by today's encoder).
//!
//! Hashed and derived formats (`store::content_hash`, `derived_reference`,
//! `derived_ticket`, the refund idempotency key) are pinned as text tables.
//!
//! A missing fixture fails the test, unless `POINTGATE_WRITE_FIXTURES=1` is set: then it
//! is written from today's code (an existing fixture is never overwritten). That is for
//! adding a fixture, never for "fixing" one.
//!
//! When the record version is bumped, today's writer no longer writes these bytes: the
//! encoding half moves to the new version's fixtures and the v1 fixtures stay here,
//! decode-only, expected to decode (upgraded) to the same values.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

// Every path into the crate is in this block (module paths are about to move).
use pointgate::domain::command::{ChargeCmd, CommandBody, MlbPayment, RefundCmd, Via};
use pointgate::domain::ids::{derived_reference, derived_ticket};
use pointgate::domain::outcome::{Address, State, WaitReason};
use pointgate::machine::charge::{CancelMark, Charge, PaymentSeen, Remote, Stage};
use pointgate::machine::refund::{idempotency_key, Refund, Stage as RefundStage};
use pointgate::money::Cents;
use pointgate::store::{content_hash, Dedup, Outgoing, Progress, ReplyTo, Request, Store, Writes};

// ---------------------------------------------------------------------------------------
// The cases: values spelled out by hand, so that decoding is checked against them and
// not against today's encoder.
// ---------------------------------------------------------------------------------------

/// 2026-11-24T10:12:01.120Z
const T0: i64 = 1_795_515_121_120;
const STORE_ID: &str = "store-001";
const TERM_1: &str = "PAX_A910__0001";
const TERM_2: &str = "PAX_A910__0002";
const BOOT_ID: &str = "3f1c2a9e-7b4d-4e8a-9c61-0d5e2f7a8b90";
/// The batch time stored in `meta` `last_ms`.
const NOW_MS: i64 = T0 + 600_000;
const INTENT: &str = "7f7c3d6e-2b1a-4c1e-9a7b-5f0e8d3c2a10";
const REFUND_INTENT: &str = "c0ffee00-1d2e-4f30-8a41-b52c63d74e85";
const PAYMENT: &str = "23779382934";

/// `prefix` + the first 16 bytes, in hex, of SHA-256 over `parts`, each followed by a
/// NUL: the agent's derived identifiers, computed here by hand so that the cases do not
/// take them from the code under test.
fn hashed_by_hand(prefix: &str, parts: &[&str]) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for p in parts {
        ctx.update(p.as_bytes());
        ctx.update(&[0]);
    }
    format!("{prefix}{}", to_hex(&ctx.finish().as_ref()[..16]))
}

/// The reference the agent derives for a charge without one.
fn derived_ref(station: &str, request_id: &str) -> String {
    hashed_by_hand("pg-", &[STORE_ID, station, request_id])
}

/// An api refund's idempotency key, as the agent derives it.
fn refund_key(station: &str, request_id: &str) -> String {
    hashed_by_hand("pg-rf-", &["refund", STORE_ID, station, request_id])
}

/// The command bodies the cases use; each one's `content_hash` is pinned by name in
/// `content_hash.txt`.
fn bodies() -> Vec<(&'static str, CommandBody)> {
    vec![
        (
            // Every optional field set (MLB payment with every option too).
            "charge_all_fields",
            CommandBody::Charge(ChargeCmd {
                terminal: TERM_1.into(),
                amount: Cents(1500),
                description: Some("Café & pão — 2 itens".into()),
                external_reference: Some("sale-1042".into()),
                ticket_number: Some("T-000123".into()),
                print_on_terminal: true,
                payment: Some(MlbPayment {
                    kind: "credit_card".into(),
                    installments: Some(3),
                    installments_cost: Some("seller".into()),
                    voucher_type: Some("sodexo".into()),
                }),
                ttl_s: Some(120),
                expires_at_ms: Some(T0 + 300_000),
            }),
        ),
        (
            // MLA: a ticket number, no payment options, not printed.
            "charge_mla_ticket",
            CommandBody::Charge(ChargeCmd {
                terminal: TERM_2.into(),
                amount: Cents(250_075),
                description: None,
                external_reference: None,
                ticket_number: Some("0042".into()),
                print_on_terminal: false,
                payment: None,
                ttl_s: Some(45),
                expires_at_ms: None,
            }),
        ),
        (
            // MLB voucher: the payment object with only some options.
            "charge_mlb_voucher",
            CommandBody::Charge(ChargeCmd {
                terminal: TERM_1.into(),
                amount: Cents(3990),
                description: Some("Almoço".into()),
                external_reference: Some("lunch-77".into()),
                ticket_number: None,
                print_on_terminal: true,
                payment: Some(MlbPayment {
                    kind: "voucher_card".into(),
                    installments: None,
                    installments_cost: None,
                    voucher_type: Some("alelo".into()),
                }),
                ttl_s: None,
                expires_at_ms: Some(T0 + 90_000),
            }),
        ),
        (
            // Every optional field absent.
            "charge_minimal",
            CommandBody::Charge(ChargeCmd {
                terminal: TERM_1.into(),
                amount: Cents(500),
                description: None,
                external_reference: None,
                ticket_number: None,
                print_on_terminal: true,
                payment: None,
                ttl_s: None,
                expires_at_ms: None,
            }),
        ),
        (
            "refund_api_partial",
            CommandBody::Refund(RefundCmd {
                target: "sale-1042".into(),
                amount: Some(Cents(500)),
                via: Via::Api,
                ttl_s: Some(60),
                expires_at_ms: Some(T0 + 3_600_000),
            }),
        ),
        (
            "refund_api_full",
            CommandBody::Refund(RefundCmd {
                target: "sale-1042".into(),
                amount: None,
                via: Via::Api,
                ttl_s: None,
                expires_at_ms: None,
            }),
        ),
        (
            "refund_terminal",
            CommandBody::Refund(RefundCmd {
                target: "sale-1050".into(),
                amount: Some(Cents(1500)),
                via: Via::Terminal,
                ttl_s: Some(90),
                expires_at_ms: None,
            }),
        ),
        (
            "cancel",
            CommandBody::Cancel {
                target: "sale-1045".into(),
            },
        ),
    ]
}

fn body(name: &str) -> CommandBody {
    bodies()
        .into_iter()
        .find(|(n, _)| *n == name)
        .map(|(_, b)| b)
        .unwrap_or_else(|| panic!("no body named {name}"))
}

/// A stored request: its fixture name, what it shows, the name of its body, and the value.
struct Case {
    name: &'static str,
    what: &'static str,
    body: &'static str,
    request: Request,
}

/// An event as stored (`last_event`): opaque bytes to the store, realistic here.
fn ev(request_id: &str, kind: &str, state: &str, seq: u32, extra: &str) -> Vec<u8> {
    let fin = matches!(
        state,
        "approved" | "declined" | "canceled" | "expired" | "failed" | "refunded" | "done"
    );
    format!(
        r#"{{"v":1,"request_id":"{request_id}","type":"{kind}","state":"{state}","final":{fin},"seq":{seq},"at":"2026-11-24T10:12:01.120Z"{extra}}}"#
    )
    .into_bytes()
}

fn reply(station: &str, correlation: Option<&[u8]>) -> Option<ReplyTo> {
    Some(ReplyTo {
        topic: format!("pos/{station}/replies"),
        correlation: correlation.map(<[u8]>::to_vec),
    })
}

/// A request with the given body; the rest is overwritten by each case.
fn request(station: &str, request_id: &str, body_name: &str, received_ms: i64) -> Request {
    Request {
        station: station.into(),
        request_id: request_id.into(),
        body: body(body_name),
        received_ms,
        reply: None,
        external_reference: None,
        progress: Progress::Cancel {
            target: String::new(),
            done: false,
        },
        seq: 1,
        last_event: Vec::new(),
        final_ms: None,
    }
}

/// A charge as `Charge::new` makes it (spelled out).
fn charge(amount: u64, received_ms: i64) -> Charge {
    Charge {
        amount: Cents(amount),
        deadline_ms: received_ms + 120_000,
        stage: Stage::Queued { reason: None },
        cancel_pending: false,
        next_at_ms: Some(received_ms + 120_000),
        attempts: 0,
        unreachable_since_ms: None,
        reported_unreachable: false,
        payment: None,
        intent: None,
        first_send_ms: None,
        sends: 0,
        reconcile_rounds: 0,
        search_next: false,
    }
}

/// A charge whose one create has been answered with `INTENT`.
fn sent_charge(amount: u64, received_ms: i64, stage: Stage) -> Charge {
    Charge {
        stage,
        next_at_ms: Some(received_ms + 3_000),
        intent: Some(INTENT.into()),
        first_send_ms: Some(received_ms + 150),
        sends: 1,
        ..charge(amount, received_ms)
    }
}

fn payment(status: &str, detail: Option<&str>) -> Option<PaymentSeen> {
    Some(PaymentSeen {
        id: PAYMENT.into(),
        status: status.into(),
        status_detail: detail.map(Into::into),
    })
}

#[allow(clippy::too_many_arguments)]
fn charge_case(
    name: &'static str,
    what: &'static str,
    request_id: &str,
    body_name: &'static str,
    received_ms: i64,
    ch: Charge,
    seq: u32,
    event_state: &str,
    final_ms: Option<i64>,
) -> Case {
    let mut r = request("kiosk-1", request_id, body_name, received_ms);
    // The station's reference, or the one the agent derives.
    r.external_reference = match &r.body {
        CommandBody::Charge(c) => c.external_reference.clone(),
        _ => None,
    }
    .or_else(|| Some(derived_ref("kiosk-1", request_id)));
    let terminal = match &r.body {
        CommandBody::Charge(c) => c.terminal.clone(),
        _ => String::new(),
    };
    // The amount as the contract writes it, by hand (not through `Cents`).
    let amount = format!("{}.{:02}", ch.amount.0 / 100, ch.amount.0 % 100);
    let extra = match &ch.intent {
        Some(i) => format!(r#","terminal":"{terminal}","amount":"{amount}","intent_id":"{i}""#),
        None => format!(r#","terminal":"{terminal}","amount":"{amount}""#),
    };
    r.progress = Progress::Charge(ch);
    r.seq = seq;
    r.last_event = ev(request_id, "charge", event_state, seq, &extra);
    r.final_ms = final_ms;
    Case {
        name,
        what,
        body: body_name,
        request: r,
    }
}

fn charge_cases() -> Vec<Case> {
    let t = T0;
    let mut out = vec![
        {
            // The freshly accepted charge: a reply topic with binary correlation data.
            let mut c = charge_case(
                "charge_queued",
                "charge, Stage::Queued { reason: None }, just accepted; reply-to with binary correlation; station reference; every optional body field",
                "sale-1042",
                "charge_all_fields",
                t,
                charge(1500, t),
                1,
                "accepted",
                None,
            );
            c.request.reply = reply("kiosk-1", Some(&[0x00, 0x01, 0x7f, 0x80, 0xfe, 0xff]));
            c
        },
        {
            let mut c = charge_case(
                "charge_queued_terminal_busy",
                "charge, Stage::Queued { reason: Some(TerminalBusy) } on the second terminal; reply-to without correlation; derived reference",
                "sale-1043",
                "charge_mla_ticket",
                t + 40,
                charge(250_075, t + 40),
                2,
                "waiting",
                None,
            );
            c.request.reply = reply("kiosk-1", None);
            c
        },
        charge_case(
            "charge_queued_api_unreachable",
            "charge, Stage::Queued { reason: Some(ApiUnreachable) }: attempts, unreachable_since_ms, reported_unreachable set",
            "sale-1044",
            "charge_minimal",
            t - 5_000,
            Charge {
                stage: Stage::Queued {
                    reason: Some(WaitReason::ApiUnreachable),
                },
                attempts: 4,
                unreachable_since_ms: Some(t - 4_800),
                reported_unreachable: true,
                next_at_ms: Some(t + 8_000),
                ..charge(500, t - 5_000)
            },
            2,
            "waiting",
            None,
        ),
        charge_case(
            "charge_queued_rate_limited",
            "charge, Stage::Queued { reason: Some(RateLimited) }, back in the queue after a reconcile round that found nothing",
            "sale-1046",
            "charge_mlb_voucher",
            t + 10,
            Charge {
                stage: Stage::Queued {
                    reason: Some(WaitReason::RateLimited),
                },
                attempts: 1,
                next_at_ms: Some(t + 1_510),
                first_send_ms: Some(t + 200),
                sends: 1,
                ..charge(3990, t + 10)
            },
            3,
            "waiting",
            None,
        ),
        charge_case(
            "charge_queued_unauthorized",
            "charge, Stage::Queued { reason: Some(Unauthorized) }",
            "sale-1047",
            "charge_minimal",
            t + 20,
            Charge {
                stage: Stage::Queued {
                    reason: Some(WaitReason::Unauthorized),
                },
                attempts: 2,
                unreachable_since_ms: Some(t + 25),
                next_at_ms: Some(t + 30_020),
                ..charge(500, t + 20)
            },
            2,
            "waiting",
            None,
        ),
        charge_case(
            "charge_send_begun",
            "charge, Stage::SendBegun: written ahead of the create; a cancel pending",
            "sale-1048",
            "charge_minimal",
            t + 30,
            Charge {
                stage: Stage::SendBegun { at_ms: t + 180 },
                cancel_pending: true,
                next_at_ms: Some(t + 10_180),
                first_send_ms: Some(t + 180),
                sends: 1,
                ..charge(500, t + 30)
            },
            1,
            "accepted",
            None,
        ),
        charge_case(
            "charge_reconciling",
            "charge, Stage::Reconciling after an ambiguous re-create: sends 2, reconcile_rounds 1",
            "sale-1049",
            "charge_mla_ticket",
            t + 50,
            Charge {
                stage: Stage::Reconciling { since_ms: t + 9_000 },
                attempts: 2,
                next_at_ms: Some(t + 11_000),
                first_send_ms: Some(t + 300),
                sends: 2,
                reconcile_rounds: 1,
                ..charge(250_075, t + 50)
            },
            2,
            "waiting",
            None,
        ),
    ];
    let live = [
        (
            "charge_live_open",
            "charge, Stage::Live { remote: Open, cancel: None }",
            "sale-1051",
            Remote::Open,
            CancelMark::None,
            "sent",
        ),
        (
            "charge_live_on_terminal_station_cancel",
            "charge, Stage::Live { remote: OnTerminal, cancel: Station }",
            "sale-1052",
            Remote::OnTerminal,
            CancelMark::Station,
            "on_terminal",
        ),
        (
            "charge_live_open_timeout_cancel",
            "charge, Stage::Live { remote: Open, cancel: Timeout }",
            "sale-1053",
            Remote::Open,
            CancelMark::Timeout,
            "sent",
        ),
        (
            "charge_live_processing",
            "charge, Stage::Live { remote: Processing, cancel: None }",
            "sale-1054",
            Remote::Processing,
            CancelMark::None,
            "processing",
        ),
    ];
    for (i, (name, what, id, remote, cancel, state)) in live.into_iter().enumerate() {
        let rx = t + 100 + i as i64;
        out.push(charge_case(
            name,
            what,
            id,
            "charge_minimal",
            rx,
            sent_charge(
                500,
                rx,
                Stage::Live {
                    intent_id: INTENT.into(),
                    remote,
                    sent_ms: rx + 400,
                    cancel,
                },
            ),
            2 + i as u32,
            state,
            None,
        ));
    }
    out.extend([
        charge_case(
            "charge_confirming",
            "charge, Stage::Confirming with a payment id; payment seen in_process",
            "sale-1055",
            "charge_mla_ticket",
            t + 200,
            Charge {
                payment: payment("in_process", Some("pending_contingency")),
                attempts: 1,
                ..sent_charge(
                    250_075,
                    t + 200,
                    Stage::Confirming {
                        intent_id: INTENT.into(),
                        payment_id: Some(PAYMENT.into()),
                        since_ms: t + 20_000,
                    },
                )
            },
            4,
            "processing",
            None,
        ),
        charge_case(
            "charge_confirming_no_payment_id",
            "charge, Stage::Confirming without a payment id",
            "sale-1056",
            "charge_minimal",
            t + 210,
            sent_charge(
                500,
                t + 210,
                Stage::Confirming {
                    intent_id: INTENT.into(),
                    payment_id: None,
                    since_ms: t + 21_000,
                },
            ),
            3,
            "on_terminal",
            None,
        ),
        charge_case(
            "charge_needs_attention_intent",
            "charge, Stage::NeedsAttention with intent and payment ids",
            "sale-1057",
            "charge_minimal",
            t + 220,
            Charge {
                payment: payment("in_process", None),
                attempts: 7,
                unreachable_since_ms: Some(t + 60_000),
                ..sent_charge(
                    500,
                    t + 220,
                    Stage::NeedsAttention {
                        intent_id: Some(INTENT.into()),
                        payment_id: Some(PAYMENT.into()),
                        since_ms: t + 90_000,
                    },
                )
            },
            5,
            "needs_attention",
            None,
        ),
        charge_case(
            "charge_needs_attention_no_intent",
            "charge, Stage::NeedsAttention without ids: search_next, reconcile_rounds 5",
            "sale-1058",
            "charge_minimal",
            t + 230,
            Charge {
                stage: Stage::NeedsAttention {
                    intent_id: None,
                    payment_id: None,
                    since_ms: t + 95_000,
                },
                next_at_ms: Some(t + 125_000),
                first_send_ms: Some(t + 400),
                sends: 3,
                reconcile_rounds: 5,
                search_next: true,
                ..charge(500, t + 230)
            },
            3,
            "needs_attention",
            None,
        ),
    ]);
    let done = [
        (
            "charge_done_approved",
            "charge, Stage::Done { Approved } with the payment seen approved",
            "sale-1060",
            State::Approved,
            "approved",
            payment("approved", Some("accredited")),
            true,
        ),
        (
            "charge_done_declined",
            "charge, Stage::Done { Declined } with the payment seen rejected",
            "sale-1061",
            State::Declined,
            "declined",
            payment("rejected", Some("cc_rejected_insufficient_amount")),
            true,
        ),
        (
            "charge_done_canceled",
            "charge, Stage::Done { Canceled }",
            "sale-1062",
            State::Canceled,
            "canceled",
            None,
            true,
        ),
        (
            "charge_done_expired",
            "charge, Stage::Done { Expired }, never sent",
            "sale-1063",
            State::Expired,
            "expired",
            None,
            false,
        ),
        (
            "charge_done_failed",
            "charge, Stage::Done { Failed }",
            "sale-1064",
            State::Failed,
            "failed",
            None,
            true,
        ),
    ];
    for (i, (name, what, id, state, event_state, pay, sent)) in done.into_iter().enumerate() {
        let rx = t - 200_000 + 1_000 * i as i64;
        let base = if sent {
            sent_charge(500, rx, Stage::Done { state })
        } else {
            Charge {
                stage: Stage::Done { state },
                ..charge(500, rx)
            }
        };
        out.push(charge_case(
            name,
            what,
            id,
            "charge_minimal",
            rx,
            Charge {
                payment: pay,
                next_at_ms: None,
                ..base
            },
            4 + i as u32,
            event_state,
            Some(rx + 30_000 + i as i64),
        ));
    }
    out
}

fn refund(via: Via, terminal: Option<&str>, stage: RefundStage, received_ms: i64) -> Refund {
    Refund {
        via,
        amount: Cents(500),
        payment_id: PAYMENT.into(),
        terminal: terminal.map(Into::into),
        // Set by `refund_case`, from the request id.
        idempotency_key: String::new(),
        deadline_ms: received_ms + 60_000,
        stage,
        cancel_pending: false,
        next_at_ms: Some(received_ms + 2_000),
        attempts: 0,
        unreachable_since_ms: None,
        reported: None,
        may_exist: false,
        remote_id: None,
        payment: None,
    }
}

#[allow(clippy::too_many_arguments)]
fn refund_case(
    name: &'static str,
    what: &'static str,
    request_id: &str,
    body_name: &'static str,
    received_ms: i64,
    rf: Refund,
    seq: u32,
    event_state: &str,
    final_ms: Option<i64>,
) -> Case {
    let mut r = request("kiosk-2", request_id, body_name, received_ms);
    r.reply = reply("kiosk-2", Some(b"rf-corr-01"));
    r.progress = Progress::Refund(Refund {
        idempotency_key: refund_key("kiosk-2", request_id),
        ..rf
    });
    r.seq = seq;
    r.last_event = ev(
        request_id,
        "refund",
        event_state,
        seq,
        r#","amount":"5.00""#,
    );
    r.final_ms = final_ms;
    Case {
        name,
        what,
        body: body_name,
        request: r,
    }
}

fn refund_cases() -> Vec<Case> {
    let t = T0 + 1_000_000;
    let api = |stage| refund(Via::Api, None, stage, t);
    let term = |stage| refund(Via::Terminal, Some(TERM_2), stage, t);
    let live = |remote, cancel| RefundStage::Live {
        intent_id: REFUND_INTENT.into(),
        remote,
        sent_ms: t + 500,
        cancel,
    };
    let mut out = vec![
        refund_case(
            "refund_api_queued",
            "api refund, Stage::Queued: reported RateLimited, attempts, unreachable_since_ms",
            "refund-7",
            "refund_api_partial",
            t,
            Refund {
                attempts: 2,
                unreachable_since_ms: Some(t + 10),
                reported: Some(WaitReason::RateLimited),
                ..api(RefundStage::Queued)
            },
            2,
            "waiting",
            None,
        ),
        refund_case(
            "refund_api_send_begun",
            "api refund, Stage::SendBegun",
            "refund-8",
            "refund_api_full",
            t + 1,
            api(RefundStage::SendBegun { at_ms: t + 50 }),
            1,
            "accepted",
            None,
        ),
        refund_case(
            "refund_api_confirming",
            "api refund, Stage::Confirming: may_exist, remote_id, cancel_pending, reported ApiUnreachable",
            "refund-9",
            "refund_api_partial",
            t + 2,
            Refund {
                cancel_pending: true,
                may_exist: true,
                remote_id: Some("1234567890".into()),
                reported: Some(WaitReason::ApiUnreachable),
                unreachable_since_ms: Some(t + 700),
                attempts: 3,
                ..api(RefundStage::Confirming { since_ms: t + 600 })
            },
            2,
            "waiting",
            None,
        ),
        refund_case(
            "refund_api_done_refunded",
            "api refund, Stage::Done { Refunded } with the refund id",
            "refund-10",
            "refund_api_partial",
            t - 100_000,
            Refund {
                may_exist: true,
                remote_id: Some("1234567891".into()),
                next_at_ms: None,
                ..refund(
                    Via::Api,
                    None,
                    RefundStage::Done {
                        state: State::Refunded,
                    },
                    t - 100_000,
                )
            },
            2,
            "refunded",
            Some(t - 99_000),
        ),
        refund_case(
            "refund_api_done_failed",
            "api refund, Stage::Done { Failed }",
            "refund-11",
            "refund_api_full",
            t - 90_000,
            Refund {
                may_exist: true,
                next_at_ms: None,
                ..refund(
                    Via::Api,
                    None,
                    RefundStage::Done {
                        state: State::Failed,
                    },
                    t - 90_000,
                )
            },
            2,
            "failed",
            Some(t - 89_000),
        ),
        refund_case(
            "refund_terminal_queued",
            "terminal refund, Stage::Queued behind a busy terminal (reported TerminalBusy)",
            "refund-20",
            "refund_terminal",
            t + 10,
            Refund {
                reported: Some(WaitReason::TerminalBusy),
                next_at_ms: Some(t + 60_010),
                ..refund(Via::Terminal, Some(TERM_2), RefundStage::Queued, t + 10)
            },
            2,
            "waiting",
            None,
        ),
        refund_case(
            "refund_terminal_send_begun",
            "terminal refund, Stage::SendBegun",
            "refund-21",
            "refund_terminal",
            t + 11,
            term(RefundStage::SendBegun { at_ms: t + 60 }),
            1,
            "accepted",
            None,
        ),
    ];
    let lives = [
        (
            "refund_terminal_live_open",
            "terminal refund, Stage::Live { remote: Open, cancel: None }",
            "refund-22",
            Remote::Open,
            CancelMark::None,
            "sent",
        ),
        (
            "refund_terminal_live_on_terminal_station_cancel",
            "terminal refund, Stage::Live { remote: OnTerminal, cancel: Station }",
            "refund-23",
            Remote::OnTerminal,
            CancelMark::Station,
            "on_terminal",
        ),
        (
            "refund_terminal_live_open_timeout_cancel",
            "terminal refund, Stage::Live { remote: Open, cancel: Timeout }",
            "refund-24",
            Remote::Open,
            CancelMark::Timeout,
            "sent",
        ),
        (
            "refund_terminal_live_processing",
            "terminal refund, Stage::Live { remote: Processing, cancel: None }",
            "refund-25",
            Remote::Processing,
            CancelMark::None,
            "processing",
        ),
    ];
    for (i, (name, what, id, remote, cancel, state)) in lives.into_iter().enumerate() {
        out.push(refund_case(
            name,
            what,
            id,
            "refund_terminal",
            t + 20 + i as i64,
            Refund {
                remote_id: Some(REFUND_INTENT.into()),
                ..term(live(remote, cancel))
            },
            2 + i as u32,
            state,
            None,
        ));
    }
    out.extend([
        refund_case(
            "refund_terminal_checking",
            "terminal refund, Stage::Checking with the payment seen",
            "refund-26",
            "refund_terminal",
            t + 30,
            Refund {
                remote_id: Some(REFUND_INTENT.into()),
                payment: payment("approved", Some("accredited")),
                ..term(RefundStage::Checking {
                    intent_id: REFUND_INTENT.into(),
                    since_ms: t + 9_000,
                })
            },
            4,
            "processing",
            None,
        ),
        refund_case(
            "refund_terminal_needs_attention_intent",
            "terminal refund, Stage::NeedsAttention with an intent id; reported Unauthorized",
            "refund-27",
            "refund_terminal",
            t + 31,
            Refund {
                remote_id: Some(REFUND_INTENT.into()),
                reported: Some(WaitReason::Unauthorized),
                attempts: 6,
                ..term(RefundStage::NeedsAttention {
                    intent_id: Some(REFUND_INTENT.into()),
                    since_ms: t + 12_000,
                })
            },
            5,
            "needs_attention",
            None,
        ),
        refund_case(
            "refund_terminal_needs_attention_no_intent",
            "terminal refund, Stage::NeedsAttention without an intent id",
            "refund-28",
            "refund_terminal",
            t + 32,
            Refund {
                may_exist: true,
                ..term(RefundStage::NeedsAttention {
                    intent_id: None,
                    since_ms: t + 13_000,
                })
            },
            2,
            "needs_attention",
            None,
        ),
    ]);
    let done = [
        (
            "refund_terminal_done_refunded",
            "terminal refund, Stage::Done { Refunded } with the payment seen refunded",
            "refund-30",
            State::Refunded,
            "refunded",
            payment("refunded", Some("refunded")),
        ),
        (
            "refund_terminal_done_expired",
            "terminal refund, Stage::Done { Expired }",
            "refund-31",
            State::Expired,
            "expired",
            None,
        ),
        (
            "refund_terminal_done_canceled",
            "terminal refund, Stage::Done { Canceled }",
            "refund-32",
            State::Canceled,
            "canceled",
            None,
        ),
    ];
    for (i, (name, what, id, state, event_state, pay)) in done.into_iter().enumerate() {
        let rx = t - 50_000 + 100 * i as i64;
        out.push(refund_case(
            name,
            what,
            id,
            "refund_terminal",
            rx,
            Refund {
                remote_id: pay.as_ref().map(|_| REFUND_INTENT.to_string()),
                payment: pay,
                next_at_ms: None,
                ..refund(Via::Terminal, Some(TERM_2), RefundStage::Done { state }, rx)
            },
            3 + i as u32,
            event_state,
            Some(rx + 20_000),
        ));
    }
    out
}

fn cancel_cases() -> Vec<Case> {
    let t = T0 + 2_000_000;
    let mk = |name, what, id: &str, done: bool, final_ms: Option<i64>| {
        let mut r = request("kiosk-2", id, "cancel", t);
        r.reply = reply("kiosk-2", Some(b"c"));
        r.progress = Progress::Cancel {
            target: "sale-1045".into(),
            done,
        };
        r.seq = if done { 2 } else { 1 };
        let state = if done { "done" } else { "accepted" };
        r.last_event = ev(id, "cancel", state, r.seq, "");
        r.final_ms = final_ms;
        Case {
            name,
            what,
            body: "cancel",
            request: r,
        }
    };
    vec![
        mk(
            "cancel_open",
            "cancel, Progress::Cancel { done: false }",
            "cancel-1",
            false,
            None,
        ),
        mk(
            "cancel_done",
            "cancel, Progress::Cancel { done: true }, final",
            "cancel-2",
            true,
            Some(t + 700),
        ),
    ]
}

fn cases() -> Vec<Case> {
    let mut out = charge_cases();
    out.extend(refund_cases());
    out.extend(cancel_cases());
    out
}

/// Outbox entries of format 1 (written by 0.1 agents, the topic rendered by the engine):
/// fixture name, what, id, value as read today (the topic kept as `Address::Topic`).
/// Decode-only since format 2.
fn outbox_cases() -> Vec<(&'static str, &'static str, u64, Outgoing)> {
    vec![
        (
            "event_with_correlation",
            "outbox entry: an event to a Response Topic with Correlation Data",
            7,
            Outgoing {
                address: Address::Topic("pos/kiosk-1/replies".into()),
                payload: ev(
                    "sale-1042",
                    "charge",
                    "sent",
                    2,
                    &format!(r#","terminal":"{TERM_1}","amount":"15.00","intent_id":"{INTENT}""#),
                ),
                correlation: Some(vec![0x00, 0x01, 0x7f, 0x80, 0xfe, 0xff]),
            },
        ),
        (
            "event_without_correlation",
            "outbox entry: an event to the station's event topic, no Correlation Data",
            300,
            Outgoing {
                address: Address::Topic("pointgate/station/kiosk-2/evt".into()),
                payload: ev("refund-7", "refund", "waiting", 2, r#","reason":"rate_limited""#),
                correlation: None,
            },
        ),
        (
            "empty_payload",
            "outbox entry: an empty payload and empty (but present) Correlation Data, under a large id",
            0x0102_0304_0506_0708,
            Outgoing {
                address: Address::Topic("pointgate/station/kiosk-1/evt".into()),
                payload: Vec::new(),
                correlation: Some(Vec::new()),
            },
        ),
    ]
}

/// Outbox entries of format 2 (the destination as an `Address`, rendered by the station
/// link): what today's code writes, the same entries as format 1 with the topic read
/// back as what it names. Fixtures under `v2/outbox/`.
fn outbox_cases_v2() -> Vec<(&'static str, &'static str, u64, Outgoing)> {
    outbox_cases()
        .into_iter()
        .map(|(name, what, id, mut o)| {
            if let Address::Topic(topic) = &o.address {
                let station = topic
                    .strip_prefix("pointgate/station/")
                    .and_then(|t| t.strip_suffix("/evt"));
                o.address = match station {
                    Some(station) => Address::Station(station.into()),
                    None => Address::Reply(topic.clone()),
                };
            }
            (name, what, id, o)
        })
        .collect()
}

/// `refs` written with the cases: every request with an external reference owns it.
fn refs(cases: &[Case]) -> Vec<(String, Vec<u8>)> {
    cases
        .iter()
        .filter_map(|c| {
            c.request
                .external_reference
                .clone()
                .map(|r| (r, raw_key(&c.request.station, &c.request.request_id)))
        })
        .collect()
}

/// Derived identifiers: (name, today's value).
fn derived_table() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (store, station, id) in [
        (STORE_ID, "kiosk-1", "sale-1042"),
        (STORE_ID, "kiosk-1", "sale-1043"),
        (STORE_ID, "kiosk-2", "sale-1042"),
        ("", "", ""),
        ("ab", "c", "r"),
        ("a", "bc", "r"),
    ] {
        out.push((
            format!("derived_reference({store:?},{station:?},{id:?})"),
            derived_reference(store, station, id),
        ));
    }
    for id in [
        "sale-1042",
        "pos.7:ticket_0042",
        "a-very-long-request-id-0123456789",
        "x",
    ] {
        out.push((format!("derived_ticket({id:?})"), derived_ticket(id)));
    }
    for (store, station, id) in [
        (STORE_ID, "kiosk-1", "refund-7"),
        (STORE_ID, "kiosk-1", "sale-1042"),
        (STORE_ID, "kiosk-2", "refund-7"),
        ("ab", "c", "r"),
    ] {
        out.push((
            format!("idempotency_key({store:?},{station:?},{id:?})"),
            idempotency_key(store, station, id),
        ));
    }
    out
}

// ---------------------------------------------------------------------------------------
// The layout of keys, written out here (not taken from the store).
// ---------------------------------------------------------------------------------------

/// `requests`, `dedup`, `open`: `<station> 0x00 <request_id>`.
fn raw_key(station: &str, request_id: &str) -> Vec<u8> {
    let mut k = station.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(request_id.as_bytes());
    k
}

/// `queue`: `<terminal> 0x00 <received_ms u64 BE> <request key>`.
fn raw_queue_key(terminal: &str, received_ms: i64, key: &[u8]) -> Vec<u8> {
    let mut k = terminal.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(&(received_ms as u64).to_be_bytes());
    k.extend_from_slice(key);
    k
}

/// `done`: `<final_ms u64 BE> <request key>`.
fn raw_done_key(final_ms: i64, key: &[u8]) -> Vec<u8> {
    let mut k = (final_ms as u64).to_be_bytes().to_vec();
    k.extend_from_slice(key);
    k
}

/// The terminal a case queues on while open (by hand: a charge's, a terminal refund's).
fn queue_terminal(r: &Request) -> Option<String> {
    match (&r.body, &r.progress) {
        (CommandBody::Charge(c), _) => Some(c.terminal.clone()),
        (_, Progress::Refund(rf)) => rf.terminal.clone(),
        _ => None,
    }
}

type TreeDump = BTreeMap<Vec<u8>, Vec<u8>>;

/// The index trees the cases must produce: tree name → entries.
fn expected_indexes(cases: &[Case]) -> BTreeMap<&'static str, TreeDump> {
    let mut open = TreeDump::new();
    let mut queue = TreeDump::new();
    let mut done = TreeDump::new();
    for c in cases {
        let r = &c.request;
        let k = raw_key(&r.station, &r.request_id);
        match r.final_ms {
            None => {
                open.insert(k.clone(), Vec::new());
                if let Some(t) = queue_terminal(r) {
                    queue.insert(raw_queue_key(&t, r.received_ms, &k), Vec::new());
                }
            }
            Some(f) => {
                done.insert(raw_done_key(f, &k), Vec::new());
            }
        }
    }
    let refs: TreeDump = refs(cases)
        .into_iter()
        .map(|(r, k)| (r.into_bytes(), k))
        .collect();
    BTreeMap::from([
        ("open", open),
        ("queue", queue),
        ("done", done),
        ("refs", refs),
    ])
}

/// Example keys pinned as fixtures (`keys/*.hex`): name, what, bytes by hand.
fn key_examples() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let k = raw_key("kiosk-1", "sale-1042");
    let rf = raw_key("kiosk-2", "refund-20");
    vec![
        (
            "request",
            "key of requests/dedup/open: kiosk-1 0x00 sale-1042",
            k.clone(),
        ),
        (
            "queue_charge",
            "queue key: PAX_A910__0001 0x00 received_ms(u64 BE) kiosk-1 0x00 sale-1042",
            raw_queue_key(TERM_1, T0, &k),
        ),
        (
            "queue_refund",
            "queue key of a terminal refund: PAX_A910__0002 0x00 received_ms(u64 BE) kiosk-2 0x00 refund-20",
            raw_queue_key(TERM_2, T0 + 1_000_010, &rf),
        ),
        (
            "done",
            "done key: final_ms(u64 BE) kiosk-1 0x00 sale-1060",
            raw_done_key(T0 - 200_000 + 30_000, &raw_key("kiosk-1", "sale-1060")),
        ),
        ("refs", "refs key: the reference in UTF-8 (sale-1042)", b"sale-1042".to_vec()),
        (
            "outbox",
            "outbox key: id 0x0102030405060708 as u64 BE",
            0x0102_0304_0506_0708u64.to_be_bytes().to_vec(),
        ),
    ]
}

// ---------------------------------------------------------------------------------------
// Fixture files.
// ---------------------------------------------------------------------------------------

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/store/v1")
}

fn generating() -> bool {
    std::env::var("POINTGATE_WRITE_FIXTURES").as_deref() == Ok("1")
}

/// Serialises fixture writing (generator mode) with the tests that read them.
static FIXTURES: Mutex<()> = Mutex::new(());

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Hex text: `#` lines are comments, whitespace is ignored.
fn parse_hex(text: &str, what: &Path) -> Vec<u8> {
    let digits: Vec<u8> = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .flat_map(|l| l.bytes().filter(|b| !b.is_ascii_whitespace()))
        .collect();
    assert!(
        digits.len() % 2 == 0,
        "{}: odd number of hex digits",
        what.display()
    );
    digits
        .chunks(2)
        .map(|p| {
            let s = std::str::from_utf8(p).unwrap_or("??");
            u8::from_str_radix(s, 16)
                .unwrap_or_else(|_| panic!("{}: not hex: {s:?}", what.display()))
        })
        .collect()
}

fn render_hex(what: &str, bytes: &[u8]) -> String {
    let mut s = format!("# {what}\n# {} bytes, format version 1\n", bytes.len());
    for line in bytes.chunks(32) {
        s.push_str(&to_hex(line));
        s.push('\n');
    }
    if bytes.is_empty() {
        s.push('\n');
    }
    s
}

/// The bytes of a hex fixture; panics with a clear message when it is missing.
fn fixture(rel: &str) -> Vec<u8> {
    let path = fixture_dir().join(rel);
    match std::fs::read_to_string(&path) {
        Ok(t) => parse_hex(&t, &path),
        Err(e) => panic!(
            "fixture {} is missing ({e}): fixtures are committed; \
             POINTGATE_WRITE_FIXTURES=1 writes a new one from today's code",
            path.display()
        ),
    }
}

/// Compare `actual` with the fixture `rel`; write it if missing in generator mode.
fn pin(failures: &mut Vec<String>, rel: &str, what: &str, actual: &[u8]) {
    let path = fixture_dir().join(rel);
    match std::fs::read_to_string(&path) {
        Ok(t) => {
            let expected = parse_hex(&t, &path);
            if expected != actual {
                failures.push(format!(
                    "{rel} ({what}): today's code writes different bytes\n  fixture: {}\n  written: {}",
                    to_hex(&expected),
                    to_hex(actual)
                ));
            }
        }
        Err(_) if generating() => {
            std::fs::create_dir_all(path.parent().expect("fixture dir")).expect("mkdir");
            std::fs::write(&path, render_hex(what, actual)).expect("write fixture");
            eprintln!("wrote new fixture {rel}");
        }
        Err(e) => failures.push(format!(
            "{rel} ({what}): missing ({e}); POINTGATE_WRITE_FIXTURES=1 writes it from today's code"
        )),
    }
}

/// A text table: `name = value` lines, `#` comments.
fn read_table(rel: &str) -> Option<BTreeMap<String, String>> {
    let text = std::fs::read_to_string(fixture_dir().join(rel)).ok()?;
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (k, v) = line
            .split_once(" = ")
            .unwrap_or_else(|| panic!("{rel}: not `name = value`: {line:?}"));
        out.insert(k.to_string(), v.to_string());
    }
    Some(out)
}

/// Compare a table of today's values with its fixture: every entry must match, and the
/// fixture may hold nothing the test does not compute. Missing entries are appended in
/// generator mode.
fn pin_table(failures: &mut Vec<String>, rel: &str, header: &str, actual: &[(String, String)]) {
    let path = fixture_dir().join(rel);
    let pinned = read_table(rel);
    if pinned.is_none() && !generating() {
        failures.push(format!(
            "{rel}: missing; POINTGATE_WRITE_FIXTURES=1 writes it from today's code"
        ));
        return;
    }
    let pinned = pinned.unwrap_or_default();
    let mut append = String::new();
    for (k, v) in actual {
        match pinned.get(k) {
            Some(p) if p == v => {}
            Some(p) => failures.push(format!("{rel}: {k}\n  fixture: {p}\n  today:   {v}")),
            None if generating() => append.push_str(&format!("{k} = {v}\n")),
            None => failures.push(format!(
                "{rel}: no entry for {k}; POINTGATE_WRITE_FIXTURES=1 appends it"
            )),
        }
    }
    let known: BTreeSet<&String> = actual.iter().map(|(k, _)| k).collect();
    for k in pinned.keys().filter(|k| !known.contains(k)) {
        failures.push(format!(
            "{rel}: {k} is pinned but no test computes it (keep the case)"
        ));
    }
    if !append.is_empty() {
        let mut text = std::fs::read_to_string(&path).unwrap_or_else(|_| header.to_string());
        text.push_str(&append);
        std::fs::create_dir_all(path.parent().expect("fixture dir")).expect("mkdir");
        std::fs::write(&path, text).expect("write table");
        eprintln!("appended to {rel}");
    }
}

fn report(failures: Vec<String>) {
    assert!(
        failures.is_empty(),
        "{} mismatch(es) with the golden fixtures (a format change adds a new fixture and a \
         record version; it never rewrites one):\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

// ---------------------------------------------------------------------------------------
// Today's writes.
// ---------------------------------------------------------------------------------------

const TREES: [&str; 8] = [
    "requests", "dedup", "queue", "done", "open", "refs", "outbox", "meta",
];

/// Every tree of a store that wrote all the cases, read raw with sled.
fn written() -> &'static BTreeMap<&'static str, TreeDump> {
    static WRITTEN: OnceLock<BTreeMap<&'static str, TreeDump>> = OnceLock::new();
    WRITTEN.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = Store::open(dir.path()).expect("open store");
            let cases = cases();
            store.set_boot_id(BOOT_ID).expect("boot id");
            let w = Writes {
                requests: cases.iter().map(|c| c.request.clone()).collect(),
                refs: refs(&cases),
                outbox: outbox_cases_v2()
                    .into_iter()
                    .map(|(_, _, id, o)| (id, o))
                    .collect(),
                now_ms: Some(NOW_MS),
            };
            store.write(&w).expect("write");
            store.sync().expect("sync");
        }
        let db = after_lock(|| sled::open(dir.path()), "sled open");
        TREES
            .iter()
            .map(|name| {
                let tree = db.open_tree(name).expect("tree");
                let dump = tree
                    .iter()
                    .map(|kv| {
                        let (k, v) = kv.expect("read");
                        (k.to_vec(), v.to_vec())
                    })
                    .collect();
                (*name, dump)
            })
            .collect()
    })
}

/// Compare today's writes with every fixture (writing missing ones in generator mode).
fn check_encoding() -> Vec<String> {
    let _guard = FIXTURES.lock().unwrap_or_else(|e| e.into_inner());
    let mut failures = Vec::new();
    let trees = written();
    let cases = cases();

    // Record values.
    for c in &cases {
        let k = raw_key(&c.request.station, &c.request.request_id);
        let whats = [
            ("requests", format!("requests value: {}", c.what)),
            (
                "dedup",
                format!(
                    "dedup value: content_hash of body `{}` and received_ms {}, of requests/{}.hex",
                    c.body, c.request.received_ms, c.name
                ),
            ),
        ];
        for (tree, what) in whats {
            match trees[tree].get(&k) {
                Some(v) => pin(&mut failures, &format!("{tree}/{}.hex", c.name), &what, v),
                None => failures.push(format!("{tree}: nothing written under {}", c.name)),
            }
        }
    }
    for (name, what, id, _) in outbox_cases_v2() {
        match trees["outbox"].get(id.to_be_bytes().as_slice()) {
            Some(v) => pin(&mut failures, &format!("../v2/outbox/{name}.hex"), what, v),
            None => failures.push(format!("outbox: nothing written under id {id}")),
        }
    }
    for (name, what) in [
        (
            "format",
            "meta value of b\"format\": the format version, one byte",
        ),
        (
            "boot_id",
            "meta value of b\"boot_id\": the boot id in UTF-8",
        ),
        (
            "last_ms",
            "meta value of b\"last_ms\": the batch time, i64 BE",
        ),
    ] {
        // Format 2 raised only the format byte; the other meta values are as in format 1.
        let rel = match name {
            "format" => "../v2/meta/format.hex".to_string(),
            _ => format!("meta/{name}.hex"),
        };
        match trees["meta"].get(name.as_bytes()) {
            Some(v) => pin(&mut failures, &rel, what, v),
            None => failures.push(format!("meta: no {name}")),
        }
    }

    // Key layouts: the example keys, then every tree's key set.
    for (name, what, bytes) in key_examples() {
        pin(&mut failures, &format!("keys/{name}.hex"), what, &bytes);
    }
    let keys: BTreeSet<Vec<u8>> = cases
        .iter()
        .map(|c| raw_key(&c.request.station, &c.request.request_id))
        .collect();
    for tree in ["requests", "dedup"] {
        let got: BTreeSet<Vec<u8>> = trees[tree].keys().cloned().collect();
        if got != keys {
            failures.push(format!(
                "{tree}: keys are not `<station> 0x00 <request_id>`"
            ));
        }
    }
    for (tree, expected) in expected_indexes(&cases) {
        if trees[tree] != expected {
            failures.push(format!(
                "{tree}: the index differs from the documented layout\n  expected: {:?}\n  written:  {:?}",
                expected.keys().map(|k| to_hex(k)).collect::<Vec<_>>(),
                trees[tree].keys().map(|k| to_hex(k)).collect::<Vec<_>>()
            ));
        }
    }
    let outbox_keys: BTreeSet<Vec<u8>> = outbox_cases_v2()
        .iter()
        .map(|(_, _, id, _)| id.to_be_bytes().to_vec())
        .collect();
    if trees["outbox"].keys().cloned().collect::<BTreeSet<_>>() != outbox_keys {
        failures.push("outbox: keys are not the ids as u64 BE".into());
    }
    let meta_keys: BTreeSet<Vec<u8>> = [&b"boot_id"[..], b"format", b"last_ms"]
        .iter()
        .map(|k| k.to_vec())
        .collect();
    if trees["meta"].keys().cloned().collect::<BTreeSet<_>>() != meta_keys {
        failures.push("meta: keys other than boot_id, format, last_ms".into());
    }
    failures
}

fn content_hash_table() -> Vec<(String, String)> {
    bodies()
        .iter()
        .map(|(n, b)| (n.to_string(), to_hex(&content_hash(b))))
        .collect()
}

const CONTENT_HASH_HEADER: &str = "\
# store::content_hash (SHA-256 of the command body's JSON) of the bodies named in
# tests/store_format.rs `bodies()`, hex. The dedup index stores these: a change makes
# every stored request id answer `conflict` to its own repeat.
";

const DERIVED_HEADER: &str = "\
# Derived identifiers (tests/store_format.rs `derived_table()`): the external_reference
# sent when a station gave none, MLA's ticket number, the api refund's X-Idempotency-Key.
# Each is sent to Mercado Pago and must not change for a stored request.
";

fn check_tables() -> Vec<String> {
    let _guard = FIXTURES.lock().unwrap_or_else(|e| e.into_inner());
    let mut failures = Vec::new();
    pin_table(
        &mut failures,
        "content_hash.txt",
        CONTENT_HASH_HEADER,
        &content_hash_table(),
    );
    pin_table(
        &mut failures,
        "derived.txt",
        DERIVED_HEADER,
        &derived_table(),
    );
    failures
}

// ---------------------------------------------------------------------------------------
// The tests.
// ---------------------------------------------------------------------------------------

#[test]
fn todays_writes_match_the_fixtures() {
    report(check_encoding());
}

#[test]
fn content_hashes_and_derived_identifiers_match_the_fixtures() {
    report(check_tables());
}

/// The cases carry the identifiers the agent derives (computed by hand above): derived
/// references of charges without one, and every refund's idempotency key.
#[test]
fn the_cases_carry_the_identifiers_the_agent_derives() {
    for c in cases() {
        let r = &c.request;
        match (&r.body, &r.progress) {
            (CommandBody::Charge(cmd), _) if cmd.external_reference.is_none() => assert_eq!(
                r.external_reference.as_deref(),
                Some(derived_reference(STORE_ID, &r.station, &r.request_id).as_str()),
                "{}",
                c.name
            ),
            (_, Progress::Refund(rf)) => assert_eq!(
                rf.idempotency_key,
                idempotency_key(STORE_ID, &r.station, &r.request_id),
                "{}",
                c.name
            ),
            _ => {}
        }
    }
}

#[test]
fn the_fixtures_decode_to_the_expected_values() {
    if generating() {
        report(check_encoding());
        report(check_tables());
    }
    let cases = cases();
    let hashes = read_table("content_hash.txt").expect("content_hash.txt is missing");

    // The example keys are the layout this test builds every index entry with.
    for (name, what, bytes) in key_examples() {
        assert_eq!(
            fixture(&format!("keys/{name}.hex")),
            bytes,
            "keys/{name}.hex ({what})"
        );
    }

    // A fresh database holding only fixture bytes, written with sled alone.
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let db = after_lock(|| sled::open(dir.path()), "sled open");
        let tree = |n: &str| db.open_tree(n).expect("tree");
        let (requests, dedup, outbox, meta) = (
            tree("requests"),
            tree("dedup"),
            tree("outbox"),
            tree("meta"),
        );
        for c in &cases {
            let k = raw_key(&c.request.station, &c.request.request_id);
            requests
                .insert(&k, fixture(&format!("requests/{}.hex", c.name)))
                .expect("insert");
            dedup
                .insert(&k, fixture(&format!("dedup/{}.hex", c.name)))
                .expect("insert");
        }
        for (name, _, id, _) in outbox_cases() {
            outbox
                .insert(id.to_be_bytes(), fixture(&format!("outbox/{name}.hex")))
                .expect("insert");
        }
        for name in ["format", "boot_id", "last_ms"] {
            meta.insert(name, fixture(&format!("meta/{name}.hex")))
                .expect("insert");
        }
        for (name, entries) in expected_indexes(&cases) {
            let t = tree(name);
            for (k, v) in entries {
                t.insert(k, v).expect("insert");
            }
        }
        db.flush().expect("flush");
    }

    let store = open_after_sled(dir.path());
    let mut failures = Vec::new();

    // Every request decodes to exactly its case, and its dedup entry to its hash and time.
    for c in &cases {
        let (station, id) = (&c.request.station, &c.request.request_id);
        match store.get(station, id) {
            Ok(Some(got)) if got == c.request => {}
            other => failures.push(format!(
                "requests/{}.hex ({}):\n  expected: {:?}\n  decoded:  {:?}",
                c.name,
                c.what,
                c.request,
                other.map_err(|e| e.to_string())
            )),
        }
        let hash: [u8; 32] = parse_hex(&hashes[c.body], Path::new("content_hash.txt"))
            .try_into()
            .expect("32 bytes");
        let expected = Dedup {
            hash,
            received_ms: c.request.received_ms,
        };
        match store.dedup(station, id) {
            Ok(Some(got)) if got == expected => {}
            other => failures.push(format!(
                "dedup/{}.hex: expected {expected:?}, decoded {:?}",
                c.name,
                other.map_err(|e| e.to_string())
            )),
        }
    }
    report(failures);

    assert_eq!(store.request_count(), cases.len());

    // The outbox, in id order, and the next id after the largest.
    let mut expected_outbox: Vec<(u64, Outgoing)> = outbox_cases()
        .into_iter()
        .map(|(_, _, id, o)| (id, o))
        .collect();
    expected_outbox.sort_by_key(|(id, _)| *id);
    assert_eq!(store.outbox().expect("outbox"), expected_outbox);
    assert_eq!(store.next_outbox_id(), 0x0102_0304_0506_0709);

    // meta.
    assert_eq!(
        store.last_run().expect("last_run"),
        (Some(BOOT_ID.to_string()), Some(NOW_MS))
    );

    // The indexes, read through the store.
    let mut open: Vec<&Request> = cases
        .iter()
        .map(|c| &c.request)
        .filter(|r| r.final_ms.is_none())
        .collect();
    open.sort_by_key(|r| raw_key(&r.station, &r.request_id));
    let got_open = store.open_requests().expect("open_requests");
    assert_eq!(got_open.iter().collect::<Vec<_>>(), open);

    let mut queue: Vec<(String, i64, Vec<u8>)> = open
        .iter()
        .filter_map(|r| {
            queue_terminal(r).map(|t| (t, r.received_ms, raw_key(&r.station, &r.request_id)))
        })
        .collect();
    queue.sort();
    let queue: Vec<(String, Vec<u8>)> = queue.into_iter().map(|(t, _, k)| (t, k)).collect();
    assert_eq!(store.queue_order().expect("queue_order"), queue);
    // Arrival order, not key order: sale-1044 came first on the first terminal.
    assert_eq!(
        queue[0],
        (TERM_1.to_string(), raw_key("kiosk-1", "sale-1044"))
    );

    let mut finals: Vec<&Request> = cases
        .iter()
        .map(|c| &c.request)
        .filter(|r| r.final_ms.is_some())
        .collect();
    finals.sort_by_key(|r| (r.final_ms, raw_key(&r.station, &r.request_id)));
    let got_final = store.recent_final(0).expect("recent_final");
    assert_eq!(got_final.iter().collect::<Vec<_>>(), finals);
    let since = T0 + 1_000_000 - 89_000;
    let later: Vec<&Request> = finals
        .iter()
        .copied()
        .filter(|r| r.final_ms >= Some(since))
        .collect();
    assert_eq!(
        store
            .recent_final(since)
            .expect("recent_final")
            .iter()
            .collect::<Vec<_>>(),
        later
    );

    for (reference, key) in refs(&cases) {
        assert_eq!(
            store.ref_owner(&reference).expect("ref_owner"),
            Some(key),
            "refs: {reference}"
        );
    }

    let mut kiosk2: Vec<&Request> = cases
        .iter()
        .map(|c| &c.request)
        .filter(|r| r.station == "kiosk-2")
        .collect();
    kiosk2.sort_by_key(|r| raw_key(&r.station, &r.request_id));
    assert_eq!(
        store
            .station_requests("kiosk-2")
            .expect("station_requests")
            .iter()
            .collect::<Vec<_>>(),
        kiosk2
    );
}

#[test]
fn format_2_outbox_entries_decode_to_their_addresses() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let db = after_lock(|| sled::open(dir.path()), "sled open");
        let outbox = db.open_tree("outbox").expect("tree");
        for (name, _, id, _) in outbox_cases_v2() {
            outbox
                .insert(
                    id.to_be_bytes(),
                    fixture(&format!("../v2/outbox/{name}.hex")),
                )
                .expect("insert");
        }
        db.flush().expect("flush");
    }
    let store = open_after_sled(dir.path());
    let mut expected: Vec<(u64, Outgoing)> = outbox_cases_v2()
        .into_iter()
        .map(|(_, _, id, o)| (id, o))
        .collect();
    expected.sort_by_key(|(id, _)| *id);
    assert_eq!(store.outbox().expect("outbox"), expected);
}

/// Retry `open` while sled reports its file lock held: sled's own threads release a
/// just-dropped handle's lock a moment after the drop. Bounded at 10 s.
fn after_lock<T, E: std::fmt::Display>(open: impl Fn() -> Result<T, E>, what: &str) -> T {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match open() {
            Ok(v) => return v,
            Err(e)
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(e) => panic!("{what}: {e}"),
        }
    }
}

/// `Store::open` on a directory that sled alone just wrote.
fn open_after_sled(dir: &Path) -> Store {
    after_lock(|| Store::open(dir), "Store::open on the fixtures")
}
