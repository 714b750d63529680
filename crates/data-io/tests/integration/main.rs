//! optimsyn-data-io integration tests (one binary).
#![allow(clippy::unwrap_used)]

mod chat_parity;
mod fuzz;
mod jsonl_props;
mod model_folder;
