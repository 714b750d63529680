//! The trainer's configuration: a serde struct whose defaults are the released OptimSyn
//! configuration (FanZT6/OptimSyn run scripts over verl; see `optimsyn-method.md` §4), each
//! documented where it is declared.

use serde::{Deserialize, Serialize};

use crate::advantage::{AdvantageConfig, AdvantageEstimator};
use crate::error::{Error, Result};
use crate::loss::{Aggregation, LossConfig, RatioLevel};
use crate::policy::RolloutConfig;

/// Where the "old" (rollout-policy) log-probs of the importance ratio come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OldLogprobs {
    /// With one optimizer step per rollout batch (one mini-batch, one epoch) the policy has not
    /// moved when the loss is computed, so `old = logp.detach()` (ratio exactly 1, no extra
    /// forward pass, as TRL); otherwise [`Recompute`](OldLogprobs::Recompute). Default.
    Auto,
    /// A no-grad forward pass of the policy over the rollout batch before any update (verl).
    Recompute,
    /// The log-probs the sampler recorded (no extra pass; differs from the trainer's numerics by
    /// the sampler's rounding, e.g. KV-cache decoding).
    Sampler,
}

/// AdamW and clipping settings. Defaults: verl's actor optimizer as the release runs it (lr 1e-6
/// constant, no warm-up, AdamW betas (0.9, 0.999), eps 1e-8, weight decay 0.01, grad clip 1.0).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimizerConfig {
    /// Learning rate. Default 1e-6.
    pub lr: f64,
    /// Adam β1. Default 0.9.
    pub beta1: f64,
    /// Adam β2. Default 0.999.
    pub beta2: f64,
    /// Adam ε. Default 1e-8.
    pub eps: f64,
    /// Decoupled weight decay. Default 0.01.
    pub weight_decay: f64,
    /// Clip the total gradient norm of each optimizer step to this; `None` disables clipping
    /// (the norm is still measured and must be finite). Default `Some(1.0)`.
    pub max_grad_norm: Option<f64>,
    /// Linear warm-up over this many optimizer steps, then constant. Default 0.
    pub warmup_steps: u64,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        OptimizerConfig {
            lr: 1e-6,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            max_grad_norm: Some(1.0),
            warmup_steps: 0,
        }
    }
}

/// Everything a GRPO run is configured by. `Default` is the released OptimSyn configuration.
///
/// Batching: each training step samples `prompts_per_step × group_size` rollouts, scores them,
/// then runs `epochs` passes over them; each pass is cut into mini-batches of
/// `mini_batch_prompts × group_size` rollouts, one optimizer step each, and each mini-batch into
/// micro-batches of `micro_batch_size` rollouts whose gradients are accumulated (with one loss
/// normalizer for the whole mini-batch, so the micro-batch size never changes the update).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrpoConfig {
    /// Run seed: every random draw (prompt order, sampling streams, mini-batch order) derives from
    /// it. Default 0.
    pub seed: u64,
    /// G, completions per prompt. Default 5 (the paper and README; the shipped scripts use 15,
    /// the best setting of the paper's ablation).
    pub group_size: usize,
    /// Prompts per training step (verl `train_batch_size`). Default 256.
    pub prompts_per_step: usize,
    /// Prompts per mini-batch, i.e. per optimizer step (verl `ppo_mini_batch_size`); must divide
    /// `prompts_per_step`. Default 64 (4 optimizer steps per training step).
    pub mini_batch_prompts: usize,
    /// Rollouts per micro-batch (gradient accumulation; verl `ppo_micro_batch_size_per_gpu`).
    /// Default 8.
    pub micro_batch_size: usize,
    /// Rollouts per no-grad forward when computing old and reference log-probs; `None` means
    /// `micro_batch_size`. Default `None`.
    pub logprob_batch_size: Option<usize>,
    /// Passes over each rollout batch (verl `ppo_epochs`, TRL `num_iterations`). Default 1.
    pub epochs: usize,
    /// Shuffle the prompts at each pass over the prompt set (verl's dataloader). Default true.
    pub shuffle_prompts: bool,
    /// Shuffle the rollouts (whole groups stay together only when this is false) before cutting
    /// mini-batches at each epoch. Default false (verl splits in order).
    pub shuffle_mini_batches: bool,
    /// Leave groups whose rewards are all equal out of the update (they have zero advantage; with
    /// β > 0 they would still feel the KL term). Default false (the release keeps them).
    pub skip_zero_variance_groups: bool,
    /// Source of the old log-probs. Default [`OldLogprobs::Auto`].
    pub old_logprobs: OldLogprobs,
    /// Ask the policy for entropies even when `entropy_coef` is 0, for the `entropy` metric.
    /// Default true.
    pub log_entropy: bool,
    /// Sampling.
    pub rollout: RolloutConfig,
    /// Advantage estimator.
    pub advantage: AdvantageConfig,
    /// Loss terms.
    pub loss: LossConfig,
    /// Optimizer.
    pub optimizer: OptimizerConfig,
}

impl Default for GrpoConfig {
    fn default() -> Self {
        GrpoConfig {
            seed: 0,
            group_size: 5,
            prompts_per_step: 256,
            mini_batch_prompts: 64,
            micro_batch_size: 8,
            logprob_batch_size: None,
            epochs: 1,
            shuffle_prompts: true,
            shuffle_mini_batches: false,
            skip_zero_variance_groups: false,
            old_logprobs: OldLogprobs::Auto,
            log_entropy: true,
            rollout: RolloutConfig::default(),
            advantage: AdvantageConfig::default(),
            loss: LossConfig::default(),
            optimizer: OptimizerConfig::default(),
        }
    }
}

impl GrpoConfig {
    /// The released OptimSyn configuration (the same as `Default`).
    pub fn optimsyn() -> Self {
        Self::default()
    }

    /// Dr. GRPO (Liu et al. 2025): mean-only advantages, constant normalizer (the generation
    /// budget), no KL; otherwise the defaults.
    pub fn dr_grpo() -> Self {
        let mut c = Self::default();
        c.advantage.estimator = AdvantageEstimator::MeanOnly;
        c.loss.aggregation = Aggregation::Constant { length: None };
        c.loss.kl_coef = 0.0;
        c
    }

    /// GSPO (Zheng et al. 2025): sequence-level ratio with the paper's clip range 3e-4 / 4e-4,
    /// sequence-mean aggregation, no KL, no dual clip.
    pub fn gspo() -> Self {
        let mut c = Self::default();
        c.loss.ratio_level = RatioLevel::Sequence;
        c.loss.clip_low = 3e-4;
        c.loss.clip_high = 4e-4;
        c.loss.dual_clip = None;
        c.loss.aggregation = Aggregation::SeqMeanTokenMean;
        c.loss.kl_coef = 0.0;
        c
    }

    /// Checks every field and their combinations; the error names the field.
    pub fn validate(&self) -> Result<()> {
        if self.group_size < 2 {
            return Err(Error::config(
                "group_size",
                format!(
                    "must be ≥ 2 (a group needs a baseline), got {}",
                    self.group_size
                ),
            ));
        }
        for (field, v) in [
            ("prompts_per_step", self.prompts_per_step),
            ("mini_batch_prompts", self.mini_batch_prompts),
            ("micro_batch_size", self.micro_batch_size),
            ("epochs", self.epochs),
        ] {
            if v == 0 {
                return Err(Error::config(field, "must be > 0"));
            }
        }
        if self.logprob_batch_size == Some(0) {
            return Err(Error::config("logprob_batch_size", "must be > 0"));
        }
        if !self
            .prompts_per_step
            .is_multiple_of(self.mini_batch_prompts)
        {
            return Err(Error::config(
                "mini_batch_prompts",
                format!(
                    "must divide prompts_per_step ({}), got {}",
                    self.prompts_per_step, self.mini_batch_prompts
                ),
            ));
        }
        self.rollout.validate()?;
        self.advantage.validate()?;
        self.loss.validate()?;
        let o = &self.optimizer;
        if !(o.lr.is_finite() && o.lr >= 0.0) {
            return Err(Error::config(
                "optimizer.lr",
                format!("must be finite and ≥ 0, got {}", o.lr),
            ));
        }
        if let Some(m) = o.max_grad_norm
            && !(m.is_finite() && m > 0.0)
        {
            return Err(Error::config(
                "optimizer.max_grad_norm",
                format!("must be finite and > 0, got {m}"),
            ));
        }
        Ok(())
    }

    /// Optimizer steps per training step.
    pub fn optimizer_steps_per_step(&self) -> usize {
        self.epochs
            * self
                .prompts_per_step
                .div_ceil(self.mini_batch_prompts.max(1))
    }

    /// The loss config with a `Constant { length: None }` normalizer resolved to
    /// `rollout.max_new_tokens`.
    pub fn resolved_loss(&self) -> LossConfig {
        let mut l = self.loss;
        if let Aggregation::Constant { length: None } = l.aggregation {
            l.aggregation = Aggregation::Constant {
                length: Some(self.rollout.max_new_tokens),
            };
        }
        l
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_released_configuration() {
        let c = GrpoConfig::default();
        assert_eq!(c.group_size, 5);
        assert_eq!(c.rollout.temperature, 1.5);
        assert_eq!(c.optimizer.lr, 1e-6);
        assert_eq!((c.loss.clip_low, c.loss.clip_high), (0.2, 0.2));
        assert_eq!(c.loss.dual_clip, Some(3.0));
        assert_eq!(c.loss.kl_coef, 0.001);
        assert_eq!(c.loss.kl_estimator, crate::KlEstimator::K3);
        assert_eq!(c.loss.aggregation, Aggregation::TokenMean);
        assert_eq!(c.loss.entropy_coef, 0.0);
        assert_eq!(c.advantage.eps, 1e-6);
        assert_eq!(c.optimizer_steps_per_step(), 4);
        c.validate().unwrap();
        GrpoConfig::dr_grpo().validate().unwrap();
        GrpoConfig::gspo().validate().unwrap();
    }

    #[test]
    fn serde_round_trip_and_partial_configs() {
        let c = GrpoConfig::gspo();
        let text = serde_json::to_string(&c).unwrap();
        let back: GrpoConfig = serde_json::from_str(&text).unwrap();
        assert_eq!(back, c);
        let partial: GrpoConfig = serde_json::from_str(
            r#"{"group_size": 8, "loss": {"aggregation": {"constant": {"length": 512}}}}"#,
        )
        .unwrap();
        assert_eq!(partial.group_size, 8);
        assert_eq!(
            partial.loss.aggregation,
            Aggregation::Constant { length: Some(512) }
        );
        assert_eq!(partial.loss.clip_low, 0.2);
        let err = serde_json::from_str::<GrpoConfig>(r#"{"group_sise": 8}"#).unwrap_err();
        assert!(err.to_string().contains("group_sise"), "{err}");
    }

    #[test]
    fn validation_names_the_field() {
        type Edit = Box<dyn Fn(&mut GrpoConfig)>;
        let cases: Vec<(Edit, &str)> = vec![
            (Box::new(|c| c.group_size = 1), "group_size"),
            (Box::new(|c| c.mini_batch_prompts = 3), "mini_batch_prompts"),
            (Box::new(|c| c.micro_batch_size = 0), "micro_batch_size"),
            (Box::new(|c| c.loss.clip_low = 1.0), "loss.clip_low"),
            (Box::new(|c| c.loss.dual_clip = Some(1.0)), "loss.dual_clip"),
            (Box::new(|c| c.loss.kl_coef = -0.1), "loss.kl_coef"),
            (Box::new(|c| c.optimizer.lr = f64::NAN), "optimizer.lr"),
            (Box::new(|c| c.rollout.top_p = 0.0), "rollout.top_p"),
            (
                Box::new(|c| c.rollout.max_new_tokens = 0),
                "rollout.max_new_tokens",
            ),
            (
                Box::new(|c| c.advantage.std_floor = -1.0),
                "advantage.std_floor",
            ),
            (
                Box::new(|c| c.optimizer.max_grad_norm = Some(0.0)),
                "optimizer.max_grad_norm",
            ),
        ];
        for (edit, field) in cases {
            let mut c = GrpoConfig::default();
            edit(&mut c);
            match c.validate() {
                Err(Error::Config { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: expected a config error, got {other:?}"),
            }
        }
    }
}
