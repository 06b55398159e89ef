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
    let added = if g.has("text_embeds") && g.has("time_ids") {
        Some(crate::models::unet::AddedCond {
            text_embeds: g.get_on("text_embeds", &c.device)?,
            time_ids: g.get_on("time_ids", &c.device)?,
        })
    } else {
        None
    };
    let mut out = Vec::new();
    let run = |x: &candle_core::Tensor, t: &candle_core::Tensor| -> Result<candle_core::Tensor> {
        Ok(unet
            .forward(x, t, &ehs, added.as_ref())?
            .to_dtype(DType::F32)?)
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

/// `pipeline` goldens: the text-to-image pipeline from given initial latents (scheduler from the golden's
/// `scheduler_config`). With `input_ids` (SD 1.x/2.x, `pipeline_sd15`) the prompt embeddings are checked too;
/// otherwise the prompts come from the `prompts` metadata (and optional `negative_prompts`; none = diffusers'
/// `negative_prompt=None`), which also covers SDXL. Compared: timesteps, latents after every step, final
/// latents, raw and [0, 1] images (whichever the golden holds).
pub fn check_pipeline(g: &Golden, c: &CheckContext) -> Result<Vec<Comparison>> {
    use crate::loading::{LoadOptions, PromptEmbeds, StableDiffusion};
    use crate::pipeline::{GenerateOptions, Pipeline};
    use crate::schedulers::SchedulerConfig;
    use candle_core::{Device, Tensor};
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
    let f32 = |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(DType::F32)?) };
    let timesteps = g.get("timesteps")?;
    let init = g.get("init_latents")?;
    let opts = GenerateOptions {
        steps: timesteps.dim(0)?,
        guidance_scale: g
            .get("guidance_scale")?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?,
        eta: 0.0,
        init_latents: Some(init.to_device(&c.device)?),
        height: Some(init.dim(2)? * model.vae_scale_factor()),
        width: Some(init.dim(3)? * model.vae_scale_factor()),
        ..Default::default()
    };
    let mut out = Vec::new();
    let mut per_step = Vec::new();
    let mut obs = |v: &crate::pipeline::StepView| -> Result<()> {
        per_step.push(v.latents.to_dtype(DType::F32)?);
        Ok(())
    };
    let res = if g.has("input_ids") {
        let ids = g.get_on("input_ids", &c.device)?;
        let neg_ids = g.get_on("negative_input_ids", &c.device)?;
        let cond = model.text_encoder.forward(&ids)?.last_hidden_state;
        let uncond = model.text_encoder.forward(&neg_ids)?.last_hidden_state;
        out.push(g.compare("prompt_embeds", &f32(&cond)?, c.tolerance_scale)?);
        out.push(g.compare("negative_prompt_embeds", &f32(&uncond)?, c.tolerance_scale)?);
        let cond = PromptEmbeds {
            hidden_states: cond,
            pooled: None,
        };
        let uncond = PromptEmbeds {
            hidden_states: uncond,
            pooled: None,
        };
        pipe.generate_from_embeds(&cond, Some(&uncond), &opts, Some(&mut obs))?
    } else {
        let bad = |k: &str, e: serde_json::Error| crate::Error::Invalid {
            file: g.path.display().to_string(),
            msg: format!("metadata `{k}` is not a JSON list of strings: {e}"),
        };
        let prompts: Vec<String> =
            serde_json::from_str(g.meta("prompts")?).map_err(|e| bad("prompts", e))?;
        let negs: Vec<String> = match g.metadata.get("negative_prompts") {
            Some(n) => serde_json::from_str(n).map_err(|e| bad("negative_prompts", e))?,
            None => Vec::new(),
        };
        let p: Vec<&str> = prompts.iter().map(|s| s.as_str()).collect();
        let n: Vec<&str> = negs.iter().map(|s| s.as_str()).collect();
        pipe.generate(&p, &n, &opts, Some(&mut obs))?
    };
    let n = res.timesteps.len();
    let ts = if timesteps.dtype() == DType::I64 {
        Tensor::from_vec(
            res.timesteps
                .iter()
                .map(|t| t.round() as i64)
                .collect::<Vec<_>>(),
            n,
            &Device::Cpu,
        )?
    } else {
        Tensor::from_vec(
            res.timesteps.iter().map(|t| *t as f32).collect::<Vec<_>>(),
            n,
            &Device::Cpu,
        )?
    };
    out.push(g.compare("timesteps", &ts, 1.0)?);
    out.push(g.compare(
        "latents_per_step",
        &Tensor::stack(&per_step, 0)?,
        c.tolerance_scale,
    )?);
    out.push(g.compare("final_latents", &f32(&res.latents)?, c.tolerance_scale)?);
    if g.has("image_raw") {
        out.push(g.compare("image_raw", &res.image_raw, c.tolerance_scale)?);
    }
    out.push(g.compare("image", &res.images, c.tolerance_scale)?);
    Ok(out)
}
