//! QA generation through an OpenAI-compatible endpoint: vLLM, SGLang, llama.cpp or `optimsyn serve`.
//!
//! Scaling generation beyond one machine means serving the generator elsewhere and calling it over
//! HTTP. This example does what `rubrics_then_qa` does in its second half (one QA pair per
//! (document, rubric), checked, with provenance), with the generator behind
//! `/v1/chat/completions`: requests go out concurrently (bounded), with a timeout and retries with
//! backoff on 429 / 5xx / timeouts.
//!
//! ```text
//! # against a server you run (the key, if any, is read from the variable api_key_env names):
//! OPTIMSYN_GENERATOR_URL=http://gpu-box:8000/v1 OPTIMSYN_GENERATOR_MODEL=Qwen/Qwen3-8B \
//!     cargo run --example remote_generator
//! # or, without OPTIMSYN_GENERATOR_URL, against `optimsyn serve` started in this process:
//! cargo run --example remote_generator -- [GENERATOR_DIR]
//! ```

use std::error::Error;
use std::path::PathBuf;

use optimsyn_data_io::{SeedDoc, read_jsonl};
use optimsyn_lm::LoadOptions;
use optimsyn_serve::{ServeConfig, Server};
use optimsyn_synth::{
    GenerationParams, OpenAiConfig, OpenAiGenerator, PolicyInfo, QaPrompt, QaTask, RubricSections,
    SynthRecord, Synthesizer,
};

fn main() -> Result<(), Box<dyn Error>> {
    let demo = optimsyn_examples::demo_dir();
    let generator_dir = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or(demo.join("models/generator"));

    // The endpoint: the one in the environment, else a server for the local model on a free
    // loopback port, running on threads of this process until `shutdown`.
    let (server, base_url, model) = match std::env::var("OPTIMSYN_GENERATOR_URL") {
        Ok(url) => {
            let model = std::env::var("OPTIMSYN_GENERATOR_MODEL").unwrap_or_default();
            (None, url, model)
        }
        Err(_) => {
            let config = ServeConfig {
                port: 0,
                served_model_name: Some("demo-generator".into()),
                threads: Some(2),
                ..Default::default()
            };
            let server = Server::load(&generator_dir, LoadOptions::default(), config)?.start()?;
            let url = server.base_url();
            println!("optimsyn serve on {url}");
            (Some(server), url, "demo-generator".to_string())
        }
    };

    let generator = OpenAiGenerator::new(
        OpenAiConfig {
            base_url,
            model,
            api_key_env: Some("OPENAI_API_KEY".into()),
            concurrency: 4,
            ..Default::default()
        },
        GenerationParams::greedy(64),
    )?;

    // One hand-written rubric for the first three seed documents (a trained policy writes them in
    // the real loop; see `rubrics_then_qa`).
    let docs: Vec<SeedDoc> = read_jsonl(demo.join("seeds.jsonl"))?;
    let rubric = RubricSections::from_value(&serde_json::json!({
        "Prompt-related": "One short factual question about the document's subject.",
        "Response-related": ["Correct", "One sentence"],
        "Prompt-Response alignment": "The answer answers exactly the question.",
        "Technical/trainability aspects": "Plain text, no reference to the document.",
    }));
    let tasks: Vec<QaTask> = docs
        .iter()
        .take(3)
        .map(|d| QaTask::new(d, "0", rubric.clone()))
        .collect();
    let templates = demo.join("templates");
    let qa_prompt = QaPrompt::from_files(
        Some(&templates.join("qa_system.jinja")),
        Some(&templates.join("qa_user.jinja")),
    )?;
    let mut records: Vec<SynthRecord> = Vec::new();
    let result = Synthesizer::new(&generator).with_prompt(qa_prompt).run(
        &tasks,
        &PolicyInfo {
            identity: "hand-written rubric".into(),
            ..Default::default()
        },
        &mut records,
    );
    if let Some(s) = server {
        s.shutdown();
    }
    let report = result?;
    for r in &records {
        let p = &r.sample.provenance;
        let text: Vec<&str> = r
            .sample
            .example
            .messages
            .iter()
            .map(|m| m.content.as_str())
            .collect();
        println!(
            "{} [{}] via {}: {:?}{}",
            r.id(),
            if p.valid { "kept" } else { "rejected" },
            p.generator,
            text,
            p.rejection
                .as_deref()
                .map(|why| format!(" ({why})"))
                .unwrap_or_default()
        );
    }
    println!("{}", report.counts);
    for f in &report.failures {
        println!("failed {}: {}", f.id, f.error);
    }
    if records.len() + report.failures.len() != tasks.len() {
        return Err("every task should be accounted for".into());
    }
    Ok(())
}
