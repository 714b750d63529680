//! The policy's prompt: a system message and a user message rendered from minijinja templates
//! with the seed document and its domain, then the policy model's own chat template.

use std::path::Path;

use optimsyn_data_io::{ChatMessage, ChatTokenizer};
use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// The built-in system template (our wording of the released prompter's structure).
pub const DEFAULT_SYSTEM: &str = include_str!("../templates/policy_system.jinja");
/// The built-in user template: the document, the goal, the instructions, the four-key output format.
pub const DEFAULT_USER: &str = include_str!("../templates/policy_user.jinja");

/// The policy's prompt templates. Variables: `domain`, `document`.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyPrompt {
    /// System message template.
    pub system: String,
    /// User message template.
    pub user: String,
}

impl Default for PolicyPrompt {
    fn default() -> Self {
        PolicyPrompt {
            system: DEFAULT_SYSTEM.to_string(),
            user: DEFAULT_USER.to_string(),
        }
    }
}

fn render(name: &str, template: &str, ctx: &Value) -> Result<String> {
    let mut env = minijinja::Environment::new();
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    env.add_template(name, template)
        .map_err(|e| Error::Template {
            name: name.into(),
            message: e.to_string(),
        })?;
    let t = env.get_template(name).map_err(|e| Error::Template {
        name: name.into(),
        message: e.to_string(),
    })?;
    let out = t
        .render(minijinja::Value::from(minijinja::value::Serde(ctx)))
        .map_err(|e| Error::Template {
            name: name.into(),
            message: e.to_string(),
        })?;
    Ok(out.trim_end_matches('\n').to_string())
}

impl PolicyPrompt {
    /// Reads the two templates from files (either may be left at the default).
    pub fn from_files(system: Option<&Path>, user: Option<&Path>) -> Result<Self> {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|source| Error::Io {
                path: p.to_path_buf(),
                source,
            })
        };
        Ok(PolicyPrompt {
            system: system
                .map(read)
                .transpose()?
                .unwrap_or_else(|| DEFAULT_SYSTEM.to_string()),
            user: user
                .map(read)
                .transpose()?
                .unwrap_or_else(|| DEFAULT_USER.to_string()),
        })
    }

    /// The system and user messages for one document.
    pub fn messages(&self, domain: &str, document: &str) -> Result<Vec<ChatMessage>> {
        let ctx = serde_json::json!({ "domain": domain, "document": document });
        Ok(vec![
            ChatMessage::system(render("policy system", &self.system, &ctx)?),
            ChatMessage::user(render("policy user", &self.user, &ctx)?),
        ])
    }

    /// The prompt's token ids under the policy's chat template, with the generation prompt.
    /// `enable_thinking` is passed to templates that take it (Qwen3).
    pub fn encode(
        &self,
        tok: &ChatTokenizer,
        domain: &str,
        document: &str,
        enable_thinking: Option<bool>,
    ) -> Result<Vec<u32>> {
        let mut kwargs = Map::new();
        if let Some(t) = enable_thinking {
            kwargs.insert("enable_thinking".into(), t.into());
        }
        Ok(tok.encode_prompt(&self.messages(domain, document)?, &kwargs)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_domain_and_document_and_asks_for_four_keys() {
        let m = PolicyPrompt::default()
            .messages("medicine", "Aspirin inhibits COX-1.")
            .unwrap();
        assert!(
            m[0].content
                .starts_with("You are an expert in the medicine field.")
        );
        assert!(
            m[1].content
                .starts_with("Here is a document:\nAspirin inhibits COX-1.\n")
        );
        for k in crate::rubric::KEYS {
            assert!(m[1].content.contains(&format!("\"{k}\"")), "{k}");
        }
        let bad = PolicyPrompt {
            user: "{{ nope }}".into(),
            ..Default::default()
        };
        assert!(
            bad.messages("d", "x")
                .unwrap_err()
                .to_string()
                .contains("nope")
        );
    }
}
