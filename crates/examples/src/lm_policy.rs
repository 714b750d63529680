//! A [`Policy`] over an optimsyn-lm causal LM, full fine-tuning: sampling through
//! `CausalLm::generate` (KV cache, per-row ChaCha streams keyed by the trainer's row keys),
//! log-probs through one forward pass over `[left-padded prompt | completion]` rows, weights saved
//! as a Hugging Face `model.safetensors` and loaded back in place.
//!
//! Shared by the examples, the GRPO benchmark and rl-grpo's end-to-end test (which includes this
//! file by `#[path]`: rl-grpo cannot depend on this package). The LM-backed policy of the OptimSyn
//! pipeline, with LoRA, is optimsyn-rubric-policy's `RubricPolicy`.

#![allow(dead_code)]

use std::path::Path;

use optimsyn_lm::{CausalLm, FinishReason, SamplingParams};
use optimsyn_rl_grpo::{
    Completion, Policy, PolicyLogprobs, SampleRequest, TokenBatch, logprobs_from_logits,
};
use tch::{Device, Tensor};

/// Anything that can go wrong in [`LmPolicy`], as text with its origin.
#[derive(Debug)]
pub struct LmPolicyError(pub String);

impl std::fmt::Display for LmPolicyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for LmPolicyError {}

impl From<optimsyn_lm::Error> for LmPolicyError {
    fn from(e: optimsyn_lm::Error) -> Self {
        LmPolicyError(format!("lm: {e}"))
    }
}

impl From<optimsyn_rl_grpo::Error> for LmPolicyError {
    fn from(e: optimsyn_rl_grpo::Error) -> Self {
        LmPolicyError(format!("rl-grpo: {e}"))
    }
}

/// A causal LM as a GRPO policy (every weight trainable).
pub struct LmPolicy {
    /// The model.
    pub model: CausalLm,
    /// Tokens that end a completion (kept as its last token).
    pub stop_tokens: Vec<u32>,
}

impl LmPolicy {
    /// A trainable policy: every weight of `model` requires grad.
    pub fn trainable(model: CausalLm, stop_tokens: Vec<u32>) -> Self {
        for (_, p) in model.named_parameters() {
            let _ = p.shallow_clone().set_requires_grad(true);
        }
        LmPolicy { model, stop_tokens }
    }

    /// A frozen policy (a reference): no weight requires grad.
    pub fn frozen(model: CausalLm, stop_tokens: Vec<u32>) -> Self {
        for (_, p) in model.named_parameters() {
            let _ = p.shallow_clone().set_requires_grad(false);
        }
        LmPolicy { model, stop_tokens }
    }
}

impl Policy for LmPolicy {
    type Error = LmPolicyError;

    fn device(&self) -> Device {
        self.model.device()
    }

    fn sample(&mut self, request: &SampleRequest<'_>) -> Result<Vec<Completion>, LmPolicyError> {
        let prompts: Vec<&[u32]> = request.row_prompts().map(|(p, _)| p).collect();
        let s = &request.sampling;
        let params = SamplingParams {
            max_new_tokens: s.max_new_tokens,
            temperature: s.temperature,
            top_p: s.top_p,
            top_k: s.top_k,
            seed: request.seed,
            stop_tokens: self.stop_tokens.clone(),
        };
        let out = self.model.generate(&prompts, &request.keys, &params)?;
        Ok(out
            .into_iter()
            .map(|g| Completion {
                truncated: g.finish_reason == FinishReason::Length,
                tokens: g.tokens,
                logprobs: g.logprobs,
            })
            .collect())
    }

    fn logprobs(
        &self,
        batch: &TokenBatch<'_>,
        temperature: f64,
        entropy: bool,
    ) -> Result<PolicyLogprobs, LmPolicyError> {
        let packed = batch.pack(self.model.device())?;
        let hidden =
            self.model
                .forward_hidden(&packed.input_ids, Some(&packed.attention_mask), None)?;
        // Only the positions that predict completion tokens go through the output projection.
        let logits = self.model.logits(&packed.predicting(&hidden)?)?;
        let (logprobs, entropy) =
            logprobs_from_logits(&logits, &packed.targets, temperature, entropy)?;
        Ok(PolicyLogprobs { logprobs, entropy })
    }

    fn trainable_parameters(&self) -> Vec<(String, Tensor)> {
        self.model
            .named_parameters()
            .into_iter()
            .map(|(k, t)| (k, t.shallow_clone()))
            .collect()
    }

    fn save(&self, dir: &Path) -> Result<(), LmPolicyError> {
        Ok(self.model.save_pretrained(dir)?)
    }

    fn load(&mut self, dir: &Path) -> Result<(), LmPolicyError> {
        Ok(self.model.load_weights(dir.join("model.safetensors"))?)
    }
}
