//! Differentiable image preprocessing of the CLIP-family reward models.
//!
//! `images` `[B, 3, H, W]` in [0, 1] → bicubic resize → centre crop (OpenAI CLIP, PickScore, the aesthetic
//! predictor) or zero padding to a square (HPSv2's `ResizeMaxSize`) → `(x - mean) / std`. Every step is a
//! matrix product, a narrow, a pad or an affine map, so the gradient reaches the pixels.
//!
//! The resize is PyTorch's `interpolate(mode="bicubic", antialias=True, align_corners=False)` (the filter of
//! torchvision's `Resize(BICUBIC)` on tensors and of PIL's BICUBIC): Keys cubic with a = -0.5, stretched by
//! the downscale factor, written as `resized = W_h @ image @ W_wᵀ` with the weight matrices built in f64.

use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};

/// The OpenAI CLIP normalisation mean (also LAION's CLIP-H, PickScore, HPSv2).
pub const OPENAI_CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
/// The OpenAI CLIP normalisation std.
pub const OPENAI_CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

/// How the image is brought to `size x size`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResizeMode {
    /// Shortest side to `size` (long side `int(size * long / short)`), then a centre crop at
    /// `int(round((side - size) / 2))` (torchvision's `Resize(size)` + `CenterCrop(size)`).
    ShortestSideCrop,
    /// Longest side to `size` (`round(side * size / max(h, w))`), then zero padding in [0, 1] space
    /// (black) to `size x size`, left/top = `(size - side) // 2` (HPSv2's `ResizeMaxSize`, open_clip's
    /// `resize_mode: longest`).
    LongestSidePad,
}

/// A preprocessing recipe.
#[derive(Clone, Debug, PartialEq)]
pub struct Preprocess {
    /// Output side (the model's `image_size`).
    pub size: usize,
    pub mode: ResizeMode,
    pub mean: [f64; 3],
    pub std: [f64; 3],
}

/// The stages of [`Preprocess::forward`].
#[derive(Clone, Debug)]
pub struct Preprocessed {
    /// After the resize, before crop / pad (`[B, 3, h', w']`, [0, 1] space, not clamped).
    pub resized: Tensor,
    /// The model input `[B, 3, size, size]`, normalised.
    pub pixel_values: Tensor,
}

/// The Keys cubic convolution kernel with a = -0.5 (PIL / PyTorch antialiased bicubic).
fn cubic(t: f64) -> f64 {
    const A: f64 = -0.5;
    let t = t.abs();
    if t < 1.0 {
        ((A + 2.0) * t - (A + 3.0)) * t * t + 1.0
    } else if t < 2.0 {
        ((A * t - 5.0 * A) * t + 8.0 * A) * t - 4.0 * A
    } else {
        0.0
    }
}

/// The `[out, in]` row-major resize matrix of one axis (f64): output `i` is `Σ_j W[i, j] x[j]`.
///
/// Per PyTorch's antialiased kernel: scale = in / out, support = 2·scale when downscaling (2 otherwise),
/// centre c = scale (i + 0.5), taps `max(int(c - support + 0.5), 0) .. min(int(c + support + 0.5), in)`,
/// weights `k((j - c + 0.5) / max(scale, 1))` normalised to sum 1.
pub fn resize_weights(input: usize, output: usize) -> Result<Vec<f64>> {
    if input == 0 || output == 0 {
        return Err(Error::msg(format!(
            "cannot resize an axis of {input} pixels to {output}"
        )));
    }
    let scale = input as f64 / output as f64;
    let support = if scale >= 1.0 { 2.0 * scale } else { 2.0 };
    let inv = 1.0 / scale.max(1.0);
    let mut w = vec![0f64; output * input];
    for i in 0..output {
        let c = scale * (i as f64 + 0.5);
        // Python's int() truncates toward zero.
        let lo = ((c - support + 0.5).trunc() as i64).max(0) as usize;
        let hi = ((c + support + 0.5).trunc() as i64)
            .min(input as i64)
            .max(0) as usize;
        let row = &mut w[i * input..(i + 1) * input];
        let mut total = 0.0;
        for (j, r) in row.iter_mut().enumerate().take(hi).skip(lo) {
            let v = cubic((j as f64 - c + 0.5) * inv);
            *r = v;
            total += v;
        }
        if total != 0.0 {
            for r in row[lo..hi].iter_mut() {
                *r /= total;
            }
        }
    }
    Ok(w)
}

/// Python's `round()` of a float (halves to even).
fn round_half_even(x: f64) -> usize {
    x.round_ties_even().max(0.0) as usize
}

impl Preprocess {
    /// OpenAI-CLIP preprocessing (CLIP score, PickScore, the aesthetic predictor): shortest side + centre
    /// crop, OpenAI mean/std.
    pub fn openai_clip(size: usize) -> Self {
        Preprocess {
            size,
            mode: ResizeMode::ShortestSideCrop,
            mean: OPENAI_CLIP_MEAN,
            std: OPENAI_CLIP_STD,
        }
    }

    /// HPSv2 preprocessing: longest side + zero padding, OpenAI mean/std.
    pub fn hps(size: usize) -> Self {
        Preprocess {
            size,
            mode: ResizeMode::LongestSidePad,
            mean: OPENAI_CLIP_MEAN,
            std: OPENAI_CLIP_STD,
        }
    }

    /// The size `(h', w')` an `h x w` image is resized to before the crop / padding.
    pub fn resized_size(&self, h: usize, w: usize) -> (usize, usize) {
        let s = self.size;
        match self.mode {
            ResizeMode::ShortestSideCrop => {
                if h <= w {
                    (s, (s as f64 * w as f64 / h as f64) as usize)
                } else {
                    ((s as f64 * h as f64 / w as f64) as usize, s)
                }
            }
            ResizeMode::LongestSidePad => {
                let scale = s as f64 / h.max(w) as f64;
                (
                    round_half_even(h as f64 * scale).max(1),
                    round_half_even(w as f64 * scale).max(1),
                )
            }
        }
    }

    /// The resize matrices `(W_h [h', h], W_w [w', w])` for an `h x w` input, in `dtype` on `device`.
    pub fn resize_matrices(
        &self,
        h: usize,
        w: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let (oh, ow) = self.resized_size(h, w);
        let wh = Tensor::from_vec(resize_weights(h, oh)?, (oh, h), &Device::Cpu)?;
        let ww = Tensor::from_vec(resize_weights(w, ow)?, (ow, w), &Device::Cpu)?;
        Ok((
            wh.to_dtype(dtype)?.to_device(device)?,
            ww.to_dtype(dtype)?.to_device(device)?,
        ))
    }

    /// Resizes `images` `[B, C, H, W]` to `(oh, ow)` as `W_h @ x @ W_wᵀ` (two 2-D matmuls on contiguous
    /// operands; an axis whose size does not change is left alone, its matrix being the identity).
    fn resize(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let (oh, ow) = self.resized_size(h, w);
        let (wh, ww) = self.resize_matrices(h, w, x.dtype(), x.device())?;
        let mut y = x.contiguous()?;
        if ow != w {
            // [B·C·H, W] @ [W, w'] -> [B, C, H, w']
            y = y
                .reshape((b * c * h, w))?
                .matmul(&ww.t()?.contiguous()?)?
                .reshape((b, c, h, ow))?;
        }
        if oh != h {
            // rows: [B·C, w', H] -> [B·C·w', H] @ [H, h'] -> [B, C, h', w']
            let yt = y.reshape((b * c, h, ow))?.transpose(1, 2)?.contiguous()?;
            y = yt
                .reshape((b * c * ow, h))?
                .matmul(&wh.t()?.contiguous()?)?
                .reshape((b * c, ow, oh))?
                .transpose(1, 2)?
                .contiguous()?
                .reshape((b, c, oh, ow))?;
        }
        Ok(y)
    }

    /// Runs the whole preprocessing on `images` `[B, 3, H, W]` (values in [0, 1]). Computes in f32 (f64
    /// stays f64) whatever the input dtype; the result stays on the images' device.
    pub fn forward(&self, images: &Tensor) -> Result<Preprocessed> {
        let (_, c, h, w) = images.dims4().map_err(|_| {
            Error::msg(format!(
                "images must be [B, 3, H, W], got {:?}",
                images.dims()
            ))
        })?;
        if c != 3 {
            return Err(Error::msg(format!(
                "images must have 3 channels (RGB), got shape {:?}",
                images.dims()
            )));
        }
        if h == 0 || w == 0 {
            return Err(Error::msg(format!("empty images {:?}", images.dims())));
        }
        let dt = if images.dtype() == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        let x = images.to_dtype(dt)?;
        let resized = self.resize(&x)?;
        let (oh, ow) = self.resized_size(h, w);
        let s = self.size;
        let squared = match self.mode {
            ResizeMode::ShortestSideCrop => {
                let top = round_half_even((oh - s) as f64 / 2.0);
                let left = round_half_even((ow - s) as f64 / 2.0);
                resized.narrow(2, top, s)?.narrow(3, left, s)?
            }
            ResizeMode::LongestSidePad => {
                let (ph, pw) = (s.saturating_sub(oh), s.saturating_sub(ow));
                let mut y = resized.clone();
                if ph > 0 {
                    y = y.pad_with_zeros(2, ph / 2, ph - ph / 2)?;
                }
                if pw > 0 {
                    y = y.pad_with_zeros(3, pw / 2, pw - pw / 2)?;
                }
                y
            }
        };
        let dev = images.device();
        let mean = Tensor::from_vec(self.mean.to_vec(), (1, 3, 1, 1), &Device::Cpu)?
            .to_dtype(dt)?
            .to_device(dev)?;
        let std = Tensor::from_vec(self.std.to_vec(), (1, 3, 1, 1), &Device::Cpu)?
            .to_dtype(dt)?
            .to_device(dev)?;
        let pixel_values = squared.broadcast_sub(&mean)?.broadcast_div(&std)?;
        Ok(Preprocessed {
            resized,
            pixel_values,
        })
    }

    /// [`Preprocess::forward`]'s model input only.
    pub fn pixel_values(&self, images: &Tensor) -> Result<Tensor> {
        Ok(self.forward(images)?.pixel_values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_rows_sum_to_one_and_identity_when_same_size() {
        let w = resize_weights(40, 32).unwrap();
        for i in 0..32 {
            let s: f64 = w[i * 40..(i + 1) * 40].iter().sum();
            assert!((s - 1.0).abs() < 1e-12, "row {i} sums to {s}");
        }
        let id = resize_weights(7, 7).unwrap();
        for i in 0..7 {
            for j in 0..7 {
                assert_eq!(id[i * 7 + j], if i == j { 1.0 } else { 0.0 });
            }
        }
    }

    #[test]
    fn sizes_follow_torchvision_and_hps_rules() {
        let p = Preprocess::openai_clip(32);
        assert_eq!(p.resized_size(40, 48), (32, 38));
        assert_eq!(p.resized_size(48, 40), (38, 32));
        assert_eq!(p.resized_size(512, 512), (32, 32));
        let h = Preprocess::hps(32);
        assert_eq!(h.resized_size(40, 48), (27, 32));
        assert_eq!(h.resized_size(64, 64), (32, 32));
    }

    #[test]
    fn constant_image_stays_constant_and_pads_black() {
        let x = Tensor::full(0.5f32, (1, 3, 40, 48), &Device::Cpu).unwrap();
        let p = Preprocess::hps(32).forward(&x).unwrap();
        assert_eq!(p.pixel_values.dims(), &[1, 3, 32, 32]);
        let v: Vec<Vec<f32>> = p
            .pixel_values
            .get(0)
            .unwrap()
            .get(0)
            .unwrap()
            .to_vec2()
            .unwrap();
        let inside = (0.5 - OPENAI_CLIP_MEAN[0]) / OPENAI_CLIP_STD[0];
        let pad = -OPENAI_CLIP_MEAN[0] / OPENAI_CLIP_STD[0];
        // 27 rows of image between 2 padded rows on top and 3 below.
        assert!((v[0][5] as f64 - pad).abs() < 1e-5);
        assert!((v[1][5] as f64 - pad).abs() < 1e-5);
        assert!((v[2][5] as f64 - inside).abs() < 1e-5);
        assert!((v[28][5] as f64 - inside).abs() < 1e-5);
        assert!((v[29][5] as f64 - pad).abs() < 1e-5);
    }
}
