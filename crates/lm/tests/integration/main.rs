//! optimsyn-lm integration tests: one binary, so libtorch is linked once.

mod bad_input;
mod common;
mod cuda;
mod generation;
mod libtorch;
mod lora_parity;
mod parity;
mod training;
