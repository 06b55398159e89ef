//! diffusers `AutoencoderKL` (the Stable Diffusion VAE), parameter names as in diffusers 0.42:
//! `encoder.{conv_in, down_blocks.N.{resnets.M, downsamplers.0.conv}, mid_block.{resnets.{0,1},
//! attentions.0.{group_norm, to_q, to_k, to_v, to_out.0}}, conv_norm_out, conv_out}`, `quant_conv`,
//! `post_quant_conv`, `decoder.{conv_in, mid_block, up_blocks.N.{resnets.M, upsamplers.0.conv}, conv_norm_out,
//! conv_out}`. Checkpoints with the pre-0.14 attention names (`query`, `key`, `value`, `proj_attn`) load too.
//!
//! Every op is differentiable: the decoder is backpropagated through for reward gradients, the encoder for
//! image-space objectives.

use crate::autograd;
use crate::error::{read_json, Error};
use crate::models::resnet::{Downsample2D, ResnetBlock2D, ResnetOptions, Upsample2D};
use crate::nn::{attention, merge_heads, split_heads, Activation, Conv2d, GroupNorm, Linear};
use crate::weights::{find_weight_files, Params};
use crate::Result;
use candle_core::{DType, Device, Module, Tensor};
use serde::Deserialize;
use std::path::Path;

/// GroupNorm / ResNet epsilon everywhere in the diffusers VAE (hard-coded there, not in the config).
const VAE_EPS: f64 = 1e-6;

fn d_in_channels() -> usize {
    3
}
fn d_down_blocks() -> Vec<String> {
    vec!["DownEncoderBlock2D".into()]
}
fn d_up_blocks() -> Vec<String> {
    vec!["UpDecoderBlock2D".into()]
}
fn d_block_out_channels() -> Vec<usize> {
    vec![64]
}
fn d_one() -> usize {
    1
}
fn d_act_fn() -> String {
    "silu".into()
}
fn d_latent_channels() -> usize {
    4
}
fn d_groups() -> usize {
    32
}
fn d_sample_size() -> usize {
    32
}
fn d_scaling_factor() -> f64 {
    0.18215
}
fn d_true() -> bool {
    true
}

/// `sample_size` is an int in most configs and a `[h, w]` list in a few; the first entry is kept.
fn de_sample_size<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<usize, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum S {
        One(usize),
        Many(Vec<usize>),
    }
    match S::deserialize(d)? {
        S::One(n) => Ok(n),
        S::Many(v) => v
            .first()
            .copied()
            .ok_or_else(|| serde::de::Error::custom("sample_size is an empty list")),
    }
}

/// `vae/config.json` of a diffusers `AutoencoderKL` (keys and defaults as diffusers 0.42).
#[derive(Clone, Debug, Deserialize)]
pub struct AutoencoderKLConfig {
    #[serde(default = "d_in_channels")]
    pub in_channels: usize,
    #[serde(default = "d_in_channels")]
    pub out_channels: usize,
    #[serde(default = "d_down_blocks")]
    pub down_block_types: Vec<String>,
    #[serde(default = "d_up_blocks")]
    pub up_block_types: Vec<String>,
    #[serde(default = "d_block_out_channels")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "d_one")]
    pub layers_per_block: usize,
    #[serde(default = "d_act_fn")]
    pub act_fn: String,
    #[serde(default = "d_latent_channels")]
    pub latent_channels: usize,
    #[serde(default = "d_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "d_sample_size", deserialize_with = "de_sample_size")]
    pub sample_size: usize,
    #[serde(default = "d_scaling_factor")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default)]
    pub latents_mean: Option<Vec<f64>>,
    #[serde(default)]
    pub latents_std: Option<Vec<f64>>,
    /// diffusers runs this VAE in f32 even in half-precision pipelines (SD1.x/SDXL VAEs overflow in f16).
    #[serde(default = "d_true")]
    pub force_upcast: bool,
    #[serde(default = "d_true")]
    pub use_quant_conv: bool,
    #[serde(default = "d_true")]
    pub use_post_quant_conv: bool,
    #[serde(default = "d_true")]
    pub mid_block_add_attention: bool,
}

impl Default for AutoencoderKLConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("all AutoencoderKLConfig fields have defaults")
    }
}

impl AutoencoderKLConfig {
    /// Reads `config.json` (errors name the file).
    pub fn from_file(path: &Path) -> Result<Self> {
        let cfg: Self = read_json(path)?;
        cfg.validate(&path.display().to_string())?;
        Ok(cfg)
    }

    /// Rejects what this implementation does not build; `file` names the config in the error.
    pub fn validate(&self, file: &str) -> Result<()> {
        let n = self.block_out_channels.len();
        if n == 0 {
            return Err(Error::unsupported(
                file,
                "block_out_channels",
                "[]",
                "at least one block",
            ));
        }
        for t in &self.down_block_types {
            if t != "DownEncoderBlock2D" {
                return Err(Error::unsupported(
                    file,
                    "down_block_types",
                    t,
                    "only DownEncoderBlock2D",
                ));
            }
        }
        for t in &self.up_block_types {
            if t != "UpDecoderBlock2D" {
                return Err(Error::unsupported(
                    file,
                    "up_block_types",
                    t,
                    "only UpDecoderBlock2D",
                ));
            }
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(Error::Invalid {
                file: file.into(),
                msg: format!(
                    "{} down_block_types and {} up_block_types for {n} block_out_channels",
                    self.down_block_types.len(),
                    self.up_block_types.len()
                ),
            });
        }
        if self.layers_per_block == 0 {
            return Err(Error::unsupported(
                file,
                "layers_per_block",
                0,
                "at least 1",
            ));
        }
        if Activation::parse(&self.act_fn).is_none() {
            return Err(Error::unsupported(
                file,
                "act_fn",
                &self.act_fn,
                "silu, gelu, relu, ...",
            ));
        }
        if !self.scaling_factor.is_finite() || self.scaling_factor == 0.0 {
            return Err(Error::unsupported(
                file,
                "scaling_factor",
                self.scaling_factor,
                "non-zero",
            ));
        }
        Ok(())
    }

    fn act(&self) -> Activation {
        Activation::parse(&self.act_fn).unwrap_or(Activation::Silu)
    }

    fn resnet_options(&self) -> ResnetOptions {
        ResnetOptions {
            groups: self.norm_num_groups,
            eps: VAE_EPS,
            temb_channels: None,
            output_scale_factor: 1.0,
            act: self.act(),
        }
    }
}

/// The VAE's single-head spatial self-attention (diffusers `Attention` built with `_from_deprecated_attn_block`:
/// GroupNorm, one head of dim = channels, residual connection, rescale_output_factor 1).
#[derive(Clone)]
pub struct VaeAttention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
}

impl VaeAttention {
    pub fn new(p: &Params, channels: usize, groups: usize) -> Result<Self> {
        let group_norm = GroupNorm::new(&p.pp("group_norm"), groups, channels, VAE_EPS)?;
        // diffusers < 0.14 checkpoints: query / key / value / proj_attn.
        let old = !p.contains("to_q.weight") && p.contains("query.weight");
        let (q, k, v, o) = if old {
            (p.pp("query"), p.pp("key"), p.pp("value"), p.pp("proj_attn"))
        } else {
            (
                p.pp("to_q"),
                p.pp("to_k"),
                p.pp("to_v"),
                p.pp("to_out").pp(0),
            )
        };
        Ok(VaeAttention {
            group_norm,
            to_q: Linear::new(&q, channels, channels, true)?,
            to_k: Linear::new(&k, channels, channels, true)?,
            to_v: Linear::new(&v, channels, channels, true)?,
            to_out: Linear::new(&o, channels, channels, true)?,
            // heads = channels / attention_head_dim with attention_head_dim = channels.
            heads: 1,
        })
    }

    /// `x + to_out(attn(group_norm(x)))` on `[B, C, H, W]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let hs = self.group_norm.forward(x)?;
        let hs = hs.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()?;
        let q = split_heads(&self.to_q.forward(&hs)?, self.heads)?;
        let k = split_heads(&self.to_k.forward(&hs)?, self.heads)?;
        let v = split_heads(&self.to_v.forward(&hs)?, self.heads)?;
        let a = merge_heads(&attention(&q, &k, &v, None, true)?)?;
        let out = self.to_out.forward(&a)?;
        let out = out.transpose(1, 2)?.contiguous()?.reshape((b, c, h, w))?;
        Ok(autograd::add(&out, x)?)
    }
}

/// `UNetMidBlock2D` without time embedding: resnet, [attention, resnet].
#[derive(Clone)]
pub struct VaeMidBlock {
    resnets: Vec<ResnetBlock2D>,
    attention: Option<VaeAttention>,
}

impl VaeMidBlock {
    fn new(p: &Params, channels: usize, cfg: &AutoencoderKLConfig) -> Result<Self> {
        let o = cfg.resnet_options();
        let resnets = (0..2)
            .map(|i| ResnetBlock2D::new(&p.pp("resnets").pp(i), channels, channels, o))
            .collect::<Result<Vec<_>>>()?;
        let attention = if cfg.mid_block_add_attention {
            Some(VaeAttention::new(
                &p.pp("attentions").pp(0),
                channels,
                cfg.norm_num_groups,
            )?)
        } else {
            None
        };
        Ok(VaeMidBlock { resnets, attention })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.resnets[0].forward(x, None)?;
        if let Some(a) = &self.attention {
            h = a.forward(&h)?;
        }
        self.resnets[1].forward(&h, None)
    }
}

#[derive(Clone)]
struct DownEncoderBlock2D {
    resnets: Vec<ResnetBlock2D>,
    downsampler: Option<Downsample2D>,
}

#[derive(Clone)]
struct UpDecoderBlock2D {
    resnets: Vec<ResnetBlock2D>,
    upsampler: Option<Upsample2D>,
}

/// The VAE encoder: image `[B, in, H, W]` -> moments `[B, 2·latent, H/f, W/f]` (before `quant_conv`).
#[derive(Clone)]
pub struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<DownEncoderBlock2D>,
    mid_block: VaeMidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    pub fn new(p: &Params, cfg: &AutoencoderKLConfig) -> Result<Self> {
        let ch = &cfg.block_out_channels;
        let n = ch.len();
        let o = cfg.resnet_options();
        let conv_in = Conv2d::new(&p.pp("conv_in"), cfg.in_channels, ch[0], 3, 1, 1)?;
        let mut down_blocks = Vec::with_capacity(n);
        let mut out_c = ch[0];
        for (i, &c) in ch.iter().enumerate() {
            let in_c = out_c;
            out_c = c;
            let bp = p.pp("down_blocks").pp(i);
            let resnets = (0..cfg.layers_per_block)
                .map(|j| {
                    ResnetBlock2D::new(
                        &bp.pp("resnets").pp(j),
                        if j == 0 { in_c } else { out_c },
                        out_c,
                        o,
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let downsampler = if i + 1 < n {
                Some(Downsample2D::new(
                    &bp.pp("downsamplers").pp(0),
                    out_c,
                    out_c,
                    0,
                )?)
            } else {
                None
            };
            down_blocks.push(DownEncoderBlock2D {
                resnets,
                downsampler,
            });
        }
        let last = ch[n - 1];
        Ok(Encoder {
            conv_in,
            down_blocks,
            mid_block: VaeMidBlock::new(&p.pp("mid_block"), last, cfg)?,
            conv_norm_out: GroupNorm::new(
                &p.pp("conv_norm_out"),
                cfg.norm_num_groups,
                last,
                VAE_EPS,
            )?,
            conv_out: Conv2d::new(&p.pp("conv_out"), last, 2 * cfg.latent_channels, 3, 1, 1)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        for b in &self.down_blocks {
            for r in &b.resnets {
                h = r.forward(&h, None)?;
            }
            if let Some(d) = &b.downsampler {
                h = d.forward(&h)?;
            }
        }
        let h = self.mid_block.forward(&h)?;
        // diffusers' conv_act is a hard-coded SiLU whatever act_fn says.
        let h = self.conv_norm_out.forward(&h)?.silu()?;
        Ok(self.conv_out.forward(&h)?)
    }
}

/// The VAE decoder: latents `[B, latent, h, w]` (after `post_quant_conv`) -> image `[B, out, h·f, w·f]`.
#[derive(Clone)]
pub struct Decoder {
    conv_in: Conv2d,
    mid_block: VaeMidBlock,
    up_blocks: Vec<UpDecoderBlock2D>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    pub fn new(p: &Params, cfg: &AutoencoderKLConfig) -> Result<Self> {
        let ch = &cfg.block_out_channels;
        let n = ch.len();
        let o = cfg.resnet_options();
        let last = ch[n - 1];
        let conv_in = Conv2d::new(&p.pp("conv_in"), cfg.latent_channels, last, 3, 1, 1)?;
        let mid_block = VaeMidBlock::new(&p.pp("mid_block"), last, cfg)?;
        let mut up_blocks = Vec::with_capacity(n);
        let mut out_c = last;
        for (i, &c) in ch.iter().rev().enumerate() {
            let in_c = out_c;
            out_c = c;
            let bp = p.pp("up_blocks").pp(i);
            let resnets = (0..cfg.layers_per_block + 1)
                .map(|j| {
                    ResnetBlock2D::new(
                        &bp.pp("resnets").pp(j),
                        if j == 0 { in_c } else { out_c },
                        out_c,
                        o,
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let upsampler = if i + 1 < n {
                Some(Upsample2D::new(&bp.pp("upsamplers").pp(0), out_c, out_c)?)
            } else {
                None
            };
            up_blocks.push(UpDecoderBlock2D { resnets, upsampler });
        }
        Ok(Decoder {
            conv_in,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNorm::new(
                &p.pp("conv_norm_out"),
                cfg.norm_num_groups,
                ch[0],
                VAE_EPS,
            )?,
            conv_out: Conv2d::new(&p.pp("conv_out"), ch[0], cfg.out_channels, 3, 1, 1)?,
        })
    }

    pub fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let h = self.conv_in.forward(z)?;
        let mut h = self.mid_block.forward(&h)?;
        for b in &self.up_blocks {
            for r in &b.resnets {
                h = r.forward(&h, None)?;
            }
            if let Some(u) = &b.upsampler {
                h = u.forward(&h, None)?;
            }
        }
        let h = self.conv_norm_out.forward(&h)?.silu()?;
        Ok(self.conv_out.forward(&h)?)
    }
}

/// The encoder's posterior `N(mean, std²)` (diffusers `DiagonalGaussianDistribution`), logvar clamped to
/// [-30, 20].
#[derive(Clone, Debug)]
pub struct DiagonalGaussian {
    pub mean: Tensor,
    pub logvar: Tensor,
    pub std: Tensor,
}

impl DiagonalGaussian {
    /// Splits `moments` `[B, 2·C, h, w]` into mean (channels `0..C`) and logvar (`C..2C`).
    pub fn from_moments(moments: &Tensor) -> Result<Self> {
        let c2 = moments.dim(1)?;
        if c2 % 2 != 0 {
            return Err(Error::msg(format!(
                "VAE moments have {c2} channels, expected an even number (mean and logvar)"
            )));
        }
        let c = c2 / 2;
        let mean = moments.narrow(1, 0, c)?;
        let logvar = moments.narrow(1, c, c)?.clamp(-30f64, 20f64)?;
        let std = (&logvar * 0.5)?.exp()?;
        Ok(DiagonalGaussian { mean, logvar, std })
    }

    /// `mean + std · noise`; standard normal noise is drawn when `noise` is `None`.
    pub fn sample(&self, noise: Option<&Tensor>) -> Result<Tensor> {
        let noise = match noise {
            Some(n) => n
                .to_dtype(self.mean.dtype())?
                .to_device(self.mean.device())?,
            None => self.mean.randn_like(0.0, 1.0)?,
        };
        Ok((&self.mean + (&self.std * noise)?)?)
    }

    /// The mean (the distribution's mode).
    pub fn mode(&self) -> Tensor {
        self.mean.clone()
    }

    /// `exp(logvar)`.
    pub fn var(&self) -> Result<Tensor> {
        Ok(self.logvar.exp()?)
    }

    /// KL divergence to N(0, I) per sample, `0.5 · Σ(mean² + var - 1 - logvar)` over `[C, h, w]`, shape `[B]`.
    pub fn kl(&self) -> Result<Tensor> {
        let t = ((self.mean.sqr()? + self.var()?)? - 1.0)?;
        let t = (t - &self.logvar)?;
        Ok((t.flatten_from(1)?.sum(1)? * 0.5)?)
    }
}

/// diffusers `AutoencoderKL`.
#[derive(Clone)]
pub struct AutoencoderKL {
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    config: AutoencoderKLConfig,
}

impl AutoencoderKL {
    /// Builds the model from `p` (names relative to the VAE root: `encoder.conv_in.weight`, ...).
    pub fn new(p: &Params, cfg: AutoencoderKLConfig) -> Result<Self> {
        cfg.validate("AutoencoderKL config")?;
        let l = cfg.latent_channels;
        let encoder = Encoder::new(&p.pp("encoder"), &cfg)?;
        let quant_conv = if cfg.use_quant_conv {
            Some(Conv2d::new(&p.pp("quant_conv"), 2 * l, 2 * l, 1, 1, 0)?)
        } else {
            None
        };
        let post_quant_conv = if cfg.use_post_quant_conv {
            Some(Conv2d::new(&p.pp("post_quant_conv"), l, l, 1, 1, 0)?)
        } else {
            None
        };
        let decoder = Decoder::new(&p.pp("decoder"), &cfg)?;
        Ok(AutoencoderKL {
            encoder,
            decoder,
            quant_conv,
            post_quant_conv,
            config: cfg,
        })
    }

    /// Loads a diffusers `vae/` folder: `config.json` and `diffusion_pytorch_model[.variant].safetensors`
    /// (or its sharded index).
    pub fn load(
        dir: impl AsRef<Path>,
        variant: Option<&str>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let dir = dir.as_ref();
        let cfg = AutoencoderKLConfig::from_file(&dir.join("config.json"))?;
        let files = find_weight_files(dir, "diffusion_pytorch_model", variant)?;
        let p = Params::from_files(&files, dtype, device)?;
        Self::new(&p, cfg)
    }

    pub fn config(&self) -> &AutoencoderKLConfig {
        &self.config
    }

    pub fn encoder(&self) -> &Encoder {
        &self.encoder
    }

    pub fn decoder(&self) -> &Decoder {
        &self.decoder
    }

    /// Pixel size of one latent: `2^(number of blocks - 1)` (8 for SD).
    pub fn downscale_factor(&self) -> usize {
        1 << (self.config.block_out_channels.len() - 1)
    }

    /// Posterior of images `x` in [-1, 1], `[B, C, H, W]`.
    pub fn encode(&self, x: &Tensor) -> Result<DiagonalGaussian> {
        let h = self.encoder.forward(x)?;
        let moments = match &self.quant_conv {
            Some(c) => c.forward(&h)?,
            None => h,
        };
        DiagonalGaussian::from_moments(&moments)
    }

    /// Scaled latents of images `x` in [-1, 1]: `scale_latents(posterior.sample(noise))` (training inputs).
    pub fn encode_latents(&self, x: &Tensor, noise: Option<&Tensor>) -> Result<Tensor> {
        self.scale_latents(&self.encode(x)?.sample(noise)?)
    }

    /// Raw decoder output (≈ [-1, 1], not clamped) of UNSCALED latents: `decoder(post_quant_conv(z))`.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let z = match &self.post_quant_conv {
            Some(c) => c.forward(z)?,
            None => z.clone(),
        };
        self.decoder.forward(&z)
    }

    /// Latents in the diffusion model's space: `(z - shift_factor) · scaling_factor`.
    pub fn scale_latents(&self, z: &Tensor) -> Result<Tensor> {
        let z = match self.config.shift_factor {
            Some(s) => (z - s)?,
            None => z.clone(),
        };
        Ok((z * self.config.scaling_factor)?)
    }

    /// Inverse of [`AutoencoderKL::scale_latents`]: `z / scaling_factor + shift_factor`.
    pub fn unscale_latents(&self, z: &Tensor) -> Result<Tensor> {
        let z = (z / self.config.scaling_factor)?;
        Ok(match self.config.shift_factor {
            Some(s) => (z + s)?,
            None => z,
        })
    }

    /// Images in [0, 1] from scaled latents: `clamp(decode(unscale(z)) / 2 + 0.5, 0, 1)` (differentiable; the
    /// clamp zeroes the gradient of out-of-range pixels).
    pub fn decode_to_image01(&self, latents_scaled: &Tensor) -> Result<Tensor> {
        let x = self.decode(&self.unscale_latents(latents_scaled)?)?;
        Ok(x.affine(0.5, 0.5)?.clamp(0f64, 1f64)?)
    }
}
