//! Integration tests of `optimsyn-optim`, in one binary (one link step against libtorch).
//!
//! - `parity`: AdamW + clipping + schedules against `torch.optim.AdamW`, `clip_grad_norm_` and
//!   transformers' schedules, replaying the fixture `python/fixtures/optim_adamw.py` made;
//! - `resume`: save → load → continue equals an uninterrupted run, bit for bit;
//! - `bad_state`: truncated, corrupt and mismatched state files give errors naming file and key.

mod bad_state;
mod common;
mod parity;
mod resume;
