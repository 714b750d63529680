//! Score an existing chat dataset's influence on a validation set: the influence crate alone, no RL.
//!
//! Each candidate gets `IF = mean over validation rows of cos(P·Γ(candidate), P·∇ℓ(val))` at the
//! warm-up checkpoint (LESS-style: Adam-preconditioned LoRA gradients, projected; positive means
//! "training on it lowers the validation loss"), aggregated over the validation subtasks.
//!
//! ```text
//! cargo run --example score_dataset -- [TARGET_DIR] [VAL.jsonl] [DATA.jsonl] [CHECKPOINT_DIR]
//! ```
//!
//! The defaults are the bundled demo's tiny target, its validation set and its held-out QA pairs
//! as the dataset to score. Without `CHECKPOINT_DIR` (a `checkpoint-N/` folder of `optimsyn warmup`
//! or `optimsyn sft`: adapter + `optimizer.safetensors`), the example first warms a LoRA adapter
//! up for one epoch on the dataset itself, as LESS does on a slice of the pool.

use std::error::Error;
use std::path::PathBuf;

use optimsyn_data_io::{ChatExample, ChatFormat, ChatTokenizer, read_jsonl};
use optimsyn_influence::{InfluenceScorer, ProjectorKind, ScoreConfig, encode_examples};
use optimsyn_lm::sft::{self, SftConfig};
use optimsyn_lm::{CausalLm, DataInfo, LoadOptions, LoraAdapter, LoraConfig, Trainable};

fn main() -> Result<(), Box<dyn Error>> {
    let mut args = std::env::args().skip(1);
    let demo = optimsyn_examples::demo_dir();
    let mut arg_or = |default: PathBuf| args.next().map(PathBuf::from).unwrap_or(default);
    let target = arg_or(demo.join("models/target"));
    let val_path = arg_or(demo.join("val.jsonl"));
    let data_path = arg_or(demo.join("heldout.jsonl"));
    let checkpoint = args.next().map(PathBuf::from);
    tch::set_num_threads(2);

    let val: Vec<ChatExample> = read_jsonl(&val_path)?;
    let data: Vec<ChatExample> = read_jsonl(&data_path)?;
    println!(
        "{} candidates from {}, {} validation rows from {}",
        data.len(),
        data_path.display(),
        val.len(),
        val_path.display()
    );

    // The warm-up: a LoRA adapter and its Adam moments, which precondition the candidates' side.
    let warmup_dir = tempfile::tempdir()?;
    let checkpoints = match checkpoint {
        Some(dir) => vec![dir],
        None => {
            let tok = ChatTokenizer::from_model_dir(&target)?;
            let rows = encode_examples(&tok, &data, ChatFormat::Tulu, None)?;
            let mut model = CausalLm::load(&target, LoadOptions::default())?;
            let lora = LoraConfig {
                r: 8,
                alpha: 16.0,
                ..Default::default()
            };
            let adapter = LoraAdapter::init(&mut model, lora, 0)?;
            let cfg = SftConfig {
                lr: 1e-3, // a tiny model needs a larger step than the paper's 1e-5
                batch_size: 8,
                ..Default::default()
            };
            let info = DataInfo {
                format: Some(ChatFormat::Tulu),
                ..Default::default()
            };
            let report = sft::train(
                &mut model,
                Trainable::Lora(&adapter),
                &rows,
                &cfg,
                &info,
                warmup_dir.path(),
                &mut |_| {},
            )?;
            println!("warm-up: {} steps", report.steps);
            report.checkpoints
        }
    };

    let config = ScoreConfig {
        projector: ProjectorKind::Sjlt {
            k: 8192,
            s: 4,
            seed: 0,
        },
        ..Default::default()
    };
    let mut scorer =
        InfluenceScorer::new(&target, &checkpoints, &val, config, LoadOptions::default())?;
    let mut scores = scorer.score(&data)?;
    let unscored: Vec<String> = scores
        .iter()
        .filter(|s| s.influence.is_none())
        .map(|s| format!("{} ({})", s.id, s.reason.as_deref().unwrap_or("?")))
        .collect();
    scores.retain(|s| s.influence.is_some());
    scores.sort_by(|a, b| {
        let f = |s: &optimsyn_influence::Score| s.influence.unwrap_or(f64::NAN);
        f(b).total_cmp(&f(a))
    });

    let show = |s: &optimsyn_influence::Score| {
        println!(
            "  {:+.4}  {:<24} loss {:.3}",
            s.influence.unwrap_or(f64::NAN),
            s.id,
            s.loss.unwrap_or(f64::NAN)
        );
    };
    println!("most helpful:");
    scores.iter().take(5).for_each(show);
    println!("least helpful:");
    scores.iter().rev().take(5).for_each(show);
    if !unscored.is_empty() {
        println!("not scored: {}", unscored.join(", "));
    }
    if scores.is_empty() {
        return Err("no candidate could be scored".into());
    }
    Ok(())
}
