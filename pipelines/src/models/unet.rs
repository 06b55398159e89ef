//! `UNet2DConditionModel` (SD 1.x, SD 2.x, SDXL), built from the model's `unet/config.json`.
//!
//! ε̂ = UNet(x_t, t, c): `conv_in` → down blocks (ResNets, optional `Transformer2DModel` cross-attention to the
//! text states `c`, stride-2 downsampling) → mid block → up blocks (skip connections concatenated) →
//! GroupNorm, SiLU, `conv_out`. The time embedding is `TimestepEmbedding(sinusoid(t))`, per sample; SDXL
//! (`addition_embed_type: "text_time"`) adds `add_embedding([pooled_text, sinusoid(time_ids)])`.
//!
//! Config quirk kept from diffusers: when `num_attention_heads` is null, `attention_head_dim` is the NUMBER of
//! heads per block (head size = channels / heads).

use super::attention::{Transformer2DModel, TransformerOptions};
use super::embeddings::{timestep_embedding, TimestepEmbedding};
use super::resnet::{Downsample2D, ResnetBlock2D, ResnetOptions, Upsample2D};
use crate::autograd;
use crate::error::{Error, Result};
use crate::nn::{Activation, Conv2d, GroupNorm, Layer};
use crate::weights::Params;
use candle_core::{DType, Device, Module, Tensor};
use serde::Deserialize;
use serde_json::Value;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The keys of diffusers' `UNet2DConditionModel` config that diffpref reads. Int-or-list keys are kept as JSON
/// and resolved per block by [`UNet2DConditionConfig::per_block`].
#[derive(Clone, Debug, Deserialize)]
pub struct UNet2DConditionConfig {
    #[serde(default = "d_4")]
    pub in_channels: usize,
    #[serde(default = "d_4")]
    pub out_channels: usize,
    #[serde(default)]
    pub sample_size: Option<Value>,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default = "d_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    pub down_block_types: Vec<String>,
    #[serde(default = "d_mid")]
    pub mid_block_type: Option<String>,
    pub up_block_types: Vec<String>,
    #[serde(default)]
    pub only_cross_attention: Value,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "d_layers")]
    pub layers_per_block: Value,
    #[serde(default = "d_1")]
    pub downsample_padding: usize,
    #[serde(default = "d_1f")]
    pub mid_block_scale_factor: f64,
    #[serde(default = "d_silu")]
    pub act_fn: String,
    #[serde(default = "d_groups")]
    pub norm_num_groups: Option<usize>,
    #[serde(default = "d_eps")]
    pub norm_eps: f64,
    #[serde(default = "d_cross")]
    pub cross_attention_dim: Value,
    #[serde(default)]
    pub transformer_layers_per_block: Value,
    #[serde(default)]
    pub reverse_transformer_layers_per_block: Value,
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
    #[serde(default = "d_head")]
    pub attention_head_dim: Value,
    #[serde(default)]
    pub num_attention_heads: Value,
    #[serde(default)]
    pub dual_cross_attention: bool,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    #[serde(default)]
    pub num_class_embeds: Option<usize>,
    #[serde(default)]
    pub upcast_attention: bool,
    #[serde(default = "d_default")]
    pub resnet_time_scale_shift: String,
    #[serde(default = "d_1f")]
    pub resnet_out_scale_factor: f64,
    #[serde(default = "d_positional")]
    pub time_embedding_type: String,
    #[serde(default)]
    pub time_embedding_dim: Option<usize>,
    #[serde(default)]
    pub time_embedding_act_fn: Option<String>,
    #[serde(default)]
    pub timestep_post_act: Option<String>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default = "d_3")]
    pub conv_in_kernel: usize,
    #[serde(default = "d_3")]
    pub conv_out_kernel: usize,
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    #[serde(default)]
    pub mid_block_only_cross_attention: Option<bool>,
    #[serde(default)]
    pub cross_attention_norm: Option<String>,
    #[serde(default = "d_attn_type")]
    pub attention_type: String,
    #[serde(default)]
    pub resnet_skip_time_act: bool,
    #[serde(default)]
    pub class_embeddings_concat: bool,
    #[serde(default)]
    pub prediction_type: Option<String>,
}

fn d_4() -> usize {
    4
}
fn d_1() -> usize {
    1
}
fn d_3() -> usize {
    3
}
fn d_1f() -> f64 {
    1.0
}
fn d_true() -> bool {
    true
}
fn d_mid() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn d_layers() -> Value {
    Value::from(2)
}
fn d_silu() -> String {
    "silu".into()
}
fn d_groups() -> Option<usize> {
    Some(32)
}
fn d_eps() -> f64 {
    1e-5
}
fn d_cross() -> Value {
    Value::from(1280)
}
fn d_head() -> Value {
    Value::from(8)
}
fn d_default() -> String {
    "default".into()
}
fn d_positional() -> String {
    "positional".into()
}
fn d_attn_type() -> String {
    "default".into()
}

const FILE: &str = "unet/config.json";

impl UNet2DConditionConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let cfg: Self = crate::error::read_json(path)?;
        cfg.validate(&path.display().to_string())?;
        Ok(cfg)
    }

    /// A per-block value from an int-or-list key (`n` blocks).
    pub fn per_block(&self, key: &str, v: &Value, n: usize) -> Result<Vec<usize>> {
        match v {
            Value::Number(x) => {
                let x = x.as_u64().ok_or_else(|| {
                    Error::unsupported(FILE, key, x, "expected a positive integer")
                })?;
                Ok(vec![x as usize; n])
            }
            Value::Array(a) if a.len() == n => a
                .iter()
                .map(|e| {
                    e.as_u64()
                        .map(|x| x as usize)
                        .ok_or_else(|| Error::unsupported(FILE, key, e, "expected integers"))
                })
                .collect(),
            other => Err(Error::unsupported(
                FILE,
                key,
                other,
                format!("expected an integer or a list of {n} integers"),
            )),
        }
    }

    fn per_block_bool(&self, key: &str, v: &Value, n: usize) -> Result<Vec<bool>> {
        match v {
            Value::Null => Ok(vec![false; n]),
            Value::Bool(b) => Ok(vec![*b; n]),
            Value::Array(a) if a.len() == n => a
                .iter()
                .map(|e| {
                    e.as_bool()
                        .ok_or_else(|| Error::unsupported(FILE, key, e, "expected booleans"))
                })
                .collect(),
            other => Err(Error::unsupported(
                FILE,
                key,
                other,
                "expected a boolean or a list",
            )),
        }
    }

    fn validate(&self, file: &str) -> Result<()> {
        let un = |k: &str, v: &dyn std::fmt::Display, hint: &str| {
            Err(Error::unsupported(file, k, v, hint))
        };
        let n = self.block_out_channels.len();
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(Error::Invalid {
                file: file.into(),
                msg: "block_out_channels, down_block_types and up_block_types must have the same non-zero length"
                    .into(),
            });
        }
        for t in &self.down_block_types {
            if t != "DownBlock2D" && t != "CrossAttnDownBlock2D" {
                return un(
                    "down_block_types",
                    t,
                    "supported: DownBlock2D, CrossAttnDownBlock2D",
                );
            }
        }
        for t in &self.up_block_types {
            if t != "UpBlock2D" && t != "CrossAttnUpBlock2D" {
                return un(
                    "up_block_types",
                    t,
                    "supported: UpBlock2D, CrossAttnUpBlock2D",
                );
            }
        }
        match self.mid_block_type.as_deref() {
            Some("UNetMidBlock2DCrossAttn") | Some("UNetMidBlock2D") | None => {}
            Some(t) => {
                return un(
                    "mid_block_type",
                    &t,
                    "supported: UNetMidBlock2DCrossAttn, UNetMidBlock2D",
                )
            }
        }
        if let Some(t) = &self.class_embed_type {
            return un("class_embed_type", t, "class embeddings are not supported");
        }
        if let Some(x) = self.num_class_embeds {
            return un("num_class_embeds", &x, "class embeddings are not supported");
        }
        match self.addition_embed_type.as_deref() {
            None | Some("text_time") => {}
            Some(t) => {
                return un(
                    "addition_embed_type",
                    &t,
                    "supported: null, text_time (SDXL)",
                )
            }
        }
        if let Some(x) = self.encoder_hid_dim {
            return un("encoder_hid_dim", &x, "encoder_hid_proj is not supported");
        }
        if let Some(x) = self.time_cond_proj_dim {
            return un(
                "time_cond_proj_dim",
                &x,
                "guidance-embedding (LCM) UNets are not supported",
            );
        }
        if self.dual_cross_attention {
            return un("dual_cross_attention", &true, "");
        }
        if self.resnet_time_scale_shift != "default" {
            return un(
                "resnet_time_scale_shift",
                &self.resnet_time_scale_shift,
                "supported: default",
            );
        }
        if self.time_embedding_type != "positional" {
            return un(
                "time_embedding_type",
                &self.time_embedding_type,
                "supported: positional",
            );
        }
        if self.attention_type != "default" {
            return un("attention_type", &self.attention_type, "supported: default");
        }
        if let Some(x) = &self.cross_attention_norm {
            return un("cross_attention_norm", x, "supported: null");
        }
        if self.resnet_skip_time_act || self.class_embeddings_concat {
            return un("resnet_skip_time_act/class_embeddings_concat", &true, "");
        }
        if !self.reverse_transformer_layers_per_block.is_null() {
            return un(
                "reverse_transformer_layers_per_block",
                &self.reverse_transformer_layers_per_block,
                "only null is supported",
            );
        }
        if self.conv_in_kernel.is_multiple_of(2) || self.conv_out_kernel.is_multiple_of(2) {
            return un(
                "conv_in_kernel/conv_out_kernel",
                &self.conv_in_kernel,
                "kernels must be odd",
            );
        }
        if Activation::parse(&self.act_fn).is_none() {
            return un("act_fn", &self.act_fn, "");
        }
        if self.norm_num_groups.is_none() {
            return un("norm_num_groups", &"null", "GroupNorm is required");
        }
        Ok(())
    }

    /// Attention heads per down block (`num_attention_heads`, else the misnamed `attention_head_dim`).
    pub fn heads(&self) -> Result<Vec<usize>> {
        let n = self.block_out_channels.len();
        if self.num_attention_heads.is_null() {
            self.per_block("attention_head_dim", &self.attention_head_dim, n)
        } else {
            self.per_block("num_attention_heads", &self.num_attention_heads, n)
        }
    }

    /// Whether this is an SDXL-style UNet with `text_time` micro-conditioning.
    pub fn uses_text_time(&self) -> bool {
        self.addition_embed_type.as_deref() == Some("text_time")
    }

    /// The spatial down-scaling between the UNet input and its lowest resolution.
    pub fn downscale_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

/// SDXL micro-conditioning: pooled projected text embeddings `[B, P]` and time ids `[B, 6]`
/// (original size, crop top-left, target size).
#[derive(Clone, Debug)]
pub struct AddedCond {
    pub text_embeds: Tensor,
    pub time_ids: Tensor,
}

/// UNet output with the intermediate features latent reward models read.
#[derive(Clone, Debug)]
pub struct UNetOutput {
    /// The prediction (ε, v or x₀, as the scheduler config says), `[B, out, h, w]`.
    pub sample: Tensor,
    /// Per down block, its last resnet (+ attention) output before the block's downsampler: diffusers'
    /// `down_block_res_samples` at indices 2, 5, 8, 11 for SD1.5 (2, 5, 8 for SDXL), the taps of the latent
    /// reward model (LRM, Zhang et al. 2025, §3.1).
    pub down_features: Vec<Tensor>,
    /// The mid-block output.
    pub mid_feature: Option<Tensor>,
}

#[derive(Clone)]
struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    downsampler: Option<Downsample2D>,
}

#[derive(Clone)]
struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    upsampler: Option<Upsample2D>,
}

#[derive(Clone)]
struct MidBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
}

#[derive(Clone)]
struct AddEmbedding {
    time_dim: usize,
    embedding: TimestepEmbedding,
}

/// diffusers' `UNet2DConditionModel`.
#[derive(Clone)]
pub struct UNet2DConditionModel {
    config: UNet2DConditionConfig,
    time_embedding: TimestepEmbedding,
    add_embedding: Option<AddEmbedding>,
    timestep_post_act: Option<Activation>,
    conv_in: Conv2d,
    down_blocks: Vec<DownBlock>,
    mid_block: Option<MidBlock>,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    act: Activation,
    layers: Vec<Layer>,
    /// Gradient checkpointing of every resnet and transformer block (shared by clones).
    checkpointing: Arc<AtomicBool>,
}

impl UNet2DConditionModel {
    /// Loads `config.json` and the weights (`diffusion_pytorch_model[.variant].safetensors`, or shards) of a
    /// diffusers `unet/` folder.
    pub fn load(
        dir: impl AsRef<Path>,
        variant: Option<&str>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let dir = dir.as_ref();
        let cfg = UNet2DConditionConfig::load(&dir.join("config.json"))?;
        let files = crate::weights::find_weight_files(dir, "diffusion_pytorch_model", variant)?;
        let p = Params::from_files(&files, dtype, device)?;
        Self::new(&p, cfg)
    }

    /// Builds the model from any parameter source (files, a map, random init, trainable vars).
    pub fn new(p: &Params, cfg: UNet2DConditionConfig) -> Result<Self> {
        cfg.validate(FILE)?;
        let n = cfg.block_out_channels.len();
        let boc = cfg.block_out_channels.clone();
        let act = Activation::parse(&cfg.act_fn).unwrap();
        let groups = cfg.norm_num_groups.unwrap();
        let eps = cfg.norm_eps;
        let heads = cfg.heads()?;
        let layers_per_block = cfg.per_block("layers_per_block", &cfg.layers_per_block, n)?;
        let cross_dims = cfg.per_block("cross_attention_dim", &cfg.cross_attention_dim, n)?;
        let tlayers = if cfg.transformer_layers_per_block.is_null() {
            vec![1; n]
        } else {
            cfg.per_block(
                "transformer_layers_per_block",
                &cfg.transformer_layers_per_block,
                n,
            )?
        };
        let only_cross =
            cfg.per_block_bool("only_cross_attention", &cfg.only_cross_attention, n)?;

        let t_in = boc[0];
        let temb_dim = cfg.time_embedding_dim.unwrap_or(boc[0] * 4);
        let time_act = match &cfg.time_embedding_act_fn {
            Some(a) => Some(
                Activation::parse(a)
                    .ok_or_else(|| Error::unsupported(FILE, "time_embedding_act_fn", a, ""))?,
            ),
            None => None,
        };
        if time_act.is_some() {
            return Err(Error::unsupported(
                FILE,
                "time_embedding_act_fn",
                cfg.time_embedding_act_fn.as_ref().unwrap(),
                "only null is supported",
            ));
        }
        let time_embedding = TimestepEmbedding::new(&p.pp("time_embedding"), t_in, temb_dim, act)?;
        let timestep_post_act = match &cfg.timestep_post_act {
            Some(a) => Some(
                Activation::parse(a)
                    .ok_or_else(|| Error::unsupported(FILE, "timestep_post_act", a, ""))?,
            ),
            None => None,
        };
        let add_embedding = if cfg.uses_text_time() {
            let time_dim = cfg.addition_time_embed_dim.ok_or_else(|| {
                Error::unsupported(
                    FILE,
                    "addition_time_embed_dim",
                    "null",
                    "text_time needs addition_time_embed_dim",
                )
            })?;
            let in_dim = cfg.projection_class_embeddings_input_dim.ok_or_else(|| {
                Error::unsupported(
                    FILE,
                    "projection_class_embeddings_input_dim",
                    "null",
                    "text_time needs projection_class_embeddings_input_dim",
                )
            })?;
            Some(AddEmbedding {
                time_dim,
                embedding: TimestepEmbedding::new(&p.pp("add_embedding"), in_dim, temb_dim, act)?,
            })
        } else {
            None
        };
        let pad_in = (cfg.conv_in_kernel - 1) / 2;
        let conv_in = Conv2d::new(
            &p.pp("conv_in"),
            cfg.in_channels,
            boc[0],
            cfg.conv_in_kernel,
            1,
            pad_in,
        )?;

        let ropts = ResnetOptions {
            groups,
            eps,
            temb_channels: Some(temb_dim),
            output_scale_factor: cfg.resnet_out_scale_factor,
            act,
        };
        let topts = |i: usize| TransformerOptions {
            heads: heads[i],
            layers: tlayers[i],
            cross_dim: cross_dims[i],
            groups,
            linear_projection: cfg.use_linear_projection,
            only_cross_attention: only_cross[i],
            upcast: cfg.upcast_attention,
        };

        let mut down_blocks = Vec::with_capacity(n);
        let mut out_c = boc[0];
        for (i, kind) in cfg.down_block_types.iter().enumerate() {
            let in_c = out_c;
            out_c = boc[i];
            let bp = p.pp("down_blocks").pp(i);
            let cross = kind == "CrossAttnDownBlock2D";
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..layers_per_block[i] {
                let c = if j == 0 { in_c } else { out_c };
                resnets.push(ResnetBlock2D::new(
                    &bp.pp("resnets").pp(j),
                    c,
                    out_c,
                    ropts,
                )?);
                if cross {
                    attentions.push(Transformer2DModel::new(
                        &bp.pp("attentions").pp(j),
                        out_c,
                        topts(i),
                    )?);
                }
            }
            let downsampler = if i + 1 < n {
                Some(Downsample2D::new(
                    &bp.pp("downsamplers").pp(0),
                    out_c,
                    out_c,
                    cfg.downsample_padding,
                )?)
            } else {
                None
            };
            down_blocks.push(DownBlock {
                resnets,
                attentions,
                downsampler,
            });
        }

        let mid_c = boc[n - 1];
        let mid_block = match cfg.mid_block_type.as_deref() {
            None => None,
            Some(kind) => {
                let mp = p.pp("mid_block");
                let mopts = ResnetOptions {
                    output_scale_factor: cfg.mid_block_scale_factor,
                    ..ropts
                };
                let cross = kind == "UNetMidBlock2DCrossAttn";
                let mut resnets = vec![ResnetBlock2D::new(
                    &mp.pp("resnets").pp(0),
                    mid_c,
                    mid_c,
                    mopts,
                )?];
                let mut attentions = Vec::new();
                if cross {
                    attentions.push(Transformer2DModel::new(
                        &mp.pp("attentions").pp(0),
                        mid_c,
                        TransformerOptions {
                            only_cross_attention: cfg
                                .mid_block_only_cross_attention
                                .unwrap_or(false),
                            ..topts(n - 1)
                        },
                    )?);
                }
                resnets.push(ResnetBlock2D::new(
                    &mp.pp("resnets").pp(1),
                    mid_c,
                    mid_c,
                    mopts,
                )?);
                Some(MidBlock {
                    resnets,
                    attentions,
                })
            }
        };

        let rboc: Vec<usize> = boc.iter().rev().copied().collect();
        let rlayers: Vec<usize> = layers_per_block.iter().rev().copied().collect();
        let mut up_blocks = Vec::with_capacity(n);
        let mut out_c = rboc[0];
        for (i, kind) in cfg.up_block_types.iter().enumerate() {
            let prev_out = out_c;
            out_c = rboc[i];
            let in_c = rboc[(i + 1).min(n - 1)];
            let bi = n - 1 - i; // the down block this up block mirrors
            let bp = p.pp("up_blocks").pp(i);
            let cross = kind == "CrossAttnUpBlock2D";
            let num_layers = rlayers[i] + 1;
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..num_layers {
                let skip = if j == num_layers - 1 { in_c } else { out_c };
                let res_in = if j == 0 { prev_out } else { out_c };
                resnets.push(ResnetBlock2D::new(
                    &bp.pp("resnets").pp(j),
                    res_in + skip,
                    out_c,
                    ropts,
                )?);
                if cross {
                    attentions.push(Transformer2DModel::new(
                        &bp.pp("attentions").pp(j),
                        out_c,
                        topts(bi),
                    )?);
                }
            }
            let upsampler = if i + 1 < n {
                Some(Upsample2D::new(&bp.pp("upsamplers").pp(0), out_c, out_c)?)
            } else {
                None
            };
            up_blocks.push(UpBlock {
                resnets,
                attentions,
                upsampler,
            });
        }

        let conv_norm_out = GroupNorm::new(&p.pp("conv_norm_out"), groups, boc[0], eps)?;
        let pad_out = (cfg.conv_out_kernel - 1) / 2;
        let conv_out = Conv2d::new(
            &p.pp("conv_out"),
            boc[0],
            cfg.out_channels,
            cfg.conv_out_kernel,
            1,
            pad_out,
        )?;
        let layers = p.layers();
        Ok(UNet2DConditionModel {
            config: cfg,
            time_embedding,
            add_embedding,
            timestep_post_act,
            conv_in,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out,
            conv_out,
            act,
            layers,
            checkpointing: Arc::default(),
        })
    }

    pub fn config(&self) -> &UNet2DConditionConfig {
        &self.config
    }

    /// Gradient checkpointing (diffusers' `enable_gradient_checkpointing`): training forwards keep only each
    /// resnet and transformer block's input and output, and the backward pass recomputes the block — far less
    /// memory for about one more forward. Gradients of weights inside checkpointed blocks reach the store only
    /// through [`crate::autograd::backward`]. Outputs are unchanged; gradients equal up to the order of
    /// floating-point additions. Shared by clones of this model.
    pub fn set_gradient_checkpointing(&self, on: bool) {
        self.checkpointing.store(on, Ordering::Relaxed);
    }

    pub fn gradient_checkpointing(&self) -> bool {
        self.checkpointing.load(Ordering::Relaxed)
    }

    /// A resnet block, checkpointed when enabled.
    fn resnet(&self, r: &ResnetBlock2D, h: &Tensor, emb: &Tensor) -> Result<Tensor> {
        if !self.gradient_checkpointing() {
            return r.forward(h, Some(emb));
        }
        let (r, emb) = (r.clone(), emb.clone());
        Ok(autograd::checkpoint(h, move |x| {
            r.forward(x, Some(&emb))
                .map_err(|e| candle_core::Error::Msg(e.to_string()))
        })?)
    }

    /// A transformer block, checkpointed when enabled.
    fn transformer(&self, a: &Transformer2DModel, h: &Tensor, ehs: &Tensor) -> Result<Tensor> {
        if !self.gradient_checkpointing() {
            return a.forward(h, ehs);
        }
        let (a, ehs) = (a.clone(), ehs.clone());
        Ok(autograd::checkpoint(h, move |x| {
            a.forward(x, &ehs)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))
        })?)
    }

    /// Every linear/conv layer (with its diffusers module path) that adapters can attach to.
    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }

    /// The model's parameter dtype.
    pub fn dtype(&self) -> DType {
        self.conv_in.weight.dtype()
    }

    pub fn device(&self) -> &Device {
        self.conv_in.weight.device()
    }

    /// ε̂(x_t, t, c). `timesteps` is `[B]` (integer or fractional, any dtype) or a single value for the batch.
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        added: Option<&AddedCond>,
    ) -> Result<Tensor> {
        Ok(self
            .run(sample, timesteps, encoder_hidden_states, added, true)?
            .sample)
    }

    /// The prediction plus the down- and mid-block features.
    pub fn forward_with_features(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        added: Option<&AddedCond>,
    ) -> Result<UNetOutput> {
        self.run(sample, timesteps, encoder_hidden_states, added, true)
    }

    /// Only the down- and mid-block features (the up path is skipped; `sample` of the output is the mid
    /// feature).
    pub fn forward_features(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        added: Option<&AddedCond>,
    ) -> Result<UNetOutput> {
        self.run(sample, timesteps, encoder_hidden_states, added, false)
    }

    fn time_embed(
        &self,
        timesteps: &Tensor,
        b: usize,
        added: Option<&AddedCond>,
    ) -> Result<Tensor> {
        let dtype = self.dtype();
        let t = timesteps.flatten_all()?;
        let t = match t.dim(0)? {
            x if x == b => t,
            1 => t.broadcast_as(b)?.contiguous()?,
            x => {
                return Err(Error::msg(format!(
                    "UNet: {x} timesteps for a batch of {b} (give one per sample, or one for all)"
                )))
            }
        };
        let t = t.to_device(self.device())?;
        let c = self.config.block_out_channels[0];
        let temb = timestep_embedding(&t, c, self.config.flip_sin_to_cos, self.config.freq_shift)?
            .to_dtype(dtype)?;
        let mut emb = self.time_embedding.forward(&temb)?;
        match (&self.add_embedding, added) {
            (Some(ae), Some(a)) => {
                let ids = a.time_ids.to_device(self.device())?;
                let (ib, nids) = ids.dims2()?;
                if ib != b {
                    return Err(Error::msg(format!("UNet: time_ids has batch {ib}, expected {b}")));
                }
                let tproj = timestep_embedding(&ids.flatten_all()?, ae.time_dim, self.config.flip_sin_to_cos, self.config.freq_shift)?
                    .reshape((b, nids * ae.time_dim))?
                    .to_dtype(dtype)?;
                let text = a.text_embeds.to_dtype(dtype)?;
                let aug = ae.embedding.forward(&Tensor::cat(&[&text, &tproj], 1)?)?;
                emb = (emb + aug)?;
            }
            (Some(_), None) => {
                return Err(Error::msg(
                    "UNet: this SDXL-style UNet (addition_embed_type text_time) needs text_embeds and time_ids",
                ))
            }
            (None, _) => {}
        }
        if let Some(a) = self.timestep_post_act {
            emb = a.apply(&emb)?;
        }
        Ok(emb)
    }

    fn run(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        ehs: &Tensor,
        added: Option<&AddedCond>,
        up: bool,
    ) -> Result<UNetOutput> {
        let b = sample.dim(0)?;
        let dtype = self.dtype();
        let sample = sample.to_dtype(dtype)?;
        let ehs = ehs.to_dtype(dtype)?;
        if ehs.dim(0)? != b {
            return Err(Error::msg(format!(
                "UNet: encoder_hidden_states has batch {}, sample has {b}",
                ehs.dim(0)?
            )));
        }
        let emb = self.time_embed(timesteps, b, added)?;
        let sample = if self.config.center_input_sample {
            ((sample * 2.0)? - 1.0)?
        } else {
            sample
        };
        let mut h = self.conv_in.forward(&sample)?;
        let mut skips = vec![h.clone()];
        let mut down_features = Vec::with_capacity(self.down_blocks.len());
        for blk in &self.down_blocks {
            for (j, r) in blk.resnets.iter().enumerate() {
                h = self.resnet(r, &h, &emb)?;
                if let Some(a) = blk.attentions.get(j) {
                    h = self.transformer(a, &h, &ehs)?;
                }
                skips.push(h.clone());
            }
            down_features.push(h.clone());
            if let Some(d) = &blk.downsampler {
                h = d.forward(&h)?;
                skips.push(h.clone());
            }
        }
        let mut mid_feature = None;
        if let Some(m) = &self.mid_block {
            h = self.resnet(&m.resnets[0], &h, &emb)?;
            for (a, r) in m.attentions.iter().zip(&m.resnets[1..]) {
                h = self.transformer(a, &h, &ehs)?;
                h = self.resnet(r, &h, &emb)?;
            }
            if m.attentions.is_empty() {
                h = self.resnet(&m.resnets[1], &h, &emb)?;
            }
            mid_feature = Some(h.clone());
        }
        if !up {
            return Ok(UNetOutput {
                sample: h,
                down_features,
                mid_feature,
            });
        }
        for blk in &self.up_blocks {
            for (j, r) in blk.resnets.iter().enumerate() {
                let skip = skips
                    .pop()
                    .ok_or_else(|| Error::msg("UNet: skip connections exhausted"))?;
                h = Tensor::cat(&[&h, &skip], 1)?;
                h = self.resnet(r, &h, &emb)?;
                if let Some(a) = blk.attentions.get(j) {
                    h = self.transformer(a, &h, &ehs)?;
                }
            }
            if let Some(u) = &blk.upsampler {
                let size = skips
                    .last()
                    .map(|s| (s.dim(2).unwrap_or(0), s.dim(3).unwrap_or(0)));
                h = u.forward(&h, size)?;
            }
        }
        let h = self.act.apply(&self.conv_norm_out.forward(&h)?)?;
        let out = self.conv_out.forward(&h)?;
        Ok(UNetOutput {
            sample: out,
            down_features,
            mid_feature,
        })
    }
}
