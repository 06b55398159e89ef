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
