//! The BLIP image encoder (a timm-style ViT) as ImageReward runs it.
//!
//! Patch embedding (a convolution with kernel = stride = patch, with bias) → flatten → class token in front →
//! learned absolute positions → pre-norm blocks (`norm1` → self-attention with a packed `qkv` projection →
//! `proj` → residual; `norm2` → `fc1` → activation → `fc2` → residual) → the final `norm` applied to EVERY
//! token. The output is the whole normed token sequence `[B, 1 + patches, W]` (ImageReward cross-attends to
//! all of it), not a pooled vector.
//!
//! Parameter names are those of ImageReward's checkpoint under `blip.visual_encoder.`: `cls_token [1, 1, W]`,
//! `pos_embed [1, 1 + P, W]`, `patch_embed.proj.{weight, bias}`, `blocks.N.{norm1, attn.qkv, attn.proj, norm2,
//! mlp.fc1, mlp.fc2}`, `norm`. Every op is differentiable (LayerNorm and softmax from primitives), so the
//! pixel gradient reaches the input.

use crate::{Error, Result};
use candle_core::{DType, Device, Module, Tensor};
use diffpref_pipelines::nn::{
    attention, merge_heads, split_heads, Activation, Conv2d, LayerNorm, Linear,
};
use diffpref_pipelines::Params;

fn default_image_size() -> usize {
    224
}
fn default_patch() -> usize {
    16
}
fn default_width() -> usize {
    1024
}
fn default_depth() -> usize {
    24
}
fn default_heads() -> usize {
    16
}
fn default_mlp_ratio() -> f64 {
    4.0
}
fn default_eps() -> f64 {
    1e-6
}
fn default_act() -> String {
    "gelu".into()
}
fn default_true() -> bool {
    true
}

/// The ViT hyper-parameters (the `vision` object of an ImageReward folder's `config.json`, in timm's names).
/// The defaults are ImageReward-v1.0's: BLIP ViT-L/16 at 224 px (`create_vit('large', 224)`).
#[derive(Clone, Debug, PartialEq, serde::Deserialize, serde::Serialize)]
pub struct BlipVisionConfig {
    #[serde(default = "default_image_size", alias = "image_size")]
    pub img_size: usize,
    #[serde(default = "default_patch")]
    pub patch_size: usize,
    /// Token width W.
    #[serde(default = "default_width", alias = "width", alias = "hidden_size")]
    pub embed_dim: usize,
    /// Number of blocks.
    #[serde(default = "default_depth", alias = "num_layers")]
    pub depth: usize,
    #[serde(default = "default_heads", alias = "num_attention_heads")]
    pub num_heads: usize,
    /// MLP hidden size = `mlp_ratio * embed_dim`.
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: f64,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// `gelu` (exact erf, timm's default) or another [`Activation::parse`] name.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_true")]
    pub qkv_bias: bool,
    /// Input channels (3).
    #[serde(default)]
    pub in_chans: Option<usize>,
}

impl Default for BlipVisionConfig {
    fn default() -> Self {
        BlipVisionConfig {
            img_size: default_image_size(),
            patch_size: default_patch(),
            embed_dim: default_width(),
            depth: default_depth(),
            num_heads: default_heads(),
            mlp_ratio: default_mlp_ratio(),
            layer_norm_eps: default_eps(),
            hidden_act: default_act(),
            qkv_bias: true,
            in_chans: None,
        }
    }
}

impl BlipVisionConfig {
    /// Patches per image side.
    pub fn grid(&self) -> usize {
        self.img_size / self.patch_size.max(1)
    }

    /// Tokens per image: 1 (class token) + patches.
    pub fn num_tokens(&self) -> usize {
        1 + self.grid() * self.grid()
    }

    /// The MLP hidden size (`int(embed_dim * mlp_ratio)`, as timm).
    pub fn mlp_hidden(&self) -> usize {
        (self.embed_dim as f64 * self.mlp_ratio) as usize
    }

    pub fn in_channels(&self) -> usize {
        self.in_chans.unwrap_or(3)
    }

    /// Checks the sizes; `file` names the config in errors.
    pub fn validate(&self, file: &str) -> Result<()> {
        let bad = |msg: String| -> Result<()> {
            Err(Error::msg(format!("{file}: vision config: {msg}")))
        };
        if self.patch_size == 0
            || self.img_size == 0
            || !self.img_size.is_multiple_of(self.patch_size)
        {
            return bad(format!(
                "img_size {} is not a positive multiple of patch_size {}",
                self.img_size, self.patch_size
            ));
        }
        if self.num_heads == 0 || !self.embed_dim.is_multiple_of(self.num_heads) {
            return bad(format!(
                "embed_dim {} is not divisible by num_heads {}",
                self.embed_dim, self.num_heads
            ));
        }
        if self.mlp_hidden() == 0 {
            return bad(format!("mlp_ratio {} gives an empty MLP", self.mlp_ratio));
        }
        self.activation(file)?;
        Ok(())
    }

    /// The MLP activation named by `hidden_act`.
    pub fn activation(&self, file: &str) -> Result<Activation> {
        Activation::parse(&self.hidden_act).ok_or_else(|| {
            Error::msg(format!(
                "{file}: vision config: unsupported hidden_act {:?} (supported: gelu, gelu_new, \
                 gelu_pytorch_tanh, quick_gelu, silu, relu)",
                self.hidden_act
            ))
        })
    }
}

/// One pre-norm ViT block (`blocks.N`).
#[derive(Clone)]
struct VitBlock {
    norm1: LayerNorm,
    qkv: Linear,
    proj: Linear,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
    act: Activation,
}

impl VitBlock {
    fn new(p: &Params, cfg: &BlipVisionConfig, act: Activation) -> Result<Self> {
        let w = cfg.embed_dim;
        let eps = cfg.layer_norm_eps;
        Ok(VitBlock {
            norm1: LayerNorm::new(&p.pp("norm1"), w, eps)?,
            qkv: Linear::new(&p.pp("attn").pp("qkv"), w, 3 * w, cfg.qkv_bias)?,
            proj: Linear::new(&p.pp("attn").pp("proj"), w, w, true)?,
            norm2: LayerNorm::new(&p.pp("norm2"), w, eps)?,
            fc1: Linear::new(&p.pp("mlp").pp("fc1"), w, cfg.mlp_hidden(), true)?,
            fc2: Linear::new(&p.pp("mlp").pp("fc2"), cfg.mlp_hidden(), w, true)?,
            heads: cfg.num_heads,
            act,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let w = x.dim(2)?;
        let h = self.norm1.forward(x)?;
        // qkv output columns are [q | k | v], each head-major (timm reshapes to (B, N, 3, H, d)).
        let qkv = self.qkv.forward(&h)?;
        let q = split_heads(&qkv.narrow(2, 0, w)?, self.heads)?;
        let k = split_heads(&qkv.narrow(2, w, w)?, self.heads)?;
        let v = split_heads(&qkv.narrow(2, 2 * w, w)?, self.heads)?;
        let o = merge_heads(&attention(&q, &k, &v, None, false)?)?;
        let x = (x + self.proj.forward(&o)?)?;
        let h = self.norm2.forward(&x)?;
        let h = self.fc2.forward(&self.act.apply(&self.fc1.forward(&h)?)?)?;
        x + h
    }
}

/// BLIP's `VisionTransformer` (ImageReward's `blip.visual_encoder`).
#[derive(Clone)]
pub struct BlipVisionModel {
    patch_embed: Conv2d,
    cls_token: Tensor,
    pos_embed: Tensor,
    blocks: Vec<VitBlock>,
    norm: LayerNorm,
    pub config: BlipVisionConfig,
}

impl BlipVisionModel {
    /// Builds the encoder from `p` viewed at the encoder's prefix (`blip.visual_encoder`).
    pub fn new(p: &Params, config: BlipVisionConfig) -> Result<Self> {
        config.validate("the BLIP vision config")?;
        let act = config.activation("the BLIP vision config")?;
        let w = config.embed_dim;
        let patch_embed = Conv2d::new(
            &p.pp("patch_embed").pp("proj"),
            config.in_channels(),
            w,
            config.patch_size,
            config.patch_size,
            0,
        )?;
        let cls_token = p.get((1, 1, w), "cls_token")?;
        let pos_embed = p.get((1, config.num_tokens(), w), "pos_embed")?;
        let blocks = (0..config.depth)
            .map(|i| VitBlock::new(&p.pp("blocks").pp(i), &config, act))
            .collect::<Result<Vec<_>>>()?;
        let norm = LayerNorm::new(&p.pp("norm"), w, config.layer_norm_eps)?;
        Ok(BlipVisionModel {
            patch_embed,
            cls_token,
            pos_embed,
            blocks,
            norm,
            config,
        })
    }

    pub fn dtype(&self) -> DType {
        self.cls_token.dtype()
    }

    pub fn device(&self) -> &Device {
        self.cls_token.device()
    }

    /// `pixel_values` `[B, C, S, S]` (normalised, S = `img_size`) → `[B, 1 + patches, W]`, the final `norm`
    /// applied to every token.
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let cfg = &self.config;
        let dims = pixel_values.dims();
        let s = cfg.img_size;
        if dims.len() != 4 || dims[1] != cfg.in_channels() || dims[2] != s || dims[3] != s {
            return Err(Error::msg(format!(
                "BLIP vision encoder: pixel_values has shape {dims:?}, expected [B, {}, {s}, {s}] \
                 (img_size {s}; positions are not interpolated)",
                cfg.in_channels()
            )));
        }
        let b = dims[0];
        let w = cfg.embed_dim;
        let x = pixel_values
            .to_device(self.device())?
            .to_dtype(self.dtype())?;
        // [B, W, g, g] → [B, g·g, W] (row-major patch order, as timm's flatten(2).transpose(1, 2)).
        let x = self.patch_embed.forward(&x)?;
        let x = x.flatten_from(2)?.transpose(1, 2)?.contiguous()?;
        let cls = self.cls_token.broadcast_as((b, 1, w))?;
        let x = Tensor::cat(&[&cls, &x], 1)?;
        let mut x = x.broadcast_add(&self.pos_embed)?;
        for block in &self.blocks {
            x = block.forward(&x)?;
        }
        Ok(self.norm.forward(&x)?)
    }
}
