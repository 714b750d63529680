//! What text a row holds, and the normal form both checks compare.
//!
//! Normalising before comparing is what makes a re-cased or re-punctuated copy of a validation
//! question count as the same question: words are maximal runs of letters and digits, lower-cased;
//! everything else (punctuation, whitespace, markup) only separates words.

use optimsyn_data_io::{ChatExample, Role};
use serde_json::Value;

/// The normalised words of `text`: lower-cased runs of alphanumeric characters, except that in
/// scripts written without spaces (Chinese, Japanese kana, Thai, …) every character is a word of
/// its own, so n-grams there are n-grams of characters rather than one "word" per sentence.
///
/// ```
/// use optimsyn_hygiene::words;
/// assert_eq!(words("Which ORGAN does  Tesaxan act on?!"), ["which", "organ", "does", "tesaxan", "act", "on"]);
/// assert_eq!(words("5 mg/day, (i.e. daily)"), ["5", "mg", "day", "i", "e", "daily"]);
/// assert_eq!(words("阿司匹林的剂量?"), ["阿", "司", "匹", "林", "的", "剂", "量"]);
/// ```
pub fn words(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word = String::new();
    for c in text.chars() {
        if !c.is_alphanumeric() {
            flush(&mut word, &mut out);
        } else if unspaced(c) {
            flush(&mut word, &mut out);
            out.push(c.to_lowercase().collect());
        } else {
            word.extend(c.to_lowercase());
        }
    }
    flush(&mut word, &mut out);
    out
}

fn flush(word: &mut String, out: &mut Vec<String>) {
    if !word.is_empty() {
        out.push(std::mem::take(word));
    }
}

/// Characters of scripts that do not separate words with spaces.
fn unspaced(c: char) -> bool {
    matches!(c as u32,
        0x0E00..=0x0EFF        // Thai, Lao
        | 0x1000..=0x109F      // Myanmar
        | 0x1780..=0x17FF      // Khmer
        | 0x3040..=0x30FF      // Hiragana, Katakana
        | 0x3400..=0x4DBF      // CJK extension A
        | 0x4E00..=0x9FFF      // CJK unified ideographs
        | 0xF900..=0xFAFF      // CJK compatibility ideographs
        | 0xFF66..=0xFF9F      // half-width Katakana
        | 0x20000..=0x3FFFF) // CJK extensions B–H
}

/// The role a piece of a row's text plays. Prompts (questions, instructions, documents) are what an
/// evaluation set is recognised by; answers are often a few common words ("The liver.") that many
/// unrelated rows share, so they only count through full n-grams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// A user turn, a question, an instruction or a plain text.
    Prompt,
    /// An assistant turn, an answer, a completion.
    Answer,
}

/// One field's text inside a row. N-grams never cross segments.
#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    /// Prompt or answer.
    pub part: Part,
    /// The raw text.
    pub text: String,
}

/// Fields read as prompts when a row has no `messages`.
const PROMPT_FIELDS: [&str; 5] = ["question", "prompt", "instruction", "input", "text"];
/// Fields read as answers when a row has no `messages`.
const ANSWER_FIELDS: [&str; 4] = ["answer", "completion", "response", "output"];

/// The text segments of a JSONL row: the non-system turns of `messages`, else the usual
/// question/answer fields (`question`, `prompt`, `instruction`, `input`, `text`; `answer`,
/// `completion`, `response`, `output`). System turns are skipped: a shared system prompt would
/// make every row look like every other. Err names what was expected when the row has no text.
///
/// ```
/// use optimsyn_hygiene::{row_segments, Part};
/// let row = serde_json::json!({"messages": [
///     {"role": "system", "content": "Be brief."},
///     {"role": "user", "content": "Which organ?"},
///     {"role": "assistant", "content": "The liver."}]});
/// let segs = row_segments(&row).unwrap();
/// assert_eq!(segs.len(), 2);
/// assert_eq!((segs[0].part, segs[1].part), (Part::Prompt, Part::Answer));
/// assert!(row_segments(&serde_json::json!({"id": 3})).unwrap_err().contains("no text"));
/// ```
pub fn row_segments(row: &Value) -> Result<Vec<Segment>, String> {
    let Some(obj) = row.as_object() else {
        return Err("expected a JSON object".into());
    };
    let mut segs = Vec::new();
    if let Some(messages) = obj.get("messages") {
        let list = messages
            .as_array()
            .ok_or("field `messages`: expected an array")?;
        for (i, m) in list.iter().enumerate() {
            let role = m.get("role").and_then(Value::as_str).unwrap_or("user");
            let content = match m.get("content") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None => continue,
                Some(other) => content_parts(other)
                    .ok_or_else(|| format!("field `messages[{i}].content`: expected text"))?,
            };
            let part = match role {
                "system" | "developer" => continue,
                "assistant" => Part::Answer,
                _ => Part::Prompt,
            };
            segs.push(Segment {
                part,
                text: content,
            });
        }
    } else {
        let fields = PROMPT_FIELDS
            .iter()
            .map(|f| (f, Part::Prompt))
            .chain(ANSWER_FIELDS.iter().map(|f| (f, Part::Answer)));
        for (field, part) in fields {
            match obj.get(*field) {
                Some(Value::String(s)) => segs.push(Segment {
                    part,
                    text: s.clone(),
                }),
                Some(Value::Null) | None => {}
                Some(_) => return Err(format!("field `{field}`: expected a string")),
            }
        }
    }
    if segs.iter().all(|s| s.text.trim().is_empty()) {
        return Err(format!(
            "no text: expected `messages` or one of {}",
            PROMPT_FIELDS
                .iter()
                .chain(ANSWER_FIELDS.iter())
                .map(|f| format!("`{f}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    Ok(segs)
}

/// OpenAI-style content parts (`[{"type": "text", "text": …}, …]`) joined; None if not that shape.
fn content_parts(v: &Value) -> Option<String> {
    let parts = v.as_array()?;
    let texts: Option<Vec<&str>> = parts
        .iter()
        .map(|p| p.get("text").and_then(Value::as_str))
        .collect();
    Some(texts?.join("\n"))
}

/// The row's text as one normalised string (segments joined by a space): what near-duplicate
/// detection compares.
pub fn normalized_text(segments: &[Segment]) -> String {
    segments
        .iter()
        .flat_map(|s| words(&s.text))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The segments of a chat example (system turns skipped, as in [`row_segments`]).
pub fn example_segments(example: &ChatExample) -> Vec<Segment> {
    example
        .messages
        .iter()
        .filter_map(|m| {
            let part = match m.role {
                Role::System => return None,
                Role::Assistant => Part::Answer,
                _ => Part::Prompt,
            };
            Some(Segment {
                part,
                text: m.content.clone(),
            })
        })
        .collect()
}

/// The row's `id` as text, if it has one.
pub fn row_id(row: &Value) -> Option<String> {
    match row.get("id")? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn plain_fields_and_content_parts() {
        let segs = row_segments(&json!({"question": "Q one?", "answer": "A."})).unwrap();
        assert_eq!(segs[0].part, Part::Prompt);
        assert_eq!(segs[1].part, Part::Answer);
        let segs = row_segments(&json!({"messages": [
            {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]}
        ]}))
        .unwrap();
        assert_eq!(segs[0].text, "Hi\nthere");
    }

    #[test]
    fn bad_shapes_name_the_field() {
        let e = row_segments(&json!({"messages": 3})).unwrap_err();
        assert!(e.contains("`messages`"), "{e}");
        let e = row_segments(&json!({"question": 3})).unwrap_err();
        assert!(e.contains("`question`"), "{e}");
        let e =
            row_segments(&json!({"messages": [{"role": "system", "content": "x"}]})).unwrap_err();
        assert!(e.contains("no text"), "{e}");
        let e = row_segments(&json!([1])).unwrap_err();
        assert!(e.contains("object"), "{e}");
    }

    #[test]
    fn unicode_words_are_lowercased() {
        assert_eq!(words("Ärzte—ÉCOLE"), ["ärzte", "école"]);
        // Mixed scripts: Latin runs stay words, each ideograph is one.
        assert_eq!(words("GPT-4の性能"), ["gpt", "4", "の", "性", "能"]);
        assert_eq!(words("서울은 수도"), ["서울은", "수도"]);
    }
}
