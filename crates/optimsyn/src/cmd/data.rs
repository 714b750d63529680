//! `optimsyn data render`: what exactly gets trained on.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use optimsyn_data_io::{ChatExample, ChatFormat, ChatTokenizer, JsonlReader};

/// Dataset inspection.
#[derive(Subcommand)]
pub enum DataCommand {
    /// Print, per row, `{"id", "tokens", "loss_mask"}` as training would see it.
    Render(RenderArgs),
}

/// Arguments of `data render`.
#[derive(Args)]
pub struct RenderArgs {
    /// Model folder (tokenizer.json, tokenizer_config.json, chat template).
    #[arg(long)]
    model: PathBuf,
    /// Chat examples (JSONL with `messages`).
    #[arg(long)]
    input: PathBuf,
    /// `chat-template` (the model's template) or `tulu` (LESS's format).
    #[arg(long, default_value = "chat-template")]
    format: ChatFormat,
    /// Truncate to this many tokens (LESS's max_seq_length).
    #[arg(long)]
    max_len: Option<usize>,
    /// Chat-template keyword arguments as a JSON object, e.g. '{"enable_thinking": false}'.
    #[arg(long, default_value = "{}")]
    template_kwargs: String,
    /// Output file (default: standard output).
    #[arg(long)]
    output: Option<PathBuf>,
}

/// Runs a `data` subcommand.
pub fn run(cmd: DataCommand) -> anyhow::Result<()> {
    match cmd {
        DataCommand::Render(a) => render(a),
    }
}

fn render(a: RenderArgs) -> anyhow::Result<()> {
    let tok = ChatTokenizer::from_model_dir(&a.model)?;
    let kwargs: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&a.template_kwargs)
            .context("--template-kwargs must be a JSON object")?;
    let mut out = super::output(a.output.as_deref())?;
    for (i, row) in JsonlReader::<ChatExample>::open(&a.input)?.enumerate() {
        let mut ex = row?;
        // Rows without an id are named by their position, so output lines map back to input rows.
        let id = ex.id.get_or_insert_with(|| i.to_string()).clone();
        let enc = tok
            .encode_example(&ex, a.format, a.max_len, &kwargs)
            .with_context(|| format!("{}: row {}", a.input.display(), i + 1))?;
        super::write_row(
            &mut out,
            &serde_json::json!({"id": id, "tokens": enc.tokens, "loss_mask": enc.loss_mask}),
        )?;
    }
    out.flush()?;
    Ok(())
}
