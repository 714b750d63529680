//! Completions per second through `optimsyn serve` + the HTTP backend versus the local backend:
//! 8 concurrent chat requests of 64 new tokens (greedy), on the bench model of `benches/bench-model/`
//! (Qwen3 shape, ~29M parameters, fp32, CPU).
//!
//! `cargo bench -p optimsyn-examples --bench serve` measures; `cargo test` runs it once on the tiny
//! fixture model as a smoke test. The bench model is `OPTIMSYN_BENCH_MODEL`, else the one the
//! benchmarks share (`optimsyn_examples::bench_model_dir`: written once into the cache by
//! `python/bench/make_bench_model.py`). `THREADS` (default 2) sets libtorch's threads on
//! both sides (the measuring thread and the server's model thread).
//! `REPS` (default 5) sets the measured repetitions after one warm-up. Traffic stays on 127.0.0.1.

use std::time::Instant;

use optimsyn_data_io::ChatMessage;
use optimsyn_lm::LoadOptions;
use optimsyn_synth::serve::{ServeConfig, Server};
use optimsyn_synth::{
    ChatPrompt, GenerationParams, Generator, LocalGenerator, OpenAiConfig, OpenAiGenerator,
};

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&v| v > 0)
        .unwrap_or(default)
}

struct Figures {
    completions_per_s: f64,
    tokens_per_s: f64,
    texts: Vec<String>,
}

fn measure(g: &dyn Generator, prompts: &[ChatPrompt], reps: usize) -> Figures {
    let texts = |out: Vec<optimsyn_synth::Result<optimsyn_synth::Completion>>| {
        out.into_iter()
            .map(|r| r.unwrap_or_else(|e| panic!("generation failed: {e}")))
            .collect::<Vec<_>>()
    };
    let first = texts(g.generate_all(prompts)); // warm-up
    let start = Instant::now();
    let mut tokens = 0u64;
    for _ in 0..reps {
        for c in texts(g.generate_all(prompts)) {
            tokens += c.completion_tokens.unwrap_or(0);
        }
    }
    let secs = start.elapsed().as_secs_f64();
    Figures {
        completions_per_s: (reps * prompts.len()) as f64 / secs,
        tokens_per_s: tokens as f64 / secs,
        texts: first.into_iter().map(|c| c.text).collect(),
    }
}

fn main() {
    let full = !optimsyn_examples::bench::criterion_test_mode();
    let (dir, reps, new_tokens) = if full {
        match optimsyn_examples::bench_model_dir() {
            Ok(d) => (d, env_num("REPS", 5), 64),
            Err(e) => {
                eprintln!("serve bench: {e}");
                std::process::exit(1);
            }
        }
    } else {
        let tiny = optimsyn_examples::tiny_model_dir();
        (tiny, 1, 8)
    };
    let threads = env_num("THREADS", 2);
    let prompts: Vec<ChatPrompt> = (0..8)
        .map(|i| ChatPrompt {
            key: format!("bench-{i}"),
            messages: vec![ChatMessage::user(format!("Tell me about topic {i}."))],
        })
        .collect();
    let params = GenerationParams::greedy(new_tokens);
    let server = Server::load(
        &dir,
        LoadOptions::default(),
        ServeConfig {
            port: 0,
            served_model_name: Some("bench".into()),
            max_batch: 8,
            threads: Some(threads),
            ..Default::default()
        },
    )
    .and_then(Server::start)
    .unwrap_or_else(|e| panic!("{e}"));
    let client = OpenAiGenerator::new(
        OpenAiConfig {
            base_url: server.base_url(),
            model: "bench".into(),
            api_key_env: None,
            concurrency: 8,
            max_retries: 0,
            timeout_secs: 600.0,
            ..Default::default()
        },
        params.clone(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    // The local side runs on a thread of its own with the same thread count, as the server's
    // model thread does, so the two differ only by the server and the HTTP client.
    let l = std::thread::scope(|sc| {
        sc.spawn(|| {
            tch::set_num_threads(threads as i32);
            let local = LocalGenerator::load(&dir, LoadOptions::default(), params.clone())
                .unwrap_or_else(|e| panic!("{e}"))
                .with_batch_size(8);
            measure(&local, &prompts, reps)
        })
        .join()
        .unwrap_or_else(|_| panic!("local side panicked"))
    });
    let s = measure(&client, &prompts, reps);
    let stats = server.stats();
    server.shutdown();
    assert_eq!(s.texts, l.texts, "greedy through the server equals local");
    println!(
        "serve bench ({}; 8 concurrent requests × {new_tokens} new tokens, greedy, {threads} threads, {reps} reps):",
        dir.display()
    );
    println!(
        "  local backend : {:8.2} completions/s {:9.1} tokens/s",
        l.completions_per_s, l.tokens_per_s
    );
    println!(
        "  serve + HTTP  : {:8.2} completions/s {:9.1} tokens/s",
        s.completions_per_s, s.tokens_per_s
    );
    println!(
        "  serve / local : {:.3} (server batches: {}, largest {} rows)",
        s.completions_per_s / l.completions_per_s,
        stats.batches,
        stats.max_batch_rows
    );
}
