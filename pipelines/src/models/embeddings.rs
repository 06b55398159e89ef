//! Timestep embeddings (diffusers `Timesteps` + `TimestepEmbedding`).

use crate::nn::{Activation, Linear};
use crate::weights::Params;
use crate::Result;
use candle_core::{DType, Module, Tensor, D};

/// Sinusoidal embedding of per-sample (integer or fractional) timesteps `t` `[N]`, computed in f32:
///
/// `freq_j = exp(-ln(10000) · j / (half - shift))`, `emb = [sin(t·freq), cos(t·freq)]`, swapped to
/// `[cos, sin]` when `flip_sin_to_cos` (SD), zero-padded when `dim` is odd.
pub fn timestep_embedding(
    t: &Tensor,
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
) -> Result<Tensor> {
    let half = dim / 2;
    let dev = t.device();
    let t = t.to_dtype(DType::F32)?.flatten_all()?;
    let denom = half as f64 - freq_shift;
    let freqs: Vec<f32> = (0..half)
        .map(|j| (-(10000f64.ln()) as f32 * j as f32 / denom as f32).exp())
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), dev)?;
    let args = t.unsqueeze(1)?.broadcast_mul(&freqs)?;
    let (sin, cos) = (args.sin()?, args.cos()?);
    let emb = if flip_sin_to_cos {
        Tensor::cat(&[cos, sin], D::Minus1)?
    } else {
        Tensor::cat(&[sin, cos], D::Minus1)?
    };
    Ok(if dim % 2 == 1 {
        emb.pad_with_zeros(D::Minus1, 0, 1)?
    } else {
        emb
    })
}

/// `TimestepEmbedding`: `linear_2(act(linear_1(x)))`.
#[derive(Clone)]
pub struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
    act: Activation,
}

impl TimestepEmbedding {
    pub fn new(p: &Params, in_dim: usize, dim: usize, act: Activation) -> Result<Self> {
        Ok(TimestepEmbedding {
            linear_1: Linear::new(&p.pp("linear_1"), in_dim, dim, true)?,
            linear_2: Linear::new(&p.pp("linear_2"), dim, dim, true)?,
            act,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self
            .linear_2
            .forward(&self.act.apply(&self.linear_1.forward(x)?)?)?)
    }
}
