//! `scheduler_config.json`: every key of the diffusers 0.42 schedulers implemented here, with diffusers'
//! defaults.
//!
//! One struct serves all scheduler classes, as one JSON file does in diffusers: a config saved by one class can
//! build another (`from_config`), keeping the values it carries. Keys whose default differs between classes
//! (`timestep_spacing`: `leading` for DDIM / DDPM, `linspace` for Euler / Euler ancestral / DPM-Solver;
//! `variance_type`: `fixed_small` for DDPM, none for DPM-Solver) are `Option`s, resolved by the scheduler that
//! is built: a key absent from the file takes that class's default, a key present is inherited (so Euler built
//! from a saved SD1.5 DDIM config runs `leading` spacing, as `EulerDiscreteScheduler.from_config` does).
//!
//! Unknown keys (`_diffusers_version`, `skip_prk_steps`, `flow_shift`, ...) are ignored. Values no diffusers
//! scheduler knows give [`Error::UnsupportedConfig`](crate::Error::UnsupportedConfig) when the file is read;
//! values diffusers knows but this crate does not implement (`thresholding: true`, `use_beta_sigmas`, learned
//! variances, ...) give the same error when a scheduler that would use them is built
//! ([`SchedulerConfig::check_supported`]).
//!
//! Python's `json` writes non-finite floats as bare `Infinity` / `-Infinity` / `NaN` (DPM-Solver's
//! `lambda_min_clipped` is `-Infinity` by default): [`SchedulerConfig::from_json_str`] accepts them.

use super::SchedulerKind;
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::Path;

/// How the betas are laid out over the training timesteps (`beta_schedule`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BetaSchedule {
    /// `linspace(beta_start, beta_end, T)`.
    Linear,
    /// `linspace(sqrt(beta_start), sqrt(beta_end), T)^2` (Stable Diffusion).
    ScaledLinear,
    /// Glide cosine schedule: `beta_i = min(1 - abar((i+1)/T) / abar(i/T), 0.999)`,
    /// `abar(t) = cos((t + 0.008) / 1.008 * pi / 2)^2`.
    SquaredCosCapV2,
}

/// What the denoising model predicts (`prediction_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PredictionType {
    /// The noise `eps`.
    #[default]
    Epsilon,
    /// The velocity `v = sqrt(abar) eps - sqrt(1 - abar) x0`.
    VPrediction,
    /// The clean sample `x0`.
    Sample,
}

/// How inference timesteps are spread over the training range (`timestep_spacing`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimestepSpacing {
    /// `round(linspace(0, T-1, n))` reversed.
    Linspace,
    /// `arange(n) * (T // n)` reversed, plus `steps_offset`.
    Leading,
    /// `round(arange(T, 0, -T/n)) - 1`.
    Trailing,
}

/// DDPM / DPM-Solver `variance_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VarianceType {
    FixedSmall,
    FixedSmallLog,
    FixedLarge,
    FixedLargeLog,
    Learned,
    LearnedRange,
}

/// The last sigma of a sigma schedule (`final_sigmas_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum FinalSigmasType {
    /// 0: the last step lands on the clean sample.
    #[default]
    Zero,
    /// `sqrt((1 - abar_0) / abar_0)`.
    SigmaMin,
}

/// Euler's sigma interpolation (`interpolation_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum InterpolationType {
    #[default]
    Linear,
    LogLinear,
}

/// Euler's `timestep_type`: `continuous` (with v-prediction) feeds the model `0.25 ln(sigma)` instead of `t`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum TimestepType {
    #[default]
    Discrete,
    Continuous,
}

/// DPM-Solver `algorithm_type` (`deis` is mapped to `dpmsolver++`, as diffusers does).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum AlgorithmType {
    DpmSolver,
    #[default]
    DpmSolverPlusPlus,
    SdeDpmSolver,
    SdeDpmSolverPlusPlus,
}

/// DPM-Solver `solver_type` (`logrho` / `bh1` / `bh2` are mapped to `midpoint`, as diffusers does).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SolverType {
    #[default]
    Midpoint,
    Heun,
}

macro_rules! str_enum {
    ($ty:ty, $key:literal, $hint:literal, { $($s:literal => $v:expr),+ $(,)? }, { $($v2:pat => $s2:literal),+ $(,)? }) => {
        impl $ty {
            /// Parses the diffusers spelling; `file` names the config in the error.
            pub fn parse(s: &str, file: &str) -> Result<Self> {
                match s {
                    $($s => Ok($v),)+
                    _ => Err(Error::unsupported(file, $key, format!("{s:?}"), $hint)),
                }
            }
            /// The diffusers spelling.
            pub fn as_str(&self) -> &'static str {
                match self {
                    $($v2 => $s2,)+
                }
            }
        }
        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

str_enum!(BetaSchedule, "beta_schedule", "expected linear, scaled_linear or squaredcos_cap_v2", {
    "linear" => BetaSchedule::Linear,
    "scaled_linear" => BetaSchedule::ScaledLinear,
    "squaredcos_cap_v2" => BetaSchedule::SquaredCosCapV2,
}, {
    BetaSchedule::Linear => "linear",
    BetaSchedule::ScaledLinear => "scaled_linear",
    BetaSchedule::SquaredCosCapV2 => "squaredcos_cap_v2",
});

str_enum!(PredictionType, "prediction_type", "expected epsilon, v_prediction or sample", {
    "epsilon" => PredictionType::Epsilon,
    "v_prediction" => PredictionType::VPrediction,
    "sample" => PredictionType::Sample,
    "original_sample" => PredictionType::Sample,
}, {
    PredictionType::Epsilon => "epsilon",
    PredictionType::VPrediction => "v_prediction",
    PredictionType::Sample => "sample",
});

str_enum!(TimestepSpacing, "timestep_spacing", "expected leading, linspace or trailing", {
    "linspace" => TimestepSpacing::Linspace,
    "leading" => TimestepSpacing::Leading,
    "trailing" => TimestepSpacing::Trailing,
}, {
    TimestepSpacing::Linspace => "linspace",
    TimestepSpacing::Leading => "leading",
    TimestepSpacing::Trailing => "trailing",
});

str_enum!(VarianceType, "variance_type", "expected fixed_small, fixed_small_log, fixed_large, fixed_large_log, learned or learned_range", {
    "fixed_small" => VarianceType::FixedSmall,
    "fixed_small_log" => VarianceType::FixedSmallLog,
    "fixed_large" => VarianceType::FixedLarge,
    "fixed_large_log" => VarianceType::FixedLargeLog,
    "learned" => VarianceType::Learned,
    "learned_range" => VarianceType::LearnedRange,
}, {
    VarianceType::FixedSmall => "fixed_small",
    VarianceType::FixedSmallLog => "fixed_small_log",
    VarianceType::FixedLarge => "fixed_large",
    VarianceType::FixedLargeLog => "fixed_large_log",
    VarianceType::Learned => "learned",
    VarianceType::LearnedRange => "learned_range",
});

str_enum!(FinalSigmasType, "final_sigmas_type", "expected zero or sigma_min", {
    "zero" => FinalSigmasType::Zero,
    "sigma_min" => FinalSigmasType::SigmaMin,
}, {
    FinalSigmasType::Zero => "zero",
    FinalSigmasType::SigmaMin => "sigma_min",
});

str_enum!(InterpolationType, "interpolation_type", "expected linear or log_linear", {
    "linear" => InterpolationType::Linear,
    "log_linear" => InterpolationType::LogLinear,
}, {
    InterpolationType::Linear => "linear",
    InterpolationType::LogLinear => "log_linear",
});

str_enum!(TimestepType, "timestep_type", "expected discrete or continuous", {
    "discrete" => TimestepType::Discrete,
    "continuous" => TimestepType::Continuous,
}, {
    TimestepType::Discrete => "discrete",
    TimestepType::Continuous => "continuous",
});

str_enum!(AlgorithmType, "algorithm_type", "expected dpmsolver++, sde-dpmsolver++, dpmsolver or sde-dpmsolver", {
    "dpmsolver" => AlgorithmType::DpmSolver,
    "dpmsolver++" => AlgorithmType::DpmSolverPlusPlus,
    "deis" => AlgorithmType::DpmSolverPlusPlus,
    "sde-dpmsolver" => AlgorithmType::SdeDpmSolver,
    "sde-dpmsolver++" => AlgorithmType::SdeDpmSolverPlusPlus,
}, {
    AlgorithmType::DpmSolver => "dpmsolver",
    AlgorithmType::DpmSolverPlusPlus => "dpmsolver++",
    AlgorithmType::SdeDpmSolver => "sde-dpmsolver",
    AlgorithmType::SdeDpmSolverPlusPlus => "sde-dpmsolver++",
});

str_enum!(SolverType, "solver_type", "expected midpoint or heun", {
    "midpoint" => SolverType::Midpoint,
    "heun" => SolverType::Heun,
    "logrho" => SolverType::Midpoint,
    "bh1" => SolverType::Midpoint,
    "bh2" => SolverType::Midpoint,
}, {
    SolverType::Midpoint => "midpoint",
    SolverType::Heun => "heun",
});

/// A diffusers scheduler config (the union of the keys of DDIM, DDPM, Euler, Euler ancestral and
/// DPM-Solver multistep), typed. Defaults are diffusers' constructor defaults (NOT Stable Diffusion's: see
/// [`SchedulerConfig::sd15`]).
///
/// Serde: deserialising goes through the diffusers JSON spelling (strings for the enums, `null`s allowed)
/// and fails with the [`Error::UnsupportedConfig`] message on an unknown value; serialising writes that
/// spelling back. Prefer [`SchedulerConfig::from_file`] / [`SchedulerConfig::from_json_str`], which return
/// the typed error and accept Python's bare `-Infinity`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawSchedulerConfig", into = "RawSchedulerConfig")]
pub struct SchedulerConfig {
    /// `_class_name` (e.g. `DDIMScheduler`), if the file names one.
    pub class_name: Option<String>,
    /// `num_train_timesteps` (1000).
    pub num_train_timesteps: usize,
    /// `beta_start` (0.0001).
    pub beta_start: f64,
    /// `beta_end` (0.02).
    pub beta_end: f64,
    /// `beta_schedule` (linear).
    pub beta_schedule: BetaSchedule,
    /// `trained_betas`: explicit betas, overriding the schedule (null).
    pub trained_betas: Option<Vec<f64>>,
    /// `prediction_type` (epsilon).
    pub prediction_type: PredictionType,
    /// `timestep_spacing`; `None` = the class default (leading: DDIM, DDPM; linspace: the others).
    pub timestep_spacing: Option<TimestepSpacing>,
    /// `steps_offset` (0; SD uses 1). Added to `leading` timesteps only.
    pub steps_offset: usize,
    /// DDIM `set_alpha_to_one` (true): `abar_prev` of the last step is 1 instead of `abar_0`.
    pub set_alpha_to_one: bool,
    /// DDIM / DDPM `clip_sample` (true; SD uses false): clamp the predicted x0 to `clip_sample_range`.
    pub clip_sample: bool,
    /// `clip_sample_range` (1.0).
    pub clip_sample_range: f64,
    /// `thresholding` (false; true is unsupported here).
    pub thresholding: bool,
    /// `dynamic_thresholding_ratio` (0.995; only with `thresholding`).
    pub dynamic_thresholding_ratio: f64,
    /// `sample_max_value` (1.0; only with `thresholding`).
    pub sample_max_value: f64,
    /// `rescale_betas_zero_snr` (false): rescale the betas to zero terminal SNR (Lin et al. 2023, Alg. 1).
    pub rescale_betas_zero_snr: bool,
    /// `variance_type`; `None` = the class default (DDPM: fixed_small).
    pub variance_type: Option<VarianceType>,
    /// Euler / DPM `use_karras_sigmas` (false): Karras et al. rho = 7 sigma spacing.
    pub use_karras_sigmas: bool,
    /// Euler / DPM `use_exponential_sigmas` (false): log-uniform sigmas.
    pub use_exponential_sigmas: bool,
    /// Euler / DPM `use_beta_sigmas` (false; true is unsupported here).
    pub use_beta_sigmas: bool,
    /// DPM `use_lu_lambdas` (false; true is unsupported here).
    pub use_lu_lambdas: bool,
    /// DPM `use_flow_sigmas` (false; true is unsupported here).
    pub use_flow_sigmas: bool,
    /// Euler `sigma_min` (null = from the schedule; Karras / exponential sigmas only).
    pub sigma_min: Option<f64>,
    /// Euler `sigma_max` (null = from the schedule; Karras / exponential sigmas only).
    pub sigma_max: Option<f64>,
    /// Euler / DPM `final_sigmas_type` (zero).
    pub final_sigmas_type: FinalSigmasType,
    /// Euler `interpolation_type` (linear).
    pub interpolation_type: InterpolationType,
    /// Euler `timestep_type` (discrete).
    pub timestep_type: TimestepType,
    /// DPM `solver_order` (2).
    pub solver_order: usize,
    /// DPM `algorithm_type` (dpmsolver++).
    pub algorithm_type: AlgorithmType,
    /// DPM `solver_type` (midpoint).
    pub solver_type: SolverType,
    /// DPM `lower_order_final` (true): first-order final step(s) below 15 steps.
    pub lower_order_final: bool,
    /// DPM `euler_at_final` (false): first-order last step always.
    pub euler_at_final: bool,
    /// DPM `lambda_min_clipped` (-inf): clip the high-noise end of the schedule where `lambda_t` is below it.
    pub lambda_min_clipped: f64,
    /// Where the config came from (for error messages); not serialised.
    pub source: String,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            class_name: None,
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: None,
            steps_offset: 0,
            set_alpha_to_one: true,
            clip_sample: true,
            clip_sample_range: 1.0,
            thresholding: false,
            dynamic_thresholding_ratio: 0.995,
            sample_max_value: 1.0,
            rescale_betas_zero_snr: false,
            variance_type: None,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            use_lu_lambdas: false,
            use_flow_sigmas: false,
            sigma_min: None,
            sigma_max: None,
            final_sigmas_type: FinalSigmasType::Zero,
            interpolation_type: InterpolationType::Linear,
            timestep_type: TimestepType::Discrete,
            solver_order: 2,
            algorithm_type: AlgorithmType::DpmSolverPlusPlus,
            solver_type: SolverType::Midpoint,
            lower_order_final: true,
            euler_at_final: false,
            lambda_min_clipped: f64::NEG_INFINITY,
            source: "scheduler_config".into(),
        }
    }
}

impl SchedulerConfig {
    /// The Stable Diffusion 1.x DDIM config (what the SD1.5 pipelines and the goldens use): 1000 steps,
    /// scaled_linear 0.00085..0.012, `leading` spacing, `steps_offset` 1, `set_alpha_to_one` false,
    /// `clip_sample` false, epsilon.
    pub fn sd15() -> Self {
        SchedulerConfig {
            class_name: Some("DDIMScheduler".into()),
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            timestep_spacing: Some(TimestepSpacing::Leading),
            steps_offset: 1,
            set_alpha_to_one: false,
            clip_sample: false,
            source: "SD1.5 DDIM config (built in)".into(),
            ..Default::default()
        }
    }

    /// Reads `scheduler_config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_str(&text, &path.display().to_string())
    }

    /// Parses a config from JSON text (`source` names it in errors). Accepts Python's bare `Infinity`,
    /// `-Infinity` and `NaN`.
    pub fn from_json_str(text: &str, source: &str) -> Result<Self> {
        let clean = quote_nonfinite(text);
        let raw: RawSchedulerConfig = serde_json::from_str(&clean).map_err(|e| Error::Invalid {
            file: source.to_string(),
            msg: format!("invalid scheduler config JSON: {e}"),
        })?;
        raw.into_config(source)
    }

    /// The timestep spacing `kind` runs with: the config's value, else that class's diffusers default.
    pub fn spacing_for(&self, kind: SchedulerKind) -> TimestepSpacing {
        self.timestep_spacing.unwrap_or(match kind {
            SchedulerKind::Ddim | SchedulerKind::Ddpm => TimestepSpacing::Leading,
            SchedulerKind::Euler | SchedulerKind::EulerAncestral | SchedulerKind::DpmPp2m => {
                TimestepSpacing::Linspace
            }
        })
    }

    /// A copy with `timestep_spacing` set.
    pub fn with_spacing(mut self, spacing: TimestepSpacing) -> Self {
        self.timestep_spacing = Some(spacing);
        self
    }

    fn unsupported(&self, key: &str, value: impl std::fmt::Display, hint: &str) -> Error {
        Error::unsupported(self.source.clone(), key, value, hint)
    }

    /// Errors on values diffusers accepts for `kind` but this crate does not implement. Keys the class does
    /// not have are ignored, as diffusers' `from_config` ignores them.
    pub fn check_supported(&self, kind: SchedulerKind) -> Result<()> {
        if let Some(b) = &self.trained_betas {
            if b.len() != self.num_train_timesteps {
                return Err(Error::Invalid {
                    file: self.source.clone(),
                    msg: format!(
                        "`trained_betas` has {} entries, `num_train_timesteps` is {}",
                        b.len(),
                        self.num_train_timesteps
                    ),
                });
            }
        }
        let betas_ok = |b: f64| b.is_finite() && b > 0.0 && b < 1.0;
        if self.trained_betas.is_none() && !(betas_ok(self.beta_start) && betas_ok(self.beta_end)) {
            return Err(Error::Invalid {
                file: self.source.clone(),
                msg: format!(
                    "`beta_start` {} and `beta_end` {} must lie in (0, 1) (a noise variance per step)",
                    self.beta_start, self.beta_end
                ),
            });
        }
        if let Some(i) = self.trained_betas.as_ref().and_then(|b| {
            b.iter()
                .position(|&x| !(x.is_finite() && (0.0..1.0).contains(&x)))
        }) {
            return Err(Error::Invalid {
                file: self.source.clone(),
                msg: format!(
                    "`trained_betas`[{i}] = {} must lie in [0, 1)",
                    self.trained_betas.as_ref().unwrap()[i]
                ),
            });
        }
        if self.num_train_timesteps < 2 {
            return Err(self.unsupported(
                "num_train_timesteps",
                self.num_train_timesteps,
                "need at least 2",
            ));
        }
        let sigma_based = matches!(kind, SchedulerKind::Euler | SchedulerKind::DpmPp2m);
        if matches!(
            kind,
            SchedulerKind::Ddim | SchedulerKind::Ddpm | SchedulerKind::DpmPp2m
        ) && self.thresholding
        {
            return Err(self.unsupported(
                "thresholding",
                true,
                "dynamic thresholding is not implemented",
            ));
        }
        if sigma_based {
            if self.use_beta_sigmas {
                return Err(self.unsupported(
                    "use_beta_sigmas",
                    true,
                    "beta sigmas are not implemented",
                ));
            }
            let n = [self.use_karras_sigmas, self.use_exponential_sigmas]
                .iter()
                .filter(|b| **b)
                .count();
            if n > 1 {
                return Err(self.unsupported(
                    "use_karras_sigmas",
                    true,
                    "only one of use_karras_sigmas / use_exponential_sigmas / use_beta_sigmas may be set",
                ));
            }
        }
        match kind {
            SchedulerKind::Ddpm => match self.variance_type {
                None
                | Some(
                    VarianceType::FixedSmall
                    | VarianceType::FixedSmallLog
                    | VarianceType::FixedLarge,
                ) => {}
                Some(v) => {
                    return Err(self.unsupported(
                        "variance_type",
                        v,
                        "DDPM supports fixed_small, fixed_small_log and fixed_large",
                    ))
                }
            },
            SchedulerKind::Euler => {
                if self.interpolation_type == InterpolationType::LogLinear {
                    return Err(self.unsupported(
                        "interpolation_type",
                        "log_linear",
                        "only linear is implemented",
                    ));
                }
            }
            SchedulerKind::DpmPp2m => {
                if matches!(
                    self.algorithm_type,
                    AlgorithmType::DpmSolver | AlgorithmType::SdeDpmSolver
                ) {
                    return Err(self.unsupported(
                        "algorithm_type",
                        self.algorithm_type,
                        "only dpmsolver++ and sde-dpmsolver++ are implemented",
                    ));
                }
                if !(1..=3).contains(&self.solver_order) {
                    return Err(self.unsupported(
                        "solver_order",
                        self.solver_order,
                        "expected 1, 2 or 3",
                    ));
                }
                if self.use_lu_lambdas {
                    return Err(self.unsupported(
                        "use_lu_lambdas",
                        true,
                        "Lu lambdas are not implemented",
                    ));
                }
                if self.use_flow_sigmas {
                    return Err(self.unsupported(
                        "use_flow_sigmas",
                        true,
                        "flow sigmas are not implemented",
                    ));
                }
                if let Some(v) = self.variance_type {
                    return Err(self.unsupported(
                        "variance_type",
                        v,
                        "learned variances (extra model output channels) are not implemented",
                    ));
                }
            }
            SchedulerKind::Ddim | SchedulerKind::EulerAncestral => {}
        }
        Ok(())
    }
}

/// The JSON spelling of [`SchedulerConfig`]: everything optional, enums as strings.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct RawSchedulerConfig {
    #[serde(
        rename = "_class_name",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    class_name: Option<String>,
    #[serde(default)]
    num_train_timesteps: Option<usize>,
    #[serde(default)]
    beta_start: Option<f64>,
    #[serde(default)]
    beta_end: Option<f64>,
    #[serde(default)]
    beta_schedule: Option<String>,
    #[serde(default)]
    trained_betas: Option<Vec<f64>>,
    #[serde(default)]
    prediction_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    timestep_spacing: Option<String>,
    #[serde(default)]
    steps_offset: Option<usize>,
    #[serde(default)]
    set_alpha_to_one: Option<bool>,
    #[serde(default)]
    clip_sample: Option<bool>,
    #[serde(default)]
    clip_sample_range: Option<f64>,
    #[serde(default)]
    thresholding: Option<bool>,
    #[serde(default)]
    dynamic_thresholding_ratio: Option<f64>,
    #[serde(default)]
    sample_max_value: Option<f64>,
    #[serde(default)]
    rescale_betas_zero_snr: Option<bool>,
    #[serde(default)]
    variance_type: Option<String>,
    #[serde(default)]
    use_karras_sigmas: Option<bool>,
    #[serde(default)]
    use_exponential_sigmas: Option<bool>,
    #[serde(default)]
    use_beta_sigmas: Option<bool>,
    #[serde(default)]
    use_lu_lambdas: Option<bool>,
    #[serde(default)]
    use_flow_sigmas: Option<bool>,
    #[serde(default)]
    sigma_min: Option<f64>,
    #[serde(default)]
    sigma_max: Option<f64>,
    #[serde(default)]
    final_sigmas_type: Option<String>,
    #[serde(default)]
    interpolation_type: Option<String>,
    #[serde(default)]
    timestep_type: Option<String>,
    #[serde(default)]
    solver_order: Option<usize>,
    #[serde(default)]
    algorithm_type: Option<String>,
    #[serde(default)]
    solver_type: Option<String>,
    #[serde(default)]
    lower_order_final: Option<bool>,
    #[serde(default)]
    euler_at_final: Option<bool>,
    /// A number, or a string for non-finite values ("-Infinity"); null / absent = -inf.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lambda_min_clipped: Option<Value>,
}

impl RawSchedulerConfig {
    fn into_config(self, file: &str) -> Result<SchedulerConfig> {
        let d = SchedulerConfig::default();
        let lambda_min_clipped = match &self.lambda_min_clipped {
            None | Some(Value::Null) => d.lambda_min_clipped,
            Some(Value::Number(n)) => n.as_f64().unwrap_or(f64::NEG_INFINITY),
            Some(Value::String(s)) => match s.as_str() {
                "-Infinity" | "-inf" => f64::NEG_INFINITY,
                "Infinity" | "inf" => f64::INFINITY,
                other => other.parse::<f64>().map_err(|_| {
                    Error::unsupported(
                        file,
                        "lambda_min_clipped",
                        format!("{other:?}"),
                        "expected a number",
                    )
                })?,
            },
            Some(v) => {
                return Err(Error::unsupported(
                    file,
                    "lambda_min_clipped",
                    v,
                    "expected a number",
                ))
            }
        };
        Ok(SchedulerConfig {
            class_name: self.class_name,
            num_train_timesteps: self.num_train_timesteps.unwrap_or(d.num_train_timesteps),
            beta_start: self.beta_start.unwrap_or(d.beta_start),
            beta_end: self.beta_end.unwrap_or(d.beta_end),
            beta_schedule: match &self.beta_schedule {
                Some(s) => BetaSchedule::parse(s, file)?,
                None => d.beta_schedule,
            },
            trained_betas: self.trained_betas,
            prediction_type: match &self.prediction_type {
                Some(s) => PredictionType::parse(s, file)?,
                None => d.prediction_type,
            },
            timestep_spacing: self
                .timestep_spacing
                .as_deref()
                .map(|s| TimestepSpacing::parse(s, file))
                .transpose()?,
            steps_offset: self.steps_offset.unwrap_or(d.steps_offset),
            set_alpha_to_one: self.set_alpha_to_one.unwrap_or(d.set_alpha_to_one),
            clip_sample: self.clip_sample.unwrap_or(d.clip_sample),
            clip_sample_range: self.clip_sample_range.unwrap_or(d.clip_sample_range),
            thresholding: self.thresholding.unwrap_or(d.thresholding),
            dynamic_thresholding_ratio: self
                .dynamic_thresholding_ratio
                .unwrap_or(d.dynamic_thresholding_ratio),
            sample_max_value: self.sample_max_value.unwrap_or(d.sample_max_value),
            rescale_betas_zero_snr: self
                .rescale_betas_zero_snr
                .unwrap_or(d.rescale_betas_zero_snr),
            variance_type: self
                .variance_type
                .as_deref()
                .map(|s| VarianceType::parse(s, file))
                .transpose()?,
            use_karras_sigmas: self.use_karras_sigmas.unwrap_or(false),
            use_exponential_sigmas: self.use_exponential_sigmas.unwrap_or(false),
            use_beta_sigmas: self.use_beta_sigmas.unwrap_or(false),
            use_lu_lambdas: self.use_lu_lambdas.unwrap_or(false),
            use_flow_sigmas: self.use_flow_sigmas.unwrap_or(false),
            sigma_min: self.sigma_min,
            sigma_max: self.sigma_max,
            final_sigmas_type: match &self.final_sigmas_type {
                Some(s) => FinalSigmasType::parse(s, file)?,
                None => d.final_sigmas_type,
            },
            interpolation_type: match &self.interpolation_type {
                Some(s) => InterpolationType::parse(s, file)?,
                None => d.interpolation_type,
            },
            timestep_type: match &self.timestep_type {
                Some(s) => TimestepType::parse(s, file)?,
                None => d.timestep_type,
            },
            solver_order: self.solver_order.unwrap_or(d.solver_order),
            algorithm_type: match &self.algorithm_type {
                Some(s) => AlgorithmType::parse(s, file)?,
                None => d.algorithm_type,
            },
            solver_type: match &self.solver_type {
                Some(s) => SolverType::parse(s, file)?,
                None => d.solver_type,
            },
            lower_order_final: self.lower_order_final.unwrap_or(d.lower_order_final),
            euler_at_final: self.euler_at_final.unwrap_or(d.euler_at_final),
            lambda_min_clipped,
            source: file.to_string(),
        })
    }
}

impl TryFrom<RawSchedulerConfig> for SchedulerConfig {
    type Error = Error;
    fn try_from(raw: RawSchedulerConfig) -> Result<Self> {
        raw.into_config("scheduler_config")
    }
}

impl From<SchedulerConfig> for RawSchedulerConfig {
    fn from(c: SchedulerConfig) -> Self {
        RawSchedulerConfig {
            class_name: c.class_name,
            num_train_timesteps: Some(c.num_train_timesteps),
            beta_start: Some(c.beta_start),
            beta_end: Some(c.beta_end),
            beta_schedule: Some(c.beta_schedule.as_str().into()),
            trained_betas: c.trained_betas,
            prediction_type: Some(c.prediction_type.as_str().into()),
            timestep_spacing: c.timestep_spacing.map(|s| s.as_str().into()),
            steps_offset: Some(c.steps_offset),
            set_alpha_to_one: Some(c.set_alpha_to_one),
            clip_sample: Some(c.clip_sample),
            clip_sample_range: Some(c.clip_sample_range),
            thresholding: Some(c.thresholding),
            dynamic_thresholding_ratio: Some(c.dynamic_thresholding_ratio),
            sample_max_value: Some(c.sample_max_value),
            rescale_betas_zero_snr: Some(c.rescale_betas_zero_snr),
            variance_type: c.variance_type.map(|v| v.as_str().into()),
            use_karras_sigmas: Some(c.use_karras_sigmas),
            use_exponential_sigmas: Some(c.use_exponential_sigmas),
            use_beta_sigmas: Some(c.use_beta_sigmas),
            use_lu_lambdas: Some(c.use_lu_lambdas),
            use_flow_sigmas: Some(c.use_flow_sigmas),
            sigma_min: c.sigma_min,
            sigma_max: c.sigma_max,
            final_sigmas_type: Some(c.final_sigmas_type.as_str().into()),
            interpolation_type: Some(c.interpolation_type.as_str().into()),
            timestep_type: Some(c.timestep_type.as_str().into()),
            solver_order: Some(c.solver_order),
            algorithm_type: Some(c.algorithm_type.as_str().into()),
            solver_type: Some(c.solver_type.as_str().into()),
            lower_order_final: Some(c.lower_order_final),
            euler_at_final: Some(c.euler_at_final),
            lambda_min_clipped: if c.lambda_min_clipped.is_finite() {
                serde_json::Number::from_f64(c.lambda_min_clipped).map(Value::Number)
            } else if c.lambda_min_clipped == f64::NEG_INFINITY {
                None
            } else {
                Some(Value::String(c.lambda_min_clipped.to_string()))
            },
        }
    }
}

/// Quotes Python's bare non-finite float tokens (`NaN`, `Infinity`, `-Infinity`) outside string literals so
/// that strict JSON parsers accept the text.
fn quote_nonfinite(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 16);
    let mut in_str = false;
    let mut escaped = false;
    let mut i = 0;
    let bytes = text.as_bytes();
    while i < bytes.len() {
        let c = bytes[i];
        if in_str {
            if escaped {
                escaped = false;
            } else if c == b'\\' {
                escaped = true;
            } else if c == b'"' {
                in_str = false;
            }
        } else if c == b'"' {
            in_str = true;
        } else {
            let rest = &text[i..];
            let token = ["-Infinity", "Infinity", "NaN"]
                .into_iter()
                .find(|t| rest.starts_with(t));
            if let Some(t) = token {
                out.push('"');
                out.push_str(t);
                out.push('"');
                i += t.len();
                continue;
            }
        }
        // Copy one full UTF-8 character.
        let ch_len = text[i..].chars().next().map(|c| c.len_utf8()).unwrap_or(1);
        out.push_str(&text[i..i + ch_len]);
        i += ch_len;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonfinite_tokens_are_quoted() {
        let s = r#"{"a": -Infinity, "b": "x -Infinity NaN", "c": NaN}"#;
        assert_eq!(
            quote_nonfinite(s),
            r#"{"a": "-Infinity", "b": "x -Infinity NaN", "c": "NaN"}"#
        );
    }
}
