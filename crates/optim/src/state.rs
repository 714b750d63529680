//! The optimizer-state file, `optimizer.safetensors`.
//!
//! # Layout
//!
//! For each trainable parameter with key `K` (the key of the parameter in the adapter or model
//! file, e.g. `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`), two `F32`
//! tensors of the parameter's shape:
//!
//! - `K.exp_avg`: Adam's first moment `m` (torch's `state["exp_avg"]`);
//! - `K.exp_avg_sq`: Adam's second moment `v` (torch's `state["exp_avg_sq"]`).
//!
//! Metadata (safetensors metadata is string → string; numbers are written so they parse back to
//! the same `f64` in Rust and Python):
//!
//! | key | meaning | required on read |
//! |---|---|---|
//! | `step` | optimizer steps taken (torch's `state["step"]`) | yes |
//! | `beta1`, `beta2`, `eps` | Adam hyperparameters | yes |
//! | `lr` | learning rate of the last step (the scheduled lr, before any group `lr_scale`) | yes |
//! | `weight_decay` | the default group's decoupled weight decay | no |
//! | `amsgrad` | always `false` (AMSGrad is not implemented) | no; `true` is refused |
//! | `format` | `optimsyn.adamw.v1` | no |
//! | `K.step` | this parameter's step when it differs from `step` (it had no gradient at some steps) | no |
//! | `K.weight_decay` | this parameter's weight decay when it differs from `weight_decay` (no-decay groups) | no |
//! | `K.lr_scale` | this parameter's group lr multiplier when it is not 1 | no |
//!
//! Files written by other tools that follow the required part load fine; the optional entries
//! are what an exact resume needs beyond it.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use tch::{Device, Kind, Tensor};

use crate::config::AdamWConfig;
use crate::error::{Error, Result, torch};

/// The value of the `format` metadata entry this crate writes.
pub const FORMAT: &str = "optimsyn.adamw.v1";
/// The conventional file name of the state, beside the adapter.
pub const FILE_NAME: &str = "optimizer.safetensors";

const EXP_AVG: &str = ".exp_avg";
const EXP_AVG_SQ: &str = ".exp_avg_sq";

/// One parameter's Adam state.
#[derive(Debug)]
pub struct ParamState {
    /// First moment `m`: a CPU `f32` tensor of the parameter's shape.
    pub exp_avg: Tensor,
    /// Second moment `v`: a CPU `f32` tensor of the parameter's shape.
    pub exp_avg_sq: Tensor,
    /// Steps this parameter has taken (bias correction uses it).
    pub step: u64,
    /// Its decoupled weight decay, when known.
    pub weight_decay: Option<f64>,
    /// Its group's lr multiplier, when known.
    pub lr_scale: Option<f64>,
}

impl ParamState {
    /// The moments' shape.
    pub fn shape(&self) -> Vec<i64> {
        self.exp_avg.size()
    }
}

/// The optimizer state as stored in `optimizer.safetensors`: hyperparameters and, per parameter
/// key, the moments. Built by [`crate::AdamW::state`], read from disk with
/// [`OptimizerState::load`], or assembled from tensors with [`OptimizerState::new`] and
/// [`OptimizerState::insert`].
#[derive(Debug)]
pub struct OptimizerState {
    /// Optimizer steps taken.
    pub step: u64,
    /// The learning rate of the last step (scheduled, before group lr scales).
    pub lr: f64,
    /// Adam's `beta1`.
    pub beta1: f64,
    /// Adam's `beta2`.
    pub beta2: f64,
    /// Adam's `eps`.
    pub eps: f64,
    /// The default group's decoupled weight decay, when known.
    pub weight_decay: Option<f64>,
    params: BTreeMap<String, ParamState>,
    origin: PathBuf,
}

impl OptimizerState {
    /// An empty state (no parameters yet) after `step` steps with these hyperparameters
    /// (`config.lr` is the learning rate of the last step).
    pub fn new(config: &AdamWConfig, step: u64) -> Self {
        Self {
            step,
            lr: config.lr,
            beta1: config.beta1,
            beta2: config.beta2,
            eps: config.eps,
            weight_decay: Some(config.weight_decay),
            params: BTreeMap::new(),
            origin: PathBuf::from("<memory>"),
        }
    }

    /// Adds (or replaces) the moments of parameter `key`. They are copied to CPU `f32`; the
    /// parameter's step defaults to the state's, its weight decay to the state's, its lr scale to
    /// 1: adjust them through the returned reference.
    pub fn insert(
        &mut self,
        key: impl Into<String>,
        exp_avg: &Tensor,
        exp_avg_sq: &Tensor,
    ) -> Result<&mut ParamState> {
        let key = key.into();
        let (a, b) = (exp_avg.size(), exp_avg_sq.size());
        if a != b {
            return Err(Error::Tensor {
                path: self.origin.clone(),
                key,
                reason: format!("exp_avg has shape {a:?} but exp_avg_sq has {b:?}"),
            });
        }
        let exp_avg = cpu_f32_copy(exp_avg, &key)?;
        let exp_avg_sq = cpu_f32_copy(exp_avg_sq, &key)?;
        let state = ParamState {
            exp_avg,
            exp_avg_sq,
            step: self.step,
            weight_decay: self.weight_decay,
            lr_scale: Some(1.0),
        };
        self.params.insert(key.clone(), state);
        Ok(self.params.get_mut(&key).expect("just inserted"))
    }

    /// The state of parameter `key`.
    pub fn get(&self, key: &str) -> Option<&ParamState> {
        self.params.get(key)
    }

    /// The first moment `m` of parameter `key`.
    pub fn exp_avg(&self, key: &str) -> Option<&Tensor> {
        self.params.get(key).map(|p| &p.exp_avg)
    }

    /// The second moment `v` of parameter `key`.
    pub fn exp_avg_sq(&self, key: &str) -> Option<&Tensor> {
        self.params.get(key).map(|p| &p.exp_avg_sq)
    }

    /// Parameter keys, sorted.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.params.keys().map(String::as_str)
    }

    /// `(key, state)` pairs, sorted by key.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &ParamState)> {
        self.params.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Number of parameters.
    pub fn len(&self) -> usize {
        self.params.len()
    }

    /// Whether there are no parameters.
    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }

    /// Where this state was read from (`<memory>` if it was not).
    pub fn origin(&self) -> &Path {
        &self.origin
    }

    /// Reads `path` with strict checks (see the module docs for the layout). A truncated or
    /// corrupt file, a moment without its partner, a non-`F32` tensor, an unparsable metadata
    /// entry: each is an error naming the file and the key.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = fs::read(path).map_err(|source| Error::Io {
            path: path.to_owned(),
            action: "cannot read optimizer state",
            source,
        })?;
        Self::parse(&bytes, path)
    }

    /// Parses the bytes of a state file (errors name the file `<memory>`).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        Self::parse(bytes, Path::new("<memory>"))
    }

    /// Writes the state to `path` atomically: the bytes go to a temporary file in the same
    /// folder, which is synced and then renamed over `path`, so a crash leaves either the old file
    /// or the new one, never a torn one.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let bytes = self.to_bytes_at(path)?;
        write_atomic(path, &bytes)
    }

    /// Serializes the state to the bytes of a safetensors file.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        self.to_bytes_at(Path::new("<memory>"))
    }

    fn to_bytes_at(&self, path: &Path) -> Result<Vec<u8>> {
        let mut meta = HashMap::new();
        meta.insert("format".to_owned(), FORMAT.to_owned());
        meta.insert("step".to_owned(), self.step.to_string());
        meta.insert("beta1".to_owned(), fmt_f64(self.beta1));
        meta.insert("beta2".to_owned(), fmt_f64(self.beta2));
        meta.insert("eps".to_owned(), fmt_f64(self.eps));
        meta.insert("lr".to_owned(), fmt_f64(self.lr));
        meta.insert("amsgrad".to_owned(), "false".to_owned());
        let default_wd = self.weight_decay;
        if let Some(wd) = default_wd {
            meta.insert("weight_decay".to_owned(), fmt_f64(wd));
        }
        let mut data: Vec<(String, Vec<u8>, Vec<usize>)> = Vec::with_capacity(2 * self.len());
        for (key, p) in &self.params {
            if p.step != self.step {
                meta.insert(format!("{key}.step"), p.step.to_string());
            }
            if let Some(wd) = p.weight_decay
                && Some(wd) != default_wd
            {
                meta.insert(format!("{key}.weight_decay"), fmt_f64(wd));
            }
            if let Some(s) = p.lr_scale
                && s != 1.0
            {
                meta.insert(format!("{key}.lr_scale"), fmt_f64(s));
            }
            for (suffix, t) in [(EXP_AVG, &p.exp_avg), (EXP_AVG_SQ, &p.exp_avg_sq)] {
                let shape = t.size().iter().map(|&d| d as usize).collect::<Vec<usize>>();
                data.push((format!("{key}{suffix}"), f32_bytes(t, key)?, shape));
            }
        }
        let views = data
            .iter()
            .map(|(name, bytes, shape)| {
                TensorView::new(Dtype::F32, shape.clone(), bytes)
                    .map(|v| (name.as_str(), v))
                    .map_err(|source| Error::Format {
                        path: path.to_owned(),
                        source,
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        safetensors::serialize(views, Some(meta)).map_err(|source| Error::Format {
            path: path.to_owned(),
            source,
        })
    }

    fn parse(bytes: &[u8], path: &Path) -> Result<Self> {
        let format_err = |source| Error::Format {
            path: path.to_owned(),
            source,
        };
        let (_, header) = SafeTensors::read_metadata(bytes).map_err(format_err)?;
        let tensors = SafeTensors::deserialize(bytes).map_err(format_err)?;
        let empty = HashMap::new();
        let meta = header.metadata().as_ref().unwrap_or(&empty);
        let md = Meta { meta, path };

        if let Some(a) = meta.get("amsgrad")
            && a != "false"
        {
            return Err(md.err("amsgrad", format!("`{a}`: only amsgrad=false is supported")));
        }
        let step: u64 = md.parse("step")?;
        let lr = md.parse("lr")?;
        let beta1 = md.parse("beta1")?;
        let beta2 = md.parse("beta2")?;
        let eps = md.parse("eps")?;
        let default_wd = md.parse_opt("weight_decay")?;

        // Pair up K.exp_avg / K.exp_avg_sq.
        let mut pairs: BTreeMap<String, [Option<TensorView<'_>>; 2]> = BTreeMap::new();
        for (name, view) in tensors.iter() {
            let (key, slot) = if let Some(k) = name.strip_suffix(EXP_AVG_SQ) {
                (k, 1)
            } else if let Some(k) = name.strip_suffix(EXP_AVG) {
                (k, 0)
            } else {
                return Err(Error::Tensor {
                    path: path.to_owned(),
                    key: name.to_owned(),
                    reason: "unexpected tensor: names must end in `.exp_avg` or `.exp_avg_sq`"
                        .to_owned(),
                });
            };
            if view.dtype() != Dtype::F32 {
                return Err(Error::Tensor {
                    path: path.to_owned(),
                    key: name.to_owned(),
                    reason: format!("dtype {:?}, expected F32", view.dtype()),
                });
            }
            pairs.entry(key.to_owned()).or_default()[slot] = Some(view);
        }

        let mut params = BTreeMap::new();
        for (key, [m, v]) in pairs {
            let (m, v) = match (m, v) {
                (Some(m), Some(v)) => (m, v),
                (m, _) => {
                    let missing = if m.is_none() { EXP_AVG } else { EXP_AVG_SQ };
                    return Err(Error::Tensor {
                        path: path.to_owned(),
                        key: format!("{key}{missing}"),
                        reason: "missing (each parameter needs both moments)".to_owned(),
                    });
                }
            };
            if m.shape() != v.shape() {
                return Err(Error::Tensor {
                    path: path.to_owned(),
                    key,
                    reason: format!(
                        "exp_avg has shape {:?} but exp_avg_sq has {:?}",
                        m.shape(),
                        v.shape()
                    ),
                });
            }
            let state = ParamState {
                exp_avg: tensor_from_view(&m, &key)?,
                exp_avg_sq: tensor_from_view(&v, &key)?,
                step: md.parse_opt(&format!("{key}.step"))?.unwrap_or(step),
                weight_decay: md.parse_opt(&format!("{key}.weight_decay"))?.or(default_wd),
                lr_scale: Some(md.parse_opt(&format!("{key}.lr_scale"))?.unwrap_or(1.0)),
            };
            params.insert(key, state);
        }

        // Per-parameter metadata must name a parameter that is there.
        for name in meta.keys() {
            for suffix in [".step", ".weight_decay", ".lr_scale"] {
                if let Some(k) = name.strip_suffix(suffix)
                    && !k.is_empty()
                    && !params.contains_key(k)
                {
                    return Err(md.err(name, "names a parameter without moments in the file"));
                }
            }
        }

        Ok(Self {
            step,
            lr,
            beta1,
            beta2,
            eps,
            weight_decay: default_wd,
            params,
            origin: path.to_owned(),
        })
    }
}

/// Metadata lookups that name the file and key in their errors.
struct Meta<'a> {
    meta: &'a HashMap<String, String>,
    path: &'a Path,
}

impl Meta<'_> {
    fn err(&self, key: &str, reason: impl Into<String>) -> Error {
        Error::Metadata {
            path: self.path.to_owned(),
            key: key.to_owned(),
            reason: reason.into(),
        }
    }

    fn parse_opt<T: std::str::FromStr>(&self, key: &str) -> Result<Option<T>>
    where
        T::Err: std::fmt::Display,
    {
        self.meta
            .get(key)
            .map(|s| {
                s.trim()
                    .parse::<T>()
                    .map_err(|e| self.err(key, format!("cannot parse `{s}`: {e}")))
            })
            .transpose()
    }

    fn parse<T: std::str::FromStr>(&self, key: &str) -> Result<T>
    where
        T::Err: std::fmt::Display,
    {
        self.parse_opt(key)?
            .ok_or_else(|| self.err(key, "missing (required)"))
    }
}

/// Formats an `f64` so that both Rust and Python parse it back to the same value
/// (Rust's `Debug` is the shortest round-tripping form, e.g. `0.001`, `1e-8`).
fn fmt_f64(x: f64) -> String {
    if x.is_nan() {
        "nan".to_owned()
    } else if x.is_infinite() {
        if x > 0.0 { "inf" } else { "-inf" }.to_owned()
    } else {
        format!("{x:?}")
    }
}

/// A detached, contiguous CPU `f32` copy that shares no storage with `t`.
pub(crate) fn cpu_f32_copy(t: &Tensor, key: &str) -> Result<Tensor> {
    let mut out = Tensor::f_empty(t.size(), (Kind::Float, Device::Cpu)).map_err(torch(key))?;
    tch::no_grad(|| out.f_copy_(t)).map_err(torch(key))?;
    Ok(out)
}

/// The little-endian bytes of `t` as `f32`.
fn f32_bytes(t: &Tensor, key: &str) -> Result<Vec<u8>> {
    let c = t
        .f_to_kind(Kind::Float)
        .and_then(|c| c.f_to_device(Device::Cpu))
        .and_then(|c| c.f_contiguous())
        .map_err(torch(key))?;
    let n = c.numel();
    let mut bytes = vec![0u8; n * 4];
    c.f_copy_data_u8(&mut bytes, n).map_err(torch(key))?;
    if cfg!(target_endian = "big") {
        for chunk in bytes.chunks_exact_mut(4) {
            chunk.reverse();
        }
    }
    Ok(bytes)
}

fn tensor_from_view(view: &TensorView<'_>, key: &str) -> Result<Tensor> {
    let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
    let data = view.data();
    if cfg!(target_endian = "big") {
        let mut swapped = data.to_vec();
        for chunk in swapped.chunks_exact_mut(4) {
            chunk.reverse();
        }
        return Tensor::f_from_data_size(&swapped, &shape, Kind::Float).map_err(torch(key));
    }
    Tensor::f_from_data_size(data, &shape, Kind::Float).map_err(torch(key))
}

/// Writes `bytes` atomically and durably through [`optimsyn_fsio::write_atomic`], its one home.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    optimsyn_fsio::write_atomic(path, bytes).map_err(|e| match e {
        optimsyn_fsio::Error::Io {
            path,
            action,
            source,
        } => Error::Io {
            path,
            action,
            source,
        },
        other => Error::Io {
            path: path.to_owned(),
            action: "cannot write optimizer state",
            source: std::io::Error::other(other.to_string()),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Result<OptimizerState> {
        let mut s = OptimizerState::new(&AdamWConfig::default(), 7);
        let m = Tensor::from_slice(&[1.0f32, -2.0, 3.5, 0.25]).reshape([2, 2]);
        let v = Tensor::from_slice(&[0.5f32, 1e-20, 3.0, 4.0]).reshape([2, 2]);
        s.insert("base_model.model.a.lora_A.weight", &m, &v)?;
        let b = s.insert("b.bias", &m.reshape([4]), &v.reshape([4]))?;
        b.weight_decay = Some(0.0);
        b.lr_scale = Some(0.5);
        b.step = 6;
        Ok(s)
    }

    #[test]
    fn bytes_round_trip() -> Result<()> {
        let s = sample()?;
        let bytes = s.to_bytes()?;
        let back = OptimizerState::from_bytes(&bytes)?;
        assert_eq!(back.step, 7);
        assert_eq!(
            (back.lr, back.beta1, back.beta2, back.eps, back.weight_decay),
            (s.lr, s.beta1, s.beta2, s.eps, s.weight_decay)
        );
        assert_eq!(
            back.keys().collect::<Vec<_>>(),
            s.keys().collect::<Vec<_>>()
        );
        for (k, p) in s.iter() {
            let q = back.get(k).expect("key");
            assert!(p.exp_avg.equal(&q.exp_avg) && p.exp_avg_sq.equal(&q.exp_avg_sq));
            assert_eq!(
                (p.step, p.weight_decay, p.lr_scale),
                (q.step, q.weight_decay, q.lr_scale)
            );
        }
        // The documented metadata is there, as strings.
        let (_, header) = SafeTensors::read_metadata(&bytes).expect("header");
        let meta = header.metadata().as_ref().expect("metadata");
        assert_eq!(meta["step"], "7");
        assert_eq!(meta["beta1"], "0.9");
        assert_eq!(meta["beta2"], "0.999");
        assert_eq!(meta["eps"], "1e-8");
        assert_eq!(meta["lr"], "0.001");
        assert_eq!(meta["weight_decay"], "0.01");
        assert_eq!(meta["b.bias.weight_decay"], "0.0");
        assert_eq!(meta["b.bias.lr_scale"], "0.5");
        assert_eq!(meta["b.bias.step"], "6");
        assert!(!meta.contains_key("base_model.model.a.lora_A.weight.step"));
        Ok(())
    }

    #[test]
    fn insert_copies_and_checks_shapes() -> Result<()> {
        let mut s = OptimizerState::new(&AdamWConfig::default(), 1);
        let mut m = Tensor::from_slice(&[1.0f64, 2.0]);
        s.insert("k", &m, &m)?;
        let _ = m.f_add_scalar_(1.0);
        assert_eq!(s.exp_avg("k").expect("k").kind(), Kind::Float);
        assert_eq!(s.exp_avg("k").expect("k").double_value(&[0]), 1.0);
        let err = s
            .insert("bad", &m, &Tensor::from_slice(&[1.0f32]))
            .expect_err("shape");
        assert!(err.to_string().contains("`bad`"), "{err}");
        Ok(())
    }

    #[test]
    fn required_metadata_is_required() -> Result<()> {
        let s = sample()?;
        let bytes = s.to_bytes()?;
        // Rebuild without `eps`.
        let (_, header) = SafeTensors::read_metadata(&bytes).expect("header");
        let mut meta = header.metadata().clone().expect("metadata");
        meta.remove("eps");
        let st = SafeTensors::deserialize(&bytes).expect("tensors");
        let stripped = safetensors::serialize(st.tensors(), Some(meta)).expect("serialize");
        let err = OptimizerState::from_bytes(&stripped).expect_err("no eps");
        assert!(
            matches!(&err, Error::Metadata { key, .. } if key == "eps"),
            "{err}"
        );
        Ok(())
    }

    #[test]
    fn float_formatting_round_trips() {
        for x in [0.9, 0.999, 1e-8, 3e-4, 0.1 + 0.2, 1.0, 0.0, 1e300, 5e-324] {
            let s = fmt_f64(x);
            assert_eq!(s.parse::<f64>().expect("parse"), x, "{s}");
        }
        assert!(fmt_f64(f64::NAN).parse::<f64>().expect("nan").is_nan());
    }
}
