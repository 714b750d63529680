//! What a run reports: `OUT/report.md` (the warm-up, whether influence discriminated, every GRPO
//! step, what the rubrics ask for).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use optimsyn_data_io::{read_jsonl, write_atomic};
use optimsyn_rubric_policy::parse_rubric;
use optimsyn_synth::SynthRecord;

use crate::config::RunConfig;
use crate::error::Result;
use crate::reward::RewardRow;
use crate::stage1::{WarmupDiagnostics, read_warmup_diagnostics};

/// What the rubrics of one set of samples ask for: their "Prompt-related" texts.
#[derive(Debug, Clone, PartialEq)]
pub struct RubricStats {
    /// Samples whose rubric parsed.
    pub parsed: usize,
    /// All samples.
    pub total: usize,
    /// Distinct "Prompt-related" texts.
    pub distinct: usize,
    /// Entropy (nats) of the "Prompt-related" texts' distribution.
    pub entropy: f64,
    /// The most frequent texts with their counts, most frequent first (ties by text).
    pub top: Vec<(String, usize)>,
}

impl RubricStats {
    /// The statistics of `records`' rubrics.
    pub fn of(records: &[SynthRecord]) -> RubricStats {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for r in records {
            if let Ok(rubric) = parse_rubric(&r.sample.provenance.rubric) {
                *counts.entry(rubric.prompt_related).or_default() += 1;
            }
        }
        let parsed: usize = counts.values().sum();
        let entropy = counts
            .values()
            .map(|&c| {
                let p = c as f64 / parsed as f64;
                -p * p.ln()
            })
            .sum();
        let mut top: Vec<(String, usize)> = counts.into_iter().collect();
        let distinct = top.len();
        top.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        top.truncate(5);
        RubricStats {
            parsed,
            total: records.len(),
            distinct,
            entropy,
            top,
        }
    }
}

fn rubric_section(before: &RubricStats, after: Option<&RubricStats>) -> String {
    use std::fmt::Write as _;
    let mut md = String::from(
        "\n## What the rubrics ask for\n\nThe \"Prompt-related\" part of each rubric, untrained (the \
         stage-1 pool) and at the last GRPO step.\n\n",
    );
    let mut one = |name: &str, s: &RubricStats| {
        let _ = writeln!(
            md,
            "- {name}: {} of {} rubrics parsed, {} distinct questions asked, entropy {:.2} nats; most frequent:",
            s.parsed, s.total, s.distinct, s.entropy
        );
        for (text, n) in &s.top {
            let _ = writeln!(md, "  - {n} × {text}");
        }
    };
    one("untrained", before);
    if let Some(a) = after {
        one("trained", a);
    }
    md
}

/// The run's `report.md`: the warm-up, whether influence discriminated, and the GRPO steps.
pub fn run_report(warm: &WarmupDiagnostics, rows: &[RewardRow], kl: &[(u64, f64)]) -> String {
    use std::fmt::Write as _;
    let mut md = String::from("# optimsyn run\n\n## Warm-up\n\n");
    let _ = writeln!(
        md,
        "{} examples, {} steps; validation loss of the target {:.3} → {:.3}.\n",
        warm.examples, warm.steps, warm.val_loss_before, warm.val_loss_after
    );
    let shared_steps = rows
        .iter()
        .filter(|r| r.discrimination.is_some_and(|d| d.shared_dominates()))
        .count();
    match &warm.discrimination {
        Some(d) => {
            let _ = writeln!(
                md,
                "Influence on {} pool samples after the warm-up: {}.\n",
                warm.probe_candidates,
                d.summary()
            );
        }
        None => md.push_str("Too few pool samples to check influence after the warm-up.\n\n"),
    }
    if warm.discrimination.is_some_and(|d| d.shared_dominates()) || 2 * shared_steps > rows.len() {
        let _ = writeln!(
            md,
            "**Warning: influence mostly measures what every candidate shares** (candidates differ by \
             less than {} of the mean cosine after the warm-up, or in {shared_steps} of {} GRPO \
             steps): the rewards rank candidates by little more than noise. Warm the target up longer (`warmup.epochs`) until its validation \
             loss has come down, then train again; docs/GUIDE.md, \"Reading the diagnostics\".\n",
            optimsyn_influence::SHARED_SPREAD_RATIO,
            rows.len()
        );
    }
    let overlapping = rows
        .iter()
        .filter(|r| r.contaminated.is_some_and(|c| c > 0.0))
        .count();
    if overlapping > 0 {
        let _ = writeln!(
            md,
            "**Rollouts overlap an evaluation set in {overlapping} of {} steps** (column `overlap`; \
             the samples files name the rows): the policy may be learning to ask for the validation \
             questions. `hygiene.penalize_rollouts = true` pays such rollouts the invalid reward.\n",
            rows.len()
        );
    }
    md.push_str("## GRPO steps\n\n| step | valid | overlap | IF mean | IF max | reward | top share | spread / mean | KL |\n|---|---|---|---|---|---|---|---|---|\n");
    let kl: HashMap<u64, f64> = kl.iter().copied().collect();
    let num =
        |x: Option<f64>, digits: usize| x.map_or("–".to_string(), |v| format!("{v:.digits$}"));
    for r in rows {
        let d = r.discrimination;
        let _ = writeln!(
            md,
            "| {} | {:.2} | {} | {} | {} | {:.3} | {} | {} | {} |",
            r.step,
            r.valid_rate,
            num(r.contaminated, 2),
            num(r.if_valid_mean, 4),
            num(r.if_valid_max, 4),
            r.reward_mean,
            num(d.and_then(|d| d.features).map(|f| f.top_share), 2),
            num(d.map(|d| d.spread_ratio), 2),
            num(kl.get(&r.step).copied(), 5),
        );
    }
    md.push_str(&subtask_section(rows));
    md
}

/// Each validation subtask's mean raw influence over a run's first and last steps.
#[derive(Debug, Clone, PartialEq)]
pub struct SubtaskTrend {
    /// Steps averaged at each end (up to 3).
    pub window: usize,
    /// `(subtask, first steps, last steps)`.
    pub subtasks: Vec<(String, f64, f64)>,
    /// The subtasks whose influence fell by more than 5 % of the subtasks' typical score at the
    /// start: the policy's data serves them less than it did.
    pub served_less: Vec<String>,
}

/// The [`SubtaskTrend`] of a run's reward rows; `None` with fewer than two steps or subtasks, or
/// rows from before `subtask_if` was recorded.
pub fn subtask_trend(rows: &[RewardRow]) -> Option<SubtaskTrend> {
    let rows: Vec<&RewardRow> = rows.iter().filter(|r| !r.subtask_if.is_empty()).collect();
    let names: Vec<&String> = rows.first()?.subtask_if.keys().collect();
    if rows.len() < 2 || names.len() < 2 {
        return None;
    }
    let k = (rows.len() / 2).min(3);
    let mean_of = |window: &[&RewardRow], name: &str| {
        let xs: Vec<f64> = window
            .iter()
            .filter_map(|r| r.subtask_if.get(name).copied())
            .collect();
        xs.iter().sum::<f64>() / xs.len().max(1) as f64
    };
    let (first, last) = (&rows[..k], &rows[rows.len() - k..]);
    let subtasks: Vec<(String, f64, f64)> = names
        .iter()
        .map(|n| ((*n).clone(), mean_of(first, n), mean_of(last, n)))
        .collect();
    // A fall counts when it exceeds 5 % of the subtasks' typical score at the start: smaller
    // moves are within a step's sampling noise on the runs measured (docs/GUIDE.md).
    let scale = subtasks.iter().map(|p| p.1.abs()).sum::<f64>() / subtasks.len() as f64;
    let served_less = subtasks
        .iter()
        .filter(|(_, a, b)| b - a < -0.05 * scale)
        .map(|(n, _, _)| n.clone())
        .collect();
    Some(SubtaskTrend {
        window: k,
        subtasks,
        served_less,
    })
}

/// Which validation subtasks the policy's data serves, first steps against last (see
/// [`subtask_trend`]).
fn subtask_section(rows: &[RewardRow]) -> String {
    use std::fmt::Write as _;
    let Some(t) = subtask_trend(rows) else {
        return String::new();
    };
    let k = t.window;
    let mut md = format!(
        "\n## Influence per validation subtask\n\nMean raw influence of the valid rollouts on each \
         subtask, the first {k} steps against the last {k}: which subtasks the policy's data \
         serves.\n\n| subtask | first | last | change |\n|---|---|---|---|\n"
    );
    for (name, a, b) in &t.subtasks {
        let _ = writeln!(md, "| {name} | {a:.4} | {b:.4} | {:+.4} |", b - a);
    }
    if !t.served_less.is_empty() {
        let _ = writeln!(
            md,
            "\nServed less at the end than at the start: {}. docs/GUIDE.md (\"Max or mean\") says \
             when this is what the aggregation asks for and what to change when it is not.",
            t.served_less.join(", ")
        );
    }
    md
}

/// The KL per step from the trainer's metrics (`OUT/rl/metrics.jsonl`; none before the first
/// step).
pub fn read_kl(path: &Path) -> Result<Vec<(u64, f64)>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let rows: Vec<serde_json::Value> = read_jsonl(path)?;
    Ok(rows
        .iter()
        .filter_map(|v| Some((v["step"].as_u64()?, v["kl"].as_f64()?)))
        .collect())
}

/// Writes the run's `OUT/report.md` from its files: the warm-up diagnostics, the reward rows, the
/// KL per step, and what the rubrics ask for before and after training.
pub fn write_report(cfg: &RunConfig, rows: &[RewardRow]) -> Result<()> {
    let kl = read_kl(&cfg.out.join("rl").join("metrics.jsonl"))?;
    let warm = read_warmup_diagnostics(cfg)?;
    let before = RubricStats::of(&read_jsonl::<SynthRecord>(cfg.out.join("pool.jsonl"))?);
    let last = cfg
        .out
        .join("rl")
        .join("samples")
        .join(format!("step-{:06}.jsonl", cfg.steps));
    let after = if last.exists() {
        Some(RubricStats::of(&read_jsonl::<SynthRecord>(&last)?))
    } else {
        None
    };
    let mut md = run_report(&warm, rows, &kl);
    md.push_str(&rubric_section(&before, after.as_ref()));
    write_atomic(cfg.out.join("report.md"), md.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(step: u64, subtasks: &[(&str, f64)]) -> RewardRow {
        RewardRow {
            step,
            rollouts: 4,
            valid_rate: 1.0,
            if_valid_mean: None,
            if_valid_max: None,
            reward_mean: 0.0,
            discrimination: None,
            contaminated: None,
            subtask_if: subtasks.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        }
    }

    #[test]
    fn subtask_section_names_the_subtasks_served_less() {
        let rows: Vec<RewardRow> = (1..=8)
            .map(|t| {
                let t = t as f64;
                row(
                    t as u64,
                    &[("a", 0.10 + 0.01 * t), ("b", 0.10 - 0.01 * t), ("c", 0.10)],
                )
            })
            .collect();
        let md = subtask_section(&rows);
        assert!(md.contains("| a | 0.1200 | 0.1700 | +0.0500 |"), "{md}");
        assert!(md.contains("| b | 0.0800 | 0.0300 | -0.0500 |"), "{md}");
        assert!(
            md.contains("Served less at the end than at the start: b."),
            "{md}"
        );
        let t = subtask_trend(&rows).expect("a trend");
        assert_eq!((t.window, t.served_less), (3, vec!["b".to_string()]));
        // Nothing to compare: one step, one subtask, or runs from before it was recorded.
        assert_eq!(subtask_section(&rows[..1]), "");
        assert_eq!(
            subtask_section(&[row(1, &[("a", 0.1)]), row(2, &[("a", 0.2)])]),
            ""
        );
        assert_eq!(subtask_section(&[row(1, &[]), row(2, &[])]), "");
    }
}
