//! # diffpref-rewards
//!
//! Reward models that score images against prompts: `[B, 3, H, W]` images in [0, 1] plus B prompts → `[B]`
//! scores, differentiable with respect to the images (preprocessing included), on any candle device.

pub mod bert;
pub mod blip;
pub mod error;
pub mod imagereward;

pub use error::{Error, Result};

use candle_core::Tensor;

/// A reward model. Implementations keep their preprocessing in the differentiable graph, so
/// `score(images)` can be backpropagated to the pixels (reward fine-tuning, Adjoint Matching).
pub trait Reward: Send + Sync {
    /// A short name (`clip`, `aesthetic`, `pickscore`, `hps`, `imagereward`, `shapes`).
    fn name(&self) -> &str;

    /// Scores `images` `[B, 3, H, W]` (values in [0, 1], any size) against `prompts` (B of them; models that
    /// ignore text accept any). Returns `[B]` f32 on the images' device.
    fn score(&self, images: &Tensor, prompts: &[&str]) -> Result<Tensor>;

    /// [`Reward::score`] in chunks of `batch_size` (no gradient across chunks is lost: the chunks are
    /// concatenated in the graph).
    fn score_batched(&self, images: &Tensor, prompts: &[&str], batch_size: usize) -> Result<Tensor> {
        let b = images.dim(0)?;
        if prompts.len() != b && !prompts.is_empty() {
            return Err(Error::msg(format!("{} images but {} prompts", b, prompts.len())));
        }
        let bs = batch_size.max(1);
        if b <= bs {
            return self.score(images, prompts);
        }
        let mut parts = Vec::new();
        let mut i = 0;
        while i < b {
            let n = bs.min(b - i);
            let p: Vec<&str> = if prompts.is_empty() { vec![] } else { prompts[i..i + n].to_vec() };
            parts.push(self.score(&images.narrow(0, i, n)?, &p)?);
            i += n;
        }
        Ok(Tensor::cat(&parts, 0)?)
    }
}
