//! The HTTP side: the accept loop, hyper's HTTP/1.1 connections with their limits, the routes,
//! and graceful shutdown.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{Method, Request, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use optimsyn_synth::openai::wire;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::runtime::Runtime;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;
use tower::ServiceExt;

use crate::Shared;
use crate::api::{ApiError, json_response, model_object};

/// The accept loop's task and its stop signal.
pub(crate) struct Acceptor {
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl Acceptor {
    pub fn spawn(rt: &Runtime, listener: TcpListener, shared: Arc<Shared>) -> Self {
        let (stop, rx) = watch::channel(false);
        let task = rt.spawn(accept_loop(listener, shared, rx));
        Acceptor {
            stop,
            task: Some(task),
        }
    }

    /// Blocks until the accept loop has ended (after a stop signal, once its connections are
    /// done).
    pub fn wait(&mut self, rt: &Runtime) {
        if let Some(t) = self.task.take() {
            let _ = rt.block_on(t);
        }
    }

    /// Stops accepting and waits for the connections: requests in progress finish, idle
    /// connections close.
    pub fn drain(mut self, rt: &Runtime) {
        let _ = self.stop.send(true);
        self.wait(rt);
    }

    /// Stops accepting without waiting; the runtime's shutdown drops the connections.
    pub fn abort(mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let graceful = GracefulShutdown::new();
    let open = Arc::new(Semaphore::new(shared.config.max_connections));
    let idle = Duration::from_secs(shared.config.idle_timeout_secs);
    let router = routes(shared.clone());
    loop {
        // At the connection bound, wait (connections queue in the kernel) rather than refuse:
        // idle ones time out, so a real request gets its turn.
        let permit = tokio::select! {
            p = open.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = stop.changed() => break,
        };
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    // Out of file descriptors and the like: do not spin.
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        let (r, sh) = (router.clone(), shared.clone());
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            sh.counters.requests.fetch_add(1, Ordering::Relaxed);
            r.clone().oneshot(trim_slash(req.map(Body::new)))
        });
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(idle)
            .max_header_size(shared.config.max_header_bytes)
            // hyper's read and write buffers grow to this; the head must fit in the read one.
            .max_buf_size(shared.config.max_header_bytes)
            .serve_connection(TimedIo::new(stream, idle), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("connection closed: {e}");
            }
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Drops a path's trailing slash, as the routes are written without one.
fn trim_slash(mut req: Request<Body>) -> Request<Body> {
    let path = req.uri().path();
    if path.len() > 1 && path.ends_with('/') {
        let trimmed = match path.trim_end_matches('/') {
            "" => "/",
            t => t,
        };
        let target = match req.uri().query() {
            Some(q) => format!("{trimmed}?{q}"),
            None => trimmed.to_string(),
        };
        if let Ok(uri) = target.parse::<Uri>() {
            *req.uri_mut() = uri;
        }
    }
    req
}

fn routes(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(crate::chat::handle))
        .route("/v1/completions", post(crate::completions::handle))
        .route("/v1/models", get(models))
        .route("/v1/load_lora_adapter", post(crate::lora::load))
        .route("/v1/unload_lora_adapter", post(crate::lora::unload))
        // Served names are often paths (`Qwen/Qwen3-8B`, a model folder).
        .route("/v1/models/{*id}", get(model))
        .route("/health", get(health))
        .route("/v1/health", get(health))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(shared)
}

async fn models(State(sh): State<Arc<Shared>>) -> Response {
    json_response(
        StatusCode::OK,
        &wire::ModelList {
            object: "list".into(),
            data: std::iter::once(model_object(&sh.name, sh.created))
                .chain(sh.adapters_read().iter().map(|(name, path)| wire::Model {
                    parent: Some(sh.name.clone()),
                    root: Some(path.clone()),
                    ..model_object(name, sh.created)
                }))
                .collect(),
        },
    )
}

async fn model(State(sh): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    if id == sh.name {
        return json_response(StatusCode::OK, &model_object(&sh.name, sh.created));
    }
    match sh.adapters_read().get(&id) {
        Some(path) => json_response(
            StatusCode::OK,
            &wire::Model {
                parent: Some(sh.name.clone()),
                root: Some(path.clone()),
                ..model_object(&id, sh.created)
            },
        ),
        None => ApiError::model_not_found(&id, &sh.name).into_response(),
    }
}

async fn health() -> Response {
    json_response(StatusCode::OK, &json!({"status": "ok"}))
}

async fn not_found(method: Method, uri: Uri) -> Response {
    ApiError::status(404, format!("no route for {method} {}", uri.path())).into_response()
}

async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    let posts = [
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/load_lora_adapter",
        "/v1/unload_lora_adapter",
    ];
    let allowed = if posts.contains(&uri.path()) {
        "POST"
    } else {
        "GET"
    };
    ApiError::status(
        405,
        format!("{method} is not allowed on {}; use {allowed}", uri.path()),
    )
    .into_response()
}

/// A connection whose writes fail once the client has read nothing for `limit`: a client that
/// stops reading its reply must not hold a connection (and a request slot) forever. hyper has a
/// timeout for reading heads, none for writing.
struct TimedIo<T> {
    inner: TokioIo<T>,
    limit: Duration,
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<T> TimedIo<T> {
    fn new(stream: T, limit: Duration) -> Self {
        TimedIo {
            inner: TokioIo::new(stream),
            limit,
            stalled: None,
        }
    }

    /// After a write returned `Pending`: still pending, or timed out.
    fn stall<R>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<R>> {
        let limit = self.limit;
        let sleep = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the client read nothing for {limit:?}"),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn progress<R>(&mut self, cx: &mut Context<'_>, p: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        match p {
            Poll::Pending => self.stall(cx),
            ready => {
                self.stalled = None;
                ready
            }
        }
    }
}

impl<T: AsyncRead + Unpin> hyper::rt::Read for TimedIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> hyper::rt::Write for TimedIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let p = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.progress(cx, p)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let p = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.progress(cx, p)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let p = Pin::new(&mut this.inner).poll_flush(cx);
        this.progress(cx, p)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let p = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.progress(cx, p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::rt::Write;
    use std::time::Instant;
    use tokio::io::AsyncReadExt;

    /// Writes `data` through `io`; the bytes written, and the error that stopped it, if any.
    async fn write_all<T: AsyncWrite + Unpin>(
        io: &mut TimedIo<T>,
        data: &[u8],
    ) -> (usize, Option<io::Error>) {
        let mut sent = 0;
        while sent < data.len() {
            match std::future::poll_fn(|cx| Pin::new(&mut *io).poll_write(cx, &data[sent..])).await
            {
                Ok(n) => sent += n,
                Err(e) => return (sent, Some(e)),
            }
        }
        (sent, None)
    }

    fn runtime() -> Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
    }

    #[test]
    fn a_write_nobody_reads_times_out() {
        runtime().block_on(async {
            let (near, _far) = tokio::io::duplex(64);
            let mut io = TimedIo::new(near, Duration::from_millis(150));
            let start = Instant::now();
            let (sent, err) =
                tokio::time::timeout(Duration::from_secs(5), write_all(&mut io, &[7u8; 1024]))
                    .await
                    .expect("the stalled write ends by itself");
            assert_eq!(sent, 64, "the pipe holds 64 bytes");
            assert_eq!(err.map(|e| e.kind()), Some(io::ErrorKind::TimedOut));
            assert!(start.elapsed() >= Duration::from_millis(150));
        });
    }

    #[test]
    fn a_slow_reader_that_keeps_reading_is_not_cut() {
        runtime().block_on(async {
            let (near, mut far) = tokio::io::duplex(64);
            let reader = tokio::spawn(async move {
                let mut got = Vec::new();
                let mut buf = [0u8; 32];
                loop {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    match far.read(&mut buf).await {
                        Ok(0) | Err(_) => return got.len(),
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
            });
            // Each stall is shorter than the limit, the whole write far longer.
            let mut io = TimedIo::new(near, Duration::from_millis(150));
            let (sent, err) = write_all(&mut io, &[7u8; 1024]).await;
            assert!(err.is_none(), "{err:?}");
            assert_eq!(sent, 1024);
            drop(io);
            assert_eq!(reader.await.expect("the reader"), 1024);
        });
    }
}
