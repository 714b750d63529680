//! From rubric texts to QA records: sampling rubrics from the policy, turning each into a
//! generator task, writing every sample (valid or not) with its provenance.

use std::collections::HashMap;
use std::path::Path;

use optimsyn_data_io::{ChatExample, SamplingParams as RowSampling, SeedDoc, read_jsonl};
use optimsyn_rl_grpo::Prompt;
use optimsyn_rubric_policy::{RubricPolicy, parse_rubric};
use optimsyn_synth::{
    PolicyInfo, QaTask, RubricSections, SampleFile, SampleSink, SynthConfig, SynthRecord,
    Synthesizer,
};

use crate::config::RunConfig;
use crate::error::{Error, Result};
use crate::models::Models;

/// One rubric to turn into a QA pair: its seed document, the sample id, the rubric text.
pub type RubricItem = (SeedDoc, String, String);

/// A rubric sample turned into a generator task, or the reason it could not be.
fn task_of(doc: &SeedDoc, suffix: &str, text: &str) -> Result<QaTask, String> {
    let r = parse_rubric(text).map_err(|e| format!("rubric_{}", e.kind()))?;
    let sections = RubricSections {
        prompt_related: r.prompt_related,
        response_related: r.response_related,
        alignment: r.alignment,
        technical: r.technical,
    };
    let mut t = QaTask::new(doc, suffix, sections);
    t.rubric_text = Some(text.to_string());
    Ok(t)
}

/// A placeholder record for a rollout whose rubric did not parse (provenance kept).
fn invalid_record(
    doc: &SeedDoc,
    id: &str,
    text: &str,
    reason: &str,
    policy: &PolicyInfo,
    generator: &str,
    step: u64,
) -> SynthRecord {
    SynthRecord {
        sample: optimsyn_data_io::SyntheticSample {
            example: ChatExample {
                id: Some(id.to_string()),
                messages: Vec::new(),
                subtask: None,
            },
            provenance: optimsyn_data_io::Provenance {
                seed_id: doc.id.clone(),
                rubric: text.to_string(),
                policy: policy.identity.clone(),
                generator: generator.to_string(),
                policy_sampling: policy.sampling.clone(),
                generator_sampling: RowSampling::default(),
                step,
                valid: false,
                rejection: Some(reason.to_string()),
                contamination: None,
                duplicate_of: None,
            },
            influence: None,
            subtask_influence: None,
            reward: None,
        },
        generation: optimsyn_synth::GenerationInfo {
            raw: String::new(),
            attempts: 0,
            finish_reason: optimsyn_synth::FinishReason::Stop,
            prompt_tokens: None,
            completion_tokens: None,
        },
    }
}

/// Rubric texts → QA samples in `file` (resumable by id). Returns every record of `items`, in
/// order; a rubric that does not parse gets an invalid record naming why.
pub fn synthesize_rubrics(
    cfg: &RunConfig,
    m: &Models,
    items: &[RubricItem],
    policy: &PolicyInfo,
    step: u64,
    file: &Path,
) -> Result<Vec<SynthRecord>> {
    let mut sf = SampleFile::open(file)?;
    let mut tasks = Vec::new();
    for (doc, id, text) in items {
        let suffix = id.rsplit('/').next().unwrap_or(id);
        match task_of(doc, suffix, text) {
            Ok(mut t) => {
                t.id = id.clone();
                tasks.push(t);
            }
            Err(reason) if !sf.contains(id) => {
                let generator = m.generator.identity();
                sf.write(&invalid_record(
                    doc, id, text, &reason, policy, &generator, step,
                ))?;
            }
            Err(_) => {}
        }
    }
    let synth = Synthesizer::new(m.generator.as_ref())
        .with_prompt(m.qa_prompt()?)
        .with_config(SynthConfig {
            domain: cfg.data.domain.clone(),
            max_attempts: cfg.generator.max_attempts,
            ..Default::default()
        });
    let mut pinfo = policy.clone();
    pinfo.step = step;
    let report = synth.run(&tasks, &pinfo, &mut sf)?;
    if let Some(f) = report.failures.first() {
        return Err(Error::Stage(format!(
            "generator failed on {} task(s), first {}: {}",
            report.failures.len(),
            f.id,
            f.error
        )));
    }
    sf.sync()?;
    drop(sf);
    let all: Vec<SynthRecord> = read_jsonl(file)?;
    let by_id: HashMap<String, SynthRecord> =
        all.into_iter().map(|r| (r.id().to_string(), r)).collect();
    items
        .iter()
        .map(|(_, id, _)| {
            by_id
                .get(id)
                .cloned()
                .ok_or_else(|| Error::run_folder(file, format!("sample {id} missing")))
        })
        .collect()
}

/// Samples one batch of rubrics from `policy` for `prompts`, `n` per prompt, at `temperature`.
pub fn sample_rubrics(
    policy: &mut RubricPolicy,
    m: &Models,
    prompts: &[Prompt],
    n: usize,
    temperature: f64,
    seed: u64,
    max_new_tokens: usize,
) -> Result<Vec<String>> {
    use optimsyn_rl_grpo::Policy;
    let keys: Vec<u64> = prompts
        .iter()
        .flat_map(|p| (0..n).map(move |g| optimsyn_lm::row_key(&format!("{}#{g}", p.id))))
        .collect();
    let req = optimsyn_rl_grpo::SampleRequest {
        prompts: prompts.iter().map(|p| p.tokens.as_slice()).collect(),
        group_size: n,
        seed,
        keys,
        sampling: optimsyn_rl_grpo::RolloutConfig {
            temperature,
            top_p: 1.0,
            top_k: 0,
            max_new_tokens,
        },
    };
    let comps = policy.sample(&req)?;
    comps
        .iter()
        .map(|c| Ok(m.policy_tok.decode(&c.tokens, true)?))
        .collect()
}

/// The valid samples of `records` as training examples (ids kept).
pub fn valid_examples(records: &[SynthRecord]) -> Vec<ChatExample> {
    records
        .iter()
        .filter(|r| r.is_valid())
        .map(|r| r.sample.example.clone())
        .collect()
}

/// Who wrote a set of samples: the policy folder tagged `untrained` / `rl`, and its sampling.
pub fn policy_info(cfg: &RunConfig, tag: &str, temperature: f64) -> PolicyInfo {
    PolicyInfo {
        identity: format!("{}#{tag}", cfg.models.policy.display()),
        sampling: RowSampling {
            temperature,
            top_p: None,
            top_k: None,
            max_new_tokens: Some(cfg.policy.max_new_tokens),
            seed: Some(cfg.seed),
        },
        step: 0,
    }
}

/// Replaces `file` with `records`, one JSON line each, atomically.
pub fn write_records(file: &Path, records: &[SynthRecord]) -> Result<()> {
    let mut text = String::new();
    for r in records {
        text.push_str(&serde_json::to_string(r)?);
        text.push('\n');
    }
    optimsyn_data_io::write_atomic(file, text.as_bytes())?;
    Ok(())
}

pub(crate) fn log_screen(what: &str, c: &optimsyn_hygiene::ScreenCounts) {
    tracing::info!(
        checked = c.checked,
        contaminated = c.contaminated,
        dropped = c.contaminated_dropped,
        exact_duplicates = c.exact_duplicates,
        near_duplicates = c.near_duplicates,
        "{what}: decontamination and deduplication"
    );
}
