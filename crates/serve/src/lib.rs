//! An OpenAI-compatible server for a local optimsyn-lm model (`optimsyn serve`):
//! `POST /v1/chat/completions` (with `stream`, `seed`, `stop`, `max_tokens` /
//! `max_completion_tokens`, `temperature`, `top_p`, `top_k`, `n`, `logprobs`, `usage`),
//! `POST /v1/completions` (prompts as text or token ids, `logprobs: 0`, vLLM's
//! `return_tokens_as_token_ids`: what a trainer needs to sample rollouts),
//! `GET /v1/models`, `GET /v1/models/{id}` and `GET /health`; with [`ServeConfig::enable_lora`],
//! LoRA adapters loaded and unloaded at run time through vLLM's `POST /v1/load_lora_adapter` and
//! `POST /v1/unload_lora_adapter`, each served under its own model name.
//!
//! Part of the [optimsyn](https://github.com/optimsyn/optimsyn) workspace. The HTTP side is axum
//! routes on hyper's HTTP/1.1 connections, on a tokio runtime the server owns; the public API is
//! blocking ([`Server::start`] returns a [`ServerHandle`]). One thread owns the model and runs
//! every waiting request, grouped by sampling settings, as batched generation (see
//! [`ServeConfig::max_batch`]). The wire format is [`optimsyn_synth::openai::wire`], the same
//! types the client ([`OpenAiGenerator`](optimsyn_synth::OpenAiGenerator)) reads.
//!
//! Abuse is bounded: a connection gets [`ServeConfig::idle_timeout_secs`] to send a request head
//! (hyper's header-read timeout, also between keep-alive requests) and to accept written bytes;
//! a body gets [`ServeConfig::body_timeout_secs`] and [`ServeConfig::max_body_bytes`] (413), a head
//! [`ServeConfig::max_header_bytes`] (431). Idle connections cost a small task each and never
//! make a request wait; only chat completions in progress beyond
//! [`ServeConfig::max_active_requests`] get a 503. Out-of-range parameters get a 400 in OpenAI's
//! error shape naming the field, as vLLM validates them (`max_tokens` beyond the context, `n`,
//! `temperature`, `top_p`, …).
//!
//! Sampling is reproducible: choice `j` of a request with `seed` `s` draws from the stream
//! [`stream_key`](optimsyn_synth::stream_key)`(s, j)`, whatever else is in its batch, so a seed gives
//! the same tokens here as with the local generator. A request without a seed gets a fresh one.
//! Temperature 0 is greedy.
//!
//! With `stream: true` the reply is server-sent events in OpenAI's chunk format (a role chunk, one
//! content chunk per decoded piece, a chunk with the finish reason, a usage chunk when
//! `stream_options.include_usage`, then `data: [DONE]`). The chunks are sent when the row's
//! generation is complete, not token by token: optimsyn-lm generates a batch in one call.
//!
//! ```no_run
//! use optimsyn_lm::LoadOptions;
//! use optimsyn_serve::{ServeConfig, Server};
//!
//! # fn main() -> optimsyn_serve::Result<()> {
//! let config = ServeConfig { port: 0, ..ServeConfig::default() };
//! let server = Server::load("models/qwen3-0.6b", LoadOptions::default(), config)?.start()?;
//! println!("serving {} at {}", server.model_name(), server.base_url()); // http://127.0.0.1:…/v1
//! // … point any OpenAI client at base_url …
//! server.shutdown(); // finishes the requests in progress
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

mod api;
mod chat;
mod completions;
mod engine;
mod error;
mod http;
mod lora;

use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use optimsyn_data_io::ChatTokenizer;
use optimsyn_lm::{CausalLm, LoadOptions};
use optimsyn_synth::stop_tokens;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::sync::Semaphore;

pub use error::{Error, Result};

use engine::{Counters, Engine, Msg};

/// Server settings. Defaults: 127.0.0.1, port 8000, batches of up to 8 rows gathered for 5 ms.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServeConfig {
    /// Address to bind. Default `127.0.0.1` (this machine only).
    pub host: String,
    /// Port; 0 picks a free one (see [`ServerHandle::local_addr`]). Default 8000.
    pub port: u16,
    /// The model name clients must ask for; default: the model folder as given.
    pub served_model_name: Option<String>,
    /// Most rows (prompts × `n`) in one generation call. Default 8.
    pub max_batch: usize,
    /// How long the model thread waits for more requests before starting a batch that is not
    /// full, in milliseconds. Default 5.
    pub batch_wait_ms: u64,
    /// Most open connections. Beyond it new connections wait in the system's accept queue until
    /// one closes (idle ones close after `idle_timeout_secs`); none is refused for it. Default
    /// 1024.
    pub max_connections: usize,
    /// Most chat completions in progress at once (queued, generating, or being written); one more
    /// gets a 503 with `Retry-After`. Default 256.
    pub max_active_requests: usize,
    /// Largest request body in bytes (413 beyond). Bodies being read at once hold at most 8 times
    /// this much memory together; beyond that a request gets a 503. Default 16 MiB.
    pub max_body_bytes: usize,
    /// Largest request head (request line and headers) in bytes (431 beyond); also the most a
    /// connection buffers for reading and for writing. Default 64 KiB.
    pub max_header_bytes: usize,
    /// Largest `n`. Default 16.
    pub max_n: u32,
    /// Seconds a connection may take to send a request head (the first, or the next one on a
    /// kept-alive connection), and may leave written bytes unread; then it is closed. Default 30.
    pub idle_timeout_secs: u64,
    /// Seconds a request body may take to arrive after its head; then the request gets a 408.
    /// Default 30.
    pub body_timeout_secs: u64,
    /// libtorch threads of the model thread; `None` keeps libtorch's default (the machine's
    /// cores).
    pub threads: Option<usize>,
    /// Chat-template arguments for every request (a request's `chat_template_kwargs` override
    /// them), e.g. `{"enable_thinking": false}`.
    pub template_kwargs: Map<String, Value>,
    /// Serve LoRA adapters loaded at run time through `POST /v1/load_lora_adapter` and
    /// `/v1/unload_lora_adapter` (vLLM's endpoints); a request names one as its `model`. Off by
    /// default: the endpoints read any adapter folder the server process can read.
    pub enable_lora: bool,
    /// LoRA adapters served from the start, name → PEFT folder (vLLM's `--lora-modules`); they
    /// need no `enable_lora`, which only opens the run-time endpoints.
    pub lora_modules: BTreeMap<String, PathBuf>,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            host: "127.0.0.1".into(),
            port: 8000,
            served_model_name: None,
            max_batch: 8,
            batch_wait_ms: 5,
            max_connections: 1024,
            max_active_requests: 256,
            max_body_bytes: 16 << 20,
            max_header_bytes: 64 << 10,
            max_n: 16,
            idle_timeout_secs: 30,
            body_timeout_secs: 30,
            threads: None,
            template_kwargs: Map::new(),
            enable_lora: false,
            lora_modules: BTreeMap::new(),
        }
    }
}

impl ServeConfig {
    fn validate(&self) -> Result<()> {
        let positive = [
            ("max_batch", self.max_batch),
            ("max_connections", self.max_connections),
            ("max_active_requests", self.max_active_requests),
            ("max_body_bytes", self.max_body_bytes),
            ("max_n", self.max_n as usize),
            ("idle_timeout_secs", self.idle_timeout_secs as usize),
            ("body_timeout_secs", self.body_timeout_secs as usize),
        ];
        for (field, v) in positive {
            if v == 0 {
                return Err(Error::config(field, "must be at least 1"));
            }
        }
        // hyper's read buffer holds the head; it cannot be smaller than 8 KiB.
        if self.max_header_bytes < 8192 {
            return Err(Error::config("max_header_bytes", "must be at least 8192"));
        }
        // Semaphores count in usize, bodies' memory in bytes: keep both far from overflow.
        if self.max_body_bytes > (1 << 40) || self.max_active_requests > (1 << 20) {
            return Err(Error::config(
                "max_body_bytes / max_active_requests",
                "unreasonably large",
            ));
        }
        Ok(())
    }
}

/// What the server has done so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerStats {
    /// HTTP requests answered or being answered (requests hyper rejects as malformed HTTP are
    /// not counted).
    pub requests: u64,
    /// Chat completions the model thread generated (a request whose client had gone before its
    /// turn is not generated: see `cancelled`).
    pub completions: u64,
    /// Generation calls (batches) run.
    pub batches: u64,
    /// Rows generated over all batches.
    pub rows: u64,
    /// The most rows in one batch.
    pub max_batch_rows: u64,
    /// Batches whose generation failed.
    pub failed_batches: u64,
    /// Queued chat completions dropped because their client hung up before generation.
    pub cancelled: u64,
    /// Chat completions in progress now (validated and queued, generating, or being written).
    pub in_flight: u64,
    /// Chat completions refused with a 503 because `max_active_requests` were in progress.
    pub busy_rejections: u64,
}

/// A model ready to be served.
pub struct Server {
    model: CausalLm,
    tokenizer: ChatTokenizer,
    name: String,
    config: ServeConfig,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("name", &self.name)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// State the request handlers share.
pub(crate) struct Shared {
    pub tokenizer: ChatTokenizer,
    pub name: String,
    pub created: u64,
    pub context: usize,
    /// The model's vocabulary size: token ids in prompts must be below it.
    pub vocab: usize,
    pub config: ServeConfig,
    /// The model thread's queue; `std::sync::mpsc::Sender` is `Sync`, so handlers send directly.
    pub jobs: Sender<Msg>,
    pub counters: Arc<Counters>,
    /// Permits for chat completions in progress.
    pub active: Arc<Semaphore>,
    /// Bytes of request bodies being read, all requests together.
    pub body_budget: Arc<Semaphore>,
    pub busy: AtomicU64,
    pub nonce: u64,
    pub serial: AtomicU64,
    /// The LoRA adapters served beside the model: name → folder (the model thread holds them).
    pub adapters: RwLock<BTreeMap<String, String>>,
}

impl Shared {
    /// The served adapters' names.
    pub fn adapter_names(&self) -> Vec<String> {
        self.adapters_read().keys().cloned().collect()
    }

    pub fn adapters_read(&self) -> RwLockReadGuard<'_, BTreeMap<String, String>> {
        // A handler that panicked holding the lock left a map that is still whole.
        self.adapters.read().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn adapters_write(&self) -> RwLockWriteGuard<'_, BTreeMap<String, String>> {
        self.adapters
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl Server {
    /// Loads a Hugging Face folder; the served name defaults to the folder as given.
    pub fn load(dir: impl AsRef<Path>, opts: LoadOptions, config: ServeConfig) -> Result<Self> {
        let dir = dir.as_ref();
        let tokenizer = ChatTokenizer::from_model_dir(dir)?;
        let model = CausalLm::load(dir, opts)?;
        Ok(Self::new(
            model,
            tokenizer,
            dir.display().to_string(),
            config,
        ))
    }

    /// Wraps a loaded model; `name` is the served model name unless the config sets one.
    pub fn new(
        model: CausalLm,
        tokenizer: ChatTokenizer,
        name: impl Into<String>,
        config: ServeConfig,
    ) -> Self {
        let name = config
            .served_model_name
            .clone()
            .unwrap_or_else(|| name.into());
        Server {
            model,
            tokenizer,
            name,
            config,
        }
    }

    /// The name clients ask for.
    pub fn model_name(&self) -> &str {
        &self.name
    }

    /// Binds the address and starts serving: the model on a thread of its own, HTTP on a tokio
    /// runtime owned by the returned handle.
    pub fn start(self) -> Result<ServerHandle> {
        let config = self.config;
        config.validate()?;
        let want = format!("{}:{}", config.host, config.port);
        let bind_err = |source| Error::Bind {
            addr: want.clone(),
            source,
        };
        let addrs: Vec<SocketAddr> = want.to_socket_addrs().map_err(bind_err)?.collect();
        let listener = std::net::TcpListener::bind(&addrs[..]).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        let addr = listener.local_addr().map_err(bind_err)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("optimsyn-serve-http")
            .enable_io()
            .enable_time()
            .build()
            .map_err(bind_err)?;
        let stop = stop_tokens(&self.model, &self.tokenizer);
        let context = self.model.config().max_position_embeddings;
        let vocab = self.model.config().vocab_size;
        let (tx, rx) = mpsc::channel();
        let killed = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Counters::default());
        let engine = Engine {
            model: self.model,
            stop_tokens: stop,
            max_batch: config.max_batch,
            batch_wait: Duration::from_millis(config.batch_wait_ms),
            killed: killed.clone(),
            counters: counters.clone(),
            threads: config.threads,
            adapters: Default::default(),
        };
        let model_thread = std::thread::Builder::new()
            .name("optimsyn-serve-model".into())
            .spawn(move || engine.run(rx))
            .map_err(bind_err)?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let shared = Arc::new(Shared {
            tokenizer: self.tokenizer,
            name: self.name,
            created: now.as_secs(),
            context,
            vocab,
            active: Arc::new(Semaphore::new(config.max_active_requests)),
            body_budget: Arc::new(Semaphore::new(config.max_body_bytes.saturating_mul(8))),
            config,
            jobs: tx.clone(),
            counters,
            busy: AtomicU64::new(0),
            nonce: now.as_nanos() as u64 ^ u64::from(std::process::id()),
            serial: AtomicU64::new(0),
            adapters: RwLock::new(BTreeMap::new()),
        });
        load_static_adapters(&shared)?;
        let listener = {
            let _guard = runtime.enter();
            tokio::net::TcpListener::from_std(listener).map_err(bind_err)?
        };
        let acceptor = http::Acceptor::spawn(&runtime, listener, shared.clone());
        tracing::info!(%addr, model = %shared.name, "serving OpenAI-compatible chat completions");
        Ok(ServerHandle {
            addr,
            shared,
            jobs: tx,
            killed,
            runtime: Some(runtime),
            acceptor: Some(acceptor),
            model: Some(model_thread),
        })
    }
}

/// Loads `config.lora_modules` on the model thread before the server takes requests.
fn load_static_adapters(shared: &Shared) -> Result<()> {
    for (name, path) in &shared.config.lora_modules {
        let field = format!("lora_modules.{name}");
        if name == &shared.name {
            return Err(Error::config(field, "is the base model's name"));
        }
        let (reply, rx) = tokio::sync::oneshot::channel();
        let op = lora::AdapterOp::Load {
            name: name.clone(),
            path: path.clone(),
            reply,
        };
        let stopped = || Error::config(&field, "the model thread stopped");
        shared.jobs.send(Msg::Adapter(op)).map_err(|_| stopped())?;
        rx.blocking_recv()
            .map_err(|_| stopped())?
            .map_err(|e| Error::config(&field, e.message))?;
        shared
            .adapters_write()
            .insert(name.clone(), path.display().to_string());
    }
    Ok(())
}

/// A running server. Dropping it shuts it down gracefully.
pub struct ServerHandle {
    addr: SocketAddr,
    shared: Arc<Shared>,
    jobs: Sender<Msg>,
    killed: Arc<AtomicBool>,
    runtime: Option<tokio::runtime::Runtime>,
    acceptor: Option<http::Acceptor>,
    model: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerHandle")
            .field("addr", &self.addr)
            .field("model", &self.shared.name)
            .finish_non_exhaustive()
    }
}

impl ServerHandle {
    /// The bound address (with the real port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR/v1`, the base URL an OpenAI client takes.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// The served model name.
    pub fn model_name(&self) -> &str {
        &self.shared.name
    }

    /// Counters so far.
    pub fn stats(&self) -> ServerStats {
        let c = &self.shared.counters;
        let free = self.shared.active.available_permits();
        ServerStats {
            requests: c.requests.load(Ordering::Relaxed),
            completions: c.jobs.load(Ordering::Relaxed),
            batches: c.batches.load(Ordering::Relaxed),
            rows: c.rows.load(Ordering::Relaxed),
            max_batch_rows: c.max_rows.load(Ordering::Relaxed),
            failed_batches: c.errors.load(Ordering::Relaxed),
            cancelled: c.cancelled.load(Ordering::Relaxed),
            in_flight: self.shared.config.max_active_requests.saturating_sub(free) as u64,
            busy_rejections: self.shared.busy.load(Ordering::Relaxed),
        }
    }

    /// Blocks while the server runs (until its accept loop ends, which it does not by itself).
    pub fn wait(mut self) {
        if let (Some(rt), Some(a)) = (&self.runtime, &mut self.acceptor) {
            a.wait(rt);
        }
        self.stop(false);
    }

    /// Stops accepting, finishes the requests in progress (their replies close the connection),
    /// closes idle connections, then stops the model thread.
    pub fn shutdown(mut self) {
        self.stop(false);
    }

    /// Stops at once, as if the process died: every connection is cut without a reply and queued
    /// requests are dropped. Returns when the threads are gone (the model thread after the batch
    /// it is running).
    pub fn kill(mut self) {
        self.stop(true);
    }

    fn stop(&mut self, kill: bool) {
        if kill {
            self.killed.store(true, Ordering::SeqCst);
            let _ = self.jobs.send(Msg::Stop);
        }
        if let (Some(rt), Some(a)) = (&self.runtime, self.acceptor.take()) {
            if kill {
                a.abort();
            } else {
                a.drain(rt);
            }
        }
        if let Some(rt) = self.runtime.take() {
            // Tasks left (only after a kill) are dropped, which closes their sockets.
            rt.shutdown_timeout(Duration::from_secs(1));
        }
        let _ = self.jobs.send(Msg::Stop);
        if let Some(m) = self.model.take() {
            let _ = m.join();
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        if self.model.is_some() {
            self.stop(false);
        }
    }
}
