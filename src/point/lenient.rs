//! Lenient readers for Mercado Pago's JSON: ids that arrive as strings or numbers,
//! optional fields of unexpected types, decimals in major units turned into exact cents.
//!
//! Rule: a field the caller cannot do without (an id) is strict, and its absence is a
//! decode error; every other field degrades to `None` rather than failing the whole
//! answer, because a create whose answer fails to decode is ambiguous for the engine.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use serde_json::{Number, Value};

use crate::money::Cents;

/// A JSON number as an id string: integers as written, integral floats without `.0`.
fn number_text(n: &Number) -> String {
    if let Some(f) = n.as_f64().filter(|_| n.is_f64()) {
        if f.fract() == 0.0 && f.abs() < 9.0e15 {
            return format!("{}", f as i64);
        }
    }
    n.to_string()
}

/// A required id given as a string or a number (`"11123456789"` or `11123456789`).
pub fn string_or_number<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    match Value::deserialize(d)? {
        Value::String(s) if !s.is_empty() => Ok(s),
        Value::Number(n) => Ok(number_text(&n)),
        other => Err(serde::de::Error::custom(format!(
            "expected an id (string or number), found {other}"
        ))),
    }
}

/// An optional string, also given as a number. Empty, null, or another type: `None`.
pub fn opt_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::String(s) if !s.is_empty() => Some(s),
        Value::Number(n) => Some(number_text(&n)),
        _ => None,
    })
}

/// An optional non-negative integer, also given as a numeric string or an integral float.
pub fn opt_u64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::Number(n) => n.as_u64().or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f < 1.8e19)
                .map(|f| f as u64)
        }),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    })
}

/// An optional boolean, also `"true"` / `"false"`.
pub fn opt_bool<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::Bool(b) => Some(b),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    })
}

/// Any optional value that fails to read as `T` becomes `None` (nested objects).
pub fn or_none<'de, D: Deserializer<'de>, T: DeserializeOwned>(
    d: D,
) -> Result<Option<T>, D::Error> {
    let value = Value::deserialize(d)?;
    Ok(serde_json::from_value(value).ok())
}

/// A list that may be missing or `null` (then empty). Its elements are read strictly.
pub fn null_as_empty<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Vec<T>, D::Error> {
    Ok(Option::<Vec<T>>::deserialize(d)?.unwrap_or_default())
}

/// An optional amount in major units (`12.34`, `"12.34"`, `15`) as cents, rounded to the
/// nearest cent (half up). Negative, non-numeric or other types: `None`.
pub fn opt_major_units<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Cents>, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::Number(n) => number_to_cents(&n),
        Value::String(s) => major_units_to_cents(&s),
        _ => None,
    })
}

/// A JSON number in major units as cents. Integers are exact; floats go through their
/// shortest decimal form (what serde_json printed is what the API wrote, up to f64).
pub fn number_to_cents(n: &Number) -> Option<Cents> {
    if let Some(units) = n.as_u64() {
        return units.checked_mul(100).map(Cents);
    }
    major_units_to_cents(&n.to_string())
}

/// A decimal text in major units (`"12.34"`, `"15"`, `"0.005"`, `"1e3"`) as cents,
/// rounded half up on the third decimal. Signs other than none, and garbage: `None`.
pub fn major_units_to_cents(text: &str) -> Option<Cents> {
    let text = text.trim();
    if text.contains(['e', 'E']) {
        let f: f64 = text.parse().ok()?;
        let cents = (f * 100.0).round();
        return (f.is_finite() && (0.0..1.8e19).contains(&cents)).then_some(Cents(cents as u64));
    }
    let (whole, frac) = text.split_once('.').unwrap_or((text, ""));
    if whole.is_empty() && frac.is_empty() {
        return None;
    }
    if !whole.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let whole: u64 = if whole.is_empty() {
        0
    } else {
        whole.parse().ok()?
    };
    let digit = |i: usize| frac.as_bytes().get(i).map_or(0, |b| u64::from(b - b'0'));
    let round_up = u64::from(digit(2) >= 5);
    let cents = whole
        .checked_mul(100)?
        .checked_add(digit(0) * 10 + digit(1) + round_up)?;
    Some(Cents(cents))
}

/// Cents as a JSON number in major units (`1234` → `12.34`), for request bodies that
/// take decimals. Exact for any amount below 10^15 cents: the f64 nearest to c/100 prints
/// back as c/100 (at most 15 significant digits).
pub fn cents_to_major_units(amount: Cents) -> Option<Number> {
    if amount.0 % 100 == 0 {
        return Some(Number::from(amount.0 / 100));
    }
    Number::from_f64(amount.0 as f64 / 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Deserialize)]
    struct Probe {
        #[serde(deserialize_with = "string_or_number")]
        id: String,
        #[serde(default, deserialize_with = "opt_string")]
        s: Option<String>,
        #[serde(default, deserialize_with = "opt_u64")]
        n: Option<u64>,
        #[serde(default, deserialize_with = "opt_major_units")]
        amount: Option<Cents>,
    }

    fn probe(json: &str) -> Result<Probe, serde_json::Error> {
        serde_json::from_str(json)
    }

    #[test]
    fn ids_read_as_string_or_number() {
        assert_eq!(probe(r#"{"id":"11123456789"}"#).unwrap().id, "11123456789");
        assert_eq!(probe(r#"{"id":11123456789}"#).unwrap().id, "11123456789");
        assert_eq!(
            probe(r#"{"id":1.6499678033e10}"#).unwrap().id,
            "16499678033"
        );
        assert!(probe(r#"{"id":null}"#).is_err());
        assert!(probe(r#"{"id":""}"#).is_err());
        assert!(probe(r#"{}"#).is_err());
        assert!(probe(r#"{"id":true}"#).is_err());
    }

    #[test]
    fn optional_fields_degrade_to_none() {
        let p = probe(r#"{"id":1,"s":47792478,"n":"50","amount":"12.34"}"#).unwrap();
        assert_eq!(
            (p.s.as_deref(), p.n, p.amount),
            (Some("47792478"), Some(50), Some(Cents(1234)))
        );
        let p = probe(r#"{"id":1,"s":{"x":1},"n":-3,"amount":[1]}"#).unwrap();
        assert_eq!((p.s, p.n, p.amount), (None, None, None));
        let p = probe(r#"{"id":1,"s":"","n":null,"amount":null}"#).unwrap();
        assert_eq!((p.s, p.n, p.amount), (None, None, None));
        let p = probe(r#"{"id":1}"#).unwrap();
        assert_eq!((p.s, p.n, p.amount), (None, None, None));
    }

    #[test]
    fn major_units_become_exact_cents() {
        for (text, cents) in [
            ("12.34", 1234),
            ("15", 1500),
            ("15.0", 1500),
            ("0.1", 10),
            (".5", 50),
            ("7.", 700),
            ("0.004", 0),
            ("0.005", 1),
            ("2.675", 268),
            ("4000000.00", 400000000),
            ("1e3", 100000),
            ("1.5E2", 15000),
        ] {
            assert_eq!(major_units_to_cents(text), Some(Cents(cents)), "{text}");
        }
        for bad in [
            "",
            ".",
            "-1",
            "+1",
            "1,5",
            "abc",
            "1.2.3",
            "NaN",
            "-1e3",
            "99999999999999999999",
        ] {
            assert_eq!(major_units_to_cents(bad), None, "{bad}");
        }
        let n: Number = serde_json::from_str("12.34").unwrap();
        assert_eq!(number_to_cents(&n), Some(Cents(1234)));
        let n: Number = serde_json::from_str("0.07").unwrap();
        assert_eq!(number_to_cents(&n), Some(Cents(7)));
        let n: Number = serde_json::from_str("-0.07").unwrap();
        assert_eq!(number_to_cents(&n), None);
    }

    #[test]
    fn cents_print_as_short_decimals() {
        let show = |c| serde_json::to_string(&cents_to_major_units(Cents(c)).unwrap()).unwrap();
        assert_eq!(show(1234), "12.34");
        assert_eq!(show(1230), "12.3");
        assert_eq!(show(1200), "12");
        assert_eq!(show(1), "0.01");
        assert_eq!(show(400000000), "4000000");
        assert_eq!(show(399999999), "3999999.99");
    }

    proptest! {
        #[test]
        fn cents_round_trip_through_json_decimals(c in 0u64..1_000_000_000_000_000) {
            let text = serde_json::to_string(&cents_to_major_units(Cents(c)).unwrap()).unwrap();
            let back: Number = serde_json::from_str(&text).unwrap();
            prop_assert_eq!(number_to_cents(&back), Some(Cents(c)), "{}", text);
        }

        #[test]
        fn two_decimal_texts_are_exact(whole in 0u64..10_000_000_000, frac in 0u64..100) {
            let text = format!("{whole}.{frac:02}");
            prop_assert_eq!(major_units_to_cents(&text), Some(Cents(whole * 100 + frac)));
        }
    }
}
