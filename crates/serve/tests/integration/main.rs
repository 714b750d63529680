//! optimsyn-serve integration tests: one binary (one libtorch link), a module per area.

mod abuse;
mod common;
mod completions;
mod lora;
mod openai_python;
mod serve;
#[path = "../../../synth/tests/integration/tiny.rs"]
mod tiny;
