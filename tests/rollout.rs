//! Rollouts: trajectories of the stochastic sampler and their log-probabilities recomputed with graph (the
//! on-policy ratio is exactly 1), the reference's, branching, determinism, DDPM, and SD2 (v-prediction) /
//! SDXL models.

use candle_core::{DType, Device, Tensor};
use diffpref::engine::policy::{Policy, Weights};
use diffpref::pipelines::loading::{LoadOptions, StableDiffusion};
use diffpref::rollout::{self, branch::branch, RolloutConfig, Sampler, Selection, StepRule};
use diffpref::train::lora::LoraConfig;
use diffpref::train::rng::Rng;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn load(name: &str) -> StableDiffusion {
    StableDiffusion::load(&fixtures().join(name), &LoadOptions::default()).unwrap()
}

/// A LoRA policy whose adapters change the model (B set to small seeded values, as after some training).
fn lora_policy(model: &StableDiffusion) -> Policy {
    let p = Policy::lora(&model.unet, &LoraConfig::default(), 3, &Device::Cpu).unwrap();
    let mut rng = Rng::new(11);
    for (name, v) in p.params() {
        if name.ends_with("lora_B.weight") {
            v.set(&(rng.normal_tensor(v.dims(), &Device::Cpu).unwrap() * 0.05).unwrap())
                .unwrap();
        }
    }
    p
}

/// max |a − b| over all elements.
fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

fn rule(model: &StableDiffusion, steps: usize, sampler: Sampler) -> StepRule {
    StepRule::new(
        model,
        &RolloutConfig {
            steps,
            sampler,
            ..Default::default()
        },
    )
    .unwrap()
}

const PROMPTS: [&str; 3] = ["a red square", "a blue circle", "a green triangle"];

#[test]
fn recomputed_log_probs_equal_the_sampled_ones_and_carry_gradients() {
    let mut model = load("tiny-sd");
    let policy = lora_policy(&model);
    let rule = rule(&model, 4, Sampler::Ddim);
    let traj = policy
        .with_weights(&mut model, Weights::Current, |m| {
            rollout::sample(m, &rule, &PROMPTS, Some(32), &mut Rng::new(5))
        })
        .unwrap();
    assert_eq!(traj.latents.len(), 5);
    assert_eq!(traj.log_probs.len(), 4);
    assert_eq!(traj.images.dims(), &[3, 3, 32, 32]);
    for lp in &traj.log_probs {
        assert!(lp.to_vec1::<f32>().unwrap().iter().all(|v| v.is_finite()));
    }
    // Every step of the batch, recomputed with graph (LoRA in training mode): bit for bit the sampled ones.
    let mut total = Tensor::new(0f32, &Device::Cpu).unwrap();
    for k in 0..4 {
        let sel = Selection::step(3, k);
        let new = rollout::recompute(&model.unet, &model, &rule, &traj, &sel).unwrap();
        let old = rollout::stored_log_probs(&traj, &sel).unwrap();
        assert_eq!(
            bits(&new.log_prob),
            bits(&old),
            "step {k}: log-probs differ on-policy"
        );
        let ratio = (&new.log_prob - &old).unwrap().exp().unwrap();
        assert!(ratio.to_vec1::<f32>().unwrap().iter().all(|&r| r == 1.0));
        assert_eq!(bits(&new.mean), bits(&traj.means[k]));
        total = (total + new.log_prob.sum_all().unwrap()).unwrap();
    }
    // Mixed rows and steps in one batch: the same up to the matmuls' rounding for another batch size.
    let sel = Selection {
        rows: vec![2, 0, 1, 0, 2],
        steps: vec![0, 3, 1, 2, 2],
    };
    let mixed = rollout::recompute(&model.unet, &model, &rule, &traj, &sel).unwrap();
    let old = rollout::stored_log_probs(&traj, &sel).unwrap();
    let d = max_abs_diff(&mixed.log_prob, &old);
    assert!(d < 1e-4, "mixed batch: log-probs differ by {d}");
    // The log-probability carries a gradient into the adapters (B of every adapter).
    let grads = total.backward().unwrap();
    let mut reached = 0;
    for (name, v) in policy.params() {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let n = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(n.is_finite(), "{name}");
        reached += (n > 0.0) as usize;
    }
    assert_eq!(
        reached,
        policy.params().len(),
        "every LoRA matrix gets a gradient"
    );

    // The reference (adapters off) recomputes what the base model samples.
    let base = policy
        .with_weights(&mut model, Weights::Base, |m| {
            rollout::sample(m, &rule, &PROMPTS, Some(32), &mut Rng::new(5))
        })
        .unwrap();
    let reference = policy.reference().unwrap();
    let sel = Selection::step(3, 2);
    let r = {
        let scope = reference.scope(&model.unet);
        rollout::recompute(scope.unet(), &model, &rule, &base, &sel).unwrap()
    };
    assert_eq!(
        bits(&r.log_prob),
        bits(&rollout::stored_log_probs(&base, &sel).unwrap())
    );
    // And the adapters are back on after the scope: the policy's trajectory differs from the base one.
    assert!(policy.lora_set().unwrap().is_enabled());
    assert_ne!(bits(&traj.latents[4]), bits(&base.latents[4]));
}

#[test]
fn trajectories_and_branches_are_deterministic_given_a_seed() {
    let model = load("tiny-sd");
    let rule = rule(&model, 3, Sampler::Ddim);
    let a = rollout::sample(&model, &rule, &PROMPTS[..2], None, &mut Rng::new(9)).unwrap();
    let b = rollout::sample(&model, &rule, &PROMPTS[..2], None, &mut Rng::new(9)).unwrap();
    let c = rollout::sample(&model, &rule, &PROMPTS[..2], None, &mut Rng::new(10)).unwrap();
    for k in 0..4 {
        assert_eq!(bits(&a.latents[k]), bits(&b.latents[k]));
    }
    assert_ne!(bits(&a.latents[3]), bits(&c.latents[3]));

    // Branching: K children of one parent, from the sampler's own Gaussian.
    let cond = &a.cond;
    let x = &a.latents[1];
    let br = |seed| branch(&model.unet, &rule, cond, x, 1, 4, &mut Rng::new(seed)).unwrap();
    let (b1, b2, b3) = (br(4), br(4), br(5));
    let (c, h, w) = (x.dim(1).unwrap(), x.dim(2).unwrap(), x.dim(3).unwrap());
    assert_eq!(b1.children.dims(), &[2, 4, c, h, w]);
    assert_eq!(b1.log_probs.dims(), &[2, 4]);
    assert_eq!(bits(&b1.children), bits(&b2.children));
    assert_eq!(bits(&b1.log_probs), bits(&b2.log_probs));
    assert_ne!(bits(&b1.children), bits(&b3.children));
    // Children of one parent differ from each other, and share the parent's mean (the trajectory's own).
    let kids = b1.children.get(0).unwrap();
    assert_ne!(bits(&kids.get(0).unwrap()), bits(&kids.get(1).unwrap()));
    assert_eq!(bits(&b1.mean), bits(&a.means[1]));
    // A child's log-probability is what recomputing it as a stored transition gives.
    let choice = [3usize, 1];
    let next = b1.select(&choice).unwrap();
    let mut t = a.clone();
    t.latents[2] = next.clone();
    let again = rollout::recompute(&model.unet, &model, &rule, &t, &Selection::step(2, 1)).unwrap();
    let want: Vec<f32> = vec![
        b1.log_probs
            .get(0)
            .unwrap()
            .get(3)
            .unwrap()
            .to_scalar()
            .unwrap(),
        b1.log_probs
            .get(1)
            .unwrap()
            .get(1)
            .unwrap()
            .to_scalar()
            .unwrap(),
    ];
    assert_eq!(again.log_prob.to_vec1::<f32>().unwrap(), want);
    // Continuing from the chosen child is deterministic too.
    let cont = |seed| {
        branch(&model.unet, &rule, cond, &next, 2, 2, &mut Rng::new(seed))
            .unwrap()
            .children
    };
    assert_eq!(bits(&cont(1)), bits(&cont(1)));
}

#[test]
fn ddpm_is_eta_one_with_a_deterministic_last_step() {
    use diffpref::pipelines::schedulers::{DdpmScheduler, Scheduler, SchedulerConfig};
    let model = load("tiny-sd");
    let ddpm_rule = rule(&model, 4, Sampler::Ddpm);
    assert_eq!(ddpm_rule.stochastic_steps(), vec![0, 1, 2]);
    let t = rollout::sample(&model, &ddpm_rule, &PROMPTS[..2], None, &mut Rng::new(2)).unwrap();
    // The last step returns x̂₀ exactly, with no log-probability.
    assert_eq!(bits(&t.latents[4]), bits(&t.pred_x0[3]));
    assert_eq!(t.log_probs[3].to_vec1::<f32>().unwrap(), vec![0.0, 0.0]);
    // Every step's mean is diffusers' DDPMScheduler posterior mean (its step with zero noise).
    let sc = SchedulerConfig::from_file(&model.scheduler_config_path).unwrap();
    let mut ddpm = DdpmScheduler::new(&sc).unwrap();
    ddpm.set_timesteps(4).unwrap();
    assert_eq!(ddpm.timesteps(), ddpm_rule.timesteps.as_slice());
    let cond = &t.cond;
    for k in 0..4 {
        let x = &t.latents[k];
        let tt = Tensor::full(ddpm_rule.timesteps[k] as f32, 2, &Device::Cpu).unwrap();
        let eps = rollout::guided_output(&model.unet, x, &tt, cond, 7.5).unwrap();
        let zero = x.zeros_like().unwrap();
        let out = ddpm.step(&eps, k, x, Some(&zero)).unwrap();
        let d = max_abs_diff(&out.prev_sample, &t.means[k]);
        assert!(d < 1e-5, "step {k}: DDPM mean differs by {d}");
    }
    assert!(
        rollout::recompute(&model.unet, &model, &ddpm_rule, &t, &Selection::step(2, 3)).is_err()
    );
}

/// The DDIM η = 1 step of an SD2-style v-prediction model against the golden made with diffusers
/// (`tests/fixtures/parity/make_vpred_logprob_golden.py`): the UNet's v, diffusers' `DDIMScheduler.step` with the
/// golden's noise, and the trl-convention log-probability.
#[test]
fn v_prediction_step_matches_diffusers() {
    use diffpref::pipelines::golden::Golden;
    let g = Golden::load(fixtures().join("parity/ddim_vpred_logprob.safetensors")).unwrap();
    let model = load("tiny-sd2");
    let rule = StepRule::new(
        &model,
        &RolloutConfig {
            steps: g.meta("num_inference_steps").unwrap().parse().unwrap(),
            guidance: 1.0,
            eta: 1.0,
            ..Default::default()
        },
    )
    .unwrap();
    let x = g.get("sample").unwrap().clone();
    let ks: Vec<usize> = g
        .get("step_index")
        .unwrap()
        .to_dtype(DType::I64)
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .iter()
        .map(|&k| k as usize)
        .collect();
    let t = g.get("timesteps").unwrap();
    let ehs = g.get("encoder_hidden_states").unwrap();
    let out = model.unet.forward(&x, t, ehs, None).unwrap();
    let mut checks = vec![g.compare("model_output", &out, 1.0).unwrap()];
    let noise = g.get("noise").unwrap();
    let tr = rollout::transition(
        &rule,
        &out,
        &x,
        &ks,
        diffpref::pipelines::schedulers::DdimTransition::Noise(noise),
    )
    .unwrap();
    checks.push(g.compare("prev_sample", &tr.prev_sample, 1.0).unwrap());
    checks.push(g.compare("mean", &tr.mean, 1.0).unwrap());
    checks.push(g.compare("std", &tr.std, 1.0).unwrap());
    checks.push(g.compare("log_prob", &tr.log_prob, 1.0).unwrap());
    checks.push(g.compare("pred_original_sample", &tr.pred_x0, 1.0).unwrap());
    assert_eq!(checks.len(), 6);
    for c in &checks {
        assert!(c.passed, "{c}");
    }
}

#[test]
fn sdxl_style_model_rolls_out_with_micro_conditioning() {
    let mut model = load("tiny-sdxl");
    let policy = lora_policy(&model);
    let rule = rule(&model, 2, Sampler::Ddim);
    let traj = policy
        .with_weights(&mut model, Weights::Current, |m| {
            rollout::sample(m, &rule, &PROMPTS[..2], None, &mut Rng::new(1))
        })
        .unwrap();
    for k in 0..2 {
        let sel = Selection::step(2, k);
        let new = rollout::recompute(&model.unet, &model, &rule, &traj, &sel).unwrap();
        assert_eq!(
            bits(&new.log_prob),
            bits(&rollout::stored_log_probs(&traj, &sel).unwrap())
        );
    }
}

#[test]
fn branched_groups_share_their_path_but_for_one_step() {
    let mut model = load("tiny-sd");
    let policy = lora_policy(&model);
    let rule = rule(&model, 4, Sampler::Ddim);
    let prompts = [
        "a red square",
        "a red square",
        "a red square",
        "a blue circle",
        "a blue circle",
        "a blue circle",
    ];
    let branch = 1;
    let traj = policy
        .with_weights(&mut model, Weights::Current, |m| {
            rollout::sample_branched(m, &rule, &prompts, 3, branch, None, &mut Rng::new(4))
        })
        .unwrap();
    let row = |k: usize, i: usize| bits(&traj.latents[k].get(i).unwrap());
    // Up to the branching step the members of a group are one state; after it they differ.
    for k in 0..=branch {
        assert_eq!(row(k, 0), row(k, 2));
        assert_eq!(row(k, 3), row(k, 5));
        assert_ne!(row(k, 0), row(k, 3));
    }
    for k in branch + 1..=4 {
        assert_ne!(row(k, 0), row(k, 1));
    }
    // Only the branching step is stochastic; its log-probabilities recompute exactly, with graph.
    for k in 0..4 {
        let lp = traj.log_probs[k].to_vec1::<f32>().unwrap();
        if k == branch {
            assert!(lp.iter().all(|v| v.is_finite() && *v != 0.0), "{lp:?}");
        } else {
            assert_eq!(lp, vec![0.0; 6]);
        }
    }
    let sel = Selection::step(6, branch);
    let new = rollout::recompute(&model.unet, &model, &rule, &traj, &sel).unwrap();
    assert_eq!(bits(&new.log_prob), bits(&traj.log_probs[branch]));
    // The deterministic steps are DDIM with eta = 0: the scheduler's own step.
    use diffpref::pipelines::schedulers::{DdimScheduler, Scheduler, SchedulerConfig};
    let sc = SchedulerConfig::from_file(&model.scheduler_config_path).unwrap();
    let mut ddim = DdimScheduler::new(&sc).unwrap();
    ddim.set_timesteps(4).unwrap();
    let k = 2;
    let x = &traj.latents[k];
    let tt = Tensor::full(rule.timesteps[k] as f32, 6, &Device::Cpu).unwrap();
    let eps = policy
        .with_weights(&mut model, Weights::Current, |m| {
            rollout::guided_output(&m.unet, x, &tt, &traj.cond, 7.5)
        })
        .unwrap();
    let want = ddim.step(&eps, k, x, None).unwrap().prev_sample;
    let d = max_abs_diff(&want, &traj.latents[k + 1]);
    assert!(d < 1e-5, "{d}");
    // Deterministic given the seed.
    let again = policy
        .with_weights(&mut model, Weights::Current, |m| {
            rollout::sample_branched(m, &rule, &prompts, 3, branch, None, &mut Rng::new(4))
        })
        .unwrap();
    assert_eq!(bits(&again.latents[4]), bits(&traj.latents[4]));
}

#[test]
fn a_stochastic_range_keeps_the_gaussian_at_its_steps_only_and_rollouts_start_from_given_noise() {
    let model = load("tiny-sd");
    let full = rule(&model, 4, Sampler::Ddim);
    // The window [t_1, t_0 + 1): the first two steps are stochastic, the last two DDIM with eta = 0.
    let window = StepRule::new(
        &model,
        &RolloutConfig {
            steps: 4,
            stochastic_range: Some([full.timesteps[1] as u64, full.timesteps[0] as u64 + 1]),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(window.stochastic_steps(), vec![0, 1]);
    // Two rows from one initial noise (a group sharing x_T): same start, different paths after a stochastic step.
    let shape = rollout::initial_noise_shape(&model, 1, None).unwrap();
    let one = Rng::new(8).normal_tensor(&shape, &Device::Cpu).unwrap();
    let x_t = Tensor::cat(&[&one, &one], 0).unwrap();
    let prompts = ["a red square", "a red square"];
    let t = rollout::sample_from(&model, &window, &prompts, x_t, &mut Rng::new(3)).unwrap();
    let row = |k: usize, i: usize| bits(&t.latents[k].get(i).unwrap());
    assert_eq!(row(0, 0), row(0, 1));
    assert_ne!(row(1, 0), row(1, 1));
    for k in 0..4 {
        let lp = t.log_probs[k].to_vec1::<f32>().unwrap();
        let std = t.stds[k].to_vec1::<f32>().unwrap();
        if k < 2 {
            assert!(
                lp.iter().all(|v| v.is_finite() && *v != 0.0),
                "step {k}: {lp:?}"
            );
            assert!(std.iter().all(|&s| s > 0.0));
            let new = rollout::recompute(&model.unet, &model, &window, &t, &Selection::step(2, k))
                .unwrap();
            assert_eq!(bits(&new.log_prob), bits(&t.log_probs[k]), "step {k}");
        } else {
            assert_eq!(lp, vec![0.0; 2]);
            assert_eq!(std, vec![0.0; 2]);
            // The deterministic steps are the eta = 0 step: x_t' is the mean.
            assert_eq!(row(k + 1, 0), bits(&t.means[k].get(0).unwrap()));
            assert!(
                rollout::recompute(&model.unet, &model, &window, &t, &Selection::step(2, k))
                    .is_err()
            );
        }
    }
    // Without a window the same noise gives a different (fully stochastic) path, and `sample` equals
    // `sample_from` on the noise it draws first.
    let mut rng = Rng::new(8);
    let x2 = rng
        .normal_tensor(
            &rollout::initial_noise_shape(&model, 2, None).unwrap(),
            &Device::Cpu,
        )
        .unwrap();
    let a = rollout::sample_from(&model, &full, &prompts, x2, &mut rng).unwrap();
    let b = rollout::sample(&model, &full, &prompts, None, &mut Rng::new(8)).unwrap();
    assert_eq!(bits(&a.latents[4]), bits(&b.latents[4]));
    // A bad window is an error naming the key.
    let bad = RolloutConfig {
        stochastic_range: Some([600, 600]),
        ..Default::default()
    };
    let e = bad.validate("[rollout]").unwrap_err().to_string();
    assert!(e.contains("stochastic_range"), "{e}");
}
