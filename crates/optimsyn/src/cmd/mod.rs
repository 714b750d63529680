//! One module per subcommand group.

pub mod analyze;
pub mod data;
pub mod demo;
mod demo_world;
pub mod influence;
pub mod lm;
pub mod run;
pub mod serve;
pub mod train;

use std::io::Write;
use std::path::Path;

use anyhow::Context;

/// Where JSONL rows go: a file given with `--output`, else standard output.
pub fn output(path: Option<&Path>) -> anyhow::Result<Box<dyn Write>> {
    Ok(match path {
        Some(p) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("cannot create {}", p.display()))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    })
}

/// Writes one JSON row and a newline.
pub fn write_row(out: &mut dyn Write, row: &serde_json::Value) -> anyhow::Result<()> {
    serde_json::to_writer(&mut *out, row)?;
    out.write_all(b"\n")?;
    Ok(())
}

/// Which libtorch build this process runs on, in one line: CUDA or CPU-only, and the devices.
pub fn build_line() -> String {
    if tch::utils::has_cuda() {
        let v = tch::utils::version_cudart();
        format!(
            "libtorch for PyTorch 2.13 with CUDA {}.{}, {} CUDA device(s) visible",
            v / 1000,
            (v % 1000) / 10,
            tch::Cuda::device_count()
        )
    } else {
        format!(
            "libtorch for PyTorch 2.13, CPU-only build, {} threads",
            tch::get_num_threads()
        )
    }
}

/// `--device` and `--dtype` as load options (`cpu`, `cuda`, `cuda:N`; `f32`, `bf16`, `f16`).
pub fn load_options(device: &str, dtype: &str) -> anyhow::Result<optimsyn_lm::LoadOptions> {
    let device = match device {
        "cpu" => tch::Device::Cpu,
        "cuda" => tch::Device::Cuda(0),
        d => match d.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
            Some(n) => tch::Device::Cuda(n),
            None => anyhow::bail!("--device: `{d}` is not cpu, cuda or cuda:N"),
        },
    };
    if let tch::Device::Cuda(n) = device {
        anyhow::ensure!(
            tch::utils::has_cuda(),
            "--device cuda:{n}: this libtorch is a CPU-only build ({}); install a CUDA build \
             (README: \"GPUs\") or run on the CPU",
            build_line()
        );
        let have = tch::Cuda::device_count();
        anyhow::ensure!(
            (n as i64) < have,
            "--device cuda:{n}: this machine has {have} CUDA device(s) visible to {} (driver, \
             CUDA_VISIBLE_DEVICES?)",
            build_line()
        );
    }
    static ANNOUNCED: std::sync::Once = std::sync::Once::new();
    ANNOUNCED.call_once(|| {
        let on = match device {
            tch::Device::Cuda(n) => format!("cuda:{n}"),
            _ => "cpu".into(),
        };
        tracing::info!("{}; models on {on}", build_line());
    });
    let kind = match dtype {
        "f32" | "float32" => tch::Kind::Float,
        "bf16" | "bfloat16" => tch::Kind::BFloat16,
        "f16" | "float16" => tch::Kind::Half,
        d => anyhow::bail!("--dtype: `{d}` is not f32, bf16 or f16"),
    };
    Ok(optimsyn_lm::LoadOptions { kind, device })
}
