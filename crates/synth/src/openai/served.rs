//! Sampling token ids from a served model (`/v1/completions` with token-id prompts, `logprobs: 0`
//! and vLLM's `return_tokens_as_token_ids`) and publishing LoRA adapters to it (vLLM's
//! `/v1/load_lora_adapter` and `/v1/unload_lora_adapter`): what a trainer needs to run its
//! rollouts on a serving engine (vLLM, or `optimsyn serve --enable-lora`).

use std::path::Path;
use std::sync::atomic::AtomicBool;

use serde_json::{Value, json};

use super::{OpenAiClient, OpenAiConfig, wire};
use crate::error::Result;

/// One sampled completion.
#[derive(Debug, Clone, PartialEq)]
pub struct SampledRow {
    /// The generated token ids.
    pub tokens: Vec<u32>,
    /// Each token's log-prob as the server reports it (`optimsyn serve`: at the sampling
    /// temperature; vLLM by default: of the raw logits).
    pub logprobs: Vec<f32>,
    /// Whether it ran out of budget instead of stopping.
    pub truncated: bool,
}

/// How rows are sampled.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenSampling {
    /// Softmax temperature; 0 is greedy.
    pub temperature: f64,
    /// Nucleus mass in (0, 1].
    pub top_p: f64,
    /// Top-k; 0 off.
    pub top_k: usize,
    /// Most new tokens.
    pub max_new_tokens: usize,
    /// The request's seed (below 2^53, so any JSON reader keeps it exact).
    pub seed: u64,
}

/// A client for a server's completions and LoRA endpoints.
#[derive(Debug)]
pub struct ServedSampler {
    client: OpenAiClient,
}

impl ServedSampler {
    /// A sampler for `config` (`model` is the base model's served name).
    pub fn new(config: OpenAiConfig) -> Result<Self> {
        Ok(ServedSampler {
            client: OpenAiClient::new(config)?,
        })
    }

    /// The connection.
    pub fn client(&self) -> &OpenAiClient {
        &self.client
    }

    /// `n` completions of the token-id `prompt` from `model` (the base model's name or a loaded
    /// adapter's), in choice order. `key` names the request in logs and spreads retries.
    pub fn sample(
        &self,
        model: &str,
        prompt: &[u32],
        n: usize,
        s: &TokenSampling,
        key: &str,
    ) -> Result<Vec<SampledRow>> {
        let body = json!({
            "model": model,
            "prompt": prompt,
            "n": n,
            "max_tokens": s.max_new_tokens,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "top_k": if s.top_k == 0 { -1 } else { s.top_k as i64 },
            "seed": s.seed,
            "logprobs": 0,
            "return_tokens_as_token_ids": true,
        });
        let stop = AtomicBool::new(false);
        self.client.post(
            "completions",
            body.to_string().as_bytes(),
            key,
            &stop,
            |text| parse_rows(text, n),
        )
    }

    /// Loads the PEFT adapter folder `path` under `name` (replacing one of that name if the server
    /// has it, as after a restarted run).
    pub fn load_adapter(&self, name: &str, path: &Path) -> Result<()> {
        let body = json!({"lora_name": name, "lora_path": path.display().to_string()});
        match self.post_text("load_lora_adapter", &body, name) {
            Err(crate::Error::Status {
                status: 400,
                message,
                ..
            }) if message.contains("already been loaded") => {
                self.unload_adapter(name)?;
                self.post_text("load_lora_adapter", &body, name)
            }
            r => r,
        }
    }

    /// Unloads adapter `name`.
    pub fn unload_adapter(&self, name: &str) -> Result<()> {
        self.post_text("unload_lora_adapter", &json!({"lora_name": name}), name)
    }

    /// The LoRA endpoints answer 200 with plain text.
    fn post_text(&self, path: &str, body: &Value, key: &str) -> Result<()> {
        let stop = AtomicBool::new(false);
        self.client
            .post(path, body.to_string().as_bytes(), key, &stop, |_| Ok(()))
    }
}

/// The `n` rows of a completions reply, by choice index.
fn parse_rows(text: &str, n: usize) -> std::result::Result<Vec<SampledRow>, String> {
    let v: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let mut r: wire::TextCompletion = wire::from_value_at(v).map_err(|(m, _)| m)?;
    if r.choices.len() != n {
        return Err(format!("{} choices for n = {n}", r.choices.len()));
    }
    r.choices.sort_by_key(|c| c.index);
    r.choices
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let lp = c
                .logprobs
                .ok_or_else(|| format!("choices[{i}]: no logprobs"))?;
            let tokens = lp
                .tokens
                .iter()
                .map(|t| {
                    t.strip_prefix("token_id:")
                        .and_then(|n| n.parse().ok())
                        .ok_or_else(|| format!("choices[{i}]: `{t}` is not token_id:N"))
                })
                .collect::<std::result::Result<Vec<u32>, String>>()?;
            if lp.token_logprobs.len() != tokens.len() {
                return Err(format!(
                    "choices[{i}]: {} log-probs for {} tokens",
                    lp.token_logprobs.len(),
                    tokens.len()
                ));
            }
            Ok(SampledRow {
                tokens,
                logprobs: lp.token_logprobs.iter().map(|&l| l as f32).collect(),
                truncated: c.finish_reason.as_deref() == Some("length"),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_parse_by_index_or_say_what_is_wrong() {
        let reply = |choices: Value| {
            json!({"id": "x", "object": "text_completion", "created": 0,
                                            "model": "m", "choices": choices})
            .to_string()
        };
        let choice = |i: u32, toks: Value, lps: Value, fin: &str| {
            json!({"index": i, "text": "", "finish_reason": fin,
                   "logprobs": {"tokens": toks, "token_logprobs": lps}})
        };
        let ok = reply(json!([
            choice(1, json!(["token_id:7"]), json!([-0.5]), "length"),
            choice(
                0,
                json!(["token_id:3", "token_id:4"]),
                json!([-1.0, -2.0]),
                "stop"
            ),
        ]));
        let rows = parse_rows(&ok, 2).expect("rows");
        assert_eq!(rows[0].tokens, [3, 4]);
        assert!(!rows[0].truncated && rows[1].truncated);
        assert_eq!(rows[1].logprobs, [-0.5]);
        assert!(parse_rows(&ok, 3).unwrap_err().contains("2 choices"));
        let text_tokens = reply(json!([choice(0, json!(["hi"]), json!([-1.0]), "stop")]));
        assert!(
            parse_rows(&text_tokens, 1)
                .unwrap_err()
                .contains("token_id:N")
        );
        let short = reply(json!([choice(0, json!(["token_id:1"]), json!([]), "stop")]));
        assert!(parse_rows(&short, 1).unwrap_err().contains("0 log-probs"));
        assert!(parse_rows("<html>", 1).unwrap_err().contains("not JSON"));
    }

    proptest::proptest! {
        /// Whatever a server sends back, parsing gives rows or an error, never a panic.
        #[test]
        fn any_reply_parses_or_errs(text in ".{0,200}", n in 0usize..4) {
            let _ = parse_rows(&text, n);
        }

        /// Replies of the right shape with arbitrary tokens and numbers.
        #[test]
        fn shaped_replies_parse_or_err(
            tokens in proptest::collection::vec(".{0,12}", 0..6),
            lps in proptest::collection::vec(proptest::num::f64::ANY, 0..6),
            n in 0usize..3,
        ) {
            let choice = json!({"index": 0, "text": "", "finish_reason": "stop",
                                "logprobs": {"tokens": tokens, "token_logprobs": lps}});
            let reply = json!({"id": "x", "object": "text_completion", "created": 0,
                               "model": "m", "choices": [choice]});
            let _ = parse_rows(&reply.to_string(), n);
        }
    }
}
