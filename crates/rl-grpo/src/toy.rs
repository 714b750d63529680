//! A minimal [`Policy`]: a learnable table of logits, one row per completion position, that
//! ignores the prompt. Small enough to read in a minute, fast enough for tests, docs and for
//! prototyping a reward function before plugging in a language model.

use std::path::Path;

use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result, TorchContext};
use crate::policy::{Completion, Policy, PolicyLogprobs, SampleRequest, TokenBatch};

/// File the policy saves its logits to.
const FILE: &str = "logits.safetensors";

/// Completion token `t` is drawn from `softmax(logits[t] / T)` whatever the prompt; a draw of
/// `stop_token` ends the completion. Top-k and top-p are not supported (they are ignored).
#[derive(Debug)]
pub struct CategoricalPolicy {
    logits: Tensor,
    stop_token: Option<u32>,
}

impl CategoricalPolicy {
    /// A policy over `vocab` tokens for completions of up to `max_len` tokens, with logits
    /// `N(0, std²)` drawn from a ChaCha stream of `seed` (std 0: uniform), as `kind` (`Float`
    /// to train with AdamW, `Double` for gradient checks).
    pub fn new(max_len: usize, vocab: usize, std: f64, seed: u64, kind: Kind) -> Result<Self> {
        if max_len == 0 || vocab < 2 {
            return Err(Error::tensor(
                "CategoricalPolicy",
                format!("needs max_len ≥ 1 and vocab ≥ 2, got {max_len} and {vocab}"),
            ));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let values: Vec<f64> = (0..max_len * vocab)
            .map(|_| {
                // Box–Muller from two 53-bit uniforms.
                let u1 = ((rng.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
                let u2 = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
                std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
            })
            .collect();
        let logits = Tensor::f_from_slice(&values)
            .and_then(|t| t.f_view([max_len as i64, vocab as i64]))
            .and_then(|t| t.f_to_kind(kind))
            .op("CategoricalPolicy::new")?
            .set_requires_grad(true);
        Ok(CategoricalPolicy {
            logits,
            stop_token: None,
        })
    }

    /// Ends a completion when `token` is drawn.
    pub fn with_stop_token(mut self, token: u32) -> Self {
        self.stop_token = Some(token);
        self
    }

    /// The `[max_len, vocab]` logits (a trainable leaf tensor).
    pub fn logits(&self) -> &Tensor {
        &self.logits
    }

    /// `log_softmax(logits / T)` per position.
    fn table(&self, temperature: f64) -> Result<Tensor> {
        let l = if temperature == 0.0 || temperature == 1.0 {
            self.logits.shallow_clone()
        } else {
            self.logits.f_div_scalar(temperature).op("temperature")?
        };
        l.f_log_softmax(-1, None::<Kind>).op("log_softmax")
    }
}

impl Policy for CategoricalPolicy {
    type Error = Error;

    fn device(&self) -> Device {
        self.logits.device()
    }

    fn sample(&mut self, request: &SampleRequest<'_>) -> Result<Vec<Completion>> {
        let _guard = tch::no_grad_guard();
        let t = request.sampling.temperature;
        let table = self.table(t)?;
        let (len, vocab) = (table.size()[0] as usize, table.size()[1] as usize);
        let lp = Vec::<f64>::try_from(
            table
                .f_to_kind(Kind::Double)
                .op("sample")?
                .f_flatten(0, -1)
                .op("sample")?,
        )
        .op("sample")?;
        let max = len.min(request.sampling.max_new_tokens);
        let mut out = Vec::with_capacity(request.rows());
        for (_, key) in request.row_prompts() {
            let mut rng = ChaCha8Rng::seed_from_u64(request.seed);
            rng.set_stream(key);
            let mut c = Completion {
                tokens: Vec::new(),
                logprobs: Vec::new(),
                truncated: true,
            };
            for pos in 0..max {
                let row = &lp[pos * vocab..(pos + 1) * vocab];
                let tok = if t == 0.0 {
                    (0..vocab)
                        .max_by(|&a, &b| row[a].total_cmp(&row[b]).then(b.cmp(&a)))
                        .unwrap_or(0)
                } else {
                    let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
                    let mut acc = 0.0;
                    let mut pick = vocab - 1;
                    for (i, l) in row.iter().enumerate() {
                        acc += l.exp();
                        if u < acc {
                            pick = i;
                            break;
                        }
                    }
                    pick
                };
                c.tokens.push(tok as u32);
                c.logprobs.push(row[tok] as f32);
                if self.stop_token == Some(tok as u32) {
                    c.truncated = false;
                    break;
                }
            }
            out.push(c);
        }
        Ok(out)
    }

    fn logprobs(
        &self,
        batch: &TokenBatch<'_>,
        temperature: f64,
        entropy: bool,
    ) -> Result<PolicyLogprobs> {
        let table = self.table(temperature)?;
        let len = table.size()[0];
        let (b, c) = (batch.len(), batch.completion_width());
        let mut pos = vec![0i64; b * c];
        let mut tok = vec![0i64; b * c];
        for (i, comp) in batch.completions.iter().enumerate() {
            if comp.len() as i64 > len {
                return Err(Error::tensor(
                    "batch",
                    format!(
                        "row {i}: {} tokens, longer than the policy's {len}",
                        comp.len()
                    ),
                ));
            }
            for (j, &t) in comp.iter().enumerate() {
                pos[i * c + j] = j as i64;
                tok[i * c + j] = i64::from(t);
            }
        }
        let f = || -> std::result::Result<PolicyLogprobs, tch::TchError> {
            let shape = [b as i64, c as i64];
            let device = self.logits.device();
            let pos = Tensor::f_from_slice(&pos)?
                .f_view(shape)?
                .f_to_device(device)?;
            let tok = Tensor::f_from_slice(&tok)?
                .f_view(shape)?
                .f_to_device(device)?;
            let logprobs = table.f_index(&[Some(&pos), Some(&tok)])?;
            let entropy = if entropy {
                let h = table
                    .f_exp()?
                    .f_mul(&table)?
                    .f_sum_dim_intlist(&[-1i64][..], false, None::<Kind>)?
                    .f_neg()?;
                Some(h.f_index(&[Some(&pos)])?)
            } else {
                None
            };
            Ok(PolicyLogprobs { logprobs, entropy })
        };
        f().op("CategoricalPolicy::logprobs")
    }

    fn trainable_parameters(&self) -> Vec<(String, Tensor)> {
        vec![("logits".to_owned(), self.logits.shallow_clone())]
    }

    fn save(&self, dir: &Path) -> Result<()> {
        let path = dir.join(FILE);
        Tensor::write_safetensors(&[("logits", &self.logits)], &path).op("saving the policy")
    }

    fn load(&mut self, dir: &Path) -> Result<()> {
        let path = dir.join(FILE);
        let tensors = Tensor::read_safetensors(&path).op("loading the policy")?;
        let Some((_, t)) = tensors.into_iter().find(|(n, _)| n == "logits") else {
            return Err(Error::checkpoint(path, "no tensor `logits`"));
        };
        if t.size() != self.logits.size() {
            return Err(Error::checkpoint(
                path,
                format!(
                    "logits of shape {:?}, the policy has {:?}",
                    t.size(),
                    self.logits.size()
                ),
            ));
        }
        let _guard = tch::no_grad_guard();
        self.logits
            .f_copy_(&t.f_to_kind(self.logits.kind()).op("loading the policy")?)
            .op("loading the policy")
    }
}
