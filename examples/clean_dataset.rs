//! Clean a chat dataset before training on it: drop rows that repeat an evaluation set and
//! near-duplicate rows, and write a dataset card. The hygiene crate alone: no model, no libtorch.
//!
//! ```text
//! cargo run --example clean_dataset -- [DATA.jsonl] [EVAL.jsonl] [OUT_DIR]
//! ```
//!
//! The defaults take the bundled demo's facts as the dataset (every QA pair of its world, plus three
//! restated validation questions and three repeated rows) and its validation set as the evaluation
//! set: the 40 facts that *are* validation questions, the three restated ones and the three repeats
//! come out (1506 rows → 1460). The cleaned file and its card go to a temporary folder.

use std::error::Error;
use std::path::PathBuf;

use optimsyn_data_io::{ChatExample, JsonlWriter, Provenance, SyntheticSample, read_jsonl};
use optimsyn_hygiene::{
    DatasetCard, DecontamConfig, DedupConfig, OnContaminated, Screen, ScreenSettings,
    reference_from_files,
};

fn main() -> Result<(), Box<dyn Error>> {
    let mut args = std::env::args().skip(1);
    let demo = optimsyn_examples::demo_dir();
    let tmp = std::env::temp_dir().join(format!("optimsyn-clean-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let data_path = match args.next() {
        Some(p) => PathBuf::from(p),
        None => demo_dataset(&demo, &tmp.join("data.jsonl"))?,
    };
    let eval_path = args.next().map_or(demo.join("val.jsonl"), PathBuf::from);
    let out = args.next().map_or(tmp.clone(), PathBuf::from);

    let (reference, files) = reference_from_files(DecontamConfig::default(), &[&eval_path])?;
    let rows: Vec<ChatExample> = read_jsonl(&data_path)?;
    let mut samples: Vec<SyntheticSample> = rows
        .into_iter()
        .enumerate()
        .map(|(i, mut example)| {
            example.id.get_or_insert_with(|| format!("row-{}", i + 1));
            SyntheticSample {
                example,
                provenance: Provenance {
                    seed_id: data_path.display().to_string(),
                    valid: true,
                    ..Default::default()
                },
                influence: None,
                subtask_influence: None,
                reward: None,
            }
        })
        .collect();
    let dedup = DedupConfig::default();
    let screen = Screen {
        reference: Some(&reference),
        on_contaminated: OnContaminated::Drop,
        dedup: Some(dedup),
    };
    let counts = screen.apply(&mut samples)?;
    println!(
        "{} rows: {} repeat {} (dropped), {} exact and {} near duplicates dropped",
        samples.len(),
        counts.contaminated,
        eval_path.display(),
        counts.exact_duplicates,
        counts.near_duplicates
    );
    for s in samples
        .iter()
        .filter_map(|s| s.provenance.contamination.as_ref())
        .take(3)
    {
        println!("  e.g. line {} of {}: \"{}\"", s.row, s.source, s.text);
    }

    let clean = out.join("clean.jsonl");
    let mut w = JsonlWriter::create(&clean)?;
    for s in samples.iter().filter(|s| s.provenance.valid) {
        w.write(&s.example)?;
    }
    w.sync()?;
    let settings = ScreenSettings {
        against: files,
        ngram: reference.config().ngram,
        min_words: reference.config().min_words,
        on_contaminated: OnContaminated::Drop,
        dedup_threshold: Some(dedup.threshold),
    };
    let command: Vec<String> = std::env::args().collect();
    let card = DatasetCard::build(
        "clean.jsonl",
        &command.join(" "),
        &samples,
        settings,
        counts,
    );
    let (_, md) = card.write_beside(&clean)?;
    println!(
        "{} rows kept in {}; card: {}",
        card.kept,
        clean.display(),
        md.display()
    );
    if out == tmp {
        std::fs::remove_dir_all(&tmp)?;
    }
    Ok(())
}

/// Every QA pair of the demo's world, then three validation questions restated and three repeats.
fn demo_dataset(demo: &std::path::Path, path: &std::path::Path) -> Result<PathBuf, Box<dyn Error>> {
    let facts: Vec<serde_json::Value> = read_jsonl(demo.join("facts.jsonl"))?;
    let mut rows = Vec::new();
    for f in &facts {
        for qa in f["qa"].as_object().into_iter().flat_map(|o| o.values()) {
            let (q, a) = (qa["question"].as_str(), qa["answer"].as_str());
            if let (Some(q), Some(a)) = (q, a) {
                rows.push(ChatExample::qa(q, a));
            }
        }
    }
    let val: Vec<ChatExample> = read_jsonl(demo.join("val.jsonl"))?;
    for v in val.iter().take(3) {
        let q = &v.messages[0].content;
        rows.push(ChatExample::qa(
            format!("Quick one: {}", q.to_uppercase()),
            "Not sure.",
        ));
    }
    let repeats: Vec<ChatExample> = rows.iter().take(3).cloned().collect();
    rows.extend(repeats);
    let mut w = JsonlWriter::create(path)?;
    for r in &rows {
        w.write(r)?;
    }
    w.sync()?;
    Ok(path.to_path_buf())
}
