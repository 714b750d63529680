//! `optimsyn sft` and `optimsyn eval`: fine-tune a model on chat examples, and measure its
//! validation loss.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use optimsyn_data_io::{
    ChatExample, ChatFormat, ChatTokenizer, JsonlReader, ModelFolder, file_hash,
};
use optimsyn_lm::lora::TargetModules;
use optimsyn_lm::sft::{self, TRAINING_FILE};
use optimsyn_lm::{
    CausalLm, DataInfo, LoraAdapter, LoraConfig, LossReduction, ScheduleKind, SftConfig,
    TrainExample, Trainable, TrainingRecord,
};
use optimsyn_pipeline::{DeviceName, Dtype};

/// Arguments of `sft`.
#[derive(Args)]
pub struct SftArgs {
    /// Base model folder (Hugging Face layout).
    #[arg(long, alias = "target")]
    pub model: PathBuf,
    /// Training chat examples (JSONL with `messages`).
    #[arg(long)]
    pub data: PathBuf,
    /// Output folder: checkpoints, metrics.jsonl, and the final adapter (or model).
    #[arg(long)]
    pub out: PathBuf,
    /// How examples become tokens: `chat-template` (the model's) or `tulu` (LESS's)
    /// [sft: chat-template; warmup: tulu].
    #[arg(long)]
    pub format: Option<ChatFormat>,
    /// Truncate examples to this many tokens.
    #[arg(long)]
    pub max_len: Option<usize>,
    /// Train every weight instead of a LoRA adapter.
    #[arg(long)]
    pub full: bool,
    #[command(flatten)]
    pub lora: LoraArgs,
    #[command(flatten)]
    pub opt: OptArgs,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceName,
    /// Compute dtype: `f32`, `bf16` or `f16`.
    #[arg(long, default_value = "f32")]
    pub dtype: Dtype,
}

/// LoRA flags (PEFT's names); unset flags take the command's defaults.
#[derive(Args, Clone)]
pub struct LoraArgs {
    /// LoRA rank [sft: 8; warmup: 128].
    #[arg(long)]
    pub lora_r: Option<usize>,
    /// LoRA alpha, scale alpha / r [sft: 16; warmup: 512].
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    /// Dropout on the adapter's input while training [sft: 0; warmup: 0.1].
    #[arg(long)]
    pub lora_dropout: Option<f64>,
    /// Comma-separated module names (PEFT suffix match), or `all-linear` [q_proj,k_proj,v_proj,o_proj].
    #[arg(long)]
    pub lora_targets: Option<String>,
    /// Rank-stabilized scaling alpha / sqrt(r).
    #[arg(long)]
    pub use_rslora: bool,
}

impl LoraArgs {
    /// The adapter configuration: these flags over `defaults`.
    pub fn config(&self, base: &Path, defaults: &LoraConfig) -> LoraConfig {
        LoraConfig {
            r: self.lora_r.unwrap_or(defaults.r),
            alpha: self.lora_alpha.unwrap_or(defaults.alpha),
            dropout: self.lora_dropout.unwrap_or(defaults.dropout),
            target_modules: match &self.lora_targets {
                Some(t) => {
                    TargetModules::List(t.split(',').map(|s| s.trim().to_string()).collect())
                }
                None => defaults.target_modules.clone(),
            },
            use_rslora: self.use_rslora || defaults.use_rslora,
            base_model: Some(base.display().to_string()),
            ..defaults.clone()
        }
    }
}

/// Optimizer and loop flags; unset flags take the command's defaults.
#[derive(Args, Clone)]
pub struct OptArgs {
    /// Peak learning rate [sft: 1e-4; warmup: 1e-5].
    #[arg(long)]
    pub lr: Option<f64>,
    /// Decoupled weight decay [0].
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// `constant`, `linear` or `cosine` after warm-up [linear].
    #[arg(long)]
    pub schedule: Option<ScheduleKind>,
    /// Fraction of steps spent warming up [0.03].
    #[arg(long)]
    pub warmup_ratio: Option<f64>,
    /// Passes over the data [1].
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Examples per optimizer step [8].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Most padded tokens per forward pass; bigger steps accumulate gradients [4096].
    #[arg(long)]
    pub max_batch_tokens: Option<usize>,
    /// Clip the gradient norm; 0 turns clipping off [1.0].
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    /// `sample-mean` (each example's mean token loss, averaged) or `token-mean` [sample-mean].
    #[arg(long)]
    pub loss: Option<LossReduction>,
    /// Seed of the data order, dropout and LoRA init [0].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Number of evenly spaced checkpoints, the last at the end [1].
    #[arg(long)]
    pub checkpoints: Option<usize>,
    /// Also checkpoint every N steps.
    #[arg(long)]
    pub save_every: Option<u64>,
}

impl OptArgs {
    /// The SFT configuration: these flags over `d`.
    pub fn config(&self, d: &SftConfig) -> SftConfig {
        SftConfig {
            lr: self.lr.unwrap_or(d.lr),
            weight_decay: self.weight_decay.unwrap_or(d.weight_decay),
            schedule: self.schedule.unwrap_or(d.schedule),
            warmup_ratio: self.warmup_ratio.unwrap_or(d.warmup_ratio),
            epochs: self.epochs.unwrap_or(d.epochs),
            batch_size: self.batch_size.unwrap_or(d.batch_size),
            max_batch_tokens: self.max_batch_tokens.unwrap_or(d.max_batch_tokens),
            max_grad_norm: match self.max_grad_norm {
                Some(m) => (m > 0.0).then_some(m),
                None => d.max_grad_norm,
            },
            loss: self.loss.unwrap_or(d.loss),
            seed: self.seed.unwrap_or(d.seed),
            checkpoints: self.checkpoints.unwrap_or(d.checkpoints),
            save_every: self.save_every.or(d.save_every),
            ..d.clone()
        }
    }
}

/// Reads and encodes chat examples; row ids default to their position.
pub fn encode_file(
    tok: &ChatTokenizer,
    path: &Path,
    format: ChatFormat,
    max_len: Option<usize>,
) -> anyhow::Result<Vec<TrainExample>> {
    let mut out = Vec::new();
    for (i, row) in JsonlReader::<ChatExample>::open(path)?.enumerate() {
        let mut ex = row?;
        let id = ex.id.get_or_insert_with(|| i.to_string()).clone();
        let enc = tok
            .encode_example(&ex, format, max_len, &Default::default())
            .with_context(|| format!("{}: row {}", path.display(), i + 1))?;
        out.push(TrainExample {
            id,
            tokens: enc.tokens,
            loss_mask: enc.loss_mask,
            subtask: ex.subtask,
        });
    }
    anyhow::ensure!(!out.is_empty(), "{}: no rows", path.display());
    Ok(out)
}

/// Trains, with a progress bar; returns the report. Shared by `sft` and `warmup`.
pub fn run_sft(
    a: &SftArgs,
    lora_defaults: &LoraConfig,
    sft_defaults: &SftConfig,
) -> anyhow::Result<optimsyn_lm::SftReport> {
    let opts = super::load_options(a.device, a.dtype)?;
    let tok = ChatTokenizer::from_model_dir(&a.model)?;
    let format = a.format.unwrap_or_default();
    let data = encode_file(&tok, &a.data, format, a.max_len)?;
    let folder = ModelFolder::open(&a.model)?;
    let mut model = CausalLm::from_folder(&folder, opts)?;
    let cfg = a.opt.config(sft_defaults);
    let info = DataInfo {
        format: Some(format),
        data_hash: Some(file_hash(&a.data)?),
        data_path: Some(a.data.display().to_string()),
    };
    let adapter;
    let trainable = if a.full {
        Trainable::Full
    } else {
        adapter = LoraAdapter::init(&mut model, a.lora.config(&a.model, lora_defaults), cfg.seed)?;
        tracing::info!(
            params = adapter.num_parameters(),
            modules = adapter.modules().len(),
            "LoRA adapter"
        );
        Trainable::Lora(&adapter)
    };
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} sft [{bar:30}] {pos}/{len} steps {msg} ({elapsed}, eta {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let report = sft::train(
        &mut model,
        trainable,
        &data,
        &cfg,
        &info,
        &a.out,
        &mut |m| {
            bar.set_length(m.total_steps);
            bar.set_position(m.step);
            bar.set_message(format!("loss {:.4} lr {:.2e}", m.loss, m.lr));
        },
    )?;
    bar.finish_and_clear();
    if report.skipped > 0 {
        tracing::warn!(
            skipped = report.skipped,
            "rows without an assistant turn (no loss tokens) were skipped"
        );
    }
    Ok(report)
}

/// Runs `sft` (LoRA r 8 / alpha 16 and lr 1e-4 unless told otherwise).
pub fn sft(a: SftArgs) -> anyhow::Result<()> {
    summarize(
        &a,
        run_sft(&a, &LoraConfig::default(), &SftConfig::default())?,
    )
}

/// `warmup`'s defaults: the released OptimSyn warm-up (LoRA r 128, alpha 512, dropout 0.1 on
/// q/k/v/o; lr 1e-5, linear with 3 % warm-up, 1 epoch; the Tulu format).
pub fn warmup_defaults() -> (LoraConfig, SftConfig) {
    let lora = LoraConfig {
        r: 128,
        alpha: 512.0,
        dropout: 0.1,
        ..Default::default()
    };
    let sft = SftConfig {
        lr: 1e-5,
        ..Default::default()
    };
    (lora, sft)
}

/// Runs `warmup`: `sft` with the warm-up's defaults and the Tulu format, keeping its checkpoints
/// (`OUT/checkpoint-N/`) for `influence score`.
pub fn warmup(mut a: SftArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        !a.full,
        "warmup trains a LoRA adapter (influence is computed on its matrices); drop --full"
    );
    a.format = Some(a.format.unwrap_or(ChatFormat::Tulu));
    let (lora, sft) = warmup_defaults();
    summarize(&a, run_sft(&a, &lora, &sft)?)
}

fn summarize(a: &SftArgs, report: optimsyn_lm::SftReport) -> anyhow::Result<()> {
    let summary = serde_json::json!({
        "out": a.out.display().to_string(),
        "steps": report.steps,
        "resumed_from": report.resumed_from,
        "skipped": report.skipped,
        "last_loss": report.last_loss,
        "checkpoints": report.checkpoints.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
    });
    println!("{summary}");
    Ok(())
}

/// Arguments of `eval`.
#[derive(Args)]
pub struct EvalArgs {
    /// Model folder.
    #[arg(long)]
    model: PathBuf,
    /// A LoRA adapter (PEFT layout), or a full model folder written by `sft --full` (pass it as `--model`).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Validation chat examples (JSONL with `messages`, optional `subtask`).
    #[arg(long)]
    data: PathBuf,
    /// Rendering format; default: the adapter's training format (training.json), else chat-template.
    #[arg(long)]
    format: Option<ChatFormat>,
    /// Truncate examples to this many tokens.
    #[arg(long)]
    max_len: Option<usize>,
    /// Most padded tokens per forward pass.
    #[arg(long, default_value_t = 4096)]
    max_batch_tokens: usize,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: DeviceName,
    /// Compute dtype: `f32`, `bf16` or `f16`.
    #[arg(long, default_value = "f32")]
    dtype: Dtype,
}

/// Runs `eval`: prints `{"loss", "examples", "subtasks": {name: {"loss", "examples"}}, "skipped"}`.
pub fn eval(a: EvalArgs) -> anyhow::Result<()> {
    let opts = super::load_options(a.device, a.dtype)?;
    let tok = ChatTokenizer::from_model_dir(&a.model)?;
    let recorded = match &a.adapter {
        Some(dir) if dir.join(TRAINING_FILE).exists() => TrainingRecord::load(dir)?.format,
        _ => None,
    };
    let format = a.format.or(recorded).unwrap_or_default();
    let data = encode_file(&tok, &a.data, format, a.max_len)?;
    let mut model = CausalLm::load(&a.model, opts)?;
    if let Some(dir) = &a.adapter {
        LoraAdapter::load(&mut model, dir)?;
    }
    let r = sft::evaluate(&model, &data, a.max_batch_tokens)?;
    let out = serde_json::json!({
        "format": format,
        "loss": r.overall.loss,
        "examples": r.overall.examples,
        "skipped": r.skipped,
        "subtasks": r.subtasks,
    });
    println!("{out}");
    Ok(())
}
