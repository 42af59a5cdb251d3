//! The `xent bench --plot` chart, drawn with `plotters`: throughput against V (log scale), one
//! line per backend and dtype, with axis labels and a legend. SVG or PNG by the file's
//! extension; text is rendered from a font compiled in (Hack, from the
//! `epaint_default_fonts` crate), so PNGs need no system fonts.

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;
use xent::{Result, XentError};

/// One measured point.
pub struct Point {
    /// The line the point belongs to (backend and dtype).
    pub series: String,
    /// The number of classes V (the x axis).
    pub v: usize,
    /// The measured throughput in GB/s (the y axis).
    pub gbps: f64,
}

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // The font bytes are 'static and valid TTF; registration can only fail on bad data.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, epaint_default_fonts::HACK_REGULAR);
    });
}

fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    points: &[Point],
    title: &str,
) -> std::result::Result<(), String>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let vmin = points.iter().map(|p| p.v).min().unwrap_or(1).max(1) as f64;
    let vmax = points.iter().map(|p| p.v).max().unwrap_or(2).max(2) as f64;
    let (lo, hi) = if vmax / vmin < 2.0 { (vmin / 1.5, vmax * 1.5) } else { (vmin / 1.2, vmax * 1.2) };
    let gmax = points.iter().fold(0.0f64, |m, p| m.max(p.gbps)).max(1e-3) * 1.15;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d((lo..hi).log_scale(), 0.0..gmax)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("classes V (log scale)")
        .y_desc("GB/s of useful traffic")
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 17))
        .x_labels(6)
        .x_label_formatter(&|v| format!("{:.0}", v))
        .draw()
        .map_err(|e| e.to_string())?;
    let mut names: Vec<&str> = points.iter().map(|p| p.series.as_str()).collect();
    names.sort();
    names.dedup();
    for (i, name) in names.iter().enumerate() {
        let colour = Palette99::pick(i).to_rgba();
        let mut pts: Vec<(f64, f64)> =
            points.iter().filter(|p| p.series == *name).map(|p| (p.v as f64, p.gbps)).collect();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        chart
            .draw_series(LineSeries::new(pts.clone(), colour.stroke_width(2)))
            .map_err(|e| e.to_string())?
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(3)));
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 4, colour.filled()))).map_err(|e| e.to_string())?;
    }
    chart
        .configure_series_labels()
        .label_font(("sans-serif", 15))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())
}

/// Draws `points` to `path` (.svg or .png).
pub fn throughput(path: &Path, points: &[Point], title: &str) -> Result<()> {
    register_font();
    let err =
        |m: String| XentError::Io { path: path.display().to_string(), message: format!("plot: {m}"), source: None };
    let size = (900, 540);
    match path.extension().and_then(|e| e.to_str()) {
        Some("svg") => draw(SVGBackend::new(path, size).into_drawing_area(), points, title).map_err(err),
        Some("png") => draw(BitMapBackend::new(path, size).into_drawing_area(), points, title).map_err(err),
        _ => Err(XentError::InvalidOption(format!(
            "--plot writes SVG or PNG: name a .svg or .png file, got {}",
            path.display()
        ))),
    }
}
