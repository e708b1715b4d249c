//! The agent's derived identifiers and time rendering: the `external_reference` sent
//! when a station gave none, MLA's ticket number, the hashed ids behind them and the
//! refund idempotency key. Their bytes are a stored and sent format (golden fixtures in
//! `tests/store_format.rs`): never change them.

/// Render Unix milliseconds as RFC 3339 (UTC).
pub fn rfc3339(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// The `external_reference` the agent sends when the station gave none: unique per
/// store, station and request id, stable across restarts and repeats, and within the
/// contract's own charset (`A-Za-z0-9_-`, at most 64).
pub fn derived_reference(store: &str, station: &str, request_id: &str) -> String {
    hashed_id("pg-", &[store, station, request_id])
}

/// `prefix` + the first 16 bytes, in hex, of SHA-256 over `parts`, each followed by a
/// NUL (so `("ab", "c")` and `("a", "bc")` differ). The agent's derived identifiers.
pub fn hashed_id(prefix: &str, parts: &[&str]) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for part in parts {
        ctx.update(part.as_bytes());
        ctx.update(&[0]);
    }
    let d = ctx.finish();
    let hex: String = d.as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("{prefix}{hex}")
}

/// MLA's ticket number when the station gave none: from the request id, in the allowed
/// charset (`A-Za-z0-9-`, at most 20).
pub fn derived_ticket(request_id: &str) -> String {
    let t: String = request_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let tail = t.len().saturating_sub(20);
    t[tail..].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_references_are_stable_distinct_and_in_the_contract_charset() {
        let a = derived_reference("s", "k1", "r1");
        assert_eq!(a, derived_reference("s", "k1", "r1"));
        assert_ne!(a, derived_reference("s", "k1", "r2"));
        assert_ne!(a, derived_reference("s", "k1r", "1"));
        assert!(a.len() <= 64);
        assert!(a
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'));
    }
}
