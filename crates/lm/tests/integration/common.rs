//! Fixture access shared by the test modules.

use std::path::PathBuf;

use optimsyn_lm::{CausalLm, LoadOptions};
use serde_json::Value;

/// The parity fixtures written by `python/fixtures/lm_parity.py`.
pub const PARITY: &[&str] = &[
    "qwen2_tied_gqa",
    "qwen2_untied_mha",
    "qwen2_headdim_sharded",
    "qwen3_tied_gqa",
    "qwen3_untied_theta",
    "qwen3_kv1_sharded",
    "llama_tied_gqa",
    "llama_rope3",
    "llama_bias_headdim",
];

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

pub fn load(name: &str) -> CausalLm {
    CausalLm::load(fixture(name), LoadOptions::default()).unwrap_or_else(|e| panic!("{name}: {e}"))
}

pub fn expected(name: &str) -> Value {
    let text = std::fs::read_to_string(fixture(name).join("expected.json")).expect("expected.json");
    serde_json::from_str(&text).expect("expected.json parses")
}

pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("id list")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

pub fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("float list")
        .iter()
        .map(|x| x.as_f64().expect("float") as f32)
        .collect()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Copies a fixture folder into a fresh temporary directory (for corrupting it).
pub fn copy_fixture(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for entry in std::fs::read_dir(fixture(name)).expect("fixture dir") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).expect("copy");
    }
    dir
}
