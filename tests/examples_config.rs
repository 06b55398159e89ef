//! The documented example config parses, and its defaults are the library's defaults.

use diffpref::train::pairwise::TrainConfig;

#[test]
fn example_config_matches_the_defaults() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/dpo.toml");
    let cfg = TrainConfig::load(Some(&path), &[]).unwrap();
    let d = TrainConfig::default();
    assert_eq!(cfg.optim.lr, d.optim.lr);
    assert_eq!(cfg.loss.beta, d.loss.beta);
    assert_eq!(cfg.lora, d.lora);
    assert_eq!(cfg.data.resolution, d.data.resolution);
    assert_eq!(cfg.optim.schedule, d.optim.schedule);
    assert_eq!(cfg.log.keep_last, d.log.keep_last);
    assert_eq!(
        serde_json::to_value(&cfg.validation).unwrap(),
        serde_json::to_value(&d.validation).unwrap()
    );
    assert_eq!(
        serde_json::to_value(&cfg.eval).unwrap(),
        serde_json::to_value(&d.eval).unwrap()
    );
    let over = TrainConfig::load(
        Some(&path),
        &["loss.kind=\"ipo\"".into(), "optim.max_steps=7".into()],
    )
    .unwrap();
    assert_eq!(over.optim.max_steps, 7);
    assert_eq!(over.loss.kind, diffpref::methods::dpo::LossKind::Ipo);
}

#[test]
fn embedded_default_config_points_at_the_shipped_assets() {
    let cfg = diffpref::assets::default_dpo_config(&["optim.max_steps=3".into()]).unwrap();
    cfg.validate().unwrap();
    assert_eq!(cfg.optim.max_steps, 3);
    assert!(std::path::Path::new(&cfg.model)
        .join("model_index.json")
        .exists());
    assert!(cfg.data.manifest.as_ref().unwrap().exists());
    assert!(cfg.eval.prompts.as_ref().unwrap().exists());
    assert!(
        !cfg.data.random_flip,
        "flips would swap left/right captions"
    );
}
