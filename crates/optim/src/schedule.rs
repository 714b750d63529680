//! Learning-rate schedules, as multipliers of the base learning rate.
//!
//! The formulas are those of transformers' `optimization.py`
//! (`get_constant_schedule_with_warmup`, `get_linear_schedule_with_warmup`,
//! `get_cosine_schedule_with_warmup`, transformers 5.24), evaluated in `f64` in the same order of
//! operations so the multipliers are bit-identical to Python's.
//!
//! **Step convention** (that of `torch.optim.lr_scheduler.LambdaLR` stepped after each optimizer
//! step, as the transformers `Trainer` does): the optimizer step that becomes step `t` (1-based,
//! the `step` saved in the state file) uses `base_lr * multiplier(t - 1)`. So with warm-up the very
//! first update has learning rate 0, exactly as in transformers.

use std::f64::consts::PI;

/// A learning-rate schedule: [`LrSchedule::multiplier`] maps a scheduler step to a factor of the
/// base learning rate.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub enum LrSchedule {
    /// Linear warm-up from 0 over `warmup_steps`, then 1 (`get_constant_schedule_with_warmup`;
    /// with `warmup_steps = 0` it is `get_constant_schedule`).
    Constant {
        /// Warm-up steps.
        warmup_steps: u64,
    },
    /// Linear warm-up, then linear decay to 0 at `total_steps` (`get_linear_schedule_with_warmup`).
    Linear {
        /// Warm-up steps.
        warmup_steps: u64,
        /// Total training steps; the multiplier is 0 from here on.
        total_steps: u64,
    },
    /// Linear warm-up, then cosine decay (`get_cosine_schedule_with_warmup`, default
    /// `num_cycles = 0.5`: from 1 down to 0 at `total_steps`).
    Cosine {
        /// Warm-up steps.
        warmup_steps: u64,
        /// Total training steps.
        total_steps: u64,
        /// Number of cosine waves (transformers' `num_cycles`; 0.5 is a half wave, 1 → 0).
        num_cycles: f64,
    },
}

impl LrSchedule {
    /// A constant schedule without warm-up (multiplier 1 everywhere).
    pub fn constant() -> Self {
        Self::Constant { warmup_steps: 0 }
    }

    /// transformers' `get_linear_schedule_with_warmup(num_warmup_steps, num_training_steps)`.
    pub fn linear(warmup_steps: u64, total_steps: u64) -> Self {
        Self::Linear {
            warmup_steps,
            total_steps,
        }
    }

    /// transformers' `get_cosine_schedule_with_warmup(num_warmup_steps, num_training_steps)`
    /// with its default half cycle.
    pub fn cosine(warmup_steps: u64, total_steps: u64) -> Self {
        Self::Cosine {
            warmup_steps,
            total_steps,
            num_cycles: 0.5,
        }
    }

    /// The factor of the base learning rate at scheduler step `step` (transformers'
    /// `lr_lambda(current_step)`); see the module docs for which optimizer step uses it.
    pub fn multiplier(&self, step: u64) -> f64 {
        match *self {
            Self::Constant { warmup_steps } => {
                if step < warmup_steps {
                    // float(current_step) / float(max(1.0, num_warmup_steps))
                    step as f64 / (warmup_steps as f64).max(1.0)
                } else {
                    1.0
                }
            }
            Self::Linear {
                warmup_steps,
                total_steps,
            } => {
                if step < warmup_steps {
                    return warmup(step, warmup_steps);
                }
                // max(0.0, float(T - s) / float(max(1, T - W))), in Python's unbounded ints.
                let num = (total_steps as i128 - step as i128) as f64;
                let den = (total_steps as i128 - warmup_steps as i128).max(1) as f64;
                (num / den).max(0.0)
            }
            Self::Cosine {
                warmup_steps,
                total_steps,
                num_cycles,
            } => {
                if step < warmup_steps {
                    return warmup(step, warmup_steps);
                }
                let den = (total_steps as i128 - warmup_steps as i128).max(1) as f64;
                let progress = (step - warmup_steps) as f64 / den;
                // max(0.0, 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress)))
                (0.5 * (1.0 + (PI * num_cycles * 2.0 * progress).cos())).max(0.0)
            }
        }
    }

    /// `base_lr * multiplier(step)`: the learning rate LambdaLR sets at scheduler step `step`.
    pub fn lr(&self, base_lr: f64, step: u64) -> f64 {
        base_lr * self.multiplier(step)
    }
}

/// float(current_step) / float(max(1, num_warmup_steps)), for current_step < num_warmup_steps.
fn warmup(step: u64, warmup_steps: u64) -> f64 {
    step as f64 / warmup_steps.max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn hand_computed_values() {
        let lin = LrSchedule::linear(2, 10);
        let got: Vec<f64> = (0..12).map(|s| lin.multiplier(s)).collect();
        let want = [
            0.0, 0.5, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0, 0.0,
        ];
        assert_eq!(got, want);

        let cos = LrSchedule::cosine(2, 10);
        assert_eq!(cos.multiplier(0), 0.0);
        assert_eq!(cos.multiplier(1), 0.5);
        assert_eq!(cos.multiplier(2), 1.0);
        assert!((cos.multiplier(6) - 0.5).abs() < 1e-15);
        assert!(cos.multiplier(10) < 1e-15);
        assert_eq!(cos.multiplier(20), 0.5 * (1.0 + (PI * 2.25).cos()));

        let c = LrSchedule::Constant { warmup_steps: 4 };
        assert_eq!(c.multiplier(1), 0.25);
        assert_eq!(c.multiplier(4), 1.0);
        assert_eq!(LrSchedule::constant().multiplier(0), 1.0);
        assert_eq!(LrSchedule::linear(0, 0).multiplier(0), 0.0);
        assert_eq!(lin.lr(2e-4, 1), 1e-4);
    }

    proptest! {
        #[test]
        fn warmup_increases_then_decay_decreases(w in 0u64..50, extra in 0u64..200) {
            let total = w + extra;
            for sched in [LrSchedule::linear(w, total), LrSchedule::cosine(w, total)] {
                for s in 0..total {
                    let (a, b) = (sched.multiplier(s), sched.multiplier(s + 1));
                    prop_assert!((0.0..=1.0).contains(&a), "{sched:?} at {s}: {a}");
                    if s + 1 < w {
                        prop_assert!(b > a, "{sched:?} not increasing at {s}");
                    } else if s >= w {
                        prop_assert!(b <= a, "{sched:?} not decreasing at {s}");
                    }
                }
                if total > w {
                    prop_assert_eq!(sched.multiplier(w), 1.0);
                    prop_assert!(sched.multiplier(total) < 1e-15);
                }
            }
        }

        #[test]
        fn constant_is_one_after_warmup(w in 0u64..50, s in 0u64..1000) {
            let m = LrSchedule::Constant { warmup_steps: w }.multiplier(s);
            if s >= w { prop_assert_eq!(m, 1.0); } else { prop_assert!(m < 1.0); }
        }
    }
}
