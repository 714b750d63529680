//! Completions per second through `optimsyn serve` + the HTTP backend versus the local backend:
//! 8 concurrent chat requests of 64 new tokens (greedy), on the bench model of `benches/bench-model/`
//! (Qwen3 shape, ~29M parameters, fp32, CPU).
//!
//! `cargo bench -p optimsyn-examples --bench serve` measures; `cargo test` runs it once on the tiny
//! fixture model as a smoke test. The bench model is `OPTIMSYN_BENCH_MODEL`, else the one the
//! benchmarks share (`optimsyn_examples::bench_model_dir`: written once into the cache by
//! `python/bench/make_bench_model.py`). `THREADS` (default 2) sets libtorch's threads on
//! both sides (the measuring thread and the server's model thread).
//! `REPS` (default 5) sets the measured repetitions after one warm-up of each side; the sides
//! alternate rep by rep (local, server, local, …) so drift in the machine's load falls on both
//! alike. Traffic stays on 127.0.0.1.

use std::sync::mpsc;
use std::time::Instant;

use optimsyn_data_io::ChatMessage;
use optimsyn_lm::LoadOptions;
use optimsyn_serve::{ServeConfig, Server};
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

/// Seconds, completion tokens and texts of one `generate_all` of the prompts.
struct Rep {
    secs: f64,
    tokens: u64,
    texts: Vec<String>,
}

fn once(g: &dyn Generator, prompts: &[ChatPrompt]) -> Rep {
    let start = Instant::now();
    let out: Vec<optimsyn_synth::Completion> = g
        .generate_all(prompts)
        .into_iter()
        .map(|r| r.unwrap_or_else(|e| panic!("generation failed: {e}")))
        .collect();
    Rep {
        secs: start.elapsed().as_secs_f64(),
        tokens: out.iter().map(|c| c.completion_tokens.unwrap_or(0)).sum(),
        texts: out.into_iter().map(|c| c.text).collect(),
    }
}

/// Completions/s and tokens/s over the measured reps.
fn rates(reps: &[Rep], prompts: usize) -> (f64, f64) {
    let secs: f64 = reps.iter().map(|r| r.secs).sum();
    let tokens: u64 = reps.iter().map(|r| r.tokens).sum();
    ((reps.len() * prompts) as f64 / secs, tokens as f64 / secs)
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
    // model thread does, so the two differ only by the server and the HTTP client. It runs one
    // rep per message, so the sides alternate.
    let (local_reps, serve_reps) = std::thread::scope(|sc| {
        let (go, todo) = mpsc::channel::<()>();
        let (done, results) = mpsc::channel::<Rep>();
        let (dir, params, prompts) = (&dir, &params, &prompts);
        sc.spawn(move || {
            tch::set_num_threads(threads as i32);
            let local = LocalGenerator::load(dir, LoadOptions::default(), params.clone())
                .unwrap_or_else(|e| panic!("{e}"))
                .with_batch_size(8);
            for () in todo {
                if done.send(once(&local, prompts)).is_err() {
                    return;
                }
            }
        });
        let local_once = || {
            go.send(()).unwrap_or_else(|_| panic!("local side gone"));
            results
                .recv()
                .unwrap_or_else(|_| panic!("local side panicked"))
        };
        let (mut l, mut s) = (vec![local_once()], vec![once(&client, prompts)]); // warm-ups
        for _ in 0..reps {
            l.push(local_once());
            s.push(once(&client, prompts));
        }
        (l, s)
    });
    let stats = server.stats();
    server.shutdown();
    assert_eq!(
        serve_reps[0].texts, local_reps[0].texts,
        "greedy through the server equals local"
    );
    let (l_cps, l_tps) = rates(&local_reps[1..], prompts.len());
    let (s_cps, s_tps) = rates(&serve_reps[1..], prompts.len());
    let mut per_rep: Vec<f64> = local_reps[1..]
        .iter()
        .zip(&serve_reps[1..])
        .map(|(l, s)| l.secs / s.secs)
        .collect();
    per_rep.sort_by(f64::total_cmp);
    println!(
        "serve bench ({}; 8 concurrent requests × {new_tokens} new tokens, greedy, {threads} threads, {reps} reps):",
        dir.display()
    );
    println!("  local backend : {l_cps:8.2} completions/s {l_tps:9.1} tokens/s");
    println!("  serve + HTTP  : {s_cps:8.2} completions/s {s_tps:9.1} tokens/s");
    println!(
        "  serve / local : {:.3} (per rep: {}; server batches: {}, largest {} rows)",
        s_cps / l_cps,
        per_rep
            .iter()
            .map(|r| format!("{r:.3}"))
            .collect::<Vec<_>>()
            .join(" "),
        stats.batches,
        stats.max_batch_rows
    );
}
