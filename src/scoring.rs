//! What the commands and methods ask of a reward: one typed [`RewardSpec`] (a single reward model or a
//! weighted mix of them), parsed and validated when a configuration loads, and [`load_reward`] turning a kind
//! and its weights into a [`Reward`].
//!
//! ```toml
//! [reward]                      # one reward
//! kind = "pickscore"
//! weights = "yuvalkirstain/PickScore_v1"
//!
//! [reward]                      # or a weighted mix: r = Σ_i w_i · r_i
//! mix = [
//!   { kind = "shapes", weight = 1.0 },
//!   { kind = "aesthetic", weights = "heads/sac+logos+ava1-l14", clip = "openai/clip-vit-large-patch14", weight = 0.1 },
//! ]
//! ```

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use diffpref_rewards::clip::{has_own_config, ClipConfig, ClipLoadOptions};
use diffpref_rewards::shapes::ShapesReward;
use diffpref_rewards::{source, Aesthetic, ClipReward, ClipScoring, Reward};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The reward models diffpref knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum RewardKind {
    /// CLIP score: 100 · max(cos, 0).
    Clip,
    /// LAION aesthetic predictor v2 (needs a CLIP backbone: `clip`).
    Aesthetic,
    /// PickScore: exp(logit_scale) · cos.
    Pickscore,
    /// HPSv2 / HPSv2.1: cos.
    Hps,
    /// ImageReward.
    Imagereward,
    /// The shapes world's ground-truth reward (from pixels; needs no weights).
    Shapes,
    /// The shapes world's differentiable surrogate of that reward (a training reward; the exact one judges).
    #[value(name = "shapes-surrogate", alias = "shapes_surrogate")]
    ShapesSurrogate,
    /// A latent reward model (`train lrm`): images are encoded by its backbone's VAE and scored at t = 0.
    Lrm,
    /// A step-aware preference model (`train spm`): images scored as clean (t = 0).
    Spm,
}

impl RewardKind {
    /// Whether prompts must be shapes captions.
    pub fn is_shapes(self) -> bool {
        matches!(self, RewardKind::Shapes | RewardKind::ShapesSurrogate)
    }

    /// Whether the reward needs weights (a model).
    pub fn needs_weights(self) -> bool {
        !self.is_shapes()
    }
}

/// Scores images `[B, 3, H, W]` in [0, 1] as the 8-bit images a user saves and the judge scores (rounded to
/// 8 bits first), `batch` images per forward pass; one score per image, f64 on the CPU.
pub fn score_saved_images(
    reward: &dyn Reward,
    images: &Tensor,
    prompts: &[&str],
    batch: usize,
) -> Result<Vec<f64>> {
    let imgs = crate::imaging::tensor_to_images(images)?;
    let x = crate::imaging::images_to_tensor(&imgs, images.device())?;
    let s = reward
        .score_batched(&x, prompts, batch)
        .with_context(|| format!("scoring with the reward {}", reward.name()))?;
    Ok(s.to_dtype(DType::F64)?.to_device(&Device::Cpu)?.to_vec1()?)
}

/// The shapes surrogate as a [`Reward`]: [`ShapesReward::score_differentiable`].
#[derive(Clone, Debug, Default)]
pub struct ShapesSurrogate(pub ShapesReward);

impl Reward for ShapesSurrogate {
    fn name(&self) -> &str {
        "shapes_surrogate"
    }

    fn score(&self, images: &Tensor, prompts: &[&str]) -> diffpref_rewards::Result<Tensor> {
        self.0.score_differentiable(images, prompts)
    }
}

/// Loads the reward named by `kind`. `weights`: the model folder, weights file or hub id (ignored by the
/// shapes rewards); `clip`: the CLIP backbone of `aesthetic`; `tokenizer`: a CLIP tokenizer folder for models
/// that ship none. Errors say which of them is wrong; callers add the flag or key they came from.
pub fn load_reward(
    kind: RewardKind,
    weights: &str,
    clip: Option<&str>,
    tokenizer: Option<&Path>,
    dtype: DType,
    device: &Device,
) -> Result<Box<dyn Reward>> {
    let scoring = match kind {
        RewardKind::Clip => ClipScoring::ClipScore,
        RewardKind::Pickscore => ClipScoring::PickScore,
        RewardKind::Hps => ClipScoring::Hps,
        RewardKind::Aesthetic => {
            let clip = clip.context(
                "the aesthetic reward needs a CLIP backbone (`clip`, --clip: the ViT-L/14 CLIPModel folder for the \
                 LAION head); `weights` names the head folder (model.safetensors + config.json)",
            )?;
            let head = source::resolve(weights).with_context(|| format!("weights {weights}"))?;
            let backbone = source::resolve(clip).with_context(|| format!("clip {clip}"))?;
            return Ok(Box::new(Aesthetic::load(&head, &backbone, dtype, device)?));
        }
        RewardKind::Imagereward => {
            let dir = source::resolve(weights).with_context(|| format!("weights {weights}"))?;
            return Ok(Box::new(
                diffpref_rewards::imagereward::ImageReward::load(&dir, dtype, device)
                    .with_context(|| format!("loading ImageReward from {}", dir.display()))?,
            ));
        }
        RewardKind::Shapes => return Ok(Box::new(ShapesReward::new())),
        RewardKind::ShapesSurrogate => return Ok(Box::new(ShapesSurrogate(ShapesReward::new()))),
        RewardKind::Spm => {
            let dir = Path::new(weights);
            return Ok(Box::new(
                diffpref_rewards::spm::StepAwarePreferenceModel::load(dir, dtype, device)
                    .with_context(|| {
                        format!("loading the step-aware preference model {}", dir.display())
                    })?,
            ));
        }
        RewardKind::Lrm => {
            let dir = Path::new(weights);
            return Ok(Box::new(
                diffpref_rewards::lrm::LatentRewardModel::load(dir, dtype, device).with_context(
                    || format!("loading the latent reward model {}", dir.display()),
                )?,
            ));
        }
    };
    let path = source::resolve(weights).with_context(|| format!("weights {weights}"))?;
    let mut opts = ClipLoadOptions {
        tokenizer: tokenizer.map(|t| t.to_path_buf()),
        ..Default::default()
    };
    if scoring == ClipScoring::Hps && !has_own_config(&path) {
        eprintln!(
            "note: {} has no open_clip_config.json: using open_clip's ViT-H-14 config (HPSv2's architecture)",
            path.display()
        );
        opts.fallback_config = Some(ClipConfig::open_clip_vit_h_14());
    }
    Ok(Box::new(ClipReward::load(
        &path, scoring, &opts, dtype, device,
    )?))
}

/// [`load_reward`] with optional weights: the shapes rewards need none, every other reward fails naming the
/// kind.
pub fn load_reward_opt(
    kind: RewardKind,
    weights: Option<&str>,
    clip: Option<&str>,
    tokenizer: Option<&Path>,
    dtype: DType,
    device: &Device,
) -> Result<Box<dyn Reward>> {
    let weights = match (kind.needs_weights(), weights) {
        (false, _) => "",
        (true, Some(w)) => w,
        (true, None) => bail!("reward {kind:?} needs weights (the reward model)"),
    };
    load_reward(kind, weights, clip, tokenizer, dtype, device)
}

/// One reward of a [`RewardSpec`] and its weight in the mix.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardTerm {
    /// shapes | shapes_surrogate | clip | pickscore | hps | aesthetic | imagereward.
    pub kind: RewardKind,
    /// Model folder, weights file or hub id (not used by the shapes rewards).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights: Option<String>,
    /// `aesthetic` only: the CLIP backbone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip: Option<String>,
    /// Weight in a mix. Default 1.
    #[serde(default = "one")]
    pub weight: f64,
}

fn one() -> f64 {
    1.0
}

/// `[reward]`: a single reward (`kind`, `weights`, `clip`) or a weighted mix (`mix = [ {kind, weight, ...},
/// ... ]`). Neither given: the exact shapes reward.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RewardSpec {
    pub kind: Option<RewardKind>,
    pub weights: Option<String>,
    pub clip: Option<String>,
    /// The terms of a weighted mix (instead of `kind`).
    pub mix: Vec<RewardTerm>,
    /// Images per reward forward pass. Default 16.
    pub batch_size: usize,
}

impl Default for RewardSpec {
    fn default() -> Self {
        RewardSpec {
            kind: None,
            weights: None,
            clip: None,
            mix: Vec::new(),
            batch_size: 16,
        }
    }
}

impl RewardSpec {
    /// A single reward.
    pub fn single(kind: RewardKind) -> Self {
        RewardSpec {
            kind: Some(kind),
            ..Default::default()
        }
    }

    /// The terms (one for a single reward). `section` names the table in errors (e.g. `[reward]`).
    pub fn terms(&self, section: &str) -> Result<Vec<RewardTerm>> {
        match (&self.kind, self.mix.is_empty()) {
            (k, true) => Ok(vec![RewardTerm {
                kind: k.unwrap_or(RewardKind::Shapes),
                weights: self.weights.clone(),
                clip: self.clip.clone(),
                weight: 1.0,
            }]),
            (None, false) => {
                ensure!(
                    self.weights.is_none() && self.clip.is_none(),
                    "{section}: `weights` and `clip` belong inside each `mix` term"
                );
                Ok(self.mix.clone())
            }
            (Some(_), false) => bail!("{section}: give either `kind` or `mix`, not both"),
        }
    }

    /// Checks the spec without loading anything: the terms, finite weights, weights where a model is needed.
    pub fn validate(&self, section: &str) -> Result<()> {
        ensure!(
            self.batch_size >= 1,
            "{section} batch_size must be at least 1"
        );
        for (i, t) in self.terms(section)?.iter().enumerate() {
            let at = if self.mix.is_empty() {
                section.to_string()
            } else {
                format!("{section} mix[{i}]")
            };
            ensure!(
                t.weight.is_finite(),
                "{at}: weight must be finite (got {})",
                t.weight
            );
            ensure!(
                !t.kind.needs_weights() || t.weights.is_some(),
                "{at}: reward {:?} needs `weights` (the reward model's folder, file or hub id)",
                t.kind
            );
            ensure!(
                t.kind == RewardKind::Aesthetic || t.clip.is_none(),
                "{at}: `clip` is for the aesthetic reward only"
            );
        }
        Ok(())
    }

    /// Whether every term scores shapes captions (prompts are then checked against that grammar).
    pub fn is_shapes(&self) -> bool {
        self.terms("[reward]")
            .map(|t| t.iter().all(|t| t.kind.is_shapes()))
            .unwrap_or(false)
    }

    /// Loads the reward (f32) on `device`; `section` names the table in errors.
    pub fn load(&self, section: &str, device: &Device) -> Result<Box<dyn Reward>> {
        self.validate(section)?;
        let mut loaded = Vec::new();
        for t in self.terms(section)? {
            let r = load_reward_opt(
                t.kind,
                t.weights.as_deref(),
                t.clip.as_deref(),
                None,
                DType::F32,
                device,
            )
            .with_context(|| format!("{section}: loading the {:?} reward", t.kind))?;
            loaded.push((t.weight, r));
        }
        if loaded.len() == 1 && loaded[0].0 == 1.0 {
            return Ok(loaded.pop().expect("one term").1);
        }
        let name = loaded
            .iter()
            .map(|(w, r)| format!("{w}*{}", r.name()))
            .collect::<Vec<_>>()
            .join("+");
        Ok(Box::new(MixedReward {
            terms: loaded,
            name,
        }))
    }
}

/// `r = Σ_i w_i · r_i` (differentiable when every term is).
pub struct MixedReward {
    terms: Vec<(f64, Box<dyn Reward>)>,
    name: String,
}

impl MixedReward {
    pub fn new(terms: Vec<(f64, Box<dyn Reward>)>) -> Self {
        let name = terms
            .iter()
            .map(|(w, r)| format!("{w}*{}", r.name()))
            .collect::<Vec<_>>()
            .join("+");
        MixedReward { terms, name }
    }
}

impl Reward for MixedReward {
    fn name(&self) -> &str {
        &self.name
    }

    fn score(&self, images: &Tensor, prompts: &[&str]) -> diffpref_rewards::Result<Tensor> {
        let mut total: Option<Tensor> = None;
        for (w, r) in &self.terms {
            let s = (r.score(images, prompts)?.to_dtype(DType::F32)? * *w)?;
            total = Some(match total {
                None => s,
                Some(t) => (t + s)?,
            });
        }
        total.ok_or_else(|| diffpref_rewards::Error::msg("an empty reward mix"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_validate_and_mix() {
        let s: RewardSpec = toml::from_str("kind = \"shapes\"").unwrap();
        assert_eq!(s.terms("[reward]").unwrap().len(), 1);
        assert!(s.is_shapes());
        let s: RewardSpec = toml::from_str(
            "mix = [{ kind = \"shapes\", weight = 2.0 }, { kind = \"shapes_surrogate\", weight = -1.0 }]",
        )
        .unwrap();
        s.validate("[reward]").unwrap();
        let r = s.load("[reward]", &Device::Cpu).unwrap();
        // A flat grey image: the mix is 2·exact − surrogate.
        let img = Tensor::full(0.5f32, (1, 3, 32, 32), &Device::Cpu).unwrap();
        let p = ["a red circle"];
        let exact = ShapesReward::new()
            .score_exact(&img, &p)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[0];
        let sur = ShapesReward::new()
            .score_differentiable(&img, &p)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[0];
        let got = r.score(&img, &p).unwrap().to_vec1::<f32>().unwrap()[0];
        assert!(
            (got - (2.0 * exact - sur)).abs() < 1e-5,
            "{got} vs {exact} {sur}"
        );
        // Errors name the section and the problem.
        let bad: RewardSpec = toml::from_str("kind = \"pickscore\"").unwrap();
        let e = bad.validate("[reward]").unwrap_err().to_string();
        assert!(e.contains("[reward]") && e.contains("weights"), "{e}");
        let both: RewardSpec =
            toml::from_str("kind = \"shapes\"\nmix = [{ kind = \"shapes\" }]").unwrap();
        assert!(both
            .validate("[reward]")
            .unwrap_err()
            .to_string()
            .contains("not both"));
        let e = toml::from_str::<RewardSpec>("kind = \"shapez\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("shapez"), "{e}");
    }
}
