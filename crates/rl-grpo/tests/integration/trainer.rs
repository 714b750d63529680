//! The training loop on the toy policy: learning, metrics rows, checkpoint/resume identity,
//! micro-batch invariance, degenerate groups and the errors a caller can cause.

use std::path::Path;

use optimsyn_rl_grpo::{
    CategoricalPolicy, Completion, Error, GrpoConfig, OldLogprobs, OutputOptions, Policy,
    PolicyLogprobs, Prompt, Reference, RolloutBatch, SampleRequest, StepMetrics, TokenBatch,
    Trainer, reward_fn,
};
use tch::{Kind, Tensor};

use crate::common::values;

const TARGET: u32 = 3;

fn prompts(n: usize) -> Vec<Prompt> {
    (0..n)
        .map(|i| Prompt::new(format!("prompt-{i}"), vec![1, 2, i as u32 + 3]))
        .collect()
}

fn policy(seed: u64) -> CategoricalPolicy {
    CategoricalPolicy::new(4, 6, 0.5, seed, Kind::Float).unwrap()
}

fn count_target(batch: &RolloutBatch) -> Vec<f64> {
    batch
        .rollouts
        .iter()
        .map(|r| r.completion.tokens.iter().filter(|&&t| t == TARGET).count() as f64)
        .collect()
}

/// A small config exercising every batching path: 2 epochs, 2 mini-batches, micro-batches of 3,
/// shuffled prompts and mini-batches, k3 KL, an entropy bonus.
fn busy_config() -> GrpoConfig {
    let mut c = GrpoConfig::default();
    c.seed = 11;
    c.group_size = 4;
    c.prompts_per_step = 4;
    c.mini_batch_prompts = 2;
    c.micro_batch_size = 3;
    c.epochs = 2;
    c.shuffle_mini_batches = true;
    c.rollout.temperature = 1.2;
    c.rollout.max_new_tokens = 4;
    c.loss.kl_coef = 0.05;
    c.loss.entropy_coef = 0.01;
    c.optimizer.lr = 0.05;
    c
}

fn without_times(m: &StepMetrics) -> StepMetrics {
    let mut m = m.clone();
    m.time = Default::default();
    m
}

fn read_metrics(dir: &Path) -> Vec<StepMetrics> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn toy_policy_learns_and_streams_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = busy_config();
    c.loss.entropy_coef = 0.0;
    (c.loss.clip_low, c.loss.clip_high) = (0.05, 0.05); // so that later updates clip
    let mut trainer = Trainer::new(c, policy(1), Reference::Frozen(policy(1)), prompts(6))
        .unwrap()
        .with_output(OutputOptions::new(dir.path(), 0))
        .unwrap();
    let metrics = trainer.train(&mut reward_fn(count_target), 15).unwrap();
    assert_eq!(metrics.len(), 15);
    let (first, last) = (&metrics[0], &metrics[14]);
    assert!(
        last.reward.mean > first.reward.mean + 1.5,
        "reward {} → {}",
        first.reward.mean,
        last.reward.mean
    );
    assert!(
        last.kl.unwrap() > 0.0,
        "the policy moved away from the reference"
    );
    assert!(first.entropy.is_some());
    assert_eq!(last.optimizer_steps, 15 * 4);
    assert_eq!(
        (last.rollouts, last.prompts, last.trained_rollouts),
        (16, 4, 16)
    );
    assert_eq!(last.completion_tokens, 64);
    assert_eq!(last.truncated_fraction, 1.0);
    assert!(
        metrics
            .iter()
            .all(|m| m.grad_norm.is_finite() && m.lr == 0.05)
    );
    // Later epochs and mini-batches run off-policy: ratios move and clipping happens.
    assert!(metrics.iter().any(|m| m.clip_fraction > 0.0));
    let rows = read_metrics(dir.path());
    assert_eq!(rows.len(), 15);
    assert_eq!(
        rows.iter().map(|m| m.step).collect::<Vec<_>>(),
        (1..=15).collect::<Vec<_>>()
    );
    assert_eq!(rows[14], metrics[14]);
    // Stable field names for plots.
    let line = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    let first_row: serde_json::Value = serde_json::from_str(line.lines().next().unwrap()).unwrap();
    for key in [
        "step",
        "reward",
        "advantage",
        "kl",
        "entropy",
        "clip_fraction",
        "zero_variance_groups",
        "completion_length",
        "grad_norm",
        "time",
    ] {
        assert!(first_row.get(key).is_some(), "metrics row lacks `{key}`");
    }
    for key in ["rollout_s", "reward_s", "logprobs_s", "update_s", "total_s"] {
        assert!(first_row["time"].get(key).is_some(), "time lacks `{key}`");
    }
}

#[test]
fn resumed_run_equals_uninterrupted_run() {
    let config = busy_config();
    let set = || prompts(5); // 4 prompts a step over 5: epochs wrap inside steps
    // Uninterrupted: 6 steps.
    let a_dir = tempfile::tempdir().unwrap();
    let mut a = Trainer::new(
        config.clone(),
        policy(2),
        Reference::Frozen(policy(2)),
        set(),
    )
    .unwrap()
    .with_output(OutputOptions::new(a_dir.path(), 0))
    .unwrap();
    a.train(&mut reward_fn(count_target), 6).unwrap();

    // Interrupted: checkpoint at 3, one more step whose checkpoint never happens, then a "crash".
    let b_dir = tempfile::tempdir().unwrap();
    let opts = OutputOptions {
        dir: b_dir.path().to_owned(),
        save_every: 3,
        keep_last: 1,
    };
    {
        let mut b = Trainer::new_or_resume(
            config.clone(),
            policy(2),
            Reference::Frozen(policy(2)),
            set(),
            opts.clone(),
        )
        .unwrap();
        b.train(&mut reward_fn(count_target), 4).unwrap();
        assert_eq!(read_metrics(b_dir.path()).len(), 4);
    }
    assert!(b_dir.path().join("checkpoint-3").is_dir());
    let mut b = Trainer::new_or_resume(
        config.clone(),
        policy(99), // a different init: everything must come from the checkpoint
        Reference::Frozen(policy(2)),
        set(),
        opts,
    )
    .unwrap();
    assert_eq!(b.step_count(), 3);
    b.train(&mut reward_fn(count_target), 6).unwrap();

    assert!(
        a.policy().logits().equal(b.policy().logits()),
        "parameters differ after resuming"
    );
    for key in a.optimizer().keys() {
        assert!(
            a.optimizer()
                .exp_avg(key)
                .unwrap()
                .equal(b.optimizer().exp_avg(key).unwrap())
        );
        assert!(
            a.optimizer()
                .exp_avg_sq(key)
                .unwrap()
                .equal(b.optimizer().exp_avg_sq(key).unwrap())
        );
    }
    assert_eq!(a.data_cursor(), b.data_cursor());
    let (ra, rb) = (read_metrics(a_dir.path()), read_metrics(b_dir.path()));
    assert_eq!(
        rb.len(),
        6,
        "rows after the checkpoint were replaced, not duplicated"
    );
    for (x, y) in ra.iter().zip(&rb) {
        assert_eq!(without_times(x), without_times(y));
    }
    // keep_last = 1: only the newest checkpoint is left.
    assert!(b_dir.path().join("checkpoint-6").is_dir());
    assert!(!b_dir.path().join("checkpoint-3").exists());
    // Saving again at the same step (a final save after save_every) replaces it cleanly.
    assert_eq!(b.save().unwrap(), b_dir.path().join("checkpoint-6"));
    assert_eq!(
        optimsyn_rl_grpo::latest_checkpoint(b_dir.path()).unwrap(),
        Some(b_dir.path().join("checkpoint-6"))
    );
    let names: Vec<String> = std::fs::read_dir(b_dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().all(|n| !n.starts_with('.')),
        "no leftovers: {names:?}"
    );
}

#[test]
fn resume_refuses_another_config_or_prompt_set() {
    let dir = tempfile::tempdir().unwrap();
    let config = busy_config();
    let mut t = Trainer::new(
        config.clone(),
        policy(3),
        Reference::Frozen(policy(3)),
        prompts(5),
    )
    .unwrap()
    .with_output(OutputOptions::new(dir.path(), 1))
    .unwrap();
    t.step(&mut reward_fn(count_target)).unwrap();
    let ckpt = dir.path().join("checkpoint-1");
    let mut other = config.clone();
    other.loss.clip_high = 0.28;
    let err = Trainer::resume(
        other,
        policy(3),
        Reference::Frozen(policy(3)),
        prompts(5),
        &ckpt,
    )
    .unwrap_err();
    assert!(
        matches!(&err, Error::Checkpoint { .. }) && err.to_string().contains("loss.clip_high"),
        "{err}"
    );
    let err = Trainer::resume(
        config,
        policy(3),
        Reference::Frozen(policy(3)),
        prompts(4),
        &ckpt,
    )
    .unwrap_err();
    assert!(err.to_string().contains("prompt set"), "{err}");
}

#[test]
fn micro_batch_size_does_not_change_training() {
    let run = |micro: usize| {
        let mut c = busy_config();
        c.micro_batch_size = micro;
        c.logprob_batch_size = Some(micro.max(2) - 1);
        let mut t = Trainer::new(c, policy(4), Reference::Frozen(policy(4)), prompts(5)).unwrap();
        let m = t.train(&mut reward_fn(count_target), 3).unwrap();
        (values(t.policy().logits()), m)
    };
    let (a, ma) = run(1);
    let (b, mb) = run(8);
    let diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max);
    assert!(diff < 1e-5, "parameters differ by {diff}");
    for (x, y) in ma.iter().zip(&mb) {
        assert_eq!(x.reward, y.reward, "same rollouts");
        assert!((x.loss - y.loss).abs() < 1e-5, "{} vs {}", x.loss, y.loss);
    }
}

#[test]
fn first_inner_iteration_has_ratio_one() {
    for (old, exact) in [(OldLogprobs::Auto, true), (OldLogprobs::Recompute, false)] {
        let mut c = busy_config();
        c.epochs = 1;
        c.mini_batch_prompts = 4; // one optimizer step per rollout batch
        c.old_logprobs = old;
        let mut t = Trainer::new(c, policy(5), Reference::Frozen(policy(5)), prompts(5)).unwrap();
        let m = t.step(&mut reward_fn(count_target)).unwrap();
        if exact {
            assert_eq!((m.ratio_min, m.ratio_max), (1.0, 1.0));
        } else {
            assert!(
                (m.ratio_max - 1.0).abs() < 1e-6 && (m.ratio_min - 1.0).abs() < 1e-6,
                "{m:?}"
            );
        }
        assert_eq!(m.clip_fraction, 0.0);
        assert!(m.ppo_kl.abs() < 1e-6);
    }
}

#[test]
fn equal_rewards_leave_the_policy_untouched_and_are_counted() {
    let mut c = busy_config();
    c.loss.kl_coef = 0.0;
    c.loss.entropy_coef = 0.0;
    c.optimizer.weight_decay = 0.0;
    let before = values(policy(6).logits());
    let mut t = Trainer::new(c.clone(), policy(6), Reference::None, prompts(5)).unwrap();
    let m = t
        .step(&mut reward_fn(|b: &RolloutBatch| vec![0.5; b.len()]))
        .unwrap();
    assert_eq!(m.zero_variance_groups, 4);
    assert_eq!(m.frac_zero_variance, 1.0);
    assert_eq!(m.advantage.max, 0.0);
    assert_eq!(m.grad_norm, 0.0);
    assert_eq!(
        values(t.policy().logits()),
        before,
        "zero advantage, zero update"
    );

    // Skipping them: no update at all.
    c.skip_zero_variance_groups = true;
    let mut t = Trainer::new(c, policy(6), Reference::None, prompts(5)).unwrap();
    let m = t
        .step(&mut reward_fn(|b: &RolloutBatch| {
            // Group 0 informative, the others constant.
            (0..b.len())
                .map(|i| if i < 4 { i as f64 } else { 1.0 })
                .collect()
        }))
        .unwrap();
    assert_eq!((m.zero_variance_groups, m.trained_rollouts), (3, 4));
    assert_eq!(m.optimizer_steps, 2, "one mini-batch per epoch");
}

#[test]
fn reward_errors_name_the_rollout() {
    let mut c = busy_config();
    c.loss.kl_coef = 0.0;
    let mut t = Trainer::new(c, policy(7), Reference::None, prompts(5)).unwrap();
    let err = t
        .step(&mut reward_fn(|b: &RolloutBatch| vec![1.0; b.len() - 1]))
        .unwrap_err();
    assert!(matches!(err, Error::RewardOutput { step: 1, .. }), "{err}");
    let err = t
        .step(&mut reward_fn(|b: &RolloutBatch| {
            let mut r = vec![1.0; b.len()];
            r[6] = f64::NAN;
            r
        }))
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("rollout 6") && msg.contains("sample 2"),
        "{msg}"
    );
    let err = t
        .step(
            &mut |_: &RolloutBatch| -> Result<Vec<f64>, std::io::Error> {
                Err(std::io::Error::other("scorer offline"))
            },
        )
        .unwrap_err();
    assert!(
        matches!(err, Error::Reward { .. }) && err.to_string().contains("scorer offline"),
        "{err}"
    );
    assert_eq!(t.step_count(), 0);
    assert_eq!(
        t.data_cursor().position,
        0,
        "a failed step does not consume prompts"
    );
}

#[test]
fn config_and_prompt_errors_name_what_is_wrong() {
    let mut c = busy_config();
    c.group_size = 1;
    let e = Trainer::new(c, policy(8), Reference::None, prompts(3)).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Config {
                field: "group_size",
                ..
            }
        ),
        "{e}"
    );
    let e = Trainer::new(busy_config(), policy(8), Reference::None, prompts(3)).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Config {
                field: "loss.kl_coef",
                ..
            }
        ),
        "{e}"
    );
    let mut dup = prompts(3);
    dup[2].id = dup[0].id.clone();
    let e = Trainer::new(busy_config(), policy(8), Reference::Frozen(policy(8)), dup).unwrap_err();
    assert!(e.to_string().contains("used twice"), "{e}");
    let mut empty = prompts(3);
    empty[1].tokens.clear();
    let e = Trainer::new(
        busy_config(),
        policy(8),
        Reference::Frozen(policy(8)),
        empty,
    )
    .unwrap_err();
    assert!(e.to_string().contains("prompt-1"), "{e}");
}

/// A policy that breaks the contract in a chosen way.
struct Broken {
    inner: CategoricalPolicy,
    fault: Fault,
}

#[derive(Clone, Copy)]
enum Fault {
    TooFewCompletions,
    LogprobCount,
    WrongShape,
    Detached,
}

impl Policy for Broken {
    type Error = Error;
    fn device(&self) -> tch::Device {
        self.inner.device()
    }
    fn sample(&mut self, request: &SampleRequest<'_>) -> Result<Vec<Completion>, Error> {
        let mut out = self.inner.sample(request)?;
        match self.fault {
            Fault::TooFewCompletions => {
                out.pop();
            }
            Fault::LogprobCount => out[1].logprobs.push(-1.0),
            _ => {}
        }
        Ok(out)
    }
    fn logprobs(&self, b: &TokenBatch<'_>, t: f64, e: bool) -> Result<PolicyLogprobs, Error> {
        let out = self.inner.logprobs(b, t, e)?;
        Ok(match self.fault {
            Fault::WrongShape => PolicyLogprobs {
                logprobs: out.logprobs.narrow(1, 0, 1),
                entropy: None,
            },
            Fault::Detached => PolicyLogprobs {
                logprobs: out.logprobs.detach(),
                entropy: None,
            },
            _ => out,
        })
    }
    fn trainable_parameters(&self) -> Vec<(String, Tensor)> {
        self.inner.trainable_parameters()
    }
    fn save(&self, dir: &Path) -> Result<(), Error> {
        self.inner.save(dir)
    }
    fn load(&mut self, dir: &Path) -> Result<(), Error> {
        self.inner.load(dir)
    }
}

#[test]
fn contract_violations_are_reported() {
    for (fault, op, needle) in [
        (
            Fault::TooFewCompletions,
            "sample",
            "asked for 16 completions, got 15",
        ),
        (Fault::LogprobCount, "sample", "row 1"),
        (Fault::WrongShape, "logprobs", "shape"),
        (Fault::Detached, "logprobs", "require grad"),
    ] {
        let mut c = busy_config();
        c.loss.kl_coef = 0.0;
        c.loss.entropy_coef = 0.0;
        c.log_entropy = false;
        c.epochs = 1;
        c.mini_batch_prompts = 4;
        let p = Broken {
            inner: policy(9),
            fault,
        };
        let mut t = Trainer::new(c, p, Reference::None, prompts(5)).unwrap();
        let err = t.step(&mut reward_fn(count_target)).unwrap_err();
        match &err {
            Error::PolicyOutput { op: o, message } => {
                assert_eq!(*o, op);
                assert!(message.contains(needle), "{message}");
            }
            other => panic!("expected a contract error, got {other}"),
        }
    }
}

/// A policy that holds its own reference (as a LoRA policy holds its base model).
struct WithOwnReference {
    inner: CategoricalPolicy,
    base: CategoricalPolicy,
}

impl Policy for WithOwnReference {
    type Error = Error;
    fn device(&self) -> tch::Device {
        self.inner.device()
    }
    fn sample(&mut self, request: &SampleRequest<'_>) -> Result<Vec<Completion>, Error> {
        self.inner.sample(request)
    }
    fn logprobs(&self, b: &TokenBatch<'_>, t: f64, e: bool) -> Result<PolicyLogprobs, Error> {
        self.inner.logprobs(b, t, e)
    }
    fn reference_logprobs(&self, b: &TokenBatch<'_>, t: f64) -> Result<Option<Tensor>, Error> {
        Ok(Some(self.base.logprobs(b, t, false)?.logprobs))
    }
    fn trainable_parameters(&self) -> Vec<(String, Tensor)> {
        self.inner.trainable_parameters()
    }
    fn save(&self, dir: &Path) -> Result<(), Error> {
        self.inner.save(dir)
    }
    fn load(&mut self, dir: &Path) -> Result<(), Error> {
        self.inner.load(dir)
    }
}

#[test]
fn a_policys_own_reference_equals_a_frozen_copy() {
    let mut frozen = Trainer::new(
        busy_config(),
        policy(10),
        Reference::Frozen(policy(10)),
        prompts(5),
    )
    .unwrap();
    frozen.train(&mut reward_fn(count_target), 3).unwrap();
    let own = WithOwnReference {
        inner: policy(10),
        base: policy(10),
    };
    let mut t = Trainer::new(busy_config(), own, Reference::Policy, prompts(5)).unwrap();
    let m = t.train(&mut reward_fn(count_target), 3).unwrap();
    assert!(m[2].kl.unwrap() > 0.0);
    assert!(frozen.policy().logits().equal(t.policy().inner.logits()));
    // Reference::Policy with a policy that has none is a contract error.
    let mut t = Trainer::new(busy_config(), policy(10), Reference::Policy, prompts(5)).unwrap();
    let err = t.step(&mut reward_fn(count_target)).unwrap_err();
    assert!(
        matches!(
            err,
            Error::PolicyOutput {
                op: "reference_logprobs",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn sampler_logprobs_can_stand_in_for_recomputed_ones() {
    // The toy policy's sampler records exactly the values its log-prob pass recomputes, so the
    // two sources of old log-probs train identically.
    let run = |old: OldLogprobs| {
        let mut c = busy_config();
        c.old_logprobs = old;
        let mut t = Trainer::new(c, policy(12), Reference::Frozen(policy(12)), prompts(5)).unwrap();
        t.train(&mut reward_fn(count_target), 2).unwrap();
        values(t.policy().logits())
    };
    assert_eq!(run(OldLogprobs::Sampler), run(OldLogprobs::Recompute));
}

#[test]
fn caller_chosen_prompts_and_duplicates() {
    let mut c = busy_config();
    c.loss.kl_coef = 0.0;
    let mut t = Trainer::new(c, policy(13), Reference::None, prompts(5)).unwrap();
    let same = Prompt::new("again", vec![4, 4]);
    let mut seen = Vec::new();
    let mut reward = reward_fn(|b: &RolloutBatch| {
        seen.push(
            b.rollouts
                .iter()
                .map(|r| r.completion.tokens.clone())
                .collect::<Vec<_>>(),
        );
        count_target(b)
    });
    let m = t
        .step_with_prompts(
            &[same.clone(), same.clone(), prompts(1)[0].clone()],
            &mut reward,
        )
        .unwrap();
    assert_eq!((m.prompts, m.rollouts), (3, 12));
    assert_eq!(
        t.data_cursor().position,
        0,
        "the prompt set's cursor did not move"
    );
    let rows = &seen[0];
    assert_ne!(
        rows[0..4],
        rows[4..8],
        "a prompt given twice gets distinct samples"
    );
}
