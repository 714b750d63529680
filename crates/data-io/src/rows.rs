//! The rows optimsyn reads and writes: seed documents, chat examples, synthetic samples.

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

/// Who speaks a chat message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions that frame the conversation.
    System,
    /// The human side.
    User,
    /// The model side: the only role that carries training loss.
    Assistant,
}

impl Role {
    /// The role's name as chat templates see it.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// The speaker.
    pub role: Role,
    /// The text.
    pub content: String,
}

impl ChatMessage {
    /// A message of any role.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        ChatMessage {
            role,
            content: content.into(),
        }
    }
    /// A system message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new(Role::System, content)
    }
    /// A user message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new(Role::User, content)
    }
    /// An assistant message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new(Role::Assistant, content)
    }
}

/// A conversation used for training, validation or as a QA pair:
/// `{"id"?: str, "messages": [...], "subtask"?: str}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatExample {
    /// Optional identifier (numbers in the input are read as their decimal text).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "opt_id"
    )]
    pub id: Option<String>,
    /// The turns, in order.
    pub messages: Vec<ChatMessage>,
    /// The validation subtask this example belongs to, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subtask: Option<String>,
}

impl ChatExample {
    /// A user question and an assistant answer.
    pub fn qa(question: impl Into<String>, answer: impl Into<String>) -> Self {
        ChatExample {
            id: None,
            messages: vec![ChatMessage::user(question), ChatMessage::assistant(answer)],
            subtask: None,
        }
    }

    /// Whether any turn carries loss.
    pub fn has_assistant_turn(&self) -> bool {
        self.messages.iter().any(|m| m.role == Role::Assistant)
    }
}

/// A domain document that rubrics and QA pairs are written from: `{"id", "text", "domain"?, ...}`.
/// Other fields are kept as they are.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeedDoc {
    /// Identifier (numbers in the input are read as their decimal text).
    #[serde(deserialize_with = "req_id")]
    pub id: String,
    /// The document's text.
    pub text: String,
    /// Domain label (e.g. "medicine").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// Any other fields of the input row.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl SeedDoc {
    /// Builds a document from a JSON row whose text lives in `text_field` (the paper's medical corpus
    /// uses `clean_text`). The error names the missing or mistyped field.
    pub fn from_value(mut row: Value, text_field: &str) -> Result<Self, String> {
        let obj = row
            .as_object_mut()
            .ok_or_else(|| "row is not a JSON object".to_string())?;
        if text_field != "text" {
            let text = obj
                .remove(text_field)
                .ok_or_else(|| format!("missing field `{text_field}`"))?;
            obj.insert("text".into(), text);
        }
        serde_path_to_error::deserialize(row).map_err(|e| match e.path().to_string().as_str() {
            "." => e.inner().to_string(),
            "text" => format!("field `{text_field}`: {}", e.inner()),
            p => format!("field `{p}`: {}", e.inner()),
        })
    }
}

/// Sampling settings recorded with every generated sample: what a generation call used (the
/// settings themselves live with the roles that sample: optimsyn-lm's `SamplingParams`,
/// optimsyn-synth's `GenerationParams`, optimsyn-rl-grpo's `RolloutConfig`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// Temperature (0 = greedy).
    pub temperature: f64,
    /// Nucleus mass, if truncated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    /// Top-k, if truncated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<usize>,
    /// Generation budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_new_tokens: Option<usize>,
    /// The seed the draw was keyed by.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

/// Where a synthetic sample came from and what became of it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    /// The seed document's id.
    pub seed_id: String,
    /// The rubric text the generator was guided by.
    pub rubric: String,
    /// The rubric policy's identity (model folder, adapter, step).
    pub policy: String,
    /// The generator's identity (model folder or endpoint + model name).
    pub generator: String,
    /// Sampling settings of the rubric (policy) draw.
    pub policy_sampling: SamplingParams,
    /// Sampling settings of the QA (generator) draw.
    pub generator_sampling: SamplingParams,
    /// RL step (0 for the initial pool, the final step for stage 3).
    pub step: u64,
    /// Whether the sample passed every validity check.
    pub valid: bool,
    /// Why it was rejected, if it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejection: Option<String>,
    /// Its longest overlap with an evaluation set, when decontamination found one (the sample is
    /// then rejected as `contaminated`, or kept and flagged, as configured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contamination: Option<Overlap>,
    /// The id of the earlier sample it (nearly) duplicates; it is then rejected as `duplicate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duplicate_of: Option<String>,
}

/// Where a row's text repeats a reference (evaluation) row: the longest common run of normalised
/// words and the reference row it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Overlap {
    /// The reference file (as configured).
    pub source: String,
    /// 1-based line of the reference row in that file.
    pub row: u64,
    /// The reference row's id, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Length of the longest common run, in words.
    pub words: usize,
    /// That run, normalised (lower case, single spaces).
    pub text: String,
}

/// A generated QA pair with its provenance and, once scored, its influence and reward.
/// Flattened so a file of synthetic samples also reads as a file of [`ChatExample`]s.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SyntheticSample {
    /// The conversation (id, messages, subtask).
    #[serde(flatten)]
    pub example: ChatExample,
    /// Where it came from.
    pub provenance: Provenance,
    /// Influence score on the target's validation loss, once computed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub influence: Option<f64>,
    /// The influence per validation subtask that `influence` aggregates, once computed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subtask_influence: Option<std::collections::BTreeMap<String, f64>>,
    /// RL reward, once computed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reward: Option<f64>,
}

fn id_text(v: Value) -> Result<String, String> {
    match v {
        Value::String(s) => Ok(s),
        Value::Number(n) => Ok(n.to_string()),
        other => Err(format!("expected a string or number id, found {other}")),
    }
}

fn req_id<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    id_text(Value::deserialize(d)?).map_err(serde::de::Error::custom)
}

fn opt_id<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    match Value::deserialize(d)? {
        Value::Null => Ok(None),
        v => id_text(v).map(Some).map_err(serde::de::Error::custom),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_doc_with_custom_text_field_keeps_extras() {
        let row =
            serde_json::json!({"id": 7, "clean_text": "Aspirin inhibits COX.", "source": "pubmed"});
        let d = SeedDoc::from_value(row, "clean_text").unwrap();
        assert_eq!(d.id, "7");
        assert_eq!(d.text, "Aspirin inhibits COX.");
        assert_eq!(d.extra["source"], "pubmed");
        let e = SeedDoc::from_value(serde_json::json!({"id": "a"}), "clean_text").unwrap_err();
        assert!(e.contains("clean_text"), "{e}");
        let e = SeedDoc::from_value(
            serde_json::json!({"id": "a", "clean_text": 3}),
            "clean_text",
        )
        .unwrap_err();
        assert!(e.contains("clean_text"), "{e}");
    }

    #[test]
    fn synthetic_sample_reads_as_chat_example() {
        let s = SyntheticSample {
            example: ChatExample::qa("Q?", "A."),
            provenance: Provenance {
                seed_id: "d1".into(),
                valid: true,
                ..Default::default()
            },
            influence: Some(0.25),
            subtask_influence: Some([("s".to_string(), 0.25)].into()),
            reward: None,
        };
        let line = serde_json::to_string(&s).unwrap();
        let back: ChatExample = serde_json::from_str(&line).unwrap();
        assert_eq!(back, s.example);
        assert_eq!(serde_json::from_str::<SyntheticSample>(&line).unwrap(), s);
    }
}
