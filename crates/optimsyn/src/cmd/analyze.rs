//! `optimsyn analyze`: is influence a good proxy on *your* setup? For several candidate datasets,
//! each dataset's mean influence on the validation set (at the run's warm-up checkpoints) against
//! the held-out loss of the target after SFT on it, with Pearson and Spearman correlations and a
//! scatter plot (the OptimSyn paper's Fig. 1a and its "is IF a good proxy" ablation).

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use optimsyn_data_io::{ChatExample, read_jsonl};
use serde::Serialize;

use optimsyn_pipeline as pipeline;

/// Arguments of `analyze`.
#[derive(Args)]
pub struct AnalyzeArgs {
    /// The run's TOML config: its warm-up (`OUT/warmup`, from `optimsyn train`), validation and
    /// held-out sets, and the SFT settings used for every dataset.
    #[arg(long)]
    config: PathBuf,
    /// Override config keys (TOML values), as for `train`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Candidate datasets (chat examples or synthetic samples; rows without an assistant turn are
    /// left out).
    #[arg(long, num_args = 1.., required = true)]
    datasets: Vec<PathBuf>,
    /// Output folder for `analyze.jsonl` and `analyze.svg` [OUT/analyze].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Drop exact and near duplicates (estimated Jaccard ≥ this) within each dataset first:
    /// repeated rows count twice in a mean influence but add little to SFT.
    #[arg(long, value_name = "THRESHOLD")]
    dedup: Option<f64>,
}

/// One dataset's point.
#[derive(Debug, Clone, Serialize)]
pub struct Point {
    /// The dataset file.
    pub dataset: String,
    /// Rows used.
    pub rows: usize,
    /// Duplicates left out (with `--dedup`).
    pub duplicates: usize,
    /// Mean influence of its rows on the validation set.
    pub mean_influence: f64,
    /// Held-out loss of the target after SFT on it.
    pub heldout_loss: f64,
}

/// Runs `analyze`.
pub fn run(a: AnalyzeArgs) -> anyhow::Result<()> {
    let cfg = super::run::load_with_overrides(&a.config, &a.sets)?;
    anyhow::ensure!(
        a.datasets.len() >= 3,
        "--datasets: give at least 3 datasets (a correlation of fewer says nothing)"
    );
    let heldout_path = cfg
        .data
        .heldout
        .clone()
        .context("key `data.heldout`: analyze needs a held-out set")?;
    let heldout: Vec<ChatExample> = read_jsonl(&heldout_path)?;
    let out = a.out.unwrap_or_else(|| cfg.out.join("analyze"));
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut scorer = pipeline::warmup_scorer(&cfg)?;
    let mut points = Vec::new();
    for (i, path) in a.datasets.iter().enumerate() {
        let (data, duplicates) = usable_rows(path, a.dedup)?;
        let scores = scorer.score(&data)?;
        let ifs: Vec<f64> = scores.iter().filter_map(|s| s.influence).collect();
        anyhow::ensure!(
            !ifs.is_empty(),
            "{}: no row could be scored",
            path.display()
        );
        let sft_dir = out.join(format!("sft-{i}"));
        let r = pipeline::finetune_and_eval(&cfg, Some(&data), &[&heldout], &sft_dir)?;
        let loss = r
            .first()
            .and_then(|m| m.get("all").copied())
            .context("held-out evaluation returned nothing")?;
        let p = Point {
            dataset: path.display().to_string(),
            rows: data.len(),
            duplicates,
            mean_influence: ifs.iter().sum::<f64>() / ifs.len() as f64,
            heldout_loss: loss,
        };
        eprintln!(
            "analyze: {} ({} rows, {} duplicates left out): mean influence {:.4}, held-out loss {:.4}",
            p.dataset, p.rows, p.duplicates, p.mean_influence, p.heldout_loss
        );
        points.push(p);
    }
    let x: Vec<f64> = points.iter().map(|p| p.mean_influence).collect();
    let y: Vec<f64> = points.iter().map(|p| p.heldout_loss).collect();
    let (r, rho) = (
        optimsyn_influence::pearson(&x, &y),
        optimsyn_influence::pearson(&ranks(&x), &ranks(&y)),
    );
    let mut text = String::new();
    for p in &points {
        text.push_str(&serde_json::to_string(p)?);
        text.push('\n');
    }
    optimsyn_data_io::write_atomic(out.join("analyze.jsonl"), text.as_bytes())?;
    scatter(&out.join("analyze.svg"), &points, r, rho)?;
    println!(
        "{}",
        serde_json::json!({"datasets": points.len(), "pearson": r, "spearman": rho,
            "note": "correlation of mean influence with held-out loss: a good proxy is strongly negative",
            "points": out.join("analyze.jsonl").display().to_string(),
            "plot": out.join("analyze.svg").display().to_string()})
    );
    Ok(())
}

/// The rows of `path` that carry an assistant turn, without duplicates when `dedup` is given;
/// also how many duplicates were left out.
fn usable_rows(path: &Path, dedup: Option<f64>) -> anyhow::Result<(Vec<ChatExample>, usize)> {
    let rows: Vec<ChatExample> = read_jsonl(path)?;
    let data: Vec<ChatExample> = rows
        .into_iter()
        .filter(|e| {
            e.messages
                .iter()
                .any(|m| m.role == optimsyn_data_io::Role::Assistant)
        })
        .collect();
    anyhow::ensure!(
        !data.is_empty(),
        "{}: no row with an assistant turn",
        path.display()
    );
    let Some(threshold) = dedup else {
        return Ok((data, 0));
    };
    let cfg = optimsyn_hygiene::DedupConfig {
        threshold,
        ..Default::default()
    };
    Ok(optimsyn_hygiene::dedup_examples(data, cfg)?)
}

/// Average ranks (ties share their mean rank), for Spearman's ρ.
fn ranks(xs: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..xs.len()).collect();
    order.sort_by(|&a, &b| xs[a].total_cmp(&xs[b]));
    let mut out = vec![0.0; xs.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && xs[order[j + 1]] == xs[order[i]] {
            j += 1;
        }
        let rank = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            out[k] = rank;
        }
        i = j + 1;
    }
    out
}

fn scatter(path: &Path, points: &[Point], r: f64, rho: f64) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let e = |e: &dyn std::fmt::Display| anyhow::anyhow!("plot {}: {e}", path.display());
    let span = |v: Vec<f64>| {
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let pad = ((hi - lo) * 0.1).max(1e-6);
        (lo - pad)..(hi + pad)
    };
    let xs = span(points.iter().map(|p| p.mean_influence).collect());
    let ys = span(points.iter().map(|p| p.heldout_loss).collect());
    let root = SVGBackend::new(path, (640, 460)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("Influence as a proxy: Pearson {r:.2}, Spearman {rho:.2}"),
            ("sans-serif", 16),
        )
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(xs, ys)
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .x_desc("dataset-mean influence on the validation set")
        .y_desc("held-out loss after SFT")
        .light_line_style(WHITE)
        .draw()
        .map_err(|x| e(&x))?;
    chart
        .draw_series(
            points
                .iter()
                .map(|p| Circle::new((p.mean_influence, p.heldout_loss), 4, BLUE.filled())),
        )
        .map_err(|x| e(&x))?;
    root.present().map_err(|x| e(&x))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::ranks;

    #[test]
    fn ranks_average_ties() {
        assert_eq!(ranks(&[0.3, 0.1, 0.3, 0.2]), vec![3.5, 1.0, 3.5, 2.0]);
        assert_eq!(ranks(&[]), Vec::<f64>::new());
    }
}
