//! Synthetic preference pairs for the shapes world (what `diffpref data make-prefs` writes, and what `train lrm`
//! makes when its config asks for pairs): `candidates` samples per pair from a model (pair i uses prompt i mod
//! the number of prompts, and noise seeds derived from the seed, i and the candidate), scored with the shapes
//! ground-truth reward ([`ShapesReward`]); the best and the worst (in sampling order) make the pair, labelled
//! by a Bradley–Terry draw: the first image is preferred with probability `σ((r_a − r_b) / T)`, drawn from a
//! seeded stream.
//!
//! The folder gets `img/NNNNN-a.png`, `img/NNNNN-b.png`, their sampler latents
//! `img/NNNNN-{a,b}.latent.safetensors` (see [`crate::data::latents`]) and `manifest.jsonl`, one line per pair:
//! `{"prompt", "chosen", "rejected", "chosen_latent", "rejected_latent", "reward_chosen", "reward_rejected",
//! "p_chosen"}` (paths relative to the manifest). The same options give the same files.

use crate::data::latents::save_latent;
use crate::imaging::{images_to_tensor, save_png, tensor_to_images};
use crate::io::write_atomic;
use crate::train::rng::Rng;
use anyhow::{ensure, Context, Result};
use candle_core::{Device, Tensor};
use diffpref_pipelines::loading::StableDiffusion;
use diffpref_pipelines::pipeline::{seeded_noise, GenerateOptions, Pipeline};
use diffpref_pipelines::schedulers::SchedulerKind;
use diffpref_rewards::shapes::ShapesReward;
use diffpref_rewards::Reward;
use std::path::Path;

/// How pairs are made.
#[derive(Clone, Debug)]
pub struct MakePrefsOptions {
    pub pairs: usize,
    /// Images sampled per pair (the pair is the best and the worst of them).
    pub candidates: usize,
    /// Bradley–Terry temperature T.
    pub temperature: f64,
    pub seed: u64,
    pub steps: usize,
    pub guidance: f64,
    /// Sampler (default: the model's scheduler).
    pub scheduler: Option<SchedulerKind>,
    /// Pairs sampled per pipeline call.
    pub batch_size: usize,
    /// Every two of a prompt's candidates make a pair (`candidates` choose 2 pairs per sampled group, each
    /// image written once as `img/NNNNN-J.png`), instead of the best and the worst: more pairs per sampled
    /// image, with smaller gaps too.
    pub all_pairs: bool,
}

/// What a set of pairs looks like.
#[derive(Clone, Copy, Debug)]
pub struct MakePrefsSummary {
    /// Pairs written.
    pub pairs: usize,
    /// Mean ground-truth reward of the pairs' images.
    pub mean_reward: f64,
    /// Pairs whose chosen image has the higher reward.
    pub agree: usize,
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// The Bradley–Terry probability that the first of two images is preferred.
pub fn preference_probability(r_first: f64, r_second: f64, temperature: f64) -> f64 {
    sigmoid((r_first - r_second) / temperature)
}

/// The indices of the best and the worst of `scores` (first occurrence of each), in index order; two
/// distinct indices when there are at least two scores.
fn best_and_worst(scores: &[f32]) -> (usize, usize) {
    let mut best = 0;
    let mut worst = 0;
    for (j, &r) in scores.iter().enumerate() {
        if r > scores[best] {
            best = j;
        }
        if r < scores[worst] {
            worst = j;
        }
    }
    if best == worst {
        // All equal: any two differ only by noise.
        (0, 1)
    } else {
        (best.min(worst), best.max(worst))
    }
}

/// The noise seed of candidate image `j` of pair `i`.
fn image_seed(seed: u64, i: usize, j: usize) -> u64 {
    Rng::derive(seed, &format!("make-prefs-image-{i}-{j}")).next_u64()
}

/// Writes the pairs of the module docs into the existing folder `dir` (`o.pairs` sampled groups: one pair
/// each, or every two candidates with `all_pairs`); `on_pair` is called after each group.
pub fn make_prefs(
    model: &StableDiffusion,
    captions: &[String],
    o: &MakePrefsOptions,
    dir: &Path,
    on_pair: &dyn Fn(),
) -> Result<MakePrefsSummary> {
    ensure!(o.pairs >= 1, "pairs must be at least 1");
    ensure!(
        (2..=256).contains(&o.candidates),
        "candidates must be 2 to 256 (got {})",
        o.candidates
    );
    ensure!(!captions.is_empty(), "no prompts");
    ensure!(
        o.temperature > 0.0 && o.temperature.is_finite(),
        "the temperature must be a positive number (got {})",
        o.temperature
    );
    let k_c = o.candidates;
    let pipe = Pipeline::new(model)?;
    let reward = ShapesReward::new();
    let base = GenerateOptions {
        steps: o.steps,
        guidance_scale: o.guidance,
        seed: o.seed,
        scheduler: o.scheduler,
        ..Default::default()
    };
    let (lh, lw) = pipe.latent_size(&base)?;
    let c = model.unet.config().in_channels;
    let (mut sum_r, mut agree) = (0f64, 0usize);
    let img_dir = dir.join("img");
    std::fs::create_dir_all(&img_dir)
        .with_context(|| format!("cannot create {}", img_dir.display()))?;
    let mut labels = Rng::derive(o.seed, "make-prefs-labels");
    let mut lines = Vec::with_capacity(o.pairs);
    let bs = o.batch_size.max(1);
    let mut start = 0;
    while start < o.pairs {
        let n = bs.min(o.pairs - start);
        let mut prompts: Vec<&str> = Vec::with_capacity(k_c * n);
        let mut noise = Vec::with_capacity(k_c * n);
        for i in start..start + n {
            let p = captions[i % captions.len()].as_str();
            for j in 0..k_c {
                prompts.push(p);
                noise.push(seeded_noise(
                    image_seed(o.seed, i, j),
                    &[1, c, lh, lw],
                    &Device::Cpu,
                )?);
            }
        }
        let opts = GenerateOptions {
            init_latents: Some(Tensor::cat(&noise, 0)?),
            ..base.clone()
        };
        let out = pipe
            .generate(&prompts, &[], &opts, None)
            .with_context(|| format!("sampling pairs {start}..{}", start + n))?;
        // Score the 8-bit images that are written, so the manifest's rewards are those of the files.
        let images = tensor_to_images(&out.images)?;
        let scores: Vec<f32> = reward
            .score(&images_to_tensor(&images, &Device::Cpu)?, &prompts)?
            .to_vec1()?;
        for k in 0..n {
            let i = start + k;
            let group = &scores[k_c * k..k_c * (k + 1)];
            let candidates: Vec<(usize, usize)> = if o.all_pairs {
                (0..k_c)
                    .flat_map(|a| (a + 1..k_c).map(move |b| (a, b)))
                    .collect()
            } else {
                vec![best_and_worst(group)]
            };
            let name = |j: usize, ext: &str| -> String {
                if o.all_pairs {
                    format!("img/{i:05}-{j}.{ext}")
                } else {
                    format!(
                        "img/{i:05}-{}.{ext}",
                        if candidates[0].0 == j { "a" } else { "b" }
                    )
                }
            };
            let mut written = vec![false; k_c];
            for &(ja, jb) in &candidates {
                for j in [ja, jb] {
                    if !written[j] {
                        save_png(&images[k_c * k + j], dir.join(name(j, "png")))?;
                        save_latent(
                            &dir.join(name(j, "latent.safetensors")),
                            &out.latents.get(k_c * k + j)?,
                        )?;
                        written[j] = true;
                    }
                }
                let (ra, rb) = (group[ja] as f64, group[jb] as f64);
                let p_a = preference_probability(ra, rb, o.temperature);
                let a_wins = labels.uniform() < p_a;
                let (w, l) = if a_wins { (ja, jb) } else { (jb, ja) };
                let (rc, rr) = if a_wins { (ra, rb) } else { (rb, ra) };
                let pc = if a_wins { p_a } else { 1.0 - p_a };
                sum_r += ra + rb;
                if rc > rr {
                    agree += 1;
                }
                lines.push(serde_json::to_string(&serde_json::json!({
                    "prompt": prompts[k_c * k],
                    "chosen": name(w, "png"),
                    "rejected": name(l, "png"),
                    "chosen_latent": name(w, "latent.safetensors"),
                    "rejected_latent": name(l, "latent.safetensors"),
                    "reward_chosen": rc,
                    "reward_rejected": rr,
                    "p_chosen": pc,
                }))?);
            }
            on_pair();
        }
        start += n;
    }
    let mut text = lines.join("\n");
    text.push('\n');
    write_atomic(&dir.join("manifest.jsonl"), text.as_bytes())?;
    Ok(MakePrefsSummary {
        pairs: lines.len(),
        mean_reward: sum_r / (2 * lines.len()) as f64,
        agree,
    })
}

/// Rendered hard-negative pairs (`data make-prefs --renders`, `[pairs] source = "renders"`): for pair `i`
/// (prompt `i` mod the number of prompts), the ground-truth render of a scene the caption describes (chosen)
/// and the render of a scene of a one-edit corruption of the caption ([`crate::data::shapes::corrupt`]:
/// rejected), both at `size` pixels, labelled by the exact reward under the prompt (the render that scores
/// higher is chosen; a corruption that scores as high is drawn again). No sampler latents: trainers encode the
/// PNGs. The manifest is [`make_prefs`]'s without the latents (`p_chosen` is 1).
pub fn render_prefs(
    captions: &[String],
    pairs: usize,
    seed: u64,
    size: u32,
    dir: &Path,
) -> Result<MakePrefsSummary> {
    use crate::data::shapes::{corrupt, Scene};
    ensure!(pairs >= 1, "pairs must be at least 1");
    ensure!(!captions.is_empty(), "no prompts");
    let reward = ShapesReward::new();
    let img_dir = dir.join("img");
    std::fs::create_dir_all(&img_dir)
        .with_context(|| format!("cannot create {}", img_dir.display()))?;
    let mut lines = Vec::with_capacity(pairs);
    let (mut sum_r, mut agree) = (0f64, 0usize);
    for i in 0..pairs {
        let prompt = &captions[i % captions.len()];
        let spec = diffpref_rewards::shapes::parse_caption(prompt)
            .with_context(|| format!("prompt {:?} is not a shapes caption", prompt))?;
        let mut rng = Rng::derive(seed, &format!("render-prefs-{i}"));
        let good = Scene::from_spec(&spec, &mut rng).render(size);
        let score = |img: &image::RgbImage| -> Result<f64> {
            let x = images_to_tensor(std::slice::from_ref(img), &Device::Cpu)?;
            Ok(reward.score(&x, &[prompt.as_str()])?.to_vec1::<f32>()?[0] as f64)
        };
        let rg = score(&good)?;
        let mut tries = 0;
        let (bad, rb) = loop {
            let b = Scene::from_spec(&corrupt(&spec, &mut rng), &mut rng).render(size);
            let rb = score(&b)?;
            tries += 1;
            if rb < rg || tries >= 20 {
                break (b, rb);
            }
        };
        if rb >= rg {
            continue;
        }
        let (c, r) = (format!("img/{i:05}-c.png"), format!("img/{i:05}-r.png"));
        save_png(&good, dir.join(&c))?;
        save_png(&bad, dir.join(&r))?;
        sum_r += rg + rb;
        agree += 1;
        lines.push(serde_json::to_string(&serde_json::json!({
            "prompt": prompt,
            "chosen": c,
            "rejected": r,
            "reward_chosen": rg,
            "reward_rejected": rb,
            "p_chosen": 1.0,
        }))?);
    }
    ensure!(!lines.is_empty(), "no rendered pair separated its images");
    let mut text = lines.join("\n");
    text.push('\n');
    write_atomic(&dir.join("manifest.jsonl"), text.as_bytes())?;
    Ok(MakePrefsSummary {
        pairs: lines.len(),
        mean_reward: sum_r / (2 * lines.len()) as f64,
        agree,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendered_pairs_prefer_the_caption_over_its_corruption() {
        let tmp = tempfile::tempdir().unwrap();
        let captions: Vec<String> = [
            "a red circle",
            "two blue squares",
            "a green triangle to the left of a yellow circle",
            "a white square, a black circle and an orange triangle",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let s = render_prefs(&captions, 12, 3, 32, tmp.path()).unwrap();
        assert!(s.pairs >= 10, "{}", s.pairs);
        let text = std::fs::read_to_string(tmp.path().join("manifest.jsonl")).unwrap();
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            assert!(
                v["reward_chosen"].as_f64() > v["reward_rejected"].as_f64(),
                "{line}"
            );
            assert!(tmp.path().join(v["chosen"].as_str().unwrap()).exists());
        }
        // The same seed, the same files.
        let tmp2 = tempfile::tempdir().unwrap();
        render_prefs(&captions, 12, 3, 32, tmp2.path()).unwrap();
        assert_eq!(
            text,
            std::fs::read_to_string(tmp2.path().join("manifest.jsonl")).unwrap()
        );
    }

    #[test]
    fn best_and_worst_in_index_order() {
        assert_eq!(best_and_worst(&[0.2, 0.7]), (0, 1));
        assert_eq!(best_and_worst(&[0.7, 0.2]), (0, 1));
        assert_eq!(best_and_worst(&[0.5, 0.9, 0.1, 0.4]), (1, 2));
        assert_eq!(best_and_worst(&[0.1, 0.5, 0.4, 0.9]), (0, 3));
        assert_eq!(best_and_worst(&[0.3, 0.3, 0.3]), (0, 1));
    }

    #[test]
    fn bradley_terry_probability() {
        assert!((preference_probability(0.5, 0.5, 0.05) - 0.5).abs() < 1e-12);
        let p = preference_probability(0.6, 0.5, 0.05);
        assert!((p - 1.0 / (1.0 + (-2.0f64).exp())).abs() < 1e-12);
        assert!((p + preference_probability(0.5, 0.6, 0.05) - 1.0).abs() < 1e-12);
    }
}
