//! The [`Generator`] trait: a batch of chat prompts in, one completion per prompt out, whatever
//! runs the model (this process, or an OpenAI-compatible server).
//!
//! Seeding is shared by every backend so that moving generation from the local model to
//! `optimsyn serve` does not change what is sampled: a prompt with key `k` under run seed `s` asks
//! for [`request_seed`]`(s, k)` (the OpenAI `seed` field), and a request seed `r` draws its choice
//! `j` from the ChaCha stream [`stream_key`]`(r, j)` of generator seed 0. At temperature 0 nothing
//! is drawn and every backend is greedy.

use std::ops::ControlFlow;

use optimsyn_data_io::ChatMessage;
// SplitMix64's output function, from its one home: request seeds depend on its exact bits.
use optimsyn_fsio::hash::splitmix64_mix as mix64;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One chat prompt for a generator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatPrompt {
    /// A stable key (the sample id, plus the attempt for retries): it selects the random stream,
    /// so a prompt gets the same completion whatever batch or order it is generated in.
    pub key: String,
    /// The conversation to continue (the generation prompt is added by the backend).
    pub messages: Vec<ChatMessage>,
}

/// Why a completion ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// A stop token or stop string.
    Stop,
    /// The token budget or the model's context ran out.
    Length,
    /// Anything else a remote server reported (`content_filter`, …).
    Other(String),
}

impl FinishReason {
    /// OpenAI's spelling (`stop`, `length`, or the server's own word).
    pub fn as_str(&self) -> &str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Other(s) => s,
        }
    }

    /// Reads OpenAI's spelling.
    pub fn parse(s: &str) -> Self {
        match s {
            "stop" => FinishReason::Stop,
            "length" => FinishReason::Length,
            other => FinishReason::Other(other.to_string()),
        }
    }
}

impl From<optimsyn_lm::FinishReason> for FinishReason {
    /// A local model's row: it stops on a stop token or runs out of budget.
    fn from(r: optimsyn_lm::FinishReason) -> Self {
        match r {
            optimsyn_lm::FinishReason::Stop => FinishReason::Stop,
            optimsyn_lm::FinishReason::Length => FinishReason::Length,
        }
    }
}

/// A generator's reply to one prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    /// The generated text (special tokens skipped).
    pub text: String,
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// Prompt length in tokens, when the backend reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens: Option<u64>,
    /// Completion length in tokens, when the backend reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_tokens: Option<u64>,
}

/// How a generator samples. The defaults follow the reference code's RL-time teacher: greedy
/// (temperature 0), a budget of 2048 new tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GenerationParams {
    /// Most new tokens per completion (the stop token included). Default 2048.
    pub max_new_tokens: usize,
    /// Softmax temperature; 0 is greedy. Default 0.
    pub temperature: f64,
    /// Nucleus mass in (0, 1]; 1 disables it. Default 1.
    pub top_p: f64,
    /// Keep the k most probable tokens; 0 disables it. Default 0.
    pub top_k: usize,
    /// Run seed; each prompt's draw is keyed by (seed, prompt key). Default 0.
    pub seed: u64,
}

impl Default for GenerationParams {
    fn default() -> Self {
        GenerationParams {
            max_new_tokens: 2048,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
        }
    }
}

impl GenerationParams {
    /// Greedy decoding of at most `max_new_tokens`.
    pub fn greedy(max_new_tokens: usize) -> Self {
        GenerationParams {
            max_new_tokens,
            ..Default::default()
        }
    }

    /// Rejects out-of-range settings, naming the field.
    pub fn validate(&self) -> Result<()> {
        if self.max_new_tokens == 0 {
            return Err(Error::config("max_new_tokens", "must be at least 1"));
        }
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(Error::config(
                "temperature",
                format!("must be finite and ≥ 0, got {}", self.temperature),
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::config(
                "top_p",
                format!("must be in (0, 1], got {}", self.top_p),
            ));
        }
        Ok(())
    }

    /// Whether nothing is drawn (temperature 0).
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// The settings as recorded in a sample's provenance.
    pub fn provenance(&self) -> optimsyn_data_io::SamplingParams {
        optimsyn_data_io::SamplingParams {
            temperature: self.temperature,
            top_p: (self.top_p < 1.0).then_some(self.top_p),
            top_k: (self.top_k > 0).then_some(self.top_k),
            max_new_tokens: Some(self.max_new_tokens),
            seed: Some(self.seed),
        }
    }
}

/// Turns a batch of chat prompts into completions.
///
/// Implementations need not be `Sync` (a local model holds libtorch tensors); they may generate in
/// any order and in parallel, but report every prompt exactly once through `on_done`, as soon as
/// its completion (or its error) is known, so that callers can save finished work before the rest
/// of the batch is done. When `on_done` returns [`ControlFlow::Break`], no new prompt is started
/// and the prompts not yet reported are dropped.
pub trait Generator {
    /// Who generates, for provenance: `local:<model folder>` or `openai:<base url>#<model>`.
    fn identity(&self) -> String;

    /// How it samples.
    fn params(&self) -> &GenerationParams;

    /// Whether the same prompt always gets the same completion at temperature 0 (true for the local
    /// backend; a remote server may batch nondeterministically). Callers skip retrying a greedy
    /// prompt on a reproducible generator: it would only repeat itself.
    fn reproducible(&self) -> bool {
        false
    }

    /// Generates a completion for each prompt, reporting `(index, result)` through `on_done`.
    fn generate(
        &self,
        prompts: &[ChatPrompt],
        on_done: &mut dyn FnMut(usize, Result<Completion>) -> ControlFlow<()>,
    );

    /// Generates every prompt and returns the results in prompt order.
    fn generate_all(&self, prompts: &[ChatPrompt]) -> Vec<Result<Completion>> {
        let mut out: Vec<Option<Result<Completion>>> = (0..prompts.len()).map(|_| None).collect();
        self.generate(prompts, &mut |i, r| {
            if let Some(slot) = out.get_mut(i) {
                *slot = Some(r);
            }
            ControlFlow::Continue(())
        });
        out.into_iter()
            .zip(prompts)
            .map(|(r, p)| {
                r.unwrap_or_else(|| {
                    Err(Error::Generation {
                        key: p.key.clone(),
                        message: "the generator did not report this prompt".into(),
                    })
                })
            })
            .collect()
    }
}

/// The OpenAI `seed` a prompt with `key` asks for under run seed `run_seed`: a 53-bit integer (exact
/// in any JSON parser), so every prompt has its own reproducible draw.
pub fn request_seed(run_seed: u64, key: &str) -> u64 {
    mix64(mix64(run_seed) ^ optimsyn_lm::row_key(key)) & ((1u64 << 53) - 1)
}

/// The ChaCha stream (under generator seed 0) that choice `choice` of a request with seed `seed`
/// draws from. The server and the local backend both use it, so a seed gives the same tokens
/// through either, at any batch size.
pub fn stream_key(seed: u64, choice: u32) -> u64 {
    mix64(mix64(seed) ^ mix64(u64::from(choice).wrapping_add(0x9e37_79b9_7f4a_7c15)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_seeds_are_pinned() {
        // Values of the inline SplitMix64/FNV-1a this crate had before optimsyn-fsio: servers and
        // recorded runs key on these bits, so they must never move.
        assert_eq!(request_seed(1, "a"), 0x0010_cb32_d570_de29);
        assert_eq!(request_seed(7, "row-3"), 0x001c_a817_190a_4cd6);
        assert_eq!(stream_key(5, 1), 0xf1c7_1c23_c053_4d73);
    }

    #[test]
    fn request_seeds_are_stable_and_distinct() {
        assert_eq!(request_seed(1, "a"), request_seed(1, "a"));
        assert_ne!(request_seed(1, "a"), request_seed(1, "b"));
        assert_ne!(request_seed(1, "a"), request_seed(2, "a"));
        assert!(request_seed(u64::MAX, "x") < (1 << 53));
        assert_ne!(stream_key(5, 0), stream_key(5, 1));
        assert_ne!(stream_key(5, 0), stream_key(6, 0));
    }

    #[test]
    fn params_validate_names_the_field() {
        let e = GenerationParams {
            top_p: 0.0,
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert!(e.to_string().starts_with("top_p:"), "{e}");
        assert!(GenerationParams::greedy(0).validate().is_err());
        let p = GenerationParams::greedy(8).provenance();
        assert_eq!(p.max_new_tokens, Some(8));
        assert_eq!(p.top_p, None);
    }
}
