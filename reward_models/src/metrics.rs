//! Evaluation helpers: agreement of a reward with human preference pairs.

/// The Wilson score interval for `successes` out of `n` at normal quantile `z` (1.959964 for 95%):
/// `(centre ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)`. `(0, 1)` when `n` is 0.
pub fn wilson_interval(successes: f64, n: f64, z: f64) -> (f64, f64) {
    if n <= 0.0 {
        return (0.0, 1.0);
    }
    let p = successes / n;
    let z2 = z * z;
    let denom = 1.0 + z2 / n;
    let centre = (p + z2 / (2.0 * n)) / denom;
    let half = z * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt() / denom;
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

/// z for a two-sided 95% interval.
pub const Z95: f64 = 1.959_963_984_540_054;

/// The 0.975 quantile of Student's t distribution with `df` degrees of freedom (the half-width factor of a
/// two-sided 95% interval): tabulated for df ≤ 6, else the Cornish–Fisher expansion in 1/df around the normal
/// quantile (Abramowitz & Stegun 26.7.5; error < 5e-5 from df = 7).
pub fn t975(df: usize) -> f64 {
    match df {
        0 => f64::INFINITY,
        1 => 12.706_204_736_174_7,
        2 => 4.302_652_729_749_464,
        3 => 3.182_446_305_284_263,
        4 => 2.776_445_105_197_799,
        5 => 2.570_581_835_636_314,
        6 => 2.446_911_848_791_681,
        _ => {
            let z = Z95;
            let v = df as f64;
            let (z3, z5, z7, z9) = (z.powi(3), z.powi(5), z.powi(7), z.powi(9));
            z + (z3 + z) / (4.0 * v)
                + (5.0 * z5 + 16.0 * z3 + 3.0 * z) / (96.0 * v * v)
                + (3.0 * z7 + 19.0 * z5 + 17.0 * z3 - 15.0 * z) / (384.0 * v.powi(3))
                + (79.0 * z9 + 776.0 * z7 + 1482.0 * z5 - 1920.0 * z3 - 945.0 * z)
                    / (92160.0 * v.powi(4))
        }
    }
}

/// A sample mean with its two-sided 95% Student-t interval `x̄ ± t(0.975, n−1) · s/√n` (s: the sample
/// standard deviation, n − 1 in the denominator).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MeanCi {
    pub mean: f64,
    /// Half-width of the 95% interval (infinite for fewer than two values).
    pub ci95: f64,
    pub std: f64,
    pub n: usize,
}

impl MeanCi {
    pub fn of(xs: &[f64]) -> MeanCi {
        let n = xs.len();
        if n == 0 {
            return MeanCi {
                mean: f64::NAN,
                ci95: f64::INFINITY,
                std: f64::NAN,
                n,
            };
        }
        let mean = xs.iter().sum::<f64>() / n as f64;
        if n == 1 {
            return MeanCi {
                mean,
                ci95: f64::INFINITY,
                std: f64::NAN,
                n,
            };
        }
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
        let std = var.sqrt();
        MeanCi {
            mean,
            ci95: t975(n - 1) * std / (n as f64).sqrt(),
            std,
            n,
        }
    }

    pub fn lo(&self) -> f64 {
        self.mean - self.ci95
    }

    pub fn hi(&self) -> f64 {
        self.mean + self.ci95
    }
}

/// Agreement of a reward with preference labels.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PairAccuracy {
    /// Pairs with a strict preference (label ≠ 0.5).
    pub pairs: usize,
    /// Pairs where the reward ranks the preferred image higher.
    pub correct: usize,
    /// Pairs the reward scores exactly equal (counted as wrong).
    pub score_ties: usize,
    /// Pairs labelled as ties (0.5), left out of the accuracy.
    pub label_ties: usize,
    pub accuracy: f64,
    /// 95% Wilson interval of the accuracy.
    pub ci95: (f64, f64),
}

/// Accuracy of `(score_chosen, score_rejected, label)` triples, where `label` is the probability that
/// "chosen" is preferred (1: chosen, 0: rejected, 0.5: tie).
pub fn pair_accuracy(pairs: &[(f64, f64, f64)]) -> PairAccuracy {
    let (mut n, mut correct, mut score_ties, mut label_ties) = (0, 0, 0, 0);
    for &(c, r, label) in pairs {
        if label == 0.5 {
            label_ties += 1;
            continue;
        }
        n += 1;
        if c == r {
            score_ties += 1;
        } else if (c > r) == (label > 0.5) {
            correct += 1;
        }
    }
    let accuracy = if n == 0 {
        0.0
    } else {
        correct as f64 / n as f64
    };
    PairAccuracy {
        pairs: n,
        correct,
        score_ties,
        label_ties,
        accuracy,
        ci95: wilson_interval(correct as f64, n as f64, Z95),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn t_quantiles_match_tables() {
        // Student t 0.975 quantiles (scipy.stats.t.ppf(0.975, df)).
        for (df, want) in [
            (1, 12.706205),
            (2, 4.302653),
            (3, 3.182446),
            (5, 2.570582),
            (7, 2.364624),
            (8, 2.306004),
            (10, 2.228139),
            (30, 2.042272),
            (120, 1.979930),
        ] {
            assert!(
                (t975(df) - want).abs() < 2e-4,
                "df {df}: {} vs {want}",
                t975(df)
            );
        }
    }

    #[test]
    fn mean_ci_is_the_t_interval() {
        let m = MeanCi::of(&[1.0, 2.0, 3.0, 4.0]);
        assert!((m.mean - 2.5).abs() < 1e-12);
        // s = sqrt(5/3), t(0.975, 3) = 3.182446: half-width 3.182446 * 1.290994 / 2.
        assert!(
            (m.ci95 - 3.182446 * (5.0f64 / 3.0).sqrt() / 2.0).abs() < 1e-4,
            "{}",
            m.ci95
        );
        assert!(MeanCi::of(&[1.0]).ci95.is_infinite());
    }

    #[test]
    fn wilson_matches_known_values() {
        // 8 of 10 at 95%: (0.4902, 0.9433) (Wilson 1927; e.g. statsmodels proportion_confint method="wilson").
        let (lo, hi) = wilson_interval(8.0, 10.0, Z95);
        assert!((lo - 0.490_162).abs() < 1e-5, "{lo}");
        assert!((hi - 0.943_318).abs() < 1e-5, "{hi}");
        let (lo, hi) = wilson_interval(0.0, 5.0, Z95);
        assert_eq!(lo, 0.0);
        assert!((hi - 0.434_482).abs() < 1e-5, "{hi}");
    }

    #[test]
    fn pair_accuracy_counts_labels_and_ties() {
        let a = pair_accuracy(&[
            (2.0, 1.0, 1.0),
            (1.0, 2.0, 0.0),
            (1.0, 2.0, 1.0),
            (3.0, 3.0, 1.0),
            (0.0, 1.0, 0.5),
        ]);
        assert_eq!(
            (a.pairs, a.correct, a.score_ties, a.label_ties),
            (4, 2, 1, 1)
        );
        assert_eq!(a.accuracy, 0.5);
    }
}
