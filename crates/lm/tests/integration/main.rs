//! optimsyn-lm integration tests: one binary, so libtorch is linked once.

mod libtorch;
