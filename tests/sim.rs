//! The Point API simulator over real TLS on port 0, driven by a plain reqwest client
//! that trusts only the simulator's CA.

use std::sync::Arc;
use std::time::Duration;

use pointgate::money::Site;
use pointgate::sim::{self, Fault, FaultScope, SimConfig, SimHandle, TerminalMode};
use reqwest::{Client, Method, StatusCode};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use serde_json::{json, Value};

const TOKEN: &str = "TEST-sim-token";
const DEV: &str = "SIM_A910__0001";
const IA: &str = "/point/integration-api";

fn fast() -> TerminalMode {
    TerminalMode::Auto {
        pickup: Duration::from_millis(5),
        process: Duration::from_millis(15),
    }
}

fn config(site: Site, terminal: TerminalMode) -> SimConfig {
    SimConfig {
        site,
        terminal,
        devices: vec![
            DEV.into(),
            "SIM_A910__0002".into(),
            "SIM_A910__0003".into(),
            "SIM_A910__0004".into(),
        ],
        standalone_devices: vec!["SIM_STANDALONE__0001".into()],
        ..SimConfig::default()
    }
}

async fn start(site: Site, terminal: TerminalMode) -> (SimHandle, Api) {
    let sim = sim::start(config(site, terminal))
        .await
        .expect("sim starts");
    let api = Api::new(&sim);
    (sim, api)
}

struct Api {
    client: Client,
    base: String,
}

struct Answer {
    status: StatusCode,
    headers: reqwest::header::HeaderMap,
    body: Value,
}

impl Api {
    fn new(sim: &SimHandle) -> Api {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(sim.ca_pem().as_bytes()) {
            roots
                .add(cert.expect("CA PEM parses"))
                .expect("CA accepted");
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        let client = Client::builder()
            .use_preconfigured_tls(tls)
            .timeout(Duration::from_secs(5))
            .build()
            .expect("client builds");
        Api {
            client,
            base: sim.base_url(),
        }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
        key: Option<&str>,
    ) -> Result<Answer, reqwest::Error> {
        let mut req = self.client.request(method, format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        if let Some(k) = key {
            req = req.header("x-idempotency-key", k);
        }
        let resp = req.send().await?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let text = resp.text().await?;
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).expect("JSON answer")
        };
        Ok(Answer {
            status,
            headers,
            body,
        })
    }

    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Answer {
        self.send(method, path, Some(TOKEN), body, None)
            .await
            .expect("request answered")
    }

    async fn get(&self, path: &str) -> Answer {
        self.call(Method::GET, path, None).await
    }

    async fn post(&self, path: &str, body: Value) -> Answer {
        self.call(Method::POST, path, Some(body)).await
    }

    async fn create(&self, device: &str, body: Value) -> Answer {
        self.post(&format!("{IA}/devices/{device}/payment-intents"), body)
            .await
    }

    async fn refund(&self, payment_id: &str, body: Option<Value>, key: Option<&str>) -> Answer {
        self.send(
            Method::POST,
            &format!("/v1/payments/{payment_id}/refunds"),
            Some(TOKEN),
            body,
            key,
        )
        .await
        .expect("request answered")
    }
}

fn mla_body(amount: u64, reference: &str) -> Value {
    json!({
        "amount": amount,
        "additional_info": { "external_reference": reference, "print_on_terminal": true, "ticket_number": "T-1" }
    })
}

fn id_of(a: &Answer) -> String {
    a.body["id"].as_str().expect("an id").to_string()
}

/// Polls the simulator until the intent is in `state` (bounded: 5 s).
async fn wait_state(sim: &SimHandle, id: &str, state: &str) -> sim::IntentView {
    for _ in 0..1000 {
        if let Some(v) = sim.intent(id) {
            if v.state == state {
                return v;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("intent {id} never reached {state}: {:?}", sim.intent(id));
}

#[tokio::test]
async fn happy_path_ends_in_an_approved_payment_found_by_id_and_reference() {
    let (sim, api) = start(Site::MLA, fast()).await;

    let created = api.create(DEV, mla_body(1500, "ref-happy")).await;
    assert_eq!(created.status, StatusCode::OK, "{}", created.body);
    assert!(created.headers.contains_key("x-request-id"));
    let id = id_of(&created);
    assert_eq!(id.len(), 36);
    assert_eq!(created.body["device_id"], DEV);
    assert_eq!(created.body["amount"], 1500);
    assert_eq!(created.body["additional_info"]["ticket_number"], "T-1");
    assert!(
        created.body.get("state").is_none(),
        "the documented create answer has no state"
    );

    // Poll over HTTP as a client would, bounded.
    let mut last = Value::Null;
    for _ in 0..1000 {
        last = api.get(&format!("{IA}/payment-intents/{id}")).await.body;
        if last["state"] == "FINISHED" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(last["state"], "FINISHED", "{last}");
    assert_eq!(last["amount"], 1500);
    assert_eq!(last["device_id"], DEV);
    assert_eq!(last["additional_info"]["external_reference"], "ref-happy");
    let payment_id = last["payment"]["id"]
        .as_str()
        .expect("payment.id is a string")
        .to_string();

    let payment = api.get(&format!("/v1/payments/{payment_id}")).await;
    assert_eq!(payment.status, StatusCode::OK);
    assert_eq!(
        payment.body["id"].as_u64().map(|n| n.to_string()),
        Some(payment_id.clone())
    );
    assert_eq!(payment.body["status"], "approved");
    assert_eq!(payment.body["status_detail"], "accredited");
    assert_eq!(payment.body["transaction_amount"].as_f64(), Some(15.0));
    assert_eq!(payment.body["currency_id"], "ARS");
    assert_eq!(payment.body["external_reference"], "ref-happy");

    let found = api
        .get("/v1/payments/search?external_reference=ref-happy")
        .await;
    assert_eq!(found.body["results"].as_array().map(Vec::len), Some(1));
    assert_eq!(found.body["paging"]["total"], 1);
    let none = api.get("/v1/payments/search?external_reference=nope").await;
    assert_eq!(none.body["results"].as_array().map(Vec::len), Some(0));

    assert_eq!(
        api.get(&format!(
            "{IA}/payment-intents/00000000-0000-4000-8000-000000000000"
        ))
        .await
        .status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        api.get("/v1/payments/1").await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(sim.creates_for("ref-happy"), 1);
    sim.shutdown();
}

#[tokio::test]
async fn a_busy_device_refuses_a_second_intent_until_the_first_is_final() {
    let (sim, api) = start(Site::MLA, TerminalMode::Manual).await;
    let first = api.create(DEV, mla_body(1500, "a")).await;
    assert_eq!(first.status, StatusCode::OK);
    let second = api.create(DEV, mla_body(1500, "b")).await;
    assert_eq!(second.status, StatusCode::CONFLICT);
    assert_eq!(second.body["status"], 409);
    assert_eq!(second.body["message"], "Device has a queued payment intent");
    // Another device is free.
    assert_eq!(
        api.create("SIM_A910__0002", mla_body(1500, "c"))
            .await
            .status,
        StatusCode::OK
    );
    // Once the first is final the device takes a new one.
    sim.advance(&id_of(&first), "ERROR").expect("advance");
    assert_eq!(
        api.create(DEV, mla_body(1500, "b")).await.status,
        StatusCode::OK
    );
    assert_eq!(sim.creates_for("b"), 1);
}

#[tokio::test]
async fn cancel_works_while_open_and_is_409_once_on_the_terminal() {
    let (sim, api) = start(Site::MLA, TerminalMode::Manual).await;
    let id = id_of(&api.create(DEV, mla_body(1500, "a")).await);
    let cancel = api
        .call(
            Method::DELETE,
            &format!("{IA}/devices/{DEV}/payment-intents/{id}"),
            None,
        )
        .await;
    assert_eq!(cancel.status, StatusCode::OK);
    assert_eq!(cancel.body, json!({ "id": id }));
    assert_eq!(
        api.get(&format!("{IA}/payment-intents/{id}")).await.body["state"],
        "CANCELED"
    );

    let id = id_of(&api.create(DEV, mla_body(1500, "b")).await);
    sim.advance(&id, "ON_TERMINAL").expect("advance");
    let cancel = api
        .call(
            Method::DELETE,
            &format!("{IA}/devices/{DEV}/payment-intents/{id}"),
            None,
        )
        .await;
    assert_eq!(cancel.status, StatusCode::CONFLICT);
    assert_eq!(
        cancel.body["message"],
        "Payment intent is blocked by terminal"
    );
    assert_eq!(
        sim.intent(&id).map(|v| v.state),
        Some("ON_TERMINAL".to_string())
    );
    let elsewhere = api
        .call(
            Method::DELETE,
            &format!("{IA}/devices/SIM_A910__0002/payment-intents/{id}"),
            None,
        )
        .await;
    assert_eq!(elsewhere.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn each_site_refuses_bodies_that_break_its_schema() {
    let (_mla, api) = start(Site::MLA, TerminalMode::Manual).await;
    let cases = [
        (
            json!({"amount": 1500, "additional_info": {"external_reference": "x"}}),
            "ticket_number",
        ),
        (
            json!({"amount": 499, "additional_info": {"ticket_number": "T"}}),
            "amount",
        ),
        (
            json!({"amount": 400_000_001u64, "additional_info": {"ticket_number": "T"}}),
            "amount",
        ),
        (
            json!({"amount": 15.5, "additional_info": {"ticket_number": "T"}}),
            "amount",
        ),
        (
            json!({"amount": 1500, "additional_info": {"ticket_number": "T"}, "payment": {"type": "credit_card"}}),
            "payment",
        ),
        (
            json!({"amount": 1500, "additional_info": {"ticket_number": "T"}, "colour": "red"}),
            "colour",
        ),
    ];
    for (body, field) in cases {
        let a = api.create(DEV, body.clone()).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(a.body["error"], "bad_request");
        assert!(
            a.body["message"]
                .as_str()
                .is_some_and(|m| m.contains(field)),
            "{}",
            a.body
        );
    }
    assert_eq!(
        api.create(DEV, mla_body(500, "ok")).await.status,
        StatusCode::OK
    );

    let (_mlb, api) = start(Site::MLB, TerminalMode::Manual).await;
    for payment in [
        json!({"type": "debit_card", "installments": 3}),
        json!({"type": "credit_card", "installments": 73}),
        json!({"type": "credit_card", "voucher_type": "sodexo"}),
        json!({"type": "boleto"}),
    ] {
        let a = api
            .create(DEV, json!({"amount": 1000, "payment": payment}))
            .await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{payment}");
    }
    let ticket = api
        .create(
            DEV,
            json!({"amount": 1000, "additional_info": {"ticket_number": "T"}}),
        )
        .await;
    assert_eq!(ticket.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        api.create(DEV, json!({"amount": 7_000_001})).await.status,
        StatusCode::BAD_REQUEST
    );
    let ok = api
        .create(DEV, json!({"amount": 7_000_000, "description": "d", "payment": {"type": "credit_card", "installments": 72, "installments_cost": "buyer"}}))
        .await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.body);
    assert_eq!(ok.body["payment"]["installments"], 72);

    let (_mlm, api) = start(Site::MLM, TerminalMode::Manual).await;
    assert_eq!(
        api.create(DEV, json!({"amount": 35_000_001, "additional_info": {}}))
            .await
            .status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        api.create(
            DEV,
            json!({"amount": 1000, "description": "x", "additional_info": {}})
        )
        .await
        .status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        api.create(DEV, json!({"amount": 35_000_000, "additional_info": {}}))
            .await
            .status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn devices_are_listed_filtered_patched_and_checked_on_create() {
    let (sim, api) = start(Site::MLA, TerminalMode::Manual).await;
    let all = api.get(&format!("{IA}/devices")).await;
    assert_eq!(all.body["paging"]["total"], 5);
    let devices = all.body["devices"].as_array().cloned().unwrap_or_default();
    assert_eq!(devices[0]["id"], DEV);
    assert_eq!(devices[0]["operating_mode"], "PDV");
    assert_eq!(devices[4]["operating_mode"], "STANDALONE");
    let pos_id = devices[1]["pos_id"].as_u64().expect("pos_id is a number");
    let one = api
        .get(&format!("{IA}/devices?pos_id={pos_id}&limit=50&offset=0"))
        .await;
    assert_eq!(one.body["devices"].as_array().map(Vec::len), Some(1));
    assert_eq!(one.body["devices"][0]["id"], "SIM_A910__0002");
    let page = api.get(&format!("{IA}/devices?limit=2&offset=1")).await;
    assert_eq!(page.body["devices"][0]["id"], "SIM_A910__0002");
    assert_eq!(page.body["devices"].as_array().map(Vec::len), Some(2));
    assert_eq!(
        api.get(&format!("{IA}/devices?limit=abc")).await.status,
        StatusCode::BAD_REQUEST
    );

    let standalone = api
        .create("SIM_STANDALONE__0001", mla_body(1500, "s"))
        .await;
    assert_eq!(standalone.status, StatusCode::BAD_REQUEST);
    let patched = api
        .call(
            Method::PATCH,
            &format!("{IA}/devices/SIM_STANDALONE__0001"),
            Some(json!({"operating_mode": "PDV"})),
        )
        .await;
    assert_eq!(patched.body, json!({"operating_mode": "PDV"}));
    assert_eq!(
        api.create("SIM_STANDALONE__0001", mla_body(1500, "s"))
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        api.create("NO_SUCH__DEVICE", mla_body(1500, "n"))
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    sim.set_device_mode(DEV, "STANDALONE");
    assert_eq!(
        api.create(DEV, mla_body(1500, "d")).await.status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(sim.ledger().len(), 1);
}

#[tokio::test]
async fn a_missing_or_wrong_token_is_401_on_every_endpoint() {
    let (sim, api) = start(Site::MLA, TerminalMode::Manual).await;
    let expected =
        json!({"message": "invalid_token", "error": "unauthorized", "status": 401, "cause": []});
    for (method, path, token) in [
        (Method::GET, format!("{IA}/devices"), None),
        (Method::GET, format!("{IA}/devices"), Some("TEST-wrong")),
        (
            Method::POST,
            format!("{IA}/devices/{DEV}/payment-intents"),
            Some("TEST-wrong"),
        ),
        (
            Method::GET,
            "/v1/payments/123".to_string(),
            Some("TEST-sim-tokenX"),
        ),
    ] {
        let a = api
            .send(method, &path, token, Some(mla_body(1500, "x")), None)
            .await
            .expect("answered");
        assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{path}");
        assert_eq!(a.body, expected);
        assert!(a.headers.contains_key("x-request-id"));
    }
    assert!(sim.ledger().is_empty());
    assert_eq!(
        api.get(&format!("{IA}/devices")).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn outcome_amounts_pick_reversed_rejected_error_or_approved() {
    let (sim, api) = start(Site::MLA, fast()).await;
    let cases = [
        (DEV, 1100, "FINISHED", Some(("cancelled", "reversed"))),
        (
            "SIM_A910__0002",
            1200,
            "FINISHED",
            Some(("rejected", "cc_rejected_other_reason")),
        ),
        ("SIM_A910__0003", 1300, "ERROR", None),
        (
            "SIM_A910__0004",
            1400,
            "FINISHED",
            Some(("approved", "accredited")),
        ),
    ];
    let mut ids = Vec::new();
    for (device, amount, _, _) in cases {
        let a = api
            .create(device, mla_body(amount, &format!("ref-{amount}")))
            .await;
        assert_eq!(a.status, StatusCode::OK);
        ids.push(id_of(&a));
    }
    for ((_, amount, end, payment), id) in cases.into_iter().zip(ids) {
        let view = wait_state(&sim, &id, end).await;
        match payment {
            None => {
                assert_eq!(view.payment_id, None, "{amount}");
                let got = api.get(&format!("{IA}/payment-intents/{id}")).await;
                assert!(got.body.get("payment").is_none());
            }
            Some((status, detail)) => {
                let pid = view.payment_id.expect("a payment");
                let p = api.get(&format!("/v1/payments/{pid}")).await;
                assert_eq!(
                    (p.body["status"].as_str(), p.body["status_detail"].as_str()),
                    (Some(status), Some(detail)),
                    "{amount}"
                );
            }
        }
    }
}

#[tokio::test]
async fn the_ledger_counts_creates_and_commit_then_drop_commits_without_answering() {
    let (sim, api) = start(Site::MLA, TerminalMode::Manual).await;
    assert_eq!(
        api.create(DEV, mla_body(1500, "ref-1")).await.status,
        StatusCode::OK
    );

    sim.set_fault_scoped(
        FaultScope::Creates,
        Fault::CommitThenDrop { remaining: Some(1) },
    );
    // Reads pass untouched while creates are faulted.
    assert_eq!(
        api.get(&format!("{IA}/devices")).await.status,
        StatusCode::OK
    );
    let lost = api
        .send(
            Method::POST,
            &format!("{IA}/devices/SIM_A910__0002/payment-intents"),
            Some(TOKEN),
            Some(mla_body(1500, "ref-2")),
            None,
        )
        .await;
    let err = lost.err().expect("the client gets no answer");
    assert!(!err.is_status(), "{err}");
    assert_eq!(sim.creates_for("ref-2"), 1, "the create was committed");
    assert_eq!(sim.requests().last().map(|r| r.status), Some(0));

    // The fault ran out: the retry is answered, and it is a duplicate at the API.
    let dup = api.create("SIM_A910__0003", mla_body(1500, "ref-2")).await;
    assert_eq!(dup.status, StatusCode::OK);
    assert_eq!(sim.creates_for("ref-2"), 2);
    assert_eq!(sim.duplicated_references(), vec!["ref-2".to_string()]);
    assert_eq!(sim.ledger().len(), 3);
    assert_eq!(sim.ledger()[0].external_reference.as_deref(), Some("ref-1"));
    assert_eq!(sim.ledger()[0].amount, 1500);
    assert!(sim.request_count() >= 4);
}

#[tokio::test]
async fn commit_then_5xx_commits_and_plain_5xx_does_not() {
    let (sim, api) = start(Site::MLA, TerminalMode::Manual).await;
    sim.set_fault(Fault::Status5xx {
        status: 503,
        remaining: Some(1),
    });
    let a = api.create(DEV, mla_body(1500, "r1")).await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(sim.creates_for("r1"), 0);
    sim.set_fault(Fault::CommitThen5xx {
        status: 500,
        remaining: Some(1),
    });
    let a = api.create(DEV, mla_body(1500, "r1")).await;
    assert_eq!(a.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(sim.creates_for("r1"), 1);
    assert_eq!(
        api.get(&format!("{IA}/devices")).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn too_many_answers_429_with_retry_after_then_recovers() {
    let (sim, api) = start(Site::MLA, TerminalMode::Manual).await;
    sim.set_fault(Fault::TooMany {
        retry_after_s: 7,
        remaining: Some(2),
    });
    for _ in 0..2 {
        let a = api.get(&format!("{IA}/devices")).await;
        assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            a.headers.get("retry-after").and_then(|v| v.to_str().ok()),
            Some("7")
        );
        assert_eq!(a.body["status"], 429);
    }
    let a = api.get(&format!("{IA}/devices")).await;
    assert_eq!(a.status, StatusCode::OK);
    assert!(a.headers.get("retry-after").is_none());
}

#[tokio::test]
async fn down_fails_requests_fast_and_recovery_serves_again() {
    let (sim, api) = start(Site::MLA, TerminalMode::Manual).await;
    // A pooled connection exists before the outage.
    assert_eq!(
        api.get(&format!("{IA}/devices")).await.status,
        StatusCode::OK
    );
    sim.set_fault(Fault::Down);
    let started = std::time::Instant::now();
    // A new connection is refused before TLS: nothing can have reached the API.
    let fresh = Api::new(&sim);
    let before = sim.request_count();
    let err = fresh
        .send(
            Method::GET,
            &format!("{IA}/devices"),
            Some(TOKEN),
            None,
            None,
        )
        .await
        .err()
        .expect("no answer");
    assert!(err.is_connect(), "{err:?}");
    assert_eq!(sim.request_count(), before);
    // The pooled connection is cut too (its first use may fail after sending, as in a
    // real outage); after that every attempt fails to connect.
    let mut last = None;
    for _ in 0..3 {
        let r = api
            .send(
                Method::POST,
                &format!("{IA}/devices/{DEV}/payment-intents"),
                Some(TOKEN),
                Some(mla_body(1500, "d")),
                None,
            )
            .await;
        last = Some(r.err().expect("no answer while down"));
    }
    assert!(last.is_some_and(|e| e.is_connect()));
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "fails fast, took {:?}",
        started.elapsed()
    );
    assert_eq!(sim.creates_for("d"), 0);
    sim.set_fault(Fault::None);
    assert_eq!(
        api.create(DEV, mla_body(1500, "d")).await.status,
        StatusCode::OK
    );
    assert_eq!(sim.creates_for("d"), 1);
}

#[tokio::test]
async fn slow_delays_answers() {
    let (sim, api) = start(Site::MLA, TerminalMode::Manual).await;
    sim.set_fault_scoped(
        FaultScope::PathPrefix("/v1/".into()),
        Fault::Slow(Duration::from_millis(300)),
    );
    let t = std::time::Instant::now();
    assert_eq!(
        api.get(&format!("{IA}/devices")).await.status,
        StatusCode::OK
    );
    assert!(t.elapsed() < Duration::from_millis(300));
    let t = std::time::Instant::now();
    assert_eq!(
        api.get("/v1/payments/1").await.status,
        StatusCode::NOT_FOUND
    );
    assert!(t.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn intent_lists_are_served_or_404_when_switched_off() {
    let (sim, api) = start(Site::MLA, TerminalMode::Manual).await;
    let id = id_of(&api.create(DEV, mla_body(1500, "l")).await);
    let today = time::OffsetDateTime::now_utc().date();
    let fmt = time::macros::format_description!("[year]-[month]-[day]");
    let d = |date: time::Date| date.format(&fmt).expect("formats");
    let list = api
        .get(&format!(
            "{IA}/payment-intents/events?startDate={}&endDate={}",
            d(today - time::Duration::days(1)),
            d(today)
        ))
        .await;
    assert_eq!(list.status, StatusCode::OK);
    let events = list.body["events"].as_array().cloned().unwrap_or_default();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["payment_intent_id"], id.as_str());
    assert_eq!(events[0]["status"], "OPEN");
    assert!(events[0]["created_on"]
        .as_str()
        .is_some_and(|s| s.ends_with('Z') && s.len() == 20));

    let earlier = api
        .get(&format!(
            "{IA}/payment-intents/events?startDate={}&endDate={}",
            d(today - time::Duration::days(3)),
            d(today - time::Duration::days(1))
        ))
        .await;
    assert_eq!(earlier.body["events"], json!([]));
    for query in [
        format!("startDate={}", d(today)),
        format!(
            "startDate={}&endDate={}",
            d(today - time::Duration::days(31)),
            d(today)
        ),
        format!(
            "startDate={}&endDate={}",
            d(today),
            d(today - time::Duration::days(1))
        ),
        "startDate=2024-1-1&endDate=2024-01-02".to_string(),
    ] {
        assert_eq!(
            api.get(&format!("{IA}/payment-intents/events?{query}"))
                .await
                .status,
            StatusCode::BAD_REQUEST,
            "{query}"
        );
    }
    sim.advance(&id, "CANCELED").expect("advance");
    let last = api.get(&format!("{IA}/payment-intents/{id}/events")).await;
    assert_eq!(last.body["status"], "CANCELED");

    sim.set_serve_intent_lists(false);
    let off = api
        .get(&format!(
            "{IA}/payment-intents/events?startDate={}&endDate={}",
            d(today),
            d(today)
        ))
        .await;
    assert_eq!(off.status, StatusCode::NOT_FOUND);
    assert_eq!(off.body["status"], 404);
    assert_eq!(
        api.get(&format!("{IA}/payment-intents/{id}/events"))
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        api.get(&format!("{IA}/payment-intents/{id}")).await.status,
        StatusCode::OK
    );
}

/// Creates an intent on `device` and finishes it by hand; returns the payment id.
async fn paid(sim: &SimHandle, api: &Api, device: &str, amount: u64, reference: &str) -> String {
    let id = id_of(&api.create(device, mla_body(amount, reference)).await);
    sim.advance(&id, "FINISHED").expect("advance");
    sim.intent(&id)
        .and_then(|v| v.payment_id)
        .expect("a payment")
}

#[tokio::test]
async fn refunds_partial_then_full_never_beyond_and_idempotent_per_key() {
    let (sim, api) = start(Site::MLA, TerminalMode::Manual).await;
    let pid = paid(&sim, &api, DEV, 1000, "refund-me").await;

    let first = api
        .refund(&pid, Some(json!({"amount": 2.5})), Some("k1"))
        .await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.body);
    assert_eq!(first.body["amount"].as_f64(), Some(2.5));
    let again = api
        .refund(&pid, Some(json!({"amount": 2.5})), Some("k1"))
        .await;
    assert_eq!(again.status, StatusCode::CREATED);
    assert_eq!(again.body["id"], first.body["id"]);
    let p = api.get(&format!("/v1/payments/{pid}")).await.body;
    assert_eq!(p["status"], "approved");
    assert_eq!(p["status_detail"], "partially_refunded");
    assert_eq!(p["transaction_amount_refunded"].as_f64(), Some(2.5));
    assert_eq!(p["refunds"].as_array().map(Vec::len), Some(1));

    let over = api
        .refund(&pid, Some(json!({"amount": 7.51})), Some("k2"))
        .await;
    assert_eq!(over.status, StatusCode::BAD_REQUEST);
    let bad = api
        .refund(&pid, Some(json!({"amount": 1.234})), Some("k3"))
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);

    let rest = api.refund(&pid, Some(json!({})), Some("k4")).await;
    assert_eq!(rest.status, StatusCode::CREATED);
    assert_eq!(rest.body["amount"].as_f64(), Some(7.5));
    let p = api.get(&format!("/v1/payments/{pid}")).await.body;
    assert_eq!(p["status"], "refunded");
    assert_eq!(p["transaction_amount_refunded"].as_f64(), Some(10.0));
    // Nothing left: a new refund fails, the old key still returns its refund.
    assert_eq!(
        api.refund(&pid, None, Some("k5")).await.status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        api.refund(&pid, None, Some("k4")).await.body["id"],
        rest.body["id"]
    );

    // A rejected payment cannot be refunded.
    let rejected = paid(&sim, &api, "SIM_A910__0002", 1200, "rej").await;
    assert_eq!(
        api.refund(&rejected, None, None).await.status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        api.refund("999", None, None).await.status,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn a_refund_intent_runs_on_the_paying_terminal_and_refunds_the_payment() {
    let (sim, api) = start(Site::MLA, TerminalMode::Manual).await;
    let pid = paid(&sim, &api, DEV, 2000, "ri").await;
    let body = json!({"payment_id": pid, "additional_info": {"print_on_terminal": ["SELLER_TICKET", "BUYER_TICKET"]}});

    let elsewhere = api
        .post(&format!("{IA}/devices/SIM_A910__0002/refund"), body.clone())
        .await;
    assert_eq!(elsewhere.status, StatusCode::BAD_REQUEST);
    let unknown = api
        .post(
            &format!("{IA}/devices/{DEV}/refund"),
            json!({"payment_id": "123"}),
        )
        .await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    let bad_print = api
        .post(
            &format!("{IA}/devices/{DEV}/refund"),
            json!({"payment_id": pid, "additional_info": {"print_on_terminal": true}}),
        )
        .await;
    assert_eq!(bad_print.status, StatusCode::BAD_REQUEST);

    // Cancel while OPEN.
    let first = api
        .post(&format!("{IA}/devices/{DEV}/refund"), body.clone())
        .await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.body);
    assert_eq!(first.body["payment_id"], pid.as_str());
    assert_eq!(
        first.body["additional_info"]["print_on_terminal"],
        json!(["SELLER_TICKET", "BUYER_TICKET"])
    );
    let rid = id_of(&first);
    // The refund occupies the device queue.
    assert_eq!(
        api.create(DEV, mla_body(1500, "queued")).await.status,
        StatusCode::CONFLICT
    );
    assert_eq!(
        api.post(&format!("{IA}/devices/{DEV}/refund"), body.clone())
            .await
            .status,
        StatusCode::CONFLICT
    );
    let cancel = api
        .call(
            Method::DELETE,
            &format!("{IA}/devices/{DEV}/refund/{rid}"),
            None,
        )
        .await;
    assert_eq!(cancel.body, json!({"id": rid}));
    assert_eq!(
        api.get(&format!("{IA}/refund/{rid}")).await.body["state"],
        "CANCELED"
    );

    // Then let the automatic terminal run one to the end.
    sim.set_terminal_mode(fast());
    let second = api
        .post(&format!("{IA}/devices/{DEV}/refund"), body.clone())
        .await;
    assert_eq!(second.status, StatusCode::OK);
    let rid = id_of(&second);
    wait_state(&sim, &rid, "FINISHED").await;
    let got = api.get(&format!("{IA}/refund/{rid}")).await.body;
    assert_eq!(got["state"], "FINISHED");
    assert_eq!(got["device_id"], DEV);
    let p = api.get(&format!("/v1/payments/{pid}")).await.body;
    assert_eq!(p["status"], "refunded");
    assert_eq!(p["transaction_amount_refunded"].as_f64(), Some(20.0));
    // After ON_TERMINAL the API cannot cancel it, and a refunded payment takes no second refund intent.
    assert_eq!(
        api.post(&format!("{IA}/devices/{DEV}/refund"), body)
            .await
            .status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        api.get(&format!("{IA}/refund/{}", "nope")).await.status,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn confirmation_required_has_an_in_process_payment_that_can_be_scripted() {
    let (sim, api) = start(Site::MLA, TerminalMode::Manual).await;
    let id = id_of(&api.create(DEV, mla_body(1500, "cr")).await);
    sim.advance(&id, "PROCESSING").expect("advance");
    sim.advance(&id, "CONFIRMATION_REQUIRED").expect("advance");
    let got = api.get(&format!("{IA}/payment-intents/{id}")).await.body;
    assert_eq!(got["state"], "CONFIRMATION_REQUIRED");
    let pid = got["payment"]["id"]
        .as_str()
        .expect("payment id")
        .to_string();
    assert_eq!(
        api.get(&format!("/v1/payments/{pid}")).await.body["status"],
        "in_process"
    );
    sim.set_payment_status(&pid, "approved", "accredited");
    assert_eq!(
        api.get(&format!("/v1/payments/{pid}")).await.body["status"],
        "approved"
    );
    // Final states do not move; unknown states and ids are refused.
    assert!(sim.advance(&id, "FINISHED").is_err());
    assert!(sim.advance(&id, "NOPE").is_err());
    assert!(sim.advance("nope", "FINISHED").is_err());
    assert!(sim
        .try_set_payment_status("1", "approved", "accredited")
        .is_err());
}

#[tokio::test]
async fn intents_left_waiting_are_abandoned() {
    let cfg = SimConfig {
        abandon_after: Duration::from_millis(50),
        ..config(Site::MLA, TerminalMode::Manual)
    };
    let sim = sim::start(cfg).await.expect("starts");
    let api = Api::new(&sim);
    let waiting = id_of(&api.create(DEV, mla_body(1500, "w")).await);
    let processing = id_of(&api.create("SIM_A910__0002", mla_body(1500, "p")).await);
    sim.advance(&processing, "PROCESSING").expect("advance");
    wait_state(&sim, &waiting, "ABANDONED").await;
    assert_eq!(
        sim.intent(&processing).map(|v| v.state),
        Some("PROCESSING".to_string())
    );
    assert_eq!(
        api.create(DEV, mla_body(1500, "w2")).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn the_control_endpoint_scripts_the_same_operations() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("ca.pem");
    let cfg = SimConfig {
        control: Some(([127, 0, 0, 1], 0).into()),
        ca_out: Some(ca.clone()),
        ..config(Site::MLA, fast())
    };
    let sim = sim::start(cfg).await.expect("starts");
    assert_eq!(
        std::fs::read_to_string(&ca).expect("CA written"),
        sim.ca_pem()
    );
    assert_eq!(sim.ca_path(), Some(ca));
    let api = Api::new(&sim);
    let control = sim.control_url().expect("control url");
    let plain = Client::new();
    let post = |path: &str, body: Value| plain.post(format!("{control}{path}")).json(&body).send();

    assert_eq!(
        post("/control/mode", json!({"manual": true}))
            .await
            .expect("sent")
            .status(),
        StatusCode::OK
    );
    let id = id_of(&api.create(DEV, mla_body(1500, "ctl")).await);
    let r = post(
        "/control/advance",
        json!({"intent_id": id, "to": "ON_TERMINAL"}),
    )
    .await
    .expect("sent");
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(sim.intent(&id).map(|v| v.state), Some("ON_TERMINAL".into()));
    let r = post(
        "/control/advance",
        json!({"intent_id": "nope", "to": "FINISHED"}),
    )
    .await
    .expect("sent");
    assert_eq!(r.status(), StatusCode::NOT_FOUND);

    let r = post(
        "/control/fault",
        json!({"fault": "too_many", "retry_after_s": 3, "remaining": 1, "scope": "creates"}),
    )
    .await
    .expect("sent");
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        api.get(&format!("{IA}/devices")).await.status,
        StatusCode::OK
    );
    assert_eq!(
        api.create("SIM_A910__0002", mla_body(1500, "x"))
            .await
            .status,
        StatusCode::TOO_MANY_REQUESTS
    );
    let bogus = post("/control/fault", json!({"fault": "bogus"}))
        .await
        .expect("sent");
    assert!(bogus.status().is_client_error());

    post(
        "/control/mode",
        json!({"auto": {"pickup_ms": 1, "process_ms": 3}}),
    )
    .await
    .expect("sent");
    wait_state(&sim, &id, "FINISHED").await;
    post(
        "/control/device-mode",
        json!({"device": DEV, "mode": "STANDALONE"}),
    )
    .await
    .expect("sent");
    assert_eq!(
        api.create(DEV, mla_body(1500, "y")).await.status,
        StatusCode::BAD_REQUEST
    );
    post("/control/serve-lists", json!({"on": false}))
        .await
        .expect("sent");
    assert_eq!(
        api.get(&format!("{IA}/payment-intents/{id}/events"))
            .await
            .status,
        StatusCode::NOT_FOUND
    );

    let ledger: Value = plain
        .get(format!("{control}/control/ledger"))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    assert_eq!(ledger["entries"][0]["external_reference"], "ctl");
    assert_eq!(ledger["duplicated_references"], json!([]));
    let intents: Value = plain
        .get(format!("{control}/control/intents"))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    assert_eq!(intents[0]["state"], "FINISHED");
    assert_eq!(intents[0]["kind"], "payment");
    sim.shutdown();
}

#[tokio::test]
async fn the_request_log_records_method_path_and_status() {
    let (sim, api) = start(Site::MLA, TerminalMode::Manual).await;
    api.get(&format!("{IA}/devices")).await;
    api.send(Method::GET, "/v1/payments/5", Some("bad"), None, None)
        .await
        .expect("answered");
    let log = sim.requests();
    assert_eq!(sim.request_count(), 2);
    assert_eq!(
        (log[0].method.as_str(), log[0].path.as_str(), log[0].status),
        ("GET", "/point/integration-api/devices", 200)
    );
    assert_eq!(
        (log[1].path.as_str(), log[1].status),
        ("/v1/payments/5", 401)
    );
    assert!(log[0].at_unix_ms <= log[1].at_unix_ms);
}

#[tokio::test]
async fn thousands_of_intents_run_on_timers() {
    let devices: Vec<String> = (0..2000).map(|i| format!("SIM_LOAD__{i:04}")).collect();
    let cfg = SimConfig {
        devices: devices.clone(),
        ..config(Site::MLA, fast())
    };
    let sim = sim::start(cfg).await.expect("starts");
    let api = Api::new(&sim);
    for d in &devices {
        assert_eq!(
            api.create(d, mla_body(1500, d)).await.status,
            StatusCode::OK
        );
    }
    for _ in 0..1000 {
        if sim.intents().iter().all(|v| v.state == "FINISHED") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(sim.intents().iter().all(|v| v.state == "FINISHED"));
    assert_eq!(sim.ledger().len(), 2000);
    assert!(sim.duplicated_references().is_empty());
}
