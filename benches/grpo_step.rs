//! Seconds per GRPO step on the bench model, the Rust side of
//! `python/bench/trl_grpo_step.py`: full fine-tuning, 4 prompts × G 4 = 16 completions
//! of up to 64 new tokens (temperature 1, the model's EOS stops a row), β 0.001 with a frozen
//! reference copy, one optimizer step per rollout batch (one micro-batch of 16), CPU fp32, the
//! same prompts (chat-templated one-line instructions). Prints one JSON object with the time split
//! (rollout / reference log-probs / update) and an estimate of each phase's GFLOP/s.
//!
//! ```text
//! cargo bench -p optimsyn-examples --bench grpo_step [-- MODEL_DIR [STEPS]]
//! ```
//! Without `MODEL_DIR` it uses the benchmarks' shared bench model
//! (`optimsyn_examples::bench_model_dir`); under `cargo test` (or `--test`), one step on the demo's
//! tiny target.
//! `THREADS` (default 2) sets libtorch's intra-op threads.

use std::error::Error;

use optimsyn_data_io::{ChatMessage, ChatTokenizer, ModelConfig};
use optimsyn_examples::LmPolicy;
use optimsyn_lm::{CausalLm, LoadOptions};
use optimsyn_rl_grpo::{GrpoConfig, Prompt, Reference, RolloutBatch, Trainer, reward_fn};

/// Forward FLOPs of `tokens` tokens through the decoder (2 per weight per token, plus attention
/// scores and values over `context` keys) and of `logits` output positions through the head.
fn forward_flops(c: &ModelConfig, tokens: f64, context: f64, logits: f64) -> f64 {
    let (h, i, l) = (
        c.hidden_size as f64,
        c.intermediate_size as f64,
        c.num_hidden_layers as f64,
    );
    let (q, kv) = (
        (c.num_attention_heads * c.head_dim) as f64,
        (c.num_key_value_heads * c.head_dim) as f64,
    );
    let per_layer = h * (q + 2.0 * kv) + q * h + 3.0 * h * i;
    let attention = 2.0 * 2.0 * context * q; // QKᵀ and AV per token
    tokens * l * (2.0 * per_layer + attention) + logits * 2.0 * h * c.vocab_size as f64
}

fn main() -> Result<(), Box<dyn Error>> {
    let all: Vec<String> = std::env::args().skip(1).collect();
    let measure = !optimsyn_examples::bench::criterion_test_mode();
    let mut args: Vec<String> = all.into_iter().filter(|a| !a.starts_with("--")).collect();
    if measure && args.is_empty() {
        args.push(optimsyn_examples::bench_model_dir()?.display().to_string());
    }
    // Without a model folder (as under `cargo test`, which runs benches once to prove they work),
    // one step on the demo's tiny model; the measurement uses the bench model
    // (`make_bench_model.py DIR`, then `cargo bench -p optimsyn-examples --bench grpo_step -- DIR`).
    let (dir, default_steps) = match args.first() {
        Some(d) => (d.clone(), 4),
        None => (
            optimsyn_examples::demo_dir()
                .join("models/target")
                .display()
                .to_string(),
            1,
        ),
    };
    let steps: u64 = args
        .get(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(default_steps);
    let threads: i32 = std::env::var("THREADS")
        .ok()
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(2);
    tch::set_num_threads(threads);

    let tok = ChatTokenizer::from_model_dir(&dir)?;
    let model = CausalLm::load(&dir, LoadOptions::default())?;
    let mc = model.config().clone();
    let mut stop = model.eos_token_ids().to_vec();
    stop.extend(tok.eos_token_ids());
    stop.sort_unstable();
    stop.dedup();
    let policy = LmPolicy::trainable(model, stop.clone());
    let reference = LmPolicy::frozen(CausalLm::load(&dir, LoadOptions::default())?, stop);

    let prompts = (0..64)
        .map(|i| {
            let text = format!(
                "Write a question about document {i} on the history of trade routes and their taxes."
            );
            let ids = tok.encode_prompt(&[ChatMessage::user(text)], &Default::default())?;
            Ok(Prompt::new(format!("doc-{i}"), ids))
        })
        .collect::<Result<Vec<_>, optimsyn_data_io::Error>>()?;

    let prompt_mean =
        prompts.iter().map(|p| p.tokens.len()).sum::<usize>() as f64 / prompts.len() as f64;

    let mut c = GrpoConfig {
        group_size: 4,
        prompts_per_step: 4,
        mini_batch_prompts: 4,
        micro_batch_size: 16,
        logprob_batch_size: Some(16),
        shuffle_prompts: false,
        ..GrpoConfig::default()
    };
    c.rollout.temperature = 1.0;
    c.rollout.max_new_tokens = 64;
    c.loss.kl_coef = 0.001;
    c.optimizer.lr = 1e-6;
    let mut trainer = Trainer::new(c, policy, Reference::Frozen(reference), prompts)?;
    let mut reward = reward_fn(|b: &RolloutBatch| {
        b.rollouts
            .iter()
            .map(|r| (r.completion.tokens.len() % 7) as f64)
            .collect()
    });

    let mut rows = Vec::new();
    for _ in 0..steps {
        rows.push(trainer.step(&mut reward)?);
    }
    let steady: Vec<_> = if rows.len() > 1 {
        rows[1..].to_vec()
    } else {
        rows.clone()
    };
    let best = steady
        .iter()
        .min_by(|a, b| a.time.total_s.total_cmp(&b.time.total_s))
        .ok_or("no steps")?;
    let rows_n = best.rollouts as f64;
    let new = best.completion_tokens as f64;
    // The prompts differ by one digit at most: their mean length stands for each row's.
    let prompt = prompt_mean * rows_n;
    let mean_ctx = prompt_mean + new / rows_n / 2.0;
    // Rollout: prefill every row's prompt, then one token per generated position.
    let rollout = forward_flops(&mc, prompt + new, mean_ctx, rows_n + new);
    // Reference log-probs: one forward over prompt + completion, logits at completion positions.
    let full = forward_flops(&mc, prompt + new, mean_ctx, new);
    // Update: forward + backward ≈ 3 × forward.
    let upd = 3.0 * full;
    let json = serde_json::json!({
        "rust_grpo_step_s": (best.time.total_s * 100.0).round() / 100.0,
        "steps": rows.iter().map(|m| (m.time.total_s * 100.0).round() / 100.0).collect::<Vec<_>>(),
        "split_s": {
            "rollout": best.time.rollout_s,
            "reward": best.time.reward_s,
            "ref_logprobs": best.time.logprobs_s,
            "update": best.time.update_s,
        },
        "gflop_per_s": {
            "rollout": rollout / best.time.rollout_s / 1e9,
            "ref_logprobs": full / best.time.logprobs_s / 1e9,
            "update": upd / best.time.update_s / 1e9,
        },
        "completions_per_step": best.rollouts,
        "new_tokens": best.completion_tokens,
        "prompt_tokens_mean": prompt_mean,
        "threads": threads,
    });
    println!("{json}");
    Ok(())
}
