//! Training metrics: a JSON-lines log ([`MetricsWriter`], one object per line, `"step"` first) mirrored into
//! TensorBoard event files next to it ([`super::tensorboard`]), a progress bar with ETA ([`TrainProgress`]), and a
//! PNG line plot ([`plot_curves`]) for loss/reward curves.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use image::{Rgb, RgbImage};
use indicatif::{ProgressBar, ProgressStyle};
use plotters::chart::SeriesAnno;
use plotters::coord::types::RangedCoordf64;
use plotters::data::float::pretty_print_float;
use plotters::prelude::{
    BitMapBackend, ChartBuilder, Circle, Color, DrawingAreaErrorKind, DrawingBackend,
    IntoDrawingArea, LineSeries, MultiLineText, PathElement, RGBColor, Ranged, SeriesLabelPosition,
    TextStyle, BLACK, WHITE,
};
use serde_json::Value;

use super::tensorboard::EventWriter;
use crate::imaging::{font_desc, line_height, save_png, text_width, x_height_middle, TextBackend};
use crate::io::write_atomic;

/// Conventional file name of the metrics log in a run directory.
pub const METRICS_FILE: &str = "metrics.jsonl";

// ---------------------------------------------------------------------------
// JSON lines
// ---------------------------------------------------------------------------

/// Appends one JSON object per line to a metrics file, flushing every line; unless turned off, every numeric
/// value (and every image given to [`MetricsWriter::image`]) also goes to a TensorBoard event file in the same
/// folder.
#[derive(Debug)]
pub struct MetricsWriter {
    path: PathBuf,
    file: File,
    tensorboard: Option<EventWriter>,
}

impl MetricsWriter {
    /// Starts a fresh log at `path` (an existing file is truncated); parent folders are created.
    pub fn create(path: impl AsRef<Path>) -> Result<Self> {
        Self::open(path, None)
    }

    /// Continues the log of a run resumed at `resume_step`: lines with a `"step"` greater than `resume_step`
    /// (written after that checkpoint by the interrupted run) and lines that are not valid JSON (a line cut by a
    /// crash) are dropped, the rest is kept, and new lines are appended. A missing file is created.
    pub fn resume(path: impl AsRef<Path>, resume_step: u64) -> Result<Self> {
        Self::open(path, Some(resume_step))
    }

    /// [`MetricsWriter::create`] for `None`, [`MetricsWriter::resume`] for `Some(step)` (`Some(u64::MAX)`:
    /// append, dropping nothing). A new TensorBoard event file is started next to the log; on a resume it tells
    /// TensorBoard to drop the interrupted run's events after `step`.
    pub fn open(path: impl AsRef<Path>, resume_step: Option<u64>) -> Result<Self> {
        let mut w = Self::open_log(path, resume_step)?;
        let dir = w.dir();
        w.tensorboard = Some(EventWriter::create(
            &dir,
            resume_step.and_then(|s| s.checked_add(1)),
        )?);
        Ok(w)
    }

    /// [`MetricsWriter::open`] without TensorBoard (`[log] tensorboard = false`).
    pub fn open_log(path: impl AsRef<Path>, resume_step: Option<u64>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let file = match resume_step {
            None => File::create(&path),
            Some(step) => {
                if path.exists() {
                    let text = std::fs::read_to_string(&path)
                        .with_context(|| format!("reading metrics log {}", path.display()))?;
                    let mut kept = String::with_capacity(text.len());
                    for line in text.lines() {
                        let Ok(v) = serde_json::from_str::<Value>(line) else {
                            continue;
                        };
                        if v.get("step")
                            .and_then(Value::as_u64)
                            .is_some_and(|s| s > step)
                        {
                            continue;
                        }
                        kept.push_str(line);
                        kept.push('\n');
                    }
                    if kept.len() != text.len() {
                        write_atomic(&path, kept.as_bytes())?;
                    }
                }
                OpenOptions::new().create(true).append(true).open(&path)
            }
        }
        .with_context(|| format!("opening metrics log {}", path.display()))?;
        Ok(MetricsWriter {
            path,
            file,
            tensorboard: None,
        })
    }

    /// [`MetricsWriter::open`] or [`MetricsWriter::open_log`].
    pub fn open_with(
        path: impl AsRef<Path>,
        resume_step: Option<u64>,
        tensorboard: bool,
    ) -> Result<Self> {
        if tensorboard {
            Self::open(path, resume_step)
        } else {
            Self::open_log(path, resume_step)
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The folder of the log (and of its event files).
    fn dir(&self) -> PathBuf {
        match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        }
    }

    /// The TensorBoard event file being written, if any.
    pub fn event_file(&self) -> Option<&Path> {
        self.tensorboard.as_ref().map(|t| t.path())
    }

    /// An image (a validation or evaluation grid) for TensorBoard's image tab; nothing without TensorBoard.
    pub fn image(&mut self, step: u64, tag: &str, img: &RgbImage) -> Result<()> {
        match &mut self.tensorboard {
            Some(t) => t.image(step, tag, img),
            None => Ok(()),
        }
    }

    /// Writes `{"step":step,"<name>":value,...}` in the given order; non-finite values are written as `null`.
    pub fn log(&mut self, step: u64, values: &[(&str, f64)]) -> Result<()> {
        let mut line = format!("{{\"step\":{step}");
        for (k, v) in values {
            line.push(',');
            line.push_str(&serde_json::to_string(k)?);
            line.push(':');
            line.push_str(&serde_json::to_string(&Value::from(*v))?);
        }
        line.push('}');
        self.write_line(line)?;
        if let Some(t) = &mut self.tensorboard {
            t.scalars(step, values)?;
        }
        Ok(())
    }

    /// Writes an arbitrary JSON object (e.g. with string or nested fields) as one line.
    pub fn write(&mut self, record: &Value) -> Result<()> {
        ensure!(
            record.is_object(),
            "metrics record for {} must be a JSON object",
            self.path.display()
        );
        self.write_line(serde_json::to_string(record)?)?;
        if let (Some(t), Some(step)) = (
            &mut self.tensorboard,
            record.get("step").and_then(Value::as_u64),
        ) {
            let values: Vec<(&str, f64)> = record
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(k, _)| k.as_str() != "step")
                .filter_map(|(k, v)| v.as_f64().map(|x| (k.as_str(), x)))
                .collect();
            t.scalars(step, &values)?;
        }
        Ok(())
    }

    fn write_line(&mut self, mut line: String) -> Result<()> {
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.flush())
            .with_context(|| format!("writing metrics log {}", self.path.display()))
    }
}

/// Reads a metrics log, skipping lines that are not valid JSON.
pub fn read_metrics(path: impl AsRef<Path>) -> Result<Vec<Value>> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading metrics log {}", path.display()))?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

/// `(step, value)` of every record that has a numeric `step` and a numeric `key` (for [`plot_curves`]).
pub fn series(records: &[Value], key: &str) -> Vec<(f64, f64)> {
    records
        .iter()
        .filter_map(|r| Some((r.get("step")?.as_f64()?, r.get(key)?.as_f64()?)))
        .collect()
}

// ---------------------------------------------------------------------------
// Progress bar
// ---------------------------------------------------------------------------

/// A progress bar over optimizer steps with ETA, showing loss, accuracy and learning rate. Drawn to stderr
/// only when it is a terminal.
#[derive(Clone, Debug)]
pub struct TrainProgress {
    bar: ProgressBar,
}

impl TrainProgress {
    /// A bar for `total_steps`, starting at `start_step` (non-zero on resume).
    pub fn new(total_steps: u64, start_step: u64) -> Self {
        Self::with_bar(ProgressBar::new(total_steps), start_step)
    }

    /// Same, never drawn (tests, `--quiet`).
    pub fn hidden(total_steps: u64, start_step: u64) -> Self {
        let bar = ProgressBar::hidden();
        bar.set_length(total_steps);
        Self::with_bar(bar, start_step)
    }

    fn with_bar(bar: ProgressBar, start_step: u64) -> Self {
        let style = ProgressStyle::with_template(
            "{elapsed_precise} [{wide_bar}] {pos}/{len} (eta {eta}) {msg}",
        )
        .expect("valid progress template")
        .progress_chars("=> ");
        bar.set_style(style);
        bar.set_position(start_step);
        bar.reset_eta();
        bar.enable_steady_tick(Duration::from_millis(500));
        TrainProgress { bar }
    }

    /// Reports that `step` optimizer steps are done, with the latest loss, one more figure of the method (e.g.
    /// `("acc", implicit accuracy)`) and the learning rate.
    pub fn update(&self, step: u64, loss: f64, extra: Option<(&str, f64)>, lr: f64) {
        self.bar.set_position(step);
        self.bar.set_message(Self::message(loss, extra, lr));
    }

    fn message(loss: f64, extra: Option<(&str, f64)>, lr: f64) -> String {
        let mut m = format!("loss {loss:.4}");
        if let Some((name, v)) = extra {
            m.push_str(&format!(" {name} {v:.3}"));
        }
        m.push_str(&format!(" lr {lr:.2e}"));
        m
    }

    /// Prints a line above the bar.
    pub fn println(&self, msg: impl AsRef<str>) {
        self.bar.println(msg);
    }

    pub fn position(&self) -> u64 {
        self.bar.position()
    }

    pub fn message_text(&self) -> String {
        self.bar.message()
    }

    /// Leaves the bar in its final state.
    pub fn finish(&self) {
        self.bar.finish();
    }
}

/// A bar counting `n` items (images sampled, samples scored) with rate and ETA, labelled `msg`.
pub fn count_bar(n: usize, msg: &str) -> ProgressBar {
    let pb = ProgressBar::new(n as u64);
    pb.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {per_sec} eta {eta}")
            .expect("valid progress template")
            .progress_chars("=> "),
    );
    pb.set_message(msg.to_string());
    pb
}

// ---------------------------------------------------------------------------
// Line plot
// ---------------------------------------------------------------------------

const PLOT_W: u32 = 800;
const PLOT_H: u32 = 480;
const FONT_PX: f32 = 13.0;
const TITLE_PX: f32 = 16.0;
/// At most this many labelled ticks per axis (plotters picks "nice" values: 1, 2 or 5 × 10^k apart).
const X_TICKS: usize = 10;
const Y_TICKS: usize = 8;
/// Inner margin of the legend box and the length of its colour swatches, in pixels.
const LEGEND_MARGIN: u32 = 6;
const LEGEND_SWATCH: u32 = 24;
const PALETTE: [[u8; 3]; 8] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [127, 127, 127],
];
/// Where the legend may go inside the plot, in order of preference among equally free places.
const LEGEND_PLACES: [SeriesLabelPosition; 6] = [
    SeriesLabelPosition::UpperRight,
    SeriesLabelPosition::UpperLeft,
    SeriesLabelPosition::LowerRight,
    SeriesLabelPosition::LowerLeft,
    SeriesLabelPosition::UpperMiddle,
    SeriesLabelPosition::LowerMiddle,
];

/// A tick label: the shortest decimal within plotters' float precision, in scientific notation where that is
/// shorter (`2e-5`), never with a trailing `.0`.
fn tick_label(v: f64) -> String {
    pretty_print_float(v, true)
}

/// Range of finite values, padded when degenerate.
fn range(vals: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    let (lo, hi) = vals
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), v| {
            (l.min(v), h.max(v))
        });
    if lo > hi {
        return None;
    }
    if hi - lo < 1e-12 * lo.abs().max(1.0) {
        let pad = (lo.abs() * 0.05).max(1e-3);
        return Some((lo - pad, hi + pad));
    }
    let pad = (hi - lo) * 0.05;
    Some((lo - pad, hi + pad))
}

/// Optional texts around a plot (empty strings are left out).
#[derive(Clone, Debug, Default)]
pub struct PlotLabels {
    pub title: String,
    pub x: String,
    pub y: String,
}

/// Renders `series` (name, `(x, y)` points, e.g. `(step, loss)`) as lines on shared axes with tick labels and a
/// legend, and writes the PNG atomically to `path`. Non-finite points are skipped (the line breaks there).
pub fn plot_curves(path: impl AsRef<Path>, series: &[(&str, Vec<(f64, f64)>)]) -> Result<()> {
    plot_curves_labeled(path, &PlotLabels::default(), series)
}

/// [`plot_curves`] with a title and axis titles.
pub fn plot_curves_labeled(
    path: impl AsRef<Path>,
    labels: &PlotLabels,
    series: &[(&str, Vec<(f64, f64)>)],
) -> Result<()> {
    save_png(&render_curves(labels, series), path)
}

/// The image behind [`plot_curves_labeled`]: an 800×480 plotters chart. All series share one pair of axes
/// (ranges over every finite point, padded by 5%); the title is a caption above the plot, the axis titles sit
/// outside the tick labels, and the legend (one entry per series, in palette order) goes in the corner of the
/// plot that the curves cross least. A run of finite points is a line, a lone finite point a dot.
///
/// Plotters lays out and draws the chart on a [`TextBackend`], so every text in it (caption, tick labels, axis
/// titles, legend names) is drawn by the renderer of the grids' labels ([`crate::imaging::draw_text`]).
pub fn render_curves(labels: &PlotLabels, series: &[(&str, Vec<(f64, f64)>)]) -> RgbImage {
    let mut img = RgbImage::from_pixel(PLOT_W, PLOT_H, Rgb([255, 255, 255]));
    if let Err(e) = draw_curves(&mut img, labels, series) {
        // Only plotters' measuring of the legend names (with the embedded font, registered for it) or a shared
        // backend (ours is not) can fail.
        eprintln!("warning: drawing the curves plot: {e}");
    }
    img
}

/// Where [`draw_curves`] put things, in image pixels (read by the tests).
#[derive(Debug)]
#[cfg_attr(not(test), allow(dead_code))]
struct PlotFrame {
    /// The plotting area (inside the axes): `[x0, x1) × [y0, y1)`.
    plot: ((i32, i32), (i32, i32)),
    /// Each series' points mapped to pixels (`None` where the point is not finite).
    points: Vec<Vec<Option<(i32, i32)>>>,
    /// The legend's place.
    legend: SeriesLabelPosition,
}

type PlotError =
    DrawingAreaErrorKind<<TextBackend<BitMapBackend<'static>> as DrawingBackend>::ErrorType>;

fn draw_curves(
    img: &mut RgbImage,
    labels: &PlotLabels,
    series: &[(&str, Vec<(f64, f64)>)],
) -> std::result::Result<PlotFrame, PlotError> {
    let finite = |p: &&(f64, f64)| p.0.is_finite() && p.1.is_finite();
    let pts = || series.iter().flat_map(|(_, v)| v.iter().filter(finite));
    let ((x_lo, x_hi), (y_lo, y_hi)) = match (range(pts().map(|p| p.0)), range(pts().map(|p| p.1)))
    {
        (Some(x), Some(y)) => (x, y),
        _ => ((0.0, 1.0), (0.0, 1.0)),
    };
    let text = RGBColor(40, 40, 40);
    let label_style = font_desc(FONT_PX).color(&text);
    let lh = line_height(FONT_PX);

    // Plotters does not size the label areas: make room for the widest tick label of the ticks it will draw,
    // plus the axis title.
    let y_ticks = RangedCoordf64::from(y_lo..y_hi).key_points(Y_TICKS);
    let y_tick_w = y_ticks
        .iter()
        .map(|v| text_width(&tick_label(*v), FONT_PX))
        .max()
        .unwrap_or(0);
    let title_band = |t: &str| if t.is_empty() { 0 } else { lh + 6 };
    let y_area = y_tick_w + 12 + title_band(&labels.y);
    let x_area = lh + 10 + title_band(&labels.x);

    let size = img.dimensions();
    // Plotters lays out and draws the chart; every text goes through our renderer (see `crate::imaging`).
    let root = TextBackend(BitMapBackend::with_buffer(img, size)).into_drawing_area();
    let mut builder = ChartBuilder::on(&root);
    builder
        .margin(14)
        .x_label_area_size(x_area)
        .y_label_area_size(y_area);
    if !labels.title.is_empty() {
        builder.caption(&labels.title, font_desc(TITLE_PX).color(&BLACK));
    }
    let mut chart = builder.build_cartesian_2d(x_lo..x_hi, y_lo..y_hi)?;

    let fmt = |v: &f64| tick_label(*v);
    let mut mesh = chart.configure_mesh();
    mesh.x_labels(X_TICKS)
        .y_labels(Y_TICKS)
        .x_label_formatter(&fmt)
        .y_label_formatter(&fmt)
        .label_style(label_style.clone())
        .axis_desc_style(label_style.clone())
        .bold_line_style(RGBColor(225, 225, 225))
        .light_line_style(RGBColor(245, 245, 245))
        .axis_style(BLACK);
    if !labels.x.is_empty() {
        mesh.x_desc(labels.x.as_str());
    }
    if !labels.y.is_empty() {
        mesh.y_desc(labels.y.as_str());
    }
    mesh.draw()?;

    let points: Vec<Vec<Option<(i32, i32)>>> = series
        .iter()
        .map(|(_, v)| {
            v.iter()
                .map(|p| (p.0.is_finite() && p.1.is_finite()).then(|| chart.backend_coord(p)))
                .collect()
        })
        .collect();

    for (i, (name, pts)) in series.iter().enumerate() {
        let [r, g, b] = PALETTE[i % PALETTE.len()];
        let color = RGBColor(r, g, b);
        let mut labelled = false;
        for run in pts
            .split(|p| !(p.0.is_finite() && p.1.is_finite()))
            .filter(|run| !run.is_empty())
        {
            let anno = if let [p] = run {
                chart.draw_series(std::iter::once(Circle::new(*p, 2, color.filled())))?
            } else {
                chart.draw_series(LineSeries::new(run.iter().copied(), color.stroke_width(2)))?
            };
            if !labelled {
                legend_entry(anno, name, color, &label_style);
                labelled = true;
            }
        }
        if !labelled {
            // A series without a finite point still gets its legend entry.
            let anno =
                chart.draw_series(LineSeries::new(std::iter::empty(), color.stroke_width(2)))?;
            legend_entry(anno, name, color, &label_style);
        }
    }

    let (xs, ys) = chart.plotting_area().get_pixel_range();
    let legend = legend_place(series, &points, (xs.clone(), ys.clone()), &label_style);
    chart
        .configure_series_labels()
        .position(legend.clone())
        .margin(LEGEND_MARGIN)
        .legend_area_size(LEGEND_SWATCH)
        .label_font(label_style)
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(190, 190, 190))
        .draw()?;
    root.present()?;
    Ok(PlotFrame {
        plot: ((xs.start, xs.end), (ys.start, ys.end)),
        points,
        legend,
    })
}

/// The legend entry of a series: its name and a swatch of its colour, level with the middle of the name's
/// lowercase letters.
fn legend_entry<DB: DrawingBackend>(
    anno: &mut SeriesAnno<'_, DB>,
    name: &str,
    color: RGBColor,
    style: &TextStyle,
) {
    let swatch = LEGEND_SWATCH as i32 - 6;
    // Plotters gives the swatch the middle of the line's box as it measures it (its own font estimate: a fixed
    // height of about px / 1.24); the name is drawn with its line's top at the top of that box.
    let box_h = style.font.box_size(name).map_or(0, |(_, h)| h as i32);
    let dy = x_height_middle(style.font.get_size() as f32).round() as i32 - box_h / 2;
    anno.label(name).legend(move |(x, y)| {
        PathElement::new(
            vec![(x, y + dy), (x + swatch, y + dy)],
            color.stroke_width(3),
        )
    });
}

/// The place in [`LEGEND_PLACES`] whose legend box the curves (sampled every few pixels along their lines)
/// cross least; the first such place on a tie.
fn legend_place(
    series: &[(&str, Vec<(f64, f64)>)],
    points: &[Vec<Option<(i32, i32)>>],
    (xs, ys): (std::ops::Range<i32>, std::ops::Range<i32>),
    style: &TextStyle,
) -> SeriesLabelPosition {
    // The legend box as plotters lays it out: its names as lines of a `MultiLineText`, measured by plotters' font
    // (text at plotters' line spacing, 1.25 × the size), plus the swatch column and the margins.
    let mut names = MultiLineText::<_, &str>::new((0, 0), style);
    for (n, _) in series {
        names.push_line(*n);
    }
    let (tw, th) = names.estimate_dimension().unwrap_or((0, 0));
    let w = tw + (LEGEND_SWATCH + 2 * LEGEND_MARGIN) as i32;
    let h = th + 2 * LEGEND_MARGIN as i32;
    let (aw, ah) = (xs.end - xs.start, ys.end - ys.start);
    let boxes = LEGEND_PLACES.iter().map(|p| {
        let x = match p {
            SeriesLabelPosition::UpperLeft | SeriesLabelPosition::LowerLeft => 5,
            SeriesLabelPosition::UpperRight | SeriesLabelPosition::LowerRight => aw - w - 5,
            _ => (aw - w) / 2,
        };
        let y = match p {
            SeriesLabelPosition::UpperLeft
            | SeriesLabelPosition::UpperRight
            | SeriesLabelPosition::UpperMiddle => 5,
            _ => ah - h - 5,
        };
        // With a few pixels of room around it, in image coordinates.
        (
            xs.start + x - 4,
            ys.start + y - 4,
            xs.start + x + w + 4,
            ys.start + y + h + 4,
        )
    });
    let mut samples = Vec::new();
    for pts in points {
        for run in pts.split(Option::is_none) {
            let run: Vec<(i32, i32)> = run.iter().flatten().copied().collect();
            samples.extend(run.first().copied());
            for pair in run.windows(2) {
                let ((x0, y0), (x1, y1)) = (pair[0], pair[1]);
                let n = ((x1 - x0).abs().max((y1 - y0).abs()) / 3).max(1);
                samples.extend((1..=n).map(|k| (x0 + (x1 - x0) * k / n, y0 + (y1 - y0) * k / n)));
            }
        }
    }
    let crossings = |(x0, y0, x1, y1): (i32, i32, i32, i32)| {
        samples
            .iter()
            .filter(|&&(x, y)| (x0..x1).contains(&x) && (y0..y1).contains(&y))
            .count()
    };
    let best = boxes
        .map(crossings)
        .enumerate()
        .min_by_key(|&(i, n)| (n, i))
        .map_or(0, |(i, _)| i);
    LEGEND_PLACES[best].clone()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imaging::draw_text;

    #[test]
    fn log_lines_and_truncate_on_resume() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run").join(METRICS_FILE);
        let mut w = MetricsWriter::create(&path).unwrap();
        for s in 1..=5u64 {
            w.log(s, &[("loss", 1.0 / s as f64), ("lr", 1e-4)]).unwrap();
        }
        w.write(&serde_json::json!({"event": "validation", "note": "x"}))
            .unwrap();
        drop(w);
        let first = std::fs::read_to_string(&path).unwrap();
        assert!(
            first.starts_with("{\"step\":1,\"loss\":1.0,\"lr\":0.0001}\n"),
            "{first}"
        );
        // A crash cut the last line in half.
        std::fs::write(&path, format!("{first}{{\"step\":6,\"lo")).unwrap();

        let mut w = MetricsWriter::resume(&path, 3).unwrap();
        w.log(4, &[("loss", f64::NAN)]).unwrap();
        drop(w);
        let recs = read_metrics(&path).unwrap();
        let steps: Vec<Option<u64>> = recs.iter().map(|r| r["step"].as_u64()).collect();
        assert_eq!(steps, vec![Some(1), Some(2), Some(3), None, Some(4)]);
        assert!(recs[4]["loss"].is_null());
        assert_eq!(
            series(&recs, "loss"),
            vec![(1.0, 1.0), (2.0, 0.5), (3.0, 1.0 / 3.0)]
        );

        // Resuming with a missing file creates it; create() truncates.
        let other = dir.path().join("new.jsonl");
        MetricsWriter::resume(&other, 10)
            .unwrap()
            .log(11, &[])
            .unwrap();
        assert_eq!(std::fs::read_to_string(&other).unwrap(), "{\"step\":11}\n");
        MetricsWriter::create(&other).unwrap();
        assert_eq!(std::fs::read_to_string(&other).unwrap(), "");
    }

    #[test]
    fn progress_bar_message() {
        let p = TrainProgress::hidden(100, 10);
        assert_eq!(p.position(), 10);
        p.update(11, 0.123456, Some(("acc", 0.5)), 1e-4);
        assert_eq!(p.position(), 11);
        assert_eq!(p.message_text(), "loss 0.1235 acc 0.500 lr 1.00e-4");
        p.update(12, 0.1, None, 0.0);
        assert_eq!(p.message_text(), "loss 0.1000 lr 0.00e0");
        p.finish();
    }

    #[test]
    fn tick_labels_are_short() {
        assert_eq!(tick_label(0.0), "0");
        assert_eq!(tick_label(20.0), "20");
        assert_eq!(tick_label(0.25), "0.25");
        assert_eq!(tick_label(0.1 + 0.2), "0.3");
        assert_eq!(tick_label(-1.5), "-1.5");
        assert_eq!(tick_label(2e-5), "2e-5");
        assert_eq!(tick_label(400.0), "400");
        // The ticks plotters picks for an axis are round values, about Y_TICKS of them.
        let ticks: Vec<String> = RangedCoordf64::from(-5.0..105.0)
            .key_points(Y_TICKS)
            .iter()
            .map(|v| tick_label(*v))
            .collect();
        assert_eq!(ticks, ["0", "20", "40", "60", "80", "100"]);
    }

    /// Set `DIFFPREF_PLOT_DIR=<dir>` to write the rendered test plots for inspection.
    fn dump(name: &str, img: &RgbImage) {
        if let Some(dir) = std::env::var_os("DIFFPREF_PLOT_DIR") {
            save_png(img, Path::new(&dir).join(name)).unwrap();
        }
    }

    fn render(labels: &PlotLabels, series: &[(&str, Vec<(f64, f64)>)]) -> (RgbImage, PlotFrame) {
        let mut img = RgbImage::from_pixel(PLOT_W, PLOT_H, Rgb([255, 255, 255]));
        let frame = draw_curves(&mut img, labels, series).unwrap();
        (img, frame)
    }

    /// Whether a pixel of colour `c` lies within `r` pixels of `(x, y)`.
    fn near(img: &RgbImage, (x, y): (i32, i32), c: [u8; 3], r: i32) -> bool {
        (-r..=r).any(|dx| {
            (-r..=r).any(|dy| {
                let (px, py) = (x + dx, y + dy);
                px >= 0
                    && py >= 0
                    && (px as u32) < img.width()
                    && (py as u32) < img.height()
                    && img.get_pixel(px as u32, py as u32).0 == c
            })
        })
    }

    /// Mean row of the pixels of colour `c` in column `x` between rows `ys`, if any.
    fn mean_row(img: &RgbImage, x: i32, ys: (i32, i32), c: [u8; 3]) -> Option<f64> {
        let rows: Vec<i32> = (ys.0..ys.1)
            .filter(|&y| img.get_pixel(x as u32, y as u32).0 == c)
            .collect();
        (!rows.is_empty()).then(|| rows.iter().sum::<i32>() as f64 / rows.len() as f64)
    }

    #[test]
    fn curves_follow_the_data() {
        let rising: Vec<(f64, f64)> = (0..50).map(|i| (i as f64, i as f64 * 0.02)).collect();
        // Below the rising line everywhere (so neither hides the other), peaking at x = 25.
        let tent: Vec<(f64, f64)> = (0..50)
            .map(|i| (i as f64, -0.05 - 0.01 * (i as f64 - 25.0).abs()))
            .collect();
        let (img, frame) = render(
            &PlotLabels::default(),
            &[("rising", rising), ("tent", tent)],
        );
        dump("follow.png", &img);
        let ((x0, x1), (y0, y1)) = frame.plot;
        assert!(x1 - x0 > 600 && y1 - y0 > 350, "{:?}", frame.plot);
        // Every data point lies on its line, inside the plot, later steps further right.
        for (s, color) in [(0, PALETTE[0]), (1, PALETTE[1])] {
            let pts: Vec<(i32, i32)> = frame.points[s].iter().map(|p| p.unwrap()).collect();
            for &(x, y) in &pts {
                assert!((x0..x1).contains(&x) && (y0..y1).contains(&y), "({x},{y})");
                assert!(
                    near(&img, (x, y), color, 2),
                    "series {s}: no line at ({x},{y})"
                );
            }
            assert!(pts.windows(2).all(|w| w[1].0 > w[0].0));
        }
        // The upper right holds the end of the rising line, the upper left is free: the legend goes there.
        assert_eq!(frame.legend, SeriesLabelPosition::UpperLeft);
        // Read from the pixels alone, right of the legend: the rising line climbs column after column, the
        // tent's right half falls.
        let (first, last) = (
            frame.points[0][0].unwrap().0,
            frame.points[0][49].unwrap().0,
        );
        let cols: Vec<i32> = ((first + last) / 2..last - 3).step_by(25).collect();
        assert!(cols.len() >= 10, "{cols:?}");
        let rows = |c: [u8; 3]| -> Vec<f64> {
            cols.iter()
                .map(|&x| {
                    mean_row(&img, x, (y0, y1), c)
                        .unwrap_or_else(|| panic!("no line in column {x}"))
                })
                .collect()
        };
        let up = rows(PALETTE[0]);
        assert!(up.windows(2).all(|w| w[1] < w[0] - 5.0), "{up:?}");
        let down = rows(PALETTE[1]);
        assert!(down.windows(2).all(|w| w[1] > w[0] + 1.0), "{down:?}");
        // The tent's peak (x = 25) is its highest pixel on the right half, the rising line's end the highest of all.
        let peak = frame.points[1][25].unwrap();
        assert!(down[0] > f64::from(peak.1));
        assert!(f64::from(frame.points[0][49].unwrap().1) < f64::from(peak.1) - 100.0);
    }

    #[test]
    fn gaps_and_lone_points() {
        let mut broken: Vec<(f64, f64)> = (0..50)
            .map(|i| (i as f64, 0.5 + i as f64 / 100.0))
            .collect();
        broken[20].1 = f64::NAN;
        let lone = vec![
            (0.0, 0.0),
            (10.0, f64::NAN),
            (20.0, 1.0),
            (f64::INFINITY, 3.0),
            (40.0, 0.2),
        ];
        let (img, frame) = render(
            &PlotLabels::default(),
            &[("broken", broken), ("lone", lone)],
        );
        dump("gaps.png", &img);
        let ((_, _), (y0, y1)) = frame.plot;
        // No line across the NaN: the columns between its neighbours hold none of the line's colour.
        let (a, b) = (frame.points[0][19].unwrap(), frame.points[0][21].unwrap());
        assert!(frame.points[0][20].is_none());
        assert!(b.0 - a.0 > 12, "{a:?} {b:?}");
        for x in a.0 + 4..b.0 - 3 {
            assert_eq!(mean_row(&img, x, (y0, y1), PALETTE[0]), None, "column {x}");
        }
        assert!(near(&img, a, PALETTE[0], 2) && near(&img, b, PALETTE[0], 2));
        // Lone finite points are dots, not joined.
        let dots: Vec<(i32, i32)> = frame.points[1].iter().flatten().copied().collect();
        assert_eq!(dots.len(), 3);
        for d in &dots {
            assert!(near(&img, *d, PALETTE[1], 1), "no dot at {d:?}");
        }
        let mid = ((dots[0].0 + dots[1].0) / 2, (dots[0].1 + dots[1].1) / 2);
        assert!(!near(&img, mid, PALETTE[1], 4), "dots joined at {mid:?}");
    }

    #[test]
    fn title_and_axis_titles_are_drawn_outside_the_plot() {
        let data = [("loss", vec![(0.0, 1.0), (10.0, 0.5)])];
        let (plain, pf) = render(&PlotLabels::default(), &data);
        let labels = PlotLabels {
            title: "DPO run".into(),
            x: "optimizer step".into(),
            y: "loss value".into(),
        };
        let (img, f) = render(&labels, &data);
        dump("titled.png", &img);
        let dark = |img: &RgbImage, xs: std::ops::Range<i32>, ys: std::ops::Range<i32>| {
            xs.flat_map(|x| ys.clone().map(move |y| (x, y)))
                .filter(|&(x, y)| img.get_pixel(x as u32, y as u32).0.iter().all(|&v| v < 100))
                .count()
        };
        let (w, h) = (PLOT_W as i32, PLOT_H as i32);
        // Title above the plot (which moves down to make room).
        assert!(
            f.plot.1 .0 > pf.plot.1 .0 + 10,
            "{:?} vs {:?}",
            f.plot,
            pf.plot
        );
        assert_eq!(dark(&plain, 0..w, 0..pf.plot.1 .0 - 10), 0);
        assert!(dark(&img, 0..w, 0..f.plot.1 .0 - 10) > 40);
        // x title at the bottom, under the tick labels; y title at the far left, beside them.
        let bottom = |img: &RgbImage, fr: &PlotFrame| dark(img, 0..w, fr.plot.1 .1 + 20..h);
        assert_eq!(bottom(&plain, &pf), 0);
        assert!(bottom(&img, &f) > 40);
        // Left of the axis, groups of columns with ink, separated by blank columns: the tick labels, and with a
        // y title a group before them, upright (rotated text: much taller than wide).
        let groups = |img: &RgbImage, fr: &PlotFrame| {
            let mut out: Vec<(i32, i32, i32, i32)> = Vec::new(); // x0, x1, y_min, y_max
            let mut open = false;
            for x in 0..fr.plot.0 .0 - 1 {
                let ys: Vec<i32> = (0..h)
                    .filter(|&y| img.get_pixel(x as u32, y as u32).0.iter().all(|&v| v < 100))
                    .collect();
                match (ys.first(), ys.last(), open) {
                    (Some(&lo), Some(&hi), false) => out.push((x, x + 1, lo, hi)),
                    (Some(&lo), Some(&hi), true) => {
                        let g = out.last_mut().unwrap();
                        *g = (g.0, x + 1, g.2.min(lo), g.3.max(hi));
                    }
                    _ => {}
                }
                open = !ys.is_empty();
            }
            out
        };
        let (gp, gl) = (groups(&plain, &pf), groups(&img, &f));
        assert_eq!(gl.len(), gp.len() + 1, "{gp:?} vs {gl:?}");
        let (x0, x1, y0, y1) = gl[0];
        assert!(
            y1 - y0 > 3 * (x1 - x0) && y1 - y0 > 40,
            "y title {:?}",
            gl[0]
        );
    }

    #[test]
    fn chart_text_is_drawn_like_labels() {
        // The caption, drawn by plotters through `TextBackend`, is pixel for pixel what `draw_text` draws at the
        // same place (found from the ink's corner): one text renderer for charts and grids.
        let labels = PlotLabels {
            title: "Hello, Wordly".into(),
            ..Default::default()
        };
        let (img, f) = render(&labels, &[("loss", vec![(0.0, 1.0), (10.0, 0.5)])]);
        let band = (f.plot.1 .0 - 10) as u32;
        let ink = |img: &RgbImage| {
            let pts: Vec<(u32, u32)> = (0..band)
                .flat_map(|y| (0..PLOT_W).map(move |x| (x, y)))
                .filter(|&(x, y)| img.get_pixel(x, y).0 != [255, 255, 255])
                .collect();
            let x0 = pts.iter().map(|p| p.0).min().unwrap();
            let y0 = pts.iter().map(|p| p.1).min().unwrap();
            (x0 as i32, y0 as i32)
        };
        let blank = || RgbImage::from_pixel(PLOT_W, PLOT_H, Rgb([255, 255, 255]));
        let mut probe = blank();
        draw_text(&mut probe, 0, 20, &labels.title, TITLE_PX, Rgb([0, 0, 0]));
        let ((cx, cy), (px, py)) = (ink(&img), ink(&probe));
        let mut expected = blank();
        draw_text(
            &mut expected,
            cx - px,
            cy - py + 20,
            &labels.title,
            TITLE_PX,
            Rgb([0, 0, 0]),
        );
        for y in 0..band {
            for x in 0..PLOT_W {
                assert_eq!(img.get_pixel(x, y), expected.get_pixel(x, y), "({x},{y})");
            }
        }
        // Centred over the plot, like the caption plotters places.
        let w = text_width(&labels.title, TITLE_PX) as i32;
        assert!((cx - px + w / 2 - PLOT_W as i32 / 2).abs() <= 2, "{cx}");
    }

    #[test]
    fn plot_writes_png_with_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("curves.png");
        let loss: Vec<(f64, f64)> = (0..50)
            .map(|i| (i as f64, (-(i as f64) / 10.0).exp()))
            .collect();
        let reward: Vec<(f64, f64)> = (0..50)
            .map(|i| {
                (
                    i as f64,
                    if i == 20 {
                        f64::NAN
                    } else {
                        0.5 + i as f64 / 100.0
                    },
                )
            })
            .collect();
        plot_curves(&path, &[("loss", loss), ("reward", reward)]).unwrap();
        if let Ok(p) = std::env::var("DIFFPREF_PLOT_OUT") {
            std::fs::copy(&path, p).unwrap();
        }
        let img = image::open(&path).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (PLOT_W, PLOT_H));
        let count = |c: [u8; 3]| img.pixels().filter(|p| p.0 == c).count();
        assert!(count(PALETTE[0]) > 300, "loss line drawn");
        assert!(count(PALETTE[1]) > 300, "reward line drawn");
        // Degenerate inputs still render.
        let none = PlotLabels::default();
        assert_eq!(render_curves(&none, &[]).dimensions(), (PLOT_W, PLOT_H));
        render_curves(&none, &[("flat", vec![(3.0, 1.0)])]);
        let labels = PlotLabels {
            title: "DPO".into(),
            x: "step".into(),
            y: "loss".into(),
        };
        let path = dir.path().join("labeled.png");
        plot_curves_labeled(&path, &labels, &[("loss", vec![(0.0, 1.0), (1.0, 0.5)])]).unwrap();
        assert!(image::open(&path).is_ok());
    }
}
