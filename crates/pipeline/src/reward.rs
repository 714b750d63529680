//! The influence reward of stage 2: each rollout's rubric becomes a QA pair, the pair is scored
//! by its influence on the validation set, and a [`RewardRule`] turns the scores into rewards.
//! [`InfluenceReward`] is an [`optimsyn_rl_grpo::RewardFn`], so any GRPO trainer can use it.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use optimsyn_data_io::{ChatExample, JsonlWriter, SeedDoc};
use optimsyn_influence::{Discrimination, InfluenceScorer, Score, ScoreReport, SubtaskAgg};
use optimsyn_rl_grpo::{BoxError, RewardFn, RolloutBatch};
use optimsyn_synth::{PolicyInfo, SynthRecord};
use serde::{Deserialize, Serialize};

use crate::config::{RewardMode, RunConfig, SubtaskScale};
use crate::error::{Error, Result};
use crate::models::Models;
use crate::rollouts::{RubricItem, policy_info, synthesize_rubrics, valid_examples, write_records};
use crate::stage0::{SeedPrompt, train_split};

/// What a reward step recorded (a row of `rl/influence.jsonl`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RewardRow {
    /// GRPO step.
    pub step: u64,
    /// Rollouts.
    pub rollouts: usize,
    /// Fraction whose rubric parsed and whose QA passed the checks.
    pub valid_rate: f64,
    /// Mean raw IF of the valid rollouts.
    pub if_valid_mean: Option<f64>,
    /// Largest raw IF.
    pub if_valid_max: Option<f64>,
    /// Mean reward.
    pub reward_mean: f64,
    /// Whether this step's influence told the valid rollouts apart (absent with fewer than two).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discrimination: Option<Discrimination>,
    /// Fraction of rollouts whose QA overlaps an evaluation set (absent in runs from before it
    /// was measured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contaminated: Option<f64>,
    /// Mean raw influence of the valid rollouts on each validation subtask: which subtasks the
    /// policy's data serves, step by step (absent in runs from before it was recorded).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub subtask_if: BTreeMap<String, f64>,
}

impl RewardRow {
    fn new(step: u64, ifs: &[Option<f64>], rw: &[f64], d: Option<Discrimination>) -> RewardRow {
        let vals: Vec<f64> = ifs.iter().flatten().copied().collect();
        RewardRow {
            step,
            rollouts: ifs.len(),
            valid_rate: vals.len() as f64 / ifs.len().max(1) as f64,
            if_valid_mean: (!vals.is_empty()).then(|| vals.iter().sum::<f64>() / vals.len() as f64),
            if_valid_max: vals.iter().copied().reduce(f64::max),
            reward_mean: rw.iter().sum::<f64>() / rw.len().max(1) as f64,
            discrimination: d,
            contaminated: None,
            subtask_if: BTreeMap::new(),
        }
    }
}

/// One GRPO step's rollouts as a [`RewardRule`] sees them.
pub struct ScoredStep<'a> {
    /// The GRPO step (1-based).
    pub step: u64,
    /// Each rollout's record, in batch order: the QA pair (or why there is none), its provenance,
    /// and its raw influence and per-subtask scores (`None` for an invalid rollout).
    pub records: &'a [SynthRecord],
    /// Each rollout's influence score, `None` where the rollout is invalid.
    pub scores: &'a [Option<&'a Score>],
}

/// Turns one step's scored rollouts into rewards, one per rollout.
///
/// Closures `FnMut(&ScoredStep) -> Vec<f64>` are rules, so a custom transform is one line:
///
/// ```
/// use optimsyn_pipeline::{RewardRule, ScoredStep};
/// // Raw influence, squared where positive; invalid rollouts get -1.
/// let mut rule = |s: &ScoredStep| -> Vec<f64> {
///     s.scores.iter().map(|x| x.and_then(|x| x.influence).map_or(-1.0, |v| v.max(0.0).powi(2))).collect()
/// };
/// let step = ScoredStep { step: 1, records: &[], scores: &[] };
/// assert!(rule.rewards(&step).is_empty());
/// ```
pub trait RewardRule {
    /// One reward per entry of `step.records`.
    fn rewards(&mut self, step: &ScoredStep) -> Vec<f64>;
}

impl<F: FnMut(&ScoredStep) -> Vec<f64>> RewardRule for F {
    fn rewards(&mut self, step: &ScoredStep) -> Vec<f64> {
        self(step)
    }
}

/// The rule a run config asks for (`[reward]`): subtask scores as they are or standardized,
/// aggregated as `influence.subtask_agg`, then mapped to rewards by `reward.mode`.
#[derive(Debug, Clone, Copy)]
pub struct ConfiguredReward {
    /// `reward.mode`.
    pub mode: RewardMode,
    /// `reward.lambda`: what an invalid rollout costs.
    pub lambda: f64,
    /// `reward.subtask_scale`.
    pub scale: SubtaskScale,
    /// `influence.subtask_agg`.
    pub agg: SubtaskAgg,
}

impl ConfiguredReward {
    /// The rule of `cfg`.
    pub fn of(cfg: &RunConfig) -> ConfiguredReward {
        ConfiguredReward {
            mode: cfg.reward.mode,
            lambda: cfg.reward.lambda,
            scale: cfg.reward.subtask_scale,
            agg: cfg.influence.subtask_agg,
        }
    }
}

impl RewardRule for ConfiguredReward {
    fn rewards(&mut self, step: &ScoredStep) -> Vec<f64> {
        let paid = reward_influence(self.scale, self.agg, step.scores);
        rewards(self.mode, self.lambda, &paid)
    }
}

/// The influence the reward is computed from: as scored, or (standardized) each subtask's scores
/// turned into z-scores over the scored rollouts before the subtasks are aggregated again.
pub fn reward_influence(
    scale: SubtaskScale,
    agg: SubtaskAgg,
    scored: &[Option<&Score>],
) -> Vec<Option<f64>> {
    let raw = || scored.iter().map(|s| s.and_then(|s| s.influence)).collect();
    if scale == SubtaskScale::Raw {
        return raw();
    }
    let rows: Vec<&BTreeMap<String, f64>> = scored
        .iter()
        .flatten()
        .filter(|s| s.influence.is_some())
        .map(|s| &s.subtasks)
        .collect();
    if rows.len() < 2 {
        return raw();
    }
    let mut stats: BTreeMap<&str, (f64, f64)> = BTreeMap::new();
    for name in rows[0].keys() {
        let xs: Vec<f64> = rows.iter().filter_map(|r| r.get(name).copied()).collect();
        let m = xs.iter().sum::<f64>() / xs.len() as f64;
        let sd = (xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / xs.len() as f64).sqrt();
        stats.insert(name, (m, sd));
    }
    scored
        .iter()
        .map(|s| {
            let s = s.filter(|s| s.influence.is_some())?;
            let z = s.subtasks.iter().map(|(k, x)| match stats.get(k.as_str()) {
                Some(&(m, sd)) if sd > 0.0 => (x - m) / sd,
                _ => 0.0,
            });
            Some(match agg {
                SubtaskAgg::Max => z.fold(f64::NEG_INFINITY, f64::max),
                SubtaskAgg::Mean => z.sum::<f64>() / s.subtasks.len().max(1) as f64,
            })
        })
        .collect()
}

/// Each subtask's mean score over the valid rollouts (empty when none is valid).
pub fn subtask_means(scored: &[Option<&Score>]) -> BTreeMap<String, f64> {
    let mut sums: BTreeMap<String, (f64, usize)> = BTreeMap::new();
    for s in scored.iter().flatten().filter(|s| s.influence.is_some()) {
        for (k, x) in &s.subtasks {
            let e = sums.entry(k.clone()).or_default();
            e.0 += x;
            e.1 += 1;
        }
    }
    sums.into_iter()
        .map(|(k, (sum, n))| (k, sum / n as f64))
        .collect()
}

/// Rewards of one batch from raw IF (`None` = invalid), by mode.
pub fn rewards(mode: RewardMode, lambda: f64, ifs: &[Option<f64>]) -> Vec<f64> {
    let valid: Vec<f64> = ifs.iter().flatten().copied().collect();
    let minmax = |xs: &[f64]| {
        let lo = xs.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        (lo, hi)
    };
    let norm = |x: f64, lo: f64, hi: f64| if hi > lo { (x - lo) / (hi - lo) } else { 0.0 };
    match mode {
        RewardMode::Normalized => {
            let (lo, hi) = minmax(&valid);
            ifs.iter()
                .map(|v| v.map_or(-lambda, |x| norm(x, lo, hi)))
                .collect()
        }
        RewardMode::Paper => ifs.iter().map(|v| v.unwrap_or(-lambda)).collect(),
        RewardMode::CodeExact => {
            let all: Vec<f64> = ifs.iter().map(|v| v.unwrap_or(0.0)).collect();
            let (lo, hi) = minmax(&all);
            ifs.iter()
                .zip(&all)
                .map(|(v, x)| if v.is_some() { norm(*x, lo, hi) } else { 0.0 })
                .collect()
        }
    }
}

/// Stage 2's reward: every rollout's rubric → a QA pair (written to
/// `OUT/rl/samples/step-N.jsonl` with its influence, subtask scores and reward), scored against
/// the validation set; one row per step appended to `OUT/rl/influence.jsonl`.
pub struct InfluenceReward<'a> {
    cfg: &'a RunConfig,
    models: &'a Models,
    scorer: &'a mut InfluenceScorer,
    docs: HashMap<String, SeedDoc>,
    samples: PathBuf,
    log: JsonlWriter,
    policy: PolicyInfo,
    rule: Box<dyn RewardRule + 'a>,
    warned: bool,
}

impl<'a> InfluenceReward<'a> {
    /// The reward of `cfg`'s run over the training seeds of `seeds`, with the configured
    /// [`RewardRule`]. Rows of `OUT/rl/influence.jsonl` after `resume_step` (steps a killed run
    /// scored but did not save) are dropped.
    pub fn new(
        cfg: &'a RunConfig,
        models: &'a Models,
        seeds: &[SeedPrompt],
        scorer: &'a mut InfluenceScorer,
        resume_step: u64,
    ) -> Result<InfluenceReward<'a>> {
        let rl = cfg.out.join("rl");
        let samples = rl.join("samples");
        std::fs::create_dir_all(&samples).map_err(Error::io(&samples))?;
        let log_path = rl.join("influence.jsonl");
        optimsyn_data_io::truncate_rows_after(&log_path, "step", resume_step)?;
        Ok(InfluenceReward {
            cfg,
            models,
            scorer,
            docs: train_split(seeds)
                .into_iter()
                .map(|s| (s.doc.id.clone(), s.doc.clone()))
                .collect(),
            samples,
            log: JsonlWriter::append(&log_path)?,
            policy: policy_info(cfg, "rl", cfg.grpo.rollout.temperature),
            rule: Box::new(ConfiguredReward::of(cfg)),
            warned: false,
        })
    }

    /// Uses `rule` instead of the configured one.
    pub fn with_rule(mut self, rule: impl RewardRule + 'a) -> Self {
        self.rule = Box::new(rule);
        self
    }

    /// The rewards of one step's rollouts; writes its samples file and its row.
    pub fn score_batch(&mut self, batch: &RolloutBatch) -> Result<Vec<f64>> {
        let items = self.rubric_items(batch)?;
        let file = self.samples.join(format!("step-{:06}.jsonl", batch.step));
        let (cfg, m) = (self.cfg, self.models);
        let mut recs = synthesize_rubrics(cfg, m, &items, &self.policy, batch.step, &file)?;
        let screened = m.hygiene.screen_rollouts(&mut recs)?;
        let valid: Vec<ChatExample> = valid_examples(&recs);
        let report = if valid.is_empty() {
            ScoreReport {
                scores: Vec::new(),
                discrimination: None,
            }
        } else {
            self.scorer.score_report(&valid)?
        };
        let by_id: HashMap<&str, &Score> =
            report.scores.iter().map(|s| (s.id.as_str(), s)).collect();
        let scored: Vec<Option<&Score>> = recs
            .iter()
            .map(|r| r.is_valid().then(|| by_id.get(r.id()).copied()).flatten())
            .collect();
        for (r, s) in recs.iter_mut().zip(&scored) {
            r.sample.influence = s.and_then(|s| s.influence);
            r.sample.subtask_influence = s.map(|s| s.subtasks.clone());
        }
        let rw = self.rule.rewards(&ScoredStep {
            step: batch.step,
            records: &recs,
            scores: &scored,
        });
        if rw.len() != recs.len() {
            return Err(Error::Stage(format!(
                "step {}: the reward rule returned {} rewards for {} rollouts",
                batch.step,
                rw.len(),
                recs.len()
            )));
        }
        // The samples file was written before scoring; it is rewritten with what the reward saw.
        for (r, reward) in recs.iter_mut().zip(&rw) {
            r.sample.reward = Some(*reward);
        }
        write_records(&file, &recs)?;
        let ifs: Vec<Option<f64>> = scored.iter().map(|s| s.and_then(|s| s.influence)).collect();
        let mut row = RewardRow::new(batch.step, &ifs, &rw, report.discrimination);
        row.contaminated = Some(screened.contaminated as f64 / recs.len().max(1) as f64);
        row.subtask_if = subtask_means(&scored);
        self.warn_once(&row);
        self.log.write(&row)?;
        self.log.sync()?;
        Ok(rw)
    }

    /// Each rollout as (seed document, sample id, rubric text).
    fn rubric_items(&self, batch: &RolloutBatch) -> Result<Vec<RubricItem>> {
        let mut items = Vec::with_capacity(batch.rollouts.len());
        for r in &batch.rollouts {
            let p = batch.prompt_of(r);
            let doc = self.docs.get(&p.id).ok_or_else(|| {
                Error::Stage(format!("prompt {} has no training seed document", p.id))
            })?;
            let text = self.models.policy_tok.decode(&r.completion.tokens, true)?;
            // A prompt can occur twice in a step (the batch spans an epoch boundary); its later
            // occurrences get their own ids, as they get their own sampling streams.
            let occurrence = batch.prompts[..r.prompt_index]
                .iter()
                .filter(|q| q.id == p.id)
                .count();
            let id = if occurrence == 0 {
                format!("{}/step{}-{}", p.id, batch.step, r.sample)
            } else {
                format!("{}/step{}-{}.{}", p.id, batch.step, r.sample, occurrence)
            };
            items.push((doc.clone(), id, text));
        }
        Ok(items)
    }

    fn warn_once(&mut self, row: &RewardRow) {
        if let Some(d) = row
            .discrimination
            .filter(|d| !self.warned && d.shared_dominates())
        {
            tracing::warn!(
                step = row.step,
                "influence mostly measures what every rollout shares ({}); see docs/GUIDE.md, \
                 \"Reading the diagnostics\"",
                d.summary()
            );
            self.warned = true;
        }
    }
}

impl RewardFn for InfluenceReward<'_> {
    fn score(&mut self, batch: &RolloutBatch) -> Result<Vec<f64>, BoxError> {
        self.score_batch(batch).map_err(Into::into)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn score(id: &str, a: f64, b: f64) -> Score {
        Score {
            id: id.into(),
            influence: Some(a.max(b)),
            subtasks: [("a".to_string(), a), ("b".to_string(), b)].into(),
            tokens: 4,
            loss_tokens: 2,
            loss: None,
            reason: None,
        }
    }

    #[test]
    fn standardized_subtasks_do_not_let_a_larger_scale_win() {
        // Subtask `a` has cosines ten times larger: raw max picks it for everyone.
        let s = [
            score("x", 0.30, 0.01),
            score("y", 0.10, 0.03),
            score("z", 0.20, 0.02),
        ];
        let scored: Vec<Option<&Score>> = vec![Some(&s[0]), None, Some(&s[1]), Some(&s[2])];
        let raw = reward_influence(SubtaskScale::Raw, SubtaskAgg::Max, &scored);
        assert_eq!(raw, vec![Some(0.30), None, Some(0.10), Some(0.20)]);
        let z = reward_influence(SubtaskScale::Standardized, SubtaskAgg::Max, &scored);
        let z: Vec<f64> = z.iter().map(|v| v.unwrap_or(f64::NAN)).collect();
        // y is the best on `b`: as good a candidate as x is on `a`.
        assert!((z[0] - z[2]).abs() < 1e-12 && z[0] > z[3], "{z:?}");
        assert!(z[1].is_nan(), "an invalid rollout stays invalid");
        let mean = reward_influence(SubtaskScale::Standardized, SubtaskAgg::Mean, &scored);
        assert!(mean.iter().flatten().all(|v| v.abs() < 1e-12), "{mean:?}");
        // One scored rollout: nothing to standardize against.
        assert_eq!(
            reward_influence(SubtaskScale::Standardized, SubtaskAgg::Max, &scored[..1]),
            vec![Some(0.30)]
        );
    }

    #[test]
    fn reward_modes() {
        let ifs = [Some(0.02), None, Some(0.06), Some(0.04)];
        let n = rewards(RewardMode::Normalized, 0.1, &ifs);
        assert_eq!(n, vec![0.0, -0.1, 1.0, 0.5000000000000001]);
        assert_eq!(
            rewards(RewardMode::Paper, 0.1, &ifs),
            vec![0.02, -0.1, 0.06, 0.04]
        );
        // The released code: min–max over all rollouts, placeholders (IF 0) included, times Valid.
        let c = rewards(RewardMode::CodeExact, 0.1, &ifs);
        assert!((c[0] - 1.0 / 3.0).abs() < 1e-12 && c[1] == 0.0 && c[2] == 1.0);
        // All equal: no signal, nothing blows up.
        assert_eq!(
            rewards(RewardMode::Normalized, 0.1, &[Some(0.5), Some(0.5)]),
            vec![0.0, 0.0]
        );
        assert_eq!(
            rewards(RewardMode::Normalized, 0.1, &[None, None]),
            vec![-0.1, -0.1]
        );
    }

    #[test]
    fn the_configured_rule_is_the_two_functions_composed() {
        let s = [score("x", 0.30, 0.01), score("y", 0.10, 0.03)];
        let scored: Vec<Option<&Score>> = vec![Some(&s[0]), None, Some(&s[1])];
        let mut rule = ConfiguredReward {
            mode: RewardMode::Normalized,
            lambda: 0.5,
            scale: SubtaskScale::Raw,
            agg: SubtaskAgg::Max,
        };
        let step = ScoredStep {
            step: 3,
            records: &[],
            scores: &scored,
        };
        assert_eq!(rule.rewards(&step), vec![1.0, -0.5, 0.0]);
    }

    #[test]
    fn subtask_means_average_the_valid_rollouts_only() {
        let s = [score("x", 0.25, 0.5), score("y", 0.75, 0.0)];
        let mut invalid = score("z", 9.0, 9.0);
        invalid.influence = None;
        let scored = vec![Some(&s[0]), None, Some(&s[1]), Some(&invalid)];
        let m = subtask_means(&scored);
        assert_eq!(m.len(), 2);
        assert_eq!((m["a"], m["b"]), (0.5, 0.25));
        assert!(subtask_means(&[None]).is_empty());
    }
}
