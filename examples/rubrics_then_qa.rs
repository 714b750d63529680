//! Rubrics for one document, then QA pairs from them with the local generator, with provenance.
//!
//! The two model-facing steps of OptimSyn outside the RL loop: the rubric policy reads a seed
//! document and writes `N` rubrics (four standards: question, answer, alignment, technical); the
//! generator turns each (document, rubric) into one QA pair, which is checked (it parses, nothing
//! empty, no "according to the document" leakage, length bounds) and kept or rejected with a reason.
//!
//! ```text
//! cargo run --example rubrics_then_qa -- [POLICY_DIR] [GENERATOR_DIR] [N]
//! ```
//!
//! The defaults are the bundled demo's tiny policy and generator (trained on the demo corpus with
//! the demo's prompt templates, which this example uses too) and its first seed document.

use std::error::Error;
use std::path::PathBuf;

use optimsyn_data_io::{ChatTokenizer, SeedDoc, read_jsonl};
use optimsyn_lm::{CausalLm, LoadOptions};
use optimsyn_rl_grpo::RolloutConfig;
use optimsyn_rubric_policy::{PolicyPrompt, RubricPolicy, RubricSampling};
use optimsyn_synth::{
    GenerationParams, LocalGenerator, PolicyInfo, QaPrompt, QaTask, RubricSections, SynthConfig,
    SynthRecord, Synthesizer, stop_tokens,
};

fn main() -> Result<(), Box<dyn Error>> {
    let mut args = std::env::args().skip(1);
    let demo = optimsyn_examples::demo_dir();
    let policy_dir = args
        .next()
        .map(PathBuf::from)
        .unwrap_or(demo.join("models/policy"));
    let generator_dir = args
        .next()
        .map(PathBuf::from)
        .unwrap_or(demo.join("models/generator"));
    let n: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(4);
    tch::set_num_threads(2);
    let docs: Vec<SeedDoc> = read_jsonl(demo.join("seeds.jsonl"))?;
    let doc = docs.first().ok_or("no seed document")?.clone();
    println!("document {}: {}\n", doc.id, doc.text);

    // 1. The policy writes N rubrics (the base model; GRPO would train a LoRA adapter on it).
    let templates = demo.join("templates");
    let policy_prompt = PolicyPrompt::from_files(
        Some(&templates.join("policy_system.jinja")),
        Some(&templates.join("policy_user.jinja")),
    )?;
    let tok = ChatTokenizer::from_model_dir(&policy_dir)?;
    let model = CausalLm::load(&policy_dir, LoadOptions::default())?;
    let stop = stop_tokens(&model, &tok);
    let mut policy = RubricPolicy::new(model, None, stop);
    let how = RubricSampling {
        per_doc: n,
        sampling: RolloutConfig {
            temperature: 1.0,
            max_new_tokens: 96,
            ..Default::default()
        },
        ..Default::default()
    };
    let drafts = policy.write_rubrics(&tok, &policy_prompt, std::slice::from_ref(&doc), &how)?;

    // 2. Each rubric that parses becomes a generator task.
    let mut tasks = Vec::new();
    for d in &drafts {
        match &d.rubric {
            Ok(r) => {
                println!(
                    "rubric {}: question standard: {}",
                    d.index, r.prompt_related
                );
                let sections = RubricSections {
                    prompt_related: r.prompt_related.clone(),
                    response_related: r.response_related.clone(),
                    alignment: r.alignment.clone(),
                    technical: r.technical.clone(),
                };
                let mut task = QaTask::new(&doc, &d.index.to_string(), sections);
                task.rubric_text = Some(d.text.clone());
                tasks.push(task);
            }
            Err(e) => println!("rubric {}: not a rubric ({e})", d.index),
        }
    }

    // 3. The generator writes one QA pair per task; every sample carries its provenance.
    let generator = LocalGenerator::load(
        &generator_dir,
        LoadOptions::default(),
        GenerationParams::greedy(64),
    )?;
    let qa_prompt = QaPrompt::from_files(
        Some(&templates.join("qa_system.jinja")),
        Some(&templates.join("qa_user.jinja")),
    )?;
    let policy_info = PolicyInfo {
        identity: policy_dir.display().to_string(),
        sampling: optimsyn_data_io::SamplingParams {
            temperature: how.sampling.temperature,
            max_new_tokens: Some(how.sampling.max_new_tokens),
            seed: Some(how.seed),
            ..Default::default()
        },
        step: 0,
    };
    let mut records: Vec<SynthRecord> = Vec::new();
    let report = Synthesizer::new(&generator)
        .with_prompt(qa_prompt)
        .with_config(SynthConfig {
            max_attempts: 1,
            ..Default::default()
        })
        .run(&tasks, &policy_info, &mut records)?;
    println!();
    for r in &records {
        println!("{}", serde_json::to_string_pretty(&r.sample)?);
    }
    println!("\n{}", report.counts);
    if drafts.len() != n || records.len() != tasks.len() {
        return Err("every rubric and every task should be accounted for".into());
    }
    Ok(())
}
