//! A model folder's tokenizer and chat template, and the rendering of chat examples into token ids
//! plus a loss mask (docs/GUIDE.md, "From a conversation to tokens"; docs/COMPATIBILITY.md, "Chat
//! templates" and "Tulu format").
//!
//! - [`ChatFormat::ChatTemplate`]: the model's own template renders the conversation to one string,
//!   which is encoded once without adding special tokens (as `apply_chat_template(tokenize=True)`).
//!   The loss mask covers each assistant turn's text and the end-of-turn special token(s) the
//!   template writes right after it, found from the tokenizer's offsets over the rendered text. A
//!   template with `{% generation %}` blocks marks that text itself (transformers'
//!   `return_assistant_tokens_mask`); otherwise each message's content is located in the rendered
//!   text in order (see `docs/COMPATIBILITY.md`).
//! - [`ChatFormat::Tulu`]: LESS's `encode_with_messages_format`, exactly: `<|user|>\n…\n`,
//!   `<|assistant|>\n…{eos}\n`, encoded with the tokenizer's special tokens; non-assistant messages
//!   and the `<|assistant|>\n` header after them are masked by the token lengths of prefixes.

use std::fs;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::rows::{ChatExample, ChatMessage, Role};
use crate::template::{ChatTemplate, Rendered};

/// How a chat example becomes tokens and a loss mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ChatFormat {
    /// The model's chat template.
    #[default]
    ChatTemplate,
    /// The Tulu format of LESS and the OptimSyn reference code.
    Tulu,
}

impl std::str::FromStr for ChatFormat {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "chat-template" => Ok(ChatFormat::ChatTemplate),
            "tulu" => Ok(ChatFormat::Tulu),
            other => Err(format!(
                "unknown format `{other}` (expected chat-template or tulu)"
            )),
        }
    }
}

impl std::fmt::Display for ChatFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ChatFormat::ChatTemplate => "chat-template",
            ChatFormat::Tulu => "tulu",
        })
    }
}

/// Token ids of one example and, per token, whether it carries loss.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncodedExample {
    /// Token ids.
    pub tokens: Vec<u32>,
    /// 1 where the token is a training target, else 0.
    pub loss_mask: Vec<u8>,
}

/// A special token as `tokenizer_config.json` writes it: a string or an `AddedToken` object.
#[derive(Deserialize)]
#[serde(untagged)]
enum TokenSpec {
    Text(String),
    Added { content: String },
}

#[derive(Deserialize)]
#[serde(untagged)]
enum TemplateSpec {
    One(String),
    Named(Vec<NamedTemplate>),
}

#[derive(Deserialize)]
struct NamedTemplate {
    name: String,
    template: String,
}

const SPECIAL_KEYS: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// A Hugging Face tokenizer with its special tokens and chat template.
pub struct ChatTokenizer {
    tokenizer: tokenizers::Tokenizer,
    path: PathBuf,
    specials: Vec<(String, String)>,
    template: Option<ChatTemplate>,
    special_texts: Vec<String>,
    eos_ids: Vec<u32>,
}

impl std::fmt::Debug for ChatTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTokenizer")
            .field("path", &self.path)
            .field("specials", &self.specials)
            .field("template", &self.template)
            .finish_non_exhaustive()
    }
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    match fs::read_to_string(path) {
        Ok(t) => serde_json::from_str(&t)
            .map(Some)
            .map_err(|e| Error::invalid(path, format!("invalid JSON: {e}"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(path, e)),
    }
}

impl ChatTokenizer {
    /// Loads `tokenizer.json`, `tokenizer_config.json` and the chat template from a model folder.
    /// The template is taken, as transformers does, from `chat_template.jinja` first, then
    /// `chat_template.json`, then `tokenizer_config.json` (a string, or a list of named templates of
    /// which `default` is used). Stop ids are the tokenizer's eos plus `config.json`'s and
    /// `generation_config.json`'s `eos_token_id`.
    pub fn from_model_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(Error::Tokenizer {
                path,
                message: "missing (the model folder has no tokenizer.json)".into(),
            });
        }
        let tokenizer = tokenizers::Tokenizer::from_file(&path).map_err(|e| Error::Tokenizer {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg = read_json(&cfg_path)?.unwrap_or(Value::Object(Map::new()));
        let mut specials = Vec::new();
        for key in SPECIAL_KEYS {
            match cfg.get(key) {
                None | Some(Value::Null) => {}
                Some(v) => {
                    let spec: TokenSpec = serde_json::from_value(v.clone())
                        .map_err(|e| Error::invalid(&cfg_path, format!("field `{key}`: {e}")))?;
                    let text = match spec {
                        TokenSpec::Text(s) | TokenSpec::Added { content: s } => s,
                    };
                    specials.push((key.to_string(), text));
                }
            }
        }
        let template = Self::find_template(dir, &cfg, &cfg_path)?;
        let mut special_texts: Vec<String> = tokenizer
            .get_added_tokens_decoder()
            .values()
            .filter(|t| t.special)
            .map(|t| t.content.clone())
            .collect();
        // Longest first, so `<|im_end|>` is preferred over a shorter special that prefixes it.
        special_texts.sort_by_key(|t| std::cmp::Reverse(t.len()));
        let mut me = ChatTokenizer {
            tokenizer,
            path,
            specials,
            template,
            special_texts,
            eos_ids: Vec::new(),
        };
        me.eos_ids = me.collect_eos(dir)?;
        Ok(me)
    }

    fn find_template(dir: &Path, cfg: &Value, cfg_path: &Path) -> Result<Option<ChatTemplate>> {
        let jinja = dir.join("chat_template.jinja");
        if jinja.exists() {
            let src = fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?;
            return ChatTemplate::new(&src, jinja.display().to_string()).map(Some);
        }
        let json = dir.join("chat_template.json");
        let (spec, origin) = if let Some(v) = read_json(&json)? {
            (v.get("chat_template").cloned(), json)
        } else {
            (cfg.get("chat_template").cloned(), cfg_path.to_path_buf())
        };
        let Some(spec) = spec.filter(|v| !v.is_null()) else {
            return Ok(None);
        };
        let spec: TemplateSpec = serde_json::from_value(spec)
            .map_err(|e| Error::invalid(&origin, format!("field `chat_template`: {e}")))?;
        let src = match spec {
            TemplateSpec::One(s) => s,
            TemplateSpec::Named(list) => {
                let names: Vec<&str> = list.iter().map(|t| t.name.as_str()).collect();
                let names = names.join(", ");
                list.into_iter().find(|t| t.name == "default").map(|t| t.template).ok_or_else(|| {
                    Error::invalid(&origin, format!("field `chat_template`: several templates ({names}) and none named `default`"))
                })?
            }
        };
        ChatTemplate::new(&src, origin.display().to_string()).map(Some)
    }

    fn collect_eos(&self, dir: &Path) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        let mut push = |id: u32| {
            if !ids.contains(&id) {
                ids.push(id);
            }
        };
        if let Some(id) = self
            .special("eos_token")
            .and_then(|t| self.tokenizer.token_to_id(t))
        {
            push(id);
        }
        for file in ["config.json", "generation_config.json"] {
            let v = read_json(&dir.join(file))?.and_then(|v| v.get("eos_token_id").cloned());
            match v {
                Some(Value::Number(n)) => n.as_u64().into_iter().for_each(|i| push(i as u32)),
                Some(Value::Array(a)) => a
                    .iter()
                    .filter_map(Value::as_u64)
                    .for_each(|i| push(i as u32)),
                _ => {}
            }
        }
        Ok(ids)
    }

    /// The wrapped `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.tokenizer
    }

    /// A special token's text by its `tokenizer_config.json` key (`"eos_token"`, `"pad_token"`, …).
    pub fn special(&self, key: &str) -> Option<&str> {
        self.specials
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The id of a token's text, if it is in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// Stop ids: the tokenizer's eos, then `config.json`'s and `generation_config.json`'s.
    pub fn eos_token_ids(&self) -> Vec<u32> {
        self.eos_ids.clone()
    }

    /// The padding id: `pad_token`, else the first stop id.
    pub fn pad_token_id(&self) -> Option<u32> {
        self.special("pad_token")
            .and_then(|t| self.token_to_id(t))
            .or_else(|| self.eos_ids.first().copied())
    }

    /// The chat template, if the folder has one.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.template.as_ref()
    }

    fn tok_err(&self, e: impl std::fmt::Display) -> Error {
        Error::Tokenizer {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }

    /// Encodes raw text as transformers' `tokenizer(text)` does (the post-processor may add BOS).
    pub fn encode_text(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .tokenizer
            .encode(text, true)
            .map_err(|e| self.tok_err(e))?
            .get_ids()
            .to_vec())
    }

    /// Encodes already-rendered text without adding special tokens (the template wrote them).
    pub fn encode_rendered(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .tokenizer
            .encode(text, false)
            .map_err(|e| self.tok_err(e))?
            .get_ids()
            .to_vec())
    }

    /// Decodes ids to text.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.tokenizer
            .decode(ids, skip_special_tokens)
            .map_err(|e| self.tok_err(e))
    }

    fn template(&self) -> Result<&ChatTemplate> {
        self.template.as_ref().ok_or_else(|| Error::Template {
            origin: self.path.display().to_string(),
            message: "the model folder has no chat template (chat_template.jinja or tokenizer_config.json)".into(),
        })
    }

    /// Renders a conversation with the chat template.
    pub fn render_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        self.render_chat_with(messages, add_generation_prompt, &Map::new())
            .map(|r| r.text)
    }

    /// Renders with extra template arguments (e.g. `{"enable_thinking": false}`).
    pub fn render_chat_with(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        template_kwargs: &Map<String, Value>,
    ) -> Result<Rendered> {
        self.template()?.render(
            messages,
            add_generation_prompt,
            &self.specials,
            template_kwargs,
        )
    }

    /// The prompt ids for generation: the conversation rendered with `add_generation_prompt`.
    pub fn encode_prompt(
        &self,
        messages: &[ChatMessage],
        template_kwargs: &Map<String, Value>,
    ) -> Result<Vec<u32>> {
        let r = self.render_chat_with(messages, true, template_kwargs)?;
        self.encode_rendered(&r.text)
    }

    /// Token ids and loss mask of a chat example in `format`. `max_len` truncates (as LESS's
    /// `max_seq_length`). `id` names the example in errors.
    pub fn encode_example(
        &self,
        example: &ChatExample,
        format: ChatFormat,
        max_len: Option<usize>,
        template_kwargs: &Map<String, Value>,
    ) -> Result<EncodedExample> {
        let id = example.id.clone().unwrap_or_else(|| "(no id)".into());
        if example.messages.is_empty() {
            return Err(Error::Example {
                id,
                message: "`messages` is empty".into(),
            });
        }
        let mut enc = match format {
            ChatFormat::ChatTemplate => {
                self.encode_chat_template(&id, &example.messages, template_kwargs)?
            }
            ChatFormat::Tulu => self.encode_tulu(&id, &example.messages, max_len)?,
        };
        if let Some(n) = max_len {
            enc.tokens.truncate(n);
            enc.loss_mask.truncate(n);
        }
        Ok(enc)
    }

    fn encode_chat_template(
        &self,
        id: &str,
        messages: &[ChatMessage],
        kwargs: &Map<String, Value>,
    ) -> Result<EncodedExample> {
        let rendered = self.render_chat_with(messages, false, kwargs)?;
        let spans = if self.template()?.has_generation_tags() {
            rendered.generation_spans.clone()
        } else {
            locate_assistant_spans(&rendered.text, messages, &self.special_texts).map_err(
                |message| Error::Example {
                    id: id.to_string(),
                    message,
                },
            )?
        };
        let enc = self
            .tokenizer
            .encode(rendered.text.as_str(), false)
            .map_err(|e| self.tok_err(e))?;
        let loss_mask = enc
            .get_offsets()
            .iter()
            .map(|&(s, e)| u8::from(spans.iter().any(|sp| s < sp.end && e > sp.start)))
            .collect();
        Ok(EncodedExample {
            tokens: enc.get_ids().to_vec(),
            loss_mask,
        })
    }

    fn encode_tulu(
        &self,
        id: &str,
        messages: &[ChatMessage],
        max_len: Option<usize>,
    ) -> Result<EncodedExample> {
        let eos = self.special("eos_token").ok_or_else(|| Error::Example {
            id: id.to_string(),
            message: "the Tulu format needs an eos_token in tokenizer_config.json".into(),
        })?;
        let cap = |n: usize| max_len.map_or(n, |m| n.min(m));
        let len = |text: &str| -> Result<usize> { Ok(cap(self.encode_text(text)?.len())) };
        let tokens = self.encode_text(&tulu_text(messages, eos))?;
        let n = cap(tokens.len());
        let mut loss_mask = vec![1u8; n];
        for (i, m) in messages.iter().enumerate() {
            if m.role == Role::Assistant {
                continue;
            }
            let start = if i == 0 {
                0
            } else {
                len(&tulu_text(&messages[..i], eos))?
            };
            let mut so_far = tulu_text(&messages[..=i], eos);
            if messages
                .get(i + 1)
                .is_some_and(|next| next.role == Role::Assistant)
            {
                so_far.push_str("<|assistant|>\n");
            }
            let end = len(&so_far)?;
            loss_mask[start.min(n)..end.min(n)].fill(0);
            if max_len.is_some_and(|m| end >= m) {
                break;
            }
        }
        Ok(EncodedExample { tokens, loss_mask })
    }
}

/// The Tulu text of LESS's `concat_messages` (each content stripped; the whole not stripped).
pub fn tulu_text(messages: &[ChatMessage], eos: &str) -> String {
    let mut out = String::new();
    for m in messages {
        let c = py_strip(&m.content);
        match m.role {
            Role::System => out.extend(["<|system|>\n", c, "\n"]),
            Role::User => out.extend(["<|user|>\n", c, "\n"]),
            Role::Assistant => out.extend(["<|assistant|>\n", c, eos, "\n"]),
        }
    }
    out
}

/// Python's `str.strip()` with no argument: Unicode whitespace (plus the ASCII separators
/// `\x1c`–`\x1f`, which Python also strips).
fn py_strip(s: &str) -> &str {
    s.trim_matches(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c))
}

/// Finds each assistant message's text in the rendered conversation, in order, and extends it over
/// the special token that immediately follows (the end-of-turn marker). Messages are searched from
/// where the previous one ended, so text repeated from an earlier message is not mistaken for it.
fn locate_assistant_spans(
    text: &str,
    messages: &[ChatMessage],
    specials: &[String],
) -> std::result::Result<Vec<Range<usize>>, String> {
    let mut cursor = 0;
    let mut spans = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        let content = m.content.as_str();
        let mut candidates = vec![content, content.trim()];
        let answer = content.rsplit_once("</think>").map(|(_, a)| a);
        if let Some(a) = answer {
            candidates.extend([a.trim_start_matches('\n'), a.trim()]);
        }
        let found = candidates.iter().filter(|c| !c.is_empty()).find_map(|c| {
            text[cursor..]
                .find(c)
                .map(|p| (cursor + p, cursor + p + c.len()))
        });
        let Some((mut start, mut end)) = found else {
            if m.role == Role::Assistant && !content.trim().is_empty() {
                return Err(format!(
                    "assistant message {i} is not in the text the chat template rendered (the template \
                     rewrites it); mark assistant text with {{% generation %}} blocks in the template"
                ));
            }
            continue;
        };
        if m.role == Role::Assistant {
            // A `<think>` block the template writes right before the answer (Qwen3 re-renders the
            // reasoning, or an empty block, for turns after the last user query) is assistant
            // output too.
            let before = &text[cursor..start];
            if before.trim_end().ends_with("</think>")
                && let Some(p) = before.rfind("<think>")
            {
                start = cursor + p;
            }
            // One special token: the end-of-turn marker. The next one (Llama's `<|start_header_id|>`)
            // already opens the following turn.
            if let Some(s) = specials
                .iter()
                .find(|s| text[end..].starts_with(s.as_str()))
            {
                end += s.len();
            }
            spans.push(start..end);
        }
        cursor = end;
    }
    Ok(spans)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tulu_text_matches_less() {
        let m = [
            ChatMessage::system(" sys "),
            ChatMessage::user("\nq\n"),
            ChatMessage::assistant(" a "),
        ];
        assert_eq!(
            tulu_text(&m, "</s>"),
            "<|system|>\nsys\n<|user|>\nq\n<|assistant|>\na</s>\n"
        );
    }

    #[test]
    fn locate_skips_repeated_text_and_takes_end_token() {
        let text = "<u>the answer</u><a>the answer<end>\n";
        let m = [
            ChatMessage::user("the answer"),
            ChatMessage::assistant("the answer"),
        ];
        let spans = locate_assistant_spans(text, &m, &["<end>".to_string()]).unwrap();
        assert_eq!(&text[spans[0].clone()], "the answer<end>");
        assert_eq!(spans[0].start, 20);
    }
}
