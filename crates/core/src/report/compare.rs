//! Two report folders side by side: process peaks, and per scope its runs, time and peak.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::{Error, ErrorKind, Result};

/// What a row of a [`Comparison`] measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Unit {
    /// Bytes, shown in MiB.
    Bytes,
    /// Seconds, shown in milliseconds.
    Seconds,
    /// A count.
    Count,
}

/// One figure of two reports.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Row {
    /// What the figure is (`"heap peak"`, `"model.layers.0 time"`).
    pub label: String,
    /// Its unit.
    pub unit: Unit,
    /// Its value in the first report (`None`: unavailable there).
    pub a: Option<f64>,
    /// Its value in the second report.
    pub b: Option<f64>,
}

impl Row {
    /// The second value minus the first, when both are known.
    pub fn change(&self) -> Option<f64> {
        Some(self.b? - self.a?)
    }

    /// Whether the two reports differ in this figure (one known and the other not counts).
    pub fn differs(&self) -> bool {
        self.a != self.b
    }
}

/// Two report folders side by side (see [`compare`]); `Display` prints it as a table.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Comparison {
    /// The first folder.
    pub a: PathBuf,
    /// The second folder.
    pub b: PathBuf,
    /// Process peaks first, then three rows per scope name (runs, time, peak delta), in
    /// the order the scopes first ran.
    pub rows: Vec<Row>,
}

impl Comparison {
    /// The rows whose figures differ.
    pub fn differences(&self) -> impl Iterator<Item = &Row> {
        self.rows.iter().filter(|r| r.differs())
    }
}

/// Reads the `stats.json` of two report folders and puts their figures side by side.
pub fn compare(a: impl AsRef<Path>, b: impl AsRef<Path>) -> Result<Comparison> {
    let (a, b) = (a.as_ref(), b.as_ref());
    let (sa, sb) = (read_stats(a)?, read_stats(b)?);
    let mut rows = Vec::new();
    let process = |s: &Value, pointer: &str| s.pointer(pointer).and_then(Value::as_f64);
    for (label, pointer) in [
        ("heap peak", "/heap/peak"),
        ("RSS peak", "/process/rss_peak"),
        ("RSS anonymous at end", "/process/rss_anon"),
        ("RSS file-backed at end", "/process/rss_file"),
    ] {
        rows.push(Row {
            label: label.into(),
            unit: Unit::Bytes,
            a: process(&sa, pointer),
            b: process(&sb, pointer),
        });
    }
    let device_peak = |s: &Value| {
        s["devices"]
            .as_array()?
            .iter()
            .filter_map(|d| d["peak_used"].as_f64())
            .reduce(f64::max)
    };
    if device_peak(&sa).is_some() || device_peak(&sb).is_some() {
        rows.push(Row {
            label: "device peak".into(),
            unit: Unit::Bytes,
            a: device_peak(&sa),
            b: device_peak(&sb),
        });
    }

    let mut names: Vec<String> = Vec::new();
    for s in [&sa, &sb] {
        for scope in s["scopes"].as_array().into_iter().flatten() {
            if let Some(name) = scope["name"].as_str() {
                if !names.iter().any(|n| n == name) {
                    names.push(name.to_owned());
                }
            }
        }
        // Names whose records were all dropped still have aggregates.
        for agg in s["aggregates"].as_array().into_iter().flatten() {
            if let Some(name) = agg["name"].as_str() {
                if !names.iter().any(|n| n == name) {
                    names.push(name.to_owned());
                }
            }
        }
    }
    for name in names {
        let (ga, gb) = (aggregate(&sa, &name), aggregate(&sb, &name));
        let field = |g: Option<&Value>, f: &dyn Fn(&Value) -> Option<f64>| g.and_then(f);
        let runs = |g: &Value| g["count"].as_f64();
        let time = |g: &Value| seconds(&g["total_time"]);
        let peak = |g: &Value| g["max_heap_peak_delta"].as_f64();
        for (what, unit, f) in [
            ("runs", Unit::Count, &runs as &dyn Fn(&Value) -> Option<f64>),
            ("time", Unit::Seconds, &time),
            ("peak delta", Unit::Bytes, &peak),
        ] {
            rows.push(Row {
                label: format!("{name} {what}"),
                unit,
                a: field(ga, f),
                b: field(gb, f),
            });
        }
    }
    Ok(Comparison {
        a: a.to_owned(),
        b: b.to_owned(),
        rows,
    })
}

fn read_stats(dir: &Path) -> Result<Value> {
    let path = dir.join("stats.json");
    let text = std::fs::read_to_string(&path).map_err(|e| {
        Error::new(ErrorKind::Io, format!("reading {}: {e}", path.display())).with_source(e)
    })?;
    serde_json::from_str(&text).map_err(|e| {
        Error::new(
            ErrorKind::Io,
            format!("{} is not a memwise stats file: {e}", path.display()),
        )
        .with_source(e)
    })
}

fn aggregate<'a>(stats: &'a Value, name: &str) -> Option<&'a Value> {
    stats["aggregates"]
        .as_array()?
        .iter()
        .find(|a| a["name"] == name)
}

/// A serialized `Duration` (`{"secs": .., "nanos": ..}`) in seconds.
fn seconds(value: &Value) -> Option<f64> {
    let secs = value["secs"].as_u64()?;
    let nanos = value["nanos"].as_u64()? as u32;
    Some(Duration::new(secs, nanos).as_secs_f64())
}

fn show(unit: Unit, value: Option<f64>, signed: bool) -> String {
    let Some(v) = value else {
        return "unavailable".into();
    };
    let sign = if signed && v > 0.0 { "+" } else { "" };
    match unit {
        Unit::Bytes if v.abs() < 1024.0 * 1024.0 => format!("{sign}{:.1} KiB", v / 1024.0),
        Unit::Bytes => format!("{sign}{:.1} MiB", v / (1024.0 * 1024.0)),
        Unit::Seconds => format!("{sign}{:.2} ms", v * 1e3),
        Unit::Count => format!("{sign}{v}"),
    }
}

impl fmt::Display for Comparison {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let width = self
            .rows
            .iter()
            .map(|r| r.label.len())
            .max()
            .unwrap_or(0)
            .max(6);
        writeln!(f, "A: {}", self.a.display())?;
        writeln!(f, "B: {}", self.b.display())?;
        writeln!(
            f,
            "{:<width$} {:>14} {:>14} {:>14}",
            "figure", "A", "B", "B - A"
        )?;
        for r in &self.rows {
            let change = match r.change() {
                Some(0.0) => "=".to_owned(),
                Some(c) => show(r.unit, Some(c), true),
                None if r.differs() => "only one".to_owned(),
                None => "=".to_owned(),
            };
            writeln!(
                f,
                "{:<width$} {:>14} {:>14} {:>14}",
                r.label,
                show(r.unit, r.a, false),
                show(r.unit, r.b, false),
                change
            )?;
        }
        match self.differences().count() {
            0 => writeln!(f, "no differences"),
            n => writeln!(f, "{n} figures differ"),
        }
    }
}
