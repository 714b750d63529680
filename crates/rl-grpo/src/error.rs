//! The crate's one error type.

use std::path::PathBuf;

/// A boxed error from code outside this crate: a [`Policy`](crate::Policy) implementation or a
/// reward function.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong in GRPO training. Each variant names what is at fault: a
/// configuration field, the policy, the reward function (with the rollout), a tensor argument, a
/// checkpoint file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration value is out of range or inconsistent with another.
    #[error("invalid GRPO config: `{field}`: {reason}")]
    Config {
        /// The field, as the serde config spells it (e.g. `loss.clip_low`).
        field: &'static str,
        /// What is wrong and what is accepted.
        reason: String,
    },
    /// The prompt set is unusable (empty, an empty prompt, a duplicate id).
    #[error("prompts: {0}")]
    Prompts(String),
    /// The policy implementation returned an error.
    #[error("policy `{op}` failed: {source}")]
    Policy {
        /// The trait method: `sample`, `logprobs`, `reference_logprobs`, `save`, `load`.
        op: &'static str,
        /// The implementation's error.
        #[source]
        source: BoxError,
    },
    /// The policy returned something that breaks the [`Policy`](crate::Policy) contract (wrong
    /// number of completions, log-probs that do not match the tokens, a tensor of the wrong shape).
    #[error("policy `{op}` broke its contract: {message}")]
    PolicyOutput {
        /// The trait method.
        op: &'static str,
        /// What was expected and what came back.
        message: String,
    },
    /// The reward function returned an error.
    #[error("reward function failed at step {step}: {source}")]
    Reward {
        /// The training step (1-based).
        step: u64,
        /// The reward function's error.
        #[source]
        source: BoxError,
    },
    /// The reward function returned the wrong number of rewards or a non-finite one.
    #[error("reward function at step {step}: {message}")]
    RewardOutput {
        /// The training step (1-based).
        step: u64,
        /// What is wrong, naming the rollout (prompt id and sample index).
        message: String,
    },
    /// A tensor argument of a loss function has the wrong shape, dtype or device.
    #[error("`{argument}`: {message}")]
    Tensor {
        /// The argument (e.g. `old_logprobs`).
        argument: &'static str,
        /// What was expected and what was given.
        message: String,
    },
    /// The loss or the gradient norm of an optimizer step is NaN or infinite; the step was not
    /// applied.
    #[error(
        "step {step}: {what} is not finite ({value}) on prompts [{prompts}]; the update was not applied \
         (lower the learning rate, or check those prompts' rewards and the policy's log-probs)"
    )]
    NonFinite {
        /// The training step (1-based).
        step: u64,
        /// `loss` or `gradient norm`.
        what: &'static str,
        /// The offending value.
        value: f64,
        /// Ids of the prompts whose rollouts were in the failing micro-batch or mini-batch.
        prompts: String,
    },
    /// The optimizer failed (a hyperparameter, its state file).
    #[error(transparent)]
    Optim(#[from] optimsyn_optim::Error),
    /// Writing or reading a JSONL or JSON file failed.
    #[error(transparent)]
    Data(#[from] optimsyn_data_io::Error),
    /// A checkpoint is missing, corrupt, or does not match the run that tries to resume from it.
    #[error("{}: {message}", path.display())]
    Checkpoint {
        /// The checkpoint folder or file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A file-system operation failed.
    #[error("{}: {action}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// What was being done.
        action: &'static str,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// A libtorch operation failed (device mismatch, out of memory, …); `op` says which.
    #[error("{op}: libtorch error: {source}")]
    Torch {
        /// The computation that failed (e.g. `surrogate`).
        op: &'static str,
        /// libtorch's error.
        #[source]
        source: tch::TchError,
    },
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn config(field: &'static str, reason: impl Into<String>) -> Self {
        Error::Config {
            field,
            reason: reason.into(),
        }
    }

    pub(crate) fn tensor(argument: &'static str, message: impl Into<String>) -> Self {
        Error::Tensor {
            argument,
            message: message.into(),
        }
    }

    pub(crate) fn policy_output(op: &'static str, message: impl Into<String>) -> Self {
        Error::PolicyOutput {
            op,
            message: message.into(),
        }
    }

    pub(crate) fn checkpoint(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Checkpoint {
            path: path.into(),
            message: message.into(),
        }
    }

    pub(crate) fn io(
        path: impl Into<PathBuf>,
        action: &'static str,
        source: std::io::Error,
    ) -> Self {
        Error::Io {
            path: path.into(),
            action,
            source,
        }
    }
}

/// Attaches an operation name to libtorch errors.
pub(crate) trait TorchContext<T> {
    fn op(self, op: &'static str) -> Result<T>;
}

impl<T> TorchContext<T> for std::result::Result<T, tch::TchError> {
    fn op(self, op: &'static str) -> Result<T> {
        self.map_err(|source| Error::Torch { op, source })
    }
}
