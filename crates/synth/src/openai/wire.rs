//! The OpenAI chat-completions wire format, as one set of serde types shared by the client
//! ([`OpenAiGenerator`](crate::OpenAiGenerator)) and the server (`optimsyn-serve`).
//!
//! Reading is lenient where servers differ (ids, `created`, `usage`, `code` may be missing or of
//! another type); writing follows OpenAI's shape, with `null` where OpenAI writes `null`.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// `stop`: one string or a list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// One stop string.
    One(String),
    /// Several stop strings.
    Many(Vec<String>),
}

/// Message content: a string or a list of parts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Content parts (`{"type": "text", "text": …}`; others are rejected by the server).
    Parts(Vec<ContentPart>),
}

/// One content part.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContentPart {
    /// `text`, `image_url`, …
    #[serde(rename = "type")]
    pub kind: String,
    /// The text of a `text` part.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

/// One message of a request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestMessage {
    /// `system`, `developer`, `user`, `assistant`, …
    pub role: String,
    /// The content; `null` or absent is empty.
    #[serde(default)]
    pub content: Option<Content>,
}

/// `stream_options`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk with the usage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include_usage: Option<bool>,
}

/// A chat-completions request. Numbers are read as the JSON has them (an `n` of `-1` or a
/// `max_tokens` of 10¹² parse) so that range errors can name the field; other fields are kept in
/// `extra`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatRequest {
    /// The served model name.
    pub model: String,
    /// The conversation.
    pub messages: Vec<RequestMessage>,
    /// Most new tokens (legacy name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<i64>,
    /// Most new tokens; wins over `max_tokens`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_completion_tokens: Option<i64>,
    /// Sampling temperature; 0 is greedy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// Nucleus mass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    /// Top-k (vLLM's extension); -1 or 0 is off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<i64>,
    /// Sampling seed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
    /// Stop strings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<Stop>,
    /// Choices to generate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<i64>,
    /// Reply as server-sent events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    /// Streaming options.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    /// Frequency penalty (only 0 is supported by optimsyn serve).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frequency_penalty: Option<f64>,
    /// Presence penalty (only 0 is supported by optimsyn serve).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence_penalty: Option<f64>,
    /// Return per-token log-probs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<bool>,
    /// Alternatives per token (only 0 is supported by optimsyn serve).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_logprobs: Option<i64>,
    /// Token biases (not supported by optimsyn serve).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logit_bias: Option<Map<String, Value>>,
    /// Tools (not supported by optimsyn serve).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<Value>>,
    /// `{"type": "text"}` or a structured-output request (not supported by optimsyn serve).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_format: Option<Value>,
    /// Chat-template arguments (vLLM's extension), e.g. `{"enable_thinking": false}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template_kwargs: Option<Map<String, Value>>,
    /// Every other field, kept as sent.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `prompt` of `/v1/completions`: text or token ids, one prompt or several.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PromptInput {
    /// One prompt as text (tokenized as it is, no chat template).
    Text(String),
    /// One prompt as token ids.
    Tokens(Vec<u32>),
    /// Several prompts as text.
    Texts(Vec<String>),
    /// Several prompts as token ids.
    TokenBatch(Vec<Vec<u32>>),
}

/// `POST /v1/completions` (the legacy completions API, as vLLM serves it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletionRequest {
    /// Served model (or LoRA adapter) name.
    pub model: String,
    /// What to continue.
    pub prompt: PromptInput,
    /// New-token budget (OpenAI's default for this API is 16).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<i64>,
    /// Sampling temperature.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// Nucleus mass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    /// Top-k (vLLM's extension; -1 or 0 off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<i64>,
    /// Sampling seed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
    /// Stop strings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<Stop>,
    /// Completions per prompt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<i64>,
    /// Server-sent events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    /// Log-probs of the sampled tokens and of this many alternatives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<i64>,
    /// Return the prompt before the completion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub echo: Option<bool>,
    /// Candidates to choose from per completion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_of: Option<i64>,
    /// Penalties (not supported unless 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frequency_penalty: Option<f64>,
    /// Penalties (not supported unless 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence_penalty: Option<f64>,
    /// Token biases (not supported unless empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logit_bias: Option<Map<String, Value>>,
    /// Text after the completion (not supported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suffix: Option<String>,
    /// vLLM's extension: log-prob tokens as `token_id:N` instead of text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub return_tokens_as_token_ids: Option<bool>,
    /// Every other field, kept as sent.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The log-probs of a text completion (the legacy API's shape).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextLogprobs {
    /// Each generated token (text, or `token_id:N`).
    pub tokens: Vec<String>,
    /// Each token's log-prob.
    pub token_logprobs: Vec<f64>,
    /// Alternatives per position (`null` entries here: none are computed).
    #[serde(default)]
    pub top_logprobs: Vec<Option<Map<String, Value>>>,
    /// Each token's character offset in `text`.
    #[serde(default)]
    pub text_offset: Vec<usize>,
}

/// One choice of a text completion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextChoice {
    /// Prompt-major: prompt `k`'s choice `j` is `k * n + j`.
    pub index: u32,
    /// The completion.
    pub text: String,
    /// With `logprobs`.
    #[serde(default)]
    pub logprobs: Option<TextLogprobs>,
    /// `stop` or `length`.
    #[serde(default)]
    pub finish_reason: Option<String>,
}

/// The reply of `/v1/completions`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextCompletion {
    /// Request id.
    pub id: String,
    /// `text_completion`.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    /// The model (or adapter) that answered.
    pub model: String,
    /// The completions.
    pub choices: Vec<TextChoice>,
    /// Token counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// Token counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Tokens of the rendered prompt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens: Option<u64>,
    /// Generated tokens over all choices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_tokens: Option<u64>,
    /// The sum.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_tokens: Option<u64>,
}

impl Usage {
    /// Counts with their total.
    pub fn new(prompt_tokens: u64, completion_tokens: u64) -> Self {
        Usage {
            prompt_tokens: Some(prompt_tokens),
            completion_tokens: Some(completion_tokens),
            total_tokens: Some(prompt_tokens + completion_tokens),
        }
    }
}

/// A reply message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResponseMessage {
    /// `assistant`.
    #[serde(default)]
    pub role: String,
    /// The text; `null` when there is none.
    #[serde(default)]
    pub content: Option<String>,
}

/// One alternative token of `top_logprobs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopLogprob {
    /// The token's text.
    pub token: String,
    /// Its log-probability.
    pub logprob: f64,
    /// Its UTF-8 bytes.
    #[serde(default)]
    pub bytes: Option<Vec<u8>>,
}

/// One generated token's log-probability.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    /// The token's text.
    pub token: String,
    /// Its log-probability.
    pub logprob: f64,
    /// Its UTF-8 bytes.
    #[serde(default)]
    pub bytes: Option<Vec<u8>>,
    /// Alternatives (empty: optimsyn serve does not support `top_logprobs`).
    #[serde(default)]
    pub top_logprobs: Vec<TopLogprob>,
}

/// A choice's `logprobs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChoiceLogprobs {
    /// One entry per generated token.
    #[serde(default)]
    pub content: Option<Vec<TokenLogprob>>,
}

/// One choice of a completion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Choice {
    /// Its index among the `n` choices.
    #[serde(default)]
    pub index: u32,
    /// The reply.
    pub message: ResponseMessage,
    /// Per-token log-probs, when asked for.
    #[serde(default)]
    pub logprobs: Option<ChoiceLogprobs>,
    /// `stop` or `length` (others from other servers).
    #[serde(default)]
    pub finish_reason: Option<String>,
}

/// A chat completion (`object: "chat.completion"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletion {
    /// `chatcmpl-…`.
    #[serde(default)]
    pub id: String,
    /// `chat.completion`.
    #[serde(default)]
    pub object: String,
    /// Unix seconds.
    #[serde(default)]
    pub created: u64,
    /// The served model name.
    #[serde(default)]
    pub model: String,
    /// The choices.
    pub choices: Vec<Choice>,
    /// Token counts.
    #[serde(default)]
    pub usage: Option<Usage>,
    /// Always `null` here.
    #[serde(default)]
    pub system_fingerprint: Option<String>,
}

/// A streamed delta.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Delta {
    /// `assistant` in a choice's first chunk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// New text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// One choice of a stream chunk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChunkChoice {
    /// The choice's index.
    #[serde(default)]
    pub index: u32,
    /// What is new.
    pub delta: Delta,
    /// Always `null` here (no streamed log-probs).
    #[serde(default)]
    pub logprobs: Option<Value>,
    /// Set in the choice's last chunk.
    #[serde(default)]
    pub finish_reason: Option<String>,
}

/// A stream chunk (`object: "chat.completion.chunk"`), one server-sent event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletionChunk {
    /// The completion's id, the same in every chunk.
    #[serde(default)]
    pub id: String,
    /// `chat.completion.chunk`.
    #[serde(default)]
    pub object: String,
    /// Unix seconds.
    #[serde(default)]
    pub created: u64,
    /// The served model name.
    #[serde(default)]
    pub model: String,
    /// Always `null` here.
    #[serde(default)]
    pub system_fingerprint: Option<String>,
    /// The choices this chunk advances (empty in the usage chunk).
    pub choices: Vec<ChunkChoice>,
    /// Token counts, in the last chunk when `stream_options.include_usage`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// The error object: `{"message", "type", "param", "code"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorObject {
    /// What is wrong, for people.
    pub message: String,
    /// `invalid_request_error`, `server_error`, … (vLLM writes `BadRequestError` and the like).
    #[serde(rename = "type", default)]
    pub kind: String,
    /// The request field at fault.
    #[serde(default)]
    pub param: Option<String>,
    /// A machine-readable code: a string here and at OpenAI, an integer status at vLLM.
    #[serde(default)]
    pub code: Option<Value>,
}

/// An error reply: `{"error": {…}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorResponse {
    /// The error.
    pub error: ErrorObject,
}

/// One model of `/v1/models`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Model {
    /// The name to ask for.
    pub id: String,
    /// `model`.
    #[serde(default)]
    pub object: String,
    /// Unix seconds.
    #[serde(default)]
    pub created: u64,
    /// Who serves it.
    #[serde(default)]
    pub owned_by: String,
    /// The base model of a LoRA adapter (vLLM's field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// Where a LoRA adapter was loaded from (vLLM's field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root: Option<String>,
}

/// `/v1/models`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelList {
    /// `list`.
    #[serde(default)]
    pub object: String,
    /// The models.
    pub data: Vec<Model>,
}

/// Deserializes `value` as `T`, naming the field at fault: `(message, Some(path))`, or no path
/// when the top level is wrong.
pub fn from_value_at<T: serde::de::DeserializeOwned>(
    value: Value,
) -> Result<T, (String, Option<String>)> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            (e.inner().to_string(), None)
        } else {
            (format!("{path}: {}", e.inner()), Some(path))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn requests_round_trip_and_keep_unknown_fields() {
        let v = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                       "max_tokens": 4, "stop": "x", "vendor_thing": {"a": 1}});
        let r: ChatRequest = serde_json::from_value(v.clone()).unwrap();
        assert_eq!(r.stop, Some(Stop::One("x".into())));
        assert_eq!(r.extra["vendor_thing"], json!({"a": 1}));
        assert_eq!(serde_json::to_value(&r).unwrap(), v);
    }

    #[test]
    fn errors_read_openai_and_vllm_shapes() {
        let openai: ErrorResponse = serde_json::from_value(json!({"error": {"message": "m",
            "type": "invalid_request_error", "param": "n", "code": null}}))
        .unwrap();
        assert_eq!(openai.error.param.as_deref(), Some("n"));
        let vllm: ErrorResponse = serde_json::from_value(json!({"error": {"message": "m",
            "type": "BadRequestError", "param": null, "code": 400}}))
        .unwrap();
        assert_eq!(vllm.error.code, Some(json!(400)));
    }

    #[test]
    fn field_errors_name_the_path() {
        let (m, p) = from_value_at::<ChatCompletion>(json!({"choices": [{"msg": 1}]})).unwrap_err();
        assert_eq!(p.as_deref(), Some("choices[0]"));
        assert!(m.contains("message"), "{m}");
    }
}
