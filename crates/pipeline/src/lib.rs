//! The OptimSyn method as a library: stage 0 (prompts), stage 1 (initial pool, warm-up,
//! validation features), stage 2 (GRPO with influence rewards), stage 3 (the final dataset).
//! The `optimsyn` program (`train`, `synthesize`, `demo`) is a thin wrapper over this crate;
//! Rust code can run the whole loop with [`train`] or drive it stage by stage, and replace the
//! reward's last step with its own [`RewardRule`].
//!
//! Layout of a run folder (every stage resumes from what it finds):
//!
//! ```text
//! OUT/prompts.jsonl          stage 0: seed id, split (train / heldout)
//! OUT/pool.jsonl             stage 1: the untrained policy's samples (provenance on each)
//! OUT/warmup/checkpoint-N/   stage 1: target adapter + Adam moments + training.json
//! OUT/rl/                    stage 2: GRPO checkpoints, metrics.jsonl, influence.jsonl,
//!                            samples/step-N.jsonl (every rollout's QA, IF and reward)
//! OUT/dataset-<tag>.jsonl    stage 3: one sample per rubric (valid ones are the dataset)
//! OUT/*.card.json, *.card.md a dataset card beside the pool and each final dataset
//! OUT/report.md, OUT/rl.svg  a report and a plot of the RL run
//! ```
//!
//! Driving the loop from Rust, with a custom reward (the runnable version is
//! `examples/pipeline_custom_reward.rs`):
//!
//! ```no_run
//! use optimsyn_pipeline::{InfluenceReward, RunConfig, ScoredStep};
//!
//! # fn main() -> optimsyn_pipeline::Result<()> {
//! let cfg = RunConfig::load("run.toml".as_ref())?;
//! let seeds = optimsyn_pipeline::stage0(&cfg)?;
//! let models = optimsyn_pipeline::load_models(&cfg)?;
//! let mut scorer = optimsyn_pipeline::stage1(&cfg, &models, &seeds)?;
//! let mut trainer = optimsyn_pipeline::grpo_trainer(&cfg, &models, &seeds)?;
//! let start = trainer.step_count();
//! // Raw influence, but a rubric that asks for nothing gets -1.
//! let rule = |s: &ScoredStep| -> Vec<f64> {
//!     s.scores.iter().map(|x| x.and_then(|x| x.influence).unwrap_or(-1.0)).collect()
//! };
//! let mut reward = InfluenceReward::new(&cfg, &models, &seeds, &mut scorer, start)?.with_rule(rule);
//! while trainer.step_count() < cfg.steps {
//!     trainer.step(&mut reward)?;
//! }
//! trainer.save()?;
//! let data = optimsyn_pipeline::stage3(&cfg, &models, &seeds, true)?;
//! println!("{} QA pairs", data.len());
//! # Ok(())
//! # }
//! ```

pub mod config;
mod device;
mod error;
pub mod hygiene;
mod models;
mod progress;
mod report;
mod reward;
mod rollouts;
mod served;
mod stage0;
mod stage1;
mod stage2;
mod stage3;
mod tune;

pub use config::{RewardMode, Role, RunConfig, SubtaskScale};
pub use device::{DeviceName, Dtype, build_line, load_options, parse_device, parse_dtype};
pub use error::{Error, Result};
pub use models::{Models, encode_prompts, load_models, load_policy};
pub use progress::{Progress, Quiet};
pub use report::{RubricStats, SubtaskTrend, read_kl, run_report, subtask_trend, write_report};
pub use reward::{
    ConfiguredReward, InfluenceReward, RewardRow, RewardRule, ScoredStep, reward_influence,
    rewards, subtask_means,
};
pub use rollouts::{policy_info, sample_rubrics, synthesize_rubrics, valid_examples};
pub use served::{ServedError, ServedPolicy, ServedRollouts};
pub use stage0::{SeedPrompt, stage0, train_split};
pub use stage1::{
    WARMUP_DIAGNOSTICS, WarmupDiagnostics, read_warmup_diagnostics, score_config, stage1,
    warmup_scorer,
};
pub use stage2::{grpo_trainer, stage2};
pub use stage3::stage3;
pub use tune::finetune_and_eval;

/// `optimsyn train`: stages 0–2 and the run's `report.md`, resumable. Returns every GRPO step's
/// [`RewardRow`].
pub fn train(cfg: &RunConfig, progress: &mut dyn Progress) -> Result<Vec<RewardRow>> {
    let seeds = stage0(cfg)?;
    let m = load_models(cfg)?;
    let mut scorer = stage1(cfg, &m, &seeds)?;
    let rows = stage2(cfg, &m, &seeds, &mut scorer, progress)?;
    write_report(cfg, &rows)?;
    Ok(rows)
}
