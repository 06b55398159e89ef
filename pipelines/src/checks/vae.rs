//! `vae` check: diffusers `AutoencoderKL` (`<model>/vae`) against `vae.safetensors` — posterior, scaled latents,
//! decoder output, reconstruction, and the near-constant `*_small` inputs that expose GroupNorm's eps.
//!
//! Written against the public API only (`crate::golden`, `crate::models::vae`, `super::CheckContext`'s public
//! fields), so the parity test can compile this very file into itself.

use super::CheckContext;
use crate::golden::{Comparison, Golden};
use crate::models::vae::AutoencoderKL;
use crate::Result;
use candle_core::{DType, Tensor};

/// Runs the VAE of `ctx.model_dir` (its `vae/` subfolder) on the golden inputs `image`, `noise`, `decode_in` and
/// compares every output tensor.
pub fn check_vae(golden: &Golden, ctx: &CheckContext) -> Result<Vec<Comparison>> {
    let model_dir = ctx.model_dir.as_deref().ok_or_else(|| {
        crate::Error::msg(format!(
            "{}: check `{}` needs a model folder (--model DIR)",
            golden.path.display(),
            golden.kind().unwrap_or("vae")
        ))
    })?;
    let vae = AutoencoderKL::load(model_dir.join("vae"), None, ctx.dtype, &ctx.device)?;
    let input = |name: &str| -> Result<Tensor> {
        Ok(golden.get_on(name, &ctx.device)?.to_dtype(ctx.dtype)?)
    };
    let image = input("image")?;
    let noise = input("noise")?;
    let decode_in = input("decode_in")?;

    let posterior = vae.encode(&image)?;
    let sample = posterior.sample(Some(&noise))?;
    let latents_scaled = vae.scale_latents(&sample)?;
    let outs: Vec<(&str, Tensor)> = vec![
        ("posterior_mean", posterior.mean.clone()),
        ("posterior_logvar", posterior.logvar.clone()),
        ("posterior_std", posterior.std.clone()),
        ("posterior_sample", sample),
        ("latents_scaled", latents_scaled),
        ("decode_out", vae.decode(&decode_in)?),
        ("reconstruction", vae.decode(&posterior.mean)?),
        ("decode_out_small", vae.decode(&(&decode_in * 1e-3)?)?),
        ("posterior_mean_small", vae.encode(&(&image * 1e-3)?)?.mean),
    ];
    outs.into_iter()
        .map(|(name, t)| golden.compare(name, &t.to_dtype(DType::F32)?, ctx.tolerance_scale))
        .collect()
}
