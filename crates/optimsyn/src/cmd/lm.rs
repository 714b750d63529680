//! `optimsyn lm logprobs` and `optimsyn lm generate`: the model side, row by row.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use optimsyn_data_io::{ChatMessage, ChatTokenizer, JsonlReader, ModelFolder, jsonl::parse_row};
use optimsyn_lm::{CausalLm, LoadOptions, LoraAdapter, SamplingParams, row_key};
use optimsyn_pipeline::{DeviceName, Dtype};
use serde::Deserialize;
use serde_json::{Map, Value, json};

/// Language-model commands.
#[derive(Subcommand)]
pub enum LmCommand {
    /// Per-token log-probs of each row: `{"id", "tokens", "logprobs"}` with
    /// `logprobs[i] = log p(tokens[i+1] | tokens[..=i])`.
    Logprobs(LogprobsArgs),
    /// Continue each row: `{"id", "completion", "tokens", "logprobs", "finish_reason"}` with the
    /// generated tokens only and each one's own log-prob at the sampling temperature.
    Generate(GenerateArgs),
}

/// Where the model lives and how it computes.
#[derive(Args)]
pub struct ModelArgs {
    /// Hugging Face model folder (config.json, safetensors, tokenizer.json, chat template).
    #[arg(long)]
    model: PathBuf,
    /// A PEFT LoRA adapter folder to apply (adapter_config.json, adapter_model.safetensors).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: DeviceName,
    /// Compute dtype: `f32`, `bf16` or `f16`.
    #[arg(long, default_value = "f32")]
    dtype: Dtype,
    /// Rows per forward pass.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Chat-template keyword arguments as a JSON object, e.g. '{"enable_thinking": false}'.
    #[arg(long, default_value = "{}")]
    template_kwargs: String,
}

/// Arguments of `lm logprobs`.
#[derive(Args)]
pub struct LogprobsArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Rows `{"id", "text"}` or `{"id", "messages"}` (JSONL).
    #[arg(long)]
    input: PathBuf,
    /// Output file (default: standard output).
    #[arg(long)]
    output: Option<PathBuf>,
    /// Temperature of `log_softmax(logits / T)` (1: the model's own distribution).
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
}

/// Arguments of `lm generate`.
#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompts `{"id", "text"}` (raw) or `{"id", "messages"}` (rendered with the generation prompt).
    #[arg(long)]
    input: PathBuf,
    /// Output file (default: standard output).
    #[arg(long)]
    output: Option<PathBuf>,
    /// Most new tokens per row (the stop token included).
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Nucleus mass in (0, 1].
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// Keep only the k most probable tokens (0: all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Run seed; each row's stream is keyed by (seed, row id), so results do not depend on batching.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// Runs an `lm` subcommand.
pub fn run(cmd: LmCommand) -> anyhow::Result<()> {
    match cmd {
        LmCommand::Logprobs(a) => logprobs(a),
        LmCommand::Generate(a) => generate(a),
    }
}

/// One input row: an id and either raw text or a conversation.
#[derive(Deserialize)]
struct RawRow {
    #[serde(default)]
    id: Option<Value>,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    messages: Option<Vec<ChatMessage>>,
}

enum Content {
    Text(String),
    Messages(Vec<ChatMessage>),
}

struct Row {
    id: String,
    /// 1-based position among the file's rows, for error messages.
    row: usize,
    content: Content,
}

fn parse_prompt_row(bytes: &[u8]) -> Result<RawRow, String> {
    let row: RawRow = parse_row(bytes)?;
    match (&row.text, &row.messages) {
        (Some(_), Some(_)) => Err("has both `text` and `messages`; give one".into()),
        (None, None) => Err("needs a `text` string or a `messages` list".into()),
        (_, Some(m)) if m.is_empty() => Err("field `messages`: empty list".into()),
        _ => Ok(row),
    }
}

/// Reads every row (ids default to the row's position, as `data render` does).
fn read_rows(path: &Path) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    for (i, r) in JsonlReader::with_parser(path, parse_prompt_row)?.enumerate() {
        let r = r?;
        let id = match r.id {
            None | Some(Value::Null) => i.to_string(),
            Some(Value::String(s)) => s,
            Some(Value::Number(n)) => n.to_string(),
            Some(other) => bail!(
                "{}: row {}: field `id`: expected a string or number, got {other}",
                path.display(),
                i + 1
            ),
        };
        let content = match (r.text, r.messages) {
            (Some(t), _) => Content::Text(t),
            (None, Some(m)) => Content::Messages(m),
            (None, None) => unreachable!("rejected by parse_prompt_row"),
        };
        rows.push(Row {
            id,
            row: i + 1,
            content,
        });
    }
    Ok(rows)
}

fn load_options(a: &ModelArgs) -> anyhow::Result<LoadOptions> {
    anyhow::ensure!(a.batch_size > 0, "--batch-size must be at least 1");
    super::load_options(a.device, a.dtype)
}

struct Loaded {
    model: CausalLm,
    tokenizer: ChatTokenizer,
    kwargs: Map<String, Value>,
}

fn load(a: &ModelArgs) -> anyhow::Result<Loaded> {
    let opts = load_options(a)?;
    let kwargs: Map<String, Value> = serde_json::from_str(&a.template_kwargs)
        .context("--template-kwargs must be a JSON object")?;
    // Tokenizer first: it is the cheaper file to find missing.
    let tokenizer = ChatTokenizer::from_model_dir(&a.model)?;
    let folder = ModelFolder::open(&a.model)?;
    let mut model = CausalLm::from_folder(&folder, opts)?;
    if let Some(dir) = &a.adapter {
        // The adapter stays attached to the model's layers after this handle is dropped.
        LoraAdapter::load(&mut model, dir)?;
    }
    Ok(Loaded {
        model,
        tokenizer,
        kwargs,
    })
}

impl Loaded {
    /// Token ids of a row: raw text as `tokenizer(text)`, a conversation rendered by the chat
    /// template and encoded once without special tokens.
    fn encode(&self, row: &Row, generation_prompt: bool, input: &Path) -> anyhow::Result<Vec<u32>> {
        let ids = match &row.content {
            Content::Text(t) => self.tokenizer.encode_text(t),
            Content::Messages(m) => self
                .tokenizer
                .render_chat_with(m, generation_prompt, &self.kwargs)
                .and_then(|r| self.tokenizer.encode_rendered(&r.text)),
        };
        ids.with_context(|| format!("{}: row {} (id {})", input.display(), row.row, row.id))
    }
}

fn logprobs(a: LogprobsArgs) -> anyhow::Result<()> {
    let rows = read_rows(&a.input)?;
    let lm = load(&a.model)?;
    let mut out = super::output(a.output.as_deref())?;
    let encoded: Vec<Vec<u32>> = rows
        .iter()
        .map(|r| lm.encode(r, false, &a.input))
        .collect::<anyhow::Result<_>>()?;
    for (i, ids) in encoded.iter().enumerate() {
        let r = &rows[i];
        anyhow::ensure!(
            ids.len() >= 2,
            "{}: row {} (id {}): encodes to {} token(s); log-probs need at least 2",
            a.input.display(),
            r.row,
            r.id,
            ids.len()
        );
    }
    for (chunk_rows, chunk) in rows
        .chunks(a.model.batch_size)
        .zip(encoded.chunks(a.model.batch_size))
    {
        let seqs: Vec<&[u32]> = chunk.iter().map(Vec::as_slice).collect();
        let lps = lm
            .model
            .sequence_logprobs(&seqs, a.temperature)
            .with_context(|| {
                format!(
                    "{}: rows {}..={}",
                    a.input.display(),
                    chunk_rows[0].row,
                    chunk_rows[chunk_rows.len() - 1].row
                )
            })?;
        for ((r, ids), lp) in chunk_rows.iter().zip(chunk).zip(lps) {
            super::write_row(
                &mut out,
                &json!({"id": r.id, "tokens": ids, "logprobs": lp}),
            )?;
        }
    }
    out.flush()?;
    Ok(())
}

fn generate(a: GenerateArgs) -> anyhow::Result<()> {
    let rows = read_rows(&a.input)?;
    let lm = load(&a.model)?;
    let mut stop = lm.model.eos_token_ids().to_vec();
    for t in lm.tokenizer.eos_token_ids() {
        if !stop.contains(&t) {
            stop.push(t);
        }
    }
    let params = SamplingParams {
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        top_p: a.top_p,
        top_k: a.top_k,
        seed: a.seed,
        stop_tokens: stop,
    };
    params.validate()?;
    let encoded: Vec<Vec<u32>> = rows
        .iter()
        .map(|r| lm.encode(r, true, &a.input))
        .collect::<anyhow::Result<_>>()?;
    let mut out = super::output(a.output.as_deref())?;
    for (chunk_rows, chunk) in rows
        .chunks(a.model.batch_size)
        .zip(encoded.chunks(a.model.batch_size))
    {
        let prompts: Vec<&[u32]> = chunk.iter().map(Vec::as_slice).collect();
        let keys: Vec<u64> = chunk_rows.iter().map(|r| row_key(&r.id)).collect();
        let gens = lm
            .model
            .generate(&prompts, &keys, &params)
            .with_context(|| {
                format!(
                    "{}: rows {}..={}",
                    a.input.display(),
                    chunk_rows[0].row,
                    chunk_rows[chunk_rows.len() - 1].row
                )
            })?;
        for (r, g) in chunk_rows.iter().zip(gens) {
            let completion = lm.tokenizer.decode(&g.tokens, true)?;
            super::write_row(
                &mut out,
                &json!({"id": r.id, "completion": completion, "tokens": g.tokens, "logprobs": g.logprobs,
                        "finish_reason": g.finish_reason}),
            )?;
        }
        // Rows already written stay written if a later batch fails.
        out.flush()?;
    }
    Ok(())
}
