//! `diffpref pretrain`: a small Stable-Diffusion-architecture model trained from scratch on the shapes world
//! ([`crate::data::shapes`]), written as a complete diffusers folder that diffpref and diffusers both load.
//!
//! * Every component starts from [`Params::random`] (N(0, 1/fan_in) weights, zero biases, unit norm scales).
//!   Every block output of the VAE and the UNet goes through a GroupNorm before its final conv, so activations
//!   stay O(1) with this init (checked: the first VAE loss is ≈ 0.3–0.5, the first UNet loss ≈ 1). One
//!   deliberate change, as in ADM / improved-diffusion: the UNet's `conv_out` starts at zero, so the first
//!   prediction is ε̂ = 0 (loss exactly E[ε²] = 1) and no random output noise has to be unlearned.
//! * Stage 1 (`[vae_train]`, `[vae_loss]`): the VAE on freshly rendered random scenes (a new seeded batch each
//!   step, images in [-1, 1]) with `mse + l1_weight·L1 + kl_weight·KL`, KL being diffusers' per-sample sum
//!   (`DiagonalGaussian::kl`) averaged over the batch. Then the latent scaling factor is set to 1/std of
//!   posterior samples of `scale_images` fresh scenes (as SD's 0.18215 was found) and stored in the VAE config.
//!   The finished VAE is kept in `run_dir/vae/final/` (a later run skips stage 1).
//! * Stage 2 (`[unet_train]`): VAE and the random text encoder frozen; the UNet learns ε-prediction with the
//!   SD1.5 scaled-linear schedule, `t ~ U{0..999}`, `caption_dropout` of empty prompts (for CFG), AdamW with
//!   warmup, optional EMA (the exported UNet is the EMA one when kept).
//! * Both stages write resumable checkpoints (`run_dir/{vae,unet}/checkpoint-N/`, weights + optimizer + EMA +
//!   random streams: a resumed CPU run is identical to an uninterrupted one) and `metrics.jsonl`.
//! * Export: `output_dir` gets `model_index.json`, `unet/`, `vae/`, `text_encoder/` (transformers layout,
//!   `text_model.`-prefixed names), `tokenizer/` (copied from `tokenizer`), `scheduler/` (DDIM, SD1.5), written in
//!   a temporary sibling folder and renamed into place.

use crate::config::DeviceSpec;
use crate::data::shapes::Scene;
use crate::engine::config::{LogConfig, OptimConfig};
use crate::engine::hooks::Hooks;
use crate::engine::method::{Method, MicroStep, StartContext, StepContext};
use crate::engine::policy::Policy;
use crate::engine::trainer::{train, TrainerSettings};
use crate::io::{save_safetensors, write_dir_atomic, write_json};
use crate::output::{Input, OutputDir};

/// The command name in the output markers.
const PRETRAIN: &str = "pretrain";
use crate::train::checkpoint::StopFlag;
use crate::train::rng::Rng;
use crate::train::schedule::{LrSchedule, ScheduleKind};
use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use diffpref_pipelines::models::clip_text::{ClipTextConfig, ClipTextModel};
use diffpref_pipelines::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use diffpref_pipelines::models::vae::{AutoencoderKL, AutoencoderKLConfig};
use diffpref_pipelines::schedulers::{NoiseSchedule, SchedulerConfig};
use diffpref_pipelines::tokenizer::ClipTokenizer;
use diffpref_pipelines::weights::Params;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const DIFFUSERS_VERSION: &str = "0.42.1";

/// `[data]`: the rendered training images.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PretrainData {
    /// Image side in pixels (a multiple of the VAE downscale factor). Default 32.
    pub resolution: u32,
    /// Objects per scene, 1..=3. Default 3.
    pub max_objects: usize,
    /// Probability of training the UNet on the empty prompt (classifier-free guidance). Default 0.1.
    pub caption_dropout: f64,
}

impl Default for PretrainData {
    fn default() -> Self {
        PretrainData {
            resolution: 32,
            max_objects: 3,
            caption_dropout: 0.1,
        }
    }
}

/// `[vae]`: the `AutoencoderKL` architecture (diffusers keys).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VaeArch {
    /// Channels per encoder/decoder block; each block after the first halves the resolution. Default [32, 64].
    pub block_out_channels: Vec<usize>,
    /// ResNet blocks per encoder block (the decoder has one more). Default 1.
    pub layers_per_block: usize,
    /// Latent channels. Default 4 (what SD UNets expect).
    pub latent_channels: usize,
    /// GroupNorm groups (must divide every channel count). Default 32.
    pub norm_num_groups: usize,
    /// Self-attention in the mid block. Default true.
    pub mid_block_add_attention: bool,
}

impl Default for VaeArch {
    fn default() -> Self {
        VaeArch {
            block_out_channels: vec![32, 64],
            layers_per_block: 1,
            latent_channels: 4,
            norm_num_groups: 32,
            mid_block_add_attention: true,
        }
    }
}

/// `[unet]`: the `UNet2DConditionModel` architecture (diffusers keys).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UnetArch {
    /// Channels per resolution level. Default [32, 64, 64].
    pub block_out_channels: Vec<usize>,
    /// CrossAttnDownBlock2D | DownBlock2D per level. Default [CrossAttn, CrossAttn, Down].
    pub down_block_types: Vec<String>,
    /// CrossAttnUpBlock2D | UpBlock2D per level (deepest first). Default [Up, CrossAttn, CrossAttn].
    pub up_block_types: Vec<String>,
    /// ResNet blocks per down level (up levels get one more). Default 1.
    pub layers_per_block: usize,
    /// Attention heads (diffusers' misnamed `attention_head_dim`). Default 4.
    pub attention_head_dim: usize,
    /// Transformer blocks per attention. Default 1.
    pub transformer_layers_per_block: usize,
    /// GroupNorm groups. Default 32.
    pub norm_num_groups: usize,
    /// Zero-initialise `conv_out` (ADM style; ε̂ = 0 at step 0). Default true.
    pub zero_init_out: bool,
}

impl Default for UnetArch {
    fn default() -> Self {
        UnetArch {
            block_out_channels: vec![32, 64, 64],
            down_block_types: vec![
                "CrossAttnDownBlock2D".into(),
                "CrossAttnDownBlock2D".into(),
                "DownBlock2D".into(),
            ],
            up_block_types: vec![
                "UpBlock2D".into(),
                "CrossAttnUpBlock2D".into(),
                "CrossAttnUpBlock2D".into(),
            ],
            layers_per_block: 1,
            attention_head_dim: 4,
            transformer_layers_per_block: 1,
            norm_num_groups: 32,
            zero_init_out: true,
        }
    }
}

/// `[text_encoder]`: the CLIP text transformer (transformers keys; random and frozen).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TextArch {
    /// Width (also the UNet's `cross_attention_dim`). Default 32.
    pub hidden_size: usize,
    /// MLP width. Default 64.
    pub intermediate_size: usize,
    pub num_attention_heads: usize,
    pub num_hidden_layers: usize,
}

impl Default for TextArch {
    fn default() -> Self {
        TextArch {
            hidden_size: 32,
            intermediate_size: 64,
            num_attention_heads: 4,
            num_hidden_layers: 2,
        }
    }
}

/// `[vae_train]` / `[unet_train]`: one stage's optimisation.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StageConfig {
    /// Optimizer steps. Default 1000.
    pub steps: u64,
    /// Images per step. Default 16.
    pub batch_size: usize,
    /// Peak learning rate. Default 1e-3.
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay. Default 1e-2.
    pub weight_decay: f64,
    /// Global gradient-norm clipping (0 = off). Default 1.0.
    pub max_grad_norm: f64,
    /// constant | constant_with_warmup | cosine | linear. Default cosine.
    pub schedule: ScheduleKind,
    /// Warmup steps. Default 100.
    pub warmup_steps: u64,
    /// EMA decay of the exported weights (0 = off). Default 0.
    pub ema_decay: f64,
}

impl Default for StageConfig {
    fn default() -> Self {
        StageConfig {
            steps: 1000,
            batch_size: 16,
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
            max_grad_norm: 1.0,
            schedule: ScheduleKind::Cosine,
            warmup_steps: 100,
            ema_decay: 0.0,
        }
    }
}

/// `[vae_loss]`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VaeLoss {
    /// Weight of the mean absolute error added to the MSE. Default 0.
    pub l1_weight: f64,
    /// Weight of the KL to N(0, I) (per-sample sum, batch mean). Default 1e-6.
    pub kl_weight: f64,
    /// Fresh images whose posterior samples set `scaling_factor = 1/std`. Default 256.
    pub scale_images: usize,
}

impl Default for VaeLoss {
    fn default() -> Self {
        VaeLoss {
            l1_weight: 0.0,
            kl_weight: 1e-6,
            scale_images: 256,
        }
    }
}

/// `[log]`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PretrainLog {
    /// Checkpoint every N steps of each stage (and at its end). Default 500.
    pub checkpoint_every: u64,
    /// Checkpoints kept per stage. Default 2.
    pub keep_last: usize,
    /// Progress bar. Default true.
    pub progress: bool,
    /// TensorBoard event files next to each stage's `metrics.jsonl`. Default true.
    pub tensorboard: bool,
}

impl Default for PretrainLog {
    fn default() -> Self {
        PretrainLog {
            checkpoint_every: 500,
            keep_last: 2,
            progress: true,
            tensorboard: true,
        }
    }
}

/// A whole pretraining run (`diffpref pretrain --config FILE.toml`). See `examples/pretrain-shapes.toml`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PretrainConfig {
    /// The diffusers folder written at the end. Default: `run_dir/model`.
    pub output_dir: Option<PathBuf>,
    /// Checkpoints, metrics and the finished VAE of stage 1. Default runs/pretrain.
    pub run_dir: PathBuf,
    /// CLIP tokenizer folder, copied into the model. Default tests/fixtures/clip-tokenizer.
    pub tokenizer: PathBuf,
    /// Seed of the init and of every random stream. Default 0.
    pub seed: u64,
    /// cpu | cuda | cuda:N. Default cpu.
    pub device: DeviceSpec,
    /// Continue from the latest checkpoints in `run_dir`. Default true.
    pub resume: bool,
    /// Write `run_dir` / `output_dir` into non-empty folders that `pretrain` did not write (see
    /// [`crate::output`]). Default false.
    pub overwrite: bool,
    /// dtype of the exported safetensors: f32 | f16 | bf16 (training is always f32: from scratch there is no
    /// master copy to keep). `pretrain --dtype` sets it. Default f32.
    pub save_dtype: String,
    pub data: PretrainData,
    pub vae: VaeArch,
    pub unet: UnetArch,
    pub text_encoder: TextArch,
    pub vae_train: StageConfig,
    pub vae_loss: VaeLoss,
    pub unet_train: StageConfig,
    pub log: PretrainLog,
}

impl Default for PretrainConfig {
    fn default() -> Self {
        PretrainConfig {
            output_dir: None,
            run_dir: PathBuf::from("runs/pretrain"),
            tokenizer: PathBuf::from("tests/fixtures/clip-tokenizer"),
            seed: 0,
            device: DeviceSpec::Cpu,
            resume: true,
            overwrite: false,
            save_dtype: "f32".into(),
            data: PretrainData::default(),
            vae: VaeArch::default(),
            unet: UnetArch::default(),
            text_encoder: TextArch::default(),
            vae_train: StageConfig::default(),
            vae_loss: VaeLoss::default(),
            unet_train: StageConfig {
                lr: 2e-4,
                ..StageConfig::default()
            },
            log: PretrainLog::default(),
        }
    }
}

impl PretrainConfig {
    /// Reads a TOML config (or the defaults) and applies `--set key=value` overrides; unknown keys are errors.
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<PretrainConfig> {
        crate::config::load_toml(path, overrides)
    }

    /// The guard of `run_dir` (see [`crate::output`]).
    fn run_guard(&self) -> OutputDir<'_> {
        OutputDir {
            path: &self.run_dir,
            key: "run_dir",
            command: PRETRAIN,
            legacy: &["vae/metrics.jsonl", "unet/metrics.jsonl"],
        }
    }

    /// Refuses a `run_dir` or `output_dir` that would overwrite the tokenizer, each other, the stage folders,
    /// or a non-empty folder `pretrain` did not write (unless `overwrite`): before any training.
    pub fn check_outputs(&self, out: &Path) -> Result<()> {
        let tokenizer = Input::new("tokenizer", &self.tokenizer);
        self.run_guard().check(&[tokenizer], self.overwrite)?;
        let (vae, unet) = (self.run_dir.join("vae"), self.run_dir.join("unet"));
        OutputDir {
            path: out,
            key: "output_dir",
            command: PRETRAIN,
            legacy: &[],
        }
        .check(
            &[
                tokenizer,
                Input::holder("run_dir", &self.run_dir),
                Input::new("VAE stage folder", &vae),
                Input::new("UNet stage folder", &unet),
            ],
            self.overwrite,
        )
    }

    pub fn output_dir(&self) -> PathBuf {
        self.output_dir
            .clone()
            .unwrap_or_else(|| self.run_dir.join("model"))
    }

    pub fn validate(&self) -> Result<()> {
        let r = self.data.resolution as u64;
        diffpref_pipelines::limits::check_image_size("[data] resolution", r, r)?;
        let f = 1u32 << (self.vae.block_out_channels.len().max(1) - 1);
        let u = 1u32 << (self.unet.block_out_channels.len().max(1) - 1);
        ensure!(
            !self.vae.block_out_channels.is_empty() && !self.unet.block_out_channels.is_empty(),
            "[vae] and [unet] need block_out_channels"
        );
        ensure!(
            self.data.resolution.is_multiple_of(f * u),
            "[data] resolution {} must be a multiple of {} (VAE factor {f} x UNet factor {u})",
            self.data.resolution,
            f * u
        );
        ensure!(
            (1..=3).contains(&self.data.max_objects),
            "[data] max_objects must be 1..=3"
        );
        ensure!(
            (0.0..=1.0).contains(&self.data.caption_dropout),
            "[data] caption_dropout must be in [0, 1]"
        );
        let n = self.unet.block_out_channels.len();
        ensure!(
            self.unet.down_block_types.len() == n && self.unet.up_block_types.len() == n,
            "[unet] down_block_types and up_block_types need one entry per block_out_channels"
        );
        for (what, ch, g) in [
            (
                "vae",
                &self.vae.block_out_channels,
                self.vae.norm_num_groups,
            ),
            (
                "unet",
                &self.unet.block_out_channels,
                self.unet.norm_num_groups,
            ),
        ] {
            ensure!(
                g > 0 && ch.iter().all(|c| c.is_multiple_of(g)),
                "[{what}] norm_num_groups {g} must divide every block_out_channels entry {ch:?}"
            );
        }
        ensure!(
            self.text_encoder
                .hidden_size
                .is_multiple_of(self.text_encoder.num_attention_heads),
            "[text_encoder] hidden_size must be a multiple of num_attention_heads"
        );
        for (what, s) in [
            ("vae_train", &self.vae_train),
            ("unet_train", &self.unet_train),
        ] {
            ensure!(s.batch_size > 0, "[{what}] batch_size must be positive");
            ensure!(s.lr > 0.0, "[{what}] lr must be positive");
            LrSchedule::new(s.schedule, s.warmup_steps, s.steps.max(1)).validate()?;
        }
        ensure!(
            self.vae_loss.scale_images > 1,
            "[vae_loss] scale_images must be at least 2"
        );
        save_dtype(&self.save_dtype)?;
        Ok(())
    }

    /// `vae/config.json` (diffusers `AutoencoderKL`) with the given scaling factor.
    pub fn vae_json(&self, scaling_factor: f64) -> Value {
        let n = self.vae.block_out_channels.len();
        json!({
            "_class_name": "AutoencoderKL",
            "_diffusers_version": DIFFUSERS_VERSION,
            "act_fn": "silu",
            "block_out_channels": self.vae.block_out_channels,
            "down_block_types": vec!["DownEncoderBlock2D"; n],
            "force_upcast": true,
            "in_channels": 3,
            "latent_channels": self.vae.latent_channels,
            "latents_mean": null,
            "latents_std": null,
            "layers_per_block": self.vae.layers_per_block,
            "mid_block_add_attention": self.vae.mid_block_add_attention,
            "norm_num_groups": self.vae.norm_num_groups,
            "out_channels": 3,
            "sample_size": self.data.resolution,
            "scaling_factor": scaling_factor,
            "shift_factor": null,
            "up_block_types": vec!["UpDecoderBlock2D"; n],
            "use_post_quant_conv": true,
            "use_quant_conv": true,
        })
    }

    fn vae_factor(&self) -> u32 {
        1 << (self.vae.block_out_channels.len() - 1)
    }

    /// `unet/config.json` (diffusers `UNet2DConditionModel`).
    pub fn unet_json(&self) -> Value {
        let u = &self.unet;
        let mut head = json!({
            "_class_name": "UNet2DConditionModel",
            "_diffusers_version": DIFFUSERS_VERSION,
            "act_fn": "silu",
            "addition_embed_type": null,
            "addition_embed_type_num_heads": 64,
            "addition_time_embed_dim": null,
            "attention_head_dim": u.attention_head_dim,
            "attention_type": "default",
            "block_out_channels": u.block_out_channels,
            "center_input_sample": false,
            "class_embed_type": null,
            "class_embeddings_concat": false,
            "conv_in_kernel": 3,
            "conv_out_kernel": 3,
            "cross_attention_dim": self.text_encoder.hidden_size,
            "cross_attention_norm": null,
            "down_block_types": u.down_block_types,
            "downsample_padding": 1,
            "dropout": 0.0,
        });
        let rest = json!({
            "dual_cross_attention": false,
            "encoder_hid_dim": null,
            "encoder_hid_dim_type": null,
            "flip_sin_to_cos": true,
            "freq_shift": 0,
            "in_channels": self.vae.latent_channels,
            "layers_per_block": u.layers_per_block,
            "mid_block_only_cross_attention": null,
            "mid_block_scale_factor": 1,
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "norm_eps": 1e-05,
            "norm_num_groups": u.norm_num_groups,
            "num_attention_heads": null,
            "num_class_embeds": null,
            "only_cross_attention": false,
            "out_channels": self.vae.latent_channels,
            "projection_class_embeddings_input_dim": null,
            "resnet_out_scale_factor": 1.0,
            "resnet_skip_time_act": false,
            "resnet_time_scale_shift": "default",
            "reverse_transformer_layers_per_block": null,
            "sample_size": self.data.resolution / self.vae_factor(),
            "time_cond_proj_dim": null,
            "time_embedding_act_fn": null,
            "time_embedding_dim": null,
            "time_embedding_type": "positional",
            "timestep_post_act": null,
            "transformer_layers_per_block": u.transformer_layers_per_block,
            "up_block_types": u.up_block_types,
            "upcast_attention": false,
            "use_linear_projection": false,
        });
        if let (Value::Object(m), Value::Object(r)) = (&mut head, rest) {
            m.extend(r);
        }
        head
    }

    /// `text_encoder/config.json` (transformers `CLIPTextModel`).
    pub fn text_json(&self) -> Value {
        let t = &self.text_encoder;
        json!({
            "architectures": ["CLIPTextModel"],
            "attention_dropout": 0.0,
            "bos_token_id": 0,
            "dtype": match self.save_dtype.as_str() {
                "f16" => "float16",
                "bf16" => "bfloat16",
                _ => "float32",
            },
            "eos_token_id": 2,
            "hidden_act": "quick_gelu",
            "hidden_size": t.hidden_size,
            "initializer_factor": 1.0,
            "initializer_range": 0.02,
            "intermediate_size": t.intermediate_size,
            "layer_norm_eps": 1e-05,
            "max_position_embeddings": 77,
            "model_type": "clip_text_model",
            "num_attention_heads": t.num_attention_heads,
            "num_hidden_layers": t.num_hidden_layers,
            "pad_token_id": 1,
            "projection_dim": t.hidden_size,
            "transformers_version": "4.46.0",
            "vocab_size": 49408,
        })
    }
}

/// `scheduler/scheduler_config.json`: DDIM with the SD1.5 settings.
pub fn scheduler_json() -> Value {
    json!({
        "_class_name": "DDIMScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": false,
        "clip_sample_range": 1.0,
        "dynamic_thresholding_ratio": 0.995,
        "num_train_timesteps": 1000,
        "prediction_type": "epsilon",
        "rescale_betas_zero_snr": false,
        "sample_max_value": 1.0,
        "set_alpha_to_one": false,
        "steps_offset": 1,
        "thresholding": false,
        "timestep_spacing": "leading",
        "trained_betas": null,
    })
}

/// `model_index.json` of a `StableDiffusionPipeline`.
pub fn model_index_json() -> Value {
    json!({
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "feature_extractor": [null, null],
        "image_encoder": [null, null],
        "requires_safety_checker": false,
        "safety_checker": [null, null],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    })
}

fn save_dtype(s: &str) -> Result<DType> {
    match s {
        "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        "bf16" => Ok(DType::BF16),
        _ => bail!("save_dtype = {s:?}: expected \"f32\", \"f16\" or \"bf16\""),
    }
}

/// What a run produced.
#[derive(Clone, Debug)]
pub struct PretrainSummary {
    /// The diffusers folder (only written when both stages finished).
    pub output_dir: PathBuf,
    pub run_dir: PathBuf,
    /// The VAE latent scaling factor (1/std), once stage 1 is done.
    pub scaling_factor: Option<f64>,
    /// Loss of the last step run in this invocation, per stage.
    pub vae_loss: Option<f64>,
    pub unet_loss: Option<f64>,
    /// Stopped early by Ctrl-C (a checkpoint was saved).
    pub interrupted: bool,
}

/// Seeded stream of rendered scenes.
struct Shapes {
    resolution: u32,
    max_objects: usize,
}

impl Shapes {
    /// `n` fresh scenes: images `[n, 3, H, W]` in [-1, 1] and their captions.
    fn batch(&self, rng: &mut Rng, n: usize, device: &Device) -> Result<(Tensor, Vec<String>)> {
        let scenes: Vec<Scene> = (0..n)
            .map(|_| Scene::random(rng, self.max_objects))
            .collect();
        let imgs: Vec<_> = scenes.iter().map(|s| s.render(self.resolution)).collect();
        let x = crate::imaging::images_to_tensor(&imgs, device)?.affine(2.0, -1.0)?;
        Ok((x, scenes.iter().map(|s| s.caption()).collect()))
    }
}

fn tensors_of(params: &[(String, Var)]) -> HashMap<String, Tensor> {
    params
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
        .collect()
}

fn save_tensors(path: &Path, map: &HashMap<String, Tensor>, dtype: DType) -> Result<()> {
    let conv: Vec<(String, Tensor)> = map
        .iter()
        .map(|(n, t)| Ok((n.clone(), t.to_dtype(dtype)?)))
        .collect::<Result<_>>()?;
    save_safetensors(path, &conv)
}

/// The outcome of one step: the loss to backpropagate (scalar) and extra metrics.
type StepOut = (Tensor, Vec<(&'static str, f64)>);

/// The random streams of a stage (what its checkpoints restore besides the weights).
#[derive(Serialize, Deserialize)]
struct StageState {
    noise_rng: Rng,
    data_rng: Rng,
}

/// One pretraining stage as a [`Method`] of the training engine: `step_fn` draws a batch from the two streams
/// and returns its loss.
struct StageMethod<F> {
    name: &'static str,
    steps: u64,
    noise_rng: Rng,
    data_rng: Rng,
    step_fn: F,
}

impl<F: FnMut(&mut Rng, &mut Rng) -> Result<StepOut>> Method for StageMethod<F> {
    fn name(&self) -> &str {
        self.name
    }

    fn unit(&self) -> &str {
        "images"
    }

    fn on_start(&mut self, ctx: StartContext<'_>) -> Result<()> {
        if ctx.start_step < self.steps {
            ctx.progress.println(format!(
                "stage {}: steps {}..{}",
                self.name, ctx.start_step, self.steps
            ));
        }
        Ok(())
    }

    fn micro_step(&mut self, ctx: &StepContext<'_>) -> Result<MicroStep> {
        let (loss, metrics) = (self.step_fn)(&mut self.noise_rng, &mut self.data_rng)?;
        Ok(MicroStep {
            loss,
            metrics,
            units: ctx.batch_size,
            about: format!("stage {}", self.name),
        })
    }

    fn state(&self) -> Result<Value> {
        Ok(serde_json::to_value(StageState {
            noise_rng: self.noise_rng.clone(),
            data_rng: self.data_rng.clone(),
        })?)
    }

    fn load_state(&mut self, state: Value) -> Result<()> {
        let s: StageState = serde_json::from_value(state)?;
        self.noise_rng = s.noise_rng;
        self.data_rng = s.data_rng;
        Ok(())
    }
}

/// One stage's run through the engine's loop (resume, steps, checkpoints in `dir`, metrics, progress, the
/// final EMA copy). Returns the last loss and whether Ctrl-C stopped it.
#[allow(clippy::too_many_arguments)]
fn run_stage(
    name: &'static str,
    dir: PathBuf,
    c: &StageConfig,
    log: &PretrainLog,
    resume: bool,
    seed: u64,
    config: Value,
    params: &[(String, Var)],
    stop: &StopFlag,
    step_fn: impl FnMut(&mut Rng, &mut Rng) -> Result<StepOut>,
) -> Result<(Option<f64>, bool)> {
    if c.steps == 0 {
        return Ok((None, false));
    }
    let settings = TrainerSettings {
        optim: OptimConfig {
            lr: c.lr,
            scale_lr: false,
            beta1: c.beta1,
            beta2: c.beta2,
            eps: c.eps,
            weight_decay: c.weight_decay,
            max_grad_norm: c.max_grad_norm,
            schedule: c.schedule,
            warmup_steps: c.warmup_steps,
            batch_size: c.batch_size,
            grad_accum: 1,
            max_steps: c.steps,
            ema_decay: c.ema_decay,
        },
        log: LogConfig {
            checkpoint_every: log.checkpoint_every,
            keep_last: log.keep_last,
            progress: log.progress,
            tensorboard: log.tensorboard,
            ..Default::default()
        },
        output_dir: dir,
        resume,
        checkpoints: true,
        config,
    };
    let mut method = StageMethod {
        name,
        steps: c.steps,
        noise_rng: Rng::derive(seed, &format!("pretrain-{name}-noise")),
        data_rng: Rng::derive(seed, &format!("pretrain-{name}-data")),
        step_fn,
    };
    let policy = Policy::without_reference(params.to_vec());
    let out = train(
        &settings,
        &policy,
        &mut method,
        &mut Hooks::none(),
        Some(stop.clone()),
    )?;
    Ok((out.last_metric("loss"), out.interrupted))
}

fn mean_of(t: &Tensor) -> Result<f64> {
    Ok(t.mean_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()? as f64)
}

/// Standard deviation over every element.
fn std_of(t: &Tensor) -> Result<f64> {
    let t = t.to_dtype(DType::F64)?;
    let m = t.mean_all()?.to_scalar::<f64>()?;
    let m2 = t.sqr()?.mean_all()?.to_scalar::<f64>()?;
    Ok((m2 - m * m).max(0.0).sqrt())
}

/// 1/std of posterior samples of `n` fresh scenes (fixed seed), encoded in chunks.
fn latent_scaling_factor(
    vae: &AutoencoderKL,
    shapes: &Shapes,
    n: usize,
    seed: u64,
    device: &Device,
) -> Result<f64> {
    let mut rng = Rng::derive(seed, "pretrain-scaling-factor");
    let (mut s, mut s2, mut count) = (0f64, 0f64, 0f64);
    let mut left = n;
    while left > 0 {
        let b = left.min(32);
        left -= b;
        let (x, _) = shapes.batch(&mut rng, b, device)?;
        let post = vae.encode(&x)?;
        let noise = rng.normal_tensor(post.mean.dims(), device)?;
        let z = post.sample(Some(&noise))?.to_dtype(DType::F64)?;
        s += z.sum_all()?.to_scalar::<f64>()?;
        s2 += z.sqr()?.sum_all()?.to_scalar::<f64>()?;
        count += z.elem_count() as f64;
    }
    let mean = s / count;
    let var = (s2 / count - mean * mean).max(1e-12);
    Ok(1.0 / var.sqrt())
}

/// Runs (or resumes) both stages and writes the diffusers folder. `stop` (Ctrl-C) checkpoints and returns.
pub fn pretrain(cfg: &PretrainConfig, stop: Option<StopFlag>) -> Result<PretrainSummary> {
    cfg.validate()?;
    let device = cfg.device.device().context("`device`")?;
    let stop = stop.unwrap_or_default();
    let run_dir = cfg.run_dir.clone();
    cfg.check_outputs(&cfg.output_dir())?;
    cfg.run_guard().create()?;
    let tokenizer = ClipTokenizer::from_dir(&cfg.tokenizer)
        .with_context(|| format!("tokenizer {}", cfg.tokenizer.display()))?;
    let shapes = Shapes {
        resolution: cfg.data.resolution,
        max_objects: cfg.data.max_objects,
    };
    let config_json = serde_json::to_value(cfg)?;
    let mut summary = PretrainSummary {
        output_dir: cfg.output_dir(),
        run_dir: run_dir.clone(),
        scaling_factor: None,
        vae_loss: None,
        unet_loss: None,
        interrupted: false,
    };

    // Stage 1: the VAE.
    let vae_final = run_dir.join("vae").join("final");
    if !(cfg.resume && vae_final.join("config.json").exists()) {
        let vae_cfg: AutoencoderKLConfig = serde_json::from_value(cfg.vae_json(1.0))?;
        let p = Params::random(cfg.seed, DType::F32, &device).trainable();
        let vae = AutoencoderKL::new(&p, vae_cfg)?;
        let params = p.vars();
        let loss_cfg = cfg.vae_loss.clone();
        let bs = cfg.vae_train.batch_size;
        let (last, interrupted) = run_stage(
            "vae",
            run_dir.join("vae"),
            &cfg.vae_train,
            &cfg.log,
            cfg.resume,
            cfg.seed,
            config_json.clone(),
            &params,
            &stop,
            |noise_rng, data_rng| {
                let (x, _) = shapes.batch(data_rng, bs, &device)?;
                let post = vae.encode(&x)?;
                let eps = noise_rng.normal_tensor(post.mean.dims(), &device)?;
                let z = post.sample(Some(&eps))?;
                let rec = vae.decode(&z)?;
                let diff = (&rec - &x)?;
                let mse = diff.sqr()?.mean_all()?;
                let l1 = diff.abs()?.mean_all()?;
                let kl = post.kl()?.mean_all()?;
                let mut loss = (&mse + (&kl * loss_cfg.kl_weight)?)?;
                if loss_cfg.l1_weight > 0.0 {
                    loss = (loss + (&l1 * loss_cfg.l1_weight)?)?;
                }
                let extra = vec![
                    ("mse", mean_of(&mse)?),
                    ("l1", mean_of(&l1)?),
                    ("kl", mean_of(&kl)?),
                    ("latent_std", std_of(&z.detach())?),
                ];
                Ok((loss, extra))
            },
        )?;
        summary.vae_loss = last;
        if interrupted {
            summary.interrupted = true;
            return Ok(summary);
        }
        let sf =
            latent_scaling_factor(&vae, &shapes, cfg.vae_loss.scale_images, cfg.seed, &device)?;
        eprintln!("vae: latent scaling factor {sf:.5}");
        let map = tensors_of(&params);
        write_dir_atomic(&vae_final, |d| {
            save_tensors(
                &d.join("diffusion_pytorch_model.safetensors"),
                &map,
                DType::F32,
            )?;
            write_json(&d.join("config.json"), &cfg.vae_json(sf))
        })?;
    }
    let vae = AutoencoderKL::load(&vae_final, None, DType::F32, &device)
        .with_context(|| format!("loading the stage-1 VAE {}", vae_final.display()))?;
    let sf = vae.config().scaling_factor;
    summary.scaling_factor = Some(sf);

    // The frozen random text encoder (deterministic from the seed).
    let text_cfg: ClipTextConfig = serde_json::from_value(cfg.text_json())?;
    let text_map = {
        let p = Params::random(cfg.seed.wrapping_add(2), DType::F32, &device).trainable();
        ClipTextModel::new(&p, text_cfg.clone())?;
        tensors_of(&p.vars())
    };
    let text_encoder = ClipTextModel::new(
        &Params::from_map(text_map.clone(), DType::F32, &device),
        text_cfg,
    )?;

    // Stage 2: the UNet.
    let unet_cfg: UNet2DConditionConfig = serde_json::from_value(cfg.unet_json())?;
    let p = Params::random(cfg.seed.wrapping_add(1), DType::F32, &device).trainable();
    let unet = UNet2DConditionModel::new(&p, unet_cfg)?;
    let params = p.vars();
    if cfg.unet.zero_init_out {
        for (n, v) in &params {
            if n == "conv_out.weight" || n == "conv_out.bias" {
                v.set(&v.as_tensor().zeros_like()?)?;
            }
        }
    }
    let schedule = NoiseSchedule::new(&SchedulerConfig::sd15())?;
    let num_t = schedule.num_train_timesteps() as u64;
    let bs = cfg.unet_train.batch_size;
    let dropout = cfg.data.caption_dropout;
    let (last, interrupted) = run_stage(
        "unet",
        run_dir.join("unet"),
        &cfg.unet_train,
        &cfg.log,
        cfg.resume,
        cfg.seed,
        config_json,
        &params,
        &stop,
        |noise_rng, data_rng| {
            let (x, captions) = shapes.batch(data_rng, bs, &device)?;
            let post = vae.encode(&x)?;
            let eps = data_rng.normal_tensor(post.mean.dims(), &device)?;
            let latents = vae.scale_latents(&post.sample(Some(&eps))?)?.detach();
            let prompts: Vec<&str> = captions
                .iter()
                .map(|c| {
                    if dropout > 0.0 && data_rng.uniform() < dropout {
                        ""
                    } else {
                        c.as_str()
                    }
                })
                .collect();
            let (ids, _) = tokenizer.encode_batch_on(&prompts, &device)?;
            let hs = text_encoder.forward(&ids)?.last_hidden_state.detach();
            let t: Vec<i64> = (0..bs).map(|_| noise_rng.below(num_t) as i64).collect();
            let t = Tensor::from_vec(t, bs, &device)?;
            let noise = noise_rng.normal_tensor(latents.dims(), &device)?;
            let noisy = schedule.add_noise(&latents, &noise, &t)?;
            let target = schedule.target(&latents, &noise, &t)?;
            let pred = unet.forward(&noisy, &t, &hs, None)?;
            let loss = (pred - target)?.sqr()?.mean_all()?;
            Ok((loss, vec![]))
        },
    )?;
    summary.unet_loss = last;
    if interrupted {
        summary.interrupted = true;
        return Ok(summary);
    }

    // Export.
    let dt = save_dtype(&cfg.save_dtype)?;
    let unet_map = tensors_of(&params);
    let vae_files = vae_final.join("diffusion_pytorch_model.safetensors");
    let vae_map = candle_core::safetensors::load(&vae_files, &Device::Cpu)?;
    let vae_config: Value =
        serde_json::from_str(&std::fs::read_to_string(vae_final.join("config.json"))?)?;
    write_dir_atomic(&summary.output_dir, |d| {
        crate::output::mark(d, PRETRAIN)?;
        write_json(&d.join("model_index.json"), &model_index_json())?;
        for sub in ["unet", "vae", "text_encoder", "tokenizer", "scheduler"] {
            std::fs::create_dir(d.join(sub))?;
        }
        write_json(&d.join("unet/config.json"), &cfg.unet_json())?;
        save_tensors(
            &d.join("unet/diffusion_pytorch_model.safetensors"),
            &unet_map,
            dt,
        )?;
        write_json(&d.join("vae/config.json"), &vae_config)?;
        save_tensors(
            &d.join("vae/diffusion_pytorch_model.safetensors"),
            &vae_map,
            dt,
        )?;
        write_json(&d.join("text_encoder/config.json"), &cfg.text_json())?;
        save_tensors(&d.join("text_encoder/model.safetensors"), &text_map, dt)?;
        write_json(
            &d.join("scheduler/scheduler_config.json"),
            &scheduler_json(),
        )?;
        for e in std::fs::read_dir(&cfg.tokenizer)
            .with_context(|| format!("cannot read {}", cfg.tokenizer.display()))?
        {
            let e = e?;
            if e.file_type()?.is_file() {
                crate::io::copy_atomic(&e.path(), &d.join("tokenizer").join(e.file_name()))?;
            }
        }
        Ok(())
    })?;
    Ok(summary)
}
