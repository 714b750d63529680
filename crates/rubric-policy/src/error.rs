//! The crate's one error type.

use std::path::PathBuf;

/// What can go wrong building prompts or running the policy.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A template does not parse or render (names the template and the problem).
    #[error("template `{name}`: {message}")]
    Template {
        /// Which template.
        name: String,
        /// minijinja's message.
        message: String,
    },
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// Tokenizer or chat-template trouble.
    #[error(transparent)]
    Data(#[from] optimsyn_data_io::Error),
    /// The model failed.
    #[error(transparent)]
    Lm(#[from] optimsyn_lm::Error),
    /// A libtorch operation failed.
    #[error("{op}: {source}")]
    Torch {
        /// The step.
        op: String,
        /// libtorch's message.
        #[source]
        source: tch::TchError,
    },
    /// Bad input (an empty batch, mismatched lengths).
    #[error("{0}")]
    Input(String),
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
