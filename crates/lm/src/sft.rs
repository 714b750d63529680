//! Supervised fine-tuning: LoRA or full-parameter training on chat examples with AdamW, with
//! checkpoints a killed run resumes from bit-identically.
//!
//! The loop, per optimizer step: the next `batch_size` examples of a seeded per-epoch shuffle are
//! split into micro-batches of at most `max_batch_tokens` padded tokens (gradient accumulation),
//! each micro-batch's loss is scaled by one normalizer for the whole step (so the step's gradient
//! does not depend on how it was split), then gradients are clipped, the learning rate is set from
//! the schedule, and AdamW steps. Dropout masks (LoRA) are keyed by `(seed, step, example id)`.
//!
//! Loss reductions ([`LossReduction`]): `SampleMean` (default; LESS's and the OptimSyn reference
//! code's) averages each example's mean token cross-entropy over the step's examples, so short
//! and long answers weigh alike; `TokenMean` divides the step's summed token cross-entropy by its
//! number of loss tokens (transformers' `Trainer` with `average_tokens_across_devices`).
//!
//! Output folder: `checkpoint-N/` (N = optimizer steps) with the adapter (PEFT layout) or the
//! full weights (HF layout), `optimizer.safetensors` and `training.json`; `metrics.jsonl` with one
//! row per step; and, at the end, the final weights, optimizer state and `training.json` in the
//! folder itself. Each checkpoint is written to a temporary folder and renamed, so a crash leaves
//! the previous checkpoints intact and never a half-written one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use optimsyn_data_io::{ChatFormat, JsonlWriter};
use optimsyn_optim::{AdamW, AdamWConfig, LrSchedule};
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};
use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::error::{Error, Result, TorchContext};
use crate::lora::LoraAdapter;
use crate::loss::{LossBatch, MaskedSeq};
use crate::model::CausalLm;
use crate::sampling::row_key;
use crate::weights::load_into;

/// File name of the training record beside an adapter.
pub const TRAINING_FILE: &str = "training.json";

/// How a step's per-token losses become one number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum LossReduction {
    /// Mean over examples of each example's mean token loss (LESS / OptimSyn).
    #[default]
    SampleMean,
    /// Summed token loss over the number of loss tokens in the step.
    TokenMean,
}

impl std::str::FromStr for LossReduction {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "sample-mean" => Ok(LossReduction::SampleMean),
            "token-mean" => Ok(LossReduction::TokenMean),
            o => Err(format!(
                "unknown loss reduction `{o}` (expected sample-mean or token-mean)"
            )),
        }
    }
}

/// The learning-rate schedule's shape; warm-up and length come from [`SftConfig`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ScheduleKind {
    /// Warm-up, then constant.
    Constant,
    /// Warm-up, then linear decay to 0 (the OptimSyn warm-up's).
    #[default]
    Linear,
    /// Warm-up, then half-cosine decay to 0.
    Cosine,
}

impl std::str::FromStr for ScheduleKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "constant" => Ok(ScheduleKind::Constant),
            "linear" => Ok(ScheduleKind::Linear),
            "cosine" => Ok(ScheduleKind::Cosine),
            o => Err(format!(
                "unknown schedule `{o}` (expected constant, linear or cosine)"
            )),
        }
    }
}

/// SFT hyperparameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SftConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Adam β1.
    pub beta1: f64,
    /// Adam β2.
    pub beta2: f64,
    /// Adam ε.
    pub eps: f64,
    /// Schedule shape.
    pub schedule: ScheduleKind,
    /// Fraction of the steps spent warming up (rounded up, as transformers' `warmup_ratio`).
    pub warmup_ratio: f64,
    /// Passes over the data.
    pub epochs: usize,
    /// Examples per optimizer step.
    pub batch_size: usize,
    /// Most padded tokens (rows × longest row) per forward; larger steps are accumulated.
    pub max_batch_tokens: usize,
    /// Clip the gradient's total L2 norm to this (none when `None`).
    pub max_grad_norm: Option<f64>,
    /// Loss reduction.
    pub loss: LossReduction,
    /// Seed of the data order and dropout masks.
    pub seed: u64,
    /// Write a checkpoint every this many steps (besides `checkpoints`).
    pub save_every: Option<u64>,
    /// Write this many evenly spaced checkpoints (the last at the final step).
    pub checkpoints: usize,
}

impl Default for SftConfig {
    /// lr 1e-4, no weight decay, linear schedule with 3 % warm-up, 1 epoch of batch 8, clip 1.0,
    /// per-sample mean loss, one checkpoint at the end.
    fn default() -> Self {
        SftConfig {
            lr: 1e-4,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            schedule: ScheduleKind::Linear,
            warmup_ratio: 0.03,
            epochs: 1,
            batch_size: 8,
            max_batch_tokens: 4096,
            max_grad_norm: Some(1.0),
            loss: LossReduction::SampleMean,
            seed: 0,
            save_every: None,
            checkpoints: 1,
        }
    }
}

/// One training example: an id (keys its dropout masks) and its encoding.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainExample {
    /// Stable id.
    pub id: String,
    /// Token ids.
    pub tokens: Vec<u32>,
    /// Loss mask over `tokens`.
    pub loss_mask: Vec<u8>,
    /// The validation subtask, for evaluation.
    pub subtask: Option<String>,
}

impl TrainExample {
    fn loss_tokens(&self) -> usize {
        self.loss_mask.iter().skip(1).filter(|m| **m != 0).count()
    }

    fn seq(&self) -> MaskedSeq<'_> {
        MaskedSeq {
            tokens: &self.tokens,
            loss_mask: &self.loss_mask,
        }
    }
}

/// What was trained on, recorded in `training.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct DataInfo {
    /// Rendering format of the examples.
    pub format: Option<ChatFormat>,
    /// Content hash of the training data file.
    pub data_hash: Option<String>,
    /// Where the data came from (informational).
    pub data_path: Option<String>,
}

/// `training.json`: written beside every checkpoint's weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingRecord {
    /// Rendering format of the training data (`tulu` or `chat-template`).
    pub format: Option<ChatFormat>,
    /// Content hash of the training data.
    pub data_hash: Option<String>,
    /// The training data's path when it was trained.
    #[serde(default)]
    pub data_path: Option<String>,
    /// Optimizer steps done.
    pub steps: u64,
    /// Steps the whole run will take.
    pub total_steps: u64,
    /// Average learning rate over the steps since the previous checkpoint (the weight of this
    /// checkpoint in the influence sum).
    pub avg_lr: f64,
    /// `lora` or `full`.
    pub trainable: String,
    /// Examples trained on per epoch (rows without loss tokens are not counted).
    pub examples: usize,
    /// Rows skipped for having no loss token.
    pub skipped: usize,
    /// The run's hyperparameters.
    pub config: SftConfig,
}

impl TrainingRecord {
    /// Reads `dir/training.json`.
    pub fn load(dir: impl AsRef<Path>) -> Result<Self> {
        let path = dir.as_ref().join(TRAINING_FILE);
        let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|e| Error::Adapter {
            path,
            message: format!("not a training record: {e}"),
        })
    }
}

/// One optimizer step's numbers (also a `metrics.jsonl` row).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// Steps done, this one included.
    pub step: u64,
    /// Steps the run will take.
    pub total_steps: u64,
    /// Epoch of this step (0-based).
    pub epoch: usize,
    /// The step's loss (under the run's reduction).
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Examples in the step.
    pub examples: usize,
    /// Loss tokens in the step.
    pub loss_tokens: usize,
    /// Forward passes in the step.
    pub micro_batches: usize,
    /// Seconds the step took.
    pub seconds: f64,
}

/// What a run did.
#[derive(Debug, Clone, PartialEq)]
pub struct SftReport {
    /// Steps done in total (resumed ones included).
    pub steps: u64,
    /// The step the run resumed from (0 when it started fresh).
    pub resumed_from: u64,
    /// Rows skipped for having no loss token.
    pub skipped: usize,
    /// Checkpoint folders written by this run.
    pub checkpoints: Vec<PathBuf>,
    /// Loss of the last step.
    pub last_loss: Option<f64>,
}

/// What is trained.
pub enum Trainable<'a> {
    /// The adapter's matrices; the base stays frozen.
    Lora(&'a LoraAdapter),
    /// Every weight of the model.
    Full,
}

fn named_trainables<'a>(model: &'a CausalLm, t: &'a Trainable<'_>) -> Vec<(String, &'a Tensor)> {
    match t {
        Trainable::Lora(a) => a.named_parameters(),
        Trainable::Full => model.named_parameters(),
    }
}

/// The schedule of a run of `total` steps.
fn schedule(cfg: &SftConfig, total: u64) -> LrSchedule {
    let warmup = (cfg.warmup_ratio * total as f64).ceil() as u64;
    match cfg.schedule {
        ScheduleKind::Constant => LrSchedule::Constant {
            warmup_steps: warmup,
        },
        ScheduleKind::Linear => LrSchedule::linear(warmup, total),
        ScheduleKind::Cosine => LrSchedule::cosine(warmup, total),
    }
}

/// The examples of every step: a seeded shuffle per epoch, cut into `batch_size` pieces (the last
/// piece of an epoch may be smaller).
fn plan_steps(n: usize, cfg: &SftConfig) -> Vec<(usize, Vec<usize>)> {
    let mut steps = Vec::new();
    for epoch in 0..cfg.epochs {
        let mut order: Vec<usize> = (0..n).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        rng.set_stream(epoch as u64 + 1);
        for i in (1..n).rev() {
            // The modulo's bias is below (i + 1) / 2^64: immaterial, and changing the draw would
            // change every run's example order (and so every published number).
            let j = (rng.next_u64() % (i as u64 + 1)) as usize;
            order.swap(i, j);
        }
        for chunk in order.chunks(cfg.batch_size) {
            steps.push((epoch, chunk.to_vec()));
        }
    }
    steps
}

/// Splits `idx` (in order) into batches of at most `budget` padded tokens (rows × longest row;
/// a row longer than the budget goes alone). `len(i)` is row `i`'s length.
pub fn token_budget_batches(
    idx: &[usize],
    len: impl Fn(usize) -> usize,
    budget: usize,
) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut cur: Vec<usize> = Vec::new();
    let mut longest = 0;
    for &i in idx {
        let len = len(i);
        let l = longest.max(len);
        if !cur.is_empty() && l * (cur.len() + 1) > budget {
            out.push(std::mem::take(&mut cur));
            longest = 0;
        }
        longest = longest.max(len);
        cur.push(i);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Steps at which checkpoints are written.
fn checkpoint_steps(cfg: &SftConfig, total: u64) -> Vec<u64> {
    let mut at: Vec<u64> = Vec::new();
    let k = cfg.checkpoints.max(1) as u64;
    for i in 1..=k {
        at.push(((total * i) as f64 / k as f64).round() as u64);
    }
    if let Some(e) = cfg.save_every.filter(|e| *e > 0) {
        at.extend((1..=total / e).map(|i| i * e));
    }
    at.retain(|s| *s > 0);
    at.sort_unstable();
    at.dedup();
    at
}

/// The checkpoint folders of `dir`, by step.
pub fn list_checkpoints(dir: impl AsRef<Path>) -> Result<BTreeMap<u64, PathBuf>> {
    let dir = dir.as_ref();
    let mut out = BTreeMap::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(source) => {
            return Err(Error::Io {
                path: dir.to_path_buf(),
                source,
            });
        }
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(n) = name
            .strip_prefix("checkpoint-")
            .and_then(|n| n.parse::<u64>().ok())
            && e.path().join(TRAINING_FILE).exists()
        {
            out.insert(n, e.path());
        }
    }
    Ok(out)
}

fn weights_file(t: &Trainable<'_>) -> &'static str {
    match t {
        Trainable::Lora(_) => crate::lora::WEIGHTS_FILE,
        Trainable::Full => "model.safetensors",
    }
}

/// Trains `model` (its `trainable` part) on `data`, writing checkpoints and metrics into `out`.
/// If `out` already holds checkpoints of this run, training resumes from the latest one and ends
/// exactly as an uninterrupted run would. Rows without loss tokens are skipped and counted.
/// `on_step` sees every step's metrics (a progress bar, a log).
pub fn train(
    model: &mut CausalLm,
    trainable: Trainable<'_>,
    data: &[TrainExample],
    cfg: &SftConfig,
    info: &DataInfo,
    out: impl AsRef<Path>,
    on_step: &mut dyn FnMut(&StepMetrics),
) -> Result<SftReport> {
    let out = out.as_ref();
    if cfg.batch_size == 0 || cfg.epochs == 0 {
        return Err(Error::input("SFT needs batch_size ≥ 1 and epochs ≥ 1"));
    }
    let kept = trainable_examples(data, model.config().max_position_embeddings)?;
    let skipped = data.len() - kept.len();
    let max_len = kept.iter().map(|e| e.tokens.len()).max().unwrap_or(0);
    let steps = plan_steps(kept.len(), cfg);
    let total = steps.len() as u64;
    let sched = schedule(cfg, total);
    let ckpt_at = checkpoint_steps(cfg, total);
    let mut opt = optimizer(model, &trainable, cfg)?;
    let start = resume(model, &trainable, &mut opt, cfg, info, total, out)?;
    let metrics_path = out.join("metrics.jsonl");
    // A resumed run rewrites the rows logged after its checkpoint.
    optimsyn_data_io::truncate_rows_after(&metrics_path, "step", start)?;
    let mut metrics = JsonlWriter::append(&metrics_path)?;

    let lora = match &trainable {
        Trainable::Lora(a) => Some(*a),
        Trainable::Full => None,
    };
    let budget = cfg.max_batch_tokens.max(max_len);
    let mut report = SftReport {
        steps: start,
        resumed_from: start,
        skipped,
        checkpoints: Vec::new(),
        last_loss: None,
    };
    let mut lr_sum = 0.0;
    let mut lr_n = 0u64;
    for (step, (epoch, idx)) in steps.iter().enumerate().skip(start as usize) {
        let t0 = Instant::now();
        let step = step as u64;
        opt.zero_grad();
        let n_tokens: usize = idx.iter().map(|&i| kept[i].loss_tokens()).sum();
        let norm = match cfg.loss {
            LossReduction::SampleMean => idx.len() as f64,
            LossReduction::TokenMean => n_tokens as f64,
        };
        let micro = token_budget_batches(idx, |i| kept[i].tokens.len(), budget);
        let mut loss_total = 0.0;
        for mb in &micro {
            let rows: Vec<&TrainExample> = mb.iter().map(|&i| kept[i]).collect();
            loss_total += micro_batch_backward(model, lora, &rows, cfg, step, norm)?;
        }
        let grad_norm = match cfg.max_grad_norm {
            Some(m) => opt.clip_grad_norm(m),
            None => opt.grad_norm(),
        }
        .map_err(|e| match e {
            optimsyn_optim::Error::NonFiniteGradNorm { norm } => Error::NonFiniteLoss {
                step: step + 1,
                value: norm,
                ids: "(gradient norm)".into(),
            },
            e => Error::Optim(e),
        })?;
        let lr = opt.set_scheduled_lr(&sched, cfg.lr);
        opt.step()?;
        lr_sum += lr;
        lr_n += 1;
        let m = StepMetrics {
            step: step + 1,
            total_steps: total,
            epoch: *epoch,
            loss: loss_total,
            lr,
            grad_norm,
            examples: idx.len(),
            loss_tokens: n_tokens,
            micro_batches: micro.len(),
            seconds: t0.elapsed().as_secs_f64(),
        };
        metrics.write(&m)?;
        on_step(&m);
        report.steps = step + 1;
        report.last_loss = Some(loss_total);
        if ckpt_at.contains(&(step + 1)) {
            let rec = TrainingRecord {
                format: info.format,
                data_hash: info.data_hash.clone(),
                data_path: info.data_path.clone(),
                steps: step + 1,
                total_steps: total,
                avg_lr: lr_sum / lr_n as f64,
                trainable: if lora.is_some() { "lora" } else { "full" }.into(),
                examples: kept.len(),
                skipped,
                config: cfg.clone(),
            };
            metrics.sync()?;
            let dir = out.join(format!("checkpoint-{}", step + 1));
            save_checkpoint(model, &trainable, &opt, &rec, &dir)?;
            report.checkpoints.push(dir);
            lr_sum = 0.0;
            lr_n = 0;
        }
    }
    metrics.sync()?;
    copy_last_checkpoint(out)?;
    Ok(report)
}

/// The examples SFT trains on: those with a loss token and at least two tokens; an example
/// longer than the context is an error naming it.
fn trainable_examples(data: &[TrainExample], ctx: usize) -> Result<Vec<&TrainExample>> {
    let kept: Vec<&TrainExample> = data
        .iter()
        .filter(|e| e.loss_tokens() > 0 && e.tokens.len() >= 2)
        .collect();
    if kept.is_empty() {
        return Err(Error::input(format!(
            "no training example has a loss token ({} rows, all without an assistant turn or truncated away)",
            data.len()
        )));
    }
    if let Some(long) = kept.iter().find(|e| e.tokens.len() > ctx) {
        return Err(Error::input(format!(
            "example {}: {} tokens is longer than the model's context ({ctx}); truncate it (max_len)",
            long.id,
            long.tokens.len()
        )));
    }
    Ok(kept)
}

/// AdamW over the trainable parameters (all of the model's with [`Trainable::Full`]).
fn optimizer(model: &CausalLm, trainable: &Trainable<'_>, cfg: &SftConfig) -> Result<AdamW> {
    if let Trainable::Full = trainable {
        for (_, p) in model.named_parameters() {
            let _ = p.shallow_clone().set_requires_grad(true);
        }
    }
    let mut opt = AdamW::new(AdamWConfig {
        lr: cfg.lr,
        beta1: cfg.beta1,
        beta2: cfg.beta2,
        eps: cfg.eps,
        weight_decay: cfg.weight_decay,
    })?;
    for (k, p) in named_trainables(model, trainable) {
        opt.add(k, p)?;
    }
    Ok(opt)
}

/// Loads the latest checkpoint in `out` (weights and optimizer state) if there is one of this
/// run; returns the step to go on from (0 for a fresh run).
fn resume(
    model: &CausalLm,
    trainable: &Trainable<'_>,
    opt: &mut AdamW,
    cfg: &SftConfig,
    info: &DataInfo,
    total: u64,
    out: &Path,
) -> Result<u64> {
    std::fs::create_dir_all(out).map_err(|source| Error::Io {
        path: out.to_path_buf(),
        source,
    })?;
    let Some((n, dir)) = list_checkpoints(out)?.into_iter().next_back() else {
        return Ok(0);
    };
    let rec = TrainingRecord::load(&dir)?;
    if rec.config != *cfg || rec.data_hash != info.data_hash || rec.total_steps != total {
        return Err(Error::input(format!(
            "{} holds checkpoints of a different run (other data or settings); use a new output folder",
            out.display()
        )));
    }
    load_into(
        &dir.join(weights_file(trainable)),
        &named_trainables(model, trainable),
    )?;
    opt.load(dir.join(optimsyn_optim::state::FILE_NAME))?;
    tracing::info!(step = n, dir = %dir.display(), "resuming from checkpoint");
    Ok(n)
}

/// Forward and backward of one micro-batch (LoRA dropout keyed by each row's id and the step);
/// returns its share of the step's loss.
fn micro_batch_backward(
    model: &CausalLm,
    lora: Option<&LoraAdapter>,
    rows: &[&TrainExample],
    cfg: &SftConfig,
    step: u64,
    norm: f64,
) -> Result<f64> {
    let seqs: Vec<MaskedSeq<'_>> = rows.iter().map(|e| e.seq()).collect();
    let batch = LossBatch::new(&seqs, model.device())?;
    let per = {
        let _dropout = lora
            .map(|a| {
                let keys: Vec<u64> = rows.iter().map(|e| row_key(&e.id)).collect();
                a.dropout((cfg.seed, step), &keys)
            })
            .transpose()?;
        match cfg.loss {
            LossReduction::SampleMean => model.per_sample_loss(&batch),
            LossReduction::TokenMean => model.masked_nll_sums(&batch),
        }
    };
    let loss = per?
        .f_sum(tch::Kind::Float)
        .and_then(|l| l.f_div_scalar(norm))
        .op("SFT loss")?;
    let v = loss.double_value(&[]);
    if !v.is_finite() {
        let ids: Vec<&str> = rows.iter().map(|e| e.id.as_str()).collect();
        return Err(Error::NonFiniteLoss {
            step: step + 1,
            value: v,
            ids: ids.join(", "),
        });
    }
    loss.f_backward().op("SFT backward")?;
    Ok(v)
}

/// Copies the files of the last checkpoint into `out` itself, so the folder is an adapter (or
/// model) folder. Files only: tools may keep folders of their own in a checkpoint (influence
/// features).
fn copy_last_checkpoint(out: &Path) -> Result<()> {
    let Some((_, last)) = list_checkpoints(out)?.into_iter().next_back() else {
        return Ok(());
    };
    let entries = std::fs::read_dir(&last).map_err(|source| Error::Io {
        path: last.clone(),
        source,
    })?;
    for entry in entries.flatten() {
        if !entry.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        let to = out.join(entry.file_name());
        let bytes = std::fs::read(entry.path()).map_err(|source| Error::Io {
            path: entry.path(),
            source,
        })?;
        crate::save::write_atomic(&to, &bytes)?;
    }
    Ok(())
}

fn save_checkpoint(
    model: &CausalLm,
    trainable: &Trainable<'_>,
    opt: &AdamW,
    rec: &TrainingRecord,
    dir: &Path,
) -> Result<()> {
    let tmp = dir.with_extension("tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|source| Error::Io {
            path: tmp.clone(),
            source,
        })?;
    }
    match trainable {
        Trainable::Lora(a) => a.save(&tmp)?,
        Trainable::Full => model.save_pretrained(&tmp)?,
    }
    opt.save(tmp.join(optimsyn_optim::state::FILE_NAME))?;
    let json = serde_json::to_vec_pretty(rec).map_err(|e| Error::input(e.to_string()))?;
    crate::save::write_atomic(&tmp.join(TRAINING_FILE), &json)?;
    crate::save::publish_dir(&tmp, dir)
}

/// Validation loss of one group of examples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalGroup {
    /// Mean over examples of each example's mean token loss.
    pub loss: f64,
    /// Examples scored.
    pub examples: usize,
}

/// Validation loss overall and per subtask.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// All scored examples.
    pub overall: EvalGroup,
    /// By `subtask` (examples without one are under `""`).
    pub subtasks: BTreeMap<String, EvalGroup>,
    /// Rows skipped for having no loss token.
    pub skipped: usize,
}

/// Per-sample mean token loss of every example (no gradients, dropout off), averaged overall and
/// per subtask. Batched under `max_batch_tokens`; results do not depend on batching.
pub fn evaluate(
    model: &CausalLm,
    data: &[TrainExample],
    max_batch_tokens: usize,
) -> Result<EvalReport> {
    let _g = tch::no_grad_guard();
    let kept: Vec<&TrainExample> = data
        .iter()
        .filter(|e| e.loss_tokens() > 0 && e.tokens.len() >= 2)
        .collect();
    let idx: Vec<usize> = (0..kept.len()).collect();
    let mut losses = vec![0f64; kept.len()];
    for mb in token_budget_batches(&idx, |i| kept[i].tokens.len(), max_batch_tokens) {
        let rows: Vec<MaskedSeq<'_>> = mb.iter().map(|&i| kept[i].seq()).collect();
        let batch = LossBatch::new(&rows, model.device())?;
        let per = crate::generate::to_vec_f32(&model.per_sample_loss(&batch)?)?;
        for (&i, l) in mb.iter().zip(per) {
            losses[i] = f64::from(l);
        }
    }
    let mut groups: BTreeMap<String, (f64, usize)> = BTreeMap::new();
    for (e, l) in kept.iter().zip(&losses) {
        let g = groups
            .entry(e.subtask.clone().unwrap_or_default())
            .or_default();
        g.0 += l;
        g.1 += 1;
    }
    let n = kept.len();
    let overall = EvalGroup {
        loss: if n > 0 {
            losses.iter().sum::<f64>() / n as f64
        } else {
            f64::NAN
        },
        examples: n,
    };
    Ok(EvalReport {
        overall,
        subtasks: groups
            .into_iter()
            .map(|(k, (s, n))| {
                (
                    k,
                    EvalGroup {
                        loss: s / n as f64,
                        examples: n,
                    },
                )
            })
            .collect(),
        skipped: data.len() - n,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(id: &str, len: usize) -> TrainExample {
        TrainExample {
            id: id.into(),
            tokens: vec![1; len],
            loss_mask: vec![1; len],
            subtask: None,
        }
    }

    #[test]
    fn micro_batches_respect_the_token_budget_and_keep_order() {
        let data = [ex("a", 10), ex("b", 30), ex("c", 5), ex("d", 40)];
        let refs: Vec<&TrainExample> = data.iter().collect();
        let mb = token_budget_batches(&[0, 1, 2, 3], |i| refs[i].tokens.len(), 64);
        assert_eq!(mb, vec![vec![0, 1], vec![2], vec![3]]);
        for b in &mb {
            let longest = b
                .iter()
                .map(|&i| data[i].tokens.len())
                .max()
                .expect("non-empty micro-batch");
            assert!(longest * b.len() <= 64);
        }
    }

    #[test]
    fn plan_is_a_permutation_per_epoch_and_seeded() {
        let cfg = SftConfig {
            epochs: 2,
            batch_size: 3,
            ..Default::default()
        };
        let steps = plan_steps(7, &cfg);
        assert_eq!(steps.len(), 6);
        for e in 0..2 {
            let mut seen: Vec<usize> = steps
                .iter()
                .filter(|s| s.0 == e)
                .flat_map(|s| s.1.clone())
                .collect();
            seen.sort_unstable();
            assert_eq!(seen, (0..7).collect::<Vec<_>>());
        }
        assert_eq!(steps, plan_steps(7, &cfg));
        assert_ne!(steps, plan_steps(7, &SftConfig { seed: 1, ..cfg }));
    }

    #[test]
    fn checkpoints_are_evenly_spaced_and_end_at_the_last_step() {
        let cfg = SftConfig {
            checkpoints: 3,
            ..Default::default()
        };
        assert_eq!(checkpoint_steps(&cfg, 10), vec![3, 7, 10]);
        let cfg = SftConfig {
            checkpoints: 1,
            save_every: Some(4),
            ..Default::default()
        };
        assert_eq!(checkpoint_steps(&cfg, 10), vec![4, 8, 10]);
    }
}
