//! The crate's one error type.

use std::path::PathBuf;

/// Everything that can go wrong in this crate.
///
/// Errors about the state file name the file (`path`) and, where one is involved, the parameter
/// key or metadata key (`key`). A state that was never read from disk is named `<memory>`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading or writing the state file failed.
    #[error("{}: {action}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done ("cannot read", "cannot write temporary file", …).
        action: &'static str,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a valid safetensors file (truncated, corrupt header, bad offsets).
    #[error("{}: not a valid safetensors file (truncated or corrupt?): {source}", path.display())]
    Format {
        /// The file.
        path: PathBuf,
        /// The safetensors crate's diagnosis.
        #[source]
        source: safetensors::SafeTensorError,
    },
    /// A metadata entry of the state file is missing or cannot be parsed.
    #[error("{}: metadata `{key}`: {reason}", path.display())]
    Metadata {
        /// The file.
        path: PathBuf,
        /// The metadata key.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A tensor of the state file is malformed: wrong dtype, a moment without its partner,
    /// a tensor name that is neither `K.exp_avg` nor `K.exp_avg_sq`, mismatched shapes.
    #[error("{}: tensor `{key}`: {reason}", path.display())]
    Tensor {
        /// The file.
        path: PathBuf,
        /// The tensor name (or parameter key).
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A parameter registered in the optimizer has no moments in the state.
    #[error(
        "{}: parameter `{key}` is registered in the optimizer but has no moments in the state",
        path.display()
    )]
    MissingKey {
        /// The file.
        path: PathBuf,
        /// The parameter key.
        key: String,
    },
    /// The state holds moments for a key that no registered parameter has.
    #[error(
        "{}: the state has moments for `{key}` but no parameter with that key is registered \
         ({count} such key(s) in all)",
        path.display()
    )]
    ExtraKey {
        /// The file.
        path: PathBuf,
        /// The first such key (in sorted order).
        key: String,
        /// How many keys are extra.
        count: usize,
    },
    /// The moments' shape differs from the registered parameter's.
    #[error("{}: `{key}`: shape {file:?} in the state but {param:?} for the parameter", path.display())]
    ShapeMismatch {
        /// The file.
        path: PathBuf,
        /// The parameter key.
        key: String,
        /// The shape in the state.
        file: Vec<i64>,
        /// The registered parameter's shape.
        param: Vec<i64>,
    },
    /// The state was written with another weight decay or lr scale for a parameter than the
    /// group it is registered in now: resuming would silently change training.
    #[error(
        "{}: `{key}`: {name} is {file} in the state but {group} in the parameter's group",
        path.display()
    )]
    GroupMismatch {
        /// The file.
        path: PathBuf,
        /// The parameter key.
        key: String,
        /// `weight_decay` or `lr_scale`.
        name: &'static str,
        /// The value in the state.
        file: f64,
        /// The value of the registered parameter's group.
        group: f64,
    },
    /// A parameter key is registered twice.
    #[error("parameter `{key}` is registered twice")]
    DuplicateKey {
        /// The key.
        key: String,
    },
    /// A parameter cannot be optimized (does not require grad, unsupported dtype, unknown group).
    #[error("parameter `{key}`: {reason}")]
    InvalidParameter {
        /// The key.
        key: String,
        /// Why not.
        reason: String,
    },
    /// A hyperparameter is out of range (same checks as `torch.optim.AdamW`'s constructor).
    #[error("invalid {name}: {value} ({reason})")]
    InvalidHyperparameter {
        /// The hyperparameter.
        name: &'static str,
        /// Its value.
        value: f64,
        /// The accepted range.
        reason: &'static str,
    },
    /// The total gradient norm is NaN or infinite; the gradients were left untouched.
    #[error("total gradient norm is {norm}: gradients left unclipped")]
    NonFiniteGradNorm {
        /// The norm (NaN or ±inf).
        norm: f64,
    },
    /// A libtorch operation failed (device or dtype mismatch, out of memory, …).
    #[error("`{key}`: libtorch error: {source}")]
    Torch {
        /// The parameter key (or the operation) involved.
        key: String,
        /// libtorch's error.
        #[source]
        source: tch::TchError,
    },
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Wraps a libtorch error with the key it concerns.
pub(crate) fn torch(key: &str) -> impl FnOnce(tch::TchError) -> Error + '_ {
    move |source| Error::Torch {
        key: key.to_owned(),
        source,
    }
}
