//! Snapshot tests of rendered policy prompts: the built-in guiding text, the demo's templates, and
//! the final text under real chat templates (Qwen3 with thinking on and off, Llama 3.1), since the
//! policy is trained on exactly these tokens. Snapshots live in `tests/snapshots/`; after a
//! deliberate template change, rerun with `UPDATE_SNAPSHOTS=1` and review the diff.

use std::path::PathBuf;

use optimsyn_data_io::{ChatMessage, ChatTokenizer};
use optimsyn_rubric_policy::PolicyPrompt;
use serde_json::{Map, Value};

fn assert_snapshot(name: &str, actual: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/snapshots")
        .join(format!("{name}.txt"));
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|_| {
        panic!(
            "missing snapshot {}; run with UPDATE_SNAPSHOTS=1 to create it",
            path.display()
        )
    });
    assert!(
        want == actual,
        "snapshot {name} differs (rerun with UPDATE_SNAPSHOTS=1 if intended)\n--- want\n{want}\n--- got\n{actual}"
    );
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
    assert_snapshot("builtin_policy_messages", &show(&m));
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
    assert_snapshot("demo_policy_messages", &show(&m));
}

#[test]
fn under_the_qwen3_template_with_and_without_thinking() {
    let tok = chat_fixture("qwen3");
    let m = PolicyPrompt::default().messages("History", DOC).unwrap();
    for (name, thinking) in [("qwen3_thinking", true), ("qwen3_no_thinking", false)] {
        let mut kwargs = Map::new();
        kwargs.insert("enable_thinking".into(), Value::Bool(thinking));
        let text = tok.render_chat_with(&m, true, &kwargs).unwrap().text;
        assert_snapshot(&format!("policy_prompt_{name}"), &text);
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
    assert_snapshot("policy_prompt_llama31", &text);
}
