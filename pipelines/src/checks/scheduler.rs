//! Scheduler checks: `scheduler` (a sampling chain with fake model outputs), `scheduler_common` (the training
//! tables and forward noising), `scheduler_timesteps` (timestep / sigma tables for every scheduler x spacing x
//! step count) and `ddim_logprob` (the per-sample DDIM step with log-probability).
use super::CheckContext;
use crate::golden::{Comparison, Golden};
use crate::schedulers::{
    build, build_from_config, ddim_step_with_logprob, DdimTransition, EulerDiscreteScheduler,
    NoiseSchedule, SchedulerConfig, SchedulerKind, TimestepSpacing,
};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};

/// The golden's `scheduler_config` metadata, or `fallback` when it has none.
fn golden_config(g: &Golden, fallback: Option<SchedulerConfig>) -> Result<SchedulerConfig> {
    match g.metadata.get("scheduler_config") {
        Some(text) => {
            SchedulerConfig::from_json_str(text, &format!("{}: scheduler_config", g.path.display()))
        }
        None => fallback.ok_or_else(|| Error::Invalid {
            file: g.path.display().to_string(),
            msg: "metadata key `scheduler_config` is missing".into(),
        }),
    }
}

fn scalar(v: f64, device: &Device) -> Result<Tensor> {
    Ok(Tensor::new(v as f32, device)?)
}

/// Runs the sampling chain of the scheduler in the golden's config on the golden's `x_T`, `model_outputs`
/// (and `noises`), and compares timesteps, sigmas, init_noise_sigma, the initial sample, every model input,
/// sample and predicted x0. DDIM's eta is the metadata `eta` if present, else 1 when the file carries
/// `noises` (the eta = 1 golden), else 0.
pub fn check_scheduler(g: &Golden, c: &CheckContext) -> Result<Vec<Comparison>> {
    let config = golden_config(g, None)?;
    let mut sched = build_from_config(&config)?;
    if sched.kind() == SchedulerKind::Ddim {
        let eta = match g.metadata.get("eta") {
            Some(e) => e.parse::<f64>().map_err(|_| Error::Invalid {
                file: g.path.display().to_string(),
                msg: format!("metadata `eta` is not a number: {e}"),
            })?,
            None if g.has("noises") => 1.0,
            None => 0.0,
        };
        sched.set_eta(eta)?;
    }
    let dev = &c.device;
    let model_outputs = g.get_on("model_outputs", dev)?;
    let n = model_outputs.dim(0)?;
    sched.set_timesteps(n)?;
    let noises = if g.has("noises") {
        Some(g.get_on("noises", dev)?)
    } else {
        None
    };
    let mut out = Vec::new();
    let ts = sched.timesteps_tensor(dev)?;
    let expected_dtype = g.get("timesteps")?.dtype();
    let ts = if expected_dtype == DType::I64 {
        ts.to_dtype(DType::I64)?
    } else {
        ts.to_dtype(DType::F32)?
    };
    out.push(g.compare("timesteps", &ts, c.tolerance_scale)?);
    if let (Some(s), true) = (sched.sigmas(), g.has("sigmas")) {
        let s = Tensor::from_vec(
            s.iter().map(|x| *x as f32).collect::<Vec<f32>>(),
            s.len(),
            dev,
        )?;
        out.push(g.compare("sigmas", &s, c.tolerance_scale)?);
    }
    let init = sched.init_noise_sigma();
    if g.has("init_noise_sigma") {
        out.push(g.compare("init_noise_sigma", &scalar(init, dev)?, c.tolerance_scale)?);
    }
    let x_t = g.get_on("x_T", dev)?;
    let mut sample = (&x_t * init)?;
    if g.has("initial_sample") {
        out.push(g.compare("initial_sample", &sample, c.tolerance_scale)?);
    }
    let (mut inputs, mut samples, mut preds) = (Vec::new(), Vec::new(), Vec::new());
    for k in 0..n {
        inputs.push(sched.scale_model_input(&sample, k)?);
        let noise = match &noises {
            Some(nz) if sched.needs_noise(k) => Some(nz.get(k)?),
            _ => None,
        };
        if sched.needs_noise(k) && noise.is_none() {
            return Err(Error::Invalid {
                file: g.path.display().to_string(),
                msg: format!(
                    "{} needs noise at step {k} but the golden has no `noises`",
                    sched.kind()
                ),
            });
        }
        let step = sched.step(&model_outputs.get(k)?, k, &sample, noise.as_ref())?;
        sample = step.prev_sample;
        samples.push(sample.clone());
        preds.push(step.pred_original_sample);
    }
    for (name, v) in [
        ("model_inputs", inputs),
        ("samples", samples),
        ("pred_original_samples", preds),
    ] {
        if g.has(name) {
            out.push(g.compare(name, &Tensor::stack(&v, 0)?, c.tolerance_scale)?);
        }
    }
    Ok(out)
}

/// betas, alphas_cumprod, per-sample add_noise / velocity, and Euler's add_noise (10-step linspace schedule).
pub fn check_common(g: &Golden, c: &CheckContext) -> Result<Vec<Comparison>> {
    let config = golden_config(g, None)?;
    let schedule = NoiseSchedule::new(&config)?;
    let dev = &c.device;
    let s = c.tolerance_scale;
    let mut out = vec![
        g.compare("betas", &schedule.betas_tensor(dev)?, s)?,
        g.compare("alphas_cumprod", &schedule.alphas_cumprod_tensor(dev)?, s)?,
    ];
    let x0 = g.get_on("x0", dev)?;
    let noise = g.get_on("noise", dev)?;
    let t = g.get_on("timesteps", dev)?;
    out.push(g.compare("add_noise", &schedule.add_noise(&x0, &noise, &t)?, s)?);
    out.push(g.compare("velocity", &schedule.velocity(&x0, &noise, &t)?, s)?);
    if g.has("euler_add_noise") {
        let mut euler =
            EulerDiscreteScheduler::new(&config.clone().with_spacing(TimestepSpacing::Linspace))?;
        crate::schedulers::Scheduler::set_timesteps(&mut euler, 10)?;
        let et = g.get_on("euler_timesteps", dev)?;
        out.push(g.compare("euler_add_noise", &euler.add_noise(&x0, &noise, &et)?, s)?);
    }
    Ok(out)
}

/// Every `<scheduler>.<spacing>.<n>.timesteps|sigmas` table of the file, on the SD1.5 base config (the
/// metadata's `scheduler_config` if it has one) with the spacing overridden.
pub fn check_timesteps(g: &Golden, c: &CheckContext) -> Result<Vec<Comparison>> {
    let base = golden_config(g, Some(SchedulerConfig::sd15()))?;
    let mut names: Vec<&String> = g.tensors.keys().collect();
    names.sort();
    let mut out = Vec::new();
    for name in names {
        let parts: Vec<&str> = name.split('.').collect();
        let bad = || Error::Invalid {
            file: g.path.display().to_string(),
            msg: format!("tensor `{name}` is not <scheduler>.<spacing>.<n>.timesteps|sigmas"),
        };
        if parts.len() != 4 {
            return Err(bad());
        }
        let kind = match parts[0] {
            "ddim" => SchedulerKind::Ddim,
            "ddpm" => SchedulerKind::Ddpm,
            "euler" => SchedulerKind::Euler,
            "euler_ancestral" => SchedulerKind::EulerAncestral,
            "dpmpp_2m" => SchedulerKind::DpmPp2m,
            _ => return Err(bad()),
        };
        let spacing = TimestepSpacing::parse(parts[1], &g.path.display().to_string())?;
        let n: usize = parts[2].parse().map_err(|_| bad())?;
        let mut config = base.clone().with_spacing(spacing);
        config.class_name = Some(kind.class_name().into());
        let mut sched = build(kind, &config)?;
        sched.set_timesteps(n)?;
        let actual = match parts[3] {
            "timesteps" => {
                let t = sched.timesteps_tensor(&c.device)?;
                if g.get(name)?.dtype() == DType::I64 {
                    t.to_dtype(DType::I64)?
                } else {
                    t.to_dtype(DType::F32)?
                }
            }
            "sigmas" => {
                let s = sched.sigmas().ok_or_else(bad)?;
                Tensor::from_vec(
                    s.iter().map(|x| *x as f32).collect::<Vec<f32>>(),
                    s.len(),
                    &c.device,
                )?
            }
            _ => return Err(bad()),
        };
        out.push(g.compare(name, &actual, c.tolerance_scale)?);
    }
    Ok(out)
}

/// The DDIM eta step with log-probability on per-sample timesteps (SD1.5 DDIM config, 10 steps: step ratio
/// 100), plus the log-probability of the same `x_{t-1}` under `model_output_new` and the PPO ratio.
pub fn check_ddim_logprob(g: &Golden, c: &CheckContext) -> Result<Vec<Comparison>> {
    let config = golden_config(g, Some(SchedulerConfig::sd15()))?;
    let schedule = NoiseSchedule::new(&config)?;
    let dev = &c.device;
    let s = c.tolerance_scale;
    let sample = g.get_on("sample", dev)?;
    let t = g.get_on("timesteps", dev)?;
    let mo = g.get_on("model_output", dev)?;
    let mo_new = g.get_on("model_output_new", dev)?;
    let noise = g.get_on("noise", dev)?;
    let eta = g.get("eta")?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    let step_ratio = config.num_train_timesteps / 10;
    let a = ddim_step_with_logprob(
        &schedule,
        &mo,
        &t,
        &sample,
        eta,
        step_ratio,
        DdimTransition::Noise(&noise),
    )?;
    let b = ddim_step_with_logprob(
        &schedule,
        &mo_new,
        &t,
        &sample,
        eta,
        step_ratio,
        DdimTransition::PrevSample(&a.prev_sample),
    )?;
    let ratio = (&b.log_prob - &a.log_prob)?.exp()?;
    Ok(vec![
        g.compare("prev_sample", &a.prev_sample, s)?,
        g.compare("log_prob", &a.log_prob, s)?,
        g.compare("prev_sample_mean", &a.mean, s)?,
        g.compare("std_dev_t", &a.std, s)?,
        g.compare("log_prob_new", &b.log_prob, s)?,
        g.compare("prev_sample_mean_new", &b.mean, s)?,
        g.compare("ratio", &ratio, s)?,
    ])
}
