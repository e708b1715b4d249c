//! Amounts in minor units (cents), the per-site limits of the Point API, and the
//! contract's decimal-string form (`"15"`, `"15.00"`; never a JSON number).
//!
//! Invariant: an `Amount` is always > 0 once it has passed `Site::check`.

use serde::{Deserialize, Serialize};

/// A Mercado Pago country site.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Site {
    MLA,
    MLB,
    MLM,
}

/// An amount in minor units (cents). 1500 is 15.00.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Cents(pub u64);

impl Cents {
    /// Two decimals, as events carry amounts ("40.00").
    pub fn to_decimal(&self) -> String {
        format!("{}.{:02}", self.0 / 100, self.0 % 100)
    }
}
