//! `optimsyn serve`: an OpenAI-compatible chat-completions server for a local model, so a
//! generator can run on another machine (or be shared by several runs) and any OpenAI client can
//! use it.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use optimsyn_pipeline::{DeviceName, Dtype};
use optimsyn_serve::{ServeConfig, Server};
use serde_json::{Map, Value};

/// Arguments of `serve`.
#[derive(Args)]
pub struct ServeArgs {
    /// Hugging Face model folder (config.json, safetensors, tokenizer.json, chat template).
    #[arg(long)]
    pub model: PathBuf,
    /// Port to listen on (0: any free port, printed at start).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Address to bind. The default serves this machine only; `0.0.0.0` serves the network.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceName,
    /// Compute dtype: `f32`, `bf16` or `f16`.
    #[arg(long, default_value = "f32")]
    pub dtype: Dtype,
    /// Most rows (requests × n) generated together in one batch.
    #[arg(long, default_value_t = 8)]
    pub max_batch: usize,
    /// Milliseconds to wait for more requests before starting a batch that is not full.
    #[arg(long, default_value_t = 5)]
    pub batch_wait_ms: u64,
    /// Most chat completions in progress at once; one more gets a 503 with `Retry-After`.
    #[arg(long, default_value_t = ServeConfig::default().max_active_requests)]
    pub max_active_requests: usize,
    /// Seconds a connection may take to send a request head (also the keep-alive idle time) or
    /// leave its reply unread before it is closed.
    #[arg(long, default_value_t = ServeConfig::default().idle_timeout_secs)]
    pub idle_timeout_secs: u64,
    /// libtorch threads for the model (default: libtorch's, the machine's cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// The model name clients ask for (default: --model as given).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Chat-template keyword arguments for every request, as a JSON object, e.g.
    /// '{"enable_thinking": false}'; a request's `chat_template_kwargs` override them.
    #[arg(long, default_value = "{}")]
    pub template_kwargs: String,
    /// Serve LoRA adapters loaded at run time: `POST /v1/load_lora_adapter` with
    /// `{"lora_name", "lora_path"}` (a PEFT folder this process can read), then ask for
    /// `lora_name` as the model; `POST /v1/unload_lora_adapter` with `{"lora_name"}`.
    #[arg(long)]
    pub enable_lora: bool,
    /// LoRA adapters to serve from the start, as NAME=PATH (a PEFT folder); repeat for several.
    /// Requests ask for NAME as the model. Needs no --enable-lora.
    #[arg(long = "lora-modules", value_name = "NAME=PATH", num_args = 1..)]
    pub lora_modules: Vec<String>,
}

/// Loads the model and serves until the process is stopped.
pub fn run(a: ServeArgs) -> anyhow::Result<()> {
    anyhow::ensure!(a.max_batch > 0, "--max-batch must be at least 1");
    let opts = super::load_options(a.device, a.dtype)?;
    let template_kwargs: Map<String, Value> = serde_json::from_str(&a.template_kwargs)
        .context("--template-kwargs must be a JSON object")?;
    let config = ServeConfig {
        host: a.host,
        port: a.port,
        served_model_name: a.served_model_name,
        max_batch: a.max_batch,
        batch_wait_ms: a.batch_wait_ms,
        max_active_requests: a.max_active_requests,
        idle_timeout_secs: a.idle_timeout_secs,
        threads: a.threads,
        template_kwargs,
        enable_lora: a.enable_lora,
        lora_modules: a
            .lora_modules
            .iter()
            .map(|m| {
                m.split_once('=')
                    .map(|(n, p)| (n.to_string(), PathBuf::from(p)))
                    .with_context(|| format!("--lora-modules {m}: expected NAME=PATH"))
            })
            .collect::<anyhow::Result<_>>()?,
        ..ServeConfig::default()
    };
    let server = Server::load(&a.model, opts, config)?;
    let handle = server.start()?;
    eprintln!(
        "optimsyn serve: model `{}` at {} (POST /chat/completions, GET /models); stop with Ctrl-C",
        handle.model_name(),
        handle.base_url()
    );
    handle.wait();
    Ok(())
}
