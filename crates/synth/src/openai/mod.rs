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

mod client;
mod served;
pub mod wire;

pub use client::OpenAiClient;
pub use served::{SampledRow, ServedSampler, TokenSampling};

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::Result;
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

/// A generator behind an OpenAI-compatible endpoint.
pub struct OpenAiGenerator {
    client: OpenAiClient,
    params: GenerationParams,
    url: String,
}

impl std::fmt::Debug for OpenAiGenerator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenAiGenerator")
            .field("client", &self.client)
            .field("params", &self.params)
            .finish_non_exhaustive()
    }
}

impl OpenAiGenerator {
    /// A client for `config` sampling with `params`. The API key is read from the environment now.
    pub fn new(config: OpenAiConfig, params: GenerationParams) -> Result<Self> {
        params.validate()?;
        let client = OpenAiClient::new(config)?;
        Ok(OpenAiGenerator {
            url: client.url("chat/completions"),
            client,
            params,
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
            model: self.client.config().model.clone(),
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
        for (k, v) in &self.client.config().extra_body {
            body[k.as_str()] = v.clone();
        }
        body
    }

    /// The model names the server lists at `GET {base_url}/models`.
    pub fn list_models(&self) -> Result<Vec<String>> {
        self.client.list_models()
    }

    /// One prompt, with retries. `stop` cuts backoffs short when the caller has given up.
    fn complete(&self, prompt: &ChatPrompt, stop: &AtomicBool) -> Result<Completion> {
        let body = self.request_body(prompt).to_string().into_bytes();
        self.client.post(
            "chat/completions",
            &body,
            &prompt.key,
            stop,
            parse_completion,
        )
    }
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
        format!(
            "openai:{}#{}",
            self.client.config().base_url,
            self.client.config().model
        )
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
        let workers = self.client.config().concurrency.min(prompts.len());
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

    proptest::proptest! {
        /// Whatever a server sends back, a chat reply parses or says what is wrong; no panic.
        #[test]
        fn any_chat_reply_parses_or_errs(text in ".{0,200}") {
            let _ = parse_completion(&text);
        }
    }
}
