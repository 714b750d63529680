//! Group-relative advantages: one scalar per completion, from the rewards of its group (the `G`
//! completions of the same prompt), broadcast later to every token of the completion.
//!
//! | estimator | advantage of completion `i` of a group `r_1..r_G` | used by |
//! |---|---|---|
//! | [`GroupZScore`](AdvantageEstimator::GroupZScore) (default) | `(r_i − mean) / (max(std, floor) + eps)`, `std` unbiased (`G − 1`) | verl `grpo` (OptimSyn's released code), TRL `scale_rewards="group"` (eps 1e-4) |
//! | [`GroupZScorePopulation`](AdvantageEstimator::GroupZScorePopulation) | `(r_i − mean) / sqrt(max(var, floor²) + eps)`, `var` over `G` | the OptimSyn paper's formula (δ inside the root) |
//! | [`MeanOnly`](AdvantageEstimator::MeanOnly) | `r_i − mean` | Dr. GRPO |
//! | [`Rloo`](AdvantageEstimator::Rloo) | `r_i − mean_{j≠i} r_j = G/(G−1) · (r_i − mean)` | RLOO |
//!
//! **All-equal groups.** A group whose rewards are all exactly equal carries no signal: every
//! estimator gives it advantage exactly 0 (not a rounding residue of `r − mean`, and never NaN),
//! and it is counted in [`Advantages::zero_variance_groups`].
//!
//! **Near-constant groups (the floor).** Continuous rewards such as influence scores can differ
//! inside a group by noise only; dividing by their tiny std would blow the noise up to unit scale
//! (OpenRLHF's 1e-9 epsilon does exactly that). [`AdvantageConfig::std_floor`] bounds the
//! denominator from below: a group whose std is under the floor is scaled as if its std were the
//! floor, so its advantages stay as small as its reward differences, and it is counted in
//! [`Advantages::floored_groups`]. The default floor is 0, as in the released configuration, whose
//! only guard is `eps` = 1e-6 added to the std.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How rewards of a group become advantages (see the [module docs](self)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdvantageEstimator {
    /// `(r − mean) / (max(std, floor) + eps)` with the unbiased std (verl's `grpo`, the default).
    GroupZScore,
    /// `(r − mean) / sqrt(max(var, floor²) + eps)` with the population variance (the paper).
    GroupZScorePopulation,
    /// `r − mean` (Dr. GRPO: no division by the std).
    MeanOnly,
    /// `r_i − mean of the other G − 1 rewards` (leave-one-out baseline).
    Rloo,
}

/// Advantage settings. Defaults: the released OptimSyn configuration (verl `grpo` with
/// `norm_adv_by_std_in_grpo = true`: unbiased std, eps 1e-6, no floor).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdvantageConfig {
    /// The estimator. Default [`AdvantageEstimator::GroupZScore`].
    pub estimator: AdvantageEstimator,
    /// Added to the std (z-score) or inside the square root (population z-score). Default 1e-6
    /// (verl; TRL uses 1e-4).
    pub eps: f64,
    /// Lower bound of the std a z-score divides by (see the [module docs](self)). Default 0.
    pub std_floor: f64,
}

impl Default for AdvantageConfig {
    fn default() -> Self {
        AdvantageConfig {
            estimator: AdvantageEstimator::GroupZScore,
            eps: 1e-6,
            std_floor: 0.0,
        }
    }
}

impl AdvantageConfig {
    /// Rejects a negative or non-finite `eps` or `std_floor`, and a z-score that could divide by 0.
    pub fn validate(&self) -> Result<()> {
        if !(self.eps.is_finite() && self.eps >= 0.0) {
            return Err(Error::config(
                "advantage.eps",
                format!("must be finite and ≥ 0, got {}", self.eps),
            ));
        }
        if !(self.std_floor.is_finite() && self.std_floor >= 0.0) {
            return Err(Error::config(
                "advantage.std_floor",
                format!("must be finite and ≥ 0, got {}", self.std_floor),
            ));
        }
        Ok(())
    }
}

/// Advantages of a batch of groups and what happened to each group.
#[derive(Debug, Clone, PartialEq)]
pub struct Advantages {
    /// One advantage per completion, in the order of the rewards.
    pub values: Vec<f64>,
    /// Mean reward of each group.
    pub group_mean: Vec<f64>,
    /// Unbiased std of each group's rewards (0 for an all-equal group).
    pub group_std: Vec<f64>,
    /// Whether each group's rewards are all equal.
    pub zero_variance: Vec<bool>,
    /// Groups whose rewards are all equal (advantage exactly 0).
    pub zero_variance_groups: usize,
    /// Groups (not all equal) whose std was below [`AdvantageConfig::std_floor`].
    pub floored_groups: usize,
}

/// Advantages of `rewards`, laid out group by group: `rewards[k * group_size + g]` is the reward
/// of sample `g` of prompt `k`. Rewards must be finite and `group_size ≥ 2` (a single completion
/// has no baseline).
pub fn compute_advantages(
    rewards: &[f64],
    group_size: usize,
    config: &AdvantageConfig,
) -> Result<Advantages> {
    config.validate()?;
    if group_size < 2 {
        return Err(Error::config(
            "group_size",
            format!("a group needs at least 2 completions for a baseline, got {group_size}"),
        ));
    }
    if !rewards.len().is_multiple_of(group_size) {
        return Err(Error::tensor(
            "rewards",
            format!(
                "{} rewards is not a whole number of groups of {group_size}",
                rewards.len()
            ),
        ));
    }
    if let Some(i) = rewards.iter().position(|r| !r.is_finite()) {
        return Err(Error::tensor(
            "rewards",
            format!("reward {i} is {} (rewards must be finite)", rewards[i]),
        ));
    }
    let n = group_size as f64;
    let groups = rewards.len() / group_size;
    let mut out = Advantages {
        values: Vec::with_capacity(rewards.len()),
        group_mean: Vec::with_capacity(groups),
        group_std: Vec::with_capacity(groups),
        zero_variance: Vec::with_capacity(groups),
        zero_variance_groups: 0,
        floored_groups: 0,
    };
    for group in rewards.chunks(group_size) {
        let mean = group.iter().sum::<f64>() / n;
        let all_equal = group.iter().all(|&r| r == group[0]);
        let ss: f64 = group.iter().map(|&r| (r - mean) * (r - mean)).sum();
        let std = if all_equal {
            0.0
        } else {
            (ss / (n - 1.0)).sqrt()
        };
        out.group_mean.push(if all_equal { group[0] } else { mean });
        out.group_std.push(std);
        out.zero_variance.push(all_equal);
        if all_equal {
            out.zero_variance_groups += 1;
            out.values.extend(std::iter::repeat_n(0.0, group_size));
            continue;
        }
        let floored = std < config.std_floor;
        let scale = match config.estimator {
            AdvantageEstimator::GroupZScore => {
                out.floored_groups += usize::from(floored);
                1.0 / (std.max(config.std_floor) + config.eps)
            }
            AdvantageEstimator::GroupZScorePopulation => {
                let var = ss / n;
                let floor2 = config.std_floor * config.std_floor;
                out.floored_groups += usize::from(var < floor2);
                1.0 / (var.max(floor2) + config.eps).sqrt()
            }
            AdvantageEstimator::MeanOnly => 1.0,
            AdvantageEstimator::Rloo => n / (n - 1.0),
        };
        out.values.extend(group.iter().map(|&r| (r - mean) * scale));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cfg(estimator: AdvantageEstimator) -> AdvantageConfig {
        AdvantageConfig {
            estimator,
            ..Default::default()
        }
    }

    #[test]
    fn z_score_matches_hand_computation() {
        // Group [1, 2, 3, 6]: mean 3, unbiased var (4 + 1 + 0 + 9) / 3 = 14/3.
        let a = compute_advantages(
            &[1.0, 2.0, 3.0, 6.0],
            4,
            &cfg(AdvantageEstimator::GroupZScore),
        )
        .unwrap();
        let std = (14.0f64 / 3.0).sqrt();
        let want: Vec<f64> = [-2.0, -1.0, 0.0, 3.0]
            .iter()
            .map(|d| d / (std + 1e-6))
            .collect();
        for (g, w) in a.values.iter().zip(&want) {
            assert!((g - w).abs() < 1e-15, "{g} vs {w}");
        }
        assert_eq!(a.group_mean, vec![3.0]);
        assert!((a.group_std[0] - std).abs() < 1e-15);
    }

    #[test]
    fn population_mean_only_and_rloo_match_hand_computation() {
        let r = [1.0, 2.0, 3.0, 6.0];
        let pop =
            compute_advantages(&r, 4, &cfg(AdvantageEstimator::GroupZScorePopulation)).unwrap();
        let s = (14.0f64 / 4.0 + 1e-6).sqrt();
        assert!((pop.values[3] - 3.0 / s).abs() < 1e-14);
        let m = compute_advantages(&r, 4, &cfg(AdvantageEstimator::MeanOnly)).unwrap();
        assert_eq!(m.values, vec![-2.0, -1.0, 0.0, 3.0]);
        let l = compute_advantages(&r, 4, &cfg(AdvantageEstimator::Rloo)).unwrap();
        // r_4 − mean(1, 2, 3) = 6 − 2 = 4.
        assert!((l.values[3] - 4.0).abs() < 1e-14);
        assert!((l.values[0] - (1.0 - 11.0 / 3.0)).abs() < 1e-14);
    }

    #[test]
    fn all_equal_groups_give_exact_zero_and_are_counted() {
        // 0.1 three times: the mean is 0.10000000000000002, r − mean would not be 0.
        let r = [0.1, 0.1, 0.1, 1.0, 0.0, 1.0];
        for e in [
            AdvantageEstimator::GroupZScore,
            AdvantageEstimator::GroupZScorePopulation,
            AdvantageEstimator::MeanOnly,
            AdvantageEstimator::Rloo,
        ] {
            let a = compute_advantages(&r, 3, &cfg(e)).unwrap();
            assert_eq!(&a.values[..3], &[0.0, 0.0, 0.0], "{e:?}");
            assert_eq!(a.zero_variance_groups, 1);
            assert!(a.values[3..].iter().all(|v| *v != 0.0));
        }
    }

    #[test]
    fn floor_keeps_noise_small() {
        let r = [1.0, 1.0 + 1e-9, 1.0 - 1e-9];
        let loose = compute_advantages(&r, 3, &cfg(AdvantageEstimator::GroupZScore)).unwrap();
        assert!(loose.values[1] > 1e-4); // noise amplified by 1 / (1e-9 + 1e-6)
        let floored = compute_advantages(
            &r,
            3,
            &AdvantageConfig {
                std_floor: 0.1,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(floored.values[1].abs() < 1e-7);
        assert_eq!(floored.floored_groups, 1);
        assert_eq!(floored.zero_variance_groups, 0);
    }

    #[test]
    fn rejects_bad_input() {
        let c = AdvantageConfig::default();
        assert!(matches!(
            compute_advantages(&[1.0], 1, &c),
            Err(Error::Config {
                field: "group_size",
                ..
            })
        ));
        assert!(matches!(
            compute_advantages(&[1.0, 2.0, 3.0], 2, &c),
            Err(Error::Tensor { .. })
        ));
        let e = compute_advantages(&[1.0, f64::NAN], 2, &c).unwrap_err();
        assert!(e.to_string().contains("reward 1 is NaN"), "{e}");
        let bad = AdvantageConfig {
            eps: -1.0,
            ..Default::default()
        };
        assert!(matches!(
            compute_advantages(&[1.0, 2.0], 2, &bad),
            Err(Error::Config {
                field: "advantage.eps",
                ..
            })
        ));
    }

    fn group_strategy() -> impl Strategy<Value = (usize, Vec<f64>)> {
        (2usize..6, 1usize..4)
            .prop_flat_map(|(g, k)| (Just(g), proptest::collection::vec(-100.0f64..100.0, g * k)))
    }

    proptest! {
        #[test]
        fn z_score_groups_have_mean_zero_and_unit_std((g, r) in group_strategy()) {
            let a = compute_advantages(&r, g, &AdvantageConfig { eps: 0.0, ..Default::default() }).unwrap();
            for (k, (vals, rs)) in a.values.chunks(g).zip(r.chunks(g)).enumerate() {
                let mean: f64 = vals.iter().sum::<f64>() / g as f64;
                prop_assert!(mean.abs() < 1e-9, "group {k} mean {mean}");
                if a.group_std[k] > 1e-6 {
                    let var: f64 = vals.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / (g as f64 - 1.0);
                    prop_assert!((var - 1.0).abs() < 1e-9, "group {k} var {var}");
                } else if rs.iter().all(|x| *x == rs[0]) {
                    prop_assert!(vals.iter().all(|v| *v == 0.0));
                }
            }
        }

        #[test]
        fn z_score_is_affine_invariant((g, r) in group_strategy(), a in 0.1f64..10.0, b in -50.0f64..50.0) {
            let c = AdvantageConfig { eps: 0.0, ..Default::default() };
            let x = compute_advantages(&r, g, &c).unwrap();
            let shifted: Vec<f64> = r.iter().map(|v| a * v + b).collect();
            let y = compute_advantages(&shifted, g, &c).unwrap();
            for (k, (u, v)) in x.values.iter().zip(&y.values).enumerate() {
                if x.group_std[k / g] > 1e-3 {
                    prop_assert!((u - v).abs() < 1e-7, "{u} vs {v}");
                }
            }
        }

        #[test]
        fn mean_only_is_shift_invariant_and_scale_equivariant((g, r) in group_strategy(), a in 0.1f64..10.0, b in -50.0f64..50.0) {
            let c = AdvantageConfig { estimator: AdvantageEstimator::MeanOnly, ..Default::default() };
            let x = compute_advantages(&r, g, &c).unwrap();
            let shifted: Vec<f64> = r.iter().map(|v| a * v + b).collect();
            let y = compute_advantages(&shifted, g, &c).unwrap();
            for (u, v) in x.values.iter().zip(&y.values) {
                prop_assert!((a * u - v).abs() < 1e-8 * (1.0 + v.abs()), "{u} vs {v}");
            }
        }

        #[test]
        fn rloo_equals_its_leave_one_out_definition((g, r) in group_strategy()) {
            let c = AdvantageConfig { estimator: AdvantageEstimator::Rloo, ..Default::default() };
            let x = compute_advantages(&r, g, &c).unwrap();
            for (k, rs) in r.chunks(g).enumerate() {
                let equal = rs.iter().all(|v| *v == rs[0]);
                for i in 0..g {
                    let others: f64 = rs.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, v)| v).sum::<f64>() / (g as f64 - 1.0);
                    let want = if equal { 0.0 } else { rs[i] - others };
                    prop_assert!((x.values[k * g + i] - want).abs() < 1e-9);
                }
            }
        }

        #[test]
        fn permuting_groups_permutes_advantages((g, r) in group_strategy()) {
            let c = AdvantageConfig::default();
            let x = compute_advantages(&r, g, &c).unwrap();
            let k = r.len() / g;
            let order: Vec<usize> = (0..k).rev().collect();
            let swapped: Vec<f64> = order.iter().flat_map(|&j| r[j * g..(j + 1) * g].to_vec()).collect();
            let y = compute_advantages(&swapped, g, &c).unwrap();
            for (pos, &j) in order.iter().enumerate() {
                prop_assert_eq!(&y.values[pos * g..(pos + 1) * g], &x.values[j * g..(j + 1) * g]);
            }
        }
    }
}
