//! The model thread: it owns the model (libtorch tensors are `Send` but not `Sync`), takes jobs
//! from a channel, and runs every job that is waiting, grouped by sampling settings, as batched
//! `generate` calls of at most `max_batch` rows.
//!
//! Rows never depend on their batch: a row's tokens depend only on its prompt, its sampling
//! settings and its stream key, and a row that wants fewer new tokens than its batch's longest is
//! cut to its own budget afterwards (the tokens it would have produced alone are a prefix of
//! those), so batching changes speed only.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use optimsyn_data_io::ChatTokenizer;
use optimsyn_lm::{CausalLm, FinishReason, Generation, LoraAdapter, SamplingParams};
use optimsyn_synth::stream_key;
use tokio::sync::oneshot;

use crate::lora::{AdapterOp, Adapters};

/// Sampling settings that must be equal for rows to share a `generate` call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Sampling {
    pub temperature: f64,
    pub top_p: f64,
    pub top_k: usize,
}

impl Sampling {
    /// Greedy rows ignore top-p and top-k, so they all batch together.
    pub fn normalized(self) -> Self {
        if self.temperature == 0.0 {
            Sampling {
                temperature: 0.0,
                top_p: 1.0,
                top_k: 0,
            }
        } else {
            self
        }
    }
}

/// One request's generation work: `n` rows of the same prompt.
pub(crate) struct Job {
    pub prompt: Vec<u32>,
    pub n: u32,
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    pub seed: u64,
    /// The LoRA adapter to generate with (`None`: the base model).
    pub adapter: Option<String>,
    /// A oneshot, so the async handler awaits it without holding a thread.
    pub reply: oneshot::Sender<Result<Vec<Generation>, String>>,
}

/// What the model thread receives.
pub(crate) enum Msg {
    Job(Job),
    /// Load or unload a LoRA adapter: after the jobs queued before it.
    Adapter(AdapterOp),
    Stop,
}

/// Counters the server exposes.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub requests: AtomicU64,
    pub jobs: AtomicU64,
    pub batches: AtomicU64,
    pub rows: AtomicU64,
    pub max_rows: AtomicU64,
    pub errors: AtomicU64,
    pub cancelled: AtomicU64,
}

/// The model thread's settings.
pub(crate) struct Engine {
    pub model: CausalLm,
    pub stop_tokens: Vec<u32>,
    pub max_batch: usize,
    pub batch_wait: Duration,
    pub killed: Arc<AtomicBool>,
    pub counters: Arc<Counters>,
    pub threads: Option<usize>,
    pub adapters: Adapters,
}

impl Engine {
    /// Runs until a [`Msg::Stop`] arrives or every sender is gone.
    pub fn run(mut self, rx: Receiver<Msg>) {
        if let Some(n) = self.threads {
            // libtorch's intra-op thread count is per calling thread under OpenMP.
            tch::set_num_threads(n.clamp(1, i32::MAX as usize) as i32);
        }
        loop {
            let first = match rx.recv() {
                Ok(Msg::Job(j)) => j,
                Ok(Msg::Adapter(op)) => {
                    self.adapters.apply(&mut self.model, op);
                    continue;
                }
                Ok(Msg::Stop) | Err(_) => return,
            };
            let mut jobs = vec![first];
            let mut rows = jobs[0].n as usize;
            let deadline = Instant::now() + self.batch_wait;
            let mut stop = false;
            // An adapter change waits for the jobs queued before it, and ends the gathering.
            let mut change = None;
            while rows < self.max_batch {
                // Whatever is already queued joins at once; then wait out the window.
                let wait = deadline.saturating_duration_since(Instant::now());
                match rx.recv_timeout(wait) {
                    Ok(Msg::Job(j)) => {
                        rows += j.n as usize;
                        jobs.push(j);
                    }
                    Ok(Msg::Adapter(op)) => {
                        change = Some(op);
                        break;
                    }
                    Ok(Msg::Stop) => {
                        stop = true;
                        break;
                    }
                    Err(RecvTimeoutError::Timeout) => break,
                    Err(RecvTimeoutError::Disconnected) => {
                        stop = true;
                        break;
                    }
                }
            }
            if self.killed.load(Ordering::SeqCst) {
                return;
            }
            self.run_jobs(jobs);
            if let Some(op) = change {
                self.adapters.apply(&mut self.model, op);
            }
            if stop {
                return;
            }
        }
    }

    fn run_jobs(&mut self, jobs: Vec<Job>) {
        // A client that hung up while its job waited costs no generation.
        let (jobs, gone): (Vec<Job>, Vec<Job>) =
            jobs.into_iter().partition(|j| !j.reply.is_closed());
        self.counters
            .cancelled
            .fetch_add(gone.len() as u64, Ordering::Relaxed);
        if jobs.is_empty() {
            return;
        }
        self.counters
            .jobs
            .fetch_add(jobs.len() as u64, Ordering::Relaxed);
        // Group by adapter and sampling settings, keeping arrival order.
        type Key = (Option<String>, Sampling);
        let mut groups: Vec<(Key, Vec<Job>)> = Vec::new();
        for j in jobs {
            let key = (j.adapter.clone(), j.sampling);
            match groups.iter_mut().find(|(k, _)| *k == key) {
                Some((_, g)) => g.push(j),
                None => groups.push((key, vec![j])),
            }
        }
        for ((adapter, sampling), group) in groups {
            if self.killed.load(Ordering::SeqCst) {
                return;
            }
            if let Err(m) = self.adapters.select(&mut self.model, adapter.as_deref()) {
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
                for job in group {
                    let _ = job.reply.send(Err(m.clone()));
                }
                continue;
            }
            self.run_group(sampling, adapter.is_none(), group);
        }
    }

    /// Generates a group's rows; `base`: with the attached adapter (if any) bypassed.
    fn run_group(&self, sampling: Sampling, base: bool, group: Vec<Job>) {
        let attached = self.adapters.attached().filter(|_| base);
        let _bypass = match attached.map(LoraAdapter::bypass).transpose() {
            Ok(guard) => guard,
            Err(e) => {
                for job in group {
                    let _ = job.reply.send(Err(e.to_string()));
                }
                return;
            }
        };
        // Rows: (job, choice).
        let rows: Vec<(usize, u32)> = group
            .iter()
            .enumerate()
            .flat_map(|(j, job)| (0..job.n).map(move |c| (j, c)))
            .collect();
        let mut results: Vec<Vec<Option<Result<Generation, String>>>> = group
            .iter()
            .map(|job| (0..job.n).map(|_| None).collect())
            .collect();
        for chunk in rows.chunks(self.max_batch.max(1)) {
            if self.killed.load(Ordering::SeqCst) {
                return;
            }
            let prompts: Vec<&[u32]> = chunk
                .iter()
                .map(|(j, _)| group[*j].prompt.as_slice())
                .collect();
            let keys: Vec<u64> = chunk
                .iter()
                .map(|(j, c)| stream_key(group[*j].seed, *c))
                .collect();
            let max_new = chunk
                .iter()
                .map(|(j, _)| group[*j].max_new_tokens)
                .max()
                .unwrap_or(1);
            let params = SamplingParams {
                max_new_tokens: max_new,
                temperature: sampling.temperature,
                top_p: sampling.top_p,
                top_k: sampling.top_k,
                seed: 0,
                stop_tokens: self.stop_tokens.clone(),
            };
            self.counters.batches.fetch_add(1, Ordering::Relaxed);
            self.counters
                .rows
                .fetch_add(chunk.len() as u64, Ordering::Relaxed);
            self.counters
                .max_rows
                .fetch_max(chunk.len() as u64, Ordering::Relaxed);
            let t = Instant::now();
            match self.model.generate(&prompts, &keys, &params) {
                Ok(gens) => {
                    for ((j, c), mut g) in chunk.iter().zip(gens) {
                        let budget = group[*j].max_new_tokens;
                        if g.tokens.len() > budget {
                            g.tokens.truncate(budget);
                            g.logprobs.truncate(budget);
                            g.finish_reason = FinishReason::Length;
                        }
                        results[*j][*c as usize] = Some(Ok(g));
                    }
                }
                Err(e) => {
                    self.counters.errors.fetch_add(1, Ordering::Relaxed);
                    let m = e.to_string();
                    for (j, c) in chunk {
                        results[*j][*c as usize] = Some(Err(m.clone()));
                    }
                }
            }
            tracing::debug!(rows = chunk.len(), max_new, elapsed = ?t.elapsed(), "batch");
        }
        for (job, res) in group.into_iter().zip(results) {
            let out: Result<Vec<Generation>, String> = res
                .into_iter()
                .map(|r| r.unwrap_or_else(|| Err("row was not generated".into())))
                .collect();
            // The client may have gone; its result is dropped.
            let _ = job.reply.send(out);
        }
    }
}

/// A generated row as the API reports it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Decoded {
    /// The text (cut before a stop string).
    pub text: String,
    /// Text pieces, one per kept token (some empty), concatenating to `text`.
    pub pieces: Vec<String>,
    /// Kept tokens and their log-probs.
    pub tokens: Vec<u32>,
    pub logprobs: Vec<f32>,
    /// `stop` or `length`.
    pub finish_reason: optimsyn_synth::FinishReason,
}

/// Decodes a row incrementally (so streaming deltas concatenate to the whole text), then cuts it
/// at the earliest stop string, as OpenAI does (the stop string itself is not returned).
pub(crate) fn decode_row(
    tok: &ChatTokenizer,
    g: &Generation,
    stops: &[String],
) -> Result<Decoded, String> {
    let ids = &g.tokens;
    let mut pieces = Vec::with_capacity(ids.len());
    let (mut prefix, mut read) = (0usize, 0usize);
    let dec = |s: &[u32]| tok.decode(s, true).map_err(|e| e.to_string());
    for i in 0..ids.len() {
        let before = dec(&ids[prefix..read])?;
        let after = dec(&ids[prefix..=i])?;
        if after.len() > before.len()
            && after.is_char_boundary(before.len())
            && after.starts_with(&before)
            && !after.ends_with('\u{FFFD}')
        {
            pieces.push(after[before.len()..].to_string());
            prefix = read;
            read = i + 1;
        } else {
            pieces.push(String::new());
        }
    }
    let full = dec(ids)?;
    let emitted: String = pieces.concat();
    match full.strip_prefix(emitted.as_str()) {
        Some(rest) if !rest.is_empty() => {
            if let Some(last) = pieces.last_mut() {
                last.push_str(rest);
            }
        }
        Some(_) => {}
        None => {
            // Windowed decoding disagreed with the whole (a tokenizer whose decoder looks at
            // context): keep the whole text in the last piece.
            pieces.iter_mut().for_each(String::clear);
            if let Some(last) = pieces.last_mut() {
                *last = full.clone();
            }
        }
    }
    let mut finish = optimsyn_synth::FinishReason::from(g.finish_reason);
    let cut = stops
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| full.find(s.as_str()).map(|at| (at, at + s.len())))
        .min();
    let (mut text, mut tokens, mut logprobs) = (full, g.tokens.clone(), g.logprobs.clone());
    if let Some((at, end)) = cut {
        finish = optimsyn_synth::FinishReason::Stop;
        text.truncate(at);
        // Keep the tokens up to the one that completed the stop string; cut the pieces at `at`.
        let mut acc = 0usize;
        let mut keep = pieces.len();
        for (k, p) in pieces.iter_mut().enumerate() {
            let start = acc;
            acc += p.len();
            if start >= at {
                p.clear();
            } else if acc > at {
                p.truncate(at - start);
            }
            if acc >= end {
                keep = k + 1;
                break;
            }
        }
        pieces.truncate(keep);
        tokens.truncate(keep);
        logprobs.truncate(keep);
    }
    Ok(Decoded {
        text,
        pieces,
        tokens,
        logprobs,
        finish_reason: finish,
    })
}
