//! Model folders: configs, shard indexes, safetensors headers, and their bad-input errors.

use optimsyn_data_io::{Architecture, ModelFolder, SafetensorsHeader};
use std::path::Path;

/// A minimal safetensors file: header JSON then data.
fn write_safetensors(path: &Path, tensors: &[(&str, &[usize])], truncate_by: usize) {
    let mut header = serde_json::Map::new();
    let mut offset = 0;
    for (name, shape) in tensors {
        let n: usize = shape.iter().product::<usize>() * 4;
        header.insert(name.to_string(), serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + n]}));
        offset += n;
    }
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let h = serde_json::to_vec(&header).unwrap();
    let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
    bytes.extend(h);
    bytes.extend(vec![0u8; offset - truncate_by]);
    std::fs::write(path, bytes).unwrap();
}

const CONFIG: &str = r#"{"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 16,
  "hidden_size": 8, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4,
  "num_hidden_layers": 1, "intermediate_size": 12, "tie_word_embeddings": true, "eos_token_id": 2}"#;

#[test]
fn sharded_folder_routes_tensors_to_their_files() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), CONFIG).unwrap();
    std::fs::write(
        dir.path().join("generation_config.json"),
        r#"{"eos_token_id": [2, 5], "do_sample": true}"#,
    )
    .unwrap();
    write_safetensors(
        &dir.path().join("model-00001-of-00002.safetensors"),
        &[("model.embed_tokens.weight", &[16, 8])],
        0,
    );
    write_safetensors(
        &dir.path().join("model-00002-of-00002.safetensors"),
        &[("model.norm.weight", &[8])],
        0,
    );
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        r#"{"metadata": {"total_size": 544}, "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
            "model.norm.weight": "model-00002-of-00002.safetensors"}}"#,
    )
    .unwrap();
    let f = ModelFolder::open(dir.path()).unwrap();
    assert_eq!(f.config.architecture, Architecture::Qwen3);
    assert_eq!(f.eos_token_ids(), vec![2, 5]);
    assert!(f.weight_map["model.norm.weight"].ends_with("model-00002-of-00002.safetensors"));
    let h = SafetensorsHeader::read(&f.weight_map["model.embed_tokens.weight"]).unwrap();
    assert_eq!(h.tensors["model.embed_tokens.weight"].shape, vec![16, 8]);
    assert_eq!(h.metadata["format"], "pt");

    std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).unwrap();
    let e = ModelFolder::open(dir.path()).unwrap_err().to_string();
    assert!(
        e.contains("model.norm.weight") && e.contains("missing"),
        "{e}"
    );
}

#[test]
fn truncated_and_corrupt_weights_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("model.safetensors");
    write_safetensors(&p, &[("a", &[4]), ("b", &[3, 3])], 5);
    let e = SafetensorsHeader::read(&p).unwrap_err().to_string();
    assert!(
        e.contains("model.safetensors") && e.contains("truncated") && e.contains("`b`"),
        "{e}"
    );
    std::fs::write(&p, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all").unwrap();
    let e = SafetensorsHeader::read(&p).unwrap_err().to_string();
    assert!(e.contains("not valid JSON"), "{e}");
    std::fs::write(&p, b"\x01\x02").unwrap();
    let e = SafetensorsHeader::read(&p).unwrap_err().to_string();
    assert!(e.contains("truncated"), "{e}");
}

#[test]
fn config_errors_name_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let e = ModelFolder::open(dir.path().join("absent"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("absent"), "{e}");
    std::fs::write(dir.path().join("config.json"), r#"{"model_type": "mamba"}"#).unwrap();
    let e = ModelFolder::open(dir.path()).unwrap_err().to_string();
    assert!(e.contains("config.json") && e.contains("mamba"), "{e}");
    std::fs::write(dir.path().join("config.json"), CONFIG).unwrap();
    let e = ModelFolder::open(dir.path()).unwrap_err().to_string();
    assert!(e.contains("no model.safetensors"), "{e}");
}

/// Writes a safetensors file from a hand-made header (offsets as given) and `data_len` zero bytes.
fn write_raw(path: &Path, header: serde_json::Value, data_len: usize) {
    let h = serde_json::to_vec(&header).unwrap();
    let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
    bytes.extend(h);
    bytes.extend(vec![0u8; data_len]);
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn malformed_headers_are_rejected_naming_file_and_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.safetensors");
    // `b` overlaps `a` (the crate's offset check; the old hand parser accepted this).
    write_raw(
        &p,
        serde_json::json!({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                           "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}),
        24,
    );
    let e = SafetensorsHeader::read(&p).unwrap_err().to_string();
    assert!(
        e.contains("bad.safetensors") && e.contains("`b`") && e.contains("overlaps"),
        "{e}"
    );
    // A byte range that does not match shape × dtype.
    write_raw(
        &p,
        serde_json::json!({"a": {"dtype": "F16", "shape": [4], "data_offsets": [0, 16]}}),
        16,
    );
    let e = SafetensorsHeader::read(&p).unwrap_err().to_string();
    assert!(
        e.contains("bad.safetensors") && e.contains("`a`") && e.contains("does not fit"),
        "{e}"
    );
    // An unknown dtype names the tensor.
    write_raw(
        &p,
        serde_json::json!({"q": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 1]}}),
        1,
    );
    let e = SafetensorsHeader::read(&p).unwrap_err().to_string();
    assert!(e.contains("bad.safetensors") && e.contains("`q`"), "{e}");
    // A dtype the crate knows but no loader here uses.
    write_raw(
        &p,
        serde_json::json!({"c": {"dtype": "C64", "shape": [2], "data_offsets": [0, 16]}}),
        16,
    );
    let e = SafetensorsHeader::read(&p).unwrap_err().to_string();
    assert!(
        e.contains("`c`") && e.contains("unsupported dtype C64"),
        "{e}"
    );
    // Header length pointing past the end of the file (truncated inside the header).
    let mut bytes = 1000u64.to_le_bytes().to_vec();
    bytes.extend(b"{\"a\":");
    std::fs::write(&p, bytes).unwrap();
    let e = SafetensorsHeader::read(&p).unwrap_err().to_string();
    assert!(
        e.contains("bad.safetensors") && e.contains("bad safetensors header length 1000"),
        "{e}"
    );
    // Stray bytes after the last tensor.
    write_raw(
        &p,
        serde_json::json!({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}),
        20,
    );
    let e = SafetensorsHeader::read(&p).unwrap_err().to_string();
    assert!(
        e.contains("bad.safetensors") && e.contains("4 stray bytes"),
        "{e}"
    );
}
