//! Scoring settings.

use std::path::PathBuf;

use optimsyn_data_io::ChatFormat;
use serde::{Deserialize, Serialize};

use crate::precond::Precond;
use crate::project::ProjectorKind;

/// How per-subtask scores become one influence value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SubtaskAgg {
    /// The largest subtask mean (LESS and the released OptimSyn code).
    #[default]
    Max,
    /// The mean of the subtask means.
    Mean,
}

impl std::str::FromStr for SubtaskAgg {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "max" => Ok(SubtaskAgg::Max),
            "mean" => Ok(SubtaskAgg::Mean),
            o => Err(format!(
                "unknown subtask aggregation `{o}` (expected max or mean)"
            )),
        }
    }
}

/// Scoring settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoreConfig {
    /// Projection (default dense, k 8192, seed 0).
    pub projector: ProjectorKind,
    /// Training-side preconditioning.
    pub precond: Precond,
    /// Subtask aggregation.
    pub subtask_agg: SubtaskAgg,
    /// Data format; `None` takes the adapters' `training.json` (required when they lack one).
    pub format: Option<ChatFormat>,
    /// Truncate examples to this many tokens.
    pub max_len: Option<usize>,
    /// Most padded tokens per backward pass.
    pub max_batch_tokens: usize,
    /// Cache the dense projection matrix when it takes at most this many bytes.
    pub cache_bytes: usize,
    /// Where validation features are stored and reused (default: beside each adapter, in
    /// `influence-features/`).
    pub features_dir: Option<PathBuf>,
}

impl Default for ScoreConfig {
    fn default() -> Self {
        ScoreConfig {
            projector: ProjectorKind::Dense { k: 8192, seed: 0 },
            precond: Precond::Released,
            subtask_agg: SubtaskAgg::Max,
            format: None,
            max_len: None,
            max_batch_tokens: 4096,
            cache_bytes: 1 << 30,
            features_dir: None,
        }
    }
}
