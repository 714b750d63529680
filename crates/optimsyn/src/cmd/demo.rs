//! `optimsyn demo`: the whole method on the bundled corpus and tiny models (`demo/`), through the
//! same code paths as a real run: warm-up, GRPO with influence rewards, synthesis with the
//! trained and the untrained policy, SFT of the target on each, and a table of held-out
//! validation losses, for several seeds and both subtask aggregations.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use optimsyn_data_io::{ChatExample, read_jsonl};
use optimsyn_influence::SubtaskAgg;

use crate::pipeline::{self, RunConfig};

/// Arguments of `demo`.
#[derive(Args)]
pub struct DemoArgs {
    /// Output folder (resumable: rerun to continue).
    #[arg(long, default_value = "optimsyn-demo")]
    out: PathBuf,
    /// The demo's assets (corpus, models, demo.toml).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/demo"))]
    assets: PathBuf,
    /// Seeds to run.
    #[arg(long, default_value_t = 3)]
    seeds: u64,
    /// One seed, max aggregation only, fewer GRPO steps: a check in about two minutes.
    #[arg(long)]
    quick: bool,
}

fn mean_sd(xs: &[f64]) -> (f64, f64) {
    let n = xs.len().max(1) as f64;
    let m = xs.iter().sum::<f64>() / n;
    let v = if xs.len() > 1 {
        xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (m, v.sqrt())
}

/// Runs the demo and prints its summary table (also written to `OUT/report.md`).
pub fn run(a: DemoArgs) -> anyhow::Result<()> {
    let config = a.assets.join("demo.toml");
    anyhow::ensure!(
        config.exists(),
        "{} is missing: the demo needs its bundled assets (--assets)",
        config.display()
    );
    let base = RunConfig::load(&config)?;
    let heldout: Vec<ChatExample> = read_jsonl(
        base.data
            .heldout
            .as_ref()
            .context("demo.toml needs data.heldout")?,
    )?;
    let seeds: Vec<u64> = if a.quick {
        vec![0]
    } else {
        (0..a.seeds).collect()
    };
    let aggs: Vec<SubtaskAgg> = if a.quick {
        vec![SubtaskAgg::Max]
    } else {
        vec![SubtaskAgg::Max, SubtaskAgg::Mean]
    };
    // (agg, arm) → losses per seed; arm ∈ rl / untrained / none
    let mut table: BTreeMap<(String, &str), Vec<BTreeMap<String, f64>>> = BTreeMap::new();
    let mut if_curves: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for &seed in &seeds {
        for &agg in &aggs {
            let agg_name = format!("{agg:?}").to_lowercase();
            let mut cfg = base.clone();
            cfg.seed = seed;
            cfg.influence.subtask_agg = agg;
            cfg.out = a.out.join(format!("seed-{seed}")).join(&agg_name);
            if a.quick {
                cfg.steps = cfg.steps.min(4);
            }
            eprintln!(
                "demo: seed {seed}, subtask aggregation {agg_name}: training (GRPO, {} steps)",
                cfg.steps
            );
            let rows = pipeline::train(&cfg)?;
            let first = rows
                .first()
                .and_then(|r| r.if_valid_mean)
                .unwrap_or(f64::NAN);
            let last = rows
                .last()
                .and_then(|r| r.if_valid_mean)
                .unwrap_or(f64::NAN);
            if_curves
                .entry(agg_name.clone())
                .or_default()
                .push((first, last));
            let seeds_p = pipeline::stage0(&cfg)?;
            let m = pipeline::load_models(&cfg)?;
            let rl = pipeline::stage3(&cfg, &m, &seeds_p, true)?;
            let un = pipeline::stage3(&cfg, &m, &seeds_p, false)?;
            // The same budget for both arms.
            let n = rl.len().min(un.len());
            eprintln!(
                "demo: seed {seed} {agg_name}: {} RL-rubric and {} untrained-rubric samples, using {n} each",
                rl.len(),
                un.len()
            );
            for (arm, data) in [
                ("rl", Some(&rl[..n])),
                ("untrained", Some(&un[..n])),
                ("none", None),
            ] {
                let dir = cfg.out.join(format!("sft-{arm}"));
                let r = pipeline::finetune_and_eval(
                    &cfg,
                    data.filter(|d| !d.is_empty()),
                    &heldout,
                    &dir,
                )?;
                table.entry((agg_name.clone(), arm)).or_default().push(r);
            }
        }
    }
    let mut md = String::new();
    writeln!(
        md,
        "# optimsyn demo\n\nHeld-out validation loss of the target (lower is better), mean ± sd over {} seed(s).\n",
        seeds.len()
    )?;
    let subtasks: Vec<String> = table
        .values()
        .next()
        .and_then(|v| v.first())
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    writeln!(md, "| aggregation | data | {} |", subtasks.join(" | "))?;
    writeln!(md, "|---|---|{}", "---|".repeat(subtasks.len()))?;
    for ((agg, arm), runs) in &table {
        let cells: Vec<String> = subtasks
            .iter()
            .map(|s| {
                let xs: Vec<f64> = runs.iter().filter_map(|r| r.get(s).copied()).collect();
                let (m, sd) = mean_sd(&xs);
                format!("{m:.3} ± {sd:.3}")
            })
            .collect();
        let label = match *arm {
            "rl" => "RL-rubric data",
            "untrained" => "untrained-rubric data",
            _ => "no SFT",
        };
        writeln!(md, "| {agg} | {label} | {} |", cells.join(" | "))?;
    }
    writeln!(
        md,
        "\nRaw influence of valid rollouts, first → last GRPO step:\n"
    )?;
    for (agg, v) in &if_curves {
        let parts: Vec<String> = v.iter().map(|(f, l)| format!("{f:.4} → {l:.4}")).collect();
        writeln!(md, "- {agg}: {}", parts.join(", "))?;
    }
    std::fs::create_dir_all(&a.out)?;
    std::fs::write(a.out.join("report.md"), &md)
        .with_context(|| format!("cannot write {}", a.out.join("report.md").display()))?;
    println!("{md}");
    println!(
        "report: {}; per-run plots: {}/seed-*/*/rl.svg",
        a.out.join("report.md").display(),
        a.out.display()
    );
    Ok(())
}
