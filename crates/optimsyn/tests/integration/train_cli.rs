//! `optimsyn sft`, `eval`, `warmup`, `influence score` and `influence verify` end to end on the
//! tiny fixture model.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{Value, json};

fn model() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../lm/tests/fixtures/cli")
        .display()
        .to_string()
}

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_optimsyn"))
        .args(args)
        .output()
        .expect("run optimsyn")
}

fn ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const WORDS: &[&str] = &[
    "aspirin", "dose", "law", "court", "heart", "Rome", "tax", "trade",
];

fn chats(path: &Path, n: usize, seed: usize, extra: &[Value]) -> String {
    let mut text = String::new();
    for i in 0..n {
        let (a, b) = (
            WORDS[(i * 3 + seed) % WORDS.len()],
            WORDS[(i * 5 + seed + 1) % WORDS.len()],
        );
        let subtask = ["med", "law"][i % 2];
        let row = json!({"id": format!("c{seed}-{i}"), "subtask": subtask,
            "messages": [{"role": "user", "content": format!("{a} {b}?")}, {"role": "assistant", "content": format!("{b} {a}")}]});
        text.push_str(&format!("{row}\n"));
    }
    for r in extra {
        text.push_str(&format!("{r}\n"));
    }
    std::fs::write(path, text).expect("write chats");
    path.display().to_string()
}

#[test]
fn sft_eval_warmup_and_influence_from_the_command_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = |n: &str| dir.path().join(n).display().to_string();
    let no_answer = json!({"id": "q-only", "messages": [{"role": "user", "content": "dose?"}]});
    let data = chats(
        &dir.path().join("train.jsonl"),
        12,
        0,
        std::slice::from_ref(&no_answer),
    );
    let val = chats(&dir.path().join("val.jsonl"), 4, 3, &[]);
    let m = model();

    let before: Value =
        serde_json::from_str(&ok(&["eval", "--model", &m, "--data", &val])).expect("eval json");
    let sft = [
        "sft",
        "--model",
        &m,
        "--data",
        &data,
        "--out",
        &d("sft"),
        "--lora-r",
        "4",
        "--lr",
        "2e-2",
        "--batch-size",
        "4",
        "--epochs",
        "2",
        "--checkpoints",
        "2",
    ];
    let summary: Value = serde_json::from_str(&ok(&sft)).expect("sft json");
    assert_eq!(
        (summary["steps"].as_u64(), summary["skipped"].as_u64()),
        (Some(6), Some(1))
    );
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "optimizer.safetensors",
        "training.json",
        "metrics.jsonl",
        "checkpoint-3",
        "checkpoint-6",
    ] {
        assert!(dir.path().join("sft").join(f).exists(), "{f}");
    }
    // Running it again finds the finished run and does nothing twice.
    let again: Value = serde_json::from_str(&ok(&sft)).expect("sft json");
    assert_eq!(again["resumed_from"].as_u64(), Some(6));
    let after: Value = serde_json::from_str(&ok(&[
        "eval",
        "--model",
        &m,
        "--adapter",
        &d("sft"),
        "--data",
        &val,
    ]))
    .expect("eval json");
    assert!(
        after["loss"].as_f64() < before["loss"].as_f64(),
        "{before} -> {after}"
    );
    assert_eq!(after["subtasks"].as_object().map(|o| o.len()), Some(2));
    assert_eq!(after["format"], "chat-template");

    let wu = [
        "warmup",
        "--target",
        &m,
        "--data",
        &data,
        "--out",
        &d("wu"),
        "--lora-r",
        "4",
        "--lora-alpha",
        "16",
        "--lr",
        "2e-2",
        "--batch-size",
        "4",
        "--checkpoints",
        "2",
    ];
    ok(&wu);
    let rec: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("wu/checkpoint-2/training.json")).expect("record"),
    )
    .expect("json");
    assert_eq!(rec["format"], "tulu");
    let cands = chats(&dir.path().join("cands.jsonl"), 6, 5, &[no_answer]);
    let scores = d("scores.jsonl");
    let score = [
        "influence",
        "score",
        "--target",
        &m,
        "--adapter",
        &d("wu/checkpoint-2"),
        "--adapter",
        &d("wu/checkpoint-3"),
        "--val",
        &val,
        "--input",
        &cands,
        "--proj-dim",
        "0",
        "--output",
        &scores,
    ];
    ok(&score);
    let rows: Vec<Value> = std::fs::read_to_string(&scores)
        .expect("scores")
        .lines()
        .map(|l| serde_json::from_str(l).expect("row"))
        .collect();
    assert_eq!(rows.len(), 7);
    assert!(
        rows[..6]
            .iter()
            .all(|r| r["influence"].is_f64() && r["subtasks"]["med"].is_f64())
    );
    assert!(rows[6]["influence"].is_null() && rows[6]["reason"].is_string());
    ok(&score);
    assert_eq!(
        std::fs::read_to_string(&scores)
            .expect("scores")
            .lines()
            .count(),
        7,
        "a rerun resumes, never duplicates"
    );
    // Three shards of chunks of 2, merged: the unsharded output, byte for byte.
    let mut shards = Vec::new();
    for i in 0..3 {
        let out = d(&format!("shard-{i}.jsonl"));
        let spec = format!("{i}/3");
        let mut args = score.to_vec();
        let last = args.len() - 1;
        args[last] = &out;
        args.extend(["--chunk", "2", "--shard", &spec]);
        ok(&args);
        shards.push(out);
    }
    let merged = d("merged.jsonl");
    let mut merge = vec![
        "influence",
        "merge",
        "--input",
        &cands,
        "--output",
        &merged,
        "--shards",
    ];
    merge.extend(shards.iter().map(String::as_str));
    ok(&merge);
    assert_eq!(
        std::fs::read_to_string(&merged).expect("merged"),
        std::fs::read_to_string(&scores).expect("scores"),
        "merged shards equal the unsharded run"
    );
    // A missing shard is an error naming the first candidate it lacks.
    let partial = [
        "influence",
        "merge",
        "--input",
        &cands,
        "--shards",
        &shards[0],
        &shards[2],
    ];
    let o = Command::new(env!("CARGO_BIN_EXE_optimsyn"))
        .args(partial)
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("is in no shard"),
        "{err}"
    );

    let out = ok(&[
        "influence",
        "verify",
        "--target",
        &m,
        "--adapter",
        &d("wu/checkpoint-3"),
        "--val",
        &val,
        "--input",
        &cands,
        "--proj-dim",
        "0",
        "--n",
        "6",
    ]);
    let report: Value = serde_json::from_str(&out).expect("verify json");
    assert_eq!(report["checks"].as_array().map(Vec::len), Some(6));

    // A format that contradicts the warm-up is refused with a clear line.
    let bad = run(&[
        "influence",
        "score",
        "--target",
        &m,
        "--adapter",
        &d("wu/checkpoint-3"),
        "--val",
        &val,
        "--input",
        &cands,
        "--format",
        "chat-template",
    ]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("format"));
}
