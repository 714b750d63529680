//! Invariants of the GRPO objective, checked in f64.

use optimsyn_rl_grpo::{
    Aggregation, CategoricalPolicy, KlEstimator, LossConfig, LossInputs, Policy, RatioLevel,
    StepNormalizer, TokenBatch, grpo_loss, kl_estimate,
};
use proptest::prelude::*;
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};
use tch::{Kind, Tensor};

use crate::common::{max_abs_diff, values};

fn uniform(rng: &mut ChaCha8Rng, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * ((rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64)
}

/// A random micro-batch: `[B, T]` log-probs, old and reference log-probs, entropies, advantages
/// and a mask of the given lengths; ratios kept at least `gap` away from every kink of `cfg`.
struct Batch {
    logp: Vec<f64>,
    old: Vec<f64>,
    reference: Vec<f64>,
    entropy: Vec<f64>,
    adv: Vec<f64>,
    mask: Vec<f64>,
    b: usize,
    t: usize,
}

impl Batch {
    fn random(seed: u64, lengths: &[usize], t: usize, cfg: &LossConfig, gap: f64) -> Batch {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let b = lengths.len();
        let kinks = {
            let mut k = vec![1.0 - cfg.clip_low, 1.0 + cfg.clip_high];
            if let Some(c) = cfg.dual_clip {
                k.push(c);
            }
            k
        };
        let far = |r: f64| kinks.iter().all(|k| (r - k).abs() > gap);
        let mut x = Batch {
            logp: Vec::new(),
            old: Vec::new(),
            reference: Vec::new(),
            entropy: Vec::new(),
            adv: Vec::new(),
            mask: Vec::new(),
            b,
            t,
        };
        for (i, &len) in lengths.iter().enumerate() {
            x.adv.push(if i % 3 == 2 {
                -uniform(&mut rng, 0.2, 2.0)
            } else {
                uniform(&mut rng, -2.0, 2.0)
            });
            loop {
                let lp: Vec<f64> = (0..t).map(|_| uniform(&mut rng, -3.0, -0.05)).collect();
                // Log-ratios spread over the clip range and beyond (up to ratio ≈ 4.5).
                let lr: Vec<f64> = (0..t).map(|_| uniform(&mut rng, -0.6, 1.5)).collect();
                let seq = (lr[..len].iter().sum::<f64>() / len.max(1) as f64).exp();
                let ok = match cfg.ratio_level {
                    RatioLevel::Token => lr[..len].iter().all(|l| far(l.exp())),
                    RatioLevel::Sequence => far(seq),
                };
                if ok {
                    x.old.extend(lp.iter().zip(&lr).map(|(p, r)| p - r));
                    x.reference
                        .extend(lp.iter().map(|p| p + uniform(&mut rng, -1.0, 1.0)));
                    x.logp.extend(lp);
                    break;
                }
            }
            x.entropy
                .extend((0..t).map(|_| uniform(&mut rng, 0.0, 3.0)));
            x.mask
                .extend((0..t).map(|j| if j < len { 1.0 } else { 0.0 }));
        }
        x
    }

    fn tensor(&self, v: &[f64]) -> Tensor {
        Tensor::from_slice(v).view([self.b as i64, self.t as i64])
    }

    /// The loss at `logp` / `entropy` values (the other inputs fixed), with its gradients.
    fn loss(
        &self,
        cfg: &LossConfig,
        logp: &[f64],
        entropy: &[f64],
        norm: &StepNormalizer,
    ) -> (f64, Vec<f64>, Vec<f64>) {
        let lp = self.tensor(logp).set_requires_grad(true);
        let h = self.tensor(entropy).set_requires_grad(true);
        let (old, r, m) = (
            self.tensor(&self.old),
            self.tensor(&self.reference),
            self.tensor(&self.mask),
        );
        let a = Tensor::from_slice(&self.adv);
        let out = grpo_loss(
            &LossInputs {
                logprobs: &lp,
                old_logprobs: Some(&old),
                ref_logprobs: Some(&r),
                advantages: &a,
                mask: &m,
                entropy: Some(&h),
            },
            cfg,
            norm,
        )
        .unwrap();
        out.loss.backward();
        let grad = |t: &Tensor| {
            let g = t.grad();
            if g.defined() {
                values(&g)
            } else {
                vec![0.0; self.b * self.t]
            }
        };
        (out.loss.double_value(&[]), grad(&lp), grad(&h))
    }
}

fn configs() -> Vec<LossConfig> {
    let mut out = Vec::new();
    for ratio_level in [RatioLevel::Token, RatioLevel::Sequence] {
        for aggregation in [
            Aggregation::TokenMean,
            Aggregation::SeqMeanTokenMean,
            Aggregation::Constant { length: Some(7) },
        ] {
            for (kl_estimator, dual_clip) in [
                (KlEstimator::K3, Some(3.0)),
                (KlEstimator::K1, None),
                (KlEstimator::K2, Some(2.5)),
            ] {
                out.push(LossConfig {
                    ratio_level,
                    clip_low: 0.2,
                    clip_high: 0.28,
                    dual_clip,
                    kl_coef: 0.05,
                    kl_estimator,
                    aggregation,
                    entropy_coef: 0.01,
                    ..Default::default()
                });
            }
        }
    }
    out
}

#[test]
fn gradients_match_central_finite_differences_in_every_mode() {
    let lengths = [5, 2, 4, 1, 5, 3];
    let h = 1e-6;
    for (i, cfg) in configs().iter().enumerate() {
        let x = Batch::random(100 + i as u64, &lengths, 5, cfg, 0.02);
        let norm = StepNormalizer::from_lengths(lengths);
        let (_, g_lp, g_h) = x.loss(cfg, &x.logp, &x.entropy, &norm);
        for (which, base, grad) in [("logp", &x.logp, &g_lp), ("entropy", &x.entropy, &g_h)] {
            for k in 0..base.len() {
                let at = |d: f64| {
                    let mut v = base.clone();
                    v[k] += d;
                    let (lp, en) = if which == "logp" {
                        (v, x.entropy.clone())
                    } else {
                        (x.logp.clone(), v)
                    };
                    x.loss(cfg, &lp, &en, &norm).0
                };
                let fd = (at(h) - at(-h)) / (2.0 * h);
                let err = (fd - grad[k]).abs() / (1e-6 + fd.abs().max(grad[k].abs()));
                assert!(
                    err < 1e-5 || (fd - grad[k]).abs() < 1e-9,
                    "config {i} {cfg:?}: d/d{which}[{k}] autograd {} vs finite difference {fd}",
                    grad[k]
                );
            }
        }
    }
}

#[test]
fn gradients_through_a_policy_match_finite_differences() {
    // The toy policy in f64: logits → log_softmax at T = 1.5 → loss (ratio, KL, entropy).
    let policy = CategoricalPolicy::new(3, 5, 1.0, 7, Kind::Double).unwrap();
    let prompts: Vec<&[u32]> = vec![&[1]; 4];
    let comps: Vec<Vec<u32>> = vec![vec![0, 3, 1], vec![2], vec![4, 4], vec![1, 0, 2]];
    let batch = TokenBatch {
        prompts,
        completions: comps.iter().map(|c| c.as_slice()).collect(),
    };
    let mask = batch
        .completion_mask(Kind::Double, tch::Device::Cpu)
        .unwrap();
    let norm = StepNormalizer::from_masks(&[&mask]).unwrap();
    let adv = Tensor::from_slice(&[1.0f64, -0.5, 0.7, -1.2]);
    let temperature = 1.5;
    let (old, reference) = {
        let _g = tch::no_grad_guard();
        let lp = policy
            .logprobs(&batch, temperature, false)
            .unwrap()
            .logprobs;
        (&lp - 0.1, &lp + 0.3)
    };
    let cfg = LossConfig {
        kl_coef: 0.2,
        entropy_coef: 0.05,
        clip_high: 0.28,
        ..Default::default()
    };
    let loss_at = |logits: &Tensor| -> Tensor {
        let _g = tch::no_grad_guard();
        let mut p = policy.logits().shallow_clone();
        p.copy_(logits);
        drop(_g);
        let out = policy.logprobs(&batch, temperature, true).unwrap();
        grpo_loss(
            &LossInputs {
                logprobs: &out.logprobs,
                old_logprobs: Some(&old),
                ref_logprobs: Some(&reference),
                advantages: &adv,
                mask: &mask,
                entropy: out.entropy.as_ref(),
            },
            &cfg,
            &norm,
        )
        .unwrap()
        .loss
    };
    let base = policy.logits().detach().copy();
    let loss = loss_at(&base);
    loss.backward();
    let grad = values(&policy.logits().grad());
    let flat = values(&base);
    let h = 1e-6;
    for k in 0..flat.len() {
        let at = |d: f64| {
            let mut v = flat.clone();
            v[k] += d;
            loss_at(&Tensor::from_slice(&v).view([3, 5])).double_value(&[])
        };
        let fd = (at(h) - at(-h)) / (2.0 * h);
        assert!(
            (fd - grad[k]).abs() < 1e-8 + 1e-6 * fd.abs(),
            "logit {k}: autograd {} vs finite difference {fd}",
            grad[k]
        );
    }
}

#[test]
fn zero_advantage_gives_zero_policy_gradient() {
    for cfg in configs() {
        let lengths = [4, 2, 3];
        let mut x = Batch::random(5, &lengths, 4, &cfg, 0.0);
        x.adv = vec![0.0; 3];
        let norm = StepNormalizer::from_lengths(lengths);
        let no_kl = LossConfig {
            kl_coef: 0.0,
            entropy_coef: 0.0,
            ..cfg
        };
        let (v, g, _) = x.loss(&no_kl, &x.logp, &x.entropy, &norm);
        assert_eq!(v, 0.0, "{cfg:?}");
        assert!(g.iter().all(|&d| d == 0.0), "{cfg:?}: {g:?}");
        // With β > 0 only the KL gradient remains.
        let kl_only = LossConfig {
            entropy_coef: 0.0,
            ..cfg
        };
        let (_, g, _) = x.loss(&kl_only, &x.logp, &x.entropy, &norm);
        let lp = x.tensor(&x.logp).set_requires_grad(true);
        let kl = kl_estimate(
            &lp,
            &x.tensor(&x.reference),
            cfg.kl_estimator,
            cfg.log_ratio_clamp,
            cfg.kl_clamp,
        )
        .unwrap();
        let m = x.tensor(&x.mask);
        let lens = m.sum_dim_intlist(&[1i64][..], true, Kind::Double);
        let w = match cfg.aggregation {
            Aggregation::TokenMean => &m / norm.tokens,
            Aggregation::SeqMeanTokenMean => &m / &lens / norm.sequences,
            Aggregation::Constant { length } => &m / (norm.sequences * length.unwrap() as f64),
        };
        (kl * w * cfg.kl_coef).sum(Kind::Double).backward();
        assert!(max_abs_diff(&g, &values(&lp.grad())) < 1e-15, "{cfg:?}");
    }
}

#[test]
fn k3_is_zero_with_zero_gradient_at_the_reference() {
    let lp = Tensor::from_slice(&[-0.3f64, -2.0, -7.5]).set_requires_grad(true);
    let k = kl_estimate(&lp, &lp.detach(), KlEstimator::K3, Some(20.0), Some(10.0)).unwrap();
    assert!(values(&k).iter().all(|&v| v == 0.0));
    k.sum(Kind::Double).backward();
    assert!(values(&lp.grad()).iter().all(|&v| v == 0.0));
}

#[test]
fn micro_batch_without_step_normalizer_differs_when_lengths_are_uneven() {
    // Negative control for the property below: per-micro-batch token means, averaged.
    let cfg = LossConfig {
        kl_coef: 0.0,
        ..Default::default()
    };
    let lengths = [6, 1, 1, 1];
    let x = Batch::random(9, &lengths, 6, &cfg, 0.0);
    let global = StepNormalizer::from_lengths(lengths);
    let (full, _, _) = x.loss(&cfg, &x.logp, &x.entropy, &global);
    let part = |rows: std::ops::Range<usize>| {
        let y = sub_batch(&x, rows.clone());
        let norm = StepNormalizer::from_lengths(lengths[rows].iter().copied());
        y.loss(&cfg, &y.logp, &y.entropy, &norm).0
    };
    let mean_of_means = (part(0..2) + part(2..4)) / 2.0;
    assert!(
        (full - mean_of_means).abs() > 1e-3,
        "{full} vs {mean_of_means}"
    );
}

fn sub_batch(x: &Batch, rows: std::ops::Range<usize>) -> Batch {
    let t = x.t;
    let take = |v: &[f64]| v[rows.start * t..rows.end * t].to_vec();
    Batch {
        logp: take(&x.logp),
        old: take(&x.old),
        reference: take(&x.reference),
        entropy: take(&x.entropy),
        adv: x.adv[rows.clone()].to_vec(),
        mask: take(&x.mask),
        b: rows.len(),
        t,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Splitting an optimizer step into micro-batches (of uneven lengths), each normalized by the
    /// step's counts, gives the loss and gradient of the whole batch.
    #[test]
    fn micro_batches_sum_to_the_full_batch(
        lengths in proptest::collection::vec(0usize..7, 2..9),
        cut in 1usize..8,
        cfg_index in 0usize..18,
        seed in 0u64..1000,
    ) {
        prop_assume!(lengths.iter().any(|&l| l > 0));
        let cut = cut.min(lengths.len() - 1).max(1);
        let cfg = configs()[cfg_index];
        let t = 6;
        let x = Batch::random(seed, &lengths, t, &cfg, 0.0);
        let norm = StepNormalizer::from_lengths(lengths.iter().copied());
        let (full, g_full, h_full) = x.loss(&cfg, &x.logp, &x.entropy, &norm);
        let (a, b) = (sub_batch(&x, 0..cut), sub_batch(&x, cut..lengths.len()));
        let (la, ga, ha) = a.loss(&cfg, &a.logp, &a.entropy, &norm);
        let (lb, gb, hb) = b.loss(&cfg, &b.logp, &b.entropy, &norm);
        prop_assert!((full - (la + lb)).abs() < 1e-12, "{} vs {}", full, la + lb);
        prop_assert!(max_abs_diff(&g_full, &[ga, gb].concat()) < 1e-12);
        prop_assert!(max_abs_diff(&h_full, &[ha, hb].concat()) < 1e-12);
    }

    /// Extra padding columns holding NaN change neither the loss nor the gradient.
    #[test]
    fn padding_is_inert(
        lengths in proptest::collection::vec(1usize..5, 1..5),
        extra in 1usize..4,
        cfg_index in 0usize..18,
        seed in 0u64..1000,
    ) {
        let cfg = configs()[cfg_index];
        let t = 4;
        let x = Batch::random(seed, &lengths, t, &cfg, 0.0);
        let norm = StepNormalizer::from_lengths(lengths.iter().copied());
        let (l0, g0, _) = x.loss(&cfg, &x.logp, &x.entropy, &norm);
        let wide = t + extra;
        let pad = |v: &[f64], fill: f64| -> Vec<f64> {
            v.chunks(t).flat_map(|r| r.iter().copied().chain(std::iter::repeat_n(fill, extra))).collect()
        };
        let y = Batch {
            logp: pad(&x.logp, f64::NAN),
            old: pad(&x.old, f64::NAN),
            reference: pad(&x.reference, f64::INFINITY),
            entropy: pad(&x.entropy, f64::NAN),
            adv: x.adv.clone(),
            mask: pad(&x.mask, 0.0),
            b: x.b,
            t: wide,
        };
        let (l1, g1, _) = y.loss(&cfg, &y.logp, &y.entropy, &norm);
        prop_assert!((l0 - l1).abs() < 1e-14, "{} vs {}", l0, l1);
        let g1: Vec<f64> = g1.chunks(wide).flat_map(|r| r[..t].to_vec()).collect();
        prop_assert!(max_abs_diff(&g0, &g1) < 1e-15);
    }

    /// k3 ≥ 0 (and k2 ≥ 0) for any log-probs.
    #[test]
    fn k3_and_k2_are_nonnegative(
        lp in proptest::collection::vec(-30.0f64..0.0, 1..20),
        shift in proptest::collection::vec(-25.0f64..25.0, 20),
    ) {
        let n = lp.len();
        let reference: Vec<f64> = lp.iter().zip(&shift).map(|(a, d)| a + d).collect();
        let a = Tensor::from_slice(&lp);
        let r = Tensor::from_slice(&reference[..n]);
        for e in [KlEstimator::K3, KlEstimator::K2] {
            for clamps in [(Some(20.0), Some(10.0)), (None, None)] {
                let k = values(&kl_estimate(&a, &r, e, clamps.0, clamps.1).unwrap());
                prop_assert!(k.iter().all(|&v| v >= 0.0), "{:?}: {:?}", e, k);
            }
        }
    }
}
