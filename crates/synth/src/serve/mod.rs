//! An OpenAI-compatible server for a local model: `POST /v1/chat/completions` (with `stream`,
//! `seed`, `stop`, `max_tokens` / `max_completion_tokens`, `temperature`, `top_p`, `top_k`, `n`,
//! `logprobs`, `usage`), `GET /v1/models`, `GET /v1/models/{id}` and `GET /health`.
//!
//! Threads: one accepts connections; one per connection parses requests, renders and encodes the
//! prompt and decodes the reply; one owns the model and runs every waiting request, grouped by
//! sampling settings, as batched generation (see [`ServeConfig::max_batch`]). A malformed request
//! gets a 4xx reply in OpenAI's error shape and the server goes on serving. The server binds to
//! 127.0.0.1 unless told otherwise.
//!
//! Sampling is reproducible: choice `j` of a request with `seed` `s` draws from the stream
//! [`stream_key`](crate::stream_key)`(s, j)`, whatever else is in its batch. A request without a
//! seed gets a fresh one. Temperature 0 is greedy.
//!
//! With `stream: true` the reply is server-sent events in OpenAI's chunk format (a role chunk, one
//! content chunk per decoded piece, a chunk with the finish reason, a usage chunk when
//! `stream_options.include_usage`, then `data: [DONE]`). The chunks are sent when the row's
//! generation is complete, not token by token: optimsyn-lm generates a batch in one call.

mod api;
mod engine;
mod http;

use std::collections::HashMap;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use optimsyn_data_io::{ChatMessage, ChatTokenizer, Role};
use optimsyn_lm::{CausalLm, LoadOptions};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::error::{Error, Result};
use crate::local::stop_tokens;
use api::{ApiError, ChatRequest, Content, Stop};
use engine::{Counters, Decoded, Engine, Job, Msg, Sampling, decode_row};
use http::{Conn, ReadError, Request};

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
    /// Most open connections; more get a 503. Default 64.
    pub max_connections: usize,
    /// Largest request body in bytes. Default 16 MiB.
    pub max_body_bytes: usize,
    /// Largest `n`. Default 16.
    pub max_n: u32,
    /// Seconds an idle keep-alive connection (or a stalled client) is kept. Default 120.
    pub idle_timeout_secs: u64,
    /// libtorch threads of the model thread; `None` keeps libtorch's default (the machine's
    /// cores).
    pub threads: Option<usize>,
    /// Chat-template arguments for every request (a request's `chat_template_kwargs` override
    /// them), e.g. `{"enable_thinking": false}`.
    pub template_kwargs: Map<String, Value>,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            host: "127.0.0.1".into(),
            port: 8000,
            served_model_name: None,
            max_batch: 8,
            batch_wait_ms: 5,
            max_connections: 64,
            max_body_bytes: 16 << 20,
            max_n: 16,
            idle_timeout_secs: 120,
            threads: None,
            template_kwargs: Map::new(),
        }
    }
}

/// What the server has done so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerStats {
    /// HTTP requests answered or being answered.
    pub requests: u64,
    /// Chat completions handed to the model thread.
    pub completions: u64,
    /// Generation calls (batches) run.
    pub batches: u64,
    /// Rows generated over all batches.
    pub rows: u64,
    /// The most rows in one batch.
    pub max_batch_rows: u64,
    /// Batches whose generation failed.
    pub failed_batches: u64,
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

/// State shared by the acceptor and the connection threads.
struct Shared {
    tokenizer: ChatTokenizer,
    name: String,
    created: u64,
    context: usize,
    config: ServeConfig,
    jobs: Sender<Msg>,
    stopping: AtomicBool,
    killed: Arc<AtomicBool>,
    conns: Mutex<HashMap<u64, TcpStream>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    next_conn: AtomicU64,
    active: AtomicUsize,
    counters: Arc<Counters>,
    nonce: u64,
    serial: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicked connection thread must not take the server down with it.
    m.lock().unwrap_or_else(|p| p.into_inner())
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

    /// Binds the address and starts serving in background threads.
    pub fn start(self) -> Result<ServerHandle> {
        let config = self.config;
        let want = format!("{}:{}", config.host, config.port);
        let bind_err = |source| Error::Bind {
            addr: want.clone(),
            source,
        };
        if config.max_batch == 0 {
            return Err(Error::config("max_batch", "must be at least 1"));
        }
        let addrs: Vec<SocketAddr> = want.to_socket_addrs().map_err(bind_err)?.collect();
        let listener = TcpListener::bind(&addrs[..]).map_err(bind_err)?;
        let addr = listener.local_addr().map_err(bind_err)?;
        let stop = stop_tokens(&self.model, &self.tokenizer);
        let context = self.model.config().max_position_embeddings;
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
            config,
            jobs: tx.clone(),
            stopping: AtomicBool::new(false),
            killed,
            conns: Mutex::new(HashMap::new()),
            threads: Mutex::new(Vec::new()),
            next_conn: AtomicU64::new(0),
            active: AtomicUsize::new(0),
            counters,
            nonce: now.as_nanos() as u64 ^ u64::from(std::process::id()),
            serial: AtomicU64::new(0),
        });
        let acc = shared.clone();
        let acceptor = std::thread::Builder::new()
            .name("optimsyn-serve-accept".into())
            .spawn(move || accept_loop(listener, acc))
            .map_err(bind_err)?;
        tracing::info!(%addr, model = %shared.name, "serving OpenAI-compatible chat completions");
        Ok(ServerHandle {
            addr,
            shared,
            jobs: tx,
            acceptor: Some(acceptor),
            model: Some(model_thread),
        })
    }
}

/// A running server. Dropping it shuts it down gracefully.
pub struct ServerHandle {
    addr: SocketAddr,
    shared: Arc<Shared>,
    jobs: Sender<Msg>,
    acceptor: Option<JoinHandle<()>>,
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
        ServerStats {
            requests: c.requests.load(Ordering::Relaxed),
            completions: c.jobs.load(Ordering::Relaxed),
            batches: c.batches.load(Ordering::Relaxed),
            rows: c.rows.load(Ordering::Relaxed),
            max_batch_rows: c.max_rows.load(Ordering::Relaxed),
            failed_batches: c.errors.load(Ordering::Relaxed),
        }
    }

    /// Blocks while the server runs (until another thread stops it, or forever).
    pub fn wait(mut self) {
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
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
        let s = &self.shared;
        if kill {
            s.killed.store(true, Ordering::SeqCst);
        }
        if !s.stopping.swap(true, Ordering::SeqCst) {
            // Wake the acceptor with a connection of our own.
            let mut wake = self.addr;
            if wake.ip().is_unspecified() {
                wake.set_ip(if wake.is_ipv4() {
                    std::net::Ipv4Addr::LOCALHOST.into()
                } else {
                    std::net::Ipv6Addr::LOCALHOST.into()
                });
            }
            let _ = TcpStream::connect_timeout(&wake, Duration::from_secs(1));
        }
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        // Idle connections wake with end-of-stream; busy ones finish their reply (killed: cut).
        for c in lock(&s.conns).values() {
            let _ = c.shutdown(if kill { Shutdown::Both } else { Shutdown::Read });
        }
        if kill {
            let _ = self.jobs.send(Msg::Stop);
        }
        let threads: Vec<JoinHandle<()>> = lock(&s.threads).drain(..).collect();
        for t in threads {
            let _ = t.join();
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

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    for stream in listener.incoming() {
        if shared.stopping.load(Ordering::SeqCst) {
            break;
        }
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("accept: {e}");
                // Out of file descriptors and the like: do not spin.
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
        };
        let mut threads = lock(&shared.threads);
        threads.retain(|t| !t.is_finished());
        if shared.active.load(Ordering::SeqCst) >= shared.config.max_connections {
            drop(threads);
            let mut c = Conn::new(stream, 0);
            let e = ApiError::status(503, "too many open connections; retry later");
            let _ = c.write_response(503, JSON, e.body().to_string().as_bytes(), false);
            continue;
        }
        let id = shared.next_conn.fetch_add(1, Ordering::SeqCst);
        if let Ok(clone) = stream.try_clone() {
            lock(&shared.conns).insert(id, clone);
        }
        shared.active.fetch_add(1, Ordering::SeqCst);
        let sh = shared.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("optimsyn-serve-conn-{id}"))
            .spawn(move || {
                serve_connection(stream, &sh);
                lock(&sh.conns).remove(&id);
                sh.active.fetch_sub(1, Ordering::SeqCst);
            });
        match spawned {
            Ok(t) => threads.push(t),
            Err(e) => {
                tracing::warn!("cannot start a connection thread: {e}");
                lock(&shared.conns).remove(&id);
                shared.active.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }
}

const JSON: &str = "application/json";

/// A reply to write.
enum Reply {
    Json(u16, Value),
    Events(Vec<Value>),
}

fn serve_connection(stream: TcpStream, shared: &Shared) {
    let idle = Duration::from_secs(shared.config.idle_timeout_secs.max(1));
    let _ = stream.set_read_timeout(Some(idle));
    let _ = stream.set_write_timeout(Some(idle));
    let _ = stream.set_nodelay(true);
    let mut conn = Conn::new(stream, shared.config.max_body_bytes);
    loop {
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let req = match conn.read_request() {
            Ok(r) => r,
            Err(ReadError::Closed) => return,
            Err(ReadError::Io(e)) => {
                tracing::debug!("connection closed: {e}");
                return;
            }
            Err(ReadError::Bad { status, message }) => {
                shared.counters.requests.fetch_add(1, Ordering::Relaxed);
                let e = ApiError::status(status, message);
                let _ = conn.write_response(status, JSON, e.body().to_string().as_bytes(), false);
                conn.linger_close();
                return;
            }
        };
        shared.counters.requests.fetch_add(1, Ordering::Relaxed);
        let reply = route(shared, &req);
        if shared.killed.load(Ordering::SeqCst) {
            return;
        }
        let keep = req.keep_alive && !shared.stopping.load(Ordering::SeqCst);
        let written = match reply {
            Reply::Json(status, body) => {
                conn.write_response(status, JSON, body.to_string().as_bytes(), keep)
            }
            Reply::Events(events) => write_events(&mut conn, &events, keep),
        };
        if written.is_err() || !keep {
            return;
        }
    }
}

fn write_events(conn: &mut Conn, events: &[Value], keep: bool) -> std::io::Result<()> {
    conn.start_chunked(200, "text/event-stream", keep)?;
    for e in events {
        conn.write_chunk(format!("data: {e}\n\n").as_bytes())?;
    }
    conn.write_chunk(b"data: [DONE]\n\n")?;
    conn.finish_chunked()
}

fn route(shared: &Shared, req: &Request) -> Reply {
    let path = req.path.trim_end_matches('/');
    let result = match (req.method.as_str(), path) {
        ("POST", "/v1/chat/completions") => chat(shared, &req.body),
        (_, "/v1/chat/completions") => Err(ApiError::status(
            405,
            format!("{} is not allowed here; use POST", req.method),
        )),
        ("GET", "/v1/models") => Ok(Reply::Json(
            200,
            json!({"object": "list", "data": [api::model_object(&shared.name, shared.created)]}),
        )),
        ("GET", "/health" | "/v1/health") => Ok(Reply::Json(200, json!({"status": "ok"}))),
        ("GET", p) if p.starts_with("/v1/models/") => {
            let id = &p["/v1/models/".len()..];
            if id == shared.name {
                Ok(Reply::Json(
                    200,
                    api::model_object(&shared.name, shared.created),
                ))
            } else {
                Err(model_not_found(id, &shared.name))
            }
        }
        (m, p) => Err(ApiError::status(404, format!("no route for {m} {p}"))),
    };
    result.unwrap_or_else(|e| Reply::Json(e.status, e.body()))
}

fn model_not_found(asked: &str, served: &str) -> ApiError {
    ApiError {
        status: 404,
        message: format!("the model `{asked}` does not exist; this server serves `{served}`"),
        kind: "invalid_request_error",
        param: Some("model".into()),
        code: Some("model_not_found"),
    }
}

/// A validated request, ready for the model thread.
struct Plan {
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

fn unsupported(param: &str, what: &str) -> ApiError {
    ApiError::invalid(
        format!("{what} is not supported by this server"),
        Some(param),
    )
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
        let content = match &m.content {
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
        };
        out.push(ChatMessage::new(role, content));
    }
    Ok(out)
}

fn plan(shared: &Shared, req: &ChatRequest) -> Result<Plan, ApiError> {
    if req.model != shared.name {
        return Err(model_not_found(&req.model, &shared.name));
    }
    let msgs = messages(req)?;
    let n = req.n.unwrap_or(1);
    if n < 1 || n > i64::from(shared.config.max_n) {
        return Err(ApiError::invalid(
            format!("n must be in 1..={}, got {n}", shared.config.max_n),
            Some("n"),
        ));
    }
    let temperature = req.temperature.unwrap_or(1.0);
    if !(temperature.is_finite() && (0.0..=2.0).contains(&temperature)) {
        return Err(ApiError::invalid(
            format!("temperature must be in [0, 2], got {temperature}"),
            Some("temperature"),
        ));
    }
    let top_p = req.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(
            format!("top_p must be in (0, 1], got {top_p}"),
            Some("top_p"),
        ));
    }
    let top_k = match req.top_k {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => k as usize,
        Some(k) => {
            return Err(ApiError::invalid(
                format!("top_k must be -1, 0 or positive, got {k}"),
                Some("top_k"),
            ));
        }
    };
    for (name, v) in [
        ("frequency_penalty", req.frequency_penalty),
        ("presence_penalty", req.presence_penalty),
    ] {
        if v.is_some_and(|v| v != 0.0) {
            return Err(unsupported(name, name));
        }
    }
    if req.logit_bias.as_ref().is_some_and(|b| !b.is_empty()) {
        return Err(unsupported("logit_bias", "logit_bias"));
    }
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
    let stream = req.stream.unwrap_or(false);
    let logprobs = req.logprobs.unwrap_or(false);
    if req.top_logprobs.is_some_and(|k| k > 0) {
        return Err(unsupported("top_logprobs", "top_logprobs"));
    }
    if logprobs && stream {
        return Err(unsupported("logprobs", "logprobs with stream"));
    }
    let stops = match &req.stop {
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
    let mut kwargs = shared.config.template_kwargs.clone();
    if let Some(k) = &req.chat_template_kwargs {
        kwargs.extend(k.iter().map(|(a, b)| (a.clone(), b.clone())));
    }
    let prompt = shared
        .tokenizer
        .render_chat_with(&msgs, true, &kwargs)
        .and_then(|r| shared.tokenizer.encode_rendered(&r.text))
        .map_err(|e| ApiError::invalid(e.to_string(), Some("messages")))?;
    let room = shared.context.saturating_sub(prompt.len());
    if prompt.is_empty() || room == 0 {
        return Err(ApiError::invalid(
            format!(
                "the prompt is {} tokens; this model's context is {} tokens, which leaves no room to generate",
                prompt.len(),
                shared.context
            ),
            Some("messages"),
        )
        .with_code("context_length_exceeded"));
    }
    let asked = req.max_completion_tokens.or(req.max_tokens);
    let max_new_tokens = match asked {
        None => room,
        Some(m) if m >= 1 => (m as u64).min(room as u64) as usize,
        Some(m) => {
            let param = if req.max_completion_tokens.is_some() {
                "max_completion_tokens"
            } else {
                "max_tokens"
            };
            return Err(ApiError::invalid(
                format!("{param} must be at least 1, got {m}"),
                Some(param),
            ));
        }
    };
    let seed = match req.seed {
        Some(s) => s as u64,
        None => {
            let k = shared.serial.fetch_add(1, Ordering::Relaxed);
            crate::generator::stream_key(shared.nonce, k as u32) ^ k
        }
    };
    Ok(Plan {
        prompt,
        n: n as u32,
        max_new_tokens,
        sampling: Sampling {
            temperature,
            top_p,
            top_k,
        }
        .normalized(),
        seed,
        stops,
        stream,
        include_usage: req
            .stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
        logprobs,
    })
}

fn chat(shared: &Shared, body: &[u8]) -> Result<Reply, ApiError> {
    let req = api::parse_request(body)?;
    let p = plan(shared, &req)?;
    let (tx, rx) = mpsc::channel();
    let unavailable = || ApiError::status(503, "the server is shutting down");
    shared
        .jobs
        .send(Msg::Job(Job {
            prompt: p.prompt.clone(),
            n: p.n,
            max_new_tokens: p.max_new_tokens,
            sampling: p.sampling,
            seed: p.seed,
            reply: tx,
        }))
        .map_err(|_| unavailable())?;
    let gens = rx
        .recv()
        .map_err(|_| unavailable())?
        .map_err(|m| ApiError::status(500, format!("generation failed: {m}")))?;
    let rows: Vec<Decoded> = gens
        .iter()
        .map(|g| decode_row(&shared.tokenizer, g, &p.stops))
        .collect::<std::result::Result<_, _>>()
        .map_err(|m| ApiError::status(500, format!("decoding failed: {m}")))?;
    let serial = shared.serial.fetch_add(1, Ordering::Relaxed);
    let id = format!("chatcmpl-{:016x}{:08x}", shared.nonce, serial & 0xffff_ffff);
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let completion_tokens: usize = rows.iter().map(|r| r.tokens.len()).sum();
    let usage = json!({
        "prompt_tokens": p.prompt.len(),
        "completion_tokens": completion_tokens,
        "total_tokens": p.prompt.len() + completion_tokens,
    });
    if !p.stream {
        let choices: Vec<Value> = rows
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let logprobs = if p.logprobs {
                    let content: Vec<Value> = r
                        .tokens
                        .iter()
                        .zip(&r.logprobs)
                        .map(|(&t, &lp)| {
                            let text = shared.tokenizer.decode(&[t], false).unwrap_or_default();
                            json!({"token": text, "logprob": lp, "bytes": text.as_bytes(), "top_logprobs": []})
                        })
                        .collect();
                    json!({"content": content})
                } else {
                    Value::Null
                };
                json!({
                    "index": i,
                    "message": {"role": "assistant", "content": r.text},
                    "logprobs": logprobs,
                    "finish_reason": r.finish_reason,
                })
            })
            .collect();
        return Ok(Reply::Json(
            200,
            json!({
                "id": id, "object": "chat.completion", "created": created, "model": shared.name,
                "choices": choices, "usage": usage, "system_fingerprint": null,
            }),
        ));
    }
    let chunk = |choices: Value| {
        json!({"id": id, "object": "chat.completion.chunk", "created": created,
               "model": shared.name, "system_fingerprint": null, "choices": choices})
    };
    let mut events = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        events.push(chunk(
            json!([{"index": i, "delta": {"role": "assistant", "content": ""},
                                   "logprobs": null, "finish_reason": null}]),
        ));
        for piece in r.pieces.iter().filter(|s| !s.is_empty()) {
            events.push(chunk(json!([{"index": i, "delta": {"content": piece},
                                       "logprobs": null, "finish_reason": null}])));
        }
        events.push(chunk(json!([{"index": i, "delta": {}, "logprobs": null,
                                   "finish_reason": r.finish_reason}])));
    }
    if p.include_usage {
        let mut last = chunk(json!([]));
        last["usage"] = usage;
        events.push(last);
    }
    Ok(Reply::Events(events))
}
