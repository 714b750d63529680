//! optimsyn-serve integration tests: one binary (one libtorch link), a module per area.

mod abuse;
mod common;
mod completions;
mod fuzz;
mod lora;
// The byte and JSON mutations of optimsyn-data-io's fuzz properties; this binary uses a part.
#[allow(dead_code)]
#[path = "../../../data-io/tests/integration/fuzz/mutate.rs"]
mod mutate;
mod openai_python;
mod serve;
#[path = "../../../synth/tests/integration/tiny.rs"]
mod tiny;
