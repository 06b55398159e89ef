//! Text-to-image sampling with classifier-free guidance and a per-step observer.
//!
//! Per step k (as diffusers' `StableDiffusionPipeline` / `StableDiffusionXLPipeline`):
//! `x_in = scale_model_input([x_t; x_t], t_k)`, `[ε_u; ε_c] = UNet(x_in, t_k, [c_neg; c])`,
//! `ε = ε_u + w (ε_c − ε_u)`, `x_{t−1} = scheduler.step(ε, t_k, x_t)`. The observer receives, for the whole
//! batch, the latents after the step, the predicted x₀ and (when asked) both decoded to images. Initial noise
//! is drawn on the CPU from a seeded stream, so a seed gives the same image on every device.

use crate::error::{Error, Result};
use crate::loading::{PromptEmbeds, StableDiffusion};
use crate::schedulers::{self, Scheduler, SchedulerConfig, SchedulerKind};
use candle_core::{DType, Device, Tensor};
use rand::{rngs::StdRng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};

/// Sampling settings.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub steps: usize,
    /// Classifier-free guidance scale w (guidance is off for w ≤ 1, as in diffusers).
    pub guidance_scale: f64,
    /// DDIM η (0 = deterministic).
    pub eta: f64,
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub seed: u64,
    /// Sampler; `None` uses the model's own scheduler class.
    pub scheduler: Option<SchedulerKind>,
    /// Unit-variance initial noise `[B, C, h, w]` (scaled by the scheduler's `init_noise_sigma`).
    pub init_latents: Option<Tensor>,
    /// Decode the latents and predicted x₀ of every step for the observer.
    pub decode_steps: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            steps: 30,
            guidance_scale: 7.5,
            eta: 0.0,
            width: None,
            height: None,
            seed: 0,
            scheduler: None,
            init_latents: None,
            decode_steps: false,
        }
    }
}

impl GenerateOptions {
    /// Checks the options before anything is loaded or allocated: at least one step, a finite guidance scale
    /// (negative values are legitimate), a finite η ≥ 0, and an image size within [`crate::limits`].
    pub fn validate(&self) -> Result<()> {
        if self.steps == 0 {
            return Err(Error::msg("steps must be at least 1"));
        }
        if !self.guidance_scale.is_finite() {
            return Err(Error::msg(format!(
                "guidance scale must be a finite number (got {})",
                self.guidance_scale
            )));
        }
        if !(self.eta.is_finite() && self.eta >= 0.0) {
            return Err(Error::msg(format!(
                "eta must be a finite number >= 0 (got {})",
                self.eta
            )));
        }
        for (what, v) in [("width", self.width), ("height", self.height)] {
            if let Some(v) = v {
                crate::limits::check_image_size(what, v as u64, 1)?;
            }
        }
        Ok(())
    }
}

/// A per-step callback of [`Pipeline::generate`].
pub type StepObserver<'o> = dyn FnMut(&StepView) -> Result<()> + 'o;

/// What the observer sees after each step (whole batch).
pub struct StepView<'a> {
    pub index: usize,
    pub timestep: f64,
    /// Latents after the step, `[B, C, h, w]`.
    pub latents: &'a Tensor,
    /// The (guided) model output used for this step.
    pub model_output: &'a Tensor,
    /// Predicted x₀ latents of this step.
    pub pred_x0: &'a Tensor,
    /// Decoded `latents` in [0, 1] (only with `decode_steps`).
    pub images: Option<&'a Tensor>,
    /// Decoded `pred_x0` in [0, 1] (only with `decode_steps`).
    pub pred_x0_images: Option<&'a Tensor>,
}

/// The result of [`Pipeline::generate`].
pub struct GenerateOutput {
    pub timesteps: Vec<f64>,
    /// Final latents `[B, C, h, w]` (scaled latent space, before VAE unscaling).
    pub latents: Tensor,
    /// `vae.decode(latents / scaling_factor)`, unclamped, `[B, 3, H, W]`.
    pub image_raw: Tensor,
    /// Images in [0, 1], f32.
    pub images: Tensor,
}

/// Text-to-image pipeline over a loaded model.
pub struct Pipeline<'m> {
    pub model: &'m StableDiffusion,
    pub scheduler_config: SchedulerConfig,
}

/// Seeded N(0, 1) noise of `shape`, drawn on the CPU (device-independent), f32.
pub fn seeded_noise(seed: u64, shape: &[usize], device: &Device) -> Result<Tensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    noise_from(&mut rng, shape, device)
}

/// N(0, 1) noise from a caller's stream.
pub fn noise_from(rng: &mut StdRng, shape: &[usize], device: &Device) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| StandardNormal.sample(rng)).collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?.to_device(device)?)
}

impl<'m> Pipeline<'m> {
    pub fn new(model: &'m StableDiffusion) -> Result<Self> {
        let scheduler_config = SchedulerConfig::from_file(&model.scheduler_config_path)?;
        Ok(Pipeline {
            model,
            scheduler_config,
        })
    }

    /// A scheduler for this model: `kind`, or the one the model folder names.
    pub fn scheduler(&self, kind: Option<SchedulerKind>, eta: f64) -> Result<Box<dyn Scheduler>> {
        let mut s = match kind {
            Some(k) => schedulers::build(k, &self.scheduler_config)?,
            None => schedulers::build_from_config(&self.scheduler_config)?,
        };
        if eta != 0.0 {
            s.set_eta(eta)?;
        }
        Ok(s)
    }

    /// Latent size `(h, w)` for the requested pixel size (default: the UNet's `sample_size`).
    pub fn latent_size(&self, opts: &GenerateOptions) -> Result<(usize, usize)> {
        opts.validate()?;
        let f = self.model.vae_scale_factor();
        let default = self
            .model
            .unet
            .config()
            .sample_size
            .as_ref()
            .and_then(|v| v.as_u64())
            .unwrap_or(64) as usize
            * f;
        let (w, h) = (
            opts.width.unwrap_or(default),
            opts.height.unwrap_or(default),
        );
        crate::limits::check_image_size("image size (width x height)", w as u64, h as u64)?;
        let m = f * self.model.unet.config().downscale_factor();
        if w % m != 0 || h % m != 0 || w == 0 || h == 0 {
            return Err(Error::msg(format!(
                "width and height must be positive multiples of {m} for this model (got {w}x{h})"
            )));
        }
        Ok((h / f, w / f))
    }

    /// Generates one image per prompt. `negative` is empty (no negative prompt), one prompt for all, or one
    /// per prompt.
    pub fn generate(
        &self,
        prompts: &[&str],
        negative: &[&str],
        opts: &GenerateOptions,
        observer: Option<&mut StepObserver>,
    ) -> Result<GenerateOutput> {
        let b = prompts.len();
        if b == 0 {
            return Err(Error::msg("no prompt given"));
        }
        let neg: Vec<&str> = match negative.len() {
            0 => vec![""; b],
            1 => vec![negative[0]; b],
            n if n == b => negative.to_vec(),
            n => {
                return Err(Error::msg(format!(
                    "{n} negative prompts for {b} prompts (give one for all, or one per prompt)"
                )))
            }
        };
        let model = self.model;
        let cond = model.encode_prompts(prompts)?;
        // As diffusers: with no negative prompt at all (None), SDXL-style models use zero embeddings.
        let uncond = if opts.guidance_scale > 1.0 {
            let e = model.encode_prompts(&neg)?;
            Some(
                if model.force_zeros_for_empty_prompt && negative.is_empty() {
                    e.zeros_like()?
                } else {
                    e
                },
            )
        } else {
            None
        };
        self.generate_from_embeds(&cond, uncond.as_ref(), opts, observer)
    }

    /// Generates from prompt embeddings (`uncond` is required when guidance is on).
    pub fn generate_from_embeds(
        &self,
        cond: &PromptEmbeds,
        uncond: Option<&PromptEmbeds>,
        opts: &GenerateOptions,
        mut observer: Option<&mut StepObserver>,
    ) -> Result<GenerateOutput> {
        let model = self.model;
        let b = cond.hidden_states.dim(0)?;
        let dev = model.device().clone();
        let dtype = model.dtype();
        let cfg_on = opts.guidance_scale > 1.0;
        let embeds = match (cfg_on, uncond) {
            (true, Some(u)) => PromptEmbeds::cat(&[u, cond])?,
            (true, None) => {
                return Err(Error::msg(
                    "classifier-free guidance needs negative embeddings",
                ))
            }
            (false, _) => cond.clone(),
        };
        let (lh, lw) = self.latent_size(opts)?;
        let (h, w) = (lh * model.vae_scale_factor(), lw * model.vae_scale_factor());
        let added = model.added_cond(&embeds, h, w)?;
        let c = model.unet.config().in_channels;
        let mut sched = self.scheduler(opts.scheduler, opts.eta)?;
        sched.set_timesteps(opts.steps)?;
        let timesteps = sched.timesteps().to_vec();
        let mut rng = StdRng::seed_from_u64(opts.seed);
        let x_t = match &opts.init_latents {
            Some(t) => {
                let want = [b, c, lh, lw];
                if t.dims() != want {
                    return Err(Error::msg(format!(
                        "init_latents has shape {:?}, expected {:?} ({b} prompts, {c} channels, {lh}x{lw} latents)",
                        t.dims(),
                        want
                    )));
                }
                t.to_device(&dev)?.to_dtype(DType::F32)?
            }
            None => noise_from(&mut rng, &[b, c, lh, lw], &dev)?,
        };
        let mut latents = (x_t * sched.init_noise_sigma())?.to_dtype(dtype)?;
        for (k, &t) in timesteps.iter().enumerate() {
            let input = if cfg_on {
                Tensor::cat(&[&latents, &latents], 0)?
            } else {
                latents.clone()
            };
            let input = sched.scale_model_input(&input, k)?;
            let tt = Tensor::full(t as f32, input.dim(0)?, &dev)?;
            let pred = model
                .unet
                .forward(&input, &tt, &embeds.hidden_states, added.as_ref())?;
            let pred = if cfg_on {
                let u = pred.narrow(0, 0, b)?;
                let ct = pred.narrow(0, b, b)?;
                (&u + ((ct - &u)? * opts.guidance_scale)?)?
            } else {
                pred
            };
            let noise = if sched.needs_noise(k) {
                Some(noise_from(&mut rng, latents.dims(), &dev)?.to_dtype(latents.dtype())?)
            } else {
                None
            };
            let out = sched.step(&pred, k, &latents, noise.as_ref())?;
            latents = out.prev_sample;
            if let Some(obs) = observer.as_mut() {
                let (imgs, x0_imgs) = if opts.decode_steps {
                    (
                        Some(model.vae.decode_to_image01(&latents)?),
                        Some(model.vae.decode_to_image01(&out.pred_original_sample)?),
                    )
                } else {
                    (None, None)
                };
                obs(&StepView {
                    index: k,
                    timestep: t,
                    model_output: &pred,
                    latents: &latents,
                    pred_x0: &out.pred_original_sample,
                    images: imgs.as_ref(),
                    pred_x0_images: x0_imgs.as_ref(),
                })?;
            }
        }
        let image_raw = model
            .vae
            .decode(&model.vae.unscale_latents(&latents)?)?
            .to_dtype(DType::F32)?;
        let images = ((&image_raw / 2.0)? + 0.5)?.clamp(0f32, 1f32)?;
        Ok(GenerateOutput {
            timesteps,
            latents,
            image_raw,
            images,
        })
    }
}
