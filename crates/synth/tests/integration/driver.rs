//! The synthesizer with a scripted generator: retry until parseable, typed rejections, counts,
//! provenance, failures not written, crash-safe append and resume.

use std::collections::HashMap;
use std::io::Write;
use std::ops::ControlFlow;
use std::sync::Mutex;

use optimsyn_data_io::{ChatExample, SamplingParams, SyntheticSample};
use optimsyn_synth::{
    ChatPrompt, Completion, Error, FinishReason, GenerationParams, Generator, PolicyInfo,
    SampleFile, SynthConfig, SynthRecord, Synthesizer,
};

use crate::tiny::tasks;

const GOOD: &str = r#"Here you go: {"messages": [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Which animal purrs?"}, {"role": "assistant", "content": "The cat."}]}"#;

/// Answers by prompt key: `key -> text`; a key missing from the map fails.
struct Fake {
    replies: HashMap<String, String>,
    params: GenerationParams,
    reproducible: bool,
    seen: Mutex<Vec<String>>,
}

impl Fake {
    fn new(pairs: &[(&str, &str)]) -> Self {
        Fake {
            replies: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            params: GenerationParams {
                temperature: 0.7,
                seed: 5,
                ..GenerationParams::greedy(64)
            },
            reproducible: false,
            seen: Mutex::new(Vec::new()),
        }
    }
}

impl Generator for Fake {
    fn identity(&self) -> String {
        "fake:test".into()
    }
    fn params(&self) -> &GenerationParams {
        &self.params
    }
    fn reproducible(&self) -> bool {
        self.reproducible
    }
    fn generate(
        &self,
        prompts: &[ChatPrompt],
        on_done: &mut dyn FnMut(usize, optimsyn_synth::Result<Completion>) -> ControlFlow<()>,
    ) {
        // Report in reverse order: callers must not rely on order.
        for (i, p) in prompts.iter().enumerate().rev() {
            self.seen.lock().expect("lock").push(p.key.clone());
            let r = match self.replies.get(&p.key) {
                Some(t) => Ok(Completion {
                    text: t.clone(),
                    finish_reason: FinishReason::Stop,
                    prompt_tokens: Some(3),
                    completion_tokens: Some(4),
                }),
                None => Err(Error::Generation {
                    key: p.key.clone(),
                    message: "scripted failure".into(),
                }),
            };
            if on_done(i, r).is_break() {
                return;
            }
        }
    }
}

fn policy() -> PolicyInfo {
    PolicyInfo {
        identity: "policy:tiny@step3".into(),
        sampling: SamplingParams {
            temperature: 1.5,
            ..Default::default()
        },
        step: 3,
    }
}

#[test]
fn retries_until_parseable_and_records_everything() {
    let t = tasks(4);
    let fake = Fake::new(&[
        (&t[0].id, GOOD),
        // Unparseable twice, then good on the third attempt.
        (&t[1].id, "no json"),
        (&format!("{}#2", t[1].id), "{ still not json"),
        (&format!("{}#3", t[1].id), GOOD),
        // Parses, but leaks the source: rejected at once, not retried.
        (
            &t[2].id,
            r#"{"question": "According to the document, what purrs?", "answer": "A cat."}"#,
        ),
        // Never parseable.
        (&t[3].id, "nope"),
        (&format!("{}#2", t[3].id), "nope"),
        (&format!("{}#3", t[3].id), "nope"),
    ]);
    let mut out: Vec<SynthRecord> = Vec::new();
    let report = Synthesizer::new(&fake)
        .run(&t, &policy(), &mut out)
        .expect("run");
    let c = &report.counts;
    assert_eq!((c.generated, c.kept, c.failed), (4, 2, 0));
    assert_eq!(c.rejected.get("leakage"), Some(&1));
    assert_eq!(c.rejected.get("no_json"), Some(&1));
    assert_eq!(c.calls, 4 + 2 + 2);
    assert_eq!(
        c.to_string(),
        "generated 4, kept 2, rejected 2 (leakage 1, no_json 1), failed 0"
    );
    let by_id: HashMap<&str, &SynthRecord> = out.iter().map(|r| (r.id(), r)).collect();
    let r1 = by_id[t[1].id.as_str()];
    assert_eq!(r1.generation.attempts, 3);
    assert!(r1.is_valid());
    assert_eq!(r1.sample.example.messages[1].content, "Which animal purrs?");
    let p = &r1.sample.provenance;
    assert_eq!(p.seed_id, t[1].seed_id);
    assert_eq!(p.policy, "policy:tiny@step3");
    assert_eq!(p.generator, "fake:test");
    assert_eq!(p.step, 3);
    assert_eq!(p.policy_sampling.temperature, 1.5);
    assert_eq!(p.generator_sampling.temperature, 0.7);
    assert_eq!(p.generator_sampling.seed, Some(5));
    let r2 = by_id[t[2].id.as_str()];
    assert!(!r2.is_valid());
    assert_eq!(
        r2.sample.provenance.rejection.as_deref(),
        Some("leakage: question says \"according to the document\"")
    );
    assert_eq!(r2.generation.attempts, 1);
    let r3 = by_id[t[3].id.as_str()];
    assert_eq!(r3.sample.provenance.rejection.as_deref(), Some("no_json"));
    assert!(r3.sample.example.messages.is_empty());
    assert_eq!(r3.generation.raw, "nope");
}

#[test]
fn a_reproducible_greedy_generator_is_asked_once() {
    let t = tasks(1);
    let mut fake = Fake::new(&[(&t[0].id, "no json")]);
    fake.reproducible = true;
    fake.params.temperature = 0.0;
    let mut out: Vec<SynthRecord> = Vec::new();
    let report = Synthesizer::new(&fake)
        .run(&t, &policy(), &mut out)
        .expect("run");
    assert_eq!(report.counts.calls, 1);
    assert_eq!(*fake.seen.lock().unwrap(), vec![t[0].id.clone()]);
}

#[test]
fn failures_are_reported_not_written_and_a_resumed_run_finishes_them() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("samples.jsonl");
    let t = tasks(4);
    // The first run: tasks 1 and 3 fail (their keys are not scripted).
    let first = Fake::new(&[(&t[0].id, GOOD), (&t[2].id, GOOD)]);
    let mut file = SampleFile::open(&path).unwrap();
    let report = Synthesizer::new(&first)
        .with_config(SynthConfig {
            max_attempts: 1,
            ..Default::default()
        })
        .run(&t, &policy(), &mut file)
        .unwrap();
    drop(file);
    assert_eq!((report.counts.generated, report.counts.failed), (2, 2));
    let failed: Vec<&str> = report.failures.iter().map(|f| f.id.as_str()).collect();
    assert_eq!(failed, vec![t[3].id.as_str(), t[1].id.as_str()]);
    assert!(
        report.failures[0]
            .error
            .to_string()
            .contains("scripted failure")
    );
    // A crash mid-write left half a line: opening the file cuts it off.
    std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap()
        .write_all(b"{\"id\": \"half")
        .unwrap();
    let every: Vec<(String, String)> = t.iter().map(|x| (x.id.clone(), GOOD.to_string())).collect();
    let pairs: Vec<(&str, &str)> = every
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    let second = Fake::new(&pairs);
    let mut file = SampleFile::open(&path).unwrap();
    assert_eq!(file.existing_rows(), 2);
    let report = Synthesizer::new(&second)
        .run(&t, &policy(), &mut file)
        .unwrap();
    file.sync().unwrap();
    assert_eq!(report.counts.skipped, 2);
    assert_eq!(report.counts.generated, 2);
    assert_eq!(
        *second.seen.lock().unwrap(),
        vec![t[3].id.clone(), t[1].id.clone()]
    );
    // Every task exactly once; the file reads as records, synthetic samples and chat examples.
    let rows: Vec<SynthRecord> = optimsyn_data_io::read_jsonl(&path).unwrap();
    let mut ids: Vec<&str> = rows.iter().map(SynthRecord::id).collect();
    ids.sort_unstable();
    let mut want: Vec<&str> = t.iter().map(|x| x.id.as_str()).collect();
    want.sort_unstable();
    assert_eq!(ids, want);
    let samples: Vec<SyntheticSample> = optimsyn_data_io::read_jsonl(&path).unwrap();
    assert!(samples.iter().all(|s| s.provenance.valid));
    let examples: Vec<ChatExample> = optimsyn_data_io::read_jsonl(&path).unwrap();
    assert_eq!(examples[0].messages.len(), 3);
}

#[test]
fn duplicate_task_ids_are_an_error() {
    let mut t = tasks(2);
    t[1].id = t[0].id.clone();
    let fake = Fake::new(&[]);
    let mut out: Vec<SynthRecord> = Vec::new();
    let e = Synthesizer::new(&fake)
        .run(&t, &policy(), &mut out)
        .unwrap_err();
    assert!(e.to_string().contains("appears twice"), "{e}");
}
