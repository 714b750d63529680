//! SFT training throughput on the bench model (`benches/bench-model/`): tokens/s of
//! `optimsyn_lm::sft::train` with a LoRA r 128 / alpha 512 adapter on q/k/v/o (dropout 0; PEFT's
//! init, seed 0), AdamW (lr 1e-4, the default linear schedule with 3 % warm-up, gradient clipping
//! at 1.0), 8 rows of 256 random tokens per optimizer step (every token a loss token, one
//! micro-batch), fp32 on the CPU with 2 threads (`THREADS` overrides). The Python side of the
//! comparison (transformers + PEFT, the same shapes, a plain AdamW loop) is in
//! `python/bench/sft_compare.py`, which runs both in one go.
//!
//! Tokens/s counts the input tokens of a step (8 × 256) over the step's time as `train` reports
//! it (`StepMetrics::seconds`: forward, backward, clipping, the AdamW step and the metrics row;
//! not the checkpoint written at the end). The first step is a warm-up and is not counted.
//!
//! FLOPs per input token (the base is frozen, so its backward computes input gradients only, no
//! weight gradients): `4·N_w + 6·P_lora + 3·A`, with `N_w` the decoder's projection weights plus
//! the tied output head (29,360,128 here), `P_lora` the adapter's parameters (3,670,016) and
//! `A = 4·L·q·ctx` the attention scores and values of a token over its causal context
//! (`ctx = (S+1)/2` on average, `q` = query heads × head_dim); backward ≈ 2× forward for attention.
//! The conventional `6·N·T` (N = every parameter) is reported too: it overcounts by the frozen
//! weights' gradients.
//!
//! Modes:
//! - `cargo bench -p optimsyn-examples --bench sft`: criterion, full shapes (`sft/lora_step/8x256`,
//!   each iteration one optimizer step timed as above; `reference/matmul_f32/…` a plain matmul of
//!   the forward's MLP shape, `[2048, 512] · [512, 1536]`, and a 2048³ one, in FLOPs).
//! - `cargo test -p optimsyn-examples --benches` (criterion's test mode): one step on the demo's
//!   tiny target (r 8, 2 rows of 16 tokens), proving it works.
//! - `OPTIMSYN_BENCH_JSON=1`: no criterion; one JSON object (`WHICH=train,matmul`, default both;
//!   `prepare` only writes the bench model and prints its folder); `STEPS` (default 6, the first a
//!   warm-up), `BATCH`, `SEQ` override the sizes.

use std::cell::OnceCell;
use std::env;
use std::hint::black_box;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use optimsyn_data_io::ModelConfig;
use optimsyn_examples::bench::{matmul_operands, proc_status_mib, round, threads};
use optimsyn_lm::sft::{self, SftConfig};
use optimsyn_lm::{
    CausalLm, DataInfo, LoadOptions, LoraAdapter, LoraConfig, TrainExample, Trainable,
};
use serde_json::{Map, Value, json};
use tch::{Device, Kind, Tensor};

/// Workload sizes: the in benchmark mode, tiny ones in criterion's test mode.
#[derive(Debug, Clone, Copy)]
struct Shapes {
    /// The bench model (else the demo's tiny target).
    bench_model: bool,
    lora_r: usize,
    lora_alpha: f64,
    batch: usize,
    seq: usize,
    steps: usize,
    /// `[m, k] · [k, n]` of the model-shaped matmul.
    matmul: (i64, i64, i64),
    /// Side of the square matmul.
    square: i64,
}

const FULL: Shapes = Shapes {
    bench_model: true,
    lora_r: 128,
    lora_alpha: 512.0,
    batch: 8,
    seq: 256,
    steps: 6,
    matmul: (2048, 512, 1536),
    square: 2048,
};

const SMOKE: Shapes = Shapes {
    bench_model: false,
    lora_r: 8,
    lora_alpha: 16.0,
    batch: 2,
    seq: 16,
    steps: 2,
    matmul: (64, 64, 64),
    square: 96,
};

/// FLOPs per input token of a LoRA training step (see the module docs), and of `6·N`.
fn flops_per_token(c: &ModelConfig, lora_params: f64, all_params: f64, seq: usize) -> (f64, f64) {
    let (h, i, l, v) = (
        c.hidden_size as f64,
        c.intermediate_size as f64,
        c.num_hidden_layers as f64,
        c.vocab_size as f64,
    );
    let (q, kv) = (
        (c.num_attention_heads * c.head_dim) as f64,
        (c.num_key_value_heads * c.head_dim) as f64,
    );
    let weights = l * (h * (q + 2.0 * kv) + q * h + 3.0 * h * i) + v * h;
    let ctx = (seq as f64 + 1.0) / 2.0;
    let attention = l * 4.0 * q * ctx;
    (
        4.0 * weights + 6.0 * lora_params + 3.0 * attention,
        6.0 * (all_params + lora_params),
    )
}

struct Bench {
    model: CausalLm,
    adapter: LoraAdapter,
    dir: PathBuf,
    lora_params: i64,
    all_params: i64,
    vocab: i64,
    /// Runs so far (each trains into a fresh folder).
    runs: usize,
    out: tempfile::TempDir,
}

fn load(s: Shapes) -> Result<Bench, String> {
    let dir = if s.bench_model {
        optimsyn_examples::bench_model_dir()?
    } else {
        optimsyn_examples::demo_dir().join("models/target")
    };
    let mut model = CausalLm::load(&dir, LoadOptions::default())
        .map_err(|e| format!("loading {}: {e}", dir.display()))?;
    let all_params = model
        .named_parameters()
        .iter()
        .map(|(_, t)| t.numel() as i64)
        .sum();
    let adapter = LoraAdapter::init(
        &mut model,
        LoraConfig {
            r: s.lora_r,
            alpha: s.lora_alpha,
            dropout: 0.0,
            ..Default::default()
        },
        0,
    )
    .map_err(|e| e.to_string())?;
    let vocab = model.config().vocab_size as i64;
    Ok(Bench {
        lora_params: adapter.num_parameters(),
        model,
        adapter,
        dir,
        all_params,
        vocab,
        runs: 0,
        out: tempfile::tempdir().map_err(|e| format!("temporary folder: {e}"))?,
    })
}

/// `rows` rows of `len` seeded random ids in `[3, vocab)`, every token a loss token.
fn random_examples(rows: usize, len: usize, vocab: i64, seed: i64) -> Vec<TrainExample> {
    tch::manual_seed(seed);
    let t = Tensor::randint_low(3, vocab, [(rows * len) as i64], (Kind::Int64, Device::Cpu));
    let flat = Vec::<i64>::try_from(&t).expect("random ids");
    flat.chunks(len)
        .enumerate()
        .map(|(i, c)| TrainExample {
            id: format!("row-{i}"),
            tokens: c.iter().map(|&x| x as u32).collect(),
            loss_mask: vec![1; len],
            subtask: None,
        })
        .collect()
}

/// What one `train` call measured.
struct Run {
    /// `StepMetrics::seconds` of every step.
    step_s: Vec<f64>,
    /// The whole call (set-up, steps, the final checkpoint).
    wall_s: f64,
    last_loss: f64,
}

/// Trains `steps` optimizer steps of `batch` rows of `seq` tokens into a fresh folder.
fn train(b: &mut Bench, s: Shapes, steps: usize) -> Run {
    let data = random_examples(steps * s.batch, s.seq, b.vocab, b.runs as i64);
    b.runs += 1;
    let cfg = SftConfig {
        lr: 1e-4,
        batch_size: s.batch,
        max_batch_tokens: (s.batch * s.seq).max(4096),
        ..Default::default()
    };
    let out = b.out.path().join(format!("run-{}", b.runs));
    let mut step_s = Vec::with_capacity(steps);
    let t = Instant::now();
    let report = sft::train(
        &mut b.model,
        Trainable::Lora(&b.adapter),
        &data,
        &cfg,
        &DataInfo::default(),
        &out,
        &mut |m| {
            assert_eq!(m.micro_batches, 1, "one micro-batch per step");
            step_s.push(m.seconds);
        },
    )
    .expect("sft::train");
    let wall_s = t.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(&out);
    let last_loss = report.last_loss.unwrap_or(f64::NAN);
    assert!(last_loss.is_finite(), "loss {last_loss}");
    Run {
        step_s,
        wall_s,
        last_loss,
    }
}

fn bench_cell(cell: &OnceCell<std::cell::RefCell<Bench>>, s: Shapes) -> &std::cell::RefCell<Bench> {
    cell.get_or_init(|| std::cell::RefCell::new(load(s).unwrap_or_else(|e| panic!("{e}"))))
}

fn criterion_benches(c: &mut Criterion, s: Shapes) {
    let cell = &OnceCell::new();
    {
        let mut g = c.benchmark_group("sft");
        g.sample_size(10)
            .warm_up_time(Duration::from_secs(5))
            .measurement_time(Duration::from_secs(30));
        g.throughput(Throughput::Elements((s.batch * s.seq) as u64));
        g.bench_function(format!("lora_step/{}x{}", s.batch, s.seq), |bch| {
            let b = bench_cell(cell, s);
            // `iters` optimizer steps in one run, timed by the steps' own clocks.
            bch.iter_custom(|iters| {
                let run = train(&mut b.borrow_mut(), s, iters as usize);
                Duration::from_secs_f64(run.step_s.iter().sum())
            })
        });
        g.finish();
    }
    let _guard = tch::no_grad_guard();
    let mut g = c.benchmark_group("reference");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for (m, k, n) in [s.matmul, (s.square, s.square, s.square)] {
        g.throughput(Throughput::Elements((2 * m * k * n) as u64));
        let mut ops = None;
        g.bench_function(format!("matmul_f32/{m}x{k}x{n}"), |bch| {
            let (a, w) = ops.get_or_insert_with(|| matmul_operands(m, k, n));
            bch.iter(|| black_box(a.matmul(w)))
        });
    }
    g.finish();
}

// ---- JSON mode (for python/bench/sft_compare.py) ----

fn best_of(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..reps.max(1))
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn env_usize(name: &str) -> Option<usize> {
    env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .filter(|&n| n > 0)
}

fn json_mode() -> Result<(), String> {
    let which: Vec<String> = env::var("WHICH")
        .unwrap_or_else(|_| "train,matmul".into())
        .split(',')
        .map(|s| s.trim().to_string())
        .collect();
    let has = |w: &str| which.iter().any(|x| x == w);
    let mut s = FULL;
    s.steps = env_usize("STEPS").unwrap_or(s.steps).max(2);
    s.batch = env_usize("BATCH").unwrap_or(s.batch);
    s.seq = env_usize("SEQ").unwrap_or(s.seq);
    let n = threads();
    tch::set_num_threads(n);
    let mut out = Map::new();
    let mut put = |k: &str, v: Value| {
        out.insert(k.to_string(), v);
    };
    put("side", json!("optimsyn"));
    put("threads", json!(n));
    if has("prepare") {
        let dir = optimsyn_examples::bench_model_dir()?;
        put("model_dir", json!(dir.display().to_string()));
        println!("{}", Value::Object(out));
        return Ok(());
    }
    put("batch", json!(s.batch));
    put("seq", json!(s.seq));
    if has("train") {
        let mut b = load(s)?;
        put("model_dir", json!(b.dir.display().to_string()));
        put("params", json!(b.all_params));
        put("lora_params", json!(b.lora_params));
        put(
            "rss_after_load_mib",
            json!(proc_status_mib("VmRSS:").map(|x| round(x, 1))),
        );
        let run = train(&mut b, s, s.steps);
        let tokens = (s.batch * s.seq) as f64;
        // The first step warms up (allocator, autograd graph, libtorch's kernels); not counted.
        let counted = &run.step_s[1..];
        let best = counted.iter().copied().fold(f64::INFINITY, f64::min);
        let mean = counted.iter().sum::<f64>() / counted.len() as f64;
        let (fpt, fpt_6n) = flops_per_token(
            b.model.config(),
            b.lora_params as f64,
            b.all_params as f64,
            s.seq,
        );
        put("steps", json!(s.steps));
        put(
            "step_s",
            json!(run.step_s.iter().map(|&x| round(x, 4)).collect::<Vec<_>>()),
        );
        put("train_wall_s", json!(round(run.wall_s, 3)));
        put("last_loss", json!(run.last_loss));
        put("best_tok_s", json!(round(tokens / best, 1)));
        put("mean_tok_s", json!(round(tokens / mean, 1)));
        put(
            "wall_tok_s",
            json!(round(tokens * s.steps as f64 / run.wall_s, 1)),
        );
        put("flops_per_token", json!(fpt));
        put("flops_per_token_6n", json!(fpt_6n));
        put("best_gflop_s", json!(round(fpt * tokens / best / 1e9, 1)));
        put(
            "best_gflop_s_6n",
            json!(round(fpt_6n * tokens / best / 1e9, 1)),
        );
    }
    if has("matmul") {
        let _guard = tch::no_grad_guard();
        for (name, (m, k, nn)) in [
            ("matmul", s.matmul),
            ("matmul_square", (s.square, s.square, s.square)),
        ] {
            let (a, w) = matmul_operands(m, k, nn);
            let t = best_of(5, || {
                let _ = black_box(a.matmul(&w));
            });
            put(&format!("{name}_shape"), json!([m, k, nn]));
            put(
                &format!("{name}_gflop_s"),
                json!(round(2.0 * (m * k * nn) as f64 / t / 1e9, 1)),
            );
        }
    }
    put(
        "peak_rss_mib",
        json!(proc_status_mib("VmHWM:").map(|x| round(x, 1))),
    );
    println!("{}", Value::Object(out));
    Ok(())
}

fn main() {
    optimsyn_examples::bench::main("sft", json_mode, SMOKE, FULL, criterion_benches);
}
