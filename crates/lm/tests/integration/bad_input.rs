//! Bad input gives a clear error naming what is wrong, never a panic.

use std::fs;

use optimsyn_lm::{CausalLm, Error, LoadOptions, SamplingParams};
use tch::Tensor;

use crate::common::*;

fn load_err(dir: &std::path::Path) -> String {
    match CausalLm::load(dir, LoadOptions::default()) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn truncated_safetensors_is_reported() {
    let dir = copy_fixture("qwen3_tied_gqa");
    let path = dir.path().join("model.safetensors");
    let bytes = fs::read(&path).expect("read");
    fs::write(&path, &bytes[..bytes.len() - 100]).expect("truncate");
    let e = load_err(dir.path());
    assert!(
        e.contains("model.safetensors") && e.contains("truncated"),
        "{e}"
    );
    // A file shorter than its header length.
    fs::write(&path, &bytes[..20]).expect("truncate more");
    let e = load_err(dir.path());
    assert!(e.contains("header"), "{e}");
}

#[test]
fn corrupt_safetensors_header_is_reported() {
    let dir = copy_fixture("llama_tied_gqa");
    let path = dir.path().join("model.safetensors");
    let mut bytes = fs::read(&path).expect("read");
    bytes[8] = b'#'; // the header's opening brace
    fs::write(&path, &bytes).expect("corrupt");
    let e = load_err(dir.path());
    assert!(e.contains("model.safetensors") && e.contains("JSON"), "{e}");
}

#[test]
fn missing_shard_is_reported() {
    let dir = copy_fixture("qwen3_kv1_sharded");
    fs::remove_file(dir.path().join("model-00003-of-00005.safetensors")).expect("rm");
    let e = load_err(dir.path());
    assert!(
        e.contains("model-00003-of-00005.safetensors") && e.contains("missing"),
        "{e}"
    );
}

#[test]
fn unknown_model_type_is_reported() {
    let dir = copy_fixture("qwen2_tied_gqa");
    let path = dir.path().join("config.json");
    let text = fs::read_to_string(&path)
        .expect("read")
        .replace("\"qwen2\"", "\"gpt_neox\"");
    fs::write(&path, text).expect("write");
    let e = load_err(dir.path());
    assert!(e.contains("model_type") && e.contains("gpt_neox"), "{e}");
}

fn edit_config(dir: &std::path::Path, key: &str, value: serde_json::Value) {
    let path = dir.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&path).expect("read")).expect("json");
    cfg[key] = value;
    fs::write(&path, cfg.to_string()).expect("write");
}

#[test]
fn config_weights_mismatch_names_the_tensor() {
    // Wider MLP in the config than in the file.
    let dir = copy_fixture("qwen3_tied_gqa");
    edit_config(dir.path(), "intermediate_size", 50.into());
    let e = load_err(dir.path());
    assert!(
        e.contains("model.layers.0.mlp.gate_proj.weight") && e.contains("[50, 32]"),
        "{e}"
    );
    // Fewer layers in the config: the file has unexpected tensors.
    let dir = copy_fixture("qwen3_tied_gqa");
    edit_config(dir.path(), "num_hidden_layers", 1.into());
    let e = load_err(dir.path());
    assert!(
        e.contains("model.layers.1.") && e.contains("unexpected"),
        "{e}"
    );
    // More layers: a missing tensor.
    let dir = copy_fixture("llama_tied_gqa");
    edit_config(dir.path(), "num_hidden_layers", 3.into());
    let e = load_err(dir.path());
    assert!(
        e.contains("model.layers.2.") && e.contains("missing"),
        "{e}"
    );
    // Untied in the config, but the file has no lm_head.
    let dir = copy_fixture("llama_tied_gqa");
    edit_config(dir.path(), "tie_word_embeddings", false.into());
    let e = load_err(dir.path());
    assert!(e.contains("lm_head.weight") && e.contains("missing"), "{e}");
}

#[test]
fn a_folder_without_weights_or_config_is_reported() {
    let dir = tempfile::tempdir().expect("tmp");
    let e = load_err(dir.path());
    assert!(e.contains("config.json"), "{e}");
    let e = load_err(&dir.path().join("nope"));
    assert!(e.contains("nope"), "{e}");
}

#[test]
fn prompts_longer_than_the_context_are_refused() {
    let model = load("qwen2_tied_gqa");
    let ctx = model.config().max_position_embeddings;
    let long: Vec<u32> = (0..ctx + 1).map(|i| 3 + (i % 50) as u32).collect();
    let e = model
        .sequence_logprobs(&[long.as_slice()], 1.0)
        .expect_err("too long");
    assert!(
        matches!(e, Error::Input(_)) && e.to_string().contains("context"),
        "{e}"
    );
    let at_ctx = &long[..ctx];
    let e = model
        .generate(&[&[3, 4], at_ctx], &[0, 1], &SamplingParams::greedy(4))
        .expect_err("no room");
    assert!(
        e.to_string().contains("row 1") && e.to_string().contains("context"),
        "{e}"
    );
    // The forward API checks too.
    let ids =
        Tensor::from_slice(&long.iter().map(|&t| i64::from(t)).collect::<Vec<_>>()).view([1, -1]);
    let e = model.forward(&ids, None, None).expect_err("forward");
    assert!(e.to_string().contains("context"), "{e}");
}

#[test]
fn bad_ids_and_shapes_are_refused() {
    let model = load("qwen2_tied_gqa");
    let e = model
        .sequence_logprobs(&[&[1, 2, 64]], 1.0)
        .expect_err("oov");
    assert!(
        e.to_string().contains("64") && e.to_string().contains("vocabulary"),
        "{e}"
    );
    let e = model
        .forward(&Tensor::from_slice(&[1i64, -3]).view([1, 2]), None, None)
        .expect_err("negative");
    assert!(e.to_string().contains("-3"), "{e}");
    let e = model
        .forward(&Tensor::from_slice(&[1i64, 3]), None, None)
        .expect_err("1-D");
    assert!(e.to_string().contains("[batch, seq]"), "{e}");
    let e = model
        .forward(&Tensor::from_slice(&[1.0f32, 3.0]).view([1, 2]), None, None)
        .expect_err("floats");
    assert!(e.to_string().contains("integers"), "{e}");
    let mask = Tensor::from_slice(&[1i64, 1, 1]).view([1, 3]);
    let e = model
        .forward(
            &Tensor::from_slice(&[1i64, 3]).view([1, 2]),
            Some(&mask),
            None,
        )
        .expect_err("mask");
    assert!(e.to_string().contains("mask"), "{e}");
    let e = model.sequence_logprobs(&[&[5]], 1.0).expect_err("1 token");
    assert!(e.to_string().contains("at least 2"), "{e}");
    let e = model
        .generate(&[&[]], &[0], &SamplingParams::greedy(3))
        .expect_err("empty prompt");
    assert!(e.to_string().contains("empty"), "{e}");
    let e = model
        .generate(&[&[3]], &[0, 1], &SamplingParams::greedy(3))
        .expect_err("keys");
    assert!(e.to_string().contains("keys"), "{e}");
    let bad = SamplingParams {
        top_p: 0.0,
        ..Default::default()
    };
    let e = model.generate(&[&[3]], &[0], &bad).expect_err("top_p");
    assert!(e.to_string().contains("top_p"), "{e}");
}
