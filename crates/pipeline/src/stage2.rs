//! Stage 2: GRPO on the training prompts with influence rewards, resumable from `OUT/rl/`.

use optimsyn_data_io::read_jsonl;
use optimsyn_influence::InfluenceScorer;
use optimsyn_rl_grpo::{GrpoConfig, OutputOptions, Reference, Trainer};
use optimsyn_rubric_policy::RubricPolicy;
use optimsyn_synth::OpenAiConfig;

use crate::config::RunConfig;
use crate::error::{Error, Result};
use crate::models::{Models, encode_prompts, load_policy};
use crate::progress::Progress;
use crate::reward::{InfluenceReward, RewardRow};
use crate::served::{ServedPolicy, ServedRollouts};
use crate::stage0::{SeedPrompt, train_split};

/// The run's GRPO trainer over the training seeds' prompts: a fresh policy, or the one saved in
/// `OUT/rl/` by an earlier (killed) run; its rollouts are sampled on `models.policy_url` when set.
pub fn grpo_trainer(
    cfg: &RunConfig,
    m: &Models,
    seeds: &[SeedPrompt],
) -> Result<Trainer<ServedPolicy<RubricPolicy>>> {
    let prompts = encode_prompts(cfg, m, &train_split(seeds))?;
    let policy = rollout_policy(cfg, load_policy(cfg)?)?;
    let mut grpo: GrpoConfig = cfg.grpo.clone();
    grpo.seed = cfg.seed;
    grpo.rollout.max_new_tokens = cfg.policy.max_new_tokens;
    Ok(Trainer::new_or_resume(
        grpo,
        policy,
        Reference::Policy,
        prompts,
        OutputOptions::new(cfg.out.join("rl"), 1),
    )?)
}

/// `policy`, with its rollouts on `models.policy_url` when the config names a server.
fn rollout_policy(cfg: &RunConfig, policy: RubricPolicy) -> Result<ServedPolicy<RubricPolicy>> {
    let Some(url) = &cfg.models.policy_url else {
        return Ok(ServedPolicy::local(policy));
    };
    let publish = cfg.out.join("rl").join("served");
    let publish_dir = std::path::absolute(&publish).map_err(Error::io(&publish))?;
    let context = policy.model().config().max_position_embeddings;
    let server = OpenAiConfig {
        base_url: url.clone(),
        model: cfg.models.policy_model.clone().unwrap_or_default(),
        ..Default::default()
    };
    let to = ServedRollouts {
        server,
        publish_dir,
        context,
    };
    Ok(ServedPolicy::served(policy, to)?)
}

/// Stage 2: GRPO on the training prompts with influence rewards, up to `cfg.steps`; resumes from
/// `OUT/rl/`. Returns every step's [`RewardRow`].
pub fn stage2(
    cfg: &RunConfig,
    m: &Models,
    seeds: &[SeedPrompt],
    scorer: &mut InfluenceScorer,
    progress: &mut dyn Progress,
) -> Result<Vec<RewardRow>> {
    let mut trainer = grpo_trainer(cfg, m, seeds)?;
    let start = trainer.step_count();
    let mut reward = InfluenceReward::new(cfg, m, seeds, scorer, start)?;
    progress.start("GRPO", cfg.steps, start.min(cfg.steps));
    while trainer.step_count() < cfg.steps {
        let metrics = trainer.step(&mut reward)?;
        progress.advance(
            trainer.step_count(),
            &format!("reward {:.3}", metrics.reward.mean),
        );
    }
    progress.finish();
    trainer.save()?;
    Ok(read_jsonl(cfg.out.join("rl").join("influence.jsonl"))?)
}
