//! optimsyn-rl-grpo integration tests, in one binary (one link step against libtorch).
#![allow(clippy::unwrap_used)] // test helpers: a failed unwrap is the test failing
#![allow(clippy::field_reassign_with_default)] // configs read best as "defaults, then these"
//!
//! - `loss_properties`: the objective's invariants in f64: finite-difference gradients in every
//!   mode, micro-batch token-mean = full-batch token-mean, zero advantage ⇒ zero policy gradient,
//!   k3 ≥ 0 and = 0 at the reference, padding inertness (proptest where it fits);
//! - `trl_parity`: losses, gradients and metrics equal TRL's on the fixture
//!   `python/fixtures/grpo_trl.py` wrote;
//! - `trainer`: the loop on the toy policy: metrics rows, resume = uninterrupted run, micro-batch
//!   size invariance, contract and reward errors;
//! - `lm_end_to_end`: a tiny optimsyn-lm Qwen3 learns to emit a target token, for several seeds.

mod common;
mod lm_end_to_end;
mod loss_properties;
mod trainer;
mod trl_parity;
