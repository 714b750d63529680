//! The crate's one error type.

/// What can go wrong loading or starting a server. Errors of single requests are not here: they are
/// answered to the client in OpenAI's error shape and the server goes on serving.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading the tokenizer or the chat template failed.
    #[error(transparent)]
    Data(#[from] optimsyn_data_io::Error),
    /// Loading the model failed.
    #[error(transparent)]
    Lm(#[from] optimsyn_lm::Error),
    /// A setting is out of range.
    #[error("{field}: {message}")]
    Config {
        /// The setting, as its [`ServeConfig`](crate::ServeConfig) field is spelled.
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// The server could not bind its address or start its threads or runtime.
    #[error("serve {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: String,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
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
