//! Optimizer side of a training step: gradients collected by parameter name ([`Grads`]), accumulation over
//! micro-batches ([`GradAccumulator`]), global-norm clipping ([`clip_grad_norm`]), a non-finite check, and an
//! [`AdamW`] whose state can be saved and restored exactly.
//!
//! Trainable parameters are `&[(String, Var)]` (name → f32 master weight). A step composes as:
//!
//! ```ignore
//! let mut acc = GradAccumulator::new();
//! for micro in micro_batches {
//!     let loss = model_loss(micro)?;
//!     acc.add_store(params, loss.backward()?)?; // frozen-weight grads are dropped here
//! }
//! let mut grads = acc.into_grads()?;            // mean over micro-batches
//! grads.check_finite()?;                        // or skip the step, see `first_non_finite`
//! let norm = clip_grad_norm(&mut grads, 1.0)?;
//! opt.set_lr(schedule.lr_at(step, base_lr));
//! opt.step(params, &grads)?;
//! ```
//!
//! [`AdamW`] follows `torch.optim.AdamW` (decoupled weight decay, bias correction, `amsgrad=False`,
//! `maximize=False`): per parameter, with its own step count `t`,
//!
//! ```text
//! θ ← θ·(1 − lr·wd)
//! m ← m + (g − m)·(1 − β1)             (torch: exp_avg.lerp_(g, 1 − β1))
//! v ← v·β2 + (1 − β2)·g²
//! θ ← θ − lr/(1 − β1ᵗ) · m / (√v / √(1 − β2ᵗ) + ε)
//! ```
//!
//! Moments are f32 tensors on the parameter's device. [`AdamW::save_state`] writes them to safetensors
//! (`m.<name>`, `v.<name>`; step counts in the metadata), and [`AdamW::load_state`] restores them, so a resumed
//! run continues bit for bit like an uninterrupted one.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

/// Format tag written into the metadata of optimizer state files.
const ADAMW_FORMAT: &str = "diffpref.adamw.v1";

// ---------------------------------------------------------------------------
// Gradients by name
// ---------------------------------------------------------------------------

/// Gradients of the trainable parameters, by parameter name (f32, sorted by name so that reductions such as
/// the global norm are summed in a fixed order).
#[derive(Clone, Debug, Default)]
pub struct Grads {
    map: BTreeMap<String, Tensor>,
}

impl Grads {
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes the gradients of `params` out of `store` and drops the store, so the (often weight-sized)
    /// gradients of frozen tensors are freed at once. Parameters without a gradient are absent.
    pub fn from_store(params: &[(String, Var)], mut store: GradStore) -> Result<Self> {
        let mut map = BTreeMap::new();
        for (name, var) in params {
            if let Some(g) = store.remove(var.as_tensor()) {
                map.insert(name.clone(), checked_grad(name, var, g)?);
            }
        }
        drop(store);
        Ok(Grads { map })
    }

    /// Like [`Grads::from_store`] but leaves `store` untouched (the tensors are shared, not copied).
    pub fn from_store_ref(params: &[(String, Var)], store: &GradStore) -> Result<Self> {
        let mut map = BTreeMap::new();
        for (name, var) in params {
            if let Some(g) = store.get(var.as_tensor()) {
                map.insert(name.clone(), checked_grad(name, var, g.clone())?);
            }
        }
        Ok(Grads { map })
    }

    /// Sets the gradient of `name` (converted to f32), returning the previous one.
    pub fn insert(&mut self, name: impl Into<String>, grad: &Tensor) -> Result<Option<Tensor>> {
        let g = grad.detach().to_dtype(DType::F32)?;
        Ok(self.map.insert(name.into(), g))
    }

    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.map.get(name)
    }

    pub fn remove(&mut self, name: &str) -> Option<Tensor> {
        self.map.remove(name)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Parameter names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.map.keys().map(String::as_str)
    }

    /// `(name, grad)` pairs, sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.map.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Adds `other` into `self` name by name (a name present in only one of them keeps that gradient).
    pub fn add(&mut self, other: Grads) -> Result<()> {
        for (name, g) in other.map {
            match self.map.remove(&name) {
                Some(prev) => {
                    ensure!(
                        prev.dims() == g.dims(),
                        "accumulating gradients of `{name}`: shape {:?} vs {:?}",
                        prev.dims(),
                        g.dims()
                    );
                    self.map.insert(name, (prev + g)?);
                }
                None => {
                    self.map.insert(name, g);
                }
            }
        }
        Ok(())
    }

    /// Multiplies every gradient by `factor`.
    pub fn scale(&mut self, factor: f64) -> Result<()> {
        if factor == 1.0 {
            return Ok(());
        }
        for g in self.map.values_mut() {
            *g = g.affine(factor, 0.0)?;
        }
        Ok(())
    }

    /// Global L2 norm over all gradients: `sqrt(Σ_params Σ g²)` (each parameter's sum of squares is reduced in
    /// f32 on its device, the total in f64). NaN or infinite when a gradient is.
    pub fn global_norm(&self) -> Result<f64> {
        let sums = self.per_param(|g| Ok(g.sqr()?.sum_all()?))?;
        Ok(sums.iter().map(|&s| s as f64).sum::<f64>().sqrt())
    }

    /// The first parameter (by name) whose gradient holds a NaN or an infinity, if any.
    pub fn first_non_finite(&self) -> Result<Option<String>> {
        // x − x is 0 for finite x and NaN for NaN/±inf, so the sum is finite iff every entry is.
        let sums = self.per_param(|g| Ok(g.sub(g)?.sum_all()?))?;
        Ok(self
            .map
            .keys()
            .zip(sums)
            .find(|(_, s)| !s.is_finite())
            .map(|(name, _)| name.clone()))
    }

    /// One f32 scalar per gradient (in name order), read back with a single device-to-host copy.
    fn per_param(&self, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Vec<f32>> {
        let Some(first) = self.map.values().next() else {
            return Ok(Vec::new());
        };
        let dev = first.device().clone();
        let scalars = self
            .map
            .values()
            .map(|g| Ok(f(g)?.to_device(&dev)?))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::stack(&scalars, 0)?.to_vec1::<f32>()?)
    }

    /// Errors naming the first parameter with a non-finite gradient.
    pub fn check_finite(&self) -> Result<()> {
        match self.first_non_finite()? {
            Some(name) => bail!("non-finite gradient (NaN or inf) for parameter `{name}`"),
            None => Ok(()),
        }
    }
}

fn checked_grad(name: &str, var: &Var, g: Tensor) -> Result<Tensor> {
    ensure!(
        g.dims() == var.dims(),
        "gradient of `{name}` has shape {:?}, the parameter {:?}",
        g.dims(),
        var.dims()
    );
    Ok(g.detach().to_dtype(DType::F32)?)
}

/// Clips gradients in place by their global L2 norm, as `torch.nn.utils.clip_grad_norm_`: with
/// `norm = global_norm(grads)` and `coef = max_norm / (norm + 1e-6)`, every gradient is multiplied by `coef` when
/// `coef < 1` (i.e. when `norm` exceeds `max_norm`, up to the 1e-6). Returns `norm`, the norm **before** clipping.
///
/// A non-finite norm leaves the gradients unchanged (torch would scale them by NaN); check the returned value or
/// [`Grads::first_non_finite`] and skip the step.
pub fn clip_grad_norm(grads: &mut Grads, max_norm: f64) -> Result<f64> {
    ensure!(
        max_norm > 0.0,
        "clip_grad_norm: max_norm must be > 0, got {max_norm}"
    );
    let norm = grads.global_norm()?;
    if norm.is_finite() {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            grads.scale(coef)?;
        }
    }
    Ok(norm)
}

/// Sums the gradients of several micro-batches by parameter name; [`GradAccumulator::into_grads`] returns their
/// mean (sum / number of micro-batches added), ready for clipping and [`AdamW::step`].
#[derive(Clone, Debug, Default)]
pub struct GradAccumulator {
    sum: Grads,
    micro_batches: usize,
}

impl GradAccumulator {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one micro-batch's gradients.
    pub fn add(&mut self, grads: Grads) -> Result<()> {
        self.sum.add(grads)?;
        self.micro_batches += 1;
        Ok(())
    }

    /// Adds one micro-batch's gradients straight from `loss.backward()`, dropping every gradient that is not a
    /// parameter's (see [`Grads::from_store`]).
    pub fn add_store(&mut self, params: &[(String, Var)], store: GradStore) -> Result<()> {
        self.add(Grads::from_store(params, store)?)
    }

    /// Number of micro-batches added so far.
    pub fn micro_batches(&self) -> usize {
        self.micro_batches
    }

    /// The mean gradient over the micro-batches added. Errors when none was added.
    pub fn into_grads(self) -> Result<Grads> {
        ensure!(
            self.micro_batches > 0,
            "GradAccumulator::into_grads: no micro-batch was added"
        );
        let mut g = self.sum;
        g.scale(1.0 / self.micro_batches as f64)?;
        Ok(g)
    }

    /// Like [`GradAccumulator::into_grads`] but leaves the accumulator empty for the next step.
    pub fn take(&mut self) -> Result<Grads> {
        std::mem::take(self).into_grads()
    }
}

// ---------------------------------------------------------------------------
// AdamW
// ---------------------------------------------------------------------------

/// AdamW hyper-parameters; defaults are torch's (`lr` 1e-3, betas (0.9, 0.999), eps 1e-8, weight decay 1e-2).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
        }
    }
}

#[derive(Clone, Debug)]
struct ParamState {
    m: Tensor,
    v: Tensor,
    step: u64,
}

/// `torch.optim.AdamW` with f32 state that can be saved and restored (see the module docs).
#[derive(Clone, Debug)]
pub struct AdamW {
    pub config: AdamWConfig,
    state: BTreeMap<String, ParamState>,
    steps: u64,
}

impl AdamW {
    pub fn new(config: AdamWConfig) -> Self {
        AdamW {
            config,
            state: BTreeMap::new(),
            steps: 0,
        }
    }

    /// Torch defaults with the given learning rate.
    pub fn with_lr(lr: f64) -> Self {
        Self::new(AdamWConfig {
            lr,
            ..AdamWConfig::default()
        })
    }

    pub fn lr(&self) -> f64 {
        self.config.lr
    }

    pub fn set_lr(&mut self, lr: f64) {
        self.config.lr = lr;
    }

    /// Number of [`AdamW::step`] calls so far (including restored ones).
    pub fn step_count(&self) -> u64 {
        self.steps
    }

    /// Step count of one parameter (0 when it never had a gradient).
    pub fn param_step(&self, name: &str) -> u64 {
        self.state.get(name).map_or(0, |s| s.step)
    }

    /// Updates every parameter that has a gradient in `grads`; the others (and their state) are left as they are.
    /// A gradient for a name that is not among `params` is an error.
    pub fn step(&mut self, params: &[(String, Var)], grads: &Grads) -> Result<()> {
        for name in grads.names() {
            ensure!(
                params.iter().any(|(n, _)| n == name),
                "AdamW::step: gradient for `{name}`, which is not a trainable parameter"
            );
        }
        let AdamWConfig {
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.config;
        for (name, var) in params {
            let Some(g) = grads.get(name) else { continue };
            ensure!(
                g.dims() == var.dims(),
                "AdamW::step: gradient of `{name}` has shape {:?}, the parameter {:?}",
                g.dims(),
                var.dims()
            );
            ensure!(
                var.dtype() == DType::F32,
                "AdamW::step: parameter `{name}` is {:?}; master weights must be f32",
                var.dtype()
            );
            let dev = var.device();
            let g = g.to_device(dev)?.to_dtype(DType::F32)?;
            let st = match self.state.remove(name) {
                Some(s) => s,
                None => ParamState {
                    m: Tensor::zeros(var.shape(), DType::F32, dev)?,
                    v: Tensor::zeros(var.shape(), DType::F32, dev)?,
                    step: 0,
                },
            };
            let t = st.step + 1;
            let mut p = var.as_tensor().detach();
            if weight_decay != 0.0 {
                p = p.affine(1.0 - lr * weight_decay, 0.0)?;
            }
            let m = (&st.m + (&g - &st.m)?.affine(1.0 - beta1, 0.0)?)?;
            let v = (st.v.affine(beta2, 0.0)? + g.sqr()?.affine(1.0 - beta2, 0.0)?)?;
            let bc1 = 1.0 - beta1.powi(t as i32);
            let bc2 = 1.0 - beta2.powi(t as i32);
            let step_size = lr / bc1;
            let denom = v.sqrt()?.affine(1.0 / bc2.sqrt(), eps)?;
            let p = (p - (&m / &denom)?.affine(step_size, 0.0)?)?;
            var.set(&p)
                .with_context(|| format!("AdamW::step: updating `{name}`"))?;
            self.state
                .insert(name.clone(), ParamState { m, v, step: t });
        }
        self.steps += 1;
        Ok(())
    }

    /// [`AdamW::step`] with the gradients read from a `GradStore` (left untouched).
    pub fn step_store(&mut self, params: &[(String, Var)], store: &GradStore) -> Result<()> {
        let grads = Grads::from_store_ref(params, store)?;
        self.step(params, &grads)
    }

    /// Writes the state to a safetensors file: `m.<name>` and `v.<name>` (f32) for every parameter with state;
    /// metadata `format`, `step` (number of steps), `param_steps` (JSON name → step count) and the
    /// hyper-parameters (informational). Written to a temporary file and renamed into place.
    pub fn save_state(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let mut tensors = Vec::with_capacity(2 * self.state.len());
        let mut param_steps = serde_json::Map::new();
        for (name, st) in &self.state {
            tensors.push((format!("m.{name}"), st.m.clone()));
            tensors.push((format!("v.{name}"), st.v.clone()));
            param_steps.insert(name.clone(), st.step.into());
        }
        let c = &self.config;
        let meta: HashMap<String, String> = [
            ("format", ADAMW_FORMAT.to_string()),
            ("step", self.steps.to_string()),
            (
                "param_steps",
                serde_json::Value::Object(param_steps).to_string(),
            ),
            ("lr", c.lr.to_string()),
            ("beta1", c.beta1.to_string()),
            ("beta2", c.beta2.to_string()),
            ("eps", c.eps.to_string()),
            ("weight_decay", c.weight_decay.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        save_f32_safetensors(path, &tensors, meta)
    }

    /// Restores the state written by [`AdamW::save_state`] for `params`, replacing the current state. The
    /// hyper-parameters (including `lr`) are kept from `self.config`. Errors name the file and the missing,
    /// mis-shaped or unexpected entry.
    pub fn load_state(&mut self, path: impl AsRef<Path>, params: &[(String, Var)]) -> Result<()> {
        let path = path.as_ref();
        let (mut tensors, meta) = load_f32_safetensors(path)?;
        let get_meta = |key: &str| {
            meta.get(key).with_context(|| {
                format!(
                    "optimizer state {}: metadata key `{key}` is missing",
                    path.display()
                )
            })
        };
        let format = get_meta("format")?;
        ensure!(
            format == ADAMW_FORMAT,
            "optimizer state {}: metadata `format` is `{format}`, expected `{ADAMW_FORMAT}`",
            path.display()
        );
        let steps: u64 = get_meta("step")?.parse().with_context(|| {
            format!(
                "optimizer state {}: metadata `step` is not an integer",
                path.display()
            )
        })?;
        let param_steps: BTreeMap<String, u64> = serde_json::from_str(get_meta("param_steps")?)
            .with_context(|| {
                format!(
                    "optimizer state {}: metadata `param_steps` is not a JSON object of step counts",
                    path.display()
                )
            })?;
        let mut state = BTreeMap::new();
        for (name, step) in param_steps {
            let Some((_, var)) = params.iter().find(|(n, _)| *n == name) else {
                bail!(
                    "optimizer state {}: has state for `{name}`, which is not a trainable parameter",
                    path.display()
                );
            };
            let mut take = |key: String| -> Result<Tensor> {
                let t = tensors.remove(&key).with_context(|| {
                    format!(
                        "optimizer state {}: tensor `{key}` is missing",
                        path.display()
                    )
                })?;
                ensure!(
                    t.dims() == var.dims(),
                    "optimizer state {}: tensor `{key}` has shape {:?}, the parameter {:?}",
                    path.display(),
                    t.dims(),
                    var.dims()
                );
                Ok(t.to_device(var.device())?)
            };
            let m = take(format!("m.{name}"))?;
            let v = take(format!("v.{name}"))?;
            state.insert(name, ParamState { m, v, step });
        }
        if let Some(extra) = tensors.keys().next() {
            bail!(
                "optimizer state {}: unexpected tensor `{extra}` (not listed in `param_steps`)",
                path.display()
            );
        }
        self.state = state;
        self.steps = steps;
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// f32 safetensors with metadata (shared with the EMA)
// ---------------------------------------------------------------------------

/// Writes `tensors` as f32 safetensors with `metadata`, atomically (temporary file + rename).
pub(crate) fn save_f32_safetensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: HashMap<String, String>,
) -> Result<()> {
    let mut bufs = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let data: Vec<f32> = t
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()
            .with_context(|| format!("reading tensor `{name}` for {}", path.display()))?;
        let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        bufs.push((name.as_str(), t.dims().to_vec(), bytes));
    }
    let views = bufs
        .iter()
        .map(|(name, shape, bytes)| {
            let view = safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                shape.clone(),
                bytes,
            )?;
            Ok((*name, view))
        })
        .collect::<std::result::Result<Vec<_>, safetensors::SafeTensorError>>()?;
    let bytes = safetensors::serialize(views, Some(metadata))
        .with_context(|| format!("serialising {}", path.display()))?;
    crate::io::write_atomic(path, &bytes)
}

/// Reads an f32 safetensors file into CPU tensors plus its metadata. Errors name the file (and the key of a
/// tensor that is not f32).
pub(crate) fn load_f32_safetensors(
    path: &Path,
) -> Result<(BTreeMap<String, Tensor>, HashMap<String, String>)> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{} is not a valid safetensors file", path.display()))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .with_context(|| format!("{} is not a valid safetensors file", path.display()))?;
    let meta = header.metadata().clone().unwrap_or_default();
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        ensure!(
            view.dtype() == safetensors::Dtype::F32,
            "{}: tensor `{name}` is {:?}, expected F32",
            path.display(),
            view.dtype()
        );
        let data: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let t = Tensor::from_vec(data, view.shape(), &Device::Cpu)?;
        out.insert(name, t);
    }
    Ok((out, meta))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn param(name: &str, v: &[f32]) -> (String, Var) {
        let t = Tensor::new(v, &Device::Cpu).unwrap();
        (name.to_string(), Var::from_tensor(&t).unwrap())
    }

    fn values(v: &Var) -> Vec<f32> {
        v.as_tensor().to_vec1::<f32>().unwrap()
    }

    /// loss = Σ c·p² + d·p, so grad = 2·c·p + d.
    fn loss_grads(params: &[(String, Var)]) -> Grads {
        let p = params[0].1.as_tensor();
        let c = Tensor::new(&[0.5f32, 1.5], &Device::Cpu).unwrap();
        let d = Tensor::new(&[0.3f32, -0.1], &Device::Cpu).unwrap();
        let loss = ((p.sqr().unwrap() * c).unwrap() + (p * d).unwrap())
            .unwrap()
            .sum_all()
            .unwrap();
        Grads::from_store(params, loss.backward().unwrap()).unwrap()
    }

    #[test]
    fn adamw_matches_torch_trajectory() {
        // Expected values: the torch.optim.AdamW update rule evaluated in float64 with numpy
        // (lr 0.1, betas (0.9, 0.999), eps 1e-8, weight_decay 0.01, p0 = [1, -2]).
        let expected = [
            [0.8990000007692307, -1.8980000001639343],
            [0.7983931054656839, -1.7962691563149362],
            [0.6984118792420367, -1.6949314049204567],
        ];
        let params = vec![param("w", &[1.0, -2.0])];
        let mut opt = AdamW::new(AdamWConfig {
            lr: 0.1,
            ..AdamWConfig::default()
        });
        for exp in expected {
            let g = loss_grads(&params);
            opt.step(&params, &g).unwrap();
            let got = values(&params[0].1);
            for (a, b) in got.iter().zip(exp) {
                assert!((*a as f64 - b).abs() < 2e-6, "{got:?} vs {exp:?}");
            }
        }
        assert_eq!(opt.step_count(), 3);
        assert_eq!(opt.param_step("w"), 3);
    }

    #[test]
    fn params_without_grad_are_skipped() {
        let params = vec![param("a", &[1.0, 2.0]), param("b", &[3.0])];
        let mut g = Grads::new();
        g.insert("a", &Tensor::new(&[1f32, 1.0], &Device::Cpu).unwrap())
            .unwrap();
        let mut opt = AdamW::with_lr(0.01);
        opt.step(&params, &g).unwrap();
        assert_eq!(values(&params[1].1), vec![3.0]);
        assert_ne!(values(&params[0].1), vec![1.0, 2.0]);
        assert_eq!(opt.param_step("b"), 0);
        let mut bad = Grads::new();
        bad.insert("zzz", &Tensor::new(&[1f32], &Device::Cpu).unwrap())
            .unwrap();
        let err = opt.step(&params, &bad).unwrap_err().to_string();
        assert!(err.contains("zzz"), "{err}");
    }

    #[test]
    fn save_load_state_resumes_bit_identically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("optimizer.safetensors");
        let run = |n: usize, params: &[(String, Var)], opt: &mut AdamW| {
            for _ in 0..n {
                let g = loss_grads(params);
                opt.step(params, &g).unwrap();
            }
        };
        let full = vec![param("w", &[1.0, -2.0])];
        let mut opt = AdamW::with_lr(0.05);
        run(6, &full, &mut opt);

        let part = vec![param("w", &[1.0, -2.0])];
        let mut opt1 = AdamW::with_lr(0.05);
        run(3, &part, &mut opt1);
        opt1.save_state(&path).unwrap();
        let saved_w = values(&part[0].1);
        drop(opt1);
        let resumed = vec![param("w", &saved_w)];
        let mut opt2 = AdamW::with_lr(0.05);
        opt2.load_state(&path, &resumed).unwrap();
        assert_eq!(opt2.step_count(), 3);
        run(3, &resumed, &mut opt2);
        let a: Vec<u32> = values(&full[0].1).iter().map(|x| x.to_bits()).collect();
        let b: Vec<u32> = values(&resumed[0].1).iter().map(|x| x.to_bits()).collect();
        assert_eq!(a, b);
    }

    #[test]
    fn load_state_errors_name_the_entry() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("opt.safetensors");
        let params = vec![param("w", &[1.0, -2.0])];
        let mut opt = AdamW::with_lr(0.05);
        opt.step(&params, &loss_grads(&params)).unwrap();
        opt.save_state(&path).unwrap();

        let other = vec![param("x", &[1.0, -2.0])];
        let err = format!(
            "{:#}",
            AdamW::with_lr(0.1).load_state(&path, &other).unwrap_err()
        );
        assert!(
            err.contains("`w`") && err.contains("opt.safetensors"),
            "{err}"
        );

        let wrong = vec![param("w", &[1.0, -2.0, 3.0])];
        let err = format!(
            "{:#}",
            AdamW::with_lr(0.1).load_state(&path, &wrong).unwrap_err()
        );
        assert!(err.contains("m.w") && err.contains("shape"), "{err}");

        // A file without the `v.w` entry.
        let (t, meta) = load_f32_safetensors(&path).unwrap();
        let only_m = vec![("m.w".to_string(), t["m.w"].clone())];
        save_f32_safetensors(&path, &only_m, meta).unwrap();
        let err = format!(
            "{:#}",
            AdamW::with_lr(0.1).load_state(&path, &params).unwrap_err()
        );
        assert!(err.contains("v.w") && err.contains("missing"), "{err}");

        let missing = dir.path().join("nope.safetensors");
        let err = format!(
            "{:#}",
            AdamW::with_lr(0.1)
                .load_state(&missing, &params)
                .unwrap_err()
        );
        assert!(err.contains("nope.safetensors"), "{err}");
    }

    #[test]
    fn clipping_follows_torch() {
        let mk = |a: &[f32], b: &[f32]| {
            let mut g = Grads::new();
            g.insert("a", &Tensor::new(a, &Device::Cpu).unwrap())
                .unwrap();
            g.insert("b", &Tensor::new(b, &Device::Cpu).unwrap())
                .unwrap();
            g
        };
        // Norm 13 (3,4 | 12) > 1: scaled by 1/(13 + 1e-6).
        let mut g = mk(&[3.0, 4.0], &[12.0]);
        let norm = clip_grad_norm(&mut g, 1.0).unwrap();
        assert!((norm - 13.0).abs() < 1e-6);
        let coef = 1.0 / (13.0 + 1e-6);
        let a = g.get("a").unwrap().to_vec1::<f32>().unwrap();
        assert!((a[0] as f64 - 3.0 * coef).abs() < 1e-7 && (a[1] as f64 - 4.0 * coef).abs() < 1e-7);
        assert!((g.global_norm().unwrap() - 1.0).abs() < 1e-6);
        // Below the threshold: untouched, norm still returned.
        let mut g = mk(&[3.0, 4.0], &[12.0]);
        let norm = clip_grad_norm(&mut g, 20.0).unwrap();
        assert!((norm - 13.0).abs() < 1e-6);
        assert_eq!(g.get("b").unwrap().to_vec1::<f32>().unwrap(), vec![12.0]);
        // Non-finite: reported, left alone, and detected by name.
        let mut g = mk(&[3.0, f32::NAN], &[1.0]);
        assert!(clip_grad_norm(&mut g, 1.0).unwrap().is_nan());
        assert_eq!(g.first_non_finite().unwrap().as_deref(), Some("a"));
        let g = mk(&[3.0, 1.0], &[f32::NEG_INFINITY]);
        let err = g.check_finite().unwrap_err().to_string();
        assert!(err.contains("`b`"), "{err}");
        assert!(mk(&[1.0, 2.0], &[3.0]).check_finite().is_ok());
        assert!(clip_grad_norm(&mut mk(&[1.0, 2.0], &[3.0]), 0.0).is_err());
    }

    #[test]
    fn accumulation_averages_and_drops_frozen_grads() {
        let params = vec![param("w", &[1.0, -2.0])];
        let frozen = Tensor::new(&[2f32, 3.0], &Device::Cpu).unwrap();
        let frozen = Var::from_tensor(&frozen).unwrap(); // a tracked tensor that is not a parameter
        let mut acc = GradAccumulator::new();
        for k in [1f64, 3.0] {
            let loss = (params[0].1.as_tensor() * frozen.as_tensor())
                .unwrap()
                .sum_all()
                .unwrap()
                .affine(k, 0.0)
                .unwrap();
            acc.add_store(&params, loss.backward().unwrap()).unwrap();
        }
        assert_eq!(acc.micro_batches(), 2);
        let g = acc.take().unwrap();
        assert_eq!(g.names().collect::<Vec<_>>(), vec!["w"]);
        // mean of 1·[2,3] and 3·[2,3]
        assert_eq!(
            g.get("w").unwrap().to_vec1::<f32>().unwrap(),
            vec![4.0, 6.0]
        );
        assert_eq!(acc.micro_batches(), 0);
        assert!(acc.into_grads().is_err());
    }
}
