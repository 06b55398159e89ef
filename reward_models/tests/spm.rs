//! The step-aware preference model: a fresh SPM is its CLIP backbone at every timestep, every parameter gets a
//! gradient, and a saved folder loads back to the same scores.

use candle_core::{DType, Device, Tensor};
use diffpref_rewards::spm::{ScratchTower, SpmBackbone, StepAwarePreferenceModel};
use diffpref_rewards::{ClipModel, ClipReward, ClipScoring, Reward};
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn images(n: usize, side: usize, seed: u64) -> Tensor {
    let t = diffpref_pipelines::pipeline::seeded_noise(seed, &[n, 3, side, side], &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    ((t.tanh().unwrap() + 1.0).unwrap() * 0.5).unwrap()
}

fn clip_backbone() -> SpmBackbone {
    SpmBackbone::Clip {
        path: fixtures().join("tiny-clip-hf"),
        tokenizer: None,
    }
}

#[test]
fn a_fresh_spm_scores_as_its_clip_at_every_timestep() {
    let dev = Device::Cpu;
    let spm = StepAwarePreferenceModel::new_trainable(
        &clip_backbone(),
        &fixtures().join("tiny-sd"),
        5.0,
        7,
        &dev,
    )
    .unwrap();
    let clip = ClipModel::load(fixtures().join("tiny-clip-hf"), DType::F32, &dev).unwrap();
    let plain = ClipReward::new(std::sync::Arc::new(clip), ClipScoring::PickScore).unwrap();
    let x = images(3, 40, 1);
    let prompts = ["a red circle", "two blue squares", "a cat"];
    let want: Vec<f32> = plain.score(&x, &prompts).unwrap().to_vec1().unwrap();
    for t in [0f32, 251.0, 951.0] {
        let tt = Tensor::new(&[t], &dev).unwrap();
        let got: Vec<f32> = spm
            .score_images(&x, &prompts, &tt)
            .unwrap()
            .to_vec1()
            .unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert!(
                (g - w).abs() < 1e-4 * w.abs().max(1.0),
                "t {t}: {got:?} vs {want:?}"
            );
        }
    }
    // Distinct scores: the comparison is not vacuous.
    assert!((want[0] - want[1]).abs() > 1e-6);
}

#[test]
fn every_spm_parameter_gets_a_finite_nonzero_gradient_once_the_modulation_is_open() {
    let dev = Device::Cpu;
    let spm = StepAwarePreferenceModel::new_trainable(
        &clip_backbone(),
        &fixtures().join("tiny-sd"),
        5.0,
        3,
        &dev,
    )
    .unwrap();
    // adaLN-Zero: at init the modulation weights are zero, so the timestep MLP gets no gradient yet. Open
    // them a little, as the first optimizer steps do.
    for (n, v) in spm.trainable_vars() {
        if (n.starts_with("adaln.") || n.starts_with("final_adaln.")) && n.ends_with(".weight") {
            {
                let r = diffpref_pipelines::pipeline::seeded_noise(11, v.dims(), &dev)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap();
                v.set(&(r * 0.01).unwrap()).unwrap();
            }
        }
    }
    let x = images(2, 32, 2);
    let t = Tensor::new(&[100f32, 700.0], &dev).unwrap();
    let s = spm
        .score_images(&x, &["a red circle", "a green square"], &t)
        .unwrap();
    let loss = (s.get(0).unwrap() - s.get(1).unwrap()).unwrap();
    let g = loss.backward().unwrap();
    let vars = spm.trainable_vars();
    assert!(vars.len() > 20, "{}", vars.len());
    for (n, v) in &vars {
        let gr = g
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("{n}: no gradient (the graph is cut)"));
        let a: f32 = gr.abs().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert!(a.is_finite() && a > 0.0, "{n}: |grad| = {a}");
    }
}

#[test]
fn saved_spms_load_back_to_the_same_scores_and_the_timestep_matters_after_training() {
    let dev = Device::Cpu;
    for backbone in [
        clip_backbone(),
        SpmBackbone::Scratch(ScratchTower {
            image_size: 16,
            patch_size: 4,
            width: 32,
            layers: 2,
            heads: 4,
            mlp_dim: None,
            embed_dim: None,
        }),
    ] {
        let spm = StepAwarePreferenceModel::new_trainable(
            &backbone,
            &fixtures().join("tiny-sd"),
            5.0,
            5,
            &dev,
        )
        .unwrap();
        // Perturb every parameter (a stand-in for training) so that the timestep changes the score.
        for (i, (_, v)) in spm.trainable_vars().into_iter().enumerate() {
            let r = diffpref_pipelines::pipeline::seeded_noise(100 + i as u64, v.dims(), &dev)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            v.set(&(v.as_tensor() + (r * 0.05).unwrap()).unwrap())
                .unwrap();
        }
        let x = images(2, 24, 3);
        let prompts = ["a red circle", "three yellow triangles"];
        let at = |m: &StepAwarePreferenceModel, t: f32| -> Vec<f32> {
            m.score_images(&x, &prompts, &Tensor::new(&[t], &dev).unwrap())
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let dir = tempfile::tempdir().unwrap();
        spm.save(dir.path()).unwrap();
        let back = StepAwarePreferenceModel::load(dir.path(), DType::F32, &dev).unwrap();
        for t in [0f32, 600.0] {
            let (a, b) = (at(&spm, t), at(&back, t));
            for (a, b) in a.iter().zip(&b) {
                assert!(
                    (a - b).abs() < 1e-5 * a.abs().max(1.0),
                    "{backbone:?} t {t}: {a} vs {b}"
                );
            }
        }
        let (s0, s6) = (at(&spm, 0.0), at(&spm, 600.0));
        assert!(
            (s0[0] - s6[0]).abs() > 1e-6,
            "{backbone:?}: the timestep changes nothing"
        );
        // As a Reward: the image at reward_timestep.
        let mut back = back;
        back.reward_timestep = 600.0;
        let r: Vec<f32> = back.score(&x, &prompts).unwrap().to_vec1().unwrap();
        assert!((r[1] - s6[1]).abs() < 1e-5 * s6[1].abs().max(1.0));
    }
}

#[test]
fn a_folder_without_an_spm_config_is_a_clear_error() {
    let e =
        StepAwarePreferenceModel::load(&fixtures().join("tiny-clip-hf"), DType::F32, &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
    assert!(
        e.contains("spm_config.json") && e.contains("tiny-clip-hf"),
        "{e}"
    );
}
