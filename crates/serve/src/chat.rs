//! `POST /v1/chat/completions`: read the body within its limits, validate the request as vLLM
//! does, queue it for the model thread, and reply as JSON or server-sent events.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use optimsyn_data_io::{ChatMessage, Role};
use optimsyn_lm::Generation;
use optimsyn_synth::openai::wire::{
    ChatCompletion, ChatCompletionChunk, ChatRequest, Choice, ChoiceLogprobs, ChunkChoice, Content,
    Delta, ResponseMessage, Stop, TokenLogprob, Usage,
};
use serde_json::Value;
use tokio::sync::{OwnedSemaphorePermit, oneshot};

use crate::Shared;
use crate::api::{ApiError, json_response, parse_body};
use crate::engine::{Decoded, Job, Msg, Sampling, decode_row};

/// The handler.
pub(crate) async fn handle(State(sh): State<Arc<Shared>>, req: Request) -> Response {
    match run(sh, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn run(sh: Arc<Shared>, req: Request) -> Result<Response, ApiError> {
    let (p, permit) = admit(&sh, req, plan).await?;
    let (tx, rx) = oneshot::channel();
    let unavailable = || ApiError::status(503, "the server is shutting down");
    sh.jobs
        .send(Msg::Job(Job {
            prompt: p.prompt.clone(),
            n: p.n,
            max_new_tokens: p.max_new_tokens,
            sampling: p.sampling,
            seed: p.seed,
            adapter: p.adapter.clone(),
            reply: tx,
        }))
        .map_err(|_| unavailable())?;
    let gens = rx
        .await
        .map_err(|_| unavailable())?
        .map_err(|m| ApiError::status(500, format!("generation failed: {m}")))?;
    let s = sh.clone();
    let reply = blocking(move || reply(&s, &p, &gens)).await?;
    Ok(match reply {
        Reply::Json(c) => {
            drop(permit);
            json_response(StatusCode::OK, &c)
        }
        Reply::Events(events) => sse(events, permit),
    })
}

/// A request admitted: its body read within the limits, a slot taken (counted from here, not while
/// the body arrives: slow uploads must not take the slots), and `plan` made from the parsed body
/// off the async workers.
pub(crate) async fn admit<R, P>(
    sh: &Arc<Shared>,
    req: Request,
    plan: fn(&Shared, &R) -> Result<P, ApiError>,
) -> Result<(P, OwnedSemaphorePermit), ApiError>
where
    R: serde::de::DeserializeOwned + 'static,
    P: Send + 'static,
{
    let (body, budget) = request_body(sh, req).await?;
    let permit = slot(sh)?;
    let s = sh.clone();
    let p = blocking(move || {
        let parsed = parse_body::<R>(&body);
        drop((body, budget));
        plan(&s, &parsed?)
    })
    .await?;
    Ok((p, permit))
}

/// Runs CPU work (parsing, tokenizing, decoding) off the async workers.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::status(500, format!("internal error: {e}")))?
}

/// A slot among the `max_active_requests` completions in progress, or a 503.
pub(crate) fn slot(sh: &Shared) -> Result<OwnedSemaphorePermit, ApiError> {
    sh.active.clone().try_acquire_owned().map_err(|_| {
        sh.busy.fetch_add(1, Ordering::Relaxed);
        busy(format!(
            "{} completions are in progress, the most this server takes; retry later",
            sh.config.max_active_requests
        ))
    })
}

fn busy(message: String) -> ApiError {
    ApiError {
        retry_after: Some(1),
        ..ApiError::status(503, message)
    }
}

/// A request's body, read within the server's limits (see [`read_body`]).
pub(crate) async fn request_body(
    sh: &Shared,
    req: Request,
) -> Result<(Vec<u8>, Option<OwnedSemaphorePermit>), ApiError> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    read_body(sh, req.into_body(), declared).await
}

/// Reads the body within `max_body_bytes` (413), `body_timeout_secs` (408) and the memory set
/// aside for bodies being read (503). The permit returned holds the body's share of that memory.
async fn read_body(
    sh: &Shared,
    body: Body,
    declared: Option<u64>,
) -> Result<(Vec<u8>, Option<OwnedSemaphorePermit>), ApiError> {
    let limit = sh.config.max_body_bytes;
    let too_large = || {
        ApiError::status(413, format!("the request body is over {limit} bytes"))
            .with_code("request_too_large")
    };
    // Refused before reading, and before `100 Continue`: the client need not send it.
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let secs = sh.config.body_timeout_secs;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    let mut frames = body.into_data_stream();
    let mut buf = Vec::new();
    let mut held: Option<OwnedSemaphorePermit> = None;
    loop {
        let next = tokio::time::timeout_at(deadline, frames.next())
            .await
            .map_err(|_| {
                ApiError::status(
                    408,
                    format!("the request body did not arrive within {secs} s"),
                )
            })?;
        let Some(chunk) = next else { break };
        let chunk =
            chunk.map_err(|e| ApiError::invalid(format!("reading the request body: {e}"), None))?;
        if buf.len() + chunk.len() > limit {
            return Err(too_large());
        }
        let n = u32::try_from(chunk.len()).map_err(|_| too_large())?;
        let p = sh
            .body_budget
            .clone()
            .try_acquire_many_owned(n)
            .map_err(|_| {
                busy("request bodies being read use all the memory set aside for them".into())
            })?;
        match &mut held {
            Some(h) => h.merge(p),
            None => held = Some(p),
        }
        buf.extend_from_slice(&chunk);
    }
    Ok((buf, held))
}

/// A validated request, ready for the model thread.
struct Plan {
    /// The served name asked for: the model's, or a LoRA adapter's.
    model: String,
    adapter: Option<String>,
    prompt: Vec<u32>,
    n: u32,
    max_new_tokens: usize,
    sampling: Sampling,
    seed: u64,
    stops: Vec<String>,
    stream: bool,
    include_usage: bool,
    logprobs: bool,
}

pub(crate) fn unsupported(param: &str, what: &str) -> ApiError {
    ApiError::invalid(
        format!("{what} is not supported by this server"),
        Some(param),
    )
}

fn message_text(i: usize, content: &Option<Content>) -> Result<String, ApiError> {
    Ok(match content {
        None => String::new(),
        Some(Content::Text(t)) => t.clone(),
        Some(Content::Parts(parts)) => {
            let mut s = String::new();
            for (j, p) in parts.iter().enumerate() {
                match (p.kind.as_str(), &p.text) {
                    ("text", Some(t)) => s.push_str(t),
                    (kind, _) => {
                        return Err(ApiError::invalid(
                            format!(
                                "messages[{i}].content[{j}]: only text parts are supported, got `{kind}`"
                            ),
                            Some(&format!("messages[{i}].content[{j}]")),
                        ));
                    }
                }
            }
            s
        }
    })
}

fn messages(req: &ChatRequest) -> Result<Vec<ChatMessage>, ApiError> {
    if req.messages.is_empty() {
        return Err(ApiError::invalid(
            "`messages` must not be empty",
            Some("messages"),
        ));
    }
    let mut out = Vec::with_capacity(req.messages.len());
    for (i, m) in req.messages.iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "developer" => Role::System,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            other => {
                return Err(ApiError::invalid(
                    format!(
                        "messages[{i}].role: `{other}` is not supported (system, developer, user, assistant)"
                    ),
                    Some(&format!("messages[{i}].role")),
                ));
            }
        };
        out.push(ChatMessage::new(role, message_text(i, &m.content)?));
    }
    Ok(out)
}

/// Sampling settings, checked as vLLM checks them (with OpenAI's range for temperature).
fn sampling(sh: &Shared, req: &ChatRequest) -> Result<(u32, Sampling), ApiError> {
    sampling_of(sh, req.n, req.temperature, req.top_p, req.top_k)
}

/// `n` and the sampling settings of any request, checked as vLLM checks them.
pub(crate) fn sampling_of(
    sh: &Shared,
    n: Option<i64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<i64>,
) -> Result<(u32, Sampling), ApiError> {
    let n = n.unwrap_or(1);
    if n < 1 {
        return Err(ApiError::invalid(
            format!("n must be at least 1, got {n}"),
            Some("n"),
        ));
    }
    if n > i64::from(sh.config.max_n) {
        return Err(ApiError::invalid(
            format!("n must be at most {}, got {n}", sh.config.max_n),
            Some("n"),
        ));
    }
    let temperature = temperature.unwrap_or(1.0);
    if !(temperature.is_finite() && (0.0..=2.0).contains(&temperature)) {
        return Err(ApiError::invalid(
            format!("temperature must be in [0, 2], got {temperature}"),
            Some("temperature"),
        ));
    }
    let top_p = top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(
            format!("top_p must be in (0, 1], got {top_p}"),
            Some("top_p"),
        ));
    }
    let top_k = match top_k {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => usize::try_from(k).unwrap_or(usize::MAX),
        Some(k) => {
            return Err(ApiError::invalid(
                format!("top_k must be -1, 0 or positive, got {k}"),
                Some("top_k"),
            ));
        }
    };
    let sampling = Sampling {
        temperature,
        top_p,
        top_k,
    };
    Ok((n as u32, sampling.normalized()))
}

/// Penalties and biases, which this server does not apply: a 400 unless neutral.
pub(crate) fn refuse_penalties(
    frequency: Option<f64>,
    presence: Option<f64>,
    logit_bias: &Option<serde_json::Map<String, Value>>,
) -> Result<(), ApiError> {
    for (name, v) in [
        ("frequency_penalty", frequency),
        ("presence_penalty", presence),
    ] {
        if v.is_some_and(|v| v != 0.0) {
            return Err(unsupported(name, name));
        }
    }
    if logit_bias.as_ref().is_some_and(|b| !b.is_empty()) {
        return Err(unsupported("logit_bias", "logit_bias"));
    }
    Ok(())
}

/// Fields this server does not implement: a 400 unless they are at their neutral value.
fn refuse_unsupported(req: &ChatRequest) -> Result<(), ApiError> {
    refuse_penalties(req.frequency_penalty, req.presence_penalty, &req.logit_bias)?;
    if req.tools.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(unsupported("tools", "tool calling"));
    }
    if let Some(f) = &req.response_format {
        let kind = f.get("type").and_then(Value::as_str).unwrap_or("");
        if kind != "text" {
            return Err(unsupported(
                "response_format",
                &format!("response_format `{kind}`"),
            ));
        }
    }
    if req.top_logprobs.is_some_and(|k| k > 0) {
        return Err(unsupported("top_logprobs", "top_logprobs"));
    }
    if req.logprobs.unwrap_or(false) && req.stream.unwrap_or(false) {
        return Err(unsupported("logprobs", "logprobs with stream"));
    }
    Ok(())
}

/// The prompt's tokens, and how many new tokens to generate: `max_tokens` must fit in the
/// context after the prompt (vLLM's rule; absent, the rest of the context).
fn budget(
    sh: &Shared,
    req: &ChatRequest,
    msgs: &[ChatMessage],
) -> Result<(Vec<u32>, usize), ApiError> {
    let mut kwargs = sh.config.template_kwargs.clone();
    if let Some(k) = &req.chat_template_kwargs {
        kwargs.extend(k.iter().map(|(a, b)| (a.clone(), b.clone())));
    }
    let prompt = sh
        .tokenizer
        .render_chat_with(msgs, true, &kwargs)
        .and_then(|r| sh.tokenizer.encode_rendered(&r.text))
        .map_err(|e| ApiError::invalid(e.to_string(), Some("messages")))?;
    let param = if req.max_completion_tokens.is_some() {
        "max_completion_tokens"
    } else {
        "max_tokens"
    };
    let asked = req.max_completion_tokens.or(req.max_tokens);
    let max_new_tokens = new_tokens(sh, prompt.len(), "messages", (param, asked), None)?;
    Ok((prompt, max_new_tokens))
}

/// How many new tokens a prompt of `prompt_len` gets: `asked` (named `param`) must fit in the
/// context after the prompt (vLLM's rule and message); absent, `default` or the rest of the
/// context, whichever is less.
pub(crate) fn new_tokens(
    sh: &Shared,
    prompt_len: usize,
    prompt_param: &str,
    (param, asked): (&str, Option<i64>),
    default: Option<usize>,
) -> Result<usize, ApiError> {
    let room = sh.context.saturating_sub(prompt_len);
    if prompt_len == 0 || room == 0 {
        return Err(ApiError::invalid(
            format!(
                "the prompt is {prompt_len} tokens; this model's maximum context length is {} tokens, which leaves no room to generate",
                sh.context
            ),
            Some(prompt_param),
        )
        .with_code("context_length_exceeded"));
    }
    Ok(match asked {
        None => default.map_or(room, |d| d.min(room)),
        Some(m) if m < 1 => {
            return Err(ApiError::invalid(
                format!("{param} must be at least 1, got {m}"),
                Some(param),
            ));
        }
        Some(m) if m as u64 > room as u64 => {
            return Err(ApiError::invalid(
                format!(
                    "{param} is too large: {m}. This model's maximum context length is {} tokens and your request has {prompt_len} input tokens ({m} > {} - {prompt_len})",
                    sh.context, sh.context,
                ),
                Some(param),
            )
            .with_code("context_length_exceeded"));
        }
        Some(m) => m as usize,
    })
}

fn plan(sh: &Shared, req: &ChatRequest) -> Result<Plan, ApiError> {
    let adapter = resolve_model(sh, &req.model)?;
    let msgs = messages(req)?;
    let (n, sampling) = sampling(sh, req)?;
    refuse_unsupported(req)?;
    let stops = stop_strings(&req.stop)?;
    let (prompt, max_new_tokens) = budget(sh, req, &msgs)?;
    let seed = seed_of(sh, req.seed);
    Ok(Plan {
        model: req.model.clone(),
        adapter,
        prompt,
        n,
        max_new_tokens,
        sampling,
        seed,
        stops,
        stream: req.stream.unwrap_or(false),
        include_usage: req
            .stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
        logprobs: req.logprobs.unwrap_or(false),
    })
}

/// The LoRA adapter a request's `model` names (`None`: the base model), or a 404.
pub(crate) fn resolve_model(sh: &Shared, model: &str) -> Result<Option<String>, ApiError> {
    if model == sh.name {
        Ok(None)
    } else if sh.adapters_read().contains_key(model) {
        Ok(Some(model.to_string()))
    } else {
        Err(ApiError::model_not_found(model, &served(sh)))
    }
}

/// `stop` as a list: at most 16 non-empty strings.
pub(crate) fn stop_strings(stop: &Option<Stop>) -> Result<Vec<String>, ApiError> {
    let stops = match stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(v)) => v.clone(),
    };
    if stops.len() > 16 || stops.iter().any(String::is_empty) {
        return Err(ApiError::invalid(
            "stop: at most 16 non-empty strings",
            Some("stop"),
        ));
    }
    Ok(stops)
}

/// The request's seed, or a fresh one.
pub(crate) fn seed_of(sh: &Shared, seed: Option<i64>) -> u64 {
    match seed {
        Some(s) => s as u64,
        None => {
            let k = sh.serial.fetch_add(1, Ordering::Relaxed);
            optimsyn_synth::stream_key(sh.nonce, k as u32) ^ k
        }
    }
}

/// The served names, for an error: the model's, then the adapters'.
fn served(sh: &Shared) -> String {
    let mut names = vec![sh.name.clone()];
    names.extend(sh.adapter_names());
    names.join("`, `")
}

/// A reply to write.
enum Reply {
    Json(ChatCompletion),
    Events(Vec<ChatCompletionChunk>),
}

fn token_logprobs(sh: &Shared, r: &Decoded) -> ChoiceLogprobs {
    let content = r
        .tokens
        .iter()
        .zip(&r.logprobs)
        .map(|(&t, &lp)| {
            let token = sh.tokenizer.decode(&[t], false).unwrap_or_default();
            TokenLogprob {
                bytes: Some(token.as_bytes().to_vec()),
                token,
                logprob: f64::from(lp),
                top_logprobs: Vec::new(),
            }
        })
        .collect();
    ChoiceLogprobs {
        content: Some(content),
    }
}

fn reply(sh: &Shared, p: &Plan, gens: &[Generation]) -> Result<Reply, ApiError> {
    let rows: Vec<Decoded> = gens
        .iter()
        .map(|g| decode_row(&sh.tokenizer, g, &p.stops))
        .collect::<Result<_, _>>()
        .map_err(|m| ApiError::status(500, format!("decoding failed: {m}")))?;
    let serial = sh.serial.fetch_add(1, Ordering::Relaxed);
    let id = format!("chatcmpl-{:016x}{:08x}", sh.nonce, serial & 0xffff_ffff);
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let completion_tokens: usize = rows.iter().map(|r| r.tokens.len()).sum();
    let usage = Usage::new(p.prompt.len() as u64, completion_tokens as u64);
    let model = p.model.clone();
    if !p.stream {
        let choices = rows
            .iter()
            .enumerate()
            .map(|(i, r)| Choice {
                index: i as u32,
                message: ResponseMessage {
                    role: "assistant".into(),
                    content: Some(r.text.clone()),
                },
                logprobs: p.logprobs.then(|| token_logprobs(sh, r)),
                finish_reason: Some(r.finish_reason.as_str().into()),
            })
            .collect();
        return Ok(Reply::Json(ChatCompletion {
            id,
            object: "chat.completion".into(),
            created,
            model,
            choices,
            usage: Some(usage),
            system_fingerprint: None,
        }));
    }
    let chunk = |index: usize, delta: Delta, finish: Option<&str>| ChatCompletionChunk {
        id: id.clone(),
        object: "chat.completion.chunk".into(),
        created,
        model: model.clone(),
        system_fingerprint: None,
        choices: vec![ChunkChoice {
            index: index as u32,
            delta,
            logprobs: None,
            finish_reason: finish.map(str::to_string),
        }],
        usage: None,
    };
    let mut events = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        let role = Delta {
            role: Some("assistant".into()),
            content: Some(String::new()),
        };
        events.push(chunk(i, role, None));
        for piece in r.pieces.iter().filter(|s| !s.is_empty()) {
            let delta = Delta {
                role: None,
                content: Some(piece.clone()),
            };
            events.push(chunk(i, delta, None));
        }
        events.push(chunk(i, Delta::default(), Some(r.finish_reason.as_str())));
    }
    if p.include_usage {
        let mut last = chunk(0, Delta::default(), None);
        last.choices.clear();
        last.usage = Some(usage);
        events.push(last);
    }
    Ok(Reply::Events(events))
}

/// Server-sent events, then `data: [DONE]`. The request's slot is held until the body is dropped
/// (written, or the client gone).
fn sse(events: Vec<ChatCompletionChunk>, permit: OwnedSemaphorePermit) -> Response {
    let items = events
        .into_iter()
        .map(|c| Event::default().json_data(c))
        .chain(std::iter::once(Ok(Event::default().data("[DONE]"))));
    let stream = futures_util::stream::iter(items).map(move |e| {
        let _slot = &permit;
        e
    });
    Sse::new(stream).into_response()
}
