//! The step-aware preference model (SPM) of SPO (Liang et al., "Aesthetic Post-Training Diffusion Models from
//! Generic Preferences with Step-by-step Preference Optimization", CVPR 2025, §3; code `RockeyCoss/SPO`,
//! `step_aware_preference_model/`): a CLIP model whose image tower is conditioned on the diffusion timestep with
//! DiT's adaLN-Zero, scoring the *decoded predicted clean image* x̂₀ of a noisy step.
//!
//! ```text
//! c          = MLP(sinusoid₂₅₆(t))                 Linear(256 → W), SiLU, Linear(W → W); cos then sin, period 1e4
//! per block: (shift_a, scale_a, gate_a, shift_m, scale_m, gate_m) = Linear(W → 6W)(SiLU(c))
//!            h ← h + gate_a ⊙ Attn(LN₁(h)·(1 + scale_a) + shift_a)
//!            h ← h + gate_m ⊙ MLP(LN₂(h)·(1 + scale_m) + shift_m)
//! pooled     = LN_post(h_cls)·(1 + scale) + shift     (shift, scale) = Linear(W → 2W)(SiLU(c))
//! s(p, x̂₀, t) = exp(logit_scale) · ⟨proj(pooled)/‖·‖, text(p)/‖·‖⟩              (PickScore's score)
//! ```
//!
//! **Initialisation** (the code's `init_adaln_paras`): the adaLN weights 0, their biases 0 except the two gate
//! chunks (1), the final modulation all zeros, the timestep MLP's weights N(0, 0.02) and biases 0: a fresh SPM
//! scores exactly as its CLIP backbone at every t.
//!
//! **Backbones** ([`SpmBackbone`]): any CLIP-family folder the reward models load (a transformers `CLIPModel`
//! folder such as PickScore_v1, or open_clip), every weight trained (the paper trains the whole model); or a new
//! image tower from scratch next to the CLIP text encoder of a diffusion model (the shapes world: its text
//! encoder knows the captions' words).
//!
//! **Input.** The SPM sees images: at a noisy step the decoded x̂₀ of the diffusion model
//! [`SpmConfig::diffusion_model`] (CFG [`SpmConfig::guidance`]), at the last step the sample itself with t = 0.
//! Making x̂₀ needs the diffusion model; this crate scores the images it is given (as a [`Reward`], at
//! [`StepAwarePreferenceModel::reward_timestep`], default 0).
//!
//! # Saved form
//!
//! A CLIP folder (the backbone's `config.json` or `open_clip_config.json`, `preprocessor_config.json`, the
//! tokenizer, and the trained weights as `model.safetensors` / `open_clip_model.safetensors` under the
//! backbone's names) plus `spm_config.json` ([`SpmConfig`]) and `spm.safetensors` (the timestep embedder and the
//! modulations: `time_embedder.linear_{1,2}.{weight,bias}`, `adaln.{i}.{weight,bias}`,
//! `final_adaln.{weight,bias}`). The folder also loads as a plain CLIP model (the timestep ignored).

use crate::clip::{
    l2_normalize, BlockModulation, ClipConfig, ClipLoadOptions, Layout, TowerModulation,
};
use crate::{ClipModel, Error, Result, Reward};
use candle_core::{DType, Device, Tensor, Var, D};
use diffpref_pipelines::nn::linear;
use diffpref_pipelines::tokenizer::ClipTokenizer;
use diffpref_pipelines::Params;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// `spm_config.json`.
pub const CONFIG_FILE: &str = "spm_config.json";
/// The timestep embedder's and the modulations' weights.
pub const HEADS_FILE: &str = "spm.safetensors";
use crate::clip::{find_tokenizer_dir, LOGIT_SCALE_INIT, LOGIT_SCALE_MAX};
use crate::lrm::{save_tensors, write_file};

/// What an SPM folder says about itself.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SpmConfig {
    /// The diffusion model whose predicted x̂₀ the SPM scores (its UNet predicts, its VAE decodes).
    pub diffusion_model: PathBuf,
    /// Classifier-free guidance of that prediction (the paper: 5).
    pub guidance: f64,
    /// Length of the sinusoidal timestep features (256).
    pub frequency_dim: usize,
    /// Their maximal period (1e4).
    pub max_period: f64,
    /// The image tower's width and depth (checked against the CLIP weights on load).
    pub width: usize,
    pub layers: usize,
}

/// A new image tower, trained from scratch next to a diffusion model's CLIP text encoder.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ScratchTower {
    /// Input side in pixels (images are resized to it).
    pub image_size: usize,
    pub patch_size: usize,
    pub width: usize,
    pub layers: usize,
    pub heads: usize,
    /// Hidden size of the MLPs (default 4 × width).
    pub mlp_dim: Option<usize>,
    /// Joint embedding size (default: the text encoder's width).
    pub embed_dim: Option<usize>,
}

/// Where a new SPM's CLIP comes from.
#[derive(Clone, Debug)]
pub enum SpmBackbone {
    /// A CLIP-family folder (transformers `CLIPModel` or open_clip), with an optional tokenizer folder (for
    /// open_clip checkpoints that ship none).
    Clip {
        path: PathBuf,
        tokenizer: Option<PathBuf>,
    },
    /// [`ScratchTower`] plus the text tower of `<diffusion model>/text_encoder` (a transformers
    /// `CLIPTextModel`) and its tokenizer; the projections random.
    Scratch(ScratchTower),
}

/// One `Linear` with PyTorch's `[out, in]` weight.
struct Dense {
    w: Var,
    b: Var,
}

impl Dense {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        linear(x, self.w.as_tensor(), Some(self.b.as_tensor()))
    }
}

/// The SPM (see the module docs).
pub struct StepAwarePreferenceModel {
    pub config: SpmConfig,
    pub clip: ClipModel,
    time_1: Dense,
    time_2: Dense,
    adaln: Vec<Dense>,
    final_adaln: Dense,
    /// The CLIP's parameters (checkpoint name, var); empty when loaded for scoring only.
    clip_vars: Vec<(String, Var)>,
    /// Files copied next to the weights on save (config, preprocessor, tokenizer), with their saved names.
    aux_files: Vec<(PathBuf, String)>,
    /// The HF config to write (scratch towers), instead of a copied file.
    hf_config: Option<String>,
    /// The timestep images are scored at as a [`Reward`] (they are taken as the x̂₀ of that step).
    pub reward_timestep: f64,
}

/// DiT's sinusoidal timestep features `[B, dim]` of `t` `[B]` (f32): `cat(cos(t·f), sin(t·f))`,
/// `f_i = exp(−ln(max_period)·i/half)`.
pub fn timestep_features(t: &Tensor, dim: usize, max_period: f64) -> Result<Tensor> {
    let half = dim / 2;
    let dev = t.device();
    let freqs: Vec<f32> = (0..half)
        .map(|i| (-(max_period.ln()) * i as f64 / half as f64).exp() as f32)
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), dev)?;
    let args = t
        .to_dtype(DType::F32)?
        .reshape((t.elem_count(), 1))?
        .broadcast_mul(&freqs)?;
    let mut parts = vec![args.cos()?, args.sin()?];
    if dim % 2 == 1 {
        parts.push(Tensor::zeros((t.elem_count(), 1), DType::F32, dev)?);
    }
    Ok(Tensor::cat(&parts, 1)?)
}

const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
];

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| diffpref_pipelines::Error::io(path, e))?;
    serde_json::from_str(&text)
        .map_err(|e| Error::msg(format!("{}: not JSON: {e}", path.display())))
}

impl StepAwarePreferenceModel {
    /// A new, trainable SPM (f32): the CLIP of `backbone` with the timestep conditioning initialised as the
    /// module docs say (`seed` draws the timestep MLP, and a scratch tower).
    pub fn new_trainable(
        backbone: &SpmBackbone,
        diffusion_model: &Path,
        guidance: f64,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        if !(guidance.is_finite() && guidance >= 0.0) {
            return Err(Error::msg(format!(
                "the SPM's guidance must be finite and >= 0 (got {guidance})"
            )));
        }
        let (clip, clip_vars, aux_files, hf_config) = match backbone {
            SpmBackbone::Clip { path, tokenizer } => {
                let opts = ClipLoadOptions {
                    tokenizer: tokenizer.clone(),
                    ..Default::default()
                };
                let (clip, vars) = ClipModel::load_trainable(path, &opts, device)?;
                let dir = if path.is_file() {
                    path.parent().unwrap_or(Path::new(".")).to_path_buf()
                } else {
                    path.clone()
                };
                let mut aux = Vec::new();
                for f in [
                    "config.json",
                    "open_clip_config.json",
                    "preprocessor_config.json",
                ] {
                    if dir.join(f).exists() {
                        aux.push((dir.join(f), f.to_string()));
                    }
                }
                let tok = tokenizer.clone().or_else(|| find_tokenizer_dir(&dir));
                if let Some(t) = tok {
                    for f in TOKENIZER_FILES {
                        if t.join(f).exists() {
                            aux.push((t.join(f), f.to_string()));
                        }
                    }
                }
                (clip, vars, aux, None)
            }
            SpmBackbone::Scratch(s) => {
                let (clip, vars, config) = scratch_clip(s, diffusion_model, seed, device)?;
                let tok = diffusion_model.join("tokenizer");
                let aux = TOKENIZER_FILES
                    .iter()
                    .filter(|f| tok.join(f).exists())
                    .map(|f| (tok.join(f), f.to_string()))
                    .collect();
                (clip, vars, aux, Some(config))
            }
        };
        let w = clip.vision.config().tower.width;
        let layers = clip.vision.config().tower.layers;
        let config = SpmConfig {
            diffusion_model: diffusion_model
                .canonicalize()
                .unwrap_or_else(|_| diffusion_model.to_path_buf()),
            guidance,
            frequency_dim: 256,
            max_period: 10_000.0,
            width: w,
            layers,
        };
        let f = config.frequency_dim;
        let normal = |s: u64, shape: &[usize]| -> Result<Var> {
            let n = diffpref_pipelines::pipeline::seeded_noise(s, shape, device)?;
            Ok(Var::from_tensor(&(n.to_dtype(DType::F32)? * 0.02)?)?)
        };
        let zeros = |shape: &[usize]| -> Result<Var> {
            Ok(Var::from_tensor(&Tensor::zeros(
                shape,
                DType::F32,
                device,
            )?)?)
        };
        let time_1 = Dense {
            w: normal(seed.wrapping_add(1), &[w, f])?,
            b: zeros(&[w])?,
        };
        let time_2 = Dense {
            w: normal(seed.wrapping_add(2), &[w, w])?,
            b: zeros(&[w])?,
        };
        // Gates (chunks 2 and 5 of 6) open: the modulated block is the plain one.
        let mut gate_bias = vec![0f32; 6 * w];
        for v in gate_bias[2 * w..3 * w].iter_mut() {
            *v = 1.0;
        }
        for v in gate_bias[5 * w..6 * w].iter_mut() {
            *v = 1.0;
        }
        let adaln = (0..layers)
            .map(|_| {
                Ok(Dense {
                    w: zeros(&[6 * w, w])?,
                    b: Var::from_tensor(&Tensor::from_vec(gate_bias.clone(), 6 * w, device)?)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let final_adaln = Dense {
            w: zeros(&[2 * w, w])?,
            b: zeros(&[2 * w])?,
        };
        Ok(StepAwarePreferenceModel {
            config,
            clip,
            time_1,
            time_2,
            adaln,
            final_adaln,
            clip_vars,
            aux_files,
            hf_config,
            reward_timestep: 0.0,
        })
    }

    /// Loads a saved SPM folder (see the module docs) in `dtype` on `device`.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let cfg_path = dir.join(CONFIG_FILE);
        if !cfg_path.exists() {
            return Err(Error::msg(format!(
                "{}: no {CONFIG_FILE} (not a step-aware preference model folder; train one with `diffpref train spm`)",
                dir.display()
            )));
        }
        let config: SpmConfig = serde_json::from_value(read_json(&cfg_path)?)
            .map_err(|e| Error::msg(format!("{}: {e}", cfg_path.display())))?;
        let clip = ClipModel::load_with(dir, &ClipLoadOptions::default(), dtype, device)?;
        let vc = clip.vision.config();
        if vc.tower.width != config.width || vc.tower.layers != config.layers {
            return Err(Error::msg(format!(
                "{}: width {} / layers {}, but the CLIP image tower has {} / {}",
                cfg_path.display(),
                config.width,
                config.layers,
                vc.tower.width,
                vc.tower.layers
            )));
        }
        let heads_path = dir.join(HEADS_FILE);
        let files = [heads_path.clone()];
        let p = Params::from_files(&files, DType::F32, device)?;
        let (w, f) = (config.width, config.frequency_dim);
        let dense = |name: &str, d_in: usize, d_out: usize| -> Result<Dense> {
            let q = p.pp(name);
            Ok(Dense {
                w: Var::from_tensor(&q.get((d_out, d_in), "weight")?)?,
                b: Var::from_tensor(&q.get(d_out, "bias")?)?,
            })
        };
        let time_1 = dense("time_embedder.linear_1", f, w)?;
        let time_2 = dense("time_embedder.linear_2", w, w)?;
        let adaln = (0..config.layers)
            .map(|i| dense(&format!("adaln.{i}"), w, 6 * w))
            .collect::<Result<Vec<_>>>()
            .map_err(|e| Error::msg(format!("{}: {e}", heads_path.display())))?;
        let final_adaln = dense("final_adaln", w, 2 * w)?;
        Ok(StepAwarePreferenceModel {
            config,
            clip,
            time_1,
            time_2,
            adaln,
            final_adaln,
            clip_vars: Vec::new(),
            aux_files: Vec::new(),
            hf_config: None,
            reward_timestep: 0.0,
        })
    }

    /// Every trainable parameter: the CLIP's (when made by [`Self::new_trainable`]) and the conditioning's.
    pub fn trainable_vars(&self) -> Vec<(String, Var)> {
        let mut v: Vec<(String, Var)> = self
            .clip_vars
            .iter()
            .filter(|(n, _)| !n.ends_with("position_ids"))
            .map(|(n, v)| (format!("clip.{n}"), v.clone()))
            .collect();
        v.extend(self.head_tensors_named());
        v
    }

    fn head_tensors_named(&self) -> Vec<(String, Var)> {
        let mut v = Vec::new();
        let mut push = |name: &str, d: &Dense| {
            v.push((format!("{name}.weight"), d.w.clone()));
            v.push((format!("{name}.bias"), d.b.clone()));
        };
        push("time_embedder.linear_1", &self.time_1);
        push("time_embedder.linear_2", &self.time_2);
        for (i, d) in self.adaln.iter().enumerate() {
            push(&format!("adaln.{i}"), d);
        }
        push("final_adaln", &self.final_adaln);
        v
    }

    /// The image tower's conditioning at timesteps `t` (`[B]` or `[1]`, broadcast to `b`).
    pub fn modulation(&self, t: &Tensor, b: usize) -> Result<TowerModulation> {
        let dev = self.clip.device();
        let t = t.to_device(dev)?.to_dtype(DType::F32)?.flatten_all()?;
        let t = if t.elem_count() == 1 && b > 1 {
            t.broadcast_as(b)?.contiguous()?
        } else {
            t
        };
        let feats = timestep_features(&t, self.config.frequency_dim, self.config.max_period)?;
        let c = self.time_2.forward(&self.time_1.forward(&feats)?.silu()?)?;
        let sc = c.silu()?;
        let dt = self.clip.dtype();
        let w = self.config.width;
        let blocks = self
            .adaln
            .iter()
            .map(|d| {
                let m = d.forward(&sc)?.to_dtype(dt)?;
                let ch = |i: usize| m.narrow(D::Minus1, i * w, w);
                Ok(BlockModulation {
                    shift_attn: ch(0)?,
                    scale_attn: ch(1)?,
                    gate_attn: ch(2)?,
                    shift_mlp: ch(3)?,
                    scale_mlp: ch(4)?,
                    gate_mlp: ch(5)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let f = self.final_adaln.forward(&sc)?.to_dtype(dt)?;
        Ok(TowerModulation {
            blocks,
            pooled_shift: f.narrow(D::Minus1, 0, w)?,
            pooled_scale: f.narrow(D::Minus1, w, w)?,
        })
    }

    /// exp(logit_scale), capped at 100 as in CLIP (f32 scalar, differentiable).
    pub fn scale(&self) -> Result<Tensor> {
        Ok(self
            .clip
            .logit_scale()?
            .to_dtype(DType::F32)?
            .clamp(f64::NEG_INFINITY, LOGIT_SCALE_MAX)?
            .exp()?)
    }

    /// The scores `[B]` (f32) of `images` `[B, 3, H, W]` in [0, 1] as the x̂₀ of timesteps `t` (`[B]`, or one
    /// for all), differentiable with respect to every parameter (the text tower included).
    pub fn score_images(&self, images: &Tensor, prompts: &[&str], t: &Tensor) -> Result<Tensor> {
        let b = images.dim(0)?;
        if prompts.len() != b {
            return Err(Error::msg(format!(
                "{b} images but {} prompts",
                prompts.len()
            )));
        }
        let dev = self.clip.device();
        let pv = self
            .clip
            .preprocess(&images.to_device(dev)?.to_dtype(DType::F32)?)?
            .pixel_values;
        let m = self.modulation(t, b)?;
        let img = self.clip.vision.forward_modulated(&pv, Some(&m))?.embeds;
        let img = l2_normalize(&img.to_dtype(DType::F32)?)?;
        let ids = self.clip.tokenize(prompts)?;
        let txt = l2_normalize(&self.clip.encode_text(&ids)?.embeds.to_dtype(DType::F32)?)?;
        let cos = (img * txt)?.sum(1)?;
        Ok(cos.broadcast_mul(&self.scale()?)?)
    }

    /// Writes the SPM folder (see the module docs) into `dir` (which must exist).
    pub fn save(&self, dir: &Path) -> Result<()> {
        if self.clip_vars.is_empty() {
            return Err(Error::msg(
                "this SPM was loaded for scoring (no trainable CLIP parameters to save)",
            ));
        }
        for (src, name) in &self.aux_files {
            std::fs::copy(src, dir.join(name))
                .map_err(|e| Error::msg(format!("copying {}: {e}", src.display())))?;
        }
        if let Some(c) = &self.hf_config {
            write_file(&dir.join("config.json"), c.as_bytes())?;
        }
        let weights_file = match self.clip.config.layout {
            Layout::HuggingFace => "model.safetensors",
            Layout::OpenClip => "open_clip_model.safetensors",
        };
        let clip: Vec<(String, Tensor)> = self
            .clip_vars
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        save_tensors(&dir.join(weights_file), &clip)?;
        let heads: Vec<(String, Tensor)> = self
            .head_tensors_named()
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().clone()))
            .collect();
        save_tensors(&dir.join(HEADS_FILE), &heads)?;
        let text = serde_json::to_string_pretty(&self.config)
            .map_err(|e| Error::msg(format!("spm config: {e}")))?;
        write_file(&dir.join(CONFIG_FILE), text.as_bytes())?;
        Ok(())
    }
}

/// A scratch CLIP, its vars and its `config.json`.
type ScratchClip = (ClipModel, Vec<(String, Var)>, String);

/// A transformers `CLIPModel` with a random image tower and `<diffusion>/text_encoder` as its text tower;
/// returns it, its vars and its `config.json`.
fn scratch_clip(
    s: &ScratchTower,
    diffusion: &Path,
    seed: u64,
    device: &Device,
) -> Result<ScratchClip> {
    let te_dir = diffusion.join("text_encoder");
    let te_cfg_path = te_dir.join("config.json");
    let te_cfg = read_json(&te_cfg_path)?;
    let get = |k: &str| -> Result<usize> {
        te_cfg[k].as_u64().map(|v| v as usize).ok_or_else(|| {
            Error::msg(format!(
                "{}: no `{k}` (the SPM's scratch backbone takes a CLIP text encoder)",
                te_cfg_path.display()
            ))
        })
    };
    let text_width = get("hidden_size")?;
    let mut hf = serde_json::json!({
        "projection_dim": s.embed_dim.unwrap_or(text_width),
        "text_config": te_cfg.clone(),
        "vision_config": {
            "hidden_size": s.width,
            "num_hidden_layers": s.layers,
            "num_attention_heads": s.heads,
            "intermediate_size": s.mlp_dim.unwrap_or(4 * s.width),
            "image_size": s.image_size,
            "patch_size": s.patch_size,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
        },
    });
    if s.patch_size == 0 || !s.image_size.is_multiple_of(s.patch_size) {
        return Err(Error::msg(format!(
            "the SPM's scratch tower: image_size {} is not a multiple of patch_size {}",
            s.image_size, s.patch_size
        )));
    }
    hf["text_config"]["projection_dim"] = hf["projection_dim"].clone();
    let config = ClipConfig::from_hf_json(&hf.to_string(), "the SPM's scratch tower", None)?;
    // Random init for everything, then the text encoder's weights and CLIP's temperature over it.
    let p = Params::random(seed, DType::F32, device).trainable();
    ClipModel::from_params(&p, config.clone(), true)?;
    let mut map: std::collections::HashMap<String, Tensor> = p
        .vars()
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().clone()))
        .collect();
    let files = diffpref_pipelines::weights::find_weight_files(&te_dir, "model", None)?;
    for f in &files {
        for (n, t) in candle_core::safetensors::load(f, device)? {
            if let Some(slot) = map.get_mut(&n) {
                *slot = t.to_dtype(DType::F32)?;
            }
        }
    }
    map.insert(
        "logit_scale".into(),
        Tensor::new(LOGIT_SCALE_INIT as f32, device)?,
    );
    let p = Params::from_map(map, DType::F32, device).trainable();
    let mut clip = ClipModel::from_params(&p, config.clone(), true)?;
    let tok = find_tokenizer_dir(diffusion).ok_or_else(|| {
        Error::msg(format!(
            "{}: no tokenizer folder (the SPM's scratch backbone uses the diffusion model's tokenizer)",
            diffusion.display()
        ))
    })?;
    clip.set_tokenizer(ClipTokenizer::from_dir(&tok)?);
    clip.source = format!("a new image tower with {}", te_dir.display());
    let json = config.to_hf_json();
    Ok((clip, p.vars(), json))
}

impl Reward for StepAwarePreferenceModel {
    fn name(&self) -> &str {
        "spm"
    }

    fn score(&self, images: &Tensor, prompts: &[&str]) -> Result<Tensor> {
        let t = Tensor::new(&[self.reward_timestep as f32], images.device())?;
        self.score_images(images, prompts, &t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestep_features_are_cos_then_sin() {
        let t = Tensor::new(&[0f32, 500.0], &Device::Cpu).unwrap();
        let f = timestep_features(&t, 8, 10_000.0).unwrap();
        assert_eq!(f.dims(), &[2, 8]);
        let v = f.to_vec2::<f32>().unwrap();
        // t = 0: cos = 1, sin = 0.
        assert_eq!(&v[0][..4], &[1.0; 4]);
        assert_eq!(&v[0][4..], &[0.0; 4]);
        // t = 500, i = 1: f = 10000^(-1/4) = 0.1.
        assert!((v[1][1] - (50f32).cos()).abs() < 1e-4);
        assert!((v[1][5] - (50f32).sin()).abs() < 1e-4);
    }
}
