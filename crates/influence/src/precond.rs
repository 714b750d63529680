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

    /// Γ for every row of `g` `[B, P]`.
    pub fn precondition(&self, g: &Tensor, mode: Precond) -> Result<Tensor> {
        let f = || -> std::result::Result<Tensor, tch::TchError> {
            let g = g.f_to_kind(Kind::Float)?;
            let m = self
                .m
                .f_unsqueeze(0)?
                .f_mul_scalar(self.beta1)?
                .f_add(&g.f_mul_scalar(1.0 - self.beta1)?)?;
            let v = self
                .v
                .f_unsqueeze(0)?
                .f_mul_scalar(self.beta2)?
                .f_add(&g.f_square()?.f_mul_scalar(1.0 - self.beta2)?)?;
            match mode {
                Precond::Released => m.f_div(&v.f_add_scalar(self.eps)?.f_sqrt()?),
                Precond::BiasCorrected => {
                    let t = (self.step + 1) as i32;
                    let m = m.f_div_scalar(1.0 - self.beta1.powi(t))?;
                    let v = v.f_div_scalar(1.0 - self.beta2.powi(t))?;
                    m.f_div(&v.f_sqrt()?.f_add_scalar(self.eps)?)
                }
            }
        };
        f().op("Adam preconditioning")
    }
}
