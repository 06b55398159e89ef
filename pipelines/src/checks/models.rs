//! UNet and pipeline checks.
use super::CheckContext;
use crate::golden::{Comparison, Golden};
use crate::models::unet::UNet2DConditionModel;
use crate::Result;
use candle_core::DType;

/// `unet.safetensors`: per-sample integer and fractional timesteps, and near-constant input (`*_small`).
pub fn check_unet(g: &Golden, c: &CheckContext) -> Result<Vec<Comparison>> {
    let dir = c.model_dir(g)?.join("unet");
    let unet = UNet2DConditionModel::load(&dir, None, c.dtype, &c.device)?;
    let sample = g.get_on("sample", &c.device)?;
    let ehs = g.get_on("encoder_hidden_states", &c.device)?;
    let t = g.get_on("timesteps", &c.device)?;
    let mut out = Vec::new();
    let run = |x: &candle_core::Tensor, t: &candle_core::Tensor| -> Result<candle_core::Tensor> {
        Ok(unet.forward(x, t, &ehs, None)?.to_dtype(DType::F32)?)
    };
    out.push(g.compare("out", &run(&sample, &t)?, c.tolerance_scale)?);
    if g.has("timesteps_frac") {
        let tf = g.get_on("timesteps_frac", &c.device)?;
        out.push(g.compare("out_frac", &run(&sample, &tf)?, c.tolerance_scale)?);
    }
    if g.has("out_small") {
        out.push(g.compare(
            "out_small",
            &run(&(&sample * 1e-3)?, &t)?,
            c.tolerance_scale,
        )?);
    }
    Ok(out)
}

/// `pipeline_sd15.safetensors`: prompt embeddings, latents after every step, final latents and images of
/// the text-to-image pipeline (scheduler from the golden's `scheduler_config`, given initial latents).
pub fn check_pipeline(g: &Golden, c: &CheckContext) -> Result<Vec<Comparison>> {
    use crate::loading::{LoadOptions, PromptEmbeds, StableDiffusion};
    use crate::pipeline::{GenerateOptions, Pipeline};
    use crate::schedulers::SchedulerConfig;
    let dir = c.model_dir(g)?;
    let model = StableDiffusion::load(
        dir,
        &LoadOptions {
            dtype: c.dtype,
            device: c.device.clone(),
            variant: None,
        },
    )?;
    let mut pipe = Pipeline::new(&model)?;
    if let Some(cfg) = g.metadata.get("scheduler_config") {
        pipe.scheduler_config = SchedulerConfig::from_json_str(cfg, &g.path.display().to_string())?;
    }
    let f32 =
        |t: &candle_core::Tensor| -> Result<candle_core::Tensor> { Ok(t.to_dtype(DType::F32)?) };
    let ids = g.get_on("input_ids", &c.device)?;
    let neg_ids = g.get_on("negative_input_ids", &c.device)?;
    let cond = model.text_encoder.forward(&ids)?.last_hidden_state;
    let uncond = model.text_encoder.forward(&neg_ids)?.last_hidden_state;
    let mut out = vec![
        g.compare("prompt_embeds", &f32(&cond)?, c.tolerance_scale)?,
        g.compare("negative_prompt_embeds", &f32(&uncond)?, c.tolerance_scale)?,
    ];
    let timesteps = g.get("timesteps")?;
    let opts = GenerateOptions {
        steps: timesteps.dim(0)?,
        guidance_scale: g
            .get("guidance_scale")?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?,
        eta: 0.0,
        init_latents: Some(g.get_on("init_latents", &c.device)?),
        ..Default::default()
    };
    let (h, w) = {
        let l = g.get("init_latents")?;
        (
            l.dim(2)? * model.vae_scale_factor(),
            l.dim(3)? * model.vae_scale_factor(),
        )
    };
    let opts = GenerateOptions {
        width: Some(w),
        height: Some(h),
        ..opts
    };
    let mut per_step = Vec::new();
    let mut obs = |v: &crate::pipeline::StepView| -> Result<()> {
        per_step.push(v.latents.to_dtype(DType::F32)?);
        Ok(())
    };
    let cond = PromptEmbeds {
        hidden_states: cond,
        pooled: None,
    };
    let uncond = PromptEmbeds {
        hidden_states: uncond,
        pooled: None,
    };
    let res = pipe.generate_from_embeds(&cond, Some(&uncond), &opts, Some(&mut obs))?;
    let ts: Vec<i64> = res.timesteps.iter().map(|t| t.round() as i64).collect();
    let n = ts.len();
    out.push(g.compare(
        "timesteps",
        &candle_core::Tensor::from_vec(ts, n, &candle_core::Device::Cpu)?,
        1.0,
    )?);
    out.push(g.compare(
        "latents_per_step",
        &candle_core::Tensor::stack(&per_step, 0)?,
        c.tolerance_scale,
    )?);
    out.push(g.compare("final_latents", &f32(&res.latents)?, c.tolerance_scale)?);
    out.push(g.compare("image_raw", &res.image_raw, c.tolerance_scale)?);
    out.push(g.compare("image", &res.images, c.tolerance_scale)?);
    Ok(out)
}
