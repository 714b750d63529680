//! The connection to an OpenAI-compatible server: the URL and API key, one HTTP agent, retries
//! with backoff, and errors that name the URL. [`OpenAiGenerator`](super::OpenAiGenerator) and
//! [`ServedSampler`](super::ServedSampler) talk through it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{OpenAiConfig, wire};
use crate::error::{Error, Result};

/// Most bytes of a reply body read.
const MAX_REPLY: u64 = 64 << 20;

/// A checked [`OpenAiConfig`] with its HTTP agent.
pub struct OpenAiClient {
    config: OpenAiConfig,
    api_key: Option<String>,
    agent: ureq::Agent,
    timeout: Duration,
}

impl std::fmt::Debug for OpenAiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("OpenAiClient")
            .field("base_url", &self.config.base_url)
            .field("model", &self.config.model)
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

impl OpenAiClient {
    /// A client for `config`. The API key is read from the environment now.
    pub fn new(config: OpenAiConfig) -> Result<Self> {
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
        Ok(OpenAiClient {
            config: OpenAiConfig {
                base_url: base,
                ..config
            },
            api_key,
            agent,
            timeout,
        })
    }

    /// The configuration (with `base_url` without a trailing slash).
    pub fn config(&self) -> &OpenAiConfig {
        &self.config
    }

    /// `{base_url}/{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("{}/{path}", self.config.base_url)
    }

    /// The model names the server lists at `GET {base_url}/models`.
    pub fn list_models(&self) -> Result<Vec<String>> {
        let url = self.url("models");
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

    fn attempt<T>(
        &self,
        url: &str,
        body: &[u8],
        parse: &impl Fn(&str) -> std::result::Result<T, String>,
    ) -> std::result::Result<T, Failure> {
        let mut req = self
            .agent
            .post(url)
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
        parse(&text).map_err(Failure::Malformed)
    }

    /// POSTs `body` (JSON) to `{base_url}/{path}` and parses the 200 reply with `parse`, retrying
    /// what is worth retrying (a malformed 200 reply too). `key` spreads the backoffs of
    /// concurrent requests; `stop` cuts them short when the caller has given up.
    pub fn post<T>(
        &self,
        path: &str,
        body: &[u8],
        key: &str,
        stop: &AtomicBool,
        parse: impl Fn(&str) -> std::result::Result<T, String>,
    ) -> Result<T> {
        let url = self.url(path);
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let failure = match self.attempt(&url, body, &parse) {
                Ok(c) => return Ok(c),
                Err(f) => f,
            };
            if !failure.retryable() || attempts > self.config.max_retries {
                return Err(self.error(&url, failure, attempts));
            }
            let wait = self.backoff(key, attempts, &failure);
            tracing::debug!(key, attempts, ?wait, "retrying {url}");
            let until = Instant::now() + wait;
            while Instant::now() < until {
                if stop.load(Ordering::Relaxed) {
                    return Err(self.error(&url, failure, attempts));
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
pub(crate) fn error_message(body: &str) -> String {
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
