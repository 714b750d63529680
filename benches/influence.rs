//! Influence scoring throughput on the bench model (`benches/bench-model/`): candidates/s of
//! (`InfluenceScorer::score_encoded`) with a LoRA r 128 / alpha 512 adapter on q/k/v/o (3,670,016
//! parameters), 128-token candidates (random ids, every token a loss token, as
//! `python_baselines.py`'s `labels = input_ids`), k = 8192, fp32 on the CPU with 2 threads
//! (`THREADS` overrides), for the dense Rademacher, the sparse JL (s = 4) and the exact
//! (no projection) scorers. The Python side of the comparison is `python_baselines.py`'s
//! LESS-style loop (`WHICH=less`, which also runs the loop without projection);
//! `python/bench/influence_compare.py` runs both in one go.
//!
//! Set-up, once per work folder: a fresh adapter (PEFT init, seed 0) is trained two AdamW steps
//! (`optimsyn_lm::sft::train`, lr 1e-3, constant schedule, batch 8) on 16 random 128-token rows,
//! so the checkpoint has nonzero Adam moments for every matrix; the validation set is the first 16
//! rows of the demo's `val.jsonl` (rendered in the Tulu format with the bench tokenizer). Each
//! scorer computes its validation features on construction and stores them beside the checkpoint,
//! so later processes reuse them. The work folder is `OPTIMSYN_BENCH_WORK`, else
//! `$TMPDIR/optimsyn-bench-influence-<hash of the model folder>`.
//!
//! Benchmarks (criterion names; the JSON keys in parentheses):
//! - `influence/score/{dense,sjlt,exact}/64x128` (`dense_cand_s`, …): one scoring call of 64
//!   candidates (the CLI's default `--chunk`): batched per-sample gradients, Γ, projection,
//!   cosines. A dense call generates the 3.67M × 8192 sign matrix once (blockwise), so its cost
//!   per candidate falls as the call grows (`CANDIDATES=N` in JSON mode).
//! - `influence/gradients_gamma/64x128` (`grads_gamma_cand_s`): the gradients and Γ alone (what
//!   the Python loop without projection does; `grads_s` and `gamma_s` split it).
//! - `reference/project_dense/…` (`proj_dense_gflop_s`): the dense projection of the 64
//!   candidates' Γ rows (computed first, as in a scoring call) on their first `PROJ_P` = 131,072
//!   coordinates (128 of its 1024-row blocks; the rate is per block, so the slice stands for all
//!   of P without its minutes of run time; `PROJ_P=0` projects all of P), counted as 2·P·k FLOPs
//!   per row; (`proj_dense_1row_s`) the same for one row (≈ the sign generation alone);
//!   (`proj_dense_cold_gflop_s`) the same 64-row projection in a process that has not computed
//!   gradients before (random rows): there every block's temporaries are fresh mappings that
//!   page-fault, as in a process's first projection (the validation features).
//! - `reference/project_sjlt/…` (`proj_sjlt_s`): the SJLT projection of the 64 full Γ rows.
//! - `reference/matmul_f32/…` (`matmul_block_gflop_s`, `matmul_wide_gflop_s`): plain matmuls of
//!   one projection block's shape, `[64, 1024] · [1024, 8192]`, and a longer inner dimension,
//!   `[64, 8192] · [8192, 8192]`.
//!
//! On a GPU (JSON mode only): `DEVICE=cuda` (or `cuda:N`) and `DTYPE=bf16` (or `f16`, `f32`, the
//! default) train the checkpoint and score there (the scores are read back, so the timings include
//! the device's work); the CPU references (projection slice, matmuls) are left out, and the dense
//! projection's cost shows in `dense_cand_s` against `sjlt_cand_s`. Without a CUDA device it prints
//! one line saying so and `{"side":"optimsyn","skipped":…}`, and exits 0. `OPTIMSYN_BENCH_MODEL=DIR`
//! runs another model folder, e.g. the 0.5B shape of `make_bench_model.py --shape 0.5b`.
//!
//! Modes:
//! - `cargo bench -p optimsyn-examples --bench influence`: criterion, full shapes (the dense
//!   benchmark alone takes 10+ minutes: criterion runs at least 10 calls).
//! - `cargo test -p optimsyn-examples --benches` (criterion's test mode): each benchmark runs once
//!   on the demo's tiny target (r 8, k 256, 4 candidates of 16 tokens), proving it works.
//! - `OPTIMSYN_BENCH_JSON=1`: no criterion; one JSON object with best-of-N figures and peak memory
//!   (VmHWM). `WHICH=dense,sjlt,exact,grads,projection,matmul` selects parts (default: all;
//!   `prepare` trains the checkpoint and computes every scorer's validation features, for the
//!   runner to do before measuring); `CANDIDATES`, `K`, `PROJ_P`, `REPS` override the sizes (the
//!   dense call is timed once by default, as `python_baselines.py` times its LESS loop; the others
//!   best of 2 after a warm-up call).

use std::cell::OnceCell;
use std::env;
use std::hint::black_box;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use optimsyn_data_io::{ChatExample, ChatFormat, read_jsonl};
use optimsyn_examples::bench::{matmul_operands, placement, proc_status_mib, round, threads};
use optimsyn_influence::{InfluenceScorer, Projector, ProjectorKind, ScoreConfig, gradients};
use optimsyn_lm::sft::{self, ScheduleKind, SftConfig};
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
    cand_len: usize,
    candidates: usize,
    k: usize,
    sjlt_s: usize,
    /// Validation rows (the first of the demo's `val.jsonl`).
    val: usize,
    /// Warm-up rows (two steps of half of them).
    warm_rows: usize,
    /// Coordinates of the dense projection probe (0: all of P).
    proj_p: usize,
    /// Inner dimension of the wide reference matmul.
    wide: i64,
}

const FULL: Shapes = Shapes {
    bench_model: true,
    lora_r: 128,
    lora_alpha: 512.0,
    cand_len: 128,
    candidates: 64,
    k: 8192,
    sjlt_s: 4,
    val: 16,
    warm_rows: 16,
    proj_p: 1 << 17,
    wide: 8192,
};

const SMOKE: Shapes = Shapes {
    bench_model: false,
    lora_r: 8,
    lora_alpha: 16.0,
    cand_len: 16,
    candidates: 4,
    k: 256,
    sjlt_s: 4,
    val: 4,
    warm_rows: 4,
    proj_p: 4096,
    wide: 512,
};

/// Rows of the dense projector's generated blocks (`optimsyn_influence::project`).
const DENSE_BLOCK: i64 = 1024;

fn fnv1a(h: u64, bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(h, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100000001b3))
}

/// `rows` rows of `len` seeded random ids in `[3, vocab)`, every token a loss token.
fn random_examples(
    prefix: &str,
    rows: usize,
    len: usize,
    vocab: i64,
    seed: i64,
) -> Vec<TrainExample> {
    tch::manual_seed(seed);
    let t = Tensor::randint_low(3, vocab, [(rows * len) as i64], (Kind::Int64, Device::Cpu));
    let flat = Vec::<i64>::try_from(&t).expect("random ids");
    flat.chunks(len)
        .enumerate()
        .map(|(i, c)| TrainExample {
            id: format!("{prefix}-{i}"),
            tokens: c.iter().map(|&x| x as u32).collect(),
            loss_mask: vec![1; len],
            subtask: None,
        })
        .collect()
}

/// The trained checkpoint, validation set and candidates every benchmark shares.
struct Setup {
    model_dir: PathBuf,
    work: PathBuf,
    /// Keeps a test-mode work folder alive.
    _tmp: Option<tempfile::TempDir>,
    checkpoint: PathBuf,
    val: Vec<ChatExample>,
    cands: Vec<TrainExample>,
    lora_params: i64,
    setup_s: f64,
    s: Shapes,
    /// Where the models run (`DEVICE`, `DTYPE` in JSON mode; the CPU in f32 otherwise).
    opts: LoadOptions,
}

fn lora_config(s: Shapes) -> LoraConfig {
    LoraConfig {
        r: s.lora_r,
        alpha: s.lora_alpha,
        dropout: 0.0,
        ..Default::default()
    }
}

fn setup(s: Shapes, opts: LoadOptions) -> Result<Setup, String> {
    let t0 = Instant::now();
    let model_dir = if s.bench_model {
        optimsyn_examples::bench_model_dir()?
    } else {
        optimsyn_examples::demo_dir().join("models/target")
    };
    let (work, tmp) = if !s.bench_model {
        let t = tempfile::tempdir().map_err(|e| format!("temporary folder: {e}"))?;
        (t.path().to_path_buf(), Some(t))
    } else if let Some(w) = env::var_os("OPTIMSYN_BENCH_WORK") {
        (PathBuf::from(w), None)
    } else {
        // What the checkpoint depends on (validation features are keyed inside it).
        let mut what = format!(
            "{}|r{}|a{}|len{}|warm{}",
            model_dir.display(),
            s.lora_r,
            s.lora_alpha,
            s.cand_len,
            s.warm_rows
        );
        // Elsewhere than the CPU in f32 the checkpoint is trained there (the CPU's keeps its name).
        if opts != LoadOptions::default() {
            what.push_str(&format!("|{:?}|{:?}", opts.device, opts.kind));
        }
        let key = fnv1a(0xcbf29ce484222325, what.as_bytes());
        (
            env::temp_dir().join(format!("optimsyn-bench-influence-{:08x}", key as u32)),
            None,
        )
    };
    let mut model = CausalLm::load(&model_dir, opts)
        .map_err(|e| format!("loading {}: {e}", model_dir.display()))?;
    let vocab = model.config().vocab_size as i64;
    let adapter = LoraAdapter::init(&mut model, lora_config(s), 0).map_err(|e| e.to_string())?;
    let lora_params = adapter.num_parameters();
    let warm = random_examples("warm", s.warm_rows, s.cand_len, vocab, 7);
    let cfg = SftConfig {
        lr: 1e-3,
        batch_size: (s.warm_rows / 2).max(1),
        warmup_ratio: 0.0,
        schedule: ScheduleKind::Constant,
        ..Default::default()
    };
    let info = DataInfo {
        format: Some(ChatFormat::Tulu),
        ..Default::default()
    };
    // Idempotent: a folder that already holds this run's final checkpoint is resumed at its end.
    let out = work.join("warmup");
    sft::train(
        &mut model,
        Trainable::Lora(&adapter),
        &warm,
        &cfg,
        &info,
        &out,
        &mut |_| {},
    )
    .map_err(|e| format!("warm-up training in {}: {e}", out.display()))?;
    drop((adapter, model));
    let checkpoint = sft::list_checkpoints(&out)
        .map_err(|e| e.to_string())?
        .into_values()
        .next_back()
        .ok_or_else(|| format!("no checkpoint in {}", out.display()))?;
    let mut val: Vec<ChatExample> = read_jsonl(optimsyn_examples::demo_dir().join("val.jsonl"))
        .map_err(|e| format!("demo val.jsonl: {e}"))?;
    val.truncate(s.val);
    let cands = random_examples("cand", s.candidates, s.cand_len, vocab, 1);
    Ok(Setup {
        model_dir,
        work,
        _tmp: tmp,
        checkpoint,
        val,
        cands,
        lora_params,
        setup_s: t0.elapsed().as_secs_f64(),
        s,
        opts,
    })
}

impl Setup {
    fn kinds(&self) -> [(&'static str, ProjectorKind); 3] {
        let k = self.s.k;
        [
            ("dense", ProjectorKind::Dense { k, seed: 0 }),
            (
                "sjlt",
                ProjectorKind::Sjlt {
                    k,
                    s: self.s.sjlt_s,
                    seed: 0,
                },
            ),
            ("exact", ProjectorKind::Exact),
        ]
    }

    fn kind(&self, name: &str) -> ProjectorKind {
        self.kinds()
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, k)| k)
            .unwrap_or_else(|| panic!("no projector {name}"))
    }

    /// A scorer (its validation features computed, or read back from the work folder).
    fn scorer(&self, kind: ProjectorKind) -> Result<InfluenceScorer, String> {
        let cfg = ScoreConfig {
            projector: kind,
            ..Default::default()
        };
        InfluenceScorer::new(
            &self.model_dir,
            std::slice::from_ref(&self.checkpoint),
            &self.val,
            cfg,
            self.opts,
        )
        .map_err(|e| format!("scorer {kind:?}: {e}"))
    }

    /// `[rows, cols]` standard normal f32 rows, seeded.
    fn random_rows(rows: usize, cols: usize) -> Tensor {
        tch::manual_seed(3);
        Tensor::randn([rows as i64, cols as i64], (Kind::Float, Device::Cpu))
    }
}

fn setup_cell(cell: &OnceCell<Setup>, s: Shapes) -> &Setup {
    cell.get_or_init(|| setup(s, LoadOptions::default()).unwrap_or_else(|e| panic!("{e}")))
}

/// One scoring call; returns the sum of the influences (a digest), checking every candidate got
/// a finite score.
fn score(scorer: &mut InfluenceScorer, cands: &[TrainExample]) -> f64 {
    let out = scorer.score_encoded(cands).expect("scoring");
    assert_eq!(out.len(), cands.len());
    black_box(out)
        .iter()
        .map(|s| {
            let x = s.influence.unwrap_or(f64::NAN);
            assert!(x.is_finite(), "candidate {}: influence {x}", s.id);
            x
        })
        .sum()
}

/// The scorer's own gradients and Γ `[n, P]`, without projection or cosines.
fn grads_gamma(scorer: &InfluenceScorer, cands: &[TrainExample]) -> Tensor {
    let idx: Vec<usize> = (0..cands.len()).collect();
    let (g, _) = gradients(
        scorer.model(),
        scorer.adapter(),
        cands,
        &idx,
        scorer.config().max_batch_tokens,
    )
    .expect("gradients");
    let gamma = scorer.gamma(0, &g).expect("gamma");
    drop(g);
    black_box(gamma)
}

/// The dense projector over the first `p` coordinates (nothing cached), and its input rows.
fn dense_probe(s: Shapes, p: usize, rows: usize) -> (Projector, Tensor) {
    let proj =
        Projector::new(ProjectorKind::Dense { k: s.k, seed: 0 }, p, 0).expect("dense projector");
    (proj, Setup::random_rows(rows, p))
}

/// The dense projector over the first `p` coordinates, `gamma`'s first `p` columns (every row,
/// and the first row alone), copied.
fn dense_probe_of(s: Shapes, p: usize, gamma: &Tensor) -> (Projector, Tensor, Tensor) {
    let proj =
        Projector::new(ProjectorKind::Dense { k: s.k, seed: 0 }, p, 0).expect("dense projector");
    let x = gamma.narrow(1, 0, p as i64).contiguous();
    let x1 = x.narrow(0, 0, 1).contiguous();
    (proj, x, x1)
}

fn probe_p(s: Shapes, lora_params: i64) -> usize {
    if s.proj_p == 0 {
        lora_params as usize
    } else {
        s.proj_p.min(lora_params as usize)
    }
}

fn criterion_benches(c: &mut Criterion, s: Shapes) {
    let cell = &OnceCell::new();
    let n = s.candidates;
    {
        let mut g = c.benchmark_group("influence");
        g.sample_size(10)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(20));
        g.throughput(Throughput::Elements(n as u64));
        for name in ["dense", "sjlt", "exact"] {
            let mut scorer = None;
            g.bench_function(format!("score/{name}/{n}x{}", s.cand_len), |b| {
                let st = setup_cell(cell, s);
                let sc = scorer.get_or_insert_with(|| {
                    st.scorer(st.kind(name)).unwrap_or_else(|e| panic!("{e}"))
                });
                b.iter(|| score(sc, &st.cands))
            });
        }
        let mut scorer = None;
        g.bench_function(format!("gradients_gamma/{n}x{}", s.cand_len), |b| {
            let st = setup_cell(cell, s);
            let sc = scorer.get_or_insert_with(|| {
                st.scorer(ProjectorKind::Exact)
                    .unwrap_or_else(|e| panic!("{e}"))
            });
            b.iter(|| grads_gamma(sc, &st.cands))
        });
        g.finish();
    }
    let mut g = c.benchmark_group("reference");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    // The projection's size needs P, known once the adapter exists: the throughput (FLOPs, read by
    // criterion as elements) is set from the probe's nominal size, `PROJ_P` coordinates.
    let p = s.proj_p;
    // The candidates' Γ, computed once (as a scoring call computes it before projecting; see
    // `proj_dense_cold_s` in the JSON mode for a process that has not).
    let gamma = &OnceCell::new();
    let gamma_of = |st: &Setup| -> Tensor {
        let scorer = st
            .scorer(ProjectorKind::Exact)
            .unwrap_or_else(|e| panic!("{e}"));
        grads_gamma(&scorer, &st.cands)
    };
    g.throughput(Throughput::Elements((2 * p * s.k * n) as u64));
    let mut probe = None;
    g.bench_function(format!("project_dense/{n}x{p}x{}", s.k), |b| {
        let st = setup_cell(cell, s);
        let gm = gamma.get_or_init(|| gamma_of(st));
        let (proj, x, _) =
            probe.get_or_insert_with(|| dense_probe_of(s, probe_p(s, st.lora_params), gm));
        b.iter(|| black_box(proj.project(x).expect("projection")))
    });
    g.throughput(Throughput::Elements(n as u64));
    let mut proj = None;
    g.bench_function(format!("project_sjlt/{n}xP"), |b| {
        let st = setup_cell(cell, s);
        let gm = gamma.get_or_init(|| gamma_of(st));
        let proj = proj.get_or_insert_with(|| {
            Projector::new(st.kind("sjlt"), st.lora_params as usize, 0).expect("SJLT projector")
        });
        b.iter(|| black_box(proj.project(gm).expect("projection")))
    });
    for (m, k, nn) in [
        (n as i64, DENSE_BLOCK, s.k as i64),
        (n as i64, s.wide, s.k as i64),
    ] {
        g.throughput(Throughput::Elements((2 * m * k * nn) as u64));
        let mut ops = None;
        g.bench_function(format!("matmul_f32/{m}x{k}x{nn}"), |b| {
            let (a, w) = ops.get_or_insert_with(|| matmul_operands(m, k, nn));
            b.iter(|| black_box(a.matmul(w)))
        });
    }
    g.finish();
}

// ---- JSON mode (for python/bench/influence_compare.py) ----

fn best_of(reps: usize, warm_up: bool, mut f: impl FnMut()) -> f64 {
    if warm_up {
        f();
    }
    (0..reps.max(1))
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn env_usize(name: &str) -> Option<usize> {
    env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

fn json_mode() -> Result<(), String> {
    let Some(place) = placement("influence")? else {
        return Ok(());
    };
    let (opts, on_cpu) = (place.load, place.on_cpu());
    let which: Vec<String> = env::var("WHICH")
        .unwrap_or_else(|_| "dense,sjlt,exact,grads,projection,matmul".into())
        .split(',')
        .map(|s| s.trim().to_string())
        // The projection and matmul references measure the CPU's kernels.
        .filter(|w| on_cpu || !matches!(w.as_str(), "projection" | "matmul"))
        .collect();
    let has = |w: &str| which.iter().any(|x| x == w);
    let reps = env_usize("REPS");
    let mut s = FULL;
    if let Some(n) = env_usize("CANDIDATES").filter(|&n| n > 0) {
        s.candidates = n;
    }
    if let Some(k) = env_usize("K").filter(|&k| k > 0) {
        s.k = k;
    }
    if let Some(p) = env_usize("PROJ_P") {
        s.proj_p = p;
    }
    let n = threads();
    tch::set_num_threads(n);
    let mut out = Map::new();
    let mut put = |k: &str, v: Value| {
        out.insert(k.to_string(), v);
    };
    put("side", json!("optimsyn"));
    put("threads", json!(n));
    put("device", json!(place.device));
    put("dtype", json!(place.dtype));
    put("candidates", json!(s.candidates));
    put("candidate_tokens", json!(s.cand_len));
    put("k", json!(s.k));
    let needs_setup = ["prepare", "dense", "sjlt", "exact", "grads", "projection"]
        .iter()
        .any(|w| has(w));
    let st = if needs_setup {
        Some(setup(s, opts)?)
    } else {
        None
    };
    if let Some(st) = &st {
        put("model_dir", json!(st.model_dir.display().to_string()));
        put("work_dir", json!(st.work.display().to_string()));
        put("lora_params", json!(st.lora_params));
        put("setup_s", json!(round(st.setup_s, 2)));
    }
    if let (true, Some(st)) = (has("prepare"), &st) {
        // Computes (and stores) each scorer's validation features, so that measuring runs reuse them.
        for (name, kind) in st.kinds() {
            let t = Instant::now();
            drop(st.scorer(kind)?);
            put(
                &format!("prepare_{name}_s"),
                json!(round(t.elapsed().as_secs_f64(), 2)),
            );
        }
    }
    let cand = s.candidates as f64;
    for name in ["dense", "sjlt", "exact"] {
        let (true, Some(st)) = (has(name), &st) else {
            continue;
        };
        let t = Instant::now();
        let mut scorer = st.scorer(st.kind(name))?;
        put(
            &format!("{name}_scorer_new_s"),
            json!(round(t.elapsed().as_secs_f64(), 2)),
        );
        // The dense call is long (the LESS loop it is compared with is timed once, cold); the
        // others are best of 2 after a warm-up call.
        let dense = name == "dense";
        let mut digest = 0.0;
        let t = best_of(reps.unwrap_or(if dense { 1 } else { 2 }), !dense, || {
            digest = score(&mut scorer, &st.cands)
        });
        put(&format!("{name}_s"), json!(round(t, 3)));
        put(&format!("{name}_cand_s"), json!(round(cand / t, 3)));
        put(&format!("{name}_influence_sum"), json!(digest));
    }
    if let (true, Some(st)) = (has("grads"), &st) {
        let scorer = st.scorer(ProjectorKind::Exact)?;
        // Timed in two parts (best of each, and of their sum), after a warm-up call.
        let idx: Vec<usize> = (0..st.cands.len()).collect();
        let (mut best_g, mut best_gamma, mut best) = (f64::INFINITY, f64::INFINITY, f64::INFINITY);
        for rep in 0..=reps.unwrap_or(2).max(1) {
            let t = Instant::now();
            let (g, _) = gradients(
                scorer.model(),
                scorer.adapter(),
                &st.cands,
                &idx,
                scorer.config().max_batch_tokens,
            )
            .map_err(|e| e.to_string())?;
            let t_g = t.elapsed().as_secs_f64();
            let t = Instant::now();
            let gamma = scorer.gamma(0, &g).map_err(|e| e.to_string())?;
            drop(g);
            let _ = black_box(gamma);
            let t_gamma = t.elapsed().as_secs_f64();
            if rep > 0 {
                best_g = best_g.min(t_g);
                best_gamma = best_gamma.min(t_gamma);
                best = best.min(t_g + t_gamma);
            }
        }
        put("grads_s", json!(round(best_g, 3)));
        put("gamma_s", json!(round(best_gamma, 3)));
        put("grads_gamma_s", json!(round(best, 3)));
        put("grads_gamma_cand_s", json!(round(cand / best, 3)));
    }
    if let (true, Some(st)) = (has("projection"), &st) {
        let p = probe_p(s, st.lora_params);
        // A fresh process first (random rows, nothing allocated and freed before): every block's
        // tensors come from new mappings and page-fault (as the first projection of a process,
        // e.g. the validation features, does). One call, no warm-up.
        let (proj, x) = dense_probe(s, p, s.candidates);
        let t = best_of(1, false, || {
            let _ = black_box(proj.project(&x).expect("projection"));
        });
        drop((proj, x));
        put("proj_dense_cold_s", json!(round(t, 4)));
        put(
            "proj_dense_cold_gflop_s",
            json!(round(2.0 * (p * s.k) as f64 * cand / t / 1e9, 1)),
        );
        // Then as inside a scoring call: the candidates' Γ computed (and its memory freed), the
        // projection of (a slice of) those rows.
        let scorer = st.scorer(ProjectorKind::Exact)?;
        let gamma = grads_gamma(&scorer, &st.cands);
        let full = st.lora_params as usize;
        let proj = Projector::new(st.kind("sjlt"), full, 0).map_err(|e| e.to_string())?;
        let t = best_of(reps.unwrap_or(2), true, || {
            let _ = black_box(proj.project(&gamma).expect("projection"));
        });
        drop(proj);
        put("proj_sjlt_s", json!(round(t, 4)));
        let (proj, x, x1) = dense_probe_of(s, p, &gamma);
        drop(gamma);
        let t = best_of(reps.unwrap_or(2), true, || {
            let _ = black_box(proj.project(&x).expect("projection"));
        });
        let t1 = best_of(reps.unwrap_or(2), true, || {
            let _ = black_box(proj.project(&x1).expect("projection"));
        });
        drop((proj, x, x1, scorer));
        put("proj_dense_p", json!(p));
        put("proj_dense_s", json!(round(t, 4)));
        put(
            "proj_dense_gflop_s",
            json!(round(2.0 * (p * s.k) as f64 * cand / t / 1e9, 1)),
        );
        put("proj_dense_1row_s", json!(round(t1, 4)));
        // Scaled to all of P: the projection's share of a dense scoring call.
        let scale = st.lora_params as f64 / p as f64;
        put("proj_dense_full_p_est_s", json!(round(t * scale, 2)));
        put("proj_dense_1row_full_p_est_s", json!(round(t1 * scale, 2)));
    }
    if has("matmul") {
        let m = s.candidates as i64;
        for (name, (k, nn)) in [
            ("matmul_block", (DENSE_BLOCK, s.k as i64)),
            ("matmul_wide", (s.wide, s.k as i64)),
        ] {
            let (a, w) = matmul_operands(m, k, nn);
            let t = best_of(reps.unwrap_or(5).max(5), true, || {
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
    optimsyn_examples::bench::main("influence", json_mode, SMOKE, FULL, criterion_benches);
}
