//! AdamW with named parameters, parameter groups and exportable moments.

use std::collections::HashMap;
use std::path::Path;

use tch::{Kind, TchError, Tensor};

use crate::config::{AdamWConfig, check_lr, check_weight_decay};
use crate::error::{Error, Result, torch};
use crate::schedule::LrSchedule;
use crate::state::OptimizerState;

/// A parameter group: its own decoupled weight decay and a multiplier of the optimizer's lr.
///
/// torch gives each group an lr of its own; here a group's lr is `lr_scale × AdamW::lr()`. For
/// bit-identical parity with torch use scales that are powers of two (or 1), so that
/// `(base × schedule) × scale` and torch's `(base × scale) × schedule` round alike.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamGroup {
    /// A name for messages (e.g. `decay`, `no_decay`).
    pub name: String,
    /// Decoupled weight decay (0 for a no-decay group).
    pub weight_decay: f64,
    /// Multiplier of the optimizer's learning rate.
    pub lr_scale: f64,
}

impl ParamGroup {
    /// A group with this weight decay and lr scale.
    pub fn new(name: impl Into<String>, weight_decay: f64, lr_scale: f64) -> Self {
        Self {
            name: name.into(),
            weight_decay,
            lr_scale,
        }
    }

    /// A group without weight decay and with the optimizer's lr (biases, norms, embeddings).
    pub fn no_decay(name: impl Into<String>) -> Self {
        Self::new(name, 0.0, 1.0)
    }
}

/// Identifies a parameter group of an [`AdamW`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GroupId(usize);

impl GroupId {
    /// The default group, made by [`AdamW::new`] with the config's weight decay and lr scale 1.
    pub const DEFAULT: GroupId = GroupId(0);

    /// The group's index in [`AdamW::groups`].
    pub fn index(self) -> usize {
        self.0
    }
}

/// One registered parameter and its Adam state.
#[derive(Debug)]
struct Slot {
    key: String,
    param: Tensor,
    group: usize,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: u64,
}

/// The per-step scalars of one parameter's update.
#[derive(Clone, Copy, Debug)]
struct Hyper {
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
}

/// One AdamW update of one tensor, step `step` (1-based), exactly as `_single_tensor_adam` of
/// `torch.optim.AdamW` (torch 2.13, `amsgrad=False`, `maximize=False`, not capturable), which is
/// what torch runs for CPU parameters by default. The Python scalars (`lr`, bias corrections,
/// step size) are computed in `f64` as in Python; every tensor op is the same ATen op with the same
/// scalar, so results are bit-identical. Where torch passes a `value=` to `addcmul_`/`addcdiv_`
/// (tch has no such argument), the scalar product is formed first, which is the same rounding:
/// ATen evaluates `self + value * t1 * t2` and `self + value * t1 / t2` left to right.
fn adamw_update(
    param: &mut Tensor,
    grad: &Tensor,
    exp_avg: &mut Tensor,
    exp_avg_sq: &mut Tensor,
    step: u64,
    h: Hyper,
) -> Result<(), TchError> {
    if h.weight_decay != 0.0 {
        // param.mul_(1 - lr * weight_decay)
        let _: Tensor = param.f_mul_scalar_(1.0 - h.lr * h.weight_decay)?;
    }
    // exp_avg.lerp_(grad, 1 - beta1)
    let _: Tensor = exp_avg.f_lerp_(grad, 1.0 - h.beta1)?;
    // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    let _: Tensor = exp_avg_sq.f_mul_scalar_(h.beta2)?;
    let _: Tensor = exp_avg_sq.f_addcmul_(&grad.f_mul_scalar(1.0 - h.beta2)?, grad)?;
    let step = step as f64;
    let bias_correction1 = 1.0 - h.beta1.powf(step);
    let bias_correction2 = 1.0 - h.beta2.powf(step);
    let step_size = h.lr / bias_correction1;
    let bias_correction2_sqrt = bias_correction2.powf(0.5);
    // denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    let mut denom = exp_avg_sq.f_sqrt()?.f_div_scalar(bias_correction2_sqrt)?;
    let _: Tensor = denom.f_add_scalar_(h.eps)?;
    // param.addcdiv_(exp_avg, denom, value=-step_size)
    let _: Tensor = param.f_addcdiv_(&exp_avg.f_mul_scalar(-step_size)?, &denom)?;
    Ok(())
}

/// AdamW (decoupled weight decay, bias correction) over named parameters, with state that can be
/// saved, loaded, read and built from tensors.
///
/// Parameters are registered under the key their file uses (a PEFT adapter key, a model weight
/// name); that key names their moments in `optimizer.safetensors`. Each belongs to a
/// [`ParamGroup`]. [`AdamW::step`] updates every parameter whose gradient is defined, as
/// `torch.optim.AdamW.step()` does (parameters whose `.grad` is undefined are skipped and keep
/// their step count).
///
/// **Numerics.** In `f32` on the CPU the updates are bit-identical to `torch.optim.AdamW` with its
/// defaults (`foreach=None`, which is the for-loop implementation for CPU tensors); on CUDA
/// torch's default is the `foreach` kernels, which compute the same formula but may round
/// differently in the last bit. Moments are kept in the parameter's dtype, like torch.
#[derive(Debug)]
pub struct AdamW {
    config: AdamWConfig,
    step: u64,
    groups: Vec<ParamGroup>,
    slots: Vec<Slot>,
    index: HashMap<String, usize>,
}

impl AdamW {
    /// An optimizer with no parameters yet and one group, [`GroupId::DEFAULT`], with
    /// `config.weight_decay` and lr scale 1.
    pub fn new(config: AdamWConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            config,
            step: 0,
            groups: vec![ParamGroup::new("default", config.weight_decay, 1.0)],
            slots: Vec::new(),
            index: HashMap::new(),
        })
    }

    /// Adds a parameter group and returns its id.
    pub fn add_group(&mut self, group: ParamGroup) -> Result<GroupId> {
        check_weight_decay(group.weight_decay)?;
        if !(group.lr_scale >= 0.0 && group.lr_scale.is_finite()) {
            return Err(Error::InvalidHyperparameter {
                name: "lr_scale",
                value: group.lr_scale,
                reason: "must be finite and >= 0",
            });
        }
        self.groups.push(group);
        Ok(GroupId(self.groups.len() - 1))
    }

    /// Registers `param` under `key` in the default group.
    pub fn add(&mut self, key: impl Into<String>, param: &Tensor) -> Result<()> {
        self.add_to(GroupId::DEFAULT, key, param)
    }

    /// Registers `param` under `key` in `group`. The optimizer keeps a shallow clone (same
    /// storage: updates are visible through the caller's tensor) and zero moments of the same
    /// dtype and device. The parameter must require grad and be `f32`, `f16` or `bf16`.
    pub fn add_to(&mut self, group: GroupId, key: impl Into<String>, param: &Tensor) -> Result<()> {
        let key = key.into();
        let invalid = |reason: String| Error::InvalidParameter {
            key: key.clone(),
            reason,
        };
        if group.0 >= self.groups.len() {
            return Err(invalid(format!("unknown parameter group {}", group.0)));
        }
        if self.index.contains_key(&key) {
            return Err(Error::DuplicateKey { key });
        }
        if !param.defined() {
            return Err(invalid("undefined tensor".to_owned()));
        }
        if !param.requires_grad() {
            return Err(invalid("does not require grad".to_owned()));
        }
        let kind = param.kind();
        if !matches!(kind, Kind::Float | Kind::Half | Kind::BFloat16) {
            return Err(invalid(format!(
                "dtype {kind:?} (f32, f16 or bf16 expected: moments are saved as f32)"
            )));
        }
        let exp_avg = param.f_zeros_like().map_err(torch(&key))?;
        let exp_avg_sq = param.f_zeros_like().map_err(torch(&key))?;
        self.index.insert(key.clone(), self.slots.len());
        self.slots.push(Slot {
            key,
            param: param.shallow_clone(),
            group: group.0,
            exp_avg,
            exp_avg_sq,
            step: 0,
        });
        Ok(())
    }

    /// The hyperparameters (`lr` is the current learning rate).
    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// The current learning rate (groups multiply it by their `lr_scale`).
    pub fn lr(&self) -> f64 {
        self.config.lr
    }

    /// Sets the learning rate for the next steps (checked by [`AdamW::step`]).
    pub fn set_lr(&mut self, lr: f64) {
        self.config.lr = lr;
    }

    /// Sets the learning rate of the coming step from a schedule, as LambdaLR stepped once per
    /// optimizer step does: `base_lr * schedule.multiplier(self.step_count())`. Returns it.
    pub fn set_scheduled_lr(&mut self, schedule: &LrSchedule, base_lr: f64) -> f64 {
        let lr = schedule.lr(base_lr, self.step);
        self.config.lr = lr;
        lr
    }

    /// Steps taken ([`AdamW::step`] calls that succeeded).
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// The parameter groups, indexed by [`GroupId::index`].
    pub fn groups(&self) -> &[ParamGroup] {
        &self.groups
    }

    /// The group of parameter `key`.
    pub fn group_of(&self, key: &str) -> Option<GroupId> {
        self.slot(key).map(|s| GroupId(s.group))
    }

    /// Registered keys, in registration order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.slots.iter().map(|s| s.key.as_str())
    }

    /// Registered `(key, parameter)` pairs, in registration order.
    pub fn params(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.slots.iter().map(|s| (s.key.as_str(), &s.param))
    }

    /// Number of registered parameters.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether no parameter is registered.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    fn slot(&self, key: &str) -> Option<&Slot> {
        self.index.get(key).map(|&i| &self.slots[i])
    }

    /// The live first moment `m` of parameter `key` (parameter dtype and device).
    pub fn exp_avg(&self, key: &str) -> Option<&Tensor> {
        self.slot(key).map(|s| &s.exp_avg)
    }

    /// The live second moment `v` of parameter `key` (parameter dtype and device).
    pub fn exp_avg_sq(&self, key: &str) -> Option<&Tensor> {
        self.slot(key).map(|s| &s.exp_avg_sq)
    }

    /// Steps parameter `key` has taken (differs from [`AdamW::step_count`] only if its gradient
    /// was undefined at some step).
    pub fn param_step(&self, key: &str) -> Option<u64> {
        self.slot(key).map(|s| s.step)
    }

    /// One AdamW step (under `no_grad`) for every parameter with a defined gradient, with the
    /// current learning rate times each group's `lr_scale`. For each parameter, in torch's order:
    /// `p *= 1 - lr·wd` (when `wd ≠ 0`), `m = lerp(m, g, 1 - β1)`, `v = β2·v + (1 - β2)·g²`,
    /// `p -= lr / (1 - β1ᵗ) · m / (sqrt(v) / sqrt(1 - β2ᵗ) + eps)`.
    ///
    /// A libtorch error (e.g. a gradient on another device) stops the step part-way and leaves
    /// the parameters it had reached updated.
    pub fn step(&mut self) -> Result<()> {
        check_lr(self.config.lr)?;
        let _guard = tch::no_grad_guard();
        let AdamWConfig {
            lr,
            beta1,
            beta2,
            eps,
            ..
        } = self.config;
        for slot in &mut self.slots {
            let grad = slot.param.f_grad().map_err(torch(&slot.key))?;
            if !grad.defined() {
                continue;
            }
            let group = &self.groups[slot.group];
            let h = Hyper {
                lr: lr * group.lr_scale,
                beta1,
                beta2,
                eps,
                weight_decay: group.weight_decay,
            };
            adamw_update(
                &mut slot.param,
                &grad,
                &mut slot.exp_avg,
                &mut slot.exp_avg_sq,
                slot.step + 1,
                h,
            )
            .map_err(torch(&slot.key))?;
            slot.step += 1;
        }
        self.step += 1;
        Ok(())
    }

    /// Zeroes the gradients of all registered parameters in place (tch's `zero_grad`: detach and
    /// fill with 0). Unlike torch's default `set_to_none=True`, a zeroed gradient stays defined,
    /// so a parameter that received a gradient once takes part in every later step (with a zero
    /// gradient if nothing reached it). When every parameter gets a gradient each step, as in
    /// LoRA and full fine-tuning, the two are the same.
    pub fn zero_grad(&mut self) {
        for slot in &mut self.slots {
            slot.param.zero_grad();
        }
    }

    /// The total L2 norm of the registered parameters' gradients (see [`crate::grad_norm`]).
    pub fn grad_norm(&self) -> Result<f64> {
        let params: Vec<&Tensor> = self.slots.iter().map(|s| &s.param).collect();
        crate::clip::grad_norm(&params)
    }

    /// Clips the registered parameters' gradients to total norm `max_norm`, in registration
    /// order (see [`crate::clip_grad_norm`]); returns the norm before clipping.
    pub fn clip_grad_norm(&self, max_norm: f64) -> Result<f64> {
        let params: Vec<&Tensor> = self.slots.iter().map(|s| &s.param).collect();
        crate::clip::clip_grad_norm(&params, max_norm)
    }

    /// A copy of the state (moments as CPU `f32`, steps, hyperparameters, each parameter's weight
    /// decay and lr scale), ready to save or inspect.
    pub fn state(&self) -> Result<OptimizerState> {
        let mut state = OptimizerState::new(&self.config, self.step);
        state.weight_decay = Some(self.groups[0].weight_decay);
        for slot in &self.slots {
            let group = &self.groups[slot.group];
            let p = state.insert(slot.key.clone(), &slot.exp_avg, &slot.exp_avg_sq)?;
            p.step = slot.step;
            p.weight_decay = Some(group.weight_decay);
            p.lr_scale = Some(group.lr_scale);
        }
        Ok(state)
    }

    /// Restores `state` into the registered parameters: moments, steps, `lr`, `beta1`, `beta2`
    /// and `eps` (as torch's `load_state_dict` restores its groups' hyperparameters).
    ///
    /// Strict: every registered key must have moments and every key of the state must be
    /// registered, shapes must agree, and where the state records a parameter's weight decay or
    /// lr scale it must equal that of the group the parameter is registered in now. Everything is
    /// checked before anything changes: on error the optimizer is as it was.
    pub fn load_state(&mut self, state: &OptimizerState) -> Result<()> {
        let path = state.origin().to_owned();
        AdamWConfig {
            lr: state.lr,
            beta1: state.beta1,
            beta2: state.beta2,
            eps: state.eps,
            weight_decay: 0.0,
        }
        .validate()
        .map_err(|e| Error::Metadata {
            path: path.clone(),
            key: "hyperparameters".to_owned(),
            reason: e.to_string(),
        })?;
        for slot in &self.slots {
            let Some(p) = state.get(&slot.key) else {
                return Err(Error::MissingKey {
                    path,
                    key: slot.key.clone(),
                });
            };
            let (file, param) = (p.shape(), slot.param.size());
            if file != param || p.exp_avg_sq.size() != param {
                return Err(Error::ShapeMismatch {
                    path,
                    key: slot.key.clone(),
                    file,
                    param,
                });
            }
            let group = &self.groups[slot.group];
            for (name, recorded, ours) in [
                ("weight_decay", p.weight_decay, group.weight_decay),
                ("lr_scale", p.lr_scale, group.lr_scale),
            ] {
                if let Some(file) = recorded
                    && file != ours
                {
                    return Err(Error::GroupMismatch {
                        path,
                        key: slot.key.clone(),
                        name,
                        file,
                        group: ours,
                    });
                }
            }
        }
        let extra: Vec<&str> = state
            .keys()
            .filter(|k| !self.index.contains_key(*k))
            .collect();
        if let Some(first) = extra.first() {
            return Err(Error::ExtraKey {
                path,
                key: (*first).to_owned(),
                count: extra.len(),
            });
        }

        let _guard = tch::no_grad_guard();
        for slot in &mut self.slots {
            let p = state.get(&slot.key).expect("checked above");
            slot.exp_avg.f_copy_(&p.exp_avg).map_err(torch(&slot.key))?;
            slot.exp_avg_sq
                .f_copy_(&p.exp_avg_sq)
                .map_err(torch(&slot.key))?;
            slot.step = p.step;
        }
        self.step = state.step;
        self.config.lr = state.lr;
        self.config.beta1 = state.beta1;
        self.config.beta2 = state.beta2;
        self.config.eps = state.eps;
        Ok(())
    }

    /// Saves the state to `path` (normally `ADAPTER_DIR/optimizer.safetensors`), atomically.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        self.state()?.save(path)
    }

    /// Loads the state saved at `path` into the registered parameters
    /// ([`OptimizerState::load`] then [`AdamW::load_state`]).
    pub fn load(&mut self, path: impl AsRef<Path>) -> Result<()> {
        let state = OptimizerState::load(path)?;
        self.load_state(&state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn scalar_param(v: f32) -> Tensor {
        Tensor::from_slice(&[v]).set_requires_grad(true)
    }

    fn set_grad(p: &Tensor, g: &[f32]) {
        // d/dp sum(p * g) = g; accumulate into a zeroed grad.
        let mut p2 = p.shallow_clone();
        p2.zero_grad();
        (p * Tensor::from_slice(g).reshape(p.size()))
            .sum(Kind::Float)
            .backward();
    }

    #[test]
    fn first_step_hand_computed() -> Result<()> {
        let p = scalar_param(1.0);
        let mut opt = AdamW::new(AdamWConfig {
            lr: 0.1,
            weight_decay: 0.1,
            ..AdamWConfig::default()
        })?;
        opt.add("p", &p)?;
        set_grad(&p, &[0.5]);
        opt.step()?;
        // p = 1·(1 − 0.01) − 0.1/0.1 · 0.05 / (sqrt(0.00025)/sqrt(0.001) + 1e-8)
        let want = 0.99 - 0.05 / (0.5 + 1e-8);
        assert!((p.double_value(&[0]) - want).abs() < 1e-7);
        let m = opt.exp_avg("p").expect("p").double_value(&[0]);
        let v = opt.exp_avg_sq("p").expect("p").double_value(&[0]);
        assert!((m - 0.05).abs() < 1e-8 && (v - 0.00025).abs() < 1e-10);
        assert_eq!((opt.step_count(), opt.param_step("p")), (1, Some(1)));
        Ok(())
    }

    #[test]
    fn no_decay_group_and_lr_scale() -> Result<()> {
        let a = scalar_param(1.0);
        let b = scalar_param(1.0);
        let c = scalar_param(1.0);
        let mut opt = AdamW::new(AdamWConfig {
            lr: 0.1,
            weight_decay: 0.5,
            ..AdamWConfig::default()
        })?;
        let nd = opt.add_group(ParamGroup::no_decay("no_decay"))?;
        let half = opt.add_group(ParamGroup::new("half", 0.0, 0.5))?;
        opt.add("a", &a)?;
        opt.add_to(nd, "b", &b)?;
        opt.add_to(half, "c", &c)?;
        for p in [&a, &b, &c] {
            set_grad(p, &[0.0]);
        }
        opt.step()?;
        // Zero gradient: only the decay moves a parameter.
        assert_eq!(a.double_value(&[0]), (1.0f32 * (1.0 - 0.05) as f32) as f64);
        assert_eq!(b.double_value(&[0]), 1.0);
        for p in [&a, &b, &c] {
            set_grad(p, &[1.0]);
        }
        let (b0, c0) = (b.double_value(&[0]), c.double_value(&[0]));
        opt.step()?;
        let (db, dc) = (b0 - b.double_value(&[0]), c0 - c.double_value(&[0]));
        assert!((dc / db - 0.5).abs() < 1e-6, "{db} {dc}");
        assert_eq!(opt.group_of("c"), Some(half));
        Ok(())
    }

    #[test]
    fn parameters_without_grad_are_skipped() -> Result<()> {
        let a = scalar_param(1.0);
        let b = scalar_param(1.0);
        let mut opt = AdamW::new(AdamWConfig::default())?;
        opt.add("a", &a)?;
        opt.add("b", &b)?;
        set_grad(&a, &[1.0]);
        opt.step()?;
        assert_eq!(b.double_value(&[0]), 1.0);
        assert_eq!(
            (opt.param_step("a"), opt.param_step("b")),
            (Some(1), Some(0))
        );
        // The skipped step is recorded in the state so a resume stays exact.
        let state = opt.state()?;
        assert_eq!(state.get("b").expect("b").step, 0);
        assert_eq!(state.step, 1);
        Ok(())
    }

    #[test]
    fn registration_errors() -> Result<()> {
        let mut opt = AdamW::new(AdamWConfig::default())?;
        let p = scalar_param(1.0);
        opt.add("k", &p)?;
        assert!(matches!(opt.add("k", &p), Err(Error::DuplicateKey { .. })));
        let frozen = Tensor::from_slice(&[1.0f32]);
        let err = opt.add("frozen", &frozen).expect_err("frozen");
        assert!(err.to_string().contains("`frozen`"), "{err}");
        let int = Tensor::from_slice(&[1i64]);
        assert!(opt.add("int", &int).is_err());
        assert!(opt.add_to(GroupId(7), "x", &scalar_param(0.0)).is_err());
        assert!(
            AdamW::new(AdamWConfig {
                beta2: 1.0,
                ..AdamWConfig::default()
            })
            .is_err()
        );
        opt.set_lr(f64::NAN);
        assert!(matches!(
            opt.step(),
            Err(Error::InvalidHyperparameter { name: "lr", .. })
        ));
        Ok(())
    }

    #[test]
    fn zero_grad_zeroes() -> Result<()> {
        let p = Tensor::ones([3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let mut opt = AdamW::new(AdamWConfig::default())?;
        opt.add("p", &p)?;
        set_grad(&p, &[1.0, 2.0, 3.0]);
        opt.zero_grad();
        assert_eq!(p.grad().abs().sum(Kind::Float).double_value(&[]), 0.0);
        Ok(())
    }

    #[test]
    fn scheduled_lr_follows_step_count() -> Result<()> {
        let p = scalar_param(1.0);
        let mut opt = AdamW::new(AdamWConfig::default())?;
        opt.add("p", &p)?;
        let sched = LrSchedule::linear(2, 4);
        let mut seen = Vec::new();
        for _ in 0..4 {
            seen.push(opt.set_scheduled_lr(&sched, 1e-2));
            set_grad(&p, &[1.0]);
            opt.step()?;
        }
        assert_eq!(seen, [0.0, 0.005, 0.01, 0.005]);
        Ok(())
    }
}
