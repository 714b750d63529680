//! Snapshot tests of rendered policy prompts: the built-in guiding text, the demo's templates, and
//! the final text under real chat templates (Qwen3 with thinking on and off, Llama 3.1), since the
//! policy is trained on exactly these tokens. Snapshots (`insta`) live in
//! `tests/integration/snapshots/`; after a deliberate template change, rerun with
//! `INSTA_UPDATE=always` (or `cargo insta review`) and review the diff. A mismatch always fails.

use std::path::PathBuf;

use optimsyn_data_io::{ChatMessage, ChatTokenizer};
use optimsyn_rubric_policy::PolicyPrompt;
use serde_json::{Map, Value};

/// `text` with an end marker: insta trims trailing whitespace before storing and comparing, and a
/// prompt's trailing newlines are tokens the model sees, so the marker keeps them in the snapshot.
fn exact(text: &str) -> String {
    format!("{text}<<END>>")
}

fn show(messages: &[ChatMessage]) -> String {
    messages
        .iter()
        .map(|m| format!("=== {} ===\n{}\n", m.role.as_str(), m.content))
        .collect()
}

fn chat_fixture(name: &str) -> ChatTokenizer {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../data-io/tests/fixtures/chat")
        .join(name);
    ChatTokenizer::from_model_dir(dir).unwrap()
}

const DOC: &str = "The Treaty of Westphalia (1648) ended the Thirty Years' War and is often \
credited with the modern idea of state sovereignty.";

#[test]
fn builtin_guiding_text() {
    let m = PolicyPrompt::default()
        .messages("Humanities and Social Science", DOC)
        .unwrap();
    insta::assert_snapshot!("builtin_policy_messages", exact(&show(&m)));
}

#[test]
fn demo_templates() {
    let t = crate::demo().join("templates");
    let p = PolicyPrompt::from_files(
        Some(&t.join("policy_system.jinja")),
        Some(&t.join("policy_user.jinja")),
    )
    .unwrap();
    let m = p
        .messages("medicine", "Nevlorex acts on the skin.")
        .unwrap();
    insta::assert_snapshot!("demo_policy_messages", exact(&show(&m)));
}

#[test]
fn under_the_qwen3_template_with_and_without_thinking() {
    let tok = chat_fixture("qwen3");
    let m = PolicyPrompt::default().messages("History", DOC).unwrap();
    for (name, thinking) in [("qwen3_thinking", true), ("qwen3_no_thinking", false)] {
        let mut kwargs = Map::new();
        kwargs.insert("enable_thinking".into(), Value::Bool(thinking));
        let text = tok.render_chat_with(&m, true, &kwargs).unwrap().text;
        insta::assert_snapshot!(format!("policy_prompt_{name}"), exact(&text));
        // `encode` renders the same text.
        let ids = PolicyPrompt::default()
            .encode(&tok, "History", DOC, Some(thinking))
            .unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), text, "{name}");
    }
}

#[test]
fn under_the_llama31_template() {
    let tok = chat_fixture("llama31");
    let m = PolicyPrompt::default().messages("History", DOC).unwrap();
    let text = tok
        .render_chat_with(&m, true, &Default::default())
        .unwrap()
        .text;
    insta::assert_snapshot!("policy_prompt_llama31", exact(&text));
}
