//! Benchmarks of optimsyn-lm on the bench model that `benches/bench-model/` pins: Qwen3 shape,
//! vocab 8192, hidden 512, 8 layers, ~29M parameters, seeded random weights, fp32 on the CPU with
//! 2 threads (`THREADS` overrides).
//!
//! - `lm/forward_logprobs/8x256`: `sequence_logprobs` of 8 rows of 256 tokens (no grad).
//! - `lm/generate_greedy/b1`, `b8`: greedy `generate`, prompts of 32 random ids in `[3, vocab)`,
//!   128 new tokens, no stop tokens (so exactly 128 per row).
//! - `lm/sample_host/32x151936`, `lm/sample_rows/32x151936`: one decode step's token choice
//!   (plain sampling) for 32 rows at Qwen's vocabulary size, from log-probs already computed: on
//!   the host (the `[B, V]` values copied out and each row walked, as generation does on the CPU)
//!   and with `sample_rows`' tensor ops (what it does on other devices). On a GPU the second runs
//!   on the device and only `B` ids come back, so the first is the host time per decode step that
//!   it saves there.
//! - `reference/matmul_f32/…`: a plain matmul of the forward's MLP shape (2048×512 · 512×1536)
//!   and a 2048³ square one; throughput is FLOPs, so criterion's `Gelem/s` reads as GFLOP/s.
//! - `reference/matvec_f32/…`: matrix-vector products over 128 MiB of weights (one matrix, and
//!   every weight matrix of the bench model in turn, as one batch-1 decode step reads them);
//!   throughput is bytes read.
//!
//! The bench model folder is written once by `python/bench/make_bench_model.py` (run
//! with `OPTIMSYN_PYTHON`, else `python3`; it needs torch and transformers, which `cargo xtask
//! bootstrap` installs) into `$OPTIMSYN_CACHE/bench/` (else `$XDG_CACHE_HOME/optimsyn/bench/`, else
//! `~/.cache/optimsyn/bench/`), and reused. `OPTIMSYN_BENCH_MODEL=DIR` uses a given folder instead.
//!
//! On a GPU (JSON mode only): `DEVICE=cuda` (or `cuda:N`) and `DTYPE=bf16` (or `f16`, `f32`, the
//! default) load the model there; the forward, generation and token-choice parts run on it (every
//! timed call ends by reading its results back, so the timings include the device's work), and
//! the CPU references (matmul, matvec) are left out. Without a CUDA device it prints one line
//! saying so and `{"side":"optimsyn","skipped":…}`, and exits 0. `OPTIMSYN_BENCH_MODEL=DIR` runs
//! another model folder, e.g. the 0.5B shape of `make_bench_model.py --shape 0.5b`.
//!
//! Modes:
//! - `cargo bench -p optimsyn-examples --bench lm`: criterion, full shapes.
//! - `cargo test --all-targets` (criterion's test mode): each benchmark runs once on small shapes
//!   (forward 2×32, 8 new tokens, small matrices) on the tiny committed test model, checking that
//!   everything works without Python or the bench model.
//! - `OPTIMSYN_BENCH_JSON=1` (run the built binary directly, or through `cargo bench`): no
//!   criterion; prints one JSON object with best-of-N figures and peak memory, for
//!   `python/bench/lm_compare.py`. `WHICH=forward,generate,matmul,matvec,sample` selects parts (default:
//!   all but `sample`; `prepare` only writes the bench model and prints its folder, `load` only loads it, for a
//!   memory baseline), `BATCHES=1,8` the generation batch sizes, `NEW_TOKENS=N` their length
//!   (default 128), `TEMPERATURE=T` samples at T instead of decoding greedily, `REPS=N` the
//!   repetitions
//!   (default: 3 for the forward, 2 for generation, as `python_baselines.py` does).

use std::cell::OnceCell;
use std::env;
use std::hint::black_box;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use optimsyn_examples::bench::{matmul_operands, placement, proc_status_mib, round, threads};
use optimsyn_lm::{CausalLm, LoadOptions, RowRng, SamplingParams, row_key, sample, sample_rows};
use tch::{Device, Kind, Tensor};

/// Workload sizes: the in benchmark mode, small ones in criterion's test mode.
#[derive(Debug, Clone, Copy)]
struct Shapes {
    fwd_rows: usize,
    fwd_len: usize,
    prompt_len: usize,
    new_tokens: usize,
    /// `[m, k] · [k, n]` of the model-shaped matmul.
    matmul: (i64, i64, i64),
    /// Side of the square matmul.
    square: i64,
    /// `[rows, cols]` of the plain matrix-vector probe.
    matvec: (i64, i64),
    /// `[rows, vocab]` of the token-choice benchmark.
    sample: (i64, i64),
    /// The bench model (written by Python on first use), or the tiny committed test model.
    bench_model: bool,
}

const FULL: Shapes = Shapes {
    fwd_rows: 8,
    fwd_len: 256,
    prompt_len: 32,
    new_tokens: 128,
    matmul: (2048, 512, 1536),
    square: 2048,
    matvec: (8192, 4096),
    sample: (32, 151_936),
    bench_model: true,
};

const SMOKE: Shapes = Shapes {
    fwd_rows: 2,
    fwd_len: 32,
    prompt_len: 32,
    new_tokens: 8,
    matmul: (64, 64, 64),
    square: 96,
    matvec: (256, 256),
    sample: (2, 1000),
    bench_model: false,
};

fn fnv1a(h: u64, bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(h, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100000001b3))
}

struct Bench {
    model: CausalLm,
    dir: PathBuf,
    params: i64,
    vocab: i64,
}

fn load(s: Shapes, opts: LoadOptions) -> Result<Bench, String> {
    let dir = if s.bench_model {
        optimsyn_examples::bench_model_dir()?
    } else {
        optimsyn_examples::tiny_model_dir()
    };
    let model =
        CausalLm::load(&dir, opts).map_err(|e| format!("loading {}: {e}", dir.display()))?;
    let params = model
        .named_parameters()
        .iter()
        .map(|(_, t)| t.numel() as i64)
        .sum();
    let vocab = model.config().vocab_size as i64;
    Ok(Bench {
        model,
        dir,
        params,
        vocab,
    })
}

/// The model, loaded on first use (so that `--list` or a filter that skips every model benchmark
/// neither writes nor loads it).
fn bench_model(cell: &OnceCell<Bench>, s: Shapes) -> &Bench {
    cell.get_or_init(|| load(s, LoadOptions::default()).unwrap_or_else(|e| panic!("{e}")))
}

/// `rows` rows of `len` seeded random ids in `[3, vocab)`.
fn random_rows(rows: usize, len: usize, vocab: i64, seed: i64) -> Vec<Vec<u32>> {
    tch::manual_seed(seed);
    let t = Tensor::randint_low(
        3,
        vocab,
        [rows as i64 * len as i64],
        (Kind::Int64, Device::Cpu),
    );
    let flat = Vec::<i64>::try_from(&t).expect("random ids");
    flat.chunks(len)
        .map(|c| c.iter().map(|&x| x as u32).collect())
        .collect()
}

/// Scores the rows; returns the sum of every log-prob (a digest for comparing builds).
fn forward(b: &Bench, rows: &[Vec<u32>]) -> f64 {
    let seqs: Vec<&[u32]> = rows.iter().map(|r| r.as_slice()).collect();
    let lp = b
        .model
        .sequence_logprobs(&seqs, 1.0)
        .expect("sequence_logprobs");
    assert_eq!(lp.len(), rows.len());
    black_box(lp).iter().flatten().map(|&x| f64::from(x)).sum()
}

/// Generates greedily (temperature 0) or samples; returns a hash of every generated token.
fn generate(b: &Bench, prompts: &[Vec<u32>], new_tokens: usize, temperature: f64) -> u64 {
    let p: Vec<&[u32]> = prompts.iter().map(|r| r.as_slice()).collect();
    let keys: Vec<u64> = (0..p.len()).map(|i| row_key(&format!("row-{i}"))).collect();
    // No stop tokens: every row produces exactly `new_tokens`.
    let params = SamplingParams {
        temperature,
        ..SamplingParams::greedy(new_tokens)
    };
    let out = b.model.generate(&p, &keys, &params).expect("generate");
    assert!(
        out.iter().all(|g| g.tokens.len() == new_tokens),
        "a row stopped early"
    );
    // A digest of the tokens, for checking that a faster build still generates the same ones.
    black_box(out)
        .iter()
        .flat_map(|g| &g.tokens)
        .fold(0xcbf29ce484222325, |h, &t| fnv1a(h, &t.to_le_bytes()))
}

/// A `[rows, vocab]` row of log-probs (logits of sd 3, a peaked distribution as a trained model's)
/// and one uniform draw per row.
fn sample_inputs((rows, vocab): (i64, i64)) -> (Tensor, Tensor) {
    tch::manual_seed(3);
    let lp = (Tensor::randn([rows, vocab], (Kind::Float, Device::Cpu)) * 3.0)
        .log_softmax(-1, Kind::Float);
    let u: Vec<f64> = (0..rows as u64)
        .map(|i| RowRng::new(5, i).uniform())
        .collect();
    (lp, Tensor::from_slice(&u))
}

/// One decode step's token choice the way generation does it on the CPU: the `[B, V]` log-probs
/// copied to a `Vec` and each row walked on the host (`sample`, no truncation).
fn sample_on_host(lp: &Tensor) -> Vec<usize> {
    let vocab = lp.size()[1] as usize;
    let flat = Vec::<f32>::try_from(&lp.contiguous().view([-1])).expect("log-probs");
    flat.chunks(vocab)
        .enumerate()
        .map(|(i, row)| sample(row, 0, 1.0, &mut RowRng::new(5, i as u64)))
        .collect()
}

/// The same choice with `sample_rows` (tensor ops on the log-probs' device), read back.
fn sample_on_device(lp: &Tensor, u: &Tensor) -> Vec<i64> {
    let t = sample_rows(lp, 0, 1.0, u).expect("sample_rows");
    Vec::<i64>::try_from(&t).expect("read back")
}

/// Weight matrices as one batch-1 decode step reads them: every 2-D weight of the model (the tied
/// embedding once, as the output projection), each applied to a `[1, 1, in]` input with `linear`.
fn model_matvec_bytes(b: &Bench) -> i64 {
    b.model
        .named_parameters()
        .iter()
        .filter(|(_, t)| t.dim() == 2)
        .map(|(_, t)| t.numel() as i64 * 4)
        .sum()
}

/// Bytes of the bench model's 2-D weights (decoder projections and the tied embedding, f32):
/// 8 · (2·512² + 2·512·256 + 3·512·1536) + 8192·512 = 29,360,128 values.
const BENCH_MODEL_WEIGHT_BYTES: u64 = 29_360_128 * 4;

fn model_matvecs(inputs: &[(Tensor, &Tensor)]) {
    for (x, w) in inputs {
        let _ = black_box(x.linear::<&Tensor>(w, None));
    }
}

fn model_matvec_inputs(b: &Bench) -> Vec<(Tensor, &Tensor)> {
    b.model
        .named_parameters()
        .into_iter()
        .filter(|(_, t)| t.dim() == 2)
        .map(|(_, w)| {
            (
                Tensor::randn([1, 1, w.size()[1]], (Kind::Float, Device::Cpu)),
                w,
            )
        })
        .collect()
}

fn criterion_benches(c: &mut Criterion, s: Shapes) {
    let _guard = tch::no_grad_guard();
    let model = &OnceCell::new();
    {
        let mut g = c.benchmark_group("lm");
        g.sample_size(10)
            .warm_up_time(Duration::from_secs(2))
            .measurement_time(Duration::from_secs(10));
        g.throughput(Throughput::Elements((s.fwd_rows * s.fwd_len) as u64));
        let mut rows = None;
        g.bench_function(
            format!("forward_logprobs/{}x{}", s.fwd_rows, s.fwd_len),
            |bch| {
                let b = bench_model(model, s);
                let rows =
                    rows.get_or_insert_with(|| random_rows(s.fwd_rows, s.fwd_len, b.vocab, 0));
                bch.iter(|| forward(b, rows))
            },
        );
        for batch in [1usize, 8] {
            g.throughput(Throughput::Elements((batch * s.new_tokens) as u64));
            g.measurement_time(Duration::from_secs(if batch == 1 { 15 } else { 25 }));
            let mut prompts = None;
            g.bench_function(format!("generate_greedy/b{batch}"), |bch| {
                let b = bench_model(model, s);
                let prompts = prompts
                    .get_or_insert_with(|| random_rows(batch, s.prompt_len, b.vocab, batch as i64));
                bch.iter(|| generate(b, prompts, s.new_tokens, 0.0))
            });
        }
        let (rows, vocab) = s.sample;
        g.throughput(Throughput::Elements(rows as u64));
        g.measurement_time(Duration::from_secs(5));
        let mut inputs = None;
        g.bench_function(format!("sample_host/{rows}x{vocab}"), |bch| {
            let (lp, _) = inputs.get_or_insert_with(|| sample_inputs(s.sample));
            bch.iter(|| black_box(sample_on_host(lp)))
        });
        g.bench_function(format!("sample_rows/{rows}x{vocab}"), |bch| {
            let (lp, u) = inputs.get_or_insert_with(|| sample_inputs(s.sample));
            bch.iter(|| black_box(sample_on_device(lp, u)))
        });
        g.finish();
    }
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
    let (r, cols) = s.matvec;
    g.throughput(Throughput::Bytes((r * cols * 4) as u64));
    let mut ops = None;
    g.bench_function(format!("matvec_f32/{r}x{cols}"), |bch| {
        let (w, x) = ops.get_or_insert_with(|| {
            tch::manual_seed(2);
            (
                Tensor::randn([r, cols], (Kind::Float, Device::Cpu)),
                Tensor::randn([cols], (Kind::Float, Device::Cpu)),
            )
        });
        bch.iter(|| black_box(w.mv(x)))
    });
    // The bench model's weights: 117 MB at full size (an estimate sets the throughput without
    // loading the model before the filter has picked this benchmark).
    g.throughput(Throughput::Bytes(BENCH_MODEL_WEIGHT_BYTES));
    let mut inputs = None;
    g.bench_function("matvec_f32/bench_model_weights", |bch| {
        let b = bench_model(model, s);
        let inputs = inputs.get_or_insert_with(|| model_matvec_inputs(b));
        bch.iter(|| model_matvecs(inputs))
    });
    g.finish();
}

// ---- JSON mode (for python/bench/lm_compare.py) ----

fn best_of(reps: usize, mut f: impl FnMut()) -> f64 {
    f(); // warm-up, as python_baselines.py does
    (0..reps.max(1))
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// A JSON value, enough for one flat object of figures (the bench has no JSON dependency).
enum J {
    Null,
    Num(f64),
    Int(i64),
    Str(String),
    Arr(Vec<J>),
}

impl From<f64> for J {
    fn from(x: f64) -> Self {
        if x.is_finite() { J::Num(x) } else { J::Null }
    }
}
impl From<Option<f64>> for J {
    fn from(x: Option<f64>) -> Self {
        x.map_or(J::Null, J::from)
    }
}
impl From<i64> for J {
    fn from(x: i64) -> Self {
        J::Int(x)
    }
}
impl From<i32> for J {
    fn from(x: i32) -> Self {
        J::Int(i64::from(x))
    }
}
impl From<&str> for J {
    fn from(x: &str) -> Self {
        J::Str(x.to_string())
    }
}
impl From<String> for J {
    fn from(x: String) -> Self {
        J::Str(x)
    }
}
impl<const N: usize> From<[i64; N]> for J {
    fn from(x: [i64; N]) -> Self {
        J::Arr(x.into_iter().map(J::Int).collect())
    }
}

impl std::fmt::Display for J {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            J::Null => write!(f, "null"),
            J::Num(x) => write!(f, "{x}"),
            J::Int(x) => write!(f, "{x}"),
            J::Str(s) => {
                write!(f, "\"")?;
                for c in s.chars() {
                    match c {
                        '"' => write!(f, "\\\"")?,
                        '\\' => write!(f, "\\\\")?,
                        c if (c as u32) < 0x20 => write!(f, "\\u{:04x}", c as u32)?,
                        c => write!(f, "{c}")?,
                    }
                }
                write!(f, "\"")
            }
            J::Arr(v) => {
                write!(f, "[")?;
                for (i, x) in v.iter().enumerate() {
                    write!(f, "{}{x}", if i > 0 { "," } else { "" })?;
                }
                write!(f, "]")
            }
        }
    }
}

/// An ordered JSON object, printed on one line.
#[derive(Default)]
struct Obj(Vec<(String, J)>);

impl Obj {
    fn insert(&mut self, key: impl Into<String>, value: J) {
        self.0.push((key.into(), value));
    }
}

impl std::fmt::Display for Obj {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{{")?;
        for (i, (k, v)) in self.0.iter().enumerate() {
            write!(
                f,
                "{}{}:{v}",
                if i > 0 { "," } else { "" },
                J::Str(k.clone())
            )?;
        }
        write!(f, "}}")
    }
}

fn json_mode() -> Result<(), String> {
    let Some(place) = placement("lm")? else {
        return Ok(());
    };
    let (opts, on_cpu) = (place.load, place.on_cpu());
    let which: Vec<String> = env::var("WHICH")
        .unwrap_or_else(|_| "forward,generate,matmul,matvec".into())
        .split(',')
        .map(|s| s.trim().to_string())
        // The matmul and matrix-vector references measure the CPU's arithmetic and memory.
        .filter(|w| on_cpu || !matches!(w.as_str(), "matmul" | "matvec" | "linears"))
        .collect();
    let has = |w: &str| which.iter().any(|x| x == w);
    let reps: Option<usize> = env::var("REPS").ok().and_then(|r| r.parse().ok());
    let mut s = FULL;
    if let Some(n) = env::var("NEW_TOKENS").ok().and_then(|v| v.parse().ok()) {
        s.new_tokens = n;
    }
    let n = threads();
    tch::set_num_threads(n);
    let mut out = Obj::default();
    out.insert("side", J::from("optimsyn"));
    out.insert("threads", J::from(n));
    out.insert("device", J::from(place.device));
    out.insert("dtype", J::from(place.dtype));
    if has("prepare") {
        out.insert(
            "model_dir",
            J::from(optimsyn_examples::bench_model_dir()?.display().to_string()),
        );
        println!("{out}");
        return Ok(());
    }
    out.insert(
        "rss_start_mib",
        J::from(proc_status_mib("VmRSS:").map(|x| round(x, 1))),
    );
    let _guard = tch::no_grad_guard();
    let needs_model =
        has("load") || has("forward") || has("generate") || has("matvec") || has("linears");
    let b = if needs_model {
        Some(load(FULL, opts)?)
    } else {
        None
    };
    if let Some(b) = &b {
        out.insert("model_dir", J::from(b.dir.display().to_string()));
        out.insert("params", J::from(b.params));
        out.insert(
            "rss_after_load_mib",
            J::from(proc_status_mib("VmRSS:").map(|x| round(x, 1))),
        );
    }
    if let (true, Some(b)) = (has("forward"), &b) {
        let rows = random_rows(s.fwd_rows, s.fwd_len, b.vocab, 0);
        let mut digest = 0.0;
        let t = best_of(reps.unwrap_or(3), || digest = forward(b, &rows));
        out.insert("forward_logprob_sum", J::from(digest));
        let tokens = (s.fwd_rows * s.fwd_len) as f64;
        out.insert("forward_s", J::from(round(t, 4)));
        out.insert("forward_tok_s", J::from(round(tokens / t, 1)));
        // The same count as python_baselines.py: 2 FLOPs per parameter per token (attention excluded).
        out.insert(
            "forward_gflop_s",
            J::from(round(2.0 * b.params as f64 * tokens / t / 1e9, 1)),
        );
    }
    if let (true, Some(b)) = (has("generate"), &b) {
        let batches: Vec<usize> = env::var("BATCHES")
            .ok()
            .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
            .unwrap_or_else(|| vec![1, 8]);
        let temperature: f64 = env::var("TEMPERATURE")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        out.insert("generate_temperature", J::from(temperature));
        for batch in batches {
            let prompts = random_rows(batch, s.prompt_len, b.vocab, batch as i64);
            let mut digest = 0;
            let t = best_of(reps.unwrap_or(2), || {
                digest = generate(b, &prompts, s.new_tokens, temperature)
            });
            out.insert(
                format!("generate_b{batch}_tokens_fnv"),
                J::from(format!("{digest:016x}")),
            );
            out.insert(format!("generate_b{batch}_s"), J::from(round(t, 4)));
            out.insert(
                format!("generate_b{batch}_tok_s"),
                J::from(round((batch * s.new_tokens) as f64 / t, 1)),
            );
        }
    }
    if has("sample") {
        let (lp, u) = sample_inputs(s.sample);
        let (lp, u) = (lp.to_device(opts.device), u.to_device(opts.device));
        let host = sample_on_host(&lp);
        let chosen = sample_on_device(&lp, &u);
        let same = host.iter().zip(&chosen).all(|(a, &b)| *a as i64 == b);
        out.insert("sample_shape", J::from([s.sample.0, s.sample.1]));
        out.insert("sample_same_tokens", J::from(i64::from(same)));
        let t_host = best_of(reps.unwrap_or(10), || {
            black_box(sample_on_host(&lp));
        });
        let t_rows = best_of(reps.unwrap_or(10), || {
            black_box(sample_on_device(&lp, &u));
        });
        out.insert("sample_host_ms", J::from(round(t_host * 1e3, 3)));
        out.insert("sample_rows_ms", J::from(round(t_rows * 1e3, 3)));
    }
    if has("matmul") {
        for (name, (m, k, n)) in [
            ("matmul", s.matmul),
            ("matmul_square", (s.square, s.square, s.square)),
        ] {
            let (a, w) = matmul_operands(m, k, n);
            let t = best_of(reps.unwrap_or(5).max(5), || {
                let _ = black_box(a.matmul(&w));
            });
            out.insert(format!("{name}_shape"), J::from([m, k, n]));
            out.insert(
                format!("{name}_gflop_s"),
                J::from(round(2.0 * (m * k * n) as f64 / t / 1e9, 1)),
            );
        }
    }
    if has("matvec") {
        let (r, c) = s.matvec;
        tch::manual_seed(2);
        let w = Tensor::randn([r, c], (Kind::Float, Device::Cpu));
        let x = Tensor::randn([c], (Kind::Float, Device::Cpu));
        let t = best_of(10, || {
            let _ = black_box(w.mv(&x));
        });
        let bw = (r * c * 4) as f64 / t;
        out.insert("matvec_shape", J::from([r, c]));
        out.insert("matvec_gb_s", J::from(round(bw / 1e9, 2)));
        // A pure streaming read of the same 128 MiB (a sum): what the memory system gives, as an
        // upper bound for any matrix-vector kernel.
        let t_read = best_of(10, || {
            let _ = black_box(w.sum(Kind::Float));
        });
        out.insert(
            "read_gb_s",
            J::from(round((r * c * 4) as f64 / t_read / 1e9, 2)),
        );
        // The same product with W's rows split into one block per thread, as one `bmm`: MKL's
        // sgemv runs on one thread here, the batched GEMM spreads the blocks over the threads.
        let parts = i64::from(n.max(1));
        if r % parts == 0 {
            let split = || {
                w.view([parts, r / parts, c])
                    .bmm(
                        &x.view([1, 1, c])
                            .transpose(1, 2)
                            .expand([parts, c, 1], false),
                    )
                    .view([r])
            };
            let diff = f64::try_from((split() - w.mv(&x)).abs().max()).unwrap_or(f64::NAN);
            assert!(diff < 1e-2, "split matvec differs from mv by {diff}");
            let t_split = best_of(10, || {
                let _ = black_box(split());
            });
            out.insert(
                "matvec_split_gb_s",
                J::from(round((r * c * 4) as f64 / t_split / 1e9, 2)),
            );
        }
        drop((w, x));
        if let Some(b) = &b {
            let bytes = model_matvec_bytes(b) as f64;
            let inputs = model_matvec_inputs(b);
            let t_model = best_of(10, || model_matvecs(&inputs));
            out.insert("weight_bytes_per_token", J::from(bytes as i64));
            out.insert(
                "model_matvec_gb_s",
                J::from(round(bytes / t_model / 1e9, 2)),
            );
            // Batch-1 decoding reads every weight once per token: this is the rate at which the
            // measured matrix-vector bandwidth can stream them.
            out.insert("bw_limit_b1_tok_s", J::from(round(bw / bytes, 1)));
            out.insert("model_matvec_tok_s", J::from(round(1.0 / t_model, 1)));
        }
    }
    if let (true, Some(b)) = (has("linears"), &b) {
        // Diagnostic (not in the default set): one decode step's weight products (every 2-D
        // weight once) for a few rows, four ways: `linear` (x W^T, what the model runs), the
        // split `bmm` (W's rows in one block per thread), `W · x^T` as a plain `mm`, and oneDNN
        // (`mkldnn_linear` on oneDNN copies of the weights). `ROWS=1,2,4,8` picks the row counts.
        let parts = i64::from(n.max(1));
        let weights: Vec<&Tensor> = b
            .model
            .named_parameters()
            .into_iter()
            .filter(|(_, t)| t.dim() == 2)
            .map(|(_, w)| w)
            .collect();
        let onednn: Vec<Tensor> = weights.iter().map(|w| w.g_to_mkldnn(None)).collect();
        let row_counts: Vec<i64> = env::var("ROWS")
            .ok()
            .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
            .unwrap_or_else(|| vec![1, 2, 4, 8, 16, 32]);
        for rows in row_counts {
            let xs: Vec<Tensor> = weights
                .iter()
                .map(|w| Tensor::randn([rows, 1, w.size()[1]], (Kind::Float, Device::Cpu)))
                .collect();
            let t_lin = best_of(10, || {
                for (x, w) in xs.iter().zip(&weights) {
                    let _ = black_box(x.linear::<&Tensor>(w, None));
                }
            });
            let t_split = best_of(10, || {
                for (x, w) in xs.iter().zip(&weights) {
                    let (o, i) = (w.size()[0], w.size()[1]);
                    let xt = x
                        .view([1, rows, i])
                        .transpose(1, 2)
                        .expand([parts, i, rows], false);
                    let y = w.view([parts, o / parts, i]).bmm(&xt); // [parts, o/parts, rows]
                    let _ = black_box(y.permute([2, 0, 1]).reshape([rows, 1, o]));
                }
            });
            let t_wxt = best_of(10, || {
                for (x, w) in xs.iter().zip(&weights) {
                    let y = w.mm(&x.view([rows, -1]).tr()); // [o, rows]
                    let _ = black_box(y.tr().contiguous().view([rows, 1, -1]));
                }
            });
            let t_dnn = best_of(10, || {
                for (x, w) in xs.iter().zip(&onednn) {
                    let xm = x.view([rows, -1]).g_to_mkldnn(None);
                    let _ = black_box(xm.mkldnn_linear(w, None::<Tensor>).to_dense(None, false));
                }
            });
            for (name, t) in [
                ("linear", t_lin),
                ("split", t_split),
                ("wxt", t_wxt),
                ("onednn", t_dnn),
            ] {
                out.insert(
                    format!("linears_b{rows}_{name}_tok_s"),
                    J::from(round(rows as f64 / t, 1)),
                );
            }
        }
    }
    out.insert(
        "peak_rss_mib",
        J::from(proc_status_mib("VmHWM:").map(|x| round(x, 1))),
    );
    println!("{out}");
    Ok(())
}

fn main() {
    optimsyn_examples::bench::main("lm", json_mode, SMOKE, FULL, criterion_benches);
}
