//! CLIP-based rewards: CLIP score, PickScore and HPSv2, all from a [`ClipModel`].
//!
//! * CLIP score (torchmetrics convention): `100 · max(cos, 0)`, no logit scale.
//! * PickScore: `exp(logit_scale) · cos` with the checkpoint's logit scale (transformers `CLIPModel`).
//! * HPSv2 / HPSv2.1: the plain cosine (HPSv2 reports 100x), open_clip ViT-H-14, with HPSv2's
//!   `ResizeMaxSize` preprocessing (longest side, zero padding).
//!
//! `cos` is the cosine of the L2-normalised projected image and text embeddings. Text embeddings are
//! constant with respect to the image (computed without a graph and cached per prompt).

use crate::clip::{ClipLoadOptions, ClipModel};
use crate::preprocess::ResizeMode;
use crate::{Error, Result, Reward};
use candle_core::{DType, Device, Tensor, D};
use std::path::Path;
use std::sync::Arc;

/// How a cosine becomes a score.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClipScoring {
    /// `100 · max(cos, 0)`.
    ClipScore,
    /// `exp(logit_scale) · cos`.
    PickScore,
    /// `cos`.
    Hps,
}

impl ClipScoring {
    pub fn name(&self) -> &'static str {
        match self {
            ClipScoring::ClipScore => "clip",
            ClipScoring::PickScore => "pickscore",
            ClipScoring::Hps => "hps",
        }
    }
}

/// A CLIP model with a scoring rule; implements [`Reward`].
#[derive(Clone)]
pub struct ClipReward {
    pub model: Arc<ClipModel>,
    pub scoring: ClipScoring,
}

impl ClipReward {
    /// Wraps a loaded model (it needs its text tower, and for PickScore its logit scale).
    pub fn new(model: Arc<ClipModel>, scoring: ClipScoring) -> Result<Self> {
        model.logit_scale()?;
        Ok(ClipReward { model, scoring })
    }

    /// Loads the model at `path` (folder or weights file; see [`ClipModel::load_with`]). For HPS the
    /// preprocessing is HPSv2's (longest side + zero padding) whatever the config says.
    pub fn load(
        path: impl AsRef<Path>,
        scoring: ClipScoring,
        opts: &ClipLoadOptions,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let mut model = ClipModel::load_with(path, opts, dtype, device)?;
        if scoring == ClipScoring::Hps {
            model.config.preprocess.mode = ResizeMode::LongestSidePad;
        }
        Self::new(Arc::new(model), scoring)
    }

    /// CLIP score with the model at `path`.
    pub fn load_clip_score(path: impl AsRef<Path>, dtype: DType, device: &Device) -> Result<Self> {
        Self::load(
            path,
            ClipScoring::ClipScore,
            &Default::default(),
            dtype,
            device,
        )
    }

    /// PickScore with the model at `path`.
    pub fn load_pickscore(path: impl AsRef<Path>, dtype: DType, device: &Device) -> Result<Self> {
        Self::load(
            path,
            ClipScoring::PickScore,
            &Default::default(),
            dtype,
            device,
        )
    }

    /// HPSv2 with the open_clip model at `path`.
    pub fn load_hps(path: impl AsRef<Path>, dtype: DType, device: &Device) -> Result<Self> {
        Self::load(path, ClipScoring::Hps, &Default::default(), dtype, device)
    }

    /// Applies the scoring rule to cosines (any shape).
    pub fn from_cosine(&self, cos: &Tensor) -> Result<Tensor> {
        Ok(match self.scoring {
            ClipScoring::ClipScore => (cos.relu()? * 100.0)?,
            ClipScoring::PickScore => {
                let s = self
                    .model
                    .logit_scale()?
                    .exp()?
                    .to_dtype(cos.dtype())?
                    .to_device(cos.device())?;
                cos.broadcast_mul(&s)?
            }
            ClipScoring::Hps => cos.clone(),
        })
    }

    /// Scores from normalised image and text embeddings, pairwise by row (`[B, E]` each → `[B]`).
    pub fn from_embeds(&self, image_embeds: &Tensor, text_embeds: &Tensor) -> Result<Tensor> {
        let text = text_embeds
            .to_device(image_embeds.device())?
            .to_dtype(image_embeds.dtype())?;
        let cos = (image_embeds * text)?.sum(D::Minus1)?;
        self.from_cosine(&cos)
    }

    /// Scores of `images` `[B, 3, H, W]` in [0, 1] against precomputed normalised text embeddings `[B, E]`.
    pub fn score_with_text(&self, images: &Tensor, text_embeds: &Tensor) -> Result<Tensor> {
        self.from_embeds(&self.model.image_embeds(images)?, text_embeds)
    }

    /// Scores of normalised pixel values (the preprocessing already applied).
    pub fn score_pixels_with_text(
        &self,
        pixel_values: &Tensor,
        text_embeds: &Tensor,
    ) -> Result<Tensor> {
        self.from_embeds(
            &self.model.image_embeds_from_pixels(pixel_values)?,
            text_embeds,
        )
    }
}

impl Reward for ClipReward {
    fn name(&self) -> &str {
        self.scoring.name()
    }

    fn score(&self, images: &Tensor, prompts: &[&str]) -> Result<Tensor> {
        let b = images.dim(0)?;
        if prompts.len() != b {
            return Err(Error::msg(format!(
                "{}: {b} images but {} prompts (one prompt per image)",
                self.name(),
                prompts.len()
            )));
        }
        let text = self.model.text_embeds(prompts)?;
        let s = self.score_with_text(images, &text)?;
        Ok(s.to_device(images.device())?)
    }
}
