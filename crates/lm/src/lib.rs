//! Hugging Face causal language models (Qwen2, Qwen3, Llama) over libtorch: strict loading,
//! batched forward with padding, per-token log-probs, and KV-cache generation.
//!
//! Part of the [optimsyn](https://github.com/optimsyn/optimsyn) workspace. Every model-side step of
//! the method runs through this crate: the rubric policy and the generator sample from a
//! [`CausalLm`], GRPO and influence differentiate its [`CausalLm::token_logprobs`].
//!
//! The pipeline, from a model folder to numbers:
//!
//! 1. [`CausalLm::load`] opens a Hugging Face folder (`config.json`, `model.safetensors` or a
//!    sharded index), memory-maps the weights, checks every tensor's name and shape against the
//!    config (a missing, unexpected or misshapen tensor is an error naming it), and casts to the
//!    compute kind on the chosen device.
//! 2. [`CausalLm::forward`] maps `[B, T]` ids and a `[B, T]` attention mask to `[B, T, vocab]`
//!    logits. Padding may be on either side: RoPE positions are counted from the mask, and padding
//!    keys are never attended to, so a row's result does not depend on its batch.
//! 3. [`CausalLm::token_logprobs`] gives `log p(ids[i+1] | ids[..=i])` under
//!    `log_softmax(logits / T)`, with autograd when the weights require grad.
//! 4. [`CausalLm::generate`] decodes left-padded prompts with a [`KvCache`], greedy or sampled
//!    (temperature, top-k, top-p) from per-row ChaCha streams keyed by `(seed, row key)`, so a seed
//!    gives the same tokens at any batch size and on any device.
//!
//! On an AVX-512 CPU, projections of 1–8 rows without gradients (decoding) run on the crate's own
//! kernel, which streams the weights faster than MKL does at so few rows (docs/PERFORMANCE.md);
//! `OPTIMSYN_SMALL_GEMM=off` sends them to libtorch instead. The training loss projects only the
//! loss positions through a frozen output layer, in chunks, without a `[B, T, vocab]` tensor.
//!
//! ```no_run
//! use optimsyn_lm::{CausalLm, LoadOptions, SamplingParams, row_key};
//!
//! # fn main() -> optimsyn_lm::Result<()> {
//! let model = CausalLm::load("models/qwen3-0.6b", LoadOptions::default())?;
//! let seq: &[u32] = &[151644, 872, 198, 9707];
//! let logprobs = model.sequence_logprobs(&[seq], 1.0)?; // 3 values
//! let params = SamplingParams { max_new_tokens: 16, temperature: 0.0, stop_tokens: model.eos_token_ids().to_vec(), ..Default::default() };
//! let out = model.generate(&[seq], &[row_key("row-1")], &params)?;
//! println!("{:?} {:?} {:?}", logprobs, out[0].tokens, out[0].logprobs);
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

mod cache;
mod choose;
mod error;
mod generate;
pub mod lora;
pub mod loss;
mod model;
mod rope;
mod sampling;
mod save;
pub mod sft;
mod small_gemm;
mod weights;

pub use cache::KvCache;
pub use choose::sample_rows;
pub use error::{Error, Result};
pub use generate::{FinishReason, Generation, PaddedBatch};
pub use lora::{Bypassed, DropoutOn, LoraAdapter, LoraConfig, LoraModule, TargetModules};
pub use loss::{LossBatch, MaskedSeq};
pub use model::{
    Attention, CausalLm, DecoderLayer, Linear, LinearAdapter, LoadOptions, Mlp, RmsNorm,
    log_softmax_at, logprobs_of,
};
pub use sampling::{RowRng, SamplingParams, argmax, row_key, sample};
pub use sft::{
    DataInfo, EvalReport, LossReduction, ScheduleKind, SftConfig, SftReport, StepMetrics,
    TrainExample, Trainable, TrainingRecord,
};
/// The tch this crate is built on: tensors passed to and from its API are of this version, so
/// code that uses both needs no version of its own to keep in step.
pub use tch;
pub use weights::{WeightStore, kind_of_dtype};
