//! Support code for the optimsyn workspace's top-level `examples/` and `benches/`.
//!
//! The examples live at the root of the repository and are wired through this (unpublished)
//! package, so `cargo run --example NAME` works from the workspace root. What they share is here:
//! where the bundled demo models and data are, and [`LmPolicy`], a plain causal LM as an
//! `optimsyn_rl_grpo::Policy` (the smallest complete implementation of that trait).
//!
//! ```
//! let target = optimsyn_examples::demo_dir().join("models/target");
//! assert!(target.join("config.json").is_file());
//! ```
#![deny(missing_docs)]

mod lm_policy;

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

pub use lm_policy::{LmPolicy, LmPolicyError};

/// The repository's root folder: `OPTIMSYN_WORKSPACE` when set (a bench binary carried to a machine
/// where the checkout lives elsewhere, e.g. a GPU machine without cargo), else the checkout it was
/// built in.
pub fn workspace_dir() -> PathBuf {
    if let Some(dir) = env::var_os("OPTIMSYN_WORKSPACE") {
        return PathBuf::from(dir);
    }
    // This package is `crates/examples`.
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.ancestors()
        .nth(2)
        .map_or_else(|| here.join("../.."), Path::to_path_buf)
}

/// The bundled demo: corpus, seeds, validation set and the tiny policy / generator / target
/// models (`crates/optimsyn/demo`).
pub fn demo_dir() -> PathBuf {
    workspace_dir().join("crates/optimsyn/demo")
}

/// The tiny Qwen3 test model of optimsyn-lm (random weights, byte-level tokenizer, ChatML).
pub fn tiny_model_dir() -> PathBuf {
    workspace_dir().join("crates/lm/tests/fixtures/cli")
}

/// The bench model's definition (config, tokenizer, chat template; no weights): `benches/bench-model`.
pub fn bench_model_spec_dir() -> PathBuf {
    workspace_dir().join("benches").join("bench-model")
}

fn cache_dir() -> Result<PathBuf, String> {
    if let Some(dir) = env::var_os("OPTIMSYN_CACHE") {
        return Ok(PathBuf::from(dir));
    }
    if let Some(dir) = env::var_os("XDG_CACHE_HOME") {
        return Ok(PathBuf::from(dir).join("optimsyn"));
    }
    env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".cache").join("optimsyn"))
        .ok_or_else(|| "set OPTIMSYN_CACHE (no HOME to put the bench model under)".to_string())
}

/// The bench model folder: `OPTIMSYN_BENCH_MODEL`, else a cached one, written on first use by
/// `python/bench/make_bench_model.py` from [`bench_model_spec_dir`] (the folder name carries a hash
/// of the script and the shape's config, so a change to either writes a fresh one). Only the
/// benchmarks' measuring modes call this; their test modes run on the tiny committed models.
pub fn bench_model_dir() -> Result<PathBuf, String> {
    if let Some(dir) = env::var_os("OPTIMSYN_BENCH_MODEL") {
        let dir = PathBuf::from(dir);
        if !dir.join("config.json").is_file() {
            return Err(format!(
                "OPTIMSYN_BENCH_MODEL={}: no config.json there",
                dir.display()
            ));
        }
        return Ok(dir);
    }
    let script = workspace_dir()
        .join("python")
        .join("bench")
        .join("make_bench_model.py");
    let config = bench_model_spec_dir().join("config.json");
    let read = |p: &Path| {
        std::fs::read(p).map_err(|e| {
            format!(
                "bench model: cannot read {} ({e}); it is part of the repository (or set OPTIMSYN_BENCH_MODEL \
                 to a folder that make_bench_model.py wrote)",
                p.display()
            )
        })
    };
    // FNV-1a over script then config: the cached folder's name depends on it, so it must not change.
    let key = optimsyn_fsio::hash::Fnv1a::new()
        .update(&read(&script)?)
        .update(&read(&config)?)
        .finish();
    let dir = cache_dir()?
        .join("bench")
        .join(format!("qwen3-30m-seed0-{:08x}", key as u32));
    if dir.join("model.safetensors").is_file() {
        return Ok(dir);
    }
    let parent = dir
        .parent()
        .ok_or("bench model: cache folder has no parent")?;
    std::fs::create_dir_all(parent)
        .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    // Write beside, then rename: a concurrent or interrupted run never leaves a half folder in place.
    let tmp = parent.join(format!(
        ".tmp-{}-{}",
        std::process::id(),
        dir.file_name().and_then(|n| n.to_str()).unwrap_or("m")
    ));
    let python = env::var_os("OPTIMSYN_PYTHON").unwrap_or_else(|| "python3".into());
    eprintln!(
        "bench model: writing {} with {} {}",
        dir.display(),
        python.to_string_lossy(),
        script.display()
    );
    let out = Command::new(&python)
        .arg(&script)
        .arg(&tmp)
        .output()
        .map_err(|e| {
            format!(
                "bench model: cannot run {} ({e}); set OPTIMSYN_PYTHON",
                python.to_string_lossy()
            )
        })?;
    if !out.status.success() {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(format!(
            "bench model: `{} {} DIR` failed ({}); it needs torch and transformers (`cargo xtask bootstrap` installs \
             them into OPTIMSYN_PYTHON):\n{}",
            python.to_string_lossy(),
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    if let Err(e) = std::fs::rename(&tmp, &dir) {
        let _ = std::fs::remove_dir_all(&tmp);
        if !dir.join("model.safetensors").is_file() {
            return Err(format!(
                "bench model: cannot move it to {}: {e}",
                dir.display()
            ));
        }
    }
    Ok(dir)
}

/// Helpers the benchmarks in `benches/` share.
pub mod bench {
    use std::env;

    use tch::{Device, Kind, Tensor};

    /// libtorch threads for a benchmark: `THREADS`, default 2, as every side-by-side comparison uses.
    pub fn threads() -> i32 {
        env::var("THREADS")
            .ok()
            .and_then(|t| t.parse().ok())
            .filter(|&t| t > 0)
            .unwrap_or(2)
    }

    /// Where a JSON-mode benchmark runs, from `DEVICE` (`cpu`, `cuda`, `cuda:N`; default `cpu`) and
    /// `DTYPE` (`f32`, `bf16`, `f16`; default `f32`), named as the CLI names them.
    #[derive(Debug)]
    pub struct Placement {
        /// Device and kind for [`optimsyn_lm::CausalLm::load`].
        pub load: optimsyn_lm::LoadOptions,
        /// `DEVICE` as given (`cpu` when unset).
        pub device: String,
        /// `DTYPE` as given (`f32` when unset).
        pub dtype: String,
    }

    impl Placement {
        /// On the CPU (where the CPU-only reference measurements make sense).
        pub fn on_cpu(&self) -> bool {
            self.load.device == tch::Device::Cpu
        }
    }

    /// Reads `DEVICE` and `DTYPE` (see [`Placement`]); a bad name is an error naming the variable.
    /// When CUDA is asked for and this process has none, bench `name` is skipped: one line on
    /// stderr, `{"side":"optimsyn","skipped":REASON}` on stdout, and `Ok(None)`.
    pub fn placement(name: &str) -> Result<Option<Placement>, String> {
        use optimsyn_pipeline::{DeviceName, Dtype};
        let device = env::var("DEVICE").unwrap_or_else(|_| "cpu".into());
        let dtype = env::var("DTYPE").unwrap_or_else(|_| "f32".into());
        let parsed: DeviceName = device
            .parse()
            .map_err(|e| format!("DEVICE={device}: {e}"))?;
        let kind = dtype
            .parse::<Dtype>()
            .map_err(|e| format!("DTYPE={dtype}: {e}"))?
            .kind();
        match parsed.resolve() {
            Ok(d) => Ok(Some(Placement {
                load: optimsyn_lm::LoadOptions { kind, device: d },
                device,
                dtype,
            })),
            Err(e) => {
                let reason = e.to_string();
                eprintln!("{name} bench: skipped: {reason}");
                println!(
                    "{}",
                    serde_json::json!({"side": "optimsyn", "skipped": reason})
                );
                Ok(None)
            }
        }
    }

    /// `x` rounded to `digits` decimals, for the JSON figures.
    pub fn round(x: f64, digits: i32) -> f64 {
        let p = 10f64.powi(digits);
        (x * p).round() / p
    }

    /// A `VmHWM`/`VmRSS` line of `/proc/self/status`, in MiB (Linux only).
    pub fn proc_status_mib(field: &str) -> Option<f64> {
        let s = std::fs::read_to_string("/proc/self/status").ok()?;
        let line = s.lines().find(|l| l.starts_with(field))?;
        let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb / 1024.0)
    }

    /// The entry point of the criterion benchmarks: with `OPTIMSYN_BENCH_JSON` set (not `0`),
    /// `json_mode` prints one JSON object for the side-by-side runners in `python/bench/`;
    /// otherwise criterion runs `benches` on the `full` shapes, or the `smoke` ones in criterion's
    /// test mode (`cargo test`, `--test`).
    pub fn main<S>(
        name: &str,
        json_mode: impl FnOnce() -> Result<(), String>,
        smoke: S,
        full: S,
        benches: impl FnOnce(&mut criterion::Criterion, S),
    ) {
        if env::var_os("OPTIMSYN_BENCH_JSON").is_some_and(|v| v != "0") {
            if let Err(e) = json_mode() {
                eprintln!("{name} bench: {e}");
                std::process::exit(1);
            }
            return;
        }
        tch::set_num_threads(threads());
        let shapes = if criterion_test_mode() { smoke } else { full };
        let mut c = criterion::Criterion::default().configure_from_args();
        benches(&mut c, shapes);
        c.final_summary();
    }

    /// Criterion's own rule: test mode unless `--bench` is given without `--test`.
    pub fn criterion_test_mode() -> bool {
        let args: Vec<String> = env::args().collect();
        !args.iter().any(|a| a == "--bench") || args.iter().any(|a| a == "--test")
    }

    /// Random f32 operands of a `[m, k] · [k, n]` matmul.
    pub fn matmul_operands(m: i64, k: i64, n: i64) -> (Tensor, Tensor) {
        tch::manual_seed(1);
        (
            Tensor::randn([m, k], (Kind::Float, Device::Cpu)),
            Tensor::randn([k, n], (Kind::Float, Device::Cpu)),
        )
    }
}
