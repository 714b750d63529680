//! AdamW with exportable moments, gradient clipping and learning-rate schedules over tch.
//!
//! Part of the [optimsyn](https://github.com/optimsyn/optimsyn) workspace. OptimSyn trains a
//! target model's LoRA adapter with AdamW during the warm-up and then *reads the Adam moments back*
//! to precondition influence gradients; the RL stage trains the rubric policy with the same
//! optimizer. libtorch's own optimizer cannot export its state, so this crate implements AdamW
//! itself, on `tch` tensors, and is shared by `optimsyn-lm` and `optimsyn-rl-grpo` so neither
//! depends on the other.
//!
//! - [`AdamW`]: parameters registered by the key their file uses (e.g. the PEFT key
//!   `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`), [`ParamGroup`]s with
//!   their own weight decay (no-decay groups) and lr multiplier, bias correction and decoupled
//!   weight decay exactly as `torch.optim.AdamW` (bit-identical in `f32` on the CPU).
//! - [`clip_grad_norm`]: `torch.nn.utils.clip_grad_norm_` (L2), with a non-finite norm reported
//!   as [`Error::NonFiniteGradNorm`].
//! - [`LrSchedule`]: transformers' constant / linear / cosine schedules with warm-up.
//! - [`OptimizerState`]: the `optimizer.safetensors` file (`K.exp_avg`, `K.exp_avg_sq` per
//!   parameter key `K`, metadata `step`, `beta1`, `beta2`, `eps`, `lr`, …; see [`state`]), saved
//!   atomically and loaded with strict checks; other tools (the influence estimator) read the
//!   moments through it without building an optimizer.
//!
//! # Example
//!
//! A training loop in miniature: one parameter in a decay group and one in a no-decay group, a
//! warm-up + cosine schedule, clipping, then save and resume.
//!
//! ```
//! use optimsyn_optim::{AdamW, AdamWConfig, LrSchedule, OptimizerState, ParamGroup};
//! use tch::{Kind, Tensor};
//!
//! # fn main() -> Result<(), optimsyn_optim::Error> {
//! let w = Tensor::ones([2, 3], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
//! let b = Tensor::zeros([2], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
//!
//! let base_lr = 1e-2;
//! let mut opt = AdamW::new(AdamWConfig { lr: base_lr, weight_decay: 0.1, ..Default::default() })?;
//! let no_decay = opt.add_group(ParamGroup::no_decay("no_decay"))?;
//! opt.add("layer.lora_A.weight", &w)?;
//! opt.add_to(no_decay, "layer.bias", &b)?;
//!
//! let schedule = LrSchedule::cosine(2, 10);
//! for _ in 0..5 {
//!     opt.zero_grad();
//!     let loss = (w.sum(Kind::Float) + b.sum(Kind::Float)).square();
//!     loss.backward();
//!     let _norm = opt.clip_grad_norm(1.0)?; // an error if the norm is NaN or infinite
//!     opt.set_scheduled_lr(&schedule, base_lr); // base_lr × multiplier(steps so far)
//!     opt.step()?;
//! }
//!
//! let dir = std::env::temp_dir().join(format!("optimsyn-optim-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir).expect("temp dir");
//! let path = dir.join("optimizer.safetensors");
//! opt.save(&path)?;
//!
//! // Anyone can read the moments back by key…
//! let state = OptimizerState::load(&path)?;
//! assert_eq!(state.step, 5);
//! assert_eq!(state.exp_avg_sq("layer.lora_A.weight").map(|v| v.size()), Some(vec![2, 3]));
//!
//! // …and a new optimizer over the same keys resumes exactly where this one stopped.
//! let mut resumed = AdamW::new(AdamWConfig { lr: base_lr, weight_decay: 0.1, ..Default::default() })?;
//! let no_decay = resumed.add_group(ParamGroup::no_decay("no_decay"))?;
//! resumed.add("layer.lora_A.weight", &w)?;
//! resumed.add_to(no_decay, "layer.bias", &b)?;
//! resumed.load(&path)?;
//! assert_eq!(resumed.step_count(), 5);
//! # std::fs::remove_dir_all(&dir).expect("clean up");
//! # Ok(())
//! # }
//! ```
//!
//! # Linking
//!
//! Like every crate that links libtorch, test and binary targets need an rpath to libtorch's lib
//! folder; this crate's `build.rs` adds it for its own targets.
#![deny(missing_docs)]

mod adamw;
mod clip;
mod config;
mod error;
mod schedule;
pub mod state;

pub use adamw::{AdamW, GroupId, ParamGroup};
pub use clip::{clip_grad_norm, grad_norm};
pub use config::AdamWConfig;
pub use error::{Error, Result};
pub use schedule::LrSchedule;
pub use state::{OptimizerState, ParamState};
