//! Batched per-sample gradients equal a one-at-a-time autograd loop.

use optimsyn_influence::gradients;
use optimsyn_lm::{CausalLm, LoadOptions, LoraAdapter, LoraConfig, TargetModules, TrainExample};
use tch::{Kind, Tensor};

use crate::common::*;

fn examples() -> Vec<TrainExample> {
    let lens = [5usize, 17, 9, 30, 3, 12];
    lens.iter()
        .enumerate()
        .map(|(i, &n)| {
            let tokens: Vec<u32> = (0..n as u32)
                .map(|j| (j * 11 + i as u32 * 5) % 60 + 2)
                .collect();
            // Row 4 has no loss token: its gradient must be exactly zero, never NaN.
            let loss_mask = (0..n).map(|j| u8::from(i != 4 && j >= n / 3)).collect();
            TrainExample {
                id: format!("r{i}"),
                tokens,
                loss_mask,
                subtask: None,
            }
        })
        .collect()
}

#[test]
fn batched_per_sample_gradients_equal_a_loop() {
    for (name, targets) in [
        ("qwen3_tied_gqa", TargetModules::default()),
        (
            "llama_bias_headdim",
            TargetModules::List(vec!["all-linear".into()]),
        ),
        (
            "qwen2_untied_mha",
            TargetModules::List(vec!["v_proj".into(), "down_proj".into()]),
        ),
    ] {
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../lm/tests/fixtures")
            .join(name);
        let mut model = CausalLm::load(&dir, LoadOptions::default()).unwrap();
        let cfg = LoraConfig {
            r: 3,
            alpha: 6.0,
            target_modules: targets,
            ..Default::default()
        };
        let adapter = LoraAdapter::init(&mut model, cfg, 1).unwrap();
        {
            // Nonzero B, so the A gradients are nonzero too.
            let _g = tch::no_grad_guard();
            tch::manual_seed(3);
            for m in adapter.modules() {
                let mut b = m.b.shallow_clone();
                b.copy_(&(Tensor::randn(b.size(), (Kind::Float, tch::Device::Cpu)) * 0.2));
            }
        }
        let ex = examples();
        let idx: Vec<usize> = (0..ex.len()).collect();
        // A small token budget forces several padded batches.
        let (g, losses) = gradients(&model, &adapter, &ex, &idx, 64).unwrap();
        assert_eq!(g.size(), vec![ex.len() as i64, adapter.num_parameters()]);
        assert_eq!(losses[4], 0.0);
        for (i, e) in ex.iter().enumerate() {
            let want = reference_grad(&model, &adapter, e);
            let got = g.get(i as i64);
            assert_eq!(
                got.isfinite().all().int64_value(&[]),
                1,
                "{name} row {i}: non-finite gradient"
            );
            let diff = (&got - &want).norm().double_value(&[]);
            let norm = want.norm().double_value(&[]);
            if i == 4 {
                assert_eq!(
                    got.abs().max().double_value(&[]),
                    0.0,
                    "{name}: a row without loss tokens has zero gradient"
                );
            } else {
                assert!(norm > 0.0);
                assert!(
                    diff <= 1e-5 * norm,
                    "{name} row {i}: ‖Δ‖ {diff} vs ‖g‖ {norm}"
                );
            }
        }
    }
}
