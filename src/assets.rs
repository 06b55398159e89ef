//! The embedded default: the shapes world shipped in `assets/` (the pretrained `tiny-shapes` model, the demo
//! preference set, the held-out prompts) and the training configurations that `diffpref train dpo`,
//! `diffpref train grpo` and `diffpref bench align` use when given none.
//!
//! The assets folder is found, in order, at `$DIFFPREF_ASSETS`, at `./assets` (running from a checkout), and
//! at the `assets/` of the checkout the binary was built from.

use crate::methods::adjoint::AdjointConfig;
use crate::methods::grpo::GrpoConfig;
use crate::methods::lpo::LpoConfig;
use crate::methods::lrm::LrmConfig;
use crate::methods::pairwise::DpoConfig;
use crate::methods::seppo::SeppoConfig;
use crate::methods::spm::SpmConfig;
use crate::methods::spo::SpoConfig;
use anyhow::{bail, Result};
use std::path::{Path, PathBuf};

/// The default DPO configuration (paths relative to the checkout root, `assets/...`).
pub const DEFAULT_DPO_TOML: &str = include_str!("../assets/shapes/dpo.toml");

/// Where the default DPO configuration lives in a checkout (for messages).
pub const DEFAULT_DPO_PATH: &str = "assets/shapes/dpo.toml";

/// The default GRPO configuration (paths relative to the checkout root, `assets/...`).
pub const DEFAULT_GRPO_TOML: &str = include_str!("../assets/shapes/grpo.toml");

/// Where the default GRPO configuration lives in a checkout (for messages).
pub const DEFAULT_GRPO_PATH: &str = "assets/shapes/grpo.toml";

/// The default Adjoint Matching configuration (paths relative to the checkout root, `assets/...`).
pub const DEFAULT_ADJOINT_TOML: &str = include_str!("../assets/shapes/adjoint.toml");

/// Where the default Adjoint Matching configuration lives in a checkout (for messages).
pub const DEFAULT_ADJOINT_PATH: &str = "assets/shapes/adjoint.toml";

/// The default LRM configuration (paths relative to the checkout root, `assets/...`).
pub const DEFAULT_LRM_TOML: &str = include_str!("../assets/shapes/lrm.toml");

/// Where the default LRM configuration lives in a checkout (for messages).
pub const DEFAULT_LRM_PATH: &str = "assets/shapes/lrm.toml";

/// The default SPM configuration (paths relative to the checkout root, `assets/...`).
pub const DEFAULT_SPM_TOML: &str = include_str!("../assets/shapes/spm.toml");

/// Where the default SPM configuration lives in a checkout (for messages).
pub const DEFAULT_SPM_PATH: &str = "assets/shapes/spm.toml";

/// The default SPO configuration (paths relative to the checkout root, `assets/...`).
pub const DEFAULT_SPO_TOML: &str = include_str!("../assets/shapes/spo.toml");

/// Where the default SPO configuration lives in a checkout (for messages).
pub const DEFAULT_SPO_PATH: &str = "assets/shapes/spo.toml";

/// The default LPO configuration (paths relative to the checkout root, `assets/...`).
pub const DEFAULT_LPO_TOML: &str = include_str!("../assets/shapes/lpo.toml");

/// Where the default LPO configuration lives in a checkout (for messages).
pub const DEFAULT_LPO_PATH: &str = "assets/shapes/lpo.toml";

/// The default SePPO configuration (paths relative to the checkout root, `assets/...`).
pub const DEFAULT_SEPPO_TOML: &str = include_str!("../assets/shapes/seppo.toml");

/// Where the default SePPO configuration lives in a checkout (for messages).
pub const DEFAULT_SEPPO_PATH: &str = "assets/shapes/seppo.toml";

/// The assets folder (see the module documentation).
pub fn assets_dir() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("DIFFPREF_ASSETS") {
        let d = PathBuf::from(d);
        if !d.join("tiny-shapes").is_dir() {
            bail!(
                "DIFFPREF_ASSETS={}: no tiny-shapes/ model folder there",
                d.display()
            );
        }
        return Ok(d);
    }
    let candidates = [
        PathBuf::from("assets"),
        Path::new(env!("CARGO_MANIFEST_DIR")).join("assets"),
    ];
    for d in candidates {
        if d.join("tiny-shapes").is_dir() {
            return Ok(d);
        }
    }
    bail!(
        "cannot find the embedded shapes-world assets (assets/tiny-shapes): run diffpref from its checkout, or \
         set DIFFPREF_ASSETS to the assets folder"
    )
}

/// `assets/...` paths of the default configuration, resolved against [`assets_dir`].
fn resolve(path: &str, assets: &Path) -> String {
    match path.strip_prefix("assets/") {
        Some(rest) => assets.join(rest).display().to_string(),
        None => path.to_string(),
    }
}

/// The default DPO run on the shapes world with `overrides` applied (`--set key=value`); its `assets/` paths
/// point at [`assets_dir`].
pub fn default_dpo_config(overrides: &[String]) -> Result<DpoConfig> {
    let mut cfg = DpoConfig::from_toml(DEFAULT_DPO_TOML, DEFAULT_DPO_PATH, overrides)?;
    let assets = assets_dir()?;
    resolve_run(&mut cfg.run, &assets);
    resolve_path(&mut cfg.data.manifest, &assets);
    Ok(cfg)
}

/// The default GRPO run on the shapes world with `overrides` applied (`--set key=value`); its `assets/` paths
/// point at [`assets_dir`].
pub fn default_grpo_config(overrides: &[String]) -> Result<GrpoConfig> {
    let mut cfg = GrpoConfig::from_toml(DEFAULT_GRPO_TOML, DEFAULT_GRPO_PATH, overrides)?;
    let assets = assets_dir()?;
    resolve_run(&mut cfg.run, &assets);
    resolve_path(&mut cfg.grpo.prompts, &assets);
    Ok(cfg)
}

/// The default Adjoint Matching run on the shapes world with `overrides` applied; its `assets/` paths point at
/// [`assets_dir`].
pub fn default_adjoint_config(overrides: &[String]) -> Result<AdjointConfig> {
    let mut cfg = AdjointConfig::from_toml(DEFAULT_ADJOINT_TOML, DEFAULT_ADJOINT_PATH, overrides)?;
    let assets = assets_dir()?;
    resolve_run(&mut cfg.run, &assets);
    resolve_path(&mut cfg.adjoint.prompts, &assets);
    Ok(cfg)
}

/// The default SPM run on the shapes world with `overrides` applied; its `assets/` paths point at
/// [`assets_dir`].
pub fn default_spm_config(overrides: &[String]) -> Result<SpmConfig> {
    let mut cfg = SpmConfig::from_toml(DEFAULT_SPM_TOML, DEFAULT_SPM_PATH, overrides)?;
    let assets = assets_dir()?;
    cfg.model = resolve(&cfg.model, &assets);
    resolve_path(&mut cfg.data.manifest, &assets);
    resolve_path(&mut cfg.eval.manifest, &assets);
    resolve_path(&mut cfg.spm.clip, &assets);
    if let Some(p) = &mut cfg.pairs {
        resolve_path(&mut p.prompts, &assets);
    }
    if let Some(p) = &mut cfg.eval.make {
        resolve_path(&mut p.prompts, &assets);
    }
    Ok(cfg)
}

/// The default LRM run on the shapes world with `overrides` applied; its `assets/` paths point at
/// [`assets_dir`].
pub fn default_lrm_config(overrides: &[String]) -> Result<LrmConfig> {
    let mut cfg = LrmConfig::from_toml(DEFAULT_LRM_TOML, DEFAULT_LRM_PATH, overrides)?;
    let assets = assets_dir()?;
    cfg.model = resolve(&cfg.model, &assets);
    resolve_path(&mut cfg.data.manifest, &assets);
    resolve_path(&mut cfg.eval.manifest, &assets);
    if let Some(p) = &mut cfg.pairs {
        resolve_path(&mut p.prompts, &assets);
    }
    if let Some(p) = &mut cfg.eval.make {
        resolve_path(&mut p.prompts, &assets);
    }
    Ok(cfg)
}

/// The default LPO run on the shapes world with `overrides` applied; its `assets/` paths point at
/// [`assets_dir`] (the LRM, `runs/lrm-shapes/lrm`, is relative to the working directory, where `train lrm`
/// writes it).
pub fn default_lpo_config(overrides: &[String]) -> Result<LpoConfig> {
    let mut cfg = LpoConfig::from_toml(DEFAULT_LPO_TOML, DEFAULT_LPO_PATH, overrides)?;
    let assets = assets_dir()?;
    resolve_run(&mut cfg.run, &assets);
    resolve_path(&mut cfg.lpo.prompts, &assets);
    resolve_path(&mut cfg.lpo.lrm, &assets);
    Ok(cfg)
}

/// The default SPO run on the shapes world with `overrides` applied; its `assets/` paths point at
/// [`assets_dir`] (the SPM it names, `runs/spm-shapes/spm`, is relative to the working directory).
pub fn default_spo_config(overrides: &[String]) -> Result<SpoConfig> {
    let mut cfg = SpoConfig::from_toml(DEFAULT_SPO_TOML, DEFAULT_SPO_PATH, overrides)?;
    let assets = assets_dir()?;
    resolve_run(&mut cfg.run, &assets);
    resolve_path(&mut cfg.spo.prompts, &assets);
    resolve_path(&mut cfg.spo.spm, &assets);
    Ok(cfg)
}

/// The default SePPO run on the shapes world with `overrides` applied; its `assets/` paths point at
/// [`assets_dir`].
pub fn default_seppo_config(overrides: &[String]) -> Result<SeppoConfig> {
    let mut cfg = SeppoConfig::from_toml(DEFAULT_SEPPO_TOML, DEFAULT_SEPPO_PATH, overrides)?;
    let assets = assets_dir()?;
    resolve_run(&mut cfg.run, &assets);
    resolve_path(&mut cfg.data.manifest, &assets);
    resolve_path(&mut cfg.seppo.prompts, &assets);
    Ok(cfg)
}

/// An optional `assets/...` path resolved against `assets`.
fn resolve_path(p: &mut Option<PathBuf>, assets: &Path) {
    if let Some(x) = p {
        *x = resolve(&x.display().to_string(), assets).into();
    }
}

/// The model and the held-out prompts of a default run.
fn resolve_run(run: &mut crate::engine::RunConfig, assets: &Path) {
    run.model = resolve(&run.model, assets);
    resolve_path(&mut run.eval.prompts, assets);
}
