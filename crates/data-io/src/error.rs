//! The crate's one error type.

use std::path::PathBuf;

/// Everything that can go wrong reading or writing optimsyn data. Each variant names the file
/// (and, where it applies, the line and field) so a user can find the bad input.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The file could not be opened, read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// A JSONL row is malformed or does not match the expected shape.
    #[error("{}:{line}: {message}", path.display())]
    Row {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: u64,
        /// What is wrong, naming the field when one is at fault.
        message: String,
    },
    /// A JSON file (config, index, tokenizer config) is malformed or inconsistent.
    #[error("{}: {message}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the field when one is at fault.
        message: String,
    },
    /// The tokenizer could not be loaded or failed to encode/decode.
    #[error("tokenizer {}: {message}", path.display())]
    Tokenizer {
        /// The `tokenizer.json` in use.
        path: PathBuf,
        /// The tokenizers library's message.
        message: String,
    },
    /// The chat template failed to compile or render.
    #[error("chat template ({origin}): {message}")]
    Template {
        /// Where the template came from (a file path, or `tokenizer_config.json`).
        origin: String,
        /// minijinja's message, including the template's own `raise_exception` text.
        message: String,
    },
    /// A chat example cannot be rendered in the requested format.
    #[error("example {id}: {message}")]
    Example {
        /// The example's id (or its position when it has none).
        id: String,
        /// What is wrong.
        message: String,
    },
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<optimsyn_fsio::Error> for Error {
    /// Keeps what was being done ("cannot rename temporary file over") in the I/O message, since
    /// [`Error::Io`] has no field for it.
    fn from(e: optimsyn_fsio::Error) -> Self {
        match e {
            optimsyn_fsio::Error::Io {
                path,
                action,
                source,
            } => Error::Io {
                path,
                source: std::io::Error::new(source.kind(), format!("{action}: {source}")),
            },
            other => Error::Io {
                path: std::path::PathBuf::new(),
                source: std::io::Error::other(other.to_string()),
            },
        }
    }
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn invalid(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Invalid {
            path: path.into(),
            message: message.into(),
        }
    }
}
