//! GRPO for any tch policy: group-relative advantages, the clipped (and dual-clipped)
//! surrogate, KL estimators, loss aggregation across micro-batches, and a trainer that streams
//! metrics and resumes from checkpoints bit for bit.
//!
//! Part of the [optimsyn](https://github.com/optimsyn/optimsyn) workspace: OptimSyn trains its
//! rubric policy with this crate, rewarding each rubric by the influence of the data it makes.
//! Nothing here knows about language models: a model enters through the [`Policy`] trait
//! (sample `G` completions per prompt with their log-probs; recompute those log-probs with
//! gradients; name the trainable tensors; save and load itself), and a reward enters as a
//! function over the whole [`RolloutBatch`] ([`RewardFn`]).
//!
//! The pieces, from the bottom up:
//!
//! 1. [`advantage`]: rewards of a group → advantages ([`compute_advantages`]: z-score with
//!    unbiased or population std, Dr. GRPO mean-only, RLOO; all-equal groups give exactly 0 and
//!    are counted; a floor for near-constant groups).
//! 2. [`loss`]: the per-token objective as pure tensor functions ([`grpo_loss`]: token or
//!    sequence ratio, clip ε_low/ε_high, dual clip, k1/k2/k3 KL, entropy bonus, token-mean /
//!    seq-mean-token-mean / constant aggregation with one [`StepNormalizer`] per optimizer step).
//! 3. [`Trainer`]: rollouts → rewards → advantages → epochs × mini-batches × micro-batches →
//!    AdamW ([`optimsyn_optim`]) with gradient clipping; [`StepMetrics`] per step to
//!    `metrics.jsonl`; checkpoints (`policy/`, `optimizer.safetensors`, `trainer_state.json`).
//!
//! Defaults ([`GrpoConfig::default`]) are the released OptimSyn configuration: G 5, temperature
//! 1.5, lr 1e-6, clip 0.2/0.2, dual clip 3, k3 KL with β 0.001 to a frozen reference,
//! token-mean, no entropy bonus. Every random draw (prompt order, sampling streams,
//! mini-batch order) comes from Rust-side ChaCha streams keyed by the run seed and the step, so a
//! run is reproducible at any batch size and a resumed run equals an uninterrupted one.
//!
//! # Example
//!
//! A toy policy (a logits table, [`CategoricalPolicy`]) learns to emit token 3, rewarded by how
//! often it does:
//!
//! ```
//! use optimsyn_rl_grpo::{
//!     CategoricalPolicy, GrpoConfig, Prompt, Reference, Trainer, reward_fn,
//! };
//! use tch::Kind;
//!
//! # fn main() -> Result<(), optimsyn_rl_grpo::Error> {
//! let policy = CategoricalPolicy::new(4, 8, 0.0, 0, Kind::Float)?; // 4 positions, 8 tokens
//! let prompts: Vec<Prompt> = (0..8).map(|i| Prompt::new(format!("p{i}"), vec![1, 2])).collect();
//!
//! let mut config = GrpoConfig::default();
//! config.group_size = 8;
//! config.prompts_per_step = 4;
//! config.mini_batch_prompts = 4;
//! config.rollout.temperature = 1.0;
//! config.loss.kl_coef = 0.0; // no reference needed
//! config.optimizer.lr = 0.1;
//!
//! let mut trainer = Trainer::new(config, policy, Reference::None, prompts)?;
//! let mut reward = reward_fn(|batch| {
//!     batch.rollouts.iter()
//!         .map(|r| r.completion.tokens.iter().filter(|&&t| t == 3).count() as f64)
//!         .collect()
//! });
//! let first = trainer.step(&mut reward)?;
//! let metrics = trainer.train(&mut reward, 30)?;
//! let last = metrics.last().expect("29 more steps");
//! assert!(last.reward.mean > first.reward.mean + 1.0, "{} → {}", first.reward.mean, last.reward.mean);
//! # Ok(())
//! # }
//! ```
//!
//! # Linking
//!
//! Like every crate that links libtorch, test and binary targets need an rpath to libtorch's lib
//! folder; this crate's `build.rs` adds it for its own targets.
#![deny(missing_docs)]

pub mod advantage;
pub mod checkpoint;
mod config;
mod error;
pub mod loss;
mod metrics;
mod policy;
pub mod rng;
mod rollout;
mod toy;
mod trainer;

pub use advantage::{AdvantageConfig, AdvantageEstimator, Advantages, compute_advantages};
pub use checkpoint::{DataCursor, TrainerState, latest_checkpoint};
pub use config::{GrpoConfig, OldLogprobs, OptimizerConfig};
pub use error::{BoxError, Error, Result};
pub use loss::{
    Aggregation, KlEstimator, LossConfig, LossInputs, LossOutput, LossStats, RatioLevel,
    StepNormalizer, grpo_loss, kl_estimate,
};
pub use metrics::{StepMetrics, StepTimes, Summary};
pub use policy::{
    Completion, PackedBatch, Policy, PolicyLogprobs, Reference, RolloutConfig, SampleRequest,
    TokenBatch, logprobs_from_logits,
};
pub use rollout::{InfallibleReward, Prompt, RewardFn, Rollout, RolloutBatch, reward_fn};
pub use toy::CategoricalPolicy;
pub use trainer::{OutputOptions, Trainer};

/// [`Trainer`] under the name other crates' users look for first.
pub type GrpoTrainer<P> = Trainer<P>;
