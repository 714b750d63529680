//! Gradient-norm clipping, as `torch.nn.utils.clip_grad_norm_` with `norm_type=2`.

use std::borrow::Borrow;

use tch::Tensor;

use crate::error::{Error, Result, torch};

/// The gradients of `params` that are defined (torch skips `p.grad is None`), in order.
fn defined_grads<T: Borrow<Tensor>>(params: &[T]) -> Result<Vec<Tensor>> {
    let mut grads = Vec::with_capacity(params.len());
    for p in params {
        let g = p.borrow().f_grad().map_err(torch("grad"))?;
        if g.defined() {
            grads.push(g);
        }
    }
    Ok(grads)
}

/// The total L2 norm as a 0-dim tensor, computed as torch's `_get_total_norm` does: the norm of
/// each gradient, stacked on the first gradient's device, then the norm of that vector.
fn total_norm_tensor(grads: &[Tensor]) -> Result<Option<Tensor>> {
    let Some(first) = grads.first() else {
        return Ok(None);
    };
    let device = first.device();
    let norms = grads
        .iter()
        .map(|g| g.f_norm()?.f_to_device(device))
        .collect::<Result<Vec<_>, _>>()
        .map_err(torch("grad norm"))?;
    let total = Tensor::f_stack(&norms, 0)
        .and_then(|s| s.f_norm())
        .map_err(torch("grad norm"))?;
    Ok(Some(total))
}

/// The total L2 norm of the gradients of `params` (those whose gradient is defined), viewed as one
/// vector, as `torch.nn.utils.get_total_norm`. Returns 0 when no gradient is defined.
///
/// The value is the `f32` (for `f32` gradients) norm torch computes, widened to `f64`; it may be
/// NaN or infinite.
pub fn grad_norm<T: Borrow<Tensor>>(params: &[T]) -> Result<f64> {
    let grads = defined_grads(params)?;
    match total_norm_tensor(&grads)? {
        None => Ok(0.0),
        Some(t) => t.f_double_value(&[]).map_err(torch("grad norm")),
    }
}

/// Clips the gradients of `params` in place to total L2 norm `max_norm`, exactly as
/// `torch.nn.utils.clip_grad_norm_(params, max_norm)` on the CPU: every defined gradient is
/// multiplied by `min(max_norm / (total + 1e-6), 1)` (computed in the gradients' dtype, in the same
/// order of operations as torch, so results are bit-identical). Returns the total norm *before*
/// clipping.
///
/// **Non-finite norms.** Unlike torch's default (`error_if_nonfinite=False`, which scales every
/// gradient by NaN), a NaN or infinite total norm returns [`Error::NonFiniteGradNorm`] and leaves
/// the gradients untouched, so a trainer can skip the step or stop with a clear message.
pub fn clip_grad_norm<T: Borrow<Tensor>>(params: &[T], max_norm: f64) -> Result<f64> {
    let _guard = tch::no_grad_guard();
    let grads = defined_grads(params)?;
    let Some(total) = total_norm_tensor(&grads)? else {
        return Ok(0.0);
    };
    let norm = total.f_double_value(&[]).map_err(torch("grad norm"))?;
    if !norm.is_finite() {
        return Err(Error::NonFiniteGradNorm { norm });
    }
    // clip_coef = max_norm / (total_norm + 1e-6): Python's float / Tensor is
    // `Tensor.__rtruediv__`, i.e. `reciprocal() * max_norm`; then clamp(max=1.0).
    let coef = total
        .f_add_scalar(1e-6)
        .and_then(|t| t.f_reciprocal())
        .and_then(|t| t.f_mul_scalar(max_norm))
        .and_then(|t| t.f_clamp_max(1.0))
        .map_err(torch("clip coefficient"))?;
    for mut g in grads {
        let c = coef.f_to_device(g.device()).map_err(torch("clip"))?;
        let _: Tensor = g.f_mul_(&c).map_err(torch("clip"))?;
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tch::Kind;

    fn param_with_grad(values: &[f32]) -> Tensor {
        let p = Tensor::zeros([values.len() as i64], (Kind::Float, tch::Device::Cpu))
            .set_requires_grad(true);
        let target = Tensor::from_slice(values);
        // d/dp sum(p * target) = target
        (&p * &target).sum(Kind::Float).backward();
        p
    }

    #[test]
    fn norm_and_clip_hand_computed() -> Result<()> {
        let a = param_with_grad(&[3.0, 0.0]);
        let b = param_with_grad(&[0.0, 4.0]);
        let no_grad = Tensor::zeros([3], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        let params = [a, b, no_grad];
        assert_eq!(grad_norm(&params)?, 5.0);
        let n = clip_grad_norm(&params, 1.0)?;
        assert_eq!(n, 5.0);
        let after = grad_norm(&params)?;
        assert!((after - 1.0).abs() < 1e-6, "{after}");
        let g: Vec<f32> = Vec::try_from(params[0].grad()).map_err(torch("test"))?;
        assert!((g[0] - 0.6).abs() < 1e-6);
        Ok(())
    }

    #[test]
    fn no_gradients_means_zero_norm() -> Result<()> {
        let p = Tensor::zeros([2], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        assert_eq!(clip_grad_norm(&[p], 1.0)?, 0.0);
        assert_eq!(grad_norm::<Tensor>(&[])?, 0.0);
        Ok(())
    }

    #[test]
    fn non_finite_norm_is_an_error_and_leaves_grads() {
        let p = param_with_grad(&[f32::NAN, 1.0]);
        let err = clip_grad_norm(std::slice::from_ref(&p), 1.0).expect_err("NaN norm");
        assert!(matches!(err, Error::NonFiniteGradNorm { norm } if norm.is_nan()));
        assert_eq!(p.grad().double_value(&[1]), 1.0);
        let q = param_with_grad(&[f32::INFINITY, 1.0]);
        assert!(matches!(
            clip_grad_norm(&[q], 1.0),
            Err(Error::NonFiniteGradNorm { norm }) if norm == f64::INFINITY
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Below the threshold, clipping multiplies by exactly 1: gradients are unchanged bit for bit.
        #[test]
        fn clip_is_identity_below_max_norm(
            values in proptest::collection::vec(-10.0f32..10.0, 1..20),
            slack in 1.0f64..100.0,
        ) {
            let p = param_with_grad(&values);
            let before: Vec<f32> = Vec::try_from(p.grad()).expect("f32 grad");
            let norm = grad_norm(std::slice::from_ref(&p)).expect("norm");
            let returned = clip_grad_norm(std::slice::from_ref(&p), norm + slack).expect("clip");
            prop_assert_eq!(returned, norm);
            let after: Vec<f32> = Vec::try_from(p.grad()).expect("f32 grad");
            prop_assert_eq!(before, after);
        }

        /// Above it, the clipped norm is max_norm (up to the 1e-6 guard and f32 rounding).
        #[test]
        fn clip_reaches_max_norm(
            values in proptest::collection::vec(1.0f32..10.0, 1..20),
            frac in 0.01f64..0.9,
        ) {
            let p = param_with_grad(&values);
            let norm = grad_norm(std::slice::from_ref(&p)).expect("norm");
            let max_norm = norm * frac;
            clip_grad_norm(std::slice::from_ref(&p), max_norm).expect("clip");
            let after = grad_norm(std::slice::from_ref(&p)).expect("norm");
            prop_assert!((after - max_norm).abs() <= 1e-5 * max_norm, "{} vs {}", after, max_norm);
        }
    }
}
