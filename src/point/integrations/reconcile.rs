//! The Integrations API's reconcile strategy: payment intents carry no idempotency key,
//! so a create whose answer was lost is settled by listing the intents created since the
//! send and reading each one (`find_created`, over any backend that serves such a list). The machine decides what the candidates
//! mean (`machine::charge`).

use std::time::Duration;

use crate::domain::remote::Candidate;
use crate::point::{ApiError, PointBackend};

/// Reconcile's listing (reliability guide, steps 1–2): the intents of every UTC day from
/// the day of `from_ms` (the send's start less the
/// engine's clock-skew allowance) to `until_ms`'s (the engine's clock), and a `GET` of each
/// created at or after `from_ms`, paced by `pace`; returns those carrying `reference`.
/// `Ok(None)` when the API does not serve the list.
pub async fn find_created<B: PointBackend>(
    client: &B,
    from_ms: i64,
    until_ms: i64,
    reference: &str,
    terminal: &str,
    pace: Duration,
) -> Result<Option<Vec<Candidate>>, ApiError> {
    let day = |ms: i64| {
        time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000))
            .map(|t| t.date())
            .unwrap_or(time::Date::MIN)
    };
    let (mut date, last) = (day(from_ms), day(until_ms.max(from_ms)));
    let mut listed = Vec::new();
    loop {
        match client.list_charges_on(date).await? {
            Some(l) => listed.extend(l),
            None => return Ok(None),
        }
        match date.next_day() {
            Some(d) if d <= last => date = d,
            _ => break,
        }
    }
    let mut found = Vec::new();
    for l in listed {
        // Without a readable creation time the intent is looked at anyway.
        if l.created_unix.is_some_and(|t| t * 1000 < from_ms) {
            continue;
        }
        tokio::time::sleep(pace).await;
        let remote = client.get_charge(&l.id).await?;
        if remote.external_reference.as_deref() == Some(reference) {
            found.push(Candidate {
                device_matches: remote.terminal.as_deref() == Some(terminal),
                created_ms: l.created_unix.map(|t| t * 1000),
                remote,
            });
        }
    }
    Ok(Some(found))
}
