//! Percentiles, the printed table and the JSON file.

use serde_json::{json, Value};

/// p-th percentile (0..=100) by nearest rank; `None` for no samples.
pub fn pct(samples: &[f64], p: f64) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    let mut v = samples.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    v.get(rank.min(v.len()) - 1).copied()
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Target {
    AtMost(f64),
    AtLeast(f64),
}

/// One figure of the table.
#[derive(Debug, Clone)]
pub struct Row {
    pub key: String,
    pub label: String,
    pub value: Option<f64>,
    pub unit: &'static str,
    pub floor: Option<f64>,
    pub floor_label: String,
    pub target: Option<Target>,
    pub note: String,
}

impl Row {
    pub fn new(key: &str, label: &str, value: Option<f64>, unit: &'static str) -> Row {
        Row {
            key: key.into(),
            label: label.into(),
            value,
            unit,
            floor: None,
            floor_label: String::new(),
            target: None,
            note: String::new(),
        }
    }

    pub fn floor(mut self, floor: Option<f64>, label: &str) -> Row {
        self.floor = floor;
        self.floor_label = label.into();
        self
    }

    pub fn target(mut self, t: Target) -> Row {
        self.target = Some(t);
        self
    }

    pub fn note(mut self, n: impl Into<String>) -> Row {
        self.note = n.into();
        self
    }

    pub fn ratio(&self) -> Option<f64> {
        match (self.value, self.floor) {
            (Some(v), Some(f)) if f > 0.0 => Some(v / f),
            _ => None,
        }
    }

    pub fn holds(&self) -> Option<bool> {
        let v = self.value?;
        Some(match self.target? {
            Target::AtMost(t) => v <= t,
            Target::AtLeast(t) => v >= t,
        })
    }

    pub fn json(&self) -> Value {
        json!({
            "label": self.label,
            "value": self.value,
            "unit": self.unit,
            "floor": self.floor,
            "floor_is": self.floor_label,
            "ratio_to_floor": self.ratio(),
            "target": self.target.map(|t| match t {
                Target::AtMost(x) => json!({"at_most": x}),
                Target::AtLeast(x) => json!({"at_least": x}),
            }),
            "holds": self.holds(),
            "note": self.note,
        })
    }
}

fn num(v: Option<f64>) -> String {
    match v {
        None => "n/a".into(),
        Some(x) if x.abs() >= 1000.0 => format!("{x:.0}"),
        Some(x) if x.abs() >= 100.0 => format!("{x:.1}"),
        Some(x) if x.abs() >= 1.0 => format!("{x:.2}"),
        Some(x) => format!("{x:.3}"),
    }
}

/// The table as Markdown (readable on a terminal, pasteable into docs/performance.md).
pub fn table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| figure | value | floor | ratio | target | holds | note |\n|---|---:|---|---:|---|---|---|\n",
    );
    for r in rows {
        let value = match r.value {
            Some(_) => format!("{} {}", num(r.value), r.unit),
            None => "n/a".into(),
        };
        let floor = match r.floor {
            Some(f) => format!("{} {} ({})", num(Some(f)), r.unit, r.floor_label),
            None if !r.floor_label.is_empty() => r.floor_label.clone(),
            None => "—".into(),
        };
        let ratio = r
            .ratio()
            .map(|x| format!("{x:.2}×"))
            .unwrap_or_else(|| "—".into());
        let target = match r.target {
            Some(Target::AtMost(t)) => format!("≤ {} {}", num(Some(t)), r.unit),
            Some(Target::AtLeast(t)) => format!("≥ {} {}", num(Some(t)), r.unit),
            None => "—".into(),
        };
        let holds = match r.holds() {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "—",
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            r.label, value, floor, ratio, target, holds, r.note
        ));
    }
    out
}
