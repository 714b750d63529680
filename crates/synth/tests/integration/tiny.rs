//! The tiny model and inputs that fit its 64-token context, shared by the test binaries of
//! optimsyn-synth and optimsyn-serve (serve includes this file by path).

// Each test binary uses a part of these.
#![allow(dead_code)]

use std::path::PathBuf;

use optimsyn_data_io::{ChatMessage, ChatTokenizer, SeedDoc};
use optimsyn_lm::{CausalLm, LoadOptions};
use optimsyn_synth::{
    ChatPrompt, GenerationParams, LocalGenerator, QaPrompt, QaTask, RubricSections,
};

/// The tiny Qwen3 (vocab 320, context 64 tokens) with a ChatML template.
pub fn model_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../lm/tests/fixtures/cli")
}

pub const MODEL: &str = "tiny";

pub fn load_model() -> (CausalLm, ChatTokenizer) {
    let dir = model_dir();
    let tok = ChatTokenizer::from_model_dir(&dir).expect("fixture tokenizer");
    let model = CausalLm::load(&dir, LoadOptions::default()).expect("fixture model");
    (model, tok)
}

pub fn local(params: GenerationParams) -> LocalGenerator {
    let (m, t) = load_model();
    LocalGenerator::new(m, t, params, MODEL).expect("local generator")
}

/// Generator templates short enough for the tiny model's context.
pub fn tiny_prompt() -> QaPrompt {
    QaPrompt::from_sources(
        ("{{ domain }}", "tiny system"),
        ("{{ document }} {{ prompt_related }}", "tiny user"),
    )
    .expect("tiny templates")
}

/// `n` short chat prompts.
pub fn prompts(n: usize) -> Vec<ChatPrompt> {
    (0..n)
        .map(|i| ChatPrompt {
            key: format!("p{i}"),
            messages: vec![ChatMessage::user(format!("hi {i}"))],
        })
        .collect()
}

/// `n` QA tasks on tiny documents, two rubrics per document.
pub fn tasks(n: usize) -> Vec<QaTask> {
    (0..n)
        .map(|i| {
            let doc = SeedDoc {
                id: format!("d{}", i / 2),
                text: format!("cat {i}"),
                domain: Some("pets".into()),
                extra: Default::default(),
            };
            QaTask::new(
                &doc,
                &format!("{}", i % 2),
                RubricSections {
                    prompt_related: "ask".into(),
                    ..Default::default()
                },
            )
        })
        .collect()
}
