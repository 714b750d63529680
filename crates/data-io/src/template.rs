//! Hugging Face chat templates rendered with minijinja, the way transformers renders them.
//!
//! transformers compiles templates in a sandboxed Jinja2 environment with `trim_blocks` and
//! `lstrip_blocks`, loop controls, a `raise_exception` function, `strftime_now`, and a `tojson` that
//! calls Python's `json.dumps` (no HTML escaping, `", "`/`": "` separators). It binds the
//! tokenizer's special tokens (`bos_token`, `eos_token`, …), `messages`, `tools`, `documents`,
//! `add_generation_prompt` and any extra keyword arguments (e.g. `enable_thinking`). Python string
//! and dict methods come from minijinja-contrib's pycompat. transformers' `{% generation %}` …
//! `{% endgeneration %}` blocks, which mark assistant text for the loss mask, are supported: their
//! byte ranges in the output are returned with the text.

use std::fmt::Write as _;
use std::ops::Range;

use minijinja::value::{Kwargs, Serde};
use minijinja::{Environment, ErrorKind, Value};
use serde_json::{Map, Value as Json};

use crate::error::{Error, Result};
use crate::rows::ChatMessage;

// Private-use code points stand in for the generation tags during rendering; they are removed from
// the output, so the rendered text is exactly what transformers produces.
const GEN_OPEN: char = '\u{10FFFC}';
const GEN_CLOSE: char = '\u{10FFFD}';

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    origin: String,
    has_generation_tags: bool,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

/// The output of a render: the text, and the byte ranges of `{% generation %}` blocks in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    /// The rendered conversation.
    pub text: String,
    /// Byte ranges of the template's generation blocks (empty if it has none).
    pub generation_spans: Vec<Range<usize>>,
}

impl ChatTemplate {
    /// Compiles `source`; `origin` names it in errors (a file path, or `tokenizer_config.json`).
    pub fn new(source: &str, origin: impl Into<String>) -> Result<Self> {
        let origin = origin.into();
        let tag =
            regex::Regex::new(r"\{%([-+]?)\s*(end)?generation\s*([-+]?)%\}").map_err(|e| {
                Error::Template {
                    origin: origin.clone(),
                    message: e.to_string(),
                }
            })?;
        let has_generation_tags = tag.is_match(source);
        // `{%L generation R%}` becomes `{%L if true %}{{ OPEN }}{% endif R%}`: the outer tags keep the
        // original whitespace control, the inner ones touch no template data.
        let source = tag
            .replace_all(source, |c: &regex::Captures<'_>| {
                let mark = if c.get(2).is_some() {
                    GEN_CLOSE
                } else {
                    GEN_OPEN
                };
                format!(
                    "{{%{} if true %}}{{{{ \"{mark}\" }}}}{{% endif {}%}}",
                    &c[1], &c[3]
                )
            })
            .into_owned();
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| template_err(&origin, e))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<Value, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_function(
            "strftime_now",
            |fmt: String| -> std::result::Result<String, minijinja::Error> {
                // chrono reports a bad specifier (`%Q`, a lone `%`) as a formatting error, which
                // `to_string` would turn into a panic.
                let mut out = String::new();
                write!(out, "{}", chrono::Local::now().format(&fmt)).map_err(|_| {
                    minijinja::Error::new(
                        ErrorKind::InvalidOperation,
                        format!("strftime_now: invalid format `{fmt}`"),
                    )
                })?;
                Ok(out)
            },
        );
        env.add_filter("tojson", tojson);
        env.add_template_owned("chat", source)
            .map_err(|e| template_err(&origin, e))?;
        Ok(ChatTemplate {
            env,
            origin,
            has_generation_tags,
        })
    }

    /// Whether the template marks assistant text with `{% generation %}` blocks.
    pub fn has_generation_tags(&self) -> bool {
        self.has_generation_tags
    }

    /// Where the template came from.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Renders `messages`. `special_tokens` are bound as variables (`bos_token`, …), then `extra`
    /// (template keyword arguments such as `enable_thinking`), as transformers does.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        special_tokens: &[(String, String)],
        extra: &Map<String, Json>,
    ) -> Result<Rendered> {
        let mut ctx = Map::new();
        for (k, v) in special_tokens {
            ctx.insert(k.clone(), Json::String(v.clone()));
        }
        let msgs: Vec<Json> = messages
            .iter()
            .map(|m| serde_json::json!({"role": m.role.as_str(), "content": m.content}))
            .collect();
        ctx.insert("messages".into(), Json::Array(msgs));
        ctx.insert("tools".into(), Json::Null);
        ctx.insert("documents".into(), Json::Null);
        ctx.insert(
            "add_generation_prompt".into(),
            Json::Bool(add_generation_prompt),
        );
        for (k, v) in extra {
            ctx.insert(k.clone(), v.clone());
        }
        let ctx = Json::Object(ctx);
        // With generation tags, a stand-in character in the input would be taken for a tag (and
        // could mark user text as trained-on); without them, any in the output is refused below.
        if self.has_generation_tags && holds_reserved(&ctx) {
            return Err(self.reserved());
        }
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| template_err(&self.origin, e))?;
        let raw = tmpl
            .render(Value::from(Serde(ctx)))
            .map_err(|e| template_err(&self.origin, e))?;
        if !self.has_generation_tags {
            if raw.contains([GEN_OPEN, GEN_CLOSE]) {
                return Err(self.reserved());
            }
            return Ok(Rendered {
                text: raw,
                generation_spans: Vec::new(),
            });
        }
        let mut text = String::with_capacity(raw.len());
        let mut spans = Vec::new();
        let mut open: Option<usize> = None;
        for ch in raw.chars() {
            match ch {
                GEN_OPEN if open.is_none() => open = Some(text.len()),
                GEN_CLOSE if open.is_some() => {
                    let start = open.take().unwrap_or_default();
                    if start < text.len() {
                        spans.push(start..text.len());
                    }
                }
                GEN_OPEN | GEN_CLOSE => return Err(self.reserved()),
                c => text.push(c),
            }
        }
        Ok(Rendered {
            text,
            generation_spans: spans,
        })
    }

    fn reserved(&self) -> Error {
        Error::Template {
            origin: self.origin.clone(),
            message: "the conversation (or a template argument) contains U+10FFFC/U+10FFFD, \
                      which stand for generation tags while rendering"
                .into(),
        }
    }
}

/// Whether a string anywhere in `v` (a key included) holds a generation stand-in character.
fn holds_reserved(v: &Json) -> bool {
    match v {
        Json::String(s) => s.contains([GEN_OPEN, GEN_CLOSE]),
        Json::Array(a) => a.iter().any(holds_reserved),
        Json::Object(m) => m
            .iter()
            .any(|(k, v)| k.contains([GEN_OPEN, GEN_CLOSE]) || holds_reserved(v)),
        Json::Null | Json::Bool(_) | Json::Number(_) => false,
    }
}

fn template_err(origin: &str, e: minijinja::Error) -> Error {
    let mut message = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        let _ = write!(message, ": {s}");
        source = s.source();
    }
    Error::Template {
        origin: origin.to_string(),
        message,
    }
}

/// `tojson` as transformers defines it: Python's `json.dumps(x, ensure_ascii=False, indent=indent,
/// separators=separators, sort_keys=sort_keys)`.
fn tojson(value: Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let (item, key) = match separators.as_deref() {
        Some([a, b]) => (a.clone(), b.clone()),
        Some(_) => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                "tojson: separators must be a pair",
            ));
        }
        None if indent.is_some() => (",".into(), ": ".into()),
        None => (", ".into(), ": ".into()),
    };
    let style = PyJson {
        indent,
        item,
        key,
        sort_keys: sort_keys.unwrap_or(false),
        ascii: ensure_ascii.unwrap_or(false),
    };
    let mut out = String::new();
    style.dump(&json, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

/// The longest text `tojson` writes: the bound minijinja puts on `"x" * n`, so that an `indent`
/// of 10^18 is an error rather than an allocation failure.
const MAX_TOJSON_LEN: usize = 100_000_000;

struct PyJson {
    indent: Option<usize>,
    item: String,
    key: String,
    sort_keys: bool,
    ascii: bool,
}

impl PyJson {
    fn newline(&self, level: usize, out: &mut String) -> std::result::Result<(), minijinja::Error> {
        if let Some(n) = self.indent {
            let pad = n
                .checked_mul(level)
                .filter(|&p| p < MAX_TOJSON_LEN.saturating_sub(out.len()))
                .ok_or_else(|| {
                    minijinja::Error::new(
                        ErrorKind::InvalidOperation,
                        format!(
                            "tojson: indent {n} makes the text longer than {MAX_TOJSON_LEN} bytes"
                        ),
                    )
                })?;
            out.push('\n');
            out.extend(std::iter::repeat_n(' ', pad));
        }
        Ok(())
    }

    fn string(&self, s: &str, out: &mut String) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{08}' => out.push_str("\\b"),
                '\u{0c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 || (self.ascii && (c as u32) > 0x7e) => {
                    let mut buf = [0u16; 2];
                    for u in c.encode_utf16(&mut buf) {
                        let _ = write!(out, "\\u{u:04x}");
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }

    fn dump(
        &self,
        v: &Json,
        level: usize,
        out: &mut String,
    ) -> std::result::Result<(), minijinja::Error> {
        match v {
            Json::Null => out.push_str("null"),
            Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Json::Number(n) => out.push_str(&n.to_string()),
            Json::String(s) => self.string(s, out),
            Json::Array(a) if a.is_empty() => out.push_str("[]"),
            Json::Array(a) => {
                out.push('[');
                for (i, x) in a.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item);
                    }
                    self.newline(level + 1, out)?;
                    self.dump(x, level + 1, out)?;
                }
                self.newline(level, out)?;
                out.push(']');
            }
            Json::Object(m) if m.is_empty() => out.push_str("{}"),
            Json::Object(m) => {
                let mut entries: Vec<_> = m.iter().collect();
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(b.0));
                }
                out.push('{');
                for (i, (k, x)) in entries.into_iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item);
                    }
                    self.newline(level + 1, out)?;
                    self.string(k, out);
                    out.push_str(&self.key);
                    self.dump(x, level + 1, out)?;
                }
                self.newline(level, out)?;
                out.push('}');
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(src: &str, msgs: &[ChatMessage], gen_prompt: bool) -> Rendered {
        ChatTemplate::new(src, "test")
            .unwrap()
            .render(msgs, gen_prompt, &[], &Map::new())
            .unwrap()
    }

    #[test]
    fn generation_tags_keep_text_and_give_spans() {
        let plain = "{% for m in messages %}<{{ m.role }}>\n{% if m.role == 'assistant' %}{{ m.content }}</s>{% else %}{{ m.content }}{% endif %}\n{% endfor %}";
        let tagged = "{% for m in messages %}<{{ m.role }}>\n{% if m.role == 'assistant' %}{%- generation -%}\n{{ m.content }}</s>{% endgeneration %}{% else %}{{ m.content }}{% endif %}\n{% endfor %}";
        let msgs = [ChatMessage::user("hi"), ChatMessage::assistant("hello")];
        let a = render(plain, &msgs, false);
        let b = render(tagged, &msgs, false);
        assert_eq!(a.text, b.text);
        assert_eq!(&b.text[b.generation_spans[0].clone()], "hello</s>");
    }

    #[test]
    fn python_methods_tojson_and_raise_exception() {
        let src = "{{ messages[0].content.strip().split(' ')|tojson }}|{{ {'b': 1, 'a': [1, 2]}|tojson(indent=2) }}|{{ messages[::-1][0].role }}";
        let msgs = [
            ChatMessage::user("  a \"b\" é "),
            ChatMessage::assistant("x"),
        ];
        let r = render(src, &msgs, false);
        assert_eq!(
            r.text,
            "[\"a\", \"\\\"b\\\"\", \"é\"]|{\n  \"b\": 1,\n  \"a\": [\n    1,\n    2\n  ]\n}|assistant"
        );
        let e = ChatTemplate::new("{{ raise_exception('no system role') }}", "t")
            .unwrap()
            .render(&msgs, false, &[], &Map::new())
            .unwrap_err();
        assert!(e.to_string().contains("no system role"), "{e}");
    }

    fn render_err(src: &str, msgs: &[ChatMessage]) -> String {
        ChatTemplate::new(src, "t")
            .unwrap()
            .render(msgs, false, &[], &Map::new())
            .unwrap_err()
            .to_string()
    }

    /// Found by tests/integration/fuzz: chrono reports a bad specifier as a formatting error, and
    /// `to_string` panicked on it.
    #[test]
    fn strftime_now_with_a_bad_format_is_an_error() {
        for fmt in ["%Q", "%", "%Y-%"] {
            let e = render_err(&format!("{{{{ strftime_now('{fmt}') }}}}"), &[]);
            assert!(e.contains("strftime_now: invalid format"), "{e}");
        }
        assert_eq!(render("{{ strftime_now('%%') }}", &[], false).text, "%");
    }

    /// Found by tests/integration/fuzz: `tojson(indent=9223372036854775807)` asked for a string of
    /// 2^63 spaces ("capacity overflow" panic; 10^12 would abort on the allocation).
    #[test]
    fn tojson_with_a_huge_indent_is_an_error() {
        let msgs = [ChatMessage::user("hi")];
        for n in [
            "9223372036854775807",
            "18446744073709551615",
            "1000000000000",
        ] {
            let e = render_err(&format!("{{{{ messages|tojson(indent={n}) }}}}"), &msgs);
            assert!(
                e.contains("tojson: indent") && e.contains("longer than"),
                "{e}"
            );
        }
        let r = render("{{ [1]|tojson(indent=100000) }}", &msgs, false);
        assert_eq!(r.text.len(), "[\n1\n]".len() + 100_000);
    }

    /// Found by tests/integration/fuzz: with generation tags, stand-ins in a message were taken for
    /// tags, so a user message could mark its own text as assistant output (or vanish).
    #[test]
    fn stand_ins_in_the_input_of_a_tagged_template_are_an_error() {
        let tagged = "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}{% else %}{{ m.content }}{% endif %}{% endfor %}";
        let forged = [
            ChatMessage::user("\u{10FFFC}not an answer\u{10FFFD}"),
            ChatMessage::assistant("a"),
        ];
        let e = render_err(tagged, &forged);
        assert!(e.contains("U+10FFFC"), "{e}");
        let mut extra = Map::new();
        extra.insert("x".into(), serde_json::json!({"k": ["\u{10FFFD}"]}));
        let e = ChatTemplate::new(tagged, "t")
            .unwrap()
            .render(&[ChatMessage::user("q")], false, &[], &extra)
            .unwrap_err()
            .to_string();
        assert!(e.contains("U+10FFFC"), "{e}");
    }
}
