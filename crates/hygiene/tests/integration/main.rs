//! The crate's integration tests: planted contamination and duplicates in files, bad inputs, cards.
#![allow(clippy::unwrap_used)] // test helpers: a failed unwrap is the test failing

use std::io::Write;
use std::path::{Path, PathBuf};

use optimsyn_data_io::{ChatExample, Provenance, SyntheticSample};
use optimsyn_hygiene::{
    DatasetCard, DecontamConfig, DedupConfig, Duplicate, Error, OnContaminated, Screen,
    ScreenSettings, decontaminate_file, dedup_file, reference_from_files,
};
use serde_json::{Value, json};

fn write_rows(dir: &Path, name: &str, rows: &[Value]) -> PathBuf {
    let path = dir.join(name);
    let mut f = std::fs::File::create(&path).unwrap();
    for r in rows {
        writeln!(f, "{r}").unwrap();
    }
    path
}

/// A validation set that asks about law and cooking, in chat form, with a long instruction row.
fn validation(dir: &Path) -> PathBuf {
    write_rows(
        dir,
        "val.jsonl",
        &[
            json!({"id": "v-1", "messages": [
                {"role": "system", "content": "You are a careful assistant."},
                {"role": "user", "content": "Which court hears appeals from the Rivan tax tribunal?"},
                {"role": "assistant", "content": "The High Court."}]}),
            json!({"id": "v-2", "messages": [
                {"role": "user", "content": "How long should brown rice simmer?"},
                {"role": "assistant", "content": "About 45 minutes."}]}),
            json!({"id": "v-3", "messages": [
                {"role": "user", "content": "Summarise the statute: a tenant who gives notice in writing at least two months before the end of the term may leave without paying the remaining rent, unless the lease says otherwise."},
                {"role": "assistant", "content": "Two months' written notice ends the duty to pay rent."}]}),
        ],
    )
}

fn qa(id: &str, q: &str, a: &str) -> Value {
    json!({"id": id, "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
}

#[test]
fn planted_validation_questions_are_flagged_with_their_row_and_clean_rows_pass() {
    let dir = tempfile::tempdir().unwrap();
    let val = validation(dir.path());
    let candidates = write_rows(
        dir.path(),
        "cand.jsonl",
        &[
            qa(
                "verbatim",
                "Which court hears appeals from the Rivan tax tribunal?",
                "The High Court.",
            ),
            qa(
                "recased",
                "WHICH COURT HEARS APPEALS FROM THE RIVAN TAX TRIBUNAL",
                "the high court",
            ),
            qa(
                "repunct",
                "how long... should brown-rice simmer???",
                "45 min",
            ),
            qa(
                "embedded",
                "What is rice?",
                "A grain. People often ask: how long should brown rice simmer? The answer is 45 minutes.",
            ),
            qa(
                "long-ngram",
                "What does the law say?",
                "In short, a tenant who gives notice in writing at least two months before the end of the term may leave early.",
            ),
            qa(
                "clean-1",
                "Which court hears appeals from the Dorn labour tribunal?",
                "The High Court.",
            ),
            qa(
                "clean-2",
                "How long should white rice simmer?",
                "About 45 minutes.",
            ),
            qa(
                "clean-3",
                "What is the usual term of a lease?",
                "One year, in most places.",
            ),
        ],
    );
    let (reference, files) = reference_from_files(DecontamConfig::default(), &[&val]).unwrap();
    assert_eq!(files[0].rows, 3);
    let mut got = Vec::new();
    let counts = decontaminate_file(&reference, &candidates, |row, hit| {
        got.push((row["id"].as_str().unwrap().to_string(), hit));
        Ok(())
    })
    .unwrap();
    assert_eq!((counts.rows, counts.flagged), (8, 5));
    let expect = [
        ("verbatim", Some((1, 9))),
        ("recased", Some((1, 9))),
        ("repunct", Some((2, 6))),
        ("embedded", Some((2, 6))),
        ("long-ngram", Some((3, 19))),
        ("clean-1", None),
        ("clean-2", None),
        ("clean-3", None),
    ];
    for ((id, hit), (want_id, want)) in got.iter().zip(expect) {
        assert_eq!(id, want_id);
        let hit = hit.as_ref().map(|h| (h.row, h.words));
        assert_eq!(hit, want, "{id}");
    }
    let verbatim = got[0].1.as_ref().unwrap();
    assert_eq!(verbatim.id.as_deref(), Some("v-1"));
    assert!(verbatim.source.ends_with("val.jsonl"));
}

#[test]
fn planted_near_duplicate_clusters_shrink_to_one_each_and_distinct_rows_stay() {
    let dir = tempfile::tempdir().unwrap();
    let base = [
        "Under the Rivan tax code, which court hears appeals from the tax tribunal, and within how many days must the appeal be filed? The High Court, within 30 days.",
        "How long should brown rice simmer before it is left to rest with the lid on, and how much water does a cup need? About 45 minutes; two cups of water.",
        "Who may end a lease early without paying the remaining rent, and what notice must they give to the landlord? A tenant, with two months' written notice.",
    ];
    let mut rows = Vec::new();
    for (c, b) in base.iter().enumerate() {
        rows.push(json!({"id": format!("c{c}-orig"), "text": b}));
    }
    for (c, b) in base.iter().enumerate() {
        rows.push(json!({"id": format!("c{c}-exact"), "text": b.to_uppercase()}));
        rows.push(json!({"id": format!("c{c}-near1"), "text": b.replace(", and", " and also")}));
        rows.push(json!({"id": format!("c{c}-near2"), "text": format!("{b} Indeed.")}));
    }
    // Same template, other facts: not duplicates.
    for (i, (court, days)) in [
        ("Supreme Court", 14),
        ("Land Court", 60),
        ("Appeals Board", 90),
    ]
    .iter()
    .enumerate()
    {
        rows.push(json!({"id": format!("distinct-{i}"), "text": format!(
            "Under the Dorn labour code, which body hears appeals from the wage board, and within how many weeks must they be lodged? The {court}, within {days} days.")}));
    }
    let input = write_rows(dir.path(), "data.jsonl", &rows);
    let mut kept = Vec::new();
    let mut dups = Vec::new();
    let counts = dedup_file(DedupConfig::default(), &input, |row, dup| {
        let id = row["id"].as_str().unwrap().to_string();
        match dup {
            None => kept.push(id),
            Some(d) => dups.push((id, d)),
        }
        Ok(())
    })
    .unwrap();
    assert_eq!(counts.rows, 15);
    assert_eq!(
        kept,
        [
            "c0-orig",
            "c1-orig",
            "c2-orig",
            "distinct-0",
            "distinct-1",
            "distinct-2"
        ]
    );
    for (id, d) in &dups {
        let cluster = &id[..2];
        assert_eq!(d.of(), format!("{cluster}-orig"), "{id}");
        assert_eq!(
            matches!(d, Duplicate::Exact { .. }),
            id.ends_with("exact"),
            "{id}: {d:?}"
        );
    }
}

#[test]
fn bad_inputs_name_the_file_and_row() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.jsonl");
    let e = reference_from_files(DecontamConfig::default(), &[&missing])
        .err()
        .unwrap();
    assert!(e.to_string().contains("nope.jsonl"), "{e}");

    let empty = write_rows(dir.path(), "empty.jsonl", &[]);
    let e = reference_from_files(DecontamConfig::default(), &[&empty])
        .err()
        .unwrap();
    assert!(matches!(e, Error::EmptyReference { .. }), "{e}");
    assert!(e.to_string().contains("empty.jsonl"), "{e}");
    let none: [&Path; 0] = [];
    assert!(reference_from_files(DecontamConfig::default(), &none).is_err());

    let textless = write_rows(
        dir.path(),
        "ref.jsonl",
        &[
            json!({"question": "A real question here?"}),
            json!({"id": 9, "score": 1}),
        ],
    );
    let e = reference_from_files(DecontamConfig::default(), &[&textless])
        .err()
        .unwrap();
    let msg = e.to_string();
    assert!(
        msg.contains("ref.jsonl:2") && msg.contains("no text"),
        "{msg}"
    );

    let val = validation(dir.path());
    let (reference, _) = reference_from_files(DecontamConfig::default(), &[&val]).unwrap();
    let input = write_rows(
        dir.path(),
        "in.jsonl",
        &[json!({"text": "fine"}), json!({"messages": "oops"})],
    );
    let mut seen = 0;
    let e = decontaminate_file(&reference, &input, |_, _| {
        seen += 1;
        Ok(())
    })
    .unwrap_err();
    assert!(
        e.to_string().contains("in.jsonl:2") && e.to_string().contains("`messages`"),
        "{e}"
    );
    assert_eq!(seen, 1, "rows before the bad one were delivered");
    let e = dedup_file(DedupConfig::default(), &input, |_, _| Ok(())).unwrap_err();
    assert!(e.to_string().contains("in.jsonl:2"), "{e}");
    let bad_json = dir.path().join("bad.jsonl");
    std::fs::write(&bad_json, "{\"text\": \"ok\"}\n{not json\n").unwrap();
    let e = decontaminate_file(&reference, &bad_json, |_, _| Ok(())).unwrap_err();
    assert!(e.to_string().contains("bad.jsonl:2"), "{e}");
}

#[test]
fn a_large_file_streams_with_exact_counts() {
    let dir = tempfile::tempdir().unwrap();
    let val = validation(dir.path());
    let (reference, _) = reference_from_files(DecontamConfig::default(), &[&val]).unwrap();
    let path = dir.path().join("big.jsonl");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    let n = 20_000;
    for i in 0..n {
        let q = if i % 1000 == 7 {
            "Which court hears appeals from the Rivan tax tribunal?".to_string()
        } else {
            format!("What is fact number {i} about the Rivan tax code?")
        };
        writeln!(f, "{}", qa(&i.to_string(), &q, "An answer.")).unwrap();
    }
    drop(f);
    let mut flagged = Vec::new();
    let counts = decontaminate_file(&reference, &path, |row, hit| {
        if hit.is_some() {
            flagged.push(row["id"].as_str().unwrap().parse::<usize>().unwrap());
        }
        Ok(())
    })
    .unwrap();
    assert_eq!(counts.rows, n);
    assert_eq!(
        flagged,
        (0..n as usize)
            .filter(|i| i % 1000 == 7)
            .collect::<Vec<_>>()
    );
}

fn sample(id: &str, q: &str, a: &str, influence: Option<f64>) -> SyntheticSample {
    SyntheticSample {
        example: ChatExample {
            id: Some(id.into()),
            ..ChatExample::qa(q, a)
        },
        provenance: Provenance {
            seed_id: "doc-1".into(),
            rubric: format!("rubric for {id}"),
            policy: "models/policy+rl/checkpoint-20".into(),
            generator: "models/generator".into(),
            valid: true,
            ..Default::default()
        },
        influence,
        subtask_influence: None,
        reward: None,
    }
}

#[test]
fn screening_samples_is_idempotent_and_the_card_counts_it() {
    let dir = tempfile::tempdir().unwrap();
    let val = validation(dir.path());
    let (reference, files) = reference_from_files(DecontamConfig::default(), &[&val]).unwrap();
    let mut samples = vec![
        sample(
            "s1",
            "How long should brown rice simmer?",
            "45 minutes.",
            Some(0.3),
        ),
        sample(
            "s2",
            "What is a statute of limitations, in plain words?",
            "A deadline to sue.",
            Some(0.1),
        ),
        sample(
            "s3",
            "What is a statute of limitations, in plain words?",
            "A deadline to sue.",
            Some(0.2),
        ),
        sample(
            "s4",
            "Why rinse rice before cooking it?",
            "To wash off loose starch.",
            Some(0.4),
        ),
    ];
    let mut broken = sample("s5", "", "", None);
    broken.provenance.valid = false;
    broken.provenance.rejection = Some("qa_parse".into());
    samples.push(broken);
    let screen = Screen {
        reference: Some(&reference),
        on_contaminated: OnContaminated::Drop,
        dedup: Some(DedupConfig::default()),
    };
    let counts = screen.apply(&mut samples).unwrap();
    let again = screen.apply(&mut samples).unwrap();
    assert_eq!(counts, again);
    assert_eq!(
        (
            counts.checked,
            counts.contaminated,
            counts.contaminated_dropped,
            counts.exact_duplicates
        ),
        (4, 1, 1, 1)
    );
    let valid: Vec<&str> = samples
        .iter()
        .filter(|s| s.provenance.valid)
        .map(|s| s.example.id.as_deref().unwrap())
        .collect();
    assert_eq!(valid, ["s2", "s4"]);
    // Keeping contaminated samples flags them but leaves them in the dataset.
    let keep = Screen {
        on_contaminated: OnContaminated::Keep,
        ..screen
    };
    keep.apply(&mut samples).unwrap();
    assert!(samples[0].provenance.valid && samples[0].provenance.contamination.is_some());
    let counts = screen.apply(&mut samples).unwrap();

    let settings = ScreenSettings {
        against: files
            .into_iter()
            .map(|mut f| {
                f.path = "val.jsonl".into();
                f
            })
            .collect(),
        ngram: 13,
        min_words: 3,
        on_contaminated: OnContaminated::Drop,
        dedup_threshold: Some(0.8),
    };
    let mut card = DatasetCard::build(
        "dataset-rl.jsonl",
        "optimsyn synthesize --config run.toml --tag rl",
        &samples,
        settings,
        counts,
    );
    for f in &mut card.contaminated_examples {
        f.detail = f.detail.replace(&val.display().to_string(), "val.jsonl");
    }
    card.contaminated_by_source = card
        .contaminated_by_source
        .into_values()
        .map(|n| ("val.jsonl".to_string(), n))
        .collect();
    assert_eq!(card.kept, 2);
    assert_eq!(card.influence.as_ref().unwrap().count, 2);
    insta::assert_snapshot!(card.to_markdown());
    let (json_path, md_path) = card
        .write_beside(&dir.path().join("dataset-rl.jsonl"))
        .unwrap();
    assert!(json_path.ends_with("dataset-rl.card.json") && md_path.ends_with("dataset-rl.card.md"));
    let back: DatasetCard = serde_json::from_slice(&std::fs::read(json_path).unwrap()).unwrap();
    assert_eq!(back, card);
}

#[test]
fn questions_in_scripts_without_spaces_are_caught_too() {
    let dir = tempfile::tempdir().unwrap();
    let val = write_rows(
        dir.path(),
        "val-zh.jsonl",
        &[qa("zh-1", "阿司匹林的常用剂量是多少？", "每天一百毫克。")],
    );
    let (reference, _) = reference_from_files(DecontamConfig::default(), &[&val]).unwrap();
    let copy = json!({"answer": "很多人问：阿司匹林的常用剂量是多少？答案是每天一百毫克。"});
    let hit = reference.check_row(&copy).unwrap().unwrap();
    assert_eq!((hit.row, hit.id.as_deref()), (1, Some("zh-1")));
    assert!(hit.words >= 12, "{hit:?}");
    let other = json!({"question": "布洛芬的常用剂量是多少？", "answer": "每天四百毫克。"});
    assert!(reference.check_row(&other).unwrap().is_none());
}
