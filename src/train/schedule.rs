//! Learning-rate schedules with the semantics of diffusers' `get_scheduler` (which wraps the `transformers`
//! `get_*_schedule_with_warmup` functions).
//!
//! `step` is the number of optimizer updates already done (0 for the first update), counted in optimizer
//! steps, not micro-batches. With `w = warmup_steps`, `T = total_steps` and `r = min_lr_ratio`, the factor
//! multiplying the base learning rate is:
//!
//! | kind | `step < w` | `step ≥ w` |
//! |---|---|---|
//! | `constant` | 1 (warmup ignored, as diffusers) | 1 |
//! | `constant_with_warmup` | `step / w` | 1 |
//! | `linear` | `step / w` | `r + (1 − r) · max(0, (T − step) / (T − w))` |
//! | `cosine` | `step / w` | `r + (1 − r) · ½(1 + cos(π · p))`, `p = (step − w) / (T − w)` |
//!
//! Denominators are clamped to at least 1 as in diffusers, so the first update of a warmed-up schedule has
//! learning rate 0. With `r = 0` the values are exactly diffusers' (`cosine` is its default `num_cycles = 0.5`).
//! `min_lr_ratio` is the floor of transformers' `cosine_with_min_lr` (`min_lr_rate`), applied to `linear` too.
//! One deviation: past `total_steps` the cosine stays at its floor instead of rising again.

use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};

/// Shape of the schedule; serde names are snake_case (`"constant_with_warmup"`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    #[default]
    Constant,
    ConstantWithWarmup,
    Cosine,
    Linear,
}

/// A learning-rate schedule (see the module docs for the formulas).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LrSchedule {
    pub kind: ScheduleKind,
    pub warmup_steps: u64,
    /// Number of optimizer updates of the whole run (the end of the decay for `linear` and `cosine`).
    pub total_steps: u64,
    /// Floor of the decay as a fraction of the base learning rate, in `[0, 1]`.
    pub min_lr_ratio: f64,
}

impl LrSchedule {
    pub fn constant() -> Self {
        Self::default()
    }

    pub fn new(kind: ScheduleKind, warmup_steps: u64, total_steps: u64) -> Self {
        LrSchedule {
            kind,
            warmup_steps,
            total_steps,
            min_lr_ratio: 0.0,
        }
    }

    /// Checks the settings (`min_lr_ratio` in `[0, 1]`; decaying kinds need `total_steps > 0`).
    pub fn validate(&self) -> Result<()> {
        ensure!(
            (0.0..=1.0).contains(&self.min_lr_ratio),
            "lr schedule: min_lr_ratio must be in [0, 1], got {}",
            self.min_lr_ratio
        );
        if matches!(self.kind, ScheduleKind::Cosine | ScheduleKind::Linear) {
            ensure!(
                self.total_steps > 0,
                "lr schedule: `{}` needs total_steps > 0",
                self.kind_name()
            );
        }
        Ok(())
    }

    fn kind_name(&self) -> &'static str {
        match self.kind {
            ScheduleKind::Constant => "constant",
            ScheduleKind::ConstantWithWarmup => "constant_with_warmup",
            ScheduleKind::Cosine => "cosine",
            ScheduleKind::Linear => "linear",
        }
    }

    /// The multiplier of the base learning rate for update number `step` (0-based).
    pub fn factor(&self, step: u64) -> f64 {
        let w = self.warmup_steps;
        if self.kind == ScheduleKind::Constant {
            return 1.0;
        }
        if step < w {
            return step as f64 / w.max(1) as f64;
        }
        let r = self.min_lr_ratio;
        let span = self.total_steps.saturating_sub(w).max(1) as f64;
        let done = (step - w) as f64;
        match self.kind {
            ScheduleKind::Constant | ScheduleKind::ConstantWithWarmup => 1.0,
            ScheduleKind::Linear => {
                let f = (self.total_steps as f64 - step as f64) / span;
                r + (1.0 - r) * f.max(0.0)
            }
            ScheduleKind::Cosine => {
                let p = (done / span).min(1.0);
                let f = 0.5 * (1.0 + (std::f64::consts::PI * p).cos());
                r + (1.0 - r) * f.max(0.0)
            }
        }
    }

    /// Learning rate for update number `step` (0-based): `base_lr · factor(step)`.
    pub fn lr_at(&self, step: u64, base_lr: f64) -> f64 {
        base_lr * self.factor(step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn values_at_key_steps() {
        let base = 2e-4;
        let c = LrSchedule::new(ScheduleKind::Constant, 10, 100);
        assert!([0, 5, 10, 1000].iter().all(|&s| c.lr_at(s, base) == base));

        let cw = LrSchedule::new(ScheduleKind::ConstantWithWarmup, 10, 100);
        assert_eq!(cw.lr_at(0, base), 0.0);
        assert!(close(cw.lr_at(5, base), base * 0.5));
        assert_eq!(cw.lr_at(10, base), base);
        assert_eq!(cw.lr_at(500, base), base);

        let lin = LrSchedule::new(ScheduleKind::Linear, 10, 110);
        assert_eq!(lin.factor(0), 0.0);
        assert!(close(lin.factor(4), 0.4));
        assert_eq!(lin.factor(10), 1.0);
        assert!(close(lin.factor(60), 0.5));
        assert_eq!(lin.factor(110), 0.0);
        assert_eq!(lin.factor(200), 0.0);

        let cos = LrSchedule::new(ScheduleKind::Cosine, 10, 110);
        assert!(close(cos.factor(5), 0.5));
        assert_eq!(cos.factor(10), 1.0);
        assert!(close(
            cos.factor(35),
            0.5 * (1.0 + (std::f64::consts::PI / 4.0).cos())
        ));
        assert!(close(cos.factor(60), 0.5));
        assert!(cos.factor(110).abs() < 1e-15);
        assert!(cos.factor(150).abs() < 1e-15); // stays at the floor

        // No warmup: the first update already has the full rate.
        assert_eq!(LrSchedule::new(ScheduleKind::Cosine, 0, 50).factor(0), 1.0);
    }

    #[test]
    fn min_lr_ratio_is_a_floor() {
        let s = LrSchedule {
            min_lr_ratio: 0.1,
            ..LrSchedule::new(ScheduleKind::Cosine, 0, 100)
        };
        assert_eq!(s.factor(0), 1.0);
        assert!(close(s.factor(50), 0.1 + 0.9 * 0.5));
        assert!(close(s.factor(100), 0.1));
        assert!(close(s.factor(1000), 0.1));
        let l = LrSchedule {
            min_lr_ratio: 0.2,
            ..LrSchedule::new(ScheduleKind::Linear, 0, 10)
        };
        assert!(close(l.factor(5), 0.6));
        assert!(close(l.factor(20), 0.2));
        // Warmup is not affected by the floor.
        let w = LrSchedule {
            min_lr_ratio: 0.5,
            ..LrSchedule::new(ScheduleKind::Linear, 4, 10)
        };
        assert_eq!(w.factor(0), 0.0);
    }

    #[test]
    fn deserialises_snake_case_and_validates() {
        let s: LrSchedule = serde_json::from_str(
            r#"{"kind":"constant_with_warmup","warmup_steps":500,"total_steps":2000}"#,
        )
        .unwrap();
        assert_eq!(s.kind, ScheduleKind::ConstantWithWarmup);
        assert_eq!(s.min_lr_ratio, 0.0);
        let s: LrSchedule = toml::from_str("kind = \"cosine\"\ntotal_steps = 10").unwrap();
        assert_eq!(s.kind, ScheduleKind::Cosine);
        assert!(s.validate().is_ok());
        let bad = LrSchedule::new(ScheduleKind::Linear, 0, 0);
        assert!(bad.validate().unwrap_err().to_string().contains("linear"));
        let bad = LrSchedule {
            min_lr_ratio: 1.5,
            ..Default::default()
        };
        assert!(bad.validate().is_err());
        assert!(serde_json::from_str::<LrSchedule>(r#"{"kind":"Cosine"}"#).is_err());
    }
}
