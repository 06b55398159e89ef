//! Loading a whole Stable Diffusion model: a diffusers folder (`model_index.json` + `unet/`, `vae/`,
//! `text_encoder/`, `tokenizer/`, `scheduler/`, and for SDXL `text_encoder_2/`, `tokenizer_2/`), or a hub id
//! (`org/name`) fetched with hf-hub when online. f32/f16/bf16 weights, `*.fp16.safetensors` variants and
//! sharded checkpoints are all read; weights are converted to the requested dtype.

use crate::error::{Error, Result};
use crate::models::clip_text::ClipTextModel;
use crate::models::unet::{AddedCond, UNet2DConditionModel};
use crate::models::vae::AutoencoderKL;
use crate::tokenizer::ClipTokenizer;
use candle_core::{DType, Device, Tensor};
use std::path::{Path, PathBuf};

/// How to load a model.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub dtype: DType,
    pub device: Device,
    /// Weight variant to prefer (`fp16` reads `*.fp16.safetensors`); the plain files are the fallback.
    pub variant: Option<String>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            dtype: DType::F32,
            device: Device::Cpu,
            variant: None,
        }
    }
}

/// The model family, from `model_index.json` and the UNet config.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelFamily {
    /// SD 1.x / 2.x: one CLIP text encoder, `last_hidden_state` as context.
    Sd,
    /// SDXL: two text encoders, penultimate states concatenated, pooled `text_embeds` and time ids.
    Sdxl,
}

/// A loaded text-to-image model.
pub struct StableDiffusion {
    pub dir: PathBuf,
    pub family: ModelFamily,
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextModel,
    pub tokenizer_2: Option<ClipTokenizer>,
    pub text_encoder_2: Option<ClipTextModel>,
    pub unet: UNet2DConditionModel,
    pub vae: AutoencoderKL,
    /// `scheduler/scheduler_config.json`.
    pub scheduler_config_path: PathBuf,
    /// SDXL: use zero embeddings for an empty negative prompt (`force_zeros_for_empty_prompt`).
    pub force_zeros_for_empty_prompt: bool,
}

/// Prompt conditioning for the UNet.
#[derive(Clone, Debug)]
pub struct PromptEmbeds {
    /// `[B, 77, D]` context for cross-attention.
    pub hidden_states: Tensor,
    /// SDXL: pooled projected embeddings `[B, P]`.
    pub pooled: Option<Tensor>,
}

impl PromptEmbeds {
    /// Zero embeddings of the same shapes (SDXL's `force_zeros_for_empty_prompt`).
    pub fn zeros_like(&self) -> Result<PromptEmbeds> {
        Ok(PromptEmbeds {
            hidden_states: self.hidden_states.zeros_like()?,
            pooled: self.pooled.as_ref().map(|p| p.zeros_like()).transpose()?,
        })
    }

    /// Concatenates along the batch (e.g. `[uncond; cond]` for classifier-free guidance).
    pub fn cat(parts: &[&PromptEmbeds]) -> Result<PromptEmbeds> {
        let hs: Vec<&Tensor> = parts.iter().map(|p| &p.hidden_states).collect();
        let pooled = if parts.iter().all(|p| p.pooled.is_some()) {
            let ps: Vec<&Tensor> = parts.iter().map(|p| p.pooled.as_ref().unwrap()).collect();
            Some(Tensor::cat(&ps, 0)?)
        } else {
            None
        };
        Ok(PromptEmbeds {
            hidden_states: Tensor::cat(&hs, 0)?,
            pooled,
        })
    }
}

/// Resolves `--model`: an existing local folder, a single-file checkpoint (`*.safetensors` in the original LDM
/// layout, converted once into a cached diffusers folder: [`crate::single_file::materialize`]), or a hub id
/// downloaded (with the `hub` feature) into the hf-hub cache.
pub fn resolve_model(spec: &str, variant: Option<&str>) -> Result<PathBuf> {
    let p = Path::new(spec);
    if crate::single_file::is_single_file(p) {
        return crate::single_file::materialize(p);
    }
    if p.exists() {
        if !p.join("model_index.json").exists() {
            return Err(Error::MissingFile(p.join("model_index.json")));
        }
        return Ok(p.to_path_buf());
    }
    let looks_like_hub_id =
        spec.split('/').count() == 2 && !spec.starts_with('.') && !spec.starts_with('/');
    if !looks_like_hub_id {
        return Err(Error::MissingFile(p.to_path_buf()));
    }
    fetch_from_hub(spec, variant)
}

#[cfg(feature = "hub")]
fn fetch_from_hub(id: &str, variant: Option<&str>) -> Result<PathBuf> {
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(true)
        .build()
        .map_err(|e| Error::msg(format!("hub {id}: {e}")))?;
    let repo = api.model(id.to_string());
    let get = |f: &str| {
        repo.get(f)
            .map_err(|e| Error::msg(format!("hub {id}: cannot fetch {f}: {e}")))
    };
    let index = get("model_index.json")?;
    let root = index.parent().unwrap().to_path_buf();
    let info = repo
        .info()
        .map_err(|e| Error::msg(format!("hub {id}: {e}")))?;
    let files: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    let want_ext = [".json", ".txt"];
    for comp in [
        "unet",
        "vae",
        "text_encoder",
        "text_encoder_2",
        "tokenizer",
        "tokenizer_2",
        "scheduler",
    ] {
        let in_comp: Vec<&String> = files
            .iter()
            .filter(|f| f.starts_with(&format!("{comp}/")))
            .collect();
        for f in &in_comp {
            if want_ext.iter().any(|e| f.ends_with(e)) {
                get(f)?;
            }
        }
        let weights: Vec<&&String> = in_comp
            .iter()
            .filter(|f| f.ends_with(".safetensors"))
            .collect();
        let pick = |v: Option<&str>| -> Vec<String> {
            weights
                .iter()
                .filter(|f| {
                    let name = f.rsplit('/').next().unwrap();
                    match v {
                        Some(v) => {
                            name.contains(&format!(".{v}.")) || name.contains(&format!(".{v}-"))
                        }
                        None => {
                            !name.contains(".fp16.")
                                && !name.contains(".bf16.")
                                && !name.contains(".fp16-")
                        }
                    }
                })
                .map(|s| s.to_string())
                .collect()
        };
        let mut chosen = pick(variant);
        if chosen.is_empty() {
            chosen = pick(None);
        }
        if chosen.is_empty() {
            chosen = weights.iter().map(|s| s.to_string()).collect();
        }
        for f in chosen {
            get(&f)?;
        }
    }
    Ok(root)
}

#[cfg(not(feature = "hub"))]
fn fetch_from_hub(id: &str, _variant: Option<&str>) -> Result<PathBuf> {
    Err(Error::msg(format!(
        "{id} is not a local folder, and this build has no hub support (feature `hub`)"
    )))
}

impl StableDiffusion {
    /// Loads every component of a diffusers folder.
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let index_path = dir.join("model_index.json");
        let index: serde_json::Value = crate::error::read_json(&index_path)?;
        let class = index
            .get("_class_name")
            .and_then(|v| v.as_str())
            .unwrap_or("StableDiffusionPipeline");
        let has = |k: &str| {
            index
                .get(k)
                .and_then(|v| v.as_array())
                .is_some_and(|a| a.first().is_some_and(|x| !x.is_null()))
        };
        let family = if class.contains("XL") || has("text_encoder_2") {
            ModelFamily::Sdxl
        } else {
            ModelFamily::Sd
        };
        let v = opts.variant.as_deref();
        let (dt, dev) = (opts.dtype, &opts.device);
        let tokenizer = ClipTokenizer::from_dir(dir.join("tokenizer"))?;
        let text_encoder = ClipTextModel::load(dir.join("text_encoder"), v, dt, dev)?;
        let (tokenizer_2, text_encoder_2) = if has("text_encoder_2") {
            (
                Some(ClipTokenizer::from_dir(dir.join("tokenizer_2"))?),
                Some(ClipTextModel::load(dir.join("text_encoder_2"), v, dt, dev)?),
            )
        } else {
            (None, None)
        };
        let unet = UNet2DConditionModel::load(dir.join("unet"), v, dt, dev)?;
        let vae = AutoencoderKL::load(dir.join("vae"), v, dt, dev)?;
        if family == ModelFamily::Sdxl && !unet.config().uses_text_time() {
            return Err(Error::Invalid {
                file: dir.join("unet/config.json").display().to_string(),
                msg: "an SDXL pipeline needs addition_embed_type \"text_time\"".into(),
            });
        }
        let scheduler_config_path = dir.join("scheduler/scheduler_config.json");
        if !scheduler_config_path.exists() {
            return Err(Error::MissingFile(scheduler_config_path));
        }
        let force_zeros_for_empty_prompt = index
            .get("force_zeros_for_empty_prompt")
            .and_then(|v| v.as_bool())
            .unwrap_or(family == ModelFamily::Sdxl);
        Ok(StableDiffusion {
            dir: dir.to_path_buf(),
            family,
            tokenizer,
            text_encoder,
            tokenizer_2,
            text_encoder_2,
            unet,
            vae,
            scheduler_config_path,
            force_zeros_for_empty_prompt,
        })
    }

    pub fn device(&self) -> &Device {
        self.unet.device()
    }

    pub fn dtype(&self) -> DType {
        self.unet.dtype()
    }

    /// Latent-to-pixel scale factor (8 for SD).
    pub fn vae_scale_factor(&self) -> usize {
        self.vae.downscale_factor()
    }

    /// Encodes prompts as the diffusers pipelines do: SD 1.x/2.x use `last_hidden_state`; SDXL concatenates
    /// the penultimate hidden states of both encoders and pools from the second one.
    pub fn encode_prompts(&self, prompts: &[&str]) -> Result<PromptEmbeds> {
        Ok(self.encode_prompts_pooled(prompts)?.0)
    }

    /// [`StableDiffusion::encode_prompts`] plus every family's pooled text embedding `[B, D]`: the EOS state of
    /// the text encoder (SD 1.x/2.x, which the UNet does not use) or encoder 2's `text_embeds` (SDXL, the
    /// embeds' `pooled`).
    pub fn encode_prompts_pooled(&self, prompts: &[&str]) -> Result<(PromptEmbeds, Tensor)> {
        let dev = self.device();
        let (ids, _) = self.tokenizer.encode_batch_on(prompts, dev)?;
        let out = self.text_encoder.forward(&ids)?;
        match (&self.tokenizer_2, &self.text_encoder_2) {
            (Some(tok2), Some(te2)) => {
                let (ids2, _) = tok2.encode_batch_on(prompts, dev)?;
                let out2 = te2.forward(&ids2)?;
                let hs = Tensor::cat(
                    &[
                        &out.penultimate_hidden_state,
                        &out2.penultimate_hidden_state,
                    ],
                    2,
                )?;
                let pooled = out2.text_embeds.clone().unwrap_or(out2.pooled.clone());
                Ok((
                    PromptEmbeds {
                        hidden_states: hs,
                        pooled: Some(pooled.clone()),
                    },
                    pooled,
                ))
            }
            _ => Ok((
                PromptEmbeds {
                    hidden_states: out.last_hidden_state,
                    pooled: None,
                },
                out.pooled,
            )),
        }
    }

    /// SDXL micro-conditioning for a batch: time ids `(orig_h, orig_w, 0, 0, h, w)` and the pooled embeds.
    pub fn added_cond(
        &self,
        embeds: &PromptEmbeds,
        height: usize,
        width: usize,
    ) -> Result<Option<AddedCond>> {
        if !self.unet.config().uses_text_time() {
            return Ok(None);
        }
        let pooled = embeds
            .pooled
            .clone()
            .ok_or_else(|| Error::msg("SDXL UNet needs pooled text embeddings (text_encoder_2)"))?;
        let b = pooled.dim(0)?;
        let row = [
            height as f32,
            width as f32,
            0.,
            0.,
            height as f32,
            width as f32,
        ];
        let ids: Vec<f32> = (0..b).flat_map(|_| row).collect();
        let time_ids = Tensor::from_vec(ids, (b, 6), self.device())?.to_dtype(self.dtype())?;
        Ok(Some(AddedCond {
            text_embeds: pooled,
            time_ids,
        }))
    }
}
