//! Rollouts on a serving engine, as TRL and verl run them on vLLM: before each GRPO step the
//! policy's adapter is saved and published to the server through vLLM's dynamic-LoRA endpoints,
//! the step's rollouts are sampled there (token-id prompts in, token ids and log-probs out), and
//! the trainer computes its own log-probs as always. Everything else stays with the local policy.
//!
//! `models.policy_url` turns it on; the server must serve the policy's base model under
//! `models.policy_model` with runtime LoRA loading (`vllm serve … --enable-lora` with
//! `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`, or `optimsyn serve --enable-lora`) and read the
//! folders this process writes (`OUT/rl/served/`).

use std::path::{Path, PathBuf};

use optimsyn_rl_grpo::{Completion, Policy, PolicyLogprobs, SampleRequest, TokenBatch};
use optimsyn_synth::{OpenAiConfig, SampledRow, ServedSampler, TokenSampling};
use tch::{Device, Tensor};

/// What can go wrong with served rollouts, beside the local policy's own errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServedError<E: std::error::Error + 'static> {
    /// The local policy failed.
    #[error(transparent)]
    Policy(E),
    /// The server failed or refused.
    #[error("served rollouts: {0}")]
    Served(#[from] optimsyn_synth::Error),
    /// The published adapter's folder could not be written.
    #[error("served rollouts: {path}: {source}")]
    Io {
        /// The folder.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A prompt leaves no room to generate in the model's context.
    #[error("served rollouts: prompt {prompt} has {len} tokens; the context is {context}")]
    PromptTooLong {
        /// The prompt's index in the step.
        prompt: usize,
        /// Its length.
        len: usize,
        /// The model's context length.
        context: usize,
    },
}

/// Where served rollouts go.
#[derive(Debug, Clone)]
pub struct ServedRollouts {
    /// The server: `base_url`, and `model`, the base model's served name.
    pub server: OpenAiConfig,
    /// Where each published adapter is written (the server must read it).
    pub publish_dir: PathBuf,
    /// The policy model's context length (a prompt's budget is what it leaves).
    pub context: usize,
}

/// A [`Policy`] whose rollouts are sampled locally, or on a server ([`ServedRollouts`]).
pub struct ServedPolicy<P> {
    inner: P,
    served: Option<Served>,
}

struct Served {
    sampler: ServedSampler,
    base_model: String,
    publish_dir: PathBuf,
    context: usize,
    concurrency: usize,
    /// The adapter the server has now (name, folder).
    current: Option<(String, PathBuf)>,
    published: u64,
    run: String,
}

impl<P> ServedPolicy<P> {
    /// Rollouts sampled by `inner` itself.
    pub fn local(inner: P) -> Self {
        ServedPolicy {
            inner,
            served: None,
        }
    }

    /// Rollouts sampled on `to.server` from `inner`'s adapter, published before every step.
    pub fn served(inner: P, to: ServedRollouts) -> Result<Self, optimsyn_synth::Error> {
        let concurrency = to.server.concurrency.max(1);
        let base_model = to.server.model.clone();
        let sampler = ServedSampler::new(to.server)?;
        // Adapter names unique to this process, so runs sharing a server do not collide.
        let run = format!(
            "optimsyn-policy-{:x}",
            optimsyn_fsio::hash::fnv1a64(
                format!("{}:{}", std::process::id(), to.publish_dir.display()).as_bytes()
            ) & 0xffff_ffff
        );
        Ok(ServedPolicy {
            inner,
            served: Some(Served {
                sampler,
                base_model,
                publish_dir: to.publish_dir,
                context: to.context,
                concurrency,
                current: None,
                published: 0,
                run,
            }),
        })
    }

    /// The local policy.
    pub fn inner(&self) -> &P {
        &self.inner
    }

    /// Whether rollouts go to a server.
    pub fn is_served(&self) -> bool {
        self.served.is_some()
    }
}

impl Served {
    /// Saves `policy`'s current adapter and makes it the one the server samples from.
    fn publish<P: Policy>(&mut self, policy: &P) -> Result<String, ServedError<P::Error>> {
        self.published += 1;
        let name = format!("{}-{}", self.run, self.published);
        let dir = self.publish_dir.join(&name);
        let io = |source| ServedError::Io {
            path: dir.clone(),
            source,
        };
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(io)?;
        }
        std::fs::create_dir_all(&dir).map_err(io)?;
        policy.save(&dir).map_err(ServedError::Policy)?;
        self.sampler.load_adapter(&name, &dir)?;
        if let Some((old, old_dir)) = self.current.replace((name.clone(), dir)) {
            match self.sampler.unload_adapter(&old) {
                // Already gone (a restarted server): nothing to unload.
                Err(optimsyn_synth::Error::Status { status: 404, .. }) | Ok(()) => {}
                Err(e) => return Err(e.into()),
            }
            // The server has let go of it; a folder left behind costs only disk.
            let _ = std::fs::remove_dir_all(old_dir);
        }
        Ok(name)
    }

    /// Every prompt's group, sampled from adapter `model` by `concurrency` workers.
    fn sample<E: std::error::Error + 'static>(
        &self,
        model: &str,
        request: &SampleRequest<'_>,
    ) -> Result<Vec<Completion>, ServedError<E>> {
        let g = request.group_size.max(1);
        let mut plans = Vec::with_capacity(request.prompts.len());
        for (k, prompt) in request.prompts.iter().enumerate() {
            let room = self.context.saturating_sub(prompt.len());
            if room == 0 {
                return Err(ServedError::PromptTooLong {
                    prompt: k,
                    len: prompt.len(),
                    context: self.context,
                });
            }
            // A prompt's draw depends on the step's seed and its first row's key only.
            let key = request.keys.get(k * g).copied().unwrap_or(k as u64);
            let seed = optimsyn_fsio::hash::splitmix64(request.seed ^ key) & ((1 << 53) - 1);
            plans.push(TokenSampling {
                temperature: request.sampling.temperature,
                top_p: request.sampling.top_p,
                top_k: request.sampling.top_k,
                max_new_tokens: request.sampling.max_new_tokens.min(room),
                seed,
            });
        }
        let results = self.in_parallel(model, request, &plans);
        let mut out = Vec::with_capacity(request.rows());
        for rows in results {
            out.extend(rows?.into_iter().map(|r: SampledRow| Completion {
                tokens: r.tokens,
                logprobs: r.logprobs,
                truncated: r.truncated,
            }));
        }
        Ok(out)
    }

    fn in_parallel(
        &self,
        model: &str,
        request: &SampleRequest<'_>,
        plans: &[TokenSampling],
    ) -> Vec<optimsyn_synth::Result<Vec<SampledRow>>> {
        let next = std::sync::atomic::AtomicUsize::new(0);
        let mut results: Vec<Option<optimsyn_synth::Result<Vec<SampledRow>>>> =
            (0..plans.len()).map(|_| None).collect();
        std::thread::scope(|scope| {
            let workers: Vec<_> = (0..self.concurrency.min(plans.len()))
                .map(|_| {
                    scope.spawn(|| {
                        let mut done = Vec::new();
                        loop {
                            let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let Some(plan) = plans.get(k) else {
                                return done;
                            };
                            let key = format!("prompt {k}");
                            let r = self.sampler.sample(
                                model,
                                request.prompts[k],
                                request.group_size,
                                plan,
                                &key,
                            );
                            done.push((k, r));
                        }
                    })
                })
                .collect();
            for w in workers {
                // A worker only panics if the HTTP client does; that is a bug worth surfacing.
                for (k, r) in w.join().unwrap_or_else(|p| std::panic::resume_unwind(p)) {
                    results[k] = Some(r);
                }
            }
        });
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| unreachable!("every prompt is taken by a worker")))
            .collect()
    }
}

impl<P: Policy> Policy for ServedPolicy<P> {
    type Error = ServedError<P::Error>;

    fn device(&self) -> Device {
        self.inner.device()
    }

    fn sample(&mut self, request: &SampleRequest<'_>) -> Result<Vec<Completion>, Self::Error> {
        let Some(s) = self.served.as_mut() else {
            return self.inner.sample(request).map_err(ServedError::Policy);
        };
        let name = s.publish(&self.inner)?;
        tracing::debug!(adapter = %name, base = %s.base_model, "served rollouts");
        s.sample(&name, request)
    }

    fn logprobs(
        &self,
        batch: &TokenBatch<'_>,
        temperature: f64,
        entropy: bool,
    ) -> Result<PolicyLogprobs, Self::Error> {
        self.inner
            .logprobs(batch, temperature, entropy)
            .map_err(ServedError::Policy)
    }

    fn reference_logprobs(
        &self,
        batch: &TokenBatch<'_>,
        temperature: f64,
    ) -> Result<Option<Tensor>, Self::Error> {
        self.inner
            .reference_logprobs(batch, temperature)
            .map_err(ServedError::Policy)
    }

    fn trainable_parameters(&self) -> Vec<(String, Tensor)> {
        self.inner.trainable_parameters()
    }

    fn save(&self, dir: &Path) -> Result<(), Self::Error> {
        self.inner.save(dir).map_err(ServedError::Policy)
    }

    fn load(&mut self, dir: &Path) -> Result<(), Self::Error> {
        self.inner.load(dir).map_err(ServedError::Policy)
    }
}
