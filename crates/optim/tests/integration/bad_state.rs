//! Bad state files: each error names the file and the key, and a failed load changes nothing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use optimsyn_optim::{AdamW, AdamWConfig, Error, OptimizerState, ParamGroup};
use safetensors::tensor::{Dtype, TensorView};
use tch::{Kind, Tensor};

use crate::common::{Fixture, bit_equal};

const BIAS: &str = "base_model.model.model.layers.0.self_attn.q_proj.bias";
const LORA_A: &str = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";

/// A state saved after two fixture steps, its path, and the temp dir holding it.
fn saved_state() -> (tempfile::TempDir, PathBuf) {
    let fx = Fixture::load();
    let mut params = fx.init_params();
    let mut opt = fx.optimizer(&params);
    for t in 1..=2 {
        fx.set_grads(&mut params, t);
        opt.step().expect("step");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("optimizer.safetensors");
    opt.save(&path).expect("save");
    (dir, path)
}

/// Asserts the error's message names `path` and contains `needle` (a key).
fn assert_names(err: &Error, path: &Path, needle: &str) {
    let msg = err.to_string();
    assert!(
        msg.contains(&path.display().to_string()),
        "no path in: {msg}"
    );
    assert!(msg.contains(needle), "no `{needle}` in: {msg}");
}

/// A tensor to write: name, dtype, shape.
type Spec = (&'static str, Dtype, Vec<usize>);

/// Writes a safetensors file of F32/F64 tensors holding 0, 1, 2, … and this metadata.
fn write_file(path: &Path, tensors: &[Spec], meta: &[(&str, &str)]) {
    let data: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, dtype, shape)| {
            let n: usize = shape.iter().product();
            let bytes = match dtype {
                Dtype::F32 => (0..n).flat_map(|i| (i as f32).to_le_bytes()).collect(),
                Dtype::F64 => (0..n).flat_map(|i| (i as f64).to_le_bytes()).collect(),
                other => panic!("{other:?}"),
            };
            ((*name).to_owned(), *dtype, shape.clone(), bytes)
        })
        .collect();
    let views: Vec<(&str, TensorView<'_>)> = data
        .iter()
        .map(|(n, d, s, b)| (n.as_str(), TensorView::new(*d, s.clone(), b).expect("view")))
        .collect();
    let meta: HashMap<String, String> = meta
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let bytes = safetensors::serialize(views, Some(meta)).expect("serialize");
    std::fs::write(path, bytes).expect("write");
}

const META: &[(&str, &str)] = &[
    ("step", "3"),
    ("beta1", "0.9"),
    ("beta2", "0.999"),
    ("eps", "1e-8"),
    ("lr", "0.001"),
];

fn one_param_optimizer(key: &str, shape: &[i64]) -> (AdamW, Tensor) {
    let p = Tensor::zeros(shape, (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
    let mut opt = AdamW::new(AdamWConfig::default()).expect("optimizer");
    opt.add(key, &p).expect("register");
    (opt, p)
}

#[test]
fn truncated_file_is_an_error_naming_the_file() {
    let (_dir, path) = saved_state();
    let bytes = std::fs::read(&path).expect("read");
    for keep in [bytes.len() - 1, bytes.len() / 2, 20, 4, 0] {
        std::fs::write(&path, &bytes[..keep]).expect("truncate");
        let err = OptimizerState::load(&path).expect_err("truncated");
        assert!(matches!(err, Error::Format { .. }), "{keep}: {err}");
        assert_names(&err, &path, "truncated or corrupt");
    }
}

#[test]
fn corrupt_header_is_an_error() {
    let (_dir, path) = saved_state();
    let mut bytes = std::fs::read(&path).expect("read");
    for b in &mut bytes[10..30] {
        *b = b'#';
    }
    std::fs::write(&path, &bytes).expect("write");
    let err = OptimizerState::load(&path).expect_err("corrupt");
    assert!(matches!(err, Error::Format { .. }), "{err}");
    assert_names(&err, &path, "optimizer.safetensors");

    let missing = path.with_file_name("absent.safetensors");
    let err = OptimizerState::load(&missing).expect_err("absent");
    assert!(matches!(err, Error::Io { .. }), "{err}");
    assert_names(&err, &missing, "absent.safetensors");
}

#[test]
fn failed_load_leaves_the_optimizer_unchanged() {
    let (_dir, path) = saved_state();
    let fx = Fixture::load();
    let mut params = fx.init_params();
    let mut opt = fx.optimizer(&params);
    fx.set_grads(&mut params, 1);
    opt.step().expect("step");
    let before = opt.exp_avg(LORA_A).expect("m").copy();

    let bytes = std::fs::read(&path).expect("read");
    std::fs::write(&path, &bytes[..bytes.len() - 3]).expect("truncate");
    assert!(opt.load(&path).is_err());
    assert_eq!(opt.step_count(), 1);
    assert!(bit_equal(&before, opt.exp_avg(LORA_A).expect("m")));

    // A well-formed file that fails the key check part-way through changes nothing either.
    std::fs::write(&path, &bytes).expect("restore");
    let mut state = OptimizerState::load(&path).expect("load");
    state
        .insert(
            "not.a.parameter",
            &Tensor::zeros([1], (Kind::Float, tch::Device::Cpu)),
            &Tensor::zeros([1], (Kind::Float, tch::Device::Cpu)),
        )
        .expect("insert");
    assert!(matches!(
        opt.load_state(&state),
        Err(Error::ExtraKey { .. })
    ));
    assert_eq!(opt.step_count(), 1);
    assert!(bit_equal(&before, opt.exp_avg(LORA_A).expect("m")));
}

#[test]
fn missing_and_extra_keys() {
    let (_dir, path) = saved_state();
    let fx = Fixture::load();

    // One more parameter registered than the file has.
    let mut params = fx.init_params();
    let extra = Tensor::zeros([3], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
    let mut opt = fx.optimizer(&params);
    opt.add("model.extra.weight", &extra).expect("register");
    let err = opt.load(&path).expect_err("missing key");
    assert!(matches!(err, Error::MissingKey { .. }), "{err}");
    assert_names(&err, &path, "model.extra.weight");

    // One parameter fewer.
    params.pop();
    let opt_keys: Vec<String> = fx.keys()[..2].to_vec();
    let mut opt = AdamW::new(fx.config()).expect("optimizer");
    for (k, p) in opt_keys.iter().zip(&params) {
        opt.add(k.clone(), p).expect("register");
    }
    let err = opt.load(&path).expect_err("extra key");
    assert!(matches!(err, Error::ExtraKey { count: 1, .. }), "{err}");
    assert_names(&err, &path, BIAS);
}

#[test]
fn shape_mismatch() {
    let (_dir, path) = saved_state();
    let fx = Fixture::load();
    let mut params = fx.init_params();
    params[0] = Tensor::zeros([8, 4], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
    let mut opt = fx.optimizer(&params);
    let err = opt.load(&path).expect_err("shape");
    assert!(matches!(err, Error::ShapeMismatch { .. }), "{err}");
    assert_names(&err, &path, LORA_A);
    assert!(err.to_string().contains("[4, 8]"), "{err}");
}

#[test]
fn group_mismatch() {
    let (_dir, path) = saved_state();
    let fx = Fixture::load();
    let params = fx.init_params();
    // The bias registered in the decay group this time.
    let mut opt = AdamW::new(fx.config()).expect("optimizer");
    for (k, p) in fx.keys().iter().zip(&params) {
        opt.add(k.clone(), p).expect("register");
    }
    let err = opt.load(&path).expect_err("group");
    assert!(
        matches!(
            err,
            Error::GroupMismatch {
                name: "weight_decay",
                ..
            }
        ),
        "{err}"
    );
    assert_names(&err, &path, BIAS);

    // Same decay but a different lr scale.
    let mut opt = AdamW::new(fx.config()).expect("optimizer");
    let nd = opt
        .add_group(ParamGroup::no_decay("no_decay"))
        .expect("group");
    for (k, p) in fx.keys().iter().zip(&params) {
        if fx.is_no_decay(k) {
            opt.add_to(nd, k.clone(), p).expect("register");
        } else {
            opt.add(k.clone(), p).expect("register");
        }
    }
    let err = opt.load(&path).expect_err("lr scale");
    assert!(
        matches!(
            err,
            Error::GroupMismatch {
                name: "lr_scale",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn malformed_tensors_and_metadata() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("optimizer.safetensors");
    let f32s = |names: &[&'static str]| -> Vec<Spec> {
        names.iter().map(|n| (*n, Dtype::F32, vec![2, 3])).collect()
    };

    // A well-formed file from "another tool": only the required metadata.
    write_file(&path, &f32s(&["k.exp_avg", "k.exp_avg_sq"]), META);
    let state = OptimizerState::load(&path).expect("minimal file");
    assert_eq!((state.step, state.weight_decay), (3, None));
    let (mut opt, _p) = one_param_optimizer("k", &[2, 3]);
    opt.load(&path).expect("load minimal file");
    assert_eq!(opt.step_count(), 3);
    assert_eq!(opt.exp_avg("k").expect("m").double_value(&[1, 2]), 5.0);

    // (tensors, metadata, what the error must name)
    type Case<'a> = (Vec<Spec>, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        (f32s(&["k.exp_avg"]), META.to_vec(), "k.exp_avg_sq"),
        (
            f32s(&["k.exp_avg", "k.exp_avg_sq", "k.weight"]),
            META.to_vec(),
            "k.weight",
        ),
        (
            vec![
                ("k.exp_avg", Dtype::F64, vec![2, 3]),
                ("k.exp_avg_sq", Dtype::F32, vec![2, 3]),
            ],
            META.to_vec(),
            "k.exp_avg",
        ),
        (
            vec![
                ("k.exp_avg", Dtype::F32, vec![2, 3]),
                ("k.exp_avg_sq", Dtype::F32, vec![3, 2]),
            ],
            META.to_vec(),
            "`k`",
        ),
        (
            f32s(&["k.exp_avg", "k.exp_avg_sq"]),
            META[1..].to_vec(),
            "step",
        ),
        (
            f32s(&["k.exp_avg", "k.exp_avg_sq"]),
            [META, &[("lr", "fast")]].concat(),
            "lr",
        ),
        (
            f32s(&["k.exp_avg", "k.exp_avg_sq"]),
            [META, &[("j.weight_decay", "0.0")]].concat(),
            "j.weight_decay",
        ),
        (
            f32s(&["k.exp_avg", "k.exp_avg_sq"]),
            [META, &[("amsgrad", "true")]].concat(),
            "amsgrad",
        ),
    ];
    for (tensors, meta, needle) in cases {
        write_file(&path, &tensors, &meta);
        let err = OptimizerState::load(&path).expect_err(needle);
        assert!(
            matches!(err, Error::Tensor { .. } | Error::Metadata { .. }),
            "{needle}: {err}"
        );
        assert_names(&err, &path, needle);
    }
}
