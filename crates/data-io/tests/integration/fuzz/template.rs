//! Chat templates (crates/data-io/src/template.rs: `ChatTemplate::new`, `ChatTemplate::render`)
//! from arbitrary and mutated sources, rendering arbitrary conversations and template arguments;
//! and the fixture models' real templates turning arbitrary conversations into tokens and loss
//! masks (crates/data-io/src/tokenizer.rs: `ChatTokenizer::encode_example`, both formats).

use std::path::PathBuf;
use std::sync::OnceLock;

use optimsyn_data_io::{ChatExample, ChatFormat, ChatMessage, ChatTemplate, ChatTokenizer, Role};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;
use serde_json::{Map, Value};

use super::mutate::{apply_bytes, byte_ops, json_value, text};

/// The characters the renderer uses for `{% generation %}` tags while rendering.
const RESERVED: [char; 2] = ['\u{10FFFC}', '\u{10FFFD}'];

/// The chat-parity fixture folders (real Qwen3, Llama 3.1 and ChatML templates, with and without
/// `{% generation %}` tags).
const FOLDERS: &[&str] = &[
    "chatml",
    "chatml-gen",
    "qwen3",
    "qwen3-gen",
    "llama31",
    "llama31-gen",
];

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/chat")
        .join(name)
}

fn tokenizers() -> &'static [ChatTokenizer] {
    static TOKS: OnceLock<Vec<ChatTokenizer>> = OnceLock::new();
    TOKS.get_or_init(|| {
        FOLDERS
            .iter()
            .map(|f| ChatTokenizer::from_model_dir(fixture(f)).expect("a fixture tokenizer"))
            .collect()
    })
}

fn sources() -> &'static [String] {
    static SRC: OnceLock<Vec<String>> = OnceLock::new();
    SRC.get_or_init(|| {
        FOLDERS
            .iter()
            .map(|f| {
                std::fs::read_to_string(fixture(f).join("chat_template.jinja"))
                    .expect("a fixture template")
            })
            .collect()
    })
}

/// Pieces of Jinja, so that random sources get past the lexer and parser now and then.
const PIECES: &[&str] = &[
    "{{ ",
    " }}",
    "{% ",
    " %}",
    "{%- ",
    " -%}",
    "{# c #}",
    "{% generation %}",
    "{%- generation -%}",
    "{% endgeneration %}",
    "{% for m in messages %}",
    "{% endfor %}",
    "{% if ",
    "{% elif ",
    "{% else %}",
    "{% endif %}",
    "{% set ns = namespace(x=0) %}",
    "{% set ns.x = ns.x + 1 %}",
    "{% macro f(a) %}",
    "{% endmacro %}",
    "{{ f(1) }}",
    "{% break %}",
    "{% continue %}",
    "m.role",
    "m.content",
    "m['content']",
    "messages[0]",
    "messages[-1]",
    "messages[::-1]",
    "loop.index",
    "loop.last",
    "ns.x",
    "'x'",
    "\"y\"",
    " == ",
    " != ",
    " and ",
    " not ",
    " in ",
    " ~ ",
    " + ",
    " * ",
    "|",
    "tojson",
    "length",
    "trim",
    "(",
    ")",
    "[",
    "]",
    ", ",
    "0",
    "1",
    "-1",
    "range(3)",
    ".strip()",
    ".split('\\n')",
    ".startswith('<')",
    ".replace('a', 'b')",
    ".upper()",
    ".items()",
    "raise_exception('boom')",
    "add_generation_prompt",
    "bos_token",
    "eos_token",
    "enable_thinking",
    "tools",
    "x",
    "\n",
    " ",
    "\u{10FFFC}",
];

/// `tojson` and `strftime_now` calls with arguments from the edges of what they take.
fn call() -> impl Strategy<Value = String> {
    prop_oneof![
        (
            select(
                &[
                    "",
                    "indent=",
                    "indent=",
                    "sort_keys=",
                    "ensure_ascii=",
                    "separators=",
                    "x="
                ][..]
            ),
            select(
                &[
                    "2",
                    "0",
                    "-1",
                    "true",
                    "none",
                    "'  '",
                    "(',', ':')",
                    "[',']",
                    "100000",
                    "9223372036854775807",
                    "99999999999999999999",
                ][..]
            ),
            select(&["messages", "m", "{'b': [1, {}], 'a': 'é'}", "1.5", "none"][..]),
        )
            .prop_map(|(k, v, x)| {
                if k.is_empty() {
                    format!("{{{{ {x}|tojson }}}}")
                } else {
                    format!("{{{{ {x}|tojson({k}{v}) }}}}")
                }
            }),
        "[%a-zA-Z:.#+ -]{0,4}".prop_map(|f| format!("{{{{ strftime_now('{f}') }}}}")),
    ]
}

fn soup() -> impl Strategy<Value = String> {
    vec(
        prop_oneof![
            6 => select(PIECES).prop_map(str::to_string),
            1 => call(),
            1 => text(),
        ],
        0..24,
    )
    .prop_map(|p| p.concat())
}

/// Sources: arbitrary text, Jinja soup, and the fixtures' real templates with byte edits.
fn source() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        soup(),
        (0..FOLDERS.len(), byte_ops()).prop_map(|(i, ops)| {
            let b = apply_bytes(sources()[i].clone().into_bytes(), &ops);
            String::from_utf8_lossy(&b).into_owned()
        }),
    ]
}

fn role() -> impl Strategy<Value = Role> {
    prop_oneof![Just(Role::System), Just(Role::User), Just(Role::Assistant)]
}

/// Contents with what renderers and span finders trip on: the reserved private-use characters,
/// special-token text, `<think>` blocks, whitespace only, repeats of other messages.
fn content() -> impl Strategy<Value = String> {
    prop_oneof![
        text(),
        vec(
            select(
                &[
                    "<|im_end|>",
                    "<|im_start|>",
                    "<|eot_id|>",
                    "<|start_header_id|>",
                    "<think>",
                    "</think>",
                    "\n",
                    " ",
                    "\t",
                    "\u{1c}",
                    "\u{10FFFC}",
                    "\u{10FFFD}",
                    "the answer",
                    "é",
                    "{{ x }}",
                    "",
                ][..]
            ),
            0..6
        )
        .prop_map(|p| p.concat()),
    ]
}

fn messages() -> impl Strategy<Value = Vec<ChatMessage>> {
    vec(
        (role(), content()).prop_map(|(r, c)| ChatMessage::new(r, c)),
        0..5,
    )
}

const KWARG_KEYS: &[&str] = &[
    "enable_thinking",
    "messages",
    "tools",
    "documents",
    "add_generation_prompt",
    "bos_token",
    "date_string",
    "role",
    "content",
];

fn kwargs() -> impl Strategy<Value = Map<String, Value>> {
    proptest::option::weighted(0.3, json_value(KWARG_KEYS)).prop_map(|v| match v {
        Some(Value::Object(m)) => m,
        Some(other) => Map::from_iter([("enable_thinking".to_string(), other)]),
        None => Map::new(),
    })
}

fn check_spans(text: &str, spans: &[std::ops::Range<usize>]) -> Result<(), TestCaseError> {
    let mut last = 0;
    for s in spans {
        prop_assert!(
            last <= s.start && s.start < s.end && s.end <= text.len(),
            "{spans:?}"
        );
        prop_assert!(text.is_char_boundary(s.start) && text.is_char_boundary(s.end));
        last = s.end;
    }
    Ok(())
}

proptest! {
    #![proptest_config(super::cases(64))]

    /// Compiling and rendering: a value or a template error, never a panic; generation spans lie
    /// within the text, in order, on character boundaries, and only where the template has tags.
    #[test]
    fn arbitrary_templates_render_or_fail_cleanly(
        src in source(),
        msgs in messages(),
        gen_prompt in any::<bool>(),
        extra in kwargs(),
    ) {
        let Ok(t) = ChatTemplate::new(&src, "fuzz") else {
            return Ok(());
        };
        let specials = [
            ("bos_token".to_string(), "<s>".to_string()),
            ("eos_token".to_string(), "</s>".to_string()),
        ];
        match t.render(&msgs, gen_prompt, &specials, &extra) {
            Ok(r) => {
                if !t.has_generation_tags() {
                    prop_assert!(r.generation_spans.is_empty());
                }
                prop_assert!(!r.text.contains(RESERVED), "{:?}", r.text);
                check_spans(&r.text, &r.generation_spans)?;
            }
            Err(e) => {
                let msg = e.to_string();
                prop_assert!(msg.starts_with("chat template (fuzz)"), "{msg}");
            }
        }
    }

    /// Real templates and tokenizers on arbitrary conversations: tokens and a mask of the same
    /// length, or an error naming the example, the template or the tokenizer.
    #[test]
    fn fixture_templates_encode_arbitrary_conversations(
        folder in 0..FOLDERS.len(),
        msgs in messages(),
        tulu in any::<bool>(),
        max_len in proptest::option::of(0usize..40),
        extra in kwargs(),
        gen_prompt in any::<bool>(),
    ) {
        let tok = &tokenizers()[folder];
        let example = ChatExample { id: Some("fuzz-row".into()), messages: msgs.clone(), subtask: None };
        let format = if tulu { ChatFormat::Tulu } else { ChatFormat::ChatTemplate };
        match tok.encode_example(&example, format, max_len, &extra) {
            Ok(enc) => {
                prop_assert_eq!(enc.tokens.len(), enc.loss_mask.len());
                prop_assert!(enc.loss_mask.iter().all(|&m| m <= 1));
                if let Some(n) = max_len {
                    prop_assert!(enc.tokens.len() <= n);
                }
            }
            Err(e) => {
                let msg = e.to_string();
                prop_assert!(
                    msg.contains("fuzz-row") || msg.contains("chat_template") || msg.contains("tokenizer"),
                    "{msg}"
                );
            }
        }
        // The prompt path of `lm generate` and `optimsyn serve`.
        let rendered = tok.render_chat_with(&msgs, gen_prompt, &extra);
        if let Ok(r) = &rendered {
            check_spans(&r.text, &r.generation_spans)?;
        }
        let _ = tok.encode_prompt(&msgs, &extra);
        // ChatML writes every message as it is: a conversation holding the characters that stand
        // in for generation tags must be refused, not turned into forged assistant spans.
        let verbatim = FOLDERS[folder].starts_with("chatml") && !extra.contains_key("messages");
        if verbatim && msgs.iter().any(|m| m.content.contains(RESERVED)) {
            prop_assert!(rendered.is_err(), "{:?}", rendered);
        }
    }
}
