//! Fuzz target `command`: `station::validate::validate` on arbitrary bytes must never
//! panic, and what it returns must keep the validator's invariants.
//!
//! The first byte picks the site (even: MLA, odd: MLB) so both sites' rules (MLB's
//! `payment`) are reached; the rest is the payload. The context is fixed: station
//! `kiosk-01` with one terminal, `lane-02` with two, and a device listing.
//!
//! Run from the repository root: `cargo +nightly fuzz run command -- -max_total_time=60`.

#![no_main]

use std::collections::{BTreeMap, HashSet};

use libfuzzer_sys::fuzz_target;
use pointgate::config::StationSection;
use pointgate::domain::command::{validate, Context, MAX_COMMAND_BYTES};
use pointgate::domain::outcome::ErrorCode;
use pointgate::money::Site;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, payload)) = data.split_first() else {
        return;
    };
    let site = if selector % 2 == 0 {
        Site::MLA
    } else {
        Site::MLB
    };
    let station = |ts: &[&str]| StationSection {
        terminals: ts.iter().map(|t| t.to_string()).collect(),
    };
    let stations = BTreeMap::from([
        (
            "kiosk-01".to_string(),
            station(&["PAX_A910__SMARTPOS1234345545"]),
        ),
        ("lane-02".to_string(), station(&["T2", "T3"])),
    ]);
    let listed: HashSet<String> = ["PAX_A910__SMARTPOS1234345545", "T2", "T3", "T9"]
        .iter()
        .map(|t| t.to_string())
        .collect();
    let ctx = Context {
        site,
        station: "kiosk-01",
        stations: &stations,
        listed_terminals: Some(&listed),
        refund_ttl_max_s: 7 * 24 * 3600,
    };
    match validate(payload, &ctx) {
        Ok(cmd) => {
            assert!(payload.len() <= MAX_COMMAND_BYTES);
            assert!(pointgate::domain::command::is_request_id(&cmd.request_id));
        }
        Err(refusal) => {
            assert!(!refusal.message.is_empty());
            if matches!(refusal.code, ErrorCode::TooLarge | ErrorCode::BadJson) {
                assert!(refusal.request_id.is_none());
            }
        }
    }
});
