//! Data in and out of optimsyn, with no libtorch: dataset rows and crash-safe JSONL, Hugging Face
//! model folders, tokenizers and chat templates, and the rendering of a chat example into token ids
//! plus a loss mask.
//!
//! ```
//! use optimsyn_data_io::{ChatExample, ChatFormat, ChatTokenizer};
//! # let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/chat/chatml");
//! let tok = ChatTokenizer::from_model_dir(dir)?;
//! let example = ChatExample::qa("What is the capital of France?", "Paris.");
//! let enc = tok.encode_example(&example, ChatFormat::ChatTemplate, None, &Default::default())?;
//! // Only the answer and the end-of-turn token carry loss.
//! let trained: Vec<u32> = enc.tokens.iter().zip(&enc.loss_mask)
//!     .filter(|(_, m)| **m == 1).map(|(t, _)| *t).collect();
//! assert_eq!(tok.decode(&trained, false)?, "Paris.<|im_end|>");
//! # Ok::<(), optimsyn_data_io::Error>(())
//! ```
#![deny(missing_docs)]

pub mod error;
pub mod hf;
pub mod jsonl;
pub mod rows;
pub mod template;
pub mod tokenizer;

pub use error::{Error, Result};
pub use hf::{
    Architecture, GenerationConfig, ModelConfig, ModelFolder, RopeScaling, SafetensorsHeader,
    TensorInfo,
};
pub use jsonl::{
    JsonlReader, JsonlWriter, ReadStats, read_jsonl, truncate_rows_after, write_atomic,
};
pub use rows::{
    ChatExample, ChatMessage, Overlap, Provenance, Role, SamplingParams, SeedDoc, SyntheticSample,
};
pub use template::{ChatTemplate, Rendered};
pub use tokenizer::{ChatFormat, ChatTokenizer, EncodedExample};

/// A stable content hash (BLAKE3, hex) of a data file, recorded in `training.json` so an adapter
/// remembers exactly what it was trained on.
pub fn file_hash(path: impl AsRef<std::path::Path>) -> Result<String> {
    let path = path.as_ref();
    let mut hasher = blake3::Hasher::new();
    hasher
        .update_reader(std::fs::File::open(path).map_err(|e| Error::io(path, e))?)
        .map_err(|e| Error::io(path, e))?;
    Ok(hasher.finalize().to_hex().to_string())
}
