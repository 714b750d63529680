//! What the trainer needs from a model: the [`Policy`] trait, the batches it is handed, and
//! helpers for implementing it over any causal LM.
//!
//! The trainer never sees a model. It asks the policy to *sample* `G` completions per prompt
//! (with the log-prob of each sampled token at the rollout temperature), to *recompute* those
//! log-probs with gradients on micro-batches, for its *trainable parameters* (to build the
//! optimizer), and to *save* and *load* itself for checkpoints. Log-probs are, as docs/GUIDE.md defines
//! them, `log_softmax(logits / T)` over the full vocabulary at the rollout temperature `T` (plain
//! `log_softmax` at `T = 0`), before any top-k/top-p truncation.
//!
//! The trait does not require `Sync` (libtorch tensors are `Send` only), nor `Send`.

use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result, TorchContext};

type TchResult<T> = std::result::Result<T, tch::TchError>;

/// How rollouts are sampled. Defaults: the released OptimSyn configuration (temperature 1.5,
/// top-p 1, top-k off, up to 8192 new tokens).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RolloutConfig {
    /// Sampling temperature; log-probs are recomputed at the same temperature. Default 1.5.
    pub temperature: f64,
    /// Nucleus mass in (0, 1]; 1 disables it. Default 1.0.
    pub top_p: f64,
    /// Keep the k most probable tokens; 0 disables it. Default 0.
    pub top_k: usize,
    /// Most tokens per completion (the stop token included). Default 8192.
    pub max_new_tokens: usize,
}

impl Default for RolloutConfig {
    fn default() -> Self {
        RolloutConfig {
            temperature: 1.5,
            top_p: 1.0,
            top_k: 0,
            max_new_tokens: 8192,
        }
    }
}

impl RolloutConfig {
    /// Rejects a negative or non-finite temperature, `top_p` outside (0, 1], `max_new_tokens = 0`.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(Error::config(
                "rollout.temperature",
                format!("must be finite and ≥ 0, got {}", self.temperature),
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::config(
                "rollout.top_p",
                format!("must be in (0, 1], got {}", self.top_p),
            ));
        }
        if self.max_new_tokens == 0 {
            return Err(Error::config("rollout.max_new_tokens", "must be > 0"));
        }
        Ok(())
    }
}

/// A request for `group_size` completions of each prompt.
///
/// Row `k * group_size + g` is sample `g` of prompt `k`; draw it from the random stream
/// `(seed, keys[row])` (for example `ChaCha8Rng::seed_from_u64(seed)` with `set_stream(key)`, as
/// optimsyn-lm's `generate` does), so that a row's completion depends on its prompt, seed and key
/// only: not on the batch, the row's position or the device.
#[derive(Debug, Clone)]
pub struct SampleRequest<'a> {
    /// The prompts' token ids (each non-empty).
    pub prompts: Vec<&'a [u32]>,
    /// Completions per prompt (G).
    pub group_size: usize,
    /// This step's sampling seed.
    pub seed: u64,
    /// One stream key per row, prompt-major (`prompts.len() × group_size` keys).
    pub keys: Vec<u64>,
    /// Temperature, truncation and length budget.
    pub sampling: RolloutConfig,
}

impl SampleRequest<'_> {
    /// Number of completions requested.
    pub fn rows(&self) -> usize {
        self.keys.len()
    }

    /// Each row's prompt and stream key, in row order (every prompt repeated `group_size` times).
    pub fn row_prompts(&self) -> impl Iterator<Item = (&[u32], u64)> + '_ {
        self.keys
            .iter()
            .enumerate()
            .map(|(row, &key)| (self.prompts[row / self.group_size.max(1)], key))
    }
}

/// One sampled completion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    /// Generated tokens only (ending with the stop token when one was produced).
    pub tokens: Vec<u32>,
    /// `logprobs[i]`: log-prob of `tokens[i]` given the prompt and `tokens[..i]` at the rollout
    /// temperature (same length as `tokens`).
    pub logprobs: Vec<f32>,
    /// Whether the completion hit the token budget instead of stopping.
    pub truncated: bool,
}

/// Prompt + completion pairs whose completion-token log-probs a policy must compute.
#[derive(Debug, Clone)]
pub struct TokenBatch<'a> {
    /// Prompt token ids per row (non-empty).
    pub prompts: Vec<&'a [u32]>,
    /// Completion token ids per row.
    pub completions: Vec<&'a [u32]>,
}

impl TokenBatch<'_> {
    /// Rows.
    pub fn len(&self) -> usize {
        self.prompts.len()
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.prompts.is_empty()
    }

    /// The longest completion: the `T` of the `[B, T]` tensors a policy returns.
    pub fn completion_width(&self) -> usize {
        self.completions.iter().map(|c| c.len()).max().unwrap_or(0)
    }

    /// The longest prompt.
    pub fn prompt_width(&self) -> usize {
        self.prompts.iter().map(|p| p.len()).max().unwrap_or(0)
    }

    /// `[B, T]` completion mask (1 for tokens, 0 for padding) as `kind` on `device`.
    pub fn completion_mask(&self, kind: Kind, device: Device) -> Result<Tensor> {
        let w = self.completion_width();
        let mut m = vec![0f32; self.len() * w];
        for (i, c) in self.completions.iter().enumerate() {
            m[i * w..i * w + c.len()].fill(1.0);
        }
        Tensor::f_from_slice(&m)
            .and_then(|t| t.f_view([self.len() as i64, w as i64]))
            .and_then(|t| t.f_to_kind(kind))
            .and_then(|t| t.f_to_device(device))
            .op("completion mask")
    }

    /// Packs the rows for a causal LM: prompts padded on the left to a common width `P`,
    /// completions padded on the right to `C` (see [`PackedBatch`]).
    pub fn pack(&self, device: Device) -> Result<PackedBatch> {
        if self.prompts.len() != self.completions.len() {
            return Err(Error::tensor(
                "batch",
                format!(
                    "{} prompts but {} completions",
                    self.prompts.len(),
                    self.completions.len()
                ),
            ));
        }
        if let Some(i) = self.prompts.iter().position(|p| p.is_empty()) {
            return Err(Error::tensor("batch", format!("row {i}: empty prompt")));
        }
        let (b, p, c) = (self.len(), self.prompt_width(), self.completion_width());
        let w = p + c;
        let mut ids = vec![0i64; b * w];
        let mut mask = vec![0i64; b * w];
        let mut targets = vec![0i64; b * c];
        for i in 0..b {
            let (pr, co) = (self.prompts[i], self.completions[i]);
            let start = p - pr.len();
            for (j, &t) in pr.iter().enumerate() {
                ids[i * w + start + j] = i64::from(t);
                mask[i * w + start + j] = 1;
            }
            for (j, &t) in co.iter().enumerate() {
                ids[i * w + p + j] = i64::from(t);
                mask[i * w + p + j] = 1;
                targets[i * c + j] = i64::from(t);
            }
        }
        let shape = |n: usize| [b as i64, n as i64];
        let f = || -> TchResult<PackedBatch> {
            Ok(PackedBatch {
                input_ids: Tensor::f_from_slice(&ids)?
                    .f_view(shape(w))?
                    .f_to_device(device)?,
                attention_mask: Tensor::f_from_slice(&mask)?
                    .f_view(shape(w))?
                    .f_to_device(device)?,
                targets: Tensor::f_from_slice(&targets)?
                    .f_view(shape(c))?
                    .f_to_device(device)?,
                prompt_width: p as i64,
                completion_width: c as i64,
            })
        };
        f().op("packing a token batch")
    }
}

/// A [`TokenBatch`] as tensors for a causal LM: row `i` is
/// `[pad … pad, prompt_i, completion_i, pad … pad]`, prompts ending at column `P`, so completion
/// token `t` of every row sits at column `P + t` and is predicted by the output at column
/// `P + t − 1`.
#[derive(Debug)]
pub struct PackedBatch {
    /// `[B, P + C]` i64 token ids (padding holds 0).
    pub input_ids: Tensor,
    /// `[B, P + C]` i64 attention mask (1 = real token).
    pub attention_mask: Tensor,
    /// `[B, C]` i64 completion tokens (the prediction targets; padding holds 0).
    pub targets: Tensor,
    /// `P`, the prompt width.
    pub prompt_width: i64,
    /// `C`, the completion width.
    pub completion_width: i64,
}

impl PackedBatch {
    /// From per-position outputs `[B, P + C, …]` (hidden states or logits), the `[B, C, …]`
    /// positions that predict the completion tokens (columns `P − 1 .. P + C − 1`).
    pub fn predicting(&self, per_position: &Tensor) -> Result<Tensor> {
        per_position
            .f_narrow(1, self.prompt_width - 1, self.completion_width)
            .op("selecting completion positions")
    }
}

/// `log_softmax(logits / T)` gathered at `targets` (`[B, C, V]` logits, `[B, C]` targets →
/// `[B, C]`), and, when asked, the entropy `−Σ p log p` of each position's distribution at the
/// same temperature. `T = 0` or `1` means no scaling. Computed in f32 (f64 logits stay f64).
pub fn logprobs_from_logits(
    logits: &Tensor,
    targets: &Tensor,
    temperature: f64,
    entropy: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    if !(temperature.is_finite() && temperature >= 0.0) {
        return Err(Error::tensor(
            "temperature",
            format!("must be finite and ≥ 0, got {temperature}"),
        ));
    }
    let f = || -> TchResult<(Tensor, Option<Tensor>)> {
        let l = if logits.kind() == Kind::Double {
            logits.shallow_clone()
        } else {
            logits.f_to_kind(Kind::Float)?
        };
        let l = if temperature == 0.0 || temperature == 1.0 {
            l
        } else {
            l.f_div_scalar(temperature)?
        };
        let lsm = l.f_log_softmax(-1, None::<Kind>)?;
        let lp = lsm
            .f_gather(-1, &targets.f_unsqueeze(-1)?, false)?
            .f_squeeze_dim(-1)?;
        let h = if entropy {
            Some(
                lsm.f_exp()?
                    .f_mul(&lsm)?
                    .f_sum_dim_intlist(&[-1i64][..], false, None::<Kind>)?
                    .f_neg()?,
            )
        } else {
            None
        };
        Ok((lp, h))
    };
    f().op("log-probs from logits")
}

/// A policy's per-token outputs for a [`TokenBatch`].
#[derive(Debug)]
pub struct PolicyLogprobs {
    /// `[B, C]` log-probs of the completion tokens at the requested temperature (`C` =
    /// [`TokenBatch::completion_width`]); values at padding are ignored.
    pub logprobs: Tensor,
    /// `[B, C]` entropies of each position's distribution at that temperature, when asked for and
    /// available.
    pub entropy: Option<Tensor>,
}

/// A trainable policy the GRPO trainer can sample from and update.
///
/// Contract (checked by the trainer, which reports a violation as
/// [`Error::PolicyOutput`](crate::Error::PolicyOutput)):
/// - [`sample`](Policy::sample) returns exactly [`SampleRequest::rows`] completions in row order,
///   each with one finite log-prob per token and at most `max_new_tokens` tokens;
/// - [`logprobs`](Policy::logprobs) returns `[B, C]` tensors on [`device`](Policy::device),
///   differentiable with respect to [`trainable_parameters`](Policy::trainable_parameters) when
///   gradients are enabled (the trainer calls it under `no_grad` for old and reference log-probs);
/// - the tensors of `trainable_parameters` require grad and stay the same tensors across calls:
///   the optimizer updates them in place;
/// - [`load`](Policy::load) restores exactly what [`save`](Policy::save) wrote (a resumed run is
///   bit-identical only if this round trip is).
pub trait Policy {
    /// The implementation's error.
    type Error: std::error::Error + Send + Sync + 'static;

    /// The device of the policy's tensors (advantages and masks are placed there).
    fn device(&self) -> Device;

    /// Samples `request.group_size` completions of every prompt (see [`SampleRequest`]).
    fn sample(&mut self, request: &SampleRequest<'_>) -> Result<Vec<Completion>, Self::Error>;

    /// Log-probs of each row's completion tokens given its prompt at `temperature` (and the
    /// entropies when `entropy` is true and the policy can compute them).
    fn logprobs(
        &self,
        batch: &TokenBatch<'_>,
        temperature: f64,
        entropy: bool,
    ) -> Result<PolicyLogprobs, Self::Error>;

    /// The reference policy's log-probs, for policies that hold their own reference (a LoRA
    /// policy with its adapter disabled). Used with [`Reference::Policy`]; the default has none.
    fn reference_logprobs(
        &self,
        batch: &TokenBatch<'_>,
        temperature: f64,
    ) -> Result<Option<Tensor>, Self::Error> {
        let _ = (batch, temperature);
        Ok(None)
    }

    /// The parameters to train, each with a stable unique name (it keys the optimizer state).
    fn trainable_parameters(&self) -> Vec<(String, Tensor)>;

    /// Writes everything needed to restore the trainable state into folder `dir` (it exists and is
    /// empty).
    fn save(&self, dir: &Path) -> Result<(), Self::Error>;

    /// Restores the state [`save`](Policy::save) wrote into `dir`.
    fn load(&mut self, dir: &Path) -> Result<(), Self::Error>;
}

/// Where the KL term's reference log-probs come from.
#[derive(Debug)]
pub enum Reference<P> {
    /// No reference: the KL coefficient must be 0.
    None,
    /// A frozen copy of the initial policy (for full fine-tuning); it is only ever evaluated under
    /// `no_grad`, never updated or saved. On resume, pass the same initial policy again.
    Frozen(P),
    /// The policy's own [`Policy::reference_logprobs`] (e.g. a LoRA policy's base model).
    Policy,
}
