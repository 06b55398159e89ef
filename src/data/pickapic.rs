//! Pick-a-Pic v2 parquet shards (see `shared/specs/diffusion-dpo.md` §6).
//!
//! Columns used: `caption` (string), `jpg_0` / `jpg_1` (encoded image bytes: plain binary, or the Hugging Face
//! `Image` struct `{bytes, path}`), `label_0` (float: probability that image 0 is preferred), and when present
//! `label_1`, `has_label`, `are_different` (sanity checks / optional filters). Other columns are ignored.
//!
//! As in the official Diffusion-DPO loader, ties (`label_0 = 0.5`) are dropped by default and the winner comes
//! first: when `label_0 < 0.5` (Pick-a-Pic: `label_0 = 0`), image 1 becomes `chosen`. Rows are numbered from 0
//! across the whole file; every problem names the file and the row (and the column), or, with `skip_bad`, is
//! counted in the [`SkipReport`] and the row is left out.
//!
//! Only the low-level `parquet` reader is used (no arrow), with Snappy, the compression of the Hub's files.
//! Images are decoded lazily, one row group at a time ([`PickapicShard::pairs`]), or on demand through a
//! [`PickapicIndex`] that keeps only the light columns in memory.

use std::collections::VecDeque;
use std::fs::File;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use image::RgbImage;
use parquet::basic::Type as PhysicalType;
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::{Field, Row};
use parquet::schema::types::{Type, TypePtr};

use super::manifest::SkipReport;

/// The encoded `(jpg_0, jpg_1)` of one row.
pub type ImageBytes = (Vec<u8>, Vec<u8>);

/// The image bytes of a row group's rows (a row that could not be read is an error).
type GroupImages = Arc<Vec<Result<ImageBytes>>>;

/// Labels this close to 0.5 are ties.
const TIE_EPS: f64 = 1e-6;

/// A preference pair with decoded images; `chosen` is the preferred one.
#[derive(Clone, Debug)]
pub struct PairImages {
    pub prompt: String,
    pub chosen: RgbImage,
    pub rejected: RgbImage,
    /// Probability that `chosen` is preferred, in `[0.5, 1]`.
    pub label: f32,
    /// Where the pair came from: `"file row N"` (parquet) or `"file:line"` (manifest).
    pub source: String,
    /// Stored sampler latents of `chosen` and `rejected` (`[C, h, w]` f32 each), when the manifest names them.
    pub latents: Option<(candle_core::Tensor, candle_core::Tensor)>,
}

impl PartialEq for PairImages {
    /// Field by field; stored latents compare by shape and values.
    fn eq(&self, other: &Self) -> bool {
        fn same(a: &candle_core::Tensor, b: &candle_core::Tensor) -> bool {
            let v = |t: &candle_core::Tensor| t.flatten_all().and_then(|t| t.to_vec1::<f32>()).ok();
            a.dims() == b.dims() && v(a).is_some() && v(a) == v(b)
        }
        self.prompt == other.prompt
            && self.chosen == other.chosen
            && self.rejected == other.rejected
            && self.label == other.label
            && self.source == other.source
            && match (&self.latents, &other.latents) {
                (None, None) => true,
                (Some((a, b)), Some((c, d))) => same(a, c) && same(b, d),
                _ => false,
            }
    }
}

/// Options for reading Pick-a-Pic shards.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PickapicOptions {
    /// Drop ties (`label_0 = 0.5`), as the official loader (default `true`).
    pub drop_ties: bool,
    /// Skip corrupt rows (counted) instead of failing (default `false`).
    pub skip_bad: bool,
    /// Keep only rows with `has_label = true` (default `false`; the column must exist when set).
    pub require_has_label: bool,
    /// Keep only rows with `are_different = true` (default `false`; the column must exist when set).
    pub require_different: bool,
}

impl Default for PickapicOptions {
    fn default() -> Self {
        PickapicOptions {
            drop_ties: true,
            skip_bad: false,
            require_has_label: false,
            require_different: false,
        }
    }
}

/// The light (non-image) part of one row, with the winner resolved.
#[derive(Clone, Debug, PartialEq)]
pub struct RowMeta {
    /// 0-based row number in its file.
    pub row: usize,
    pub prompt: String,
    /// Whether image 1 is the winner (so `chosen = jpg_1`).
    pub swapped: bool,
    /// Probability that the winner is preferred, in `[0.5, 1]`.
    pub label: f32,
}

/// One opened shard.
pub struct PickapicShard {
    path: PathBuf,
    reader: SerializedFileReader<File>,
    /// First row number of each row group, plus the total at the end.
    group_starts: Vec<usize>,
    meta_projection: Type,
    full_projection: Type,
    image_projection: Type,
    has_label_1: bool,
    has_has_label: bool,
    has_are_different: bool,
}

impl std::fmt::Debug for PickapicShard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PickapicShard")
            .field("path", &self.path)
            .field("rows", &self.num_rows())
            .field("row_groups", &self.num_row_groups())
            .finish()
    }
}

/// Runs a parquet call, turning both its errors and its panics (on corrupt data) into errors.
fn guarded<T>(what: impl FnOnce() -> String, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r.with_context(what),
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            Err(anyhow!("{}: parquet reader failed: {msg}", what()))
        }
    }
}

/// Clips long error texts (the parquet crate may print raw bytes).
fn clip(s: String) -> String {
    if s.chars().count() > 300 {
        s.chars().take(297).collect::<String>() + "..."
    } else {
        s
    }
}

impl PickapicShard {
    /// Opens a shard and checks its schema (required columns and their types).
    pub fn open(path: impl AsRef<Path>, opts: &PickapicOptions) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let d = path.display().to_string();
        let file = File::open(&path).with_context(|| format!("cannot open {d}"))?;
        let reader = guarded(
            || format!("{d}: not a readable parquet file"),
            || Ok(SerializedFileReader::new(file)?),
        )?;
        let meta = reader.metadata();
        let schema = meta.file_metadata().schema();
        let fields = schema.get_fields();
        let find = |name: &str| fields.iter().find(|f| f.name() == name).cloned();
        let need = |name: &str| -> Result<TypePtr> {
            find(name).with_context(|| {
                let names: Vec<&str> = fields.iter().map(|f| f.name()).collect();
                format!(
                    "{d}: missing column \"{name}\" (columns: {})",
                    names.join(", ")
                )
            })
        };
        let caption = need("caption")?;
        let label_0 = need("label_0")?;
        let jpg_0 = need("jpg_0")?;
        let jpg_1 = need("jpg_1")?;
        let label_1 = find("label_1");
        let has_label = find("has_label");
        let are_different = find("are_different");
        check_type(&d, &caption, &[PhysicalType::BYTE_ARRAY])?;
        let floats = [
            PhysicalType::DOUBLE,
            PhysicalType::FLOAT,
            PhysicalType::INT32,
            PhysicalType::INT64,
        ];
        check_type(&d, &label_0, &floats)?;
        if let Some(t) = &label_1 {
            check_type(&d, t, &floats)?;
        }
        for t in [&has_label, &are_different].into_iter().flatten() {
            check_type(&d, t, &[PhysicalType::BOOLEAN])?;
        }
        for t in [&jpg_0, &jpg_1] {
            if t.is_primitive() {
                check_type(&d, t, &[PhysicalType::BYTE_ARRAY])?;
            } else if !t.get_fields().iter().any(|f| f.name() == "bytes") {
                bail!(
                    "{d}: column \"{}\" is a group without a \"bytes\" field",
                    t.name()
                );
            }
        }
        if opts.require_has_label && has_label.is_none() {
            bail!("{d}: require_has_label is set but the file has no \"has_label\" column");
        }
        if opts.require_different && are_different.is_none() {
            bail!("{d}: require_different is set but the file has no \"are_different\" column");
        }
        let mut light = vec![caption, label_0];
        light.extend(label_1.iter().cloned());
        light.extend(has_label.iter().cloned());
        light.extend(are_different.iter().cloned());
        let images = vec![jpg_0, jpg_1];
        let build = |fs: Vec<TypePtr>| -> Result<Type> {
            Type::group_type_builder(schema.name())
                .with_fields(fs)
                .build()
                .with_context(|| format!("{d}: building a column projection"))
        };
        let meta_projection = build(light.clone())?;
        let image_projection = build(images.clone())?;
        let full_projection = build(light.into_iter().chain(images).collect())?;
        let mut group_starts = vec![0usize];
        for g in meta.row_groups() {
            let n = usize::try_from(g.num_rows())
                .with_context(|| format!("{d}: negative row count in the metadata"))?;
            group_starts.push(group_starts.last().copied().unwrap_or(0) + n);
        }
        Ok(PickapicShard {
            path,
            reader,
            group_starts,
            meta_projection,
            full_projection,
            image_projection,
            has_label_1: label_1.is_some(),
            has_has_label: has_label.is_some(),
            has_are_different: are_different.is_some(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Rows in the file (before any filtering).
    pub fn num_rows(&self) -> usize {
        self.group_starts.last().copied().unwrap_or(0)
    }

    pub fn num_row_groups(&self) -> usize {
        self.group_starts.len() - 1
    }

    /// Row group and offset inside it of a file row.
    pub fn locate(&self, row: usize) -> Option<(usize, usize)> {
        if row >= self.num_rows() {
            return None;
        }
        let g = self.group_starts.partition_point(|&s| s <= row) - 1;
        Some((g, row - self.group_starts[g]))
    }

    fn row_name(&self, row: usize) -> String {
        format!("{} row {row}", self.path.display())
    }

    /// Reads the rows of a row group with a projection. A row that cannot be read ends the group (the reader
    /// cannot resynchronise): it is returned as an error at its position.
    fn read_group(&self, group: usize, projection: &Type) -> Result<Vec<Result<Row>>> {
        let start = self.group_starts[group];
        let d = self.path.display().to_string();
        guarded(
            || format!("{d}: row group {group} (rows from {start})"),
            || {
                let rg = self.reader.get_row_group(group)?;
                let iter = rg.get_row_iter(Some(projection.clone()))?;
                let mut out = Vec::new();
                for r in iter {
                    let failed = r.is_err();
                    out.push(r.map_err(|e| anyhow!("{}", clip(e.to_string()))));
                    if failed {
                        break;
                    }
                }
                Ok(out)
            },
        )
    }

    /// Reads the light columns of every row (no image bytes) and resolves winners. Ties, filtered rows and bad
    /// rows (with `skip_bad`) are left out and counted.
    pub fn read_meta(&self, opts: &PickapicOptions) -> Result<(Vec<RowMeta>, SkipReport)> {
        let mut report = SkipReport::default();
        let mut out = Vec::new();
        for g in 0..self.num_row_groups() {
            let rows = match self.read_group(g, &self.meta_projection) {
                Ok(rows) => rows,
                Err(e) if opts.skip_bad => {
                    report.skip(format!("{e:#}"));
                    continue;
                }
                Err(e) => return Err(e),
            };
            for (i, r) in rows.into_iter().enumerate() {
                let row = self.group_starts[g] + i;
                match r.and_then(|r| self.parse_meta(&r, row)) {
                    Ok(m) => {
                        if let Some(m) = sort_out(m, opts, &mut report) {
                            out.push(m);
                        }
                    }
                    Err(e) => {
                        let e = anyhow!("{}: {e:#}", self.row_name(row));
                        if !opts.skip_bad {
                            return Err(e);
                        }
                        report.skip(format!("{e:#}"));
                    }
                }
            }
        }
        Ok((out, report))
    }

    /// Parses the light columns of one row.
    fn parse_meta(&self, r: &Row, row: usize) -> Result<ParsedMeta> {
        let prompt = match column(r, "caption")? {
            Field::Str(s) => s.clone(),
            Field::Bytes(b) => String::from_utf8(b.data().to_vec())
                .map_err(|_| anyhow!("column \"caption\" is not valid UTF-8"))?,
            Field::Null => bail!("column \"caption\" is null"),
            f => bail!("column \"caption\" must be a string, got {f:?}"),
        };
        let l0 = float(column(r, "label_0")?, "label_0")?
            .ok_or_else(|| anyhow!("column \"label_0\" is null"))?;
        if !(0.0..=1.0).contains(&l0) {
            bail!("column \"label_0\" = {l0} is outside [0, 1]");
        }
        if self.has_label_1 {
            if let Some(l1) = float(column(r, "label_1")?, "label_1")? {
                if (l0 + l1 - 1.0).abs() > 1e-6 {
                    bail!("columns \"label_0\" = {l0} and \"label_1\" = {l1} do not sum to 1");
                }
            }
        }
        let has_label = if self.has_has_label {
            boolean(column(r, "has_label")?, "has_label")?
        } else {
            None
        };
        let different = if self.has_are_different {
            boolean(column(r, "are_different")?, "are_different")?
        } else {
            None
        };
        let swapped = l0 < 0.5 - TIE_EPS;
        let label = if swapped { 1.0 - l0 } else { l0 };
        Ok(ParsedMeta {
            meta: RowMeta {
                row,
                prompt,
                swapped,
                label: label as f32,
            },
            has_label,
            different,
        })
    }

    /// Raw image bytes `(jpg_0, jpg_1)` of every row of a row group (errors per row).
    pub fn read_group_images(&self, group: usize) -> Result<Vec<Result<ImageBytes>>> {
        let rows = self.read_group(group, &self.image_projection)?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let r = r?;
                Ok((
                    image_bytes(column(&r, "jpg_0")?, "jpg_0")?,
                    image_bytes(column(&r, "jpg_1")?, "jpg_1")?,
                ))
            })
            .collect())
    }

    /// Streams the pairs of this shard with decoded images, one row group in memory at a time. The iterator's
    /// [`PickapicPairs::report`] tells what was left out so far.
    pub fn pairs<'a>(&'a self, opts: &PickapicOptions) -> PickapicPairs<'a> {
        PickapicPairs {
            shard: self,
            opts: opts.clone(),
            group: 0,
            buffer: VecDeque::new(),
            report: SkipReport::default(),
            failed: false,
        }
    }
}

/// Iterator over a shard's pairs (see [`PickapicShard::pairs`]).
pub struct PickapicPairs<'a> {
    shard: &'a PickapicShard,
    opts: PickapicOptions,
    group: usize,
    buffer: VecDeque<(usize, Result<Row>)>,
    report: SkipReport,
    failed: bool,
}

impl PickapicPairs<'_> {
    /// What was skipped or dropped so far.
    pub fn report(&self) -> &SkipReport {
        &self.report
    }

    fn next_row(&mut self) -> Option<Result<(usize, Result<Row>)>> {
        while self.buffer.is_empty() {
            if self.group >= self.shard.num_row_groups() {
                return None;
            }
            let g = self.group;
            self.group += 1;
            match self.shard.read_group(g, &self.shard.full_projection) {
                Ok(rows) => {
                    let start = self.shard.group_starts[g];
                    self.buffer
                        .extend(rows.into_iter().enumerate().map(|(i, r)| (start + i, r)));
                }
                Err(e) => return Some(Err(e)),
            }
        }
        self.buffer.pop_front().map(Ok)
    }

    /// Parses, sorts out and decodes one row (`None`: a tie or filtered row, counted).
    fn decode(&mut self, row: usize, r: Result<Row>) -> Result<Option<PairImages>> {
        let r = r?;
        let m = self.shard.parse_meta(&r, row)?;
        let Some(m) = sort_out(m, &self.opts, &mut self.report) else {
            return Ok(None);
        };
        let a = image_bytes(column(&r, "jpg_0")?, "jpg_0")?;
        let b = image_bytes(column(&r, "jpg_1")?, "jpg_1")?;
        Ok(Some(build_pair(m, &a, &b, self.shard.row_name(row))?))
    }
}

impl Iterator for PickapicPairs<'_> {
    type Item = Result<PairImages>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        loop {
            let (row, r) = match self.next_row()? {
                Ok(x) => x,
                Err(e) => {
                    // A whole row group could not be opened.
                    if self.opts.skip_bad {
                        self.report.skip(format!("{e:#}"));
                        continue;
                    }
                    self.failed = true;
                    return Some(Err(e));
                }
            };
            let name = self.shard.row_name(row);
            let result = self.decode(row, r);
            match result {
                Ok(Some(p)) => return Some(Ok(p)),
                Ok(None) => continue,
                Err(e) => {
                    let msg = format!("{e:#}");
                    let e = if msg.starts_with(&name) {
                        e
                    } else {
                        anyhow!("{name}: {msg}")
                    };
                    if self.opts.skip_bad {
                        self.report.skip(format!("{e:#}"));
                        continue;
                    }
                    self.failed = true;
                    return Some(Err(e));
                }
            }
        }
    }
}

/// A row's light columns before the filters.
struct ParsedMeta {
    meta: RowMeta,
    has_label: Option<bool>,
    different: Option<bool>,
}

/// Applies the optional filters and the tie rule, counting what is left out.
fn sort_out(p: ParsedMeta, opts: &PickapicOptions, report: &mut SkipReport) -> Option<RowMeta> {
    if (opts.require_has_label && p.has_label != Some(true))
        || (opts.require_different && p.different != Some(true))
    {
        report.filtered += 1;
        return None;
    }
    if opts.drop_ties && (f64::from(p.meta.label) - 0.5).abs() <= TIE_EPS {
        report.ties_dropped += 1;
        return None;
    }
    Some(p.meta)
}

/// Decodes the two images of a row into a winner-first pair.
fn build_pair(m: RowMeta, jpg_0: &[u8], jpg_1: &[u8], source: String) -> Result<PairImages> {
    let decode = |bytes: &[u8], col: &str| -> Result<RgbImage> {
        if bytes.is_empty() {
            bail!("column \"{col}\" is empty");
        }
        crate::imaging::decode_image_bytes(bytes, &format!("in column \"{col}\""))
            .map_err(|e| anyhow!("column \"{col}\": cannot decode image ({e:#})"))
    };
    let i0 = decode(jpg_0, "jpg_0").map_err(|e| anyhow!("{source}: {e:#}"))?;
    let i1 = decode(jpg_1, "jpg_1").map_err(|e| anyhow!("{source}: {e:#}"))?;
    let (chosen, rejected) = if m.swapped { (i1, i0) } else { (i0, i1) };
    Ok(PairImages {
        prompt: m.prompt,
        chosen,
        rejected,
        label: m.label,
        source,
        latents: None,
    })
}

fn column<'a>(r: &'a Row, name: &str) -> Result<&'a Field> {
    r.get_column_iter()
        .find(|(n, _)| n.as_str() == name)
        .map(|(_, f)| f)
        .ok_or_else(|| anyhow!("column \"{name}\" missing from the row"))
}

fn float(f: &Field, name: &str) -> Result<Option<f64>> {
    Ok(Some(match f {
        Field::Null => return Ok(None),
        Field::Double(x) => *x,
        Field::Float(x) => f64::from(*x),
        Field::Float16(x) => f64::from(x.to_f32()),
        Field::Int(x) => f64::from(*x),
        Field::Long(x) => *x as f64,
        f => bail!("column \"{name}\" must be a number, got {f:?}"),
    }))
}

fn boolean(f: &Field, name: &str) -> Result<Option<bool>> {
    match f {
        Field::Null => Ok(None),
        Field::Bool(b) => Ok(Some(*b)),
        f => bail!("column \"{name}\" must be a boolean, got {f:?}"),
    }
}

fn image_bytes(f: &Field, name: &str) -> Result<Vec<u8>> {
    match f {
        Field::Bytes(b) => Ok(b.data().to_vec()),
        Field::Group(g) => match column(g, "bytes") {
            Ok(Field::Bytes(b)) => Ok(b.data().to_vec()),
            Ok(Field::Null) => bail!("column \"{name}.bytes\" is null"),
            Ok(f) => bail!("column \"{name}.bytes\" must be binary, got a {}", kind(f)),
            Err(_) => bail!("column \"{name}\" has no \"bytes\" field"),
        },
        Field::Null => bail!("column \"{name}\" is null"),
        f => bail!(
            "column \"{name}\" must be binary image bytes, got a {}",
            kind(f)
        ),
    }
}

fn kind(f: &Field) -> &'static str {
    match f {
        Field::Str(_) => "string",
        Field::Bool(_) => "boolean",
        Field::Group(_) => "group",
        Field::ListInternal(_) => "list",
        Field::MapInternal(_) => "map",
        _ => "number or other scalar",
    }
}

fn check_type(file: &str, t: &TypePtr, allowed: &[PhysicalType]) -> Result<()> {
    if !t.is_primitive() {
        bail!(
            "{file}: column \"{}\" must be a scalar, found a group",
            t.name()
        );
    }
    let p = t.get_physical_type();
    if !allowed.contains(&p) {
        bail!(
            "{file}: column \"{}\" has type {p}, expected one of {:?}",
            t.name(),
            allowed
        );
    }
    Ok(())
}

/// Reads every pair of a shard into memory (only sensible for small shards, tests and validation splits).
pub fn read_pickapic(
    path: impl AsRef<Path>,
    opts: &PickapicOptions,
) -> Result<(Vec<PairImages>, SkipReport)> {
    let shard = PickapicShard::open(path, opts)?;
    let mut it = shard.pairs(opts);
    let mut out = Vec::new();
    for p in it.by_ref() {
        out.push(p?);
    }
    let report = it.report().clone();
    Ok((out, report))
}

/// One kept row of a [`PickapicIndex`].
#[derive(Clone, Debug, PartialEq)]
pub struct IndexEntry {
    /// Index of the shard in [`PickapicIndex::shards`].
    pub shard: usize,
    pub meta: RowMeta,
}

/// Random access to the pairs of several shards: the light columns of every kept row are held in memory, the
/// image bytes are read on demand one row group at a time (the last few row groups are kept).
pub struct PickapicIndex {
    shards: Vec<PickapicShard>,
    entries: Vec<IndexEntry>,
    /// `((shard, row group), image bytes per row)`, most recent first.
    cache: VecDeque<((usize, usize), GroupImages)>,
    cache_groups: usize,
}

impl std::fmt::Debug for PickapicIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PickapicIndex")
            .field("shards", &self.shards)
            .field("pairs", &self.entries.len())
            .finish()
    }
}

impl PickapicIndex {
    /// Opens the shards and indexes their kept rows (ties, filtered and, with `skip_bad`, unreadable rows
    /// left out and counted). Corrupt images are only found when a pair is loaded.
    pub fn open(paths: &[PathBuf], opts: &PickapicOptions) -> Result<(Self, SkipReport)> {
        let mut shards = Vec::new();
        let mut entries = Vec::new();
        let mut report = SkipReport::default();
        for p in paths {
            let shard = PickapicShard::open(p, opts)?;
            let (meta, r) = shard.read_meta(opts)?;
            report.merge(r);
            let s = shards.len();
            entries.extend(meta.into_iter().map(|meta| IndexEntry { shard: s, meta }));
            shards.push(shard);
        }
        Ok((
            PickapicIndex {
                shards,
                entries,
                cache: VecDeque::new(),
                cache_groups: 4,
            },
            report,
        ))
    }

    /// How many decoded row groups of image bytes are kept (default 4, at least 1).
    pub fn set_cached_row_groups(&mut self, n: usize) {
        self.cache_groups = n.max(1);
        self.cache.truncate(self.cache_groups);
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn shards(&self) -> &[PickapicShard] {
        &self.shards
    }

    pub fn entries(&self) -> &[IndexEntry] {
        &self.entries
    }

    /// `"file row N"` of pair `i`.
    pub fn source(&self, i: usize) -> Option<String> {
        let e = self.entries.get(i)?;
        Some(self.shards[e.shard].row_name(e.meta.row))
    }

    /// Loads pair `i` with decoded images.
    pub fn get(&mut self, i: usize) -> Result<PairImages> {
        let e = self
            .entries
            .get(i)
            .with_context(|| format!("pair {i} out of range ({} pairs)", self.entries.len()))?
            .clone();
        let shard = &self.shards[e.shard];
        let name = shard.row_name(e.meta.row);
        let (g, off) = shard
            .locate(e.meta.row)
            .with_context(|| format!("{name}: row outside the file"))?;
        let key = (e.shard, g);
        let group = match self.cache.iter().position(|(k, _)| *k == key) {
            Some(pos) => {
                let item = self.cache.remove(pos).expect("position is valid");
                let data = item.1.clone();
                self.cache.push_front(item);
                data
            }
            None => {
                let data = Arc::new(shard.read_group_images(g)?);
                self.cache.push_front((key, data.clone()));
                self.cache.truncate(self.cache_groups);
                data
            }
        };
        let (a, b) = match group.get(off) {
            Some(Ok(x)) => x,
            Some(Err(err)) => bail!("{name}: {err:#}"),
            None => {
                bail!("{name}: row could not be read (an earlier row of its row group is corrupt)")
            }
        };
        build_pair(e.meta, a, b, name)
    }
}
