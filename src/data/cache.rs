//! Optional on-disk caches: VAE posteriors of training images and text-encoder outputs per prompt.
//!
//! Each entry is one safetensors file `<dir>/<kind>/<k0k1>/<key>.safetensors`, written to a temporary file in
//! the same folder and renamed into place, so a reader (this process or another) sees either no file or a whole
//! one. Keys are 128-bit FNV-1a hashes of everything that determines the entry:
//!
//! * latents: the model id, the image identity (a path with its size and modification time, the image bytes, or
//!   a caller-chosen name) and the **applied** [`Transform`] (resolution, resize, crop offsets, flip). With a
//!   random flip an image has up to two entries; with a random crop one per distinct crop, so random crops make
//!   a latent cache much less useful.
//! * text: the model id and the prompt.
//!
//! The latent cache stores the posterior's `mean` and `std` (not a sample), so a training step still draws fresh
//! latents `mean + std * eps` every time, as the official Diffusion-DPO code re-encodes and samples each step
//! (spec §3); scale them with `AutoencoderKL::scale_latents` afterwards. Each file's metadata repeats its key,
//! which is checked on load.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::UNIX_EPOCH;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use diffpref_pipelines::loading::PromptEmbeds;
use diffpref_pipelines::models::vae::{AutoencoderKL, DiagonalGaussian};

pub use super::preprocess::maybe_drop_caption;
use super::preprocess::Transform;

/// 128-bit FNV-1a over length-prefixed fields (stable across runs, platforms and processes).
#[derive(Clone, Debug)]
pub struct KeyHasher(u128);

impl Default for KeyHasher {
    fn default() -> Self {
        KeyHasher(0x6c62_272e_07bb_0142_62b8_2175_6295_c58d)
    }
}

impl KeyHasher {
    const PRIME: u128 = 0x0000_0000_0100_0000_0000_0000_0000_013B;

    fn bytes(&mut self, b: &[u8]) {
        for &x in b {
            self.0 ^= u128::from(x);
            self.0 = self.0.wrapping_mul(Self::PRIME);
        }
    }

    /// Adds one field (length-prefixed, so field boundaries cannot be confused).
    pub fn field(&mut self, b: &[u8]) -> &mut Self {
        self.bytes(&(b.len() as u64).to_le_bytes());
        self.bytes(b);
        self
    }

    pub fn finish(&self) -> CacheKey {
        CacheKey(format!("{:032x}", self.0))
    }
}

/// A cache key: 32 lowercase hex digits.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheKey(pub String);

impl std::fmt::Display for CacheKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What identifies an image's content for a latent key.
#[derive(Clone, Copy, Debug)]
pub enum ImageId<'a> {
    /// A file: its absolute path, size and modification time (so an edited file gets a new key).
    Path(&'a Path),
    /// The encoded (or raw) image bytes.
    Bytes(&'a [u8]),
    /// A name the caller guarantees to be unique and stable (e.g. `"shard-00012.parquet#row=17/jpg_0"`).
    Named(&'a str),
}

impl ImageId<'_> {
    fn hash_into(&self, h: &mut KeyHasher) -> Result<()> {
        match self {
            ImageId::Path(p) => {
                let abs = std::fs::canonicalize(p)
                    .with_context(|| format!("cache key: cannot resolve image {}", p.display()))?;
                let m = std::fs::metadata(&abs)
                    .with_context(|| format!("cache key: cannot stat image {}", p.display()))?;
                let mtime = m
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                    .map(|d| d.as_nanos())
                    .unwrap_or(0);
                h.field(b"path")
                    .field(abs.to_string_lossy().as_bytes())
                    .field(&m.len().to_le_bytes())
                    .field(&mtime.to_le_bytes());
            }
            ImageId::Bytes(b) => {
                h.field(b"bytes").field(b);
            }
            ImageId::Named(s) => {
                h.field(b"named").field(s.as_bytes());
            }
        }
        Ok(())
    }
}

/// Cache hit/miss counters.
#[derive(Debug, Default)]
pub struct CacheStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
}

impl CacheStats {
    /// `(hits, misses)`.
    pub fn get(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }
}

/// A folder of safetensors entries addressed by [`CacheKey`].
#[derive(Debug)]
pub struct TensorCache {
    dir: PathBuf,
    stats: CacheStats,
}

impl TensorCache {
    /// Creates the folder if needed.
    pub fn new(dir: impl Into<PathBuf>) -> Result<Self> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create cache folder {}", dir.display()))?;
        Ok(TensorCache {
            dir,
            stats: CacheStats::default(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn stats(&self) -> &CacheStats {
        &self.stats
    }

    /// The file of an entry.
    pub fn path(&self, key: &CacheKey) -> PathBuf {
        let k = &key.0;
        self.dir
            .join(k.get(..2).unwrap_or("00"))
            .join(format!("{k}.safetensors"))
    }

    /// Reads an entry (tensors on `device`, in their stored dtype); `None` when absent. A file that exists but
    /// cannot be read, or holds another key, is an error naming it.
    pub fn get(&self, key: &CacheKey, device: &Device) -> Result<Option<HashMap<String, Tensor>>> {
        let path = self.path(key);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.stats.misses.fetch_add(1, Ordering::Relaxed);
                return Ok(None);
            }
            Err(e) => bail!("cannot read cache file {}: {e}", path.display()),
        };
        let bad = |what: String| {
            anyhow::anyhow!(
                "cache file {} is unusable ({what}); delete it to recompute the entry",
                path.display()
            )
        };
        let (_, header) =
            safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
        let stored = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get("key").cloned())
            .unwrap_or_default();
        if stored != key.0 {
            return Err(bad(format!("it holds key {stored:?}, expected {}", key.0)));
        }
        let tensors = candle_core::safetensors::load_buffer(&bytes, device)
            .map_err(|e| bad(e.to_string()))?;
        self.stats.hits.fetch_add(1, Ordering::Relaxed);
        Ok(Some(tensors))
    }

    /// Writes an entry atomically (f32, f16 and bf16 kept as they are; other dtypes stored as f32). `describe`
    /// goes into the metadata for people inspecting the folder.
    pub fn put(&self, key: &CacheKey, tensors: &[(&str, &Tensor)], describe: &str) -> Result<()> {
        let path = self.path(key);
        let mut bufs = Vec::with_capacity(tensors.len());
        for (name, t) in tensors {
            let t = match t.dtype() {
                DType::F32 | DType::F16 | DType::BF16 => (*t).clone(),
                _ => t.to_dtype(DType::F32)?,
            };
            let t = t.to_device(&Device::Cpu)?.contiguous()?;
            let mut raw = Vec::new();
            t.write_bytes(&mut raw)
                .with_context(|| format!("cache: reading tensor {name}"))?;
            let dt = match t.dtype() {
                DType::F16 => safetensors::Dtype::F16,
                DType::BF16 => safetensors::Dtype::BF16,
                _ => safetensors::Dtype::F32,
            };
            bufs.push((*name, dt, t.dims().to_vec(), raw));
        }
        let views = bufs
            .iter()
            .map(|(name, dt, shape, raw)| {
                Ok((
                    *name,
                    safetensors::tensor::TensorView::new(*dt, shape.clone(), raw)?,
                ))
            })
            .collect::<std::result::Result<Vec<_>, safetensors::SafeTensorError>>()?;
        let meta = HashMap::from([
            ("key".to_string(), key.0.clone()),
            ("describe".to_string(), describe.to_string()),
        ]);
        let bytes = safetensors::serialize(views, Some(meta))
            .with_context(|| format!("serialising cache entry {}", path.display()))?;
        crate::io::write_atomic(&path, &bytes)
    }
}

/// A cached VAE posterior of one image: `mean` and `std`, each `[C, h, w]`.
#[derive(Clone, Debug)]
pub struct CachedLatent {
    pub mean: Tensor,
    pub std: Tensor,
}

impl CachedLatent {
    /// Splits a batched posterior `[B, C, h, w]` into per-image entries.
    pub fn split(posterior: &DiagonalGaussian) -> Result<Vec<CachedLatent>> {
        let b = posterior.mean.dim(0)?;
        (0..b)
            .map(|i| {
                Ok(CachedLatent {
                    mean: posterior.mean.get(i)?,
                    std: posterior.std.get(i)?,
                })
            })
            .collect()
    }

    /// Stacks entries back into a batched posterior on `device` (`logvar = 2 ln std`).
    pub fn stack(items: &[CachedLatent], device: &Device) -> Result<DiagonalGaussian> {
        ensure!(!items.is_empty(), "CachedLatent::stack: no latents");
        let means: Vec<&Tensor> = items.iter().map(|l| &l.mean).collect();
        let stds: Vec<&Tensor> = items.iter().map(|l| &l.std).collect();
        let mean = Tensor::stack(&means, 0)?.to_device(device)?;
        let std = Tensor::stack(&stds, 0)?.to_device(device)?;
        let logvar = (std.log()? * 2.0)?;
        Ok(DiagonalGaussian { mean, logvar, std })
    }

    /// A fresh (unscaled) latent `mean + std * noise`; `noise` has the shape of `mean`.
    pub fn sample(&self, noise: &Tensor) -> Result<Tensor> {
        let noise = noise
            .to_dtype(self.mean.dtype())?
            .to_device(self.mean.device())?;
        Ok((&self.mean + (&self.std * noise)?)?)
    }
}

/// Encodes `images` (`[B, 3, H, W]` in `[-1, 1]`) and returns one posterior per image.
pub fn encode_posteriors(vae: &AutoencoderKL, images: &Tensor) -> Result<Vec<CachedLatent>> {
    let posterior = vae.encode(images)?;
    CachedLatent::split(&posterior)
}

/// VAE posterior cache (see the module docs).
#[derive(Debug)]
pub struct LatentCache {
    inner: TensorCache,
    model_id: String,
    dtype: DType,
}

impl LatentCache {
    /// A cache in `dir/latents` for the VAE named `model_id` (any string that changes when the VAE does, e.g.
    /// the model folder or hub id plus revision). Entries are stored as f32.
    pub fn new(dir: impl AsRef<Path>, model_id: impl Into<String>) -> Result<Self> {
        Ok(LatentCache {
            inner: TensorCache::new(dir.as_ref().join("latents"))?,
            model_id: model_id.into(),
            dtype: DType::F32,
        })
    }

    /// Stores entries in `dtype` (f32, f16 or bf16) to save disk space.
    pub fn with_storage_dtype(mut self, dtype: DType) -> Result<Self> {
        ensure!(
            matches!(dtype, DType::F32 | DType::F16 | DType::BF16),
            "latent cache: storage dtype must be f32, f16 or bf16, got {dtype:?}"
        );
        self.dtype = dtype;
        Ok(self)
    }

    pub fn cache(&self) -> &TensorCache {
        &self.inner
    }

    /// The key of `image` preprocessed with `transform`.
    pub fn key(&self, image: ImageId<'_>, transform: &Transform) -> Result<CacheKey> {
        let mut h = KeyHasher::default();
        h.field(b"diffpref-latent-v1")
            .field(self.model_id.as_bytes());
        image.hash_into(&mut h)?;
        let t = transform;
        for v in [
            t.resolution,
            t.original_size.0,
            t.original_size.1,
            t.resized_size.0,
            t.resized_size.1,
            t.crop_top,
            t.crop_left,
            u32::from(t.flip),
        ] {
            h.field(&v.to_le_bytes());
        }
        Ok(h.finish())
    }

    pub fn get(&self, key: &CacheKey, device: &Device) -> Result<Option<CachedLatent>> {
        let Some(mut m) = self.inner.get(key, device)? else {
            return Ok(None);
        };
        let path = self.inner.path(key);
        let mut take = |name: &str| {
            m.remove(name).with_context(|| {
                format!(
                    "cache file {} has no tensor \"{name}\"; delete it to recompute",
                    path.display()
                )
            })
        };
        let mean = take("mean")?;
        let std = take("std")?;
        ensure!(
            mean.dims() == std.dims(),
            "cache file {}: mean {:?} and std {:?} differ in shape; delete it to recompute",
            path.display(),
            mean.dims(),
            std.dims()
        );
        Ok(Some(CachedLatent { mean, std }))
    }

    pub fn put(&self, key: &CacheKey, latent: &CachedLatent) -> Result<()> {
        let mean = latent.mean.to_dtype(self.dtype)?;
        let std = latent.std.to_dtype(self.dtype)?;
        self.inner.put(
            key,
            &[("mean", &mean), ("std", &std)],
            &format!("latent posterior, model {}", self.model_id),
        )
    }

    /// The cached entry, or `compute()` stored then returned.
    pub fn get_or_compute(
        &self,
        key: &CacheKey,
        device: &Device,
        compute: impl FnOnce() -> Result<CachedLatent>,
    ) -> Result<CachedLatent> {
        if let Some(l) = self.get(key, device)? {
            return Ok(l);
        }
        let l = compute()?;
        self.put(key, &l)?;
        self.get(key, device)?
            .context("latent cache: entry vanished right after writing it")
    }

    /// Batched form: `compute(missing)` receives the indices (into `keys`) of the entries not cached, and must
    /// return one posterior per index, in order (one VAE call for all misses).
    pub fn get_or_compute_many(
        &self,
        keys: &[CacheKey],
        device: &Device,
        compute: impl FnOnce(&[usize]) -> Result<Vec<CachedLatent>>,
    ) -> Result<Vec<CachedLatent>> {
        let mut out: Vec<Option<CachedLatent>> = Vec::with_capacity(keys.len());
        let mut missing = Vec::new();
        for (i, k) in keys.iter().enumerate() {
            let hit = self.get(k, device)?;
            if hit.is_none() {
                missing.push(i);
            }
            out.push(hit);
        }
        if !missing.is_empty() {
            let computed = compute(&missing)?;
            ensure!(
                computed.len() == missing.len(),
                "latent cache: compute returned {} posteriors for {} missing entries",
                computed.len(),
                missing.len()
            );
            for (i, l) in missing.into_iter().zip(computed) {
                self.put(&keys[i], &l)?;
                // Return what a later hit would return (storage dtype), so cached and fresh runs agree.
                out[i] = Some(
                    self.get(&keys[i], device)?
                        .context("latent cache: entry vanished right after writing it")?,
                );
            }
        }
        Ok(out.into_iter().flatten().collect())
    }
}

/// Text-encoder output cache, one entry per prompt: `hidden_states` `[77, D]` and, for SDXL, `pooled` `[P]`.
#[derive(Debug)]
pub struct TextEmbedCache {
    inner: TensorCache,
    model_id: String,
}

impl TextEmbedCache {
    /// A cache in `dir/text` for the text encoder(s) named `model_id`.
    pub fn new(dir: impl AsRef<Path>, model_id: impl Into<String>) -> Result<Self> {
        Ok(TextEmbedCache {
            inner: TensorCache::new(dir.as_ref().join("text"))?,
            model_id: model_id.into(),
        })
    }

    pub fn cache(&self) -> &TensorCache {
        &self.inner
    }

    pub fn key(&self, prompt: &str) -> CacheKey {
        let mut h = KeyHasher::default();
        h.field(b"diffpref-text-v1")
            .field(self.model_id.as_bytes())
            .field(prompt.as_bytes());
        h.finish()
    }

    /// The embeddings of one prompt (`hidden_states` `[77, D]`, `pooled` `[P]`), if cached.
    pub fn get(&self, prompt: &str, device: &Device) -> Result<Option<(Tensor, Option<Tensor>)>> {
        let key = self.key(prompt);
        let Some(mut m) = self.inner.get(&key, device)? else {
            return Ok(None);
        };
        let hs = m.remove("hidden_states").with_context(|| {
            format!(
                "cache file {} has no tensor \"hidden_states\"; delete it to recompute",
                self.inner.path(&key).display()
            )
        })?;
        Ok(Some((hs, m.remove("pooled"))))
    }

    /// Embeddings for `prompts` as one batch (`hidden_states` `[B, 77, D]`, `pooled` `[B, P]`), encoding only
    /// the prompts not cached, each once: `encode` receives the distinct missing prompts.
    pub fn get_or_compute_many(
        &self,
        prompts: &[&str],
        device: &Device,
        encode: impl FnOnce(&[&str]) -> Result<PromptEmbeds>,
    ) -> Result<PromptEmbeds> {
        ensure!(!prompts.is_empty(), "text cache: no prompts");
        let mut found: HashMap<&str, (Tensor, Option<Tensor>)> = HashMap::new();
        let mut missing: Vec<&str> = Vec::new();
        for &p in prompts {
            if found.contains_key(p) || missing.contains(&p) {
                continue;
            }
            match self.get(p, device)? {
                Some(e) => {
                    found.insert(p, e);
                }
                None => missing.push(p),
            }
        }
        if !missing.is_empty() {
            let e = encode(&missing)?;
            let n = e.hidden_states.dim(0)?;
            ensure!(
                n == missing.len(),
                "text cache: encode returned {n} embeddings for {} prompts",
                missing.len()
            );
            for (i, &p) in missing.iter().enumerate() {
                let hs = e.hidden_states.get(i)?;
                let pooled = e.pooled.as_ref().map(|t| t.get(i)).transpose()?;
                let mut tensors = vec![("hidden_states", &hs)];
                if let Some(pl) = &pooled {
                    tensors.push(("pooled", pl));
                }
                self.inner.put(
                    &self.key(p),
                    &tensors,
                    &format!("prompt embeddings, model {}", self.model_id),
                )?;
                found.insert(
                    p,
                    self.get(p, device)?
                        .context("text cache: entry vanished right after writing it")?,
                );
            }
        }
        let hs: Vec<&Tensor> = prompts.iter().map(|p| &found[p].0).collect();
        let hidden_states = Tensor::stack(&hs, 0)?;
        let pooled = if found[prompts[0]].1.is_some() {
            let ps = prompts
                .iter()
                .map(|p| {
                    found[p].1.as_ref().with_context(|| {
                        format!("text cache: prompt {p:?} has no pooled embedding while others do")
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            Some(Tensor::stack(&ps, 0)?)
        } else {
            None
        };
        Ok(PromptEmbeds {
            hidden_states,
            pooled,
        })
    }
}
