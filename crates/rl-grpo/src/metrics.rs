//! Per-step metrics, one JSON object per training step (stable field names, TRL/verl-like).
//!
//! A note on `loss` and `policy_loss`: with group-centred advantages the policy term's *value* is
//! close to 0 on the first update of a batch, because the advantages of a group sum to 0 and the
//! ratio is one, while its gradient is not. The value is not a progress signal; watch
//! `reward.mean`, `grad_norm` and `kl`.

use serde::{Deserialize, Serialize};

/// Mean, standard deviation (population), minimum and maximum of a list of numbers.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
pub struct Summary {
    /// Mean (0 for an empty list).
    pub mean: f64,
    /// Population standard deviation.
    pub std: f64,
    /// Minimum.
    pub min: f64,
    /// Maximum.
    pub max: f64,
}

impl Summary {
    /// Summarizes `values` (all zeros for an empty list).
    pub fn of(values: &[f64]) -> Self {
        if values.is_empty() {
            return Summary::default();
        }
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        let var = values.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
        Summary {
            mean,
            std: var.sqrt(),
            min: values.iter().copied().fold(f64::INFINITY, f64::min),
            max: values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        }
    }
}

/// Wall-clock seconds of each phase of a training step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
pub struct StepTimes {
    /// Sampling the completions.
    pub rollout_s: f64,
    /// The reward function.
    pub reward_s: f64,
    /// No-grad forward passes for old and reference log-probs.
    pub logprobs_s: f64,
    /// Forward + backward passes and optimizer steps.
    pub update_s: f64,
    /// The whole step (metrics and checkpoint writing excluded).
    pub total_s: f64,
}

/// What one training step did. Written as one JSONL row per step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// The training step (1-based).
    pub step: u64,
    /// Passes over the prompt set begun so far (0-based epoch of the step's last prompt).
    pub data_epoch: u64,
    /// Prompts of the step.
    pub prompts: usize,
    /// Rollouts of the step (`prompts × G`).
    pub rollouts: usize,
    /// Rewards.
    pub reward: Summary,
    /// Advantages.
    pub advantage: Summary,
    /// Groups whose rewards were all equal (zero advantage).
    pub zero_variance_groups: usize,
    /// `zero_variance_groups / prompts`.
    pub frac_zero_variance: f64,
    /// Groups whose std fell under the advantage floor.
    pub floored_groups: usize,
    /// Rollouts that took part in the update (all, unless zero-variance groups are skipped).
    pub trained_rollouts: usize,
    /// Completion lengths in tokens.
    pub completion_length: Summary,
    /// Fraction of completions that hit the token budget.
    pub truncated_fraction: f64,
    /// Completion tokens of the step.
    pub completion_tokens: usize,
    /// Mean over optimizer steps of the total loss.
    pub loss: f64,
    /// Mean over optimizer steps of the policy (surrogate) term.
    pub policy_loss: f64,
    /// Token-mean KL estimate to the reference over all updates (`None` without a KL term).
    pub kl: Option<f64>,
    /// Token-mean entropy over all updates (`None` when the policy gave none).
    pub entropy: Option<f64>,
    /// Fraction of token updates where a clip binds (`clip_low + clip_high`).
    pub clip_fraction: f64,
    /// Fraction where the lower clip binds (`ρ < 1 − ε_low`, `A < 0`).
    pub clip_low_fraction: f64,
    /// Fraction where the upper clip binds (`ρ > 1 + ε_high`, `A > 0`).
    pub clip_high_fraction: f64,
    /// Fraction where the dual clip binds (`ρ > c₃`, `A < 0`).
    pub dual_clip_fraction: f64,
    /// Token-mean `log π_old − log π` (verl `ppo_kl`).
    pub ppo_kl: f64,
    /// Largest importance ratio seen.
    pub ratio_max: f64,
    /// Smallest importance ratio seen.
    pub ratio_min: f64,
    /// Mean over optimizer steps of the gradient norm before clipping.
    pub grad_norm: f64,
    /// Learning rate of the step's last optimizer step.
    pub lr: f64,
    /// Optimizer steps taken so far, this step's included.
    pub optimizer_steps: u64,
    /// Time split.
    pub time: StepTimes,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_of_values() {
        let s = Summary::of(&[1.0, 3.0]);
        assert_eq!((s.mean, s.std, s.min, s.max), (2.0, 1.0, 1.0, 3.0));
        assert_eq!(Summary::of(&[]), Summary::default());
    }
}
