//! Prompts, the rollouts sampled from them, and the reward function that scores a whole batch.

use serde::{Deserialize, Serialize};

use crate::error::BoxError;
use crate::policy::Completion;

/// A training prompt: a stable id (it keys the prompt's random streams and names it in errors)
/// and its token ids, already rendered by the caller (chat template, guiding text, …).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Prompt {
    /// Unique id.
    pub id: String,
    /// Token ids (non-empty).
    pub tokens: Vec<u32>,
}

impl Prompt {
    /// A prompt with this id and these tokens.
    pub fn new(id: impl Into<String>, tokens: Vec<u32>) -> Self {
        Prompt {
            id: id.into(),
            tokens,
        }
    }
}

/// One completion of one prompt, as the reward function sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    /// Index of its prompt in [`RolloutBatch::prompts`].
    pub prompt_index: usize,
    /// Which of the prompt's `G` samples it is (`0..G`).
    pub sample: usize,
    /// The completion (tokens, log-probs at the rollout temperature, truncation flag).
    pub completion: Completion,
}

/// Everything sampled in one training step: `prompts.len() × group_size` rollouts, prompt-major
/// (rollout `k * group_size + g` is sample `g` of prompt `k`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutBatch {
    /// The training step (1-based).
    pub step: u64,
    /// Completions per prompt (G).
    pub group_size: usize,
    /// The step's prompts.
    pub prompts: Vec<Prompt>,
    /// The rollouts.
    pub rollouts: Vec<Rollout>,
}

impl RolloutBatch {
    /// The prompt a rollout was sampled from.
    pub fn prompt_of(&self, rollout: &Rollout) -> &Prompt {
        &self.prompts[rollout.prompt_index]
    }

    /// Number of rollouts.
    pub fn len(&self) -> usize {
        self.rollouts.len()
    }

    /// Whether there are no rollouts.
    pub fn is_empty(&self) -> bool {
        self.rollouts.is_empty()
    }

    /// The rollouts group by group (one slice of `G` per prompt).
    pub fn groups(&self) -> impl Iterator<Item = (&Prompt, &[Rollout])> {
        self.prompts
            .iter()
            .zip(self.rollouts.chunks(self.group_size.max(1)))
    }
}

/// Scores a whole batch of rollouts at once (an influence scorer needs the batch: it normalizes
/// across it and batches its own gradient computations). Returns one finite reward per rollout,
/// in rollout order.
///
/// Any `FnMut(&RolloutBatch) -> Result<Vec<f64>, E>` is a `RewardFn`; [`reward_fn`] wraps an
/// infallible closure.
pub trait RewardFn {
    /// One reward per rollout of `batch`.
    fn score(&mut self, batch: &RolloutBatch) -> Result<Vec<f64>, BoxError>;
}

impl<F, E> RewardFn for F
where
    F: FnMut(&RolloutBatch) -> Result<Vec<f64>, E>,
    E: Into<BoxError>,
{
    fn score(&mut self, batch: &RolloutBatch) -> Result<Vec<f64>, BoxError> {
        self(batch).map_err(Into::into)
    }
}

/// A [`RewardFn`] from a closure that cannot fail (see [`reward_fn`]).
#[derive(Debug, Clone)]
pub struct InfallibleReward<F>(pub F);

impl<F: FnMut(&RolloutBatch) -> Vec<f64>> RewardFn for InfallibleReward<F> {
    fn score(&mut self, batch: &RolloutBatch) -> Result<Vec<f64>, BoxError> {
        Ok((self.0)(batch))
    }
}

/// Wraps a closure that returns rewards directly:
/// `reward_fn(|batch| batch.rollouts.iter().map(|r| r.completion.tokens.len() as f64).collect())`.
pub fn reward_fn<F: FnMut(&RolloutBatch) -> Vec<f64>>(f: F) -> InfallibleReward<F> {
    InfallibleReward(f)
}
