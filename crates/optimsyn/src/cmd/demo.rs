//! `optimsyn demo`: the whole method on the bundled corpus and tiny models (`demo/`), through the
//! same code paths as a real run: warm-up, GRPO with influence rewards, synthesis with the
//! trained and the untrained policy, SFT of the target on each, and a table of held-out
//! validation losses, for several seeds and both subtask aggregations. Beside them, reference
//! datasets written straight from the demo's facts, the policy's exact distribution over fact
//! kinds before and after training, and the influence diagnostics of every run.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use optimsyn_data_io::{ChatExample, read_jsonl};
use optimsyn_influence::SubtaskAgg;
use optimsyn_rl_grpo::Policy as _;

use super::demo_world::{self, Catalogue};
use optimsyn_pipeline::{self as pipeline, RewardRow, RunConfig, SeedPrompt, WarmupDiagnostics};

/// Arguments of `demo`.
#[derive(Args)]
pub struct DemoArgs {
    /// Output folder (resumable: rerun to continue).
    #[arg(long, default_value = "optimsyn-demo")]
    out: PathBuf,
    /// The demo's assets (corpus, models, demo.toml).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/demo"))]
    assets: PathBuf,
    /// Seeds to run (0, 1, …).
    #[arg(long, default_value_t = 3)]
    seeds: u64,
    /// Subtask aggregations to run, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "max,mean")]
    aggs: Vec<SubtaskAgg>,
    /// Override demo.toml keys, e.g. `--set warmup.epochs=2` (TOML values).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
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

/// Kind distribution per domain.
type KindDist = BTreeMap<String, BTreeMap<String, f64>>;

/// One (seed, aggregation) run.
struct RunResult {
    seed: u64,
    agg: String,
    rows: Vec<RewardRow>,
    warm: WarmupDiagnostics,
    kinds_before: Option<KindDist>,
    kinds_after: Option<KindDist>,
}

/// Held-out losses per subtask, by (aggregation or "reference", arm), one map per seed.
type Table = BTreeMap<(String, String), Vec<BTreeMap<String, f64>>>;

/// Runs the demo and prints its summary (also written to `OUT/report.md`).
pub fn run(a: DemoArgs) -> anyhow::Result<()> {
    let config = a.assets.join("demo.toml");
    anyhow::ensure!(
        config.exists(),
        "{} is missing: the demo needs its bundled assets (--assets)",
        config.display()
    );
    let base = super::run::load_with_overrides(&config, &a.sets)?;
    let heldout: Vec<ChatExample> = read_jsonl(
        base.data
            .heldout
            .as_ref()
            .context("demo.toml needs data.heldout")?,
    )?;
    let val: Vec<ChatExample> = read_jsonl(&base.data.val)?;
    // Assets without a kind catalogue (a user's own corpus) still run; the kind sections are left out.
    let cat = demo_world::catalogue(&a.assets).ok();
    let seeds: Vec<u64> = if a.quick {
        vec![0]
    } else {
        (0..a.seeds).collect()
    };
    let aggs = if a.quick {
        vec![SubtaskAgg::Max]
    } else {
        a.aggs.clone()
    };
    anyhow::ensure!(!aggs.is_empty() && !seeds.is_empty(), "nothing to run");
    let mut table = Table::new();
    let mut runs = Vec::new();
    for &seed in &seeds {
        let mut budget = None;
        for &agg in &aggs {
            let mut cfg = base.clone();
            cfg.seed = seed;
            cfg.influence.subtask_agg = agg;
            cfg.out = a.out.join(format!("seed-{seed}")).join(agg_name(agg));
            if a.quick {
                cfg.steps = cfg.steps.min(4);
            }
            let (r, n) = one_run(&cfg, &heldout, &val, cat.as_ref(), &mut table)?;
            budget.get_or_insert(n);
            runs.push(r);
        }
        if let (Some(cat), Some(n)) = (&cat, budget) {
            let mut cfg = base.clone();
            cfg.seed = seed;
            cfg.out = a.out.join(format!("seed-{seed}"));
            reference_arms(&cfg, &a.assets, cat, &val, &heldout, n, &mut table)?;
        }
    }
    let asked = cat.as_ref().map(|c| demo_world::asked_kinds(c, &val));
    let md = report(&table, &runs, asked.as_ref(), seeds.len());
    std::fs::create_dir_all(&a.out)?;
    let report_path = a.out.join("report.md");
    std::fs::write(&report_path, &md)
        .with_context(|| format!("cannot write {}", report_path.display()))?;
    influence_plot(&a.out.join("influence.svg"), &runs)?;
    println!("{md}");
    println!(
        "report: {}; raw influence per step: {}; per-run plots and reports: {}/seed-*/*/",
        report_path.display(),
        a.out.join("influence.svg").display(),
        a.out.display()
    );
    Ok(())
}

fn agg_name(agg: SubtaskAgg) -> String {
    format!("{agg:?}").to_lowercase()
}

/// Trains, synthesizes with both policies, fine-tunes on each dataset and evaluates; returns the
/// run and the per-arm sample budget.
fn one_run(
    cfg: &RunConfig,
    heldout: &[ChatExample],
    val: &[ChatExample],
    cat: Option<&Catalogue>,
    table: &mut Table,
) -> anyhow::Result<(RunResult, usize)> {
    let agg = agg_name(cfg.influence.subtask_agg);
    eprintln!(
        "demo: seed {}, subtask aggregation {agg}: training (GRPO, {} steps)",
        cfg.seed, cfg.steps
    );
    let rows = super::run::train_and_plot(cfg)?;
    let seeds_p = pipeline::stage0(cfg)?;
    let m = pipeline::load_models(cfg)?;
    let rl = pipeline::stage3(cfg, &m, &seeds_p, true)?;
    let un = pipeline::stage3(cfg, &m, &seeds_p, false)?;
    // The same budget for both arms.
    let n = rl.len().min(un.len());
    eprintln!(
        "demo: seed {} {agg}: {} RL-rubric and {} untrained-rubric samples, using {n} each",
        cfg.seed,
        rl.len(),
        un.len()
    );
    for (arm, data) in [
        ("rl", Some(&rl[..n])),
        ("untrained", Some(&un[..n])),
        ("none", None),
    ] {
        let dir = cfg.out.join(format!("sft-{arm}"));
        let r = sft_and_eval(cfg, data.filter(|d| !d.is_empty()), heldout, val, &dir)?;
        table.entry((agg.clone(), arm.into())).or_default().push(r);
    }
    let (kinds_before, kinds_after) = match cat {
        Some(cat) => {
            let (b, a) = kinds_before_after(cfg, &m, &seeds_p, cat)?;
            (Some(b), Some(a))
        }
        None => (None, None),
    };
    let warm = pipeline::read_warmup_diagnostics(cfg)?;
    let result = RunResult {
        seed: cfg.seed,
        agg,
        rows,
        warm,
        kinds_before,
        kinds_after,
    };
    Ok((result, n))
}

/// The untrained and the trained policy's kind distributions.
fn kinds_before_after(
    cfg: &RunConfig,
    m: &pipeline::Models,
    seeds: &[SeedPrompt],
    cat: &Catalogue,
) -> anyhow::Result<(KindDist, KindDist)> {
    let mut policy = pipeline::load_policy(cfg)?;
    let before = demo_world::kind_distribution(&policy, m, cfg, seeds, cat)?;
    let rl = cfg.out.join("rl");
    let ckpt = optimsyn_rl_grpo::latest_checkpoint(&rl)?
        .ok_or_else(|| anyhow::anyhow!("no RL checkpoint in {}", rl.display()))?;
    policy.load(&ckpt.join(optimsyn_rl_grpo::checkpoint::POLICY_DIR))?;
    let after = demo_world::kind_distribution(&policy, m, cfg, seeds, cat)?;
    Ok((before, after))
}

/// SFT on datasets written from the facts: the validation set's kinds only, every kind alike,
/// and only the kinds validation does not ask. `n` samples each, as the RL arms get.
fn reference_arms(
    cfg: &RunConfig,
    assets: &Path,
    cat: &Catalogue,
    val: &[ChatExample],
    heldout: &[ChatExample],
    n: usize,
    table: &mut Table,
) -> anyhow::Result<()> {
    let asked = demo_world::asked_kinds(cat, val);
    let seeds_p = pipeline::stage0(cfg)?;
    let all =
        |d: &str| -> Vec<String> { cat.get(d).map(demo_world::kind_names).unwrap_or_default() };
    let is_asked = |d: &str, k: &str| asked.get(d).is_some_and(|s| s.contains(k));
    type Kinds<'a> = Box<dyn Fn(&str) -> Vec<String> + 'a>;
    let arms: [(&str, Kinds); 3] = [
        (
            "validation kinds",
            Box::new(|d: &str| all(d).into_iter().filter(|k| is_asked(d, k)).collect()),
        ),
        ("uniform kinds", Box::new(all)),
        (
            "other kinds",
            Box::new(|d: &str| all(d).into_iter().filter(|k| !is_asked(d, k)).collect()),
        ),
    ];
    for (arm, kinds) in arms {
        let data = demo_world::reference_dataset(
            assets,
            &seeds_p,
            cfg.synthesize.rubrics_per_seed,
            n,
            kinds,
        )?;
        let dir = cfg
            .out
            .join("reference")
            .join(format!("sft-{}", arm.replace(' ', "-")));
        let data = Some(&data[..]).filter(|d| !d.is_empty());
        let r = sft_and_eval(cfg, data, heldout, val, &dir)?;
        table
            .entry(("reference".into(), arm.into()))
            .or_default()
            .push(r);
    }
    Ok(())
}

/// The column of the validation set's overall loss (what the method itself may look at).
const VAL_COLUMN: &str = "validation set";

/// Held-out losses per subtask and `all`, plus the validation set's overall loss.
fn sft_and_eval(
    cfg: &RunConfig,
    data: Option<&[ChatExample]>,
    heldout: &[ChatExample],
    val: &[ChatExample],
    dir: &Path,
) -> anyhow::Result<BTreeMap<String, f64>> {
    let mut r = pipeline::finetune_and_eval(cfg, data, &[heldout, val], dir)?;
    let v = r
        .pop()
        .and_then(|v| v.get("all").copied())
        .unwrap_or(f64::NAN);
    let mut out = r.pop().unwrap_or_default();
    out.insert(VAL_COLUMN.into(), v);
    Ok(out)
}

fn report(
    table: &Table,
    runs: &[RunResult],
    asked: Option<&BTreeMap<String, std::collections::BTreeSet<String>>>,
    n_seeds: usize,
) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# optimsyn demo\n\nHeld-out loss of the target after SFT on each dataset (lower is \
         better), mean ± sd over {n_seeds} seed(s): per held-out subtask, `all` held-out rows, and \
         the validation set's own loss (the only one the method and its settings may look at). Reference datasets are written straight from \
         the demo's facts (no policy, no generator), as many samples as the RL arm.\n"
    );
    loss_table(&mut md, table);
    verdicts(&mut md, table, runs, asked);
    md.push_str("\n## Raw influence of valid rollouts per GRPO step\n\n");
    for r in runs {
        let ifs: Vec<String> = r
            .rows
            .iter()
            .map(|x| x.if_valid_mean.map_or("–".into(), |v| format!("{v:.3}")))
            .collect();
        let _ = writeln!(md, "- seed {} {}: {}", r.seed, r.agg, ifs.join(" "));
    }
    md.push_str("\n## Diagnostics\n\n| seed | agg | val loss before → after warm-up | after warm-up | steps where influence is mostly shared |\n|---|---|---|---|---|\n");
    for r in runs {
        let shared = r
            .rows
            .iter()
            .filter(|x| x.discrimination.is_some_and(|d| d.shared_dominates()))
            .count();
        let _ = writeln!(
            md,
            "| {} | {} | {:.3} → {:.3} | {} | {shared} of {} |",
            r.seed,
            r.agg,
            r.warm.val_loss_before,
            r.warm.val_loss_after,
            r.warm.discrimination.map_or("–".into(), |d| d.summary()),
            r.rows.len()
        );
    }
    if runs.iter().any(|r| r.kinds_after.is_some()) {
        md.push_str("\n## What the policy asks for\n\nThe policy's exact distribution over fact kinds per domain (log-prob scoring of each kind's rubric, averaged over the training documents), before → after GRPO.");
        if let Some(asked) = asked {
            let list: Vec<String> = asked
                .iter()
                .map(|(d, ks)| {
                    format!("{d}: {}", ks.iter().cloned().collect::<Vec<_>>().join(", "))
                })
                .collect();
            let _ = write!(md, " Validation asks {}.", list.join("; "));
        }
        md.push_str("\n\n");
        for r in runs {
            let (Some(b), Some(a)) = (&r.kinds_before, &r.kinds_after) else {
                continue;
            };
            for (domain, after) in a {
                let cells: Vec<String> = after
                    .iter()
                    .map(|(k, p)| {
                        let p0 = b
                            .get(domain)
                            .and_then(|d| d.get(k))
                            .copied()
                            .unwrap_or(f64::NAN);
                        let mark = if asked
                            .is_some_and(|s| s.get(domain).is_some_and(|s| s.contains(k)))
                        {
                            "*"
                        } else {
                            ""
                        };
                        format!("{k}{mark} {p0:.2} → {p:.2}")
                    })
                    .collect();
                let _ = writeln!(
                    md,
                    "- seed {} {} {domain}: {}",
                    r.seed,
                    r.agg,
                    cells.join(", ")
                );
            }
        }
        md.push_str("\n(* = a kind the validation set asks about.)\n");
    }
    md
}

fn loss_table(md: &mut String, table: &Table) {
    let subtasks: Vec<String> = table
        .values()
        .next()
        .and_then(|v| v.first())
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    let _ = writeln!(md, "| aggregation | data | {} |", subtasks.join(" | "));
    let _ = writeln!(md, "|---|---|{}", "---|".repeat(subtasks.len()));
    for ((agg, arm), runs) in table {
        let cells: Vec<String> = subtasks
            .iter()
            .map(|s| {
                let xs: Vec<f64> = runs.iter().filter_map(|r| r.get(s).copied()).collect();
                let (m, sd) = mean_sd(&xs);
                format!("{m:.3} ± {sd:.3}")
            })
            .collect();
        let label = match arm.as_str() {
            "rl" => "RL-rubric data",
            "untrained" => "untrained-rubric data",
            "none" => "no SFT",
            other => other,
        };
        let _ = writeln!(md, "| {agg} | {label} | {} |", cells.join(" | "));
    }
}

/// The demo's claims, checked on this run's numbers.
fn verdicts(
    md: &mut String,
    table: &Table,
    runs: &[RunResult],
    asked: Option<&BTreeMap<String, std::collections::BTreeSet<String>>>,
) {
    md.push_str("\n## Checks\n\n");
    let all = |agg: &str, arm: &str| -> Vec<f64> {
        table
            .get(&(agg.to_string(), arm.to_string()))
            .map(|v| v.iter().filter_map(|m| m.get("all").copied()).collect())
            .unwrap_or_default()
    };
    let aggs: std::collections::BTreeSet<&str> = runs.iter().map(|r| r.agg.as_str()).collect();
    for agg in aggs {
        let (rl, rl_sd) = mean_sd(&all(agg, "rl"));
        let (un, _) = mean_sd(&all(agg, "untrained"));
        let _ = writeln!(
            md,
            "- {agg}: RL-rubric {rl:.3} ± {rl_sd:.3} vs untrained {un:.3}: {}",
            if rl + rl_sd < un {
                "RL better (mean + sd below the untrained mean)"
            } else if rl < un {
                "RL lower on average, within the spread"
            } else {
                "RL not better"
            }
        );
    }
    for r in runs {
        let first: Vec<f64> = r
            .rows
            .iter()
            .take(3)
            .filter_map(|x| x.if_valid_mean)
            .collect();
        let last: Vec<f64> = r
            .rows
            .iter()
            .rev()
            .take(3)
            .filter_map(|x| x.if_valid_mean)
            .collect();
        let (f, l) = (mean_sd(&first).0, mean_sd(&last).0);
        let mut line = format!(
            "- seed {} {}: raw influence (mean of the first 3 → last 3 steps) {f:.3} → {l:.3} ({})",
            r.seed,
            r.agg,
            if l > f { "rises" } else { "does not rise" }
        );
        if let (Some(after), Some(asked)) = (&r.kinds_after, asked) {
            let low: Vec<String> = asked
                .iter()
                .flat_map(|(d, ks)| ks.iter().map(move |k| (d, k)))
                .filter_map(|(d, k)| {
                    let p = after.get(d).and_then(|x| x.get(k)).copied().unwrap_or(0.0);
                    (p < 0.15).then(|| format!("{d} {k} {p:.2}"))
                })
                .collect();
            if low.is_empty() {
                line.push_str("; every validation kind keeps ≥ 15 % of its domain");
            } else {
                let _ = write!(line, "; below 15 %: {}", low.join(", "));
            }
        }
        if let Some(t) = pipeline::subtask_trend(&r.rows).filter(|t| !t.served_less.is_empty()) {
            let _ = write!(line, "; subtasks served less: {}", t.served_less.join(", "));
        }
        md.push_str(&line);
        md.push('\n');
    }
}

/// Raw influence of valid rollouts per GRPO step, one line per seed, one panel per aggregation
/// (their scales differ).
fn influence_plot(path: &Path, runs: &[RunResult]) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let aggs: Vec<String> = runs
        .iter()
        .map(|r| r.agg.clone())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    if aggs.is_empty() {
        return Ok(());
    }
    let e = |e: &dyn std::fmt::Display| anyhow::anyhow!("plot {}: {e}", path.display());
    let root = SVGBackend::new(path, (480 * aggs.len() as u32, 380)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let colors = [BLUE, RED, GREEN, BLACK, MAGENTA, CYAN];
    for (panel, agg) in root.split_evenly((1, aggs.len())).iter().zip(&aggs) {
        let mine: Vec<&RunResult> = runs.iter().filter(|r| &r.agg == agg).collect();
        let pts: Vec<(u64, f64)> = mine
            .iter()
            .flat_map(|r| {
                r.rows
                    .iter()
                    .filter_map(|x| x.if_valid_mean.map(|v| (x.step, v)))
            })
            .collect();
        let steps = pts.iter().map(|p| p.0).max().unwrap_or(1).max(2);
        let lo = pts.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
        let hi = pts.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
        let (lo, hi) = if lo.is_finite() && hi > lo {
            (lo, hi)
        } else {
            (0.0, 1.0)
        };
        let pad = (hi - lo) * 0.1;
        let mut chart = ChartBuilder::on(panel)
            .caption(format!("{agg} aggregation"), ("sans-serif", 16))
            .margin(10)
            .margin_right(56)
            .x_label_area_size(40)
            .y_label_area_size(64)
            .build_cartesian_2d(1u64..steps, (lo - pad)..(hi + pad))
            .map_err(|x| e(&x))?;
        chart
            .configure_mesh()
            .x_desc("GRPO step")
            .y_desc("raw influence (valid rollouts)")
            .light_line_style(WHITE)
            .draw()
            .map_err(|x| e(&x))?;
        for (i, r) in mine.iter().enumerate() {
            let color = colors[i % colors.len()];
            let line: Vec<(u64, f64)> = r
                .rows
                .iter()
                .filter_map(|x| x.if_valid_mean.map(|v| (x.step, v)))
                .collect();
            chart
                .draw_series(LineSeries::new(line.clone(), color.stroke_width(2)))
                .map_err(|x| e(&x))?;
            // The seed's label at its last point, instead of a legend box over the data.
            if let Some(&(x, y)) = line.last() {
                chart
                    .draw_series(std::iter::once(Text::new(
                        format!("seed {}", r.seed),
                        (x, y),
                        ("sans-serif", 12).into_font().color(&color),
                    )))
                    .map_err(|x| e(&x))?;
            }
        }
    }
    root.present().map_err(|x| e(&x))?;
    Ok(())
}
