//! Shared fixtures: the tiny Qwen3 model with a tokenizer, a warm-up run on it, chat data.

use std::path::{Path, PathBuf};

use optimsyn_data_io::{ChatExample, ChatFormat, ChatMessage, ChatTokenizer};
use optimsyn_lm::sft::{self, SftConfig};
use optimsyn_lm::{
    CausalLm, DataInfo, LoadOptions, LoraAdapter, LoraConfig, LossBatch, MaskedSeq, TrainExample,
    Trainable,
};
use tch::{Kind, Tensor};

pub fn model_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../lm/tests/fixtures/cli")
}

const WORDS: &[&str] = &[
    "aspirin", "dose", "rubric", "law", "court", "heart", "history", "Rome", "tax", "trade",
];

/// Short QA pairs (the fixture's context is 64 tokens).
pub fn chats(n: usize, seed: usize, subtask: Option<&str>) -> Vec<ChatExample> {
    (0..n)
        .map(|i| {
            let a = WORDS[(i * 7 + seed) % WORDS.len()];
            let b = WORDS[(i * 3 + seed * 5 + 1) % WORDS.len()];
            ChatExample {
                id: Some(format!("s{seed}-{i}")),
                messages: vec![
                    ChatMessage::user(format!("{a} {b}?")),
                    ChatMessage::assistant(format!("{b} {a} {b}")),
                ],
                subtask: subtask.map(String::from),
            }
        })
        .collect()
}

pub fn validation() -> Vec<ChatExample> {
    let mut v = chats(3, 11, Some("med"));
    v.extend(chats(2, 23, Some("law")));
    v
}

/// Warm-up: LoRA on 16 chats in the Tulu format, checkpoints at steps 2 and 4, written to `out`.
pub fn warmup(out: &Path) -> Vec<PathBuf> {
    let tok = ChatTokenizer::from_model_dir(model_dir()).unwrap();
    let data: Vec<TrainExample> = chats(16, 1, None)
        .iter()
        .map(|c| {
            let e = tok
                .encode_example(c, ChatFormat::Tulu, Some(60), &Default::default())
                .unwrap();
            TrainExample {
                id: c.id.clone().unwrap(),
                tokens: e.tokens,
                loss_mask: e.loss_mask,
                subtask: None,
            }
        })
        .collect();
    let mut model = CausalLm::load(model_dir(), LoadOptions::default()).unwrap();
    let cfg = LoraConfig {
        r: 4,
        alpha: 16.0,
        dropout: 0.1,
        ..Default::default()
    };
    let adapter = LoraAdapter::init(&mut model, cfg, 0).unwrap();
    let sft_cfg = SftConfig {
        lr: 2e-2,
        batch_size: 4,
        checkpoints: 2,
        warmup_ratio: 0.0,
        ..Default::default()
    };
    let info = DataInfo {
        format: Some(ChatFormat::Tulu),
        data_hash: Some("test".into()),
        data_path: None,
    };
    let report = sft::train(
        &mut model,
        Trainable::Lora(&adapter),
        &data,
        &sft_cfg,
        &info,
        out,
        &mut |_| {},
    )
    .unwrap();
    report.checkpoints
}

/// One sample's LoRA gradient by plain autograd (the slow reference), flattened in the adapter's order.
pub fn reference_grad(model: &CausalLm, adapter: &LoraAdapter, e: &TrainExample) -> Tensor {
    for (_, p) in adapter.named_parameters() {
        let mut p = p.shallow_clone();
        p.zero_grad();
    }
    let b = LossBatch::new(
        &[MaskedSeq {
            tokens: &e.tokens,
            loss_mask: &e.loss_mask,
        }],
        model.device(),
    )
    .unwrap();
    model
        .per_sample_loss(&b)
        .unwrap()
        .sum(Kind::Float)
        .backward();
    let parts: Vec<Tensor> = adapter
        .named_parameters()
        .iter()
        .map(|(_, p)| p.grad().reshape([-1]))
        .collect();
    Tensor::cat(&parts, 0)
}
