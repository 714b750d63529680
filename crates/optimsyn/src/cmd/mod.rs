//! One module per subcommand group.

pub mod analyze;
pub mod data;
pub mod demo;
mod demo_world;
pub mod influence;
pub mod lm;
mod plot;
pub mod run;
pub mod serve;
pub mod train;

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use optimsyn_pipeline::{DeviceName, Dtype};

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

/// `--device` and `--dtype` as load options (`cpu`, `cuda`, `cuda:N`; `f32`, `bf16`, `f16`).
pub fn load_options(device: DeviceName, dtype: Dtype) -> anyhow::Result<optimsyn_lm::LoadOptions> {
    Ok(optimsyn_pipeline::load_options(device, dtype)?)
}
