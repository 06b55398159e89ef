//! `diffpref grid`: a labelled comparison grid. Rows are prompts; columns are every combination of the given
//! models, guidance scales and seeds. Every image of a column uses the same initial noise (drawn from the
//! column's seed), so rows and models compare on equal footing. With `--lora FILE` (repeatable) every
//! column is drawn once without LoRA and once with each LoRA file alone, side by side (labelled with the
//! file stem), from the same noise.

use super::common::ComputeArgs;
use super::generate::{load_model, parse_scheduler, progress};
use crate::imaging;
use crate::output::{check_output_file, Input};
use anyhow::{bail, Context, Result};
use clap::Args;
use diffpref_pipelines::pipeline::{seeded_noise, GenerateOptions, Pipeline};
use std::path::PathBuf;

/// Arguments of `diffpref grid`.
#[derive(Args, Debug)]
pub struct GridArgs {
    /// Model: a diffusers folder, a single-file `.safetensors` or a hub id (repeat to compare models).
    #[arg(long = "model", required = true)]
    pub models: Vec<String>,
    /// Prompt (one row each).
    #[arg(long = "prompt", required = true)]
    pub prompts: Vec<String>,
    /// Negative prompt: one for all, or one per prompt.
    #[arg(long = "negative-prompt")]
    pub negative_prompts: Vec<String>,
    /// Guidance scale (repeat to compare).
    #[arg(long = "guidance", default_values_t = [7.5], allow_negative_numbers = true)]
    pub guidance: Vec<f64>,
    /// Seed (repeat to compare).
    #[arg(long = "seed", default_values_t = [0u64])]
    pub seeds: Vec<u64>,
    #[arg(long, default_value_t = 30)]
    pub steps: usize,
    #[arg(long)]
    pub scheduler: Option<String>,
    #[arg(long, default_value_t = 0.0)]
    pub eta: f64,
    #[arg(long)]
    pub width: Option<usize>,
    #[arg(long)]
    pub height: Option<usize>,
    /// Integer upscaling of each cell (nearest), for tiny models.
    #[arg(long, default_value_t = 1)]
    pub scale: u32,
    #[arg(long)]
    pub variant: Option<String>,
    /// LoRA file (PEFT/diffusers or kohya); each adds a column next to every column without LoRA.
    #[arg(long = "lora")]
    pub loras: Vec<PathBuf>,
    /// LoRA strength: one for all --lora files, or one per file in order (default 1).
    #[arg(long = "lora-scale", allow_negative_numbers = true)]
    pub lora_scales: Vec<f64>,
    #[command(flatten)]
    pub compute: ComputeArgs,
    /// Output PNG.
    #[arg(long)]
    pub out: PathBuf,
}

fn model_label(spec: &str) -> String {
    std::path::Path::new(spec.trim_end_matches('/'))
        .file_name()
        .and_then(|s| s.to_str())
        .unwrap_or(spec)
        .to_string()
}

pub fn run(a: GridArgs) -> Result<()> {
    let scheduler = parse_scheduler(&a.scheduler)?;
    let mut inputs: Vec<Input> = a
        .models
        .iter()
        .map(|m| Input::new("--model folder", std::path::Path::new(m)))
        .collect();
    inputs.extend(a.loras.iter().map(|l| Input::new("--lora file", l)));
    check_output_file(&a.out, "--out", &inputs)?;
    super::generate::check_sampling(a.steps, &a.guidance, a.eta, a.width, a.height)?;
    diffpref_pipelines::limits::check_image_size(
        "--scale (a 1-pixel cell scaled)",
        a.scale as u64,
        1,
    )?;
    let lora_specs = crate::train::lora::lora_specs(&a.loras, &a.lora_scales)?;
    // Per seed: no LoRA, then each LoRA file alone (None = no LoRA).
    let seed_variants: Vec<(u64, Option<usize>)> = a
        .seeds
        .iter()
        .flat_map(|&s| {
            std::iter::once((s, None)).chain((0..lora_specs.len()).map(move |i| (s, Some(i))))
        })
        .collect();
    let lora_label = |i: Option<usize>| -> Option<String> {
        let (f, scale) = &lora_specs[i?];
        let stem = f
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("lora")
            .to_string();
        Some(if *scale == 1.0 {
            stem
        } else {
            format!("{stem} x{scale}")
        })
    };
    let prompts: Vec<&str> = a.prompts.iter().map(|s| s.as_str()).collect();
    let negs: Vec<&str> = a.negative_prompts.iter().map(|s| s.as_str()).collect();
    let mut columns: Vec<Vec<image::RgbImage>> = Vec::new();
    let mut labels: Vec<String> = Vec::new();
    let mut latent_shape: Option<Vec<usize>> = None;
    let ncols = a.models.len() * a.guidance.len() * seed_variants.len();
    let pb = progress(ncols, "grid");
    for spec in &a.models {
        let model = load_model(spec, a.variant.as_deref(), &a.compute)?;
        let loras = crate::train::lora::attach_lora_files(&model.unet, &lora_specs)?;
        let pipe = Pipeline::new(&model)?;
        for &g in &a.guidance {
            for &(seed, lora) in &seed_variants {
                for (i, set) in loras.iter().enumerate() {
                    set.set_enabled(lora == Some(i));
                }
                let base = GenerateOptions {
                    steps: a.steps,
                    guidance_scale: g,
                    eta: a.eta,
                    width: a.width,
                    height: a.height,
                    seed,
                    scheduler,
                    init_latents: None,
                    decode_steps: false,
                };
                let (lh, lw) = pipe.latent_size(&base)?;
                let shape = vec![model.unet.config().in_channels, lh, lw];
                match &latent_shape {
                    None => latent_shape = Some(shape.clone()),
                    Some(s) if *s != shape => bail!(
                        "model {spec} has latents {shape:?}, the first model {s:?}: grid columns must share a latent shape"
                    ),
                    _ => {}
                }
                let noise = seeded_noise(seed, &[1, shape[0], lh, lw], &candle_core::Device::Cpu)?
                    .repeat((prompts.len(), 1, 1, 1))?;
                let opts = GenerateOptions {
                    init_latents: Some(noise),
                    ..base
                };
                let out = pipe
                    .generate(&prompts, &negs, &opts, None)
                    .with_context(|| {
                        let l = lora.map(|i| format!(", LoRA {}", lora_specs[i].0.display()));
                        format!(
                            "sampling {spec} (guidance {g}, seed {seed}{})",
                            l.unwrap_or_default()
                        )
                    })?;
                columns.push(imaging::tensor_to_images(&out.images)?);
                let mut parts = Vec::new();
                if a.models.len() > 1 {
                    parts.push(model_label(spec));
                }
                if !lora_specs.is_empty() {
                    parts.push(lora_label(lora).unwrap_or_else(|| "no LoRA".into()));
                }
                if a.guidance.len() > 1
                    || (a.models.len() == 1 && a.seeds.len() == 1 && lora_specs.is_empty())
                {
                    parts.push(format!("cfg {g}"));
                }
                if a.seeds.len() > 1 {
                    parts.push(format!("seed {seed}"));
                }
                labels.push(parts.join(", "));
                pb.inc(1);
            }
        }
    }
    pb.finish_and_clear();
    let rows: Vec<Vec<image::RgbImage>> = (0..prompts.len())
        .map(|r| columns.iter().map(|c| c[r].clone()).collect())
        .collect();
    let opts = imaging::GridOptions {
        scale: a.scale.max(1),
        ..Default::default()
    };
    let img = imaging::grid(&rows, &a.prompts, &labels, &opts)?;
    imaging::save_png(&img, &a.out)?;
    println!("{}", a.out.display());
    Ok(())
}
