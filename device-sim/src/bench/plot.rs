//! PNG bar charts of benchmark results (plotters): one panel per quantity, one bar per
//! system or case at its mean over the runs, each run drawn as a dot and the min–max
//! spread as a whisker.

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Result};
use plotters::prelude::*;
use plotters::style::FontStyle;

use super::Spread;

/// One bar.
#[derive(Debug, Clone)]
pub struct Bar {
    /// Under the bar.
    pub label: String,
    /// Its runs.
    pub spread: Spread,
}

/// One chart.
#[derive(Debug, Clone)]
pub struct Panel {
    /// Above the chart.
    pub title: String,
    /// The y axis.
    pub y_label: String,
    /// Its bars.
    pub bars: Vec<Bar>,
}

impl Panel {
    /// A panel from `(label, spread)` pairs.
    pub fn new(title: &str, y_label: &str, bars: Vec<(String, Spread)>) -> Self {
        Panel {
            title: title.to_string(),
            y_label: y_label.to_string(),
            bars: bars
                .into_iter()
                .map(|(label, spread)| Bar { label, spread })
                .collect(),
        }
    }
}

const FONT_CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
];

/// Registers a system TrueType font as `sans-serif` (plotters draws no text without one).
fn ensure_font() -> Result<()> {
    static FONT: OnceLock<Result<(), String>> = OnceLock::new();
    FONT.get_or_init(|| {
        let bytes = FONT_CANDIDATES
            .iter()
            .find_map(|p| std::fs::read(p).ok())
            .ok_or_else(|| {
                "no TrueType font found (apt-get install fonts-dejavu-core)".to_string()
            })?;
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| "the font file is not a valid TrueType font".to_string())
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

/// Draws `panels` side by side into a PNG at `path`.
pub fn bars(path: &Path, title: &str, panels: &[Panel]) -> Result<()> {
    if panels.is_empty() {
        bail!("nothing to plot");
    }
    ensure_font()?;
    let width = 420 * u32::try_from(panels.len()).unwrap_or(1);
    let root = BitMapBackend::new(path, (width, 460)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let root = root
        .titled(
            title,
            (
                "sans-serif",
                if title.len() * 10 > width as usize {
                    16
                } else {
                    22
                },
            ),
        )
        .map_err(|e| anyhow!("{e}"))?;
    let areas = root.split_evenly((1, panels.len()));
    for (panel, area) in panels.iter().zip(areas.iter()) {
        draw_panel(area, panel)?;
    }
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

fn draw_panel(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    p: &Panel,
) -> Result<()> {
    let n = p.bars.len();
    let top = p
        .bars
        .iter()
        .map(|b| b.spread.max.max(b.spread.mean))
        .fold(0.0f64, f64::max);
    let top = if top > 0.0 { top * 1.15 } else { 1.0 };
    let labels: Vec<String> = p.bars.iter().map(|b| b.label.clone()).collect();
    let mut chart = ChartBuilder::on(area)
        .caption(&p.title, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), 0f64..top)
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .y_desc(p.y_label.as_str())
        .y_label_formatter(&|v| {
            if top >= 100.0 {
                format!("{v:.0}")
            } else {
                format!("{v:.2}")
            }
        })
        .x_labels(n.max(1))
        .x_label_formatter(&|v| {
            let i = v.round();
            if (v - i).abs() < 0.01 && i >= 0.0 {
                labels.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    let palette = [
        RGBColor(70, 130, 180),
        RGBColor(230, 140, 60),
        RGBColor(90, 170, 90),
        RGBColor(170, 90, 160),
    ];
    let half = 0.3;
    chart
        .draw_series(p.bars.iter().enumerate().map(|(i, b)| {
            let x = i as f64;
            Rectangle::new(
                [(x - half, 0.0), (x + half, b.spread.mean)],
                palette[i % palette.len()].mix(0.75).filled(),
            )
        }))
        .map_err(|e| anyhow!("{e}"))?;
    for (i, b) in p.bars.iter().enumerate() {
        let x = i as f64;
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(x, b.spread.min), (x, b.spread.max)],
                BLACK.stroke_width(2),
            )))
            .map_err(|e| anyhow!("{e}"))?;
        chart
            .draw_series(
                b.spread
                    .runs
                    .iter()
                    .map(|v| Circle::new((x, *v), 3, BLACK.filled())),
            )
            .map_err(|e| anyhow!("{e}"))?;
        let text = if b.spread.mean >= 100.0 {
            format!("{:.0}", b.spread.mean)
        } else {
            format!("{:.2}", b.spread.mean)
        };
        chart
            .draw_series(std::iter::once(Text::new(
                text,
                (x + 0.05, b.spread.max.max(b.spread.mean) + top * 0.02),
                ("sans-serif", 13),
            )))
            .map_err(|e| anyhow!("{e}"))?;
    }
    Ok(())
}

/// A PNG line chart of per-bucket counts over time (`series`: name, colour index, one
/// value per `bucket_ms`), with a vertical line at `mark_ms` named `mark`.
pub fn timeline(
    path: &Path,
    title: &str,
    y_label: &str,
    bucket_ms: u64,
    series: &[(&str, &[u64])],
    (mark, mark_ms): (&str, u64),
) -> Result<()> {
    let len = series.iter().map(|(_, v)| v.len()).max().unwrap_or(0);
    if len == 0 {
        bail!("nothing to plot");
    }
    ensure_font()?;
    let secs = |i: usize| (i as u64 * bucket_ms) as f64 / 1000.0;
    let top = series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .max()
        .unwrap_or(0)
        .max(1) as f64
        * 1.15;
    let root = BitMapBackend::new(path, (900, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..secs(len), 0f64..top)
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("s since the probes started")
        .y_desc(y_label)
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    for (i, (name, values)) in series.iter().enumerate() {
        let colour = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(
                values.iter().enumerate().map(|(b, v)| (secs(b), *v as f64)),
                colour.stroke_width(2),
            ))
            .map_err(|e| anyhow!("{e}"))?
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], colour));
    }
    let at = mark_ms as f64 / 1000.0;
    chart
        .draw_series(std::iter::once(PathElement::new(
            vec![(at, 0.0), (at, top)],
            BLACK.stroke_width(1),
        )))
        .map_err(|e| anyhow!("{e}"))?
        .label(mark)
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLACK));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}
