//! The OptimSyn loop driven from Rust, stage by stage, with a reward of your own.
//!
//! `optimsyn train` runs stages 0–2 with the reward its config describes. Here the same stages
//! are called one by one from `optimsyn-pipeline`, and the last step of the reward is replaced:
//! the influence of each rollout's QA pair is scored as usual (and written to
//! `OUT/rl/samples/step-N.jsonl`), then a custom [`RewardRule`] pays the influence ranked within
//! the step, with a penalty for rubrics that did not become a QA pair. Then stage 3 writes the
//! final dataset with the trained policy.
//!
//! ```text
//! cargo run --release --example pipeline_custom_reward -- [CONFIG] [OUT] [STEPS]
//! ```
//!
//! `CONFIG` defaults to the bundled demo's `demo.toml` (tiny models, two domains); `STEPS` to 3
//! (the demo trains 20). Without `OUT` a temporary folder is used and removed at the end; with
//! one, running again resumes where the last run stopped.

use std::error::Error;
use std::path::PathBuf;

use optimsyn_pipeline::{InfluenceReward, RewardRule, RunConfig, ScoredStep};

/// Ranks the valid rollouts of a step by influence (0 for the lowest, 1 for the highest); an
/// invalid rollout gets -0.5. Ranks ignore how far apart the scores are, only their order.
struct RankedInfluence;

impl RewardRule for RankedInfluence {
    fn rewards(&mut self, step: &ScoredStep) -> Vec<f64> {
        let influence: Vec<Option<f64>> = step
            .scores
            .iter()
            .map(|s| s.and_then(|s| s.influence))
            .collect();
        let mut valid: Vec<f64> = influence.iter().flatten().copied().collect();
        valid.sort_by(f64::total_cmp);
        let top = (valid.len().max(2) - 1) as f64;
        influence
            .iter()
            .map(|x| match x {
                Some(v) => valid.partition_point(|w| w < v) as f64 / top,
                None => -0.5,
            })
            .collect()
    }
}

fn main() -> Result<(), Box<dyn Error>> {
    let mut args = std::env::args().skip(1);
    let config = args.next().filter(|s| !s.is_empty()).map_or_else(
        || optimsyn_examples::demo_dir().join("demo.toml"),
        PathBuf::from,
    );
    let scratch = tempfile::tempdir()?;
    let out = args
        .next()
        .filter(|s| !s.is_empty())
        .map_or_else(|| scratch.path().to_path_buf(), PathBuf::from);
    let steps: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(3);
    tch::set_num_threads(2);

    let mut cfg = RunConfig::load(&config)?;
    cfg.out = out;
    cfg.steps = steps;
    // Stage 0: the seed documents, split into the ones GRPO trains on and held-out ones.
    let seeds = optimsyn_pipeline::stage0(&cfg)?;
    let models = optimsyn_pipeline::load_models(&cfg)?;
    // Stage 1: the untrained policy's pool, the target's warm-up, the influence scorer.
    let mut scorer = optimsyn_pipeline::stage1(&cfg, &models, &seeds)?;
    // Stage 2, by hand: the trainer and the reward are ordinary values.
    let mut trainer = optimsyn_pipeline::grpo_trainer(&cfg, &models, &seeds)?;
    let start = trainer.step_count();
    let mut reward =
        InfluenceReward::new(&cfg, &models, &seeds, &mut scorer, start)?.with_rule(RankedInfluence);
    while trainer.step_count() < cfg.steps {
        let m = trainer.step(&mut reward)?;
        let kl = m.kl.map_or("–".to_string(), |k| format!("{k:.5}"));
        println!("step {}: mean reward {:.3}, KL {kl}", m.step, m.reward.mean);
    }
    trainer.save()?;
    drop(reward);
    // The rewards the rule paid are in the samples files beside each rollout's influence.
    let last = cfg
        .out
        .join("rl/samples")
        .join(format!("step-{:06}.jsonl", cfg.steps));
    let rows: Vec<optimsyn_synth::SynthRecord> = optimsyn_data_io::read_jsonl(&last)?;
    let paid: Vec<f64> = rows.iter().filter_map(|r| r.sample.reward).collect();
    assert_eq!(paid.len(), rows.len(), "every rollout carries its reward");
    assert!(paid.iter().all(|r| (-0.5..=1.0).contains(r)), "{paid:?}");
    // Stage 3: the trained policy writes the final dataset (with a card beside it).
    let data = optimsyn_pipeline::stage3(&cfg, &models, &seeds, true)?;
    println!(
        "{} QA pairs in {}",
        data.len(),
        cfg.out.join("dataset-rl.jsonl").display()
    );
    Ok(())
}
