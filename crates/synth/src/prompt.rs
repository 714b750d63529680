//! The generator's prompt: a system message and a user message, rendered with minijinja from a
//! seed document, its domain and the four sections of a rubric.
//!
//! The built-in templates (`templates/qa_system.jinja`, `templates/qa_user.jinja` in this crate)
//! are our own wording of the reference generator prompt's structure: the document; one QA pair
//! only; the question, answer, alignment and technical standards taken from the rubric; step-by-step
//! reasoning for multiple choice; no mention of "the document"; a chat-messages JSON object as the
//! reply. Either template can be replaced from a file. Templates see these variables:
//!
//! | variable | value |
//! |---|---|
//! | `domain` | the document's domain (or the run's default domain) |
//! | `document` | the document's text |
//! | `prompt_related`, `response_related`, `alignment`, `technical` | the rubric's four sections |
//! | `rubric` | the same four sections under the rubric's own keys (`rubric["Prompt-related"]`, …) |
//! | `rubric_text` | the rubric as one JSON object |
//!
//! Undefined variables are errors, so a misspelt name in an override fails at once.

use std::path::Path;

use minijinja::{Environment, UndefinedBehavior};
use optimsyn_data_io::ChatMessage;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::error::{Error, Result};

const SYSTEM: &str = include_str!("../templates/qa_system.jinja");
const USER: &str = include_str!("../templates/qa_user.jinja");

/// The four sections of a rubric that fill the generator prompt, as plain text.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RubricSections {
    /// `Prompt-related`: the standard for the question.
    pub prompt_related: String,
    /// `Response-related`: the standard for the answer.
    pub response_related: String,
    /// `Prompt-Response alignment`: how question and answer fit together.
    pub alignment: String,
    /// `Technical/trainability aspects`.
    pub technical: String,
}

impl RubricSections {
    /// The rubric's JSON keys, in the order of the fields.
    pub const KEYS: [&'static str; 4] = [
        "Prompt-related",
        "Response-related",
        "Prompt-Response alignment",
        "Technical/trainability aspects",
    ];

    /// Reads the four keys of a parsed rubric object. A string is taken as it is, a list as its
    /// items one per line (non-string items as JSON), any other value as JSON text; a missing key
    /// or `null` is empty.
    pub fn from_value(rubric: &Value) -> Self {
        let get = |k: &str| -> String {
            match rubric.get(k) {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(items)) => items
                    .iter()
                    .map(|v| match v {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    })
                    .collect::<Vec<_>>()
                    .join("\n"),
                Some(other) => other.to_string(),
            }
        };
        let [a, b, c, d] = Self::KEYS;
        RubricSections {
            prompt_related: get(a),
            response_related: get(b),
            alignment: get(c),
            technical: get(d),
        }
    }

    /// The sections under the rubric's own keys.
    pub fn to_value(&self) -> Value {
        let [a, b, c, d] = Self::KEYS;
        json!({a: self.prompt_related, b: self.response_related, c: self.alignment, d: self.technical})
    }

    /// The rubric as one line of JSON (what provenance records when no other text is given).
    pub fn to_json_text(&self) -> String {
        self.to_value().to_string()
    }
}

/// The generator's system and user templates.
#[derive(Debug)]
pub struct QaPrompt {
    env: Environment<'static>,
    system_origin: String,
    user_origin: String,
}

impl Default for QaPrompt {
    fn default() -> Self {
        // The built-in templates are tested to compile; an error here is a bug in this crate.
        Self::from_sources(
            (SYSTEM, "built-in qa_system.jinja"),
            (USER, "built-in qa_user.jinja"),
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }
}

impl QaPrompt {
    /// The built-in templates.
    pub fn builtin() -> Self {
        Self::default()
    }

    /// The built-in template sources `(system, user)`, e.g. to start an override from.
    pub fn builtin_sources() -> (&'static str, &'static str) {
        (SYSTEM, USER)
    }

    /// Templates from `(source, origin)` pairs; `origin` names each in errors.
    pub fn from_sources(system: (&str, &str), user: (&str, &str)) -> Result<Self> {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        let mut syntax = minijinja::syntax::SyntaxConfig::builder();
        syntax.trim_blocks(true).lstrip_blocks(true);
        // Both options are infallible on the builder; only custom delimiters can fail.
        if let Ok(s) = syntax.build() {
            env.set_syntax(s);
        }
        for (name, (src, origin)) in [("system.txt", system), ("user.txt", user)] {
            env.add_template_owned(name, src.to_string())
                .map_err(|e| template_err(origin, e))?;
        }
        Ok(QaPrompt {
            env,
            system_origin: system.1.to_string(),
            user_origin: user.1.to_string(),
        })
    }

    /// Templates from files; `None` keeps the built-in one.
    pub fn from_files(system: Option<&Path>, user: Option<&Path>) -> Result<Self> {
        let read =
            |p: Option<&Path>, builtin: &'static str, name: &str| -> Result<(String, String)> {
                match p {
                    None => Ok((builtin.to_string(), format!("built-in {name}"))),
                    Some(p) => {
                        let bytes = optimsyn_data_io::jsonl::read_file(p)?;
                        let text = String::from_utf8(bytes).map_err(|_| Error::Template {
                            origin: p.display().to_string(),
                            message: "not UTF-8 text".into(),
                        })?;
                        Ok((text, p.display().to_string()))
                    }
                }
            };
        let s = read(system, SYSTEM, "qa_system.jinja")?;
        let u = read(user, USER, "qa_user.jinja")?;
        Self::from_sources((&s.0, &s.1), (&u.0, &u.1))
    }

    /// The generator's conversation for one (document, rubric): `[system, user]`.
    pub fn render(
        &self,
        domain: &str,
        document: &str,
        rubric: &RubricSections,
    ) -> Result<Vec<ChatMessage>> {
        let mut ctx = Map::new();
        ctx.insert("domain".into(), domain.into());
        ctx.insert("document".into(), document.into());
        ctx.insert(
            "prompt_related".into(),
            rubric.prompt_related.clone().into(),
        );
        ctx.insert(
            "response_related".into(),
            rubric.response_related.clone().into(),
        );
        ctx.insert("alignment".into(), rubric.alignment.clone().into());
        ctx.insert("technical".into(), rubric.technical.clone().into());
        ctx.insert("rubric".into(), rubric.to_value());
        ctx.insert("rubric_text".into(), rubric.to_json_text().into());
        let ctx = minijinja::Value::from(minijinja::value::Serde(Value::Object(ctx)));
        let mut out = Vec::with_capacity(2);
        for (name, origin) in [
            ("system.txt", &self.system_origin),
            ("user.txt", &self.user_origin),
        ] {
            let text = self
                .env
                .get_template(name)
                .and_then(|t| t.render(&ctx))
                .map_err(|e| template_err(origin, e))?;
            out.push(text);
        }
        let user = out.pop().unwrap_or_default();
        let system = out.pop().unwrap_or_default();
        Ok(vec![ChatMessage::system(system), ChatMessage::user(user)])
    }
}

fn template_err(origin: &str, e: minijinja::Error) -> Error {
    let mut message = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        message.push_str(&format!(": {s}"));
        source = s.source();
    }
    Error::Template {
        origin: origin.to_string(),
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_templates_compile_and_fill_every_section() {
        let r = RubricSections {
            prompt_related: "PR".into(),
            response_related: "RR".into(),
            alignment: "AL".into(),
            technical: "TE".into(),
        };
        let m = QaPrompt::builtin().render("law", "DOC", &r).unwrap();
        assert_eq!(m.len(), 2);
        assert!(m[0].content.contains("expert in the law field"));
        for s in ["DOC", "PR", "RR", "AL", "TE"] {
            assert!(m[1].content.contains(s), "{s}");
        }
    }

    #[test]
    fn sections_read_strings_lists_and_missing_keys() {
        let v = json!({"Prompt-related": ["Clarity: a", "Focus: b"], "Response-related": "Correct",
                       "Technical/trainability aspects": {"x": 1}});
        let r = RubricSections::from_value(&v);
        assert_eq!(r.prompt_related, "Clarity: a\nFocus: b");
        assert_eq!(r.response_related, "Correct");
        assert_eq!(r.alignment, "");
        assert_eq!(r.technical, r#"{"x":1}"#);
    }

    #[test]
    fn a_misspelt_variable_names_the_template() {
        let p =
            QaPrompt::from_sources(("{{ domian }}", "sys.jinja"), ("{{ document }}", "u")).unwrap();
        let e = p.render("d", "x", &RubricSections::default()).unwrap_err();
        assert!(e.to_string().contains("sys.jinja"), "{e}");
        let e = QaPrompt::from_sources(("{% if %}", "bad.jinja"), ("", "u")).unwrap_err();
        assert!(e.to_string().contains("bad.jinja"), "{e}");
    }
}
