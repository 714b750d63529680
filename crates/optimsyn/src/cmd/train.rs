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

/// Arguments of `sft`.
#[derive(Args)]
pub struct SftArgs {
    /// Base model folder (Hugging Face layout).
    #[arg(long)]
    pub model: PathBuf,
    /// Training chat examples (JSONL with `messages`).
    #[arg(long)]
    pub data: PathBuf,
    /// Output folder: checkpoints, metrics.jsonl, and the final adapter (or model).
    #[arg(long)]
    pub out: PathBuf,
    /// How examples become tokens: `chat-template` (the model's) or `tulu` (LESS's).
    #[arg(long, default_value = "chat-template")]
    pub format: ChatFormat,
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
    pub device: String,
    /// Compute dtype: `f32`, `bf16` or `f16`.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

/// LoRA flags (PEFT's names).
#[derive(Args, Clone)]
pub struct LoraArgs {
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    pub lora_r: usize,
    /// LoRA alpha (scale alpha / r).
    #[arg(long, default_value_t = 16.0)]
    pub lora_alpha: f64,
    /// Dropout on the adapter's input while training.
    #[arg(long, default_value_t = 0.0)]
    pub lora_dropout: f64,
    /// Comma-separated module names (PEFT suffix match), or `all-linear`.
    #[arg(long, default_value = "q_proj,k_proj,v_proj,o_proj")]
    pub lora_targets: String,
    /// Rank-stabilized scaling alpha / sqrt(r).
    #[arg(long)]
    pub use_rslora: bool,
}

impl LoraArgs {
    /// The adapter configuration these flags describe.
    pub fn config(&self, base: &Path) -> LoraConfig {
        LoraConfig {
            r: self.lora_r,
            alpha: self.lora_alpha,
            dropout: self.lora_dropout,
            target_modules: TargetModules::List(
                self.lora_targets
                    .split(',')
                    .map(|s| s.trim().to_string())
                    .collect(),
            ),
            use_rslora: self.use_rslora,
            base_model: Some(base.display().to_string()),
            ..Default::default()
        }
    }
}

/// Optimizer and loop flags.
#[derive(Args, Clone)]
pub struct OptArgs {
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-4)]
    pub lr: f64,
    /// Decoupled weight decay.
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// `constant`, `linear` or `cosine` (after warm-up).
    #[arg(long, default_value = "linear")]
    pub schedule: ScheduleKind,
    /// Fraction of steps spent warming up.
    #[arg(long, default_value_t = 0.03)]
    pub warmup_ratio: f64,
    /// Passes over the data.
    #[arg(long, default_value_t = 1)]
    pub epochs: usize,
    /// Examples per optimizer step.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Most padded tokens per forward pass (bigger steps accumulate gradients).
    #[arg(long, default_value_t = 4096)]
    pub max_batch_tokens: usize,
    /// Clip the gradient norm (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// `sample-mean` (each example's mean token loss, averaged) or `token-mean`.
    #[arg(long, default_value = "sample-mean")]
    pub loss: LossReduction,
    /// Seed of the data order and dropout.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Number of evenly spaced checkpoints (the last at the end).
    #[arg(long, default_value_t = 1)]
    pub checkpoints: usize,
    /// Also checkpoint every N steps.
    #[arg(long)]
    pub save_every: Option<u64>,
}

impl OptArgs {
    /// The SFT configuration these flags describe.
    pub fn config(&self) -> SftConfig {
        SftConfig {
            lr: self.lr,
            weight_decay: self.weight_decay,
            schedule: self.schedule,
            warmup_ratio: self.warmup_ratio,
            epochs: self.epochs,
            batch_size: self.batch_size,
            max_batch_tokens: self.max_batch_tokens,
            max_grad_norm: (self.max_grad_norm > 0.0).then_some(self.max_grad_norm),
            loss: self.loss,
            seed: self.seed,
            checkpoints: self.checkpoints,
            save_every: self.save_every,
            ..Default::default()
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
pub fn run_sft(a: &SftArgs) -> anyhow::Result<optimsyn_lm::SftReport> {
    let opts = super::load_options(&a.device, &a.dtype)?;
    let tok = ChatTokenizer::from_model_dir(&a.model)?;
    let data = encode_file(&tok, &a.data, a.format, a.max_len)?;
    let folder = ModelFolder::open(&a.model)?;
    let mut model = CausalLm::from_folder(&folder, opts)?;
    let cfg = a.opt.config();
    let info = DataInfo {
        format: Some(a.format),
        data_hash: Some(file_hash(&a.data)?),
        data_path: Some(a.data.display().to_string()),
    };
    let adapter;
    let trainable = if a.full {
        Trainable::Full
    } else {
        adapter = LoraAdapter::init(&mut model, a.lora.config(&a.model), a.opt.seed)?;
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

/// Runs `sft`.
pub fn sft(a: SftArgs) -> anyhow::Result<()> {
    let report = run_sft(&a)?;
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
    device: String,
    /// Compute dtype: `f32`, `bf16` or `f16`.
    #[arg(long, default_value = "f32")]
    dtype: String,
}

/// Runs `eval`: prints `{"loss", "examples", "subtasks": {name: {"loss", "examples"}}, "skipped"}`.
pub fn eval(a: EvalArgs) -> anyhow::Result<()> {
    let opts = super::load_options(&a.device, &a.dtype)?;
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
