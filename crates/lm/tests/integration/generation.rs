//! Sampling: seeded rows are identical at batch 1 and 8, log-probs are those of
//! `log_softmax(logits / T)`, stop tokens and budgets end rows.

use optimsyn_lm::{FinishReason, SamplingParams, row_key};

use crate::common::*;

fn prompts() -> Vec<Vec<u32>> {
    (0..8u32)
        .map(|i| {
            (0..(1 + 3 * i as usize % 11))
                .map(|j| 3 + ((i * 7 + j as u32 * 13) % 60))
                .collect()
        })
        .collect()
}

fn sampling(seed: u64) -> SamplingParams {
    SamplingParams {
        max_new_tokens: 10,
        temperature: 1.3,
        top_p: 0.9,
        top_k: 20,
        seed,
        stop_tokens: vec![2],
    }
}

#[test]
fn seeded_sampling_is_identical_at_batch_1_and_8() {
    for name in ["qwen3_kv1_sharded", "llama_rope3"] {
        let model = load(name);
        let prompts = prompts();
        let rows: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
        let keys: Vec<u64> = (0..8).map(|i| row_key(&format!("row-{i}"))).collect();
        let params = sampling(42);
        let batch8 = model.generate(&rows, &keys, &params).expect("batch 8");
        for i in 0..8 {
            let one = model
                .generate(&rows[i..=i], &keys[i..=i], &params)
                .expect("batch 1");
            assert_eq!(one[0].tokens, batch8[i].tokens, "{name} row {i}");
            assert!(
                max_abs_diff(&one[0].logprobs, &batch8[i].logprobs) < 1e-4,
                "{name} row {i}"
            );
        }
        // A batch in another order, split 3 + 5, gives the same rows.
        let order = [5usize, 0, 7, 2, 1, 6, 3, 4];
        let r: Vec<&[u32]> = order.iter().map(|&i| rows[i]).collect();
        let k: Vec<u64> = order.iter().map(|&i| keys[i]).collect();
        let mut shuffled = model.generate(&r[..3], &k[..3], &params).expect("3");
        shuffled.extend(model.generate(&r[3..], &k[3..], &params).expect("5"));
        for (j, &i) in order.iter().enumerate() {
            assert_eq!(
                shuffled[j].tokens, batch8[i].tokens,
                "{name} row {i} reordered"
            );
        }
        // Another seed changes something.
        let other = model
            .generate(&rows, &keys, &sampling(43))
            .expect("seed 43");
        assert!(
            other.iter().zip(&batch8).any(|(a, b)| a.tokens != b.tokens),
            "{name}: seed ignored"
        );
    }
}

#[test]
fn sampled_logprobs_are_log_softmax_at_the_temperature() {
    let model = load("qwen2_tied_gqa");
    let prompt: Vec<u32> = vec![5, 9, 17, 33];
    let params = SamplingParams {
        top_k: 5,
        top_p: 0.8,
        ..sampling(7)
    };
    let out = model
        .generate(&[prompt.as_slice()], &[1], &params)
        .expect("generate");
    let g = &out[0];
    assert_eq!(g.tokens.len(), g.logprobs.len());
    let mut seq = prompt.clone();
    seq.extend(&g.tokens);
    // Rescoring the whole sequence at T gives the sampled tokens' log-probs (full vocabulary).
    let rescored = model
        .sequence_logprobs(&[seq.as_slice()], params.temperature)
        .expect("rescore");
    let tail = &rescored[0][prompt.len() - 1..];
    assert!(
        max_abs_diff(tail, &g.logprobs) < 1e-4,
        "{tail:?} vs {:?}",
        g.logprobs
    );
}

#[test]
fn stop_tokens_and_budgets_end_rows() {
    let model = load("qwen3_tied_gqa");
    let prompt: Vec<u32> = vec![7, 8, 9];
    let free = model
        .generate(&[prompt.as_slice()], &[0], &SamplingParams::greedy(6))
        .expect("greedy");
    assert_eq!(free[0].tokens.len(), 6);
    assert_eq!(free[0].finish_reason, FinishReason::Length);
    // Stopping at the third greedy token keeps it as the last token.
    let stop = free[0].tokens[2];
    let first = free[0]
        .tokens
        .iter()
        .position(|&t| t == stop)
        .expect("present");
    let params = SamplingParams {
        stop_tokens: vec![stop],
        ..SamplingParams::greedy(6)
    };
    let out = model
        .generate(&[prompt.as_slice(), &[4, 5]], &[0, 1], &params)
        .expect("stop");
    assert_eq!(out[0].tokens, free[0].tokens[..=first].to_vec());
    assert_eq!(out[0].finish_reason, FinishReason::Stop);
    // top-k 1 is greedy whatever the temperature.
    let k1 = SamplingParams {
        top_k: 1,
        temperature: 2.0,
        ..SamplingParams::greedy(6)
    };
    assert_eq!(
        model.generate(&[prompt.as_slice()], &[9], &k1).expect("k1")[0].tokens,
        free[0].tokens
    );
    // Zero budget: nothing.
    let none = model
        .generate(&[prompt.as_slice()], &[0], &SamplingParams::greedy(0))
        .expect("0");
    assert!(none[0].tokens.is_empty());
}

#[test]
fn generation_stops_at_the_end_of_the_context() {
    let model = load("qwen3_tied_gqa");
    let ctx = model.config().max_position_embeddings;
    let long: Vec<u32> = (0..ctx - 3).map(|i| 3 + (i % 50) as u32).collect();
    let out = model
        .generate(
            &[long.as_slice(), &[4, 5]],
            &[0, 1],
            &SamplingParams::greedy(10),
        )
        .expect("generate");
    assert_eq!(out[0].tokens.len(), 3);
    assert_eq!(out[0].finish_reason, FinishReason::Length);
    assert_eq!(out[1].tokens.len(), 10);
}
