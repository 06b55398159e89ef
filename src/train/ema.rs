//! Exponential moving average of the trained weights, as diffusers' `EMAModel`.
//!
//! Each [`Ema::update`] increments `optimization_step` and moves the shadow weights towards the parameters:
//! `shadow ← shadow − (1 − d)·(shadow − θ)` with
//!
//! ```text
//! s = max(0, optimization_step − update_after_step − 1)
//! d = 0                                         if s == 0   (the shadow becomes a copy of θ)
//! d = (1 + s) / (10 + s)                        warmup = "ramp"   (diffusers' default)
//! d = 1 − (1 + s / inv_gamma)^(−power)          warmup = "power"  (diffusers' use_ema_warmup=True)
//! d = decay                                     warmup = "none"
//! d ← max(min(d, decay), min_decay)
//! ```
//!
//! Shadow weights are f32 on the parameters' device. [`Ema::save`] writes them under the parameter names (so
//! the file is loadable like the weights themselves) with the step in the metadata.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::optim::{load_f32_safetensors, save_f32_safetensors};

const EMA_FORMAT: &str = "diffpref.ema.v1";

/// How the decay ramps up at the start (see the module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EmaWarmup {
    /// Constant `decay` (after the first update, which copies).
    None,
    /// `(1 + s) / (10 + s)`, diffusers' default.
    #[default]
    Ramp,
    /// `1 − (1 + s / inv_gamma)^(−power)`, diffusers' `use_ema_warmup=True`.
    Power,
}

/// EMA settings; defaults are diffusers' `EMAModel` defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EmaConfig {
    pub decay: f64,
    pub min_decay: f64,
    pub update_after_step: u64,
    pub warmup: EmaWarmup,
    pub inv_gamma: f64,
    pub power: f64,
}

impl Default for EmaConfig {
    fn default() -> Self {
        EmaConfig {
            decay: 0.9999,
            min_decay: 0.0,
            update_after_step: 0,
            warmup: EmaWarmup::Ramp,
            inv_gamma: 1.0,
            power: 2.0 / 3.0,
        }
    }
}

impl EmaConfig {
    /// The decay used by the update that makes `optimization_step` (1 for the first update).
    pub fn decay_at(&self, optimization_step: u64) -> f64 {
        let s = optimization_step.saturating_sub(self.update_after_step + 1);
        if s == 0 {
            return 0.0;
        }
        let s = s as f64;
        let d = match self.warmup {
            EmaWarmup::None => self.decay,
            EmaWarmup::Ramp => (1.0 + s) / (10.0 + s),
            EmaWarmup::Power => 1.0 - (1.0 + s / self.inv_gamma).powf(-self.power),
        };
        d.min(self.decay).max(self.min_decay)
    }
}

/// Shadow (EMA) copies of a set of named parameters.
#[derive(Clone, Debug)]
pub struct Ema {
    pub config: EmaConfig,
    shadow: BTreeMap<String, Tensor>,
    optimization_step: u64,
    stored: Option<BTreeMap<String, Tensor>>,
}

fn snapshot(var: &Var) -> Result<Tensor> {
    Ok(var.as_tensor().detach().to_dtype(DType::F32)?.copy()?)
}

impl Ema {
    /// Starts the shadow weights as copies of `params`.
    pub fn new(params: &[(String, Var)], config: EmaConfig) -> Result<Self> {
        let mut shadow = BTreeMap::new();
        for (name, var) in params {
            ensure!(
                shadow.insert(name.clone(), snapshot(var)?).is_none(),
                "EMA: parameter `{name}` is listed twice"
            );
        }
        Ok(Ema {
            config,
            shadow,
            optimization_step: 0,
            stored: None,
        })
    }

    pub fn optimization_step(&self) -> u64 {
        self.optimization_step
    }

    /// Shadow weight of one parameter.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.shadow.get(name)
    }

    fn lookup<'a>(&'a self, name: &str) -> Result<&'a Tensor> {
        self.shadow
            .get(name)
            .with_context(|| format!("EMA has no shadow weight for parameter `{name}`"))
    }

    /// One EMA update from the current `params` (call after each optimizer step). Returns the decay used.
    /// Every parameter must have a shadow weight.
    pub fn update(&mut self, params: &[(String, Var)]) -> Result<f64> {
        let step = self.optimization_step + 1;
        let d = self.config.decay_at(step);
        let mut new = Vec::with_capacity(params.len());
        for (name, var) in params {
            let s = self.lookup(name)?;
            ensure!(
                s.dims() == var.dims(),
                "EMA: parameter `{name}` has shape {:?}, its shadow {:?}",
                var.dims(),
                s.dims()
            );
            let p = var.as_tensor().detach().to_dtype(DType::F32)?;
            let updated = if d == 0.0 {
                p.copy()?
            } else {
                (s - (s - p)?.affine(1.0 - d, 0.0)?)?
            };
            new.push((name.clone(), updated));
        }
        for (name, t) in new {
            self.shadow.insert(name, t);
        }
        self.optimization_step = step;
        Ok(d)
    }

    /// Writes the shadow weights into `params` (e.g. for validation or export).
    pub fn copy_to(&self, params: &[(String, Var)]) -> Result<()> {
        for (name, var) in params {
            let s = self.lookup(name)?;
            var.set(&s.to_dtype(var.dtype())?.to_device(var.device())?)
                .with_context(|| format!("EMA: copying the shadow of `{name}`"))?;
        }
        Ok(())
    }

    /// Keeps a copy of the current `params`, to bring back with [`Ema::restore`] (typically around
    /// [`Ema::copy_to`] for validation).
    pub fn store(&mut self, params: &[(String, Var)]) -> Result<()> {
        let mut m = BTreeMap::new();
        for (name, var) in params {
            m.insert(name.clone(), var.as_tensor().detach().copy()?);
        }
        self.stored = Some(m);
        Ok(())
    }

    /// Puts back the weights kept by [`Ema::store`] and forgets them. Errors if nothing was stored.
    pub fn restore(&mut self, params: &[(String, Var)]) -> Result<()> {
        let Some(stored) = self.stored.take() else {
            bail!("EMA::restore called without a previous store");
        };
        for (name, var) in params {
            let t = stored
                .get(name)
                .with_context(|| format!("EMA::restore: `{name}` was not stored"))?;
            var.set(t)
                .with_context(|| format!("EMA::restore: setting `{name}`"))?;
        }
        Ok(())
    }

    /// Writes the shadow weights (keys = parameter names, f32) with metadata `format` and `optimization_step`.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let tensors: Vec<(String, Tensor)> = self
            .shadow
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let meta: HashMap<String, String> = [
            ("format".to_string(), EMA_FORMAT.to_string()),
            (
                "optimization_step".to_string(),
                self.optimization_step.to_string(),
            ),
            ("decay".to_string(), self.config.decay.to_string()),
        ]
        .into();
        save_f32_safetensors(path.as_ref(), &tensors, meta)
    }

    /// Replaces the shadow weights and step with those saved by [`Ema::save`]; every parameter in `params` must be
    /// in the file with its shape. Errors name the file and key.
    pub fn load(&mut self, path: impl AsRef<Path>, params: &[(String, Var)]) -> Result<()> {
        let path = path.as_ref();
        let (mut tensors, meta) = load_f32_safetensors(path)?;
        let step = meta
            .get("optimization_step")
            .with_context(|| {
                format!(
                    "EMA state {}: metadata key `optimization_step` is missing",
                    path.display()
                )
            })?
            .parse::<u64>()
            .with_context(|| {
                format!(
                    "EMA state {}: metadata `optimization_step` is not an integer",
                    path.display()
                )
            })?;
        let mut shadow = BTreeMap::new();
        for (name, var) in params {
            let t = tensors.remove(name).with_context(|| {
                format!("EMA state {}: tensor `{name}` is missing", path.display())
            })?;
            ensure!(
                t.dims() == var.dims(),
                "EMA state {}: tensor `{name}` has shape {:?}, the parameter {:?}",
                path.display(),
                t.dims(),
                var.dims()
            );
            shadow.insert(name.clone(), t.to_device(var.device())?);
        }
        if let Some(extra) = tensors.keys().next() {
            bail!(
                "EMA state {}: tensor `{extra}` is not a trainable parameter",
                path.display()
            );
        }
        self.shadow = shadow;
        self.optimization_step = step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn param(name: &str, v: &[f32]) -> (String, Var) {
        let t = Tensor::new(v, &Device::Cpu).unwrap();
        (name.to_string(), Var::from_tensor(&t).unwrap())
    }

    fn vals(t: &Tensor) -> Vec<f32> {
        t.to_vec1::<f32>().unwrap()
    }

    #[test]
    fn decay_schedule_matches_diffusers() {
        let c = EmaConfig {
            decay: 0.99,
            ..Default::default()
        };
        assert_eq!(c.decay_at(1), 0.0);
        assert_eq!(c.decay_at(2), 2.0 / 11.0);
        assert_eq!(c.decay_at(11), 11.0 / 20.0);
        assert_eq!(c.decay_at(100_000), 0.99);
        let late = EmaConfig {
            update_after_step: 5,
            ..c.clone()
        };
        assert_eq!(late.decay_at(6), 0.0);
        assert_eq!(late.decay_at(7), 2.0 / 11.0);
        let p = EmaConfig {
            warmup: EmaWarmup::Power,
            decay: 0.9999,
            ..Default::default()
        };
        assert!((p.decay_at(3) - (1.0 - 3f64.powf(-2.0 / 3.0))).abs() < 1e-15);
        let none = EmaConfig {
            warmup: EmaWarmup::None,
            decay: 0.9,
            min_decay: 0.0,
            ..Default::default()
        };
        assert_eq!(none.decay_at(2), 0.9);
        let floor = EmaConfig {
            min_decay: 0.5,
            ..c
        };
        assert_eq!(floor.decay_at(2), 0.5);
    }

    #[test]
    fn update_math_store_restore() {
        let params = vec![param("w", &[0.0, 10.0])];
        let mut ema = Ema::new(
            &params,
            EmaConfig {
                decay: 0.5,
                warmup: EmaWarmup::None,
                ..Default::default()
            },
        )
        .unwrap();
        // First update copies.
        params[0]
            .1
            .set(&Tensor::new(&[2f32, 4.0], &Device::Cpu).unwrap())
            .unwrap();
        assert_eq!(ema.update(&params).unwrap(), 0.0);
        assert_eq!(vals(ema.get("w").unwrap()), vec![2.0, 4.0]);
        // Then shadow ← 0.5·shadow + 0.5·θ.
        params[0]
            .1
            .set(&Tensor::new(&[4f32, 0.0], &Device::Cpu).unwrap())
            .unwrap();
        assert_eq!(ema.update(&params).unwrap(), 0.5);
        assert_eq!(vals(ema.get("w").unwrap()), vec![3.0, 2.0]);
        assert_eq!(ema.optimization_step(), 2);

        ema.store(&params).unwrap();
        ema.copy_to(&params).unwrap();
        assert_eq!(vals(params[0].1.as_tensor()), vec![3.0, 2.0]);
        ema.restore(&params).unwrap();
        assert_eq!(vals(params[0].1.as_tensor()), vec![4.0, 0.0]);
        assert!(ema.restore(&params).is_err());
        let other = vec![param("x", &[1.0])];
        assert!(ema.update(&other).unwrap_err().to_string().contains("`x`"));
    }

    #[test]
    fn save_and_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ema.safetensors");
        let params = vec![param("a.lora_down", &[1.0, 2.0]), param("b", &[3.0])];
        let mut ema = Ema::new(&params, EmaConfig::default()).unwrap();
        ema.update(&params).unwrap();
        params[1]
            .1
            .set(&Tensor::new(&[5f32], &Device::Cpu).unwrap())
            .unwrap();
        ema.update(&params).unwrap();
        ema.save(&path).unwrap();
        let mut back = Ema::new(&params, EmaConfig::default()).unwrap();
        back.load(&path, &params).unwrap();
        assert_eq!(back.optimization_step(), 2);
        for name in ["a.lora_down", "b"] {
            assert_eq!(vals(back.get(name).unwrap()), vals(ema.get(name).unwrap()));
        }
        let more = vec![param("a.lora_down", &[1.0, 2.0]), param("c", &[3.0])];
        let err = format!("{:#}", back.load(&path, &more).unwrap_err());
        assert!(
            err.contains("`c`") && err.contains("ema.safetensors"),
            "{err}"
        );
    }
}
