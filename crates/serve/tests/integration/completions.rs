//! `/v1/completions` with token-id prompts: the tokens and log-probs the local model gives, seeded
//! sampling that repeats, prompt-major choices, and vLLM's answers to what it does not take.

use optimsyn_lm::SamplingParams;
use optimsyn_serve::{ServeConfig, ServerHandle};
use optimsyn_synth::{stop_tokens, stream_key};
use serde_json::{Value, json};

use crate::common::{MODEL, load_model, post_to as post, start_server, token_ids_of};

fn complete(server: &ServerHandle, body: Value) -> Value {
    let (status, text) = post(server, "completions", &body);
    assert_eq!(status, 200, "{text}");
    serde_json::from_str(&text).expect("JSON")
}

fn token_ids(choice: &Value) -> Vec<u32> {
    token_ids_of(&choice["logprobs"]["tokens"])
}

fn logprobs(choice: &Value) -> Vec<f32> {
    choice["logprobs"]["token_logprobs"]
        .as_array()
        .expect("token_logprobs")
        .iter()
        .map(|v| v.as_f64().expect("number") as f32)
        .collect()
}

#[test]
fn token_prompts_give_the_local_models_tokens_and_logprobs() {
    let (model, tok) = load_model();
    let ids = tok.encode_rendered("hi 3").expect("encode");
    let (seed, temperature) = (7u64, 0.8);
    let params = SamplingParams {
        max_new_tokens: 8,
        temperature,
        stop_tokens: stop_tokens(&model, &tok),
        ..Default::default()
    };
    let keys: Vec<u64> = (0..3).map(|c| stream_key(seed, c)).collect();
    let want = model
        .generate(&[&ids, &ids, &ids], &keys, &params)
        .expect("local generation");

    let server = start_server(ServeConfig::default());
    let body = json!({"model": MODEL, "prompt": ids, "n": 3, "max_tokens": 8,
                      "temperature": temperature, "seed": seed, "logprobs": 0,
                      "return_tokens_as_token_ids": true});
    let got = complete(&server, body.clone());
    assert_eq!(got["object"], "text_completion");
    let choices = got["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), 3);
    for (c, w) in choices.iter().zip(&want) {
        assert_eq!(token_ids(c), w.tokens);
        assert_eq!(logprobs(c), w.logprobs);
    }
    // Seeded: the same request gives the same choices.
    assert_eq!(complete(&server, body)["choices"], got["choices"]);

    // Text prompts and batches: prompt-major indices, text pieces that make up the text.
    let two = complete(
        &server,
        json!({"model": MODEL, "prompt": ["hi 1", "hi 2"], "n": 2, "max_tokens": 4,
               "temperature": 0, "logprobs": 0}),
    );
    let choices = two["choices"].as_array().expect("choices");
    let indices: Vec<u64> = choices.iter().filter_map(|c| c["index"].as_u64()).collect();
    assert_eq!(indices, [0, 1, 2, 3]);
    for c in choices {
        let pieces: String = c["logprobs"]["tokens"]
            .as_array()
            .expect("tokens")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert_eq!(pieces, c["text"].as_str().expect("text"));
    }
    assert_eq!(choices[0]["text"], choices[1]["text"], "greedy");
    server.shutdown();
}

#[test]
fn what_completions_do_not_take_gets_400_or_404() {
    let server = start_server(ServeConfig::default());
    let ok = json!({"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 4});
    let with = |k: &str, v: Value| {
        let mut b = ok.clone();
        b[k] = v;
        b
    };
    for (body, status, needle) in [
        (with("prompt", json!([5, 100000])), 400, "prompt[0][1]"),
        (with("prompt", json!([])), 400, "prompt"),
        (with("prompt", json!([[]])), 400, "no room"),
        (with("stream", json!(true)), 400, "stream"),
        (with("echo", json!(true)), 400, "echo"),
        (with("logprobs", json!(2)), 400, "logprobs"),
        (
            with("max_tokens", json!(1000)),
            400,
            "context_length_exceeded",
        ),
        (with("n", json!(0)), 400, "n must be at least 1"),
        (with("model", json!("other")), 404, "model_not_found"),
        (with("prompt", json!({"a": 1})), 400, "prompt"),
    ] {
        let (got, text) = post(&server, "completions", &body);
        assert_eq!(got, status, "{body}: {text}");
        assert!(text.contains(needle), "{body}: {text}");
    }
    server.shutdown();
}
