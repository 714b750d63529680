//! The supervised loss every trainer and scorer shares: cross-entropy on the tokens a loss mask
//! marks, per sample or per token.

use tch::{Kind, Tensor};

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
        if let Some(head) = self.frozen_head() {
            return self.fused_nll_sums(b, &head);
        }
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

/// Rows of logits one chunk of the fused loss holds at a time: ~8 MiB of f32 logits, so a chunk's
/// softmax stays in cache, between 64 and 4096 rows.
fn chunk_rows(vocab: i64) -> i64 {
    (2 * 1024 * 1024 / vocab.max(1)).clamp(64, 4096)
}

impl CausalLm {
    /// The output projection's weight when nothing in it is trained (tied or untied, no adapter,
    /// no gradient) and the model computes in f32/f64: then the loss can skip autograd for it.
    fn frozen_head(&self) -> Option<Tensor> {
        let w = match &self.lm_head {
            None => &self.embed_tokens,
            Some(l) if l.adapter.is_none() && l.bias.is_none() => &l.weight,
            Some(_) => return None,
        };
        let f32_or_f64 = matches!(w.kind(), Kind::Float | Kind::Double);
        (f32_or_f64 && !w.requires_grad()).then(|| w.shallow_clone())
    }

    /// [`CausalLm::masked_nll_sums`] with the output projection and cross-entropy fused: only the
    /// loss-carrying positions are projected, a few thousand rows at a time, and each chunk's
    /// gradient with respect to the hidden states, `(softmax - onehot) · W`, is computed right
    /// there instead of by autograd over a `[B, T, vocab]` logits tensor (and its log-softmax and
    /// gradient, each as large). The returned sums carry that gradient through a surrogate term
    /// `⟨h, G⟩ - ⟨h, G⟩.detach()` whose value is 0. Same FLOPs; far less memory traffic and no
    /// vocabulary-sized temporaries.
    fn fused_nll_sums(&self, b: &LossBatch, head: &Tensor) -> Result<Tensor> {
        let ids = &b.batch.input_ids;
        let (rows, t) = match ids.size().as_slice() {
            &[r, t] if t >= 2 => (r, t),
            s => {
                return Err(Error::input(format!(
                    "log-probs need at least 2 tokens per row, got shape {s:?}"
                )));
            }
        };
        let dev = self.device();
        let h = self.forward_hidden(ids, b.batch.attention_mask.as_ref(), None)?;
        let kind = h.kind();
        let f = || -> std::result::Result<Tensor, tch::TchError> {
            let hid = h.size()[2];
            let flat = h.f_narrow(1, 0, t - 1)?.f_reshape([rows * (t - 1), hid])?;
            let keep = b.target_mask.f_reshape([-1])?.f_to_device(dev)?.f_ne(0.0)?;
            let at = keep.f_nonzero()?.f_squeeze_dim(1)?; // [n] flat positions with a target
            let n = at.size()[0];
            let sums = Tensor::f_zeros([rows * (t - 1)], (kind, dev))?;
            if n == 0 {
                // Still tied to the graph (a zero gradient), as the unfused path is.
                return sums
                    .f_add(&flat.f_sum(kind)?.f_mul_scalar(0.0)?)?
                    .f_view([rows, t - 1])?
                    .f_sum_dim_intlist(Some([1i64].as_slice()), false, kind);
            }
            let targets = ids
                .f_narrow(1, 1, t - 1)?
                .f_reshape([-1])?
                .f_to_device(dev)?
                .f_to_kind(Kind::Int64)?
                .f_index_select(0, &at)?;
            let hs = flat.f_index_select(0, &at)?; // [n, hid], differentiable
            // Evaluation (no graph): the values alone, without the gradient products.
            let need_grad = hs.requires_grad();
            let (nll, grad) = {
                let _g = tch::no_grad_guard();
                let hd = hs.f_detach()?;
                let nll = Tensor::f_empty([n], (kind, dev))?;
                let grad = Tensor::f_empty([if need_grad { n } else { 0 }, hid], (kind, dev))?;
                let step = chunk_rows(head.size()[0]);
                let mut start = 0;
                while start < n {
                    let len = step.min(n - start);
                    let logits = hd.f_narrow(0, start, len)?.f_matmul(&head.f_tr()?)?;
                    let tg = targets.f_narrow(0, start, len)?.f_unsqueeze(1)?;
                    let lse = logits.f_logsumexp([1i64], true)?;
                    nll.f_narrow(0, start, len)?.f_copy_(
                        &lse.f_sub(&logits.f_gather(1, &tg, false)?)?
                            .f_squeeze_dim(1)?,
                    )?;
                    if !need_grad {
                        start += len;
                        continue;
                    }
                    // d nll / d logits = softmax - onehot, in place over the logits.
                    let mut p = logits;
                    let _ = p.f_sub_(&lse)?.f_exp_()?;
                    let minus_one = Tensor::f_full([len, 1], -1.0, (kind, dev))?;
                    let _ = p.f_scatter_add_(1, &tg, &minus_one)?;
                    grad.f_narrow(0, start, len)?.f_copy_(&p.f_matmul(head)?)?;
                    start += len;
                }
                (nll, grad)
            };
            let token = if need_grad {
                let dot =
                    hs.f_mul(&grad)?
                        .f_sum_dim_intlist(Some([1i64].as_slice()), false, kind)?;
                nll.f_add(&dot)?.f_sub(&dot.f_detach()?)?
            } else {
                nll
            };
            sums.f_index_add(0, &at, &token)?
                .f_view([rows, t - 1])?
                .f_sum_dim_intlist(Some([1i64].as_slice()), false, kind)
        };
        f().op("masked loss")
    }
}
