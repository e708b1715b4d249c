//! The Point Integrations API (payment intents), complete, and the payments API
//! endpoints the engine needs. Implements `PointBackend`.
//!
//! Two layers:
//! - `IntegrationsClient`'s inherent methods speak the raw API: one method per endpoint,
//!   the API's own field names, answers read leniently (`lenient`): ids as strings or
//!   numbers, unknown states kept raw, every field optional except the ids a caller
//!   cannot do without.
//! - `impl PointBackend` maps those to the normalized types of `point`.
//!
//! Strict sending: a payment intent body is built by `PaymentIntentBody::for_site` and
//! checked again by `check_intent_body` before it leaves, so a site never receives a
//! field it does not have (`ticket_number` is MLA only, `description` and `payment` MLB
//! only), and an amount outside the site's range, an MLA intent without a ticket number,
//! or an MLB `payment` object breaking its rules is refused (`ApiError::Invalid`) before
//! any request. The per-site facts are in `site_rules`, a pure function the station
//! validator can share.
//!
//! Listing by date (`.../payment-intents/events`) was removed from the public reference
//! in 2023 and may not be served. `list_intent_events` returns `Ok(None)` when that
//! endpoint answers 404 or 405: the path has no id in it, so a 404 there can only mean
//! "not served" (on a server without the route, `events` may also be read as an intent
//! id that does not exist, which gives the same 404). Any other failure is an error.

// `ApiError` (the shared seam in `point`) is large because `Status` keeps everything an
// operator needs; errors are rare next to the request they describe, so it is not boxed.
#![allow(clippy::result_large_err)]

use std::collections::HashSet;

use serde::{Deserialize, Serialize};
use time::format_description::well_known::Rfc3339;
use time::macros::format_description;
use time::{Date, OffsetDateTime, PrimitiveDateTime};

pub mod classify;
pub mod reconcile;

use std::future::Future;
use std::time::Duration;

use crate::domain::command::MlbPayment;
use crate::domain::remote::{Candidate, Failure};
use crate::money::{Cents, Site};
use crate::point::http::HttpClient;
use crate::point::lenient::{
    cents_to_major_units, null_as_empty, opt_bool, opt_major_units, opt_string, opt_u64, or_none,
    string_or_number,
};
use crate::point::{
    ApiError, CreateCharge, Device, ListedCharge, Payment, Phase, PointBackend, Refund,
    RemoteCharge,
};

const API: &str = "point";
const INTEGRATION: &str = "integration-api";
/// Page size of the device listing (the documented examples use 50).
pub const DEVICE_PAGE: u32 = 50;
/// A bound on device pages, in case a server ignores `offset` in a way we cannot see.
const MAX_DEVICE_PAGES: usize = 100;

// ---------------------------------------------------------------------------------------
// Per-site rules (pure). TODO(money): move to `Site::limits()` in src/money.rs.
// ---------------------------------------------------------------------------------------

/// What a site's payment intent accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SiteRules {
    /// Smallest amount, in cents, inclusive.
    pub min_amount: Cents,
    /// Largest amount, in cents, inclusive.
    pub max_amount: Cents,
    /// `additional_info.ticket_number`: MLA only, and required there.
    pub ticket_number: bool,
    /// `description`: MLB only.
    pub description: bool,
    /// `payment` (type, installments...): MLB only.
    pub payment: bool,
}

/// The documented per-site rules of a payment intent (see the API notes, section 2.3).
pub const fn site_rules(site: Site) -> SiteRules {
    match site {
        Site::MLA => SiteRules {
            min_amount: Cents(500),
            max_amount: Cents(400_000_000),
            ticket_number: true,
            description: false,
            payment: false,
        },
        Site::MLB => SiteRules {
            min_amount: Cents(100),
            max_amount: Cents(7_000_000),
            ticket_number: false,
            description: true,
            payment: true,
        },
        Site::MLM => SiteRules {
            min_amount: Cents(500),
            max_amount: Cents(35_000_000),
            ticket_number: false,
            description: false,
            payment: false,
        },
    }
}

/// The amount is within the site's range.
pub fn check_amount(site: Site, amount: Cents) -> Result<(), String> {
    let rules = site_rules(site);
    if amount < rules.min_amount || amount > rules.max_amount {
        return Err(format!(
            "amount {} cents is outside {site:?}'s range {}..={} cents",
            amount.0, rules.min_amount.0, rules.max_amount.0
        ));
    }
    Ok(())
}

/// MLB's `payment` object: a known type; installments (1..=72) and installments_cost
/// (`seller`/`buyer`) only with `credit_card`; voucher_type (`sodexo`/`alelo`) only with
/// `voucher_card`.
pub fn check_mlb_payment(payment: &MlbPayment) -> Result<(), String> {
    let credit = payment.kind == "credit_card";
    let voucher = payment.kind == "voucher_card";
    if !matches!(
        payment.kind.as_str(),
        "credit_card" | "debit_card" | "voucher_card"
    ) {
        return Err(format!(
            "payment.type {:?} is not credit_card, debit_card or voucher_card",
            payment.kind
        ));
    }
    if let Some(n) = payment.installments {
        if !credit {
            return Err("payment.installments is only allowed with credit_card".to_string());
        }
        if !(1..=72).contains(&n) {
            return Err(format!("payment.installments {n} is outside 1..=72"));
        }
    }
    if let Some(cost) = &payment.installments_cost {
        if !credit {
            return Err("payment.installments_cost is only allowed with credit_card".to_string());
        }
        if !matches!(cost.as_str(), "seller" | "buyer") {
            return Err(format!(
                "payment.installments_cost {cost:?} is not seller or buyer"
            ));
        }
    }
    if let Some(kind) = &payment.voucher_type {
        if !voucher {
            return Err("payment.voucher_type is only allowed with voucher_card".to_string());
        }
        if !matches!(kind.as_str(), "sodexo" | "alelo") {
            return Err(format!(
                "payment.voucher_type {kind:?} is not sodexo or alelo"
            ));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Request bodies (what we send: strict).
// ---------------------------------------------------------------------------------------

/// `POST .../devices/{id}/payment-intents` body. Build it with `for_site`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PaymentIntentBody {
    /// Cents.
    pub amount: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payment: Option<MlbPayment>,
    pub additional_info: IntentInfoBody,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IntentInfoBody {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub external_reference: Option<String>,
    pub print_on_terminal: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ticket_number: Option<String>,
}

impl PaymentIntentBody {
    /// The body `site` accepts for `req`. Fields the site does not have are left out
    /// (`description` outside MLB, `ticket_number` outside MLA); a `payment` outside MLB,
    /// a missing MLA ticket number or an out-of-range amount is refused.
    pub fn for_site(site: Site, req: &CreateCharge) -> Result<PaymentIntentBody, ApiError> {
        let rules = site_rules(site);
        let body = PaymentIntentBody {
            amount: req.amount.0,
            description: req.description.clone().filter(|_| rules.description),
            payment: req.payment.clone(),
            additional_info: IntentInfoBody {
                external_reference: Some(req.external_reference.clone()),
                print_on_terminal: req.print_on_terminal,
                ticket_number: req.ticket_number.clone().filter(|_| rules.ticket_number),
            },
        };
        check_intent_body(site, &body)?;
        Ok(body)
    }
}

/// Refuses a body `site` would not accept, or that carries a field `site` does not have.
pub fn check_intent_body(site: Site, body: &PaymentIntentBody) -> Result<(), ApiError> {
    let rules = site_rules(site);
    check_amount(site, Cents(body.amount)).map_err(ApiError::Invalid)?;
    let ticket = body.additional_info.ticket_number.as_deref();
    if rules.ticket_number && ticket.is_none_or(|t| t.trim().is_empty()) {
        return Err(ApiError::Invalid(format!(
            "{site:?} requires additional_info.ticket_number"
        )));
    }
    if !rules.ticket_number && ticket.is_some() {
        return Err(ApiError::Invalid(format!(
            "{site:?} has no additional_info.ticket_number"
        )));
    }
    if !rules.description && body.description.is_some() {
        return Err(ApiError::Invalid(format!("{site:?} has no description")));
    }
    match &body.payment {
        Some(_) if !rules.payment => {
            Err(ApiError::Invalid(format!("{site:?} has no payment object")))
        }
        Some(payment) => check_mlb_payment(payment).map_err(ApiError::Invalid),
        None => Ok(()),
    }
}

/// `PATCH .../devices/{id}` operating modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum OperatingMode {
    Pdv,
    Standalone,
}

/// Copies a refund intent prints (`additional_info.print_on_terminal`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TicketCopy {
    SellerTicket,
    BuyerTicket,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
struct RefundIntentBody<'a> {
    payment_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    additional_info: Option<RefundInfoBody<'a>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
struct RefundInfoBody<'a> {
    print_on_terminal: &'a [TicketCopy],
}

/// `POST /v1/payments/{id}/refunds` body: `{}` (full) or `{"amount": 12.34}` (partial).
pub fn payment_refund_body(amount: Option<Cents>) -> Result<serde_json::Value, ApiError> {
    let mut body = serde_json::Map::new();
    if let Some(amount) = amount {
        if amount.0 == 0 {
            return Err(ApiError::Invalid(
                "a partial refund needs an amount above zero".to_string(),
            ));
        }
        let major = cents_to_major_units(amount)
            .ok_or_else(|| ApiError::Invalid(format!("refund amount {} cents", amount.0)))?;
        body.insert("amount".to_string(), serde_json::Value::Number(major));
    }
    Ok(serde_json::Value::Object(body))
}

// ---------------------------------------------------------------------------------------
// Answers (what we accept: lenient).
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Paging {
    #[serde(default, deserialize_with = "opt_u64")]
    pub total: Option<u64>,
    #[serde(default, deserialize_with = "opt_u64")]
    pub offset: Option<u64>,
    #[serde(default, deserialize_with = "opt_u64")]
    pub limit: Option<u64>,
}

/// `GET .../devices` answer.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct DevicesPage {
    #[serde(default, deserialize_with = "null_as_empty")]
    pub devices: Vec<ApiDevice>,
    #[serde(default, deserialize_with = "or_none")]
    pub paging: Option<Paging>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ApiDevice {
    #[serde(deserialize_with = "string_or_number")]
    pub id: String,
    #[serde(default, deserialize_with = "opt_string")]
    pub pos_id: Option<String>,
    #[serde(default, deserialize_with = "opt_string")]
    pub store_id: Option<String>,
    #[serde(default, deserialize_with = "opt_string")]
    pub external_pos_id: Option<String>,
    #[serde(default, deserialize_with = "opt_string")]
    pub operating_mode: Option<String>,
}

/// Filters and paging of the device listing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceQuery {
    pub store_id: Option<String>,
    pub pos_id: Option<String>,
    pub limit: Option<u32>,
    pub offset: Option<u32>,
}

/// `PATCH .../devices/{id}` answer.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct OperatingModeAnswer {
    #[serde(default, deserialize_with = "opt_string")]
    pub operating_mode: Option<String>,
}

/// A payment intent as create and get return it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct PaymentIntent {
    #[serde(deserialize_with = "string_or_number")]
    pub id: String,
    /// Absent from the documented create answer.
    #[serde(default, deserialize_with = "opt_string")]
    pub state: Option<String>,
    #[serde(default, deserialize_with = "opt_string")]
    pub device_id: Option<String>,
    /// Cents.
    #[serde(default, deserialize_with = "opt_u64")]
    pub amount: Option<u64>,
    #[serde(default, deserialize_with = "opt_string")]
    pub description: Option<String>,
    #[serde(default, deserialize_with = "or_none")]
    pub payment: Option<IntentPayment>,
    #[serde(default, deserialize_with = "or_none")]
    pub additional_info: Option<IntentInfo>,
    #[serde(default, deserialize_with = "opt_string")]
    pub payment_mode: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct IntentPayment {
    /// The payment id: a string in the guide's examples, a number in the schema.
    #[serde(default, deserialize_with = "opt_string")]
    pub id: Option<String>,
    #[serde(default, rename = "type", deserialize_with = "opt_string")]
    pub kind: Option<String>,
    #[serde(default, deserialize_with = "opt_u64")]
    pub installments: Option<u64>,
    #[serde(default, deserialize_with = "opt_string")]
    pub installments_cost: Option<String>,
    #[serde(default, deserialize_with = "opt_string")]
    pub voucher_type: Option<String>,
    /// Webhook bodies only (`approved`, ...).
    #[serde(default, deserialize_with = "opt_string")]
    pub state: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct IntentInfo {
    #[serde(default, deserialize_with = "opt_string")]
    pub external_reference: Option<String>,
    #[serde(default, deserialize_with = "opt_bool")]
    pub print_on_terminal: Option<bool>,
    #[serde(default, deserialize_with = "opt_string")]
    pub ticket_number: Option<String>,
}

/// `{ "id" }`, the answer of both cancel endpoints (more fields are ignored).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct IdAnswer {
    #[serde(default, deserialize_with = "opt_string")]
    pub id: Option<String>,
}

/// `GET .../payment-intents/events` answer.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct IntentEvents {
    #[serde(default, deserialize_with = "null_as_empty")]
    pub events: Vec<IntentEvent>,
}

/// One entry of the list by date. Note: `status`, not `state`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct IntentEvent {
    #[serde(deserialize_with = "string_or_number")]
    pub payment_intent_id: String,
    #[serde(default, deserialize_with = "opt_string")]
    pub status: Option<String>,
    #[serde(default, deserialize_with = "opt_string")]
    pub created_on: Option<String>,
}

/// `GET .../payment-intents/{id}/events` answer: the intent's last state.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct IntentLastEvent {
    #[serde(default, deserialize_with = "opt_string")]
    pub status: Option<String>,
    #[serde(default, deserialize_with = "opt_string")]
    pub created_on: Option<String>,
}

/// A refund intent (card-present refund on the terminal).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct RefundIntent {
    #[serde(deserialize_with = "string_or_number")]
    pub id: String,
    #[serde(default, deserialize_with = "opt_string")]
    pub state: Option<String>,
    #[serde(default, deserialize_with = "opt_string")]
    pub device_id: Option<String>,
    #[serde(default, deserialize_with = "opt_string")]
    pub payment_id: Option<String>,
    #[serde(default, deserialize_with = "or_none")]
    pub additional_info: Option<RefundInfo>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct RefundInfo {
    /// `SELLER_TICKET`, `BUYER_TICKET`, kept as given.
    #[serde(default, deserialize_with = "or_none")]
    pub print_on_terminal: Option<Vec<String>>,
}

/// A payment from the payments API (the fields pointgate uses).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ApiPayment {
    #[serde(deserialize_with = "string_or_number")]
    pub id: String,
    #[serde(default, deserialize_with = "opt_string")]
    pub status: Option<String>,
    #[serde(default, deserialize_with = "opt_string")]
    pub status_detail: Option<String>,
    /// `transaction_amount`, a decimal in major units, as cents.
    #[serde(default, deserialize_with = "opt_major_units")]
    pub transaction_amount: Option<Cents>,
    #[serde(default, deserialize_with = "opt_major_units")]
    pub transaction_amount_refunded: Option<Cents>,
    #[serde(default, deserialize_with = "opt_string")]
    pub currency_id: Option<String>,
    #[serde(default, deserialize_with = "opt_string")]
    pub external_reference: Option<String>,
    #[serde(default, deserialize_with = "opt_string")]
    pub payment_method_id: Option<String>,
    #[serde(default, deserialize_with = "opt_string")]
    pub payment_type_id: Option<String>,
    #[serde(default, deserialize_with = "opt_u64")]
    pub installments: Option<u64>,
    #[serde(default, deserialize_with = "opt_string")]
    pub date_created: Option<String>,
    #[serde(default, deserialize_with = "opt_string")]
    pub date_approved: Option<String>,
    #[serde(default, deserialize_with = "opt_string")]
    pub pos_id: Option<String>,
    #[serde(default, deserialize_with = "opt_string")]
    pub store_id: Option<String>,
}

/// `GET /v1/payments/search` answer.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct PaymentSearch {
    #[serde(default, deserialize_with = "null_as_empty")]
    pub results: Vec<ApiPayment>,
    #[serde(default, deserialize_with = "or_none")]
    pub paging: Option<Paging>,
}

/// `POST /v1/payments/{id}/refunds` answer.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ApiRefund {
    #[serde(deserialize_with = "string_or_number")]
    pub id: String,
    #[serde(default, deserialize_with = "opt_string")]
    pub payment_id: Option<String>,
    #[serde(default, deserialize_with = "opt_string")]
    pub status: Option<String>,
    /// `amount`, a decimal in major units, as cents.
    #[serde(default, deserialize_with = "opt_major_units")]
    pub amount: Option<Cents>,
}

/// `GET .../integrator` answer (device-event e-mail settings).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Integrator {
    #[serde(default, deserialize_with = "opt_string")]
    pub id: Option<String>,
    #[serde(default, deserialize_with = "opt_string")]
    pub created_at: Option<String>,
    #[serde(default, deserialize_with = "opt_string")]
    pub updated_at: Option<String>,
    #[serde(default, deserialize_with = "opt_bool")]
    pub notification_url_enabled: Option<bool>,
    #[serde(default, deserialize_with = "or_none")]
    pub event_channel_devices: Option<Vec<String>>,
}

// ---------------------------------------------------------------------------------------
// Mapping helpers (pure).
// ---------------------------------------------------------------------------------------

/// An intent state (or an events `status`) as a `Phase`; case-insensitive, `CANCELLED`
/// accepted for `CANCELED`, anything else `Unknown`.
pub fn phase_of(raw: &str) -> Phase {
    match raw.trim().to_ascii_uppercase().as_str() {
        "OPEN" => Phase::Open,
        "ON_TERMINAL" => Phase::OnTerminal,
        "PROCESSING" | "PROCESSED" => Phase::Processing,
        "FINISHED" | "CONFIRMATION_REQUIRED" => Phase::Ended,
        "CANCELED" | "CANCELLED" => Phase::Canceled,
        "ERROR" => Phase::Error,
        "ABANDONED" => Phase::Abandoned,
        _ => Phase::Unknown,
    }
}

/// An API time as Unix seconds: RFC 3339 (`2021-08-30T22:37:57Z`), or the webhook's
/// `2021-11-29 17:10:37` read as UTC.
pub fn parse_api_time(text: &str) -> Option<i64> {
    let text = text.trim();
    if let Ok(t) = OffsetDateTime::parse(text, &Rfc3339) {
        return Some(t.unix_timestamp());
    }
    let naive = format_description!("[year]-[month]-[day] [hour]:[minute]:[second]");
    PrimitiveDateTime::parse(text, naive)
        .ok()
        .map(|t| t.assume_utc().unix_timestamp())
}

fn ymd(date: Date) -> String {
    format!(
        "{:04}-{:02}-{:02}",
        date.year(),
        u8::from(date.month()),
        date.day()
    )
}

/// The normalized view of an intent (payment or refund: they share their states).
/// `default_state` stands in for a missing `state` (a create answer has none: a
/// just-created intent is `OPEN`). The fields only one kind carries are left empty.
fn remote_view(
    id: &str,
    state: Option<&str>,
    default_state: Option<&str>,
    terminal: Option<&String>,
) -> RemoteCharge {
    let raw_state = state.or(default_state).unwrap_or_default().to_string();
    RemoteCharge {
        id: id.to_string(),
        phase: phase_of(&raw_state),
        raw_state,
        terminal: terminal.cloned(),
        amount: None,
        external_reference: None,
        payment_id: None,
    }
}

impl PaymentIntent {
    /// The normalized view (see [`remote_view`]).
    pub fn to_remote(&self, default_state: Option<&str>) -> RemoteCharge {
        RemoteCharge {
            amount: self.amount.map(Cents),
            external_reference: self
                .additional_info
                .as_ref()
                .and_then(|i| i.external_reference.clone()),
            payment_id: self.payment.as_ref().and_then(|p| p.id.clone()),
            ..remote_view(
                &self.id,
                self.state.as_deref(),
                default_state,
                self.device_id.as_ref(),
            )
        }
    }
}

impl RefundIntent {
    /// The normalized view (see [`remote_view`]).
    pub fn to_remote(&self, default_state: Option<&str>) -> RemoteCharge {
        RemoteCharge {
            payment_id: self.payment_id.clone(),
            ..remote_view(
                &self.id,
                self.state.as_deref(),
                default_state,
                self.device_id.as_ref(),
            )
        }
    }
}

impl From<ApiPayment> for Payment {
    fn from(p: ApiPayment) -> Payment {
        Payment {
            id: p.id,
            status: p.status.unwrap_or_default(),
            status_detail: p.status_detail,
            amount: p.transaction_amount,
            refunded: p.transaction_amount_refunded,
            external_reference: p.external_reference,
        }
    }
}

impl From<ApiDevice> for Device {
    fn from(d: ApiDevice) -> Device {
        Device {
            id: d.id,
            operating_mode: d.operating_mode,
            store_id: d.store_id,
            pos_id: d.pos_id,
            external_pos_id: d.external_pos_id,
        }
    }
}

impl From<IntentEvent> for ListedCharge {
    fn from(e: IntentEvent) -> ListedCharge {
        ListedCharge {
            created_unix: e.created_on.as_deref().and_then(parse_api_time),
            id: e.payment_intent_id,
            raw_state: e.status.unwrap_or_default(),
        }
    }
}

// ---------------------------------------------------------------------------------------
// The client.
// ---------------------------------------------------------------------------------------

/// The Integrations API for one site's account.
#[derive(Debug, Clone)]
pub struct IntegrationsClient {
    http: HttpClient,
    site: Site,
}

impl IntegrationsClient {
    pub fn new(http: HttpClient, site: Site) -> IntegrationsClient {
        IntegrationsClient { http, site }
    }

    pub fn http(&self) -> &HttpClient {
        &self.http
    }

    pub fn site(&self) -> Site {
        self.site
    }

    /// `GET /point/integration-api/devices`, one page.
    pub async fn list_devices_page(&self, query: &DeviceQuery) -> Result<DevicesPage, ApiError> {
        let limit = query.limit.map(|n| n.to_string());
        let offset = query.offset.map(|n| n.to_string());
        let pairs: Vec<(&str, &str)> = [
            ("store_id", query.store_id.as_deref()),
            ("pos_id", query.pos_id.as_deref()),
            ("limit", limit.as_deref()),
            ("offset", offset.as_deref()),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k, v)))
        .collect();
        let url = self
            .http
            .url_with_query(&[API, INTEGRATION, "devices"], &pairs)?;
        self.http.get(url).await
    }

    /// Every device, walking the pages (`DEVICE_PAGE` per page). Stops at an empty page,
    /// at `paging.total`, at a short page when there is no `paging`, or when a page
    /// brings no new id (a server that ignores `offset`).
    pub async fn list_all_devices(
        &self,
        store_id: Option<&str>,
        pos_id: Option<&str>,
    ) -> Result<Vec<ApiDevice>, ApiError> {
        let mut all: Vec<ApiDevice> = Vec::new();
        let mut seen = HashSet::new();
        for _ in 0..MAX_DEVICE_PAGES {
            let offset = u32::try_from(all.len()).unwrap_or(u32::MAX);
            let query = DeviceQuery {
                store_id: store_id.map(str::to_string),
                pos_id: pos_id.map(str::to_string),
                limit: Some(DEVICE_PAGE),
                offset: Some(offset),
            };
            let page = self.list_devices_page(&query).await?;
            let got = page.devices.len();
            let before = all.len();
            for device in page.devices {
                if seen.insert(device.id.clone()) {
                    all.push(device);
                }
            }
            if !more_device_pages(page.paging.as_ref(), before, got, all.len() - before) {
                return Ok(all);
            }
        }
        Err(ApiError::Decode {
            method: "GET",
            path: "/point/integration-api/devices".to_string(),
            message: format!("device paging did not end after {MAX_DEVICE_PAGES} pages"),
        })
    }

    /// `PATCH /point/integration-api/devices/{id}`. The device must restart to apply it.
    pub async fn set_operating_mode(
        &self,
        device_id: &str,
        mode: OperatingMode,
    ) -> Result<OperatingModeAnswer, ApiError> {
        #[derive(Serialize)]
        struct Body {
            operating_mode: OperatingMode,
        }
        let url = self.http.url(&[API, INTEGRATION, "devices", device_id])?;
        self.http
            .patch(
                url,
                &Body {
                    operating_mode: mode,
                },
            )
            .await
    }

    /// `POST /point/integration-api/devices/{id}/payment-intents`, after checking the
    /// body against this client's site (refused with `Invalid` before sending).
    pub async fn create_payment_intent(
        &self,
        device_id: &str,
        body: &PaymentIntentBody,
    ) -> Result<PaymentIntent, ApiError> {
        check_intent_body(self.site, body)?;
        let url = self
            .http
            .url(&[API, INTEGRATION, "devices", device_id, "payment-intents"])?;
        self.http.post(url, body).await
    }

    /// `GET /point/integration-api/payment-intents/{id}` (intents up to 3 months old).
    pub async fn get_payment_intent(&self, id: &str) -> Result<PaymentIntent, ApiError> {
        let url = self.http.url(&[API, INTEGRATION, "payment-intents", id])?;
        self.http.get(url).await
    }

    /// `DELETE /point/integration-api/devices/{device}/payment-intents/{id}`: only while
    /// `OPEN`; 409 once the terminal has it.
    pub async fn cancel_payment_intent(
        &self,
        device_id: &str,
        id: &str,
    ) -> Result<IdAnswer, ApiError> {
        let url = self.http.url(&[
            API,
            INTEGRATION,
            "devices",
            device_id,
            "payment-intents",
            id,
        ])?;
        self.http.delete(url).await
    }

    /// `GET /point/integration-api/payment-intents/events?startDate=&endDate=` (at most
    /// 30 days). `Ok(None)` when the endpoint answers 404 or 405 (not served; see `//!`).
    pub async fn list_intent_events(
        &self,
        start: Date,
        end: Date,
    ) -> Result<Option<IntentEvents>, ApiError> {
        let (start, end) = (ymd(start), ymd(end));
        let url = self.http.url_with_query(
            &[API, INTEGRATION, "payment-intents", "events"],
            &[("startDate", start.as_str()), ("endDate", end.as_str())],
        )?;
        match self.http.get(url).await {
            Ok(events) => Ok(Some(events)),
            Err(e) if matches!(e.status(), Some(404) | Some(405)) => {
                tracing::warn!(status = e.status(), "intent list by date is not served");
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// `GET /point/integration-api/payment-intents/{id}/events`: the last state.
    pub async fn intent_last_event(&self, id: &str) -> Result<IntentLastEvent, ApiError> {
        let url = self
            .http
            .url(&[API, INTEGRATION, "payment-intents", id, "events"])?;
        self.http.get(url).await
    }

    /// `POST /point/integration-api/devices/{device}/refund`: a full, card-present refund
    /// on the terminal that took the payment. `payment_id` must be digits.
    pub async fn create_refund_intent(
        &self,
        device_id: &str,
        payment_id: &str,
        print_on_terminal: &[TicketCopy],
    ) -> Result<RefundIntent, ApiError> {
        let url = self
            .http
            .url(&[API, INTEGRATION, "devices", device_id, "refund"])?;
        self.http
            .post(url, &refund_intent_body(payment_id, print_on_terminal)?)
            .await
    }

    /// `GET /point/integration-api/refund/{id}`.
    pub async fn get_refund_intent(&self, id: &str) -> Result<RefundIntent, ApiError> {
        let url = self.http.url(&[API, INTEGRATION, "refund", id])?;
        self.http.get(url).await
    }

    /// `DELETE /point/integration-api/devices/{device}/refund/{id}`: only while `OPEN`
    /// (or `ON_TERMINAL` for a contactless refund).
    pub async fn cancel_refund_intent(
        &self,
        device_id: &str,
        id: &str,
    ) -> Result<IdAnswer, ApiError> {
        let url = self
            .http
            .url(&[API, INTEGRATION, "devices", device_id, "refund", id])?;
        self.http.delete(url).await
    }

    /// `GET /v1/payments/{id}`.
    pub async fn get_api_payment(&self, id: &str) -> Result<ApiPayment, ApiError> {
        let url = self.http.url(&["v1", "payments", id])?;
        self.http.get(url).await
    }

    /// `GET /v1/payments/search?external_reference=...`.
    pub async fn search_api_payments(
        &self,
        external_reference: &str,
    ) -> Result<PaymentSearch, ApiError> {
        let url = self.http.url_with_query(
            &["v1", "payments", "search"],
            &[("external_reference", external_reference)],
        )?;
        self.http.get(url).await
    }

    /// `POST /v1/payments/{id}/refunds` with `X-Idempotency-Key`: full when `amount` is
    /// `None`, else partial (sent in major units).
    pub async fn create_payment_refund(
        &self,
        payment_id: &str,
        amount: Option<Cents>,
        idempotency_key: &str,
    ) -> Result<ApiRefund, ApiError> {
        if idempotency_key.trim().is_empty() {
            return Err(ApiError::Invalid(
                "a refund needs an idempotency key".to_string(),
            ));
        }
        let body = payment_refund_body(amount)?;
        let url = self.http.url(&["v1", "payments", payment_id, "refunds"])?;
        self.http.post_idempotent(url, &body, idempotency_key).await
    }

    /// `GET /point/integration-api/integrator`.
    pub async fn get_integrator(&self) -> Result<Integrator, ApiError> {
        let url = self.http.url(&[API, INTEGRATION, "integrator"])?;
        self.http.get(url).await
    }

    /// `PATCH /point/integration-api/integrator` (204). The API only accepts `email`.
    pub async fn set_integrator_channels(&self, channels: &[&str]) -> Result<(), ApiError> {
        #[derive(Serialize)]
        struct Body<'a> {
            event_channel_devices: &'a [&'a str],
        }
        let url = self.http.url(&[API, INTEGRATION, "integrator"])?;
        self.http
            .patch(
                url,
                &Body {
                    event_channel_devices: channels,
                },
            )
            .await
    }
}

/// The refund intent body: `payment_id` (digits) and, when copies are asked for,
/// `additional_info.print_on_terminal`.
fn refund_intent_body<'a>(
    payment_id: &'a str,
    print_on_terminal: &'a [TicketCopy],
) -> Result<RefundIntentBody<'a>, ApiError> {
    if payment_id.is_empty() || !payment_id.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ApiError::Invalid(format!(
            "payment_id {payment_id:?} is not a string of digits"
        )));
    }
    Ok(RefundIntentBody {
        payment_id,
        additional_info: (!print_on_terminal.is_empty())
            .then_some(RefundInfoBody { print_on_terminal }),
    })
}

/// Whether to ask for the page after one that started at `offset` and held `got`
/// devices, `new` of them not seen before.
fn more_device_pages(paging: Option<&Paging>, offset: usize, got: usize, new: usize) -> bool {
    if got == 0 || new == 0 {
        return false;
    }
    match paging.and_then(|p| p.total) {
        Some(total) => ((offset + got) as u64) < total,
        None => got >= DEVICE_PAGE as usize,
    }
}

impl PointBackend for IntegrationsClient {
    fn failure(&self, e: &ApiError, creating: bool) -> Failure {
        classify::failure(e, creating)
    }

    fn find_created(
        &self,
        from_ms: i64,
        until_ms: i64,
        reference: &str,
        terminal: &str,
        pace: Duration,
    ) -> impl Future<Output = Result<Option<Vec<Candidate>>, ApiError>> + Send {
        reconcile::find_created(self, from_ms, until_ms, reference, terminal, pace)
    }

    async fn list_devices(&self) -> Result<Vec<Device>, ApiError> {
        let devices = self.list_all_devices(None, None).await?;
        Ok(devices.into_iter().map(Device::from).collect())
    }

    async fn create_charge(&self, req: &CreateCharge) -> Result<RemoteCharge, ApiError> {
        let body = PaymentIntentBody::for_site(self.site, req)?;
        let intent = self.create_payment_intent(&req.terminal, &body).await?;
        let mut charge = intent.to_remote(Some("OPEN"));
        // The documented answer echoes the request; fill what it left out from it.
        charge.terminal.get_or_insert_with(|| req.terminal.clone());
        charge.amount.get_or_insert(req.amount);
        charge
            .external_reference
            .get_or_insert_with(|| req.external_reference.clone());
        Ok(charge)
    }

    async fn get_charge(&self, id: &str) -> Result<RemoteCharge, ApiError> {
        Ok(self.get_payment_intent(id).await?.to_remote(None))
    }

    async fn cancel_charge(&self, terminal: &str, id: &str) -> Result<(), ApiError> {
        self.cancel_payment_intent(terminal, id).await.map(|_| ())
    }

    async fn list_charges_on(&self, date: Date) -> Result<Option<Vec<ListedCharge>>, ApiError> {
        let listed = self.list_intent_events(date, date).await?;
        Ok(listed.map(|l| l.events.into_iter().map(ListedCharge::from).collect()))
    }

    async fn get_payment(&self, id: &str) -> Result<Payment, ApiError> {
        Ok(self.get_api_payment(id).await?.into())
    }

    async fn search_payments(&self, external_reference: &str) -> Result<Vec<Payment>, ApiError> {
        let found = self.search_api_payments(external_reference).await?;
        Ok(found.results.into_iter().map(Payment::from).collect())
    }

    async fn create_refund_on_terminal(
        &self,
        terminal: &str,
        payment_id: &str,
    ) -> Result<RemoteCharge, ApiError> {
        let intent = self.create_refund_intent(terminal, payment_id, &[]).await?;
        let mut remote = intent.to_remote(Some("OPEN"));
        remote.terminal.get_or_insert_with(|| terminal.to_string());
        remote
            .payment_id
            .get_or_insert_with(|| payment_id.to_string());
        Ok(remote)
    }

    async fn get_refund_on_terminal(&self, id: &str) -> Result<RemoteCharge, ApiError> {
        Ok(self.get_refund_intent(id).await?.to_remote(None))
    }

    async fn cancel_refund_on_terminal(&self, terminal: &str, id: &str) -> Result<(), ApiError> {
        self.cancel_refund_intent(terminal, id).await.map(|_| ())
    }

    async fn refund_payment(
        &self,
        payment_id: &str,
        amount: Option<Cents>,
        idempotency_key: &str,
    ) -> Result<Refund, ApiError> {
        let refund = self
            .create_payment_refund(payment_id, amount, idempotency_key)
            .await?;
        Ok(Refund {
            id: refund.id,
            status: refund.status,
            amount: refund.amount,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn charge() -> CreateCharge {
        CreateCharge {
            terminal: "PAX_A910__SMARTPOS1234345545".into(),
            amount: Cents(1500),
            external_reference: "store-0001-st1-r42".into(),
            description: Some("2 coffees".into()),
            ticket_number: Some("S0392JED".into()),
            print_on_terminal: true,
            payment: None,
            idempotency_key: None,
        }
    }

    fn body_json(site: Site, req: &CreateCharge) -> serde_json::Value {
        serde_json::to_value(PaymentIntentBody::for_site(site, req).unwrap()).unwrap()
    }

    fn invalid(site: Site, req: &CreateCharge) -> String {
        match PaymentIntentBody::for_site(site, req) {
            Err(ApiError::Invalid(m)) => m,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn mla_body_has_ticket_number_and_nothing_of_mlb() {
        assert_eq!(
            body_json(Site::MLA, &charge()),
            json!({"amount":1500,"additional_info":{"external_reference":"store-0001-st1-r42","print_on_terminal":true,"ticket_number":"S0392JED"}})
        );
    }

    #[test]
    fn mla_refuses_to_send_without_a_ticket_number() {
        let mut req = charge();
        req.ticket_number = None;
        assert!(invalid(Site::MLA, &req).contains("ticket_number"));
        req.ticket_number = Some(" ".into());
        assert!(invalid(Site::MLA, &req).contains("ticket_number"));
    }

    #[test]
    fn mlb_body_has_description_and_payment_but_no_ticket_number() {
        let mut req = charge();
        req.payment = Some(MlbPayment {
            kind: "credit_card".into(),
            installments: Some(3),
            installments_cost: Some("buyer".into()),
            voucher_type: None,
        });
        assert_eq!(
            body_json(Site::MLB, &req),
            json!({"amount":1500,"description":"2 coffees",
                   "payment":{"type":"credit_card","installments":3,"installments_cost":"buyer"},
                   "additional_info":{"external_reference":"store-0001-st1-r42","print_on_terminal":true}})
        );
        req.payment = None;
        req.description = None;
        req.print_on_terminal = false;
        assert_eq!(
            body_json(Site::MLB, &req),
            json!({"amount":1500,"additional_info":{"external_reference":"store-0001-st1-r42","print_on_terminal":false}})
        );
    }

    #[test]
    fn mlm_body_has_only_the_common_fields() {
        assert_eq!(
            body_json(Site::MLM, &charge()),
            json!({"amount":1500,"additional_info":{"external_reference":"store-0001-st1-r42","print_on_terminal":true}})
        );
    }

    #[test]
    fn payment_object_is_refused_outside_mlb() {
        let mut req = charge();
        req.payment = Some(MlbPayment {
            kind: "debit_card".into(),
            installments: None,
            installments_cost: None,
            voucher_type: None,
        });
        assert!(invalid(Site::MLA, &req).contains("payment"));
        assert!(invalid(Site::MLM, &req).contains("payment"));
        assert!(PaymentIntentBody::for_site(Site::MLB, &req).is_ok());
    }

    #[test]
    fn mlb_payment_rules_are_enforced() {
        let p =
            |kind: &str, inst: Option<u8>, cost: Option<&str>, voucher: Option<&str>| MlbPayment {
                kind: kind.into(),
                installments: inst,
                installments_cost: cost.map(Into::into),
                voucher_type: voucher.map(Into::into),
            };
        assert!(check_mlb_payment(&p("credit_card", Some(72), Some("seller"), None)).is_ok());
        assert!(check_mlb_payment(&p("voucher_card", None, None, Some("alelo"))).is_ok());
        assert!(check_mlb_payment(&p("debit_card", None, None, None)).is_ok());
        for bad in [
            p("pix", None, None, None),
            p("debit_card", Some(2), None, None),
            p("debit_card", None, Some("seller"), None),
            p("credit_card", None, None, Some("sodexo")),
            p("credit_card", Some(0), None, None),
            p("credit_card", Some(73), None, None),
            p("credit_card", None, Some("nobody"), None),
            p("voucher_card", None, None, Some("ticket")),
            p("voucher_card", Some(1), None, Some("alelo")),
        ] {
            assert!(check_mlb_payment(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn amounts_outside_the_site_range_are_refused() {
        for (site, min, max) in [
            (Site::MLA, 500, 400_000_000),
            (Site::MLB, 100, 7_000_000),
            (Site::MLM, 500, 35_000_000),
        ] {
            let mut req = charge();
            for ok in [min, max] {
                req.amount = Cents(ok);
                assert!(
                    PaymentIntentBody::for_site(site, &req).is_ok(),
                    "{site:?} {ok}"
                );
            }
            for bad in [0, min - 1, max + 1] {
                req.amount = Cents(bad);
                assert!(invalid(site, &req).contains("range"), "{site:?} {bad}");
            }
        }
    }

    #[test]
    fn a_hand_built_body_with_a_foreign_field_is_refused() {
        let mut body = PaymentIntentBody::for_site(Site::MLA, &charge()).unwrap();
        assert!(check_intent_body(Site::MLB, &body).is_err());
        body.additional_info.ticket_number = None;
        body.description = Some("x".into());
        assert!(check_intent_body(Site::MLM, &body).is_err());
    }

    #[test]
    fn refund_bodies_are_exact() {
        assert_eq!(payment_refund_body(None).unwrap().to_string(), "{}");
        assert_eq!(
            payment_refund_body(Some(Cents(1234))).unwrap().to_string(),
            r#"{"amount":12.34}"#
        );
        assert_eq!(
            payment_refund_body(Some(Cents(500))).unwrap().to_string(),
            r#"{"amount":5}"#
        );
        assert!(matches!(
            payment_refund_body(Some(Cents(0))),
            Err(ApiError::Invalid(_))
        ));
        let body = refund_intent_body(
            "16499678033",
            &[TicketCopy::SellerTicket, TicketCopy::BuyerTicket],
        )
        .unwrap();
        assert_eq!(
            serde_json::to_value(&body).unwrap(),
            json!({"payment_id":"16499678033","additional_info":{"print_on_terminal":["SELLER_TICKET","BUYER_TICKET"]}})
        );
        let body = refund_intent_body("16499678033", &[]).unwrap();
        assert_eq!(
            serde_json::to_value(&body).unwrap(),
            json!({"payment_id":"16499678033"})
        );
        assert!(refund_intent_body("12a", &[]).is_err());
        assert!(refund_intent_body("", &[]).is_err());
    }

    #[test]
    fn device_list_reads_every_documented_shape() {
        let page: DevicesPage = serde_json::from_str(
            r#"{"devices":[{"id":"PAX_A910__SMARTPOS1234345545","pos_id":47792476,"store_id":"47792478","external_pos_id":"SUC0101POS","operating_mode":"PDV"}],
                "paging":{"total":1,"offset":0,"limit":50}}"#,
        )
        .unwrap();
        assert_eq!(
            Device::from(page.devices[0].clone()),
            Device {
                id: "PAX_A910__SMARTPOS1234345545".into(),
                operating_mode: Some("PDV".into()),
                store_id: Some("47792478".into()),
                pos_id: Some("47792476".into()),
                external_pos_id: Some("SUC0101POS".into()),
            }
        );
        assert_eq!(
            page.paging,
            Some(Paging {
                total: Some(1),
                offset: Some(0),
                limit: Some(50)
            })
        );
        // The schema example's numeric store_id; the PHP mock's empty external_pos_id.
        let page: DevicesPage = serde_json::from_str(
            r#"{"devices":[{"id":"GERTEC_MP35P__8701016695109435","store_id":47792478,"pos_id":"1","external_pos_id":""}]}"#,
        )
        .unwrap();
        let d = &page.devices[0];
        assert_eq!(
            (
                d.store_id.as_deref(),
                d.pos_id.as_deref(),
                d.external_pos_id.as_deref()
            ),
            (Some("47792478"), Some("1"), None)
        );
        assert_eq!(page.paging, None);
        // The 2021 draft: id only, no paging; and a null list.
        let page: DevicesPage = serde_json::from_str(r#"{"devices":[{"id":"X"}]}"#).unwrap();
        assert_eq!(page.devices[0].operating_mode, None);
        let page: DevicesPage = serde_json::from_str(r#"{"devices":null,"paging":"?"}"#).unwrap();
        assert!(page.devices.is_empty());
        assert!(
            serde_json::from_str::<DevicesPage>(r#"{"devices":[{"operating_mode":"PDV"}]}"#)
                .is_err()
        );
    }

    #[test]
    fn device_paging_stops_where_it_should() {
        let paging = |total| {
            Some(Paging {
                total: Some(total),
                offset: None,
                limit: None,
            })
        };
        assert!(more_device_pages(paging(120).as_ref(), 0, 50, 50));
        assert!(!more_device_pages(paging(120).as_ref(), 100, 20, 20));
        assert!(!more_device_pages(paging(50).as_ref(), 0, 50, 50));
        assert!(more_device_pages(None, 0, 50, 50));
        assert!(!more_device_pages(None, 0, 49, 49));
        assert!(!more_device_pages(None, 50, 0, 0));
        // A server ignoring offset returns the same page again: nothing new, stop.
        assert!(!more_device_pages(paging(500).as_ref(), 50, 50, 0));
    }

    #[test]
    fn intents_read_from_the_doc_examples() {
        // MLA get: payment.id as a string.
        let i: PaymentIntent = serde_json::from_str(
            r#"{"state":"FINISHED","id":"0aa0519d-d985-4e83-b62d-dda123456789","device_id":"INGENICO_MOVE2500__ING-ARG-14886780","amount":600,"payment":{"id":"11123456789"},"additional_info":{"external_reference":"ref-1","print_on_terminal":true,"ticket_number":"S0392JED"}}"#,
        )
        .unwrap();
        let r = i.to_remote(None);
        assert_eq!(r.phase, Phase::Ended);
        assert_eq!(r.raw_state, "FINISHED");
        assert_eq!(r.payment_id.as_deref(), Some("11123456789"));
        assert_eq!(r.amount, Some(Cents(600)));
        assert_eq!(r.external_reference.as_deref(), Some("ref-1"));
        assert_eq!(
            r.terminal.as_deref(),
            Some("INGENICO_MOVE2500__ING-ARG-14886780")
        );
        // payment.id as a number (schema, webhook).
        let i: PaymentIntent = serde_json::from_str(r#"{"id":"a","state":"CONFIRMATION_REQUIRED","payment":{"id":123456789,"state":"","type":""}}"#).unwrap();
        assert_eq!(i.to_remote(None).payment_id.as_deref(), Some("123456789"));
        assert_eq!(i.payment.unwrap().kind, None);
        // MLB get: payment without id.
        let i: PaymentIntent = serde_json::from_str(r#"{"state":"FINISHED","id":"b","amount":1500,"payment":{"type":"credit_card","installments":1}}"#).unwrap();
        assert_eq!(i.to_remote(None).payment_id, None);
    }

    #[test]
    fn create_answer_without_state_is_open() {
        let i: PaymentIntent = serde_json::from_str(
            r#"{"id":"7d8c70b6-2ac8-4c57-a441-c319088ca3ca","device_id":"INGENICO_MOVE2500__ING-ARG-14886780","amount":1500,"description":"this is an example","payment":{"type":"credit_card","installments":1,"installments_cost":"seller"},"additional_info":{"external_reference":"4561ads-das4das4-das4754-das456","print_on_terminal":true,"ticket_number":"S0392JED"}}"#,
        )
        .unwrap();
        let r = i.to_remote(Some("OPEN"));
        assert_eq!((r.phase, r.raw_state.as_str()), (Phase::Open, "OPEN"));
        let r = i.to_remote(None);
        assert_eq!((r.phase, r.raw_state.as_str()), (Phase::Unknown, ""));
    }

    #[test]
    fn odd_fields_do_not_break_an_intent() {
        let i: PaymentIntent = serde_json::from_str(
            r#"{"id":42,"state":"SOMETHING_NEW","amount":"1500","payment":"weird","additional_info":{"print_on_terminal":"true"},"payment_mode":"card","extra":{"a":1}}"#,
        )
        .unwrap();
        let r = i.to_remote(Some("OPEN"));
        assert_eq!(
            (r.id.as_str(), r.phase.clone(), r.raw_state.as_str()),
            ("42", Phase::Unknown, "SOMETHING_NEW")
        );
        assert_eq!(r.amount, Some(Cents(1500)));
        assert_eq!(i.payment, None);
        assert_eq!(i.additional_info.unwrap().print_on_terminal, Some(true));
        assert!(serde_json::from_str::<PaymentIntent>(r#"{"state":"OPEN"}"#).is_err());
    }

    #[test]
    fn states_map_to_phases() {
        for (raw, phase) in [
            ("OPEN", Phase::Open),
            ("on_terminal", Phase::OnTerminal),
            ("PROCESSING", Phase::Processing),
            ("Processed", Phase::Processing),
            ("FINISHED", Phase::Ended),
            ("Confirmation_required", Phase::Ended),
            ("CANCELED", Phase::Canceled),
            ("CANCELLED", Phase::Canceled),
            ("ERROR", Phase::Error),
            ("ABANDONED", Phase::Abandoned),
            ("EXPIRED", Phase::Unknown),
            ("", Phase::Unknown),
        ] {
            assert_eq!(phase_of(raw), phase, "{raw}");
        }
        // The .NET mock's cancel answer spells CANCELLED and carries extra fields.
        let i: PaymentIntent = serde_json::from_str(
            r#"{"id":"c","state":"CANCELLED","device_id":"d","payment_id":null}"#,
        )
        .unwrap();
        let r = i.to_remote(None);
        assert_eq!(
            (r.phase, r.raw_state.as_str()),
            (Phase::Canceled, "CANCELLED")
        );
        let a: IdAnswer = serde_json::from_str(
            r#"{"id":"c","state":"CANCELLED","device_id":"d","payment_id":1}"#,
        )
        .unwrap();
        assert_eq!(a.id.as_deref(), Some("c"));
    }

    #[test]
    fn intent_events_read_and_keep_raw_status() {
        let e: IntentEvents = serde_json::from_str(
            r#"{"events":[{"payment_intent_id":"51374ba8-1234","status":"FINISHED","created_on":"2021-08-30T22:37:57Z"},
                          {"payment_intent_id":"x2","status":"PROCESSING","created_on":"garbage"},
                          {"payment_intent_id":"x3"}]}"#,
        )
        .unwrap();
        let listed: Vec<ListedCharge> = e.events.into_iter().map(ListedCharge::from).collect();
        assert_eq!(
            listed[0],
            ListedCharge {
                id: "51374ba8-1234".into(),
                raw_state: "FINISHED".into(),
                created_unix: Some(1_630_363_077)
            }
        );
        assert_eq!(
            (listed[1].raw_state.as_str(), listed[1].created_unix),
            ("PROCESSING", None)
        );
        assert_eq!(
            (listed[2].raw_state.as_str(), listed[2].created_unix),
            ("", None)
        );
        let e: IntentEvents = serde_json::from_str(r#"{}"#).unwrap();
        assert!(e.events.is_empty());
        // An entry without an id fails the whole list: reconcile must not miss an intent.
        assert!(
            serde_json::from_str::<IntentEvents>(r#"{"events":[{"status":"FINISHED"}]}"#).is_err()
        );
        let last: IntentLastEvent =
            serde_json::from_str(r#"{"status":"FINISHED","created_on":"2021-09-03T20:59:10Z"}"#)
                .unwrap();
        assert_eq!(last.status.as_deref(), Some("FINISHED"));
        assert_eq!(parse_api_time("2021-11-29 17:10:37"), Some(1_638_205_837));
        assert_eq!(ymd(time::macros::date!(2026 - 01 - 05)), "2026-01-05");
    }

    #[test]
    fn payments_convert_amounts_to_cents() {
        let p: ApiPayment = serde_json::from_str(
            r#"{"id":16499678033,"status":"approved","status_detail":"accredited","transaction_amount":15.5,"transaction_amount_refunded":0,"external_reference":"r","currency_id":"ARS","refunds":[],"point_of_interaction":{"type":"POINT"}}"#,
        )
        .unwrap();
        assert_eq!(
            Payment::from(p),
            Payment {
                id: "16499678033".into(),
                status: "approved".into(),
                status_detail: Some("accredited".into()),
                amount: Some(Cents(1550)),
                refunded: Some(Cents(0)),
                external_reference: Some("r".into()),
            }
        );
        let p: ApiPayment =
            serde_json::from_str(r#"{"id":"1","transaction_amount":"0.29"}"#).unwrap();
        assert_eq!((p.transaction_amount, p.status), (Some(Cents(29)), None));
        let s: PaymentSearch = serde_json::from_str(r#"{"paging":{"total":1},"results":[{"id":1,"status":"rejected","transaction_amount":1234.56}]}"#).unwrap();
        assert_eq!(s.results[0].transaction_amount, Some(Cents(123456)));
        let s: PaymentSearch = serde_json::from_str(r#"{"results":null}"#).unwrap();
        assert!(s.results.is_empty());
        let r: ApiRefund = serde_json::from_str(
            r#"{"id":1234567,"payment_id":16499678033,"amount":12.34,"status":"approved"}"#,
        )
        .unwrap();
        assert_eq!(
            (r.id.as_str(), r.amount, r.payment_id.as_deref()),
            ("1234567", Some(Cents(1234)), Some("16499678033"))
        );
    }

    #[test]
    fn refund_intent_and_integrator_read() {
        let r: RefundIntent = serde_json::from_str(
            r#"{"id":"ri-1","state":"OPEN","device_id":"d","payment_id":16499678033,"additional_info":{"print_on_terminal":["SELLER_TICKET"]}}"#,
        )
        .unwrap();
        assert_eq!(r.payment_id.as_deref(), Some("16499678033"));
        assert_eq!(
            r.additional_info.unwrap().print_on_terminal,
            Some(vec!["SELLER_TICKET".to_string()])
        );
        let i: Integrator = serde_json::from_str(
            r#"{"id":123,"notification_url_enabled":false,"event_channel_devices":["email"]}"#,
        )
        .unwrap();
        assert_eq!(
            (i.id.as_deref(), i.event_channel_devices),
            (Some("123"), Some(vec!["email".to_string()]))
        );
    }

    #[test]
    fn a_refund_intent_normalizes_like_a_charge() {
        let r: RefundIntent =
            serde_json::from_str(r#"{"id":"ri-1","device_id":"d","payment_id":"16499678033"}"#)
                .unwrap();
        let open = r.to_remote(Some("OPEN"));
        assert_eq!(open.phase, Phase::Open);
        assert_eq!(open.payment_id.as_deref(), Some("16499678033"));
        assert_eq!(open.terminal.as_deref(), Some("d"));
        let r: RefundIntent = serde_json::from_str(r#"{"id":"ri-1","state":"FINISHED"}"#).unwrap();
        assert_eq!(r.to_remote(Some("OPEN")).phase, Phase::Ended);
        let r: RefundIntent = serde_json::from_str(r#"{"id":"ri-1","state":"ABANDONED"}"#).unwrap();
        assert_eq!(r.to_remote(None).phase, Phase::Abandoned);
    }

    #[test]
    fn operating_modes_serialize_as_the_api_spells_them() {
        assert_eq!(
            serde_json::to_string(&OperatingMode::Pdv).unwrap(),
            r#""PDV""#
        );
        assert_eq!(
            serde_json::to_string(&OperatingMode::Standalone).unwrap(),
            r#""STANDALONE""#
        );
    }
}
