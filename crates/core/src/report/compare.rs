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

impl Comparison {
    /// The comparison as one SVG: for each figure measured in time or bytes, a bar for A
    /// and one for B, per panel scaled to its largest figure, so a change stands out.
    pub fn to_svg(&self) -> Result<String> {
        use plotters::prelude::*;
        const WIDTH: u32 = 1000;
        const ROW: u32 = 30;
        const LABEL: i32 = 300;
        let panels: Vec<(&str, Unit, Vec<&Row>)> =
            [("time", Unit::Seconds), ("memory", Unit::Bytes)]
                .into_iter()
                .map(|(title, unit)| {
                    let rows = self
                        .rows
                        .iter()
                        .filter(|r| r.unit == unit && (r.a.is_some() || r.b.is_some()))
                        .collect();
                    (title, unit, rows)
                })
                .collect();
        let rows_total: u32 = panels.iter().map(|p| p.2.len() as u32 + 2).sum();
        let height = 60 + ROW * rows_total;
        let (a_color, b_color) = (RGBColor(66, 133, 244), RGBColor(234, 67, 53));
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, (WIDTH, height)).into_drawing_area();
            let failed = |e: &dyn fmt::Display| Error::new(ErrorKind::Io, format!("drawing: {e}"));
            let font = ("sans-serif", 13).into_font();
            let text = |root: &DrawingArea<SVGBackend, _>, s: String, x: i32, y: i32| {
                root.draw(&Text::new(s, (x, y), font.clone()))
                    .map_err(|e| failed(&e))
            };
            root.fill(&WHITE).map_err(|e| failed(&e))?;
            text(&root, format!("A: {}", self.a.display()), 10, 10)?;
            text(&root, format!("B: {}", self.b.display()), 10, 30)?;
            root.draw(&Rectangle::new([(500, 12), (512, 24)], a_color.filled()))
                .map_err(|e| failed(&e))?;
            root.draw(&Rectangle::new([(600, 12), (612, 24)], b_color.filled()))
                .map_err(|e| failed(&e))?;
            text(&root, "A".into(), 516, 10)?;
            text(&root, "B".into(), 616, 10)?;
            let mut y = 60i32;
            let bar_room = f64::from(WIDTH as i32 - LABEL - 140);
            for (title, unit, rows) in &panels {
                text(
                    &root,
                    format!(
                        "{title} ({})",
                        if *unit == Unit::Seconds { "ms" } else { "MiB" }
                    ),
                    10,
                    y,
                )?;
                y += ROW as i32;
                let top = rows
                    .iter()
                    .flat_map(|r| [r.a, r.b])
                    .flatten()
                    .fold(0.0f64, |m, v| m.max(v.abs()))
                    .max(f64::MIN_POSITIVE);
                for row in rows {
                    text(&root, row.label.clone(), 10, y + 6)?;
                    for (value, color, offset) in [(row.a, a_color, 0), (row.b, b_color, 12)] {
                        let Some(value) = value else { continue };
                        let length = (value.abs() / top * bar_room).round() as i32;
                        let top_y = y + offset;
                        root.draw(&Rectangle::new(
                            [(LABEL, top_y), (LABEL + length.max(1), top_y + 10)],
                            color.filled(),
                        ))
                        .map_err(|e| failed(&e))?;
                        text(
                            &root,
                            show(*unit, Some(value), false),
                            LABEL + length + 6,
                            top_y - 1,
                        )?;
                    }
                    y += ROW as i32;
                }
                y += ROW as i32;
            }
            root.present().map_err(|e| failed(&e))?;
        }
        Ok(svg)
    }
}
