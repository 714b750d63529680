//! The official `openai` Python package against the server (`tests/openai_client.py`, run with
//! `OPTIMSYN_PYTHON`, else `python3`): listing models, a greedy completion equal to the local
//! backend's (the same path as `optimsyn lm generate`: chat template with the generation prompt,
//! model ∪ tokenizer eos, special tokens skipped), streaming, 8 concurrent requests, a malformed
//! body answered 4xx while the server keeps serving.

use std::path::PathBuf;
use std::process::Command;

use optimsyn_data_io::ChatMessage;
use optimsyn_serve::ServeConfig;
use optimsyn_synth::{ChatPrompt, GenerationParams, Generator};
use serde_json::{Value, json};

use crate::common::{MODEL, local, prompts, start_server};

#[test]
fn the_openai_package_works_against_the_server() {
    let server = start_server(ServeConfig {
        batch_wait_ms: 20,
        ..Default::default()
    });
    let messages = vec![
        ChatMessage::system("Be brief."),
        ChatMessage::user("Name a cat."),
    ];
    let wire = json!(
        messages
            .iter()
            .map(|m| json!({"role": m.role.as_str(), "content": m.content}))
            .collect::<Vec<_>>()
    );
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/openai_client.py");
    let python = std::env::var("OPTIMSYN_PYTHON").unwrap_or_else(|_| "python3".into());
    let mut cmd = Command::new(&python);
    cmd.arg(&script)
        .arg(server.base_url())
        .arg(MODEL)
        .arg(wire.to_string());
    // Loopback only: no proxy from the environment.
    for v in [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ] {
        cmd.env_remove(v);
    }
    cmd.env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost");
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python} (set OPTIMSYN_PYTHON): {e}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{python} {}: {stderr}\n(the test needs `pip install openai==3.57.0` in OPTIMSYN_PYTHON)",
        script.display()
    );
    let r: Value = serde_json::from_slice(&out.stdout).expect("the script prints JSON");

    let want = local(GenerationParams::greedy(12))
        .generate_all(&[ChatPrompt {
            key: "chat".into(),
            messages,
        }])
        .pop()
        .unwrap()
        .unwrap();
    assert_eq!(r["models"], json!([MODEL]));
    assert_eq!(r["greedy"], want.text.as_str());
    assert_eq!(r["finish_reason"], want.finish_reason.as_str());
    assert_eq!(
        r["usage"]["completion_tokens"],
        want.completion_tokens.unwrap()
    );
    assert_eq!(r["stream"], r["greedy"]);
    assert_eq!(r["stream_finish"], r["finish_reason"]);
    assert_eq!(r["stream_usage"], r["usage"]);
    let concurrent: Vec<String> = local(GenerationParams::greedy(8))
        .generate_all(&prompts(8))
        .into_iter()
        .map(|c| c.unwrap().text)
        .collect();
    assert_eq!(r["concurrent"], json!(concurrent));
    assert_eq!(r["malformed_status"], 400);
    assert_eq!(r["malformed_error"]["type"], "invalid_request_error");
    assert_eq!(r["not_found"], 404);
    assert_eq!(r["after"], r["greedy"]);
    server.shutdown();
}
