//! `optimsyn data render`: what exactly gets trained on; `data decontaminate` and `data dedup`:
//! any JSONL checked against evaluation sets, or for duplicates, streaming.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};
use optimsyn_data_io::{ChatExample, ChatFormat, ChatTokenizer, JsonlReader};
use optimsyn_hygiene::{DatasetCard, Duplicate, Flagged, OnContaminated, ScreenSettings};

/// Dataset inspection.
#[derive(Subcommand)]
pub enum DataCommand {
    /// Print, per row, `{"id", "tokens", "loss_mask"}` as training would see it.
    Render(RenderArgs),
    /// Flag or drop rows whose text overlaps evaluation sets (word n-grams of normalised text).
    Decontaminate(DecontaminateArgs),
    /// Drop exact and near-duplicate rows (MinHash over word pairs), keeping the first of each.
    Dedup(DedupArgs),
}

/// Arguments of `data decontaminate`.
#[derive(Args)]
pub struct DecontaminateArgs {
    /// Rows to check (JSONL: `messages`, or `question`/`answer`/`prompt`/`text`… fields).
    #[arg(long)]
    input: PathBuf,
    /// Evaluation sets to check against (repeat the flag for several files).
    #[arg(long, required = true)]
    against: Vec<PathBuf>,
    /// Word n-gram length.
    #[arg(long, default_value_t = 13)]
    ngram: usize,
    /// Shortest evaluation prompt (in words) that counts when repeated whole.
    #[arg(long, default_value_t = 3)]
    min_words: usize,
    /// Keep flagged rows in the output (with a `contamination` field) instead of dropping them.
    #[arg(long)]
    keep: bool,
    /// Output file for the kept rows (default: standard output).
    #[arg(long)]
    output: Option<PathBuf>,
    /// Also write the dropped rows, each with its `contamination`, here.
    #[arg(long)]
    rejected: Option<PathBuf>,
}

/// Arguments of `data dedup`.
#[derive(Args)]
pub struct DedupArgs {
    /// Rows to deduplicate (JSONL), kept in order.
    #[arg(long)]
    input: PathBuf,
    /// Estimated Jaccard similarity at which rows are near duplicates.
    #[arg(long, default_value_t = 0.8)]
    threshold: f64,
    /// Shingle length in words.
    #[arg(long, default_value_t = 2)]
    shingle: usize,
    /// Output file for the kept rows (default: standard output).
    #[arg(long)]
    output: Option<PathBuf>,
    /// Also write the dropped rows, each with a `duplicate` field naming the kept row, here.
    #[arg(long)]
    rejected: Option<PathBuf>,
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
        DataCommand::Decontaminate(a) => decontaminate(a),
        DataCommand::Dedup(a) => dedup(a),
    }
}

fn decontaminate(a: DecontaminateArgs) -> anyhow::Result<()> {
    let cfg = optimsyn_hygiene::DecontamConfig {
        ngram: a.ngram,
        min_words: a.min_words,
    };
    let (reference, files) = optimsyn_hygiene::reference_from_files(cfg, &a.against)?;
    let (out_name, rej_name) = outputs(&a.input, a.output.as_deref(), a.rejected.as_deref())?;
    let mut out = super::output(a.output.as_deref())?;
    let mut rejected = a
        .rejected
        .as_deref()
        .map(|p| super::output(Some(p)))
        .transpose()?;
    let mut card = blank_card(a.output.as_deref());
    card.screen.against = files.clone();
    card.screen.ngram = a.ngram;
    card.screen.min_words = a.min_words;
    card.screen.on_contaminated = if a.keep {
        OnContaminated::Keep
    } else {
        OnContaminated::Drop
    };
    let counts = optimsyn_hygiene::decontaminate_file(&reference, &a.input, |mut row, hit| {
        let Some(hit) = hit else {
            return emit(&mut out, &out_name, &row);
        };
        note_overlap(&mut card, &row, &hit);
        row["contamination"] = serde_json::to_value(hit).map_err(json_error)?;
        match (a.keep, rejected.as_mut()) {
            (true, _) => emit(&mut out, &out_name, &row),
            (false, Some(r)) => emit(r, &rej_name, &row),
            (false, None) => Ok(()),
        }
    })?;
    out.flush()?;
    if let Some(r) = rejected.as_mut() {
        r.flush()?;
    }
    let kept = if a.keep {
        counts.rows
    } else {
        counts.rows - counts.flagged
    };
    card.records = counts.rows as usize;
    card.kept = kept as usize;
    card.counts.checked = counts.rows as usize;
    card.counts.contaminated = counts.flagged as usize;
    if !a.keep && counts.flagged > 0 {
        card.counts.contaminated_dropped = counts.flagged as usize;
        card.rejected.insert(
            optimsyn_hygiene::CONTAMINATED.into(),
            counts.flagged as usize,
        );
    }
    if let Some(path) = &a.output {
        card.write_beside(path)?;
    }
    let against: Vec<String> = files
        .iter()
        .map(|f| format!("{} ({} rows)", f.path, f.rows))
        .collect();
    tracing::info!(
        rows = counts.rows,
        flagged = counts.flagged,
        kept,
        "{}: decontaminated against {}",
        a.input.display(),
        against.join(", ")
    );
    Ok(())
}

fn dedup(a: DedupArgs) -> anyhow::Result<()> {
    let cfg = optimsyn_hygiene::DedupConfig {
        threshold: a.threshold,
        shingle: a.shingle,
        ..Default::default()
    };
    let (out_name, rej_name) = outputs(&a.input, a.output.as_deref(), a.rejected.as_deref())?;
    let mut out = super::output(a.output.as_deref())?;
    let mut rejected = a
        .rejected
        .as_deref()
        .map(|p| super::output(Some(p)))
        .transpose()?;
    let mut card = blank_card(a.output.as_deref());
    card.screen.dedup_threshold = Some(a.threshold);
    let counts = optimsyn_hygiene::dedup_file(cfg, &a.input, |mut row, dup| match dup {
        None => emit(&mut out, &out_name, &row),
        Some(d) => {
            note_duplicate(&mut card, &row, &d);
            match rejected.as_mut() {
                Some(r) => {
                    row["duplicate"] = serde_json::to_value(d).map_err(json_error)?;
                    emit(r, &rej_name, &row)
                }
                None => Ok(()),
            }
        }
    })?;
    card.records = counts.rows as usize;
    card.kept = (counts.rows - counts.flagged) as usize;
    card.counts.checked = counts.rows as usize;
    if counts.flagged > 0 {
        card.rejected
            .insert(optimsyn_hygiene::DUPLICATE.into(), counts.flagged as usize);
    }
    if let Some(path) = &a.output {
        card.write_beside(path)?;
    }
    out.flush()?;
    if let Some(r) = rejected.as_mut() {
        r.flush()?;
    }
    tracing::info!(
        rows = counts.rows,
        duplicates = counts.flagged,
        kept = counts.rows - counts.flagged,
        "{}: deduplicated at Jaccard {}",
        a.input.display(),
        a.threshold
    );
    Ok(())
}

/// A card for a file a `data` command writes, filled in as rows stream past.
fn blank_card(output: Option<&Path>) -> DatasetCard {
    let name = output
        .and_then(|p| p.file_name())
        .map_or(String::new(), |n| n.to_string_lossy().into_owned());
    DatasetCard {
        dataset: name,
        command: optimsyn_pipeline::hygiene::command_line(),
        records: 0,
        kept: 0,
        rejected: Default::default(),
        screen: ScreenSettings {
            against: Vec::new(),
            ngram: 0,
            min_words: 0,
            on_contaminated: OnContaminated::Drop,
            dedup_threshold: None,
        },
        counts: Default::default(),
        longest_overlap: None,
        contaminated_by_source: Default::default(),
        contaminated_examples: Vec::new(),
        duplicate_examples: Vec::new(),
        policies: Default::default(),
        generators: Default::default(),
        distinct_rubrics: 0,
        influence: None,
    }
}

/// How many flagged rows a `data` command's card names.
const CARD_EXAMPLES: usize = 5;

fn row_name(row: &serde_json::Value) -> String {
    optimsyn_hygiene::row_id(row).unwrap_or_else(|| "(no id)".into())
}

fn note_overlap(card: &mut DatasetCard, row: &serde_json::Value, o: &optimsyn_hygiene::Overlap) {
    *card
        .contaminated_by_source
        .entry(o.source.clone())
        .or_default() += 1;
    card.longest_overlap = card.longest_overlap.max(Some(o.words));
    if card.contaminated_examples.len() < CARD_EXAMPLES {
        card.contaminated_examples.push(Flagged {
            id: row_name(row),
            detail: format!(
                "{} words of {} line {}: \"{}\"",
                o.words, o.source, o.row, o.text
            ),
        });
    }
}

fn note_duplicate(card: &mut DatasetCard, row: &serde_json::Value, d: &Duplicate) {
    match d {
        Duplicate::Exact { .. } => card.counts.exact_duplicates += 1,
        Duplicate::Near { .. } => card.counts.near_duplicates += 1,
    }
    if card.duplicate_examples.len() < CARD_EXAMPLES {
        card.duplicate_examples.push(Flagged {
            id: row_name(row),
            detail: format!("duplicates {}", d.of()),
        });
    }
}

fn json_error(e: impl std::fmt::Display) -> optimsyn_hygiene::Error {
    optimsyn_hygiene::Error::Config(e.to_string())
}

/// One JSON line to `w`; write errors become the crate's error so the stream stops on them.
fn emit(w: &mut dyn Write, name: &Path, row: &serde_json::Value) -> optimsyn_hygiene::Result<()> {
    let line = serde_json::to_string(row).map_err(json_error)?;
    writeln!(w, "{line}").map_err(|source| optimsyn_hygiene::Error::Io {
        path: name.to_path_buf(),
        source,
    })
}

/// The output files, refusing any that is the input (creating it would empty the input first).
fn outputs(
    input: &Path,
    output: Option<&Path>,
    rejected: Option<&Path>,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    let same = |p: &Path| match (std::fs::canonicalize(input), std::fs::canonicalize(p)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    for p in [output, rejected].into_iter().flatten() {
        anyhow::ensure!(
            !same(p),
            "{} is the input: write the output to another file",
            p.display()
        );
    }
    let name =
        |p: Option<&Path>| p.map_or_else(|| PathBuf::from("standard output"), Path::to_path_buf);
    Ok((name(output), name(rejected)))
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
