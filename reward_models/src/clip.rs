//! CLIP (both towers, projections, logit scale) in the two checkpoint layouts the reward models use:
//! transformers' `CLIPModel` (OpenAI CLIP, PickScore, the LAION aesthetic predictor's backbone) and
//! open_clip's `CLIP` (HPSv2 / HPSv2.1).
//!
//! Pre-LayerNorm ViT image tower (patch embedding as a matrix product, class token, learned positions,
//! `ln_pre`, blocks, `ln_post` on the class token, projection) and causal text tower (pooled at
//! argmax(ids), i.e. the first end-of-text token), quick_gelu or exact erf GELU as the config says.
//! Everything is built from differentiable primitives (`diffpref_pipelines::nn`), so scores can be
//! backpropagated to the pixels. The transformers text tower is the pipelines' [`ClipTextModel`].
//!
//! A checkpoint must hold every tensor: a missing `logit_scale` or class embedding is an error naming the
//! key and file, never a default.

use crate::preprocess::{Preprocess, Preprocessed, ResizeMode, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD};
use crate::source;
use crate::{Error, Result};
use candle_core::{DType, Device, Module, Tensor, Var, D};
use diffpref_pipelines::models::clip_text::{ClipTextConfig, ClipTextModel};
use diffpref_pipelines::nn::{attention, linear, merge_heads, split_heads, Activation, LayerNorm};
use diffpref_pipelines::tokenizer::ClipTokenizer;
use diffpref_pipelines::Params;
use serde::Deserialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Which checkpoint key layout a model uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// transformers `CLIPModel` (`vision_model.*`, `text_model.*`, `visual_projection`, `text_projection`).
    HuggingFace,
    /// open_clip `CLIP` (`visual.*`, `transformer.*`, packed `in_proj`, `x @ proj` projections).
    OpenClip,
}

/// CLIP's initial temperature `logit_scale = ln(1/0.07)` (new heads of the LRM and the SPM start there).
pub const LOGIT_SCALE_INIT: f64 = 2.659_260_036_932_779;
/// CLIP's cap on `exp(logit_scale)`: ln 100.
pub const LOGIT_SCALE_MAX: f64 = 4.605_170_185_988_092;

/// One transformer stack.
#[derive(Clone, Debug, PartialEq)]
pub struct TowerConfig {
    pub width: usize,
    pub layers: usize,
    pub heads: usize,
    /// Hidden size of the MLP.
    pub mlp_dim: usize,
    /// Activation name as in transformers configs (`quick_gelu`, `gelu`).
    pub hidden_act: String,
    pub layer_norm_eps: f64,
}

impl TowerConfig {
    fn activation(&self, file: &str) -> Result<Activation> {
        Activation::parse(&self.hidden_act).ok_or_else(|| {
            diffpref_pipelines::Error::unsupported(
                file,
                "hidden_act",
                format!("{:?}", self.hidden_act),
                "supported: quick_gelu, gelu, gelu_new, gelu_pytorch_tanh, silu, relu",
            )
            .into()
        })
    }

    fn validate(&self, file: &str, what: &str) -> Result<()> {
        self.activation(file)?;
        if self.heads == 0 || !self.width.is_multiple_of(self.heads) {
            return Err(diffpref_pipelines::Error::Invalid {
                file: file.into(),
                msg: format!(
                    "{what} width {} is not divisible by its {} heads",
                    self.width, self.heads
                ),
            }
            .into());
        }
        Ok(())
    }
}

/// The image tower.
#[derive(Clone, Debug, PartialEq)]
pub struct VisionConfig {
    pub tower: TowerConfig,
    pub image_size: usize,
    pub patch_size: usize,
}

impl VisionConfig {
    /// Number of tokens (class token + patches).
    pub fn num_positions(&self) -> usize {
        let g = self.image_size / self.patch_size;
        g * g + 1
    }
}

/// The text tower.
#[derive(Clone, Debug, PartialEq)]
pub struct TextConfig {
    pub tower: TowerConfig,
    pub vocab_size: usize,
    pub context_length: usize,
    /// transformers' pooling rule: 2 (legacy) pools at argmax(ids), anything else at the first
    /// occurrence of this id. open_clip always pools at argmax (stored as 2).
    pub eos_token_id: i64,
    /// Id used to pad prompts to `context_length` (0 for open_clip; `None` = the tokenizer's pad token).
    pub pad_id: Option<u32>,
}

/// A whole CLIP model.
#[derive(Clone, Debug, PartialEq)]
pub struct ClipConfig {
    pub layout: Layout,
    pub vision: VisionConfig,
    pub text: TextConfig,
    /// Size of the projected (joint) embedding.
    pub embed_dim: usize,
    /// How images are brought to the model (from `preprocessor_config.json` / `preprocess_cfg`).
    pub preprocess: Preprocess,
}

// ---------------------------------------------------------------------------------------------------------
// Config files
// ---------------------------------------------------------------------------------------------------------

#[derive(Deserialize, Default, Clone)]
struct HfTower {
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_attention_heads: Option<usize>,
    num_hidden_layers: Option<usize>,
    hidden_act: Option<String>,
    layer_norm_eps: Option<f64>,
    image_size: Option<usize>,
    patch_size: Option<usize>,
    num_channels: Option<usize>,
    max_position_embeddings: Option<usize>,
    vocab_size: Option<usize>,
    eos_token_id: Option<i64>,
}

#[derive(Deserialize)]
struct HfClipFile {
    projection_dim: Option<usize>,
    text_config: Option<HfTower>,
    text_config_dict: Option<HfTower>,
    vision_config: Option<HfTower>,
    vision_config_dict: Option<HfTower>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum SizeSpec {
    Int(usize),
    Map(HashMap<String, usize>),
    Pair(Vec<usize>),
}

#[derive(Deserialize)]
struct HfPreprocessorFile {
    size: Option<SizeSpec>,
    crop_size: Option<SizeSpec>,
    do_center_crop: Option<bool>,
    do_resize: Option<bool>,
    do_normalize: Option<bool>,
    image_mean: Option<Vec<f64>>,
    image_std: Option<Vec<f64>>,
    resample: Option<i64>,
}

#[derive(Deserialize)]
struct OpenClipFile {
    model_cfg: OpenClipModelCfg,
    preprocess_cfg: Option<OpenClipPreprocessCfg>,
}

#[derive(Deserialize)]
struct OpenClipModelCfg {
    embed_dim: usize,
    #[serde(default)]
    quick_gelu: bool,
    vision_cfg: OpenClipVisionCfg,
    text_cfg: OpenClipTextCfg,
}

fn d_width_v() -> usize {
    768
}
fn d_width_t() -> usize {
    512
}
fn d_layers() -> serde_json::Value {
    serde_json::json!(12)
}
fn d_head_width() -> usize {
    64
}
fn d_mlp_ratio() -> f64 {
    4.0
}
fn d_patch() -> usize {
    16
}
fn d_image() -> serde_json::Value {
    serde_json::json!(224)
}
fn d_ctx() -> usize {
    77
}
fn d_vocab() -> usize {
    49408
}
fn d_heads() -> usize {
    8
}

#[derive(Deserialize)]
struct OpenClipVisionCfg {
    #[serde(default = "d_layers")]
    layers: serde_json::Value,
    #[serde(default = "d_width_v")]
    width: usize,
    #[serde(default = "d_head_width")]
    head_width: usize,
    #[serde(default = "d_mlp_ratio")]
    mlp_ratio: f64,
    #[serde(default = "d_patch")]
    patch_size: usize,
    #[serde(default = "d_image")]
    image_size: serde_json::Value,
    #[serde(flatten)]
    extra: HashMap<String, serde_json::Value>,
}

#[derive(Deserialize)]
struct OpenClipTextCfg {
    #[serde(default = "d_ctx")]
    context_length: usize,
    #[serde(default = "d_vocab")]
    vocab_size: usize,
    #[serde(default = "d_width_t")]
    width: usize,
    #[serde(default = "d_heads")]
    heads: usize,
    #[serde(default = "d_layers")]
    layers: serde_json::Value,
    #[serde(default = "d_mlp_ratio")]
    mlp_ratio: f64,
    #[serde(default)]
    pad_id: u32,
    #[serde(flatten)]
    extra: HashMap<String, serde_json::Value>,
}

#[derive(Deserialize)]
struct OpenClipPreprocessCfg {
    size: Option<serde_json::Value>,
    mean: Option<Vec<f64>>,
    std: Option<Vec<f64>>,
    interpolation: Option<String>,
    resize_mode: Option<String>,
    fill_color: Option<f64>,
}

fn invalid(file: &str, msg: impl Into<String>) -> Error {
    diffpref_pipelines::Error::Invalid {
        file: file.into(),
        msg: msg.into(),
    }
    .into()
}

fn unsupported(file: &str, key: &str, value: impl std::fmt::Display, hint: &str) -> Error {
    diffpref_pipelines::Error::unsupported(file, key, value, hint).into()
}

fn three(file: &str, key: &str, v: Option<Vec<f64>>, default: [f64; 3]) -> Result<[f64; 3]> {
    match v {
        None => Ok(default),
        Some(v) if v.len() == 3 => Ok([v[0], v[1], v[2]]),
        Some(v) => Err(invalid(
            file,
            format!("`{key}` must have 3 values, has {}", v.len()),
        )),
    }
}

fn int_or_square(file: &str, key: &str, v: &serde_json::Value) -> Result<usize> {
    if let Some(n) = v.as_u64() {
        return Ok(n as usize);
    }
    if let Some(a) = v.as_array() {
        if a.len() == 2 && a[0] == a[1] {
            if let Some(n) = a[0].as_u64() {
                return Ok(n as usize);
            }
        }
    }
    Err(unsupported(
        file,
        key,
        v,
        "only square sizes (an integer or [n, n]) are supported",
    ))
}

fn check_extra(
    file: &str,
    section: &str,
    extra: &HashMap<String, serde_json::Value>,
    allowed_defaults: &[(&str, serde_json::Value)],
) -> Result<()> {
    for (key, default) in allowed_defaults {
        if let Some(v) = extra.get(*key) {
            if !v.is_null() && v != default {
                return Err(unsupported(
                    file,
                    &format!("{section}.{key}"),
                    v,
                    &format!("diffpref's open_clip port supports only {default}"),
                ));
            }
        }
    }
    Ok(())
}

impl ClipConfig {
    /// Reads a transformers `config.json` (CLIPModel) and, when present, `preprocessor_config.json` from
    /// the same folder. Missing keys take transformers' `CLIPTextConfig` / `CLIPVisionConfig` defaults.
    pub fn from_hf_files(config: &Path, preprocessor: Option<&Path>) -> Result<Self> {
        let file = config.display().to_string();
        let text = std::fs::read_to_string(config)
            .map_err(|e| diffpref_pipelines::Error::io(config, e))?;
        let pre = match preprocessor {
            Some(p) if p.exists() => Some((
                p.display().to_string(),
                std::fs::read_to_string(p).map_err(|e| diffpref_pipelines::Error::io(p, e))?,
            )),
            _ => None,
        };
        Self::from_hf_json(
            &text,
            &file,
            pre.as_ref().map(|(f, s)| (s.as_str(), f.as_str())),
        )
    }

    /// [`ClipConfig::from_hf_files`] from JSON text (`file` names the source in errors).
    pub fn from_hf_json(
        json: &str,
        file: &str,
        preprocessor: Option<(&str, &str)>,
    ) -> Result<Self> {
        let cfg: HfClipFile = serde_json::from_str(json)
            .map_err(|e| invalid(file, format!("not a CLIPModel config: {e}")))?;
        let t = cfg.text_config.or(cfg.text_config_dict).ok_or_else(|| {
            invalid(
                file,
                "no `text_config`: not a transformers CLIPModel config (an open_clip model has \
                 open_clip_config.json)",
            )
        })?;
        let v = cfg
            .vision_config
            .or(cfg.vision_config_dict)
            .ok_or_else(|| {
                invalid(
                    file,
                    "no `vision_config`: not a transformers CLIPModel config",
                )
            })?;
        let text = TextConfig {
            tower: TowerConfig {
                width: t.hidden_size.unwrap_or(512),
                layers: t.num_hidden_layers.unwrap_or(12),
                heads: t.num_attention_heads.unwrap_or(8),
                mlp_dim: t.intermediate_size.unwrap_or(2048),
                hidden_act: t.hidden_act.clone().unwrap_or("quick_gelu".into()),
                layer_norm_eps: t.layer_norm_eps.unwrap_or(1e-5),
            },
            vocab_size: t.vocab_size.unwrap_or(49408),
            context_length: t.max_position_embeddings.unwrap_or(77),
            eos_token_id: t.eos_token_id.unwrap_or(2),
            pad_id: None,
        };
        let image_size = v.image_size.unwrap_or(224);
        let vision = VisionConfig {
            tower: TowerConfig {
                width: v.hidden_size.unwrap_or(768),
                layers: v.num_hidden_layers.unwrap_or(12),
                heads: v.num_attention_heads.unwrap_or(12),
                mlp_dim: v.intermediate_size.unwrap_or(3072),
                hidden_act: v.hidden_act.clone().unwrap_or("quick_gelu".into()),
                layer_norm_eps: v.layer_norm_eps.unwrap_or(1e-5),
            },
            image_size,
            patch_size: v.patch_size.unwrap_or(32),
        };
        if v.num_channels.unwrap_or(3) != 3 {
            return Err(unsupported(
                file,
                "vision_config.num_channels",
                v.num_channels.unwrap_or(3),
                "RGB models only",
            ));
        }
        let preprocess = match preprocessor {
            Some((json, pfile)) => hf_preprocess(json, pfile, image_size)?,
            None => Preprocess::openai_clip(image_size),
        };
        let c = ClipConfig {
            layout: Layout::HuggingFace,
            vision,
            text,
            embed_dim: cfg.projection_dim.unwrap_or(512),
            preprocess,
        };
        c.validate(file)?;
        Ok(c)
    }

    /// The transformers `CLIPModel` `config.json` of this config (HF layout; what
    /// [`ClipConfig::from_hf_json`] reads back; the preprocessing is not part of it).
    pub fn to_hf_json(&self) -> String {
        let tower = |t: &TowerConfig| {
            serde_json::json!({
                "hidden_size": t.width,
                "num_hidden_layers": t.layers,
                "num_attention_heads": t.heads,
                "intermediate_size": t.mlp_dim,
                "hidden_act": t.hidden_act,
                "layer_norm_eps": t.layer_norm_eps,
            })
        };
        let mut text = tower(&self.text.tower);
        text["vocab_size"] = self.text.vocab_size.into();
        text["max_position_embeddings"] = self.text.context_length.into();
        text["eos_token_id"] = self.text.eos_token_id.into();
        text["model_type"] = "clip_text_model".into();
        let mut vision = tower(&self.vision.tower);
        vision["image_size"] = self.vision.image_size.into();
        vision["patch_size"] = self.vision.patch_size.into();
        vision["num_channels"] = 3.into();
        vision["model_type"] = "clip_vision_model".into();
        serde_json::to_string_pretty(&serde_json::json!({
            "architectures": ["CLIPModel"],
            "model_type": "clip",
            "projection_dim": self.embed_dim,
            "text_config": text,
            "vision_config": vision,
        }))
        .expect("a JSON value serialises")
    }

    /// Reads open_clip's `open_clip_config.json` (`{model_cfg, preprocess_cfg}`, as open_clip's hub
    /// configs). Without `preprocess_cfg` the preprocessing is open_clip's default (shortest side + centre
    /// crop, OpenAI mean/std).
    pub fn from_open_clip_file(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).map_err(|e| diffpref_pipelines::Error::io(path, e))?;
        Self::from_open_clip_json(&text, &path.display().to_string())
    }

    /// [`ClipConfig::from_open_clip_file`] from JSON text.
    pub fn from_open_clip_json(json: &str, file: &str) -> Result<Self> {
        let f: OpenClipFile = serde_json::from_str(json)
            .map_err(|e| invalid(file, format!("not an open_clip config: {e}")))?;
        let m = f.model_cfg;
        let vc = m.vision_cfg;
        let tc = m.text_cfg;
        use serde_json::json;
        check_extra(
            file,
            "vision_cfg",
            &vc.extra,
            &[
                ("timm_model_name", json!(null)),
                ("attentional_pool", json!(false)),
                ("no_ln_pre", json!(false)),
                ("final_ln_after_pool", json!(false)),
                ("pool_type", json!("tok")),
                ("ls_init_value", json!(null)),
                ("input_patchnorm", json!(false)),
                ("output_tokens", json!(false)),
            ],
        )?;
        if vc
            .extra
            .get("timm_model_name")
            .is_some_and(|v| !v.is_null())
        {
            return Err(unsupported(
                file,
                "vision_cfg.timm_model_name",
                "set",
                "ViT towers only",
            ));
        }
        check_extra(
            file,
            "text_cfg",
            &tc.extra,
            &[
                ("hf_model_name", json!(null)),
                ("pool_type", json!("argmax")),
                ("proj_bias", json!(false)),
                ("embed_cls", json!(false)),
                ("no_causal_mask", json!(false)),
                ("ls_init_value", json!(null)),
                ("final_ln_after_pool", json!(false)),
            ],
        )?;
        let layers = |v: &serde_json::Value, key: &str| -> Result<usize> {
            v.as_u64().map(|n| n as usize).ok_or_else(|| {
                unsupported(
                    file,
                    key,
                    v,
                    "an integer layer count (ResNet towers are not supported)",
                )
            })
        };
        let act = if m.quick_gelu { "quick_gelu" } else { "gelu" };
        let image_size = int_or_square(file, "vision_cfg.image_size", &vc.image_size)?;
        if vc.head_width == 0 || !vc.width.is_multiple_of(vc.head_width) {
            return Err(invalid(
                file,
                format!(
                    "vision_cfg.width {} is not a multiple of head_width {}",
                    vc.width, vc.head_width
                ),
            ));
        }
        let vision = VisionConfig {
            tower: TowerConfig {
                width: vc.width,
                layers: layers(&vc.layers, "vision_cfg.layers")?,
                heads: vc.width / vc.head_width,
                mlp_dim: (vc.width as f64 * vc.mlp_ratio) as usize,
                hidden_act: act.into(),
                layer_norm_eps: 1e-5,
            },
            image_size,
            patch_size: vc.patch_size,
        };
        let text = TextConfig {
            tower: TowerConfig {
                width: tc.width,
                layers: layers(&tc.layers, "text_cfg.layers")?,
                heads: tc.heads,
                mlp_dim: (tc.width as f64 * tc.mlp_ratio) as usize,
                hidden_act: act.into(),
                layer_norm_eps: 1e-5,
            },
            vocab_size: tc.vocab_size,
            context_length: tc.context_length,
            eos_token_id: 2,
            pad_id: Some(tc.pad_id),
        };
        let preprocess = match f.preprocess_cfg {
            None => Preprocess::openai_clip(image_size),
            Some(p) => {
                let size = match &p.size {
                    Some(v) => int_or_square(file, "preprocess_cfg.size", v)?,
                    None => image_size,
                };
                if let Some(i) = &p.interpolation {
                    if i != "bicubic" {
                        return Err(unsupported(
                            file,
                            "preprocess_cfg.interpolation",
                            i,
                            "bicubic only",
                        ));
                    }
                }
                if p.fill_color.unwrap_or(0.0) != 0.0 {
                    return Err(unsupported(
                        file,
                        "preprocess_cfg.fill_color",
                        p.fill_color.unwrap_or(0.0),
                        "0 (black) only",
                    ));
                }
                let mode = match p.resize_mode.as_deref().unwrap_or("shortest") {
                    "shortest" => ResizeMode::ShortestSideCrop,
                    "longest" => ResizeMode::LongestSidePad,
                    other => {
                        return Err(unsupported(
                            file,
                            "preprocess_cfg.resize_mode",
                            other,
                            "shortest or longest",
                        ))
                    }
                };
                Preprocess {
                    size,
                    mode,
                    mean: three(file, "preprocess_cfg.mean", p.mean, OPENAI_CLIP_MEAN)?,
                    std: three(file, "preprocess_cfg.std", p.std, OPENAI_CLIP_STD)?,
                }
            }
        };
        let c = ClipConfig {
            layout: Layout::OpenClip,
            vision,
            text,
            embed_dim: m.embed_dim,
            preprocess,
        };
        c.validate(file)?;
        Ok(c)
    }

    fn validate(&self, file: &str) -> Result<()> {
        self.vision.tower.validate(file, "vision")?;
        self.text.tower.validate(file, "text")?;
        let v = &self.vision;
        if v.patch_size == 0 || !v.image_size.is_multiple_of(v.patch_size) {
            return Err(invalid(
                file,
                format!(
                    "image_size {} is not a multiple of patch_size {}",
                    v.image_size, v.patch_size
                ),
            ));
        }
        if self.preprocess.size != v.image_size {
            return Err(invalid(
                file,
                format!(
                    "preprocessing makes {0}x{0} images but the vision tower takes {1}x{1}",
                    self.preprocess.size, v.image_size
                ),
            ));
        }
        Ok(())
    }

    /// OpenAI CLIP ViT-L/14 at 224 px in the transformers layout (`openai/clip-vit-large-patch14`, the
    /// backbone of CLIP score and of the LAION aesthetic predictor): quick_gelu, projection 768.
    pub fn hf_vit_l_14() -> Self {
        Self::from_hf_json(VIT_L_14_HF, "built-in ViT-L/14 config", None)
            .expect("built-in config parses")
    }

    /// CLIP ViT-H/14 in the transformers layout (PickScore): exact GELU, projection 1024.
    pub fn hf_vit_h_14() -> Self {
        Self::from_hf_json(VIT_H_14_HF, "built-in ViT-H/14 config", None)
            .expect("built-in config parses")
    }

    /// open_clip ViT-H-14 (HPSv2 / HPSv2.1) with HPSv2's preprocessing (longest side, zero padding).
    pub fn open_clip_vit_h_14() -> Self {
        Self::from_open_clip_json(VIT_H_14_OPEN_CLIP, "built-in ViT-H-14 open_clip config")
            .expect("built-in config parses")
    }
}

/// transformers config of OpenAI CLIP ViT-L/14 (224 px).
pub const VIT_L_14_HF: &str = r#"{"projection_dim": 768,
 "text_config": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
   "num_hidden_layers": 12, "hidden_act": "quick_gelu", "max_position_embeddings": 77, "vocab_size": 49408},
 "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
   "num_hidden_layers": 24, "hidden_act": "quick_gelu", "image_size": 224, "patch_size": 14}}"#;

/// transformers config of CLIP ViT-H/14 (laion CLIP-ViT-H-14, PickScore).
pub const VIT_H_14_HF: &str = r#"{"projection_dim": 1024,
 "text_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
   "num_hidden_layers": 24, "hidden_act": "gelu", "max_position_embeddings": 77, "vocab_size": 49408},
 "vision_config": {"hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 16,
   "num_hidden_layers": 32, "hidden_act": "gelu", "image_size": 224, "patch_size": 14}}"#;

/// `open_clip_config.json` of open_clip ViT-H-14 with HPSv2's preprocessing (write it next to an HPSv2
/// checkpoint).
pub const VIT_H_14_OPEN_CLIP: &str = r#"{"model_cfg": {"embed_dim": 1024, "quick_gelu": false,
  "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
  "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24}},
 "preprocess_cfg": {"size": 224, "mean": [0.48145466, 0.4578275, 0.40821073],
  "std": [0.26862954, 0.26130258, 0.27577711], "interpolation": "bicubic", "resize_mode": "longest",
  "fill_color": 0}}"#;

fn hf_preprocess(json: &str, file: &str, image_size: usize) -> Result<Preprocess> {
    let p: HfPreprocessorFile = serde_json::from_str(json)
        .map_err(|e| invalid(file, format!("not an image processor config: {e}")))?;
    let side = |s: &SizeSpec, key: &str| -> Result<usize> {
        match s {
            SizeSpec::Int(n) => Ok(*n),
            SizeSpec::Map(m) => {
                if let Some(n) = m.get("shortest_edge") {
                    return Ok(*n);
                }
                match (m.get("height"), m.get("width")) {
                    (Some(h), Some(w)) if h == w => Ok(*h),
                    _ => Err(unsupported(file, key, format!("{m:?}"), "a square size")),
                }
            }
            SizeSpec::Pair(v) if v.len() == 2 && v[0] == v[1] => Ok(v[0]),
            SizeSpec::Pair(v) => Err(unsupported(file, key, format!("{v:?}"), "a square size")),
        }
    };
    if p.do_resize == Some(false)
        || p.do_normalize == Some(false)
        || p.do_center_crop == Some(false)
    {
        return Err(unsupported(
            file,
            "do_resize / do_center_crop / do_normalize",
            "false",
            "the CLIP processor (resize, centre crop, normalise) only",
        ));
    }
    if let Some(r) = p.resample {
        if r != 3 {
            return Err(unsupported(file, "resample", r, "3 (bicubic) only"));
        }
    }
    let size = match &p.size {
        Some(s) => side(s, "size")?,
        None => image_size,
    };
    let crop = match &p.crop_size {
        Some(s) => side(s, "crop_size")?,
        None => size,
    };
    if crop != size {
        return Err(unsupported(
            file,
            "crop_size",
            crop,
            &format!("equal to the resize size {size}"),
        ));
    }
    Ok(Preprocess {
        size,
        mode: ResizeMode::ShortestSideCrop,
        mean: three(file, "image_mean", p.image_mean, OPENAI_CLIP_MEAN)?,
        std: three(file, "image_std", p.image_std, OPENAI_CLIP_STD)?,
    })
}

// ---------------------------------------------------------------------------------------------------------
// Layers
// ---------------------------------------------------------------------------------------------------------

/// A linear map `x Wᵀ + b` with PyTorch's `[out, in]` weight.
#[derive(Clone)]
struct Dense {
    w: Tensor,
    b: Option<Tensor>,
}

impl Dense {
    fn load(p: &Params, d_in: usize, d_out: usize, bias: bool) -> Result<Self> {
        Ok(Dense {
            w: p.get((d_out, d_in), "weight")?,
            b: if bias {
                Some(p.get(d_out, "bias")?)
            } else {
                None
            },
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        linear(x, &self.w, self.b.as_ref())
    }
}

/// The attention's input projections.
#[derive(Clone)]
enum Qkv {
    /// One `[3W, W]` map (q, k, v stacked).
    Packed(Dense),
    /// Three maps (trainable transformers checkpoints).
    Split(Box<[Dense; 3]>),
}

/// A pre-LayerNorm transformer block.
#[derive(Clone)]
struct Block {
    ln_1: LayerNorm,
    qkv: Qkv,
    out: Dense,
    ln_2: LayerNorm,
    fc1: Dense,
    fc2: Dense,
    heads: usize,
    act: Activation,
}

impl Block {
    /// transformers names: `layer_norm1`, `self_attn.{q,k,v,out}_proj`, `layer_norm2`, `mlp.fc1/fc2`.
    fn load_hf(p: &Params, t: &TowerConfig, act: Activation) -> Result<Self> {
        let d = t.width;
        let a = p.pp("self_attn");
        let q = Dense::load(&a.pp("q_proj"), d, d, true)?;
        let k = Dense::load(&a.pp("k_proj"), d, d, true)?;
        let v = Dense::load(&a.pp("v_proj"), d, d, true)?;
        // Packed for one matmul, unless the weights are trainable: a concatenated copy would not follow the
        // optimizer's in-place updates of the three vars.
        let qkv = if p.is_trainable() {
            Qkv::Split(Box::new([q, k, v]))
        } else {
            Qkv::Packed(Dense {
                w: Tensor::cat(&[&q.w, &k.w, &v.w], 0)?,
                b: Some(Tensor::cat(
                    &[
                        q.b.as_ref().unwrap(),
                        k.b.as_ref().unwrap(),
                        v.b.as_ref().unwrap(),
                    ],
                    0,
                )?),
            })
        };
        Ok(Block {
            ln_1: LayerNorm::new(&p.pp("layer_norm1"), d, t.layer_norm_eps)?,
            qkv,
            out: Dense::load(&a.pp("out_proj"), d, d, true)?,
            ln_2: LayerNorm::new(&p.pp("layer_norm2"), d, t.layer_norm_eps)?,
            fc1: Dense::load(&p.pp("mlp").pp("fc1"), d, t.mlp_dim, true)?,
            fc2: Dense::load(&p.pp("mlp").pp("fc2"), t.mlp_dim, d, true)?,
            heads: t.heads,
            act,
        })
    }

    /// open_clip names: `ln_1`, `attn.in_proj_weight` `[3W, W]` / `attn.in_proj_bias` (q, k, v stacked),
    /// `attn.out_proj`, `ln_2`, `mlp.c_fc`, `mlp.c_proj`.
    fn load_open_clip(p: &Params, t: &TowerConfig, act: Activation) -> Result<Self> {
        let d = t.width;
        let a = p.pp("attn");
        Ok(Block {
            ln_1: LayerNorm::new(&p.pp("ln_1"), d, t.layer_norm_eps)?,
            qkv: Qkv::Packed(Dense {
                w: a.get((3 * d, d), "in_proj_weight")?,
                b: Some(a.get(3 * d, "in_proj_bias")?),
            }),
            out: Dense::load(&a.pp("out_proj"), d, d, true)?,
            ln_2: LayerNorm::new(&p.pp("ln_2"), d, t.layer_norm_eps)?,
            fc1: Dense::load(&p.pp("mlp").pp("c_fc"), d, t.mlp_dim, true)?,
            fc2: Dense::load(&p.pp("mlp").pp("c_proj"), t.mlp_dim, d, true)?,
            heads: t.heads,
            act,
        })
    }

    fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
        self.forward_modulated(x, mask, None)
    }

    /// The block, with DiT's adaLN-Zero modulation when `m` is given (`[B, W]` each, see
    /// [`BlockModulation`]).
    fn forward_modulated(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        m: Option<&BlockModulation>,
    ) -> candle_core::Result<Tensor> {
        // LN(h)·(1 + scale) + shift, per sample.
        let modulate = |h: Tensor, shift: &Tensor, scale: &Tensor| -> candle_core::Result<Tensor> {
            h.broadcast_mul(&(scale.unsqueeze(1)? + 1.0)?)?
                .broadcast_add(&shift.unsqueeze(1)?)
        };
        let d = x.dim(D::Minus1)?;
        let mut h = self.ln_1.forward(x)?;
        if let Some(m) = m {
            h = modulate(h, &m.shift_attn, &m.scale_attn)?;
        }
        let (q, k, v) = match &self.qkv {
            Qkv::Packed(p) => {
                let qkv = p.forward(&h)?;
                (
                    qkv.narrow(D::Minus1, 0, d)?,
                    qkv.narrow(D::Minus1, d, d)?,
                    qkv.narrow(D::Minus1, 2 * d, d)?,
                )
            }
            Qkv::Split(s) => (s[0].forward(&h)?, s[1].forward(&h)?, s[2].forward(&h)?),
        };
        let q = split_heads(&q, self.heads)?;
        let k = split_heads(&k, self.heads)?;
        let v = split_heads(&v, self.heads)?;
        let mut o = self
            .out
            .forward(&merge_heads(&attention(&q, &k, &v, mask, false)?)?)?;
        if let Some(m) = m {
            o = o.broadcast_mul(&m.gate_attn.unsqueeze(1)?)?;
        }
        let x = (x + o)?;
        let mut h = self.ln_2.forward(&x)?;
        if let Some(m) = m {
            h = modulate(h, &m.shift_mlp, &m.scale_mlp)?;
        }
        let mut h = self.fc2.forward(&self.act.apply(&self.fc1.forward(&h)?)?)?;
        if let Some(m) = m {
            h = h.broadcast_mul(&m.gate_mlp.unsqueeze(1)?)?;
        }
        x + h
    }
}

/// DiT's adaLN-Zero modulation of one image-tower block (each `[B, W]`):
/// `h ← h + gate_attn ⊙ Attn(LN₁(h)·(1 + scale_attn) + shift_attn)`,
/// `h ← h + gate_mlp ⊙ MLP(LN₂(h)·(1 + scale_mlp) + shift_mlp)`.
#[derive(Clone, Debug)]
pub struct BlockModulation {
    pub shift_attn: Tensor,
    pub scale_attn: Tensor,
    pub gate_attn: Tensor,
    pub shift_mlp: Tensor,
    pub scale_mlp: Tensor,
    pub gate_mlp: Tensor,
}

/// A conditioning of the whole image tower (the step-aware preference model's timestep): one
/// [`BlockModulation`] per block, and `pooled ← pooled·(1 + scale) + shift` after the final LayerNorm of the
/// class token (`pooled_shift`, `pooled_scale`: `[B, W]`).
#[derive(Clone, Debug)]
pub struct TowerModulation {
    pub blocks: Vec<BlockModulation>,
    pub pooled_shift: Tensor,
    pub pooled_scale: Tensor,
}

fn get_f32_scalar(p: &Params, name: &str) -> Result<Tensor> {
    match p.get_with_dtype((), name, DType::F32) {
        Ok(t) => Ok(t),
        Err(diffpref_pipelines::Error::ShapeMismatch { found, .. })
            if found.iter().product::<usize>() == 1 =>
        {
            Ok(p.get_with_dtype(found.as_slice(), name, DType::F32)?
                .reshape(())?)
        }
        Err(e) => Err(e.into()),
    }
}

// ---------------------------------------------------------------------------------------------------------
// Towers
// ---------------------------------------------------------------------------------------------------------

/// Outputs of the image tower.
#[derive(Clone, Debug)]
pub struct VisionOutput {
    /// Encoder output `[B, 1 + patches, W]` before the final LayerNorm (transformers'
    /// `vision_model(...).last_hidden_state`, open_clip's `visual.transformer` output).
    pub hidden: Tensor,
    /// `[B, W]`: post_layernorm / ln_post of the class token (transformers' `pooler_output`).
    pub pooled: Tensor,
    /// `[B, E]`: the projected, unnormalised image embedding (`get_image_features` / `encode_image`).
    pub embeds: Tensor,
}

/// The ViT image tower.
#[derive(Clone)]
pub struct VisionTower {
    /// Patch embedding as `[W, 3·p·p]` (a convolution with stride = kernel = p, no bias).
    patch_w: Tensor,
    class_embedding: Tensor,
    positions: Tensor,
    ln_pre: LayerNorm,
    blocks: Vec<Block>,
    ln_post: LayerNorm,
    /// `[E, W]` (a Linear weight; open_clip's `visual.proj` `[W, E]` is transposed on load).
    proj: Tensor,
    cfg: VisionConfig,
}

impl VisionTower {
    fn load(
        p: &Params,
        cfg: &VisionConfig,
        layout: Layout,
        embed: usize,
        file: &str,
    ) -> Result<Self> {
        let t = &cfg.tower;
        let w = t.width;
        let ps = cfg.patch_size;
        let n = cfg.num_positions();
        let act = t.activation(file)?;
        let (patch, class_embedding, positions, ln_pre, blocks, ln_post, proj) = match layout {
            Layout::HuggingFace => {
                let v = p.pp("vision_model");
                let e = v.pp("embeddings");
                let blocks = (0..t.layers)
                    .map(|i| Block::load_hf(&v.pp("encoder").pp("layers").pp(i), t, act))
                    .collect::<Result<Vec<_>>>()?;
                (
                    e.pp("patch_embedding").get((w, 3, ps, ps), "weight")?,
                    e.get(w, "class_embedding")?,
                    e.pp("position_embedding").get((n, w), "weight")?,
                    LayerNorm::new(&v.pp("pre_layrnorm"), w, t.layer_norm_eps)?,
                    blocks,
                    LayerNorm::new(&v.pp("post_layernorm"), w, t.layer_norm_eps)?,
                    p.pp("visual_projection").get((embed, w), "weight")?,
                )
            }
            Layout::OpenClip => {
                let v = p.pp("visual");
                let blocks = (0..t.layers)
                    .map(|i| {
                        Block::load_open_clip(&v.pp("transformer").pp("resblocks").pp(i), t, act)
                    })
                    .collect::<Result<Vec<_>>>()?;
                (
                    v.pp("conv1").get((w, 3, ps, ps), "weight")?,
                    v.get(w, "class_embedding")?,
                    v.get((n, w), "positional_embedding")?,
                    LayerNorm::new(&v.pp("ln_pre"), w, t.layer_norm_eps)?,
                    blocks,
                    LayerNorm::new(&v.pp("ln_post"), w, t.layer_norm_eps)?,
                    v.get((w, embed), "proj")?.t()?,
                )
            }
        };
        Ok(VisionTower {
            patch_w: patch.reshape((w, 3 * ps * ps))?,
            class_embedding,
            positions,
            ln_pre,
            blocks,
            ln_post,
            proj,
            cfg: cfg.clone(),
        })
    }

    /// Runs the tower on normalised `pixel_values` `[B, 3, S, S]` (S = image_size), cast to the model dtype.
    pub fn forward(&self, pixel_values: &Tensor) -> Result<VisionOutput> {
        self.forward_modulated(pixel_values, None)
    }

    pub fn config(&self) -> &VisionConfig {
        &self.cfg
    }

    /// [`VisionTower::forward`] under a [`TowerModulation`] (one per block; `None` = the plain tower).
    pub fn forward_modulated(
        &self,
        pixel_values: &Tensor,
        modulation: Option<&TowerModulation>,
    ) -> Result<VisionOutput> {
        if let Some(m) = modulation {
            if m.blocks.len() != self.blocks.len() {
                return Err(Error::msg(format!(
                    "a tower modulation for {} blocks given to a tower of {}",
                    m.blocks.len(),
                    self.blocks.len()
                )));
            }
        }
        let (b, c, h, w) = pixel_values.dims4()?;
        let s = self.cfg.image_size;
        if c != 3 || h != s || w != s {
            return Err(Error::msg(format!(
                "the CLIP image tower takes [B, 3, {s}, {s}] pixel values, got {:?}",
                pixel_values.dims()
            )));
        }
        let x = pixel_values
            .to_device(self.patch_w.device())?
            .to_dtype(self.patch_w.dtype())?;
        let ps = self.cfg.patch_size;
        let g = s / ps;
        let width = self.cfg.tower.width;
        // Non-overlapping patches as rows: [B, 3, g, p, g, p] -> [B, g, g, 3, p, p] -> [B·g·g, 3·p·p].
        let patches = x
            .reshape((b, 3, g, ps, g, ps))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b * g * g, 3 * ps * ps))?;
        let tokens = linear(&patches, &self.patch_w, None)?.reshape((b, g * g, width))?;
        let cls = self
            .class_embedding
            .reshape((1, 1, width))?
            .broadcast_as((b, 1, width))?
            .contiguous()?;
        let mut x = Tensor::cat(&[&cls, &tokens], 1)?.broadcast_add(&self.positions)?;
        x = self.ln_pre.forward(&x)?;
        for (i, blk) in self.blocks.iter().enumerate() {
            x = blk.forward_modulated(&x, None, modulation.map(|m| &m.blocks[i]))?;
        }
        let mut pooled = self.ln_post.forward(&x.narrow(1, 0, 1)?.squeeze(1)?)?;
        if let Some(m) = modulation {
            pooled = pooled
                .broadcast_mul(&(&m.pooled_scale + 1.0)?)?
                .broadcast_add(&m.pooled_shift)?;
        }
        let embeds = linear(&pooled, &self.proj, None)?;
        Ok(VisionOutput {
            hidden: x,
            pooled,
            embeds,
        })
    }
}

/// Outputs of the text tower.
#[derive(Clone, Debug)]
pub struct TextOutput {
    /// Encoder output `[B, T, W]` before the final LayerNorm.
    pub hidden: Tensor,
    /// `[B, T, W]` after `final_layer_norm` / `ln_final`.
    pub last_hidden_state: Tensor,
    /// `[B, W]`: `last_hidden_state` at the first end-of-text token (argmax(ids)).
    pub pooled: Tensor,
    /// `[B, E]`: the projected, unnormalised text embedding.
    pub embeds: Tensor,
}

/// open_clip's text tower (causal, pooled at argmax(ids), `x @ text_projection`).
#[derive(Clone)]
struct OpenClipText {
    token_embedding: Tensor,
    positions: Tensor,
    blocks: Vec<Block>,
    ln_final: LayerNorm,
    /// `[E, W]` (`text_projection` `[W, E]` transposed).
    proj: Tensor,
    cfg: TextConfig,
}

impl OpenClipText {
    fn load(p: &Params, cfg: &TextConfig, embed: usize, file: &str) -> Result<Self> {
        let t = &cfg.tower;
        let act = t.activation(file)?;
        let w = t.width;
        let blocks = (0..t.layers)
            .map(|i| Block::load_open_clip(&p.pp("transformer").pp("resblocks").pp(i), t, act))
            .collect::<Result<Vec<_>>>()?;
        Ok(OpenClipText {
            token_embedding: p.pp("token_embedding").get((cfg.vocab_size, w), "weight")?,
            positions: p.get((cfg.context_length, w), "positional_embedding")?,
            blocks,
            ln_final: LayerNorm::new(&p.pp("ln_final"), w, t.layer_norm_eps)?,
            proj: p.get((w, embed), "text_projection")?.t()?,
            cfg: cfg.clone(),
        })
    }

    fn forward(&self, ids: &Tensor) -> Result<TextOutput> {
        let (b, t) = ids.dims2()?;
        if t > self.cfg.context_length {
            return Err(Error::msg(format!(
                "open_clip text tower: {t} tokens, more than context_length {}",
                self.cfg.context_length
            )));
        }
        let dev = self.token_embedding.device();
        let w = self.cfg.tower.width;
        let ids_u = ids.to_device(dev)?.to_dtype(DType::U32)?;
        let x = self
            .token_embedding
            .index_select(&ids_u.flatten_all()?, 0)?
            .reshape((b, t, w))?;
        let mut x = x.broadcast_add(&self.positions.narrow(0, 0, t)?)?;
        let mask = causal_mask(t, dev)?;
        for blk in &self.blocks {
            x = blk.forward(&x, Some(&mask))?;
        }
        let last = self.ln_final.forward(&x)?;
        let pooled = gather_rows(&last, &argmax_rows(ids)?)?;
        let embeds = linear(&pooled, &self.proj, None)?;
        Ok(TextOutput {
            hidden: x,
            last_hidden_state: last,
            pooled,
            embeds,
        })
    }
}

#[derive(Clone)]
enum TextTower {
    Hf(Box<ClipTextModel>),
    OpenClip(OpenClipText),
}

/// Additive causal mask `[T, T]` (f32; -inf above the diagonal).
fn causal_mask(t: usize, device: &Device) -> Result<Tensor> {
    let data: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(data, (t, t), device)?)
}

/// The first position of each row's maximum (open_clip / OpenAI pooling: the first end-of-text token).
fn argmax_rows(ids: &Tensor) -> Result<Vec<usize>> {
    let rows: Vec<Vec<i64>> = ids
        .to_device(&Device::Cpu)?
        .to_dtype(DType::I64)?
        .to_vec2()?;
    Ok(rows
        .iter()
        .map(|r| {
            let mut best = 0;
            for (i, &v) in r.iter().enumerate() {
                if v > r[best] {
                    best = i;
                }
            }
            best
        })
        .collect())
}

/// `x[b, pos[b]]` for `x` `[B, T, W]` (differentiable `index_select`).
fn gather_rows(x: &Tensor, pos: &[usize]) -> Result<Tensor> {
    let (b, t, w) = x.dims3()?;
    let idx: Vec<u32> = pos
        .iter()
        .enumerate()
        .map(|(i, &p)| (i * t + p) as u32)
        .collect();
    let idx = Tensor::from_vec(idx, b, x.device())?;
    Ok(x.reshape((b * t, w))?.index_select(&idx, 0)?)
}

/// `t` in f32, or f64 when it already is (scores of f64 models stay f64).
pub fn at_least_f32(t: &Tensor) -> Result<Tensor> {
    Ok(if t.dtype() == DType::F64 {
        t.clone()
    } else {
        t.to_dtype(DType::F32)?
    })
}

/// `x / ||x||₂` over the last dimension.
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let n = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
    Ok(x.broadcast_div(&n)?)
}

// ---------------------------------------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------------------------------------

/// What [`ClipModel::load_with`] loads.
#[derive(Clone, Debug, Default)]
pub struct ClipLoadOptions {
    /// Image tower only (no text tower, no `logit_scale`): the aesthetic predictor's backbone.
    pub vision_only: bool,
    /// A tokenizer folder to use instead of the model's own (`tokenizer.json` or `vocab.json` +
    /// `merges.txt`; open_clip checkpoints ship none).
    pub tokenizer: Option<PathBuf>,
    /// A config file to use instead of the model folder's (`config.json` or `open_clip_config.json`).
    pub config: Option<PathBuf>,
    /// The config to use when the folder has no config file at all (e.g. [`ClipConfig::open_clip_vit_h_14`]
    /// for a bare HPSv2 checkpoint); without it a folder without a config is an error.
    pub fallback_config: Option<ClipConfig>,
}

/// A CLIP model: image tower, optional text tower, logit scale, preprocessing and tokenizer.
pub struct ClipModel {
    pub config: ClipConfig,
    pub vision: VisionTower,
    text: Option<TextTower>,
    logit_scale: Option<Tensor>,
    tokenizer: Option<ClipTokenizer>,
    /// Where it was loaded from (named in errors).
    pub source: String,
    text_cache: Mutex<HashMap<String, Tensor>>,
}

/// The tokenizer folder of a model folder: the folder itself or its `tokenizer/` subfolder.
pub fn find_tokenizer_dir(dir: &Path) -> Option<PathBuf> {
    [dir.to_path_buf(), dir.join("tokenizer")]
        .into_iter()
        .find(|d| ClipTokenizer::is_tokenizer_dir(d))
}

/// Whether the model at `path` (a folder, or a weights file in one) has its own config file
/// (`open_clip_config.json` or `config.json`).
pub fn has_own_config(path: &Path) -> bool {
    let dir = if path.is_file() {
        path.parent().unwrap_or(Path::new("."))
    } else {
        path
    };
    dir.join("open_clip_config.json").exists() || dir.join("config.json").exists()
}

impl ClipModel {
    /// Loads a CLIP model (both towers and `logit_scale`) from a folder or weights file: open_clip when
    /// `open_clip_config.json` is there, transformers `CLIPModel` when `config.json` is.
    pub fn load(path: impl AsRef<Path>, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_with(path, &ClipLoadOptions::default(), dtype, device)
    }

    /// [`ClipModel::load`] with options.
    pub fn load_with(
        path: impl AsRef<Path>,
        opts: &ClipLoadOptions,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Ok(Self::load_impl(path.as_ref(), opts, dtype, device, false)?.0)
    }

    /// [`ClipModel::load_with`] in f32 with every parameter a [`Var`], returned with its checkpoint name (to
    /// train the model and save it under the same names).
    pub fn load_trainable(
        path: impl AsRef<Path>,
        opts: &ClipLoadOptions,
        device: &Device,
    ) -> Result<(Self, Vec<(String, Var)>)> {
        Self::load_impl(path.as_ref(), opts, DType::F32, device, true)
    }

    fn load_impl(
        path: &Path,
        opts: &ClipLoadOptions,
        dtype: DType,
        device: &Device,
        trainable: bool,
    ) -> Result<(Self, Vec<(String, Var)>)> {
        let dir = if path.is_file() {
            path.parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."))
                .to_path_buf()
        } else if path.is_dir() {
            path.to_path_buf()
        } else {
            return Err(diffpref_pipelines::Error::MissingFile(path.to_path_buf()).into());
        };
        let open_clip_cfg = dir.join("open_clip_config.json");
        let hf_cfg = dir.join("config.json");
        let config = match &opts.config {
            Some(c) => {
                let text = std::fs::read_to_string(c)
                    .map_err(|e| diffpref_pipelines::Error::io(c, e))?;
                if text.contains("\"model_cfg\"") {
                    ClipConfig::from_open_clip_json(&text, &c.display().to_string())?
                } else {
                    ClipConfig::from_hf_files(c, Some(&dir.join("preprocessor_config.json")))?
                }
            }
            None if open_clip_cfg.exists() => ClipConfig::from_open_clip_file(&open_clip_cfg)?,
            None if hf_cfg.exists() => ClipConfig::from_hf_files(
                &hf_cfg,
                Some(&dir.join("preprocessor_config.json")),
            )?,
            None if opts.fallback_config.is_some() => opts.fallback_config.clone().unwrap(),
            None => {
                return Err(Error::msg(format!(
                    "{}: no config.json (transformers CLIPModel) or open_clip_config.json (open_clip) — \
                     every CLIP model needs its own config (built-in ViT-H-14 open_clip config: \
                     diffpref_rewards::clip::VIT_H_14_OPEN_CLIP)",
                    dir.display()
                )))
            }
        };
        let files = if path.is_file() {
            vec![path.to_path_buf()]
        } else {
            let bases: &[&str] = match config.layout {
                Layout::HuggingFace => &["model", "pytorch_model"],
                Layout::OpenClip => &["open_clip_model", "open_clip_pytorch_model", "model"],
            };
            source::find_weights(&dir, bases)?
        };
        let mut p = source::open_params(&files, dtype, device)?;
        if trainable {
            p = p.trainable();
        }
        let mut model = Self::from_params(&p, config, !opts.vision_only)
            .map_err(|e| source::name_source(e, &files))?;
        model.source = files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        if !opts.vision_only {
            let tok_dir = match &opts.tokenizer {
                Some(t) => Some(t.clone()),
                None => find_tokenizer_dir(&dir),
            };
            if let Some(t) = tok_dir {
                model.tokenizer = Some(ClipTokenizer::from_dir(&t)?);
            }
        }
        let vars = if trainable { p.vars() } else { Vec::new() };
        Ok((model, vars))
    }

    /// Builds the model from any parameter source (safetensors, pickle map, [`Params::random`]).
    /// `with_text` loads the text tower and `logit_scale` too.
    pub fn from_params(p: &Params, config: ClipConfig, with_text: bool) -> Result<Self> {
        let file = "the CLIP config";
        let vision = VisionTower::load(p, &config.vision, config.layout, config.embed_dim, file)?;
        let (text, logit_scale) = if with_text {
            let text = match config.layout {
                Layout::HuggingFace => {
                    let t = &config.text;
                    let tc = ClipTextConfig {
                        hidden_size: t.tower.width,
                        intermediate_size: t.tower.mlp_dim,
                        num_attention_heads: t.tower.heads,
                        num_hidden_layers: t.tower.layers,
                        max_position_embeddings: t.context_length,
                        vocab_size: t.vocab_size,
                        hidden_act: t.tower.hidden_act.clone(),
                        layer_norm_eps: t.tower.layer_norm_eps,
                        projection_dim: Some(config.embed_dim),
                        eos_token_id: t.eos_token_id,
                        architectures: Some(vec!["CLIPTextModelWithProjection".into()]),
                    };
                    if !p.contains("text_model.embeddings.token_embedding.weight") {
                        // CLIPModel checkpoints keep the `text_model.` prefix: name the missing key.
                        p.get_any_shape("text_model.embeddings.token_embedding.weight")?;
                    }
                    TextTower::Hf(Box::new(ClipTextModel::new(p, tc)?))
                }
                Layout::OpenClip => TextTower::OpenClip(OpenClipText::load(
                    p,
                    &config.text,
                    config.embed_dim,
                    file,
                )?),
            };
            (Some(text), Some(get_f32_scalar(p, "logit_scale")?))
        } else {
            (None, None)
        };
        Ok(ClipModel {
            config,
            vision,
            text,
            logit_scale,
            tokenizer: None,
            source: "parameters".into(),
            text_cache: Mutex::new(HashMap::new()),
        })
    }

    /// Uses `tok` for prompts (and forgets cached text embeddings).
    pub fn set_tokenizer(&mut self, tok: ClipTokenizer) {
        self.tokenizer = Some(tok);
        self.text_cache.lock().unwrap().clear();
    }

    pub fn tokenizer(&self) -> Option<&ClipTokenizer> {
        self.tokenizer.as_ref()
    }

    pub fn device(&self) -> &Device {
        self.vision.patch_w.device()
    }

    pub fn dtype(&self) -> DType {
        self.vision.patch_w.dtype()
    }

    /// The checkpoint's `logit_scale` (log space, f32 scalar).
    pub fn logit_scale(&self) -> Result<&Tensor> {
        self.logit_scale.as_ref().ok_or_else(|| {
            Error::msg(format!(
                "{}: loaded without its text tower, so no logit_scale",
                self.source
            ))
        })
    }

    /// The model's preprocessing of `images` `[B, 3, H, W]` in [0, 1] (differentiable).
    pub fn preprocess(&self, images: &Tensor) -> Result<Preprocessed> {
        self.config.preprocess.forward(images)
    }

    /// The image tower on normalised pixel values.
    pub fn encode_image(&self, pixel_values: &Tensor) -> Result<VisionOutput> {
        self.vision.forward(pixel_values)
    }

    /// The text tower on token ids `[B, T]`.
    pub fn encode_text(&self, ids: &Tensor) -> Result<TextOutput> {
        match self.text.as_ref() {
            None => Err(Error::msg(format!(
                "{}: loaded without its text tower",
                self.source
            ))),
            Some(TextTower::Hf(m)) => {
                let o = m.forward(ids)?;
                Ok(TextOutput {
                    hidden: o
                        .hidden_states
                        .last()
                        .cloned()
                        .unwrap_or(o.last_hidden_state.clone()),
                    last_hidden_state: o.last_hidden_state,
                    pooled: o.pooled,
                    embeds: o
                        .text_embeds
                        .ok_or_else(|| Error::msg("no text_projection"))?,
                })
            }
            Some(TextTower::OpenClip(m)) => m.forward(ids),
        }
    }

    /// Token ids `[B, context_length]` (u32, on the model's device): BOS, BPE ids, EOS, then the pad id
    /// (open_clip: 0; transformers: the tokenizer's pad token). Prompts longer than the context are cut and
    /// still end with EOS.
    pub fn tokenize(&self, prompts: &[&str]) -> Result<Tensor> {
        let tok = self.tokenizer.as_ref().ok_or_else(|| {
            Error::msg(format!(
                "{}: no tokenizer (the model folder has no tokenizer.json or vocab.json + merges.txt; \
                 pass a CLIP tokenizer folder, e.g. `--tokenizer`)",
                self.source
            ))
        })?;
        let ctx = self.config.text.context_length;
        let pad = self.config.text.pad_id.unwrap_or(tok.pad_id);
        let mut data = Vec::with_capacity(prompts.len() * ctx);
        for p in prompts {
            let mut ids = tok.encode(p)?;
            if ids.len() > ctx {
                ids.truncate(ctx);
                ids[ctx - 1] = tok.eos_id;
            }
            data.extend(ids.iter().copied());
            data.extend(std::iter::repeat_n(pad, ctx - ids.len()));
        }
        Ok(Tensor::from_vec(data, (prompts.len(), ctx), self.device())?)
    }

    /// L2-normalised text embeddings `[B, E]` (f32, f64 for f64 models; constant: computed without a graph and cached per
    /// prompt).
    pub fn text_embeds(&self, prompts: &[&str]) -> Result<Tensor> {
        let mut missing: Vec<&str> = Vec::new();
        {
            let cache = self.text_cache.lock().unwrap();
            for p in prompts {
                if !cache.contains_key(*p) && !missing.contains(p) {
                    missing.push(p);
                }
            }
        }
        if !missing.is_empty() {
            let ids = self.tokenize(&missing)?;
            let e = l2_normalize(&at_least_f32(&self.encode_text(&ids)?.embeds)?)?.detach();
            let mut cache = self.text_cache.lock().unwrap();
            if cache.len() + missing.len() > 4096 {
                cache.clear();
            }
            for (i, p) in missing.iter().enumerate() {
                cache.insert((*p).to_string(), e.get(i)?);
            }
        }
        let cache = self.text_cache.lock().unwrap();
        let rows: Vec<Tensor> = prompts.iter().map(|p| cache[*p].clone()).collect();
        Ok(Tensor::stack(&rows, 0)?)
    }

    /// L2-normalised image embeddings `[B, E]` (f32, f64 for f64 models) of `images` in [0, 1], preprocessing included,
    /// differentiable.
    pub fn image_embeds(&self, images: &Tensor) -> Result<Tensor> {
        let pv = self
            .preprocess(&images.to_device(self.device())?)?
            .pixel_values;
        self.image_embeds_from_pixels(&pv)
    }

    /// L2-normalised image embeddings `[B, E]` (f32, f64 for f64 models) from normalised pixel values.
    pub fn image_embeds_from_pixels(&self, pixel_values: &Tensor) -> Result<Tensor> {
        l2_normalize(
            &self
                .encode_image(pixel_values)?
                .embeds
                .to_dtype(DType::F32)?,
        )
    }
}
