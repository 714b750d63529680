//! Optimizer-aware (LESS-style) influence of training samples on a target model's validation loss.
//!
//! Part of the [optimsyn](https://github.com/optimsyn/optimsyn) workspace: the reward of the
//! OptimSyn loop, usable on its own to score any chat dataset. For a candidate `z`, validation
//! examples `z'` and warm-up checkpoints `θ_i` (LoRA adapter + Adam moments, weighted by their
//! average learning rate `w_i`):
//!
//! `IF(z) = agg_j mean_{z' ∈ D_val^(j)} Σ_i w_i · cos(P Γ(z; θ_i), P ∇ℓ(z'; θ_i))`
//!
//! - ∇ℓ: gradient of the sample's mean token cross-entropy (its loss-mask tokens) with respect to
//!   the LoRA matrices, computed for a whole padded batch in one backward pass
//!   ([`optimsyn_lm::LoraAdapter::per_sample_grads`]), dropout off;
//! - Γ: the Adam update direction from the checkpoint's moments ([`Precond`]; by default the
//!   released code's `m'/√(v'+ε)`), the validation side plain gradients;
//! - P: a seeded random projection ([`ProjectorKind`]: dense Rademacher, sparse JL, or exact);
//! - agg over validation subtasks: max (default, the released code) or mean ([`SubtaskAgg`]).
//!
//! Positive influence means the candidate's update direction agrees with lowering the validation
//! loss. Validation features are stored beside each adapter with a header naming what produced
//! them and reused. [`verify`] checks the first-order prediction against real steps, and
//! [`InfluenceScorer::score_report`] adds a check of whether the scores tell candidates apart at
//! all ([`Discrimination`]: after too short a warm-up, every candidate's gradient is mostly one
//! shared direction).
//!
//! ```no_run
//! use optimsyn_data_io::{ChatExample, read_jsonl};
//! use optimsyn_influence::{InfluenceScorer, ScoreConfig};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let val: Vec<ChatExample> = read_jsonl("val.jsonl")?;
//! let candidates: Vec<ChatExample> = read_jsonl("candidates.jsonl")?;
//! let mut scorer = InfluenceScorer::new(
//!     "models/target".as_ref(),
//!     &["warmup/checkpoint-4".into()],
//!     &val,
//!     ScoreConfig::default(),
//!     Default::default(),
//! )?;
//! for s in scorer.score(&candidates)? {
//!     println!("{} {:?}", s.id, s.influence);
//! }
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

mod config;
mod dense_device;
mod diagnostics;
mod error;
mod features;
mod grads;
mod precond;
mod project;
mod score;
mod scorer;
mod verify;

pub use config::{ScoreConfig, SubtaskAgg};
pub use diagnostics::{Discrimination, FeatureStats, SHARED_SPREAD_RATIO};
pub use error::{Error, Result};
pub use grads::{encode_examples, gradients, gradients_into};
pub use precond::{AdamMoments, Precond};
pub use project::{Projector, ProjectorKind, ProjectorType};
pub use score::Score;
pub use scorer::{InfluenceScorer, ScoreReport};
pub use verify::{
    AUTO_RELATIVE_CHANGE, AUTO_RELATIVE_CHANGE_HALF, StepCheck, VerifyReport, pearson, verify,
};
