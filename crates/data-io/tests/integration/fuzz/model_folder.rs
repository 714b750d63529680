//! Model folders from arbitrary and mutated JSON (crates/data-io/src/hf.rs:
//! `ModelConfig::from_json_str`, `GenerationConfig::from_file`, `ModelFolder::open` with its shard
//! index; crates/data-io/src/tokenizer.rs: `ChatTokenizer::from_model_dir` with its
//! `tokenizer_config.json`, `chat_template.json` and the `eos_token_id`s of the configs).

use std::path::{Path, PathBuf};

use optimsyn_data_io::{ChatMessage, ChatTokenizer, ModelConfig, ModelFolder};
use proptest::collection::vec;
use proptest::prelude::*;
use serde_json::{Value, json};

use super::mutate::{apply_bytes, byte_ops, json_value, mutated_json};

const CONFIG_KEYS: &[&str] = &[
    "model_type",
    "architectures",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "rope_type",
    "type",
    "factor",
    "low_freq_factor",
    "high_freq_factor",
    "original_max_position_embeddings",
    "tie_word_embeddings",
    "attention_bias",
    "mlp_bias",
    "hidden_act",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "torch_dtype",
    "dtype",
    "use_sliding_window",
    "qwen2",
    "qwen3",
    "llama",
    "llama3",
    "linear",
    "default",
    "LlamaForCausalLM",
];

/// Valid configs of every architecture and RoPE form.
fn configs() -> Vec<Value> {
    vec![
        json!({"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 16,
               "hidden_size": 8, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4,
               "num_hidden_layers": 1, "intermediate_size": 12, "tie_word_embeddings": true, "eos_token_id": 2}),
        json!({"model_type": "qwen2", "hidden_size": 48, "num_attention_heads": 6, "num_key_value_heads": 2,
               "intermediate_size": 96, "num_hidden_layers": 3, "bos_token_id": 1, "eos_token_id": [2, 3],
               "vocab_size": 99, "use_sliding_window": false}),
        json!({"model_type": "llama", "hidden_size": 32, "num_attention_heads": 4, "mlp_bias": true,
               "attention_bias": true, "rope_theta": 500000.0,
               "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
               "max_position_embeddings": 512, "torch_dtype": "bfloat16"}),
        json!({"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
               "rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
               "eos_token_id": 128001, "pad_token_id": null, "dtype": "float32"}),
    ]
}

/// A config text: arbitrary, arbitrary JSON, or a valid one edited.
fn config_text() -> impl Strategy<Value = Vec<u8>> {
    let mutated =
        (0..configs().len()).prop_flat_map(|i| mutated_json(configs()[i].clone(), CONFIG_KEYS));
    prop_oneof![
        1 => vec(any::<u8>(), 0..64),
        1 => json_value(CONFIG_KEYS).prop_map(|v| serde_json::to_vec(&v).expect("a Value serializes")),
        6 => mutated,
    ]
}

fn generation_text() -> impl Strategy<Value = Vec<u8>> {
    let base = json!({"bos_token_id": 1, "eos_token_id": [2, 5], "pad_token_id": 0, "do_sample": true,
                      "temperature": 0.6, "top_p": 0.95, "top_k": 20, "max_new_tokens": 32});
    prop_oneof![
        1 => vec(any::<u8>(), 0..32),
        4 => mutated_json(base, &["eos_token_id", "bos_token_id", "pad_token_id", "do_sample",
                                   "temperature", "top_p", "top_k", "max_new_tokens"]),
    ]
}

fn index_text() -> impl Strategy<Value = Vec<u8>> {
    let base = json!({"metadata": {"total_size": 544},
                      "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                                     "model.norm.weight": "model-00002-of-00002.safetensors"}});
    mutated_json(
        base,
        &[
            "metadata",
            "weight_map",
            "model.norm.weight",
            "model-00001-of-00002.safetensors",
            "",
            "..",
            "/",
        ],
    )
}

/// A one-tensor safetensors file.
fn weights(name: &str, n: usize) -> Vec<u8> {
    let h = serde_json::to_vec(
        &json!({name: {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}}),
    )
    .expect("a Value serializes");
    let mut b = (h.len() as u64).to_le_bytes().to_vec();
    b.extend(h);
    b.extend(vec![0u8; 4 * n]);
    b
}

fn error_names_the_folder(e: &optimsyn_data_io::Error, dir: &Path) -> Result<(), TestCaseError> {
    let msg = e.to_string();
    prop_assert!(msg.contains(&dir.display().to_string()), "{msg}");
    Ok(())
}

const TOKENIZER_KEYS: &[&str] = &[
    "bos_token",
    "eos_token",
    "unk_token",
    "pad_token",
    "content",
    "chat_template",
    "name",
    "template",
    "default",
    "<|im_end|>",
    "<|endoftext|>",
];

fn chatml() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat/chatml")
}

proptest! {
    #![proptest_config(super::cases(64))]

    /// `config.json` text: a config whose shape checks hold and which round-trips through the
    /// config.json written for it, or an error.
    #[test]
    fn config_json_parses_or_names_the_field(text in config_text()) {
        let text = String::from_utf8_lossy(&text);
        match ModelConfig::from_json_str(&text) {
            Err(e) => prop_assert!(!e.is_empty()),
            Ok(c) => {
                prop_assert!(c.num_attention_heads > 0 && c.num_key_value_heads > 0);
                prop_assert!(c.num_attention_heads % c.num_key_value_heads == 0);
                prop_assert!(c.head_dim > 0 && c.head_dim % 2 == 0);
                let again = ModelConfig::from_json_str(&c.to_hf_json().to_string());
                prop_assert!(again.is_ok(), "{:?}", again);
                let again = again.unwrap_or_else(|_| c.clone());
                prop_assert_eq!(ModelConfig { dtype: c.dtype.clone(), ..again }, c);
            }
        }
    }

    /// A whole folder: config, optional generation config, and weights as one file or a shard
    /// index, each possibly damaged.
    #[test]
    fn model_folder_opens_or_names_the_file(
        config in proptest::option::weighted(0.9, config_text()),
        generation in proptest::option::of(generation_text()),
        sharded in any::<bool>(),
        index in index_text(),
        weights_damage in proptest::option::weighted(0.3, byte_ops()),
    ) {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let d = dir.path();
        if let Some(c) = &config {
            std::fs::write(d.join("config.json"), c).expect("write");
        }
        if let Some(g) = &generation {
            std::fs::write(d.join("generation_config.json"), g).expect("write");
        }
        let w = weights("model.embed_tokens.weight", 4);
        let w = match &weights_damage {
            Some(ops) => apply_bytes(w, ops),
            None => w,
        };
        if sharded {
            std::fs::write(d.join("model.safetensors.index.json"), &index).expect("write");
            std::fs::write(d.join("model-00001-of-00002.safetensors"), &w).expect("write");
            std::fs::write(d.join("model-00002-of-00002.safetensors"), weights("model.norm.weight", 2))
                .expect("write");
        } else {
            std::fs::write(d.join("model.safetensors"), &w).expect("write");
        }
        match ModelFolder::open(d) {
            Err(e) => error_names_the_folder(&e, d)?,
            Ok(f) => {
                if !sharded {
                    prop_assert!(f.weight_map.values().all(|p| p.ends_with("model.safetensors")));
                }
            }
        }
    }

    /// The tokenizer side of a folder: special tokens and the template from
    /// `tokenizer_config.json` or `chat_template.json`, stop ids from the configs.
    #[test]
    fn tokenizer_folder_loads_or_names_the_file(
        tok_config in prop_oneof![
            1 => vec(any::<u8>(), 0..32),
            6 => mutated_json(
                json!({"bos_token": null, "eos_token": "<|im_end|>", "pad_token": {"content": "<|endoftext|>"},
                       "chat_template": [{"name": "default", "template": "{{ messages[0].content }}"},
                                         {"name": "tool_use", "template": "{{ tools }}"}]}),
                TOKENIZER_KEYS,
            ),
        ],
        template_json in proptest::option::weighted(
            0.3,
            mutated_json(json!({"chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}"}), TOKENIZER_KEYS),
        ),
        config in proptest::option::weighted(0.5, config_text()),
        generation in proptest::option::weighted(0.3, generation_text()),
        content in super::mutate::text(),
    ) {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let d = dir.path();
        std::fs::copy(chatml().join("tokenizer.json"), d.join("tokenizer.json")).expect("copy");
        std::fs::write(d.join("tokenizer_config.json"), &tok_config).expect("write");
        if let Some(t) = &template_json {
            std::fs::write(d.join("chat_template.json"), t).expect("write");
        }
        if let Some(c) = &config {
            std::fs::write(d.join("config.json"), c).expect("write");
        }
        if let Some(g) = &generation {
            std::fs::write(d.join("generation_config.json"), g).expect("write");
        }
        match ChatTokenizer::from_model_dir(d) {
            Err(e) => error_names_the_folder(&e, d)?,
            Ok(tok) => {
                let _ = tok.pad_token_id();
                let msgs = [ChatMessage::user(content.clone()), ChatMessage::assistant(content)];
                if tok.chat_template().is_some() {
                    let _ = tok.render_chat(&msgs, true);
                }
            }
        }
    }
}
