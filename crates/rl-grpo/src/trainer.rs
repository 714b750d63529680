//! The GRPO training loop: rollouts → rewards → advantages → clipped-surrogate updates, with
//! metrics streamed to JSONL and checkpoints a resumed run continues from bit for bit.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use optimsyn_data_io::JsonlWriter;
use optimsyn_optim::{AdamW, AdamWConfig, LrSchedule};
use tch::{Kind, Tensor};

use crate::advantage::compute_advantages;
use crate::checkpoint::{
    self, DataCursor, LATEST_FILE, METRICS_FILE, POLICY_DIR, STATE_FORMAT, TrainerState,
};
use crate::config::{GrpoConfig, OldLogprobs};
use crate::error::{Error, Result, TorchContext};
use crate::loss::{LossConfig, LossInputs, LossStats, StepNormalizer, grpo_loss};
use crate::metrics::{StepMetrics, StepTimes, Summary};
use crate::policy::{Completion, Policy, PolicyLogprobs, Reference, SampleRequest, TokenBatch};
use crate::rng::{
    DOMAIN_DATA, DOMAIN_MINIBATCH, DOMAIN_SAMPLING, mix, permutation, sample_key, stream,
};
use crate::rollout::{Prompt, RewardFn, Rollout, RolloutBatch};

/// Where a run writes its metrics and checkpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputOptions {
    /// The output folder: `metrics.jsonl`, `checkpoint-N/` folders and the `latest` pointer.
    pub dir: PathBuf,
    /// Save a checkpoint every this many training steps (0: only on [`Trainer::save`]).
    pub save_every: u64,
    /// Keep only the newest this many checkpoints (0: keep all).
    pub keep_last: usize,
}

impl OutputOptions {
    /// Metrics and checkpoints under `dir`, a checkpoint every `save_every` steps, all kept.
    pub fn new(dir: impl Into<PathBuf>, save_every: u64) -> Self {
        OutputOptions {
            dir: dir.into(),
            save_every,
            keep_last: 0,
        }
    }
}

struct Output {
    options: OutputOptions,
    metrics: JsonlWriter,
}

/// A GRPO trainer over a [`Policy`].
///
/// ```text
/// step:  prompts ──sample G each──► rollouts ──reward fn──► rewards ──► advantages
///        old / reference log-probs (no grad) ──► epochs × mini-batches × micro-batches
///        of clipped-surrogate + β·KL loss ──► AdamW step per mini-batch ──► metrics row
/// ```
///
/// Prompts come from the prompt set given at construction, in a seeded shuffled order per pass
/// ([`Trainer::step`]), or from the caller ([`Trainer::step_with_prompts`]).
pub struct Trainer<P: Policy> {
    config: GrpoConfig,
    loss: LossConfig,
    policy: P,
    reference: Reference<P>,
    prompts: Vec<Prompt>,
    optimizer: AdamW,
    schedule: LrSchedule,
    step: u64,
    cursor: DataCursor,
    order: Vec<usize>,
    output: Option<Output>,
}

impl<P: Policy> std::fmt::Debug for Trainer<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("step", &self.step)
            .field("cursor", &self.cursor)
            .field("prompts", &self.prompts.len())
            .field("parameters", &self.optimizer.len())
            .finish_non_exhaustive()
    }
}

fn policy_err<E: std::error::Error + Send + Sync + 'static>(
    op: &'static str,
) -> impl FnOnce(E) -> Error {
    move |e| Error::Policy {
        op,
        source: Box::new(e),
    }
}

fn check_prompts(prompts: &[Prompt], allow_duplicates: bool) -> Result<()> {
    let mut seen = HashMap::new();
    for (i, p) in prompts.iter().enumerate() {
        if p.tokens.is_empty() {
            return Err(Error::Prompts(format!(
                "prompt `{}` (#{i}) has no tokens",
                p.id
            )));
        }
        if let Some(j) = seen.insert(p.id.as_str(), i)
            && !allow_duplicates
        {
            return Err(Error::Prompts(format!(
                "prompt id `{}` is used twice (#{j} and #{i}); ids key the random streams",
                p.id
            )));
        }
    }
    Ok(())
}

impl<P: Policy> Trainer<P> {
    /// A trainer at step 0: validates the config, checks the prompt set (non-empty, non-empty
    /// prompts, unique ids) and the reference (required when `kl_coef > 0`), and registers the
    /// policy's trainable parameters in a fresh AdamW.
    pub fn new(
        config: GrpoConfig,
        policy: P,
        reference: Reference<P>,
        prompts: Vec<Prompt>,
    ) -> Result<Self> {
        config.validate()?;
        if prompts.is_empty() {
            return Err(Error::Prompts("the prompt set is empty".into()));
        }
        check_prompts(&prompts, false)?;
        if config.loss.kl_coef != 0.0 && matches!(reference, Reference::None) {
            return Err(Error::config(
                "loss.kl_coef",
                format!(
                    "is {} but no reference policy was given (Reference::None); set it to 0 or pass one",
                    config.loss.kl_coef
                ),
            ));
        }
        let o = config.optimizer;
        let mut optimizer = AdamW::new(AdamWConfig {
            lr: o.lr,
            beta1: o.beta1,
            beta2: o.beta2,
            eps: o.eps,
            weight_decay: o.weight_decay,
        })?;
        let params = policy.trainable_parameters();
        if params.is_empty() {
            return Err(Error::policy_output(
                "trainable_parameters",
                "the policy has no trainable parameters",
            ));
        }
        for (name, p) in &params {
            optimizer.add(name.clone(), p)?;
        }
        let loss = config.resolved_loss();
        let schedule = LrSchedule::Constant {
            warmup_steps: o.warmup_steps,
        };
        let mut trainer = Trainer {
            config,
            loss,
            policy,
            reference,
            prompts,
            optimizer,
            schedule,
            step: 0,
            cursor: DataCursor::default(),
            order: Vec::new(),
            output: None,
        };
        trainer.order = trainer.epoch_order(0);
        Ok(trainer)
    }

    /// Continues the run saved in `checkpoint` (a `checkpoint-N` folder): loads the policy's
    /// state into `policy`, the optimizer moments, the step and the prompt cursor. The config and
    /// the prompt set must be those of the saved run (the error names the first differing
    /// config field); `reference` must be the same reference as before (e.g. the initial
    /// policy again).
    pub fn resume(
        config: GrpoConfig,
        mut policy: P,
        reference: Reference<P>,
        prompts: Vec<Prompt>,
        checkpoint: impl AsRef<Path>,
    ) -> Result<Self> {
        let dir = checkpoint.as_ref();
        let state = checkpoint::read_state(dir)?;
        let state_path = dir.join(checkpoint::STATE_FILE);
        let ours = serde_json::to_value(&config)
            .map_err(|e| Error::checkpoint(&state_path, format!("config: {e}")))?;
        if let Some(field) = checkpoint::first_difference(&state.config, &ours) {
            return Err(Error::checkpoint(
                &state_path,
                format!(
                    "the run was saved with another config: `{field}` differs (resume with the saved config)"
                ),
            ));
        }
        let fp = checkpoint::prompts_fingerprint(&prompts);
        if state.prompts != prompts.len() || state.prompts_fingerprint != fp {
            return Err(Error::checkpoint(
                &state_path,
                format!(
                    "the run was saved with another prompt set ({} prompts, fingerprint {}; now {} prompts, {fp})",
                    state.prompts,
                    state.prompts_fingerprint,
                    prompts.len()
                ),
            ));
        }
        policy
            .load(&dir.join(POLICY_DIR))
            .map_err(policy_err("load"))?;
        let mut trainer = Self::new(config, policy, reference, prompts)?;
        trainer
            .optimizer
            .load(dir.join(optimsyn_optim::state::FILE_NAME))?;
        if trainer.optimizer.step_count() != state.optimizer_steps {
            return Err(Error::checkpoint(
                dir,
                format!(
                    "optimizer state has {} steps but the trainer state says {}",
                    trainer.optimizer.step_count(),
                    state.optimizer_steps
                ),
            ));
        }
        trainer.step = state.step;
        trainer.cursor = state.data;
        trainer.order = trainer.epoch_order(state.data.epoch);
        if state.data.position > trainer.order.len() {
            return Err(Error::checkpoint(
                &state_path,
                format!(
                    "data position {} is beyond the prompt set ({})",
                    state.data.position,
                    trainer.order.len()
                ),
            ));
        }
        Ok(trainer)
    }

    /// Resumes from the latest checkpoint of `options.dir` if there is one, else starts a new
    /// run there; either way metrics and checkpoints go to `options`.
    pub fn new_or_resume(
        config: GrpoConfig,
        policy: P,
        reference: Reference<P>,
        prompts: Vec<Prompt>,
        options: OutputOptions,
    ) -> Result<Self> {
        let trainer = match checkpoint::latest_checkpoint(&options.dir)? {
            Some(dir) => Self::resume(config, policy, reference, prompts, dir)?,
            None => Self::new(config, policy, reference, prompts)?,
        };
        trainer.with_output(options)
    }

    /// Streams metrics to `options.dir/metrics.jsonl` (rows of steps after the current one, left
    /// by a run that stopped after its last checkpoint, are removed first) and saves checkpoints
    /// every `options.save_every` steps.
    pub fn with_output(mut self, options: OutputOptions) -> Result<Self> {
        std::fs::create_dir_all(&options.dir)
            .map_err(|e| Error::io(&options.dir, "cannot create the output folder", e))?;
        let path = options.dir.join(METRICS_FILE);
        checkpoint::truncate_metrics(&path, self.step)?;
        let metrics = JsonlWriter::append(&path)?;
        self.output = Some(Output { options, metrics });
        Ok(self)
    }

    /// The config.
    pub fn config(&self) -> &GrpoConfig {
        &self.config
    }

    /// Training steps done.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// The prompt cursor.
    pub fn data_cursor(&self) -> DataCursor {
        self.cursor
    }

    /// The policy.
    pub fn policy(&self) -> &P {
        &self.policy
    }

    /// The policy, mutably (changing its trainable tensors' identity breaks the optimizer).
    pub fn policy_mut(&mut self) -> &mut P {
        &mut self.policy
    }

    /// The optimizer.
    pub fn optimizer(&self) -> &AdamW {
        &self.optimizer
    }

    /// Gives the policy back.
    pub fn into_policy(self) -> P {
        self.policy
    }

    fn epoch_order(&self, epoch: u64) -> Vec<usize> {
        if self.config.shuffle_prompts {
            permutation(
                self.prompts.len(),
                &mut stream(self.config.seed, DOMAIN_DATA, epoch),
            )
        } else {
            (0..self.prompts.len()).collect()
        }
    }

    /// The prompts of the next step and the cursor after them.
    fn next_prompts(&self) -> (Vec<Prompt>, DataCursor, Vec<usize>) {
        let mut cursor = self.cursor;
        let mut order = self.order.clone();
        let mut out = Vec::with_capacity(self.config.prompts_per_step);
        while out.len() < self.config.prompts_per_step {
            if cursor.position >= order.len() {
                cursor.epoch += 1;
                cursor.position = 0;
                order = self.epoch_order(cursor.epoch);
            }
            out.push(self.prompts[order[cursor.position]].clone());
            cursor.position += 1;
        }
        (out, cursor, order)
    }

    /// One training step on the next `prompts_per_step` prompts of the prompt set. On error the
    /// prompt cursor does not move (a retry samples the same rollouts), but updates applied before
    /// the error stay applied.
    pub fn step<R: RewardFn + ?Sized>(&mut self, reward: &mut R) -> Result<StepMetrics> {
        let (prompts, cursor, order) = self.next_prompts();
        let metrics = self.run_step(&prompts, reward, cursor.epoch)?;
        self.cursor = cursor;
        self.order = order;
        self.finish_step(&metrics)?;
        Ok(metrics)
    }

    /// One training step on `prompts` chosen by the caller (any number, ids need not be in the
    /// prompt set); the prompt cursor does not move. A prompt given twice gets distinct samples.
    pub fn step_with_prompts<R: RewardFn + ?Sized>(
        &mut self,
        prompts: &[Prompt],
        reward: &mut R,
    ) -> Result<StepMetrics> {
        if prompts.is_empty() {
            return Err(Error::Prompts("no prompts for the step".into()));
        }
        check_prompts(prompts, true)?;
        let metrics = self.run_step(prompts, reward, self.cursor.epoch)?;
        self.finish_step(&metrics)?;
        Ok(metrics)
    }

    /// Runs steps until `steps` training steps are done (counting those of a resumed run);
    /// returns the metrics of the steps run now.
    pub fn train<R: RewardFn + ?Sized>(
        &mut self,
        reward: &mut R,
        steps: u64,
    ) -> Result<Vec<StepMetrics>> {
        let mut out = Vec::new();
        while self.step < steps {
            out.push(self.step(reward)?);
        }
        Ok(out)
    }

    fn finish_step(&mut self, metrics: &StepMetrics) -> Result<()> {
        let save = match &mut self.output {
            Some(out) => {
                out.metrics.write(metrics)?;
                out.metrics.sync()?;
                out.options.save_every > 0 && self.step.is_multiple_of(out.options.save_every)
            }
            None => false,
        };
        if save {
            self.save()?;
        }
        Ok(())
    }

    /// Saves a checkpoint of the current step into the output folder (`checkpoint-N`, then the
    /// `latest` pointer; older ones pruned per `keep_last`) and returns its path.
    pub fn save(&self) -> Result<PathBuf> {
        let Some(out) = &self.output else {
            return Err(Error::checkpoint(
                PathBuf::from("<no output folder>"),
                "the trainer has no output folder (with_output)",
            ));
        };
        let dir = out.options.dir.join(checkpoint::checkpoint_name(self.step));
        self.save_checkpoint(&dir)?;
        optimsyn_data_io::write_atomic(
            out.options.dir.join(LATEST_FILE),
            checkpoint::checkpoint_name(self.step).as_bytes(),
        )?;
        checkpoint::prune(&out.options.dir, out.options.keep_last, &dir)?;
        Ok(dir)
    }

    /// Writes a checkpoint of the current state into folder `dir` (replacing it), atomically.
    pub fn save_checkpoint(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        let parent = dir.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, "cannot create", e))?;
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "checkpoint".into());
        let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, "cannot clear", e))?;
        }
        let policy_dir = tmp.join(POLICY_DIR);
        std::fs::create_dir_all(&policy_dir)
            .map_err(|e| Error::io(&policy_dir, "cannot create", e))?;
        let write = || -> Result<()> {
            self.policy.save(&policy_dir).map_err(policy_err("save"))?;
            self.optimizer
                .save(tmp.join(optimsyn_optim::state::FILE_NAME))?;
            let state = TrainerState {
                format: STATE_FORMAT.to_owned(),
                step: self.step,
                optimizer_steps: self.optimizer.step_count(),
                data: self.cursor,
                seed: self.config.seed,
                prompts: self.prompts.len(),
                prompts_fingerprint: checkpoint::prompts_fingerprint(&self.prompts),
                config: serde_json::to_value(&self.config)
                    .map_err(|e| Error::checkpoint(&tmp, format!("config: {e}")))?,
                crate_version: env!("CARGO_PKG_VERSION").to_owned(),
            };
            let text = serde_json::to_vec_pretty(&state)
                .map_err(|e| Error::checkpoint(&tmp, format!("trainer state: {e}")))?;
            optimsyn_data_io::write_atomic(tmp.join(checkpoint::STATE_FILE), &text)?;
            checkpoint::publish(&tmp, dir)
        };
        write().inspect_err(|_| {
            let _ = std::fs::remove_dir_all(&tmp);
        })
    }

    /// Row keys of a step's prompts: sample `g` of a prompt's `k`-th occurrence in the step.
    fn row_keys(&self, prompts: &[Prompt]) -> Vec<u64> {
        let g = self.config.group_size;
        let mut seen: HashMap<&str, u64> = HashMap::new();
        let mut keys = Vec::with_capacity(prompts.len() * g);
        for p in prompts {
            let occ = seen.entry(p.id.as_str()).or_insert(0);
            for i in 0..g {
                let k = sample_key(&p.id, i);
                keys.push(if *occ == 0 { k } else { mix(k, *occ) });
            }
            *occ += 1;
        }
        keys
    }

    fn check_completions(&self, completions: &[Completion], rows: usize) -> Result<()> {
        if completions.len() != rows {
            return Err(Error::policy_output(
                "sample",
                format!("asked for {rows} completions, got {}", completions.len()),
            ));
        }
        let max = self.config.rollout.max_new_tokens;
        for (row, c) in completions.iter().enumerate() {
            if c.logprobs.len() != c.tokens.len() {
                return Err(Error::policy_output(
                    "sample",
                    format!(
                        "row {row}: {} tokens but {} log-probs",
                        c.tokens.len(),
                        c.logprobs.len()
                    ),
                ));
            }
            if c.tokens.len() > max {
                return Err(Error::policy_output(
                    "sample",
                    format!(
                        "row {row}: {} tokens, more than max_new_tokens ({max})",
                        c.tokens.len()
                    ),
                ));
            }
            if let Some(i) = c.logprobs.iter().position(|l| !l.is_finite()) {
                return Err(Error::policy_output(
                    "sample",
                    format!("row {row}: log-prob of token {i} is {}", c.logprobs[i]),
                ));
            }
        }
        Ok(())
    }

    fn run_step<R: RewardFn + ?Sized>(
        &mut self,
        prompts: &[Prompt],
        reward: &mut R,
        data_epoch: u64,
    ) -> Result<StepMetrics> {
        let start = Instant::now();
        let step = self.step + 1;
        let g = self.config.group_size;
        let batch = self.rollouts(prompts, step)?;
        let t_rollout = start.elapsed().as_secs_f64();
        let rewards = checked_rewards(reward, &batch)?;
        let adv = compute_advantages(&rewards, g, &self.config.advantage)?;
        let t_reward = start.elapsed().as_secs_f64();
        let rows: Vec<usize> = (0..rewards.len())
            .filter(|&r| !(self.config.skip_zero_variance_groups && adv.zero_variance[r / g]))
            .collect();
        let stores = self.logprob_stores(&batch, &rows)?;
        let t_logprobs = start.elapsed().as_secs_f64();
        let update = self.update(&batch, &rows, &adv.values, &stores)?;
        let t_update = start.elapsed().as_secs_f64();
        self.step = step;
        let time = StepTimes {
            rollout_s: t_rollout,
            reward_s: t_reward - t_rollout,
            logprobs_s: t_logprobs - t_reward,
            update_s: t_update - t_logprobs,
            total_s: t_update,
        };
        Ok(self.step_metrics(
            &batch,
            data_epoch,
            &rewards,
            &adv,
            rows.len(),
            &update,
            time,
        ))
    }

    /// Samples `group_size` completions per prompt from the policy, on the step's seed.
    fn rollouts(&mut self, prompts: &[Prompt], step: u64) -> Result<RolloutBatch> {
        let g = self.config.group_size;
        let request = SampleRequest {
            prompts: prompts.iter().map(|p| p.tokens.as_slice()).collect(),
            group_size: g,
            seed: mix(mix(self.config.seed, DOMAIN_SAMPLING), step),
            keys: self.row_keys(prompts),
            sampling: self.config.rollout,
        };
        let completions = self.policy.sample(&request).map_err(policy_err("sample"))?;
        self.check_completions(&completions, prompts.len() * g)?;
        Ok(RolloutBatch {
            step,
            group_size: g,
            prompts: prompts.to_vec(),
            rollouts: completions
                .into_iter()
                .enumerate()
                .map(|(row, completion)| Rollout {
                    prompt_index: row / g,
                    sample: row % g,
                    completion,
                })
                .collect(),
        })
    }

    /// Old and reference log-probs of the trained rows, before any update (each only where the
    /// configuration needs it).
    fn logprob_stores(&mut self, batch: &RolloutBatch, rows: &[usize]) -> Result<Stores> {
        let minis_per_epoch = rows
            .len()
            .div_ceil(self.config.mini_batch_prompts * self.config.group_size);
        let need_old = match self.config.old_logprobs {
            OldLogprobs::Auto => self.config.epochs > 1 || minis_per_epoch > 1,
            OldLogprobs::Recompute => true,
            OldLogprobs::Sampler => false,
        };
        let old = if need_old {
            Some(self.nograd_store(batch, rows, Source::Policy)?)
        } else if self.config.old_logprobs == OldLogprobs::Sampler {
            Some(self.sampler_store(batch, rows)?)
        } else {
            None
        };
        let reference = if self.loss.kl_coef != 0.0 {
            Some(self.nograd_store(batch, rows, Source::Reference)?)
        } else {
            None
        };
        Ok(Stores { old, reference })
    }

    /// The optimizer steps of one GRPO step: `epochs` passes over the trained rows in
    /// mini-batches (shuffled per epoch on the step's stream if configured).
    fn update(
        &mut self,
        batch: &RolloutBatch,
        rows: &[usize],
        advantages: &[f64],
        stores: &Stores,
    ) -> Result<UpdateSums> {
        let lens = completion_lengths(batch);
        let mini_rows = self.config.mini_batch_prompts * self.config.group_size;
        let mut sums = UpdateSums {
            lr: self.optimizer.lr(),
            ..UpdateSums::default()
        };
        for epoch in 0..self.config.epochs {
            let order: Vec<usize> = if self.config.shuffle_mini_batches {
                let key = mix(batch.step, epoch as u64);
                let mut rng = stream(self.config.seed, DOMAIN_MINIBATCH, key);
                permutation(rows.len(), &mut rng)
                    .into_iter()
                    .map(|i| rows[i])
                    .collect()
            } else {
                rows.to_vec()
            };
            for mini in order.chunks(mini_rows) {
                self.mini_batch_step(batch, mini, &lens, advantages, stores, &mut sums)?;
            }
        }
        self.optimizer.zero_grad();
        Ok(sums)
    }

    /// One optimizer step over the micro-batches of `mini`, with the gradient norm checked (and
    /// clipped if configured) before it is applied.
    fn mini_batch_step(
        &mut self,
        batch: &RolloutBatch,
        mini: &[usize],
        lens: &[usize],
        advantages: &[f64],
        stores: &Stores,
        sums: &mut UpdateSums,
    ) -> Result<()> {
        let want_entropy = self.loss.entropy_coef != 0.0 || self.config.log_entropy;
        let norm = StepNormalizer::from_lengths(mini.iter().map(|&r| lens[r]));
        self.optimizer.zero_grad();
        let (mut step_loss, mut step_policy) = (0.0, 0.0);
        for micro in mini.chunks(self.config.micro_batch_size) {
            if micro.iter().all(|&r| lens[r] == 0) {
                continue;
            }
            let (value, s) = self.micro_step(
                batch,
                micro,
                advantages,
                stores.old.as_ref(),
                stores.reference.as_ref(),
                &norm,
                want_entropy,
            )?;
            step_loss += value;
            step_policy += s.policy_loss;
            sums.stats.merge(&s);
        }
        sums.lr = self
            .optimizer
            .set_scheduled_lr(&self.schedule, self.config.optimizer.lr);
        let measured = match self.config.optimizer.max_grad_norm {
            Some(max) => self.optimizer.clip_grad_norm(max),
            None => self.optimizer.grad_norm().and_then(|v| {
                if v.is_finite() {
                    Ok(v)
                } else {
                    Err(optimsyn_optim::Error::NonFiniteGradNorm { norm: v })
                }
            }),
        };
        let grad_norm = match measured {
            Ok(v) => v,
            Err(optimsyn_optim::Error::NonFiniteGradNorm { norm }) => {
                self.optimizer.zero_grad();
                return Err(Error::NonFinite {
                    step: batch.step,
                    what: "gradient norm",
                    value: norm,
                    prompts: prompt_ids(batch, mini),
                });
            }
            Err(e) => return Err(e.into()),
        };
        self.optimizer.step()?;
        sums.loss += step_loss;
        sums.policy_loss += step_policy;
        sums.grad_norm += grad_norm;
        sums.optimizer_steps += 1;
        Ok(())
    }

    /// The step's metrics row.
    #[allow(clippy::too_many_arguments)]
    fn step_metrics(
        &self,
        batch: &RolloutBatch,
        data_epoch: u64,
        rewards: &[f64],
        adv: &crate::advantage::Advantages,
        trained_rollouts: usize,
        u: &UpdateSums,
        time: StepTimes,
    ) -> StepMetrics {
        let n = batch.rollouts.len();
        let prompts = batch.prompts.len();
        let per_opt = |v: f64| {
            if u.optimizer_steps > 0 {
                v / u.optimizer_steps as f64
            } else {
                0.0
            }
        };
        let lens = completion_lengths(batch);
        let lengths: Vec<f64> = lens.iter().map(|&l| l as f64).collect();
        let truncated = batch
            .rollouts
            .iter()
            .filter(|r| r.completion.truncated)
            .count();
        let stats = &u.stats;
        let ratio = |v: f64| if stats.tokens > 0.0 { v } else { 1.0 };
        StepMetrics {
            step: batch.step,
            data_epoch,
            prompts,
            rollouts: n,
            reward: Summary::of(rewards),
            advantage: Summary::of(&adv.values),
            zero_variance_groups: adv.zero_variance_groups,
            frac_zero_variance: adv.zero_variance_groups as f64 / prompts as f64,
            floored_groups: adv.floored_groups,
            trained_rollouts,
            completion_length: Summary::of(&lengths),
            truncated_fraction: truncated as f64 / n as f64,
            completion_tokens: lens.iter().sum(),
            loss: per_opt(u.loss),
            policy_loss: per_opt(u.policy_loss),
            kl: stats.kl(),
            entropy: stats.entropy(),
            clip_fraction: stats.clip_fraction(),
            clip_low_fraction: stats.clip_low_fraction(),
            clip_high_fraction: stats.clip_high_fraction(),
            dual_clip_fraction: stats.dual_clip_fraction(),
            ppo_kl: stats.ppo_kl(),
            ratio_max: ratio(stats.ratio_max),
            ratio_min: ratio(stats.ratio_min),
            grad_norm: per_opt(u.grad_norm),
            lr: u.lr,
            optimizer_steps: self.optimizer.step_count(),
            time,
        }
    }

    /// Forward + backward of one micro-batch; returns its loss value and stats.
    #[allow(clippy::too_many_arguments)]
    fn micro_step(
        &self,
        batch: &RolloutBatch,
        micro: &[usize],
        advantages: &[f64],
        old_store: Option<&Tensor>,
        ref_store: Option<&Tensor>,
        norm: &StepNormalizer,
        want_entropy: bool,
    ) -> Result<(f64, LossStats)> {
        let tb = token_batch(batch, micro);
        let c = tb.completion_width() as i64;
        let out = self
            .policy
            .logprobs(&tb, self.config.rollout.temperature, want_entropy)
            .map_err(policy_err("logprobs"))?;
        check_logprobs(&out, micro.len() as i64, c, "logprobs")?;
        if !out.logprobs.requires_grad() {
            return Err(Error::policy_output(
                "logprobs",
                "the log-probs do not require grad (are the trainable parameters detached?)",
            ));
        }
        let kind = out.logprobs.kind();
        let device = out.logprobs.device();
        let mask = tb.completion_mask(kind, device)?;
        let a: Vec<f64> = micro.iter().map(|&r| advantages[r]).collect();
        let idx: Vec<i64> = micro.iter().map(|&r| r as i64).collect();
        let f = || -> std::result::Result<_, tch::TchError> {
            let adv = Tensor::f_from_slice(&a)?
                .f_to_kind(kind)?
                .f_to_device(device)?;
            let idx = Tensor::f_from_slice(&idx)?.f_to_device(device)?;
            let pick = |s: Option<&Tensor>| -> std::result::Result<Option<Tensor>, tch::TchError> {
                s.map(|s| {
                    s.f_index_select(0, &idx)?
                        .f_narrow(1, 0, c)?
                        .f_to_kind(kind)
                })
                .transpose()
            };
            Ok((adv, pick(old_store)?, pick(ref_store)?))
        };
        let (adv, old, reference) = f().op("selecting a micro-batch")?;
        let entropy = if self.loss.entropy_coef != 0.0 || out.entropy.is_some() {
            out.entropy.as_ref()
        } else {
            None
        };
        if self.loss.entropy_coef != 0.0 && entropy.is_none() {
            return Err(Error::policy_output(
                "logprobs",
                "entropy_coef is not 0 but the policy returned no entropies",
            ));
        }
        let lo = grpo_loss(
            &LossInputs {
                logprobs: &out.logprobs,
                old_logprobs: old.as_ref(),
                ref_logprobs: reference.as_ref(),
                advantages: &adv,
                mask: &mask,
                entropy,
            },
            &self.loss,
            norm,
        )?;
        let value = lo.loss.f_double_value(&[]).op("reading the loss")?;
        if !value.is_finite() {
            return Err(Error::NonFinite {
                step: self.step + 1,
                what: "loss",
                value,
                prompts: prompt_ids(batch, micro),
            });
        }
        lo.loss.f_backward().op("backward")?;
        Ok((value, lo.stats))
    }

    /// `[N, C_max]` no-grad log-probs of `rows` (zeros elsewhere) from the policy or the reference.
    fn nograd_store(&self, batch: &RolloutBatch, rows: &[usize], source: Source) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        let n = batch.rollouts.len() as i64;
        let cmax = rows
            .iter()
            .map(|&r| batch.rollouts[r].completion.tokens.len())
            .max()
            .unwrap_or(0) as i64;
        let chunk = self
            .config
            .logprob_batch_size
            .unwrap_or(self.config.micro_batch_size);
        let temperature = self.config.rollout.temperature;
        let mut store: Option<Tensor> = None;
        for part in rows.chunks(chunk) {
            let tb = token_batch(batch, part);
            let c = tb.completion_width() as i64;
            let (lp, op) = match source {
                Source::Policy => (
                    self.policy
                        .logprobs(&tb, temperature, false)
                        .map_err(policy_err("logprobs"))?
                        .logprobs,
                    "logprobs",
                ),
                Source::Reference => match &self.reference {
                    Reference::Frozen(r) => (
                        r.logprobs(&tb, temperature, false)
                            .map_err(policy_err("logprobs"))?
                            .logprobs,
                        "reference logprobs",
                    ),
                    Reference::Policy => (
                        self.policy
                            .reference_logprobs(&tb, temperature)
                            .map_err(policy_err("reference_logprobs"))?
                            .ok_or_else(|| {
                                Error::policy_output(
                                    "reference_logprobs",
                                    "Reference::Policy was given but the policy has no reference log-probs",
                                )
                            })?,
                        "reference_logprobs",
                    ),
                    Reference::None => {
                        return Err(Error::config(
                            "loss.kl_coef",
                            "is not 0 but there is no reference policy",
                        ));
                    }
                },
            };
            check_logprobs(
                &PolicyLogprobs {
                    logprobs: lp.shallow_clone(),
                    entropy: None,
                },
                part.len() as i64,
                c,
                op,
            )?;
            let previous = store.take();
            let f = || -> std::result::Result<Tensor, tch::TchError> {
                let mut s = match previous {
                    Some(s) => s,
                    None => Tensor::f_zeros([n, cmax], (lp.kind(), lp.device()))?,
                };
                let padded = lp.f_detach()?.f_constant_pad_nd([0, cmax - c])?;
                let idx: Vec<i64> = part.iter().map(|&r| r as i64).collect();
                let idx = Tensor::f_from_slice(&idx)?.f_to_device(lp.device())?;
                s = s.f_index_copy(0, &idx, &padded.f_to_kind(s.kind())?)?;
                Ok(s)
            };
            store = Some(f().op("storing no-grad log-probs")?);
        }
        match store {
            Some(s) => Ok(s),
            None => Tensor::f_zeros([n, cmax], (Kind::Float, self.policy.device()))
                .op("storing no-grad log-probs"),
        }
    }

    /// `[N, C_max]` sampler log-probs (zeros beyond each completion).
    fn sampler_store(&self, batch: &RolloutBatch, rows: &[usize]) -> Result<Tensor> {
        let n = batch.rollouts.len();
        let cmax = rows
            .iter()
            .map(|&r| batch.rollouts[r].completion.tokens.len())
            .max()
            .unwrap_or(0);
        let mut v = vec![0f32; n * cmax];
        for &r in rows {
            let lp = &batch.rollouts[r].completion.logprobs;
            v[r * cmax..r * cmax + lp.len()].copy_from_slice(lp);
        }
        Tensor::f_from_slice(&v)
            .and_then(|t| t.f_view([n as i64, cmax as i64]))
            .and_then(|t| t.f_to_device(self.policy.device()))
            .op("storing sampler log-probs")
    }
}

#[derive(Clone, Copy)]
enum Source {
    Policy,
    Reference,
}

fn token_batch<'a>(batch: &'a RolloutBatch, rows: &[usize]) -> TokenBatch<'a> {
    TokenBatch {
        prompts: rows
            .iter()
            .map(|&r| {
                batch.prompts[batch.rollouts[r].prompt_index]
                    .tokens
                    .as_slice()
            })
            .collect(),
        completions: rows
            .iter()
            .map(|&r| batch.rollouts[r].completion.tokens.as_slice())
            .collect(),
    }
}

fn check_logprobs(out: &PolicyLogprobs, b: i64, c: i64, op: &'static str) -> Result<()> {
    if out.logprobs.size() != [b, c] {
        return Err(Error::policy_output(
            op,
            format!(
                "expected log-probs of shape [{b}, {c}] (rows × longest completion), got {:?}",
                out.logprobs.size()
            ),
        ));
    }
    if let Some(h) = &out.entropy
        && h.size() != [b, c]
    {
        return Err(Error::policy_output(
            op,
            format!("expected entropies of shape [{b}, {c}], got {:?}", h.size()),
        ));
    }
    Ok(())
}

fn prompt_ids(batch: &RolloutBatch, rows: &[usize]) -> String {
    let mut ids: Vec<&str> = rows
        .iter()
        .map(|&r| batch.prompts[batch.rollouts[r].prompt_index].id.as_str())
        .collect();
    ids.dedup();
    ids.join(", ")
}

/// Old and reference log-probs of one step's trained rows (`None`: not needed).
struct Stores {
    old: Option<Tensor>,
    reference: Option<Tensor>,
}

/// What a step's optimizer steps add up to, for its metrics.
#[derive(Default)]
struct UpdateSums {
    stats: LossStats,
    loss: f64,
    policy_loss: f64,
    grad_norm: f64,
    optimizer_steps: u64,
    /// The learning rate of the last optimizer step.
    lr: f64,
}

/// Each rollout's completion length in tokens.
fn completion_lengths(batch: &RolloutBatch) -> Vec<usize> {
    batch
        .rollouts
        .iter()
        .map(|r| r.completion.tokens.len())
        .collect()
}

/// The reward function's rewards for `batch`: one finite reward per rollout, or an error naming
/// the step (and the rollout).
fn checked_rewards<R: RewardFn + ?Sized>(reward: &mut R, batch: &RolloutBatch) -> Result<Vec<f64>> {
    let (step, g, n) = (batch.step, batch.group_size, batch.rollouts.len());
    let rewards = reward
        .score(batch)
        .map_err(|source| Error::Reward { step, source })?;
    if rewards.len() != n {
        return Err(Error::RewardOutput {
            step,
            message: format!("{n} rollouts but {} rewards", rewards.len()),
        });
    }
    if let Some(i) = rewards.iter().position(|r| !r.is_finite()) {
        return Err(Error::RewardOutput {
            step,
            message: format!(
                "reward of rollout {i} (prompt `{}`, sample {}) is {}",
                batch.prompts[i / g].id,
                i % g,
                rewards[i]
            ),
        });
    }
    Ok(rewards)
}
