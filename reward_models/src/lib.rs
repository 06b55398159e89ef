//! # diffpref-rewards
//!
//! Reward models that score images against prompts: `[B, 3, H, W]` images in [0, 1] plus B prompts → `[B]`
//! scores, differentiable with respect to the images (preprocessing included), on any candle device.

pub mod aesthetic;
pub mod bert;
pub mod blip;
pub mod checks;
pub mod clip;
pub mod error;
pub mod imagereward;
pub mod lrm;
pub mod metrics;
pub mod preprocess;
pub mod scores;
pub mod shapes;
pub mod source;
pub mod spm;

pub use aesthetic::{Aesthetic, AestheticHead};
pub use clip::{ClipConfig, ClipLoadOptions, ClipModel};
pub use error::{Error, Result};
pub use preprocess::Preprocess;
pub use scores::{ClipReward, ClipScoring};

use candle_core::{DType, Tensor, Var};

/// The gradient of `sum(f(x))` with respect to `x` (evaluated at `x`, in f32 unless `x` is f64).
pub fn input_gradient(x: &Tensor, f: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    let x = if x.dtype() == DType::F64 {
        x.clone()
    } else {
        x.to_dtype(DType::F32)?
    };
    let v = Var::from_tensor(&x)?;
    let y = f(v.as_tensor())?;
    let grads = y.to_dtype(DType::F32)?.sum_all()?.backward()?;
    grads.get(v.as_tensor()).cloned().ok_or_else(|| {
        Error::msg("no gradient reached the input (a non-differentiable op cut the graph)")
    })
}

/// A reward model. Implementations keep their preprocessing in the differentiable graph, so
/// `score(images)` can be backpropagated to the pixels (reward fine-tuning, Adjoint Matching).
pub trait Reward: Send + Sync {
    /// A short name (`clip`, `aesthetic`, `pickscore`, `hps`, `imagereward`, `shapes`).
    fn name(&self) -> &str;

    /// Scores `images` `[B, 3, H, W]` (values in [0, 1], any size) against `prompts` (B of them; models that
    /// ignore text accept any). Returns `[B]` f32 (f64 for f64 models) on the images' device.
    fn score(&self, images: &Tensor, prompts: &[&str]) -> Result<Tensor>;

    /// [`Reward::score`] in chunks of `batch_size` (no gradient across chunks is lost: the chunks are
    /// concatenated in the graph).
    fn score_batched(
        &self,
        images: &Tensor,
        prompts: &[&str],
        batch_size: usize,
    ) -> Result<Tensor> {
        let b = images.dim(0)?;
        if prompts.len() != b && !prompts.is_empty() {
            return Err(Error::msg(format!(
                "{} images but {} prompts",
                b,
                prompts.len()
            )));
        }
        let bs = batch_size.max(1);
        if b <= bs {
            return self.score(images, prompts);
        }
        let mut parts = Vec::new();
        let mut i = 0;
        while i < b {
            let n = bs.min(b - i);
            let p: Vec<&str> = if prompts.is_empty() {
                vec![]
            } else {
                prompts[i..i + n].to_vec()
            };
            parts.push(self.score(&images.narrow(0, i, n)?, &p)?);
            i += n;
        }
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// Scores and their gradient with respect to the images (`d sum(score) / d images`, `[B, 3, H, W]`),
    /// in chunks of `batch_size` images (each chunk's graph is freed before the next).
    fn score_and_grad(
        &self,
        images: &Tensor,
        prompts: &[&str],
        batch_size: usize,
    ) -> Result<(Tensor, Tensor)> {
        let b = images.dim(0)?;
        if prompts.len() != b && !prompts.is_empty() {
            return Err(Error::msg(format!(
                "{} images but {} prompts",
                b,
                prompts.len()
            )));
        }
        let bs = batch_size.max(1);
        let (mut scores, mut grads) = (Vec::new(), Vec::new());
        let mut i = 0;
        while i < b {
            let n = bs.min(b - i);
            let p: Vec<&str> = if prompts.is_empty() {
                vec![]
            } else {
                prompts[i..i + n].to_vec()
            };
            let mut s = None;
            let g = input_gradient(&images.narrow(0, i, n)?, |x| {
                let y = self.score(x, &p)?;
                s = Some(y.detach());
                Ok(y)
            })?;
            scores.push(s.expect("score ran"));
            grads.push(g);
            i += n;
        }
        Ok((Tensor::cat(&scores, 0)?, Tensor::cat(&grads, 0)?))
    }
}
