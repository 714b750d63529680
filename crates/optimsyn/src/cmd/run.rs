//! `optimsyn train` and `optimsyn synthesize`: the OptimSyn loop from a TOML config.

use std::path::{Path, PathBuf};

use clap::Args;

use optimsyn_pipeline::{self as pipeline, Progress, RewardRow, RunConfig};

/// Arguments of `train` and `synthesize`.
#[derive(Args)]
pub struct RunArgs {
    /// The run's TOML config (see docs/GUIDE.md).
    #[arg(long)]
    config: PathBuf,
    /// Override config keys, e.g. `--set steps=20 --set grpo.optimizer.lr=1e-5` (TOML values).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
}

/// Reads a run config with `--set` overrides applied.
pub fn load_with_overrides(path: &Path, sets: &[String]) -> anyhow::Result<RunConfig> {
    Ok(RunConfig::load_with_overrides(path, sets)?)
}

/// Stages 0–2 with a progress bar, then the run's plot (`OUT/rl.svg`).
pub fn train_and_plot(cfg: &RunConfig) -> anyhow::Result<Vec<RewardRow>> {
    let rows = pipeline::train(cfg, &mut Bar::default())?;
    let kl = pipeline::read_kl(&cfg.out.join("rl").join("metrics.jsonl"))?;
    super::plot::rl_plot(&cfg.out, &rows, &kl)?;
    Ok(rows)
}

/// Stage progress as an indicatif bar on standard error.
#[derive(Default)]
struct Bar(Option<indicatif::ProgressBar>);

impl Progress for Bar {
    fn start(&mut self, what: &str, total: u64, done: u64) {
        let bar = indicatif::ProgressBar::new(total);
        bar.set_style(
            indicatif::ProgressStyle::with_template(&format!(
                "{{spinner}} {what} [{{bar:30}}] {{pos}}/{{len}} steps {{msg}} ({{elapsed}}, eta {{eta}})"
            ))
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_position(done);
        self.0 = Some(bar);
    }

    fn advance(&mut self, done: u64, message: &str) {
        if let Some(b) = &self.0 {
            b.set_position(done);
            b.set_message(message.to_string());
        }
    }

    fn finish(&mut self) {
        if let Some(b) = self.0.take() {
            b.finish_and_clear();
        }
    }
}

/// Runs `train` (stages 0–2).
pub fn train(a: RunArgs) -> anyhow::Result<()> {
    let cfg = load_with_overrides(&a.config, &a.sets)?;
    let rows = train_and_plot(&cfg)?;
    if let (Some(first), Some(last)) = (rows.first(), rows.last()) {
        println!(
            "{}",
            serde_json::json!({"out": cfg.out.display().to_string(), "steps": last.step,
                "if_valid_first": first.if_valid_mean, "if_valid_last": last.if_valid_mean,
                "valid_rate_first": first.valid_rate, "valid_rate_last": last.valid_rate,
                "plot": cfg.out.join("rl.svg").display().to_string()})
        );
    }
    Ok(())
}

/// Arguments of `synthesize`.
#[derive(Args)]
pub struct SynthesizeArgs {
    #[command(flatten)]
    run: RunArgs,
    /// Use the untrained policy (a baseline of the same size) instead of the RL-trained one.
    #[arg(long)]
    untrained: bool,
}

/// Runs `synthesize` (stage 3).
pub fn synthesize(a: SynthesizeArgs) -> anyhow::Result<()> {
    let cfg = load_with_overrides(&a.run.config, &a.run.sets)?;
    let seeds = pipeline::stage0(&cfg)?;
    let m = pipeline::load_models(&cfg)?;
    let data = pipeline::stage3(&cfg, &m, &seeds, !a.untrained)?;
    let tag = if a.untrained { "untrained" } else { "rl" };
    println!(
        "{}",
        serde_json::json!({"dataset": cfg.out.join(format!("dataset-{tag}.jsonl")).display().to_string(),
            "valid": data.len(), "seeds": seeds.len(),
            "card": cfg.out.join(format!("dataset-{tag}.card.md")).display().to_string()})
    );
    Ok(())
}
