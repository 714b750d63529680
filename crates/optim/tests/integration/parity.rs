//! Parity with PyTorch: `torch.optim.AdamW` (weight decay, a no-decay group with its own lr),
//! `torch.nn.utils.clip_grad_norm_` and transformers' schedules with warm-up, on the fixture
//! `python/fixtures/optim_adamw.py` recorded. Tolerance: 1e-6 relative (observed: exact).

use optimsyn_optim::{LrSchedule, OptimizerState};

use crate::common::{Fixture, rel_diff};

const RTOL: f64 = 1e-6;

#[test]
fn adamw_clip_and_schedule_match_torch() {
    let fx = Fixture::load();
    let keys = fx.keys();
    let mut params = fx.init_params();
    let mut opt = fx.optimizer(&params);
    let schedule = fx.schedule();
    let base_lr = fx.f64("base_lr");
    let max_norm = fx.f64("max_norm");

    let (mut worst, mut differing, mut clipped) = (0.0f64, 0usize, 0);
    for t in 1..=fx.u64("steps") {
        fx.set_grads(&mut params, t);
        let norm = opt.clip_grad_norm(max_norm).expect("clip");
        let torch_norm = fx.t(&format!("norm.{t}")).double_value(&[]);
        assert_eq!(norm, torch_norm, "step {t}: total grad norm");
        clipped += usize::from(norm > max_norm);

        let lr = opt.set_scheduled_lr(&schedule, base_lr);
        assert_eq!(
            lr,
            fx.t(&format!("lr.{t}")).double_value(&[0]),
            "step {t}: lr"
        );
        opt.step().expect("step");

        for (k, p) in keys.iter().zip(&params) {
            let m = opt.exp_avg(k).expect("registered");
            let v = opt.exp_avg_sq(k).expect("registered");
            for (what, ours) in [("param", p), ("exp_avg", m), ("exp_avg_sq", v)] {
                let (rel, n) = rel_diff(ours, fx.t(&format!("{what}.{t}.{k}")));
                assert!(
                    rel <= RTOL,
                    "step {t} {what} {k}: relative difference {rel:e}"
                );
                worst = worst.max(rel);
                differing += n;
            }
        }
    }
    assert!(
        clipped > 0 && clipped < 6,
        "the fixture should clip on some steps only"
    );
    eprintln!(
        "parity with torch.optim.AdamW: max relative difference {worst:e}, \
         {differing} element(s) not bit-identical"
    );

    // The saved moments are torch's moments.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("optimizer.safetensors");
    opt.save(&path).expect("save");
    let state = OptimizerState::load(&path).expect("load");
    let last = fx.u64("steps");
    assert_eq!(state.step, last);
    for k in &keys {
        for (what, ours) in [
            ("exp_avg", state.exp_avg(k).expect("m")),
            ("exp_avg_sq", state.exp_avg_sq(k).expect("v")),
        ] {
            let (rel, _) = rel_diff(ours, fx.t(&format!("{what}.{last}.{k}")));
            assert!(rel <= RTOL, "saved {what} of {k}: {rel:e}");
        }
    }
    assert_eq!(state.beta2, fx.f64("beta2"));
    assert_eq!(state.eps, fx.f64("eps"));
}

#[test]
fn schedules_match_transformers() {
    let fx = Fixture::load();
    let mut checked = 0;
    for (name, values) in &fx.tensors {
        let Some(rest) = name.strip_prefix("schedule.") else {
            continue;
        };
        let parts: Vec<&str> = rest.split('.').collect();
        let num = |i: usize| parts[i].parse::<u64>().expect("number in schedule name");
        let sched = match parts[0] {
            "linear" => LrSchedule::linear(num(1), num(2)),
            "cosine" => LrSchedule::cosine(num(1), num(2)),
            "constant" => LrSchedule::Constant {
                warmup_steps: num(1),
            },
            other => panic!("unknown schedule {other}"),
        };
        let want: Vec<f64> = Vec::try_from(values).expect("f64 values");
        for (step, w) in want.iter().enumerate() {
            let got = sched.multiplier(step as u64);
            assert_eq!(got, *w, "{name} at step {step}");
        }
        checked += 1;
    }
    assert_eq!(checked, 12, "schedule tables in the fixture");
}
