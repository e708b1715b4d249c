//! How the Integrations API's failures map to what the machines need to know
//! (`Failure`): which statuses are a retry, a refusal, a conflict, or a create that may
//! have been committed. Another backend (the Orders API) has its own error codes and its
//! own classification.

use crate::domain::remote::Failure;
use crate::point::ApiError;

/// Map an API error to what the machine needs to know.
pub fn failure(e: &ApiError, creating: bool) -> Failure {
    if e.is_unauthorized() || matches!(e, ApiError::Token(_)) {
        return Failure::Unauthorized;
    }
    match e.status() {
        Some(429) => Failure::Unreachable {
            retry_after_ms: e.retry_after().map(|d| d.as_millis() as i64),
            rate_limited: true,
        },
        Some(409) => Failure::Conflict,
        Some(404) => Failure::NotFound,
        Some(s) if s >= 500 => {
            if creating {
                Failure::Ambiguous
            } else {
                Failure::Unreachable {
                    retry_after_ms: e.retry_after().map(|d| d.as_millis() as i64),
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
