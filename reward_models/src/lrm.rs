//! The latent reward model (LRM): a diffusion model's own UNet encoder as a noise-aware reward model on noisy
//! latents (Zhang et al., "Diffusion Model as a Noise-Aware Latent Reward Model for Step-Level Preference
//! Optimization", NeurIPS 2025, §3.1; code `Kwai-Kolors/LPO`).
//!
//! ```text
//! f_d, f_mid   = UNet down + mid blocks of (x_t, t, prompt)                 (the up path is skipped)
//! V_d          = mean over H, W of f_d for each down block's last output before its downsampler
//! V_mid        = u + gs · (c − u)     c, u: pooled mid features of the prompt and of the empty prompt (VFE)
//! V            = W_vis · cat(V_d1 … V_dL, V_mid)                             (no bias; init N(0, 0.02))
//! T            = W_text · f_eos  (SD 1.x/2.x; W_text init identity)  |  text_embeds of encoder 2 (SDXL)
//! S(p, x_t, t) = exp(τ) · ⟨V/‖V‖, T/‖T‖⟩,   τ init ln(1/0.07), exp(τ) ≤ 100 as in CLIP
//! ```
//!
//! `gs = 1` disables the feature guidance (VFE) and its unconditional pass. The down-block pools use the
//! conditional pass only. Any SD-family model folder (SD 1.x, 2.x, SDXL, the shapes world's model) is a
//! backbone; the LRM only scores latents of that backbone's VAE.
//!
//! # Saved form
//!
//! A folder with `lrm_config.json` ([`LrmConfig`]: the backbone folder, the guidance, which parts were
//! trained), `heads.safetensors` (`visual_projection.weight` `[D, F]`, `text_projection.weight` `[D, D]` for SD
//! 1.x/2.x, `logit_scale` `[1]`) and, for each trained part, its diffusers folder (`unet/`, `text_encoder/`,
//! `text_encoder_2/`). The tokenizers, the VAE and untrained parts come from the backbone.
//!
//! As a [`Reward`] on images, the LRM encodes them with the backbone's VAE (the posterior mode) and scores the
//! clean latents at timestep [`LatentRewardModel::reward_timestep`] (default 0).

use crate::{Error, Result, Reward};
use candle_core::{DType, Device, Tensor, Var, D};
use diffpref_pipelines::loading::{LoadOptions, ModelFamily, StableDiffusion};
use diffpref_pipelines::models::clip_text::ClipTextModel;
use diffpref_pipelines::models::unet::{AddedCond, UNet2DConditionModel};
use diffpref_pipelines::schedulers::{NoiseSchedule, SchedulerConfig};
use diffpref_pipelines::weights::{check_loaded, find_weight_files, Params};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// `lrm_config.json`.
pub const CONFIG_FILE: &str = "lrm_config.json";
/// The heads' weights.
pub const HEADS_FILE: &str = "heads.safetensors";
pub use crate::clip::{LOGIT_SCALE_INIT, LOGIT_SCALE_MAX};

/// What an LRM folder says about itself.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LrmConfig {
    /// The diffusion model folder the LRM is built on (tokenizers, VAE, scheduler, untrained parts).
    pub backbone: PathBuf,
    /// VFE guidance `gs` on the pooled mid feature (1 = off).
    pub guidance_scale: f64,
    /// The UNet / text encoders saved in the folder (trained); the others come from the backbone.
    pub unet: bool,
    pub text_encoder: bool,
    #[serde(default)]
    pub text_encoder_2: bool,
    /// Length of the concatenated pooled features, F.
    pub feature_dim: usize,
    /// Length of the joint embedding, D.
    pub embed_dim: usize,
}

/// Which parts of the backbone are trained (the heads always are).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Trainable {
    pub unet: bool,
    pub text_encoders: bool,
}

/// The LRM (see the module docs).
pub struct LatentRewardModel {
    pub config: LrmConfig,
    /// The backbone with the LRM's UNet and text encoder(s) in place.
    pub model: StableDiffusion,
    visual_projection: Var,
    text_projection: Option<Var>,
    logit_scale: Var,
    /// Trainable backbone parameters (name, var) per part: `unet`, `text_encoder`, `text_encoder_2`.
    backbone_vars: Vec<(String, Vec<(String, Var)>)>,
    /// The timestep images are scored at as a [`Reward`] (their latents noised when > 0).
    pub reward_timestep: f64,
    /// The seed of that noise (image `i` of a call gets the noise of `seed + i`).
    pub noise_seed: u64,
    /// The backbone's noise schedule (what noises the latents of [`Reward::score`]).
    schedule: NoiseSchedule,
}

fn schedule_of(model: &StableDiffusion) -> Result<NoiseSchedule> {
    Ok(NoiseSchedule::new(&SchedulerConfig::from_file(
        &model.scheduler_config_path,
    )?)?)
}

/// UNet parameters the LRM's forward never reads (the up path and the output head).
fn unet_param_used(name: &str) -> bool {
    !(name.starts_with("up_blocks.")
        || name.starts_with("conv_norm_out.")
        || name.starts_with("conv_out."))
}

/// Whether SDXL's first text encoder uses parameter `name` (its context is the penultimate layer: the last
/// layer and the final LayerNorm are not read).
fn te1_param_used(name: &str, family: ModelFamily, layers: usize) -> bool {
    if family != ModelFamily::Sdxl {
        return !name.contains("text_projection");
    }
    let last = format!("encoder.layers.{}.", layers - 1);
    !(name.contains(&last) || name.contains("final_layer_norm") || name.contains("text_projection"))
}

fn trainable_unet(
    dir: &Path,
    model: &StableDiffusion,
    device: &Device,
) -> Result<(UNet2DConditionModel, Vec<(String, Var)>)> {
    let files = find_weight_files(dir, "diffusion_pytorch_model", None)?;
    let p = Params::from_files(&files, DType::F32, device)?.trainable();
    let unet = UNet2DConditionModel::new(&p, model.unet.config().clone())?;
    let vars = p
        .vars()
        .into_iter()
        .filter(|(n, _)| unet_param_used(n))
        .collect();
    Ok((unet, vars))
}

fn trainable_text(
    dir: &Path,
    enc: &ClipTextModel,
    device: &Device,
) -> Result<(ClipTextModel, Vec<(String, Var)>)> {
    let files = find_weight_files(dir, "model", None)?;
    let p = Params::from_files(&files, DType::F32, device)?.trainable();
    let te = ClipTextModel::new(&p, enc.config.clone())?;
    Ok((te, p.vars()))
}

/// Loads the diffusion model folder of an LRM.
fn load_backbone(dir: &Path, dtype: DType, device: &Device) -> Result<StableDiffusion> {
    Ok(StableDiffusion::load(
        dir,
        &LoadOptions {
            dtype,
            device: device.clone(),
            variant: None,
        },
    )?)
}

/// Mean over H, W: `[B, C, H, W]` → `[B, C]` (f32).
fn pool(x: &Tensor) -> Result<Tensor> {
    Ok(x.to_dtype(DType::F32)?.mean(D::Minus1)?.mean(D::Minus1)?)
}

/// Rows divided by their L2 norm.
fn normalize(x: &Tensor) -> Result<Tensor> {
    let n = (x.sqr()?.sum_keepdim(1)? + 1e-12)?.sqrt()?;
    Ok(x.broadcast_div(&n)?)
}

impl LatentRewardModel {
    /// A new, trainable LRM on the backbone folder `backbone` (f32): the heads initialised as the module docs
    /// say (`seed` draws W_vis), and trainable copies of the parts `trainable` names.
    pub fn new_trainable(
        backbone: &Path,
        guidance_scale: f64,
        trainable: Trainable,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        check_guidance(guidance_scale)?;
        let mut model = load_backbone(backbone, DType::F32, device)?;
        let mut backbone_vars = Vec::new();
        if trainable.unet {
            let (unet, vars) = trainable_unet(&backbone.join("unet"), &model, device)?;
            model.unet = unet;
            backbone_vars.push(("unet".to_string(), vars));
        }
        if trainable.text_encoders {
            let (te, vars) =
                trainable_text(&backbone.join("text_encoder"), &model.text_encoder, device)?;
            let layers = te.config.num_hidden_layers;
            let fam = model.family;
            model.text_encoder = te;
            backbone_vars.push((
                "text_encoder".to_string(),
                vars.into_iter()
                    .filter(|(n, _)| te1_param_used(n, fam, layers))
                    .collect(),
            ));
            if let Some(te2) = &model.text_encoder_2 {
                let (te, vars) = trainable_text(&backbone.join("text_encoder_2"), te2, device)?;
                model.text_encoder_2 = Some(te);
                backbone_vars.push(("text_encoder_2".to_string(), vars));
            }
        }
        let feature_dim = feature_dim(&model.unet);
        let embed_dim = text_dim(&model)?;
        let w =
            diffpref_pipelines::pipeline::seeded_noise(seed, &[embed_dim, feature_dim], device)?;
        let visual_projection = Var::from_tensor(&(w.to_dtype(DType::F32)? * 0.02)?)?;
        let text_projection = match model.family {
            ModelFamily::Sd => Some(Var::from_tensor(&Tensor::eye(
                embed_dim,
                DType::F32,
                device,
            )?)?),
            ModelFamily::Sdxl => None,
        };
        let logit_scale = Var::from_tensor(&Tensor::new(&[LOGIT_SCALE_INIT as f32], device)?)?;
        let backbone = backbone
            .canonicalize()
            .unwrap_or_else(|_| backbone.to_path_buf());
        Ok(LatentRewardModel {
            schedule: schedule_of(&model)?,
            config: LrmConfig {
                backbone,
                guidance_scale,
                unet: trainable.unet,
                text_encoder: trainable.text_encoders,
                text_encoder_2: trainable.text_encoders && model.text_encoder_2.is_some(),
                feature_dim,
                embed_dim,
            },
            model,
            visual_projection,
            text_projection,
            logit_scale,
            backbone_vars,
            reward_timestep: 0.0,
            noise_seed: 0,
        })
    }

    /// Loads a saved LRM folder (see the module docs) in `dtype` on `device`.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let cfg_path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| {
            Error::msg(format!(
                "{}: {e} (an LRM folder holds {CONFIG_FILE}, written by `diffpref train lrm`)",
                cfg_path.display()
            ))
        })?;
        let config: LrmConfig = serde_json::from_str(&text)
            .map_err(|e| Error::msg(format!("{}: {e}", cfg_path.display())))?;
        check_guidance(config.guidance_scale)
            .map_err(|e| Error::msg(format!("{}: `guidance_scale`: {e}", cfg_path.display())))?;
        if !config.backbone.join("model_index.json").exists() {
            return Err(Error::msg(format!(
                "{}: `backbone` {} is not a diffusers model folder (model_index.json missing)",
                cfg_path.display(),
                config.backbone.display()
            )));
        }
        let mut model = load_backbone(&config.backbone, dtype, device)?;
        if config.unet {
            model.unet = UNet2DConditionModel::load(dir.join("unet"), None, dtype, device)?;
        }
        if config.text_encoder {
            model.text_encoder =
                ClipTextModel::load(dir.join("text_encoder"), None, dtype, device)?;
        }
        if config.text_encoder_2 {
            model.text_encoder_2 = Some(ClipTextModel::load(
                dir.join("text_encoder_2"),
                None,
                dtype,
                device,
            )?);
        }
        let heads_path = dir.join(HEADS_FILE);
        if !heads_path.exists() {
            return Err(Error::msg(format!("{}: missing", heads_path.display())));
        }
        let heads = candle_core::safetensors::load(&heads_path, device)?;
        let files = heads_path.display().to_string();
        let get = |name: &str, shape: &[usize]| -> Result<Var> {
            let t = heads
                .get(name)
                .ok_or_else(|| Error::msg(format!("{files}: no tensor `{name}`")))?;
            check_loaded(t, name, &files)?;
            if t.dims() != shape {
                return Err(Error::msg(format!(
                    "{files}: `{name}` has shape {:?}, expected {shape:?} (from {CONFIG_FILE})",
                    t.dims()
                )));
            }
            Ok(Var::from_tensor(&t.to_dtype(DType::F32)?)?)
        };
        let (f, d) = (config.feature_dim, config.embed_dim);
        if feature_dim(&model.unet) != f || text_dim(&model)? != d {
            return Err(Error::msg(format!(
                "{}: feature_dim {f} / embed_dim {d} do not match the backbone's UNet and text encoder ({} / {})",
                cfg_path.display(),
                feature_dim(&model.unet),
                text_dim(&model)?
            )));
        }
        let visual_projection = get("visual_projection.weight", &[d, f])?;
        let text_projection = match model.family {
            ModelFamily::Sd => Some(get("text_projection.weight", &[d, d])?),
            ModelFamily::Sdxl => None,
        };
        let logit_scale = get("logit_scale", &[1])?;
        Ok(LatentRewardModel {
            schedule: schedule_of(&model)?,
            config,
            model,
            visual_projection,
            text_projection,
            logit_scale,
            backbone_vars: Vec::new(),
            reward_timestep: 0.0,
            noise_seed: 0,
        })
    }

    /// Every trainable parameter (the heads first, then the backbone parts), with unique names.
    pub fn trainable_vars(&self) -> Vec<(String, Var)> {
        let mut v = vec![
            (
                "visual_projection.weight".to_string(),
                self.visual_projection.clone(),
            ),
            ("logit_scale".to_string(), self.logit_scale.clone()),
        ];
        if let Some(t) = &self.text_projection {
            v.push(("text_projection.weight".to_string(), t.clone()));
        }
        for (part, vars) in &self.backbone_vars {
            v.extend(vars.iter().map(|(n, x)| (format!("{part}.{n}"), x.clone())));
        }
        v
    }

    /// Writes the LRM folder `dir` (which must exist): config, heads and the trained parts.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let heads: Vec<(String, Tensor)> = {
            let mut h = vec![
                (
                    "visual_projection.weight".to_string(),
                    self.visual_projection.as_tensor().clone(),
                ),
                (
                    "logit_scale".to_string(),
                    self.logit_scale.as_tensor().clone(),
                ),
            ];
            if let Some(t) = &self.text_projection {
                h.push(("text_projection.weight".to_string(), t.as_tensor().clone()));
            }
            h
        };
        save_tensors(&dir.join(HEADS_FILE), &heads)?;
        for (part, vars) in &self.backbone_vars {
            let src = self.config.backbone.join(part);
            let out = dir.join(part);
            std::fs::create_dir_all(&out)
                .map_err(|e| Error::msg(format!("cannot create {}: {e}", out.display())))?;
            std::fs::copy(src.join("config.json"), out.join("config.json")).map_err(|e| {
                Error::msg(format!(
                    "copying {}: {e}",
                    src.join("config.json").display()
                ))
            })?;
            // Every tensor of the part (the unused ones unchanged from the backbone), so the folder loads alone.
            let file = if part == "unet" {
                "diffusion_pytorch_model"
            } else {
                "model"
            };
            let files = find_weight_files(&src, file, None)?;
            let mut all: std::collections::BTreeMap<String, Tensor> =
                std::collections::BTreeMap::new();
            for f in &files {
                for (n, t) in candle_core::safetensors::load(f, &Device::Cpu)? {
                    all.insert(n, t);
                }
            }
            for (n, v) in vars {
                all.insert(n.clone(), v.as_tensor().to_device(&Device::Cpu)?);
            }
            let tensors: Vec<(String, Tensor)> = all.into_iter().collect();
            save_tensors(&out.join(format!("{file}.safetensors")), &tensors)?;
        }
        let text = serde_json::to_string_pretty(&self.config)
            .map_err(|e| Error::msg(format!("lrm config: {e}")))?;
        write_file(&dir.join(CONFIG_FILE), text.as_bytes())
    }

    pub fn device(&self) -> &Device {
        self.model.device()
    }

    /// The backbone's noise schedule.
    pub fn schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }

    /// The prompts' UNet conditioning and their text embedding `T` (`[B, D]`, f32), with graph through the
    /// text encoder(s) when they are trainable.
    fn encode(&self, prompts: &[&str]) -> Result<(Tensor, Tensor)> {
        let (embeds, pooled) = self.model.encode_prompts_pooled(prompts)?;
        let pooled = pooled.to_dtype(DType::F32)?;
        let t = match &self.text_projection {
            Some(w) => pooled.matmul(&w.as_tensor().t()?)?,
            None => pooled,
        };
        Ok((embeds.hidden_states, t))
    }

    /// SDXL's added conditioning for `n` rows of `pooled` text embeds at latent side `side`.
    fn added(&self, pooled: &Tensor, side: (usize, usize)) -> Result<Option<AddedCond>> {
        let f = self.model.vae_scale_factor();
        let embeds = diffpref_pipelines::loading::PromptEmbeds {
            hidden_states: pooled.clone(),
            pooled: Some(pooled.to_dtype(self.model.dtype())?),
        };
        Ok(self.model.added_cond(&embeds, side.0 * f, side.1 * f)?)
    }

    /// The pooled, guided features `cat(V_d1 … V_dL, V_mid)` `[B, F]` of latents `x_t` `[B, C, h, w]` at
    /// timesteps `t` (`[B]` or one) for prompts (B of them).
    pub fn features(&self, x_t: &Tensor, t: &Tensor, prompts: &[&str]) -> Result<(Tensor, Tensor)> {
        let b = x_t.dim(0)?;
        if prompts.len() != b {
            return Err(Error::msg(format!(
                "LRM: {b} latents but {} prompts",
                prompts.len()
            )));
        }
        let (_, _, h, w) = x_t.dims4()?;
        let gs = self.config.guidance_scale;
        let vfe = gs != 1.0;
        let mut all: Vec<&str> = prompts.to_vec();
        if vfe {
            all.push("");
        }
        let (hs, text) = self.encode(&all)?;
        let t_txt = text.narrow(0, 0, b)?;
        let t = t
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_device(x_t.device())?;
        let t = if t.dim(0)? == 1 {
            t.broadcast_as(b)?.contiguous()?
        } else {
            t
        };
        let (input, tt, ehs, pooled) = if vfe {
            let u = hs
                .narrow(0, b, 1)?
                .broadcast_as((b, hs.dim(1)?, hs.dim(2)?))?;
            let ehs = Tensor::cat(&[&hs.narrow(0, 0, b)?, &u.contiguous()?], 0)?;
            let tp = text
                .narrow(0, b, 1)?
                .broadcast_as((b, text.dim(1)?))?
                .contiguous()?;
            let pooled = Tensor::cat(&[&t_txt, &tp], 0)?;
            (
                Tensor::cat(&[x_t, x_t], 0)?,
                Tensor::cat(&[&t, &t], 0)?,
                ehs,
                pooled,
            )
        } else {
            (x_t.clone(), t.clone(), hs.narrow(0, 0, b)?, t_txt.clone())
        };
        let added = if self.model.unet.config().uses_text_time() {
            self.added(&pooled, (h, w))?
        } else {
            None
        };
        let out = self.model.unet.forward_features(
            &input.to_dtype(self.model.dtype())?,
            &tt,
            &ehs,
            added.as_ref(),
        )?;
        let mut parts = Vec::with_capacity(out.down_features.len() + 1);
        for f in &out.down_features {
            parts.push(pool(&f.narrow(0, 0, b)?)?);
        }
        let mid = pool(
            out.mid_feature
                .as_ref()
                .ok_or_else(|| Error::msg("LRM: the backbone UNet has no mid block"))?,
        )?;
        let mid = if vfe {
            let (c, u) = (mid.narrow(0, 0, b)?, mid.narrow(0, b, b)?);
            (&u + ((c - &u)? * gs)?)?
        } else {
            mid
        };
        parts.push(mid);
        Ok((Tensor::cat(&parts, 1)?, t_txt))
    }

    /// `S(p, x_t, t)` of the module docs, `[B]` f32.
    pub fn score_latents(&self, x_t: &Tensor, t: &Tensor, prompts: &[&str]) -> Result<Tensor> {
        let (feats, text) = self.features(x_t, t, prompts)?;
        let v = feats.matmul(&self.visual_projection.as_tensor().t()?)?;
        let cos = (normalize(&v)? * normalize(&text)?)?.sum(1)?;
        let scale = self
            .logit_scale
            .as_tensor()
            .clamp(f64::NEG_INFINITY, LOGIT_SCALE_MAX)?
            .exp()?;
        Ok(cos.broadcast_mul(&scale)?)
    }

    /// The current `exp(τ)`.
    pub fn temperature(&self) -> Result<f64> {
        Ok(self.logit_scale.as_tensor().to_vec1::<f32>()?[0]
            .min(LOGIT_SCALE_MAX as f32)
            .exp() as f64)
    }

    /// Clean latents of images `[B, 3, H, W]` in [0, 1] (the VAE posterior mode, scaled).
    pub fn encode_images(&self, images: &Tensor) -> Result<Tensor> {
        vae_latents(&self.model, images)
    }
}

/// F: the channels of each down block plus the mid block's.
fn feature_dim(unet: &UNet2DConditionModel) -> usize {
    let c = &unet.config().block_out_channels;
    c.iter().sum::<usize>() + c.last().copied().unwrap_or(0)
}

/// D: the text embedding's length (the hidden size for SD 1.x/2.x, encoder 2's projection for SDXL).
fn text_dim(model: &StableDiffusion) -> Result<usize> {
    match &model.text_encoder_2 {
        Some(te2) => Ok(
            match (te2.config.has_projection(), te2.config.projection_dim) {
                (true, Some(p)) => p,
                _ => te2.config.hidden_size,
            },
        ),
        None => Ok(model.text_encoder.config.hidden_size),
    }
}

fn check_guidance(gs: f64) -> Result<()> {
    if !gs.is_finite() || gs < 0.0 {
        return Err(Error::msg(format!(
            "the VFE guidance must be finite and >= 0 (got {gs})"
        )));
    }
    Ok(())
}

/// The scaled VAE posterior modes `[B, C, h, w]` (f32) of `images` in [0, 1] under `model`'s VAE.
pub fn vae_latents(model: &StableDiffusion, images: &Tensor) -> Result<Tensor> {
    let vae = &model.vae;
    let x = ((images.to_dtype(model.dtype())? * 2.0)? - 1.0)?;
    let z = vae.encode(&x)?.mode();
    Ok(vae.scale_latents(&z)?.to_dtype(DType::F32)?)
}

pub(crate) fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(|e| Error::msg(format!("cannot write {}: {e}", path.display())))
}

pub(crate) fn save_tensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let refs: Vec<(&str, Tensor)> = tensors
        .iter()
        .map(|(n, t)| Ok((n.as_str(), t.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<Result<_>>()?;
    let map: std::collections::HashMap<&str, Tensor> = refs.into_iter().collect();
    candle_core::safetensors::save(&map, &tmp)?;
    std::fs::rename(&tmp, path)
        .map_err(|e| Error::msg(format!("cannot write {}: {e}", path.display())))
}

impl Reward for LatentRewardModel {
    fn name(&self) -> &str {
        "lrm"
    }

    fn score(&self, images: &Tensor, prompts: &[&str]) -> Result<Tensor> {
        let z = self.encode_images(images)?;
        let t = Tensor::new(&[self.reward_timestep as f32], z.device())?;
        let z = if self.reward_timestep > 0.0 {
            let dims = z.dims()[1..].to_vec();
            let mut shape = vec![1];
            shape.extend(dims);
            let noise = (0..z.dim(0)?)
                .map(|i| {
                    diffpref_pipelines::pipeline::seeded_noise(
                        self.noise_seed + i as u64,
                        &shape,
                        z.device(),
                    )
                })
                .collect::<std::result::Result<Vec<_>, _>>()?;
            let noise = Tensor::cat(&noise, 0)?.to_dtype(DType::F32)?;
            let tt = t.broadcast_as(z.dim(0)?)?.contiguous()?;
            self.schedule.add_noise(&z, &noise, &tt)?
        } else {
            z
        };
        self.score_latents(&z, &t, prompts)
    }
}
