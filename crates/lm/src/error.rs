//! The crate's one error type.

use std::path::PathBuf;

/// Everything that can go wrong loading or running a model. Each variant names what is at fault:
/// the file, the tensor, or the input row, so a user can find it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The model folder's JSON files (config, shard index, generation config) are missing or bad.
    #[error(transparent)]
    Folder(#[from] optimsyn_data_io::Error),
    /// A weights file could not be opened or mapped.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// A tensor in the checkpoint is missing, unexpected, of the wrong shape or of an unusable dtype.
    #[error("{}: tensor `{tensor}`: {message}", path.display())]
    Weight {
        /// The weights file (or the folder, for a tensor that no file holds).
        path: PathBuf,
        /// The tensor's name as the checkpoint spells it.
        tensor: String,
        /// What is wrong with it.
        message: String,
    },
    /// A LoRA adapter's configuration is missing, malformed or asks for what is not supported.
    #[error("{}: {message}", path.display())]
    Adapter {
        /// `adapter_config.json` or the weights file.
        path: PathBuf,
        /// What is wrong, naming the field.
        message: String,
    },
    /// Training produced a NaN or infinite loss or gradient norm; nothing of that step was saved.
    #[error(
        "step {step}: the loss is not finite ({value}) on examples [{ids}]; training stopped, the last checkpoint is intact (lower the learning rate or check those rows)"
    )]
    NonFiniteLoss {
        /// The optimizer step (1-based).
        step: u64,
        /// The value.
        value: f64,
        /// Ids of the examples of the failing micro-batch.
        ids: String,
    },
    /// The optimizer failed (its state file, a hyperparameter).
    #[error(transparent)]
    Optim(#[from] optimsyn_optim::Error),
    /// The input does not fit the model: token ids out of the vocabulary, a prompt longer than the
    /// context, mismatched shapes, an empty batch, a bad sampling parameter.
    #[error("{0}")]
    Input(String),
    /// A libtorch operation failed (out of memory, device mismatch, …); `op` says which step.
    #[error("{op}: {source}")]
    Torch {
        /// The model step that failed, e.g. `layer 3 attention`.
        op: String,
        /// libtorch's message.
        #[source]
        source: tch::TchError,
    },
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn input(message: impl Into<String>) -> Self {
        Error::Input(message.into())
    }

    pub(crate) fn weight(
        path: impl Into<PathBuf>,
        tensor: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Error::Weight {
            path: path.into(),
            tensor: tensor.into(),
            message: message.into(),
        }
    }
}

/// Adds the name of the failing step to a libtorch error.
pub(crate) trait TorchContext<T> {
    /// Wraps a `TchError` as [`Error::Torch`] naming `op`.
    fn op(self, op: &str) -> Result<T>;
    /// Like [`TorchContext::op`], with the step name built lazily.
    fn op_with(self, op: impl FnOnce() -> String) -> Result<T>;
}

impl<T> TorchContext<T> for std::result::Result<T, tch::TchError> {
    fn op(self, op: &str) -> Result<T> {
        self.map_err(|source| Error::Torch {
            op: op.to_string(),
            source,
        })
    }

    fn op_with(self, op: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Torch { op: op(), source })
    }
}
