//! optimsyn-influence integration tests: one binary, so libtorch is linked once.
#![allow(clippy::unwrap_used)] // test helpers: a failed unwrap is the test failing

mod common;
mod exact;
mod grads;
mod projection;
mod trained;
