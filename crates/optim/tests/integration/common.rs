//! Reading the parity fixture and small helpers shared by the tests.

use std::collections::HashMap;
use std::path::PathBuf;

use optimsyn_optim::{AdamW, AdamWConfig, LrSchedule, ParamGroup};
use safetensors::tensor::{Dtype, SafeTensors};
use tch::{Kind, Tensor};

/// The fixture written by `python/fixtures/optim_adamw.py`.
pub fn fixture_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/optim_adamw.safetensors")
}

/// The fixture's tensors (as tch tensors) and metadata.
pub struct Fixture {
    pub tensors: HashMap<String, Tensor>,
    pub meta: HashMap<String, String>,
}

impl Fixture {
    pub fn load() -> Self {
        let path = fixture_path();
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let (_, header) = SafeTensors::read_metadata(&bytes).expect("fixture header");
        let meta = header.metadata().clone().expect("fixture metadata");
        let st = SafeTensors::deserialize(&bytes).expect("fixture tensors");
        let mut tensors = HashMap::new();
        for (name, view) in st.iter() {
            let kind = match view.dtype() {
                Dtype::F32 => Kind::Float,
                Dtype::F64 => Kind::Double,
                other => panic!("{name}: unexpected dtype {other:?}"),
            };
            let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
            tensors.insert(
                name.to_owned(),
                Tensor::from_data_size(view.data(), &shape, kind),
            );
        }
        Self { tensors, meta }
    }

    pub fn t(&self, name: &str) -> &Tensor {
        self.tensors
            .get(name)
            .unwrap_or_else(|| panic!("fixture has no tensor {name}"))
    }

    pub fn f64(&self, key: &str) -> f64 {
        self.meta[key].parse().expect("number in fixture metadata")
    }

    pub fn u64(&self, key: &str) -> u64 {
        self.meta[key].parse().expect("integer in fixture metadata")
    }

    pub fn keys(&self) -> Vec<String> {
        self.meta["keys"].split(',').map(str::to_owned).collect()
    }

    pub fn is_no_decay(&self, key: &str) -> bool {
        self.meta["no_decay_keys"].split(',').any(|k| k == key)
    }

    pub fn config(&self) -> AdamWConfig {
        AdamWConfig {
            lr: self.f64("base_lr"),
            beta1: self.f64("beta1"),
            beta2: self.f64("beta2"),
            eps: self.f64("eps"),
            weight_decay: self.f64("weight_decay"),
        }
    }

    pub fn schedule(&self) -> LrSchedule {
        LrSchedule::cosine(self.u64("warmup_steps"), self.u64("total_steps"))
    }

    /// Fresh leaf parameters with the fixture's initial values, in registration order.
    pub fn init_params(&self) -> Vec<Tensor> {
        self.keys()
            .iter()
            .map(|k| self.t(&format!("init.{k}")).copy().set_requires_grad(true))
            .collect()
    }

    /// An optimizer over `params` set up as the script's torch optimizer.
    pub fn optimizer(&self, params: &[Tensor]) -> AdamW {
        let mut opt = AdamW::new(self.config()).expect("config");
        let nd = opt
            .add_group(ParamGroup::new(
                "no_decay",
                0.0,
                self.f64("no_decay_lr_scale"),
            ))
            .expect("group");
        for (k, p) in self.keys().iter().zip(params) {
            if self.is_no_decay(k) {
                opt.add_to(nd, k.clone(), p).expect("register");
            } else {
                opt.add(k.clone(), p).expect("register");
            }
        }
        opt
    }

    /// Makes `p.grad` equal the fixture's raw gradient at step `t`.
    pub fn set_grads(&self, params: &mut [Tensor], t: u64) {
        for (k, p) in self.keys().iter().zip(params.iter_mut()) {
            let g = self.t(&format!("grad.{t}.{k}"));
            set_grad(p, g);
        }
    }
}

/// Sets `p.grad` to exactly `g` (zero it, then backprop `sum(p * g)`, whose gradient is `g`).
pub fn set_grad(p: &mut Tensor, g: &Tensor) {
    p.zero_grad();
    (&*p * g).sum(Kind::Float).backward();
}

/// Largest relative difference `|a - b| / max(|a|, |b|)` (0 where both are 0), and the number of
/// elements that differ at all.
pub fn rel_diff(a: &Tensor, b: &Tensor) -> (f64, usize) {
    assert_eq!(a.size(), b.size());
    let a = a.to_kind(Kind::Double).flatten(0, -1);
    let b = b.to_kind(Kind::Double).flatten(0, -1);
    let a: Vec<f64> = Vec::try_from(&a).expect("f64");
    let b: Vec<f64> = Vec::try_from(&b).expect("f64");
    let mut max = 0.0f64;
    let mut differing = 0;
    for (x, y) in a.iter().zip(&b) {
        if x != y {
            differing += 1;
            let scale = x.abs().max(y.abs());
            max = max.max((x - y).abs() / scale);
        }
    }
    (max, differing)
}

/// Bit-for-bit equality of two f32 tensors.
pub fn bit_equal(a: &Tensor, b: &Tensor) -> bool {
    a.size() == b.size() && a.kind() == b.kind() && {
        let x: Vec<f32> = Vec::try_from(a.flatten(0, -1)).expect("f32");
        let y: Vec<f32> = Vec::try_from(b.flatten(0, -1)).expect("f32");
        x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits())
    }
}
