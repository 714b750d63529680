//! optimsyn-synth integration tests: one binary (one libtorch link), a module per area.

mod common;
mod driver;
mod faults;
mod local;
mod prompts;
mod qa_props;
mod tiny;
