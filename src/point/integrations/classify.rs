//! How the Integrations API's failures map to what the machines need to know
//! (`Failure`): which statuses are a retry, a refusal, a conflict, or a create that may
//! have been committed. Another backend (the Orders API) has its own error codes and its
//! own classification.

use crate::domain::remote::Failure;
use crate::point::ApiError;

/// The longest pause a `Retry-After` can impose: 5 minutes. A longer one (a proxy's
/// error page, a misconfigured server) would stall every charge past its deadline;
/// after 5 minutes the next call asks again and gets a fresh answer.
pub const MAX_RETRY_AFTER_MS: i64 = 300_000;

/// The server's `Retry-After` in milliseconds, capped at `MAX_RETRY_AFTER_MS` (so it
/// never wraps when converted).
fn retry_after_ms(e: &ApiError) -> Option<i64> {
    e.retry_after()
        .map(|d| d.as_millis().min(MAX_RETRY_AFTER_MS as u128) as i64)
}

/// Map an API error to what the machine needs to know.
pub fn failure(e: &ApiError, creating: bool) -> Failure {
    if e.is_unauthorized() || matches!(e, ApiError::Token(_)) {
        return Failure::Unauthorized;
    }
    match e.status() {
        Some(429) => Failure::Unreachable {
            retry_after_ms: retry_after_ms(e),
            rate_limited: true,
        },
        Some(409) => Failure::Conflict,
        Some(404) => Failure::NotFound,
        Some(s) if s >= 500 => {
            if creating {
                Failure::Ambiguous
            } else {
                Failure::Unreachable {
                    retry_after_ms: retry_after_ms(e),
                    rate_limited: false,
                }
            }
        }
        Some(_) => Failure::Refused {
            message: e.person_message(),
        },
        None => match e {
            ApiError::Connect { .. } => Failure::Unreachable {
                retry_after_ms: None,
                rate_limited: false,
            },
            ApiError::Invalid(m) => Failure::Refused { message: m.clone() },
            _ if creating => Failure::Ambiguous,
            _ => Failure::Unreachable {
                retry_after_ms: None,
                rate_limited: false,
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::point::MpErrorBody;

    fn too_many(retry_after: Duration) -> ApiError {
        ApiError::Status {
            method: "POST",
            path: "/x".into(),
            status: 429,
            body: MpErrorBody::default(),
            raw_body: String::new(),
            request_id: None,
            retry_after: Some(retry_after),
        }
    }

    fn pause_of(e: &ApiError) -> Option<i64> {
        match failure(e, true) {
            Failure::Unreachable { retry_after_ms, .. } => retry_after_ms,
            other => panic!("a 429 is unreachable, got {other:?}"),
        }
    }

    #[test]
    fn a_retry_after_is_capped_and_never_wraps() {
        assert_eq!(pause_of(&too_many(Duration::from_secs(7))), Some(7_000));
        // A server's (or a proxy's) absurd value: capped, never negative.
        for huge in [Duration::from_secs(86_400), Duration::from_secs(u64::MAX)] {
            assert_eq!(pause_of(&too_many(huge)), Some(MAX_RETRY_AFTER_MS));
        }
    }
}
