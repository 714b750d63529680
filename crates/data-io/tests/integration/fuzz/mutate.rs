//! Mutations shared by the fuzz properties: byte edits with a dictionary of tokens that parsers
//! find interesting, and structural edits of JSON values (replace, remove or add a field at a
//! random depth). optimsyn-serve's test binary includes this file by path for its request fuzzing.

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::{Index, select};
use serde_json::{Map, Value};

/// Byte sequences worth splicing into JSON, JSONL and templates: syntax, numbers at and beyond
/// the limits of u64/i64/f64, bad escapes and bad UTF-8, line ends, deep nesting, the private-use
/// characters the template renderer reserves, and Jinja delimiters.
pub const TOKENS: &[&[u8]] = &[
    b"\"",
    b"{",
    b"}",
    b"[",
    b"]",
    b":",
    b",",
    b"null",
    b"true",
    b"-",
    b"0",
    b"-0",
    b"1e400",
    b"-1e400",
    b"1e-400",
    b"18446744073709551615",
    b"18446744073709551616",
    b"-9223372036854775809",
    b"9007199254740993",
    b"1.5",
    b"\"\\ud800\"",
    b"\\",
    b"\\u0000",
    b"\n",
    b"\r\n",
    b"\r",
    b"\xff\xfe",
    b"\xc3",
    b"\xf4\x8f\xbf\xbc",
    b"\xf4\x8f\xbf\xbd",
    b"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
    b"{{",
    b"}}",
    b"{%",
    b"%}",
    b"{#",
    b"#}",
    b"{%- generation -%}",
    b"{% endgeneration %}",
];

/// One edit of a byte string. Positions are [`Index`]es, so an edit applies to any length.
#[derive(Debug, Clone)]
pub enum ByteOp {
    /// Overwrite one byte.
    Set(Index, u8),
    /// Flip one bit.
    Flip(Index, u8),
    /// Insert bytes.
    Insert(Index, Vec<u8>),
    /// Insert a dictionary token.
    Token(Index, &'static [u8]),
    /// Remove up to this many bytes.
    Delete(Index, usize),
    /// Cut the rest off.
    Truncate(Index),
    /// Repeat a slice (up to this many bytes) in place.
    Duplicate(Index, usize),
}

fn byte_op() -> impl Strategy<Value = ByteOp> {
    prop_oneof![
        (any::<Index>(), any::<u8>()).prop_map(|(i, b)| ByteOp::Set(i, b)),
        (any::<Index>(), 0u8..8).prop_map(|(i, b)| ByteOp::Flip(i, b)),
        (any::<Index>(), vec(any::<u8>(), 1..8)).prop_map(|(i, b)| ByteOp::Insert(i, b)),
        (any::<Index>(), select(TOKENS)).prop_map(|(i, t)| ByteOp::Token(i, t)),
        (any::<Index>(), 1usize..16).prop_map(|(i, n)| ByteOp::Delete(i, n)),
        any::<Index>().prop_map(ByteOp::Truncate),
        (any::<Index>(), 1usize..64).prop_map(|(i, n)| ByteOp::Duplicate(i, n)),
    ]
}

/// One to three byte edits.
pub fn byte_ops() -> impl Strategy<Value = Vec<ByteOp>> {
    vec(byte_op(), 1..4)
}

/// Applies `ops` in order.
pub fn apply_bytes(mut b: Vec<u8>, ops: &[ByteOp]) -> Vec<u8> {
    for op in ops {
        let at = |i: &Index, len: usize| i.index(len + 1).min(len);
        match op {
            ByteOp::Set(i, v) if !b.is_empty() => {
                let k = i.index(b.len());
                b[k] = *v;
            }
            ByteOp::Flip(i, bit) if !b.is_empty() => {
                let k = i.index(b.len());
                b[k] ^= 1 << bit;
            }
            ByteOp::Insert(i, bytes) => {
                let k = at(i, b.len());
                b.splice(k..k, bytes.iter().copied());
            }
            ByteOp::Token(i, t) => {
                let k = at(i, b.len());
                b.splice(k..k, t.iter().copied());
            }
            ByteOp::Delete(i, n) if !b.is_empty() => {
                let k = i.index(b.len());
                let end = (k + n).min(b.len());
                b.drain(k..end);
            }
            ByteOp::Truncate(i) => {
                let k = at(i, b.len());
                b.truncate(k);
            }
            ByteOp::Duplicate(i, n) if !b.is_empty() => {
                let k = i.index(b.len());
                let end = (k + n).min(b.len());
                let copy = b[k..end].to_vec();
                b.splice(end..end, copy);
            }
            _ => {}
        }
    }
    b
}

/// Short text with the characters parsers trip on, or any text.
pub fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z_]{0,8}",
        "[\\n\\r\\t \"\\\\{}%#<>|\u{0}\u{10FFFC}\u{10FFFD}é]{0,8}",
        any::<String>(),
    ]
}

/// JSON numbers at the edges: small and plausible, any i64/u64/f64, and the limits.
pub fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        (-3i64..70).prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |f| {
            serde_json::Number::from_f64(f).map(Value::Number)
        }),
        select(vec![
            0.0,
            -0.0,
            0.5,
            2.0,
            1e16,
            1e308,
            -1e308,
            5e-324,
            4_294_967_296.0,
            18_446_744_073_709_551_616.0
        ])
        .prop_map(Value::from),
        Just(Value::from(u64::MAX)),
        Just(Value::from(i64::MIN)),
        Just(Value::from(u64::from(u32::MAX) + 1)),
    ]
}

/// Any JSON value up to a few levels deep, with object keys drawn from `keys` or arbitrary.
pub fn json_value(keys: &'static [&'static str]) -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        number(),
        text().prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, move |inner| {
        prop_oneof![
            vec(inner.clone(), 0..4).prop_map(Value::Array),
            vec((key(keys), inner), 0..4)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

fn key(keys: &'static [&'static str]) -> impl Strategy<Value = String> {
    prop_oneof![
        3 => select(keys).prop_map(str::to_string),
        1 => text(),
    ]
}

/// What a JSON edit does at the node it reaches.
#[derive(Debug, Clone)]
pub enum JsonAction {
    /// Replace the node.
    Replace(Value),
    /// Remove one of its children (a field of an object, an element of an array).
    RemoveChild(Index),
    /// Add a field (to an object) or an element (to an array).
    Add(String, Value),
}

/// A JSON edit: walk down (each step picks a child), then act.
#[derive(Debug, Clone)]
pub struct JsonOp {
    walk: Vec<Index>,
    action: JsonAction,
}

/// One to three structural edits whose new keys and values favour `keys`.
pub fn json_ops(keys: &'static [&'static str]) -> impl Strategy<Value = Vec<JsonOp>> {
    let action = prop_oneof![
        json_value(keys).prop_map(JsonAction::Replace),
        number().prop_map(JsonAction::Replace),
        any::<Index>().prop_map(JsonAction::RemoveChild),
        (key(keys), json_value(keys)).prop_map(|(k, v)| JsonAction::Add(k, v)),
    ];
    vec(
        (vec(any::<Index>(), 0..4), action).prop_map(|(walk, action)| JsonOp { walk, action }),
        1..4,
    )
}

/// Applies `ops` in order.
pub fn apply_json(v: &mut Value, ops: &[JsonOp]) {
    for op in ops {
        apply_at(v, &op.walk, &op.action);
    }
}

fn apply_at(v: &mut Value, walk: &[Index], action: &JsonAction) {
    if let Some((step, rest)) = walk.split_first() {
        let child = match v {
            Value::Object(m) if !m.is_empty() => {
                let k = step.index(m.len());
                m.values_mut().nth(k)
            }
            Value::Array(a) if !a.is_empty() => {
                let k = step.index(a.len());
                a.get_mut(k)
            }
            _ => None,
        };
        if let Some(c) = child {
            return apply_at(c, rest, action);
        }
    }
    match (action, v) {
        (JsonAction::Replace(n), v) => *v = n.clone(),
        (JsonAction::RemoveChild(i), Value::Object(m)) if !m.is_empty() => {
            let k = i.index(m.len());
            if let Some(key) = m.keys().nth(k).cloned() {
                m.remove(&key);
            }
        }
        (JsonAction::RemoveChild(i), Value::Array(a)) if !a.is_empty() => {
            a.remove(i.index(a.len()));
        }
        (JsonAction::Add(k, n), Value::Object(m)) => {
            m.insert(k.clone(), n.clone());
        }
        (JsonAction::Add(_, n), Value::Array(a)) => a.push(n.clone()),
        _ => {}
    }
}

/// A valid JSON text mutated: structural edits, then (sometimes) byte edits of the text.
pub fn mutated_json(base: Value, keys: &'static [&'static str]) -> impl Strategy<Value = Vec<u8>> {
    (
        json_ops(keys),
        proptest::option::weighted(0.4, byte_ops()),
        any::<bool>(),
    )
        .prop_map(move |(ops, bytes, pretty)| {
            let mut v = base.clone();
            apply_json(&mut v, &ops);
            let text = if pretty {
                serde_json::to_vec_pretty(&v)
            } else {
                serde_json::to_vec(&v)
            }
            .expect("a Value serializes");
            match bytes {
                Some(b) => apply_bytes(text, &b),
                None => text,
            }
        })
}
