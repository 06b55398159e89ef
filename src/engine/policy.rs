//! The [`Policy`]: the trainable weights of a run and the one way to reach its reference model.
//!
//! * **LoRA** ([`Policy::lora`]): adapters on the UNet; the reference is the same UNet with the adapters off.
//! * **Full fine-tuning** ([`Policy::full`]): the UNet's weights become f32 vars; the reference is a frozen
//!   copy of the base weights.
//! * **Snapshot reference** ([`Policy::set_reference_snapshot`]): the reference becomes the weights of an
//!   earlier checkpoint (a frozen LoRA file attached next to the trained adapters, or a full UNet state), as
//!   SePPO's random checkpoint replay needs.
//!
//! The reference is handed out through a scoped guard ([`Reference::scope`]): adapters are switched off (or
//! the snapshot on) when the scope starts and restored when it ends, also on an error. Sampling with the
//! trained or the base weights outside the autograd graph goes through [`Policy::with_weights`].

use crate::engine::config::TrainMode;
use crate::train::checkpoint::save_vars;
use crate::train::lora::{LoadMode, LoraConfig, LoraFormat, LoraSet};
use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use diffpref_pipelines::loading::StableDiffusion;
use diffpref_pipelines::models::unet::{AddedCond, UNet2DConditionModel};
use diffpref_pipelines::weights::{find_weight_files, Params};
use std::cell::{Ref, RefCell};
use std::path::{Path, PathBuf};

/// Which weights [`Policy::with_weights`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Weights {
    /// The base model (adapters off, or the frozen copy) — not a snapshot reference.
    Base,
    /// The weights being trained.
    Current,
    /// The reference (the base model, or the snapshot when one is set).
    Reference,
}

/// The reference of a full fine-tuning run, or a snapshot of earlier trained weights (one per policy: the
/// size of the frozen variant does not matter).
#[allow(clippy::large_enum_variant)]
enum RefWeights {
    /// The UNet with the trained adapters off (LoRA).
    AdaptersOff,
    /// A frozen UNet (full fine-tuning's base copy, or a full-weight snapshot).
    Frozen(UNet2DConditionModel),
    /// No reference (pretraining from scratch).
    None,
}

/// Trainable weights and their reference (see the module docs).
pub struct Policy {
    params: Vec<(String, Var)>,
    lora: Option<LoraSet>,
    /// The reference (a cell: a snapshot can replace a full run's frozen UNet during the run, through `&self`).
    reference: RefCell<RefWeights>,
    /// A LoRA snapshot used as the reference (attached frozen, enabled only inside a reference scope).
    snapshot: RefCell<Option<(PathBuf, LoraSet)>>,
    /// The base UNet of a full fine-tuning run (kept for [`Weights::Base`] when a snapshot replaces the
    /// reference), and the path of that full-weight snapshot.
    base_frozen: RefCell<Option<(PathBuf, UNet2DConditionModel)>>,
}

impl Policy {
    /// LoRA adapters on `unet` (`cfg.init_seed = 0` takes `seed`).
    pub fn lora(
        unet: &UNet2DConditionModel,
        cfg: &LoraConfig,
        seed: u64,
        device: &Device,
    ) -> Result<Policy> {
        let mut cfg = cfg.clone();
        if cfg.init_seed == 0 {
            cfg.init_seed = seed;
        }
        let set = LoraSet::attach(unet, &cfg, device).context("[lora]")?;
        Ok(Policy {
            params: set.vars(),
            lora: Some(set),
            reference: RefCell::new(RefWeights::AdaptersOff),
            snapshot: RefCell::new(None),
            base_frozen: RefCell::new(None),
        })
    }

    /// Full fine-tuning: the UNet of `model` (loaded from `model_dir`) is replaced by a trainable f32 copy; the
    /// loaded one becomes the frozen reference.
    pub fn full(
        model: &mut StableDiffusion,
        model_dir: &Path,
        variant: Option<&str>,
        device: &Device,
    ) -> Result<Policy> {
        ensure!(
            model.dtype() == DType::F32,
            "mode = \"full\" keeps f32 weights: set dtype = \"f32\" (got {:?})",
            model.dtype()
        );
        let unet_dir = model_dir.join("unet");
        let files = find_weight_files(&unet_dir, "diffusion_pytorch_model", variant)?;
        let p = Params::from_files(&files, DType::F32, device)?.trainable();
        let policy = UNet2DConditionModel::new(&p, model.unet.config().clone())?;
        let reference = std::mem::replace(&mut model.unet, policy);
        Ok(Policy {
            params: p.vars(),
            lora: None,
            reference: RefCell::new(RefWeights::Frozen(reference)),
            snapshot: RefCell::new(None),
            base_frozen: RefCell::new(None),
        })
    }

    /// LoRA or full fine-tuning, as `mode` says.
    pub fn for_mode(
        mode: TrainMode,
        model: &mut StableDiffusion,
        model_dir: &Path,
        variant: Option<&str>,
        lora: &LoraConfig,
        seed: u64,
    ) -> Result<Policy> {
        let device = model.device().clone();
        let p = match mode {
            TrainMode::Lora => Policy::lora(&model.unet, lora, seed, &device)?,
            TrainMode::Full => Policy::full(model, model_dir, variant, &device)?,
        };
        ensure!(!p.params.is_empty(), "nothing to train");
        Ok(p)
    }

    /// Trainable `params` (already in the model that uses them) with a separate frozen reference UNet.
    pub fn with_frozen_reference(
        params: Vec<(String, Var)>,
        reference: UNet2DConditionModel,
    ) -> Policy {
        Policy {
            params,
            lora: None,
            reference: RefCell::new(RefWeights::Frozen(reference)),
            snapshot: RefCell::new(None),
            base_frozen: RefCell::new(None),
        }
    }

    /// A frozen LoRA set (nothing trainable) whose reference is the base model: evaluating trained adapters
    /// against the model they were trained from.
    pub fn frozen_lora(set: LoraSet) -> Policy {
        Policy {
            params: set.vars(),
            lora: Some(set),
            reference: RefCell::new(RefWeights::AdaptersOff),
            snapshot: RefCell::new(None),
            base_frozen: RefCell::new(None),
        }
    }

    /// Trainable `params` without any reference (training from scratch).
    pub fn without_reference(params: Vec<(String, Var)>) -> Policy {
        Policy {
            params,
            lora: None,
            reference: RefCell::new(RefWeights::None),
            snapshot: RefCell::new(None),
            base_frozen: RefCell::new(None),
        }
    }

    /// The trainable vars, by name.
    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    /// The trained LoRA set (LoRA runs).
    pub fn lora_set(&self) -> Option<&LoraSet> {
        self.lora.as_ref()
    }

    /// The reference, if the policy has one.
    pub fn reference(&self) -> Option<Reference<'_>> {
        match *self.reference.borrow() {
            RefWeights::None => None,
            _ => Some(Reference { policy: self }),
        }
    }

    /// Makes the weights saved at `path` the reference from now on: a LoRA file (LoRA runs; attached frozen
    /// next to the trained adapters and enabled only inside reference scopes) or a file of full UNet weights
    /// written by [`save_vars`] (full runs). `None` returns to the base model. Setting the snapshot already in
    /// use does nothing. Not while a reference scope is open (an error, not a panic).
    pub fn set_reference_snapshot(
        &self,
        unet: &UNet2DConditionModel,
        path: Option<&Path>,
    ) -> Result<()> {
        if self.reference_snapshot().as_deref() == path {
            return Ok(());
        }
        let mut snapshot = self
            .snapshot
            .try_borrow_mut()
            .map_err(|_| anyhow::anyhow!("the reference cannot change inside a reference scope"))?;
        let mut reference = self
            .reference
            .try_borrow_mut()
            .map_err(|_| anyhow::anyhow!("the reference cannot change inside a reference scope"))?;
        if let Some((_, old)) = snapshot.take() {
            // Clearing an adapter slot removes every adapter of the layer: put the trained ones back.
            old.detach_from(unet);
            if let Some(l) = &self.lora {
                reattach(unet, l)?;
            }
        }
        if let Some((_, base)) = self.base_frozen.borrow_mut().take() {
            *reference = RefWeights::Frozen(base);
        }
        let Some(path) = path else { return Ok(()) };
        match (&self.lora, &mut *reference) {
            (Some(_), _) => {
                let set = LoraSet::load(unet, path, LoadMode::Frozen { scale: 1.0 })
                    .with_context(|| format!("reference snapshot {}", path.display()))?;
                set.set_enabled(false);
                *snapshot = Some((path.to_path_buf(), set));
            }
            (None, RefWeights::Frozen(base)) => {
                let map = candle_core::safetensors::load(path, unet.device())
                    .with_context(|| format!("reference snapshot {}", path.display()))?;
                let snap = UNet2DConditionModel::new(
                    &Params::from_map(map, DType::F32, unet.device()),
                    base.config().clone(),
                )
                .with_context(|| format!("reference snapshot {}", path.display()))?;
                let base = std::mem::replace(base, snap);
                *self.base_frozen.borrow_mut() = Some((path.to_path_buf(), base));
            }
            (None, _) => anyhow::bail!("this policy has no reference to replace"),
        }
        Ok(())
    }

    /// The snapshot currently used as the reference, if any.
    pub fn reference_snapshot(&self) -> Option<PathBuf> {
        if let Some((p, _)) = self.snapshot.borrow().as_ref() {
            return Some(p.clone());
        }
        self.base_frozen.borrow().as_ref().map(|(p, _)| p.clone())
    }

    /// Runs `f` on `which` weights outside the autograd graph (LoRA in evaluation mode: no dropout, no
    /// gradient tracking; full fine-tuning: a detached copy of the trained UNet, or the frozen one, swapped
    /// into `model`).
    pub fn with_weights<T>(
        &self,
        model: &mut StableDiffusion,
        which: Weights,
        f: impl FnOnce(&StableDiffusion) -> Result<T>,
    ) -> Result<T> {
        if let Some(l) = &self.lora {
            let training = l.is_training();
            l.set_training(false);
            let out = match which {
                Weights::Current => f(model),
                Weights::Base => {
                    l.set_enabled(false);
                    let out = f(model);
                    l.set_enabled(true);
                    out
                }
                Weights::Reference => {
                    let scope = Reference { policy: self }.scope(&model.unet);
                    let out = f(model);
                    drop(scope);
                    out
                }
            };
            l.set_training(training);
            return out;
        }
        let swap = match (which, &*self.reference.borrow()) {
            (Weights::Current, _) => {
                let map = self
                    .params
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
                    .collect();
                let device = model.device().clone();
                UNet2DConditionModel::new(
                    &Params::from_map(map, DType::F32, &device),
                    model.unet.config().clone(),
                )?
            }
            (Weights::Base, RefWeights::Frozen(r)) => self
                .base_frozen
                .borrow()
                .as_ref()
                .map(|(_, b)| b.clone())
                .unwrap_or_else(|| r.clone()),
            (Weights::Reference, RefWeights::Frozen(r)) => r.clone(),
            (_, _) => return f(model),
        };
        let policy = std::mem::replace(&mut model.unet, swap);
        let out = f(model);
        model.unet = policy;
        out
    }

    /// Writes the trained weights into `out`: `pytorch_lora_weights.safetensors` (LoRA, in `format`) or a
    /// diffusers `unet/` folder (full; the config copied from `model_dir`). Returns the file or folder.
    pub fn export(&self, out: &Path, format: LoraFormat, model_dir: &Path) -> Result<PathBuf> {
        match &self.lora {
            Some(l) => {
                let p = out.join("pytorch_lora_weights.safetensors");
                l.save(&p, format)?;
                Ok(p)
            }
            None => {
                let dir = out.join("unet");
                save_vars(
                    &dir.join("diffusion_pytorch_model.safetensors"),
                    &self.params,
                )?;
                crate::io::copy_atomic(
                    &model_dir.join("unet/config.json"),
                    &dir.join("config.json"),
                )?;
                Ok(dir)
            }
        }
    }
}

/// Puts a trained set's adapters back into their layers (after a slot was cleared).
fn reattach(unet: &UNet2DConditionModel, set: &LoraSet) -> Result<()> {
    use diffpref_pipelines::nn::Layer;
    for a in set.adapters() {
        let layer = unet
            .layers()
            .iter()
            .find(|l| l.path() == a.path())
            .with_context(|| format!("layer {} vanished", a.path()))?;
        match layer {
            Layer::Linear(l) => l.attach(a.clone()),
            Layer::Conv2d(c) => c.attach(a.clone()),
        }
    }
    Ok(())
}

/// A handle on a policy's reference model (see [`Policy::reference`]).
#[derive(Clone, Copy)]
pub struct Reference<'a> {
    policy: &'a Policy,
}

/// The reference model for the lifetime of the scope (see [`Reference::scope`]).
pub struct RefScope<'u> {
    unet: &'u UNet2DConditionModel,
    /// The frozen reference UNet of a full run (borrowed for the scope).
    frozen: Option<Ref<'u, UNet2DConditionModel>>,
    /// Adapters to switch back on, and the snapshot to switch off, when the scope ends.
    restore: Option<(&'u LoraSet, bool)>,
    snapshot: Option<std::cell::Ref<'u, Option<(PathBuf, LoraSet)>>>,
}

impl RefScope<'_> {
    /// The UNet that computes the reference inside this scope.
    pub fn unet(&self) -> &UNet2DConditionModel {
        self.frozen.as_deref().unwrap_or(self.unet)
    }
}

impl Drop for RefScope<'_> {
    fn drop(&mut self) {
        if let Some(s) = self
            .snapshot
            .as_ref()
            .and_then(|s| s.as_ref().map(|(_, l)| l))
        {
            s.set_enabled(false);
        }
        if let Some((l, enabled)) = self.restore {
            l.set_enabled(enabled);
        }
    }
}

impl<'a> Reference<'a> {
    /// Starts a reference scope on `policy_unet` (the UNet the trained weights live in): adapters off (and the
    /// snapshot on) for LoRA, the frozen UNet for full fine-tuning.
    pub fn scope(&self, policy_unet: &'a UNet2DConditionModel) -> RefScope<'a> {
        if let Some(l) = &self.policy.lora {
            let was = l.is_enabled();
            l.set_enabled(false);
            let snap = self.policy.snapshot.borrow();
            if let Some((_, s)) = snap.as_ref() {
                s.set_enabled(true);
            }
            return RefScope {
                unet: policy_unet,
                frozen: None,
                restore: Some((l, was)),
                snapshot: Some(snap),
            };
        }
        let frozen = Ref::filter_map(self.policy.reference.borrow(), |r| match r {
            RefWeights::Frozen(u) => Some(u),
            _ => None,
        })
        .ok();
        RefScope {
            unet: policy_unet,
            frozen,
            restore: None,
            snapshot: None,
        }
    }

    /// The reference's prediction for `x` at `t` (no graph: inputs and output detached).
    pub fn predict(
        &self,
        policy_unet: &'a UNet2DConditionModel,
        x: &Tensor,
        t: &Tensor,
        ehs: &Tensor,
        added: Option<&AddedCond>,
    ) -> Result<Tensor> {
        let scope = self.scope(policy_unet);
        let r = scope.unet().forward(&x.detach(), t, &ehs.detach(), added)?;
        Ok(r.detach())
    }
}
