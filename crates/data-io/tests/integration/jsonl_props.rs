//! JSONL round-trips of every row type over arbitrary text, and resumption after torn writes.

use optimsyn_data_io::{
    ChatExample, ChatMessage, JsonlReader, JsonlWriter, Provenance, Role, SamplingParams, SeedDoc,
    SyntheticSample, read_jsonl,
};
use proptest::prelude::*;
use std::io::Write;

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        any::<String>(),
        "[\\n\\r\\t \"\\\\{}]{0,8}",
        // long strings cross BufReader's buffer boundaries
        (any::<char>(), 10_000usize..70_000).prop_map(|(c, n)| std::iter::repeat_n(c, n).collect()),
    ]
}

fn role() -> impl Strategy<Value = Role> {
    prop_oneof![Just(Role::System), Just(Role::User), Just(Role::Assistant)]
}

fn example() -> impl Strategy<Value = ChatExample> {
    (
        proptest::option::of(text()),
        proptest::collection::vec(
            (role(), text()).prop_map(|(r, c)| ChatMessage::new(r, c)),
            0..4,
        ),
        proptest::option::of(text()),
    )
        .prop_map(|(id, messages, subtask)| ChatExample {
            id,
            messages,
            subtask,
        })
}

fn sample() -> impl Strategy<Value = SyntheticSample> {
    (
        example(),
        text(),
        text(),
        any::<bool>(),
        proptest::option::of(text()),
        any::<u64>(),
        proptest::option::of(-1e9f64..1e9),
    )
        .prop_map(
            |(example, seed_id, rubric, valid, rejection, step, influence)| SyntheticSample {
                example,
                provenance: Provenance {
                    seed_id,
                    rubric,
                    policy: "policy@3".into(),
                    generator: "http://127.0.0.1:8000/v1#gen".into(),
                    policy_sampling: SamplingParams {
                        temperature: 1.5,
                        seed: Some(step),
                        ..Default::default()
                    },
                    generator_sampling: SamplingParams::default(),
                    step,
                    valid,
                    rejection,
                    contamination: None,
                    duplicate_of: None,
                },
                influence,
                subtask_influence: influence
                    .map(|x| [("a".to_string(), x), ("b".to_string(), -x)].into()),
                reward: influence.map(|x| x * 0.5),
            },
        )
}

fn roundtrip<T>(rows: &[T]) -> Vec<T>
where
    T: serde::Serialize + serde::de::DeserializeOwned + 'static,
{
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("rows.jsonl");
    let mut w = JsonlWriter::create(&p).unwrap();
    for r in rows {
        w.write(r).unwrap();
    }
    drop(w);
    read_jsonl(&p).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn chat_examples_roundtrip(rows in proptest::collection::vec(example(), 0..4)) {
        // An explicit `"id": null` and a missing id read back the same.
        prop_assert_eq!(roundtrip(&rows), rows);
    }

    #[test]
    fn synthetic_samples_roundtrip(rows in proptest::collection::vec(sample(), 0..3)) {
        prop_assert_eq!(roundtrip(&rows), rows);
    }

    #[test]
    fn seed_docs_roundtrip(id in text(), body in text(), domain in proptest::option::of(text())) {
        let doc = SeedDoc { id, text: body, domain, extra: Default::default() };
        prop_assert_eq!(roundtrip(std::slice::from_ref(&doc)), vec![doc]);
    }

    /// Whatever prefix of a row a crash leaves, resuming keeps exactly the complete rows.
    #[test]
    fn resume_after_torn_write(rows in proptest::collection::vec(example(), 1..4), cut in 0.0f64..1.0) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out.jsonl");
        let mut w = JsonlWriter::create(&p).unwrap();
        for r in &rows[..rows.len() - 1] {
            w.write(r).unwrap();
        }
        drop(w);
        let last = serde_json::to_vec(rows.last().unwrap()).unwrap();
        let torn = &last[..((last.len() as f64) * cut) as usize];
        std::fs::OpenOptions::new().append(true).open(&p).unwrap().write_all(torn).unwrap();
        let mut w = JsonlWriter::append(&p).unwrap();
        prop_assert_eq!(w.existing_rows() as usize, rows.len() - 1);
        w.write(rows.last().unwrap()).unwrap();
        drop(w);
        prop_assert_eq!(read_jsonl::<ChatExample>(&p).unwrap(), rows);
    }
}

#[test]
fn skip_invalid_counts_and_keeps_going() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("mixed.jsonl");
    std::fs::write(
        &p,
        b"{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}]}\nnot json\n{\"messages\": \"x\"}\n\xff\xfe\n\n{\"messages\": []}\n{\"messa",
    )
    .unwrap();
    let mut r = JsonlReader::<ChatExample>::open(&p)
        .unwrap()
        .skip_invalid(true);
    let rows: Vec<ChatExample> = r.by_ref().collect::<Result<_, _>>().unwrap();
    assert_eq!(rows.len(), 2);
    let stats = r.stats();
    assert_eq!((stats.rows, stats.skipped), (2, 4));
    let msgs: Vec<String> = stats.errors.iter().map(|e| e.to_string()).collect();
    assert!(
        msgs[0].ends_with("mixed.jsonl:2: invalid JSON: expected ident at line 1 column 2"),
        "{msgs:?}"
    );
    assert!(
        msgs[1].contains("mixed.jsonl:3: field `messages`: invalid type: string"),
        "{msgs:?}"
    );
    assert!(
        msgs[2].contains("mixed.jsonl:4: not valid UTF-8"),
        "{msgs:?}"
    );
    assert!(
        msgs[3].contains("mixed.jsonl:7: truncated last line"),
        "{msgs:?}"
    );
}

#[test]
fn missing_required_field_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("docs.jsonl");
    std::fs::write(&p, "{\"id\": \"a\", \"text\": \"t\"}\n{\"id\": \"b\"}\n").unwrap();
    let e = read_jsonl::<SeedDoc>(&p).unwrap_err().to_string();
    assert!(e.contains("docs.jsonl:2: missing field `text`"), "{e}");
    let e = read_jsonl::<ChatExample>(dir.path().join("nope.jsonl"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("nope.jsonl: No such file"), "{e}");
}
