//! [`RubricPolicy`]: an optimsyn-lm model (full or LoRA) as an rl-grpo [`Policy`].

use std::path::Path;

use optimsyn_data_io::{ChatTokenizer, SeedDoc};
use optimsyn_lm::{CausalLm, FinishReason, LoraAdapter, SamplingParams, row_key};
use optimsyn_rl_grpo::{
    Completion, Policy, PolicyLogprobs, RolloutConfig, SampleRequest, TokenBatch,
};
use tch::{Device, Tensor};

use crate::error::{Error, Result};
use crate::prompt::PolicyPrompt;
use crate::rubric::{Rubric, RubricError, parse_rubric};

/// How [`RubricPolicy::write_rubrics`] samples.
#[derive(Debug, Clone, PartialEq)]
pub struct RubricSampling {
    /// Rubrics per document. Default 1.
    pub per_doc: usize,
    /// Temperature, truncation and token budget. Default: rl-grpo's rollout defaults.
    pub sampling: RolloutConfig,
    /// The draw's seed. Default 0.
    pub seed: u64,
    /// Domain for documents that name none. Default `general`.
    pub default_domain: String,
    /// Passed to chat templates that take it (Qwen3). Default: the template's own default.
    pub enable_thinking: Option<bool>,
}

impl Default for RubricSampling {
    fn default() -> Self {
        RubricSampling {
            per_doc: 1,
            sampling: RolloutConfig::default(),
            seed: 0,
            default_domain: "general".into(),
            enable_thinking: None,
        }
    }
}

/// One rubric the policy wrote for a document ([`RubricPolicy::write_rubrics`]).
#[derive(Debug, Clone, PartialEq)]
pub struct RubricDraft {
    /// The document's id.
    pub seed_id: String,
    /// Which of the document's samples this is (0-based).
    pub index: usize,
    /// The policy's decoded output.
    pub text: String,
    /// The parsed rubric, or why the output is not one.
    pub rubric: std::result::Result<Rubric, RubricError>,
    /// The output hit the token budget before a stop token.
    pub truncated: bool,
}

/// A causal LM that writes rubrics, trainable by GRPO: either a LoRA adapter on a frozen base
/// (the KL reference is then the base itself, via [`Policy::reference_logprobs`]) or every weight.
#[derive(Debug)]
pub struct RubricPolicy {
    model: CausalLm,
    lora: Option<LoraAdapter>,
    stop_tokens: Vec<u32>,
    /// Rows per generation call.
    pub batch_rows: usize,
}

impl RubricPolicy {
    /// Wraps `model`; with `lora`, only the adapter trains. `stop_tokens` end completions (the
    /// model's and tokenizer's eos ids).
    pub fn new(model: CausalLm, lora: Option<LoraAdapter>, stop_tokens: Vec<u32>) -> Self {
        if lora.is_none() {
            for (_, p) in model.named_parameters() {
                let _ = p.shallow_clone().set_requires_grad(true);
            }
        }
        RubricPolicy {
            model,
            lora,
            stop_tokens,
            batch_rows: 32,
        }
    }

    /// The model (with its adapter attached, if any).
    pub fn model(&self) -> &CausalLm {
        &self.model
    }

    /// The adapter, when the policy is a LoRA policy.
    pub fn adapter(&self) -> Option<&LoraAdapter> {
        self.lora.as_ref()
    }

    /// Samples `how.per_doc` rubrics for each document: renders `prompt` with the document (its
    /// own domain, else `how.default_domain`) under `tok`'s chat template, samples, decodes and
    /// parses each output. Row `g` of document `d` draws from the stream keyed by `"{d.id}#{g}"`
    /// and `how.seed`, so a draft does not depend on which other documents are in the call.
    pub fn write_rubrics(
        &mut self,
        tok: &ChatTokenizer,
        prompt: &PolicyPrompt,
        docs: &[SeedDoc],
        how: &RubricSampling,
    ) -> Result<Vec<RubricDraft>> {
        let n = how.per_doc;
        let prompts = docs
            .iter()
            .map(|d| {
                let domain = d.domain.as_deref().unwrap_or(&how.default_domain);
                prompt.encode(tok, domain, &d.text, how.enable_thinking)
            })
            .collect::<Result<Vec<_>>>()?;
        let keys = docs
            .iter()
            .flat_map(|d| (0..n).map(move |g| row_key(&format!("{}#{g}", d.id))))
            .collect();
        let request = SampleRequest {
            prompts: prompts.iter().map(Vec::as_slice).collect(),
            group_size: n,
            seed: how.seed,
            keys,
            sampling: how.sampling,
        };
        let completions = self.sample(&request)?;
        completions
            .into_iter()
            .enumerate()
            .map(|(row, c)| {
                let text = tok.decode(&c.tokens, true)?;
                Ok(RubricDraft {
                    seed_id: docs[row / n.max(1)].id.clone(),
                    index: row % n.max(1),
                    rubric: parse_rubric(&text),
                    text,
                    truncated: c.truncated,
                })
            })
            .collect()
    }

    fn forward_logprobs(
        &self,
        batch: &TokenBatch<'_>,
        temperature: f64,
        entropy: bool,
    ) -> Result<PolicyLogprobs> {
        let packed = batch
            .pack(self.model.device())
            .map_err(|e| Error::Input(e.to_string()))?;
        let hidden =
            self.model
                .forward_hidden(&packed.input_ids, Some(&packed.attention_mask), None)?;
        let h = packed
            .predicting(&hidden)
            .map_err(|e| Error::Input(e.to_string()))?;
        let logits = self.model.logits(&h)?;
        // One implementation of log-probs and entropy for every tch policy: rl-grpo's.
        let (lp, ent) =
            optimsyn_rl_grpo::logprobs_from_logits(&logits, &packed.targets, temperature, entropy)
                .map_err(|e| Error::Input(e.to_string()))?;
        Ok(PolicyLogprobs {
            logprobs: lp,
            entropy: ent,
        })
    }
}

impl Policy for RubricPolicy {
    type Error = Error;

    fn device(&self) -> Device {
        self.model.device()
    }

    fn sample(&mut self, request: &SampleRequest<'_>) -> Result<Vec<Completion>> {
        let _g = tch::no_grad_guard();
        let s = request.sampling;
        let params = SamplingParams {
            max_new_tokens: s.max_new_tokens,
            temperature: s.temperature,
            top_p: s.top_p,
            top_k: s.top_k,
            seed: request.seed,
            stop_tokens: self.stop_tokens.clone(),
        };
        let rows: Vec<(&[u32], u64)> = request.row_prompts().collect();
        let mut out = Vec::with_capacity(rows.len());
        for chunk in rows.chunks(self.batch_rows.max(1)) {
            let prompts: Vec<&[u32]> = chunk.iter().map(|r| r.0).collect();
            let keys: Vec<u64> = chunk.iter().map(|r| r.1).collect();
            for g in self.model.generate(&prompts, &keys, &params)? {
                out.push(Completion {
                    truncated: g.finish_reason == FinishReason::Length,
                    tokens: g.tokens,
                    logprobs: g.logprobs,
                });
            }
        }
        Ok(out)
    }

    fn logprobs(
        &self,
        batch: &TokenBatch<'_>,
        temperature: f64,
        entropy: bool,
    ) -> Result<PolicyLogprobs> {
        self.forward_logprobs(batch, temperature, entropy)
    }

    fn reference_logprobs(
        &self,
        batch: &TokenBatch<'_>,
        temperature: f64,
    ) -> Result<Option<Tensor>> {
        let Some(a) = &self.lora else { return Ok(None) };
        let _g = tch::no_grad_guard();
        let _base = a.bypass()?;
        Ok(Some(
            self.forward_logprobs(batch, temperature, false)?.logprobs,
        ))
    }

    fn trainable_parameters(&self) -> Vec<(String, Tensor)> {
        match &self.lora {
            Some(a) => a
                .named_parameters()
                .into_iter()
                .map(|(k, t)| (k, t.shallow_clone()))
                .collect(),
            None => self
                .model
                .named_parameters()
                .into_iter()
                .map(|(k, t)| (k, t.shallow_clone()))
                .collect(),
        }
    }

    fn save(&self, dir: &Path) -> Result<()> {
        match &self.lora {
            Some(a) => Ok(a.save(dir)?),
            None => Ok(self.model.save_pretrained(dir)?),
        }
    }

    fn load(&mut self, dir: &Path) -> Result<()> {
        match &self.lora {
            Some(a) => Ok(a.load_weights(dir)?),
            None => Ok(self.model.load_weights(dir.join("model.safetensors"))?),
        }
    }
}
