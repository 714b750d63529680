//! Rollouts on a server: `optimsyn train` with `models.policy_url` publishes the policy's adapter
//! to `optimsyn serve --enable-lora` before every GRPO step and samples the step's rollouts there;
//! the trainer's own log-probs agree with the server's, the server ends up with one adapter (the
//! last published), and that adapter gives what the local model with it gives.

use std::path::{Path, PathBuf};
use std::process::Command;

use optimsyn_lm::{CausalLm, LoadOptions, LoraAdapter, SamplingParams};
use optimsyn_serve::{ServeConfig, Server, ServerHandle};
use serde_json::{Value, json};

fn demo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("demo")
}

fn rows(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON row"))
        .collect()
}

fn post(server: &ServerHandle, path: &str, body: &Value) -> Value {
    let text = http_post(&format!("{}/{path}", server.base_url()), &body.to_string());
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}: {text}"))
}

/// A plain HTTP/1.1 POST on loopback (no HTTP client among this crate's dependencies).
fn http_post(url: &str, body: &str) -> String {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").expect("http URL");
    let (host, path) = rest.split_once('/').expect("path");
    let mut s = std::net::TcpStream::connect(host).expect("connect");
    write!(
        s,
        "POST /{path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    let mut reply = String::new();
    s.read_to_string(&mut reply).expect("read");
    let (_, payload) = reply.split_once("\r\n\r\n").expect("HTTP reply");
    payload.to_string()
}

fn get(server: &ServerHandle, path: &str) -> Value {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(server.local_addr()).expect("connect");
    write!(
        s,
        "GET /v1/{path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut reply = String::new();
    s.read_to_string(&mut reply).expect("read");
    let (_, payload) = reply.split_once("\r\n\r\n").expect("HTTP reply");
    serde_json::from_str(payload).expect("JSON")
}

/// `optimsyn train` on the demo for 2 short GRPO steps, its rollouts sampled on `server`.
fn train_against(server: &ServerHandle, out: &Path) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_optimsyn"));
    c.arg("train").arg("--config").arg(demo().join("demo.toml"));
    for s in [
        format!("out={}", out.display()),
        "steps=2".into(),
        "warmup.epochs=1".into(),
        "grpo.group_size=2".into(),
        "grpo.prompts_per_step=4".into(),
        "grpo.mini_batch_prompts=4".into(),
        "grpo.micro_batch_size=8".into(),
        // Not the demo's 1.0: a temperature mismatch between server and trainer would show.
        "grpo.rollout.temperature=0.7".into(),
        "grpo.old_logprobs=\"sampler\"".into(),
        format!("models.policy_url=\"{}\"", server.base_url()),
        "models.policy_model=\"policy\"".into(),
    ] {
        c.arg("--set").arg(s);
    }
    let o = c
        .env("OMP_WAIT_POLICY", "PASSIVE")
        .output()
        .expect("run optimsyn");
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "train failed: {log}");
}

#[test]
fn train_samples_its_rollouts_on_a_served_policy() {
    let policy_dir = demo().join("models/policy");
    let config = ServeConfig {
        port: 0,
        enable_lora: true,
        served_model_name: Some("policy".into()),
        ..Default::default()
    };
    let server = Server::load(&policy_dir, LoadOptions::default(), config)
        .expect("load")
        .start()
        .expect("serve");
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("run");
    train_against(&server, &out);

    // The trainer's log-probs are the server's: with the sampler's as the old ones, the
    // importance ratio of the one update per step is 1 up to decoding's rounding.
    let metrics = rows(&out.join("rl/metrics.jsonl"));
    assert_eq!(metrics.len(), 2);
    for m in &metrics {
        let (lo, hi) = (m["ratio_min"].as_f64(), m["ratio_max"].as_f64());
        assert!(
            lo.is_some_and(|r| r > 0.999) && hi.is_some_and(|r| r < 1.001),
            "{m}"
        );
    }
    let valid = rows(&out.join("rl/samples/step-000002.jsonl"))
        .iter()
        .filter(|r| r["provenance"]["valid"] == json!(true))
        .count();
    assert!(valid > 0, "no valid rollout in step 2");

    // One adapter left on the server: the one published for step 2.
    let models = get(&server, "models");
    let served: Vec<&str> = models["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(served.len(), 2, "{models}");
    let adapter = served[1];
    let folder = out.join("rl/served").join(adapter);
    assert!(folder.join("adapter_config.json").is_file());
    assert_eq!(
        std::fs::read_dir(out.join("rl/served"))
            .map(|d| d.count())
            .ok(),
        Some(1)
    );

    // Served with that adapter = the local model with it.
    let mut model = CausalLm::load(&policy_dir, LoadOptions::default()).expect("model");
    let _lora = LoraAdapter::load(&mut model, &folder).expect("adapter");
    let prompt: Vec<u32> = vec![5, 17, 42, 9];
    let params = SamplingParams {
        max_new_tokens: 6,
        temperature: 0.0,
        ..Default::default()
    };
    let want = model.generate(&[&prompt], &[0], &params).expect("generate");
    let got = post(
        &server,
        "completions",
        &json!({"model": adapter, "prompt": prompt, "max_tokens": 6, "temperature": 0,
                "logprobs": 0, "return_tokens_as_token_ids": true, "stop": null}),
    );
    let tokens: Vec<u32> = got["choices"][0]["logprobs"]["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .filter_map(|t| t.as_str()?.strip_prefix("token_id:")?.parse().ok())
        .collect();
    let n = tokens.len();
    assert!(n > 0, "{got}");
    assert_eq!(tokens, want[0].tokens[..n], "{got}");

    // Served rollouts repeat themselves: a second run on the same server samples the same rows.
    let again = tmp.path().join("again");
    train_against(&server, &again);
    for step in ["step-000001.jsonl", "step-000002.jsonl"] {
        let (a, b) = (
            out.join("rl/samples").join(step),
            again.join("rl/samples").join(step),
        );
        assert_eq!(rows(&a), rows(&b), "{step}");
    }
    server.shutdown();
}
