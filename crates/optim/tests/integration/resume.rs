//! Save → load → continue equals an uninterrupted run, bit for bit.

use optimsyn_optim::OptimizerState;
use tch::Tensor;

use crate::common::{Fixture, bit_equal};

/// Runs steps `from..=to` of the fixture's trajectory.
fn run(fx: &Fixture, params: &mut [Tensor], opt: &mut optimsyn_optim::AdamW, from: u64, to: u64) {
    let schedule = fx.schedule();
    for t in from..=to {
        fx.set_grads(params, t);
        opt.clip_grad_norm(fx.f64("max_norm")).expect("clip");
        opt.set_scheduled_lr(&schedule, fx.f64("base_lr"));
        opt.step().expect("step");
    }
}

#[test]
fn save_load_continue_is_bit_identical() {
    let fx = Fixture::load();
    let steps = fx.u64("steps");

    let mut straight = fx.init_params();
    let mut opt = fx.optimizer(&straight);
    run(&fx, &mut straight, &mut opt, 1, steps);

    // Interrupted after step 3: the parameters go through f32 bytes as an adapter file would,
    // the optimizer through optimizer.safetensors, into a fresh process-like setup.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("optimizer.safetensors");
    let mut first = fx.init_params();
    let mut opt1 = fx.optimizer(&first);
    run(&fx, &mut first, &mut opt1, 1, 3);
    opt1.save(&path).expect("save");
    let mut second: Vec<Tensor> = first
        .iter()
        .map(|p| {
            let v: Vec<f32> = Vec::try_from(p.flatten(0, -1)).expect("f32");
            Tensor::from_slice(&v)
                .reshape(p.size())
                .set_requires_grad(true)
        })
        .collect();
    drop((first, opt1));
    let mut opt2 = fx.optimizer(&second);
    opt2.load(&path).expect("load");
    assert_eq!(opt2.step_count(), 3);
    run(&fx, &mut second, &mut opt2, 4, steps);

    for ((k, a), b) in fx.keys().iter().zip(&straight).zip(&second) {
        assert!(bit_equal(a, b), "{k}: parameters differ after resume");
        assert!(
            bit_equal(opt.exp_avg(k).expect("m"), opt2.exp_avg(k).expect("m")),
            "{k}: exp_avg differs after resume"
        );
        assert!(
            bit_equal(
                opt.exp_avg_sq(k).expect("v"),
                opt2.exp_avg_sq(k).expect("v")
            ),
            "{k}: exp_avg_sq differs after resume"
        );
    }
    assert_eq!(opt.lr(), opt2.lr());
    assert_eq!(opt.step_count(), opt2.step_count());
}

#[test]
fn state_built_from_tensors_loads_like_a_saved_one() {
    let fx = Fixture::load();
    let mut params = fx.init_params();
    let mut opt = fx.optimizer(&params);
    run(&fx, &mut params, &mut opt, 1, 2);

    // Another tool assembles the state from tensors (e.g. converted from torch's state_dict).
    let saved = opt.state().expect("state");
    let mut built = OptimizerState::new(opt.config(), saved.step);
    for (k, p) in saved.iter() {
        let q = built.insert(k, &p.exp_avg, &p.exp_avg_sq).expect("insert");
        q.weight_decay = p.weight_decay;
        q.lr_scale = p.lr_scale;
    }
    let bytes = built.to_bytes().expect("bytes");
    // Same file either way (up to the order of the header's metadata map, which the safetensors
    // crate writes from a HashMap).
    let header = |b: &[u8]| {
        let (_, h) = safetensors::SafeTensors::read_metadata(b).expect("header");
        (
            h.metadata().clone(),
            h.tensors()
                .into_iter()
                .map(|(k, v)| (k, (v.dtype, v.shape.clone(), v.data_offsets)))
                .collect::<std::collections::BTreeMap<_, _>>(),
        )
    };
    let saved_bytes = saved.to_bytes().expect("bytes");
    assert_eq!(header(&bytes), header(&saved_bytes));
    assert_eq!(bytes.len(), saved_bytes.len());

    let mut fresh = fx.optimizer(&params);
    fresh
        .load_state(&OptimizerState::from_bytes(&bytes).expect("parse"))
        .expect("load");
    for k in fx.keys() {
        assert!(bit_equal(
            fresh.exp_avg_sq(&k).expect("v"),
            opt.exp_avg_sq(&k).expect("v")
        ));
    }
}

#[test]
fn save_is_atomic_and_replaces() {
    let fx = Fixture::load();
    let params = fx.init_params();
    let opt = fx.optimizer(&params);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("optimizer.safetensors");
    std::fs::write(&path, b"old contents").expect("write");
    opt.save(&path).expect("save over an old file");
    opt.save(&path).expect("save again");
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        ["optimizer.safetensors"],
        "no temporary file left behind"
    );
    assert_eq!(OptimizerState::load(&path).expect("load").step, 0);

    let missing = dir.path().join("no/such/dir/optimizer.safetensors");
    let err = opt.save(&missing).expect_err("no folder");
    assert!(err.to_string().contains("no/such/dir"), "{err}");
}
