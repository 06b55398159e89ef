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
use serde_json::Value;

use super::tensorboard::EventWriter;
use crate::imaging::{draw_text, line_height, save_png, text_width};
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

/// "Nice" tick positions (1, 2, 2.5 or 5 × 10^k apart, about 6 of them) covering `[lo, hi]`.
fn ticks(lo: f64, hi: f64) -> (Vec<f64>, f64) {
    let raw = (hi - lo) / 6.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    ((first..=last).map(|k| k as f64 * step).collect(), step)
}

fn tick_label(v: f64, step: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let a = v.abs();
    if !(1e-3..1e5).contains(&a) {
        format!("{v:.1e}")
    } else {
        // Enough decimals for the tick spacing (2.5 × 10^k needs one more than 10^k).
        let mut decimals = (-step.log10().floor()).max(0.0) as usize;
        if (step / 10f64.powf(step.log10().floor()) - 2.5).abs() < 1e-9 && step < 10.0 {
            decimals += 1;
        }
        format!("{v:.decimals$}")
    }
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

fn blend(img: &mut RgbImage, x: i64, y: i64, c: Rgb<u8>) {
    if x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
        img.put_pixel(x as u32, y as u32, c);
    }
}

/// A 2-pixel-wide line from `(x0, y0)` to `(x1, y1)` (Bresenham).
fn line(img: &mut RgbImage, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: Rgb<u8>) {
    let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
    let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
    let (mut x, mut y, mut err) = (x0, y0, dx + dy);
    loop {
        blend(img, x, y, c);
        blend(img, x + 1, y, c);
        blend(img, x, y + 1, c);
        if x == x1 && y == y1 {
            break;
        }
        let e2 = 2 * err;
        if e2 >= dy {
            err += dy;
            x += sx;
        }
        if e2 <= dx {
            err += dx;
            y += sy;
        }
    }
}

fn fill(img: &mut RgbImage, x0: i64, y0: i64, w: i64, h: i64, c: Rgb<u8>) {
    for y in y0..y0 + h {
        for x in x0..x0 + w {
            blend(img, x, y, c);
        }
    }
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

/// The image behind [`plot_curves_labeled`].
pub fn render_curves(labels: &PlotLabels, series: &[(&str, Vec<(f64, f64)>)]) -> RgbImage {
    let mut img = RgbImage::from_pixel(PLOT_W, PLOT_H, Rgb([255, 255, 255]));
    let finite = |p: &&(f64, f64)| p.0.is_finite() && p.1.is_finite();
    let pts = || series.iter().flat_map(|(_, v)| v.iter().filter(finite));
    let xr = range(pts().map(|p| p.0));
    let yr = range(pts().map(|p| p.1));
    let ((x_lo, x_hi), (y_lo, y_hi)) = match (xr, yr) {
        (Some(x), Some(y)) => (x, y),
        _ => ((0.0, 1.0), (0.0, 1.0)),
    };
    let (yt, ys) = ticks(y_lo, y_hi);
    let (xt, xs) = ticks(x_lo, x_hi);
    let y_labels: Vec<String> = yt.iter().map(|v| tick_label(*v, ys)).collect();
    let lh = line_height(FONT_PX) as i64;
    let text = Rgb([40, 40, 40]);

    // Layout: a header row (title, then the legend) above the plot area, tick labels left of and below it,
    // and optional axis titles outside those.
    let y_title_w = if labels.y.is_empty() { 0 } else { lh + 4 };
    let tick_w = y_labels
        .iter()
        .map(|l| text_width(l, FONT_PX))
        .max()
        .unwrap_or(0) as i64;
    let left = y_title_w + tick_w + 14;
    let right = 20i64;
    let top = lh + 16;
    let bottom = lh + 12 + if labels.x.is_empty() { 0 } else { lh + 4 };
    let (pw, ph) = (PLOT_W as i64 - left - right, PLOT_H as i64 - top - bottom);
    let px = |x: f64| left + ((x - x_lo) / (x_hi - x_lo) * pw as f64).round() as i64;
    let py = |y: f64| top + ph - ((y - y_lo) / (y_hi - y_lo) * ph as f64).round() as i64;

    // Grid and tick labels.
    let grid = Rgb([225, 225, 225]);
    for (v, label) in yt.iter().zip(&y_labels) {
        let y = py(*v);
        line(&mut img, (left, y), (left + pw, y), grid);
        let w = text_width(label, FONT_PX) as i64;
        let (tx, ty) = (left - 6 - w, y - lh / 2);
        draw_text(&mut img, tx as i32, ty as i32, label, FONT_PX, text);
    }
    for v in &xt {
        let x = px(*v);
        line(&mut img, (x, top), (x, top + ph), grid);
        let label = tick_label(*v, xs);
        let w = text_width(&label, FONT_PX) as i64;
        let (tx, ty) = (x - w / 2, top + ph + 6);
        draw_text(&mut img, tx as i32, ty as i32, &label, FONT_PX, text);
    }
    let axis = Rgb([0, 0, 0]);
    line(&mut img, (left, top + ph), (left + pw, top + ph), axis);
    line(&mut img, (left, top), (left, top + ph), axis);

    // Axis titles: x centred below the tick labels; y drawn upright, one character per line, at the far left.
    if !labels.x.is_empty() {
        let w = text_width(&labels.x, FONT_PX) as i64;
        let (tx, ty) = (left + (pw - w) / 2, PLOT_H as i64 - lh - 6);
        draw_text(&mut img, tx as i32, ty as i32, &labels.x, FONT_PX, text);
    }
    if !labels.y.is_empty() {
        let chars: Vec<String> = labels.y.chars().map(String::from).collect();
        let step = lh * 3 / 4;
        let y0 = top + (ph - step * chars.len() as i64) / 2;
        for (i, ch) in chars.iter().enumerate() {
            let w = text_width(ch, FONT_PX) as i64;
            let (tx, ty) = (4 + (lh - w) / 2, y0 + step * i as i64);
            draw_text(&mut img, tx as i32, ty as i32, ch, FONT_PX, text);
        }
    }

    // Curves.
    for (i, (_, pts)) in series.iter().enumerate() {
        let c = Rgb(PALETTE[i % PALETTE.len()]);
        let mut prev: Option<(i64, i64)> = None;
        for p in pts {
            if !(p.0.is_finite() && p.1.is_finite()) {
                prev = None;
                continue;
            }
            let q = (px(p.0), py(p.1));
            match prev {
                Some(a) => line(&mut img, a, q, c),
                None => fill(&mut img, q.0 - 1, q.1 - 1, 3, 3, c),
            }
            prev = Some(q);
        }
    }

    // Header: title on the left, legend entries (colour swatch + name) after it.
    let mut x = left;
    let y = 6i64;
    if !labels.title.is_empty() {
        draw_text(
            &mut img,
            x as i32,
            y as i32,
            &labels.title,
            FONT_PX,
            Rgb([0, 0, 0]),
        );
        x += text_width(&labels.title, FONT_PX) as i64 + 24;
    }
    for (i, (name, _)) in series.iter().enumerate() {
        let c = Rgb(PALETTE[i % PALETTE.len()]);
        fill(&mut img, x, y + lh / 2 - 2, 16, 4, c);
        draw_text(&mut img, (x + 20) as i32, y as i32, name, FONT_PX, text);
        x += 20 + text_width(name, FONT_PX) as i64 + 18;
    }
    img
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn ticks_are_nice() {
        let (t, s) = ticks(0.0, 100.0);
        assert_eq!(s, 20.0);
        assert_eq!(t, vec![0.0, 20.0, 40.0, 60.0, 80.0, 100.0]);
        assert_eq!(tick_label(0.25, 0.05), "0.25");
        assert_eq!(tick_label(0.75, 0.25), "0.75");
        assert_eq!(ticks(0.0, 1.5).1, 0.25);
        assert_eq!(tick_label(2e-5, 1e-5), "2.0e-5");
        assert_eq!(tick_label(400.0, 100.0), "400");
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
