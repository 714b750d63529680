//! LoRA adapters loaded and unloaded at run time through vLLM's endpoints: each adapter's
//! completions equal the local model's with that adapter attached (whichever was attached before),
//! the base model's stay the base model's, and bad requests get vLLM's answers.

use std::path::Path;

use optimsyn_lm::{LoraAdapter, LoraConfig};
use optimsyn_serve::{ServeConfig, ServerHandle};
use optimsyn_synth::{GenerationParams, Generator, LocalGenerator, OpenAiConfig, OpenAiGenerator};
use serde_json::{Value, json};

use crate::common::{MODEL, load_model, post_to, prompts, start_server};

/// A PEFT adapter folder for the tiny model whose B matrices are not zero, so it changes outputs.
pub(crate) fn write_adapter(dir: &Path, seed: u64) {
    let (mut model, _) = load_model();
    let config = LoraConfig {
        r: 4,
        alpha: 8.0,
        ..Default::default()
    };
    let adapter = LoraAdapter::init(&mut model, config, seed).expect("init");
    tch::manual_seed(seed as i64);
    for (name, p) in adapter.named_parameters() {
        if name.contains("lora_B") {
            tch::no_grad(|| p.shallow_clone().copy_(&(p.randn_like() * 0.5)));
        }
    }
    adapter.save(dir).expect("save adapter");
}

/// Greedy completions of the tiny model in this process, with the adapter in `dir` if any.
fn local_texts(dir: Option<&Path>) -> Vec<String> {
    let (mut model, tok) = load_model();
    let _adapter = dir.map(|d| LoraAdapter::load(&mut model, d).expect("adapter loads"));
    let generator =
        LocalGenerator::new(model, tok, GenerationParams::greedy(10), MODEL).expect("local");
    texts(&generator)
}

fn served_texts(server: &ServerHandle, model: &str) -> Vec<String> {
    let client = OpenAiGenerator::new(
        OpenAiConfig {
            base_url: server.base_url(),
            model: model.into(),
            timeout_secs: 30.0,
            concurrency: 4,
            max_retries: 0,
            ..Default::default()
        },
        GenerationParams::greedy(10),
    )
    .expect("client");
    texts(&client)
}

fn texts(g: &dyn Generator) -> Vec<String> {
    g.generate_all(&prompts(4))
        .into_iter()
        .map(|r| r.expect("completion").text)
        .collect()
}

fn get(server: &ServerHandle, path: &str) -> Value {
    let text = ureq::get(format!("{}/{path}", server.base_url()))
        .call()
        .expect("GET")
        .body_mut()
        .read_to_string()
        .expect("body");
    serde_json::from_str(&text).expect("JSON")
}

fn load(server: &ServerHandle, name: &str, path: &Path) -> (u16, String) {
    let body = json!({"lora_name": name, "lora_path": path.display().to_string()});
    post_to(server, "load_lora_adapter", &body)
}

#[test]
fn adapters_load_serve_and_unload_like_vllm() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    write_adapter(&a, 1);
    write_adapter(&b, 2);
    let (base_want, a_want, b_want) = (
        local_texts(None),
        local_texts(Some(&a)),
        local_texts(Some(&b)),
    );
    assert_ne!(a_want, base_want, "the test adapter changes the outputs");
    assert_ne!(a_want, b_want);

    let server = start_server(ServeConfig {
        enable_lora: true,
        max_batch: 4,
        ..Default::default()
    });
    assert_eq!(
        load(&server, "a", &a),
        (200, "Success: LoRA adapter 'a' added successfully.".into())
    );
    assert_eq!(load(&server, "b", &b).0, 200);
    let models = get(&server, "models");
    let ids: Vec<&str> = models["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(ids, [MODEL, "a", "b"]);
    assert_eq!(models["data"][1]["parent"], MODEL);
    assert_eq!(get(&server, "models/b")["root"], b.display().to_string());

    // Each swap (b, then a, then the base with a bypassed, then a again) gives what the local
    // model gives with that adapter.
    assert_eq!(served_texts(&server, "b"), b_want);
    assert_eq!(served_texts(&server, "a"), a_want);
    assert_eq!(served_texts(&server, MODEL), base_want);
    assert_eq!(served_texts(&server, "a"), a_want);

    let (status, body) = load(&server, "a", &b);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("has already been loaded"), "{body}");
    let (status, body) = load(&server, "c", &tmp.path().join("missing"));
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("NotFoundError"), "{body}");
    // An adapter folder that is not one: a clear 400, and the served adapters still work.
    let bad = tmp.path().join("bad");
    std::fs::create_dir_all(&bad).expect("mkdir");
    std::fs::write(bad.join("adapter_config.json"), "{\"r\": \"x\"}").expect("write");
    let (status, body) = load(&server, "bad", &bad);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("cannot load LoRA adapter 'bad'"), "{body}");
    assert_eq!(served_texts(&server, "b"), b_want);
    let (status, body) = post_to(&server, "load_lora_adapter", &json!({"lora_name": "x"}));
    assert_eq!(status, 400, "{body}");

    let (status, body) = post_to(&server, "unload_lora_adapter", &json!({"lora_name": "a"}));
    assert_eq!(
        (status, body.as_str()),
        (200, "Success: LoRA adapter 'a' removed successfully.")
    );
    let (status, body) = post_to(&server, "unload_lora_adapter", &json!({"lora_name": "a"}));
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("cannot be found"), "{body}");
    let chat = json!({"model": "a", "messages": [{"role": "user", "content": "hi"}]});
    let (status, body) = post_to(&server, "chat/completions", &chat);
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("model_not_found"), "{body}");
    assert_eq!(
        get(&server, "models")["data"].as_array().map(Vec::len),
        Some(2)
    );
    // A name can be loaded again once unloaded.
    assert_eq!(load(&server, "a", &a).0, 200);
    assert_eq!(served_texts(&server, "a"), a_want);
    server.shutdown();
}

#[test]
fn without_enable_lora_the_endpoints_refuse() {
    let tmp = tempfile::tempdir().expect("tempdir");
    write_adapter(tmp.path(), 1);
    let server = start_server(ServeConfig::default());
    let (status, body) = load(&server, "a", tmp.path());
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("not enabled"), "{body}");
    assert_eq!(
        get(&server, "models")["data"].as_array().map(Vec::len),
        Some(1)
    );
    server.shutdown();
}

#[test]
fn lora_modules_are_served_from_the_start() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let a = tmp.path().join("a");
    write_adapter(&a, 1);
    let a_want = local_texts(Some(&a));
    let server = start_server(ServeConfig {
        lora_modules: [("a".to_string(), a.clone())].into(),
        ..Default::default()
    });
    assert_eq!(served_texts(&server, "a"), a_want);
    // The run-time endpoints stay closed without enable_lora.
    let (status, _) = post_to(&server, "unload_lora_adapter", &json!({"lora_name": "a"}));
    assert_eq!(status, 404);
    server.shutdown();

    let (model, tok) = load_model();
    let config = ServeConfig {
        port: 0,
        lora_modules: [("b".to_string(), tmp.path().join("missing"))].into(),
        ..Default::default()
    };
    let err = optimsyn_serve::Server::new(model, tok, MODEL, config)
        .start()
        .expect_err("a missing adapter folder")
        .to_string();
    assert!(err.starts_with("lora_modules.b: No adapter found"), "{err}");
}
