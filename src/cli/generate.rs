//! `diffpref generate`: text-to-image with optional per-step trace and x₀ strips.

use super::common::{slug, ComputeArgs};
use crate::imaging;
use crate::io::save_safetensors;
use crate::output::{check_output_file, Input, OutputDir};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use clap::Args;
use diffpref_pipelines::loading::{resolve_model, LoadOptions, StableDiffusion};
use diffpref_pipelines::pipeline::{GenerateOptions, Pipeline, StepView};
use diffpref_pipelines::schedulers::SchedulerKind;
use std::path::{Path, PathBuf};

/// Arguments of `diffpref generate`.
#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Model: a diffusers folder, a single-file checkpoint (`.safetensors`, original SD layout) or a hub id.
    #[arg(long)]
    pub model: String,
    /// Prompt (repeat for a batch; one PNG per prompt).
    #[arg(long = "prompt", required = true)]
    pub prompts: Vec<String>,
    /// Negative prompt: one for all prompts, or one per prompt in order.
    #[arg(long = "negative-prompt")]
    pub negative_prompts: Vec<String>,
    #[arg(long, default_value_t = 30)]
    pub steps: usize,
    /// Sampler: ddim, ddpm, euler, euler-a, dpmpp-2m (default: the model's scheduler).
    #[arg(long)]
    pub scheduler: Option<String>,
    /// Classifier-free guidance scale (off at 1).
    #[arg(long, default_value_t = 7.5, allow_negative_numbers = true)]
    pub guidance: f64,
    /// DDIM eta.
    #[arg(long, default_value_t = 0.0)]
    pub eta: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long)]
    pub width: Option<usize>,
    #[arg(long)]
    pub height: Option<usize>,
    /// safetensors file with `init_latents` [B,C,h,w]: unit-variance initial noise (B = number of prompts).
    #[arg(long)]
    pub init_latents: Option<PathBuf>,
    /// Write timesteps, latents after every step, final latents and images to this safetensors file.
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Write, per prompt, a strip PNG of the decoded predicted x0 at every step into this folder.
    #[arg(long)]
    pub every_step: Option<PathBuf>,
    /// Weight variant to prefer (e.g. fp16).
    #[arg(long)]
    pub variant: Option<String>,
    /// LoRA file (PEFT/diffusers or kohya safetensors) applied to the UNet; repeat to stack several.
    #[arg(long = "lora")]
    pub loras: Vec<PathBuf>,
    /// LoRA strength: one for all --lora files, or one per file in order (default 1).
    #[arg(long = "lora-scale", allow_negative_numbers = true)]
    pub lora_scales: Vec<f64>,
    #[command(flatten)]
    pub compute: ComputeArgs,
    /// Output folder.
    #[arg(long)]
    pub out: PathBuf,
    /// Write into `--out` even when it is a non-empty folder `generate` did not write.
    #[arg(long)]
    pub overwrite: bool,
}

/// Reads `init_latents` from a safetensors file, naming the file in every error.
pub fn read_init_latents(path: &Path) -> Result<Tensor> {
    if !path.exists() {
        bail!("--init-latents {}: no such file", path.display());
    }
    let map =
        candle_core::safetensors::load(path, &candle_core::Device::Cpu).with_context(|| {
            format!(
                "--init-latents {}: not a readable safetensors file",
                path.display()
            )
        })?;
    let t = map.get("init_latents").with_context(|| {
        let mut keys: Vec<&String> = map.keys().collect();
        keys.sort();
        format!(
            "--init-latents {}: no tensor `init_latents` (found {:?})",
            path.display(),
            keys
        )
    })?;
    if t.rank() != 4 {
        bail!(
            "--init-latents {}: `init_latents` has shape {:?}, expected [B, C, h, w]",
            path.display(),
            t.dims()
        );
    }
    let t = t.to_dtype(DType::F32)?;
    let finite = t
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .filter(|v| v.is_finite())
        .count();
    if finite != t.elem_count() {
        bail!(
            "--init-latents {}: `init_latents` has {} NaN or infinite values of {}",
            path.display(),
            t.elem_count() - finite,
            t.elem_count()
        );
    }
    Ok(t)
}

pub use crate::train::metrics::count_bar as progress;

pub fn parse_scheduler(s: &Option<String>) -> Result<Option<SchedulerKind>> {
    match s {
        None => Ok(None),
        Some(s) => Ok(Some(
            SchedulerKind::parse(s).with_context(|| format!("--scheduler {s}"))?,
        )),
    }
}

pub fn load_model(
    spec: &str,
    variant: Option<&str>,
    compute: &ComputeArgs,
) -> Result<StableDiffusion> {
    let dir = resolve_model(spec, variant).with_context(|| format!("--model {spec}"))?;
    let opts = LoadOptions {
        dtype: compute.dtype()?,
        device: compute.device()?,
        variant: variant.map(|s| s.to_string()),
    };
    StableDiffusion::load(&dir, &opts).with_context(|| format!("loading model {}", dir.display()))
}

/// Checks sampling flags before any model is loaded (see [`GenerateOptions::validate`]): `--steps`, each
/// `--guidance`, `--eta`, `--width`, `--height`.
pub fn check_sampling(
    steps: usize,
    guidance: &[f64],
    eta: f64,
    width: Option<usize>,
    height: Option<usize>,
) -> Result<()> {
    for &g in guidance {
        GenerateOptions {
            steps,
            guidance_scale: g,
            eta,
            width,
            height,
            ..Default::default()
        }
        .validate()
        .context("--steps / --guidance / --eta / --width / --height")?;
    }
    Ok(())
}

pub fn run(a: GenerateArgs) -> Result<()> {
    let scheduler = parse_scheduler(&a.scheduler)?;
    check_sampling(a.steps, &[a.guidance], a.eta, a.width, a.height)?;
    let mut inputs = vec![Input::new("--model folder", Path::new(&a.model))];
    inputs.extend(a.loras.iter().map(|l| Input::new("--lora file", l)));
    if let Some(p) = &a.init_latents {
        inputs.push(Input::new("--init-latents file", p));
    }
    let out_dir = OutputDir {
        path: &a.out,
        key: "--out",
        command: "generate",
        legacy: &[],
    };
    out_dir.check(&inputs, a.overwrite)?;
    if let Some(f) = &a.trace {
        check_output_file(f, "--trace", &inputs)?;
    }
    let steps_dir = a.every_step.as_deref().map(|d| OutputDir {
        path: d,
        key: "--every-step",
        command: "generate",
        legacy: &[],
    });
    if let Some(d) = &steps_dir {
        d.check(&inputs, a.overwrite)?;
    }
    let lora_specs = crate::train::lora::lora_specs(&a.loras, &a.lora_scales)?;
    let init = match &a.init_latents {
        Some(p) => {
            let t = read_init_latents(p)?;
            if t.dim(0)? != a.prompts.len() {
                bail!(
                    "--init-latents {}: batch {} but {} prompts were given",
                    p.display(),
                    t.dim(0)?,
                    a.prompts.len()
                );
            }
            Some(t)
        }
        None => None,
    };
    let model = load_model(&a.model, a.variant.as_deref(), &a.compute)?;
    let _loras = crate::train::lora::attach_lora_files(&model.unet, &lora_specs)?;
    let pipe = Pipeline::new(&model)?;
    let opts = GenerateOptions {
        steps: a.steps,
        guidance_scale: a.guidance,
        eta: a.eta,
        width: a.width,
        height: a.height,
        seed: a.seed,
        scheduler,
        init_latents: init,
        decode_steps: a.every_step.is_some(),
    };
    if let Some(t) = &opts.init_latents {
        let (lh, lw) = pipe.latent_size(&opts)?;
        let c = model.unet.config().in_channels;
        if t.dims()[1..] != [c, lh, lw] {
            bail!(
                "--init-latents {}: shape {:?}, expected [{}, {c}, {lh}, {lw}] for this model and size",
                a.init_latents.as_ref().unwrap().display(),
                t.dims(),
                a.prompts.len()
            );
        }
    }
    let prompts: Vec<&str> = a.prompts.iter().map(|s| s.as_str()).collect();
    let negs: Vec<&str> = a.negative_prompts.iter().map(|s| s.as_str()).collect();
    let pb = progress(a.steps, "sampling");
    let mut per_step: Vec<Tensor> = Vec::new();
    let mut x0_frames: Vec<Tensor> = Vec::new();
    let want_trace = a.trace.is_some();
    let mut obs = |v: &StepView| -> diffpref_pipelines::Result<()> {
        if want_trace {
            per_step.push(
                v.latents
                    .to_dtype(DType::F32)?
                    .to_device(&candle_core::Device::Cpu)?,
            );
        }
        if let Some(x0) = v.pred_x0_images {
            x0_frames.push(
                x0.to_dtype(DType::F32)?
                    .to_device(&candle_core::Device::Cpu)?,
            );
        }
        pb.inc(1);
        Ok(())
    };
    let out = pipe.generate(&prompts, &negs, &opts, Some(&mut obs))?;
    pb.finish_and_clear();
    out_dir.create()?;
    let images = imaging::tensor_to_images(&out.images)?;
    for (i, (img, p)) in images.iter().zip(&a.prompts).enumerate() {
        let path = a.out.join(format!("{i:03}-{}.png", slug(p, 48)));
        imaging::save_png(img, &path)?;
        println!("{}", path.display());
    }
    if let (Some(dir), Some(guard)) = (&a.every_step, &steps_dir) {
        guard.create()?;
        for (i, p) in a.prompts.iter().enumerate() {
            let frames = x0_frames
                .iter()
                .map(|f| Ok(imaging::tensor_to_images(&f.narrow(0, i, 1)?)?.remove(0)))
                .collect::<Result<Vec<_>>>()?;
            let labels: Vec<String> = out
                .timesteps
                .iter()
                .map(|t| format!("t={}", t.round()))
                .collect();
            let strip = imaging::labelled_strip(&frames, &labels);
            let path = dir.join(format!("{i:03}-{}.png", slug(p, 48)));
            imaging::save_png(&strip, &path)?;
            println!("{}", path.display());
        }
    }
    if let Some(path) = &a.trace {
        let s = out.timesteps.len();
        let ts = if out.timesteps.iter().all(|t| t.fract() == 0.0) {
            Tensor::from_vec(
                out.timesteps.iter().map(|t| *t as i64).collect::<Vec<_>>(),
                s,
                &candle_core::Device::Cpu,
            )?
        } else {
            Tensor::from_vec(
                out.timesteps.iter().map(|t| *t as f32).collect::<Vec<_>>(),
                s,
                &candle_core::Device::Cpu,
            )?
        };
        save_safetensors(
            path,
            &[
                ("timesteps", ts),
                ("latents_per_step", Tensor::stack(&per_step, 0)?),
                ("final_latents", out.latents.to_dtype(DType::F32)?),
                ("image", out.images.clone()),
                ("image_raw", out.image_raw.clone()),
            ],
        )?;
        println!("{}", path.display());
    }
    Ok(())
}
