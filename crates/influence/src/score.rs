//! One candidate's score: what the scorer returns and the diagnostics read.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One candidate's score.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Score {
    /// The candidate's id.
    pub id: String,
    /// Aggregated influence (positive: helps the validation loss); `None` when the candidate has
    /// no loss token (see `reason`).
    pub influence: Option<f64>,
    /// Mean weighted cosine per validation subtask.
    pub subtasks: BTreeMap<String, f64>,
    /// Tokens of the rendered candidate.
    pub tokens: usize,
    /// Tokens that carry loss.
    pub loss_tokens: usize,
    /// The candidate's training loss at the first checkpoint.
    pub loss: Option<f64>,
    /// Why it was not scored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}
