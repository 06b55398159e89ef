//! CLIP text encoders as transformers runs them in the SD pipelines: `CLIPTextModel` (SD 1.x / 2.x, SDXL
//! `text_encoder`) and `CLIPTextModelWithProjection` (SDXL `text_encoder_2`).
//!
//! Pre-LayerNorm transformer with a causal mask and NO padding mask (the pipelines pass none), learned
//! absolute positions, `final_layer_norm` on the last layer's output. Parameter names are transformers' hub
//! names (`text_model.encoder.layers.N.self_attn.q_proj`, ...); checkpoints without the `text_model.` prefix
//! load too. Every op is differentiable (token embedding by `index_select`, LayerNorm / softmax from
//! primitives) and every projection is an adapter-capable [`Linear`].

use crate::autograd;
use crate::error::{read_json, Error, Result};
use crate::nn::{attention, merge_heads, split_heads, Activation, LayerNorm, Linear};
use crate::weights::{find_weight_files, Params};
use candle_core::{DType, Device, Module, Tensor};
use std::path::Path;

fn default_act() -> String {
    "quick_gelu".into()
}
fn default_eps() -> f64 {
    1e-5
}
fn default_eos() -> i64 {
    2
}
fn default_max_pos() -> usize {
    77
}
fn default_vocab() -> usize {
    49408
}

/// transformers' `CLIPTextConfig` (`config.json` of a `text_encoder` folder); unknown keys are ignored.
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
pub struct ClipTextConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_attention_heads: usize,
    pub num_hidden_layers: usize,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_vocab")]
    pub vocab_size: usize,
    /// `quick_gelu` (SD 1.x), `gelu` (exact erf GELU: SD 2.x, SDXL `text_encoder_2`), or another
    /// [`Activation::parse`] name.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// Output size of `text_projection` (used by `CLIPTextModelWithProjection` only).
    #[serde(default)]
    pub projection_dim: Option<usize>,
    /// 2 (the legacy value of every SD checkpoint) pools at argmax(input_ids); anything else pools at the
    /// first occurrence of this id.
    #[serde(default = "default_eos")]
    pub eos_token_id: i64,
    #[serde(default)]
    pub architectures: Option<Vec<String>>,
}

impl ClipTextConfig {
    /// Reads a transformers `config.json`; errors name the file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let cfg: ClipTextConfig = read_json(path)?;
        cfg.validate(&path.display().to_string())?;
        Ok(cfg)
    }

    /// The MLP activation named by `hidden_act`.
    pub fn activation(&self) -> Result<Activation> {
        self.activation_in("the CLIP text config")
    }

    fn activation_in(&self, file: &str) -> Result<Activation> {
        Activation::parse(&self.hidden_act).ok_or_else(|| {
            Error::unsupported(
                file,
                "hidden_act",
                format!("{:?}", self.hidden_act),
                "supported: quick_gelu, gelu, gelu_new, gelu_pytorch_tanh, gelu_fast, silu, relu",
            )
        })
    }

    fn validate(&self, file: &str) -> Result<()> {
        self.activation_in(file)?;
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(Error::Invalid {
                file: file.into(),
                msg: format!(
                    "hidden_size {} is not divisible by num_attention_heads {}",
                    self.hidden_size, self.num_attention_heads
                ),
            });
        }
        if self.has_projection() && self.projection_dim.is_none() {
            return Err(Error::Invalid {
                file: file.into(),
                msg: "CLIPTextModelWithProjection needs `projection_dim`".into(),
            });
        }
        Ok(())
    }

    /// Whether `architectures` names `CLIPTextModelWithProjection` (a `text_projection` is then loaded).
    pub fn has_projection(&self) -> bool {
        self.architectures
            .as_ref()
            .is_some_and(|a| a.iter().any(|s| s.contains("WithProjection")))
    }
}

/// Outputs of [`ClipTextModel::forward`] (all `[B, T, D]` unless noted, in the model dtype).
#[derive(Clone, Debug)]
pub struct ClipTextOutput {
    /// `final_layer_norm(hidden_states[-1])` (what SD 1.x / 2.x feed the UNet).
    pub last_hidden_state: Tensor,
    /// `hidden_states[-2]`: the output of layer n-1, no final LayerNorm (what SDXL feeds the UNet).
    pub penultimate_hidden_state: Tensor,
    /// Embedding output followed by every layer's output (`num_hidden_layers + 1` tensors; the last one is
    /// before `final_layer_norm`).
    pub hidden_states: Vec<Tensor>,
    /// `[B, D]`: `last_hidden_state` at the EOS position (argmax(ids) for the legacy `eos_token_id` 2).
    pub pooled: Tensor,
    /// `[B, projection_dim]`: `text_projection(pooled)` for `CLIPTextModelWithProjection` (SDXL's
    /// `text_embeds`), `None` otherwise.
    pub text_embeds: Option<Tensor>,
}

/// One pre-LN encoder layer (`text_model.encoder.layers.N`).
#[derive(Clone)]
struct ClipEncoderLayer {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    layer_norm1: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    layer_norm2: LayerNorm,
    heads: usize,
    act: Activation,
}

impl ClipEncoderLayer {
    fn new(p: &Params, cfg: &ClipTextConfig, act: Activation) -> Result<Self> {
        let d = cfg.hidden_size;
        let a = p.pp("self_attn");
        let m = p.pp("mlp");
        Ok(ClipEncoderLayer {
            q_proj: Linear::new(&a.pp("q_proj"), d, d, true)?,
            k_proj: Linear::new(&a.pp("k_proj"), d, d, true)?,
            v_proj: Linear::new(&a.pp("v_proj"), d, d, true)?,
            out_proj: Linear::new(&a.pp("out_proj"), d, d, true)?,
            layer_norm1: LayerNorm::new(&p.pp("layer_norm1"), d, cfg.layer_norm_eps)?,
            fc1: Linear::new(&m.pp("fc1"), d, cfg.intermediate_size, true)?,
            fc2: Linear::new(&m.pp("fc2"), cfg.intermediate_size, d, true)?,
            layer_norm2: LayerNorm::new(&p.pp("layer_norm2"), d, cfg.layer_norm_eps)?,
            heads: cfg.num_attention_heads,
            act,
        })
    }

    fn forward(&self, x: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.layer_norm1.forward(x)?;
        let q = split_heads(&self.q_proj.forward(&h)?, self.heads)?;
        let k = split_heads(&self.k_proj.forward(&h)?, self.heads)?;
        let v = split_heads(&self.v_proj.forward(&h)?, self.heads)?;
        let o = merge_heads(&attention(&q, &k, &v, Some(mask), false)?)?;
        let x = autograd::add(x, &self.out_proj.forward(&o)?)?;
        let h = self.layer_norm2.forward(&x)?;
        let h = self.fc2.forward(&self.act.apply(&self.fc1.forward(&h)?)?)?;
        autograd::add(&x, &h)
    }
}

/// `CLIPTextModel` / `CLIPTextModelWithProjection`.
#[derive(Clone)]
pub struct ClipTextModel {
    token_embedding: Tensor,
    position_embedding: Tensor,
    layers: Vec<ClipEncoderLayer>,
    final_layer_norm: LayerNorm,
    text_projection: Option<Linear>,
    pub config: ClipTextConfig,
}

impl ClipTextModel {
    /// Loads `dir/config.json` and the weights in `dir` (`model.safetensors`, `model.<variant>.safetensors`
    /// or a sharded index; see [`find_weight_files`]) in `dtype` on `device`.
    pub fn load(
        dir: impl AsRef<Path>,
        variant: Option<&str>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let dir = dir.as_ref();
        let cfg = ClipTextConfig::from_file(dir.join("config.json"))?;
        let files = find_weight_files(dir, "model", variant)?;
        let p = Params::from_files(&files, dtype, device)?;
        Self::new(&p, cfg)
    }

    /// Builds the model from any parameter source (the root view: names start with `text_model.` or, for
    /// prefix-less checkpoints, with `embeddings.`).
    pub fn new(p: &Params, cfg: ClipTextConfig) -> Result<Self> {
        cfg.validate("the CLIP text config")?;
        let act = cfg.activation()?;
        let tm = if p.contains("text_model.embeddings.token_embedding.weight") {
            p.pp("text_model")
        } else {
            p.clone()
        };
        let d = cfg.hidden_size;
        let emb = tm.pp("embeddings");
        let token_embedding = emb
            .pp("token_embedding")
            .get((cfg.vocab_size, d), "weight")?;
        let position_embedding = emb
            .pp("position_embedding")
            .get((cfg.max_position_embeddings, d), "weight")?;
        let enc = tm.pp("encoder").pp("layers");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| ClipEncoderLayer::new(&enc.pp(i), &cfg, act))
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm = LayerNorm::new(&tm.pp("final_layer_norm"), d, cfg.layer_norm_eps)?;
        let text_projection = if cfg.has_projection() {
            let proj = cfg.projection_dim.unwrap_or(d);
            Some(Linear::new(&p.pp("text_projection"), d, proj, false)?)
        } else {
            None
        };
        Ok(ClipTextModel {
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            text_projection,
            config: cfg,
        })
    }

    /// The model dtype (that of its parameters).
    pub fn dtype(&self) -> DType {
        self.token_embedding.dtype()
    }

    pub fn device(&self) -> &Device {
        self.token_embedding.device()
    }

    /// `final_layer_norm` applied to any hidden state (e.g. diffusers' `clip_skip` convention:
    /// `final_layer_norm(hidden_states[-(clip_skip + 1)])`).
    pub fn apply_final_layer_norm(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.final_layer_norm.forward(x)?)
    }

    /// The token + position embeddings of `ids` `[B, T]` (u32 or i64, T ≤ max_position_embeddings).
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        if t > self.config.max_position_embeddings {
            return Err(Error::msg(format!(
                "CLIP text encoder: {t} tokens, more than max_position_embeddings {}",
                self.config.max_position_embeddings
            )));
        }
        let ids = ids.to_device(self.device())?;
        let ids = match ids.dtype() {
            DType::U32 | DType::I64 => ids,
            _ => ids.to_dtype(DType::U32)?,
        };
        let d = self.config.hidden_size;
        let tok = self
            .token_embedding
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, d))?;
        let pos = self.position_embedding.narrow(0, 0, t)?;
        Ok(tok.broadcast_add(&pos)?)
    }

    /// The EOS position of every row of `ids` (transformers' pooling rule, see [`ClipTextConfig::eos_token_id`]).
    pub fn eos_positions(&self, ids: &Tensor) -> Result<Vec<usize>> {
        let rows: Vec<Vec<i64>> = ids
            .to_device(&Device::Cpu)?
            .to_dtype(DType::I64)?
            .to_vec2()?;
        Ok(rows
            .iter()
            .map(|r| {
                if self.config.eos_token_id == 2 {
                    // argmax: the first maximal value.
                    let mut best = 0;
                    for (i, &v) in r.iter().enumerate() {
                        if v > r[best] {
                            best = i;
                        }
                    }
                    best
                } else {
                    r.iter()
                        .position(|&v| v == self.config.eos_token_id)
                        .unwrap_or(0)
                }
            })
            .collect())
    }

    /// Runs the encoder on `ids` `[B, T]` (causal mask only, no padding mask).
    pub fn forward(&self, ids: &Tensor) -> Result<ClipTextOutput> {
        let (b, t) = ids.dims2()?;
        let mut x = self.embed(ids)?;
        let mask = causal_mask(t, self.device())?;
        let mut hidden_states = Vec::with_capacity(self.layers.len() + 1);
        hidden_states.push(x.clone());
        for layer in &self.layers {
            x = layer.forward(&x, &mask)?;
            hidden_states.push(x.clone());
        }
        let last_hidden_state = self.final_layer_norm.forward(&x)?;
        let penultimate_hidden_state = if hidden_states.len() >= 2 {
            hidden_states[hidden_states.len() - 2].clone()
        } else {
            hidden_states[0].clone()
        };
        let positions = self.eos_positions(ids)?;
        let flat_idx: Vec<u32> = positions
            .iter()
            .enumerate()
            .map(|(i, &p)| (i * t + p) as u32)
            .collect();
        let flat_idx = Tensor::from_vec(flat_idx, b, self.device())?;
        let d = self.config.hidden_size;
        let pooled = last_hidden_state
            .reshape((b * t, d))?
            .index_select(&flat_idx, 0)?;
        let text_embeds = match &self.text_projection {
            Some(proj) => Some(proj.forward(&pooled)?),
            None => None,
        };
        Ok(ClipTextOutput {
            last_hidden_state,
            penultimate_hidden_state,
            hidden_states,
            pooled,
            text_embeds,
        })
    }
}

/// Additive causal mask `[T, T]` (0 on and below the diagonal, -inf above), f32.
fn causal_mask(t: usize, device: &Device) -> Result<Tensor> {
    let data: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(data, (t, t), device)?)
}
