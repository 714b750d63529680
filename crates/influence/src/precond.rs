//! Adam preconditioning of training-side gradients with a warm-up checkpoint's moments.

use std::path::Path;

use optimsyn_optim::OptimizerState;
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result, TorchContext};

/// How a sample's gradient `g` becomes its Adam update direction Γ, with `m' = β1·m + (1−β1)·g`
/// and `v' = β2·v + (1−β2)·g²` from the checkpoint's moments `m`, `v`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Precond {
    /// `Γ = m' / √(v' + ε)`: no bias correction, ε inside the root, as LESS's and OptimSyn's
    /// released code compute it.
    #[default]
    Released,
    /// `Γ = m̂ / (√v̂ + ε)` with `m̂ = m'/(1−β1^(t+1))`, `v̂ = v'/(1−β2^(t+1))`: the LESS paper's formula.
    BiasCorrected,
}

/// Elements per preconditioning chunk (16 MiB of f32).
const CHUNK_ELEMENTS: i64 = 1 << 22;

/// One checkpoint's Adam moments, flattened in the adapter's parameter order.
#[derive(Debug)]
pub struct AdamMoments {
    m: Tensor,
    v: Tensor,
    beta1: f64,
    beta2: f64,
    eps: f64,
    step: u64,
}

impl AdamMoments {
    /// Reads `optimizer.safetensors` and concatenates the moments of `keys` (in that order).
    /// A key without moments, or moments of another shape, is an error naming it.
    pub fn load(path: &Path, keys: &[(String, Vec<i64>)], device: Device) -> Result<Self> {
        let state = OptimizerState::load(path)?;
        let mut ms = Vec::with_capacity(keys.len());
        let mut vs = Vec::with_capacity(keys.len());
        for (k, shape) in keys {
            let (Some(m), Some(v)) = (state.exp_avg(k), state.exp_avg_sq(k)) else {
                return Err(Error::Checkpoint {
                    path: path.to_path_buf(),
                    message: format!(
                        "no Adam moments for parameter `{k}` (an optimizer state of another adapter?)"
                    ),
                });
            };
            if m.size() != *shape || v.size() != *shape {
                return Err(Error::Checkpoint {
                    path: path.to_path_buf(),
                    message: format!(
                        "moments of `{k}` have shape {:?}, the parameter {shape:?}",
                        m.size()
                    ),
                });
            }
            ms.push(m.f_reshape([-1]).op("moments")?);
            vs.push(v.f_reshape([-1]).op("moments")?);
        }
        let cat = |t: &[Tensor]| {
            Tensor::f_cat(t, 0)
                .and_then(|t| t.f_to_kind(Kind::Float)?.f_to_device(device))
                .op("moments")
        };
        Ok(AdamMoments {
            m: cat(&ms)?,
            v: cat(&vs)?,
            beta1: state.beta1,
            beta2: state.beta2,
            eps: state.eps,
            step: state.step,
        })
    }

    /// Number of parameters covered.
    pub fn len(&self) -> usize {
        self.m.numel()
    }

    /// Whether no parameter is covered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Γ for every row of `g` `[B, P]`, in a new tensor.
    pub fn precondition(&self, g: &Tensor, mode: Precond) -> Result<Tensor> {
        let copy = || -> std::result::Result<Tensor, tch::TchError> {
            let src = g.f_to_kind(Kind::Float)?;
            let mut out = Tensor::f_empty_like(&src)?;
            out.f_copy_(&src)?;
            Ok(out)
        };
        let mut out = copy().op("Adam preconditioning")?;
        self.precondition_(&mut out, mode)?;
        Ok(out)
    }

    /// Replaces every row of the f32 tensor `g` `[B, P]` by its Γ, in place (the same values as
    /// [`AdamMoments::precondition`]).
    pub fn precondition_(&self, g: &mut Tensor, mode: Precond) -> Result<()> {
        self.precondition_chunked(g, mode, CHUNK_ELEMENTS)
    }

    fn precondition_chunked(&self, g: &mut Tensor, mode: Precond, elements: i64) -> Result<()> {
        let size = g.size();
        if g.kind() != Kind::Float || size.len() != 2 || size[1] != self.len() as i64 {
            return Err(Error::Input(format!(
                "preconditioning needs f32 gradients [B, {}], got {:?} {size:?}",
                self.len(),
                g.kind()
            )));
        }
        // Column chunks keep every temporary small: on the whole [B, P] batch each would be a
        // fresh multi-hundred-MB mapping, and their page faults cost more than the arithmetic.
        let chunk = (elements / size[0].max(1)).max(1);
        let (b1, b2, eps) = (self.beta1, self.beta2, self.eps);
        let f = || -> std::result::Result<(), tch::TchError> {
            for start in (0..size[1]).step_by(chunk as usize) {
                let n = chunk.min(size[1] - start);
                let mut gc = g.f_narrow(1, start, n)?;
                let (m, v) = (self.m.f_narrow(0, start, n)?, self.v.f_narrow(0, start, n)?);
                // v' = β2·v + (1−β2)·g², then m' = β1·m + (1−β1)·g written over g.
                let mut den = gc.f_square()?.f_mul_scalar(1.0 - b2)?;
                let _ = den.f_add_(&v.f_mul_scalar(b2)?)?;
                let _ = gc.f_mul_scalar_(1.0 - b1)?;
                let _ = gc.f_add_(&m.f_mul_scalar(b1)?)?;
                match mode {
                    Precond::Released => {
                        let _ = den.f_add_scalar_(eps)?.f_sqrt_()?;
                    }
                    Precond::BiasCorrected => {
                        let t = (self.step + 1) as i32;
                        let _ = gc.f_div_scalar_(1.0 - b1.powi(t))?;
                        let _ = den
                            .f_div_scalar_(1.0 - b2.powi(t))?
                            .f_sqrt_()?
                            .f_add_scalar_(eps)?;
                    }
                }
                let _ = gc.f_div_(&den)?;
            }
            Ok(())
        };
        f().op("Adam preconditioning")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_in_place_gamma_equals_the_formula() {
        let dev = Device::Cpu;
        let p = 37;
        let m = AdamMoments {
            m: Tensor::randn([p], (Kind::Float, dev)) * 1e-3,
            v: Tensor::rand([p], (Kind::Float, dev)) * 1e-6,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            step: 4,
        };
        let g = Tensor::randn([3, p], (Kind::Float, dev)) * 1e-2;
        let m1 = m.m.unsqueeze(0) * 0.9 + &g * 0.1;
        let v1 = m.v.unsqueeze(0) * 0.999 + g.square() * (1.0 - 0.999);
        let released = &m1 / (&v1 + 1e-8).sqrt();
        let (c1, c2) = (1.0 - 0.9f64.powi(5), 1.0 - 0.999f64.powi(5));
        let corrected = (&m1 / c1) / ((&v1 / c2).sqrt() + 1e-8);
        for (mode, want) in [
            (Precond::Released, released),
            (Precond::BiasCorrected, corrected),
        ] {
            // 3 rows × 5 columns per chunk: 8 chunks, the last one partial.
            for elements in [15, 1 << 22] {
                let mut got = g.copy();
                m.precondition_chunked(&mut got, mode, elements).unwrap();
                let err = (&got - &want).abs().max().double_value(&[]);
                let scale = want.abs().max().double_value(&[]);
                assert!(err <= 1e-6 * scale, "{mode:?} chunk {elements}: {err}");
            }
            let fresh = m.precondition(&g, mode).unwrap();
            assert!(fresh.allclose(&want, 1e-6, 0.0, false), "{mode:?}");
        }
    }
}
