//! Image preprocessing for training (see `shared/specs/diffusion-dpo.md` §3).
//!
//! The pipeline matches the diffusers SDXL Diffusion-DPO script and MaPO: resize so the shorter side equals
//! `resolution` (bilinear with antialiasing, `torchvision.transforms.Resize(resolution)`: the longer side becomes
//! `int(resolution * long / short)`), then an optional horizontal flip, then a center crop (torchvision rounding)
//! or a random crop to `resolution x resolution`, then `[0, 255] -> [-1, 1]`.
//!
//! The two images of a pair get the **same** flip and crop: the rejected image is first resized to the chosen
//! image's size (Pick-a-Pic pairs can differ in resolution), then both go through one sampled [`Transform`].
//! All randomness comes from the [`Rng`] passed in, so a run can be reproduced and resumed.

use anyhow::{bail, ensure, Context, Result};
use candle_core::{Device, Tensor};
use image::imageops::{self, FilterType};
use image::RgbImage;
use serde::{Deserialize, Serialize};

use crate::train::rng::Rng;

/// How training images are brought to a square `resolution`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PreprocessConfig {
    /// Side of the square output, in pixels.
    pub resolution: u32,
    /// Center crop (else a random crop).
    pub center_crop: bool,
    /// Flip horizontally with probability 1/2.
    pub random_flip: bool,
}

impl PreprocessConfig {
    pub fn new(resolution: u32) -> Self {
        PreprocessConfig {
            resolution,
            center_crop: true,
            random_flip: false,
        }
    }

    /// Draws the transform for an image of `height x width` (original size). Draw order: the flip (only when
    /// `random_flip`), then the crop offsets (only for a random crop); nothing is drawn otherwise.
    pub fn sample_transform(&self, height: u32, width: u32, rng: &mut Rng) -> Result<Transform> {
        ensure!(
            self.resolution > 0,
            "preprocess: resolution must be positive"
        );
        ensure!(
            height > 0 && width > 0,
            "preprocess: image has an empty size {width}x{height}"
        );
        let (rh, rw) = resized_size(height, width, self.resolution);
        let flip = self.random_flip && rng.uniform() < 0.5;
        let r = self.resolution;
        let (top, left) = if self.center_crop {
            (center_offset(rh, r), center_offset(rw, r))
        } else {
            (
                rng.below(u64::from(rh - r) + 1) as u32,
                rng.below(u64::from(rw - r) + 1) as u32,
            )
        };
        Ok(Transform {
            original_size: (height, width),
            resized_size: (rh, rw),
            crop_top: top,
            crop_left: left,
            flip,
            resolution: r,
        })
    }
}

/// One sampled preprocessing of an image (or of both images of a pair).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Transform {
    /// `(height, width)` before resizing (SDXL micro-conditioning `original_size`).
    pub original_size: (u32, u32),
    /// `(height, width)` after resizing the shorter side to `resolution`.
    pub resized_size: (u32, u32),
    /// Crop offset in the resized (and flipped) image (SDXL `crops_coords_top_left` = `(crop_top, crop_left)`).
    pub crop_top: u32,
    pub crop_left: u32,
    /// Horizontal flip, applied before the crop.
    pub flip: bool,
    /// Output side.
    pub resolution: u32,
}

impl Transform {
    /// SDXL `add_time_ids`: `(orig_h, orig_w, crop_top, crop_left, target_h, target_w)` with target =
    /// resolution, as the diffusers SDXL DPO script and MaPO.
    pub fn sdxl_time_ids(&self) -> [u32; 6] {
        [
            self.original_size.0,
            self.original_size.1,
            self.crop_top,
            self.crop_left,
            self.resolution,
            self.resolution,
        ]
    }

    /// Applies the transform to an image of size `original_size` and returns the cropped RGB image.
    pub fn apply(&self, img: &RgbImage) -> Result<RgbImage> {
        let (h, w) = (img.height(), img.width());
        ensure!(
            (h, w) == self.original_size,
            "preprocess: transform is for a {}x{} image, got {w}x{h}",
            self.original_size.1,
            self.original_size.0
        );
        let (rh, rw) = self.resized_size;
        let r = self.resolution;
        ensure!(
            self.crop_top + r <= rh && self.crop_left + r <= rw,
            "preprocess: crop at ({}, {}) of size {r} leaves the {rw}x{rh} image",
            self.crop_top,
            self.crop_left
        );
        let mut resized = if (rh, rw) == (h, w) {
            img.clone()
        } else {
            imageops::resize(img, rw, rh, FilterType::Triangle)
        };
        if self.flip {
            imageops::flip_horizontal_in_place(&mut resized);
        }
        Ok(imageops::crop_imm(&resized, self.crop_left, self.crop_top, r, r).to_image())
    }
}

/// torchvision `Resize(resolution)` output size `(h, w)`: the shorter side becomes `resolution`, the longer one
/// `int(resolution * long / short)`.
pub fn resized_size(height: u32, width: u32, resolution: u32) -> (u32, u32) {
    let (short, long) = if height <= width {
        (height, width)
    } else {
        (width, height)
    };
    let new_long = ((f64::from(resolution) * f64::from(long)) / f64::from(short)) as u32;
    let new_long = new_long.max(resolution);
    if height <= width {
        (resolution, new_long)
    } else {
        (new_long, resolution)
    }
}

/// torchvision center-crop offset: `int(round((size - crop) / 2))` with Python's round-half-to-even.
fn center_offset(size: u32, crop: u32) -> u32 {
    let diff = size.saturating_sub(crop);
    let half = diff / 2;
    if diff % 2 == 1 && half % 2 == 1 {
        // x.5 rounds to the even neighbour: half is odd, so round up.
        half + 1
    } else {
        half
    }
}

/// An RGB image as a `[3, H, W]` f32 tensor in `[-1, 1]` (`(x / 255 - 0.5) / 0.5`) on the CPU.
pub fn image_to_tensor(img: &RgbImage) -> Result<Tensor> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let plane = w * h;
    let mut data = vec![0f32; 3 * plane];
    for (p, px) in img.pixels().enumerate() {
        for ch in 0..3 {
            data[ch * plane + p] = (f32::from(px.0[ch]) / 255.0 - 0.5) / 0.5;
        }
    }
    Tensor::from_vec(data, (3, h, w), &Device::Cpu).context("image_to_tensor")
}

/// Preprocesses one image: `([3, R, R]` tensor in `[-1, 1]`, the transform used`)`.
pub fn preprocess_image(
    img: &RgbImage,
    cfg: &PreprocessConfig,
    rng: &mut Rng,
) -> Result<(Tensor, Transform)> {
    let t = cfg.sample_transform(img.height(), img.width(), rng)?;
    Ok((image_to_tensor(&t.apply(img)?)?, t))
}

/// A preprocessed pair: both `[3, R, R]` in `[-1, 1]`, with the one transform both received.
#[derive(Clone, Debug)]
pub struct PreprocessedPair {
    pub chosen: Tensor,
    pub rejected: Tensor,
    pub transform: Transform,
}

/// Preprocesses both images of a pair with the same flip and crop. The rejected image is first resized to the
/// chosen image's size when they differ, so the transform (drawn from the chosen image's size) fits both.
pub fn preprocess_pair(
    chosen: &RgbImage,
    rejected: &RgbImage,
    cfg: &PreprocessConfig,
    rng: &mut Rng,
) -> Result<PreprocessedPair> {
    if rejected.width() == 0 || rejected.height() == 0 {
        bail!("preprocess: rejected image has an empty size");
    }
    let t = cfg.sample_transform(chosen.height(), chosen.width(), rng)?;
    let resized;
    let rejected = if rejected.dimensions() == chosen.dimensions() {
        rejected
    } else {
        resized = imageops::resize(
            rejected,
            chosen.width(),
            chosen.height(),
            FilterType::Triangle,
        );
        &resized
    };
    Ok(PreprocessedPair {
        chosen: image_to_tensor(&t.apply(chosen)?)?,
        rejected: image_to_tensor(&t.apply(rejected)?)?,
        transform: t,
    })
}

/// Stacks pairs for one training step: `[2B, 3, R, R]` = `[winners; losers]` (the layout of spec §3), on
/// `device`.
pub fn collate_pairs(pairs: &[PreprocessedPair], device: &Device) -> Result<Tensor> {
    ensure!(!pairs.is_empty(), "collate_pairs: no pairs");
    let all: Vec<&Tensor> = pairs
        .iter()
        .map(|p| &p.chosen)
        .chain(pairs.iter().map(|p| &p.rejected))
        .collect();
    let shape = all[0].dims().to_vec();
    for (i, t) in all.iter().enumerate() {
        ensure!(
            t.dims() == shape.as_slice(),
            "collate_pairs: image {i} has shape {:?}, expected {shape:?}",
            t.dims()
        );
    }
    Ok(Tensor::stack(&all, 0)?.to_device(device)?)
}

/// Caption dropout (official Diffusion-DPO `--proportion_empty_prompts`, 0.2 there): returns `""` with
/// probability `p`, else the prompt. Always draws exactly one number, so the stream advances the same way
/// whatever `p` is.
pub fn maybe_drop_caption<'a>(prompt: &'a str, p: f64, rng: &mut Rng) -> &'a str {
    let u = rng.uniform();
    if u < p {
        ""
    } else {
        prompt
    }
}
