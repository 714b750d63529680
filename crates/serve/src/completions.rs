//! `POST /v1/completions`, the legacy completions API as vLLM serves it: prompts as text or as
//! token ids (no chat template), `n` choices each, the sampled tokens' log-probs with
//! `logprobs: 0`, and vLLM's `return_tokens_as_token_ids`. This is what a trainer needs to sample
//! rollouts from a served policy: its own prompt tokens in, the sampled token ids and their
//! log-probs out.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use optimsyn_lm::Generation;
use optimsyn_synth::openai::wire::{
    CompletionRequest, PromptInput, TextChoice, TextCompletion, TextLogprobs, Usage,
};
use tokio::sync::oneshot;

use crate::Shared;
use crate::api::{ApiError, json_response};
use crate::chat::{
    admit, blocking, new_tokens, refuse_penalties, resolve_model, sampling_of, seed_of,
    stop_strings, unsupported,
};
use crate::engine::{Decoded, Job, Msg, Sampling, decode_row};

/// OpenAI's default budget for this API.
const DEFAULT_MAX_TOKENS: usize = 16;

/// The handler.
pub(crate) async fn handle(State(sh): State<Arc<Shared>>, req: Request) -> Response {
    match run(sh, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn run(sh: Arc<Shared>, req: Request) -> Result<Response, ApiError> {
    let (p, permit) = admit(&sh, req, plan).await?;
    let unavailable = || ApiError::status(503, "the server is shutting down");
    let mut replies = Vec::with_capacity(p.prompts.len());
    for (prompt, &max_new_tokens) in p.prompts.iter().zip(&p.max_new_tokens) {
        let (tx, rx) = oneshot::channel();
        sh.jobs
            .send(Msg::Job(Job {
                prompt: prompt.clone(),
                n: p.n,
                max_new_tokens,
                sampling: p.sampling,
                seed: p.seed,
                adapter: p.adapter.clone(),
                reply: tx,
            }))
            .map_err(|_| unavailable())?;
        replies.push(rx);
    }
    let mut gens = Vec::with_capacity(replies.len());
    for rx in replies {
        gens.push(
            rx.await
                .map_err(|_| unavailable())?
                .map_err(|m| ApiError::status(500, format!("generation failed: {m}")))?,
        );
    }
    let s = sh.clone();
    let reply = blocking(move || reply(&s, &p, &gens)).await?;
    drop(permit);
    Ok(json_response(StatusCode::OK, &reply))
}

/// A validated request: one job per prompt.
struct Plan {
    model: String,
    adapter: Option<String>,
    prompts: Vec<Vec<u32>>,
    max_new_tokens: Vec<usize>,
    n: u32,
    sampling: Sampling,
    seed: u64,
    stops: Vec<String>,
    logprobs: bool,
    token_ids: bool,
}

fn plan(sh: &Shared, req: &CompletionRequest) -> Result<Plan, ApiError> {
    let adapter = resolve_model(sh, &req.model)?;
    refuse_unsupported(req)?;
    let logprobs = match req.logprobs {
        None => false,
        Some(0) => true,
        Some(k) if k > 0 => {
            return Err(unsupported(
                "logprobs",
                "alternatives per token (logprobs > 0; 0 gives the sampled tokens' log-probs)",
            ));
        }
        Some(k) => {
            return Err(ApiError::invalid(
                format!("logprobs must be at least 0, got {k}"),
                Some("logprobs"),
            ));
        }
    };
    let (n, sampling) = sampling_of(sh, req.n, req.temperature, req.top_p, req.top_k)?;
    let stops = stop_strings(&req.stop)?;
    let prompts = prompt_tokens(sh, &req.prompt)?;
    let max_new_tokens = prompts
        .iter()
        .map(|p| {
            new_tokens(
                sh,
                p.len(),
                "prompt",
                ("max_tokens", req.max_tokens),
                Some(DEFAULT_MAX_TOKENS),
            )
        })
        .collect::<Result<_, _>>()?;
    Ok(Plan {
        model: req.model.clone(),
        adapter,
        prompts,
        max_new_tokens,
        n,
        sampling,
        seed: seed_of(sh, req.seed),
        stops,
        logprobs,
        token_ids: req.return_tokens_as_token_ids.unwrap_or(false),
    })
}

/// Fields this server does not implement: a 400 unless they are at their neutral value.
fn refuse_unsupported(req: &CompletionRequest) -> Result<(), ApiError> {
    if req.stream.unwrap_or(false) {
        return Err(unsupported("stream", "stream on /v1/completions"));
    }
    if req.echo.unwrap_or(false) {
        return Err(unsupported("echo", "echo"));
    }
    if req.best_of.is_some_and(|b| b > 1 && Some(b) != req.n) {
        return Err(unsupported("best_of", "best_of other than n"));
    }
    if req.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
        return Err(unsupported("suffix", "suffix"));
    }
    refuse_penalties(req.frequency_penalty, req.presence_penalty, &req.logit_bias)
}

/// Each prompt's token ids: text is tokenized as it is; ids must be in the vocabulary.
fn prompt_tokens(sh: &Shared, prompt: &PromptInput) -> Result<Vec<Vec<u32>>, ApiError> {
    let encode = |i: usize, text: &str| {
        sh.tokenizer
            .encode_rendered(text)
            .map_err(|e| ApiError::invalid(format!("prompt[{i}]: {e}"), Some("prompt")))
    };
    let prompts = match prompt {
        PromptInput::Text(t) => vec![encode(0, t)?],
        PromptInput::Texts(ts) => ts
            .iter()
            .enumerate()
            .map(|(i, t)| encode(i, t))
            .collect::<Result<_, _>>()?,
        PromptInput::Tokens(ids) => vec![ids.clone()],
        PromptInput::TokenBatch(batch) => batch.clone(),
    };
    if prompts.is_empty() {
        return Err(ApiError::invalid(
            "`prompt` must not be empty",
            Some("prompt"),
        ));
    }
    for (i, p) in prompts.iter().enumerate() {
        if let Some((j, &id)) = p
            .iter()
            .enumerate()
            .find(|(_, id)| **id as usize >= sh.vocab)
        {
            return Err(ApiError::invalid(
                format!(
                    "prompt[{i}][{j}]: token id {id} is out of vocabulary (size {})",
                    sh.vocab
                ),
                Some("prompt"),
            ));
        }
    }
    Ok(prompts)
}

fn reply(sh: &Shared, p: &Plan, gens: &[Vec<Generation>]) -> Result<TextCompletion, ApiError> {
    let mut choices = Vec::new();
    let mut completion_tokens = 0u64;
    for (k, rows) in gens.iter().enumerate() {
        for (j, g) in rows.iter().enumerate() {
            let r = decode_row(&sh.tokenizer, g, &p.stops)
                .map_err(|m| ApiError::status(500, format!("decoding failed: {m}")))?;
            completion_tokens += r.tokens.len() as u64;
            choices.push(TextChoice {
                index: (k * p.n as usize + j) as u32,
                logprobs: p.logprobs.then(|| text_logprobs(&r, p.token_ids)),
                finish_reason: Some(r.finish_reason.as_str().into()),
                text: r.text,
            });
        }
    }
    let prompt_tokens: usize = p.prompts.iter().map(Vec::len).sum();
    let serial = sh.serial.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Ok(TextCompletion {
        id: format!("cmpl-{:016x}{:08x}", sh.nonce, serial & 0xffff_ffff),
        object: "text_completion".into(),
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs(),
        model: p.model.clone(),
        choices,
        usage: Some(Usage::new(prompt_tokens as u64, completion_tokens)),
    })
}

/// The sampled tokens (as text pieces, or `token_id:N`), their log-probs at the sampling
/// temperature, and each piece's character offset in the text.
fn text_logprobs(r: &Decoded, token_ids: bool) -> TextLogprobs {
    let mut offset = 0;
    let mut text_offset = Vec::with_capacity(r.tokens.len());
    for piece in &r.pieces {
        text_offset.push(offset);
        offset += piece.chars().count();
    }
    TextLogprobs {
        tokens: if token_ids {
            r.tokens.iter().map(|t| format!("token_id:{t}")).collect()
        } else {
            r.pieces.clone()
        },
        token_logprobs: r.logprobs.iter().map(|&l| f64::from(l)).collect(),
        top_logprobs: vec![None; r.tokens.len()],
        text_offset,
    }
}
