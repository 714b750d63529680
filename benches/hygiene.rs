//! Rows per second through decontamination and deduplication: candidate QA rows (chat JSON,
//! ~25 words each) checked against a reference set of 10,000 validation rows (word 13-grams plus
//! whole short questions), and the same rows through exact + MinHash near-duplicate detection
//! (128 permutations, word pairs, Jaccard 0.8). One row in 50 repeats a validation question and
//! one in 20 near-repeats an earlier row, so both paths, hit and miss, are timed.
//!
//! `cargo bench -p optimsyn-examples --bench hygiene` measures; `cargo test` runs it once on a
//! small reference set. The numbers are CPU-bound and single-threaded.

use std::time::Duration;

use criterion::{Criterion, Throughput};
use optimsyn_hygiene::{DecontamConfig, DedupConfig, Deduper, RefRow, Reference, row_segments};
use serde_json::{Value, json};

const SUBJECTS: [&str; 8] = [
    "court", "statute", "tenant", "river", "drug", "rice", "bridge", "treaty",
];

fn question(i: usize) -> String {
    format!(
        "What does the {} numbered {i} say about appeals filed within {} days of notice?",
        SUBJECTS[i % SUBJECTS.len()],
        i % 97
    )
}

fn qa(q: &str, a: &str) -> Value {
    json!({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
}

fn reference(rows: usize) -> Reference {
    let mut r = Reference::new(DecontamConfig::default());
    for i in 0..rows {
        let at = RefRow {
            source: "val.jsonl".into(),
            row: i as u64 + 1,
            id: None,
        };
        let row = qa(
            &question(i),
            "It says the appeal is heard by the High Court.",
        );
        r.add_row(at, &row).unwrap_or_else(|e| panic!("{e}"));
    }
    r
}

fn candidates(n: usize, ref_rows: usize) -> Vec<Value> {
    (0..n)
        .map(|i| {
            let q = if i % 50 == 0 {
                question(i % ref_rows)
            } else if i % 20 == 0 && i > 0 {
                format!("{} Please answer briefly.", candidate_question(i - 1))
            } else {
                candidate_question(i)
            };
            qa(
                &q,
                "The tenant may appeal to the Land Court within thirty days of the decision.",
            )
        })
        .collect()
}

fn candidate_question(i: usize) -> String {
    format!(
        "Under rule {i} of the {} code, who may appeal and to which body?",
        SUBJECTS[(i * 7) % SUBJECTS.len()]
    )
}

fn main() {
    let full = !optimsyn_examples::bench::criterion_test_mode();
    let (ref_rows, n) = if full { (10_000, 10_000) } else { (200, 200) };
    let reference = reference(ref_rows);
    let rows = candidates(n, ref_rows);
    let mut c = Criterion::default().configure_from_args();
    let mut g = c.benchmark_group("hygiene");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    g.throughput(Throughput::Elements(n as u64));
    g.bench_function(format!("decontaminate/{ref_rows}-reference-rows"), |b| {
        b.iter(|| {
            let mut hits = 0usize;
            for row in &rows {
                hits += usize::from(reference.check_row(row).ok().flatten().is_some());
            }
            assert_eq!(hits, n.div_ceil(50));
            hits
        })
    });
    let texts: Vec<String> = rows
        .iter()
        .map(|r| {
            let segs = row_segments(r).unwrap_or_default();
            optimsyn_hygiene::normalized_text(&segs)
        })
        .collect();
    g.bench_function("dedup/minhash-128", |b| {
        b.iter(|| {
            let mut d = Deduper::new(DedupConfig::default()).unwrap_or_else(|e| panic!("{e}"));
            for (i, t) in texts.iter().enumerate() {
                d.push(&i.to_string(), t);
            }
            d.kept()
        })
    });
    g.finish();
    c.final_summary();
}
