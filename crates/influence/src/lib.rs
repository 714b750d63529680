//! Optimizer-aware (LESS-style) influence of training samples on a target model's validation loss.
//!
//! Part of the [optimsyn](https://github.com/optimsyn/optimsyn) workspace. This crate is a
//! placeholder in the workspace layout; its API arrives with its own issue (see the README's
//! status table).
