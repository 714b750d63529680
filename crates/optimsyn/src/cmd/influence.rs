//! `optimsyn influence score` and `optimsyn influence verify`.

use std::collections::HashSet;
use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use optimsyn_data_io::{ChatExample, ChatFormat, JsonlWriter, read_jsonl};
use optimsyn_influence::{
    InfluenceScorer, Precond, ProjectorType, ScoreConfig, SubtaskAgg, verify,
};
use optimsyn_pipeline::{DeviceName, Dtype};

/// Influence commands.
#[derive(Subcommand)]
pub enum InfluenceCommand {
    /// Score each candidate's influence on the validation loss: one JSONL row per candidate with
    /// `id`, `influence`, per-subtask scores and token counts.
    Score(ScoreArgs),
    /// Check the estimate on this setup: one real step per candidate against the first-order prediction.
    Verify(VerifyArgs),
    /// Join the outputs of `score --shard I/N` runs into the unsharded run's output.
    Merge(MergeArgs),
}

/// What both commands share.
#[derive(Args)]
pub struct Common {
    /// Target model folder (with its tokenizer).
    #[arg(long)]
    target: PathBuf,
    /// Warm-up checkpoint folder (adapter + optimizer.safetensors + training.json); repeat for several.
    #[arg(long = "adapter", required = true)]
    adapters: Vec<PathBuf>,
    /// Validation chat examples (JSONL; `subtask` groups them).
    #[arg(long)]
    val: PathBuf,
    /// Candidates (JSONL chat examples).
    #[arg(long)]
    input: PathBuf,
    /// Data format; default: the adapters' training.json (required when they have none).
    #[arg(long)]
    format: Option<ChatFormat>,
    /// Projection dimension; 0 means exact (no projection).
    #[arg(long, default_value_t = 8192)]
    proj_dim: usize,
    /// `dense` (Rademacher) or `sjlt` (sparse JL, much faster for large adapters).
    #[arg(long, default_value = "dense")]
    projector: ProjectorType,
    /// Projection seed.
    #[arg(long, default_value_t = 0)]
    proj_seed: u64,
    /// `released` (m'/sqrt(v'+eps), the reference code) or `bias-corrected` (the LESS paper).
    #[arg(long, default_value = "released")]
    precond: String,
    /// Truncate examples to this many tokens.
    #[arg(long)]
    max_len: Option<usize>,
    /// Most padded tokens per backward pass.
    #[arg(long, default_value_t = 4096)]
    max_batch_tokens: usize,
    /// Where validation features are cached (default: beside each adapter).
    #[arg(long)]
    features_dir: Option<PathBuf>,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: DeviceName,
    /// The target's dtype for the gradients: `f32`, or `bf16` / `f16` as LESS takes them (the
    /// preconditioning, projection and cosines run in f32 either way).
    #[arg(long, default_value = "f32")]
    dtype: Dtype,
}

/// Arguments of `influence score`.
#[derive(Args)]
pub struct ScoreArgs {
    #[command(flatten)]
    common: Common,
    /// `max` over validation subtasks (the reference code) or their `mean`.
    #[arg(long, default_value = "max")]
    subtask_agg: SubtaskAgg,
    /// Candidates per scoring call (a dense projection is generated once per call).
    #[arg(long, default_value_t = 64)]
    chunk: usize,
    /// Output JSONL (default: standard output). An existing file is resumed: ids already in it are skipped.
    #[arg(long)]
    output: Option<PathBuf>,
    /// Score only shard I of N (`I/N`, 0-based): a contiguous run of whole chunks, so each row is
    /// computed exactly as in an unsharded run; `influence merge` joins the shards' outputs.
    #[arg(long, value_name = "I/N")]
    shard: Option<String>,
}

/// Arguments of `influence merge`.
#[derive(Args)]
pub struct MergeArgs {
    /// The candidates file the shards scored (gives the order and the set of ids).
    #[arg(long)]
    input: PathBuf,
    /// The shards' outputs, in any order.
    #[arg(long, num_args = 1.., required = true)]
    shards: Vec<PathBuf>,
    /// Output JSONL (default: standard output).
    #[arg(long)]
    output: Option<PathBuf>,
}

/// Arguments of `influence verify`.
#[derive(Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    common: Common,
    /// Step size η of the real step (default: chosen so the median predicted change is 1e-5 of
    /// the validation loss).
    #[arg(long)]
    lr: Option<f64>,
    /// Candidates to check (the first N).
    #[arg(long, default_value_t = 16)]
    n: usize,
}

/// Runs an `influence` subcommand.
pub fn run(cmd: InfluenceCommand) -> anyhow::Result<()> {
    match cmd {
        InfluenceCommand::Score(a) => score(a),
        InfluenceCommand::Verify(a) => verify_cmd(a),
        InfluenceCommand::Merge(a) => merge(a),
    }
}

fn scorer(c: &Common, agg: SubtaskAgg) -> anyhow::Result<(InfluenceScorer, Vec<ChatExample>)> {
    let precond = match c.precond.as_str() {
        "released" => Precond::Released,
        "bias-corrected" => Precond::BiasCorrected,
        o => anyhow::bail!("--precond: `{o}` is not released or bias-corrected"),
    };
    let cfg = ScoreConfig {
        projector: c.projector.with_dim(c.proj_dim, c.proj_seed),
        precond,
        subtask_agg: agg,
        format: c.format,
        max_len: c.max_len,
        max_batch_tokens: c.max_batch_tokens,
        features_dir: c.features_dir.clone(),
        ..Default::default()
    };
    let val: Vec<ChatExample> = read_jsonl(&c.val)?;
    let opts = super::load_options(c.device, c.dtype)?;
    let s = InfluenceScorer::new(&c.target, &c.adapters, &val, cfg, opts)?;
    Ok((s, val))
}

/// `I/N` with `I < N`.
fn parse_shard(spec: &str) -> anyhow::Result<(usize, usize)> {
    let parsed = spec
        .split_once('/')
        .and_then(|(i, n)| Some((i.trim().parse().ok()?, n.trim().parse().ok()?)));
    match parsed {
        Some((i, n)) if n > 0 && i < n => Ok((i, n)),
        _ => anyhow::bail!("--shard {spec}: expected I/N with 0 ≤ I < N, e.g. 0/4"),
    }
}

/// The candidate rows of shard `i` of `n`: whole chunks of `chunk` rows, as evenly as whole
/// chunks allow, so every row is scored in the same chunk as an unsharded run scores it.
fn shard_rows(rows: usize, chunk: usize, i: usize, n: usize) -> std::ops::Range<usize> {
    let chunks = rows.div_ceil(chunk);
    let (lo, hi) = (i * chunks / n, (i + 1) * chunks / n);
    (lo * chunk).min(rows)..(hi * chunk).min(rows)
}

/// `influence merge`: the shards' rows in the candidates' order; every candidate exactly once.
fn merge(a: MergeArgs) -> anyhow::Result<()> {
    let cands: Vec<ChatExample> = read_jsonl(&a.input)?;
    let ids: Vec<String> = cands
        .iter()
        .enumerate()
        .map(|(i, c)| c.id.clone().unwrap_or_else(|| i.to_string()))
        .collect();
    let mut rows: std::collections::HashMap<String, (serde_json::Value, usize)> =
        std::collections::HashMap::new();
    for (k, path) in a.shards.iter().enumerate() {
        let mut reader = optimsyn_data_io::JsonlReader::<serde_json::Value>::open(path)?;
        while let Some(row) = reader.next() {
            let row = row?;
            let id = row
                .get("id")
                .and_then(|v| v.as_str())
                .with_context(|| format!("{}:{}: no `id`", path.display(), reader.line()))?
                .to_string();
            if let Some((_, other)) = rows.get(&id) {
                anyhow::bail!(
                    "{}:{}: candidate {id} is also in {}",
                    path.display(),
                    reader.line(),
                    a.shards[*other].display()
                );
            }
            rows.insert(id, (row, k));
        }
    }
    let mut out = super::output(a.output.as_deref())?;
    for (line, id) in ids.iter().enumerate() {
        let (row, _) = rows.remove(id).with_context(|| {
            format!(
                "candidate {id} ({}:{}) is in no shard: a shard is missing or unfinished",
                a.input.display(),
                line + 1
            )
        })?;
        super::write_row(&mut out, &row)?;
    }
    if let Some(id) = rows.keys().next() {
        anyhow::bail!(
            "{} row(s) of the shards are not candidates of {} (e.g. {id}): shards of another input?",
            rows.len(),
            a.input.display()
        );
    }
    out.flush()?;
    Ok(())
}

/// Where scored rows go.
type Sink = dyn FnMut(&optimsyn_influence::Score) -> anyhow::Result<()>;

fn score(a: ScoreArgs) -> anyhow::Result<()> {
    anyhow::ensure!(a.chunk > 0, "--chunk must be at least 1");
    let mut cands: Vec<ChatExample> = read_jsonl(&a.common.input)?;
    for (i, c) in cands.iter_mut().enumerate() {
        c.id.get_or_insert_with(|| i.to_string());
    }
    if let Some(spec) = &a.shard {
        let (i, n) = parse_shard(spec)?;
        let range = shard_rows(cands.len(), a.chunk, i, n);
        tracing::info!(
            shard = spec.as_str(),
            rows = format!("{}..{}", range.start, range.end),
            "scoring one shard"
        );
        cands = cands.drain(range).collect();
    }
    let (mut scorer, _) = scorer(&a.common, a.subtask_agg)?;
    let mut sink: Box<Sink> = match &a.output {
        Some(p) => {
            let done: HashSet<String> = if p.exists() {
                read_jsonl::<serde_json::Value>(p)
                    .with_context(|| format!("resuming {}", p.display()))?
                    .iter()
                    .filter_map(|v| v.get("id").and_then(|i| i.as_str()).map(String::from))
                    .collect()
            } else {
                HashSet::new()
            };
            if !done.is_empty() {
                tracing::info!(
                    done = done.len(),
                    "resuming: skipping candidates already scored"
                );
                cands.retain(|c| c.id.as_ref().is_none_or(|id| !done.contains(id)));
            }
            let mut w = JsonlWriter::append(p)?;
            Box::new(move |s| Ok(w.write(s)?))
        }
        None => {
            let mut out = super::output(None)?;
            Box::new(move |s| {
                super::write_row(&mut out, &serde_json::to_value(s)?)?;
                Ok(out.flush()?)
            })
        }
    };
    let bar = ProgressBar::new(cands.len() as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} influence [{bar:30}] {pos}/{len} ({per_sec}, eta {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut missing = 0;
    let mut first_check = None;
    for chunk in cands.chunks(a.chunk) {
        let report = scorer.score_report(chunk)?;
        first_check = first_check.or(report.discrimination);
        for s in report.scores {
            if s.influence.is_none() {
                missing += 1;
            }
            sink(&s)?;
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    // The first chunk's check stands for the run: it depends on the checkpoint, not the chunk.
    match first_check {
        Some(d) if d.shared_dominates() => tracing::warn!(
            "influence mostly measures what every candidate shares ({}): the scores rank candidates \
             by little more than noise; warm the target up longer (docs/GUIDE.md, \"Reading the \
             diagnostics\")",
            d.summary()
        ),
        Some(d) => tracing::info!("influence discriminates: {}", d.summary()),
        None => {}
    }
    if missing > 0 {
        tracing::warn!(
            missing,
            "candidates without loss tokens were not scored (influence null, see reason)"
        );
    }
    Ok(())
}

fn verify_cmd(a: VerifyArgs) -> anyhow::Result<()> {
    let cands: Vec<ChatExample> = read_jsonl(&a.common.input)?;
    let (mut scorer, val) = scorer(&a.common, SubtaskAgg::Max)?;
    let n = a.n.min(cands.len());
    let report = verify(&mut scorer, &val, &cands[..n], a.lr)?;
    println!("{}", serde_json::to_string(&report)?);
    if a.common.dtype != Dtype::F32 {
        eprintln!(
            "influence verify: a {} target keeps ~3 significant digits of its weights and losses, so \
             the step is {}x larger than in f32 and the check is coarse; verify in f32 (bf16 \
             gradients rank candidates as f32 ones do: Spearman 0.9996 on the demo target)",
            a.common.dtype,
            optimsyn_influence::AUTO_RELATIVE_CHANGE_HALF
                / optimsyn_influence::AUTO_RELATIVE_CHANGE
        );
    }
    eprintln!(
        "influence verify: Pearson(predicted, actual) = {:.4} over {} candidates at lr {:.3e}; median actual/predicted {:.3}",
        report.pearson,
        report.checks.len(),
        report.lr,
        report.linearity
    );
    if !(0.5..=2.0).contains(&report.linearity) {
        eprintln!(
            "influence verify: actual changes are {:.2}x the predicted ones: the step is outside the first-order regime (too large, or too small for the loss's float precision); try another --lr",
            report.linearity
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_the_rows_once_in_whole_chunks() {
        for (rows, chunk, n) in [(0, 4, 3), (10, 4, 3), (130, 64, 4), (5, 1, 8), (7, 64, 2)] {
            let mut next = 0;
            for i in 0..n {
                let r = shard_rows(rows, chunk, i, n);
                assert_eq!(r.start, next, "rows {rows} chunk {chunk} shard {i}/{n}");
                assert!(r.start.is_multiple_of(chunk) || r.start == rows);
                next = r.end;
            }
            assert_eq!(next, rows);
        }
        assert_eq!(parse_shard("1/4").unwrap(), (1, 4));
        for bad in ["4/4", "1", "a/b", "0/0", "-1/2"] {
            assert!(parse_shard(bad).is_err(), "{bad}");
        }
    }
}
