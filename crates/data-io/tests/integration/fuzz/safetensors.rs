//! `SafetensorsHeader::read` (crates/data-io/src/hf.rs) on arbitrary bytes, on valid files with a
//! mutated header length, header JSON, offsets or data length, and on headers declaring tensors
//! far larger than the file.

use std::path::Path;

use optimsyn_data_io::SafetensorsHeader;
use optimsyn_data_io::hf::dtype_size;
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;
use serde_json::{Value, json};

use super::mutate::{ByteOp, JsonOp, apply_bytes, apply_json, byte_ops, json_ops, json_value};

const KEYS: &[&str] = &[
    "dtype",
    "shape",
    "data_offsets",
    "__metadata__",
    "format",
    "a",
    "b",
    "F32",
    "BF16",
    "U8",
    "F4",
    "C64",
    "Q4",
];

const DTYPES: &[&str] = &["F32", "BF16", "F16", "I64", "U8", "BOOL", "F64", "I32"];

/// A tensor of a valid file: name, dtype, shape.
type Tensor = (String, &'static str, Vec<usize>);

fn tensors() -> impl Strategy<Value = Vec<Tensor>> {
    vec(
        (
            prop_oneof![
                select(&["a", "b", "model.norm.weight"][..]).prop_map(str::to_string),
                "[a-z.]{1,12}",
                any::<String>()
            ],
            select(DTYPES),
            vec(0usize..5, 0..3),
        ),
        0..4,
    )
}

/// The header of a valid file holding `tensors` back to back, and its data length.
fn header(tensors: &[Tensor], metadata: bool) -> (Value, usize) {
    let mut h = serde_json::Map::new();
    let mut offset = 0;
    for (name, dtype, shape) in tensors {
        if name == "__metadata__" || h.contains_key(name) {
            continue;
        }
        let n = shape.iter().product::<usize>() * dtype_size(dtype).expect("a known dtype");
        h.insert(
            name.clone(),
            json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}),
        );
        offset += n;
    }
    if metadata {
        h.insert("__metadata__".into(), json!({"format": "pt"}));
    }
    (Value::Object(h), offset)
}

fn file(header_len: u64, header: &[u8], data_len: usize) -> Vec<u8> {
    let mut bytes = header_len.to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend((0..data_len).map(|i| i as u8));
    bytes
}

/// Reads `bytes` as a safetensors file: never a panic; an error names the file; an accepted header
/// describes tensors that fit their byte ranges and end exactly at the end of the file.
fn check(bytes: &[u8]) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let path = dir.path().join("model.safetensors");
    std::fs::write(&path, bytes).expect("write the file");
    check_file(&path, bytes.len())
}

fn check_file(path: &Path, len: usize) -> Result<(), TestCaseError> {
    match SafetensorsHeader::read(path) {
        Err(e) => {
            let msg = e.to_string();
            prop_assert!(msg.contains("model.safetensors"), "{msg}");
        }
        Ok(h) => {
            let mut end = 0;
            for (name, t) in &h.tensors {
                let size = dtype_size(&t.dtype);
                prop_assert!(size.is_some(), "`{name}`: dtype {}", t.dtype);
                let n = t
                    .shape
                    .iter()
                    .try_fold(size.unwrap_or(0), |a, &d| a.checked_mul(d));
                prop_assert_eq!(
                    t.data_offsets.1.checked_sub(t.data_offsets.0),
                    n,
                    "`{}`",
                    name
                );
                end = end.max(t.data_offsets.1);
            }
            prop_assert_eq!(h.data_start + end, len);
        }
    }
    Ok(())
}

/// How a valid file is damaged.
#[derive(Debug, Clone)]
enum Damage {
    /// None: the file must be accepted.
    None,
    /// The header length replaced.
    HeaderLen(u64),
    /// The header length off by a little.
    HeaderLenBy(i64),
    /// The header JSON edited (the length still matches it).
    Json(Vec<JsonOp>),
    /// A tensor's end offset replaced (the shape no longer matches, or it runs past the file).
    End(proptest::sample::Index, u64),
    /// The data section cut or extended.
    DataBy(i64),
    /// Byte edits anywhere in the file.
    Bytes(Vec<ByteOp>),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        1 => Just(Damage::None),
        1 => any::<u64>().prop_map(Damage::HeaderLen),
        1 => (-16i64..16).prop_map(Damage::HeaderLenBy),
        3 => json_ops(KEYS).prop_map(Damage::Json),
        2 => (any::<proptest::sample::Index>(), prop_oneof![any::<u64>(), 0u64..64, Just(u64::MAX)])
            .prop_map(|(i, e)| Damage::End(i, e)),
        1 => (-16i64..16).prop_map(Damage::DataBy),
        3 => byte_ops().prop_map(Damage::Bytes),
    ]
}

/// Sizes of 9 to 12 tensors (each under 2^61 bytes, so that shape × dtype does not overflow) that
/// tile the data section up to `u64::MAX - k` for a small `k`.
fn tiling_up_to_the_limit() -> impl Strategy<Value = Vec<u64>> {
    (0u64..4096, 9u64..=12, vec(0u64..(1 << 40), 12)).prop_map(|(k, m, jitter)| {
        let target = u64::MAX - k;
        let base = target / m;
        let mut sizes: Vec<u64> = jitter[..m as usize - 1].iter().map(|j| base - j).collect();
        sizes.push(target - sizes.iter().sum::<u64>());
        sizes
    })
}

proptest! {
    #![proptest_config(super::cases(64))]

    /// Arbitrary bytes, bytes behind a plausible header length, and arbitrary JSON behind an exact
    /// one.
    #[test]
    fn arbitrary_bytes_as_safetensors(
        bytes in prop_oneof![
            vec(any::<u8>(), 0..64),
            (0u64..256, vec(any::<u8>(), 0..256)).prop_map(|(n, rest)| file(n, &rest, 0)),
            (json_value(KEYS), 0usize..32).prop_map(|(v, data)| {
                let h = serde_json::to_vec(&v).expect("a Value serializes");
                file(h.len() as u64, &h, data)
            }),
        ],
    ) {
        check(&bytes)?;
    }

    #[test]
    fn mutated_valid_safetensors(
        tensors in tensors(),
        metadata in any::<bool>(),
        damage in damage(),
    ) {
        let (mut h, data_len) = header(&tensors, metadata);
        let bytes = match damage {
            Damage::None => {
                let text = serde_json::to_vec(&h).expect("a Value serializes");
                let bytes = file(text.len() as u64, &text, data_len);
                let dir = tempfile::tempdir().expect("a temporary folder");
                let path = dir.path().join("model.safetensors");
                std::fs::write(&path, &bytes).expect("write the file");
                let read = SafetensorsHeader::read(&path);
                prop_assert!(read.is_ok(), "{:?}", read.err());
                bytes
            }
            Damage::HeaderLen(n) => {
                let text = serde_json::to_vec(&h).expect("a Value serializes");
                file(n, &text, data_len)
            }
            Damage::HeaderLenBy(d) => {
                let text = serde_json::to_vec(&h).expect("a Value serializes");
                file((text.len() as u64).wrapping_add_signed(d), &text, data_len)
            }
            Damage::Json(ops) => {
                apply_json(&mut h, &ops);
                let text = serde_json::to_vec(&h).expect("a Value serializes");
                file(text.len() as u64, &text, data_len)
            }
            Damage::End(i, end) => {
                let tensor = h.as_object_mut().and_then(|m| {
                    let n = m.len();
                    (n > 0).then(|| m.values_mut().nth(i.index(n))).flatten()
                });
                if let Some(e) = tensor.and_then(|t| t.get_mut("data_offsets")?.get_mut(1)) {
                    *e = json!(end);
                }
                let text = serde_json::to_vec(&h).expect("a Value serializes");
                file(text.len() as u64, &text, data_len)
            }
            Damage::DataBy(d) => {
                let text = serde_json::to_vec(&h).expect("a Value serializes");
                let data = (data_len as i64 + d).max(0) as usize;
                file(text.len() as u64, &text, data)
            }
            Damage::Bytes(ops) => {
                let text = serde_json::to_vec(&h).expect("a Value serializes");
                apply_bytes(file(text.len() as u64, &text, data_len), &ops)
            }
        };
        check(&bytes)?;
    }

    /// Tensors whose shapes and offsets agree but declare petabytes to exabytes, behind a file of
    /// a few bytes: a download cut short, or a crafted header; some end within a few KiB of
    /// `usize::MAX`.
    #[test]
    fn huge_declared_tensors(
        sizes in prop_oneof![
            vec(prop_oneof![(1u64 << 56)..(1u64 << 61), 1u64..(1 << 20)], 1..12),
            tiling_up_to_the_limit(),
        ],
        two_dims in any::<bool>(),
        data_len in 0usize..16,
    ) {
        let mut h = serde_json::Map::new();
        let mut offset = 0u64;
        for (i, &n) in sizes.iter().enumerate() {
            let Some(end) = offset.checked_add(n) else { break };
            let shape = if two_dims && n % 2 == 0 { json!([2, n / 2]) } else { json!([n]) };
            h.insert(
                format!("t{i}"),
                json!({"dtype": "U8", "shape": shape, "data_offsets": [offset, end]}),
            );
            offset = end;
        }
        let text = serde_json::to_vec(&h).expect("a Value serializes");
        let bytes = file(text.len() as u64, &text, data_len);
        let dir = tempfile::tempdir().expect("a temporary folder");
        let path = dir.path().join("model.safetensors");
        std::fs::write(&path, &bytes).expect("write the file");
        let e = SafetensorsHeader::read(&path);
        prop_assert!(e.is_err(), "a few bytes cannot hold {offset} bytes of tensors");
        check_file(&path, bytes.len())?;
    }
}

/// Found by reading safetensors 0.8's `read_metadata` while writing `huge_declared_tensors`: it
/// adds the last tensor's end offset to the header length unchecked, so eight tensors that tile
/// 2^64 - 8 bytes made a debug build panic with "attempt to add with overflow".
#[test]
fn offsets_summing_past_usize_max_are_an_error() {
    let n: u64 = (1 << 61) - 1;
    let mut h = serde_json::Map::new();
    for i in 0..8u64 {
        h.insert(
            format!("t{i}"),
            json!({"dtype": "U8", "shape": [n], "data_offsets": [i * n, (i + 1) * n]}),
        );
    }
    let text = serde_json::to_vec(&h).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    std::fs::write(&path, file(text.len() as u64, &text, 0)).unwrap();
    let e = SafetensorsHeader::read(&path).unwrap_err().to_string();
    assert!(
        e.contains("model.safetensors") && e.contains("`t7`") && e.contains("truncated"),
        "{e}"
    );
}
