//! Shared helpers: the tiny model, short prompts that fit its 64-token context, and a scripted
//! HTTP server that misbehaves on purpose. All traffic stays on 127.0.0.1.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use crate::tiny::{MODEL, local, model_dir, prompts, tiny_prompt};

/// What the scripted server does with one request.
#[derive(Clone, Debug)]
pub enum Act {
    /// Answer with a status, extra header lines and a body.
    Reply(u16, &'static str, String),
    /// Wait, then answer 200 with the body.
    Slow(Duration, String),
    /// Close the connection without answering.
    Close,
    /// Write bytes that are not HTTP, then close.
    Garbage,
}

/// A one-port HTTP server that plays `script` (the last act repeats), one request per
/// connection. It stops when dropped, and by itself after 30 s.
pub struct Scripted {
    pub url: String,
    pub hits: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Scripted {
    pub fn start(script: Vec<Act>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let url = format!("http://{}/v1", listener.local_addr().expect("addr"));
        listener.set_nonblocking(true).expect("nonblocking");
        let hits = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (h, s) = (hits.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(30);
            while !s.load(Ordering::SeqCst) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let i = h.fetch_add(1, Ordering::SeqCst);
                        let act = script[i.min(script.len() - 1)].clone();
                        // Detached: a slow act ends by itself after its sleep.
                        std::thread::spawn(move || play(stream, act));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Scripted {
            url,
            hits,
            stop,
            thread: Some(thread),
        }
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn play(stream: TcpStream, act: Act) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut reader = BufReader::new(stream);
    // Read the head and the body (Content-Length) so the client has sent everything.
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            length = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0u8; length];
    if reader.read_exact(&mut body).is_err() {
        return;
    }
    let mut stream = reader.into_inner();
    let reply = |stream: &mut TcpStream, status: u16, extra: &str, body: &str| {
        let _ = write!(
            stream,
            "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n{body}",
            body.len()
        );
        let _ = stream.flush();
    };
    match act {
        Act::Reply(status, extra, body) => reply(&mut stream, status, extra, &body),
        Act::Slow(d, body) => {
            std::thread::sleep(d);
            reply(&mut stream, 200, "", &body);
        }
        Act::Close => {}
        Act::Garbage => {
            let _ = stream.write_all(b"\x00\x01 this is not http\r\n\r\n");
        }
    }
}

/// A valid chat-completions reply with `content`.
pub fn completion_body(content: &str) -> String {
    serde_json::json!({
        "id": "x", "object": "chat.completion", "created": 0, "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
    })
    .to_string()
}
