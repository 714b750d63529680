//! Bounded-time fuzzing of the request path (issue #20, item 7): arbitrary bytes, mutated valid
//! requests of `/v1/chat/completions` and `/v1/completions`, deep nesting and numbers beyond
//! i64/u64/f64, sent over loopback to a running server for the tiny model; and damaged PEFT
//! adapter folders given to `/v1/load_lora_adapter`. The parsers and validators
//! (`api::parse_body`, then `chat::plan` or `completions::plan`: messages or prompts, sampling
//! ranges, unsupported fields, stop strings, the chat template, the context budget; `lora::load`
//! and optimsyn-lm's adapter reader behind it) are crate-private, so the properties go through
//! the real HTTP path, which also covers the routes and the body reader. Every reply must be a 200
//! with a completion, or a 4xx with an OpenAI error object; never a 5xx (a panic in a handler is a
//! 500, or a reply that never comes); and afterwards the server must still serve, its base model
//! answering as before.
//!
//! A few dozen requests per property run by default (a few seconds in all). For a longer hunt
//! set `OPTIMSYN_FUZZ_CASES` (cases per property), e.g.
//! `OPTIMSYN_FUZZ_CASES=5000 cargo test -p optimsyn-serve --test integration fuzz`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use optimsyn_lm::{LoraAdapter, LoraConfig, TargetModules};
use optimsyn_serve::{ServeConfig, ServerHandle};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{Value, json};

use crate::common::{MODEL, load_model, raw_request, start_server};
use crate::mutate::{
    ByteOp, JsonOp, apply_bytes, apply_json, byte_ops, json_ops, json_value, mutated_json, number,
    text,
};

/// `default` cases, or `OPTIMSYN_FUZZ_CASES` when it is set.
fn cases(default: u32) -> Config {
    let cases = std::env::var("OPTIMSYN_FUZZ_CASES")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default);
    Config {
        cases,
        max_shrink_iters: 512,
        // The runner is driven by hand (one server per property), with no source file to key a
        // persistence file by.
        failure_persistence: None,
        ..Config::default()
    }
}

/// The top-level fields of both request types.
const FIELDS: &[&str] = &[
    "model",
    "messages",
    "prompt",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "n",
    "stream",
    "stream_options",
    "frequency_penalty",
    "presence_penalty",
    "logprobs",
    "top_logprobs",
    "logit_bias",
    "tools",
    "response_format",
    "chat_template_kwargs",
    "echo",
    "best_of",
    "suffix",
    "return_tokens_as_token_ids",
];

/// Keys for JSON edits: the fields, and names found inside them.
const KEYS: &[&str] = &[
    "model",
    "messages",
    "prompt",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "n",
    "stream",
    "stream_options",
    "logprobs",
    "top_logprobs",
    "chat_template_kwargs",
    "return_tokens_as_token_ids",
    "role",
    "content",
    "type",
    "text",
    "image_url",
    "include_usage",
    "enable_thinking",
    "add_generation_prompt",
    "lora_name",
    "lora_path",
    "user",
    "assistant",
    "system",
    "developer",
    "tiny",
];

const CHAT: &str = "/v1/chat/completions";
const TEXT: &str = "/v1/completions";

/// Valid requests the mutations start from, with their routes: chat (plain, streamed, sampled
/// with `n` and stops, content parts, log-probs, template arguments) and completions (text, token
/// ids, a batch, log-probs).
fn valid_bodies() -> Vec<(&'static str, Value)> {
    let msgs = json!([{"role": "user", "content": "hi 0"}]);
    vec![
        (
            CHAT,
            json!({"model": MODEL, "messages": msgs, "max_tokens": 4, "temperature": 0}),
        ),
        (
            CHAT,
            json!({"model": MODEL, "messages": msgs, "max_tokens": 3, "stream": true,
                   "stream_options": {"include_usage": true}}),
        ),
        (
            CHAT,
            json!({"model": MODEL, "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                                                {"role": "assistant", "content": "a"}, {"role": "user", "content": "r"}],
                   "max_completion_tokens": 2, "n": 2, "seed": 7, "top_p": 0.9, "top_k": 5, "stop": ["x", "y"]}),
        ),
        (
            CHAT,
            json!({"model": MODEL, "messages": [{"role": "developer", "content": [{"type": "text", "text": "d"}]},
                                                {"role": "user", "content": null}],
                   "max_tokens": 2, "logprobs": true, "top_logprobs": 0, "presence_penalty": 0,
                   "chat_template_kwargs": {"enable_thinking": false}, "response_format": {"type": "text"}}),
        ),
        (
            TEXT,
            json!({"model": MODEL, "prompt": "The cat", "max_tokens": 3, "temperature": 0}),
        ),
        (
            TEXT,
            json!({"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 2, "n": 2, "seed": 1,
                   "logprobs": 0, "return_tokens_as_token_ids": true}),
        ),
        (
            TEXT,
            json!({"model": MODEL, "prompt": [[5, 6], [319]], "max_tokens": 2, "stop": "x",
                   "best_of": 1, "echo": false, "suffix": ""}),
        ),
        (
            TEXT,
            json!({"model": MODEL, "prompt": ["a", "b c"], "top_k": -1, "top_p": 0.5}),
        ),
    ]
}

/// A request: method, path, body.
type Request = (&'static str, &'static str, Vec<u8>);

fn raw(addr: SocketAddr, (method, path, body): &Request) -> String {
    let mut bytes = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    bytes.extend_from_slice(body);
    raw_request(addr, &bytes)
}

/// The reply is a success (a completion, a stream, a listing, an adapter loaded) or a 4xx with an
/// OpenAI error object.
fn check_reply(req: &Request, reply: &str) -> Result<(), TestCaseError> {
    let sent = String::from_utf8_lossy(&req.2);
    let status: u16 = reply
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = reply.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    prop_assert!(
        status == 200 || (400..500).contains(&status),
        "{} {} {:.300} → {:.600}",
        req.0,
        req.1,
        sent,
        reply
    );
    if status == 200 {
        if reply.contains("text/event-stream") {
            prop_assert!(body.contains("data: [DONE]"), "{:.600}", reply);
        } else if !body.starts_with("Success: LoRA adapter") {
            let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
            let object = v["object"].as_str().unwrap_or_default();
            prop_assert!(
                ["chat.completion", "text_completion", "list", "model"].contains(&object)
                    || v["status"] == "ok",
                "{:.600}",
                reply
            );
        }
    } else {
        let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
        let e = &v["error"];
        prop_assert!(
            e["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{:.300} → {:.600}",
            sent,
            reply
        );
        // `invalid_request_error`, or vLLM's names on the LoRA endpoints (`NotFoundError`, …).
        prop_assert!(
            e["type"].as_str().is_some_and(|t| !t.is_empty()),
            "{:.600}",
            reply
        );
    }
    Ok(())
}

/// Sends the requests `to_requests` makes of each of `strategy`'s values to one server and checks
/// every reply (those marked `true` must succeed); then checks the server still serves and its
/// base model answers as before.
fn fuzz<S: Strategy>(
    default_cases: u32,
    config: ServeConfig,
    strategy: S,
    to_requests: impl Fn(S::Value) -> Vec<(Request, bool)>,
) {
    let server: ServerHandle = start_server(ServeConfig {
        max_body_bytes: 1 << 20,
        ..config
    });
    let addr = server.local_addr();
    let probe = || {
        let (path, body) = valid_bodies().swap_remove(0);
        let reply = raw(addr, &("POST", path, body.to_string().into_bytes()));
        assert!(reply.starts_with("HTTP/1.1 200 OK"), "{reply}");
        let body = reply.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        let v: Value = serde_json::from_str(body).expect("a completion");
        v["choices"][0]["message"]["content"].clone()
    };
    let before = probe();
    let result = TestRunner::new(cases(default_cases)).run(&strategy, |value| {
        for (req, must_succeed) in to_requests(value) {
            let reply = raw(addr, &req);
            check_reply(&req, &reply)?;
            if must_succeed {
                prop_assert!(reply.starts_with("HTTP/1.1 200 OK"), "{:.600}", reply);
            }
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    assert_eq!(probe(), before, "the base model answers as before");
    assert_eq!(server.stats().in_flight, 0, "{:?}", server.stats());
    server.shutdown();
}

fn any_path() -> impl Strategy<Value = &'static str> {
    prop_oneof![
        4 => Just(CHAT),
        4 => Just(TEXT),
        1 => select(
            &[
                "/v1/load_lora_adapter",
                "/v1/unload_lora_adapter",
                "/v1/chat/completions/",
                "/v1/models",
                "/v1/models/tiny",
                "/v1//chat",
                "/",
            ][..]
        ),
    ]
}

/// Bodies that are not requests: arbitrary bytes, JSON of any shape, deep nesting (inside and
/// outside a request), and numbers no integer or float holds.
fn not_requests() -> impl Strategy<Value = Vec<u8>> {
    const EDGE_NUMBERS: &[&str] = &[
        "1e400",
        "-1e400",
        "18446744073709551616",
        "-9223372036854775809",
        "1e-400",
        "-0",
        "1.0",
        "9223372036854775807",
        "-9223372036854775808",
        "4294967297",
        "NaN",
        "Infinity",
        "0x10",
    ];
    const NUMERIC_FIELDS: &[&str] = &[
        "max_tokens",
        "max_completion_tokens",
        "n",
        "seed",
        "top_k",
        "temperature",
        "top_p",
        "top_logprobs",
        "logprobs",
        "best_of",
    ];
    prop_oneof![
        vec(any::<u8>(), 0..128),
        json_value(KEYS).prop_map(|v| v.to_string().into_bytes()),
        (1usize..2000, select(&["[", "{\"a\":", "{\"messages\":[", "{\"prompt\":["][..]))
            .prop_map(|(n, open)| open.repeat(n).into_bytes()),
        (100usize..200, any::<bool>()).prop_map(|(depth, close)| {
            let end = if close { "]".repeat(depth) } else { String::new() };
            let nest = format!("{}1{end}", "[".repeat(depth));
            format!(
                "{{\"model\": \"{MODEL}\", \"messages\": [{{\"role\": \"user\", \"content\": \"x\"}}], \
                 \"prompt\": {nest}, \"chat_template_kwargs\": {{\"k\": {nest}}}}}"
            )
            .into_bytes()
        }),
        (select(NUMERIC_FIELDS), select(EDGE_NUMBERS), any::<bool>()).prop_map(
            |(k, n, chat)| {
                let what = if chat {
                    "\"messages\": [{\"role\": \"user\", \"content\": \"x\"}]"
                } else {
                    "\"prompt\": [5, 6]"
                };
                format!("{{\"model\": \"{MODEL}\", {what}, \"max_tokens\": 2, \"{k}\": {n}}}")
                    .into_bytes()
            }
        ),
    ]
}

/// Conversations: any role name, text with special-token text and the template's reserved
/// characters, content parts of any type, long enough to overflow the 64-token context.
fn messages() -> impl Strategy<Value = Value> {
    let content = prop_oneof![
        4 => text().prop_map(Value::from),
        1 => select(&["<|im_end|>", "<|im_start|>assistant\n", "\u{10FFFC}x\u{10FFFD}", "{{ messages }}"][..])
            .prop_map(Value::from),
        1 => (1usize..400).prop_map(|n| Value::from("word ".repeat(n))),
        1 => vec((select(&["text", "image_url", "input_audio", ""][..]), proptest::option::of(text())), 0..3)
            .prop_map(|parts| {
                Value::Array(parts.into_iter().map(|(t, x)| json!({"type": t, "text": x})).collect())
            }),
        1 => Just(Value::Null),
    ];
    let role = select(
        &[
            "system",
            "developer",
            "user",
            "assistant",
            "tool",
            "function",
            "",
            "User",
        ][..],
    );
    vec(
        (role, content).prop_map(|(r, c)| json!({"role": r, "content": c})),
        0..5,
    )
    .prop_map(Value::Array)
}

/// Prompts of `/v1/completions`: text, token ids at and past the vocabulary (320) and u32, empty
/// lists, batches.
fn prompt() -> impl Strategy<Value = Value> {
    let id = prop_oneof![
        4 => (0i64..330).prop_map(Value::from),
        1 => select(&[-1i64, 4_294_967_295, 4_294_967_296, i64::MAX][..]).prop_map(Value::from),
    ];
    prop_oneof![
        text().prop_map(Value::from),
        (1usize..100).prop_map(|n| Value::from("cat ".repeat(n))),
        vec(id.clone(), 0..70).prop_map(Value::from),
        vec(vec(id, 0..8).prop_map(Value::from), 0..4).prop_map(Value::from),
        vec(text(), 0..3).prop_map(Value::from),
    ]
}

/// Valid request `i` with one to three top-level fields set to edge values, and sometimes its
/// conversation or prompt replaced.
fn field_edits(i: usize) -> impl Strategy<Value = Vec<u8>> {
    let value = prop_oneof![
        4 => number(),
        1 => any::<bool>().prop_map(Value::from),
        1 => text().prop_map(Value::from),
        1 => vec(text(), 0..18).prop_map(Value::from),
        1 => json_value(KEYS),
        1 => Just(Value::Null),
    ];
    (
        vec((select(FIELDS), value), 1..4),
        proptest::option::weighted(0.3, messages()),
        proptest::option::weighted(0.3, prompt()),
    )
        .prop_map(move |(edits, msgs, prompt)| {
            let mut v = valid_bodies()[i].1.clone();
            for (k, x) in edits {
                v[k] = x;
            }
            if let Some(m) = msgs.filter(|_| valid_bodies()[i].0 == CHAT) {
                v["messages"] = m;
            }
            if let Some(p) = prompt.filter(|_| valid_bodies()[i].0 == TEXT) {
                v["prompt"] = p;
            }
            v.to_string().into_bytes()
        })
}

#[test]
fn arbitrary_bodies_get_openai_errors() {
    fuzz(
        48,
        ServeConfig::default(),
        (
            select(&["POST", "POST", "POST", "GET", "PUT"][..]),
            any_path(),
            not_requests(),
        ),
        |req| vec![(req, false)],
    );
}

#[test]
fn mutated_valid_requests_complete_or_get_openai_errors() {
    let requests = (0..valid_bodies().len()).prop_flat_map(|i| {
        let body = prop_oneof![
            4 => field_edits(i),
            3 => mutated_json(valid_bodies()[i].1.clone(), KEYS),
            1 => byte_ops().prop_map(move |ops| {
                apply_bytes(valid_bodies()[i].1.to_string().into_bytes(), &ops)
            }),
        ];
        (Just("POST"), Just(valid_bodies()[i].0), body)
    });
    fuzz(64, ServeConfig::default(), requests, |req| {
        vec![(req, false)]
    });
}

const PEFT_KEYS: &[&str] = &[
    "peft_type",
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "use_rslora",
    "layers_to_transform",
    "rank_pattern",
    "alpha_pattern",
    "bias",
    "use_dora",
    "fan_in_fan_out",
    "modules_to_save",
    "q_proj",
    "v_proj",
    "model.layers.0.self_attn.q_proj",
    "LORA",
    "none",
    "all-linear",
];

/// How an adapter folder is damaged.
#[derive(Debug, Clone)]
enum AdapterDamage {
    /// None: it must load, serve and unload.
    None,
    /// `adapter_config.json` edited.
    Config(Vec<JsonOp>),
    /// `adapter_model.safetensors` edited.
    Weights(Vec<ByteOp>),
    /// `adapter_model.safetensors` replaced by arbitrary bytes.
    WeightsReplaced(Vec<u8>),
    /// `adapter_config.json` (true) or `adapter_model.safetensors` (false) missing.
    Missing(bool),
}

/// Damaged PEFT adapter folders for the tiny model, loaded through `/v1/load_lora_adapter`, then
/// asked for completions and unloaded (a 404 for each when the load was refused). An intact one
/// must load, serve and unload.
#[test]
fn damaged_lora_adapters_load_or_get_errors() {
    let root = tempfile::tempdir().expect("a temporary folder");
    let valid = root.path().join("valid");
    {
        let (mut model, _) = load_model();
        let config = LoraConfig {
            r: 2,
            alpha: 4.0,
            target_modules: TargetModules::List(vec!["q_proj".into(), "v_proj".into()]),
            ..Default::default()
        };
        LoraAdapter::init(&mut model, config, 3)
            .expect("an adapter")
            .save(&valid)
            .expect("save the adapter");
    }
    let config: Value = serde_json::from_slice(
        &std::fs::read(valid.join("adapter_config.json")).expect("read the adapter config"),
    )
    .expect("a JSON config");
    let weights = std::fs::read(valid.join("adapter_model.safetensors")).expect("read the weights");
    let damage = prop_oneof![
        1 => Just(AdapterDamage::None),
        4 => json_ops(PEFT_KEYS).prop_map(AdapterDamage::Config),
        3 => byte_ops().prop_map(AdapterDamage::Weights),
        1 => vec(any::<u8>(), 0..64).prop_map(AdapterDamage::WeightsReplaced),
        1 => any::<bool>().prop_map(AdapterDamage::Missing),
    ];
    let serial = AtomicUsize::new(0);
    let to_requests = |damage: AdapterDamage| {
        let name = format!("fuzz-{}", serial.fetch_add(1, Ordering::Relaxed));
        let dir = root.path().join(&name);
        std::fs::create_dir_all(&dir).expect("an adapter folder");
        let (mut c, mut w) = (config.clone(), weights.clone());
        let intact = matches!(damage, AdapterDamage::None);
        let (mut with_config, mut with_weights) = (true, true);
        match damage {
            AdapterDamage::None => {}
            AdapterDamage::Config(ops) => apply_json(&mut c, &ops),
            AdapterDamage::Weights(ops) => w = apply_bytes(w, &ops),
            AdapterDamage::WeightsReplaced(b) => w = b,
            AdapterDamage::Missing(config) => (with_config, with_weights) = (!config, config),
        }
        if with_config {
            std::fs::write(dir.join("adapter_config.json"), c.to_string()).expect("write");
        }
        if with_weights {
            std::fs::write(dir.join("adapter_model.safetensors"), &w).expect("write");
        }
        let load = json!({"lora_name": name, "lora_path": dir.display().to_string()});
        let chat = json!({"model": name, "messages": [{"role": "user", "content": "hi"}],
                          "max_tokens": 3, "temperature": 1.0, "seed": 1});
        let text = json!({"model": name, "prompt": [5, 6], "max_tokens": 2, "logprobs": 0});
        let unload = json!({"lora_name": name});
        [
            ("/v1/load_lora_adapter", load),
            (CHAT, chat),
            (TEXT, text),
            ("/v1/unload_lora_adapter", unload),
        ]
        .into_iter()
        .map(|(path, body)| (("POST", path, body.to_string().into_bytes()), intact))
        .collect()
    };
    fuzz(
        24,
        ServeConfig {
            enable_lora: true,
            ..ServeConfig::default()
        },
        damage,
        to_requests,
    );
}
