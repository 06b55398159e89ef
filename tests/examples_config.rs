//! The documented example config parses, and its defaults are the library's defaults.

use diffpref::methods::pairwise::DpoConfig;

#[test]
fn example_config_matches_the_defaults() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/dpo.toml");
    let cfg = DpoConfig::load(Some(&path), &[]).unwrap();
    let d = DpoConfig::default();
    assert_eq!(cfg.run.optim.lr, d.run.optim.lr);
    assert_eq!(cfg.loss.beta, d.loss.beta);
    assert_eq!(cfg.run.lora, d.run.lora);
    assert_eq!(cfg.data.resolution, d.data.resolution);
    assert_eq!(cfg.run.optim.schedule, d.run.optim.schedule);
    assert_eq!(cfg.run.log.keep_last, d.run.log.keep_last);
    assert_eq!(
        serde_json::to_value(&cfg.run.validation).unwrap(),
        serde_json::to_value(&d.run.validation).unwrap()
    );
    assert_eq!(
        serde_json::to_value(&cfg.run.eval).unwrap(),
        serde_json::to_value(&d.run.eval).unwrap()
    );
    let over = DpoConfig::load(
        Some(&path),
        &["loss.kind=\"ipo\"".into(), "optim.max_steps=7".into()],
    )
    .unwrap();
    assert_eq!(over.run.optim.max_steps, 7);
    assert_eq!(over.loss.kind, diffpref::methods::dpo::LossKind::Ipo);
}

#[test]
fn embedded_default_config_points_at_the_shipped_assets() {
    let cfg = diffpref::assets::default_dpo_config(&["optim.max_steps=3".into()]).unwrap();
    cfg.validate().unwrap();
    assert_eq!(cfg.run.optim.max_steps, 3);
    assert!(std::path::Path::new(&cfg.run.model)
        .join("model_index.json")
        .exists());
    assert!(cfg.data.manifest.as_ref().unwrap().exists());
    assert!(cfg.run.eval.prompts.as_ref().unwrap().exists());
    assert!(
        !cfg.data.random_flip,
        "flips would swap left/right captions"
    );
}

#[test]
fn grpo_example_config_matches_the_defaults() {
    use diffpref::methods::grpo::GrpoConfig;
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/grpo.toml");
    let cfg = GrpoConfig::load(Some(&path), &[]).unwrap();
    let d = GrpoConfig::default();
    // Every section but the required paths is at its default.
    let mut ex = serde_json::to_value(&cfg).unwrap();
    let mut de = serde_json::to_value(&d).unwrap();
    for v in [&mut ex, &mut de] {
        v["model"] = serde_json::Value::Null;
        v["output_dir"] = serde_json::Value::Null;
        v["grpo"]["prompts"] = serde_json::Value::Null;
        // `kind` unset means the shapes reward; the example spells it out.
        v["reward"]["kind"] = serde_json::Value::Null;
    }
    assert_eq!(ex, de);
    let over = GrpoConfig::load(Some(&path), &["grpo.kl_beta=0.5".into()]).unwrap();
    assert_eq!(over.grpo.kl_beta, 0.5);
}

#[test]
fn embedded_grpo_default_points_at_the_shipped_assets() {
    let cfg = diffpref::assets::default_grpo_config(&["optim.max_steps=3".into()]).unwrap();
    cfg.validate().unwrap();
    assert!(std::path::Path::new(&cfg.run.model)
        .join("model_index.json")
        .exists());
    assert!(cfg.grpo.prompts.as_ref().unwrap().exists());
    assert!(cfg.run.eval.prompts.as_ref().unwrap().exists());
    assert!(cfg.reward.is_shapes());
}

#[test]
fn lpo_and_lrm_example_configs_match_the_defaults() {
    use diffpref::methods::lpo::LpoConfig;
    use diffpref::methods::lrm::LrmConfig;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let cfg = LpoConfig::load(Some(&root.join("examples/lpo.toml")), &[]).unwrap();
    let mut ex = serde_json::to_value(&cfg).unwrap();
    let mut de = serde_json::to_value(LpoConfig::default()).unwrap();
    for v in [&mut ex, &mut de] {
        v["model"] = serde_json::Value::Null;
        v["output_dir"] = serde_json::Value::Null;
        v["lpo"]["prompts"] = serde_json::Value::Null;
        v["lpo"]["lrm"] = serde_json::Value::Null;
    }
    assert_eq!(ex, de);
    let cfg = LrmConfig::load(Some(&root.join("examples/lrm.toml")), &[]).unwrap();
    let mut ex = serde_json::to_value(&cfg).unwrap();
    let mut de = serde_json::to_value(LrmConfig::default()).unwrap();
    for v in [&mut ex, &mut de] {
        v["model"] = serde_json::Value::Null;
        v["output_dir"] = serde_json::Value::Null;
    }
    assert_eq!(ex, de);
}

#[test]
fn embedded_lrm_and_lpo_defaults_point_at_the_shipped_assets() {
    let cfg = diffpref::assets::default_lrm_config(&[]).unwrap();
    cfg.validate().unwrap();
    assert!(std::path::Path::new(&cfg.model)
        .join("model_index.json")
        .exists());
    for p in cfg.pairs.iter().chain(cfg.eval.make.iter()) {
        assert!(p.prompts.as_ref().unwrap().exists());
    }
    let cfg = diffpref::assets::default_lpo_config(&[]).unwrap();
    cfg.validate().unwrap();
    assert!(cfg.lpo.prompts.as_ref().unwrap().exists());
    assert!(cfg.run.eval.prompts.as_ref().unwrap().exists());
    // The LRM the default `train lrm` writes.
    assert_eq!(
        cfg.lpo.lrm.as_deref(),
        Some(std::path::Path::new("runs/lrm-shapes/lrm"))
    );
}

#[test]
fn spm_and_spo_example_configs_match_the_defaults() {
    use diffpref::methods::spm::SpmConfig;
    use diffpref::methods::spo::SpoConfig;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let cfg = SpoConfig::load(Some(&root.join("examples/spo.toml")), &[]).unwrap();
    let mut ex = serde_json::to_value(&cfg).unwrap();
    let mut de = serde_json::to_value(SpoConfig::default()).unwrap();
    for v in [&mut ex, &mut de] {
        v["model"] = serde_json::Value::Null;
        v["output_dir"] = serde_json::Value::Null;
        v["spo"]["prompts"] = serde_json::Value::Null;
        v["spo"]["spm"] = serde_json::Value::Null;
    }
    assert_eq!(ex, de);
    let cfg = SpmConfig::load(Some(&root.join("examples/spm.toml")), &[]).unwrap();
    let mut ex = serde_json::to_value(&cfg).unwrap();
    let mut de = serde_json::to_value(SpmConfig::default()).unwrap();
    for v in [&mut ex, &mut de] {
        v["model"] = serde_json::Value::Null;
        v["output_dir"] = serde_json::Value::Null;
    }
    assert_eq!(ex, de);
}

#[test]
fn embedded_spm_and_spo_defaults_point_at_the_shipped_assets() {
    let cfg = diffpref::assets::default_spm_config(&[]).unwrap();
    cfg.validate().unwrap();
    assert!(std::path::Path::new(&cfg.model)
        .join("model_index.json")
        .exists());
    for p in cfg.pairs.iter().chain(cfg.eval.make.iter()) {
        assert!(p.prompts.as_ref().unwrap().exists());
    }
    let cfg = diffpref::assets::default_spo_config(&[]).unwrap();
    cfg.validate().unwrap();
    assert!(cfg.spo.prompts.as_ref().unwrap().exists());
    assert!(cfg.run.eval.prompts.as_ref().unwrap().exists());
    // The SPM the default `train spm` writes.
    assert_eq!(
        cfg.spo.spm.as_deref(),
        Some(std::path::Path::new("runs/spm-shapes/spm"))
    );
}

#[test]
fn seppo_example_config_matches_the_defaults() {
    use diffpref::methods::seppo::SeppoConfig;
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/seppo.toml");
    let cfg = SeppoConfig::load(Some(&path), &[]).unwrap();
    let d = SeppoConfig::default();
    let mut ex = serde_json::to_value(&cfg).unwrap();
    let mut de = serde_json::to_value(&d).unwrap();
    for v in [&mut ex, &mut de] {
        v["model"] = serde_json::Value::Null;
        v["output_dir"] = serde_json::Value::Null;
        v["data"]["manifest"] = serde_json::Value::Null;
    }
    assert_eq!(ex, de);
}

#[test]
fn embedded_seppo_default_points_at_the_shipped_assets() {
    let cfg = diffpref::assets::default_seppo_config(&["optim.max_steps=3".into()]).unwrap();
    cfg.validate().unwrap();
    assert!(std::path::Path::new(&cfg.run.model)
        .join("model_index.json")
        .exists());
    assert!(cfg.data.manifest.as_ref().unwrap().exists());
    assert!(cfg.run.eval.prompts.as_ref().unwrap().exists());
}

#[test]
fn adjoint_example_config_matches_the_defaults() {
    use diffpref::methods::adjoint::AdjointConfig;
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/adjoint.toml");
    let cfg = AdjointConfig::load(Some(&path), &[]).unwrap();
    let mut ex = serde_json::to_value(&cfg).unwrap();
    let mut de = serde_json::to_value(AdjointConfig::default()).unwrap();
    for v in [&mut ex, &mut de] {
        v["model"] = serde_json::Value::Null;
        v["output_dir"] = serde_json::Value::Null;
        v["adjoint"]["prompts"] = serde_json::Value::Null;
    }
    assert_eq!(ex, de);
    let over = AdjointConfig::load(Some(&path), &["adjoint.reward_scale=7".into()]).unwrap();
    assert_eq!(over.adjoint.reward_scale, 7.0);
}

#[test]
fn embedded_adjoint_default_points_at_the_shipped_assets() {
    let cfg = diffpref::assets::default_adjoint_config(&["optim.max_steps=3".into()]).unwrap();
    cfg.validate().unwrap();
    assert!(std::path::Path::new(&cfg.run.model)
        .join("model_index.json")
        .exists());
    assert!(cfg.adjoint.prompts.as_ref().unwrap().exists());
    assert!(cfg.run.eval.prompts.as_ref().unwrap().exists());
    assert!(cfg.reward.is_shapes());
}
