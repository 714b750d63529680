//! GRPO trainer for any tch policy: advantages, clipped surrogate, KL estimators, checkpoint and resume.
//!
//! Part of the [optimsyn](https://github.com/optimsyn/optimsyn) workspace. This crate is a
//! placeholder in the workspace layout; its API arrives with its own issue (see the README's
//! status table).
