//! The crate's one error type.

use std::path::PathBuf;

/// What can go wrong cleaning data. Each variant names the file (and line) or the setting at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading or writing a JSONL file failed (the message names file, line and field).
    #[error(transparent)]
    Data(#[from] optimsyn_data_io::Error),
    /// A row has no text to check, or text of the wrong shape.
    #[error("{}:{line}: {message}", path.display())]
    Row {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: u64,
        /// What is wrong, naming the field.
        message: String,
    },
    /// Decontamination was asked for against reference files that hold no indexable text.
    #[error("the reference set is empty: {files} hold no rows to decontaminate against")]
    EmptyReference {
        /// The files, comma-separated.
        files: String,
    },
    /// A setting is out of range.
    #[error("{0}")]
    Config(String),
    /// Writing output failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;
