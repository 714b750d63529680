//! `optimsyn train` and `optimsyn synthesize`: the OptimSyn loop from a TOML config.

use std::path::PathBuf;

use clap::Args;

use crate::pipeline::{self, RunConfig};

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

/// Applies `key=value` overrides (dotted keys, TOML values) to a parsed config file.
pub fn load_with_overrides(path: &std::path::Path, sets: &[String]) -> anyhow::Result<RunConfig> {
    if sets.is_empty() {
        return RunConfig::load(path);
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read config {}: {e}", path.display()))?;
    let mut doc: toml::Table =
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    for s in sets {
        let (key, value) = s
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--set {s}: expected KEY=VALUE"))?;
        let parsed: toml::Value = match toml::from_str::<toml::Table>(&format!("v = {value}")) {
            Ok(mut t) => t
                .remove("v")
                .unwrap_or(toml::Value::String(value.to_string())),
            Err(_) => toml::Value::String(value.to_string()),
        };
        let mut table = &mut doc;
        let parts: Vec<&str> = key.split('.').collect();
        for p in &parts[..parts.len() - 1] {
            table = table
                .entry(p.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                .as_table_mut()
                .ok_or_else(|| anyhow::anyhow!("--set {s}: `{p}` is not a section"))?;
        }
        table.insert(parts[parts.len() - 1].to_string(), parsed);
    }
    let merged = toml::to_string(&doc)?;
    let mut cfg: RunConfig = toml::from_str(&merged)
        .map_err(|e| anyhow::anyhow!("{} with --set: {}", path.display(), e.to_string().trim()))?;
    cfg.resolve(path.parent().unwrap_or(std::path::Path::new(".")));
    cfg.check()
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(cfg)
}

/// Runs `train` (stages 0–2).
pub fn train(a: RunArgs) -> anyhow::Result<()> {
    let cfg = load_with_overrides(&a.config, &a.sets)?;
    let rows = pipeline::train(&cfg)?;
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
