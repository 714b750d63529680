//! Batched generation with a KV cache: left-padded prompts, per-row seeded sampling, and each
//! generated token's log-prob as docs/GUIDE.md ("Language models") defines it
//! (`log_softmax(logits / T)` over the full vocabulary, before truncation; plain `log_softmax` at
//! T = 0).

use tch::{Kind, Tensor};

use crate::choose;
use crate::error::{Error, Result, TorchContext};
use crate::model::CausalLm;
use crate::sampling::SamplingParams;

/// Why a row stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// It produced a stop token (the last of its tokens).
    Stop,
    /// It reached `max_new_tokens` or the end of the model's context.
    Length,
}

/// One row's output.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// Generated tokens only, ending with the stop token when one was produced.
    pub tokens: Vec<u32>,
    /// `logprobs[i]` = log-prob of `tokens[i]` given the prompt and `tokens[..i]`, at the sampling
    /// temperature.
    pub logprobs: Vec<f32>,
    /// Why generation ended.
    pub finish_reason: FinishReason,
}

/// A prompt `[B, T]` batch padded on the left (for generation) or right (for scoring), with its
/// `[B, T]` mask (1 = real token). Padding positions hold token 0.
#[derive(Debug)]
pub struct PaddedBatch {
    /// `[B, T]` i64 token ids.
    pub input_ids: Tensor,
    /// `[B, T]` i64 mask; `None` when no row needed padding.
    pub attention_mask: Option<Tensor>,
    /// Each row's unpadded length.
    pub lengths: Vec<usize>,
}

impl PaddedBatch {
    /// Pads `rows` to the longest, on the left when `left` else on the right.
    pub fn new(rows: &[&[u32]], left: bool, device: tch::Device) -> Result<Self> {
        let t = rows.iter().map(|r| r.len()).max().unwrap_or(0);
        if rows.is_empty() || t == 0 {
            return Err(Error::input("empty batch: no rows or only empty rows"));
        }
        let mut ids = vec![0i64; rows.len() * t];
        let mut mask = vec![0i64; rows.len() * t];
        for (i, r) in rows.iter().enumerate() {
            let start = if left { t - r.len() } else { 0 };
            for (j, &tok) in r.iter().enumerate() {
                ids[i * t + start + j] = i64::from(tok);
                mask[i * t + start + j] = 1;
            }
        }
        let shape = [rows.len() as i64, t as i64];
        let padded = rows.iter().any(|r| r.len() != t);
        let f = || -> std::result::Result<(Tensor, Option<Tensor>), tch::TchError> {
            let ids = Tensor::f_from_slice(&ids)?
                .f_view(shape)?
                .f_to_device(device)?;
            let mask = if padded {
                Some(
                    Tensor::f_from_slice(&mask)?
                        .f_view(shape)?
                        .f_to_device(device)?,
                )
            } else {
                None
            };
            Ok((ids, mask))
        };
        let (input_ids, attention_mask) = f().op("building a padded batch")?;
        Ok(PaddedBatch {
            input_ids,
            attention_mask,
            lengths: rows.iter().map(|r| r.len()).collect(),
        })
    }
}

impl CausalLm {
    /// Per-token log-probs of whole sequences (`out[i][j] = log p(seq[i][j+1] | seq[i][..=j])`, so
    /// each row has `len - 1` entries), computed as one right-padded batch without autograd.
    pub fn sequence_logprobs(&self, seqs: &[&[u32]], temperature: f64) -> Result<Vec<Vec<f32>>> {
        let _guard = tch::no_grad_guard();
        for (i, s) in seqs.iter().enumerate() {
            if s.len() < 2 {
                return Err(Error::input(format!(
                    "row {i}: log-probs need at least 2 tokens, got {}",
                    s.len()
                )));
            }
            self.check_row(i, s)?;
        }
        let batch = PaddedBatch::new(seqs, false, self.device())?;
        let lp =
            self.token_logprobs(&batch.input_ids, batch.attention_mask.as_ref(), temperature)?;
        let flat = to_vec_f32(&lp)?;
        let w = batch.input_ids.size()[1] as usize - 1;
        Ok(seqs
            .iter()
            .enumerate()
            .map(|(i, s)| flat[i * w..i * w + s.len() - 1].to_vec())
            .collect())
    }

    /// Checks one row's ids against the vocabulary and the context, naming the row.
    fn check_row(&self, row: usize, ids: &[u32]) -> Result<()> {
        let vocab = self.config().vocab_size;
        if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::input(format!(
                "row {row}: token id {bad} is outside the vocabulary (size {vocab})"
            )));
        }
        let ctx = self.config().max_position_embeddings;
        if ids.len() > ctx {
            return Err(Error::input(format!(
                "row {row}: {} tokens is longer than the model's context ({ctx} tokens, max_position_embeddings)",
                ids.len()
            )));
        }
        Ok(())
    }

    /// Generates continuations of `prompts` as one left-padded batch. `keys[i]` selects row `i`'s
    /// random stream (with `params.seed`); use a stable id (see [`crate::row_key`]) so a row gets the
    /// same tokens whatever batch it is in. Rows stop at any of `params.stop_tokens`, at
    /// `max_new_tokens`, or at the end of the model's context.
    pub fn generate(
        &self,
        prompts: &[&[u32]],
        keys: &[u64],
        params: &SamplingParams,
    ) -> Result<Vec<Generation>> {
        let host_sampling = self.device() == tch::Device::Cpu;
        self.generate_rows(prompts, keys, params, host_sampling)
    }

    /// [`CausalLm::generate`], sampling with the host rule or with tensor ops (see `choose`).
    fn generate_rows(
        &self,
        prompts: &[&[u32]],
        keys: &[u64],
        params: &SamplingParams,
        host_sampling: bool,
    ) -> Result<Vec<Generation>> {
        let _guard = tch::no_grad_guard();
        params.validate()?;
        if prompts.is_empty() {
            return Ok(Vec::new());
        }
        if keys.len() != prompts.len() {
            return Err(Error::input(format!(
                "{} prompts but {} row keys",
                prompts.len(),
                keys.len()
            )));
        }
        let ctx = self.config().max_position_embeddings;
        self.check_prompts(prompts, ctx)?;
        let b = prompts.len();
        let budgets: Vec<usize> = prompts
            .iter()
            .map(|p| params.max_new_tokens.min(ctx - p.len()))
            .collect();
        let steps = budgets.iter().copied().max().unwrap_or(0);
        let mut out: Vec<Generation> = (0..b)
            .map(|_| Generation {
                tokens: Vec::new(),
                logprobs: Vec::new(),
                finish_reason: FinishReason::Length,
            })
            .collect();
        if steps == 0 {
            return Ok(out);
        }
        let batch = PaddedBatch::new(prompts, true, self.device())?;
        let width = batch.input_ids.size()[1] as usize;
        let mut cache = self.new_cache(b, width + steps)?;
        let h = self.forward_hidden(
            &batch.input_ids,
            batch.attention_mask.as_ref(),
            Some(&mut cache),
        )?;
        let mut last = h.f_select(1, width as i64 - 1).op("last hidden state")?;
        let mut rows = RowsOnDevice::new(params, keys, &budgets, self.device(), host_sampling)?;
        let mut done = vec![false; b];
        for step in 0..steps {
            let logits = self.logits(&last)?; // [B, V]
            let (tok, lp) = rows.choose(&logits, params, step)?;
            for (i, (t, lp)) in read_back(&tok, &lp)?.into_iter().enumerate() {
                if done[i] {
                    continue;
                }
                out[i].tokens.push(t);
                out[i].logprobs.push(lp);
                if params.stop_tokens.contains(&t) {
                    out[i].finish_reason = FinishReason::Stop;
                    done[i] = true;
                } else if out[i].tokens.len() >= budgets[i] {
                    done[i] = true;
                }
            }
            if done.iter().all(|d| *d) || step + 1 == steps {
                break;
            }
            // Fed from the device's own copy, so no token crosses back to it: finished rows as
            // padding, so they neither advance nor attend to anything useful.
            let (next, mask) = rows.advance(&tok, step, done.iter().any(|d| *d))?;
            let h = self.decode_hidden(&next, mask.as_ref(), &mut cache)?;
            last = h.f_select(1, 0).op("last hidden state")?;
        }
        Ok(out)
    }

    /// Every prompt is non-empty, in the vocabulary, and leaves room to generate in a context of
    /// `ctx` tokens.
    fn check_prompts(&self, prompts: &[&[u32]], ctx: usize) -> Result<()> {
        for (i, p) in prompts.iter().enumerate() {
            if p.is_empty() {
                return Err(Error::input(format!("row {i}: empty prompt")));
            }
            self.check_row(i, p)?;
            if p.len() >= ctx {
                return Err(Error::input(format!(
                    "row {i}: prompt of {} tokens leaves no room to generate in the model's context ({ctx} tokens)",
                    p.len()
                )));
            }
        }
        Ok(())
    }
}

/// What a generation call keeps on the model's device, so that a decode step reads back only its
/// chosen tokens: the uniform draws, the stop tokens, each row's budget and which rows are done
/// (the same rule as the host's bookkeeping in [`CausalLm::generate`]).
struct RowsOnDevice {
    host_sampling: bool,
    uniforms: Option<Tensor>,
    stop: Option<Tensor>,
    budgets: Tensor,
    done: Tensor,
}

impl RowsOnDevice {
    fn new(
        params: &SamplingParams,
        keys: &[u64],
        budgets: &[usize],
        device: tch::Device,
        host_sampling: bool,
    ) -> Result<Self> {
        let ids = |v: Vec<i64>| {
            Tensor::f_from_slice(&v)
                .and_then(|t| t.f_to_device(device))
                .op("generation state")
        };
        let stop = match params.stop_tokens.as_slice() {
            [] => None,
            s => Some(ids(s.iter().map(|&t| i64::from(t)).collect())?),
        };
        let budgets_dev = ids(budgets.iter().map(|&n| n as i64).collect())?;
        Ok(RowsOnDevice {
            host_sampling,
            uniforms: choose::row_uniforms(params, keys, budgets, device)?,
            stop,
            done: budgets_dev
                .f_zeros_like()
                .and_then(|t| t.f_to_kind(Kind::Bool))
                .op("generation state")?,
            budgets: budgets_dev,
        })
    }

    /// Step `step`'s tokens `[B]` and their log-probs `[B]`.
    fn choose(
        &self,
        logits: &Tensor,
        params: &SamplingParams,
        step: usize,
    ) -> Result<(Tensor, Tensor)> {
        let u = match &self.uniforms {
            Some(u) => Some(u.f_select(1, step as i64).op("uniform draws")?),
            None => None,
        };
        choose::choose(logits, params, u.as_ref(), self.host_sampling)
    }

    /// Marks the rows that `tok` finished and returns the next decode input `[B, 1]` and, once
    /// `any_done`, its mask `[B, 1]` (false for finished rows, whose input is token 0).
    fn advance(
        &mut self,
        tok: &Tensor,
        step: usize,
        any_done: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let mut f = || -> std::result::Result<(Tensor, Option<Tensor>), tch::TchError> {
            let mut done = self
                .done
                .f_logical_or(&self.budgets.f_le(step as i64 + 1)?)?;
            if let Some(stop) = &self.stop {
                done = done.f_logical_or(&Tensor::f_isin(tok, stop, false, false)?)?;
            }
            let next = tok.f_masked_fill(&done, 0)?.f_view([-1, 1])?;
            let mask = if any_done {
                Some(done.f_logical_not()?.f_view([-1, 1])?)
            } else {
                None
            };
            self.done = done;
            Ok((next, mask))
        };
        f().op("next tokens")
    }
}

/// The chosen tokens and their log-probs, read back in one transfer.
fn read_back(tok: &Tensor, lp: &Tensor) -> Result<Vec<(u32, f32)>> {
    let both = Tensor::f_stack(
        &[
            tok.f_to_kind(Kind::Double).op("reading back")?,
            lp.f_to_kind(Kind::Double).op("reading back")?,
        ],
        0,
    )
    .op("reading back")?;
    let v = Vec::<f64>::try_from(
        &both
            .f_to_device(tch::Device::Cpu)
            .op("reading back")?
            .f_view([-1])
            .op("reading back")?,
    )
    .op("reading back")?;
    let b = v.len() / 2;
    Ok((0..b).map(|i| (v[i] as u32, v[b + i] as f32)).collect())
}

/// Copies a tensor to a flat `Vec<f32>` on the CPU.
pub(crate) fn to_vec_f32(t: &Tensor) -> Result<Vec<f32>> {
    let flat = t
        .f_to_kind(Kind::Float)
        .and_then(|t| {
            t.f_to_device(tch::Device::Cpu)?
                .f_contiguous()?
                .f_view([-1])
        })
        .op("reading back")?;
    Vec::<f32>::try_from(&flat).op("reading back")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::LoadOptions;

    fn fixture(name: &str) -> CausalLm {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        CausalLm::load(dir.join(name), LoadOptions::default()).expect("fixture model")
    }

    /// The tensor rule (what a GPU runs) gives the CPU's host-rule generations: tokens, log-probs,
    /// finish reasons, with rows of other lengths finishing at other steps.
    #[test]
    fn tensor_sampling_generates_what_host_sampling_does() {
        let model = fixture("qwen3_kv1_sharded");
        let prompts: Vec<Vec<u32>> = (0..5u32)
            .map(|i| (0..1 + 2 * i).map(|j| 3 + (i * 11 + j * 7) % 60).collect())
            .collect();
        let rows: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
        let keys: Vec<u64> = (0..5).map(|i| crate::row_key(&format!("r{i}"))).collect();
        let mut stopped = 0;
        for (top_k, top_p) in [(0, 1.0), (0, 0.8), (7, 1.0), (7, 0.5), (1, 1.0)] {
            for seed in 0..4 {
                let params = SamplingParams {
                    max_new_tokens: 12,
                    temperature: 1.4,
                    top_k,
                    top_p,
                    seed,
                    stop_tokens: vec![5, 9, 21],
                };
                let host = model.generate_rows(&rows, &keys, &params, true).unwrap();
                let tensor = model.generate_rows(&rows, &keys, &params, false).unwrap();
                assert_eq!(host, tensor, "top_k {top_k}, top_p {top_p}, seed {seed}");
                stopped += host
                    .iter()
                    .filter(|g| g.finish_reason == FinishReason::Stop)
                    .count();
            }
        }
        // Rows end at different steps (a stop token) and the others run to the budget.
        assert!((10..90).contains(&stopped), "{stopped} of 100 rows stopped");
    }
}
