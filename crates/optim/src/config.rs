//! AdamW hyperparameters and their range checks.

use crate::error::{Error, Result};

/// AdamW hyperparameters. Defaults are `torch.optim.AdamW`'s: lr 1e-3, betas (0.9, 0.999),
/// eps 1e-8, weight decay 1e-2.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    /// Learning rate (the base lr; a schedule sets the current one with
    /// [`AdamW::set_lr`](crate::AdamW::set_lr)).
    pub lr: f64,
    /// Decay of the first moment.
    pub beta1: f64,
    /// Decay of the second moment.
    pub beta2: f64,
    /// Added to `sqrt(v̂)` in the denominator.
    pub eps: f64,
    /// Decoupled weight decay of the default parameter group.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
        }
    }
}

impl AdamWConfig {
    /// The range checks of `torch.optim.AdamW`'s constructor (plus finiteness).
    pub fn validate(&self) -> Result<()> {
        check_lr(self.lr)?;
        let bad = |name, value, reason| {
            Err(Error::InvalidHyperparameter {
                name,
                value,
                reason,
            })
        };
        if !(0.0..1.0).contains(&self.beta1) {
            return bad("beta1", self.beta1, "must be in [0, 1)");
        }
        if !(0.0..1.0).contains(&self.beta2) {
            return bad("beta2", self.beta2, "must be in [0, 1)");
        }
        if !(self.eps >= 0.0 && self.eps.is_finite()) {
            return bad("eps", self.eps, "must be finite and >= 0");
        }
        check_weight_decay(self.weight_decay)
    }
}

pub(crate) fn check_lr(lr: f64) -> Result<()> {
    if lr >= 0.0 && lr.is_finite() {
        Ok(())
    } else {
        Err(Error::InvalidHyperparameter {
            name: "lr",
            value: lr,
            reason: "must be finite and >= 0",
        })
    }
}

pub(crate) fn check_weight_decay(wd: f64) -> Result<()> {
    if wd >= 0.0 && wd.is_finite() {
        Ok(())
    } else {
        Err(Error::InvalidHyperparameter {
            name: "weight_decay",
            value: wd,
            reason: "must be finite and >= 0",
        })
    }
}
