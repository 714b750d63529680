//! On a CUDA machine: generation there gives the CPU's greedy tokens, and token choice on the
//! device (`sample_rows`) gives the host rule's tokens on the same log-probs. A CPU-only machine
//! has nothing to compare and says so in one line.

use optimsyn_lm::tch::{Device, Kind, Tensor};
use optimsyn_lm::{CausalLm, LoadOptions, RowRng, SamplingParams, row_key, sample, sample_rows};

use crate::common::*;

fn cuda_or_skip(what: &str) -> bool {
    let ok = optimsyn_lm::tch::Cuda::is_available();
    if !ok {
        eprintln!("no CUDA device: the {what} check is skipped on this machine");
    }
    ok
}

#[test]
fn greedy_generation_on_cuda_gives_the_cpu_tokens() {
    if !cuda_or_skip("cpu-vs-cuda generation") {
        return;
    }
    for name in ["qwen3_kv1_sharded", "llama_rope3"] {
        let cpu = load(name);
        let gpu = CausalLm::load(
            fixture(name),
            LoadOptions {
                device: Device::Cuda(0),
                ..LoadOptions::default()
            },
        )
        .expect("load on cuda");
        let prompts: Vec<Vec<u32>> = (0..6u32)
            .map(|i| (0..1 + 3 * i).map(|j| 3 + (i * 5 + j * 11) % 60).collect())
            .collect();
        let rows: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
        let keys: Vec<u64> = (0..6).map(|i| row_key(&format!("r{i}"))).collect();
        let params = SamplingParams {
            stop_tokens: vec![7],
            ..SamplingParams::greedy(16)
        };
        let a = cpu.generate(&rows, &keys, &params).expect("cpu");
        let b = gpu.generate(&rows, &keys, &params).expect("cuda");
        for (i, (a, b)) in a.iter().zip(&b).enumerate() {
            assert_eq!(a.tokens, b.tokens, "{name} row {i}");
            assert_eq!(a.finish_reason, b.finish_reason, "{name} row {i}");
            assert!(
                max_abs_diff(&a.logprobs, &b.logprobs) < 1e-4,
                "{name} row {i}"
            );
        }
    }
}

#[test]
fn token_choice_on_cuda_equals_the_host_rule() {
    if !cuda_or_skip("cuda token choice") {
        return;
    }
    let (rows, vocab) = (16i64, 151_936i64);
    optimsyn_lm::tch::manual_seed(11);
    let lp = (Tensor::randn([rows, vocab], (Kind::Float, Device::Cpu)) * 3.0)
        .log_softmax(-1, Kind::Float);
    let flat = Vec::<f32>::try_from(&lp.view([-1])).expect("log-probs");
    for (top_k, top_p) in [(0, 1.0), (0, 0.9), (50, 1.0), (50, 0.7)] {
        for seed in 0..4u64 {
            let u: Vec<f64> = (0..rows as u64)
                .map(|i| RowRng::new(seed, i).uniform())
                .collect();
            let on_cuda = sample_rows(
                &lp.to_device(Device::Cuda(0)),
                top_k,
                top_p,
                &Tensor::from_slice(&u).to_device(Device::Cuda(0)),
            )
            .expect("sample_rows");
            let on_cuda = Vec::<i64>::try_from(&on_cuda.to_device(Device::Cpu)).expect("ids");
            // The GPU's cumulative sums add in another order: a draw within ~1e-15 of a boundary
            // may pick the neighbour; none of these 256 rows should.
            for i in 0..rows as usize {
                let row = &flat[i * vocab as usize..(i + 1) * vocab as usize];
                let host = sample(row, top_k, top_p, &mut RowRng::new(seed, i as u64));
                assert_eq!(
                    on_cuda[i] as usize, host,
                    "top_k {top_k} top_p {top_p} seed {seed} row {i}"
                );
            }
        }
    }
}
