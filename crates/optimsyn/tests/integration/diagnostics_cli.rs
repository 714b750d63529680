//! The influence diagnostics on the bundled demo: after the 1-epoch warm-up of the old demo
//! profile, candidates' influence differs by little next to what they all share, and
//! `optimsyn train` says so (in `warmup/diagnostics.json`, the log and the run's report); after the committed profile's
//! warm-up it does not. Every rollout's influence, per-subtask scores and reward are in the
//! samples files.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn train(out: &Path, extra: &[&str]) -> String {
    let config = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("demo/demo.toml");
    let mut c = Command::new(env!("CARGO_BIN_EXE_optimsyn"));
    c.arg("train").arg("--config").arg(config);
    // One short GRPO step: the check is about the warm-up and the first scoring call.
    for s in [
        format!("out={}", out.display()),
        "steps=1".into(),
        "grpo.group_size=2".into(),
        "grpo.prompts_per_step=8".into(),
        "grpo.mini_batch_prompts=8".into(),
        "grpo.micro_batch_size=16".into(),
    ]
    .iter()
    .map(String::as_str)
    .chain(extra.iter().copied())
    {
        c.arg("--set").arg(s);
    }
    let o = c
        .env("OMP_WAIT_POLICY", "PASSIVE")
        .output()
        .expect("run optimsyn");
    let log = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "train failed: {log}");
    log
}

fn json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn spread_ratio(diag: &Value) -> f64 {
    diag["discrimination"]["spread_ratio"]
        .as_f64()
        .unwrap_or_else(|| panic!("no spread ratio in {diag}"))
}

#[test]
fn short_warm_up_is_flagged_and_the_committed_profile_is_not() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (short, committed) = (tmp.path().join("short"), tmp.path().join("committed"));
    let log_short = train(&short, &["warmup.epochs=1"]);
    let log_committed = train(&committed, &[]);

    let d_short = json(&short.join("warmup/diagnostics.json"));
    let d_committed = json(&committed.join("warmup/diagnostics.json"));
    eprintln!("1 epoch: {d_short}\ncommitted: {d_committed}");
    for d in [&d_short, &d_committed] {
        let (before, after) = (
            d["val_loss_before"].as_f64().unwrap(),
            d["val_loss_after"].as_f64().unwrap(),
        );
        assert!(
            after < before,
            "the warm-up lowers the validation loss: {d}"
        );
    }
    assert!(spread_ratio(&d_short) < 0.25, "{d_short}");
    assert!(spread_ratio(&d_committed) > 0.25, "{d_committed}");
    let warning = "mostly measures what every";
    assert!(log_short.contains(warning), "{log_short}");
    assert!(!log_committed.contains(warning), "{log_committed}");
    let report = std::fs::read_to_string(short.join("report.md")).expect("report.md");
    assert!(
        report.contains("Warning: influence mostly measures"),
        "{report}"
    );
    let report = std::fs::read_to_string(committed.join("report.md")).expect("report.md");
    assert!(!report.contains("Warning"), "{report}");

    // The samples file holds what the reward saw, for every rollout.
    let samples = committed.join("rl/samples/step-000001.jsonl");
    let text = std::fs::read_to_string(&samples).expect("samples");
    let rows: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 16);
    for r in &rows {
        assert!(r["reward"].is_f64(), "{r}");
        if r["provenance"]["valid"].as_bool() == Some(true) {
            assert!(r["influence"].is_f64(), "{r}");
            let subtasks = r["subtask_influence"]
                .as_object()
                .expect("per-subtask scores");
            assert_eq!(subtasks.len(), 4, "{r}");
        } else {
            assert!(r.get("influence").is_none(), "{r}");
        }
    }
    let step: Value = serde_json::from_str(
        std::fs::read_to_string(committed.join("rl/influence.jsonl"))
            .expect("influence.jsonl")
            .lines()
            .next()
            .expect("a row"),
    )
    .expect("json");
    assert!(step["discrimination"]["top_share"].is_f64(), "{step}");
    // Each subtask's mean over the valid rollouts (the report compares them over steps).
    let per_subtask = step["subtask_if"].as_object().expect("subtask_if");
    assert_eq!(per_subtask.len(), 4, "{step}");
}

/// Placement per model: the policy and the target placed explicitly (on a CUDA machine, the target
/// on the GPU) give the run the default placement gives: the same rollouts, the same influence.
#[test]
fn models_placed_apart_train_like_the_default_placement() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    train(&one, &[]);
    let target = if tch::Cuda::is_available() {
        "cuda"
    } else {
        eprintln!("no CUDA device: the target stays on the CPU (placement checked, not the GPU)");
        "cpu"
    };
    let target_set = format!("models.target_device=\"{target}\"");
    train(&two, &["models.policy_device=\"cpu\"", target_set.as_str()]);
    let rows = |dir: &Path| -> Vec<Value> {
        std::fs::read_to_string(dir.join("rl/influence.jsonl"))
            .expect("influence.jsonl")
            .lines()
            .map(|l| serde_json::from_str(l).expect("row"))
            .collect()
    };
    let samples = |dir: &Path| -> Vec<String> {
        std::fs::read_to_string(dir.join("rl/samples/step-000001.jsonl"))
            .expect("samples")
            .lines()
            .map(|l| {
                let v: Value = serde_json::from_str(l).expect("row");
                format!("{}", v["messages"])
            })
            .collect()
    };
    assert_eq!(
        samples(&one),
        samples(&two),
        "the same rollouts and QA pairs"
    );
    let (a, b) = (rows(&one), rows(&two));
    let (x, y) = (
        a[0]["if_valid_mean"].as_f64().expect("IF"),
        b[0]["if_valid_mean"].as_f64().expect("IF"),
    );
    assert!((x - y).abs() <= 1e-5 * x.abs().max(1e-3), "{x} vs {y}");
}
