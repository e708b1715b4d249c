//! The control socket's wire protocol (version 1), pure: one JSON object per line each
//! way. The client writes `{"v":1,"op":"status"|"list"|"show"|"cancel"|"resolve",...}`
//! and reads `{"v":1,"answer":"status"|"list"|"show"|"changed"|"error",...}`; then the
//! connection closes. `docs/contract-notes.md` lists every field.

use serde::{Deserialize, Serialize};

use crate::domain::operator::{ControlFailure, ControlReply, ControlRequest, FailureCode};

/// The protocol version, `v` of every line.
pub const VERSION: u8 = 1;
/// The longest request line accepted.
pub const MAX_LINE: usize = 16 * 1024;

#[derive(Serialize, Deserialize)]
struct RequestLine {
    v: u8,
    #[serde(flatten)]
    request: ControlRequest,
}

#[derive(Serialize, Deserialize)]
struct ReplyLine {
    v: u8,
    #[serde(flatten)]
    reply: ControlReply,
}

/// Parse a request line; `Err` is the error to answer.
pub fn parse_request(line: &[u8]) -> Result<ControlRequest, ControlFailure> {
    let value: serde_json::Value = serde_json::from_slice(line).map_err(|e| {
        ControlFailure::new(FailureCode::BadRequest, format!("not a JSON object: {e}"))
    })?;
    match value.get("v").and_then(serde_json::Value::as_u64) {
        Some(v) if v == u64::from(VERSION) => {}
        _ => {
            return Err(ControlFailure::new(
                FailureCode::BadRequest,
                format!("`v` must be {VERSION}"),
            ))
        }
    }
    serde_json::from_value::<RequestLine>(value)
        .map(|l| l.request)
        .map_err(|e| ControlFailure::new(FailureCode::BadRequest, e.to_string()))
}

/// The line a client sends (with its newline).
pub fn encode_request(request: &ControlRequest) -> Vec<u8> {
    let mut out = serde_json::to_vec(&RequestLine {
        v: VERSION,
        request: request.clone(),
    })
    // Plain enums of strings: JSON encoding cannot fail.
    .unwrap_or_default();
    out.push(b'\n');
    out
}

/// The line the server sends (with its newline).
pub fn encode_reply(reply: &ControlReply) -> Vec<u8> {
    let mut out = serde_json::to_vec(&ReplyLine {
        v: VERSION,
        reply: reply.clone(),
    })
    // Structs of strings, numbers and JSON values: encoding cannot fail.
    .unwrap_or_default();
    out.push(b'\n');
    out
}

/// Parse a reply line.
pub fn parse_reply(line: &[u8]) -> Result<ControlReply, serde_json::Error> {
    serde_json::from_slice::<ReplyLine>(line).map(|l| l.reply)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::command::CommandType;
    use crate::domain::operator::*;

    #[test]
    fn requests_round_trip_through_their_line() {
        for r in [
            ControlRequest::Status,
            ControlRequest::List,
            ControlRequest::Show { id: "k/1".into() },
            ControlRequest::Cancel { id: "k/2".into() },
            ControlRequest::Resolve {
                id: "k/3".into(),
                outcome: Outcome::Declined,
            },
        ] {
            let line = encode_request(&r);
            assert_eq!(line.last(), Some(&b'\n'));
            assert_eq!(parse_request(&line).expect("parses"), r);
        }
        let line = encode_request(&ControlRequest::Resolve {
            id: "k/3".into(),
            outcome: Outcome::Approved,
        });
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"v":1,"op":"resolve","id":"k/3","outcome":"approved"})
        );
    }

    #[test]
    fn a_bad_line_or_version_is_a_bad_request() {
        for line in [
            &b"nope"[..],
            br#"{"op":"status"}"#,
            br#"{"v":2,"op":"status"}"#,
            br#"{"v":1,"op":"explode"}"#,
            br#"{"v":1,"op":"show"}"#,
        ] {
            match parse_request(line) {
                Err(f) => assert_eq!(f.code, FailureCode::BadRequest),
                other => panic!("{:?}: {other:?}", String::from_utf8_lossy(line)),
            }
        }
    }

    #[test]
    fn replies_round_trip_through_their_line() {
        let row = RequestRow {
            id: "k/1".into(),
            station: "k".into(),
            request_id: "1".into(),
            kind: CommandType::Charge,
            state: "waiting".into(),
            is_final: false,
            age_s: 3,
            terminal: Some("T".into()),
            amount: Some("1.00".into()),
            detail: Some("terminal_busy".into()),
            target: None,
        };
        for reply in [
            ControlReply::List(ListView {
                requests: vec![row.clone()],
            }),
            ControlReply::Changed(ChangeView {
                request: row.clone(),
                message: "m".into(),
            }),
            ControlReply::Show(RequestDetail {
                row,
                received_at: "t".into(),
                final_at: None,
                deadline_at: None,
                stage: Some("queued".into()),
                external_reference: None,
                reply_topic: None,
                command: serde_json::json!({"a":1}),
                events: vec![serde_json::json!({"state":"accepted"})],
            }),
            ControlReply::error(FailureCode::NotFound, "no"),
        ] {
            let line = encode_reply(&reply);
            assert_eq!(parse_reply(line.trim_ascii()).expect("parses"), reply);
        }
        let v: serde_json::Value = serde_json::from_slice(&encode_reply(&ControlReply::error(
            FailureCode::NotAllowed,
            "x",
        )))
        .unwrap();
        assert_eq!(
            v,
            serde_json::json!({"v":1,"answer":"error","code":"not_allowed","message":"x"})
        );
    }
}
