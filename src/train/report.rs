//! The end-of-run HTML report: training curves (drawn with plotters as inline SVG) and the
//! validation images before and after training.

use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;

use crate::weights::store::write_atomic;
use crate::{Error, Result};

/// One curve: `(step, value)` points.
pub struct Curve<'a> {
    /// Title above the plot.
    pub title: &'a str,
    /// The points.
    pub points: Vec<(f64, f64)>,
}

/// An SVG line plot of `curve`.
pub fn line_plot_svg(curve: &Curve) -> Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (480, 260)).into_drawing_area();
        let draw = || -> std::result::Result<(), Box<dyn std::error::Error + '_>> {
            root.fill(&WHITE)?;
            let (x0, x1) = curve
                .points
                .iter()
                .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
            let (y0, y1) = curve
                .points
                .iter()
                .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
            let (x0, x1) = if x0 < x1 { (x0, x1) } else { (x0 - 1.0, x0 + 1.0) };
            let pad = ((y1 - y0).abs() * 0.05).max(1e-6);
            let (y0, y1) = if y0 <= y1 { (y0 - pad, y1 + pad) } else { (-1.0, 1.0) };
            let mut chart = ChartBuilder::on(&root)
                .caption(curve.title, ("sans-serif", 16))
                .margin(8)
                .x_label_area_size(28)
                .y_label_area_size(48)
                .build_cartesian_2d(x0..x1, y0..y1)?;
            chart.configure_mesh().x_desc("step").draw()?;
            chart.draw_series(LineSeries::new(curve.points.iter().copied(), &BLUE))?;
            root.present()?;
            Ok(())
        };
        draw().map_err(|e| Error::input("report", format!("plot {}: {e}", curve.title)))?;
    }
    Ok(svg)
}

/// Images of one prompt and seed, paths relative to the report: before and after (training, or
/// noise optimisation).
pub struct ImageRow {
    /// The prompt.
    pub prompt: String,
    /// The seed.
    pub seed: u64,
    /// Image before training.
    pub before: String,
    /// Image after training.
    pub after: String,
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Writes `path` (HTML) atomically with the curves and the image rows.
pub fn write_report(path: &Path, title: &str, summary: &str, curves: &[Curve], images: &[ImageRow]) -> Result<()> {
    let mut html = String::new();
    let _ = write!(
        html,
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{t}</title><style>body{{font-family:sans-serif;margin:2em}}img{{image-rendering:pixelated;width:192px}}td{{padding:4px;vertical-align:top}}</style></head><body><h1>{t}</h1><pre>{s}</pre>",
        t = escape(title),
        s = escape(summary)
    );
    for c in curves.iter().filter(|c| !c.points.is_empty()) {
        html.push_str(&line_plot_svg(c)?);
    }
    if !images.is_empty() {
        html.push_str(
            "<h2>Before and after</h2><table><tr><th>prompt</th><th>seed</th><th>before</th><th>after</th></tr>",
        );
        for r in images {
            let _ = write!(
                html,
                "<tr><td>{}</td><td>{}</td><td><img src=\"{}\"></td><td><img src=\"{}\"></td></tr>",
                escape(&r.prompt),
                r.seed,
                escape(&r.before),
                escape(&r.after)
            );
        }
        html.push_str("</table>");
    }
    html.push_str("</body></html>\n");
    write_atomic(path, html)
}
