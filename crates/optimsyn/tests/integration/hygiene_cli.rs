//! Data hygiene through the program: questions a run writes, planted into an extra evaluation file
//! (`data.decontaminate`), are caught in the pool (dropped, with their source row), counted among
//! the GRPO rollouts (and paid the invalid reward when asked), and every dataset gets a card.
//! Also `optimsyn data decontaminate` / `data dedup` on files.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};

fn optimsyn(args: &[&str]) -> (bool, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_optimsyn"))
        .args(args)
        .env("OMP_WAIT_POLICY", "PASSIVE")
        .output()
        .expect("run optimsyn");
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn run(cmd: &str, out: &Path, extra: &[String]) {
    let config = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("demo/demo.toml");
    let mut args: Vec<String> = vec![cmd.into(), "--config".into(), config.display().to_string()];
    let sets = [
        format!("out={}", out.display()),
        "steps=1".into(),
        "grpo.group_size=2".into(),
    ];
    for s in sets.iter().chain(extra) {
        args.push("--set".into());
        args.push(s.clone());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, _, log) = optimsyn(&args);
    assert!(ok, "{cmd} failed: {log}");
}

fn rows(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON row"))
        .collect()
}

fn question(row: &Value) -> String {
    row["messages"][0]["content"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

#[test]
fn planted_questions_are_caught_in_the_pool_and_the_rollouts() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let first = tmp.path().join("first");
    run("train", &first, &[]);
    // The first run's own questions, re-cased, as another evaluation set: a rerun with the same
    // seed writes them again, so they are known to be there.
    let pool = rows(&first.join("pool.jsonl"));
    let step1 = rows(&first.join("rl/samples/step-000001.jsonl"));
    let planted: Vec<Value> = pool[..5]
        .iter()
        .chain(&step1[..4])
        .enumerate()
        .map(|(i, r)| json!({"id": format!("planted-{i}"), "question": question(r).to_uppercase()}))
        .collect();
    let extra = tmp.path().join("extra-eval.jsonl");
    let text: String = planted.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(&extra, text).expect("write");
    let set_extra = format!("data.decontaminate=[\"{}\"]", extra.display());

    let second = tmp.path().join("second");
    run("train", &second, std::slice::from_ref(&set_extra));
    let pool2 = rows(&second.join("pool.jsonl"));
    let flagged: Vec<&Value> = pool2
        .iter()
        .filter(|r| !r["provenance"]["contamination"].is_null())
        .collect();
    assert!(flagged.len() >= 5, "{} flagged", flagged.len());
    for (i, r) in pool2[..5].iter().enumerate() {
        let c = &r["provenance"]["contamination"];
        assert_eq!(c["id"], format!("planted-{i}"), "{r}");
        assert_eq!(c["row"], i as u64 + 1);
        assert!(
            c["source"]
                .as_str()
                .unwrap_or("")
                .ends_with("extra-eval.jsonl")
        );
        assert_eq!(r["provenance"]["valid"], false);
        assert_eq!(r["provenance"]["rejection"], "contaminated");
    }
    let card: Value = serde_json::from_str(
        &std::fs::read_to_string(second.join("pool.card.json")).expect("pool card"),
    )
    .expect("card JSON");
    assert_eq!(card["counts"]["contaminated_dropped"], flagged.len());
    assert_eq!(card["screen"]["against"].as_array().map(Vec::len), Some(3));

    // Rollouts: counted and flagged, rewarded as usual by default…
    let log = rows(&second.join("rl/influence.jsonl"));
    let share = log[0]["contaminated"].as_f64().expect("contaminated share");
    let samples = rows(&second.join("rl/samples/step-000001.jsonl"));
    let hit: Vec<&Value> = samples
        .iter()
        .filter(|r| !r["provenance"]["contamination"].is_null())
        .collect();
    assert!(hit.len() >= 4, "{} rollouts flagged", hit.len());
    assert!((share - hit.len() as f64 / samples.len() as f64).abs() < 1e-12);
    assert!(hit.iter().all(|r| r["provenance"]["valid"] == true));
    // …and paid the invalid reward when `hygiene.penalize_rollouts` is on.
    let third = tmp.path().join("third");
    run(
        "train",
        &third,
        &[set_extra.clone(), "hygiene.penalize_rollouts=true".into()],
    );
    let samples = rows(&third.join("rl/samples/step-000001.jsonl"));
    let invalid_reward = samples
        .iter()
        .filter(|r| r["provenance"]["rejection"] == "contaminated")
        .map(|r| r["reward"].as_f64().expect("reward"))
        .collect::<Vec<_>>();
    assert!(invalid_reward.len() >= 4, "{samples:?}");
    let lambda = 0.1;
    assert!(
        invalid_reward.iter().all(|&r| (r + lambda).abs() < 1e-12),
        "{invalid_reward:?}"
    );

    // The final dataset gets a card with its influence distribution.
    run("synthesize", &second, std::slice::from_ref(&set_extra));
    let card: Value = serde_json::from_str(
        &std::fs::read_to_string(second.join("dataset-rl.card.json")).expect("dataset card"),
    )
    .expect("card JSON");
    let kept = card["kept"].as_u64().expect("kept");
    assert!(kept > 0);
    assert_eq!(card["influence"]["count"].as_u64(), Some(kept), "{card}");
    let md = std::fs::read_to_string(second.join("dataset-rl.card.md")).expect("card md");
    assert!(
        md.contains("optimsyn synthesize") && md.contains("extra-eval.jsonl"),
        "{md}"
    );
}

#[test]
fn data_commands_flag_and_dedup_files() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let val = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("demo/val.jsonl");
    let first_q = question(&rows(&val)[0]);
    let input = tmp.path().join("in.jsonl");
    let lines = [
        json!({"id": 1, "question": first_q.to_lowercase(), "answer": "x"}),
        json!({"id": 2, "question": "A question nobody asked before today?", "answer": "y"}),
        json!({"id": 3, "question": "A question nobody asked before today!", "answer": "y"}),
    ];
    let text: String = lines.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(&input, text).expect("write");
    let (out, rej) = (tmp.path().join("out.jsonl"), tmp.path().join("rej.jsonl"));
    let s = |p: &Path| p.display().to_string();
    let (ok, _, log) = optimsyn(&[
        "data",
        "decontaminate",
        "--input",
        &s(&input),
        "--against",
        &s(&val),
        "--output",
        &s(&out),
        "--rejected",
        &s(&rej),
    ]);
    assert!(ok, "{log}");
    assert_eq!(rows(&out).len(), 2);
    let r = rows(&rej);
    assert_eq!(r[0]["contamination"]["row"], 1, "{r:?}");
    assert!(log.contains("flagged"), "{log}");
    let card: Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("out.card.json")).expect("card beside the output"),
    )
    .expect("card JSON");
    assert_eq!(
        (card["records"].as_u64(), card["kept"].as_u64()),
        (Some(3), Some(2))
    );
    assert_eq!(card["rejected"]["contaminated"], 1, "{card}");

    let (ok, _, log) = optimsyn(&[
        "data",
        "dedup",
        "--input",
        &s(&input),
        "--output",
        &s(&out),
        "--rejected",
        &s(&rej),
    ]);
    assert!(ok, "{log}");
    assert_eq!(
        rows(&out)
            .iter()
            .map(|r| r["id"].clone())
            .collect::<Vec<_>>(),
        [json!(1), json!(2)]
    );
    assert_eq!(rows(&rej)[0]["duplicate"]["of"], "2");
    let md = std::fs::read_to_string(tmp.path().join("out.card.md")).expect("dedup card");
    assert!(
        md.contains("exact 1") && md.contains("`3`: duplicates 2"),
        "{md}"
    );

    // Bad inputs: a missing reference, the output over the input, rows without text.
    let (ok, _, log) = optimsyn(&[
        "data",
        "decontaminate",
        "--input",
        &s(&input),
        "--against",
        "missing.jsonl",
    ]);
    assert!(!ok && log.contains("missing.jsonl"), "{log}");
    let (ok, _, log) = optimsyn(&[
        "data",
        "decontaminate",
        "--input",
        &s(&input),
        "--against",
        &s(&val),
        "--output",
        &s(&input),
    ]);
    assert!(!ok && log.contains("is the input"), "{log}");
    assert_eq!(rows(&input).len(), 3, "the input is untouched");
    std::fs::write(&input, "{\"id\": 1, \"score\": 3}\n").expect("write");
    let (ok, _, log) = optimsyn(&["data", "dedup", "--input", &s(&input)]);
    assert!(
        !ok && log.contains("in.jsonl:1") && log.contains("no text"),
        "{log}"
    );
}
