//! The HTTP backend against the real server on loopback: same completions as the local backend,
//! concurrency and batching, the wire format, malformed requests, and a server killed mid-run.

use std::time::Duration;

use optimsyn_serve::{ServeConfig, ServerHandle};
use optimsyn_synth::{
    GenerationParams, Generator, OpenAiConfig, OpenAiGenerator, PolicyInfo, SampleFile, SampleSink,
    SynthConfig, SynthRecord, Synthesizer,
};
use serde_json::{Value, json};

use crate::common::{
    MODEL, local, post_to, prompts, raw_request, start_server, tasks, tiny_prompt,
};

fn client(url: &str, params: GenerationParams, concurrency: usize) -> OpenAiGenerator {
    OpenAiGenerator::new(
        OpenAiConfig {
            base_url: url.to_string(),
            model: MODEL.into(),
            api_key_env: None,
            timeout_secs: 30.0,
            concurrency,
            max_retries: 1,
            backoff_secs: 0.01,
            max_backoff_secs: 0.05,
            ..Default::default()
        },
        params,
    )
    .expect("client")
}

fn texts(results: Vec<optimsyn_synth::Result<optimsyn_synth::Completion>>) -> Vec<String> {
    results
        .into_iter()
        .map(|r| r.expect("completion").text)
        .collect()
}

#[test]
fn http_backend_matches_the_local_backend_and_batches() {
    let server = start_server(ServeConfig {
        max_batch: 8,
        batch_wait_ms: 100,
        ..Default::default()
    });
    let ps = prompts(8);
    for params in [
        GenerationParams::greedy(10),
        GenerationParams {
            max_new_tokens: 10,
            temperature: 1.0,
            top_p: 0.9,
            top_k: 0,
            seed: 3,
        },
    ] {
        let want = texts(local(params.clone()).with_batch_size(3).generate_all(&ps));
        let got = texts(client(&server.base_url(), params.clone(), 8).generate_all(&ps));
        assert_eq!(got, want, "{params:?}");
    }
    let stats = server.stats();
    assert_eq!(stats.completions, 16);
    assert!(
        stats.max_batch_rows > 1,
        "concurrent requests share a batch: {stats:?}"
    );
    assert_eq!(
        client(&server.base_url(), GenerationParams::greedy(1), 1)
            .list_models()
            .unwrap(),
        vec![MODEL]
    );
    server.shutdown();
}

/// POSTs a chat completion; the status and the body.
pub fn post(server: &ServerHandle, body: &Value) -> (u16, String) {
    post_to(server, "chat/completions", body)
}

pub fn chat(extra: Value) -> Value {
    let mut b = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi 0"}],
                       "max_tokens": 12, "temperature": 0});
    for (k, v) in extra.as_object().expect("object") {
        b[k.as_str()] = v.clone();
    }
    b
}

/// Concatenated `delta.content` of an SSE body, and whether it ended with `[DONE]`.
pub fn sse_content(body: &str) -> (String, Vec<Value>, bool) {
    let mut text = String::new();
    let mut chunks = Vec::new();
    let mut done = false;
    for line in body.lines() {
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            done = true;
            continue;
        }
        let v: Value = serde_json::from_str(data).expect("chunk is JSON");
        if let Some(c) = v
            .pointer("/choices/0/delta/content")
            .and_then(Value::as_str)
        {
            text.push_str(c);
        }
        chunks.push(v);
    }
    (text, chunks, done)
}

#[test]
fn wire_format_stream_stop_n_and_usage() {
    let server = start_server(ServeConfig::default());
    let (status, body) = post(&server, &chat(json!({})));
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], MODEL);
    let full = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    let usage = &v["usage"];
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
    );
    assert!(usage["completion_tokens"].as_u64().unwrap() >= 1);

    // Streaming: deltas concatenate to the same text; finish reason and usage come last.
    let (status, body) = post(
        &server,
        &chat(json!({"stream": true, "stream_options": {"include_usage": true}})),
    );
    assert_eq!(status, 200);
    let (text, chunks, done) = sse_content(&body);
    assert!(done, "ends with data: [DONE]");
    assert_eq!(text, full);
    assert_eq!(chunks[0]["object"], "chat.completion.chunk");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"], *usage);
    assert!(chunks[chunks.len() - 2]["choices"][0]["finish_reason"].is_string());

    // A stop string cuts the text before it.
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() >= 4, "{full:?}");
    let stop: String = chars[2..4].iter().collect();
    let cut = &full[..full.find(&stop).unwrap()];
    let (_, body) = post(&server, &chat(json!({"stop": [stop]})));
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], cut);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert!(
        v["usage"]["completion_tokens"].as_u64().unwrap()
            < usage["completion_tokens"].as_u64().unwrap()
            || cut.len() + 2 >= full.len()
    );

    // max_completion_tokens bounds the reply; logprobs come per token.
    let (_, body) = post(
        &server,
        &chat(json!({"max_completion_tokens": 3, "logprobs": true})),
    );
    let v: Value = serde_json::from_str(&body).unwrap();
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() <= 3);
    let lp = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(
        lp.len() as u64,
        v["usage"]["completion_tokens"].as_u64().unwrap()
    );
    assert!(lp.iter().all(|t| t["logprob"].as_f64().unwrap() <= 0.0));

    // n choices with a seed: reproducible, each its own stream.
    let req = chat(json!({"n": 3, "temperature": 1.0, "seed": 42}));
    let (_, a) = post(&server, &req);
    let (_, b) = post(&server, &req);
    let contents = |s: &str| -> Vec<String> {
        let v: Value = serde_json::from_str(s).unwrap();
        v["choices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["message"]["content"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(contents(&a).len(), 3);
    assert_eq!(contents(&a), contents(&b));
    server.shutdown();
}

#[test]
fn malformed_requests_get_openai_errors_and_the_server_keeps_serving() {
    let server = start_server(ServeConfig {
        max_body_bytes: 4096,
        ..Default::default()
    });
    let addr = server.local_addr();
    let error_of = |reply: &str| -> (u16, Value) {
        let status: u16 = reply
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status line in {reply:?}"));
        let body = reply.split("\r\n\r\n").nth(1).unwrap_or("");
        (status, serde_json::from_str(body).unwrap_or(Value::Null))
    };
    let post_raw = |body: &str| {
        raw_request(
            addr,
            format!(
                "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
    };
    let cases: Vec<(String, u16, Option<&str>)> = vec![
        ("{not json".into(), 400, None),
        ("[1, 2]".into(), 400, None),
        (json!({"messages": []}).to_string(), 400, None),
        (json!({"model": MODEL, "messages": []}).to_string(), 400, Some("messages")),
        (json!({"model": MODEL, "messages": [{"role": "user", "content": 5}]}).to_string(), 400, Some("messages[0].content")),
        (json!({"model": MODEL, "messages": [{"role": "tool", "content": "x"}]}).to_string(), 400, Some("messages[0].role")),
        (json!({"model": "other", "messages": [{"role": "user", "content": "x"}]}).to_string(), 404, Some("model")),
        (json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": 9}).to_string(), 400, Some("temperature")),
        (json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}).to_string(), 400, Some("max_tokens")),
        (json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 0}).to_string(), 400, Some("n")),
        (json!({"model": MODEL, "messages": [{"role": "user", "content": "x".repeat(300)}]}).to_string(), 400, Some("messages")),
        (json!({"model": MODEL, "messages": [{"role": "user", "content": "x".repeat(5000)}]}).to_string(), 413, None),
    ];
    for (body, status, param) in &cases {
        let reply = post_raw(body);
        let (got, err) = error_of(&reply);
        assert_eq!(got, *status, "{body:.80} → {reply}");
        assert!(err["error"]["message"].is_string(), "{reply}");
        assert!(err["error"]["type"].is_string(), "{reply}");
        if let Some(p) = param {
            assert_eq!(err["error"]["param"], *p, "{reply}");
        }
    }
    // Not HTTP at all, a wrong method, an unknown route.
    let (s, _) = error_of(&raw_request(addr, b"\x16\x03\x01 hello\r\n\r\n"));
    assert_eq!(s, 400);
    let (s, _) = error_of(&raw_request(
        addr,
        b"GET /v1/chat/completions HTTP/1.1\r\nConnection: close\r\n\r\n",
    ));
    assert_eq!(s, 405);
    let (s, _) = error_of(&raw_request(
        addr,
        b"GET /nope HTTP/1.1\r\nConnection: close\r\n\r\n",
    ));
    assert_eq!(s, 404);
    // A chunked body, and a client that waits for `100 Continue`.
    let body = chat(json!({"max_tokens": 2})).to_string();
    let (a, b) = body.split_at(body.len() / 2);
    let chunked = raw_request(
        addr,
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
            a.len(),
            b.len()
        )
        .as_bytes(),
    );
    assert!(chunked.starts_with("HTTP/1.1 200 OK"), "{chunked}");
    {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        write!(
            s,
            "POST /v1/chat/completions HTTP/1.1\r\nContent-Length: {}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .unwrap();
        let mut cont = [0u8; 25];
        s.read_exact(&mut cont).unwrap();
        assert_eq!(&cont, b"HTTP/1.1 100 Continue\r\n\r\n");
        s.write_all(body.as_bytes()).unwrap();
        let mut rest = String::new();
        let _ = s.read_to_string(&mut rest);
        assert!(rest.starts_with("HTTP/1.1 200 OK"), "{rest}");
    }
    // Two requests on one kept-alive connection, then a normal completion: still serving.
    let two = raw_request(
        addr,
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\nGET /health HTTP/1.1\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(two.matches("HTTP/1.1 200 OK").count(), 2, "{two}");
    let (status, _) = post(&server, &chat(json!({})));
    assert_eq!(status, 200);
    assert!(server.stats().requests as usize >= cases.len() + 5);
    server.shutdown();
}

/// Kills the server once `after` samples are written.
struct KillAfter<'a> {
    file: &'a mut SampleFile,
    server: Option<ServerHandle>,
    after: usize,
    written: usize,
}

impl SampleSink for KillAfter<'_> {
    fn contains(&self, id: &str) -> bool {
        self.file.contains(id)
    }
    fn write(&mut self, record: &SynthRecord) -> optimsyn_synth::Result<()> {
        self.file.write(record)?;
        self.written += 1;
        if self.written == self.after
            && let Some(s) = self.server.take()
        {
            s.kill();
        }
        Ok(())
    }
}

#[test]
fn a_server_killed_mid_run_loses_no_finished_sample() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("samples.jsonl");
    let all = tasks(12);
    let params = GenerationParams::greedy(6);
    let config = SynthConfig {
        max_attempts: 1,
        ..Default::default()
    };
    let server = start_server(ServeConfig {
        max_batch: 2,
        ..Default::default()
    });
    let url = server.base_url();
    let g = client(&url, params.clone(), 2);
    let mut file = SampleFile::open(&path).unwrap();
    let mut sink = KillAfter {
        file: &mut file,
        server: Some(server),
        after: 3,
        written: 0,
    };
    let report = Synthesizer::new(&g)
        .with_prompt(tiny_prompt())
        .with_config(config.clone())
        .run(&all, &PolicyInfo::default(), &mut sink)
        .expect("the run itself completes");
    drop(file);
    let c = &report.counts;
    assert!(c.generated >= 3, "{c}");
    assert!(c.failed >= 1, "requests after the kill fail: {c}");
    assert_eq!(c.generated + c.failed, 12);
    let e = report.failures[0].error.to_string();
    assert!(e.contains(&url), "the error names the endpoint: {e}");
    // Every finished sample is on disk, once.
    let rows: Vec<SynthRecord> = optimsyn_data_io::read_jsonl(&path).unwrap();
    assert_eq!(rows.len() as u64, c.generated);

    // A new server; the resumed run generates exactly the missing tasks.
    let server = start_server(ServeConfig::default());
    let g = client(&server.base_url(), params, 2);
    let mut file = SampleFile::open(&path).unwrap();
    let report = Synthesizer::new(&g)
        .with_prompt(tiny_prompt())
        .with_config(config)
        .run(&all, &PolicyInfo::default(), &mut file)
        .unwrap();
    assert_eq!(report.counts.skipped, c.generated);
    assert_eq!(report.counts.failed, 0);
    let rows: Vec<SynthRecord> = optimsyn_data_io::read_jsonl(&path).unwrap();
    let mut ids: Vec<&str> = rows.iter().map(SynthRecord::id).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 12);
    // Greedy through the server equals greedy locally, sample by sample.
    let lg = local(GenerationParams::greedy(6));
    let mut want: Vec<SynthRecord> = Vec::new();
    Synthesizer::new(&lg)
        .with_prompt(tiny_prompt())
        .with_config(SynthConfig {
            max_attempts: 1,
            ..Default::default()
        })
        .run(&all, &PolicyInfo::default(), &mut want)
        .unwrap();
    for r in &rows {
        let w = want.iter().find(|w| w.id() == r.id()).unwrap();
        assert_eq!(r.generation.raw, w.generation.raw, "{}", r.id());
    }
    server.shutdown();
}
