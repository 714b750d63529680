//! Chat templates, token ids and loss masks against transformers and LESS, on fixtures written by
//! `python/fixtures/chat_templates.py` (the real Qwen3 and Llama-3.1 templates, a ChatML one, and
//! copies of each with transformers' `{% generation %}` blocks).

use std::collections::BTreeMap;
use std::path::PathBuf;

use optimsyn_data_io::{ChatExample, ChatFormat, ChatMessage, ChatTokenizer, read_jsonl};
use serde::Deserialize;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat")
}

#[derive(Deserialize)]
struct Case {
    folder: String,
    conversation: String,
    messages: Vec<ChatMessage>,
    add_generation_prompt: bool,
    #[serde(default)]
    template_kwargs: serde_json::Map<String, serde_json::Value>,
    text: String,
    ids: Vec<u32>,
    assistant_mask: Option<Vec<u8>>,
}

#[derive(Deserialize)]
struct TuluCase {
    folder: String,
    conversation: String,
    messages: Vec<ChatMessage>,
    max_seq_length: usize,
    text: String,
    ids: Vec<u32>,
    labels: Vec<i64>,
}

struct Tokenizers(BTreeMap<String, ChatTokenizer>);

impl Tokenizers {
    fn get(&mut self, folder: &str) -> &ChatTokenizer {
        self.0
            .entry(folder.to_string())
            .or_insert_with(|| ChatTokenizer::from_model_dir(fixtures().join(folder)).unwrap())
    }
}

#[test]
fn templates_render_and_encode_like_transformers() {
    let cases: Vec<Case> = read_jsonl(fixtures().join("cases.jsonl")).unwrap();
    let mut toks = Tokenizers(BTreeMap::new());
    let mut folders = std::collections::BTreeSet::new();
    for c in &cases {
        let what = format!(
            "{} / {} / gen_prompt={} / {:?}",
            c.folder, c.conversation, c.add_generation_prompt, c.template_kwargs
        );
        let tok = toks.get(&c.folder);
        let r = tok
            .render_chat_with(&c.messages, c.add_generation_prompt, &c.template_kwargs)
            .unwrap();
        assert_eq!(r.text, c.text, "rendered text differs: {what}");
        assert_eq!(
            tok.encode_rendered(&r.text).unwrap(),
            c.ids,
            "ids differ: {what}"
        );
        folders.insert(c.folder.clone());
    }
    for f in [
        "qwen3",
        "llama31",
        "chatml",
        "qwen3-gen",
        "llama31-gen",
        "chatml-gen",
    ] {
        assert!(folders.contains(f), "no cases for {f}");
    }
}

/// transformers' `return_assistant_tokens_mask` on the tagged templates is the truth; optimsyn
/// must give the same mask from the tagged template and, by locating content, from the real one.
#[test]
fn loss_masks_equal_transformers_assistant_masks() {
    let cases: Vec<Case> = read_jsonl(fixtures().join("cases.jsonl")).unwrap();
    let mut toks = Tokenizers(BTreeMap::new());
    let mut checked = 0;
    for c in cases.iter().filter(|c| !c.add_generation_prompt) {
        let Some(want) = &c.assistant_mask else {
            continue;
        };
        let plain = c.folder.trim_end_matches("-gen").to_string();
        for folder in [c.folder.clone(), plain] {
            let ex = ChatExample {
                id: Some(c.conversation.clone()),
                messages: c.messages.clone(),
                subtask: None,
            };
            let enc = toks
                .get(&folder)
                .encode_example(&ex, ChatFormat::ChatTemplate, None, &c.template_kwargs)
                .unwrap();
            assert_eq!(enc.tokens, c.ids, "{folder} / {}", c.conversation);
            assert_eq!(
                &enc.loss_mask, want,
                "mask differs: {folder} / {} / {:?}",
                c.conversation, c.template_kwargs
            );
            checked += 1;
        }
    }
    assert!(checked >= 12, "only {checked} masks checked");
}

#[test]
fn tulu_encoding_equals_less() {
    let cases: Vec<TuluCase> = read_jsonl(fixtures().join("tulu.jsonl")).unwrap();
    assert!(cases.len() >= 10, "{} Tulu cases", cases.len());
    let mut toks = Tokenizers(BTreeMap::new());
    for c in &cases {
        let tok = toks.get(&c.folder);
        let eos = tok.special("eos_token").unwrap().to_string();
        assert_eq!(
            optimsyn_data_io::tokenizer::tulu_text(&c.messages, &eos),
            c.text,
            "{}",
            c.conversation
        );
        let ex = ChatExample {
            id: Some(c.conversation.clone()),
            messages: c.messages.clone(),
            subtask: None,
        };
        let enc = tok
            .encode_example(
                &ex,
                ChatFormat::Tulu,
                Some(c.max_seq_length),
                &Default::default(),
            )
            .unwrap();
        assert_eq!(enc.tokens, c.ids, "{} / {}", c.folder, c.conversation);
        let want: Vec<u8> = c.labels.iter().map(|l| u8::from(*l != -100)).collect();
        assert_eq!(enc.loss_mask, want, "{} / {}", c.folder, c.conversation);
    }
}

#[test]
fn template_errors_are_clear() {
    let tok = ChatTokenizer::from_model_dir(fixtures().join("llama31")).unwrap();
    // A template's own `raise_exception` message reaches the user, with the template's origin.
    let dir = tempfile::tempdir().unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixtures().join("llama31").join(f), dir.path().join(f)).unwrap();
    }
    std::fs::write(
        dir.path().join("chat_template.jinja"),
        "{{ raise_exception('Conversation roles must alternate') }}",
    )
    .unwrap();
    let bad = ChatTokenizer::from_model_dir(dir.path()).unwrap();
    let e = bad
        .render_chat(&[ChatMessage::user("hi")], false)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("chat_template.jinja") && e.contains("Conversation roles must alternate"),
        "{e}"
    );
    std::fs::write(
        dir.path().join("chat_template.jinja"),
        "{% for m in messages %}{{ m.content }",
    )
    .unwrap();
    let e = ChatTokenizer::from_model_dir(dir.path())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("chat template") && e.contains("chat_template.jinja"),
        "{e}"
    );
    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    let e = ChatTokenizer::from_model_dir(dir.path())
        .unwrap_err()
        .to_string();
    assert!(e.contains("tokenizer.json") && e.contains("missing"), "{e}");
    assert!(!tok.eos_token_ids().is_empty());
}

#[test]
fn named_template_list_in_tokenizer_config() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixtures().join("chatml/tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    let cfg = serde_json::json!({
        "eos_token": {"content": "<|im_end|>", "lstrip": false, "__type": "AddedToken"},
        "chat_template": [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "{{ eos_token }}{{ messages[0].content }}"}]
    });
    std::fs::write(dir.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
    let tok = ChatTokenizer::from_model_dir(dir.path()).unwrap();
    assert_eq!(
        tok.render_chat(&[ChatMessage::user("x")], false).unwrap(),
        "<|im_end|>x"
    );
    let cfg = serde_json::json!({"chat_template": [{"name": "a", "template": "A"}, {"name": "b", "template": "B"}]});
    std::fs::write(dir.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
    let e = ChatTokenizer::from_model_dir(dir.path())
        .unwrap_err()
        .to_string();
    assert!(e.contains("a, b") && e.contains("default"), "{e}");
}
