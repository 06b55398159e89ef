//! LoRA adapters for the UNet: training, saving/loading in the diffusers/PEFT and kohya layouts, stacking
//! several frozen LoRAs at inference, and merging LoRAs into the UNet weights.
//!
//! # The adapter
//!
//! A [`LoraAdapter`] sits in the adapter slot of one [`Linear`](diffpref_pipelines::nn::Linear) or
//! [`Conv2d`](diffpref_pipelines::nn::Conv2d) of the UNet and adds `scale · B(A(x))` to the layer's output:
//!
//! - linear layer `W [out, in]`: `A [r, in]`, `B [out, r]`, delta `scale · (x Aᵀ) Bᵀ`;
//! - convolution `W [out, in, k, k]`: `A [r, in, k, k]` (a convolution with the layer's stride and padding),
//!   `B [out, r, 1, 1]` (a 1×1 convolution), as PEFT and kohya store them.
//!
//! `scale = alpha / r` (or `alpha / √r` with rsLoRA). Trainable adapters keep `A` and `B` as f32 [`Var`]s
//! (master weights) and cast them to the input's dtype in the forward, so a bf16/f16 UNet trains f32 adapters.
//! `A` starts kaiming-uniform (a = √5, as PEFT: `U(-1/√fan_in, 1/√fan_in)`), `B` starts at zero, so a fresh set
//! leaves the model unchanged; at that point only `B` receives a non-zero gradient (`∂L/∂A` is multiplied by
//! `B = 0`), exactly as in PEFT.
//!
//! Every adapter of a [`LoraSet`] shares one `enabled` switch: [`LoraSet::set_enabled`]`(false)` makes the
//! UNet compute the base model exactly (the Diffusion-DPO reference pass, at no extra memory). A disabled
//! adapter returns a broadcast zero (no allocation, no matmul, nothing recorded for backprop).
//!
//! # Files
//!
//! Two layouts are written and read (detected from the keys when loading):
//!
//! - [`LoraFormat::Peft`], the diffusers/PEFT layout read by diffusers' `load_lora_weights`:
//!   `unet.<module path>.lora_A.weight` `[r, in(, k, k)]` and `unet.<module path>.lora_B.weight`
//!   `[out, r(, 1, 1)]`. A plain PEFT file carries no alpha, and diffusers then assumes `lora_alpha = r`
//!   (scale 1). **Convention:** diffpref therefore saves `lora_B = scale · B` (the scale folded into B), so any
//!   loader assuming alpha = r rebuilds the same delta, and records the training parameters in the
//!   safetensors metadata: `lora_alpha`, `rank`, `use_rslora`, `target_modules` (JSON), `lora_scale_folded =
//!   "true"` (and `lora_alpha_pattern`, a JSON map module → alpha, when the alphas differ between modules).
//!   When loading, a file with `lora_scale_folded` is applied with scale 1 and, for resuming training, B is
//!   unfolded with the recorded alpha; other PEFT files use diffusers' `lora_adapter_metadata`
//!   (`unet.lora_alpha`, `unet.use_rslora`) when present, else alpha = r. Keys may also start with
//!   `base_model.model.` or carry no prefix.
//! - [`LoraFormat::Kohya`] (kohya-ss / A1111): `lora_unet_<module path with '.'→'_'>.lora_down.weight` (= A),
//!   `.lora_up.weight` (= B, not scaled) and `.alpha` (a scalar; the delta is scaled by `alpha / r`; missing
//!   means alpha = r). diffpref writes `alpha = scale · r`. kohya names are mapped back to module paths by
//!   matching them against the UNet's own layer paths (never by guessing where the dots were).
//!
//! Loading checks everything before touching the UNet: unknown keys, keys for layers this UNet does not have,
//! text-encoder parts (not supported), a missing A or B, and shapes (both the file's and the expected shape
//! are named). Files are written atomically (temporary file, then rename).
//!
//! # Merging
//!
//! [`merge_into_unet_weights`] writes a diffusers `unet/` folder whose adapted weights are
//! `W + Σ scale · B·A` (computed in f32, stored in the original dtype); every other tensor is copied as is.

use crate::train::rng::Rng;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor, Var};
use diffpref_pipelines::autograd;
use diffpref_pipelines::models::unet::UNet2DConditionModel;
use diffpref_pipelines::nn::{linear, Adapter, Layer};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// The modules adapted by default (the attention projections, as in the diffusers LoRA scripts).
pub const DEFAULT_TARGET_MODULES: [&str; 4] = ["to_q", "to_k", "to_v", "to_out.0"];

/// Metadata key marking a PEFT file whose `lora_B` already includes `alpha / r`.
pub const META_SCALE_FOLDED: &str = "lora_scale_folded";

/// How LoRA adapters are added to a UNet.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraConfig {
    /// Rank r of every adapter. Default 8.
    pub rank: usize,
    /// LoRA alpha: the delta is scaled by `alpha / r` (`alpha / √r` with `use_rslora`). Default: `rank`
    /// (scale 1).
    pub alpha: Option<f64>,
    /// Rank-stabilised scaling `alpha / √r` (rsLoRA). Default false.
    pub use_rslora: bool,
    /// Dropout probability on the adapter input, applied only while the set is in training mode. Default 0.
    pub dropout: f64,
    /// Layers that get an adapter: a layer matches when its diffusers module path equals a target or ends
    /// with `.` + target. Default `["to_q", "to_k", "to_v", "to_out.0"]`; also useful: `"proj_in"`,
    /// `"proj_out"`, `"ff.net.0.proj"`, `"ff.net.2"`, or a longer suffix such as `"attn2.to_k"`.
    pub target_modules: Vec<String>,
    /// Seed of the kaiming-uniform initialisation of A (drawn per layer from the seed and the layer path, so
    /// independent of layer order). Default 0.
    pub init_seed: u64,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            rank: 8,
            alpha: None,
            use_rslora: false,
            dropout: 0.0,
            target_modules: DEFAULT_TARGET_MODULES
                .iter()
                .map(|s| s.to_string())
                .collect(),
            init_seed: 0,
        }
    }
}

impl LoraConfig {
    /// `alpha`, defaulting to the rank.
    pub fn alpha(&self) -> f64 {
        self.alpha.unwrap_or(self.rank as f64)
    }

    /// The multiplier of `B·A`: `alpha / r`, or `alpha / √r` with rsLoRA.
    pub fn scale(&self) -> f64 {
        lora_scale(self.alpha(), self.rank, self.use_rslora)
    }

    /// Whether a layer with this module path gets an adapter.
    pub fn matches(&self, path: &str) -> bool {
        self.target_modules.iter().any(|t| path_matches(path, t))
    }

    /// Checks the values (rank ≥ 1, dropout in [0, 1), finite alpha, at least one target).
    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            bail!("LoRA rank must be at least 1");
        }
        if !(0.0..1.0).contains(&self.dropout) {
            bail!("LoRA dropout {} must be in [0, 1)", self.dropout);
        }
        if !self.alpha().is_finite() {
            bail!("LoRA alpha {} must be finite", self.alpha());
        }
        if self.target_modules.is_empty() || self.target_modules.iter().any(|t| t.is_empty()) {
            bail!(
                "LoRA target_modules {:?} must be a non-empty list of module-path suffixes",
                self.target_modules
            );
        }
        Ok(())
    }
}

fn lora_scale(alpha: f64, rank: usize, rslora: bool) -> f64 {
    if rslora {
        alpha / (rank as f64).sqrt()
    } else {
        alpha / rank as f64
    }
}

fn path_matches(path: &str, target: &str) -> bool {
    path == target
        || (path.len() > target.len()
            && path.ends_with(target)
            && path.as_bytes()[path.len() - target.len() - 1] == b'.')
}

/// The LoRA file layouts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LoraFormat {
    /// diffusers/PEFT: `unet.<path>.lora_A.weight` / `.lora_B.weight` (scale folded into B).
    Peft,
    /// kohya-ss / A1111: `lora_unet_<path_with_underscores>.lora_down.weight` / `.lora_up.weight` / `.alpha`.
    Kohya,
}

impl std::str::FromStr for LoraFormat {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "peft" | "diffusers" => Ok(LoraFormat::Peft),
            "kohya" | "a1111" => Ok(LoraFormat::Kohya),
            _ => bail!("unknown LoRA format `{s}` (expected peft or kohya)"),
        }
    }
}

/// The shape of an adapted layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Geom {
    Linear {
        in_dim: usize,
        out_dim: usize,
    },
    Conv {
        in_c: usize,
        out_c: usize,
        k: usize,
        stride: usize,
        padding: usize,
    },
}

impl Geom {
    fn of(layer: &Layer) -> Result<Geom> {
        Ok(match layer {
            Layer::Linear(l) => {
                let (out_dim, in_dim) = l.weight.dims2()?;
                Geom::Linear { in_dim, out_dim }
            }
            Layer::Conv2d(c) => {
                let (out_c, in_c, k, k2) = c.weight.dims4()?;
                if k != k2 {
                    bail!(
                        "layer `{}`: non-square kernel {:?} is not supported by LoRA",
                        c.path,
                        c.weight.dims()
                    );
                }
                Geom::Conv {
                    in_c,
                    out_c,
                    k,
                    stride: c.stride,
                    padding: c.padding,
                }
            }
        })
    }

    /// From a weight's shape (stride/padding unknown: only for merging).
    fn from_weight_shape(shape: &[usize]) -> Option<Geom> {
        match *shape {
            [out_dim, in_dim] => Some(Geom::Linear { in_dim, out_dim }),
            [out_c, in_c, k, k2] if k == k2 => Some(Geom::Conv {
                in_c,
                out_c,
                k,
                stride: 1,
                padding: 0,
            }),
            _ => None,
        }
    }

    fn weight_shape(&self) -> Vec<usize> {
        match *self {
            Geom::Linear { in_dim, out_dim } => vec![out_dim, in_dim],
            Geom::Conv { in_c, out_c, k, .. } => vec![out_c, in_c, k, k],
        }
    }

    fn a_shape(&self, r: usize) -> Vec<usize> {
        match *self {
            Geom::Linear { in_dim, .. } => vec![r, in_dim],
            Geom::Conv { in_c, k, .. } => vec![r, in_c, k, k],
        }
    }

    fn b_shape(&self, r: usize) -> Vec<usize> {
        match *self {
            Geom::Linear { out_dim, .. } => vec![out_dim, r],
            Geom::Conv { out_c, .. } => vec![out_c, r, 1, 1],
        }
    }

    fn fan_in(&self) -> usize {
        match *self {
            Geom::Linear { in_dim, .. } => in_dim,
            Geom::Conv { in_c, k, .. } => in_c * k * k,
        }
    }

    fn out_dim(&self) -> usize {
        match *self {
            Geom::Linear { out_dim, .. } => out_dim,
            Geom::Conv { out_c, .. } => out_c,
        }
    }

    /// The layer's output shape for an input of shape `x`.
    fn output_shape(&self, x: &[usize]) -> candle_core::Result<Vec<usize>> {
        match *self {
            Geom::Linear { out_dim, .. } => {
                let mut s = x.to_vec();
                if let Some(last) = s.last_mut() {
                    *last = out_dim;
                }
                Ok(s)
            }
            Geom::Conv {
                out_c,
                k,
                stride,
                padding,
                ..
            } => match *x {
                [b, _, h, w] => Ok(vec![
                    b,
                    out_c,
                    (h + 2 * padding - k) / stride + 1,
                    (w + 2 * padding - k) / stride + 1,
                ]),
                _ => Err(candle_core::Error::Msg(format!(
                    "LoRA conv adapter: input shape {x:?} is not [B, C, H, W]"
                ))),
            },
        }
    }
}

/// State shared by every adapter of one [`LoraSet`].
#[derive(Debug)]
struct SetState {
    enabled: AtomicBool,
    training: AtomicBool,
    dropout_bits: AtomicU64,
}

impl SetState {
    fn new(training: bool, dropout: f64) -> Arc<Self> {
        Arc::new(SetState {
            enabled: AtomicBool::new(true),
            training: AtomicBool::new(training),
            dropout_bits: AtomicU64::new(dropout.to_bits()),
        })
    }

    fn dropout(&self) -> f64 {
        f64::from_bits(self.dropout_bits.load(Ordering::Relaxed))
    }
}

enum LoraWeights {
    /// f32 master weights.
    Trainable { a: Var, b: Var },
    /// Plain tensors in the model dtype (inference).
    Frozen { a: Tensor, b: Tensor },
}

/// One LoRA adapter on one layer (see the module docs for shapes and scaling).
pub struct LoraAdapter {
    path: String,
    geom: Geom,
    rank: usize,
    alpha: f64,
    use_rslora: bool,
    scale: f64,
    weights: LoraWeights,
    state: Arc<SetState>,
}

impl LoraAdapter {
    /// The diffusers module path of the adapted layer.
    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    /// alpha (for frozen adapters: `scale · r`, i.e. the user scale is included).
    pub fn alpha(&self) -> f64 {
        self.alpha
    }

    pub fn use_rslora(&self) -> bool {
        self.use_rslora
    }

    /// The multiplier of `B·A` in the forward.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// A, `[r, in]` or `[r, in, k, k]` (the var's tensor when trainable).
    pub fn a(&self) -> &Tensor {
        match &self.weights {
            LoraWeights::Trainable { a, .. } => a.as_tensor(),
            LoraWeights::Frozen { a, .. } => a,
        }
    }

    /// B, `[out, r]` or `[out, r, 1, 1]`, not scaled.
    pub fn b(&self) -> &Tensor {
        match &self.weights {
            LoraWeights::Trainable { b, .. } => b.as_tensor(),
            LoraWeights::Frozen { b, .. } => b,
        }
    }

    /// `(A, B)` as vars, for trainable adapters.
    pub fn vars(&self) -> Option<(&Var, &Var)> {
        match &self.weights {
            LoraWeights::Trainable { a, b } => Some((a, b)),
            LoraWeights::Frozen { .. } => None,
        }
    }

    /// `scale · B·A` in the layer weight's shape, f32 on the CPU.
    pub fn delta_weight(&self) -> Result<Tensor> {
        let a = self.a().to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
        let b = self.b().to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
        delta_weight(&self.geom, &a, &b, self.scale)
    }

    fn zero_delta(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let shape = self.geom.output_shape(x.dims())?;
        Tensor::zeros((), x.dtype(), x.device())?.broadcast_as(shape)
    }
}

/// `scale · B·A` reshaped to the layer weight's shape (all f32).
fn delta_weight(geom: &Geom, a: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    let r = a.dim(0)?;
    let a2 = a.reshape((r, ()))?;
    let b2 = b.reshape((geom.out_dim(), r))?;
    Ok((b2.matmul(&a2)? * scale)?.reshape(geom.weight_shape())?)
}

/// A 1×1 convolution `[B, C, H, W] → [B, O, H, W]` with weight `[O, C]`, as one batched matmul over a
/// contiguous broadcast weight (avoids candle#3744).
fn conv1x1(x: &Tensor, w2: &Tensor) -> candle_core::Result<Tensor> {
    let (b, c, h, wd) = x.dims4()?;
    let o = w2.dim(0)?;
    let xs = x.contiguous()?.reshape((b, c, h * wd))?;
    autograd::matmul(&w2.broadcast_left(b)?.contiguous()?, &xs)?.reshape((b, o, h, wd))
}

impl Adapter for LoraAdapter {
    fn delta(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if !self.state.enabled.load(Ordering::Relaxed) || self.scale == 0.0 {
            return self.zero_delta(x);
        }
        let dt = x.dtype();
        let (a, b) = match &self.weights {
            // Outside training mode the adapter takes no part in the autograd graph, so sampling many steps
            // with a trainable set (evaluation, validation grids) keeps no history alive.
            LoraWeights::Trainable { a, b } if self.state.training.load(Ordering::Relaxed) => {
                (a.as_tensor().to_dtype(dt)?, b.as_tensor().to_dtype(dt)?)
            }
            LoraWeights::Trainable { a, b } => (
                a.as_tensor().detach().to_dtype(dt)?,
                b.as_tensor().detach().to_dtype(dt)?,
            ),
            LoraWeights::Frozen { a, b } => (a.to_dtype(dt)?, b.to_dtype(dt)?),
        };
        let p = self.state.dropout();
        let x = if p > 0.0 && self.state.training.load(Ordering::Relaxed) {
            candle_nn::ops::dropout(x, p as f32)?
        } else {
            x.clone()
        };
        // The scale multiplies the rank-r intermediate (cheaper than the output).
        let scaled = |h: Tensor| -> candle_core::Result<Tensor> {
            if self.scale == 1.0 {
                Ok(h)
            } else {
                h * self.scale
            }
        };
        match self.geom {
            Geom::Linear { .. } => {
                let h = scaled(linear(&x, &a, None)?)?;
                linear(&h, &b, None)
            }
            Geom::Conv {
                in_c,
                out_c,
                k,
                stride,
                padding,
            } => {
                let r = self.rank;
                let h = if k == 1 && stride == 1 && padding == 0 {
                    conv1x1(&x, &a.reshape((r, in_c))?)?
                } else {
                    autograd::conv2d(&x, &a, padding, stride, 1)?
                };
                let h = scaled(h)?;
                conv1x1(&h, &b.reshape((out_c, r))?)
            }
        }
    }
}

fn attach_to(layer: &Layer, adapter: Arc<LoraAdapter>) {
    match layer {
        Layer::Linear(l) => l.attach(adapter),
        Layer::Conv2d(c) => c.attach(adapter),
    }
}

/// Kaiming-uniform with a = √5 (PEFT's init of `lora_A`): `U(-1/√fan_in, 1/√fan_in)`, seeded per layer.
fn kaiming_uniform(seed: u64, path: &str, shape: &[usize], fan_in: usize) -> Result<Tensor> {
    let bound = 1.0 / (fan_in as f64).sqrt();
    let mut rng = Rng::derive(seed, &format!("lora_A:{path}"));
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| ((2.0 * rng.uniform() - 1.0) * bound) as f32)
        .collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

/// How to load a LoRA file.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LoadMode {
    /// f32 vars, B un-folded so that training resumes with the saved alpha (in training mode, no dropout).
    Trainable,
    /// Plain tensors in the UNet's dtype, the file's delta multiplied by `scale` (inference).
    Frozen { scale: f64 },
}

/// A set of LoRA adapters attached to one UNet, sharing an on/off switch.
pub struct LoraSet {
    adapters: Vec<Arc<LoraAdapter>>,
    state: Arc<SetState>,
    target_modules: Vec<String>,
}

impl std::fmt::Debug for LoraSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoraSet")
            .field("adapters", &self.adapters.len())
            .field("enabled", &self.is_enabled())
            .field("target_modules", &self.target_modules)
            .finish()
    }
}

impl LoraSet {
    /// Adds a fresh trainable adapter (A kaiming-uniform, B zero, f32 vars on `device`) to every UNet layer
    /// matching `cfg.target_modules`. The set starts enabled and in training mode.
    pub fn attach(
        unet: &UNet2DConditionModel,
        cfg: &LoraConfig,
        device: &Device,
    ) -> Result<LoraSet> {
        cfg.validate()?;
        let state = SetState::new(true, cfg.dropout);
        let scale = cfg.scale();
        let mut planned = Vec::new();
        for layer in unet.layers() {
            if !cfg.matches(layer.path()) {
                continue;
            }
            let geom = Geom::of(layer)?;
            let a = kaiming_uniform(
                cfg.init_seed,
                layer.path(),
                &geom.a_shape(cfg.rank),
                geom.fan_in(),
            )?
            .to_device(device)?;
            let adapter = LoraAdapter {
                path: layer.path().to_string(),
                geom,
                rank: cfg.rank,
                alpha: cfg.alpha(),
                use_rslora: cfg.use_rslora,
                scale,
                weights: LoraWeights::Trainable {
                    a: Var::from_tensor(&a)?,
                    b: Var::zeros(geom.b_shape(cfg.rank), DType::F32, device)?,
                },
                state: state.clone(),
            };
            planned.push((layer.clone(), Arc::new(adapter)));
        }
        if planned.is_empty() {
            let example = unet
                .layers()
                .iter()
                .map(|l| l.path())
                .find(|p| p.contains("attn"))
                .or_else(|| unet.layers().first().map(|l| l.path()))
                .unwrap_or("")
                .to_string();
            bail!(
                "LoRA target_modules {:?} match no layer of the UNet (a target must equal a module path or end \
                 it after a '.'; paths look like `{example}`)",
                cfg.target_modules
            );
        }
        let adapters = planned
            .into_iter()
            .map(|(layer, a)| {
                attach_to(&layer, a.clone());
                a
            })
            .collect();
        Ok(LoraSet {
            adapters,
            state,
            target_modules: cfg.target_modules.clone(),
        })
    }

    /// Loads a LoRA file (PEFT or kohya layout, detected) and attaches it to `unet`. Nothing is attached when
    /// the file has any problem.
    pub fn load(unet: &UNet2DConditionModel, path: &Path, mode: LoadMode) -> Result<LoraSet> {
        let catalog = Catalog::from_unet(unet)?;
        let parsed = read_lora_file(path, &catalog)?;
        let device = unet.device().clone();
        let state = SetState::new(matches!(mode, LoadMode::Trainable), 0.0);
        let mut planned = Vec::new();
        for m in parsed.modules {
            let geom = catalog.geoms[&m.path];
            let rank = m.a.dim(0)?;
            let (weights, alpha, use_rslora, scale) = match mode {
                LoadMode::Trainable => {
                    let train_scale = lora_scale(m.alpha, rank, m.use_rslora);
                    let factor = if train_scale != 0.0 {
                        m.file_scale / train_scale
                    } else {
                        1.0
                    };
                    let b = if factor == 1.0 { m.b } else { (m.b * factor)? };
                    let w = LoraWeights::Trainable {
                        a: Var::from_tensor(&m.a.to_device(&device)?)?,
                        b: Var::from_tensor(&b.to_device(&device)?)?,
                    };
                    (w, m.alpha, m.use_rslora, train_scale)
                }
                LoadMode::Frozen { scale } => {
                    if !scale.is_finite() {
                        bail!("{}: LoRA scale {scale} is not finite", path.display());
                    }
                    let s = m.file_scale * scale;
                    let dt = unet.dtype();
                    let w = LoraWeights::Frozen {
                        a: m.a.to_dtype(dt)?.to_device(&device)?,
                        b: m.b.to_dtype(dt)?.to_device(&device)?,
                    };
                    (w, s * rank as f64, false, s)
                }
            };
            let adapter = LoraAdapter {
                path: m.path.clone(),
                geom,
                rank,
                alpha,
                use_rslora,
                scale,
                weights,
                state: state.clone(),
            };
            planned.push(Arc::new(adapter));
        }
        // In the UNet's layer order (the file's order is alphabetical).
        let order: HashMap<&str, (usize, &Layer)> = unet
            .layers()
            .iter()
            .enumerate()
            .map(|(i, l)| (l.path(), (i, l)))
            .collect();
        planned.sort_by_key(|a| order[a.path.as_str()].0);
        for a in &planned {
            attach_to(order[a.path.as_str()].1, a.clone());
        }
        Ok(LoraSet {
            adapters: planned,
            state,
            target_modules: parsed.target_modules,
        })
    }

    /// Loads a LoRA file frozen (for inference) with strength `scale` and attaches it; several sets can be
    /// attached to one UNet at once (their deltas add up).
    pub fn load_into(unet: &UNet2DConditionModel, path: &Path, scale: f64) -> Result<LoraSet> {
        Self::load(unet, path, LoadMode::Frozen { scale })
    }

    /// Turns every adapter of the set on or off (off: the UNet computes the base model exactly).
    pub fn set_enabled(&self, enabled: bool) {
        self.state.enabled.store(enabled, Ordering::Relaxed);
    }

    pub fn is_enabled(&self) -> bool {
        self.state.enabled.load(Ordering::Relaxed)
    }

    /// Training mode applies the dropout (if any) and tracks gradients; evaluation mode does neither.
    pub fn set_training(&self, training: bool) {
        self.state.training.store(training, Ordering::Relaxed);
    }

    pub fn is_training(&self) -> bool {
        self.state.training.load(Ordering::Relaxed)
    }

    /// Changes the input dropout of every adapter (in [0, 1); applied only in training mode).
    pub fn set_dropout(&self, p: f64) -> Result<()> {
        if !(0.0..1.0).contains(&p) {
            bail!("LoRA dropout {p} must be in [0, 1)");
        }
        self.state
            .dropout_bits
            .store(p.to_bits(), Ordering::Relaxed);
        Ok(())
    }

    /// The adapters, in the UNet's layer order.
    pub fn adapters(&self) -> &[Arc<LoraAdapter>] {
        &self.adapters
    }

    /// The module-path suffixes this set was created with (from the file's metadata when loaded; empty if
    /// unknown).
    pub fn target_modules(&self) -> &[String] {
        &self.target_modules
    }

    pub fn len(&self) -> usize {
        self.adapters.len()
    }

    pub fn is_empty(&self) -> bool {
        self.adapters.is_empty()
    }

    /// Whether the set holds trainable vars.
    pub fn is_trainable(&self) -> bool {
        self.adapters.iter().all(|a| a.vars().is_some())
    }

    /// The trainable vars named by their PEFT key (`unet.<path>.lora_A.weight`, `….lora_B.weight`), A before
    /// B, in layer order. Empty for a frozen set.
    pub fn vars(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        for ad in &self.adapters {
            if let Some((a, b)) = ad.vars() {
                out.push((format!("unet.{}.lora_A.weight", ad.path), a.clone()));
                out.push((format!("unet.{}.lora_B.weight", ad.path), b.clone()));
            }
        }
        out
    }

    /// The number of LoRA parameters (A and B elements).
    pub fn num_params(&self) -> usize {
        self.adapters
            .iter()
            .map(|a| a.a().elem_count() + a.b().elem_count())
            .sum()
    }

    /// Removes the adapters from the UNet's layers. The layers' adapter slots are cleared, so any other
    /// adapter attached to the same layers is removed too.
    pub fn detach_from(&self, unet: &UNet2DConditionModel) {
        let mine: HashSet<&str> = self.adapters.iter().map(|a| a.path.as_str()).collect();
        for layer in unet.layers() {
            if mine.contains(layer.path()) {
                match layer {
                    Layer::Linear(l) => l.clear_adapters(),
                    Layer::Conv2d(c) => c.clear_adapters(),
                }
            }
        }
    }

    /// Saves the set in f32 (see the module docs for the layouts and the PEFT scale convention).
    pub fn save(&self, path: &Path, format: LoraFormat) -> Result<()> {
        self.save_with_dtype(path, format, DType::F32)
    }

    /// Saves the set with A and B in `dtype` (f32, f16 or bf16), atomically.
    pub fn save_with_dtype(&self, path: &Path, format: LoraFormat, dtype: DType) -> Result<()> {
        if self.adapters.is_empty() {
            bail!("{}: refusing to save an empty LoRA set", path.display());
        }
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        let mut meta: HashMap<String, String> = HashMap::new();
        meta.insert("format".into(), "pt".into());
        meta.insert("written_by".into(), "diffpref".into());
        let first = &self.adapters[0];
        let uniform_alpha = self.adapters.iter().all(|a| a.alpha == first.alpha);
        let uniform_rank = self.adapters.iter().all(|a| a.rank == first.rank);
        let rslora = self.adapters.iter().any(|a| a.use_rslora);
        if self.adapters.iter().any(|a| a.use_rslora != rslora) {
            bail!(
                "{}: cannot save a LoRA set mixing rsLoRA and plain scaling",
                path.display()
            );
        }
        meta.insert("lora_alpha".into(), first.alpha.to_string());
        if uniform_rank {
            meta.insert("rank".into(), first.rank.to_string());
        }
        meta.insert("use_rslora".into(), rslora.to_string());
        if !self.target_modules.is_empty() {
            meta.insert(
                "target_modules".into(),
                serde_json::to_string(&self.target_modules)?,
            );
        }
        if !uniform_alpha {
            let pattern: BTreeMap<&str, f64> = self
                .adapters
                .iter()
                .map(|a| (a.path.as_str(), a.alpha))
                .collect();
            meta.insert(
                "lora_alpha_pattern".into(),
                serde_json::to_string(&pattern)?,
            );
        }
        let cpu =
            |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?) };
        for ad in &self.adapters {
            let a = cpu(ad.a())?;
            let b = cpu(ad.b())?;
            match format {
                LoraFormat::Peft => {
                    tensors.push((
                        format!("unet.{}.lora_A.weight", ad.path),
                        a.to_dtype(dtype)?,
                    ));
                    tensors.push((
                        format!("unet.{}.lora_B.weight", ad.path),
                        (b * ad.scale)?.to_dtype(dtype)?,
                    ));
                }
                LoraFormat::Kohya => {
                    let name = format!("lora_unet_{}", ad.path.replace('.', "_"));
                    tensors.push((format!("{name}.lora_down.weight"), a.to_dtype(dtype)?));
                    tensors.push((format!("{name}.lora_up.weight"), b.to_dtype(dtype)?));
                    tensors.push((
                        format!("{name}.alpha"),
                        Tensor::new((ad.scale * ad.rank as f64) as f32, &Device::Cpu)?,
                    ));
                }
            }
        }
        match format {
            LoraFormat::Peft => {
                meta.insert(META_SCALE_FOLDED.into(), "true".into());
            }
            LoraFormat::Kohya => {
                if uniform_rank {
                    meta.insert("ss_network_dim".into(), first.rank.to_string());
                }
                if uniform_alpha && !rslora {
                    meta.insert("ss_network_alpha".into(), first.alpha.to_string());
                }
            }
        }
        write_safetensors_atomic(path, tensors, meta)
    }
}

/// The `(file, scale)` pairs of `--lora FILE` (repeated) and `--lora-scale S` (none: 1 for all; one: for all;
/// else one per file).
pub fn lora_specs(files: &[PathBuf], scales: &[f64]) -> Result<Vec<(PathBuf, f64)>> {
    if files.is_empty() {
        if !scales.is_empty() {
            bail!("--lora-scale given without --lora");
        }
        return Ok(Vec::new());
    }
    let scales: Vec<f64> = match scales.len() {
        0 => vec![1.0; files.len()],
        1 => vec![scales[0]; files.len()],
        n if n == files.len() => scales.to_vec(),
        n => bail!(
            "{n} --lora-scale values for {} --lora files: give one for all, or one per file",
            files.len()
        ),
    };
    for (f, s) in files.iter().zip(&scales) {
        if !s.is_finite() {
            bail!("--lora-scale {s} for {} is not finite", f.display());
        }
    }
    Ok(files.iter().cloned().zip(scales).collect())
}

/// Loads every `(file, scale)` frozen into `unet` (the returned sets keep their on/off switches).
pub fn attach_lora_files(
    unet: &UNet2DConditionModel,
    specs: &[(PathBuf, f64)],
) -> Result<Vec<LoraSet>> {
    specs
        .iter()
        .map(|(f, s)| {
            LoraSet::load_into(unet, f, *s).with_context(|| format!("--lora {}", f.display()))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------------------
// File parsing

/// The adapter-capable layers a LoRA file is resolved against.
struct Catalog {
    geoms: HashMap<String, Geom>,
    /// kohya name (`'.'` → `'_'`) → module paths.
    flat: HashMap<String, Vec<String>>,
    source: String,
}

impl Catalog {
    fn new(geoms: HashMap<String, Geom>, source: String) -> Self {
        let mut flat: HashMap<String, Vec<String>> = HashMap::new();
        for p in geoms.keys() {
            flat.entry(p.replace('.', "_")).or_default().push(p.clone());
        }
        Catalog {
            geoms,
            flat,
            source,
        }
    }

    fn from_unet(unet: &UNet2DConditionModel) -> Result<Self> {
        let geoms = unet
            .layers()
            .iter()
            .map(|l| Ok((l.path().to_string(), Geom::of(l)?)))
            .collect::<Result<_>>()?;
        Ok(Self::new(geoms, "this UNet".into()))
    }

    fn resolve_kohya(&self, file: &Path, key: &str, flat: &str) -> Result<String> {
        match self.flat.get(flat).map(|v| v.as_slice()) {
            Some([one]) => Ok(one.clone()),
            Some(many) => bail!(
                "{}: `{key}` is ambiguous: it matches layers {many:?}",
                file.display()
            ),
            None => {
                let hint = if ["input_blocks", "middle_block", "output_blocks"]
                    .iter()
                    .any(|s| flat.contains(s))
                {
                    " (original-SD/SGM block names such as input_blocks/middle_block/output_blocks are not \
                     supported; use a LoRA with diffusers names)"
                } else {
                    ""
                };
                bail!(
                    "{}: `{key}` names layer `{flat}`, which {} does not have{hint}",
                    file.display(),
                    self.source
                )
            }
        }
    }
}

struct ParsedModule {
    path: String,
    /// f32, CPU, normalised to the layer's A/B shapes.
    a: Tensor,
    b: Tensor,
    /// The file's delta is `file_scale · B·A`.
    file_scale: f64,
    /// Training parameters (to resume): the training scale is `alpha / r` (or `/√r`).
    alpha: f64,
    use_rslora: bool,
}

struct ParsedLora {
    modules: Vec<ParsedModule>,
    target_modules: Vec<String>,
}

fn meta_f64(meta: &HashMap<String, String>, file: &Path, key: &str) -> Result<Option<f64>> {
    match meta.get(key) {
        None => Ok(None),
        Some(v) => v.trim().parse::<f64>().map(Some).map_err(|_| {
            anyhow!(
                "{}: metadata `{key}` = {v:?} is not a number",
                file.display()
            )
        }),
    }
}

fn meta_bool(meta: &HashMap<String, String>, key: &str) -> bool {
    meta.get(key)
        .is_some_and(|v| matches!(v.trim(), "true" | "True" | "1"))
}

fn list_keys(keys: &[String]) -> String {
    let shown: Vec<String> = keys.iter().take(3).map(|k| format!("`{k}`")).collect();
    if keys.len() > 3 {
        format!("{} and {} more", shown.join(", "), keys.len() - 3)
    } else {
        shown.join(", ")
    }
}

/// Normalises a file's A and B to the layer's shapes (1×1 convolutions may be stored as matrices and vice
/// versa); errors name the key, the file's shape and the expected one.
fn fit_shapes(
    file: &Path,
    path: &str,
    geom: &Geom,
    key_a: &str,
    a: Tensor,
    key_b: &str,
    b: Tensor,
) -> Result<(Tensor, Tensor)> {
    let f = file.display();
    if a.rank() != 2 && a.rank() != 4 {
        bail!(
            "{f}: `{key_a}` has shape {:?}; a LoRA down/A matrix is [r, in] or [r, in, k, k]",
            a.dims()
        );
    }
    let r = a.dim(0)?;
    let wshape = geom.weight_shape();
    let fit = |key: &str, t: Tensor, want: Vec<usize>| -> Result<Tensor> {
        if t.dims() == want.as_slice() {
            return Ok(t);
        }
        // A 1×1 convolution and a matrix are the same thing: accept [m, n] for [m, n, 1, 1] and vice versa.
        let d = t.dims();
        let same_matrix = (d.len() == 2 || d.len() == 4)
            && d[..2] == want[..2]
            && d[2..].iter().all(|&x| x == 1)
            && want[2..].iter().all(|&x| x == 1);
        if same_matrix {
            return Ok(t.reshape(want)?);
        }
        bail!(
            "{f}: `{key}` has shape {:?} but layer `{path}` (weight {wshape:?}) needs {want:?}",
            t.dims()
        )
    };
    let a = fit(key_a, a, geom.a_shape(r))?;
    if b.rank() < 2 || b.dim(1)? != r {
        bail!(
            "{f}: `{key_b}` has shape {:?} but `{key_a}` has shape {:?} (rank {r}); layer `{path}` (weight \
             {wshape:?}) needs {:?}",
            b.dims(),
            a.dims(),
            geom.b_shape(r)
        );
    }
    let b = fit(key_b, b, geom.b_shape(r))?;
    Ok((a, b))
}

#[derive(Default)]
struct Pair {
    a: Option<(String, Tensor)>,
    b: Option<(String, Tensor)>,
    alpha: Option<(String, f64)>,
}

fn read_lora_file(file: &Path, catalog: &Catalog) -> Result<ParsedLora> {
    let f = file.display();
    let bytes = std::fs::read(file).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            anyhow!("LoRA file {f}: no such file")
        } else {
            anyhow!("LoRA file {f}: {e}")
        }
    })?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| anyhow!("{f}: not a safetensors file: {e}"))?;
    let meta = header.metadata().clone().unwrap_or_default();
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .map_err(|e| anyhow!("{f}: cannot read tensors: {e}"))?;
    let mut keys: Vec<String> = tensors.keys().cloned().collect();
    keys.sort();
    for k in &keys {
        diffpref_pipelines::weights::check_loaded(&tensors[k], k, &f.to_string())?;
    }
    let is_kohya = keys.iter().any(|k| {
        k.starts_with("lora_unet_")
            || k.starts_with("lora_te")
            || k.ends_with(".lora_down.weight")
            || k.ends_with(".lora_up.weight")
    });
    let is_peft = keys
        .iter()
        .any(|k| k.contains(".lora_A.") || k.contains(".lora_B."));
    if !is_kohya && !is_peft {
        bail!(
            "{f}: not a LoRA file: no PEFT `<module>.lora_A.weight`/`.lora_B.weight` or kohya \
             `lora_unet_<module>.lora_down.weight`/`.lora_up.weight` keys (found {})",
            if keys.is_empty() {
                "no tensors".to_string()
            } else {
                list_keys(&keys)
            }
        );
    }
    if is_kohya && is_peft {
        bail!("{f}: mixes PEFT (lora_A/lora_B) and kohya (lora_down/lora_up) keys");
    }
    let mut pairs: BTreeMap<String, Pair> = BTreeMap::new();
    let mut text_encoder = Vec::new();
    let mut unknown = Vec::new();
    for key in &keys {
        let t = tensors[key].to_dtype(DType::F32)?;
        if is_peft {
            let parsed = [
                (".lora_A.weight", 'A'),
                (".lora_B.weight", 'B'),
                (".lora_A.default.weight", 'A'),
                (".lora_B.default.weight", 'B'),
            ]
            .iter()
            .find_map(|(suffix, which)| key.strip_suffix(suffix).map(|m| (m, *which)));
            let Some((module, which)) = parsed else {
                unknown.push(key.clone());
                continue;
            };
            if module.starts_with("text_encoder") {
                text_encoder.push(key.clone());
                continue;
            }
            let module = module
                .strip_prefix("unet.")
                .or_else(|| module.strip_prefix("base_model.model."))
                .unwrap_or(module);
            if !catalog.geoms.contains_key(module) {
                bail!(
                    "{f}: `{key}` is for layer `{module}`, which {} does not have",
                    catalog.source
                );
            }
            let e = pairs.entry(module.to_string()).or_default();
            let slot = if which == 'A' { &mut e.a } else { &mut e.b };
            if let Some((prev, _)) = slot {
                bail!("{f}: `{key}` and `{prev}` are both lora_{which} of layer `{module}`");
            }
            *slot = Some((key.clone(), t));
        } else {
            if key.starts_with("lora_te") {
                text_encoder.push(key.clone());
                continue;
            }
            let Some(rest) = key.strip_prefix("lora_unet_") else {
                unknown.push(key.clone());
                continue;
            };
            let parsed = [
                (".lora_down.weight", 'A'),
                (".lora_up.weight", 'B'),
                (".alpha", 'a'),
            ]
            .iter()
            .find_map(|(suffix, which)| rest.strip_suffix(suffix).map(|m| (m, *which)));
            let Some((flat, which)) = parsed else {
                unknown.push(key.clone());
                continue;
            };
            let module = catalog.resolve_kohya(file, key, flat)?;
            let e = pairs.entry(module).or_default();
            match which {
                'A' => e.a = Some((key.clone(), t)),
                'B' => e.b = Some((key.clone(), t)),
                _ => {
                    if t.elem_count() != 1 {
                        bail!(
                            "{f}: `{key}` has shape {:?}; an alpha is a scalar",
                            t.dims()
                        );
                    }
                    let v = t.flatten_all()?.to_vec1::<f32>()?[0] as f64;
                    e.alpha = Some((key.clone(), v));
                }
            }
        }
    }
    if !text_encoder.is_empty() {
        bail!(
            "{f}: text-encoder LoRA weights are not supported (only the UNet): {}",
            list_keys(&text_encoder)
        );
    }
    if !unknown.is_empty() {
        let expected = if is_peft {
            "`unet.<module>.lora_A.weight` / `.lora_B.weight`"
        } else {
            "`lora_unet_<module>.lora_down.weight` / `.lora_up.weight` / `.alpha`"
        };
        bail!(
            "{f}: unknown LoRA key(s) {} (expected {expected})",
            list_keys(&unknown)
        );
    }
    if pairs.is_empty() {
        bail!("{f}: the LoRA has no UNet layers");
    }
    // Training parameters from the metadata.
    let folded = is_peft && meta_bool(&meta, META_SCALE_FOLDED);
    let meta_alpha = meta_f64(&meta, file, "lora_alpha")?;
    let meta_rslora = meta_bool(&meta, "use_rslora");
    let alpha_pattern: HashMap<String, f64> = match meta.get("lora_alpha_pattern") {
        Some(s) => serde_json::from_str(s)
            .map_err(|e| anyhow!("{f}: metadata `lora_alpha_pattern` is not a JSON map: {e}"))?,
        None => HashMap::new(),
    };
    // diffusers' own metadata (save_lora_adapter / save_lora_weights with adapter metadata).
    let (diffusers_alpha, diffusers_rslora) = match meta.get("lora_adapter_metadata") {
        Some(s) if is_peft && !folded => {
            let v: serde_json::Value = serde_json::from_str(s)
                .map_err(|e| anyhow!("{f}: metadata `lora_adapter_metadata` is not JSON: {e}"))?;
            let get = |k: &str| v.get(format!("unet.{k}")).or_else(|| v.get(k));
            (
                get("lora_alpha").and_then(|x| x.as_f64()),
                get("use_rslora").and_then(|x| x.as_bool()).unwrap_or(false),
            )
        }
        _ => (None, false),
    };
    let target_modules: Vec<String> = meta
        .get("target_modules")
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or_default();
    let mut modules = Vec::new();
    for (module, pair) in pairs {
        let geom = &catalog.geoms[&module];
        let (key_a, a) = match pair.a {
            Some(x) => x,
            None => bail!(
                "{f}: layer `{module}` has `{}` but no {} matrix",
                pair.b.as_ref().map(|b| b.0.as_str()).unwrap_or("an alpha"),
                if is_peft { "lora_A" } else { "lora_down" }
            ),
        };
        let (key_b, b) = match pair.b {
            Some(x) => x,
            None => bail!(
                "{f}: layer `{module}` has `{key_a}` but no {} matrix",
                if is_peft { "lora_B" } else { "lora_up" }
            ),
        };
        let (a, b) = fit_shapes(file, &module, geom, &key_a, a, &key_b, b)?;
        let r = a.dim(0)?;
        let (file_scale, alpha, use_rslora) = if is_peft {
            if folded {
                let alpha = alpha_pattern
                    .get(&module)
                    .copied()
                    .or(meta_alpha)
                    .unwrap_or(r as f64);
                (1.0, alpha, meta_rslora)
            } else {
                let alpha = diffusers_alpha.unwrap_or(r as f64);
                let s = lora_scale(alpha, r, diffusers_rslora);
                (s, alpha, diffusers_rslora)
            }
        } else {
            let alpha_k = pair.alpha.map(|x| x.1).unwrap_or(r as f64);
            let s = alpha_k / r as f64;
            if meta_rslora {
                (s, alpha_k / (r as f64).sqrt(), true)
            } else {
                (s, alpha_k, false)
            }
        };
        modules.push(ParsedModule {
            path: module,
            a,
            b,
            file_scale,
            alpha,
            use_rslora,
        });
    }
    Ok(ParsedLora {
        modules,
        target_modules,
    })
}

// ---------------------------------------------------------------------------------------------------------
// Writing

/// A tensor to write (safetensors 0.6 `View`): bytes borrowed from a mapped input file (copied as is) or owned.
struct OutTensor<'a> {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    data: Cow<'a, [u8]>,
}

impl safetensors::View for OutTensor<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

impl OutTensor<'static> {
    /// The little-endian bytes of a tensor (any device; f32, f16, bf16, f64 and integer dtypes).
    fn from_tensor(t: &Tensor) -> Result<Self> {
        use candle_core::{CpuStorage, Storage};
        use safetensors::Dtype as D;
        let t = t.to_device(&Device::Cpu)?.contiguous()?;
        let shape = t.dims().to_vec();
        let (storage, layout) = t.storage_and_layout();
        let Storage::Cpu(cpu) = &*storage else {
            bail!("internal: tensor not on the CPU after to_device");
        };
        let (lo, hi) = (
            layout.start_offset(),
            layout.start_offset() + t.elem_count(),
        );
        macro_rules! le {
            ($v:expr, $d:expr) => {
                (
                    $d,
                    $v[lo..hi]
                        .iter()
                        .flat_map(|x| x.to_le_bytes())
                        .collect::<Vec<u8>>(),
                )
            };
        }
        let (dtype, bytes) = match cpu {
            CpuStorage::F32(v) => le!(v, D::F32),
            CpuStorage::F16(v) => le!(v, D::F16),
            CpuStorage::BF16(v) => le!(v, D::BF16),
            CpuStorage::F64(v) => le!(v, D::F64),
            CpuStorage::I64(v) => le!(v, D::I64),
            CpuStorage::I32(v) => le!(v, D::I32),
            CpuStorage::I16(v) => le!(v, D::I16),
            CpuStorage::U32(v) => le!(v, D::U32),
            CpuStorage::U8(v) => le!(v, D::U8),
            _ => bail!("cannot write a tensor of dtype {:?}", t.dtype()),
        };
        Ok(OutTensor {
            dtype,
            shape,
            data: Cow::Owned(bytes),
        })
    }
}

/// The dtype of every tensor of a safetensors file, from its JSON header.
fn header_dtypes(file: &Path) -> Result<HashMap<String, safetensors::Dtype>> {
    use std::io::Read;
    let bad = |msg: String| anyhow!("{}: bad safetensors header: {msg}", file.display());
    let mut f =
        std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
    let mut n = [0u8; 8];
    f.read_exact(&mut n).map_err(|e| bad(e.to_string()))?;
    let n = u64::from_le_bytes(n) as usize;
    if n > 100_000_000 {
        return Err(bad(format!("header length {n}")));
    }
    let mut header = vec![0u8; n];
    f.read_exact(&mut header).map_err(|e| bad(e.to_string()))?;
    let json: HashMap<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| bad(e.to_string()))?;
    json.into_iter()
        .filter(|(k, _)| k != "__metadata__")
        .map(|(k, v)| {
            let dtype = v
                .get("dtype")
                .cloned()
                .ok_or_else(|| bad(format!("tensor `{k}` has no dtype")))?;
            let dtype: safetensors::Dtype =
                serde_json::from_value(dtype).map_err(|e| bad(format!("tensor `{k}`: {e}")))?;
            Ok((k, dtype))
        })
        .collect()
}

fn serialize_atomic<'a>(
    path: &Path,
    tensors: Vec<(String, OutTensor<'a>)>,
    meta: HashMap<String, String>,
) -> Result<()> {
    crate::io::write_atomic_path(path, |tmp| {
        safetensors::serialize_to_file(tensors, Some(meta), tmp)
            .map_err(|e| anyhow!("cannot write {}: {e}", tmp.display()))
    })
}

fn write_safetensors_atomic(
    path: &Path,
    tensors: Vec<(String, Tensor)>,
    meta: HashMap<String, String>,
) -> Result<()> {
    let tensors = tensors
        .into_iter()
        .map(|(k, t)| Ok((k, OutTensor::from_tensor(&t)?)))
        .collect::<Result<Vec<_>>>()?;
    serialize_atomic(path, tensors, meta)
}

/// What [`merge_into_unet_weights`] changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MergeSummary {
    /// Module paths whose weight was changed, sorted.
    pub merged_layers: Vec<String>,
    /// Tensors written in all.
    pub tensors: usize,
}

/// Writes a diffusers `unet/` folder (`config.json` copied, `diffusion_pytorch_model.safetensors`) into
/// `out_dir` whose adapted layers hold `W + Σ scale · (file's delta)` over the `(LoRA file, scale)` pairs;
/// every other tensor is copied byte for byte, every dtype kept. Reads `diffusion_pytorch_model.safetensors`
/// (or its sharded index, or the fp16 variant when only that exists).
pub fn merge_into_unet_weights(
    unet_dir: &Path,
    loras: &[(PathBuf, f64)],
    out_dir: &Path,
) -> Result<MergeSummary> {
    merge_into_unet_weights_variant(unet_dir, None, loras, out_dir)
}

/// [`merge_into_unet_weights`] reading the weight `variant` (e.g. `fp16`) when it exists.
pub fn merge_into_unet_weights_variant(
    unet_dir: &Path,
    variant: Option<&str>,
    loras: &[(PathBuf, f64)],
    out_dir: &Path,
) -> Result<MergeSummary> {
    if loras.is_empty() {
        bail!("merging into {}: no LoRA files given", unet_dir.display());
    }
    if let (Ok(a), Ok(b)) = (unet_dir.canonicalize(), out_dir.canonicalize()) {
        if a == b {
            bail!(
                "merging LoRAs: the output folder {} is the input UNet folder",
                out_dir.display()
            );
        }
    }
    let config = unet_dir.join("config.json");
    if !config.exists() {
        bail!(
            "{}: no such file (not a diffusers unet folder)",
            config.display()
        );
    }
    let files = diffpref_pipelines::weights::find_weight_files(
        unet_dir,
        "diffusion_pytorch_model",
        variant,
    )?;
    // SAFETY: the input files are only read; the output is written to a new temporary file.
    let st = unsafe { MmapedSafetensors::multi(&files) }.map_err(|e| {
        anyhow!(
            "cannot read {}: {e}",
            files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    })?;
    let mut dtypes = HashMap::new();
    for f in &files {
        dtypes.extend(header_dtypes(f)?);
    }
    let views = st.tensors();
    let mut geoms = HashMap::new();
    for (name, v) in &views {
        if let Some(path) = name.strip_suffix(".weight") {
            if let Some(g) = Geom::from_weight_shape(v.shape()) {
                geoms.insert(path.to_string(), g);
            }
        }
    }
    let catalog = Catalog::new(geoms, format!("the UNet in {}", unet_dir.display()));
    let mut deltas: HashMap<String, Tensor> = HashMap::new();
    for (file, scale) in loras {
        if !scale.is_finite() {
            bail!("{}: LoRA scale {scale} is not finite", file.display());
        }
        let parsed = read_lora_file(file, &catalog)?;
        for m in parsed.modules {
            let d = delta_weight(&catalog.geoms[&m.path], &m.a, &m.b, m.file_scale * scale)?;
            let d = match deltas.remove(&m.path) {
                Some(prev) => (prev + d)?,
                None => d,
            };
            deltas.insert(m.path, d);
        }
    }
    let mut merged_layers = Vec::new();
    let mut out = Vec::with_capacity(views.len());
    for (name, view) in views {
        let delta = name.strip_suffix(".weight").and_then(|p| deltas.get(p));
        match delta {
            Some(d) => {
                let w = st.load(&name, &Device::Cpu)?;
                let dt = w.dtype();
                let w = (w.to_dtype(DType::F32)? + d)?.to_dtype(dt)?;
                merged_layers.push(name.trim_end_matches(".weight").to_string());
                out.push((name, OutTensor::from_tensor(&w)?));
            }
            None => {
                let dtype = *dtypes.get(&name).ok_or_else(|| {
                    anyhow!("tensor `{name}` missing from the safetensors headers")
                })?;
                let t = OutTensor {
                    dtype,
                    shape: view.shape().to_vec(),
                    data: Cow::Borrowed(view.data()),
                };
                out.push((name, t));
            }
        }
    }
    merged_layers.sort();
    let tensors = out.len();
    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    serialize_atomic(
        &out_dir.join("diffusion_pytorch_model.safetensors"),
        out,
        meta,
    )?;
    crate::io::copy_atomic(&config, &out_dir.join("config.json"))?;
    Ok(MergeSummary {
        merged_layers,
        tensors,
    })
}
