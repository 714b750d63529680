//! JSONL files of arbitrary and damaged bytes (crates/data-io/src/jsonl.rs: `JsonlReader` with
//! `parse_row` for every row type, strict and skipping; `JsonlWriter::append`, which scans the
//! file to cut a torn tail; `truncate_rows_after`), and `SeedDoc::from_value`
//! (crates/data-io/src/rows.rs). `jsonl_props.rs` covers round trips of valid rows and torn
//! writes of the writer's own output; this covers what anyone else may have put in the file.

use std::path::Path;

use optimsyn_data_io::{
    ChatExample, JsonlReader, JsonlWriter, SeedDoc, SyntheticSample, truncate_rows_after,
};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;
use serde_json::{Value, json};

use super::mutate::{apply_bytes, apply_json, byte_ops, json_ops, json_value};

const KEYS: &[&str] = &[
    "id",
    "messages",
    "role",
    "content",
    "subtask",
    "text",
    "clean_text",
    "domain",
    "seed_id",
    "rubric",
    "policy",
    "generator",
    "policy_sampling",
    "generator_sampling",
    "temperature",
    "seed",
    "step",
    "valid",
    "rejection",
    "contamination",
    "duplicate_of",
    "influence",
    "subtask_influence",
    "reward",
    "user",
    "assistant",
    "system",
];

/// Valid rows of each kind the crate reads.
fn valid_rows() -> Vec<Value> {
    vec![
        json!({"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]}),
        json!({"id": 7, "messages": [{"role": "system", "content": "s"}], "subtask": "math"}),
        json!({"id": "d1", "text": "Aspirin inhibits COX.", "domain": "medicine", "source": "pubmed"}),
        json!({"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}],
               "seed_id": "d1", "rubric": "r", "policy": "p", "generator": "g",
               "policy_sampling": {"temperature": 1.0, "seed": 3}, "generator_sampling": {"temperature": 0.0},
               "step": 2, "valid": true, "influence": 0.25, "subtask_influence": {"s": 0.25}, "reward": 0.5}),
    ]
}

/// A file of valid rows, some rows structurally edited, then byte edits of the whole file.
fn damaged_file() -> impl Strategy<Value = Vec<u8>> {
    (
        vec(
            (
                0..valid_rows().len(),
                proptest::option::weighted(0.5, json_ops(KEYS)),
                select(&["\n", "\r\n", "\n\n", "\n  \n"][..]),
            ),
            1..6,
        ),
        proptest::option::weighted(0.6, byte_ops()),
    )
        .prop_map(|(rows, bytes)| {
            let base = valid_rows();
            let mut out = Vec::new();
            for (i, ops, end) in rows {
                let mut v = base[i].clone();
                if let Some(ops) = ops {
                    apply_json(&mut v, &ops);
                }
                out.extend(serde_json::to_vec(&v).expect("a Value serializes"));
                out.extend_from_slice(end.as_bytes());
            }
            match bytes {
                Some(ops) => apply_bytes(out, &ops),
                None => out,
            }
        })
}

/// Arbitrary bytes, weighted towards line ends and JSON syntax so that lines split and start
/// like rows.
fn arbitrary_file() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        vec(any::<u8>(), 0..256),
        vec(
            prop_oneof![
                4 => any::<u8>(),
                1 => select(&b"\n\r {}[]\":,0"[..]),
            ],
            0..256
        ),
        (1usize..400).prop_map(|n| {
            let mut b = b"{\"messages\": ".to_vec();
            b.extend(std::iter::repeat_n(b'[', n));
            b.push(b'\n');
            b
        }),
    ]
}

/// The 1-based numbers of the lines a reader sees as rows (blank ones skipped).
fn row_lines(bytes: &[u8]) -> Vec<u64> {
    bytes
        .split_inclusive(|&b| b == b'\n')
        .enumerate()
        .filter(|(_, l)| {
            let l = l.strip_suffix(b"\n").unwrap_or(l);
            let l = l.strip_suffix(b"\r").unwrap_or(l);
            !l.iter().all(u8::is_ascii_whitespace)
        })
        .map(|(i, _)| i as u64 + 1)
        .collect()
}

/// Reads `path` as rows of `T`, skipping and strict: never a panic; every non-blank line is a row
/// or a skipped row; errors name the file and a row line, in order; the strict reader stops at the
/// first line the skipping one skips.
fn read_as<T: serde::de::DeserializeOwned + 'static>(
    path: &Path,
    lines: &[u64],
) -> Result<(), TestCaseError> {
    let mut lenient = JsonlReader::<T>::open(path)
        .expect("open")
        .skip_invalid(true);
    let mut good = Vec::new();
    while let Some(r) = lenient.next() {
        prop_assert!(r.is_ok(), "a skipping reader returned {:?}", r.err());
        good.push(lenient.line());
    }
    let stats = lenient.stats();
    prop_assert_eq!(stats.rows + stats.skipped, lines.len() as u64);
    prop_assert_eq!(stats.errors.len() as u64, stats.skipped.min(10));
    let mut last = 0;
    for e in &stats.errors {
        let msg = e.to_string();
        let line = msg
            .strip_prefix(&format!("{}:", path.display()))
            .and_then(|m| m.split(':').next())
            .and_then(|n| n.parse::<u64>().ok());
        prop_assert!(
            line.is_some_and(|l| l > last && lines.contains(&l)),
            "{msg}"
        );
        last = line.unwrap_or(last);
    }
    let first_bad = lines.iter().find(|l| !good.contains(l)).copied();
    let mut strict = JsonlReader::<T>::open(path).expect("open");
    let mut ok = 0;
    for r in strict.by_ref() {
        match r {
            Ok(_) => ok += 1,
            Err(e) => {
                let msg = e.to_string();
                let want = format!("{}:{}:", path.display(), first_bad.unwrap_or(0));
                prop_assert!(msg.starts_with(&want), "{msg} (expected {want})");
            }
        }
    }
    let before_bad = good
        .iter()
        .filter(|&&l| l < first_bad.unwrap_or(u64::MAX))
        .count();
    prop_assert_eq!(ok, before_bad);
    Ok(())
}

fn check_file(bytes: &[u8], kind: u8) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let path = dir.path().join("rows.jsonl");
    std::fs::write(&path, bytes).expect("write the file");
    let lines = row_lines(bytes);
    match kind % 4 {
        0 => read_as::<ChatExample>(&path, &lines)?,
        1 => read_as::<SyntheticSample>(&path, &lines)?,
        2 => read_as::<SeedDoc>(&path, &lines)?,
        _ => read_as::<Value>(&path, &lines)?,
    }

    // A resumed writer keeps exactly the complete lines and counts the non-blank ones.
    let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
    let kept_rows = bytes[..complete]
        .split_inclusive(|&b| b == b'\n')
        .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
        .count();
    let w = JsonlWriter::append(&path).expect("append");
    prop_assert_eq!(w.existing_rows(), kept_rows as u64);
    prop_assert_eq!(w.repaired_bytes(), (bytes.len() - complete) as u64);
    drop(w);
    prop_assert_eq!(std::fs::read(&path).expect("read back"), &bytes[..complete]);

    // Dropping rows past a step keeps only rows that parse and say so.
    std::fs::write(&path, bytes).expect("write the file");
    truncate_rows_after(&path, "step", 2).expect("truncate");
    let kept = std::fs::read_to_string(&path).expect("read back");
    for line in kept.lines() {
        let v: Value = serde_json::from_str(line).expect("a kept row parses");
        prop_assert!(v["step"].as_u64().is_some_and(|s| s <= 2), "{line}");
    }
    Ok(())
}

proptest! {
    #![proptest_config(super::cases(64))]

    #[test]
    fn arbitrary_bytes_as_jsonl(bytes in arbitrary_file(), kind in any::<u8>()) {
        check_file(&bytes, kind)?;
    }

    #[test]
    fn damaged_valid_jsonl(bytes in damaged_file(), kind in any::<u8>()) {
        check_file(&bytes, kind)?;
    }

    /// Seed documents whose text lives in a configured field, from any JSON value.
    #[test]
    fn seed_doc_from_any_value(
        v in prop_oneof![
            json_value(KEYS),
            (0..valid_rows().len(), json_ops(KEYS)).prop_map(|(i, ops)| {
                let mut v = valid_rows()[i].clone();
                apply_json(&mut v, &ops);
                v
            }),
        ],
        field in select(&["text", "clean_text", "id", "domain", ""][..]),
    ) {
        match SeedDoc::from_value(v, field) {
            Ok(d) => prop_assert!(!d.extra.contains_key("text")),
            Err(e) => prop_assert!(!e.is_empty()),
        }
    }
}
