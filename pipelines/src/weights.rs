//! Named parameter access for model construction.
//!
//! [`Params`] is diffpref's small replacement for candle-nn's `VarBuilder`: it hands out tensors by their
//! diffusers/transformers parameter name, checks shapes (errors name the tensor, the files and both shapes),
//! converts to the model's dtype and device, and, when asked, wraps every parameter in a [`Var`] so that a
//! full fine-tune (or a gradient-coverage test) can reach them. Weights come from safetensors files
//! (memory-mapped, several shards at once), from an in-memory map, or from a seeded random initialiser
//! (benchmarks and from-scratch training).

use crate::error::{Error, Result};
use candle_core::{safetensors::MmapedSafetensors, DType, Device, Shape, Tensor, Var};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

enum Source {
    Files {
        st: MmapedSafetensors,
        files: Vec<PathBuf>,
    },
    Map(HashMap<String, Tensor>),
    /// Deterministic random init: N(0, 1/fan_in) for weights, zeros for biases, ones for norm scales.
    Random {
        seed: u64,
    },
}

struct Store {
    source: Source,
    dtype: DType,
    device: Device,
    trainable: bool,
    vars: Mutex<Vec<(String, Var)>>,
    layers: Mutex<Vec<crate::nn::Layer>>,
}

/// A view on a weight store at a name prefix (`down_blocks.0.resnets.1.`).
#[derive(Clone)]
pub struct Params {
    store: Arc<Store>,
    prefix: String,
}

impl Params {
    fn new(source: Source, dtype: DType, device: &Device) -> Self {
        Params {
            store: Arc::new(Store {
                source,
                dtype,
                device: device.clone(),
                trainable: false,
                vars: Mutex::new(Vec::new()),
                layers: Mutex::new(Vec::new()),
            }),
            prefix: String::new(),
        }
    }

    /// Memory-maps one or more safetensors files (shards of one model).
    pub fn from_files(files: &[PathBuf], dtype: DType, device: &Device) -> Result<Self> {
        for f in files {
            if !f.exists() {
                return Err(Error::MissingFile(f.clone()));
            }
        }
        // SAFETY: the files are opened read-only; diffpref never writes model files it has mapped.
        let st = unsafe { MmapedSafetensors::multi(files) }.map_err(|e| {
            Error::msg(format!(
                "cannot read safetensors {}: {e}",
                files
                    .iter()
                    .map(|f| f.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
        Ok(Self::new(
            Source::Files {
                st,
                files: files.to_vec(),
            },
            dtype,
            device,
        ))
    }

    /// Parameters from an in-memory map of named tensors.
    pub fn from_map(map: HashMap<String, Tensor>, dtype: DType, device: &Device) -> Self {
        Self::new(Source::Map(map), dtype, device)
    }

    /// Seeded random parameters of whatever shapes the model asks for (for benchmarks and pretraining).
    pub fn random(seed: u64, dtype: DType, device: &Device) -> Self {
        Self::new(Source::Random { seed }, dtype, device)
    }

    /// Makes every parameter handed out from now on a [`Var`] (listed by [`Params::vars`]).
    pub fn trainable(mut self) -> Self {
        let store =
            Arc::get_mut(&mut self.store).expect("trainable() must be called before sharing");
        store.trainable = true;
        self
    }

    /// Whether tensors are handed out as [`Var`]s ([`Params::trainable`]).
    pub fn is_trainable(&self) -> bool {
        self.store.trainable
    }

    /// The vars created so far (only when [`Params::trainable`]), with their full names.
    pub fn vars(&self) -> Vec<(String, Var)> {
        self.store.vars.lock().unwrap().clone()
    }

    /// Records a layer that adapters can attach to (called by the layer constructors).
    pub fn register(&self, layer: crate::nn::Layer) {
        self.store.layers.lock().unwrap().push(layer);
    }

    /// Every adapter-capable layer built from this store so far, whose path starts with this view's prefix.
    pub fn layers(&self) -> Vec<crate::nn::Layer> {
        let layers = self.store.layers.lock().unwrap();
        layers
            .iter()
            .filter(|l| format!("{}.", l.path()).starts_with(&self.prefix))
            .cloned()
            .collect()
    }

    pub fn dtype(&self) -> DType {
        self.store.dtype
    }

    pub fn device(&self) -> &Device {
        &self.store.device
    }

    /// A sub-view: `p.pp("down_blocks").pp(0)`.
    pub fn pp(&self, name: impl std::fmt::Display) -> Params {
        Params {
            store: self.store.clone(),
            prefix: format!("{}{}.", self.prefix, name),
        }
    }

    /// The full parameter name of `name` under this prefix.
    pub fn path(&self, name: &str) -> String {
        format!("{}{}", self.prefix, name)
    }

    /// The prefix of this view without the trailing dot (the module path).
    pub fn module_path(&self) -> String {
        self.prefix.trim_end_matches('.').to_string()
    }

    fn files_desc(&self) -> String {
        match &self.store.source {
            Source::Files { files, .. } => files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            Source::Map(_) => "the in-memory weights".into(),
            Source::Random { .. } => "the random initialiser".into(),
        }
    }

    /// Whether the store holds `name` (always true for random init).
    pub fn contains(&self, name: &str) -> bool {
        let full = self.path(name);
        match &self.store.source {
            Source::Files { st, .. } => st.get(&full).is_ok(),
            Source::Map(m) => m.contains_key(&full),
            Source::Random { .. } => true,
        }
    }

    fn raw(&self, full: &str, shape: Option<&Shape>) -> Result<Tensor> {
        let missing = || Error::MissingTensor {
            name: full.to_string(),
            files: self.files_desc(),
        };
        let t = match &self.store.source {
            Source::Files { st, .. } => {
                if st.get(full).is_err() {
                    return Err(missing());
                }
                let t = st.load(full, &Device::Cpu)?;
                check_loaded(&t, full, &self.files_desc())?;
                t
            }
            Source::Map(m) => m.get(full).cloned().ok_or_else(missing)?,
            Source::Random { seed } => {
                let shape = shape.ok_or_else(missing)?;
                random_init(full, shape, *seed)?
            }
        };
        if let Some(shape) = shape {
            if t.dims() != shape.dims() {
                return Err(Error::ShapeMismatch {
                    name: full.to_string(),
                    files: self.files_desc(),
                    expected: shape.dims().to_vec(),
                    found: t.dims().to_vec(),
                });
            }
        }
        Ok(t)
    }

    fn finish(&self, full: String, t: Tensor, dtype: DType) -> Result<Tensor> {
        let t = t.to_dtype(dtype)?.to_device(&self.store.device)?;
        if self.store.trainable {
            let var = Var::from_tensor(&t)?;
            let t = var.as_tensor().clone();
            self.store.vars.lock().unwrap().push((full, var));
            Ok(t)
        } else {
            Ok(t)
        }
    }

    /// The tensor `name` with the given shape, in the model dtype.
    pub fn get(&self, shape: impl Into<Shape>, name: &str) -> Result<Tensor> {
        self.get_with_dtype(shape, name, self.store.dtype)
    }

    /// The tensor `name` with the given shape, in `dtype` (e.g. f32 for values kept in full precision).
    pub fn get_with_dtype(
        &self,
        shape: impl Into<Shape>,
        name: &str,
        dtype: DType,
    ) -> Result<Tensor> {
        let shape = shape.into();
        let full = self.path(name);
        let t = self.raw(&full, Some(&shape))?;
        self.finish(full, t, dtype)
    }

    /// The tensor `name` whatever its shape (for shapes only the checkpoint knows).
    pub fn get_any_shape(&self, name: &str) -> Result<Tensor> {
        let full = self.path(name);
        let t = self.raw(&full, None)?;
        self.finish(full, t, self.store.dtype)
    }
}

/// Deterministic per-name random init (splitmix-seeded normal draws), independent of request order.
fn random_init(name: &str, shape: &Shape, seed: u64) -> Result<Tensor> {
    use rand::{rngs::StdRng, SeedableRng};
    use rand_distr::{Distribution, Normal};
    let leaf = name.rsplit('.').next().unwrap_or(name);
    let parent = name.rsplit('.').nth(1).unwrap_or("");
    let is_norm = parent.contains("norm") || parent.contains("ln") || parent.contains("layer_norm");
    let dims = shape.dims();
    if leaf == "bias" {
        return Ok(Tensor::zeros(shape, DType::F32, &Device::Cpu)?);
    }
    if leaf == "weight" && is_norm && dims.len() == 1 {
        return Ok(Tensor::ones(shape, DType::F32, &Device::Cpu)?);
    }
    let fan_in: usize = if dims.len() >= 2 {
        dims[1..].iter().product()
    } else {
        1
    };
    let std = if dims.len() >= 2 {
        1.0 / (fan_in as f64).sqrt()
    } else {
        0.02
    };
    let mut h: u64 = seed ^ 0x9E37_79B9_7F4A_7C15;
    for b in name.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01B3);
    }
    let mut rng = StdRng::seed_from_u64(h);
    let normal = Normal::new(0.0f32, std as f32).map_err(|e| Error::msg(e.to_string()))?;
    let n = shape.elem_count();
    let data: Vec<f32> = (0..n).map(|_| normal.sample(&mut rng)).collect();
    Ok(Tensor::from_vec(data, shape.clone(), &Device::Cpu)?)
}

/// Which of the candidate weight files exists in `dir`: `base.safetensors`, the `variant`
/// (`base.fp16.safetensors`), or a sharded set named by `base.safetensors.index.json`.
pub fn find_weight_files(dir: &Path, base: &str, variant: Option<&str>) -> Result<Vec<PathBuf>> {
    let mut stems = Vec::new();
    if let Some(v) = variant {
        stems.push(format!("{base}.{v}"));
    }
    stems.push(base.to_string());
    if variant.is_none() {
        stems.push(format!("{base}.fp16"));
    }
    for stem in &stems {
        let single = dir.join(format!("{stem}.safetensors"));
        if single.exists() {
            return Ok(vec![single]);
        }
        let index = dir.join(format!("{stem}.safetensors.index.json"));
        if index.exists() {
            return shard_files(&index);
        }
    }
    Err(Error::MissingFile(
        dir.join(format!("{}.safetensors", stems[0])),
    ))
}

#[derive(serde::Deserialize)]
struct ShardIndex {
    weight_map: HashMap<String, String>,
}

/// The shard files listed by a `*.safetensors.index.json` (each once, sorted).
pub fn shard_files(index: &Path) -> Result<Vec<PathBuf>> {
    let idx: ShardIndex = crate::error::read_json(index)?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut names: Vec<&String> = idx.weight_map.values().collect();
    names.sort();
    names.dedup();
    let files: Vec<PathBuf> = names.into_iter().map(|n| dir.join(n)).collect();
    for f in &files {
        if !f.exists() {
            return Err(Error::Invalid {
                file: index.display().to_string(),
                msg: format!("shard {} listed in weight_map does not exist", f.display()),
            });
        }
    }
    Ok(files)
}

/// Refuses a weight read from a file that is not floating point (an integer tensor would be cast silently) or
/// holds NaN or infinite values, naming the tensor and the files.
pub fn check_loaded(t: &Tensor, name: &str, files: &str) -> Result<()> {
    if !t.dtype().is_float() {
        return Err(Error::Invalid {
            file: files.to_string(),
            msg: format!("tensor `{name}` is {:?}, not floating point", t.dtype()),
        });
    }
    // x − x is 0 for finite x and NaN for NaN and ±inf.
    let bad = t
        .sub(t)?
        .ne(0f64)?
        .to_dtype(DType::F32)?
        .sum_all()?
        .to_scalar::<f32>()?;
    if bad > 0.0 {
        return Err(Error::Invalid {
            file: files.to_string(),
            msg: format!(
                "tensor `{name}` holds {bad} NaN or infinite values of {}",
                t.elem_count()
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod check_tests {
    use super::*;

    #[test]
    fn integer_and_non_finite_weights_are_refused_by_name() {
        let d = &Device::Cpu;
        check_loaded(&Tensor::ones(3, DType::F16, d).unwrap(), "w", "f").unwrap();
        let e = check_loaded(
            &Tensor::zeros(3, DType::I64, d).unwrap(),
            "a.weight",
            "m.safetensors",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("a.weight") && e.contains("I64") && e.contains("m.safetensors"),
            "{e}"
        );
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let t = Tensor::new(&[1f32, bad, 2.0], d).unwrap();
            let e = check_loaded(&t, "b.bias", "m").unwrap_err().to_string();
            assert!(
                e.contains("b.bias") && e.contains("1 NaN or infinite"),
                "{e}"
            );
        }
    }
}
