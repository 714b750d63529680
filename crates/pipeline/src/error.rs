//! The crate's one error type.

use std::path::{Path, PathBuf};

/// Everything that can go wrong running the method. Errors of the crates the pipeline drives
/// pass through unchanged (they name their file, row and field); the pipeline's own errors name
/// the config key, the run-folder file or the stage at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The run config is unreadable or a value is out of range; the message names the file and
    /// the key.
    #[error("{0}")]
    Config(String),
    /// Reading or writing a file of the run folder failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// A file of the run folder holds something else than the pipeline wrote there.
    #[error("{}: {message}", path.display())]
    RunFolder {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A stage cannot go on (no valid sample, no checkpoint yet, a generator failure); the
    /// message says what to do.
    #[error("{0}")]
    Stage(String),
    /// A device or dtype name is not one the pipeline knows, or the device is not there.
    #[error("{0}")]
    Device(String),
    /// Reading or writing a dataset or JSONL file.
    #[error(transparent)]
    Data(#[from] optimsyn_data_io::Error),
    /// Loading, running or fine-tuning a model.
    #[error(transparent)]
    Lm(#[from] optimsyn_lm::Error),
    /// Influence scoring.
    #[error(transparent)]
    Influence(#[from] optimsyn_influence::Error),
    /// GRPO training (a reward error arrives here, wrapped with its step).
    #[error(transparent)]
    Grpo(#[from] optimsyn_rl_grpo::Error),
    /// The rubric policy.
    #[error(transparent)]
    Policy(#[from] optimsyn_rubric_policy::Error),
    /// QA generation.
    #[error(transparent)]
    Synth(#[from] optimsyn_synth::Error),
    /// Decontamination, deduplication, dataset cards.
    #[error(transparent)]
    Hygiene(#[from] optimsyn_hygiene::Error),
    /// Serializing a row (cannot happen for the pipeline's own types; kept for completeness).
    #[error("cannot serialize: {0}")]
    Json(#[from] serde_json::Error),
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An I/O error on `path`.
    pub(crate) fn io(path: impl AsRef<Path>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.as_ref().to_path_buf();
        move |source| Error::Io { path, source }
    }

    /// A run-folder file that holds something unexpected.
    pub(crate) fn run_folder(path: impl AsRef<Path>, message: impl std::fmt::Display) -> Error {
        Error::RunFolder {
            path: path.as_ref().to_path_buf(),
            message: message.to_string(),
        }
    }
}
