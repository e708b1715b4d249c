//! The shared HTTP client of the Point backends: rustls only, built-in web roots plus
//! `point.extra_ca_file`, bearer token from its file, per-request timeout, and every
//! failure mapped to `ApiError` with status, Mercado Pago's error body and `x-request-id`.
