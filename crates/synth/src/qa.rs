//! From a generator's text to a QA pair: extraction, then validity checks, each failure a typed
//! [`Rejection`].
//!
//! Extraction follows the reference code, then goes further: the text after the last `</think>`;
//! the span from its first `{` to its last `}` parsed as JSON; if that is not a QA object, each `{`
//! in turn (up to [`MAX_CANDIDATES`]) is tried as the start of one JSON value, so an object
//! embedded in prose, code fences or other JSON is still found. A QA object is either the
//! reference format `{"messages": [{"role": "system", …}, {"role": "user", …}, {"role":
//! "assistant", …}]}` or `{"question": …, "answer": …}`.

use optimsyn_data_io::{ChatExample, ChatMessage};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// How many `{` positions extraction tries before giving up.
pub const MAX_CANDIDATES: usize = 256;

/// Why a generated text did not become a valid QA pair.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Rejection {
    /// No `{` at all in the text (after the last `</think>`).
    NoJson,
    /// Braces, but nothing from any of them parses as JSON.
    BadJson {
        /// serde_json's message for the first-`{`-to-last-`}` span.
        message: String,
    },
    /// JSON objects, but none is a QA object.
    WrongShape {
        /// What the first object lacked.
        message: String,
    },
    /// The question is empty or only whitespace.
    EmptyQuestion,
    /// The answer is empty or only whitespace.
    EmptyAnswer,
    /// The question or answer mentions its source ("according to the document").
    Leakage {
        /// `question` or `answer`.
        field: String,
        /// The phrase found (as configured).
        phrase: String,
    },
    /// The question's length is outside the bounds.
    QuestionLength {
        /// Its length in characters.
        chars: usize,
        /// The lower bound.
        min: usize,
        /// The upper bound.
        max: usize,
    },
    /// The answer's length is outside the bounds.
    AnswerLength {
        /// Its length in characters.
        chars: usize,
        /// The lower bound.
        min: usize,
        /// The upper bound.
        max: usize,
    },
}

impl Rejection {
    /// A stable snake_case name, the key of rejection counts.
    pub fn code(&self) -> &'static str {
        match self {
            Rejection::NoJson => "no_json",
            Rejection::BadJson { .. } => "bad_json",
            Rejection::WrongShape { .. } => "wrong_shape",
            Rejection::EmptyQuestion => "empty_question",
            Rejection::EmptyAnswer => "empty_answer",
            Rejection::Leakage { .. } => "leakage",
            Rejection::QuestionLength { .. } => "question_length",
            Rejection::AnswerLength { .. } => "answer_length",
        }
    }

    /// Whether the text held no QA object at all (what the reference code retries on).
    pub fn is_parse_failure(&self) -> bool {
        matches!(
            self,
            Rejection::NoJson | Rejection::BadJson { .. } | Rejection::WrongShape { .. }
        )
    }
}

impl std::fmt::Display for Rejection {
    /// `code` or `code: detail`, as a sample's `provenance.rejection` records it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let code = self.code();
        match self {
            Rejection::NoJson | Rejection::EmptyQuestion | Rejection::EmptyAnswer => {
                write!(f, "{code}")
            }
            Rejection::BadJson { message } | Rejection::WrongShape { message } => {
                write!(f, "{code}: {message}")
            }
            Rejection::Leakage { field, phrase } => write!(f, "{code}: {field} says \"{phrase}\""),
            Rejection::QuestionLength { chars, min, max }
            | Rejection::AnswerLength { chars, min, max } => {
                write!(f, "{code}: {chars} characters, allowed {min}..={max}")
            }
        }
    }
}

/// The parts of a QA object, before validity checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtractedQa {
    /// The system message, if the object had one.
    pub system: Option<String>,
    /// The user turn.
    pub question: String,
    /// The assistant turn that follows it.
    pub answer: String,
}

/// Finds the QA object in a generator's text (see the module docs).
pub fn extract_qa(text: &str) -> Result<ExtractedQa, Rejection> {
    let tail = match text.rfind("</think>") {
        Some(i) => &text[i + "</think>".len()..],
        None => text,
    };
    let Some(first) = tail.find('{') else {
        return Err(Rejection::NoJson);
    };
    let mut shape_error: Option<String> = None;
    // The reference: greedy from the first `{` to the last `}`.
    let mut greedy_error = None;
    if let Some(last) = tail.rfind('}').filter(|&l| l > first) {
        match serde_json::from_str::<Value>(&tail[first..=last]) {
            Ok(v) => match qa_from_value(&v) {
                Ok(qa) => return Ok(qa),
                Err(m) => shape_error = Some(m),
            },
            Err(e) => greedy_error = Some(e.to_string()),
        }
    }
    // Then every `{` as the start of one JSON value.
    for (start, _) in tail.match_indices('{').take(MAX_CANDIDATES) {
        let mut values = serde_json::Deserializer::from_str(&tail[start..]).into_iter::<Value>();
        if let Some(Ok(v)) = values.next() {
            match qa_from_value(&v) {
                Ok(qa) => return Ok(qa),
                Err(m) => {
                    shape_error.get_or_insert(m);
                }
            }
        }
    }
    match shape_error {
        Some(message) => Err(Rejection::WrongShape { message }),
        None => Err(Rejection::BadJson {
            message: greedy_error.unwrap_or_else(|| "no complete JSON object".into()),
        }),
    }
}

/// A QA object's parts, or what it lacks.
fn qa_from_value(v: &Value) -> Result<ExtractedQa, String> {
    let Value::Object(obj) = v else {
        return Err(format!("expected an object, found {}", kind(v)));
    };
    if let Some(messages) = obj.get("messages") {
        let Value::Array(messages) = messages else {
            return Err(format!("`messages` is {}, not a list", kind(messages)));
        };
        let mut system = None;
        let mut question: Option<String> = None;
        for (i, m) in messages.iter().enumerate() {
            let role = m.get("role").and_then(Value::as_str);
            let content = match m.get("content") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None => String::new(),
                Some(other) => {
                    return Err(format!(
                        "`messages[{i}].content` is {}, not a string",
                        kind(other)
                    ));
                }
            };
            match (role, &question) {
                (Some("system"), None) if system.is_none() => system = Some(content),
                (Some("user"), None) => question = Some(content),
                (Some("assistant"), Some(q)) => {
                    return Ok(ExtractedQa {
                        system,
                        question: q.clone(),
                        answer: content,
                    });
                }
                _ => {}
            }
        }
        return Err(match question {
            None => "`messages` has no user turn".into(),
            Some(_) => "`messages` has no assistant turn after the user turn".into(),
        });
    }
    let field = |names: &[&str]| {
        obj.iter()
            .find(|(k, _)| names.iter().any(|n| k.eq_ignore_ascii_case(n)))
            .map(|(_, v)| v)
    };
    match (field(&["question"]), field(&["answer"])) {
        (Some(q), Some(a)) => {
            let text = |v: &Value, name: &str| match v {
                Value::String(s) => Ok(s.clone()),
                Value::Null => Ok(String::new()),
                other => Err(format!("`{name}` is {}, not a string", kind(other))),
            };
            Ok(ExtractedQa {
                system: None,
                question: text(q, "question")?,
                answer: text(a, "answer")?,
            })
        }
        _ => Err("no `messages` list and no `question`/`answer` pair".into()),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Validity checks on an extracted QA pair. Defaults: questions of 10 to 4,000 characters, answers
/// of 2 to 16,000, the default leakage phrases, the generator's system message kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QaChecks {
    /// Shortest question, in characters (after trimming).
    pub min_question_chars: usize,
    /// Longest question, in characters.
    pub max_question_chars: usize,
    /// Shortest answer, in characters (after trimming).
    pub min_answer_chars: usize,
    /// Longest answer, in characters.
    pub max_answer_chars: usize,
    /// Phrases that reveal the source document, matched case-insensitively with whitespace runs
    /// collapsed and curly quotes straightened.
    pub leakage_phrases: Vec<String>,
    /// Keep the system message the generator wrote (the reference data keeps it).
    pub keep_system: bool,
}

/// Phrases that give away that a QA pair was written from a document.
pub const DEFAULT_LEAKAGE_PHRASES: &[&str] = &[
    "according to the document",
    "according to the text",
    "according to the passage",
    "according to the article",
    "according to the provided",
    "according to the given",
    "based on the document",
    "based on the text",
    "based on the passage",
    "based on the provided",
    "based on the given",
    "the document states",
    "the document says",
    "the document mentions",
    "the document describes",
    "the passage states",
    "the passage says",
    "the text states",
    "the text says",
    "the text above",
    "the above text",
    "the given document",
    "the provided document",
    "the given passage",
    "the provided passage",
    "the provided text",
    "the given text",
    "mentioned in the document",
    "described in the document",
    "stated in the document",
    "in the document,",
    "in the passage,",
];

impl Default for QaChecks {
    fn default() -> Self {
        QaChecks {
            min_question_chars: 10,
            max_question_chars: 4000,
            min_answer_chars: 2,
            max_answer_chars: 16000,
            leakage_phrases: DEFAULT_LEAKAGE_PHRASES
                .iter()
                .map(|s| s.to_string())
                .collect(),
            keep_system: true,
        }
    }
}

/// A checked generation: the example (empty when nothing was extracted) and why it was rejected.
#[derive(Debug, Clone, PartialEq)]
pub struct Checked {
    /// The QA pair as a chat example (no messages when extraction failed).
    pub example: ChatExample,
    /// `None` when every check passed.
    pub rejection: Option<Rejection>,
}

impl Checked {
    /// Whether every check passed.
    pub fn is_valid(&self) -> bool {
        self.rejection.is_none()
    }
}

impl QaChecks {
    /// Extracts and checks one generated text.
    pub fn check(&self, text: &str) -> Checked {
        let qa = match extract_qa(text) {
            Ok(qa) => qa,
            Err(r) => {
                return Checked {
                    example: ChatExample {
                        id: None,
                        messages: Vec::new(),
                        subtask: None,
                    },
                    rejection: Some(r),
                };
            }
        };
        let question = qa.question.trim().to_string();
        let answer = qa.answer.trim().to_string();
        let mut messages = Vec::with_capacity(3);
        if let (true, Some(s)) = (self.keep_system, &qa.system) {
            messages.push(ChatMessage::system(s.trim()));
        }
        messages.push(ChatMessage::user(question.clone()));
        messages.push(ChatMessage::assistant(answer.clone()));
        let example = ChatExample {
            id: None,
            messages,
            subtask: None,
        };
        Checked {
            rejection: self.rejection(&question, &answer),
            example,
        }
    }

    fn rejection(&self, question: &str, answer: &str) -> Option<Rejection> {
        if question.is_empty() {
            return Some(Rejection::EmptyQuestion);
        }
        if answer.is_empty() {
            return Some(Rejection::EmptyAnswer);
        }
        for (field, text) in [("question", question), ("answer", answer)] {
            let norm = normalize(text);
            if let Some(p) = self
                .leakage_phrases
                .iter()
                .find(|p| !p.trim().is_empty() && norm.contains(&normalize(p)))
            {
                return Some(Rejection::Leakage {
                    field: field.into(),
                    phrase: p.clone(),
                });
            }
        }
        let q = question.chars().count();
        if q < self.min_question_chars || q > self.max_question_chars {
            return Some(Rejection::QuestionLength {
                chars: q,
                min: self.min_question_chars,
                max: self.max_question_chars,
            });
        }
        let a = answer.chars().count();
        if a < self.min_answer_chars || a > self.max_answer_chars {
            return Some(Rejection::AnswerLength {
                chars: a,
                min: self.min_answer_chars,
                max: self.max_answer_chars,
            });
        }
        None
    }
}

/// Lowercase, whitespace runs as one space, curly quotes straightened.
fn normalize(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut space = false;
    for c in s.chars() {
        if c.is_whitespace() {
            space = true;
            continue;
        }
        if space && !out.is_empty() {
            out.push(' ');
        }
        space = false;
        let c = match c {
            '\u{2018}' | '\u{2019}' => '\'',
            '\u{201c}' | '\u{201d}' => '"',
            c => c,
        };
        out.extend(c.to_lowercase());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"messages":[{"role":"system","content":"you are a helpful assistent."},{"role":"user","content":"What does aspirin inhibit?"},{"role":"assistant","content":"Cyclooxygenase."}]}"#;

    #[test]
    fn reference_format_after_thinking() {
        let text = format!("<think>maybe {{\"messages\": 1}}</think>\nSure:\n```json\n{GOOD}\n```");
        let c = QaChecks::default().check(&text);
        assert!(c.is_valid(), "{:?}", c.rejection);
        assert_eq!(c.example.messages.len(), 3);
        assert_eq!(c.example.messages[1].content, "What does aspirin inhibit?");
        assert_eq!(c.example.messages[2].content, "Cyclooxygenase.");
    }

    #[test]
    fn question_answer_form_and_braces_in_noise() {
        let text = r#"{oops} here: {"Question": "Why is the sky blue?", "Answer": "Rayleigh scattering."} {x"#;
        let qa = extract_qa(text).unwrap();
        assert_eq!(qa.question, "Why is the sky blue?");
        assert_eq!(qa.system, None);
    }

    #[test]
    fn each_failure_has_its_reason() {
        let ch = QaChecks::default();
        let code = |t: &str| ch.check(t).rejection.map(|r| r.code());
        assert_eq!(code("no json here"), Some("no_json"));
        assert_eq!(code("{ not json }"), Some("bad_json"));
        assert_eq!(code(r#"{"a": 1}"#), Some("wrong_shape"));
        assert_eq!(
            code(r#"{"messages":[{"role":"user","content":"only a question?"}]}"#),
            Some("wrong_shape")
        );
        assert_eq!(
            code(r#"{"question":"  ","answer":"x"}"#),
            Some("empty_question")
        );
        assert_eq!(
            code(r#"{"question":"What is it really?","answer":""}"#),
            Some("empty_answer")
        );
        assert_eq!(
            code(r#"{"question":"According to the   Document, what is X?","answer":"Y."}"#),
            Some("leakage")
        );
        assert_eq!(
            code(r#"{"question":"Short?","answer":"Long enough."}"#),
            Some("question_length")
        );
        assert_eq!(
            code(r#"{"question":"A fine question?","answer":"Y"}"#),
            Some("answer_length")
        );
        let r = ch
            .check(
                r#"{"question":"What does the text say about X?","answer":"The passage says Y."}"#,
            )
            .rejection
            .unwrap();
        assert_eq!(r.to_string(), "leakage: answer says \"the passage says\"");
    }

    #[test]
    fn system_message_can_be_dropped() {
        let ch = QaChecks {
            keep_system: false,
            ..Default::default()
        };
        let c = ch.check(GOOD);
        assert_eq!(c.example.messages.len(), 2);
    }
}
