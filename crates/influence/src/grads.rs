//! Per-sample LoRA gradients, batched: what both sides of the score (candidates and validation
//! examples) are made of.

use optimsyn_data_io::{ChatExample, ChatFormat, ChatTokenizer};
use optimsyn_lm::{CausalLm, LoraAdapter, LossBatch, MaskedSeq, TrainExample};
use tch::{Kind, Tensor};

use crate::error::{Error, Result, TorchContext};

/// Encodes chat examples; ids default to the position.
pub fn encode_examples(
    tok: &ChatTokenizer,
    examples: &[ChatExample],
    format: ChatFormat,
    max_len: Option<usize>,
) -> Result<Vec<TrainExample>> {
    examples
        .iter()
        .enumerate()
        .map(|(i, ex)| {
            let id = ex.id.clone().unwrap_or_else(|| i.to_string());
            let enc = tok.encode_example(ex, format, max_len, &Default::default())?;
            Ok(TrainExample {
                id,
                tokens: enc.tokens,
                loss_mask: enc.loss_mask,
                subtask: ex.subtask.clone(),
            })
        })
        .collect()
}

pub(crate) fn loss_tokens(e: &TrainExample) -> usize {
    e.loss_mask.iter().skip(1).filter(|m| **m != 0).count()
}

/// The dtype of the adapter's parameters, which its gradients share.
pub(crate) fn grad_kind(adapter: &LoraAdapter) -> Kind {
    adapter
        .named_parameters()
        .first()
        .map_or(Kind::Float, |(_, p)| p.kind())
}

/// Per-sample LoRA gradients `[n, P]` of `examples[idx]` (rows in `idx` order), batched.
pub fn gradients(
    model: &CausalLm,
    adapter: &LoraAdapter,
    examples: &[TrainExample],
    idx: &[usize],
    max_batch_tokens: usize,
) -> Result<(Tensor, Vec<f32>)> {
    let all = Tensor::f_empty(
        [idx.len() as i64, adapter.num_parameters()],
        (grad_kind(adapter), model.device()),
    )
    .op("gradients")?;
    let losses = gradients_into(model, adapter, examples, idx, max_batch_tokens, &all)?;
    Ok((all, losses))
}

/// [`gradients`] written into `out` (`[idx.len(), P]`, contiguous rows, the adapter's dtype and
/// device), e.g. a buffer reused across calls; returns the per-sample losses.
pub fn gradients_into(
    model: &CausalLm,
    adapter: &LoraAdapter,
    examples: &[TrainExample],
    idx: &[usize],
    max_batch_tokens: usize,
    out: &Tensor,
) -> Result<Vec<f32>> {
    if out.size().first() != Some(&(idx.len() as i64)) {
        return Err(Error::Input(format!(
            "gradients: {} examples need an output of {} rows, got {:?}",
            idx.len(),
            idx.len(),
            out.size()
        )));
    }
    let mut losses = Vec::with_capacity(idx.len());
    for b in
        optimsyn_lm::sft::token_budget_batches(idx, |i| examples[i].tokens.len(), max_batch_tokens)
    {
        let seqs: Vec<MaskedSeq<'_>> = b
            .iter()
            .map(|&i| MaskedSeq {
                tokens: &examples[i].tokens,
                loss_mask: &examples[i].loss_mask,
            })
            .collect();
        let batch = LossBatch::new(&seqs, model.device())?;
        // Batches come in `idx` order, so each fills the next rows of `out`.
        let rows = out
            .f_narrow(0, losses.len() as i64, b.len() as i64)
            .op("gradients")?;
        losses.extend(adapter.per_sample_grads_into(model, &batch, &rows)?);
    }
    Ok(losses)
}

/// The first `n` rows of the reused gradient buffer, grown (never shrunk) to hold them.
pub(crate) fn grad_rows(
    buf: &mut Option<Tensor>,
    adapter: &LoraAdapter,
    n: usize,
    device: tch::Device,
) -> Result<Tensor> {
    let kind = grad_kind(adapter);
    let p = adapter.num_parameters();
    let fits = buf
        .as_ref()
        .is_some_and(|b| b.size()[0] >= n as i64 && b.kind() == kind);
    if !fits {
        // Dropped first, so the old and the new buffer never coexist.
        *buf = None;
    }
    let b = match buf {
        Some(b) => b,
        None => buf.insert(Tensor::f_empty([n as i64, p], (kind, device)).op("gradients")?),
    };
    b.f_narrow(0, 0, n as i64).op("gradients")
}
