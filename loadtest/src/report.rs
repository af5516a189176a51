//! Turns a [`RunResult`] into the files a person reads after a run:
//!
//! - `result.json`: the result as is, pretty-printed;
//! - `latency.png`, `throughput.png`, `percentiles.png`: charts that open in
//!   any image viewer;
//! - `report.html`: one self-contained page (no scripts, no external CSS or
//!   images) with the verdict, the parameters, the totals, the latency
//!   percentiles, the same three charts as inline SVG and the server samples.
//!
//! The PNG charts need a font to draw their titles, axis labels and legends,
//! and a test machine or a CI container may have no system fonts at all. So
//! plotters runs with its `ab_glyph` feature (no system font lookup) and the
//! DejaVu Sans TrueType font is compiled into the binary, taken from the
//! `dejavu` crate on crates.io (the crate is MIT/Apache-2.0; the font itself is
//! under the Bitstream Vera licence with DejaVu's changes in the public domain,
//! which allows redistribution, also inside other software, as long as the
//! font is not sold on its own and not renamed when modified). The SVG charts
//! carry their text as `<text>` elements, which the browser draws with its
//! own fonts.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::Context as _;
use plotters::coord::Shift;
use plotters::coord::ranged1d::{AsRangedCoord, SegmentValue, ValueFormatter};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::result::{RunResult, ServerSample};

/// Size of every chart, PNG and SVG alike.
const CHART_SIZE: (u32, u32) = (1000, 500);
/// The family name the embedded font is registered under; plotters' own
/// defaults (mesh labels, legends) ask for this one too.
const FONT: &str = "sans-serif";
/// Above this max/min ratio of the positive values, latency axes go log scale.
const LOG_SCALE_RATIO: f64 = 50.0;
/// At most this many metrics per target in the server samples tables.
const MAX_METRIC_ROWS: usize = 12;

const BLUE: RGBColor = RGBColor(31, 119, 180);
const ORANGE: RGBColor = RGBColor(255, 127, 14);
const GREEN: RGBColor = RGBColor(44, 160, 44);
const RED: RGBColor = RGBColor(214, 39, 40);
const PURPLE: RGBColor = RGBColor(148, 103, 189);
const GREY: RGBColor = RGBColor(90, 90, 90);

/// Writes `result.json`, the three PNG charts and `report.html` into
/// `directory` (created if needed) and returns the paths written, in that
/// order.
pub fn write_reports(result: &RunResult, directory: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(directory).with_context(|| format!("creating {}", directory.display()))?;
    register_font()?;
    let mut written = Vec::new();

    let json_path = directory.join("result.json");
    let json = serde_json::to_string_pretty(result).context("serializing the run result")?;
    std::fs::write(&json_path, json).with_context(|| format!("writing {}", json_path.display()))?;
    written.push(json_path);

    for chart in Chart::ALL {
        let path = directory.join(chart.file_name());
        render_png(chart, result, &path).with_context(|| format!("drawing {}", path.display()))?;
        written.push(path);
    }

    let html_path = directory.join("report.html");
    let html = render_html(result)?;
    std::fs::write(&html_path, html).with_context(|| format!("writing {}", html_path.display()))?;
    written.push(html_path);
    Ok(written)
}

/// Registers the embedded DejaVu Sans (regular and bold) with plotters, once
/// per process.
fn register_font() -> anyhow::Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular()).is_ok()
            && plotters::style::register_font(FONT, FontStyle::Bold, dejavu::sans::bold()).is_ok()
    });
    anyhow::ensure!(ok, "the embedded DejaVu Sans font could not be loaded");
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Chart {
    Latency,
    Throughput,
    Percentiles,
}

impl Chart {
    const ALL: [Chart; 3] = [Chart::Latency, Chart::Throughput, Chart::Percentiles];

    fn file_name(self) -> &'static str {
        match self {
            Chart::Latency => "latency.png",
            Chart::Throughput => "throughput.png",
            Chart::Percentiles => "percentiles.png",
        }
    }

    fn caption(self) -> &'static str {
        match self {
            Chart::Latency => "End-to-end latency per second (p50, p99, max)",
            Chart::Throughput => "Messages sent and delivered per second, and open connections",
            Chart::Percentiles => "Latency percentiles over the whole run",
        }
    }

    fn draw<DB>(self, root: &DrawingArea<DB, Shift>, result: &RunResult) -> anyhow::Result<()>
    where
        DB: DrawingBackend,
        DB::ErrorType: 'static,
    {
        root.fill(&WHITE)?;
        match self {
            Chart::Latency => draw_latency(root, result),
            Chart::Throughput => draw_throughput(root, result),
            Chart::Percentiles => draw_percentiles(root, result),
        }
    }
}

fn render_png(chart: Chart, result: &RunResult, path: &Path) -> anyhow::Result<()> {
    let root = BitMapBackend::new(path, CHART_SIZE).into_drawing_area();
    chart.draw(&root, result)?;
    root.present()?;
    Ok(())
}

fn render_svg(chart: Chart, result: &RunResult) -> anyhow::Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, CHART_SIZE).into_drawing_area();
        chart.draw(&root, result)?;
        root.present()?;
    }
    Ok(svg)
}

// ---------------------------------------------------------------------------
// Charts
// ---------------------------------------------------------------------------

/// One line of a time chart. A non-finite `y` is a gap: the line breaks there.
struct Line {
    label: &'static str,
    color: RGBColor,
    points: Vec<(f64, f64)>,
}

impl Line {
    fn finite_values(&self) -> impl Iterator<Item = f64> + '_ {
        self.points.iter().map(|&(_, y)| y).filter(|y| y.is_finite())
    }

    /// The runs of consecutive drawable points (two or more make a path).
    fn segments(&self) -> Vec<Vec<(f64, f64)>> {
        let mut segments = Vec::new();
        let mut current = Vec::new();
        for &(x, y) in &self.points {
            if x.is_finite() && y.is_finite() {
                current.push((x, y));
            } else if !current.is_empty() {
                segments.push(std::mem::take(&mut current));
            }
        }
        if !current.is_empty() {
            segments.push(current);
        }
        segments
    }

    fn paths(&self) -> Vec<PathElement<(f64, f64)>> {
        let style = self.color.stroke_width(2);
        self.segments().into_iter().filter(|s| s.len() > 1).map(|s| PathElement::new(s, style)).collect()
    }

    /// Points with no neighbour to draw a path to, shown as dots.
    fn dots(&self) -> Vec<Circle<(f64, f64), u32>> {
        let style = self.color.filled();
        self.segments().into_iter().filter(|s| s.len() == 1).map(|s| Circle::new(s[0], 3, style)).collect()
    }

    fn legend_mark(&self) -> impl Fn((i32, i32)) -> PathElement<(i32, i32)> + use<> {
        let style = self.color.stroke_width(3);
        move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], style)
    }
}

fn title_style() -> TextStyle<'static> {
    // Not `.into_font().style(Bold)`: plotters' `FontDesc::style` keeps the
    // regular face's glyph data.
    TextStyle::from(FontDesc::new(FontFamily::Name(FONT), 22.0, FontStyle::Bold))
}

fn label_style() -> TextStyle<'static> {
    TextStyle::from((FONT, 14).into_font())
}

fn axis_desc_style() -> TextStyle<'static> {
    TextStyle::from((FONT, 16).into_font())
}

fn chart_title(what: &str, result: &RunResult) -> String {
    if result.scenario.is_empty() { what.to_string() } else { format!("{what} - {}", result.scenario) }
}

/// The x range of the time charts: the timeline's seconds, at least one wide.
fn time_range(result: &RunResult) -> Range<f64> {
    let ts = result.timeline.iter().map(|s| s.t).filter(|t| t.is_finite());
    let (lo, hi) = ts.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), t| (lo.min(t), hi.max(t)));
    let lo = if lo.is_finite() { lo.min(0.0) } else { 0.0 };
    let mut hi = if hi.is_finite() { hi } else { result.duration_seconds };
    if !hi.is_finite() || hi - lo < 1.0 {
        hi = lo + 1.0;
    }
    lo..hi
}

/// The smallest and largest positive finite value, if any.
fn positive_bounds(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    values.filter(|v| v.is_finite() && *v > 0.0).fold(None, |acc, v| match acc {
        None => Some((v, v)),
        Some((lo, hi)) => Some((f64::min(lo, v), f64::max(hi, v))),
    })
}

/// Whether positive values spanning `lo..=hi` read better on a log axis.
fn wants_log_scale(lo: f64, hi: f64) -> bool {
    lo > 0.0 && hi / lo > LOG_SCALE_RATIO
}

/// A log axis from the power of ten at or below `lo` to above `hi`, with room
/// for the legend at the top.
fn log_range(lo: f64, hi: f64) -> Range<f64> {
    let bottom = 10f64.powf(lo.log10().floor());
    let top = 10f64.powf(hi.log10() + 0.4);
    bottom..top
}

/// A linear axis from zero to above `max`, with room for the legend at the top.
fn linear_range(max: f64) -> Range<f64> {
    if max.is_finite() && max > 0.0 { 0.0..max * 1.3 } else { 0.0..1.0 }
}

/// A note in the middle of the chart, e.g. why it is empty.
fn draw_note<DB>(root: &DrawingArea<DB, Shift>, note: &str) -> anyhow::Result<()>
where
    DB: DrawingBackend,
    DB::ErrorType: 'static,
{
    let (w, h) = root.dim_in_pixel();
    let style = TextStyle::from((FONT, 20).into_font()).color(&GREY).pos(Pos::new(HPos::Center, VPos::Center));
    root.draw(&Text::new(note.to_string(), (w as i32 / 2, h as i32 / 2), style))?;
    Ok(())
}

fn draw_latency<DB>(root: &DrawingArea<DB, Shift>, result: &RunResult) -> anyhow::Result<()>
where
    DB: DrawingBackend,
    DB::ErrorType: 'static,
{
    // A second without deliveries has no latency: a gap, not a zero.
    let series = |f: fn(&crate::result::Second) -> f64| -> Vec<(f64, f64)> {
        result.timeline.iter().map(|s| (s.t, Some(f(s)).filter(|v| *v > 0.0).unwrap_or(f64::NAN))).collect()
    };
    let lines = [
        Line { label: "p50", color: BLUE, points: series(|s| s.p50_ms) },
        Line { label: "p99", color: ORANGE, points: series(|s| s.p99_ms) },
        Line { label: "max", color: RED, points: series(|s| s.max_ms) },
    ];
    let x = time_range(result);
    let title = chart_title("Latency per second", result);
    match positive_bounds(lines.iter().flat_map(Line::finite_values)) {
        None => {
            let note = if result.timeline.is_empty() {
                "no data: the timeline is empty"
            } else {
                "no data: nothing was delivered"
            };
            draw_time_chart(root, &title, "latency (ms)", x, 0.0..1.0, &lines, Some(note))
        }
        Some((lo, hi)) if wants_log_scale(lo, hi) => {
            let y = log_range(lo, hi);
            draw_time_chart(root, &title, "latency (ms, log scale)", x, y.log_scale(), &lines, None)
        }
        Some((_, hi)) => draw_time_chart(root, &title, "latency (ms)", x, linear_range(hi), &lines, None),
    }
}

/// A chart of lines over the run's seconds, on a linear or a log y axis.
fn draw_time_chart<DB, Y>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    y_desc: &str,
    x: Range<f64>,
    y: Y,
    lines: &[Line],
    note: Option<&str>,
) -> anyhow::Result<()>
where
    DB: DrawingBackend,
    DB::ErrorType: 'static,
    Y: AsRangedCoord<Value = f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    let mut chart = ChartBuilder::on(root)
        .caption(title, title_style())
        .margin(15)
        .x_label_area_size(50)
        .y_label_area_size(75)
        .build_cartesian_2d(x, y)?;
    chart
        .configure_mesh()
        .x_desc("time since start (s)")
        .y_desc(y_desc)
        .label_style(label_style())
        .axis_desc_style(axis_desc_style())
        .x_label_formatter(&|v| format_axis(*v))
        .y_label_formatter(&|v| format_axis(*v))
        .light_line_style(BLACK.mix(0.04))
        .bold_line_style(BLACK.mix(0.12))
        .draw()?;
    for line in lines {
        chart.draw_series(line.paths())?.label(line.label).legend(line.legend_mark());
        chart.draw_series(line.dots())?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font(label_style())
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .draw()?;
    if let Some(note) = note {
        draw_note(root, note)?;
    }
    Ok(())
}

fn draw_throughput<DB>(root: &DrawingArea<DB, Shift>, result: &RunResult) -> anyhow::Result<()>
where
    DB: DrawingBackend,
    DB::ErrorType: 'static,
{
    let series = |f: fn(&crate::result::Second) -> u64| -> Vec<(f64, f64)> {
        result.timeline.iter().map(|s| (s.t, f(s) as f64)).collect()
    };
    let mut rates = vec![
        Line { label: "sent/s", color: BLUE, points: series(|s| s.sent) },
        Line { label: "delivered/s", color: GREEN, points: series(|s| s.delivered) },
    ];
    if result.timeline.iter().any(|s| s.errors > 0) {
        rates.push(Line { label: "errors/s", color: RED, points: series(|s| s.errors) });
    }
    let connections = Line { label: "open connections (right axis)", color: PURPLE, points: series(|s| s.connections) };
    let rate_max = rates.iter().flat_map(Line::finite_values).fold(0.0, f64::max);
    let connections_max = connections.finite_values().fold(0.0, f64::max);

    let mut chart = ChartBuilder::on(root)
        .caption(chart_title("Throughput per second", result), title_style())
        .margin(15)
        .x_label_area_size(50)
        .y_label_area_size(75)
        .right_y_label_area_size(75)
        .build_cartesian_2d(time_range(result), linear_range(rate_max))?
        .set_secondary_coord(time_range(result), linear_range(connections_max));
    chart
        .configure_mesh()
        .x_desc("time since start (s)")
        .y_desc("per second")
        .label_style(label_style())
        .axis_desc_style(axis_desc_style())
        .x_label_formatter(&|v| format_axis(*v))
        .y_label_formatter(&|v| format_axis(*v))
        .light_line_style(BLACK.mix(0.04))
        .bold_line_style(BLACK.mix(0.12))
        .draw()?;
    chart
        .configure_secondary_axes()
        .y_desc("open connections")
        .label_style(label_style())
        .axis_desc_style(axis_desc_style())
        .y_label_formatter(&|v| format_axis(*v))
        .draw()?;
    for line in &rates {
        chart.draw_series(line.paths())?.label(line.label).legend(line.legend_mark());
        chart.draw_series(line.dots())?;
    }
    chart.draw_secondary_series(connections.paths())?.label(connections.label).legend(connections.legend_mark());
    chart.draw_secondary_series(connections.dots())?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font(label_style())
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .draw()?;
    if result.timeline.is_empty() {
        draw_note(root, "no data: the timeline is empty")?;
    }
    Ok(())
}

const PERCENTILE_NAMES: [&str; 5] = ["p50", "p90", "p99", "p99.9", "max"];

fn draw_percentiles<DB>(root: &DrawingArea<DB, Shift>, result: &RunResult) -> anyhow::Result<()>
where
    DB: DrawingBackend,
    DB::ErrorType: 'static,
{
    let l = &result.latency_ms;
    let values = [l.p50, l.p90, l.p99, l.p999, l.max];
    let title = chart_title("Latency percentiles", result);
    match positive_bounds(values.into_iter().chain([l.mean])) {
        None => draw_bars(root, &title, "latency (ms)", 0.0..1.0, result, Some("no data: no latency was measured")),
        Some((lo, hi)) if wants_log_scale(lo, hi) => {
            let y = log_range(lo, hi);
            draw_bars(root, &title, "latency (ms, log scale)", y.log_scale(), result, None)
        }
        Some((_, hi)) => draw_bars(root, &title, "latency (ms)", linear_range(hi), result, None),
    }
}

fn draw_bars<DB, Y>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    y_desc: &str,
    y: Y,
    result: &RunResult,
    note: Option<&str>,
) -> anyhow::Result<()>
where
    DB: DrawingBackend,
    DB::ErrorType: 'static,
    Y: AsRangedCoord<Value = f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    let l = &result.latency_ms;
    let values = [l.p50, l.p90, l.p99, l.p999, l.max];
    let mut chart = ChartBuilder::on(root)
        .caption(title, title_style())
        .margin(15)
        .x_label_area_size(50)
        .y_label_area_size(75)
        .build_cartesian_2d((0..PERCENTILE_NAMES.len() - 1).into_segmented(), y)?;
    let bottom = chart.y_range().start;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_desc(format!("percentile (of {} samples)", l.count))
        .y_desc(y_desc)
        .label_style(label_style())
        .axis_desc_style(axis_desc_style())
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => PERCENTILE_NAMES.get(*i).copied().unwrap_or_default().to_string(),
            _ => String::new(),
        })
        .y_label_formatter(&|v| format_axis(*v))
        .light_line_style(BLACK.mix(0.04))
        .bold_line_style(BLACK.mix(0.12))
        .draw()?;

    let bars: Vec<(usize, f64)> =
        values.iter().copied().enumerate().filter(|(_, v)| v.is_finite() && *v > bottom).collect();
    let bar_style = BLUE.mix(0.8).filled();
    chart
        .draw_series(bars.iter().map(|&(i, v)| {
            let mut bar =
                Rectangle::new([(SegmentValue::Exact(i), bottom), (SegmentValue::Exact(i + 1), v)], bar_style);
            bar.set_margin(0, 0, 30, 30);
            bar
        }))?
        .label("latency (ms)")
        .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 24, y + 6)], bar_style));
    let value_style = label_style().pos(Pos::new(HPos::Center, VPos::Bottom));
    chart
        .draw_series(bars.iter().map(|&(i, v)| {
            Text::new(format!("{} ms", format_value(v)), (SegmentValue::CenterOf(i), v), &value_style)
        }))?;
    if l.mean.is_finite() && l.mean > bottom {
        let mean = l.mean;
        let style = ORANGE.stroke_width(2);
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(SegmentValue::Exact(0), mean), (SegmentValue::Last, mean)],
                style,
            )))?
            .label(format!("mean {} ms", format_value(mean)))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], style));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(label_style())
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .draw()?;
    if let Some(note) = note {
        draw_note(root, note)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Number formatting
// ---------------------------------------------------------------------------

fn trim_zeros(s: String) -> String {
    if s.contains('.') { s.trim_end_matches('0').trim_end_matches('.').to_string() } else { s }
}

/// Decimals that keep about `significant` significant digits of `v`.
fn decimals_for(v: f64, significant: i32) -> usize {
    let magnitude = v.abs().log10().floor() as i32;
    (significant - 1 - magnitude).clamp(0, 9) as usize
}

/// Short labels for axis ticks: 0.25, 12, 250, 12.5k, 3M.
fn format_axis(v: f64) -> String {
    if !v.is_finite() {
        return String::new();
    }
    let a = v.abs();
    if a == 0.0 {
        "0".to_string()
    } else if a >= 1e6 {
        trim_zeros(format!("{:.2}", v / 1e6)) + "M"
    } else if a >= 1e4 {
        trim_zeros(format!("{:.1}", v / 1e3)) + "k"
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else {
        trim_zeros(format!("{v:.prec$}", prec = decimals_for(v, 3)))
    }
}

/// Values in tables: whole numbers as such, others to three decimals (more
/// for values below one).
fn format_value(v: f64) -> String {
    if !v.is_finite() {
        "-".to_string()
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        trim_zeros(format!("{v:.3}"))
    } else {
        trim_zeros(format!("{v:.prec$}", prec = decimals_for(v, 4)))
    }
}

// ---------------------------------------------------------------------------
// HTML
// ---------------------------------------------------------------------------

/// Escapes text for HTML element content and attribute values.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "\
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,'DejaVu Sans',sans-serif;margin:2em auto;\
max-width:1060px;padding:0 1em;color:#222;line-height:1.4}\
h1{margin-bottom:.2em}h2{margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}\
table{border-collapse:collapse;margin:.6em 0}\
th,td{border:1px solid #ccc;padding:.25em .7em;text-align:left;vertical-align:top}\
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}\
.banner{font-size:1.6em;font-weight:bold;padding:.4em .8em;border-radius:6px;margin:1em 0 .4em}\
.pass{background:#dff3df;color:#1b5e20;border:2px solid #2e7d32}\
.fail{background:#fde2e2;color:#8b0000;border:2px solid #c62828}\
ul.failures{margin-top:.2em}ul.failures li{font-family:monospace;white-space:pre-wrap}\
figure{margin:1em 0}figure svg{width:100%;height:auto;max-width:1000px;border:1px solid #eee}\
figcaption{color:#555;font-size:.9em}.muted{color:#777}";

fn render_html(result: &RunResult) -> anyhow::Result<String> {
    let mut h = String::new();
    let scenario = if result.scenario.is_empty() { "(unnamed)" } else { result.scenario.as_str() };
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>Beseda load test: {}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n",
        escape(scenario)
    );
    let _ = writeln!(h, "<h1>Load test: {}</h1>", escape(scenario));

    // Verdict.
    if result.passed {
        h.push_str("<div class=\"banner pass\">PASS</div>\n");
    } else {
        h.push_str("<div class=\"banner fail\">FAIL</div>\n");
    }
    if !result.failures.is_empty() {
        h.push_str("<ul class=\"failures\">\n");
        for failure in &result.failures {
            let _ = writeln!(h, "<li>{}</li>", escape(failure));
        }
        h.push_str("</ul>\n");
    } else if !result.passed {
        h.push_str("<p class=\"muted\">No failure was recorded.</p>\n");
    }

    // Run.
    h.push_str("<h2>Run</h2>\n<table>\n");
    row(&mut h, "Scenario", &escape(scenario));
    let started = if result.started_at.is_empty() { "-" } else { result.started_at.as_str() };
    row(&mut h, "Started at", &escape(started));
    row(&mut h, "Duration", &format!("{} s", format_value(result.duration_seconds)));
    let targets = if result.targets.is_empty() {
        "-".to_string()
    } else {
        result.targets.iter().map(|t| escape(t)).collect::<Vec<_>>().join("<br>")
    };
    row(&mut h, "Targets", &targets);
    h.push_str("</table>\n");

    // Parameters.
    h.push_str("<h2>Parameters</h2>\n");
    let mut parameters = Vec::new();
    flatten_json("", &result.parameters, &mut parameters);
    if parameters.is_empty() {
        h.push_str("<p class=\"muted\">No parameters recorded.</p>\n");
    } else {
        h.push_str("<table>\n<tr><th>Parameter</th><th>Value</th></tr>\n");
        for (name, value) in &parameters {
            row(&mut h, &escape(name), &escape(value));
        }
        h.push_str("</table>\n");
    }

    // Totals.
    let t = &result.totals;
    h.push_str("<h2>Totals</h2>\n<table>\n");
    let delivered_share = if t.expected_deliveries > 0 {
        format!(" ({}%)", format_value(round_to(t.delivered as f64 * 100.0 / t.expected_deliveries as f64, 3)))
    } else {
        String::new()
    };
    for (name, value, extra) in [
        ("Sent", t.sent, String::new()),
        ("Expected deliveries", t.expected_deliveries, String::new()),
        ("Delivered", t.delivered, delivered_share),
        ("Lost", t.lost, String::new()),
        ("Duplicated", t.duplicated, String::new()),
        ("Out of order", t.out_of_order, String::new()),
        ("Errors", t.errors, String::new()),
        ("Connections opened", t.connections_opened, String::new()),
        ("Connections failed", t.connections_failed, String::new()),
        ("Peak connections", t.peak_connections, String::new()),
    ] {
        num_row(&mut h, name, &format!("{value}{extra}"));
    }
    h.push_str("</table>\n");

    // Figures.
    h.push_str("<h2>Figures</h2>\n");
    if result.figures.is_empty() {
        h.push_str("<p class=\"muted\">No scenario figures.</p>\n");
    } else {
        h.push_str("<table>\n<tr><th>Figure</th><th>Value</th></tr>\n");
        for (name, value) in &result.figures {
            num_row(&mut h, &escape(name), &format_value(*value));
        }
        h.push_str("</table>\n");
    }

    // Latency.
    let l = &result.latency_ms;
    h.push_str("<h2>Latency</h2>\n<table>\n<tr><th>Statistic</th><th>ms</th></tr>\n");
    num_row(&mut h, "samples", &l.count.to_string());
    for (name, value) in
        [("mean", l.mean), ("p50", l.p50), ("p90", l.p90), ("p99", l.p99), ("p99.9", l.p999), ("max", l.max)]
    {
        num_row(&mut h, name, &format_value(value));
    }
    h.push_str("</table>\n");

    // Charts.
    h.push_str("<h2>Charts</h2>\n");
    for chart in Chart::ALL {
        let svg = render_svg(chart, result).with_context(|| format!("drawing the SVG of {}", chart.file_name()))?;
        let _ = writeln!(
            h,
            "<figure>\n{}\n<figcaption>{} (also in {})</figcaption>\n</figure>",
            strip_xml_declaration(&svg),
            escape(chart.caption()),
            chart.file_name()
        );
    }

    // Server samples.
    h.push_str("<h2>Server samples</h2>\n");
    server_samples_html(&mut h, result);

    h.push_str("<p class=\"muted\">Written by beseda-loadtest. Full data in result.json.</p>\n</body>\n</html>\n");
    Ok(h)
}

fn round_to(v: f64, decimals: i32) -> f64 {
    let f = 10f64.powi(decimals);
    (v * f).round() / f
}

/// The SVG backend writes a bare `<svg>` element; drop any XML prolog all the
/// same, since it is not allowed inside HTML.
fn strip_xml_declaration(svg: &str) -> &str {
    let s = svg.trim_start();
    match s.strip_prefix("<?xml").and_then(|rest| rest.find("?>").map(|end| &rest[end + 2..])) {
        Some(rest) => rest.trim_start(),
        None => s,
    }
}

/// A table row of already escaped HTML.
fn row(h: &mut String, name: &str, value: &str) {
    let _ = writeln!(h, "<tr><th>{name}</th><td>{value}</td></tr>");
}

/// A table row with a right-aligned number (already escaped HTML).
fn num_row(h: &mut String, name: &str, value: &str) {
    let _ = writeln!(h, "<tr><th>{name}</th><td class=\"num\">{value}</td></tr>");
}

/// Flattens the parameters into dotted names and display values.
fn flatten_json(prefix: &str, value: &serde_json::Value, out: &mut Vec<(String, String)>) {
    use serde_json::Value;
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (key, value) in map {
                let name = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
                flatten_json(&name, value, out);
            }
        }
        Value::Null if prefix.is_empty() => {}
        Value::String(s) => out.push((name_or_value(prefix), s.clone())),
        other => out.push((name_or_value(prefix), other.to_string())),
    }
}

fn name_or_value(prefix: &str) -> String {
    if prefix.is_empty() { "(value)".to_string() } else { prefix.to_string() }
}

/// One metric of one target over the run.
struct MetricSummary {
    name: String,
    first: f64,
    last: f64,
    max: f64,
    /// Change per second between the first and the last sample, for counters.
    rate: Option<f64>,
}

/// The metrics shown first when a target exposes them; the others follow if
/// they changed during the run, up to [`MAX_METRIC_ROWS`].
const KEY_METRICS: [&str; 12] = [
    "beseda_ws_connections",
    "beseda_messages_stored_total",
    "beseda_outbound_deliveries_total",
    "beseda_api_requests_total",
    "beseda_ws_frames_in_total",
    "beseda_relayed_events_total",
    "beseda_ws_slow_consumers_total",
    "beseda_ws_gap_fills_total",
    "beseda_messages_deduplicated_total",
    "beseda_outbound_delivery_seconds_count",
    "process_resident_memory_bytes",
    "process_cpu_seconds_total",
];

fn base_name(metric: &str) -> &str {
    metric.split('{').next().unwrap_or(metric)
}

fn is_counter(metric: &str) -> bool {
    let base = base_name(metric);
    base.ends_with("_total") || base.ends_with("_count") || base.ends_with("_sum")
}

fn summarize_metrics(samples: &[&ServerSample]) -> Vec<MetricSummary> {
    let names: BTreeSet<&str> = samples
        .iter()
        .flat_map(|s| s.metrics.keys())
        .map(String::as_str)
        .filter(|name| !base_name(name).ends_with("_bucket"))
        .collect();
    names
        .into_iter()
        .filter_map(|name| {
            let points: Vec<(f64, f64)> = samples
                .iter()
                .filter_map(|s| s.metrics.get(name).map(|v| (s.t, *v)))
                .filter(|(_, v)| v.is_finite())
                .collect();
            let (&(t0, first), &(t1, last)) = (points.first()?, points.last()?);
            let max = points.iter().map(|&(_, v)| v).fold(f64::NEG_INFINITY, f64::max);
            let dt = t1 - t0;
            let rate = (is_counter(name) && dt.is_finite() && dt > 0.0).then(|| (last - first) / dt);
            Some(MetricSummary { name: name.to_string(), first, last, max, rate })
        })
        .collect()
}

/// Picks the rows to show: key metrics first (in [`KEY_METRICS`] order),
/// then the others that changed, by name. Returns them and how many were left
/// out.
fn pick_metrics(mut all: Vec<MetricSummary>) -> (Vec<MetricSummary>, usize) {
    let rank = |m: &MetricSummary| KEY_METRICS.iter().position(|k| *k == base_name(&m.name));
    let total = all.len();
    all.retain(|m| rank(m).is_some() || m.first != m.last || m.max != m.first);
    all.sort_by(|a, b| {
        let (ra, rb) = (rank(a).unwrap_or(usize::MAX), rank(b).unwrap_or(usize::MAX));
        ra.cmp(&rb).then_with(|| a.name.cmp(&b.name))
    });
    all.truncate(MAX_METRIC_ROWS);
    let left_out = total - all.len();
    (all, left_out)
}

fn server_samples_html(h: &mut String, result: &RunResult) {
    if result.server_samples.is_empty() {
        h.push_str("<p class=\"muted\">No server samples were taken.</p>\n");
        return;
    }
    // The run's targets in their order, then any other target sampled.
    let mut targets: Vec<&str> = result.targets.iter().map(String::as_str).collect();
    for sample in &result.server_samples {
        if !targets.contains(&sample.target.as_str()) {
            targets.push(&sample.target);
        }
    }
    for target in targets {
        let mut samples: Vec<&ServerSample> = result.server_samples.iter().filter(|s| s.target == target).collect();
        samples.sort_by(|a, b| a.t.total_cmp(&b.t));
        let _ = writeln!(h, "<h3>{}</h3>", escape(target));
        let (Some(first), Some(last)) = (samples.first(), samples.last()) else {
            h.push_str("<p class=\"muted\">No samples from this target.</p>\n");
            continue;
        };
        let _ = writeln!(
            h,
            "<p>{} samples from {} s to {} s.</p>",
            samples.len(),
            format_value(first.t),
            format_value(last.t)
        );
        let (metrics, left_out) = pick_metrics(summarize_metrics(&samples));
        let rss: Vec<(f64, f64)> =
            samples.iter().filter_map(|s| s.rss_bytes.map(|b| (s.t, b as f64 / (1024.0 * 1024.0)))).collect();
        if metrics.is_empty() && rss.is_empty() {
            h.push_str("<p class=\"muted\">No metrics in these samples.</p>\n");
            continue;
        }
        h.push_str(
            "<table>\n<tr><th>Metric</th><th>First</th><th>Last</th><th>Max</th><th>Change per second</th></tr>\n",
        );
        if let (Some(&(_, first)), Some(&(_, last))) = (rss.first(), rss.last()) {
            let max = rss.iter().map(|&(_, v)| v).fold(f64::NEG_INFINITY, f64::max);
            let _ = writeln!(
                h,
                "<tr><th>RSS (MiB)</th><td class=\"num\">{}</td><td class=\"num\">{}</td>\
                 <td class=\"num\">{}</td><td class=\"num\">-</td></tr>",
                format_value(round_to(first, 1)),
                format_value(round_to(last, 1)),
                format_value(round_to(max, 1)),
            );
        }
        for m in &metrics {
            let _ = writeln!(
                h,
                "<tr><th>{}</th><td class=\"num\">{}</td><td class=\"num\">{}</td>\
                 <td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
                escape(&m.name),
                format_value(m.first),
                format_value(m.last),
                format_value(m.max),
                m.rate.map(|r| format_value(round_to(r, 3))).unwrap_or_else(|| "-".to_string()),
            );
        }
        h.push_str("</table>\n");
        if left_out > 0 {
            let noun = if left_out == 1 { "metric" } else { "metrics" };
            let _ = writeln!(h, "<p class=\"muted\">{left_out} more {noun} in result.json.</p>");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::result::{Percentiles, Second, Totals};

    const PNG_SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', b'\r', b'\n', 0x1a, b'\n'];

    fn synthetic() -> RunResult {
        let timeline: Vec<Second> = (0u32..30)
            .map(|i| {
                let spike = i == 15;
                Second {
                    t: f64::from(i) + 1.0,
                    sent: 1000,
                    delivered: if i == 20 { 0 } else { 9_800 + u64::from(i) * 7 },
                    errors: u64::from(spike) * 3,
                    connections: 100 + u64::from(i.min(10)) * 10,
                    p50_ms: if spike { 40.0 } else { 2.5 + f64::from(i % 3) * 0.2 },
                    p99_ms: if spike { 900.0 } else { 9.0 + f64::from(i % 4) },
                    max_ms: if spike { 1800.0 } else { 20.0 + f64::from(i % 5) * 2.0 },
                }
            })
            .collect();
        let mut server_samples = Vec::new();
        for target in ["http://127.0.0.1:8080", "http://127.0.0.1:8081"] {
            for k in 0u32..7 {
                let t = f64::from(k) * 5.0;
                let mut metrics = BTreeMap::new();
                metrics.insert("beseda_ws_connections".to_string(), 100.0 + f64::from(k) * 10.0);
                metrics.insert("beseda_messages_stored_total".to_string(), f64::from(k) * 5000.0);
                metrics.insert(
                    "beseda_api_requests_total{route=\"/v1/messages\",status=\"200\"}".to_string(),
                    f64::from(k) * 120.0,
                );
                metrics.insert("beseda_outbound_delivery_seconds_bucket{le=\"0.1\"}".to_string(), f64::from(k));
                metrics.insert("beseda_unchanged".to_string(), 1.0);
                server_samples.push(ServerSample {
                    t,
                    target: target.to_string(),
                    metrics,
                    rss_bytes: Some((50 + u64::from(k) * 3) * 1024 * 1024),
                });
            }
        }
        let mut figures = BTreeMap::new();
        figures.insert("connections_per_second".to_string(), 412.5);
        RunResult {
            scenario: "fanout-<big>".to_string(),
            started_at: "2025-01-02T03:04:05Z".to_string(),
            duration_seconds: 30.0,
            parameters: serde_json::json!({
                "rooms": 10, "members_per_room": 10, "rate": 1000.0,
                "payload": {"bytes": 256, "kind": "text"}, "label": "a & b"
            }),
            targets: vec!["http://127.0.0.1:8080".to_string(), "http://127.0.0.1:8081".to_string()],
            totals: Totals {
                sent: 30_000,
                expected_deliveries: 300_000,
                delivered: 299_997,
                lost: 3,
                duplicated: 0,
                out_of_order: 0,
                errors: 3,
                connections_opened: 200,
                connections_failed: 0,
                peak_connections: 200,
            },
            latency_ms: Percentiles {
                count: 299_997,
                mean: 4.25,
                p50: 2.75,
                p90: 8.5,
                p99: 187.5,
                p999: 880.0,
                max: 1800.0,
            },
            timeline,
            server_samples,
            figures,
            passed: false,
            failures: vec!["3 deliveries lost <script>alert(1)</script>".to_string()],
        }
    }

    fn assert_png(path: &Path) {
        let bytes = std::fs::read(path).unwrap();
        assert_eq!(bytes[..8], PNG_SIGNATURE, "{} is not a PNG", path.display());
        // A blank 1000x500 image compresses to a few kB; text and lines make more.
        assert!(bytes.len() > 10_000, "{} is only {} bytes", path.display(), bytes.len());
    }

    fn names(paths: &[PathBuf]) -> Vec<String> {
        paths.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect()
    }

    #[test]
    fn report_writes_all_files_for_a_run() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("nested/report");
        let written = write_reports(&synthetic(), &out).unwrap();
        assert_eq!(names(&written), ["result.json", "latency.png", "throughput.png", "percentiles.png", "report.html"]);
        for path in &written {
            assert!(path.is_file(), "{} missing", path.display());
        }
        for png in ["latency.png", "throughput.png", "percentiles.png"] {
            assert_png(&out.join(png));
        }

        let json: RunResult = serde_json::from_str(&std::fs::read_to_string(out.join("result.json")).unwrap()).unwrap();
        assert_eq!(json, synthetic());

        let html = std::fs::read_to_string(out.join("report.html")).unwrap();
        assert!(html.contains("fanout-&lt;big&gt;"), "scenario name escaped");
        assert!(!html.contains("fanout-<big>"));
        assert!(html.contains("class=\"banner fail\">FAIL<"));
        assert!(html.contains("3 deliveries lost &lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(!html.to_lowercase().contains("<script"), "no script in the page");
        assert!(html.contains("187.5"), "p99 in the page");
        assert!(html.contains("2025-01-02T03:04:05Z"));
        assert!(html.contains("payload.bytes"));
        assert!(html.contains("a &amp; b"));
        assert!(html.contains("connections_per_second"));
        assert!(html.contains("299997 (99.999%)"));
        assert_eq!(html.matches("<svg").count(), 3, "three inline charts");
        assert!(!html.contains("<?xml"));
        assert!(html.contains("http://127.0.0.1:8081"));
        assert!(html.contains("RSS (MiB)"));
        assert!(html.contains("beseda_messages_stored_total"));
        // 5000 per 5 s.
        assert!(html.contains("<td class=\"num\">1000</td>"));
        assert!(!html.contains("_bucket"), "histogram buckets are left out");
        assert!(!html.contains("src=") && !html.contains("<link"), "nothing external");
    }

    #[test]
    fn report_of_an_empty_result_still_writes_everything() {
        let dir = tempfile::tempdir().unwrap();
        let written = write_reports(&RunResult::default(), dir.path()).unwrap();
        assert_eq!(written.len(), 5);
        for path in &written {
            assert!(path.is_file(), "{} missing", path.display());
        }
        for png in ["latency.png", "throughput.png", "percentiles.png"] {
            assert_png(&dir.path().join(png));
        }
        let html = std::fs::read_to_string(dir.path().join("report.html")).unwrap();
        assert!(html.contains("FAIL"));
        assert!(html.contains("No server samples were taken."));
        assert!(html.contains("no data"));
        assert_eq!(html.matches("<svg").count(), 3);
    }

    #[test]
    fn report_survives_odd_values() {
        let mut result = synthetic();
        result.passed = true;
        result.failures.clear();
        result.timeline.truncate(1);
        result.timeline[0].p99_ms = f64::NAN;
        result.timeline[0].max_ms = f64::INFINITY;
        result.latency_ms = Percentiles { count: 1, mean: 0.0, p50: 0.0, p90: 0.0, p99: 0.0, p999: 0.0, max: 0.5 };
        result.totals = Totals::default();
        result.parameters = serde_json::json!("just a string");
        result.server_samples.truncate(1);
        result.server_samples[0].rss_bytes = None;
        let dir = tempfile::tempdir().unwrap();
        write_reports(&result, dir.path()).unwrap();
        let html = std::fs::read_to_string(dir.path().join("report.html")).unwrap();
        assert!(html.contains("class=\"banner pass\">PASS<"));
        assert!(html.contains("just a string"));
        assert!(html.contains("No samples from this target."));
    }

    #[test]
    fn report_number_formats() {
        assert_eq!(format_value(187.5), "187.5");
        assert_eq!(format_value(3.0), "3");
        assert_eq!(format_value(0.012345), "0.01235");
        assert_eq!(format_value(f64::NAN), "-");
        assert_eq!(format_axis(0.25), "0.25");
        assert_eq!(format_axis(12_500.0), "12.5k");
        assert_eq!(format_axis(3_000_000.0), "3M");
        assert_eq!(format_axis(250.0), "250");
        assert_eq!(escape("<a href=\"x\">&'"), "&lt;a href=&quot;x&quot;&gt;&amp;&#39;");
        assert!(wants_log_scale(1.0, 1000.0));
        assert!(!wants_log_scale(1.0, 10.0));
        assert_eq!(time_range(&RunResult::default()), 0.0..1.0);
    }
}
