//! Rubrics: the four standards a policy writes for the generator, and a parser that never panics.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The four keys a rubric has, in the order the generator's template uses them.
pub const KEYS: [&str; 4] = [
    "Prompt-related",
    "Response-related",
    "Prompt-Response alignment",
    "Technical/trainability aspects",
];

/// A parsed rubric. Each standard is text; list values are joined with `; `.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rubric {
    /// Standards for the question.
    pub prompt_related: String,
    /// Standards for the answer.
    pub response_related: String,
    /// How question and answer must fit together.
    pub alignment: String,
    /// Technical and trainability requirements.
    pub technical: String,
}

/// Why a policy output is not a rubric.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "snake_case", tag = "kind", content = "detail")]
pub enum RubricError {
    /// No `{ … }` after the last `</think>`.
    #[error("no JSON object in the output")]
    NoJson,
    /// The braces do not enclose valid JSON (the parser's message).
    #[error("invalid JSON: {0}")]
    BadJson(String),
    /// One or more of the four keys is missing or not a string / list of strings.
    #[error("missing or malformed keys: {}", .0.join(", "))]
    MissingKeys(Vec<String>),
    /// Every standard is empty.
    #[error("every standard is empty")]
    Empty,
}

impl RubricError {
    /// A short stable name for counting failures (`no_json`, `bad_json`, `missing_keys`, `empty`).
    pub fn kind(&self) -> &'static str {
        match self {
            RubricError::NoJson => "no_json",
            RubricError::BadJson(_) => "bad_json",
            RubricError::MissingKeys(_) => "missing_keys",
            RubricError::Empty => "empty",
        }
    }
}

fn text_of(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.trim().to_string()),
        Value::Array(items) => {
            let parts: Option<Vec<String>> = items
                .iter()
                .map(|i| i.as_str().map(|s| s.trim().to_string()))
                .collect();
            parts.map(|p| {
                p.into_iter()
                    .filter(|s| !s.is_empty())
                    .collect::<Vec<_>>()
                    .join("; ")
            })
        }
        _ => None,
    }
}

/// Parses a policy's output as the reference code does: the text after the last `</think>`, from
/// its first `{` to its last `}`, as JSON with the four [`KEYS`] (string or list-of-strings values).
pub fn parse_rubric(output: &str) -> Result<Rubric, RubricError> {
    let tail = match output.rfind("</think>") {
        Some(i) => &output[i + "</think>".len()..],
        None => output,
    };
    let (Some(start), Some(end)) = (tail.find('{'), tail.rfind('}')) else {
        return Err(RubricError::NoJson);
    };
    if end < start {
        return Err(RubricError::NoJson);
    }
    let v: Value = serde_json::from_str(&tail[start..=end])
        .map_err(|e| RubricError::BadJson(e.to_string()))?;
    let Some(obj) = v.as_object() else {
        return Err(RubricError::BadJson("not a JSON object".into()));
    };
    let mut vals = Vec::with_capacity(4);
    let mut missing = Vec::new();
    for k in KEYS {
        match obj.get(k).and_then(text_of) {
            Some(t) => vals.push(t),
            None => missing.push(k.to_string()),
        }
    }
    if !missing.is_empty() {
        return Err(RubricError::MissingKeys(missing));
    }
    if vals.iter().all(String::is_empty) {
        return Err(RubricError::Empty);
    }
    let mut it = vals.into_iter();
    let mut next = || it.next().unwrap_or_default();
    Ok(Rubric {
        prompt_related: next(),
        response_related: next(),
        alignment: next(),
        technical: next(),
    })
}

impl Rubric {
    /// The rubric as the JSON object a policy writes.
    pub fn to_json(&self) -> String {
        serde_json::json!({
            KEYS[0]: self.prompt_related, KEYS[1]: self.response_related,
            KEYS[2]: self.alignment, KEYS[3]: self.technical,
        })
        .to_string()
    }

    /// The template variables the generator's prompt uses (`prompt_related`, `response_related`,
    /// `alignment`, `technical`).
    pub fn template_vars(&self) -> serde_json::Map<String, Value> {
        let mut m = serde_json::Map::new();
        m.insert("prompt_related".into(), self.prompt_related.clone().into());
        m.insert(
            "response_related".into(),
            self.response_related.clone().into(),
        );
        m.insert("alignment".into(), self.alignment.clone().into());
        m.insert("technical".into(), self.technical.clone().into());
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GOOD: &str = r#"{"Prompt-related": "Ask about the river.", "Response-related": ["Correct", "Concise"],
        "Prompt-Response alignment": "Consistent.", "Technical/trainability aspects": "Plain text."}"#;

    #[test]
    fn parses_strings_lists_and_thinking() {
        let r = parse_rubric(&format!(
            "<think>maybe {{\"x\": 1}}</think> Sure! {GOOD} done"
        ))
        .unwrap();
        assert_eq!(r.prompt_related, "Ask about the river.");
        assert_eq!(r.response_related, "Correct; Concise");
        assert_eq!(parse_rubric(&r.to_json()).unwrap(), r);
    }

    #[test]
    fn failures_are_classified() {
        assert_eq!(parse_rubric("no braces here"), Err(RubricError::NoJson));
        assert_eq!(parse_rubric("} backwards {"), Err(RubricError::NoJson));
        assert_eq!(
            parse_rubric("{not json}").map_err(|e| e.kind()),
            Err("bad_json")
        );
        let e = parse_rubric(r#"{"Prompt-related": "x", "Response-related": 3}"#).unwrap_err();
        assert_eq!(e.kind(), "missing_keys");
        assert!(e.to_string().contains("Response-related") && e.to_string().contains("Technical"));
        let empty = r#"{"Prompt-related": "", "Response-related": [], "Prompt-Response alignment": " ", "Technical/trainability aspects": ""}"#;
        assert_eq!(parse_rubric(empty), Err(RubricError::Empty));
    }

    proptest! {
        #[test]
        fn never_panics(s in "\\PC*") {
            let _ = parse_rubric(&s);
        }

        #[test]
        fn finds_a_rubric_in_noise(pre in "[^{}]*", post in "[^{}]*") {
            let out = format!("{pre}{GOOD}{post}");
            prop_assert!(parse_rubric(&out).is_ok());
        }
    }
}
