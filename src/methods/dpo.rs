//! Diffusion-DPO and its loss family (Wallace et al., "Diffusion Model Alignment Using Direct Preference
//! Optimization", CVPR 2024; SalesforceAIResearch/DiffusionDPO).
//!
//! Per pair `(c, x₀ʷ, x₀ˡ)` one timestep `t ~ U{lo..hi−1}` (every timestep by default; `timestep_range`
//! narrows the band) and one noise `ε` are shared by winner and loser:
//!
//! ```text
//! x_tᵏ = √ᾱ_t x₀ᵏ + √(1−ᾱ_t) ε                       k ∈ {w, l}
//! m_θᵏ = mean_{C,H,W} (f_θ(x_tᵏ, t, c) − yᵏ)²          y = ε (ε-prediction) or v = √ᾱ_t ε − √(1−ᾱ_t) x₀ (v)
//! m_refᵏ likewise with the frozen reference (the base model with adapters off, or a frozen copy)
//! dᵏ = m_θᵏ − m_refᵏ,   h = −(dʷ − dˡ) = (m_refʷ − m_refˡ) − (m_θʷ − m_θˡ)
//! z = (β/2) · ω(t) · h                                 β = 5000 by default (the official repo's convention)
//! L = mean over pairs of −log σ(z)
//! ```
//!
//! **β convention.** diffpref's `beta` follows the original code (`−0.5·β` inside the sigmoid; β = 5000 for
//! SD1.5). diffusers' SD1.5 research script writes `−log σ(β_hf·h)` with β_hf = β/2 (its 2500 is our 5000);
//! set `beta_convention = "diffusers"` to give β in that convention instead. All MSEs, margins and losses are
//! computed in f32 whatever the model dtype (margins are ~1e-4 in MSE units).
//!
//! The family, with `z` as above, `p` the probability that the chosen image is preferred (1 for hard labels;
//! 0.5 for ties) and `ε` the label-noise rate:
//! - `sigmoid` (DPO): `−p log σ(z) − (1−p) log σ(−z)` (p = 1: plain DPO; p = 1 − ε: cDPO / label smoothing);
//! - `hinge` (SLiC): `max(0, 1 − z)`;
//! - `ipo`: `(h·ω − 1/β)²` (IPO with τ = β/2; the target margin is in MSE units);
//! - `robust` (Chowdhury et al.): `[(1−ε)(−log σ(z)) − ε(−log σ(−z))] / (1 − 2ε)`;
//! - `simpo` (reference-free): `−log σ(−(β/2)·ω·(m_θʷ − m_θˡ) − γ)`;
//! - `mapo` (reference-free, Hong et al.): `m_θʷ − β_M log σ(T (s(m_θʷ) − s(m_θˡ)))`, `s(m) = γm/(e^{γm} − 1)`,
//!   T = 1000 (β_M = `mapo_beta` 0.1, γ = `mapo_gamma` 0.5);
//! - `kto` (Diffusion-KTO, on the pair's images as one desirable and one undesirable sample):
//!   `gᵏ = m_refᵏ − m_θᵏ`, `z₀ = max(0, mean g)` (detached), `L = ½[(1 − σ(β(gʷ − z₀))) + (1 − σ(−β(gˡ − z₀)))]`
//!   (no ½ inside, as the KTO code; β default 1000 there);
//! - `sft`: `m_θʷ` (supervised fine-tuning on winners).
//!
//! **SFT anchor** (`sft_weight` = λ, default 0), added to every pairwise loss above but `sft`:
//! `L + λ·mean(m_θʷ)` (CPO's form, Xu et al. 2024; RPO's negative log-likelihood term on the chosen sample, Pang
//! et al. 2024 — the diffusion ELBO makes `m_θʷ` the chosen image's NLL up to constants). It counters the drift
//! where DPO lets both errors rise. Scale: at z = 0 the sigmoid loss pulls on `m_θʷ` with weight k/2
//! (k = β/2 or β), so λ must be of that order (thousands at β = 5000) to compete with it.
//!
//! **Unconditional anchor** (`uncond_anchor` = γ, default 0): `L + γ·mean‖f_θ(x_tʷ, t, ∅) − f_ref(x_tʷ, t, ∅)‖²`
//! (mean over C, H, W; ∅ the empty prompt's embedding, zeros where the model forces them) on the winners'
//! noisy latents of the batch. DPO trains the conditional prediction only, but sampling uses classifier-free
//! guidance, `f_u + w·(f_c − f_u)`: whatever the adapters do to the unconditional branch `f_u` enters with
//! weight `1 − w` (−6.5 at w = 7.5) and adds noise to every guided sample. Holding `f_u` at the reference's
//! makes the guided change `w·δf_c`, the trained one. Same scale as λ above (thousands at β = 5000).
//!
//! Timestep weighting ω(t) (off by default, as in every reference implementation): `min_snr` gives
//! `min(SNR(t), γ)/SNR(t)` for ε-prediction and `min(SNR(t), γ)/(SNR(t)+1)` for v-prediction.

use crate::engine::policy::{Policy, Reference};
use anyhow::{bail, Result};
use candle_core::{DType, Tensor, D};
use diffpref_pipelines::loading::PromptEmbeds;
use diffpref_pipelines::models::unet::{AddedCond, UNet2DConditionModel};
use diffpref_pipelines::schedulers::NoiseSchedule;
use serde::{Deserialize, Serialize};

/// Which member of the loss family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LossKind {
    #[default]
    Sigmoid,
    Hinge,
    Ipo,
    Robust,
    Simpo,
    Mapo,
    Kto,
    Sft,
}

impl LossKind {
    /// Whether the loss needs reference-model predictions.
    pub fn needs_reference(&self) -> bool {
        !matches!(self, LossKind::Simpo | LossKind::Mapo | LossKind::Sft)
    }
}

/// How `beta` is to be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum BetaConvention {
    /// SalesforceAIResearch/DiffusionDPO: `z = (β/2)·h` (β 5000 for SD1.5).
    #[default]
    Official,
    /// diffusers' SD1.5 research script: `z = β·h` (its 2500 = official 5000).
    Diffusers,
}

/// Timestep weighting ω(t).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum TimestepWeighting {
    #[default]
    None,
    /// Min-SNR-γ (Hang et al.): `min(SNR, γ)/SNR` (ε) or `min(SNR, γ)/(SNR+1)` (v).
    MinSnr { gamma: f64 },
}

/// Loss settings (the `[loss]` table of a training config).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DpoLossConfig {
    /// Loss family member: sigmoid | hinge | ipo | robust | simpo | mapo | kto | sft. Default: sigmoid.
    pub kind: LossKind,
    /// β (default 5000, official convention; see `beta_convention`).
    pub beta: f64,
    /// official (z = β/2·h, default) | diffusers (z = β·h).
    pub beta_convention: BetaConvention,
    /// Label smoothing / noise rate ε for cDPO (`sigmoid`) and `robust` (default 0).
    pub label_smoothing: f64,
    /// SimPO margin γ (default 0).
    pub simpo_gamma: f64,
    /// Weight λ of the SFT anchor `λ·mean(m_θʷ)` added to every pairwise loss but `sft` (default 0; see the
    /// module docs).
    pub sft_weight: f64,
    /// Weight γ of the unconditional anchor `γ·mean‖f_θ(x_tʷ, t, ∅) − f_ref(x_tʷ, t, ∅)‖²` (default 0; see the
    /// module docs). Needs a loss with a reference.
    pub uncond_anchor: f64,
    /// MaPO β_M (default 0.1).
    pub mapo_beta: f64,
    /// MaPO γ of the bounded link s(m) (default 0.5).
    pub mapo_gamma: f64,
    /// Timestep weighting ω(t) (default none).
    pub timestep_weighting: TimestepWeighting,
    /// Training timesteps are drawn uniformly from `[lo, hi)` (kohya's `min_timestep`/`max_timestep`);
    /// default: every timestep of the scheduler. A high band concentrates training on composition, where
    /// colours, shapes and layout are decided: on the shapes world the DPO gradient's signal-to-noise ratio per
    /// pair is ~1e-2 for t in [700, 850) and below detection under t = 550, where the per-draw variance is
    /// 10–100× larger, so the embedded default trains on `[700, 1000]`.
    pub timestep_range: Option<[u64; 2]>,
}

impl Default for DpoLossConfig {
    fn default() -> Self {
        DpoLossConfig {
            kind: LossKind::Sigmoid,
            beta: 5000.0,
            beta_convention: BetaConvention::Official,
            label_smoothing: 0.0,
            simpo_gamma: 0.0,
            sft_weight: 0.0,
            uncond_anchor: 0.0,
            mapo_beta: 0.1,
            mapo_gamma: 0.5,
            timestep_weighting: TimestepWeighting::None,
            timestep_range: None,
        }
    }
}

impl DpoLossConfig {
    /// The factor k in `z = k·h` (β/2 in the official convention, β in diffusers').
    pub fn z_scale(&self) -> f64 {
        match self.beta_convention {
            BetaConvention::Official => self.beta / 2.0,
            BetaConvention::Diffusers => self.beta,
        }
    }

    /// The `[lo, hi)` band training timesteps are drawn from, checked against the scheduler's
    /// `num_train_timesteps`.
    pub fn timestep_band(&self, num_train_timesteps: u64) -> Result<(u64, u64)> {
        match self.timestep_range {
            None => Ok((0, num_train_timesteps)),
            Some([lo, hi]) => {
                if lo >= hi || hi > num_train_timesteps {
                    bail!(
                        "loss.timestep_range = [{lo}, {hi}] must satisfy lo < hi <= {num_train_timesteps} \
                         (the scheduler's num_train_timesteps)"
                    );
                }
                Ok((lo, hi))
            }
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.beta.is_nan() || self.beta <= 0.0 {
            bail!("loss.beta must be positive (got {})", self.beta);
        }
        if !(0.0..0.5).contains(&self.label_smoothing) {
            bail!(
                "loss.label_smoothing must be in [0, 0.5) (got {})",
                self.label_smoothing
            );
        }
        if !self.sft_weight.is_finite() || self.sft_weight < 0.0 {
            bail!(
                "loss.sft_weight must be a finite number >= 0 (got {})",
                self.sft_weight
            );
        }
        if !self.uncond_anchor.is_finite() || self.uncond_anchor < 0.0 {
            bail!(
                "loss.uncond_anchor must be a finite number >= 0 (got {})",
                self.uncond_anchor
            );
        }
        if self.uncond_anchor > 0.0 && !self.kind.needs_reference() {
            bail!(
                "loss.uncond_anchor = {} needs a reference model, and loss `{:?}` has none",
                self.uncond_anchor,
                self.kind
            );
        }
        Ok(())
    }
}

/// Per-pair denoising errors (each `[P]`, f32).
#[derive(Clone, Debug)]
pub struct PairErrors {
    pub model_w: Tensor,
    pub model_l: Tensor,
    /// `None` for reference-free losses.
    pub ref_w: Option<Tensor>,
    pub ref_l: Option<Tensor>,
    /// ω(t) per pair (ones without weighting).
    pub weight: Tensor,
    /// `mean_{C,H,W} (f_θ(x_tʷ, t, ∅) − f_ref(x_tʷ, t, ∅))²` per pair `[P]`, when the batch has unconditional
    /// embeddings (for `uncond_anchor`).
    pub uncond_drift: Option<Tensor>,
}

/// Scalar statistics of one batch (all f64, means over pairs).
#[derive(Clone, Debug, Default, Serialize)]
pub struct DpoStats {
    pub loss: f64,
    /// Fraction of pairs with z > 0 (ties count ½).
    pub implicit_acc: f64,
    /// `−k·dʷ` and `−k·dˡ` (trl's rewards/chosen, rewards/rejected).
    pub reward_chosen: f64,
    pub reward_rejected: f64,
    /// Mean z.
    pub margin: f64,
    pub model_mse_w: f64,
    pub model_mse_l: f64,
    pub ref_mse_w: f64,
    pub ref_mse_l: f64,
    /// Mean unconditional drift (0 without unconditional embeddings).
    pub uncond_drift: f64,
    pub pairs: usize,
}

fn mean(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.mean_all()?.to_scalar::<f64>()?)
}

pub(crate) fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    // log σ(x) = −softplus(−x) = min(x, 0) − log(1 + e^{−|x|}), stable for large |x|.
    let neg_abs = x.abs()?.neg()?;
    let soft = (neg_abs.exp()? + 1.0)?.log()?;
    Ok((x.minimum(0f32)? - soft)?)
}

/// The loss (scalar f32 tensor, differentiable through the policy errors) and its statistics.
///
/// `labels` are per-pair probabilities that the chosen image is preferred (`None` = all 1).
pub fn pair_loss(
    cfg: &DpoLossConfig,
    e: &PairErrors,
    labels: Option<&Tensor>,
) -> Result<(Tensor, DpoStats)> {
    let f = |t: &Tensor| t.to_dtype(DType::F32);
    let (mw, ml, w) = (f(&e.model_w)?, f(&e.model_l)?, f(&e.weight)?);
    let p = mw.dim(0)?;
    let k = cfg.z_scale();
    // Reference-free losses (SimPO, MaPO, SFT) ignore reference errors even when given.
    let refs = match (&e.ref_w, &e.ref_l) {
        (Some(a), Some(b)) if cfg.kind.needs_reference() => Some((f(a)?.detach(), f(b)?.detach())),
        _ => None,
    };
    let need_ref = || -> Result<&(Tensor, Tensor)> {
        refs.as_ref()
            .ok_or_else(|| anyhow::anyhow!("loss `{:?}` needs reference predictions", cfg.kind))
    };
    // h = (m_ref^w − m_ref^l) − (m_θ^w − m_θ^l), weighted; reference-free losses use the policy gap alone.
    let h = match &refs {
        Some((rw, rl)) => ((rw - rl)? - (&mw - &ml)?)?,
        None => (&ml - &mw)?,
    };
    let h = (h * &w)?;
    let z = (&h * k)?;
    let eps = cfg.label_smoothing;
    let loss = match cfg.kind {
        LossKind::Sigmoid => {
            need_ref()?;
            let pr = match labels {
                Some(l) => ((f(l)? * (1.0 - 2.0 * eps))? + eps)?,
                None => Tensor::full((1.0 - eps) as f32, p, mw.device())?,
            };
            let a = (log_sigmoid(&z)? * &pr)?;
            let b = (log_sigmoid(&z.neg()?)? * (pr.neg()? + 1.0)?)?;
            (a + b)?.neg()?.mean_all()?
        }
        LossKind::Hinge => {
            need_ref()?;
            (z.neg()? + 1.0)?.relu()?.mean_all()?
        }
        LossKind::Ipo => {
            need_ref()?;
            (h - 1.0 / cfg.beta)?.sqr()?.mean_all()?
        }
        LossKind::Robust => {
            need_ref()?;
            let a = (log_sigmoid(&z)?.neg()? * (1.0 - eps))?;
            let b = (log_sigmoid(&z.neg()?)?.neg()? * eps)?;
            ((a - b)? / (1.0 - 2.0 * eps))?.mean_all()?
        }
        LossKind::Simpo => log_sigmoid(&(&z - cfg.simpo_gamma)?)?.neg()?.mean_all()?,
        LossKind::Mapo => {
            let g = cfg.mapo_gamma;
            let s = |m: &Tensor| -> Result<Tensor> {
                // s(m) = γm / (e^{γm} − 1), with s(0) = 1.
                let gm = (m * g)?.maximum(1e-12f32)?;
                Ok((&gm / (gm.exp()? - 1.0)?)?)
            };
            let or = log_sigmoid(&((s(&mw)? - s(&ml)?)? * 1000.0)?)?;
            (&mw - (or * cfg.mapo_beta)?)?.mean_all()?
        }
        LossKind::Kto => {
            let (rw, rl) = need_ref()?;
            let gw = (rw - &mw)?;
            let gl = (rl - &ml)?;
            let z0 = Tensor::cat(&[&gw, &gl], 0)?
                .mean_all()?
                .detach()
                .maximum(0f32)?;
            let beta = cfg.beta;
            let dw = candle_nn::ops::sigmoid(&(gw.broadcast_sub(&z0)? * beta)?)?;
            let dl = candle_nn::ops::sigmoid(&(gl.broadcast_sub(&z0)? * -beta)?)?;
            (((dw.neg()? + 1.0)? + (dl.neg()? + 1.0)?)? * 0.5)?.mean_all()?
        }
        LossKind::Sft => mw.mean_all()?,
    };
    let loss = if cfg.sft_weight != 0.0 && cfg.kind != LossKind::Sft {
        (loss + (mw.mean_all()? * cfg.sft_weight)?)?
    } else {
        loss
    };
    let drift = e.uncond_drift.as_ref().map(f).transpose()?;
    let loss = match &drift {
        Some(d) if cfg.uncond_anchor != 0.0 => (loss + (d.mean_all()? * cfg.uncond_anchor)?)?,
        _ => loss,
    };
    let zs: Vec<f32> = z.to_vec1()?;
    let acc = zs
        .iter()
        .map(|&v| {
            if v > 0.0 {
                1.0
            } else if v == 0.0 {
                0.5
            } else {
                0.0
            }
        })
        .sum::<f64>()
        / p as f64;
    let mut stats = DpoStats {
        loss: mean(&loss)?,
        implicit_acc: acc,
        margin: mean(&z)?,
        model_mse_w: mean(&mw)?,
        model_mse_l: mean(&ml)?,
        uncond_drift: drift.as_ref().map(mean).transpose()?.unwrap_or(0.0),
        pairs: p,
        ..Default::default()
    };
    if let Some((rw, rl)) = &refs {
        stats.ref_mse_w = mean(rw)?;
        stats.ref_mse_l = mean(rl)?;
        stats.reward_chosen = -k * (stats.model_mse_w - stats.ref_mse_w);
        stats.reward_rejected = -k * (stats.model_mse_l - stats.ref_mse_l);
    }
    Ok((loss, stats))
}

/// Per-sample mean squared error over all but the batch dimension, in f32: `[N]`.
pub fn per_sample_mse(pred: &Tensor, target: &Tensor) -> Result<Tensor> {
    let d = (pred.to_dtype(DType::F32)? - target.to_dtype(DType::F32)?)?;
    let n = d.dim(0)?;
    Ok(d.sqr()?.reshape((n, ()))?.mean(D::Minus1)?)
}

/// One pair batch, ready for the UNet: winners and losers share noise, timestep and conditioning.
pub struct PairBatch<'a> {
    /// Scaled VAE latents of the winners / losers, `[P, C, h, w]`.
    pub latents_w: &'a Tensor,
    pub latents_l: &'a Tensor,
    /// Noise per pair `[P, C, h, w]`.
    pub noise: &'a Tensor,
    /// Integer timesteps per pair `[P]`.
    pub timesteps: &'a Tensor,
    /// Text conditioning per pair `[P, T, D]`.
    pub encoder_hidden_states: &'a Tensor,
    /// SDXL micro-conditioning per pair.
    pub added: Option<&'a AddedCond>,
    /// The empty prompt's embeddings (`[1, T, D]`, SDXL's pooled `[1, P]`), shared by every pair, for the
    /// unconditional anchor (with the pairs' own micro-conditioning, as the guided sampler gives both branches);
    /// `None` skips its forward passes.
    pub uncond: Option<&'a PromptEmbeds>,
}

/// The policy's prediction (with graph) and, with a reference, the reference's (detached) for `noisy` at `t`
/// (one batched forward each).
fn predictions(
    policy: &UNet2DConditionModel,
    reference: Option<&Reference>,
    noisy: &Tensor,
    t: &Tensor,
    ehs: &Tensor,
    added: Option<&AddedCond>,
) -> Result<(Tensor, Option<Tensor>)> {
    let pred = policy.forward(noisy, t, ehs, added)?;
    let ref_pred = reference
        .map(|r| r.predict(policy, noisy, t, ehs, added))
        .transpose()?;
    Ok((pred, ref_pred))
}

/// Runs the policy (with graph) and the reference (without) on `x0` noised with `noise` at `t` (one batched
/// forward each) and returns the per-sample errors `[N]` of the policy and (unless reference-free) the reference.
#[allow(clippy::too_many_arguments)]
pub fn single_errors(
    policy: &UNet2DConditionModel,
    reference: Option<&Reference>,
    schedule: &NoiseSchedule,
    x0: &Tensor,
    noise: &Tensor,
    t: &Tensor,
    ehs: &Tensor,
    added: Option<&AddedCond>,
) -> Result<(Tensor, Option<Tensor>)> {
    let x0 = x0.to_dtype(DType::F32)?;
    let noise = noise.to_dtype(DType::F32)?;
    let noisy = schedule.add_noise(&x0, &noise, t)?;
    let target = schedule.target(&x0, &noise, t)?;
    let (pred, ref_pred) = predictions(policy, reference, &noisy, t, ehs, added)?;
    let m = per_sample_mse(&pred, &target)?;
    let ref_m = ref_pred.map(|r| per_sample_mse(&r, &target)).transpose()?;
    Ok((m, ref_m))
}

/// Runs the policy (with graph) and the reference (without) on `[winners; losers]` (one batched forward each,
/// size 2P; 3P with the winners again under the unconditional embedding when the batch has one) and returns the
/// per-pair errors.
pub fn pair_errors(
    policy: &UNet2DConditionModel,
    reference: Option<&Reference>,
    schedule: &NoiseSchedule,
    weighting: TimestepWeighting,
    b: &PairBatch,
) -> Result<PairErrors> {
    let p = b.latents_w.dim(0)?;
    let f32 = |t: &Tensor| t.to_dtype(DType::F32);
    let (lw, ll) = (f32(b.latents_w)?, f32(b.latents_l)?);
    // Rows: winners and losers under the prompt, then (for the anchor) the winners under the empty prompt.
    let mut x0 = vec![&lw, &ll];
    let mut ehs = vec![b.encoder_hidden_states.clone(); 2];
    let mut pooled = b.added.map(|a| vec![a.text_embeds.clone(); 2]);
    if let Some(u) = b.uncond {
        x0.push(&lw);
        ehs.push(u.hidden_states.repeat((p, 1, 1))?);
        if let Some(v) = pooled.as_mut() {
            let up = u.pooled.as_ref().ok_or_else(|| {
                anyhow::anyhow!("the empty prompt has no pooled embedding (SDXL)")
            })?;
            v.push(up.repeat((p, 1))?);
        }
    }
    let rows = x0.len();
    let x0 = Tensor::cat(&x0, 0)?;
    let noise = Tensor::cat(&vec![f32(b.noise)?; rows], 0)?;
    let t = Tensor::cat(&vec![b.timesteps; rows], 0)?;
    let ehs = Tensor::cat(&ehs, 0)?;
    let added = match (b.added, pooled) {
        (Some(a), Some(v)) => Some(AddedCond {
            text_embeds: Tensor::cat(&v, 0)?,
            time_ids: Tensor::cat(&vec![&a.time_ids; rows], 0)?,
        }),
        _ => None,
    };
    let noisy = schedule.add_noise(&x0, &noise, &t)?;
    let target = schedule.target(&x0, &noise, &t)?;
    let (pred, ref_pred) = predictions(policy, reference, &noisy, &t, &ehs, added.as_ref())?;
    let m = per_sample_mse(&pred.narrow(0, 0, 2 * p)?, &target.narrow(0, 0, 2 * p)?)?;
    let ref_m = ref_pred
        .as_ref()
        .map(|r| per_sample_mse(&r.narrow(0, 0, 2 * p)?, &target.narrow(0, 0, 2 * p)?))
        .transpose()?;
    let uncond_drift = match (b.uncond, &ref_pred) {
        (Some(_), Some(r)) => Some(per_sample_mse(
            &pred.narrow(0, 2 * p, p)?,
            &r.narrow(0, 2 * p, p)?,
        )?),
        (Some(_), None) => bail!("the unconditional anchor needs a reference model"),
        (None, _) => None,
    };
    let weight = timestep_weight(schedule, weighting, b.timesteps)?;
    Ok(PairErrors {
        model_w: m.narrow(0, 0, p)?,
        model_l: m.narrow(0, p, p)?,
        ref_w: ref_m.as_ref().map(|r| r.narrow(0, 0, p)).transpose()?,
        ref_l: ref_m.as_ref().map(|r| r.narrow(0, p, p)).transpose()?,
        weight,
        uncond_drift,
    })
}

/// Diffusion-KTO on unpaired samples (each image with its own noise and timestep): `g = m_ref − m_θ`,
/// `z₀ = max(0, mean g)` (detached), `L = mean of 1 − σ(s_y β (g − z₀))` with `s_y = +1` for desirable and `−1`
/// for undesirable images (λ_y = 1). Statistics: `implicit_acc` is the fraction with `s_y (g − z₀) > 0`,
/// `margin` the mean `s_y β (g − z₀)`, `*_w` means over desirable and `*_l` over undesirable images.
pub fn kto_unpaired_loss(
    cfg: &DpoLossConfig,
    model: &Tensor,
    reference: &Tensor,
    desirable: &[bool],
) -> Result<(Tensor, DpoStats)> {
    let n = model.dim(0)?;
    if desirable.len() != n || n == 0 {
        bail!(
            "kto_unpaired_loss: {} errors but {} labels",
            n,
            desirable.len()
        );
    }
    let m = model.to_dtype(DType::F32)?;
    let r = reference.to_dtype(DType::F32)?.detach();
    let g = (&r - &m)?;
    let z0 = g.mean_all()?.detach().maximum(0f32)?;
    let s: Vec<f32> = desirable
        .iter()
        .map(|&d| if d { 1.0 } else { -1.0 })
        .collect();
    let s = Tensor::from_vec(s, n, m.device())?;
    let z = ((g.broadcast_sub(&z0)? * &s)? * cfg.beta)?;
    let loss = (candle_nn::ops::sigmoid(&z)?.neg()? + 1.0)?.mean_all()?;
    let zs: Vec<f32> = z.to_vec1()?;
    let (mv, rv): (Vec<f32>, Vec<f32>) = (m.to_vec1()?, r.to_vec1()?);
    let mean_where = |v: &[f32], want: bool| {
        let sel: Vec<f64> = v
            .iter()
            .zip(desirable)
            .filter(|(_, &d)| d == want)
            .map(|(&x, _)| x as f64)
            .collect();
        if sel.is_empty() {
            0.0
        } else {
            sel.iter().sum::<f64>() / sel.len() as f64
        }
    };
    let stats = DpoStats {
        loss: mean(&loss)?,
        implicit_acc: zs.iter().filter(|&&v| v > 0.0).count() as f64 / n as f64,
        margin: mean(&z)?,
        model_mse_w: mean_where(&mv, true),
        model_mse_l: mean_where(&mv, false),
        ref_mse_w: mean_where(&rv, true),
        ref_mse_l: mean_where(&rv, false),
        pairs: n,
        ..Default::default()
    };
    Ok((loss, stats))
}

/// ω(t) per pair, `[P]` f32.
pub fn timestep_weight(
    schedule: &NoiseSchedule,
    w: TimestepWeighting,
    t: &Tensor,
) -> Result<Tensor> {
    let p = t.dim(0)?;
    match w {
        TimestepWeighting::None => Ok(Tensor::ones(p, DType::F32, t.device())?),
        TimestepWeighting::MinSnr { gamma } => {
            let snr = schedule.snr(t)?.to_dtype(DType::F32)?;
            let clipped = snr.minimum(gamma as f32)?;
            let denom = match schedule.prediction_type() {
                diffpref_pipelines::schedulers::PredictionType::VPrediction => (&snr + 1.0)?,
                _ => snr,
            };
            Ok((clipped / denom)?)
        }
    }
}

/// The `dpo_loss` golden check (`diffpref verify`): policy = the model folder's UNet, reference = the golden's
/// `ref_unet` file (next to the golden); loss, implicit accuracy, per-sample MSEs and the listed policy
/// gradients in both β conventions.
pub fn check_golden(
    g: &diffpref_pipelines::golden::Golden,
    ctx: &diffpref_pipelines::checks::CheckContext,
) -> Result<Vec<diffpref_pipelines::golden::Comparison>> {
    use diffpref_pipelines::models::unet::UNet2DConditionConfig;
    use diffpref_pipelines::schedulers::SchedulerConfig;
    use diffpref_pipelines::weights::{find_weight_files, Params};
    let model_dir = ctx.model_dir.as_ref().ok_or_else(|| {
        anyhow::anyhow!("{}: the dpo_loss check needs --model DIR", g.path.display())
    })?;
    let unet_dir = model_dir.join("unet");
    let cfg = UNet2DConditionConfig::load(&unet_dir.join("config.json"))?;
    let ref_file = g
        .path
        .parent()
        .unwrap_or(std::path::Path::new("."))
        .join(g.meta("ref_unet")?);
    let reference = UNet2DConditionModel::new(
        &Params::from_files(&[ref_file], ctx.dtype, &ctx.device)?,
        cfg.clone(),
    )?;
    let sched = match g.metadata.get("scheduler_config") {
        Some(s) => SchedulerConfig::from_json_str(s, &g.path.display().to_string())?,
        None => SchedulerConfig::from_file(model_dir.join("scheduler/scheduler_config.json"))?,
    };
    let schedule = NoiseSchedule::new(&sched)?;
    let beta = g
        .get("beta_dpo")?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?;
    let dev = &ctx.device;
    let (lw, ll, noise, t, ehs) = (
        g.get_on("latents_w", dev)?,
        g.get_on("latents_l", dev)?,
        g.get_on("noise", dev)?,
        g.get_on("timesteps", dev)?,
        g.get_on("encoder_hidden_states", dev)?,
    );
    let batch = PairBatch {
        latents_w: &lw,
        latents_l: &ll,
        noise: &noise,
        timesteps: &t,
        encoder_hidden_states: &ehs,
        added: None,
        uncond: None,
    };
    let scale = ctx.tolerance_scale;
    let mut out = Vec::new();
    for (convention, suffix) in [
        (BetaConvention::Diffusers, ""),
        (BetaConvention::Official, "_salesforce"),
    ] {
        let params = Params::from_files(
            &find_weight_files(&unet_dir, "diffusion_pytorch_model", None)?,
            ctx.dtype,
            dev,
        )?
        .trainable();
        let unet = UNet2DConditionModel::new(&params, cfg.clone())?;
        let policy = Policy::with_frozen_reference(Vec::new(), reference.clone());
        let errors = pair_errors(
            &unet,
            policy.reference().as_ref(),
            &schedule,
            TimestepWeighting::None,
            &batch,
        )?;
        let lcfg = DpoLossConfig {
            beta,
            beta_convention: convention,
            ..Default::default()
        };
        let (loss, stats) = pair_loss(&lcfg, &errors, None)?;
        if suffix.is_empty() {
            let r = |e: &Option<Tensor>| e.clone().expect("reference errors");
            out.push(g.compare("model_losses_w", &errors.model_w, scale)?);
            out.push(g.compare("model_losses_l", &errors.model_l, scale)?);
            out.push(g.compare("ref_losses_w", &r(&errors.ref_w), scale)?);
            out.push(g.compare("ref_losses_l", &r(&errors.ref_l), scale)?);
            let logits =
                ((r(&errors.ref_w) - r(&errors.ref_l))? - (&errors.model_w - &errors.model_l)?)?;
            out.push(g.compare("logits", &logits, scale)?);
            out.push(g.compare("loss", &loss, scale)?);
            let acc = g.compare(
                "implicit_acc",
                &Tensor::new(stats.implicit_acc as f32, dev)?,
                scale,
            )?;
            // A fraction of 0/1 decisions: one logit near zero flips it by 1/n in half precision, which no
            // scaled tolerance can judge. Judged in f32 only; reported otherwise.
            out.push(if ctx.dtype == DType::F32 {
                acc
            } else {
                diffpref_pipelines::golden::Comparison {
                    passed: true,
                    ratio: 0.0,
                    note: format!(
                        "not judged in {:?}: a 0/1 statistic, compared in f32 (error here {:.3})",
                        ctx.dtype, acc.max_abs_err
                    ),
                    ..acc
                }
            });
            let raw = ((errors.model_w.mean_all()? + errors.model_l.mean_all()?)? * 0.5)?;
            out.push(g.compare("raw_model_loss", &raw, scale)?);
            let raw_ref = Tensor::cat(&[r(&errors.ref_w), r(&errors.ref_l)], 0)?.mean_all()?;
            out.push(g.compare("raw_ref_loss", &raw_ref, scale)?);
        } else {
            out.push(g.compare("loss_salesforce", &loss, scale)?);
        }
        let grads = loss.backward()?;
        let prefix = format!("grad{suffix}.");
        for (name, var) in params.vars() {
            let key = format!("{prefix}{name}");
            if g.has(&key) {
                let gr = grads
                    .get(var.as_tensor())
                    .ok_or_else(|| anyhow::anyhow!("no gradient reached {name}"))?;
                out.push(g.compare(&key, gr, scale)?);
            }
        }
    }
    Ok(out)
}
