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
    let over = TrainConfig::load(
        Some(&path),
        &["loss.kind=\"ipo\"".into(), "optim.max_steps=7".into()],
    )
    .unwrap();
    assert_eq!(over.optim.max_steps, 7);
    assert_eq!(over.loss.kind, diffpref::methods::dpo::LossKind::Ipo);
}
