//! The local backend: an optimsyn-lm model in this process.

use std::ops::ControlFlow;
use std::path::Path;

use optimsyn_data_io::ChatTokenizer;
use optimsyn_lm::{CausalLm, LoadOptions, SamplingParams};
use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::generator::{ChatPrompt, Completion, GenerationParams, Generator};
use crate::generator::{request_seed, stream_key};

/// Stop ids of a model: its own eos ids, then the tokenizer's (as `optimsyn lm generate` uses).
pub fn stop_tokens(model: &CausalLm, tokenizer: &ChatTokenizer) -> Vec<u32> {
    let mut stop = model.eos_token_ids().to_vec();
    for t in tokenizer.eos_token_ids() {
        if !stop.contains(&t) {
            stop.push(t);
        }
    }
    stop
}

/// Generates with a model loaded in this process, in batches of `batch_size` left-padded prompts.
///
/// Prompts are rendered with the tokenizer's chat template (with the generation prompt and
/// `template_kwargs`) and encoded once without special tokens; completions are decoded skipping
/// special tokens; rows stop at the model's or the tokenizer's eos. Prompt `k` draws from the
/// stream [`stream_key`]`(`[`request_seed`]`(seed, k), 0)`, as the same request through
/// `optimsyn serve` would.
pub struct LocalGenerator {
    model: CausalLm,
    tokenizer: ChatTokenizer,
    params: GenerationParams,
    template_kwargs: Map<String, Value>,
    batch_size: usize,
    name: String,
    stop: Vec<u32>,
}

impl std::fmt::Debug for LocalGenerator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalGenerator")
            .field("name", &self.name)
            .field("params", &self.params)
            .field("batch_size", &self.batch_size)
            .finish_non_exhaustive()
    }
}

impl LocalGenerator {
    /// Loads the model and tokenizer of a Hugging Face folder.
    pub fn load(
        dir: impl AsRef<Path>,
        opts: LoadOptions,
        params: GenerationParams,
    ) -> Result<Self> {
        let dir = dir.as_ref();
        let tokenizer = ChatTokenizer::from_model_dir(dir)?;
        let model = CausalLm::load(dir, opts)?;
        Self::new(model, tokenizer, params, dir.display().to_string())
    }

    /// Wraps a loaded model; `name` is its identity in provenance (e.g. the folder).
    pub fn new(
        model: CausalLm,
        tokenizer: ChatTokenizer,
        params: GenerationParams,
        name: impl Into<String>,
    ) -> Result<Self> {
        params.validate()?;
        let stop = stop_tokens(&model, &tokenizer);
        Ok(LocalGenerator {
            model,
            tokenizer,
            params,
            template_kwargs: Map::new(),
            batch_size: 8,
            name: name.into(),
            stop,
        })
    }

    /// Prompts per forward pass (default 8). Results do not depend on it.
    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }

    /// Extra chat-template arguments, e.g. `{"enable_thinking": false}` for a Qwen3 generator.
    pub fn with_template_kwargs(mut self, kwargs: Map<String, Value>) -> Self {
        self.template_kwargs = kwargs;
        self
    }

    /// The model.
    pub fn model(&self) -> &CausalLm {
        &self.model
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &ChatTokenizer {
        &self.tokenizer
    }

    /// The folder or name given at construction.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn encode(&self, p: &ChatPrompt) -> Result<Vec<u32>> {
        let ctx = self.model.config().max_position_embeddings;
        let ids = self
            .tokenizer
            .encode_prompt(&p.messages, &self.template_kwargs)?;
        if ids.is_empty() || ids.len() >= ctx {
            return Err(Error::Generation {
                key: p.key.clone(),
                message: format!(
                    "the prompt is {} tokens; the model's context is {ctx}, so nothing can be generated",
                    ids.len()
                ),
            });
        }
        Ok(ids)
    }

    fn lm_params(&self) -> SamplingParams {
        SamplingParams {
            max_new_tokens: self.params.max_new_tokens,
            temperature: self.params.temperature,
            top_p: self.params.top_p,
            top_k: self.params.top_k,
            seed: 0,
            stop_tokens: self.stop.clone(),
        }
    }

    /// Runs one chunk of prompts; returns whether to go on.
    fn run_chunk(
        &self,
        offset: usize,
        prompts: &[ChatPrompt],
        params: &SamplingParams,
        on_done: &mut dyn FnMut(usize, Result<Completion>) -> ControlFlow<()>,
    ) -> ControlFlow<()> {
        let mut ok: Vec<(usize, Vec<u32>)> = Vec::new();
        for (j, p) in prompts.iter().enumerate() {
            match self.encode(p) {
                Ok(ids) => ok.push((j, ids)),
                Err(e) => on_done(offset + j, Err(e))?,
            }
        }
        if ok.is_empty() {
            return ControlFlow::Continue(());
        }
        let ids: Vec<&[u32]> = ok.iter().map(|(_, v)| v.as_slice()).collect();
        let keys: Vec<u64> = ok
            .iter()
            .map(|(j, _)| stream_key(request_seed(self.params.seed, &prompts[*j].key), 0))
            .collect();
        match self.model.generate(&ids, &keys, params) {
            Ok(gens) => {
                for ((j, prompt_ids), g) in ok.iter().zip(gens) {
                    let r = self
                        .tokenizer
                        .decode(&g.tokens, true)
                        .map_err(Error::from)
                        .map(|text| Completion {
                            text,
                            finish_reason: g.finish_reason.into(),
                            prompt_tokens: Some(prompt_ids.len() as u64),
                            completion_tokens: Some(g.tokens.len() as u64),
                        });
                    on_done(offset + j, r)?;
                }
            }
            Err(e) => {
                let message = e.to_string();
                for (j, _) in &ok {
                    on_done(
                        offset + j,
                        Err(Error::Generation {
                            key: prompts[*j].key.clone(),
                            message: message.clone(),
                        }),
                    )?;
                }
            }
        }
        ControlFlow::Continue(())
    }
}

impl Generator for LocalGenerator {
    fn identity(&self) -> String {
        format!("local:{}", self.name)
    }

    fn params(&self) -> &GenerationParams {
        &self.params
    }

    fn reproducible(&self) -> bool {
        true
    }

    fn generate(
        &self,
        prompts: &[ChatPrompt],
        on_done: &mut dyn FnMut(usize, Result<Completion>) -> ControlFlow<()>,
    ) {
        let params = self.lm_params();
        for (c, chunk) in prompts.chunks(self.batch_size).enumerate() {
            if self
                .run_chunk(c * self.batch_size, chunk, &params, on_done)
                .is_break()
            {
                return;
            }
        }
    }
}
