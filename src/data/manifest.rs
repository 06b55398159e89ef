//! Preference manifests: JSON Lines files listing image pairs (Diffusion-DPO and relatives) or single images with
//! a desirable/undesirable label (Diffusion-KTO).
//!
//! # Pair manifests
//!
//! One JSON object per line:
//!
//! ```text
//! {"prompt": "a red fox in snow", "chosen": "img/0001_a.png", "rejected": "img/0001_b.png"}
//! {"prompt": "a castle", "chosen": "img/0002_a.png", "rejected": "img/0002_b.png", "label": 0.5}
//! ```
//!
//! * `prompt` (string), `chosen` and `rejected` (image paths, relative to the manifest's folder unless absolute)
//!   are required; other keys are ignored, so a manifest may carry its own metadata.
//! * `label` (optional number in `[0, 1]`, default `1.0`) is the probability that `chosen` is preferred. A label
//!   below 0.5 swaps the two images (and becomes `1 - label`), so the winner always comes first, as Pick-a-Pic's
//!   `label_0 = 0` does. A label of 0.5 is a tie: dropped by default like the official Diffusion-DPO loader, kept
//!   with `drop_ties: false` (conservative DPO / label smoothing).
//! * `chosen_latent` and `rejected_latent` (optional, together): the images' stored sampler latents (see
//!   [`crate::data::latents`]; `data make-prefs` writes them). `train dpo` trains on them instead of VAE
//!   encodings of the PNGs (`[data] stored_latents`).
//! * Blank lines and lines whose first non-blank character is `#` are skipped.
//!
//! # Unpaired (KTO) manifests
//!
//! `{"prompt": str, "image": PATH, "desirable": bool}` per line, read by [`load_unpaired_manifest`].
//!
//! Every problem (malformed JSON, a missing key, a value of the wrong type, a missing image) is an error naming
//! `file:line` and the key or path; with `skip_bad` the line is skipped instead and counted in the [`SkipReport`].

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};

/// How many skip reasons a [`SkipReport`] keeps (the count goes on past this).
pub const MAX_SKIP_REASONS: usize = 1000;

/// Labels this close to 0.5 are ties.
const TIE_EPS: f64 = 1e-6;

/// One preference pair from a manifest; `chosen` is always the preferred image (`label >= 0.5`).
#[derive(Clone, Debug, PartialEq)]
pub struct PreferencePair {
    pub prompt: String,
    /// Resolved image path (relative manifest paths are joined to the manifest's folder).
    pub chosen: PathBuf,
    pub rejected: PathBuf,
    /// Probability that `chosen` is preferred, in `[0.5, 1]` (0.5 only when ties are kept).
    pub label: f32,
    /// Where the pair came from, `"file:line"` (1-based line).
    pub source: String,
    /// The stored sampler latents of `chosen` and `rejected` (keys `"chosen_latent"`, `"rejected_latent"`;
    /// see [`crate::data::latents`]), when the manifest names them.
    pub latents: Option<(PathBuf, PathBuf)>,
}

impl PreferencePair {
    /// Whether the pair is a tie (label 0.5).
    pub fn is_tie(&self) -> bool {
        (f64::from(self.label) - 0.5).abs() <= TIE_EPS
    }
}

/// One image with a binary desirability label (Diffusion-KTO).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnpairedSample {
    pub prompt: String,
    pub image: PathBuf,
    pub desirable: bool,
    /// `"file:line"` (1-based line).
    pub source: String,
}

/// Options for [`load_manifest`] / [`load_unpaired_manifest`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestOptions {
    /// Drop pairs labelled 0.5 (default `true`, as the official Diffusion-DPO loader).
    pub drop_ties: bool,
    /// Check that every image file exists (default `true`).
    pub check_images: bool,
    /// Skip bad lines (counted in the report) instead of failing on the first one (default `false`).
    pub skip_bad: bool,
}

impl Default for ManifestOptions {
    fn default() -> Self {
        ManifestOptions {
            drop_ties: true,
            check_images: true,
            skip_bad: false,
        }
    }
}

/// What was left out while reading a manifest or a parquet shard.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SkipReport {
    /// Bad lines / rows skipped because of `skip_bad`.
    pub count: usize,
    /// One message per skipped line or row, each naming its place (`file:line` or `file row N`); at most
    /// [`MAX_SKIP_REASONS`] are kept.
    pub reasons: Vec<String>,
    /// Ties (label 0.5) dropped on purpose; not errors.
    pub ties_dropped: usize,
    /// Rows left out by an optional filter (Pick-a-Pic `has_label` / `are_different`); not errors.
    pub filtered: usize,
}

impl SkipReport {
    /// Records one skipped item.
    pub fn skip(&mut self, reason: impl Into<String>) {
        self.count += 1;
        if self.reasons.len() < MAX_SKIP_REASONS {
            self.reasons.push(reason.into());
        }
    }

    /// Adds another report's counts and reasons to this one.
    pub fn merge(&mut self, other: SkipReport) {
        self.count += other.count;
        self.ties_dropped += other.ties_dropped;
        self.filtered += other.filtered;
        let room = MAX_SKIP_REASONS.saturating_sub(self.reasons.len());
        self.reasons.extend(other.reasons.into_iter().take(room));
    }

    /// Whether nothing was left out.
    pub fn is_empty(&self) -> bool {
        self.count == 0 && self.ties_dropped == 0 && self.filtered == 0
    }
}

impl fmt::Display for SkipReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} bad skipped, {} ties dropped, {} filtered",
            self.count, self.ties_dropped, self.filtered
        )?;
        for r in self.reasons.iter().take(5) {
            write!(f, "\n  {r}")?;
        }
        if self.count > 5 {
            write!(f, "\n  ... and {} more", self.count - 5)?;
        }
        Ok(())
    }
}

/// Reads a pair manifest. Returns the pairs (in file order) and what was skipped.
pub fn load_manifest(
    path: impl AsRef<Path>,
    opts: &ManifestOptions,
) -> Result<(Vec<PreferencePair>, SkipReport)> {
    let path = path.as_ref();
    let mut report = SkipReport::default();
    let mut pairs = Vec::new();
    for_each_record(path, |rec, base| {
        match rec.and_then(|(src, obj)| parse_pair(src, obj, base, opts)) {
            Ok(p) if p.is_tie() && opts.drop_ties => report.ties_dropped += 1,
            Ok(p) => pairs.push(p),
            Err(e) if opts.skip_bad => report.skip(format!("{e:#}")),
            Err(e) => return Err(e),
        }
        Ok(())
    })?;
    Ok((pairs, report))
}

/// Reads an unpaired (KTO) manifest of `{"prompt", "image", "desirable"}` lines. `drop_ties` does not apply.
pub fn load_unpaired_manifest(
    path: impl AsRef<Path>,
    opts: &ManifestOptions,
) -> Result<(Vec<UnpairedSample>, SkipReport)> {
    let path = path.as_ref();
    let mut report = SkipReport::default();
    let mut samples = Vec::new();
    for_each_record(path, |rec, base| {
        match rec.and_then(|(src, obj)| parse_unpaired(src, obj, base, opts)) {
            Ok(s) => samples.push(s),
            Err(e) if opts.skip_bad => report.skip(format!("{e:#}")),
            Err(e) => return Err(e),
        }
        Ok(())
    })?;
    Ok((samples, report))
}

/// A parsed line: its `"file:line"` and its object, or the line-level problem (not UTF-8, malformed JSON, not
/// an object).
type Record<'a> = Result<(&'a str, &'a Map<String, Value>)>;

/// Calls `each(record, manifest_dir)` for every line that is neither blank nor a comment.
fn for_each_record(
    path: &Path,
    mut each: impl FnMut(Record<'_>, &Path) -> Result<()>,
) -> Result<()> {
    let bytes =
        std::fs::read(path).with_context(|| format!("cannot read manifest {}", path.display()))?;
    let base = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let src = format!("{}:{}", path.display(), i + 1);
        let line = match std::str::from_utf8(raw) {
            Ok(l) => l,
            Err(e) => {
                each(
                    Err(anyhow::anyhow!("{src}: line is not valid UTF-8 ({e})")),
                    base,
                )?;
                continue;
            }
        };
        let line = line.trim_start_matches('\u{feff}').trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let value: Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(e) => {
                each(Err(anyhow::anyhow!("{src}: malformed JSON: {e}")), base)?;
                continue;
            }
        };
        let Value::Object(obj) = value else {
            let e = anyhow::anyhow!("{src}: expected a JSON object, got {}", describe(&value));
            each(Err(e), base)?;
            continue;
        };
        each(Ok((&src, &obj)), base)?;
    }
    Ok(())
}

fn parse_pair(
    src: &str,
    obj: &Map<String, Value>,
    base: &Path,
    opts: &ManifestOptions,
) -> Result<PreferencePair> {
    if !obj.contains_key("chosen") && obj.contains_key("image") {
        bail!(
            "{src}: missing key \"chosen\" (this line looks like an unpaired KTO record; \
             read it with load_unpaired_manifest)"
        );
    }
    let prompt = get_str(src, obj, "prompt")?.to_string();
    let mut chosen = image_path(src, obj, "chosen", base, opts.check_images)?;
    let mut rejected = image_path(src, obj, "rejected", base, opts.check_images)?;
    let mut label = match obj.get("label") {
        None | Some(Value::Null) => 1.0,
        Some(Value::Number(n)) => {
            let l = n.as_f64().unwrap_or(f64::NAN);
            if !(0.0..=1.0).contains(&l) {
                bail!("{src}: key \"label\" must be in [0, 1], got {n}");
            }
            l
        }
        Some(v) => bail!(
            "{src}: key \"label\" must be a number in [0, 1], got {}",
            describe(v)
        ),
    };
    if chosen == rejected {
        bail!(
            "{src}: keys \"chosen\" and \"rejected\" name the same image {}",
            chosen.display()
        );
    }
    let has = |key: &str| obj.contains_key(key);
    let mut latents = match (has("chosen_latent"), has("rejected_latent")) {
        (false, false) => None,
        (true, true) => Some((
            image_path(src, obj, "chosen_latent", base, opts.check_images)?,
            image_path(src, obj, "rejected_latent", base, opts.check_images)?,
        )),
        (has_chosen, _) => {
            let (given, missing) = if has_chosen {
                ("chosen_latent", "rejected_latent")
            } else {
                ("rejected_latent", "chosen_latent")
            };
            bail!(
                "{src}: key \"{given}\" is given without \"{missing}\" \
                 (a pair's stored latents come together)"
            )
        }
    };
    if label < 0.5 - TIE_EPS {
        std::mem::swap(&mut chosen, &mut rejected);
        if let Some((c, r)) = latents.as_mut() {
            std::mem::swap(c, r);
        }
        label = 1.0 - label;
    }
    Ok(PreferencePair {
        prompt,
        chosen,
        rejected,
        label: label as f32,
        source: src.to_string(),
        latents,
    })
}

fn parse_unpaired(
    src: &str,
    obj: &Map<String, Value>,
    base: &Path,
    opts: &ManifestOptions,
) -> Result<UnpairedSample> {
    let prompt = get_str(src, obj, "prompt")?.to_string();
    let image = image_path(src, obj, "image", base, opts.check_images)?;
    let desirable = match obj.get("desirable") {
        Some(Value::Bool(b)) => *b,
        None => bail!("{src}: missing key \"desirable\""),
        Some(v) => bail!(
            "{src}: key \"desirable\" must be true or false, got {}",
            describe(v)
        ),
    };
    Ok(UnpairedSample {
        prompt,
        image,
        desirable,
        source: src.to_string(),
    })
}

fn get_str<'a>(src: &str, obj: &'a Map<String, Value>, key: &str) -> Result<&'a str> {
    match obj.get(key) {
        Some(Value::String(s)) => Ok(s),
        None => bail!("{src}: missing key \"{key}\""),
        Some(v) => bail!("{src}: key \"{key}\" must be a string, got {}", describe(v)),
    }
}

fn image_path(
    src: &str,
    obj: &Map<String, Value>,
    key: &str,
    base: &Path,
    check: bool,
) -> Result<PathBuf> {
    let rel = get_str(src, obj, key)?;
    if rel.trim().is_empty() {
        bail!("{src}: key \"{key}\" is an empty path");
    }
    let p = Path::new(rel);
    let full = if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    };
    if check {
        match std::fs::metadata(&full) {
            Ok(m) if m.is_file() => {}
            Ok(_) => bail!("{src}: key \"{key}\": {} is not a file", full.display()),
            Err(e) => bail!(
                "{src}: key \"{key}\": image {} not found ({e})",
                full.display()
            ),
        }
    }
    Ok(full)
}

/// A short description of a JSON value for error messages (type and a clipped rendering).
fn describe(v: &Value) -> String {
    let kind = match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    };
    let mut text = v.to_string();
    if text.chars().count() > 60 {
        text = text.chars().take(57).collect::<String>() + "...";
    }
    if matches!(v, Value::Null) {
        kind.to_string()
    } else {
        format!("{kind} ({text})")
    }
}
