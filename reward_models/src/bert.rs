//! BLIP's BERT "MED" encoder in the image-grounded mode ImageReward uses: a bidirectional text encoder whose
//! every layer also cross-attends to the image tokens.
//!
//! Embeddings: word + absolute position (no token-type embeddings), LayerNorm. Each layer (post-norm):
//! self-attention over the text under the padding mask (additive −10000 on padded keys) → `attention.output`
//! (dense, residual, LayerNorm); cross-attention from the text to ALL image tokens (queries from the text,
//! keys / values projected from the image width `encoder_width`) → `crossattention.output` (dense, residual,
//! LayerNorm); `intermediate.dense` → activation → `output.dense`, residual, LayerNorm. No pooler.
//!
//! Parameter names are BLIP's under `blip.text_encoder.`: `embeddings.{word_embeddings, position_embeddings,
//! LayerNorm}`, `encoder.layer.N.{attention.self.{query,key,value}, attention.output.{dense,LayerNorm},
//! crossattention.self.{query,key,value}, crossattention.output.{dense,LayerNorm}, intermediate.dense,
//! output.{dense,LayerNorm}}`. Every op is differentiable, so the image gradient flows through the whole
//! encoder (the text side cannot be cached: it depends on the image).

use crate::{Error, Result};
use candle_core::{DType, Device, Module, Tensor};
use diffpref_pipelines::error::read_json;
use diffpref_pipelines::nn::{attention, merge_heads, split_heads, Activation, LayerNorm, Linear};
use diffpref_pipelines::Params;
use std::path::Path;

fn default_eps() -> f64 {
    1e-12
}
fn default_act() -> String {
    "gelu".into()
}
fn default_pos_type() -> String {
    "absolute".into()
}
fn default_true() -> bool {
    true
}

/// BLIP's `med_config.json` (a transformers `BertConfig` plus `encoder_width` and `add_cross_attention`);
/// unknown keys (dropouts, `type_vocab_size`, ...) are ignored.
#[derive(Clone, Debug, PartialEq, serde::Deserialize, serde::Serialize)]
pub struct MedConfig {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    pub vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Width of the image tokens (input size of the cross-attention key / value projections). BLIP sets it
    /// to the ViT width whatever the file says (ImageReward's med_config.json has 768 for a 1024-wide ViT-L);
    /// see [`MedConfig::with_encoder_width`].
    pub encoder_width: usize,
    #[serde(default = "default_true")]
    pub add_cross_attention: bool,
    #[serde(default = "default_pos_type")]
    pub position_embedding_type: String,
    #[serde(default)]
    pub pad_token_id: Option<i64>,
}

impl MedConfig {
    /// Reads `med_config.json`; errors name the file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let cfg: MedConfig = read_json(path)?;
        cfg.validate(&path.display().to_string())?;
        Ok(cfg)
    }

    /// The config with `encoder_width` replaced (BLIP_Pretrain: `encoder_width = vision_width`).
    pub fn with_encoder_width(mut self, width: usize) -> Self {
        self.encoder_width = width;
        self
    }

    /// The intermediate activation named by `hidden_act`.
    pub fn activation(&self, file: &str) -> Result<Activation> {
        Activation::parse(&self.hidden_act).ok_or_else(|| {
            Error::msg(format!(
                "{file}: unsupported hidden_act {:?} (supported: gelu, gelu_new, gelu_pytorch_tanh, \
                 quick_gelu, silu, relu)",
                self.hidden_act
            ))
        })
    }

    /// Checks sizes and the options this encoder implements; `file` names the config in errors.
    pub fn validate(&self, file: &str) -> Result<()> {
        self.activation(file)?;
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(Error::msg(format!(
                "{file}: hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            )));
        }
        if self.position_embedding_type != "absolute" {
            return Err(Error::msg(format!(
                "{file}: unsupported position_embedding_type {:?} (only \"absolute\", as BLIP)",
                self.position_embedding_type
            )));
        }
        if !self.add_cross_attention {
            return Err(Error::msg(format!(
                "{file}: add_cross_attention is false, but the ImageReward text encoder cross-attends to the \
                 image in every layer"
            )));
        }
        Ok(())
    }
}

/// An attention block with its output sub-layer: `self` (query/key/value) + `output` (dense, LayerNorm).
#[derive(Clone)]
struct BertAttention {
    query: Linear,
    key: Linear,
    value: Linear,
    dense: Linear,
    norm: LayerNorm,
    heads: usize,
}

impl BertAttention {
    fn new(p: &Params, cfg: &MedConfig, kv_width: usize) -> Result<Self> {
        let h = cfg.hidden_size;
        let s = p.pp("self");
        let o = p.pp("output");
        Ok(BertAttention {
            query: Linear::new(&s.pp("query"), h, h, true)?,
            key: Linear::new(&s.pp("key"), kv_width, h, true)?,
            value: Linear::new(&s.pp("value"), kv_width, h, true)?,
            dense: Linear::new(&o.pp("dense"), h, h, true)?,
            norm: LayerNorm::new(&o.pp("LayerNorm"), h, cfg.layer_norm_eps)?,
            heads: cfg.num_attention_heads,
        })
    }

    /// `LayerNorm(x + dense(attn(q = x, k = v = kv)))`; `mask` is additive, broadcastable to `[B, H, Tq, Tk]`.
    fn forward(
        &self,
        x: &Tensor,
        kv: &Tensor,
        mask: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let q = split_heads(&self.query.forward(x)?, self.heads)?;
        let k = split_heads(&self.key.forward(kv)?, self.heads)?;
        let v = split_heads(&self.value.forward(kv)?, self.heads)?;
        let o = merge_heads(&attention(&q, &k, &v, mask, false)?)?;
        self.norm.forward(&(self.dense.forward(&o)? + x)?)
    }
}

/// One MED layer (`encoder.layer.N`).
#[derive(Clone)]
struct BertLayer {
    attention: BertAttention,
    crossattention: BertAttention,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
    act: Activation,
}

impl BertLayer {
    fn new(p: &Params, cfg: &MedConfig, act: Activation) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(BertLayer {
            attention: BertAttention::new(&p.pp("attention"), cfg, h)?,
            crossattention: BertAttention::new(&p.pp("crossattention"), cfg, cfg.encoder_width)?,
            intermediate: Linear::new(
                &p.pp("intermediate").pp("dense"),
                h,
                cfg.intermediate_size,
                true,
            )?,
            output: Linear::new(&p.pp("output").pp("dense"), cfg.intermediate_size, h, true)?,
            output_norm: LayerNorm::new(&p.pp("output").pp("LayerNorm"), h, cfg.layer_norm_eps)?,
            act,
        })
    }

    fn forward(&self, x: &Tensor, mask: &Tensor, image: &Tensor) -> candle_core::Result<Tensor> {
        let x = self.attention.forward(x, x, Some(mask))?;
        let x = self.crossattention.forward(&x, image, None)?;
        let h = self
            .output
            .forward(&self.act.apply(&self.intermediate.forward(&x)?)?)?;
        self.output_norm.forward(&(h + x)?)
    }
}

/// BLIP's MED `BertModel` (no pooler) run in the image-grounded ("multimodal") mode.
#[derive(Clone)]
pub struct MedBertEncoder {
    word_embeddings: Tensor,
    position_embeddings: Tensor,
    embeddings_norm: LayerNorm,
    layers: Vec<BertLayer>,
    pub config: MedConfig,
}

impl MedBertEncoder {
    /// Builds the encoder from `p` viewed at its prefix (`blip.text_encoder`).
    pub fn new(p: &Params, config: MedConfig) -> Result<Self> {
        config.validate("the MED config")?;
        let act = config.activation("the MED config")?;
        let h = config.hidden_size;
        let e = p.pp("embeddings");
        let word_embeddings = e
            .pp("word_embeddings")
            .get((config.vocab_size, h), "weight")?;
        let position_embeddings = e
            .pp("position_embeddings")
            .get((config.max_position_embeddings, h), "weight")?;
        let embeddings_norm = LayerNorm::new(&e.pp("LayerNorm"), h, config.layer_norm_eps)?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| BertLayer::new(&p.pp("encoder").pp("layer").pp(i), &config, act))
            .collect::<Result<Vec<_>>>()?;
        Ok(MedBertEncoder {
            word_embeddings,
            position_embeddings,
            embeddings_norm,
            layers,
            config,
        })
    }

    pub fn dtype(&self) -> DType {
        self.word_embeddings.dtype()
    }

    pub fn device(&self) -> &Device {
        self.word_embeddings.device()
    }

    /// Word + position embeddings of `input_ids` `[B, T]`, LayerNorm applied.
    pub fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let cfg = &self.config;
        if t > cfg.max_position_embeddings {
            return Err(Error::msg(format!(
                "MED text encoder: {t} tokens, more than max_position_embeddings {}",
                cfg.max_position_embeddings
            )));
        }
        let ids = input_ids.to_device(self.device())?.to_dtype(DType::U32)?;
        let flat = ids.flatten_all()?;
        if b * t > 0 {
            let max_id = flat.max(0)?.to_scalar::<u32>()? as usize;
            if max_id >= cfg.vocab_size {
                return Err(Error::msg(format!(
                    "MED text encoder: token id {max_id} is outside the vocabulary (vocab_size {})",
                    cfg.vocab_size
                )));
            }
        }
        let h = cfg.hidden_size;
        let words = self
            .word_embeddings
            .index_select(&flat, 0)?
            .reshape((b, t, h))?;
        let pos = self.position_embeddings.narrow(0, 0, t)?;
        Ok(self.embeddings_norm.forward(&words.broadcast_add(&pos)?)?)
    }

    /// The additive self-attention mask `[B, 1, 1, T]` (f32): 0 on tokens, −10000 on padding
    /// (`(1 − mask) · −10000`, BERT's convention).
    pub fn extended_mask(attention_mask: &Tensor, device: &Device) -> Result<Tensor> {
        let (b, t) = attention_mask.dims2()?;
        let m = attention_mask.to_device(device)?.to_dtype(DType::F32)?;
        Ok(((1.0 - m)? * -10000.0)?.reshape((b, 1, 1, t))?)
    }

    /// `last_hidden_state` `[B, T, hidden]` of `input_ids` `[B, T]` (u32 / i64) under `attention_mask`
    /// `[B, T]` (1 = token, 0 = padding), cross-attending to `image_embeds` `[B, N, encoder_width]` (all image
    /// tokens, no image mask).
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        image_embeds: &Tensor,
    ) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        if attention_mask.dims() != [b, t] {
            return Err(Error::msg(format!(
                "MED text encoder: attention_mask has shape {:?}, input_ids {:?}",
                attention_mask.dims(),
                input_ids.dims()
            )));
        }
        let (bi, _, wi) = image_embeds.dims3()?;
        if bi != b || wi != self.config.encoder_width {
            return Err(Error::msg(format!(
                "MED text encoder: image_embeds has shape {:?}, expected [{b}, N, {}] (encoder_width)",
                image_embeds.dims(),
                self.config.encoder_width
            )));
        }
        let mask = Self::extended_mask(attention_mask, self.device())?;
        let image = image_embeds.to_dtype(self.dtype())?;
        let mut x = self.embed(input_ids)?;
        for layer in &self.layers {
            x = layer.forward(&x, &mask, &image)?;
        }
        Ok(x)
    }
}
