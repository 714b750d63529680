//! Stage 3: the final dataset, one rubric per seed from the trained (or untrained) policy.

use std::collections::HashMap;

use optimsyn_data_io::ChatExample;
use optimsyn_influence::Score;
use optimsyn_lm::sft;
use optimsyn_synth::SynthRecord;

use crate::config::RunConfig;
use crate::error::{Error, Result};
use crate::models::{Models, encode_prompts, load_policy};
use crate::rollouts::{
    RubricItem, log_screen, policy_info, sample_rubrics, synthesize_rubrics, valid_examples,
    write_records,
};
use crate::stage0::SeedPrompt;
use crate::stage1::warmup_scorer;

/// Stage 3: `synthesize.rubrics_per_seed` rubrics per seed (all seeds) from the policy
/// (`trained`: the latest RL checkpoint's adapter; otherwise the untrained base), QA pairs
/// written to `OUT/dataset-<tag>.jsonl` (screened, scored, with a card). Returns the valid
/// examples.
pub fn stage3(
    cfg: &RunConfig,
    m: &Models,
    seeds: &[SeedPrompt],
    trained: bool,
) -> Result<Vec<ChatExample>> {
    use optimsyn_rl_grpo::Policy;
    let all: Vec<&SeedPrompt> = seeds.iter().collect();
    let prompts = encode_prompts(cfg, m, &all)?;
    let mut policy = load_policy(cfg)?;
    let tag = if trained { "rl" } else { "untrained" };
    if trained {
        let rl = cfg.out.join("rl");
        let ckpt = optimsyn_rl_grpo::latest_checkpoint(&rl)?.ok_or_else(|| {
            Error::Stage(format!(
                "no RL checkpoint in {}: run `optimsyn train` first",
                rl.display()
            ))
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
    let items: Vec<RubricItem> = all
        .iter()
        .flat_map(|s| (0..n).map(move |g| (s, g)))
        .zip(texts)
        .map(|((s, g), text)| (s.doc.clone(), format!("{}/final{g}", s.doc.id), text))
        .collect();
    let file = cfg.out.join(format!("dataset-{tag}.jsonl"));
    let pinfo = policy_info(cfg, tag, t);
    let mut recs = synthesize_rubrics(cfg, m, &items, &pinfo, cfg.steps, &file)?;
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
fn score_dataset(cfg: &RunConfig, recs: &mut [SynthRecord]) -> Result<()> {
    let valid = valid_examples(recs);
    if valid.is_empty() {
        return Ok(());
    }
    let warm_dir = cfg.out.join("warmup");
    // `synthesize --untrained` may run before any warm-up: the dataset is still written.
    let warm = sft::list_checkpoints(&warm_dir)?;
    if warm.is_empty() {
        tracing::warn!(
            "no warm-up checkpoint in {}: the dataset's influence is not scored (run `optimsyn \
             train` first, or set `synthesize.score_influence = false`)",
            warm_dir.display()
        );
        return Ok(());
    }
    let mut scorer = warmup_scorer(cfg)?;
    let scores = scorer.score(&valid)?;
    let by_id: HashMap<&str, &Score> = scores.iter().map(|s| (s.id.as_str(), s)).collect();
    for r in recs.iter_mut() {
        let s = by_id.get(r.id()).filter(|_| r.is_valid());
        r.sample.influence = s.and_then(|s| s.influence);
        r.sample.subtask_influence = s.map(|s| s.subtasks.clone());
    }
    Ok(())
}
