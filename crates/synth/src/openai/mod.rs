//! The HTTP backend: any OpenAI-compatible `/v1/chat/completions` endpoint (vLLM, SGLang,
//! llama.cpp, `optimsyn serve`, a hosted API).
//!
//! Requests run on `concurrency` worker threads. A request that fails with 408, 429 or a 5xx
//! status, times out, cannot connect, loses its connection or gets a malformed 200 reply is retried
//! up to `max_retries` times, after an exponential backoff (with `Retry-After` honoured, and a
//! jitter derived from the prompt key so retries of a batch spread out). Other 4xx statuses are
//! not retried. Every request is bounded by `timeout_secs`, so a run ends in bounded time.
//!
//! [`wire`] holds the wire format's serde types, shared with the server (`optimsyn-serve`).

pub mod wire;

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::generator::request_seed;
use crate::generator::{ChatPrompt, Completion, FinishReason, GenerationParams, Generator};

/// Where and how to call an OpenAI-compatible server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OpenAiConfig {
    /// The API root, e.g. `http://127.0.0.1:8000/v1` (`/chat/completions` is appended).
    pub base_url: String,
    /// The model name sent with each request.
    pub model: String,
    /// Environment variable holding the API key, sent as `Authorization: Bearer …` when set and
    /// non-empty. Default `OPENAI_API_KEY`.
    pub api_key_env: Option<String>,
    /// Seconds one attempt may take, connecting and reading the whole reply. Default 300.
    pub timeout_secs: f64,
    /// Requests in flight at once. Default 8 (the reference code's thread pool).
    pub concurrency: usize,
    /// Retries after the first attempt of a retryable failure. Default 5.
    pub max_retries: u32,
    /// First backoff, in seconds; doubled each retry. Default 0.5.
    pub backoff_secs: f64,
    /// Longest backoff (also caps `Retry-After`), in seconds. Default 30.
    pub max_backoff_secs: f64,
    /// Extra fields merged into every request body, e.g.
    /// `{"chat_template_kwargs": {"enable_thinking": false}}` for vLLM.
    pub extra_body: Map<String, Value>,
}

impl Default for OpenAiConfig {
    fn default() -> Self {
        OpenAiConfig {
            base_url: "http://127.0.0.1:8000/v1".into(),
            model: String::new(),
            api_key_env: Some("OPENAI_API_KEY".into()),
            timeout_secs: 300.0,
            concurrency: 8,
            max_retries: 5,
            backoff_secs: 0.5,
            max_backoff_secs: 30.0,
            extra_body: Map::new(),
        }
    }
}

/// Most bytes of a reply body read.
const MAX_REPLY: u64 = 64 << 20;

/// A generator behind an OpenAI-compatible endpoint.
pub struct OpenAiGenerator {
    config: OpenAiConfig,
    params: GenerationParams,
    url: String,
    api_key: Option<String>,
    agent: ureq::Agent,
    timeout: Duration,
}

impl std::fmt::Debug for OpenAiGenerator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("OpenAiGenerator")
            .field("url", &self.url)
            .field("model", &self.config.model)
            .field("params", &self.params)
            .finish_non_exhaustive()
    }
}

fn secs(field: &str, v: f64) -> Result<Duration> {
    Duration::try_from_secs_f64(v)
        .map_err(|_| Error::config(field, format!("must be a non-negative number, got {v}")))
}

/// How one attempt failed.
enum Failure {
    Status {
        status: u16,
        message: String,
        retry_after: Option<Duration>,
    },
    Transport(String),
    Timeout,
    Malformed(String),
    /// Not worth retrying (a bad URL and the like).
    Fatal(String),
}

impl Failure {
    fn retryable(&self) -> bool {
        match self {
            Failure::Status { status, .. } => *status == 408 || *status == 429 || *status >= 500,
            Failure::Transport(_) | Failure::Timeout | Failure::Malformed(_) => true,
            Failure::Fatal(_) => false,
        }
    }
}

impl OpenAiGenerator {
    /// A client for `config` sampling with `params`. The API key is read from the environment now.
    pub fn new(config: OpenAiConfig, params: GenerationParams) -> Result<Self> {
        params.validate()?;
        let base = config.base_url.trim_end_matches('/').to_string();
        let scheme_ok = base.starts_with("http://") || base.starts_with("https://");
        if !scheme_ok {
            return Err(Error::config(
                "base_url",
                format!("`{}` is not an http:// or https:// URL", config.base_url),
            ));
        }
        if base.starts_with("https://") && !cfg!(feature = "rustls") {
            return Err(Error::config(
                "base_url",
                format!(
                    "`{base}` needs TLS; build optimsyn-synth with the `rustls` feature, or use http://"
                ),
            ));
        }
        if config.model.is_empty() {
            return Err(Error::config("model", "must name the served model"));
        }
        if config.concurrency == 0 {
            return Err(Error::config("concurrency", "must be at least 1"));
        }
        let timeout = secs("timeout_secs", config.timeout_secs)?;
        if timeout.is_zero() {
            return Err(Error::config("timeout_secs", "must be more than 0"));
        }
        secs("backoff_secs", config.backoff_secs)?;
        secs("max_backoff_secs", config.max_backoff_secs)?;
        let api_key = config
            .api_key_env
            .as_deref()
            .and_then(|v| std::env::var(v).ok())
            .filter(|k| !k.is_empty());
        let host = base
            .split("://")
            .nth(1)
            .and_then(|r| r.split(['/', '?']).next())
            .unwrap_or("");
        let host = host.rsplit_once('@').map_or(host, |(_, h)| h);
        let hostname = match host.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or(""),
            None => host.split(':').next().unwrap_or(""),
        };
        let loopback = hostname == "localhost"
            || hostname == "::1"
            || hostname
                .parse::<std::net::Ipv4Addr>()
                .is_ok_and(|ip| ip.is_loopback());
        let mut builder = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .max_idle_connections_per_host(config.concurrency)
            .user_agent(format!("optimsyn/{}", env!("CARGO_PKG_VERSION")));
        if loopback {
            // A proxy from the environment must not see traffic to this machine.
            builder = builder.proxy(None);
        }
        let agent: ureq::Agent = builder.build().into();
        Ok(OpenAiGenerator {
            url: format!("{base}/chat/completions"),
            config: OpenAiConfig {
                base_url: base,
                ..config
            },
            params,
            api_key,
            agent,
            timeout,
        })
    }

    /// The chat-completions URL requests go to.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The request body for one prompt.
    pub fn request_body(&self, prompt: &ChatPrompt) -> Value {
        let p = &self.params;
        let request = wire::ChatRequest {
            model: self.config.model.clone(),
            messages: prompt
                .messages
                .iter()
                .map(|m| wire::RequestMessage {
                    role: m.role.as_str().to_string(),
                    content: Some(wire::Content::Text(m.content.clone())),
                })
                .collect(),
            max_tokens: Some(i64::try_from(p.max_new_tokens).unwrap_or(i64::MAX)),
            temperature: Some(p.temperature),
            // request_seed is below 2^53, so it is exact in any JSON reader.
            seed: Some(request_seed(p.seed, &prompt.key) as i64),
            stream: Some(false),
            top_p: (p.top_p < 1.0).then_some(p.top_p),
            top_k: (p.top_k > 0).then(|| i64::try_from(p.top_k).unwrap_or(i64::MAX)),
            ..Default::default()
        };
        let mut body = serde_json::to_value(&request)
            .unwrap_or_else(|e| unreachable!("a chat request always serializes to JSON: {e}"));
        for (k, v) in &self.config.extra_body {
            body[k.as_str()] = v.clone();
        }
        body
    }

    /// The model names the server lists at `GET {base_url}/models`.
    pub fn list_models(&self) -> Result<Vec<String>> {
        let url = format!("{}/models", self.config.base_url);
        let mut req = self.agent.get(&url);
        if let Some(k) = &self.api_key {
            req = req.header("Authorization", format!("Bearer {k}"));
        }
        let fail = |f: Failure| self.error(&url, f, 1);
        let mut resp = req.call().map_err(|e| fail(transport(e)))?;
        let status = resp.status().as_u16();
        let body = resp
            .body_mut()
            .with_config()
            .limit(MAX_REPLY)
            .read_to_string()
            .map_err(|e| fail(transport(e)))?;
        if status != 200 {
            return Err(fail(Failure::Status {
                status,
                message: error_message(&body),
                retry_after: None,
            }));
        }
        let v: Value = serde_json::from_str(&body)
            .map_err(|e| fail(Failure::Malformed(format!("not JSON: {e}"))))?;
        let list: wire::ModelList =
            wire::from_value_at(v).map_err(|(m, _)| fail(Failure::Malformed(m)))?;
        Ok(list.data.into_iter().map(|m| m.id).collect())
    }

    fn error(&self, url: &str, f: Failure, attempts: u32) -> Error {
        let url = url.to_string();
        match f {
            Failure::Status {
                status, message, ..
            } => Error::Status {
                url,
                status,
                message,
                attempts,
            },
            Failure::Transport(message) | Failure::Fatal(message) => Error::Transport {
                url,
                message,
                attempts,
            },
            Failure::Timeout => Error::Timeout {
                url,
                after: self.timeout,
                attempts,
            },
            Failure::Malformed(message) => Error::MalformedReply {
                url,
                message,
                attempts,
            },
        }
    }

    fn attempt(&self, body: &[u8]) -> std::result::Result<Completion, Failure> {
        let mut req = self
            .agent
            .post(&self.url)
            .header("Content-Type", "application/json");
        if let Some(k) = &self.api_key {
            req = req.header("Authorization", format!("Bearer {k}"));
        }
        let mut resp = req.send(body).map_err(transport)?;
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .and_then(|s| Duration::try_from_secs_f64(s).ok());
        let text = resp
            .body_mut()
            .with_config()
            .limit(MAX_REPLY)
            .read_to_string()
            .map_err(transport)?;
        if status != 200 {
            return Err(Failure::Status {
                status,
                message: error_message(&text),
                retry_after,
            });
        }
        parse_completion(&text).map_err(Failure::Malformed)
    }

    /// One prompt, with retries. `stop` cuts backoffs short when the caller has given up.
    fn complete(&self, prompt: &ChatPrompt, stop: &AtomicBool) -> Result<Completion> {
        let body = self.request_body(prompt).to_string().into_bytes();
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let failure = match self.attempt(&body) {
                Ok(c) => return Ok(c),
                Err(f) => f,
            };
            if !failure.retryable() || attempts > self.config.max_retries {
                return Err(self.error(&self.url, failure, attempts));
            }
            let wait = self.backoff(&prompt.key, attempts, &failure);
            tracing::debug!(key = %prompt.key, attempts, ?wait, "retrying {}", self.url);
            let until = Instant::now() + wait;
            while Instant::now() < until {
                if stop.load(Ordering::Relaxed) {
                    return Err(self.error(&self.url, failure, attempts));
                }
                std::thread::sleep(
                    until
                        .saturating_duration_since(Instant::now())
                        .min(Duration::from_millis(50)),
                );
            }
        }
    }

    /// Backoff before retry `attempt` (1-based): `backoff · 2^(attempt-1)`, times a jitter in
    /// [0.5, 1) from the key, at least `Retry-After`, at most `max_backoff`.
    fn backoff(&self, key: &str, attempt: u32, f: &Failure) -> Duration {
        let base = self.config.backoff_secs * 2f64.powi(attempt.saturating_sub(1).min(30) as i32);
        let h = optimsyn_lm::row_key(&format!("{key}#{attempt}"));
        let jitter = 0.5 + 0.5 * ((h >> 11) as f64 / (1u64 << 53) as f64);
        let mut wait = base * jitter;
        if let Failure::Status {
            retry_after: Some(r),
            ..
        } = f
        {
            wait = wait.max(r.as_secs_f64());
        }
        Duration::from_secs_f64(wait.min(self.config.max_backoff_secs).max(0.0))
    }
}

fn transport(e: ureq::Error) -> Failure {
    match e {
        ureq::Error::Timeout(_) => Failure::Timeout,
        ureq::Error::Io(io)
            if matches!(
                io.kind(),
                std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
            ) =>
        {
            Failure::Timeout
        }
        ureq::Error::Io(io) => Failure::Transport(io.to_string()),
        ureq::Error::BodyExceedsLimit(n) => {
            Failure::Malformed(format!("reply body over {n} bytes"))
        }
        e @ (ureq::Error::ConnectionFailed
        | ureq::Error::HostNotFound
        | ureq::Error::Protocol(_)) => Failure::Transport(e.to_string()),
        e => Failure::Fatal(e.to_string()),
    }
}

/// OpenAI's `error.message`, else the body (shortened).
fn error_message(body: &str) -> String {
    if let Ok(e) = serde_json::from_str::<wire::ErrorResponse>(body) {
        return e.error.message;
    }
    if let Ok(v) = serde_json::from_str::<Value>(body)
        && let Some(m) = v
            .get("message")
            .or_else(|| v.get("detail"))
            .and_then(Value::as_str)
    {
        return m.to_string();
    }
    let t = body.trim();
    if t.is_empty() {
        return "(empty body)".into();
    }
    let mut s: String = t.chars().take(300).collect();
    if s.len() < t.len() {
        s.push('…');
    }
    s
}

/// The completion in a chat-completions reply, or what is wrong with it.
fn parse_completion(text: &str) -> std::result::Result<Completion, String> {
    let v: Value = serde_json::from_str(text).map_err(|e| {
        let head: String = text.chars().take(80).collect();
        format!("not JSON ({e}): {head:?}")
    })?;
    let r: wire::ChatCompletion = wire::from_value_at(v).map_err(|(m, _)| m)?;
    let Some(first) = r.choices.into_iter().next() else {
        return Err("`choices` is empty".into());
    };
    Ok(Completion {
        text: first.message.content.unwrap_or_default(),
        finish_reason: FinishReason::parse(first.finish_reason.as_deref().unwrap_or("stop")),
        prompt_tokens: r.usage.and_then(|u| u.prompt_tokens),
        completion_tokens: r.usage.and_then(|u| u.completion_tokens),
    })
}

impl Generator for OpenAiGenerator {
    fn identity(&self) -> String {
        format!("openai:{}#{}", self.config.base_url, self.config.model)
    }

    fn params(&self) -> &GenerationParams {
        &self.params
    }

    fn generate(
        &self,
        prompts: &[ChatPrompt],
        on_done: &mut dyn FnMut(usize, Result<Completion>) -> ControlFlow<()>,
    ) {
        if prompts.is_empty() {
            return;
        }
        let next = AtomicUsize::new(0);
        let stop = AtomicBool::new(false);
        let workers = self.config.concurrency.min(prompts.len());
        std::thread::scope(|s| {
            let (tx, rx) = mpsc::channel::<(usize, Result<Completion>)>();
            for _ in 0..workers {
                let tx = tx.clone();
                let (next, stop) = (&next, &stop);
                s.spawn(move || {
                    loop {
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(p) = prompts.get(i) else { return };
                        let r = self.complete(p, stop);
                        if tx.send((i, r)).is_err() {
                            return;
                        }
                    }
                });
            }
            drop(tx);
            for (i, r) in rx {
                if stop.load(Ordering::Relaxed) {
                    continue;
                }
                if on_done(i, r).is_break() {
                    stop.store(true, Ordering::Relaxed);
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn replies_parse_or_say_what_is_wrong() {
        let ok = r#"{"choices":[{"message":{"role":"assistant","content":"hi"},"finish_reason":"length"}],"usage":{"prompt_tokens":3,"completion_tokens":1}}"#;
        let c = parse_completion(ok).unwrap();
        assert_eq!(c.text, "hi");
        assert_eq!(c.finish_reason, FinishReason::Length);
        assert_eq!(c.prompt_tokens, Some(3));
        assert!(parse_completion("<html>").unwrap_err().contains("not JSON"));
        assert!(
            parse_completion(r#"{"choices": []}"#)
                .unwrap_err()
                .contains("empty")
        );
        let e = parse_completion(r#"{"choices": [{"msg": 1}]}"#).unwrap_err();
        assert!(e.contains("choices[0]") && e.contains("message"), "{e}");
    }

    #[test]
    fn config_errors_name_the_field() {
        let bad = |c: OpenAiConfig| {
            OpenAiGenerator::new(c, GenerationParams::greedy(4))
                .unwrap_err()
                .to_string()
        };
        let base = OpenAiConfig {
            model: "m".into(),
            ..Default::default()
        };
        assert!(
            bad(OpenAiConfig {
                base_url: "ftp://x".into(),
                ..base.clone()
            })
            .starts_with("base_url")
        );
        assert!(
            bad(OpenAiConfig {
                model: String::new(),
                ..base.clone()
            })
            .starts_with("model")
        );
        assert!(
            bad(OpenAiConfig {
                timeout_secs: -1.0,
                ..base.clone()
            })
            .starts_with("timeout_secs")
        );
    }

    #[test]
    fn request_body_carries_the_prompt_seed_and_extras() {
        let mut extra = Map::new();
        extra.insert("top_k".into(), json!(5));
        let g = OpenAiGenerator::new(
            OpenAiConfig {
                model: "m".into(),
                extra_body: extra,
                ..Default::default()
            },
            GenerationParams {
                seed: 7,
                ..GenerationParams::greedy(16)
            },
        )
        .unwrap();
        let p = ChatPrompt {
            key: "k".into(),
            messages: vec![optimsyn_data_io::ChatMessage::user("hi")],
        };
        let b = g.request_body(&p);
        assert_eq!(b["max_tokens"], 16);
        assert_eq!(b["seed"], request_seed(7, "k"));
        assert_eq!(b["messages"][0]["role"], "user");
        assert_eq!(b["top_k"], 5);
        assert_eq!(g.url(), "http://127.0.0.1:8000/v1/chat/completions");
    }
}
