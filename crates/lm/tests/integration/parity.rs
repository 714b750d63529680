//! Parity with transformers on the committed fixtures (fp32): per-token log-probs within 1e-4,
//! greedy generations token-identical, and padded batches equal to single rows.

use optimsyn_lm::{CausalLm, LoadOptions, SamplingParams};
use tch::{Kind, Tensor};

use crate::common::*;

const TOL: f32 = 1e-4;

fn sequences(name: &str) -> (Vec<Vec<u32>>, Vec<Vec<f32>>) {
    let exp = expected(name);
    let seqs = exp["sequences"]
        .as_array()
        .expect("sequences")
        .iter()
        .map(ids)
        .collect();
    let lps = exp["logprobs"]
        .as_array()
        .expect("logprobs")
        .iter()
        .map(floats)
        .collect();
    (seqs, lps)
}

#[test]
fn logprobs_match_transformers_one_row_at_a_time() {
    for name in PARITY {
        let model = load(name);
        let (seqs, want) = sequences(name);
        for (s, w) in seqs.iter().zip(&want) {
            let got = model
                .sequence_logprobs(&[s.as_slice()], 1.0)
                .expect("logprobs");
            let d = max_abs_diff(&got[0], w);
            assert!(d < TOL, "{name}: len {} max |Δ| = {d}", s.len());
        }
        // The fixtures are not near-uniform: a broken op would move log-probs by far more than TOL.
        let spread = want.iter().flatten().fold(0.0f32, |m, x| m.max(-x));
        assert!(spread > 5.0, "{name}: log-probs too flat ({spread})");
    }
}

#[test]
fn padded_batches_equal_single_rows() {
    for name in PARITY {
        let model = load(name);
        let (seqs, want) = sequences(name);
        let rows: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
        // Mixed lengths, right-padded, in two orders.
        let got = model.sequence_logprobs(&rows, 1.0).expect("batched");
        let mut rev = rows.clone();
        rev.reverse();
        let got_rev = model
            .sequence_logprobs(&rev, 1.0)
            .expect("batched, reversed");
        for (i, w) in want.iter().enumerate() {
            assert!(max_abs_diff(&got[i], w) < TOL, "{name} row {i}");
            assert!(
                max_abs_diff(&got_rev[rows.len() - 1 - i], w) < TOL,
                "{name} row {i} (reversed)"
            );
        }
    }
}

#[test]
fn left_padding_gives_the_same_logits_as_no_padding() {
    let model = load("qwen3_tied_gqa");
    let (seqs, _) = sequences("qwen3_tied_gqa");
    let (short, long) = (&seqs[1], &seqs[3]);
    let pad = long.len() - short.len();
    let mut ids = vec![0i64; pad];
    ids.extend(short.iter().map(|&t| i64::from(t)));
    ids.extend(long.iter().map(|&t| i64::from(t)));
    let mut mask = vec![0i64; pad];
    mask.extend(std::iter::repeat_n(1i64, short.len() + long.len()));
    let w = long.len() as i64;
    let ids = Tensor::from_slice(&ids).view([2, w]);
    let mask = Tensor::from_slice(&mask).view([2, w]);
    let batched = model.forward(&ids, Some(&mask), None).expect("forward");
    let alone = model
        .forward(
            &ids.narrow(0, 0, 1)
                .narrow(1, pad as i64, short.len() as i64),
            None,
            None,
        )
        .expect("fw");
    let d = (batched
        .narrow(0, 0, 1)
        .narrow(1, pad as i64, short.len() as i64)
        - alone)
        .abs()
        .max()
        .double_value(&[]);
    assert!(d < 1e-4, "left-padded row differs by {d}");
    assert_eq!(
        batched.isfinite().all().int64_value(&[]),
        1,
        "padding rows produced non-finite logits"
    );
}

#[test]
fn greedy_generation_matches_transformers_and_batching() {
    for name in PARITY {
        let model = load(name);
        let exp = expected(name);
        let max_new = exp["max_new_tokens"].as_u64().expect("max_new_tokens") as usize;
        let mut params = SamplingParams::greedy(max_new);
        params.stop_tokens = model.eos_token_ids().to_vec();
        assert_eq!(
            params.stop_tokens,
            vec![2],
            "{name}: stop ids from config/generation_config"
        );
        let cases = exp["greedy"].as_array().expect("greedy");
        let prompts: Vec<Vec<u32>> = cases.iter().map(|c| ids(&c["prompt"])).collect();
        let rows: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
        let keys: Vec<u64> = (0..rows.len() as u64).collect();
        let batched = model
            .generate(&rows, &keys, &params)
            .expect("batched generate");
        for (i, c) in cases.iter().enumerate() {
            let one = model
                .generate(&rows[i..=i], &keys[i..=i], &params)
                .expect("generate");
            let want = ids(&c["tokens"]);
            assert_eq!(one[0].tokens, want, "{name} prompt {i}: tokens");
            assert_eq!(
                batched[i].tokens, want,
                "{name} prompt {i}: tokens in a left-padded batch"
            );
            let wl = floats(&c["logprobs"]);
            assert!(
                max_abs_diff(&one[0].logprobs, &wl) < TOL,
                "{name} prompt {i}: log-probs"
            );
            assert!(
                max_abs_diff(&batched[i].logprobs, &wl) < TOL,
                "{name} prompt {i}: batched log-probs"
            );
        }
    }
}

#[test]
fn kv_cache_steps_equal_a_full_forward() {
    let model = load("llama_rope3");
    let (seqs, _) = sequences("llama_rope3");
    let s: Vec<i64> = seqs[4].iter().map(|&t| i64::from(t)).collect();
    let n = s.len() as i64;
    let full = model
        .forward(&Tensor::from_slice(&s).view([1, n]), None, None)
        .expect("full");
    let mut cache = model.new_cache(1, 4).expect("cache"); // grows as needed
    let prefix = 7;
    let mut parts = vec![
        model
            .forward(
                &Tensor::from_slice(&s[..prefix as usize]).view([1, prefix]),
                None,
                Some(&mut cache),
            )
            .expect("prefix"),
    ];
    // Chunked prefill (3 tokens), then single tokens.
    parts.push(
        model
            .forward(
                &Tensor::from_slice(&s[7..10]).view([1, 3]),
                None,
                Some(&mut cache),
            )
            .expect("chunk"),
    );
    for i in 10..n as usize {
        parts.push(
            model
                .forward(
                    &Tensor::from_slice(&s[i..=i]).view([1, 1]),
                    None,
                    Some(&mut cache),
                )
                .expect("step"),
        );
    }
    assert_eq!(cache.len(), n as usize);
    let inc = Tensor::cat(&parts, 1);
    let d = (inc - full).abs().max().double_value(&[]);
    assert!(
        d < 1e-4,
        "incremental decoding differs from the full forward by {d}"
    );
}

#[test]
fn reduced_precision_loads_and_stays_close() {
    let (seqs, want) = sequences("qwen3_tied_gqa");
    let model = CausalLm::load(
        fixture("qwen3_tied_gqa"),
        LoadOptions {
            kind: Kind::BFloat16,
            ..Default::default()
        },
    )
    .expect("bf16 load");
    assert_eq!(model.embed_tokens().kind(), Kind::BFloat16);
    let got = model
        .sequence_logprobs(&[seqs[2].as_slice()], 1.0)
        .expect("bf16 logprobs");
    let d = max_abs_diff(&got[0], &want[2]);
    assert!(d < 0.3, "bf16 log-probs differ by {d}");
}

#[test]
fn token_logprobs_are_differentiable() {
    // f64 weights: the analytic gradient of the summed log-prob matches a central difference.
    let mut model = CausalLm::load(
        fixture("qwen3_tied_gqa"),
        LoadOptions {
            kind: Kind::Double,
            ..Default::default()
        },
    )
    .expect("f64 load");
    let (seqs, _) = sequences("qwen3_tied_gqa");
    let s: Vec<i64> = seqs[2].iter().map(|&t| i64::from(t)).collect();
    let ids = Tensor::from_slice(&s).view([1, s.len() as i64]);
    let w = model.linear_layers_mut()[0]
        .weight()
        .set_requires_grad(true);
    let lp = model
        .token_logprobs(&ids, None, 0.7)
        .expect("logprobs")
        .sum(Kind::Double);
    lp.backward();
    let g = w.grad().double_value(&[3, 5]);
    assert!(g.abs() > 1e-6, "gradient is zero");
    let eps = 1e-6;
    let f = |delta: f64| {
        tch::no_grad(|| {
            let _ = w.get(3).get(5).f_add_scalar_(delta).expect("perturb");
        });
        let v = tch::no_grad(|| {
            model
                .token_logprobs(&ids, None, 0.7)
                .expect("lp")
                .sum(Kind::Double)
                .double_value(&[])
        });
        tch::no_grad(|| {
            let _ = w.get(3).get(5).f_sub_scalar_(delta).expect("restore");
        });
        v
    };
    let fd = (f(eps) - f(-eps)) / (2.0 * eps);
    assert!(
        (fd - g).abs() < 1e-5 * g.abs().max(1.0),
        "autograd {g} vs finite difference {fd}"
    );
}
