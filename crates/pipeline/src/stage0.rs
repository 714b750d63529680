//! Stage 0: the seed documents and their seeded train / held-out split.

use optimsyn_data_io::{JsonlReader, SeedDoc, read_jsonl, write_atomic};
use serde::{Deserialize, Serialize};

use crate::config::RunConfig;
use crate::error::{Error, Result};

/// One seed document with its policy prompt.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SeedPrompt {
    /// The document.
    pub doc: SeedDoc,
    /// `train` or `heldout`.
    pub split: String,
}

/// Stage 0: seeds → prompts with a seeded 90/10 split, written once to `OUT/prompts.jsonl`.
pub fn stage0(cfg: &RunConfig) -> Result<Vec<SeedPrompt>> {
    let path = cfg.out.join("prompts.jsonl");
    if path.exists() {
        return Ok(read_jsonl(&path)?);
    }
    let field = cfg.data.text_field.clone();
    let reader = JsonlReader::with_parser(&cfg.data.seeds, move |b| {
        let v: serde_json::Value = optimsyn_data_io::jsonl::parse_row(b)?;
        SeedDoc::from_value(v, &field)
    })?;
    let mut docs: Vec<SeedDoc> = reader.collect::<Result<_, _>>()?;
    if docs.is_empty() {
        return Err(Error::Config(format!(
            "key `data.seeds`: {} holds no seed documents",
            cfg.data.seeds.display()
        )));
    }
    for d in &mut docs {
        d.domain.get_or_insert_with(|| cfg.data.domain.clone());
    }
    let split = split(cfg, &docs);
    let out: Vec<SeedPrompt> = docs
        .into_iter()
        .zip(split)
        .map(|(doc, s)| SeedPrompt {
            doc,
            split: s.into(),
        })
        .collect();
    std::fs::create_dir_all(&cfg.out).map_err(Error::io(&cfg.out))?;
    let text: String = out
        .iter()
        .map(|p| serde_json::to_string(p).map(|l| l + "\n"))
        .collect::<Result<_, _>>()?;
    write_atomic(&path, text.as_bytes())?;
    Ok(out)
}

/// Orders the documents by a hash of (seed, id); the first `train_fraction` are trained on.
fn split(cfg: &RunConfig, docs: &[SeedDoc]) -> Vec<&'static str> {
    let mut order: Vec<(u64, usize)> = docs
        .iter()
        .enumerate()
        .map(|(i, d)| (optimsyn_lm::row_key(&format!("{}:{}", cfg.seed, d.id)), i))
        .collect();
    order.sort();
    let n_train =
        ((docs.len() as f64 * cfg.data.train_fraction).round() as usize).clamp(1, docs.len());
    let mut split = vec!["heldout"; docs.len()];
    for (_, i) in order.iter().take(n_train) {
        split[*i] = "train";
    }
    split
}

/// The seeds GRPO trains on (split `train`).
pub fn train_split(seeds: &[SeedPrompt]) -> Vec<&SeedPrompt> {
    seeds.iter().filter(|s| s.split == "train").collect()
}
