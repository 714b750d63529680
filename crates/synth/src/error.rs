//! The crate's one error type.

use std::time::Duration;

/// Everything that can go wrong generating QA pairs. Each variant names what is
/// at fault: the file, the template, the endpoint URL, the prompt key or the setting.
///
/// A generated text that is not a usable QA pair is not an error: it becomes a sample with a
/// [`Rejection`](crate::Rejection).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading or writing a data file, a tokenizer or a chat template failed.
    #[error(transparent)]
    Data(#[from] optimsyn_data_io::Error),
    /// Loading or running the local model failed.
    #[error(transparent)]
    Lm(#[from] optimsyn_lm::Error),
    /// A generator prompt template failed to compile or render.
    #[error("prompt template {origin}: {message}")]
    Template {
        /// The template file, or `built-in <name>`.
        origin: String,
        /// minijinja's message.
        message: String,
    },
    /// A setting is out of range or inconsistent.
    #[error("{field}: {message}")]
    Config {
        /// The setting, as its config field or flag is spelled.
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// The endpoint answered with an error status (after retrying the retryable ones).
    #[error("{url}: HTTP {status} after {attempts} attempt(s): {message}")]
    Status {
        /// The request URL.
        url: String,
        /// The HTTP status code.
        status: u16,
        /// The server's error message (OpenAI's `error.message` when present, else the body).
        message: String,
        /// Requests made, the first included.
        attempts: u32,
    },
    /// The endpoint could not be reached or the connection broke (refused, reset, closed early).
    #[error("{url}: connection failed after {attempts} attempt(s): {message}")]
    Transport {
        /// The request URL.
        url: String,
        /// What the network layer said.
        message: String,
        /// Requests made, the first included.
        attempts: u32,
    },
    /// The endpoint did not answer within the timeout.
    #[error("{url}: no complete reply within {after:?}, {attempts} attempt(s)")]
    Timeout {
        /// The request URL.
        url: String,
        /// The per-request timeout.
        after: Duration,
        /// Requests made, the first included.
        attempts: u32,
    },
    /// The endpoint answered 200 with a body that is not an OpenAI chat completion.
    #[error("{url}: malformed reply after {attempts} attempt(s): {message}")]
    MalformedReply {
        /// The request URL.
        url: String,
        /// What is missing or wrong, naming the field.
        message: String,
        /// Requests made, the first included.
        attempts: u32,
    },
    /// The local generator could not run one prompt (too long for the context, a failed batch).
    #[error("prompt {key}: {message}")]
    Generation {
        /// The prompt's key (the sample id).
        key: String,
        /// What went wrong.
        message: String,
    },
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn config(field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Config {
            field: field.into(),
            message: message.into(),
        }
    }
}
