//! `timeline.svg`: memory over time with the scopes drawn under it, readable in any browser.
//! Drawn with plotters' SVG backend alone; text is laid out by estimate, so no system font
//! library is involved.

use std::collections::{BTreeMap, HashMap};

use plotters::prelude::*;

use super::{KindPoint, Sample};
use crate::kind::Kind;
use crate::scope::ScopeRecord;
use crate::MemoryStats;

const WIDTH: u32 = 1200;
const CHART_HEIGHT: u32 = 480;
const LANE_HEIGHT: u32 = 28;
/// Nesting levels drawn as separate lanes; deeper scopes share the last one.
const MAX_LANES: usize = 4;
const Y_LABELS: u32 = 80;
const MARGIN: u32 = 12;
const MIB: f64 = 1024.0 * 1024.0;

/// Draws the timeline; errors are the drawing backend's, as text.
pub(super) fn timeline_svg(
    stats: &MemoryStats,
    readings: &[Sample],
    kinds: &[KindPoint],
    budget: Option<u64>,
) -> Result<String, String> {
    let depths = depths(&stats.scopes);
    let lanes = depths
        .values()
        .copied()
        .max()
        .map_or(1, |d| d + 1)
        .min(MAX_LANES);
    let end = readings
        .iter()
        .map(|s| s.at)
        .chain(stats.scopes.iter().map(|r| r.start + r.duration))
        .max()
        .unwrap_or_default()
        .as_secs_f64()
        .max(1e-3);
    let mib = |b: u64| b as f64 / MIB;
    let rss: Vec<(f64, f64, f64)> = readings
        .iter()
        .filter_map(|s| {
            let p = s.process?;
            Some((
                s.at.as_secs_f64(),
                mib(p.rss_anon + p.rss_file),
                mib(p.rss_file),
            ))
        })
        .collect();
    let layers = stacked_layers(kinds);
    let top = rss
        .iter()
        .map(|p| p.1)
        .chain(kinds.iter().map(|p| mib(p.kinds.total() + p.other)))
        .chain(budget.map(mib))
        .fold(1.0, f64::max)
        * 1.1;

    let height = CHART_HEIGHT + LANE_HEIGHT * lanes as u32 + 2 * MARGIN;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, height)).into_drawing_area();
        let err = |e: &dyn std::fmt::Display| e.to_string();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let (upper, lower) = root.split_vertically(CHART_HEIGHT);
        let mut chart = ChartBuilder::on(&upper)
            .caption("memory over time", ("sans-serif", 18))
            .margin(MARGIN)
            .x_label_area_size(36)
            .y_label_area_size(Y_LABELS)
            .build_cartesian_2d(0f64..end, 0f64..top)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("seconds")
            .y_desc("MiB")
            .draw()
            .map_err(|e| err(&e))?;

        // The live heap by kind: each layer's area reaches the sum of it and those under
        // it, drawn from the top down so each covers the rest of the ones above.
        for (i, layer) in layers.iter().enumerate().rev() {
            let color = layer.color;
            let tops = kinds.iter().map(|p| {
                let below: u64 = layers[..=i].iter().map(|l| l.bytes(p)).sum();
                (p.at.as_secs_f64(), mib(below))
            });
            chart
                .draw_series(AreaSeries::new(tops, 0.0, color.filled()))
                .map_err(|e| err(&e))?
                .label(layer.label)
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled())
                });
        }
        if !rss.is_empty() {
            let rss_style = BLACK.stroke_width(2);
            chart
                .draw_series(LineSeries::new(rss.iter().map(|p| (p.0, p.1)), rss_style))
                .map_err(|e| err(&e))?
                .label("resident (RSS)")
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 12, y)], rss_style));
            let file_style = RGBColor(120, 120, 120).stroke_width(1);
            chart
                .draw_series(LineSeries::new(rss.iter().map(|p| (p.0, p.2)), file_style))
                .map_err(|e| err(&e))?
                .label("RSS file-backed")
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 12, y)], file_style));
        }
        if let Some(budget) = budget {
            let b = mib(budget);
            chart
                .draw_series(LineSeries::new([(0.0, b), (end, b)], RED.stroke_width(2)))
                .map_err(|e| err(&e))?
                .label("budget")
                .legend(|(x, y)| PathElement::new([(x, y), (x + 12, y)], RED.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(&e))?;

        // The scopes, one lane per nesting level, aligned with the chart's time axis.
        let mut spans = ChartBuilder::on(&lower)
            .margin(MARGIN)
            .margin_top(0)
            .y_label_area_size(Y_LABELS)
            .build_cartesian_2d(0f64..end, 0f64..lanes as f64)
            .map_err(|e| err(&e))?;
        let plot_width = f64::from(WIDTH - Y_LABELS - 2 * MARGIN);
        let mut colors: HashMap<&str, usize> = HashMap::new();
        for r in &stats.scopes {
            let next = colors.len();
            let color = Palette99::pick(*colors.entry(r.name.as_str()).or_insert(next));
            let lane = depths.get(&r.id).copied().unwrap_or(0).min(lanes - 1);
            let y = (lanes - 1 - lane) as f64;
            let (x0, x1) = (r.start.as_secs_f64(), (r.start + r.duration).as_secs_f64());
            spans
                .draw_series([
                    Rectangle::new([(x0, y + 0.08), (x1, y + 0.92)], color.mix(0.55).filled()),
                    Rectangle::new([(x0, y + 0.08), (x1, y + 0.92)], color.stroke_width(1)),
                ])
                .map_err(|e| err(&e))?;
            // A name is written where it fits (about 7 px a character at this size).
            let width_px = (x1 - x0) / end * plot_width;
            if width_px >= 7.0 * r.name.chars().count() as f64 + 6.0 {
                spans
                    .draw_series([Text::new(
                        r.name.clone(),
                        (x0 + 3.0 / plot_width * end, y + 0.8),
                        ("sans-serif", 12).into_font(),
                    )])
                    .map_err(|e| err(&e))?;
            }
        }
        root.present().map_err(|e| err(&e))?;
    }
    Ok(svg)
}

/// One stacked layer of the live heap: a kind, or the rest ("other").
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Layer {
    pub(super) kind: Option<Kind>,
    pub(super) label: &'static str,
    color: RGBColor,
}

impl Layer {
    fn bytes(&self, point: &KindPoint) -> u64 {
        self.kind.map_or(point.other, |k| point.kinds.get(k))
    }
}

/// The layers stacked, bottom first: every kind that held bytes at some reading, then
/// "other" if anything was left over.
pub(super) fn stacked_layers(points: &[KindPoint]) -> Vec<Layer> {
    let kind_layer = |kind: Kind| {
        let (label, color) = match kind {
            Kind::Weights => ("weights", RGBColor(138, 180, 248)),
            Kind::ReadAhead => ("read-ahead", RGBColor(253, 214, 99)),
            Kind::KvCache => ("KV cache", RGBColor(197, 138, 217)),
            Kind::Activations => ("activations", RGBColor(129, 201, 149)),
        };
        Layer {
            kind: Some(kind),
            label,
            color,
        }
    };
    let other = Layer {
        kind: None,
        label: "other heap",
        color: RGBColor(211, 211, 211),
    };
    Kind::ALL
        .into_iter()
        .map(kind_layer)
        .chain([other])
        .filter(|l| points.iter().any(|p| l.bytes(p) > 0))
        .collect()
}

/// Each scope's nesting depth among the records (a parent that was dropped counts as none).
fn depths(records: &[ScopeRecord]) -> BTreeMap<u64, usize> {
    let parents: HashMap<u64, Option<u64>> = records.iter().map(|r| (r.id, r.parent)).collect();
    let mut out = BTreeMap::new();
    for r in records {
        let mut depth = 0;
        let mut at = r.parent;
        while let Some(p) = at {
            let Some(&next) = parents.get(&p) else { break };
            depth += 1;
            at = next;
        }
        out.insert(r.id, depth);
    }
    out
}
