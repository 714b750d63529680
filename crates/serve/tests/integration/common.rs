//! Shared helpers: the tiny model, short prompts that fit its 64-token context, a running server
//! and raw HTTP. All traffic stays on 127.0.0.1.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::Duration;

use optimsyn_data_io::{ChatMessage, ChatTokenizer, SeedDoc};
use optimsyn_lm::{CausalLm, LoadOptions};
use optimsyn_serve::{ServeConfig, Server, ServerHandle};
use optimsyn_synth::{
    ChatPrompt, GenerationParams, LocalGenerator, QaPrompt, QaTask, RubricSections,
};

/// The tiny Qwen3 (vocab 320, context 64 tokens) with a ChatML template.
pub fn model_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../lm/tests/fixtures/cli")
}

pub const MODEL: &str = "tiny";

pub fn load_model() -> (CausalLm, ChatTokenizer) {
    let dir = model_dir();
    let tok = ChatTokenizer::from_model_dir(&dir).expect("fixture tokenizer");
    let model = CausalLm::load(&dir, LoadOptions::default()).expect("fixture model");
    (model, tok)
}

pub fn local(params: GenerationParams) -> LocalGenerator {
    let (m, t) = load_model();
    LocalGenerator::new(m, t, params, MODEL).expect("local generator")
}

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

/// Generator templates short enough for the tiny model's context.
pub fn tiny_prompt() -> QaPrompt {
    QaPrompt::from_sources(
        ("{{ domain }}", "tiny system"),
        ("{{ document }} {{ prompt_related }}", "tiny user"),
    )
    .expect("tiny templates")
}

/// `n` short chat prompts.
pub fn prompts(n: usize) -> Vec<ChatPrompt> {
    (0..n)
        .map(|i| ChatPrompt {
            key: format!("p{i}"),
            messages: vec![ChatMessage::user(format!("hi {i}"))],
        })
        .collect()
}

/// `n` QA tasks on tiny documents, two rubrics per document.
pub fn tasks(n: usize) -> Vec<QaTask> {
    (0..n)
        .map(|i| {
            let doc = SeedDoc {
                id: format!("d{}", i / 2),
                text: format!("cat {i}"),
                domain: Some("pets".into()),
                extra: Default::default(),
            };
            QaTask::new(
                &doc,
                &format!("{}", i % 2),
                RubricSections {
                    prompt_related: "ask".into(),
                    ..Default::default()
                },
            )
        })
        .collect()
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
