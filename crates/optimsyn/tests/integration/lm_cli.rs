//! `optimsyn lm logprobs` / `optimsyn lm generate` against what transformers computes on the same
//! checkpoint and tokenizer (`python/fixtures/lm_parity.py`, the `cli` fixture).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{Value, json};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../lm/tests/fixtures/cli")
}

fn expected() -> Value {
    let text = std::fs::read_to_string(fixture().join("expected.json")).expect("expected.json");
    serde_json::from_str(&text).expect("expected.json parses")
}

fn optimsyn(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_optimsyn"))
        .args(args)
        .output()
        .expect("run optimsyn")
}

fn write_rows(dir: &Path, name: &str, rows: &[Value]) -> PathBuf {
    let path = dir.join(name);
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(&path, text).expect("write rows");
    path
}

fn stdout_rows(out: &Output) -> Vec<Value> {
    assert!(
        out.status.success(),
        "optimsyn failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad output line {l:?}: {e}")))
        .collect()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("list")
        .iter()
        .map(|x| x.as_f64().expect("float"))
        .collect()
}

fn input_rows(expected: &[Value]) -> Vec<Value> {
    expected
        .iter()
        .map(|r| {
            let mut row = json!({"id": r["id"]});
            for k in ["text", "messages"] {
                if let Some(v) = r.get(k) {
                    row[k] = v.clone();
                }
            }
            row
        })
        .collect()
}

#[test]
fn logprobs_match_transformers_for_text_and_chat_rows() {
    let exp = expected();
    let want = exp["logprobs_rows"].as_array().expect("rows");
    let dir = tempfile::tempdir().expect("tempdir");
    let input = write_rows(dir.path(), "rows.jsonl", &input_rows(want));
    let model = fixture();
    // Batch 2 pads the rows of each batch: results must not depend on it.
    for batch in ["1", "2"] {
        let out = optimsyn(&[
            "lm",
            "logprobs",
            "--model",
            model.to_str().expect("utf-8"),
            "--input",
            input.to_str().expect("utf-8"),
            "--batch-size",
            batch,
        ]);
        let got = stdout_rows(&out);
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            assert_eq!(g["id"], w["id"]);
            assert_eq!(
                g["tokens"], w["tokens"],
                "row {}: tokens differ from transformers'",
                w["id"]
            );
            let (gl, wl) = (floats(&g["logprobs"]), floats(&w["logprobs"]));
            assert_eq!(gl.len(), wl.len());
            let diff = gl
                .iter()
                .zip(&wl)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            assert!(
                diff < 1e-4,
                "row {}: max |Δ logprob| {diff} at batch {batch}",
                w["id"]
            );
        }
    }
}

#[test]
fn greedy_generate_matches_transformers_and_writes_output_file() {
    let exp = expected();
    let want = exp["generate_rows"].as_array().expect("rows");
    let max_new = exp["max_new_tokens"].to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    let input = write_rows(dir.path(), "prompts.jsonl", &input_rows(want));
    let output = dir.path().join("out.jsonl");
    let out = optimsyn(&[
        "lm",
        "generate",
        "--model",
        fixture().to_str().expect("utf-8"),
        "--input",
        input.to_str().expect("utf-8"),
        "--max-new-tokens",
        &max_new,
        "--temperature",
        "0",
        "--output",
        output.to_str().expect("utf-8"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stdout.is_empty(),
        "rows went to stdout despite --output"
    );
    let text = std::fs::read_to_string(&output).expect("output file");
    let got: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("json row"))
        .collect();
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        assert_eq!(g["id"], w["id"]);
        assert_eq!(
            g["tokens"], w["tokens"],
            "row {}: greedy tokens differ from transformers'",
            w["id"]
        );
        assert_eq!(g["completion"], w["completion"], "row {}", w["id"]);
        let (gl, wl) = (floats(&g["logprobs"]), floats(&w["logprobs"]));
        assert_eq!(
            gl.len(),
            g["tokens"].as_array().expect("tokens").len(),
            "one log-prob per generated token"
        );
        let diff = gl
            .iter()
            .zip(&wl)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(diff < 1e-4, "row {}: max |Δ logprob| {diff}", w["id"]);
    }
}

#[test]
fn sampled_generate_is_the_same_at_any_batch_size() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rows: Vec<Value> = (0..5)
        .map(|i| json!({"id": format!("p{i}"), "text": format!("prompt number {i}")}))
        .collect();
    let input = write_rows(dir.path(), "prompts.jsonl", &rows);
    let run = |batch: &str| {
        stdout_rows(&optimsyn(&[
            "lm",
            "generate",
            "--model",
            fixture().to_str().expect("utf-8"),
            "--input",
            input.to_str().expect("utf-8"),
            "--max-new-tokens",
            "6",
            "--temperature",
            "1.5",
            "--top-p",
            "0.9",
            "--seed",
            "7",
            "--batch-size",
            batch,
        ]))
    };
    let one = run("1");
    let five = run("5");
    assert_eq!(one.len(), five.len());
    for (a, b) in one.iter().zip(&five) {
        assert_eq!(
            (&a["id"], &a["tokens"], &a["completion"]),
            (&b["id"], &b["tokens"], &b["completion"])
        );
        // Log-probs agree up to float rounding (a batch computes in another order).
        let d = floats(&a["logprobs"])
            .iter()
            .zip(floats(&b["logprobs"]))
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max);
        assert!(d < 1e-4, "{}: {d}", a["id"]);
    }
    // Different rows draw from different streams.
    assert!(one.windows(2).any(|w| w[0]["tokens"] != w[1]["tokens"]));
}

fn stderr_of(args: &[&str]) -> String {
    let out = optimsyn(args);
    assert!(!out.status.success(), "expected failure for {args:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_rows_and_folders_give_one_clear_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = fixture();
    let model = model.to_str().expect("utf-8");
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"id\": \"a\", \"text\": \"fine\"}\n{\"id\": \"b\", \"txt\": \"typo\"}\n",
    )
    .expect("write");
    let err = stderr_of(&[
        "lm",
        "logprobs",
        "--model",
        model,
        "--input",
        bad.to_str().expect("utf-8"),
    ]);
    assert!(err.contains("bad.jsonl:2") && err.contains("text"), "{err}");

    std::fs::write(
        &bad,
        "{\"id\": \"a\", \"text\": \"fine\"}\n{\"id\": \"b\", \"text\": 3\n",
    )
    .expect("write");
    let err = stderr_of(&[
        "lm",
        "generate",
        "--model",
        model,
        "--input",
        bad.to_str().expect("utf-8"),
    ]);
    assert!(err.contains("bad.jsonl:2"), "{err}");

    let missing = dir.path().join("nope.jsonl");
    let err = stderr_of(&[
        "lm",
        "logprobs",
        "--model",
        model,
        "--input",
        missing.to_str().expect("utf-8"),
    ]);
    assert!(err.contains("nope.jsonl"), "{err}");

    // A model folder without its tokenizer.
    let bare = dir.path().join("bare");
    std::fs::create_dir(&bare).expect("mkdir");
    for f in ["config.json", "model.safetensors", "generation_config.json"] {
        std::fs::copy(fixture().join(f), bare.join(f)).expect("copy");
    }
    let rows = write_rows(
        dir.path(),
        "ok.jsonl",
        &[json!({"id": "a", "text": "hello there"})],
    );
    let err = stderr_of(&[
        "lm",
        "logprobs",
        "--model",
        bare.to_str().expect("utf-8"),
        "--input",
        rows.to_str().expect("utf-8"),
    ]);
    assert!(err.contains("tokenizer"), "{err}");

    // A prompt longer than the context (max_position_embeddings of the fixture).
    let long = "word ".repeat(4000);
    let rows = write_rows(
        dir.path(),
        "long.jsonl",
        &[json!({"id": "long", "text": long})],
    );
    let err = stderr_of(&[
        "lm",
        "logprobs",
        "--model",
        model,
        "--input",
        rows.to_str().expect("utf-8"),
    ]);
    assert!(err.contains("context"), "{err}");
    let err = stderr_of(&[
        "lm",
        "generate",
        "--model",
        model,
        "--input",
        rows.to_str().expect("utf-8"),
    ]);
    assert!(err.contains("context"), "{err}");

    let err = stderr_of(&[
        "lm",
        "generate",
        "--model",
        model,
        "--input",
        rows.to_str().expect("utf-8"),
        "--top-p",
        "0",
    ]);
    assert!(err.contains("top_p"), "{err}");
}
