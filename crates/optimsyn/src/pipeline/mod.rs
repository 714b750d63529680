//! The OptimSyn pipeline: stage 0 (prompts), stage 1 (initial pool, warm-up, validation
//! features), stage 2 (GRPO with influence rewards), stage 3 (the final dataset).
//!
//! Layout of a run folder (every stage resumes from what it finds):
//!
//! ```text
//! OUT/prompts.jsonl          stage 0: seed id, split (train / heldout)
//! OUT/pool.jsonl             stage 1: the untrained policy's samples (provenance on each)
//! OUT/warmup/checkpoint-N/   stage 1: target adapter + Adam moments + training.json
//! OUT/rl/                    stage 2: GRPO checkpoints, metrics.jsonl, influence.jsonl,
//!                            samples/step-N.jsonl (every rollout's QA, IF and reward)
//! OUT/dataset-<tag>.jsonl    stage 3: one sample per rubric (valid ones are the dataset)
//! OUT/*.card.json, *.card.md a dataset card beside the pool and each final dataset
//! OUT/report.md, OUT/rl.svg  a report and a plot of the RL run
//! ```

pub mod config;
pub mod hygiene;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::Context;
use optimsyn_data_io::{
    ChatExample, ChatTokenizer, JsonlReader, SamplingParams as RowSampling, SeedDoc, read_jsonl,
    write_atomic,
};
use optimsyn_influence::{InfluenceScorer, ProjectorKind, ScoreConfig};
use optimsyn_lm::{
    CausalLm, DataInfo, LoadOptions, LoraAdapter, LoraConfig, SftConfig, TrainExample, Trainable,
    sft,
};
use optimsyn_rl_grpo::{GrpoConfig, OutputOptions, Prompt, Reference, RolloutBatch, Trainer};
use optimsyn_rubric_policy::{PolicyPrompt, RubricPolicy, parse_rubric};
use optimsyn_synth::{
    GenerationParams, Generator, LocalGenerator, PolicyInfo, QaPrompt, QaTask, RubricSections,
    SampleFile, SampleSink, SynthConfig, SynthRecord, Synthesizer,
};
use serde::{Deserialize, Serialize};

pub use config::{RewardMode, Role, RunConfig, SubtaskScale};

/// One seed document with its policy prompt.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SeedPrompt {
    /// The document.
    pub doc: SeedDoc,
    /// `train` or `heldout`.
    pub split: String,
}

/// f32 on `role`'s device.
fn opts(cfg: &RunConfig, role: Role) -> anyhow::Result<LoadOptions> {
    crate::cmd::load_options(cfg.models.device_of(role), "f32")
}

/// Stage 0: seeds → prompts with a seeded 90/10 split, written once to `OUT/prompts.jsonl`.
pub fn stage0(cfg: &RunConfig) -> anyhow::Result<Vec<SeedPrompt>> {
    let path = cfg.out.join("prompts.jsonl");
    if path.exists() {
        return Ok(read_jsonl(&path)?);
    }
    let field = cfg.data.text_field.clone();
    let reader = JsonlReader::with_parser(&cfg.data.seeds, move |b| {
        let v: serde_json::Value = optimsyn_data_io::jsonl::parse_row(b)?;
        SeedDoc::from_value(v, &field)
    })?;
    let mut docs: Vec<SeedDoc> = reader.collect::<Result<_, _>>()?;
    anyhow::ensure!(
        !docs.is_empty(),
        "{}: no seed documents",
        cfg.data.seeds.display()
    );
    for d in &mut docs {
        d.domain.get_or_insert_with(|| cfg.data.domain.clone());
    }
    // Seeded split: order by a hash of (seed, id), the first train_fraction are trained on.
    let mut order: Vec<(u64, usize)> = docs
        .iter()
        .enumerate()
        .map(|(i, d)| (optimsyn_lm::row_key(&format!("{}:{}", cfg.seed, d.id)), i))
        .collect();
    order.sort();
    let n_train =
        ((docs.len() as f64 * cfg.data.train_fraction).round() as usize).clamp(1, docs.len());
    let mut split = vec!["heldout"; docs.len()];
    for (_, i) in order.iter().take(n_train) {
        split[*i] = "train";
    }
    let out: Vec<SeedPrompt> = docs
        .into_iter()
        .zip(split)
        .map(|(doc, s)| SeedPrompt {
            doc,
            split: s.into(),
        })
        .collect();
    std::fs::create_dir_all(&cfg.out)
        .with_context(|| format!("cannot create {}", cfg.out.display()))?;
    let text: String = out
        .iter()
        .map(|p| serde_json::to_string(p).map(|l| l + "\n"))
        .collect::<Result<_, _>>()?;
    write_atomic(&path, text.as_bytes())?;
    Ok(out)
}

/// Everything the loop keeps loaded.
pub struct Models {
    /// The policy's tokenizer.
    pub policy_tok: ChatTokenizer,
    /// The generator.
    pub generator: Box<dyn Generator>,
    /// The policy prompt.
    pub policy_prompt: PolicyPrompt,
    /// The generator prompt's template files (`None`: built in).
    pub qa_templates: (Option<PathBuf>, Option<PathBuf>),
    /// The evaluation sets written data is checked against.
    pub hygiene: hygiene::Hygiene,
}

impl Models {
    /// The generator prompt.
    pub fn qa_prompt(&self) -> anyhow::Result<QaPrompt> {
        Ok(QaPrompt::from_files(
            self.qa_templates.0.as_deref(),
            self.qa_templates.1.as_deref(),
        )?)
    }
}

/// Loads tokenizers, the generator and the templates.
pub fn load_models(cfg: &RunConfig) -> anyhow::Result<Models> {
    let params = GenerationParams {
        max_new_tokens: cfg.generator.max_new_tokens,
        temperature: cfg.generator.temperature,
        seed: cfg.seed,
        ..Default::default()
    };
    let generator: Box<dyn Generator> = match (&cfg.models.generator, &cfg.models.generator_url) {
        (Some(dir), _) => Box::new(LocalGenerator::load(
            dir,
            opts(cfg, Role::Generator)?,
            params,
        )?),
        (None, Some(url)) => {
            let c = optimsyn_synth::OpenAiConfig {
                base_url: url.clone(),
                model: cfg.models.generator_model.clone().unwrap_or_default(),
                ..Default::default()
            };
            Box::new(optimsyn_synth::OpenAiGenerator::new(c, params)?)
        }
        (None, None) => anyhow::bail!("no generator configured"),
    };
    Ok(Models {
        policy_tok: ChatTokenizer::from_model_dir(&cfg.models.policy)?,
        generator,
        policy_prompt: PolicyPrompt::from_files(
            cfg.prompts.policy_system.as_deref(),
            cfg.prompts.policy_user.as_deref(),
        )?,
        qa_templates: (cfg.prompts.qa_system.clone(), cfg.prompts.qa_user.clone()),
        hygiene: hygiene::Hygiene::load(cfg)?,
    })
}

fn encode_prompts(
    cfg: &RunConfig,
    m: &Models,
    seeds: &[&SeedPrompt],
) -> anyhow::Result<Vec<Prompt>> {
    seeds
        .iter()
        .map(|s| {
            let domain = s.doc.domain.as_deref().unwrap_or(&cfg.data.domain);
            let ids = m.policy_prompt.encode(
                &m.policy_tok,
                domain,
                &s.doc.text,
                Some(cfg.policy.enable_thinking),
            )?;
            Ok(Prompt::new(s.doc.id.clone(), ids))
        })
        .collect()
}

/// A fresh policy: the base model with a seeded LoRA adapter (B = 0: it starts as the base).
pub fn load_policy(cfg: &RunConfig) -> anyhow::Result<RubricPolicy> {
    let mut model = CausalLm::load(&cfg.models.policy, opts(cfg, Role::Policy)?)?;
    let lora = LoraConfig {
        r: cfg.policy.lora_r,
        alpha: cfg.policy.lora_alpha,
        ..Default::default()
    };
    let adapter = LoraAdapter::init(&mut model, lora, cfg.seed)?;
    let tok = ChatTokenizer::from_model_dir(&cfg.models.policy)?;
    let stop = optimsyn_synth::stop_tokens(&model, &tok);
    Ok(RubricPolicy::new(model, Some(adapter), stop))
}

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

/// Writes a placeholder record for a rollout whose rubric did not parse (provenance kept).
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

/// Rubric texts → QA samples in `file` (resumable by id). Returns every record of `ids`, in order.
#[allow(clippy::too_many_arguments)]
fn synthesize_rubrics(
    cfg: &RunConfig,
    m: &Models,
    items: &[(SeedDoc, String, String)],
    policy: &PolicyInfo,
    step: u64,
    file: &Path,
) -> anyhow::Result<Vec<SynthRecord>> {
    let mut sf = SampleFile::open(file)?;
    let mut tasks = Vec::new();
    for (doc, id, text) in items {
        let suffix = id.rsplit('/').next().unwrap_or(id);
        match task_of(doc, suffix, text) {
            Ok(mut t) => {
                t.id = id.clone();
                tasks.push(t);
            }
            Err(reason) => {
                if !sf.contains(id) {
                    sf.write(&invalid_record(
                        doc,
                        id,
                        text,
                        &reason,
                        policy,
                        &m.generator.identity(),
                        step,
                    ))?;
                }
            }
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
        anyhow::bail!(
            "generator failed on {} task(s), first {}: {}",
            report.failures.len(),
            f.id,
            f.error
        );
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
                .ok_or_else(|| anyhow::anyhow!("{}: sample {id} missing", file.display()))
        })
        .collect()
}

/// Samples one batch of rubrics from `policy` for `seeds`, `n` per seed, at `temperature`.
fn sample_rubrics(
    policy: &mut RubricPolicy,
    m: &Models,
    prompts: &[Prompt],
    n: usize,
    temperature: f64,
    seed: u64,
    max_new_tokens: usize,
) -> anyhow::Result<Vec<String>> {
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
fn valid_examples(records: &[SynthRecord]) -> Vec<ChatExample> {
    records
        .iter()
        .filter(|r| r.is_valid())
        .map(|r| r.sample.example.clone())
        .collect()
}

fn score_config(cfg: &RunConfig) -> anyhow::Result<ScoreConfig> {
    Ok(ScoreConfig {
        projector: ProjectorKind::from_name(
            &cfg.influence.projector,
            cfg.influence.proj_dim,
            cfg.seed,
        )?,
        precond: cfg.influence.precond,
        subtask_agg: cfg.influence.subtask_agg,
        format: Some(optimsyn_data_io::ChatFormat::Tulu),
        max_len: cfg.influence.max_len,
        ..Default::default()
    })
}

/// Stage 1: the untrained policy's pool, the warm-up of the target on part of it, and the scorer
/// (validation features computed or reused).
pub fn stage1(
    cfg: &RunConfig,
    m: &Models,
    seeds: &[SeedPrompt],
) -> anyhow::Result<InfluenceScorer> {
    let train: Vec<&SeedPrompt> = seeds.iter().filter(|s| s.split == "train").collect();
    let prompts = encode_prompts(cfg, m, &train)?;
    let pool_path = cfg.out.join("pool.jsonl");
    let temperature = cfg.grpo.rollout.temperature;
    let done: std::collections::HashSet<String> = if pool_path.exists() {
        read_jsonl::<SynthRecord>(&pool_path)?
            .iter()
            .map(|r| r.id().to_string())
            .collect()
    } else {
        Default::default()
    };
    // Rubrics are sampled only for seeds whose pool sample is not written yet (a resumed run).
    let todo: Vec<usize> = (0..train.len())
        .filter(|&i| !done.contains(&format!("{}/pool", train[i].doc.id)))
        .collect();
    let mut texts = vec![String::new(); train.len()];
    if !todo.is_empty() {
        let mut policy = load_policy(cfg)?;
        let sub: Vec<Prompt> = todo.iter().map(|&i| prompts[i].clone()).collect();
        let got = sample_rubrics(
            &mut policy,
            m,
            &sub,
            1,
            temperature,
            cfg.seed,
            cfg.policy.max_new_tokens,
        )?;
        for (&i, t) in todo.iter().zip(got) {
            texts[i] = t;
        }
    }
    let items: Vec<(SeedDoc, String, String)> = train
        .iter()
        .zip(texts)
        .map(|(s, t)| (s.doc.clone(), format!("{}/pool", s.doc.id), t))
        .collect();
    let pinfo = policy_info(cfg, "untrained", temperature);
    let mut pool = synthesize_rubrics(cfg, m, &items, &pinfo, 0, &pool_path)?;
    let counts = m.hygiene.screen_dataset(&mut pool)?;
    log_screen("stage 1: pool", &counts);
    write_records(&pool_path, &pool)?;
    m.hygiene.write_card(&pool_path, &pool, counts)?;
    let valid = valid_examples(&pool);
    tracing::info!(
        pool = pool.len(),
        valid = valid.len(),
        "stage 1: initial pool"
    );
    anyhow::ensure!(
        !valid.is_empty(),
        "stage 1: no valid QA pair in the initial pool ({}); check the generator and its prompt",
        pool_path.display()
    );
    let n_warm =
        ((valid.len() as f64 * cfg.data.warmup_fraction).ceil() as usize).clamp(1, valid.len());
    let warm_dir = cfg.out.join("warmup");
    let tok = ChatTokenizer::from_model_dir(&cfg.models.target)?;
    let warm: Vec<TrainExample> = optimsyn_influence::encode_examples(
        &tok,
        &valid[..n_warm],
        optimsyn_data_io::ChatFormat::Tulu,
        cfg.influence.max_len,
    )?;
    let mut target = CausalLm::load(&cfg.models.target, opts(cfg, Role::Target)?)?;
    let w = &cfg.warmup;
    let lora = w.lora();
    let adapter = LoraAdapter::init(&mut target, lora, cfg.seed)?;
    let val: Vec<ChatExample> = read_jsonl(&cfg.data.val)?;
    let val_enc = optimsyn_influence::encode_examples(
        &tok,
        &val,
        optimsyn_data_io::ChatFormat::Tulu,
        cfg.influence.max_len,
    )?;
    let diag_path = warm_dir.join(WARMUP_DIAGNOSTICS);
    let loss_before = if diag_path.exists() {
        None
    } else {
        Some(sft::evaluate(&target, &val_enc, 4096)?.overall.loss)
    };
    let scfg = SftConfig {
        lr: w.lr,
        epochs: w.epochs,
        batch_size: w.batch_size,
        checkpoints: w.checkpoints,
        seed: cfg.seed,
        ..Default::default()
    };
    let info = DataInfo {
        format: Some(optimsyn_data_io::ChatFormat::Tulu),
        data_hash: Some(optimsyn_data_io::file_hash(&pool_path)?),
        data_path: None,
    };
    let report = sft::train(
        &mut target,
        Trainable::Lora(&adapter),
        &warm,
        &scfg,
        &info,
        &warm_dir,
        &mut |_| {},
    )?;
    tracing::info!(
        examples = warm.len(),
        steps = report.steps,
        "stage 1: warm-up done"
    );
    let ckpts: Vec<PathBuf> = sft::list_checkpoints(&warm_dir)?.into_values().collect();
    let mut scorer = warmup_scorer(cfg)?;
    let diag = match loss_before {
        Some(before) => {
            let last = ckpts
                .last()
                .ok_or_else(|| anyhow::anyhow!("{}: no warm-up checkpoint", warm_dir.display()))?;
            adapter.load_weights(last)?;
            let after = sft::evaluate(&target, &val_enc, 4096)?.overall.loss;
            // Prefer pool samples the warm-up did not train on: they stand for fresh rollouts.
            let probe: Vec<ChatExample> = valid[n_warm..]
                .iter()
                .chain(&valid[..n_warm])
                .take(DIAGNOSTIC_CANDIDATES)
                .cloned()
                .collect();
            let d = WarmupDiagnostics {
                examples: warm.len(),
                steps: report.steps,
                val_loss_before: before,
                val_loss_after: after,
                probe_candidates: probe.len(),
                probe_unseen: valid.len() - n_warm,
                discrimination: scorer.score_report(&probe)?.discrimination,
            };
            write_atomic(&diag_path, serde_json::to_string_pretty(&d)?.as_bytes())?;
            d
        }
        None => serde_json::from_slice(
            &std::fs::read(&diag_path)
                .with_context(|| format!("cannot read {}", diag_path.display()))?,
        )
        .with_context(|| format!("{}: not warm-up diagnostics", diag_path.display()))?,
    };
    log_warmup(&diag);
    Ok(scorer)
}

/// The scorer at the run's warm-up checkpoints (`OUT/warmup/checkpoint-N`) against its
/// validation set, as stage 2 uses it.
pub fn warmup_scorer(cfg: &RunConfig) -> anyhow::Result<InfluenceScorer> {
    let warm_dir = cfg.out.join("warmup");
    let ckpts: Vec<PathBuf> = sft::list_checkpoints(&warm_dir)?.into_values().collect();
    anyhow::ensure!(
        !ckpts.is_empty(),
        "{}: no warm-up checkpoint; run `optimsyn train` (its stage 1 warms the target up) first",
        warm_dir.display()
    );
    let val: Vec<ChatExample> = read_jsonl(&cfg.data.val)?;
    Ok(InfluenceScorer::new(
        &cfg.models.target,
        &ckpts,
        &val,
        score_config(cfg)?,
        crate::cmd::load_options(cfg.models.device_of(Role::Target), &cfg.influence.dtype)?,
    )?)
}

/// The file in `OUT/warmup/` with [`WarmupDiagnostics`].
pub const WARMUP_DIAGNOSTICS: &str = "diagnostics.json";

/// At most this many pool samples are scored to check the warm-up (a few seconds of scoring).
const DIAGNOSTIC_CANDIDATES: usize = 64;

/// What the warm-up did to the target and whether influence discriminates after it
/// (`OUT/warmup/diagnostics.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WarmupDiagnostics {
    /// Warm-up examples.
    pub examples: usize,
    /// Optimizer steps.
    pub steps: u64,
    /// The target's validation loss before the warm-up (LoRA B = 0: the base model).
    pub val_loss_before: f64,
    /// And after it, at the last warm-up checkpoint.
    pub val_loss_after: f64,
    /// Pool samples scored for the check.
    pub probe_candidates: usize,
    /// How many pool samples the warm-up did not train on (these are probed first).
    pub probe_unseen: usize,
    /// The check on those samples.
    pub discrimination: Option<optimsyn_influence::Discrimination>,
}

fn log_warmup(d: &WarmupDiagnostics) {
    tracing::info!(
        before = d.val_loss_before,
        after = d.val_loss_after,
        "stage 1: validation loss of the target before → after the warm-up"
    );
    match &d.discrimination {
        Some(x) if x.shared_dominates() => tracing::warn!(
            "stage 1: influence after the warm-up mostly measures what every candidate shares ({}); \
             rewards will rank candidates by noise. Train the warm-up longer (warmup.epochs) until \
             the validation loss has come down; docs/GUIDE.md, \"Reading the diagnostics\"",
            x.summary()
        ),
        Some(x) => tracing::info!("stage 1: influence after the warm-up: {}", x.summary()),
        None => {}
    }
}

fn policy_info(cfg: &RunConfig, tag: &str, temperature: f64) -> PolicyInfo {
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

/// What a reward step recorded (a row of `rl/influence.jsonl`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RewardRow {
    /// GRPO step.
    pub step: u64,
    /// Rollouts.
    pub rollouts: usize,
    /// Fraction whose rubric parsed and whose QA passed the checks.
    pub valid_rate: f64,
    /// Mean raw IF of the valid rollouts.
    pub if_valid_mean: Option<f64>,
    /// Largest raw IF.
    pub if_valid_max: Option<f64>,
    /// Mean reward.
    pub reward_mean: f64,
    /// Whether this step's influence told the valid rollouts apart (absent with fewer than two).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discrimination: Option<optimsyn_influence::Discrimination>,
    /// Fraction of rollouts whose QA overlaps an evaluation set (absent in runs from before it
    /// was measured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contaminated: Option<f64>,
}

fn reward_row(
    step: u64,
    ifs: &[Option<f64>],
    rw: &[f64],
    discrimination: Option<optimsyn_influence::Discrimination>,
) -> RewardRow {
    let vals: Vec<f64> = ifs.iter().flatten().copied().collect();
    RewardRow {
        step,
        rollouts: ifs.len(),
        valid_rate: vals.len() as f64 / ifs.len().max(1) as f64,
        if_valid_mean: (!vals.is_empty()).then(|| vals.iter().sum::<f64>() / vals.len() as f64),
        if_valid_max: vals.iter().copied().reduce(f64::max),
        reward_mean: rw.iter().sum::<f64>() / rw.len().max(1) as f64,
        discrimination,
        contaminated: None,
    }
}

fn log_screen(what: &str, c: &optimsyn_hygiene::ScreenCounts) {
    tracing::info!(
        checked = c.checked,
        contaminated = c.contaminated,
        dropped = c.contaminated_dropped,
        exact_duplicates = c.exact_duplicates,
        near_duplicates = c.near_duplicates,
        "{what}: decontamination and deduplication"
    );
}

/// Replaces `file` with `records`, one JSON line each, atomically.
fn write_records(file: &Path, records: &[SynthRecord]) -> anyhow::Result<()> {
    let mut text = String::new();
    for r in records {
        text.push_str(&serde_json::to_string(r)?);
        text.push('\n');
    }
    write_atomic(file, text.as_bytes())?;
    Ok(())
}

/// The influence the reward is computed from: as scored, or (standardized) each subtask's scores
/// turned into z-scores over the scored rollouts before the subtasks are aggregated again.
pub fn reward_influence(
    scale: SubtaskScale,
    agg: optimsyn_influence::SubtaskAgg,
    scored: &[Option<&optimsyn_influence::Score>],
) -> Vec<Option<f64>> {
    let raw = || scored.iter().map(|s| s.and_then(|s| s.influence)).collect();
    if scale == SubtaskScale::Raw {
        return raw();
    }
    let rows: Vec<&BTreeMap<String, f64>> = scored
        .iter()
        .flatten()
        .filter(|s| s.influence.is_some())
        .map(|s| &s.subtasks)
        .collect();
    if rows.len() < 2 {
        return raw();
    }
    let mut stats: BTreeMap<&str, (f64, f64)> = BTreeMap::new();
    for name in rows[0].keys() {
        let xs: Vec<f64> = rows.iter().filter_map(|r| r.get(name).copied()).collect();
        let m = xs.iter().sum::<f64>() / xs.len() as f64;
        let sd = (xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / xs.len() as f64).sqrt();
        stats.insert(name, (m, sd));
    }
    scored
        .iter()
        .map(|s| {
            let s = s.filter(|s| s.influence.is_some())?;
            let z = s.subtasks.iter().map(|(k, x)| match stats.get(k.as_str()) {
                Some(&(m, sd)) if sd > 0.0 => (x - m) / sd,
                _ => 0.0,
            });
            Some(match agg {
                optimsyn_influence::SubtaskAgg::Max => z.fold(f64::NEG_INFINITY, f64::max),
                optimsyn_influence::SubtaskAgg::Mean => {
                    z.sum::<f64>() / s.subtasks.len().max(1) as f64
                }
            })
        })
        .collect()
}

/// Rewards of one batch from raw IF (`None` = invalid), by mode.
pub fn rewards(mode: RewardMode, lambda: f64, ifs: &[Option<f64>]) -> Vec<f64> {
    let valid: Vec<f64> = ifs.iter().flatten().copied().collect();
    let minmax = |xs: &[f64]| {
        let lo = xs.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        (lo, hi)
    };
    let norm = |x: f64, lo: f64, hi: f64| if hi > lo { (x - lo) / (hi - lo) } else { 0.0 };
    match mode {
        RewardMode::Normalized => {
            let (lo, hi) = minmax(&valid);
            ifs.iter()
                .map(|v| v.map_or(-lambda, |x| norm(x, lo, hi)))
                .collect()
        }
        RewardMode::Paper => ifs.iter().map(|v| v.unwrap_or(-lambda)).collect(),
        RewardMode::CodeExact => {
            let all: Vec<f64> = ifs.iter().map(|v| v.unwrap_or(0.0)).collect();
            let (lo, hi) = minmax(&all);
            ifs.iter()
                .zip(&all)
                .map(|(v, x)| if v.is_some() { norm(*x, lo, hi) } else { 0.0 })
                .collect()
        }
    }
}

/// Stage 2: GRPO on the training prompts with influence rewards; resumes from `OUT/rl/`.
pub fn stage2(
    cfg: &RunConfig,
    m: &Models,
    seeds: &[SeedPrompt],
    scorer: &mut InfluenceScorer,
) -> anyhow::Result<Vec<RewardRow>> {
    let train: Vec<&SeedPrompt> = seeds.iter().filter(|s| s.split == "train").collect();
    let prompts = encode_prompts(cfg, m, &train)?;
    let docs: HashMap<String, SeedDoc> = train
        .iter()
        .map(|s| (s.doc.id.clone(), s.doc.clone()))
        .collect();
    let rl = cfg.out.join("rl");
    std::fs::create_dir_all(rl.join("samples"))?;
    let policy = load_policy(cfg)?;
    let mut grpo: GrpoConfig = cfg.grpo.clone();
    grpo.seed = cfg.seed;
    grpo.rollout.max_new_tokens = cfg.policy.max_new_tokens;
    let mut trainer = Trainer::new_or_resume(
        grpo,
        policy,
        Reference::Policy,
        prompts,
        OutputOptions::new(&rl, 1),
    )?;
    let start = trainer.step_count();
    let log_path = rl.join("influence.jsonl");
    optimsyn_data_io::truncate_rows_after(&log_path, "step", start)?;
    let mut log = optimsyn_data_io::JsonlWriter::append(&log_path)?;
    let pinfo = policy_info(cfg, "rl", cfg.grpo.rollout.temperature);
    let bar = indicatif::ProgressBar::new(cfg.steps);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} GRPO [{bar:30}] {pos}/{len} steps {msg} ({elapsed}, eta {eta})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_position(start.min(cfg.steps));
    let mut warned = false;
    let mut reward = |batch: &RolloutBatch| -> Result<Vec<f64>, optimsyn_rl_grpo::BoxError> {
        let mut items = Vec::with_capacity(batch.rollouts.len());
        for r in &batch.rollouts {
            let p = batch.prompt_of(r);
            let doc = docs
                .get(&p.id)
                .ok_or_else(|| format!("prompt {} has no seed document", p.id))?;
            let text = m.policy_tok.decode(&r.completion.tokens, true)?;
            // A prompt can occur twice in a step (the batch spans an epoch boundary); its later
            // occurrences get their own ids, as they get their own sampling streams.
            let occurrence = batch.prompts[..r.prompt_index]
                .iter()
                .filter(|q| q.id == p.id)
                .count();
            let id = if occurrence == 0 {
                format!("{}/step{}-{}", p.id, batch.step, r.sample)
            } else {
                format!("{}/step{}-{}.{}", p.id, batch.step, r.sample, occurrence)
            };
            items.push((doc.clone(), id, text));
        }
        let file = rl
            .join("samples")
            .join(format!("step-{:06}.jsonl", batch.step));
        let mut recs = synthesize_rubrics(cfg, m, &items, &pinfo, batch.step, &file)
            .map_err(|e| e.to_string())?;
        let screened = m.hygiene.screen_rollouts(&mut recs)?;
        let valid: Vec<ChatExample> = valid_examples(&recs);
        let report = if valid.is_empty() {
            optimsyn_influence::ScoreReport {
                scores: Vec::new(),
                discrimination: None,
            }
        } else {
            scorer.score_report(&valid)?
        };
        let by_id: HashMap<&str, &optimsyn_influence::Score> =
            report.scores.iter().map(|s| (s.id.as_str(), s)).collect();
        let scored: Vec<Option<&optimsyn_influence::Score>> = recs
            .iter()
            .map(|r| r.is_valid().then(|| by_id.get(r.id()).copied()).flatten())
            .collect();
        let ifs: Vec<Option<f64>> = scored.iter().map(|s| s.and_then(|s| s.influence)).collect();
        let paid = reward_influence(cfg.reward.subtask_scale, cfg.influence.subtask_agg, &scored);
        let rw = rewards(cfg.reward.mode, cfg.reward.lambda, &paid);
        // The samples file was written before scoring; it is rewritten with what the reward saw.
        for ((r, s), reward) in recs.iter_mut().zip(&scored).zip(&rw) {
            r.sample.influence = s.and_then(|s| s.influence);
            r.sample.subtask_influence = s.map(|s| s.subtasks.clone());
            r.sample.reward = Some(*reward);
        }
        write_records(&file, &recs).map_err(|e| e.to_string())?;
        let mut row = reward_row(batch.step, &ifs, &rw, report.discrimination);
        row.contaminated = Some(screened.contaminated as f64 / recs.len().max(1) as f64);
        if let Some(d) = row
            .discrimination
            .filter(|d| !warned && d.shared_dominates())
        {
            tracing::warn!(
                step = batch.step,
                "influence mostly measures what every rollout shares ({}); see docs/GUIDE.md, \
                 \"Reading the diagnostics\"",
                d.summary()
            );
            warned = true;
        }
        log.write(&row)?;
        log.sync()?;
        Ok(rw)
    };
    while trainer.step_count() < cfg.steps {
        let mtr = trainer.step(&mut reward)?;
        bar.set_position(trainer.step_count());
        bar.set_message(format!("reward {:.3}", mtr.reward.mean));
    }
    bar.finish_and_clear();
    trainer.save()?;
    let all: Vec<RewardRow> = read_jsonl(&log_path)?;
    Ok(all)
}

/// Stage 3: one rubric per seed (all seeds) from the policy (`trained`: the latest RL
/// checkpoint's adapter; otherwise the untrained base), QA pairs written to
/// `OUT/dataset-<tag>.jsonl`. Returns the valid examples.
pub fn stage3(
    cfg: &RunConfig,
    m: &Models,
    seeds: &[SeedPrompt],
    trained: bool,
) -> anyhow::Result<Vec<ChatExample>> {
    use optimsyn_rl_grpo::Policy;
    let all: Vec<&SeedPrompt> = seeds.iter().collect();
    let prompts = encode_prompts(cfg, m, &all)?;
    let mut policy = load_policy(cfg)?;
    let tag = if trained { "rl" } else { "untrained" };
    if trained {
        let ckpt = optimsyn_rl_grpo::latest_checkpoint(&cfg.out.join("rl"))?.ok_or_else(|| {
            anyhow::anyhow!(
                "no RL checkpoint in {}: run `optimsyn train` first",
                cfg.out.join("rl").display()
            )
        })?;
        policy.load(&ckpt.join(optimsyn_rl_grpo::checkpoint::POLICY_DIR))?;
    }
    let n = cfg.synthesize.rubrics_per_seed.max(1);
    let t = cfg.synthesize.temperature;
    let texts = sample_rubrics(
        &mut policy,
        m,
        &prompts,
        n,
        t,
        cfg.seed ^ 0x5eed,
        cfg.policy.max_new_tokens,
    )?;
    let items: Vec<(SeedDoc, String, String)> = all
        .iter()
        .flat_map(|s| (0..n).map(move |g| (s, g)))
        .zip(texts)
        .map(|((s, g), text)| (s.doc.clone(), format!("{}/final{g}", s.doc.id), text))
        .collect();
    let file = cfg.out.join(format!("dataset-{tag}.jsonl"));
    let mut recs = synthesize_rubrics(cfg, m, &items, &policy_info(cfg, tag, t), cfg.steps, &file)?;
    let counts = m.hygiene.screen_dataset(&mut recs)?;
    log_screen(&format!("stage 3: dataset-{tag}"), &counts);
    if cfg.synthesize.score_influence {
        score_dataset(cfg, &mut recs)?;
    }
    write_records(&file, &recs)?;
    m.hygiene.write_card(&file, &recs, counts)?;
    Ok(valid_examples(&recs))
}

/// Each kept sample's influence on the validation set at the warm-up checkpoint (for its card).
fn score_dataset(cfg: &RunConfig, recs: &mut [SynthRecord]) -> anyhow::Result<()> {
    let valid = valid_examples(recs);
    if valid.is_empty() {
        return Ok(());
    }
    // `synthesize --untrained` may run before any warm-up: the dataset is still written.
    let warm = sft::list_checkpoints(cfg.out.join("warmup")).unwrap_or_default();
    if warm.is_empty() {
        tracing::warn!(
            "no warm-up checkpoint in {}: the dataset's influence is not scored (run `optimsyn \
             train` first, or set `synthesize.score_influence = false`)",
            cfg.out.join("warmup").display()
        );
        return Ok(());
    }
    let mut scorer = warmup_scorer(cfg)?;
    let scores = scorer.score(&valid)?;
    let by_id: HashMap<&str, &optimsyn_influence::Score> =
        scores.iter().map(|s| (s.id.as_str(), s)).collect();
    for r in recs.iter_mut() {
        let s = by_id.get(r.id()).filter(|_| r.is_valid());
        r.sample.influence = s.and_then(|s| s.influence);
        r.sample.subtask_influence = s.map(|s| s.subtasks.clone());
    }
    Ok(())
}

/// Loss per subtask (and `all`) on each of `eval_sets` after fine-tuning the target (LoRA) on
/// `data`; `None` data = no SFT.
pub fn finetune_and_eval(
    cfg: &RunConfig,
    data: Option<&[ChatExample]>,
    eval_sets: &[&[ChatExample]],
    dir: &Path,
) -> anyhow::Result<Vec<BTreeMap<String, f64>>> {
    let tok = ChatTokenizer::from_model_dir(&cfg.models.target)?;
    let fmt = optimsyn_data_io::ChatFormat::Tulu;
    let mut target = CausalLm::load(&cfg.models.target, opts(cfg, Role::Target)?)?;
    if let Some(data) = data {
        let train = optimsyn_influence::encode_examples(&tok, data, fmt, cfg.influence.max_len)?;
        let w = &cfg.warmup;
        let lora = w.lora();
        let adapter = LoraAdapter::init(&mut target, lora, cfg.seed)?;
        let scfg = SftConfig {
            lr: w.lr,
            epochs: 2,
            batch_size: w.batch_size,
            seed: cfg.seed,
            ..Default::default()
        };
        sft::train(
            &mut target,
            Trainable::Lora(&adapter),
            &train,
            &scfg,
            &DataInfo::default(),
            dir,
            &mut |_| {},
        )?;
    }
    eval_sets
        .iter()
        .map(|set| {
            let enc = optimsyn_influence::encode_examples(&tok, set, fmt, cfg.influence.max_len)?;
            let r = sft::evaluate(&target, &enc, 4096)?;
            let mut out: BTreeMap<String, f64> =
                r.subtasks.into_iter().map(|(k, g)| (k, g.loss)).collect();
            out.insert("all".into(), r.overall.loss);
            Ok(out)
        })
        .collect()
}

/// Writes `OUT/rl.svg`: the RL run per GRPO step in three panels, one per scale: raw IF of the
/// valid rollouts; mean reward and validity rate; the KL to the initial policy.
pub fn plot(out: &Path, rows: &[RewardRow], kl: &[(u64, f64)]) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let path = out.join("rl.svg");
    let e = |x: &dyn std::fmt::Display| anyhow::anyhow!("plot {}: {x}", path.display());
    let root = SVGBackend::new(&path, (720, 720)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let steps = rows.iter().map(|r| r.step).max().unwrap_or(1).max(2);
    let raw_if: Vec<(u64, f64)> = rows
        .iter()
        .filter_map(|r| r.if_valid_mean.map(|v| (r.step, v)))
        .collect();
    let reward: Vec<(u64, f64)> = rows.iter().map(|r| (r.step, r.reward_mean)).collect();
    let valid: Vec<(u64, f64)> = rows.iter().map(|r| (r.step, r.valid_rate)).collect();
    let overlap: Vec<(u64, f64)> = rows
        .iter()
        .filter_map(|r| r.contaminated.map(|c| (r.step, c)))
        .collect();
    type Series<'a> = (&'a str, RGBColor, &'a [(u64, f64)]);
    let panels: [(&str, Vec<Series>); 3] = [
        ("raw influence (valid rollouts)", vec![("", BLUE, &raw_if)]),
        (
            "reward, validity, share overlapping an evaluation set",
            vec![
                ("reward", RED, &reward),
                ("valid", GREEN, &valid),
                ("overlap", MAGENTA, &overlap),
            ],
        ),
        ("KL to the initial policy", vec![("", BLACK, kl)]),
    ];
    for (area, (title, series)) in root.split_evenly((3, 1)).iter().zip(panels) {
        let ys = series.iter().flat_map(|s| s.2.iter().map(|p| p.1));
        let (lo, hi) = ys.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), y| {
            (a.min(y), b.max(y))
        });
        // A flat series gets a unit-wide band around it; no data, the unit interval.
        let (lo, hi) = match (lo.is_finite(), hi > lo) {
            (true, true) => (lo, hi),
            (true, false) => (lo - 0.5, lo + 0.5),
            (false, _) => (0.0, 1.0),
        };
        let pad = (hi - lo) * 0.08;
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 15))
            .margin(8)
            .margin_right(52)
            .x_label_area_size(40)
            .y_label_area_size(56)
            .build_cartesian_2d(1u64..steps, (lo - pad)..(hi + pad))
            .map_err(|x| e(&x))?;
        chart
            .configure_mesh()
            .x_desc("GRPO step")
            .light_line_style(WHITE)
            .draw()
            .map_err(|x| e(&x))?;
        for (name, color, pts) in series {
            chart
                .draw_series(LineSeries::new(pts.to_vec(), color.stroke_width(2)))
                .map_err(|x| e(&x))?;
            // The series' name at its last point instead of a legend box over the data.
            if let (false, Some(&(x, y))) = (name.is_empty(), pts.last()) {
                chart
                    .draw_series(std::iter::once(Text::new(
                        name.to_string(),
                        (x, y),
                        ("sans-serif", 12).into_font().color(&color),
                    )))
                    .map_err(|x| e(&x))?;
            }
        }
    }
    root.present().map_err(|x| e(&x))?;
    Ok(())
}

/// `optimsyn train`: stages 0–2, resumable.
pub fn train(cfg: &RunConfig) -> anyhow::Result<Vec<RewardRow>> {
    let seeds = stage0(cfg)?;
    let m = load_models(cfg)?;
    let mut scorer = stage1(cfg, &m, &seeds)?;
    let rows = stage2(cfg, &m, &seeds, &mut scorer)?;
    let kl = read_kl(&cfg.out.join("rl").join("metrics.jsonl"));
    plot(&cfg.out, &rows, &kl)?;
    let warm = read_warmup_diagnostics(cfg)?;
    let before = RubricStats::of(&read_jsonl::<SynthRecord>(&cfg.out.join("pool.jsonl"))?);
    let last = cfg
        .out
        .join("rl")
        .join("samples")
        .join(format!("step-{:06}.jsonl", cfg.steps));
    let after = if last.exists() {
        Some(RubricStats::of(&read_jsonl::<SynthRecord>(&last)?))
    } else {
        None
    };
    let mut md = run_report(&warm, &rows, &kl);
    md.push_str(&rubric_section(&before, after.as_ref()));
    write_atomic(cfg.out.join("report.md"), md.as_bytes())?;
    Ok(rows)
}

/// What the rubrics of one set of samples ask for: their "Prompt-related" texts.
#[derive(Debug, Clone, PartialEq)]
pub struct RubricStats {
    /// Samples whose rubric parsed.
    pub parsed: usize,
    /// All samples.
    pub total: usize,
    /// Distinct "Prompt-related" texts.
    pub distinct: usize,
    /// Entropy (nats) of the "Prompt-related" texts' distribution.
    pub entropy: f64,
    /// The most frequent texts with their counts, most frequent first (ties by text).
    pub top: Vec<(String, usize)>,
}

impl RubricStats {
    /// The statistics of `records`' rubrics.
    pub fn of(records: &[SynthRecord]) -> RubricStats {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for r in records {
            if let Ok(rubric) = parse_rubric(&r.sample.provenance.rubric) {
                *counts.entry(rubric.prompt_related).or_default() += 1;
            }
        }
        let parsed: usize = counts.values().sum();
        let entropy = counts
            .values()
            .map(|&c| {
                let p = c as f64 / parsed as f64;
                -p * p.ln()
            })
            .sum();
        let mut top: Vec<(String, usize)> = counts.into_iter().collect();
        let distinct = top.len();
        top.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        top.truncate(5);
        RubricStats {
            parsed,
            total: records.len(),
            distinct,
            entropy,
            top,
        }
    }
}

fn rubric_section(before: &RubricStats, after: Option<&RubricStats>) -> String {
    use std::fmt::Write as _;
    let mut md = String::from(
        "\n## What the rubrics ask for\n\nThe \"Prompt-related\" part of each rubric, untrained (the \
         stage-1 pool) and at the last GRPO step.\n\n",
    );
    let mut one = |name: &str, s: &RubricStats| {
        let _ = writeln!(
            md,
            "- {name}: {} of {} rubrics parsed, {} distinct questions asked, entropy {:.2} nats; most frequent:",
            s.parsed, s.total, s.distinct, s.entropy
        );
        for (text, n) in &s.top {
            let _ = writeln!(md, "  - {n} × {text}");
        }
    };
    one("untrained", before);
    if let Some(a) = after {
        one("trained", a);
    }
    md
}

/// `OUT/warmup/diagnostics.json`, written by stage 1.
pub fn read_warmup_diagnostics(cfg: &RunConfig) -> anyhow::Result<WarmupDiagnostics> {
    let path = cfg.out.join("warmup").join(WARMUP_DIAGNOSTICS);
    let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_slice(&bytes)
        .with_context(|| format!("{}: not warm-up diagnostics", path.display()))
}

/// The run's `report.md`: the warm-up, whether influence discriminated, and the GRPO steps.
pub fn run_report(warm: &WarmupDiagnostics, rows: &[RewardRow], kl: &[(u64, f64)]) -> String {
    use std::fmt::Write as _;
    let mut md = String::from("# optimsyn run\n\n## Warm-up\n\n");
    let _ = writeln!(
        md,
        "{} examples, {} steps; validation loss of the target {:.3} → {:.3}.\n",
        warm.examples, warm.steps, warm.val_loss_before, warm.val_loss_after
    );
    let shared_steps = rows
        .iter()
        .filter(|r| r.discrimination.is_some_and(|d| d.shared_dominates()))
        .count();
    match &warm.discrimination {
        Some(d) => {
            let _ = writeln!(
                md,
                "Influence on {} pool samples after the warm-up: {}.\n",
                warm.probe_candidates,
                d.summary()
            );
        }
        None => md.push_str("Too few pool samples to check influence after the warm-up.\n\n"),
    }
    if warm.discrimination.is_some_and(|d| d.shared_dominates()) || 2 * shared_steps > rows.len() {
        let _ = writeln!(
            md,
            "**Warning: influence mostly measures what every candidate shares** (candidates differ by \
             less than {} of the mean cosine after the warm-up, or in {shared_steps} of {} GRPO \
             steps): the rewards rank candidates by little more than noise. Warm the target up longer (`warmup.epochs`) until its validation \
             loss has come down, then train again; docs/GUIDE.md, \"Reading the diagnostics\".\n",
            optimsyn_influence::SHARED_SPREAD_RATIO,
            rows.len()
        );
    }
    let overlapping = rows
        .iter()
        .filter(|r| r.contaminated.is_some_and(|c| c > 0.0))
        .count();
    if overlapping > 0 {
        let _ = writeln!(
            md,
            "**Rollouts overlap an evaluation set in {overlapping} of {} steps** (column `overlap`; \
             the samples files name the rows): the policy may be learning to ask for the validation \
             questions. `hygiene.penalize_rollouts = true` pays such rollouts the invalid reward.\n",
            rows.len()
        );
    }
    md.push_str("## GRPO steps\n\n| step | valid | overlap | IF mean | IF max | reward | top share | spread / mean | KL |\n|---|---|---|---|---|---|---|---|---|\n");
    let kl: HashMap<u64, f64> = kl.iter().copied().collect();
    let num =
        |x: Option<f64>, digits: usize| x.map_or("–".to_string(), |v| format!("{v:.digits$}"));
    for r in rows {
        let d = r.discrimination;
        let _ = writeln!(
            md,
            "| {} | {:.2} | {} | {} | {} | {:.3} | {} | {} | {} |",
            r.step,
            r.valid_rate,
            num(r.contaminated, 2),
            num(r.if_valid_mean, 4),
            num(r.if_valid_max, 4),
            r.reward_mean,
            num(d.and_then(|d| d.features).map(|f| f.top_share), 2),
            num(d.map(|d| d.spread_ratio), 2),
            num(kl.get(&r.step).copied(), 5),
        );
    }
    md
}

/// The KL per step from the trainer's metrics.
pub fn read_kl(path: &Path) -> Vec<(u64, f64)> {
    read_jsonl::<serde_json::Value>(path)
        .unwrap_or_default()
        .iter()
        .filter_map(|v| Some((v["step"].as_u64()?, v["kl"].as_f64()?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn score(id: &str, a: f64, b: f64) -> optimsyn_influence::Score {
        optimsyn_influence::Score {
            id: id.into(),
            influence: Some(a.max(b)),
            subtasks: [("a".to_string(), a), ("b".to_string(), b)].into(),
            tokens: 4,
            loss_tokens: 2,
            loss: None,
            reason: None,
        }
    }

    #[test]
    fn standardized_subtasks_do_not_let_a_larger_scale_win() {
        use optimsyn_influence::SubtaskAgg;
        // Subtask `a` has cosines ten times larger: raw max picks it for everyone.
        let s = [
            score("x", 0.30, 0.01),
            score("y", 0.10, 0.03),
            score("z", 0.20, 0.02),
        ];
        let scored: Vec<Option<&optimsyn_influence::Score>> =
            vec![Some(&s[0]), None, Some(&s[1]), Some(&s[2])];
        let raw = reward_influence(SubtaskScale::Raw, SubtaskAgg::Max, &scored);
        assert_eq!(raw, vec![Some(0.30), None, Some(0.10), Some(0.20)]);
        let z = reward_influence(SubtaskScale::Standardized, SubtaskAgg::Max, &scored);
        let z: Vec<f64> = z.iter().map(|v| v.unwrap_or(f64::NAN)).collect();
        // y is the best on `b`: as good a candidate as x is on `a`.
        assert!((z[0] - z[2]).abs() < 1e-12 && z[0] > z[3], "{z:?}");
        assert!(z[1].is_nan(), "an invalid rollout stays invalid");
        let mean = reward_influence(SubtaskScale::Standardized, SubtaskAgg::Mean, &scored);
        assert!(mean.iter().flatten().all(|v| v.abs() < 1e-12), "{mean:?}");
        // One scored rollout: nothing to standardize against.
        assert_eq!(
            reward_influence(SubtaskScale::Standardized, SubtaskAgg::Max, &scored[..1]),
            vec![Some(0.30)]
        );
    }

    #[test]
    fn reward_modes() {
        let ifs = [Some(0.02), None, Some(0.06), Some(0.04)];
        let n = rewards(RewardMode::Normalized, 0.1, &ifs);
        assert_eq!(n, vec![0.0, -0.1, 1.0, 0.5000000000000001]);
        assert_eq!(
            rewards(RewardMode::Paper, 0.1, &ifs),
            vec![0.02, -0.1, 0.06, 0.04]
        );
        // The released code: min–max over all rollouts, placeholders (IF 0) included, times Valid.
        let c = rewards(RewardMode::CodeExact, 0.1, &ifs);
        assert!((c[0] - 1.0 / 3.0).abs() < 1e-12 && c[1] == 0.0 && c[2] == 1.0);
        // All equal: no signal, nothing blows up.
        assert_eq!(
            rewards(RewardMode::Normalized, 0.1, &[Some(0.5), Some(0.5)]),
            vec![0.0, 0.0]
        );
        assert_eq!(
            rewards(RewardMode::Normalized, 0.1, &[None, None]),
            vec![-0.1, -0.1]
        );
    }
}
