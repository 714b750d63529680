//! Stage 1: the untrained policy's pool, the warm-up of the target on part of it, and the
//! influence scorer at the warm-up checkpoints, with a check of whether influence discriminates.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use optimsyn_data_io::{ChatExample, ChatFormat, ChatTokenizer, read_jsonl, write_atomic};
use optimsyn_influence::{Discrimination, InfluenceScorer, ScoreConfig};
use optimsyn_lm::{CausalLm, DataInfo, LoraAdapter, SftConfig, TrainExample, Trainable, sft};
use optimsyn_rl_grpo::Prompt;
use optimsyn_synth::SynthRecord;
use serde::{Deserialize, Serialize};

use crate::config::{Role, RunConfig};
use crate::error::{Error, Result};
use crate::models::{Models, encode_prompts, load_policy, opts};
use crate::rollouts::{
    RubricItem, log_screen, policy_info, sample_rubrics, synthesize_rubrics, valid_examples,
    write_records,
};
use crate::stage0::{SeedPrompt, train_split};

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
    pub discrimination: Option<Discrimination>,
}

/// Stage 1: the untrained policy's pool, the warm-up of the target on part of it, and the scorer
/// (validation features computed or reused).
pub fn stage1(cfg: &RunConfig, m: &Models, seeds: &[SeedPrompt]) -> Result<InfluenceScorer> {
    let pool_path = cfg.out.join("pool.jsonl");
    let pool = initial_pool(cfg, m, seeds, &pool_path)?;
    let valid = valid_examples(&pool);
    tracing::info!(
        pool = pool.len(),
        valid = valid.len(),
        "stage 1: initial pool"
    );
    if valid.is_empty() {
        return Err(Error::Stage(format!(
            "stage 1: no valid QA pair in the initial pool ({}); check the generator and its prompt",
            pool_path.display()
        )));
    }
    let n_warm =
        ((valid.len() as f64 * cfg.data.warmup_fraction).ceil() as usize).clamp(1, valid.len());
    let warm = warm_up(cfg, &valid[..n_warm], &pool_path)?;
    let mut scorer = warmup_scorer(cfg)?;
    let diag = match warm.val_loss_before {
        Some(before) => {
            // Prefer pool samples the warm-up did not train on: they stand for fresh rollouts.
            let probe: Vec<ChatExample> = valid[n_warm..]
                .iter()
                .chain(&valid[..n_warm])
                .take(DIAGNOSTIC_CANDIDATES)
                .cloned()
                .collect();
            let d = WarmupDiagnostics {
                examples: warm.examples,
                steps: warm.steps,
                val_loss_before: before,
                val_loss_after: warm.val_loss_after(cfg)?,
                probe_candidates: probe.len(),
                probe_unseen: valid.len() - n_warm,
                discrimination: scorer.score_report(&probe)?.discrimination,
            };
            let path = cfg.out.join("warmup").join(WARMUP_DIAGNOSTICS);
            write_atomic(&path, serde_json::to_string_pretty(&d)?.as_bytes())?;
            d
        }
        None => read_warmup_diagnostics(cfg)?,
    };
    log_warmup(&diag);
    Ok(scorer)
}

/// The untrained policy's samples, one per training seed, in `OUT/pool.jsonl` (screened, with a
/// card). Rubrics are sampled only for seeds whose pool sample is not written yet.
fn initial_pool(
    cfg: &RunConfig,
    m: &Models,
    seeds: &[SeedPrompt],
    pool_path: &Path,
) -> Result<Vec<SynthRecord>> {
    let train = train_split(seeds);
    let prompts = encode_prompts(cfg, m, &train)?;
    let temperature = cfg.grpo.rollout.temperature;
    let done: HashSet<String> = if pool_path.exists() {
        read_jsonl::<SynthRecord>(pool_path)?
            .iter()
            .map(|r| r.id().to_string())
            .collect()
    } else {
        HashSet::new()
    };
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
    let items: Vec<RubricItem> = train
        .iter()
        .zip(texts)
        .map(|(s, t)| (s.doc.clone(), format!("{}/pool", s.doc.id), t))
        .collect();
    let pinfo = policy_info(cfg, "untrained", temperature);
    let mut pool = synthesize_rubrics(cfg, m, &items, &pinfo, 0, pool_path)?;
    let counts = m.hygiene.screen_dataset(&mut pool)?;
    log_screen("stage 1: pool", &counts);
    write_records(pool_path, &pool)?;
    m.hygiene.write_card(pool_path, &pool, counts)?;
    Ok(pool)
}

/// The warmed-up target, as far as the diagnostics need it.
struct WarmedUp {
    target: CausalLm,
    adapter: LoraAdapter,
    val: Vec<TrainExample>,
    examples: usize,
    steps: u64,
    /// `None` when the diagnostics were written by an earlier (resumed) run.
    val_loss_before: Option<f64>,
}

impl WarmedUp {
    /// The validation loss at the last warm-up checkpoint.
    fn val_loss_after(&self, cfg: &RunConfig) -> Result<f64> {
        let warm_dir = cfg.out.join("warmup");
        let ckpts = sft::list_checkpoints(&warm_dir)?;
        let last = ckpts.values().last().ok_or_else(|| {
            Error::Stage(format!("{}: no warm-up checkpoint", warm_dir.display()))
        })?;
        self.adapter.load_weights(last)?;
        Ok(sft::evaluate(&self.target, &self.val, 4096)?.overall.loss)
    }
}

/// LoRA warm-up of the target on `examples` (resumes from `OUT/warmup/`); the validation loss
/// before it is measured unless the diagnostics exist already.
fn warm_up(cfg: &RunConfig, examples: &[ChatExample], pool_path: &Path) -> Result<WarmedUp> {
    let warm_dir = cfg.out.join("warmup");
    let tok = ChatTokenizer::from_model_dir(&cfg.models.target)?;
    let warm = optimsyn_influence::encode_examples(
        &tok,
        examples,
        ChatFormat::Tulu,
        cfg.influence.max_len,
    )?;
    let mut target = CausalLm::load(&cfg.models.target, opts(cfg, Role::Target)?)?;
    let w = &cfg.warmup;
    let adapter = LoraAdapter::init(&mut target, w.lora(), cfg.seed)?;
    let val: Vec<ChatExample> = read_jsonl(&cfg.data.val)?;
    let val =
        optimsyn_influence::encode_examples(&tok, &val, ChatFormat::Tulu, cfg.influence.max_len)?;
    let val_loss_before = if warm_dir.join(WARMUP_DIAGNOSTICS).exists() {
        None
    } else {
        Some(sft::evaluate(&target, &val, 4096)?.overall.loss)
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
        format: Some(ChatFormat::Tulu),
        data_hash: Some(optimsyn_data_io::file_hash(pool_path)?),
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
    Ok(WarmedUp {
        target,
        adapter,
        val,
        examples: warm.len(),
        steps: report.steps,
        val_loss_before,
    })
}

/// How influence is scored in this run.
pub fn score_config(cfg: &RunConfig) -> Result<ScoreConfig> {
    Ok(ScoreConfig {
        projector: cfg
            .influence
            .projector
            .with_dim(cfg.influence.proj_dim, cfg.seed),
        precond: cfg.influence.precond,
        subtask_agg: cfg.influence.subtask_agg,
        format: Some(ChatFormat::Tulu),
        max_len: cfg.influence.max_len,
        ..Default::default()
    })
}

/// The scorer at the run's warm-up checkpoints (`OUT/warmup/checkpoint-N`) against its
/// validation set, as stage 2 uses it.
pub fn warmup_scorer(cfg: &RunConfig) -> Result<InfluenceScorer> {
    let warm_dir = cfg.out.join("warmup");
    let ckpts: Vec<PathBuf> = sft::list_checkpoints(&warm_dir)?.into_values().collect();
    if ckpts.is_empty() {
        return Err(Error::Stage(format!(
            "{}: no warm-up checkpoint; run `optimsyn train` (its stage 1 warms the target up) first",
            warm_dir.display()
        )));
    }
    let val: Vec<ChatExample> = read_jsonl(&cfg.data.val)?;
    Ok(InfluenceScorer::new(
        &cfg.models.target,
        &ckpts,
        &val,
        score_config(cfg)?,
        crate::device::load_options(cfg.models.device_of(Role::Target), cfg.influence.dtype)?,
    )?)
}

/// `OUT/warmup/diagnostics.json`, written by stage 1.
pub fn read_warmup_diagnostics(cfg: &RunConfig) -> Result<WarmupDiagnostics> {
    let path = cfg.out.join("warmup").join(WARMUP_DIAGNOSTICS);
    let bytes = std::fs::read(&path).map_err(Error::io(&path))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| Error::run_folder(&path, format!("not warm-up diagnostics: {e}")))
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
