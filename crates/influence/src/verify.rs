//! The one-step check: does the first-order prediction match a real step?

use optimsyn_data_io::ChatExample;
use optimsyn_lm::{LossBatch, MaskedSeq, TrainExample};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::error::{Error, Result, TorchContext};
use crate::grads::{encode_examples, gradients};
use crate::scorer::InfluenceScorer;

/// One candidate's predicted and actual validation-loss change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepCheck {
    /// Candidate id.
    pub id: String,
    /// `−η ⟨∇L_val, Γ⟩`.
    pub predicted: f64,
    /// `L_val(θ − ηΓ) − L_val(θ)`.
    pub actual: f64,
}

/// The report of [`verify`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VerifyReport {
    /// Step size η (given, or chosen by [`verify`] when asked to).
    pub lr: f64,
    /// Validation loss before any step.
    pub val_loss: f64,
    /// Pearson correlation of predicted and actual changes.
    pub pearson: f64,
    /// Median of actual / predicted change: near 1 when the step is small enough for the
    /// first-order prediction, far from it when the step is too large (or too small for the
    /// float precision of the loss).
    pub linearity: f64,
    /// Per candidate.
    pub checks: Vec<StepCheck>,
}

fn mean_loss(s: &InfluenceScorer, val: &[TrainExample]) -> Result<f64> {
    let _g = tch::no_grad_guard();
    let seqs: Vec<MaskedSeq<'_>> = val
        .iter()
        .map(|e| MaskedSeq {
            tokens: &e.tokens,
            loss_mask: &e.loss_mask,
        })
        .collect();
    let batch = LossBatch::new(&seqs, s.model().device())?;
    Ok(s.model()
        .per_sample_loss(&batch)?
        .f_mean(Kind::Double)
        .op("validation loss")?
        .double_value(&[]))
}

/// Pearson correlation (NaN when either side is constant).
pub fn pearson(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len().min(b.len()) as f64;
    let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        sab += (x - ma) * (y - mb);
        saa += (x - ma) * (x - ma);
        sbb += (y - mb) * (y - mb);
    }
    sab / (saa * sbb).sqrt()
}

/// With an automatic step size, the median predicted change is this fraction of the validation
/// loss: well above the rounding of an f32 loss (~1e-7 relative), and small enough for the
/// curvature of a trained target (on the demo's, 1e-3 already gives actual/predicted ≈ 0.6).
pub const AUTO_RELATIVE_CHANGE: f64 = 1e-5;

/// The same for a bf16 or f16 target: its weights and losses carry ~3 significant digits, so a
/// step of [`AUTO_RELATIVE_CHANGE`] is rounded away; the check is then coarser (curvature shows).
pub const AUTO_RELATIVE_CHANGE_HALF: f64 = 1e-2;

/// For each candidate, steps the adapter of the scorer's first checkpoint by `−lr·Γ` (the Adam
/// update direction from that checkpoint's moments), measures the validation loss, and restores
/// the weights. Reports predicted vs actual changes and their Pearson correlation.
///
/// `lr: None` picks the step so that the median |predicted change| is
/// [`AUTO_RELATIVE_CHANGE`] of the validation loss ([`AUTO_RELATIVE_CHANGE_HALF`] on a bf16 or f16
/// target). A fixed step that suits one model is far
/// too large or too small for another: Γ has Adam's scale (entries of order 1), so the change
/// per unit step grows with the number of adapted parameters and the model's sharpness.
pub fn verify(
    scorer: &mut InfluenceScorer,
    val: &[ChatExample],
    candidates: &[ChatExample],
    lr: Option<f64>,
) -> Result<VerifyReport> {
    if let Some(lr) = lr
        && !(lr.is_finite() && lr > 0.0)
    {
        return Err(Error::Input(format!(
            "verify: the step size must be a positive number, got {lr}"
        )));
    }
    let (format, max_len, budget) = (
        scorer.format(),
        scorer.config().max_len,
        scorer.config().max_batch_tokens,
    );
    let val = encode_examples(scorer.tokenizer(), val, format, max_len)?;
    let cand = encode_examples(scorer.tokenizer(), candidates, format, max_len)?;
    let cand: Vec<TrainExample> = cand
        .into_iter()
        .filter(|e| e.loss_mask.iter().skip(1).any(|m| *m != 0))
        .collect();
    if cand.len() < 3 {
        return Err(Error::Input(
            "verify needs at least 3 candidates with loss tokens".into(),
        ));
    }
    scorer.select_checkpoint(0)?;
    let base = mean_loss(scorer, &val)?;
    let vidx: Vec<usize> = (0..val.len()).collect();
    let (vg, _) = gradients(scorer.model(), scorer.adapter(), &val, &vidx, budget)?;
    let val_grad = vg
        .f_mean_dim(Some([0i64].as_slice()), false, Kind::Float)
        .op("validation gradient")?;
    let cidx: Vec<usize> = (0..cand.len()).collect();
    let (cg, _) = gradients(scorer.model(), scorer.adapter(), &cand, &cidx, budget)?;
    let gamma = scorer.gamma(0, &cg)?;
    let dots = gamma
        .f_mv(&val_grad)
        .and_then(|d| d.f_to_kind(Kind::Double)?.f_to_device(tch::Device::Cpu))
        .op("prediction")?;
    let dots = Vec::<f64>::try_from(&dots).map_err(|e| Error::Torch {
        op: "reading predictions".into(),
        source: e,
    })?;
    if let Some(i) = dots.iter().position(|d| !d.is_finite()) {
        return Err(Error::Input(format!(
            "verify: candidate {}: the predicted change is not finite (NaN/inf gradients)",
            cand[i].id
        )));
    }
    let lr = match lr {
        Some(lr) => lr,
        None => auto_step(scorer.model().kind(), base, &dots)?,
    };
    let params: Vec<Tensor> = scorer
        .adapter()
        .named_parameters()
        .into_iter()
        .map(|(_, t)| t.shallow_clone())
        .collect();
    let saved: Vec<Tensor> = params
        .iter()
        .map(|p| p.f_detach().and_then(|d| d.f_mul_scalar(1.0)))
        .collect::<std::result::Result<_, _>>()
        .op("saving weights")?;
    let mut checks = Vec::with_capacity(cand.len());
    for (i, e) in cand.iter().enumerate() {
        let g = gamma.f_get(i as i64).op("update")?;
        apply_step(&params, &g, lr)?;
        // The adapter is restored before any error of the measurement is passed on.
        let after = mean_loss(scorer, &val);
        restore(&params, &saved)?;
        checks.push(StepCheck {
            id: e.id.clone(),
            predicted: -lr * dots[i],
            actual: after? - base,
        });
    }
    let (p, a): (Vec<f64>, Vec<f64>) = checks.iter().map(|c| (c.predicted, c.actual)).unzip();
    let mut ratios: Vec<f64> = checks
        .iter()
        .filter(|c| c.predicted != 0.0)
        .map(|c| c.actual / c.predicted)
        .collect();
    ratios.sort_by(f64::total_cmp);
    let linearity = ratios.get(ratios.len() / 2).copied().unwrap_or(f64::NAN);
    Ok(VerifyReport {
        lr,
        val_loss: base,
        pearson: pearson(&p, &a),
        linearity,
        checks,
    })
}

/// The step size that changes the validation loss by about [`AUTO_RELATIVE_CHANGE`] of itself
/// (more in half precision) for the median candidate.
fn auto_step(kind: Kind, base: f64, dots: &[f64]) -> Result<f64> {
    let mut mags: Vec<f64> = dots.iter().map(|d| d.abs()).collect();
    mags.sort_by(f64::total_cmp);
    let median = mags[mags.len() / 2];
    if median == 0.0 {
        return Err(Error::Input(
            "verify: the predicted changes are zero (a zero validation gradient?): pass a step size"
                .into(),
        ));
    }
    let rel = if kind == Kind::Float {
        AUTO_RELATIVE_CHANGE
    } else {
        AUTO_RELATIVE_CHANGE_HALF
    };
    Ok(rel * base.abs().max(1e-2) / median)
}

/// One SGD step `p -= lr · g` on the adapter's parameters (`g` flat, in their order).
fn apply_step(params: &[Tensor], g: &Tensor, lr: f64) -> Result<()> {
    let _ng = tch::no_grad_guard();
    let mut off = 0i64;
    for p in params {
        let n = p.numel() as i64;
        let step = g
            .f_narrow(0, off, n)
            .and_then(|s| s.f_view(p.size().as_slice()))
            .op("update")?;
        let mut q = p.shallow_clone();
        let _ = q
            .f_sub_(&step.f_mul_scalar(lr).op("update")?)
            .op("update")?;
        off += n;
    }
    Ok(())
}

/// Copies the saved weights back into the adapter's parameters.
fn restore(params: &[Tensor], saved: &[Tensor]) -> Result<()> {
    let _ng = tch::no_grad_guard();
    for (p, s) in params.iter().zip(saved) {
        let mut q = p.shallow_clone();
        q.f_copy_(s).op("restoring weights")?;
    }
    Ok(())
}
