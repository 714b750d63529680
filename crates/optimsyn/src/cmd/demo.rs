//! `optimsyn demo`: for now, an end-to-end smoke of what is built — the bundled tokenizer and chat
//! template render the bundled conversations in both training formats, and libtorch computes. The
//! full embedded OptimSyn run replaces it once the pipeline exists.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use optimsyn_data_io::{ChatExample, ChatFormat, ChatTokenizer, read_jsonl};

const ASSETS: [(&str, &str); 4] = [
    (
        "tokenizer.json",
        include_str!("../../demo/model/tokenizer.json"),
    ),
    (
        "tokenizer_config.json",
        include_str!("../../demo/model/tokenizer_config.json"),
    ),
    (
        "chat_template.jinja",
        include_str!("../../demo/model/chat_template.jinja"),
    ),
    ("chats.jsonl", include_str!("../../demo/chats.jsonl")),
];

/// Arguments of `demo`.
#[derive(Args)]
pub struct DemoArgs {
    /// Where to write the demo's files (default: a fresh temporary folder).
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Runs the smoke demo.
pub fn run(a: DemoArgs) -> anyhow::Result<()> {
    let tmp;
    let dir = match a.out {
        Some(d) => d,
        None => {
            tmp = std::env::temp_dir().join(format!("optimsyn-demo-{}", std::process::id()));
            tmp
        }
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for (name, text) in ASSETS {
        std::fs::write(dir.join(name), text)
            .with_context(|| format!("cannot write {}", dir.join(name).display()))?;
    }
    let tok = ChatTokenizer::from_model_dir(&dir)?;
    let chats: Vec<ChatExample> = read_jsonl(dir.join("chats.jsonl"))?;
    for format in [ChatFormat::ChatTemplate, ChatFormat::Tulu] {
        let (mut tokens, mut trained) = (0usize, 0usize);
        for ex in &chats {
            let enc = tok.encode_example(ex, format, None, &Default::default())?;
            tokens += enc.tokens.len();
            trained += enc.loss_mask.iter().filter(|m| **m == 1).count();
        }
        println!(
            "{format:>13}: {} conversations, {tokens} tokens, {trained} carry loss",
            chats.len()
        );
    }
    let x = tch::Tensor::f_from_slice(&[1.0f32, 2.0, 3.0, 4.0])?.f_reshape([2, 2])?;
    let y = x
        .f_matmul(&x)?
        .f_sum(tch::Kind::Float)?
        .f_double_value(&[])?;
    anyhow::ensure!(y == 54.0, "libtorch computed {y}, expected 54");
    println!(
        "libtorch: ok (CUDA available: {})",
        tch::Cuda::is_available()
    );
    println!("demo files in {}", dir.display());
    Ok(())
}
