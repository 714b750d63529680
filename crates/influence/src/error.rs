//! The crate's one error type.

use std::path::PathBuf;

/// What can go wrong scoring influence. Each variant names the file, tensor or example at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Loading or running the target model or its adapter failed.
    #[error(transparent)]
    Lm(#[from] optimsyn_lm::Error),
    /// An optimizer-state file is missing, malformed or lacks a parameter's moments.
    #[error(transparent)]
    Optim(#[from] optimsyn_optim::Error),
    /// A data file (examples, model folder, tokenizer) is missing or malformed.
    #[error(transparent)]
    Data(#[from] optimsyn_data_io::Error),
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// A checkpoint folder does not fit the model or the other checkpoints.
    #[error("{}: {message}", path.display())]
    Checkpoint {
        /// The checkpoint folder or file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Bad arguments or inputs (an empty validation set, an unknown option).
    #[error("{0}")]
    Input(String),
    /// A libtorch operation failed.
    #[error("{op}: {source}")]
    Torch {
        /// The step that failed.
        op: String,
        /// libtorch's message.
        #[source]
        source: tch::TchError,
    },
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) trait TorchContext<T> {
    fn op(self, op: &str) -> Result<T>;
}

impl<T> TorchContext<T> for std::result::Result<T, tch::TchError> {
    fn op(self, op: &str) -> Result<T> {
        self.map_err(|source| Error::Torch {
            op: op.to_string(),
            source,
        })
    }
}
