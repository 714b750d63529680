//! Batched generation with a KV cache: left-padded prompts, per-row seeded sampling, and each
//! generated token's log-prob as docs/GUIDE.md ("Language models") defines it
//! (`log_softmax(logits / T)` over the full vocabulary, before truncation; plain `log_softmax` at
//! T = 0).

use tch::{Kind, Tensor};

use crate::error::{Error, Result, TorchContext};
use crate::model::{CausalLm, log_softmax_at, logprobs_of};
use crate::sampling::{RowRng, SamplingParams, argmax, sample};

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
        let mut rngs: Vec<RowRng> = keys.iter().map(|&k| RowRng::new(params.seed, k)).collect();
        let mut done = vec![false; b];
        let batch = PaddedBatch::new(prompts, true, self.device())?;
        let width = batch.input_ids.size()[1] as usize;
        let mut cache = self.new_cache(b, width + steps)?;
        let h = self.forward_hidden(
            &batch.input_ids,
            batch.attention_mask.as_ref(),
            Some(&mut cache),
        )?;
        let mut last = h.f_select(1, width as i64 - 1).op("last hidden state")?;
        let vocab = self.config().vocab_size;
        for step in 0..steps {
            let logits = self.logits(&last)?; // [B, V]
            let chosen = choose_tokens(&logits, params, &done, &mut rngs, &mut out, vocab)?;
            for i in 0..b {
                if done[i] {
                    continue;
                }
                let t = chosen[i] as u32;
                out[i].tokens.push(t);
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
            let (next, mask) = decode_inputs(&chosen, &done, self.device())?;
            let h = self.forward_hidden(&next, mask.as_ref(), Some(&mut cache))?;
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

/// The next token of every unfinished row (greedy, or sampled from its own stream), with its
/// log-prob appended to the row's output; finished rows get token 0.
fn choose_tokens(
    logits: &Tensor,
    params: &SamplingParams,
    done: &[bool],
    rngs: &mut [RowRng],
    out: &mut [Generation],
    vocab: usize,
) -> Result<Vec<i64>> {
    let b = done.len();
    let mut chosen = vec![0i64; b];
    if params.is_greedy() {
        let tok = logits.f_argmax(-1, false).op("greedy choice")?;
        let lp = to_vec_f32(&logprobs_of(logits, &tok, 0.0)?)?;
        let tok = Vec::<i64>::try_from(&tok).op("greedy choice")?;
        for i in (0..b).filter(|&i| !done[i]) {
            chosen[i] = tok[i];
            out[i].logprobs.push(lp[i]);
        }
    } else {
        let lp = to_vec_f32(&log_softmax_at(logits, params.temperature)?)?;
        for i in (0..b).filter(|&i| !done[i]) {
            let row = &lp[i * vocab..(i + 1) * vocab];
            let t = if params.top_k == 1 {
                argmax(row)
            } else {
                sample(row, params.top_k, params.top_p, &mut rngs[i])
            };
            chosen[i] = t as i64;
            out[i].logprobs.push(row[t]);
        }
    }
    Ok(chosen)
}

/// The next decode step's input `[B, 1]` and, once a row has finished, its mask: finished rows
/// are fed as padding, so they neither advance nor attend to anything useful.
fn decode_inputs(
    chosen: &[i64],
    done: &[bool],
    device: tch::Device,
) -> Result<(Tensor, Option<Tensor>)> {
    let b = chosen.len() as i64;
    let next = Tensor::f_from_slice(chosen)
        .and_then(|t| t.f_view([b, 1])?.f_to_device(device))
        .op("next tokens")?;
    let mask = if done.iter().any(|d| *d) {
        let m: Vec<i64> = done.iter().map(|d| i64::from(!*d)).collect();
        Some(
            Tensor::f_from_slice(&m)
                .and_then(|t| t.f_view([b, 1])?.f_to_device(device))
                .op("decode mask")?,
        )
    } else {
        None
    };
    Ok((next, mask))
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
