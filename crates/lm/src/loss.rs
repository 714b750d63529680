//! The supervised loss every trainer and scorer shares: cross-entropy on the tokens a loss mask
//! marks, per sample or per token.

use tch::Tensor;

use crate::error::{Error, Result, TorchContext};
use crate::generate::PaddedBatch;
use crate::model::CausalLm;

/// One example as training sees it: token ids and, per token, whether it is a target.
#[derive(Debug, Clone, Copy)]
pub struct MaskedSeq<'a> {
    /// Token ids.
    pub tokens: &'a [u32],
    /// 1 where `tokens[i]` is predicted and carries loss (same length as `tokens`).
    pub loss_mask: &'a [u8],
}

/// A right-padded batch of [`MaskedSeq`]s on the model's device.
#[derive(Debug)]
pub struct LossBatch {
    /// Ids and attention mask.
    pub batch: PaddedBatch,
    /// `[B, T-1]` f32: 1 where target `i + 1` carries loss.
    pub target_mask: Tensor,
    /// Loss-carrying targets per row.
    pub counts: Vec<usize>,
}

impl LossBatch {
    /// Pads `rows` on the right. Each row needs at least 2 tokens and a mask of its length.
    pub fn new(rows: &[MaskedSeq<'_>], device: tch::Device) -> Result<Self> {
        for (i, r) in rows.iter().enumerate() {
            if r.tokens.len() != r.loss_mask.len() {
                return Err(Error::input(format!(
                    "row {i}: {} tokens but a loss mask of {}",
                    r.tokens.len(),
                    r.loss_mask.len()
                )));
            }
            if r.tokens.len() < 2 {
                return Err(Error::input(format!(
                    "row {i}: a training row needs at least 2 tokens"
                )));
            }
        }
        let seqs: Vec<&[u32]> = rows.iter().map(|r| r.tokens).collect();
        let batch = PaddedBatch::new(&seqs, false, device)?;
        let w = batch.input_ids.size()[1] as usize - 1;
        let mut mask = vec![0f32; rows.len() * w];
        let mut counts = Vec::with_capacity(rows.len());
        for (i, r) in rows.iter().enumerate() {
            let mut n = 0;
            for (j, &m) in r.loss_mask.iter().enumerate().skip(1) {
                if m != 0 {
                    mask[i * w + j - 1] = 1.0;
                    n += 1;
                }
            }
            counts.push(n);
        }
        let target_mask = Tensor::f_from_slice(&mask)
            .and_then(|t| t.f_view([rows.len() as i64, w as i64])?.f_to_device(device))
            .op("loss mask")?;
        Ok(LossBatch {
            batch,
            target_mask,
            counts,
        })
    }
}

impl CausalLm {
    /// Summed negative log-likelihood of each row's masked targets, `[B]` f32 (f64 for an f64
    /// model; differentiable).
    /// Rows with no target give exactly 0 (no NaN reaches the gradient sums).
    pub fn masked_nll_sums(&self, b: &LossBatch) -> Result<Tensor> {
        let lp = self.token_logprobs(&b.batch.input_ids, b.batch.attention_mask.as_ref(), 1.0)?;
        let nll = lp
            .f_neg()
            .and_then(|n| n.f_mul(&b.target_mask))
            .op("masked loss")?;
        let kind = nll.kind();
        nll.f_sum_dim_intlist(Some([1i64].as_slice()), false, kind)
            .op("masked loss")
    }

    /// Per-sample mean cross-entropy over each row's masked targets, `[B]` f32 (differentiable):
    /// the loss convention of LESS and the OptimSyn reference code, under which a sample's loss (and
    /// gradient) does not depend on its batch. Rows with no target give 0.
    pub fn per_sample_loss(&self, b: &LossBatch) -> Result<Tensor> {
        let sums = self.masked_nll_sums(b)?;
        let denom: Vec<f32> = b.counts.iter().map(|&n| n.max(1) as f32).collect();
        let denom = Tensor::f_from_slice(&denom)
            .and_then(|d| d.f_to_device(self.device()))
            .op("masked loss")?;
        sums.f_div(&denom).op("masked loss")
    }
}
