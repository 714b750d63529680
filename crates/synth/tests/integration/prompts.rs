//! Snapshot tests of rendered generator prompts, with `insta`. Snapshots live in
//! `tests/integration/snapshots/`; after a deliberate template change, rerun with
//! `INSTA_UPDATE=always` (or `cargo insta review`) and review the diff. A mismatch always fails.

use optimsyn_data_io::{ChatMessage, ChatTokenizer};
use optimsyn_synth::{QaPrompt, QaTask, RubricSections, Synthesizer};
use serde_json::json;

use crate::common::{local, model_dir};

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

fn economics_rubric() -> RubricSections {
    RubricSections::from_value(&json!({
        "Prompt-related": ["Domain relevance: ask about compensating wage differentials", "Clarity: one unambiguous question"],
        "Response-related": "Factual accuracy and reasoning depth; explain why risky jobs pay more.",
        "Prompt-Response alignment": ["Consistency: the answer addresses exactly the question", "Format: short paragraphs, no bullet lists"],
        "Technical/trainability aspects": "Plain text, no markdown; paraphrase rather than copy.",
    }))
}

const DOC: &str = "Workers in dangerous occupations often earn more than workers in safe ones with \
similar skills. Economists call the extra pay a compensating wage differential.";

#[test]
fn builtin_prompt_with_a_full_rubric() {
    let m = QaPrompt::builtin()
        .render("Economics", DOC, &economics_rubric())
        .unwrap();
    insta::assert_snapshot!("builtin_full_rubric", exact(&show(&m)));
}

#[test]
fn builtin_prompt_with_missing_sections() {
    let r = RubricSections::from_value(&json!({"Response-related": "Correct and complete."}));
    let m = QaPrompt::builtin()
        .render("Medical and Health", "Aspirin inhibits cyclooxygenase.", &r)
        .unwrap();
    insta::assert_snapshot!("builtin_missing_sections", exact(&show(&m)));
}

#[test]
fn templates_overridden_from_files() {
    let dir = tempfile::tempdir().unwrap();
    let user = dir.path().join("user.jinja");
    std::fs::write(
        &user,
        "Doc: {{ document }}\n{% for k, v in rubric|items %}{% if v %}- {{ k }}: {{ v }}\n{% endif %}{% endfor %}Reply with JSON.\n",
    )
    .unwrap();
    let p = QaPrompt::from_files(None, Some(&user)).unwrap();
    let m = p.render("Economics", DOC, &economics_rubric()).unwrap();
    insta::assert_snapshot!("override_user_from_file", exact(&show(&m)));
    // An error names the file.
    std::fs::write(&user, "{{ rubric.nope.deeper }}").unwrap();
    let e = QaPrompt::from_files(None, Some(&user))
        .unwrap()
        .render("x", "y", &RubricSections::default())
        .unwrap_err();
    assert!(e.to_string().contains("user.jinja"), "{e}");
}

#[test]
fn the_generator_sees_the_chat_template_applied() {
    // What the local backend encodes: the generator conversation through the model's template.
    let g = local(Default::default());
    let task = QaTask {
        id: "d1/0".into(),
        seed_id: "d1".into(),
        domain: None,
        document: "Cats purr.".into(),
        rubric: RubricSections {
            prompt_related: "A short question.".into(),
            ..Default::default()
        },
        rubric_text: None,
    };
    let s = Synthesizer::new(&g);
    let messages = s.messages(&task).unwrap();
    let tok = ChatTokenizer::from_model_dir(model_dir()).unwrap();
    let rendered = tok
        .render_chat_with(&messages, true, &Default::default())
        .unwrap();
    insta::assert_snapshot!("chatml_generator_prompt", exact(&rendered.text));
}
