//! The `optimsyn` program: thin glue over the optimsyn crates. Each subcommand reads and writes the
//! formats of docs/GUIDE.md and, on bad input, prints one clear line and exits non-zero.

// Flag docs are clap's `--help` text, where `[default]` is plain text, not an intra-doc link.
#![allow(rustdoc::broken_intra_doc_links)]

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cmd;

#[derive(Parser)]
#[command(
    name = "optimsyn",
    version,
    about = "Influence-guided rubric optimization for synthetic SFT data"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Inspect how datasets become tokens.
    #[command(subcommand)]
    Data(cmd::data::DataCommand),
    /// Run a language model over rows: log-probs or generation.
    #[command(subcommand)]
    Lm(cmd::lm::LmCommand),
    /// Fine-tune a model (LoRA or full) on chat examples, with resumable checkpoints.
    Sft(cmd::train::SftArgs),
    /// LoRA warm-up of the target model (checkpoints with Adam moments for influence).
    Warmup(cmd::train::SftArgs),
    /// Influence of chat examples on a validation set: score, or verify the estimate.
    #[command(subcommand)]
    Influence(cmd::influence::InfluenceCommand),
    /// Validation loss of a model (and adapter) on chat examples, overall and per subtask.
    Eval(cmd::train::EvalArgs),
    /// Stages 0–2 of OptimSyn from a TOML config: prompts, warm-up, GRPO with influence rewards (resumable).
    Train(cmd::run::RunArgs),
    /// Stage 3: the trained (or untrained) policy writes the final dataset.
    Synthesize(cmd::run::SynthesizeArgs),
    /// Serve a local model over an OpenAI-compatible chat-completions API (127.0.0.1 unless --host).
    Serve(cmd::serve::ServeArgs),
    /// The whole method on the bundled corpus and tiny models, with a closing table.
    Demo(cmd::demo::DemoArgs),
    /// Is influence a good proxy here? Mean influence vs held-out loss after SFT, over datasets.
    Analyze(cmd::analyze::AnalyzeArgs),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("OPTIMSYN_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Data(c) => cmd::data::run(c),
        Command::Lm(c) => cmd::lm::run(c),
        Command::Sft(a) => cmd::train::sft(a),
        Command::Warmup(a) => cmd::train::warmup(a),
        Command::Influence(c) => cmd::influence::run(c),
        Command::Eval(a) => cmd::train::eval(a),
        Command::Train(a) => cmd::run::train(a),
        Command::Synthesize(a) => cmd::run::synthesize(a),
        Command::Serve(a) => cmd::serve::run(a),
        Command::Demo(a) => cmd::demo::run(a),
        Command::Analyze(a) => cmd::analyze::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Our errors already name their cause; print each further cause only once.
            let mut msg = e.to_string();
            for cause in e.chain().skip(1) {
                let c = cause.to_string();
                if !msg.contains(&c) {
                    msg.push_str(": ");
                    msg.push_str(&c);
                }
            }
            eprintln!("optimsyn: error: {msg}");
            ExitCode::FAILURE
        }
    }
}
