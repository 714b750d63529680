//! End to end with a real (tiny) language model: a randomly initialized Qwen3 (vocab 64, hidden
//! 32, 2 layers) trained with GRPO, full fine-tuning, k3 KL to a frozen copy of itself, learns to
//! emit a target token, for several seeds, in a fixed number of steps.

#[path = "../../../examples/src/lm_policy.rs"]
mod lm_policy;

use lm_policy::LmPolicy;
use optimsyn_data_io::ModelConfig;
use optimsyn_lm::{CausalLm, LoadOptions};
use optimsyn_rl_grpo::{GrpoConfig, Prompt, Reference, RolloutBatch, Trainer, reward_fn};

const TARGET: u32 = 7;
const STEPS: u64 = 20;

fn config() -> ModelConfig {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../lm/tests/fixtures/qwen3_tied_gqa/config.json"
    );
    ModelConfig::from_file(path).expect("fixture config")
}

fn model(seed: u64) -> CausalLm {
    CausalLm::random(&config(), seed, Some(0.05), LoadOptions::default()).expect("random model")
}

fn prompts() -> Vec<Prompt> {
    (0..8u32)
        .map(|i| Prompt::new(format!("p{i}"), vec![10 + i, 20 + i, 30 + i]))
        .collect()
}

fn grpo_config(seed: u64) -> GrpoConfig {
    let mut c = GrpoConfig::default();
    c.seed = seed;
    c.group_size = 8;
    c.prompts_per_step = 8;
    c.mini_batch_prompts = 4; // two optimizer steps per rollout batch: recomputed old log-probs
    c.micro_batch_size = 16;
    c.rollout.temperature = 1.0;
    c.rollout.max_new_tokens = 4;
    c.optimizer.lr = 3e-3;
    c
}

fn target_share(b: &RolloutBatch) -> Vec<f64> {
    b.rollouts
        .iter()
        .map(|r| {
            let t = &r.completion.tokens;
            t.iter().filter(|&&x| x == TARGET).count() as f64 / t.len() as f64
        })
        .collect()
}

fn trainer(seed: u64, init: u64) -> Trainer<LmPolicy> {
    let policy = LmPolicy::trainable(model(init), Vec::new());
    let reference = LmPolicy::frozen(model(seed), Vec::new());
    Trainer::new(
        grpo_config(seed),
        policy,
        Reference::Frozen(reference),
        prompts(),
    )
    .unwrap()
}

fn run(seed: u64) -> (f64, f64) {
    let mut trainer = trainer(seed, seed);
    let m = trainer.train(&mut reward_fn(target_share), STEPS).unwrap();
    let first = m[0].reward.mean;
    let last = m[m.len() - 2..].iter().map(|x| x.reward.mean).sum::<f64>() / 2.0;
    println!(
        "seed {seed}: reward {first:.3} → {last:.3}, kl {:?}, time {:?}",
        m.last().and_then(|x| x.kl),
        m.last().map(|x| x.time)
    );
    (first, last)
}

#[test]
fn tiny_lm_learns_to_emit_the_target_token() {
    // Tensors this small gain nothing from intra-op threads, and on a busy machine the pool's
    // spinning threads slow every op down.
    tch::set_num_threads(1);
    for seed in [1, 2, 3] {
        let (first, last) = run(seed);
        assert!(
            first < 0.1,
            "seed {seed}: the untrained model already emits the target ({first})"
        );
        assert!(
            last > 0.6,
            "seed {seed}: reward {first} → {last} in {STEPS} steps"
        );
    }
}

#[test]
fn lm_policy_resumes_bit_for_bit() {
    tch::set_num_threads(1);
    let mut straight = trainer(5, 5);
    straight.train(&mut reward_fn(target_share), 4).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let mut first = trainer(5, 5);
    first.train(&mut reward_fn(target_share), 2).unwrap();
    first.save_checkpoint(dir.path().join("ckpt")).unwrap();
    drop(first);
    let mut resumed = Trainer::resume(
        grpo_config(5),
        LmPolicy::trainable(model(77), Vec::new()),
        Reference::Frozen(LmPolicy::frozen(model(5), Vec::new())),
        prompts(),
        dir.path().join("ckpt"),
    )
    .unwrap();
    resumed.train(&mut reward_fn(target_share), 4).unwrap();
    let a = straight.policy().model.named_parameters();
    let b = resumed.policy().model.named_parameters();
    assert_eq!(a.len(), b.len());
    for ((ka, ta), (kb, tb)) in a.iter().zip(&b) {
        assert_eq!(ka, kb);
        assert!(ta.equal(tb), "{ka} differs after resuming");
    }
}
