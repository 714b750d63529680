//! The loss equals TRL's `GRPOTrainer._compute_loss` (trl 1.16.0) for the matching settings, on
//! the fixture written by `python/fixtures/grpo_trl.py`: value, gradients with respect to the
//! log-probs and entropies, and TRL's logged KL / entropy / clip ratios.

use optimsyn_rl_grpo::{
    AdvantageConfig, AdvantageEstimator, Aggregation, KlEstimator, LossConfig, LossInputs,
    LossStats, RatioLevel, StepNormalizer, compute_advantages, grpo_loss,
};
use tch::Tensor;

use crate::common::{list, max_abs_diff, rows, t2, values};

fn fixture() -> serde_json::Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/grpo_trl.json");
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).expect("fixture JSON")
}

#[test]
fn advantages_equal_trls() {
    let f = fixture();
    let rewards = list(&f["inputs"]["rewards"]);
    let g = f["inputs"]["group_size"].as_u64().unwrap() as usize;
    let z = compute_advantages(
        &rewards,
        g,
        &AdvantageConfig {
            estimator: AdvantageEstimator::GroupZScore,
            eps: 1e-4,
            std_floor: 0.0,
        },
    )
    .unwrap();
    // TRL's `nanstd` multiplies the variance by `count / (count - 1)` computed from integer
    // tensors, i.e. in float32 (4/3 rounds to 1.33333337): its z-scores are off by ~1e-8
    // relative even in float64. This crate's factor is exact.
    let trl = list(&f["advantages"]["group"]);
    assert!(max_abs_diff(&z.values, &trl) < 1e-7);
    let k = f64::from(4.0f32 / 3.0) / (4.0 / 3.0); // TRL's variance factor over the exact one
    let with_trl_factor: Vec<f64> = rewards
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let (mean, std) = (z.group_mean[i / g], z.group_std[i / g]);
            (r - mean) / (std * k.sqrt() + 1e-4)
        })
        .collect();
    assert!(
        max_abs_diff(&with_trl_factor, &trl) < 1e-14,
        "not (only) the float32 Bessel factor"
    );
    assert_eq!(z.zero_variance_groups, 1);
    let m = compute_advantages(
        &rewards,
        g,
        &AdvantageConfig {
            estimator: AdvantageEstimator::MeanOnly,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(max_abs_diff(&m.values, &list(&f["advantages"]["none"])) < 1e-14);
}

#[test]
fn losses_and_gradients_equal_trls() {
    let f = fixture();
    let inp = &f["inputs"];
    let logps0 = t2(&rows(&inp["logps"]));
    let old = t2(&rows(&inp["old_logps"]));
    let reference = t2(&rows(&inp["ref_logps"]));
    let ent0 = t2(&rows(&inp["entropies"]));
    let mask = t2(&rows(&inp["mask"]));
    let b = list(&inp["rewards"]).len() as i64;
    let cases = f["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 7);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let loss_type = case["loss_type"].as_str().unwrap();
        let aggregation = match loss_type {
            "grpo" => Aggregation::SeqMeanTokenMean,
            "bnpo" | "dapo" => Aggregation::TokenMean,
            "dr_grpo" => Aggregation::Constant {
                length: Some(case["max_completion_length"].as_u64().unwrap() as usize),
            },
            other => panic!("{name}: unexpected loss type {other}"),
        };
        let cfg = LossConfig {
            ratio_level: match case["importance_sampling_level"].as_str().unwrap() {
                "token" => RatioLevel::Token,
                _ => RatioLevel::Sequence,
            },
            clip_low: case["epsilon_low"].as_f64().unwrap(),
            clip_high: case["epsilon_high"].as_f64().unwrap(),
            dual_clip: None,       // TRL has none
            log_ratio_clamp: None, // TRL does not clamp
            kl_coef: case["beta"].as_f64().unwrap(),
            kl_estimator: KlEstimator::K3,
            kl_clamp: None,
            aggregation,
            entropy_coef: case["entropy_coef"].as_f64().unwrap(),
        };
        // TRL's own advantages (see `advantages_equal_trls` for how ours compare), so that this
        // test pins the loss alone.
        let adv = Tensor::from_slice(&list(
            &f["advantages"][case["scale_rewards"].as_str().unwrap()],
        ));
        let on_policy = case["on_policy"].as_bool().unwrap();
        let k = case["micro_batches"].as_u64().unwrap() as i64;

        let logps = logps0.detach().set_requires_grad(true);
        let ent = ent0.detach().set_requires_grad(true);
        // One normalizer for the whole optimizer step, however it is split.
        let norm = StepNormalizer::from_masks(&[&mask]).unwrap();
        let chunk = (b + k - 1) / k;
        let mut total = Tensor::zeros([], (tch::Kind::Double, tch::Device::Cpu));
        let mut stats = LossStats::default();
        for start in (0..b).step_by(chunk as usize) {
            let n = chunk.min(b - start);
            let sl = |x: &Tensor| x.narrow(0, start, n);
            let (lp, en) = (sl(&logps), sl(&ent));
            let (o, r, m, a) = (sl(&old), sl(&reference), sl(&mask), sl(&adv));
            let out = grpo_loss(
                &LossInputs {
                    logprobs: &lp,
                    old_logprobs: if on_policy { None } else { Some(&o) },
                    ref_logprobs: Some(&r),
                    advantages: &a,
                    mask: &m,
                    entropy: Some(&en),
                },
                &cfg,
                &norm,
            )
            .unwrap();
            stats.merge(&out.stats);
            total += out.loss;
        }
        total.backward();
        let want = case["loss"].as_f64().unwrap();
        let got = total.double_value(&[]);
        assert!(
            (got - want).abs() < 1e-12,
            "{name}: loss {got} vs TRL {want}"
        );
        let dg = max_abs_diff(&values(&logps.grad()), &rows(&case["grad_logps"]).concat());
        assert!(dg < 1e-12, "{name}: d loss / d logps differs by {dg}");
        let ent_grad = if ent.grad().defined() {
            values(&ent.grad())
        } else {
            vec![0.0; ent.numel()]
        };
        let de = max_abs_diff(&ent_grad, &rows(&case["grad_entropies"]).concat());
        assert!(de < 1e-12, "{name}: d loss / d entropies differs by {de}");

        let metrics = case["metrics"].as_object().unwrap();
        if let Some(kl) = metrics.get("kl") {
            let kl = kl.as_f64().unwrap();
            assert!((stats.kl().unwrap() - kl).abs() < 1e-12, "{name}: kl");
        }
        if let Some(h) = metrics.get("entropy") {
            assert!(
                (stats.entropy().unwrap() - h.as_f64().unwrap()).abs() < 1e-12,
                "{name}: entropy"
            );
        }
        // TRL counts sequence-level clipping per sequence, this crate per token: compare the
        // token-level cases.
        if cfg.ratio_level == RatioLevel::Token && !metrics.is_empty() {
            let close = |key: &str, v: f64| {
                let w = metrics[key].as_f64().unwrap();
                assert!((v - w).abs() < 1e-12, "{name}: {key} {v} vs {w}");
            };
            close("clip_ratio/low_mean", stats.clip_low_fraction());
            close("clip_ratio/high_mean", stats.clip_high_fraction());
            close("clip_ratio/region_mean", stats.clip_fraction());
        }
    }
}
