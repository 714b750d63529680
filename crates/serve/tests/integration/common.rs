//! Shared helpers: the tiny model, short prompts that fit its 64-token context, a running server
//! and raw HTTP. All traffic stays on 127.0.0.1.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use optimsyn_serve::{ServeConfig, Server, ServerHandle};
use serde_json::Value;

pub use crate::tiny::{MODEL, load_model, local, prompts, tasks, tiny_prompt};

/// Starts a server for the tiny model on an ephemeral loopback port.
pub fn start_server(config: ServeConfig) -> ServerHandle {
    let (m, t) = load_model();
    Server::new(
        m,
        t,
        MODEL,
        ServeConfig {
            host: "127.0.0.1".into(),
            port: 0,
            ..config
        },
    )
    .start()
    .expect("server starts")
}

/// Sends raw bytes to `addr` and reads the reply until the server closes (bounded by a timeout).
pub fn raw_request(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    s.write_all(bytes).expect("write");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// POSTs `body` to `path` under the server's `/v1`; the status and the body.
pub fn post_to(server: &ServerHandle, path: &str, body: &Value) -> (u16, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .proxy(None)
        .build()
        .into();
    let mut r = agent
        .post(format!("{}/{path}", server.base_url()))
        .header("Content-Type", "application/json")
        .send(body.to_string())
        .expect("request");
    (
        r.status().as_u16(),
        r.body_mut().read_to_string().expect("body"),
    )
}

/// The ids of a completion's `tokens` array when they came as `token_id:N`
/// (`return_tokens_as_token_ids`).
pub fn token_ids_of(tokens: &Value) -> Vec<u32> {
    tokens
        .as_array()
        .expect("tokens")
        .iter()
        .map(|t| {
            let t = t.as_str().expect("string");
            t.strip_prefix("token_id:")
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("not a token id: {t}"))
        })
        .collect()
}
