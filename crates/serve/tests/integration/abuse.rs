//! The server as a hostile client meets it: idle and slow connections, malformed, deep and huge
//! bodies, huge heads, clients that hang up, out-of-range parameters, a full house, a shutdown
//! with everything open. After each, a plain request must still be answered promptly and the
//! server's memory must stay bounded.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use optimsyn_serve::ServeConfig;
use serde_json::{Value, json};

use crate::common::{MODEL, start_server};
use crate::serve::{chat, post, sse_content};

/// The process's resident memory in bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status");
    kb * 1024
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s
}

/// The status of a raw reply (0 when the server closed without one).
fn status_of(reply: &str) -> u16 {
    reply
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Reads what the server sends until it closes, ignoring resets; panics when it does not close
/// within the 10 s read timeout.
fn read_reply(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                panic!(
                    "the server kept the connection open ({} bytes read)",
                    out.len()
                )
            }
            Err(_) => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn post_head(len: usize, extra: &str) -> String {
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len}\r\nConnection: close\r\n{extra}\r\n"
    )
}

/// A plain chat request gets a 200 within `within`.
fn answers_promptly(server: &optimsyn_serve::ServerHandle, within: Duration) {
    let t = Instant::now();
    let (status, body) = post(server, &chat(json!({"max_tokens": 4})));
    assert_eq!(status, 200, "{body}");
    assert!(
        t.elapsed() < within,
        "a plain request took {:?}",
        t.elapsed()
    );
}

/// Polls until no chat completion is in progress (bounded).
fn drained(server: &optimsyn_serve::ServerHandle) -> bool {
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until {
        if server.stats().in_flight == 0 {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn idle_and_slow_connections_never_block_a_request() {
    let server = start_server(ServeConfig {
        idle_timeout_secs: 3,
        ..Default::default()
    });
    let addr = server.local_addr();
    let idle: Vec<TcpStream> = (0..300).map(|_| connect(addr)).collect();
    let mut slow: Vec<TcpStream> = (0..50).map(|_| connect(addr)).collect();
    for s in &mut slow {
        s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Le")
            .expect("half a head");
    }
    // One more that trickles its head a byte at a time, never finishing.
    let mut trickle = connect(addr);
    let started = Instant::now();
    for b in b"GET /health HTTP/1.1\r\nX-Slow: ".iter() {
        trickle.write_all(&[*b]).expect("a byte");
        std::thread::sleep(Duration::from_millis(20));
    }
    answers_promptly(&server, Duration::from_secs(3));
    // The head timeout closes them all, the trickler included, well within the read timeout.
    for mut s in idle.into_iter().chain(slow).chain([trickle]) {
        let reply = read_reply(&mut s);
        assert!(
            reply.is_empty() || status_of(&reply) == 408,
            "an idle connection got {reply:?}"
        );
    }
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(8),
        "idle connections were closed only after {waited:?}"
    );
    answers_promptly(&server, Duration::from_secs(3));
    server.shutdown();
}

#[test]
fn hostile_bodies_and_heads_get_errors_and_memory_stays_bounded() {
    let server = start_server(ServeConfig::default());
    let addr = server.local_addr();
    let before = rss();
    let raw = |bytes: &[u8]| {
        let mut s = connect(addr);
        let _ = s.write_all(bytes);
        read_reply(&mut s)
    };
    let error_body = |reply: &str| -> Value {
        serde_json::from_str(reply.split("\r\n\r\n").nth(1).unwrap_or("")).unwrap_or(Value::Null)
    };
    for body in [
        "{\"model\": ".to_string(),
        "[".repeat(100_000),
        format!(
            "{{\"model\": \"{MODEL}\", \"messages\": {}}}",
            "[".repeat(100_000)
        ),
        "\"just a string\"".to_string(),
    ] {
        let mut bytes = post_head(body.len(), "").into_bytes();
        bytes.extend_from_slice(body.as_bytes());
        let reply = raw(&bytes);
        assert_eq!(status_of(&reply), 400, "{:.200}", reply);
        let e = error_body(&reply);
        assert_eq!(e["error"]["type"], "invalid_request_error", "{reply:.300}");
        assert!(e["error"]["message"].is_string(), "{reply:.300}");
    }
    // A declared 64 MiB body is refused before it is sent.
    let mut s = connect(addr);
    s.write_all(post_head(64 << 20, "").as_bytes()).unwrap();
    let reply = read_reply(&mut s);
    assert_eq!(status_of(&reply), 413, "{reply:.300}");
    assert_eq!(error_body(&reply)["error"]["code"], "request_too_large");
    // A chunked one is cut at max_body_bytes (16 MiB): the writer is stopped, not buffered.
    let mut s = connect(addr);
    s.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let mut reader = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let chunk = vec![b' '; 1 << 20];
        let mut sent = 0usize;
        for _ in 0..64 {
            let head = format!("{:x}\r\n", chunk.len());
            let ok = s.write_all(head.as_bytes()).is_ok()
                && s.write_all(&chunk).is_ok()
                && s.write_all(b"\r\n").is_ok();
            if !ok {
                break;
            }
            sent += chunk.len();
        }
        sent
    });
    let reply = read_reply(&mut reader);
    let sent = writer.join().unwrap();
    assert!(status_of(&reply) == 413 || reply.is_empty(), "{reply:.300}");
    assert!(sent < 64 << 20, "the server read all {sent} bytes");
    // A 1 MiB head: 431, or the connection closed; either way the server goes on.
    let mut head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
    head.extend(std::iter::repeat_n(b'a', 1 << 20));
    head.extend_from_slice(b"\r\n\r\n");
    let reply = raw(&head);
    assert!(reply.is_empty() || status_of(&reply) == 431, "{reply:.300}");
    // Many headers.
    let mut many = b"GET /health HTTP/1.1\r\n".to_vec();
    for i in 0..500 {
        many.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    let reply = raw(&many);
    assert!(reply.is_empty() || status_of(&reply) == 431, "{reply:.300}");
    answers_promptly(&server, Duration::from_secs(3));
    let grown = rss().saturating_sub(before);
    assert!(
        grown < 200 << 20,
        "resident memory grew by {} MiB",
        grown >> 20
    );
    server.shutdown();
}

#[test]
fn clients_that_hang_up_leave_nothing_behind() {
    let server = start_server(ServeConfig::default());
    let addr = server.local_addr();
    let streaming = chat(json!({"stream": true, "n": 4, "max_tokens": 12}))
        .to_string()
        .into_bytes();
    for _ in 0..20 {
        // Mid-stream: read the first event, then go.
        let mut s = connect(addr);
        let mut bytes = post_head(streaming.len(), "").into_bytes();
        bytes.extend_from_slice(&streaming);
        s.write_all(&bytes).unwrap();
        let mut buf = [0u8; 64];
        let mut seen = Vec::new();
        while !String::from_utf8_lossy(&seen).contains("data: ") {
            let n = s.read(&mut buf).expect("the stream starts");
            assert!(n > 0, "closed before the first event");
            seen.extend_from_slice(&buf[..n]);
        }
        drop(s);
        // Before the reply: the whole request sent, nothing read.
        let mut s = connect(addr);
        s.write_all(&bytes).unwrap();
        drop(s);
        // Mid-body.
        let mut s = connect(addr);
        s.write_all(&bytes[..bytes.len() - 10]).unwrap();
        drop(s);
    }
    assert!(drained(&server), "still in flight: {:?}", server.stats());
    answers_promptly(&server, Duration::from_secs(3));
    // And a stream read to the end is whole.
    let (status, body) = post(&server, &chat(json!({"stream": true})));
    assert_eq!(status, 200);
    assert!(sse_content(&body).2, "ends with [DONE]");
    assert!(drained(&server), "still in flight: {:?}", server.stats());
    server.shutdown();
}

#[test]
fn out_of_range_parameters_get_400_like_vllm() {
    let server = start_server(ServeConfig::default());
    let cases: Vec<(Value, &str, Option<&str>)> = vec![
        (
            json!({"max_tokens": 1_000_000_000_000i64}),
            "max_tokens",
            Some("context_length_exceeded"),
        ),
        (json!({"max_tokens": 1e12}), "max_tokens", None),
        (
            json!({"max_tokens": 60}),
            "max_tokens",
            Some("context_length_exceeded"),
        ),
        (
            json!({"max_completion_tokens": 1000, "max_tokens": 2}),
            "max_completion_tokens",
            Some("context_length_exceeded"),
        ),
        (json!({"max_tokens": -3}), "max_tokens", None),
        (json!({"n": 0}), "n", None),
        (json!({"n": -1}), "n", None),
        (json!({"n": 17}), "n", None),
        (json!({"temperature": -1}), "temperature", None),
        (json!({"temperature": 3}), "temperature", None),
        (json!({"top_p": 0}), "top_p", None),
        (json!({"top_p": 1.5}), "top_p", None),
        (json!({"top_k": -5}), "top_k", None),
        (json!({"stop": ["a", ""]}), "stop", None),
        (json!({"presence_penalty": 1}), "presence_penalty", None),
        (json!({"seed": "x"}), "seed", None),
    ];
    for (extra, param, code) in &cases {
        let (status, body) = post(&server, &chat(extra.clone()));
        assert_eq!(status, 400, "{extra} → {body}");
        let v: Value = serde_json::from_str(&body).expect("an error object");
        let e = &v["error"];
        assert!(
            e["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{body}"
        );
        assert_eq!(e["type"], "invalid_request_error", "{body}");
        assert_eq!(e["param"], *param, "{extra} → {body}");
        let want_code = code.map_or(Value::Null, |c| json!(c));
        assert_eq!(e["code"], want_code, "{extra} → {body}");
    }
    // The message says why, with vLLM's numbers.
    let (_, body) = post(&server, &chat(json!({"max_tokens": 60})));
    assert!(
        body.contains("maximum context length is 64 tokens"),
        "{body}"
    );
    // At the edge: the whole rest of the context is accepted.
    let (_, ok) = post(&server, &chat(json!({"max_tokens": 1})));
    let v: Value = serde_json::from_str(&ok).unwrap();
    let room = 64 - v["usage"]["prompt_tokens"].as_i64().unwrap();
    let (status, body) = post(&server, &chat(json!({"max_tokens": room})));
    assert_eq!(status, 200, "{body}");
    let (status, _) = post(&server, &chat(json!({"max_tokens": room + 1})));
    assert_eq!(status, 400);
    server.shutdown();
}

#[test]
fn only_active_requests_beyond_the_bound_get_503() {
    // The model thread gathers a batch for 1.5 s, so the first request stays active that long.
    let server = start_server(ServeConfig {
        max_active_requests: 1,
        batch_wait_ms: 1500,
        ..Default::default()
    });
    let idle: Vec<TcpStream> = (0..100).map(|_| connect(server.local_addr())).collect();
    std::thread::scope(|sc| {
        let first = sc.spawn(|| post(&server, &chat(json!({}))));
        std::thread::sleep(Duration::from_millis(400));
        assert_eq!(server.stats().in_flight, 1);
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .proxy(None)
            .build()
            .into();
        let mut r = agent
            .post(format!("{}/chat/completions", server.base_url()))
            .header("Content-Type", "application/json")
            .send(chat(json!({})).to_string())
            .expect("request");
        assert_eq!(r.status().as_u16(), 503);
        assert_eq!(
            r.headers().get("retry-after").and_then(|v| v.to_str().ok()),
            Some("1")
        );
        let v: Value = serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
        assert_eq!(v["error"]["type"], "server_error");
        // Other routes are not limited.
        let (status, _) = {
            let mut r = agent
                .get(format!("{}/models", server.base_url()))
                .call()
                .expect("models");
            (r.status().as_u16(), r.body_mut().read_to_string())
        };
        assert_eq!(status, 200);
        let (status, body) = first.join().unwrap();
        assert_eq!(status, 200, "{body}");
    });
    assert_eq!(server.stats().busy_rejections, 1);
    assert!(drained(&server));
    drop(idle);
    server.shutdown();
}

#[test]
fn shutdown_finishes_requests_in_progress_and_closes_idle_connections() {
    let server = start_server(ServeConfig {
        batch_wait_ms: 800,
        ..Default::default()
    });
    let addr = server.local_addr();
    let base = server.base_url();
    let mut idle: Vec<TcpStream> = (0..50).map(|_| connect(addr)).collect();
    let in_progress = std::thread::spawn(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .proxy(None)
            .build()
            .into();
        let mut r = agent
            .post(format!("{base}/chat/completions"))
            .header("Content-Type", "application/json")
            .send(chat(json!({})).to_string())
            .expect("request");
        (
            r.status().as_u16(),
            r.body_mut().read_to_string().unwrap_or_default(),
        )
    });
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    server.shutdown();
    let took = t.elapsed();
    let (status, body) = in_progress.join().unwrap();
    assert_eq!(status, 200, "the request in progress is answered: {body}");
    assert!(took < Duration::from_secs(5), "shutdown took {took:?}");
    for s in &mut idle {
        assert_eq!(
            read_reply(s),
            "",
            "idle connections are closed without a reply"
        );
    }
    assert!(TcpStream::connect(addr).is_err(), "no longer accepting");
}

#[test]
fn slow_bodies_time_out_and_their_memory_is_bounded() {
    // Bodies being read may hold 8 × 8 KiB together; each gets 2 s to arrive.
    let server = start_server(ServeConfig {
        max_body_bytes: 8192,
        body_timeout_secs: 2,
        ..Default::default()
    });
    let addr = server.local_addr();
    let started = Instant::now();
    let mut slow: Vec<TcpStream> = (0..10)
        .map(|_| {
            let mut s = connect(addr);
            s.write_all(post_head(8000, "").as_bytes()).unwrap();
            s.write_all(&[b' '; 7500]).unwrap();
            s
        })
        .collect();
    let statuses: Vec<u16> = slow.iter_mut().map(|s| status_of(&read_reply(s))).collect();
    let busy = statuses.iter().filter(|&&s| s == 503).count();
    let timed_out = statuses.iter().filter(|&&s| s == 408).count();
    assert!(
        busy >= 1,
        "10 × 7500 bytes exceed the 64 KiB budget: {statuses:?}"
    );
    assert_eq!(busy + timed_out, 10, "{statuses:?}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(6),
        "slow bodies were cut after {took:?}"
    );
    answers_promptly(&server, Duration::from_secs(3));
    server.shutdown();
}
