//! The official `openai` Python package against the server (`tests/openai_client.py`, run with
//! `OPTIMSYN_PYTHON`, else `python3`): listing models, a greedy completion equal to the local
//! backend's (the same path as `optimsyn lm generate`: chat template with the generation prompt,
//! model ∪ tokenizer eos, special tokens skipped), streaming, 8 concurrent requests, a malformed
//! body answered 4xx while the server keeps serving. And `/v1/completions` with the runtime LoRA
//! endpoints (`tests/openai_completions.py`): token-id prompts give the local model's tokens and
//! log-probs, an adapter loaded through the client's raw `post` gives the local model-with-adapter's
//! tokens, and an unloaded one is a 404.

use std::path::PathBuf;
use std::process::Command;

use optimsyn_data_io::ChatMessage;
use optimsyn_lm::{LoraAdapter, SamplingParams};
use optimsyn_serve::ServeConfig;
use optimsyn_synth::{ChatPrompt, GenerationParams, Generator, stop_tokens, stream_key};
use serde_json::{Value, json};

use crate::common::{MODEL, load_model, local, prompts, start_server, token_ids_of};
use crate::lora::write_adapter;

/// Runs `tests/SCRIPT` with `OPTIMSYN_PYTHON` (else `python3`) on loopback only; its JSON output.
fn run_script(script: &str, args: &[String]) -> Value {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join(script);
    let python = std::env::var("OPTIMSYN_PYTHON").unwrap_or_else(|_| "python3".into());
    let mut cmd = Command::new(&python);
    cmd.arg(&script).args(args);
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
    serde_json::from_slice(&out.stdout).expect("the script prints JSON")
}

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
    let r = run_script(
        "openai_client.py",
        &[server.base_url(), MODEL.into(), wire.to_string()],
    );

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

/// Token ids of a choice as the script writes it (`tokens` as `token_id:N`).
fn token_ids(choice: &Value) -> Vec<u32> {
    token_ids_of(&choice["tokens"])
}

#[test]
fn the_openai_package_completes_and_swaps_adapters() {
    let (model, tok) = load_model();
    let ids = tok.encode_rendered("hi 3").expect("encode");
    let stops = stop_tokens(&model, &tok);
    let sampled = SamplingParams {
        max_new_tokens: 8,
        temperature: 0.8,
        stop_tokens: stops.clone(),
        ..Default::default()
    };
    let keys: Vec<u64> = (0..3).map(|c| stream_key(7, c)).collect();
    let want = model
        .generate(&[&ids, &ids, &ids], &keys, &sampled)
        .expect("local sampling");
    let greedy = SamplingParams {
        stop_tokens: stops,
        ..SamplingParams::greedy(8)
    };
    let base = model
        .generate(&[&ids], &[0], &greedy)
        .expect("local greedy");
    let dir = tempfile::tempdir().expect("temp dir");
    write_adapter(dir.path(), 3);
    let (mut adapted, _) = load_model();
    let _adapter = LoraAdapter::load(&mut adapted, dir.path()).expect("adapter loads");
    let with_adapter = adapted.generate(&[&ids], &[0], &greedy).expect("adapted");
    assert_ne!(
        with_adapter[0].tokens, base[0].tokens,
        "the adapter changes outputs"
    );

    let server = start_server(ServeConfig {
        enable_lora: true,
        ..Default::default()
    });
    let r = run_script(
        "openai_completions.py",
        &[
            server.base_url(),
            MODEL.into(),
            json!(ids).to_string(),
            dir.path().display().to_string(),
        ],
    );
    let choices = r["sampled"].as_array().expect("choices");
    assert_eq!(choices.len(), 3);
    for (i, (c, w)) in choices.iter().zip(&want).enumerate() {
        assert_eq!(c["index"], i);
        assert_eq!(token_ids(c), w.tokens, "choice {i}");
        let lps: Vec<f32> = c["token_logprobs"]
            .as_array()
            .expect("token_logprobs")
            .iter()
            .map(|v| v.as_f64().expect("number") as f32)
            .collect();
        assert_eq!(lps, w.logprobs, "choice {i}");
    }
    let generated: usize = want.iter().map(|w| w.tokens.len()).sum();
    assert_eq!(r["usage"]["completion_tokens"], generated);
    // As vLLM counts: each prompt once, whatever `n`.
    assert_eq!(r["usage"]["prompt_tokens"], ids.len());
    let texts = r["text_prompts"].as_array().expect("choices");
    assert_eq!(texts.len(), 4, "2 prompts x n 2");
    assert_eq!(texts[0]["text"], texts[1]["text"], "greedy");

    assert_eq!(r["load"]["status"], 200, "{}", r["load"]);
    assert_eq!(
        r["models"],
        json!([{"id": MODEL, "parent": null}, {"id": "ad", "parent": MODEL}])
    );
    assert_eq!(token_ids(&r["adapter"][0]), with_adapter[0].tokens);
    assert_eq!(token_ids(&r["base"][0]), base[0].tokens);
    assert_eq!(r["unload"]["status"], 200, "{}", r["unload"]);
    assert_eq!(r["unload_again"]["status"], 404, "{}", r["unload_again"]);
    assert_eq!(r["after_unload"], 404);
    assert_eq!(r["bad_logprobs"], 400);
    server.shutdown();
}
