//! Hugging Face model folders: `config.json`, `generation_config.json`, and where the weights are.
//!
//! Configs are read the way transformers reads them: fields it defaults are defaulted to the same
//! values per architecture, both the `rope_theta` / `rope_scaling` form and the transformers-5
//! `rope_parameters` form are accepted, and `eos_token_id` may be an integer or a list.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use crate::error::{Error, Result};

/// The decoder architectures optimsyn implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Architecture {
    /// `model_type: "qwen2"` (bias on q/k/v, none on o).
    Qwen2,
    /// `model_type: "qwen3"` (per-head RMSNorm on q and k before RoPE).
    Qwen3,
    /// `model_type: "llama"` (also Llama 3.x with `llama3` RoPE scaling).
    Llama,
}

impl Architecture {
    /// The `model_type` string of `config.json`.
    pub fn model_type(self) -> &'static str {
        match self {
            Architecture::Qwen2 => "qwen2",
            Architecture::Qwen3 => "qwen3",
            Architecture::Llama => "llama",
        }
    }
}

/// RoPE frequency scaling beyond the plain `rope_theta` schedule.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// `rope_type: "linear"`: positions divided by `factor`.
    Linear {
        /// The position divisor.
        factor: f64,
    },
    /// `rope_type: "llama3"` (Llama 3.1+): low frequencies divided by `factor`, smooth blend between.
    Llama3 {
        /// Divisor of the low frequencies.
        factor: f64,
        /// Wavelength boundary (as a fraction of the original context) of the low band.
        low_freq_factor: f64,
        /// Wavelength boundary of the high band (kept unscaled).
        high_freq_factor: f64,
        /// Context length the model was pretrained with.
        original_max_position_embeddings: usize,
    },
}

/// A decoder-only causal LM's shape and hyper-parameters, normalized across architectures.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Which decoder this is.
    pub architecture: Architecture,
    /// Vocabulary size (rows of the embedding matrix).
    pub vocab_size: usize,
    /// Residual stream width.
    pub hidden_size: usize,
    /// MLP inner width.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA when fewer than query heads).
    pub num_key_value_heads: usize,
    /// Per-head width; may differ from `hidden_size / num_attention_heads` (Qwen3).
    pub head_dim: usize,
    /// Longest context the model was configured for.
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// Optional RoPE scaling.
    pub rope_scaling: Option<RopeScaling>,
    /// Output projection shares the input embedding matrix (no `lm_head.weight` in the file).
    pub tie_word_embeddings: bool,
    /// q/k/v projections have a bias.
    pub qkv_bias: bool,
    /// The attention output projection has a bias.
    pub o_bias: bool,
    /// MLP projections have biases (Llama `mlp_bias`).
    pub mlp_bias: bool,
    /// MLP activation (`silu` for every supported architecture).
    pub hidden_act: String,
    /// Beginning-of-sequence id, if any.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence ids (config.json's `eos_token_id`, integer or list).
    pub eos_token_ids: Vec<u32>,
    /// Padding id, if any.
    pub pad_token_id: Option<u32>,
    /// The dtype the checkpoint was saved in (`torch_dtype` or transformers-5 `dtype`), if stated.
    pub dtype: Option<String>,
}

/// Accepts `2`, `[2, 3]` or `null`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

fn ids(v: Option<OneOrMany>) -> Vec<u32> {
    match v {
        None => Vec::new(),
        Some(OneOrMany::One(i)) => vec![i],
        Some(OneOrMany::Many(v)) => v,
    }
}

#[derive(Debug, Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    #[serde(default)]
    architectures: Vec<String>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    max_position_embeddings: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    hidden_act: Option<String>,
    bos_token_id: Option<OneOrMany>,
    eos_token_id: Option<OneOrMany>,
    pad_token_id: Option<OneOrMany>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
    use_sliding_window: Option<bool>,
}

/// transformers' per-architecture defaults for fields a config.json may omit.
struct Defaults {
    vocab: usize,
    hidden: usize,
    inter: usize,
    layers: usize,
    heads: usize,
    max_pos: usize,
    rope_theta: f64,
}

impl ModelConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_str(&text).map_err(|m| Error::invalid(path, m))
    }

    /// Parses a `config.json` text; the error names the offending field.
    pub fn from_json_str(text: &str) -> std::result::Result<Self, String> {
        let de = &mut serde_json::Deserializer::from_str(text);
        let raw: RawConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let p = e.path().to_string();
            if p == "." {
                e.inner().to_string()
            } else {
                format!("field `{p}`: {}", e.inner())
            }
        })?;
        Self::from_raw(raw)
    }

    fn from_raw(raw: RawConfig) -> std::result::Result<Self, String> {
        let model_type = match (&raw.model_type, raw.architectures.first()) {
            (Some(t), _) => t.clone(),
            (None, Some(a)) => a.trim_end_matches("ForCausalLM").to_lowercase(),
            (None, None) => return Err("field `model_type` is missing".into()),
        };
        let architecture = match model_type.as_str() {
            "qwen2" => Architecture::Qwen2,
            "qwen3" => Architecture::Qwen3,
            "llama" => Architecture::Llama,
            other => {
                return Err(format!(
                    "field `model_type`: unsupported architecture `{other}` (supported: qwen2, qwen3, llama)"
                ));
            }
        };
        let d = match architecture {
            Architecture::Llama => Defaults {
                vocab: 32000,
                hidden: 4096,
                inter: 11008,
                layers: 32,
                heads: 32,
                max_pos: 2048,
                rope_theta: 10000.0,
            },
            Architecture::Qwen2 | Architecture::Qwen3 => Defaults {
                vocab: 151936,
                hidden: 4096,
                inter: 22016,
                layers: 32,
                heads: 32,
                max_pos: 32768,
                rope_theta: 10000.0,
            },
        };
        let hidden_size = raw.hidden_size.unwrap_or(d.hidden);
        let num_attention_heads = raw.num_attention_heads.unwrap_or(d.heads);
        if num_attention_heads == 0 {
            return Err("field `num_attention_heads` must be positive".into());
        }
        let num_key_value_heads = match (architecture, raw.num_key_value_heads) {
            (_, Some(n)) => n,
            // Qwen2/Qwen3 configs default kv heads to 32, not to the query head count.
            (Architecture::Qwen2 | Architecture::Qwen3, None) => 32,
            (Architecture::Llama, None) => num_attention_heads,
        };
        if num_key_value_heads == 0 || !num_attention_heads.is_multiple_of(num_key_value_heads) {
            return Err(format!(
                "field `num_key_value_heads`: {num_key_value_heads} does not divide num_attention_heads {num_attention_heads}"
            ));
        }
        let head_dim = match (architecture, raw.head_dim) {
            (_, Some(h)) => h,
            (Architecture::Qwen3, None) => 128,
            _ => {
                if !hidden_size.is_multiple_of(num_attention_heads) {
                    return Err(format!(
                        "field `head_dim` is missing and hidden_size {hidden_size} is not a multiple of num_attention_heads {num_attention_heads}"
                    ));
                }
                hidden_size / num_attention_heads
            }
        };
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(format!(
                "field `head_dim`: RoPE needs an even, positive head_dim, got {head_dim}"
            ));
        }
        if raw.use_sliding_window == Some(true) {
            return Err(
                "field `use_sliding_window`: sliding-window attention is not supported".into(),
            );
        }
        let (rope_theta, rope_scaling) = rope(&raw, d.rope_theta)?;
        let attention_bias = raw.attention_bias.unwrap_or(false);
        let (qkv_bias, o_bias) = match architecture {
            Architecture::Qwen2 => (true, false),
            _ => (attention_bias, attention_bias),
        };
        let first = |v: Option<OneOrMany>| ids(v).first().copied();
        Ok(ModelConfig {
            architecture,
            vocab_size: raw.vocab_size.unwrap_or(d.vocab),
            hidden_size,
            intermediate_size: raw.intermediate_size.unwrap_or(d.inter),
            num_hidden_layers: raw.num_hidden_layers.unwrap_or(d.layers),
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(d.max_pos),
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            qkv_bias,
            o_bias,
            mlp_bias: architecture == Architecture::Llama && raw.mlp_bias.unwrap_or(false),
            hidden_act: raw.hidden_act.unwrap_or_else(|| "silu".into()),
            bos_token_id: first(raw.bos_token_id),
            eos_token_ids: ids(raw.eos_token_id),
            pad_token_id: first(raw.pad_token_id),
            dtype: raw.dtype.or(raw.torch_dtype),
        })
    }
}

impl ModelConfig {
    /// The `config.json` transformers writes for this configuration (legacy `rope_theta` /
    /// `rope_scaling` keys, which transformers 4 and 5 both read), so a model saved from it loads
    /// with `AutoModelForCausalLM.from_pretrained`.
    pub fn to_hf_json(&self) -> Value {
        let class = match self.architecture {
            Architecture::Qwen2 => "Qwen2ForCausalLM",
            Architecture::Qwen3 => "Qwen3ForCausalLM",
            Architecture::Llama => "LlamaForCausalLM",
        };
        let rope_scaling = match &self.rope_scaling {
            None => Value::Null,
            Some(RopeScaling::Linear { factor }) => {
                serde_json::json!({"rope_type": "linear", "factor": factor})
            }
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                serde_json::json!({"rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                    "high_freq_factor": high_freq_factor,
                    "original_max_position_embeddings": original_max_position_embeddings})
            }
        };
        let eos = match self.eos_token_ids.as_slice() {
            [] => Value::Null,
            [one] => Value::from(*one),
            many => Value::from(many.to_vec()),
        };
        let mut v = serde_json::json!({
            "architectures": [class],
            "model_type": self.architecture.model_type(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": self.hidden_act,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
            "initializer_range": 0.02,
            "use_cache": true,
            "dtype": self.dtype.clone().unwrap_or_else(|| "float32".into()),
        });
        if let Some(obj) = v.as_object_mut() {
            match self.architecture {
                Architecture::Qwen2 => {
                    obj.insert("use_sliding_window".into(), false.into());
                }
                Architecture::Qwen3 => {
                    obj.insert("attention_bias".into(), self.qkv_bias.into());
                    obj.insert("use_sliding_window".into(), false.into());
                }
                Architecture::Llama => {
                    obj.insert("attention_bias".into(), self.qkv_bias.into());
                    obj.insert("mlp_bias".into(), self.mlp_bias.into());
                }
            }
        }
        v
    }
}

fn num(v: &Value, key: &str, field: &str) -> std::result::Result<f64, String> {
    v.get(key)
        .and_then(Value::as_f64)
        .ok_or_else(|| format!("field `{field}.{key}` is missing or not a number"))
}

fn rope(
    raw: &RawConfig,
    default_theta: f64,
) -> std::result::Result<(f64, Option<RopeScaling>), String> {
    // transformers 5 moved both the base and the scaling into `rope_parameters`.
    let (params, field) = match (&raw.rope_parameters, &raw.rope_scaling) {
        (Some(p), _) if !p.is_null() => (Some(p), "rope_parameters"),
        (_, Some(s)) if !s.is_null() => (Some(s), "rope_scaling"),
        _ => (None, ""),
    };
    let theta = params
        .and_then(|p| p.get("rope_theta"))
        .and_then(Value::as_f64)
        .or(raw.rope_theta)
        .unwrap_or(default_theta);
    let Some(p) = params else {
        return Ok((theta, None));
    };
    let kind = p
        .get("rope_type")
        .or_else(|| p.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let scaling = match kind {
        "default" => None,
        "linear" => Some(RopeScaling::Linear {
            factor: num(p, "factor", field)?,
        }),
        "llama3" => Some(RopeScaling::Llama3 {
            factor: num(p, "factor", field)?,
            low_freq_factor: num(p, "low_freq_factor", field)?,
            high_freq_factor: num(p, "high_freq_factor", field)?,
            original_max_position_embeddings: num(p, "original_max_position_embeddings", field)?
                as usize,
        }),
        other => {
            return Err(format!(
                "field `{field}.rope_type`: unsupported RoPE scaling `{other}` (supported: default, linear, llama3)"
            ));
        }
    };
    Ok((theta, scaling))
}

/// `generation_config.json`: the sampling defaults and stop ids a checkpoint ships with.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationConfig {
    /// Stop ids (integer or list in the file).
    pub eos_token_ids: Vec<u32>,
    /// Beginning-of-sequence id.
    pub bos_token_id: Option<u32>,
    /// Padding id.
    pub pad_token_id: Option<u32>,
    /// Whether the checkpoint samples by default.
    pub do_sample: Option<bool>,
    /// Default temperature.
    pub temperature: Option<f64>,
    /// Default nucleus mass.
    pub top_p: Option<f64>,
    /// Default top-k.
    pub top_k: Option<usize>,
    /// Default generation budget.
    pub max_new_tokens: Option<usize>,
}

#[derive(Deserialize)]
struct RawGeneration {
    eos_token_id: Option<OneOrMany>,
    bos_token_id: Option<OneOrMany>,
    pad_token_id: Option<OneOrMany>,
    do_sample: Option<bool>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<usize>,
    max_new_tokens: Option<usize>,
}

impl GenerationConfig {
    /// Reads `generation_config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let de = &mut serde_json::Deserializer::from_str(&text);
        let raw: RawGeneration = serde_path_to_error::deserialize(de)
            .map_err(|e| Error::invalid(path, format!("field `{}`: {}", e.path(), e.inner())))?;
        Ok(GenerationConfig {
            eos_token_ids: ids(raw.eos_token_id),
            bos_token_id: ids(raw.bos_token_id).first().copied(),
            pad_token_id: ids(raw.pad_token_id).first().copied(),
            do_sample: raw.do_sample,
            temperature: raw.temperature,
            top_p: raw.top_p,
            top_k: raw.top_k,
            max_new_tokens: raw.max_new_tokens,
        })
    }
}

/// One tensor's entry in a safetensors header.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct TensorInfo {
    /// Safetensors dtype name (`F32`, `BF16`, `F16`, …).
    pub dtype: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Byte range within the data section.
    pub data_offsets: (usize, usize),
}

/// The header of one `.safetensors` file, read without touching the tensor data.
#[derive(Debug, Clone, PartialEq)]
pub struct SafetensorsHeader {
    /// Tensors by name.
    pub tensors: BTreeMap<String, TensorInfo>,
    /// The free-form `__metadata__` map.
    pub metadata: BTreeMap<String, String>,
    /// Byte offset of the data section within the file.
    pub data_start: usize,
}

impl SafetensorsHeader {
    /// Reads and checks a safetensors header with the `safetensors` crate's own reader on a memory
    /// map of the file, so its checks apply: header size, JSON shape, known dtypes, byte ranges that
    /// match shape × dtype and tile the data section without gaps or overlaps, and a file exactly as
    /// long as its tensors (a truncated download is reported here, not at first use). Errors name the
    /// file and, where one is at fault, the tensor.
    pub fn read(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        // Mapping an empty file fails on some platforms; say what is wrong instead.
        if file_len < 8 {
            return Err(Error::invalid(
                path,
                "truncated safetensors file: no header length",
            ));
        }
        // SAFETY: the mapping is read-only and lives only for this call; every value kept from it is
        // copied out. Another process truncating the file meanwhile is undefined behaviour, as with
        // every mmap-based loader (safetensors' own examples, candle).
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        if let Some(message) = end_past_any_file(&map) {
            return Err(Error::invalid(path, message));
        }
        let (n, meta) = safetensors::SafeTensors::read_metadata(&map)
            .map_err(|e| Error::invalid(path, explain(&map, e)))?;
        let mut tensors = BTreeMap::new();
        for (name, info) in meta.tensors() {
            let dtype = info.dtype.to_string();
            // The crate knows sub-byte and complex dtypes no loader here can use; refuse them early.
            if dtype_size(&dtype).is_none() {
                return Err(Error::invalid(
                    path,
                    format!("tensor `{name}`: unsupported dtype {dtype}"),
                ));
            }
            tensors.insert(
                name,
                TensorInfo {
                    dtype,
                    shape: info.shape.clone(),
                    data_offsets: info.data_offsets,
                },
            );
        }
        let metadata = meta
            .metadata()
            .as_ref()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        Ok(SafetensorsHeader {
            tensors,
            metadata,
            data_start: 8 + n,
        })
    }
}

/// The header length a safetensors buffer states, and the header's bytes when they are in it.
fn raw_header(buf: &[u8]) -> (u64, Option<&[u8]>) {
    let n = buf
        .get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map_or(0, u64::from_le_bytes);
    let header = usize::try_from(n)
        .ok()
        .and_then(|n| buf.get(8..8usize.checked_add(n)?));
    (n, header)
}

/// The well-formed tensor entries of a header, sorted by byte range; `None` when it is not a
/// JSON object.
fn lenient_entries(
    header: Option<&[u8]>,
) -> Option<Vec<(String, safetensors::tensor::TensorInfo)>> {
    let raw: BTreeMap<String, Value> = serde_json::from_slice(header?).ok()?;
    let mut out: Vec<_> = raw
        .into_iter()
        .filter(|(k, _)| k != "__metadata__")
        .filter_map(|(k, v)| Some((k, serde_json::from_value(v).ok()?)))
        .collect();
    out.sort_by_key(|(_, i): &(String, safetensors::tensor::TensorInfo)| i.data_offsets);
    Some(out)
}

/// A tensor whose byte range ends so far out that no file holds it, reported before the
/// `safetensors` crate sees the header: its `read_metadata` (0.8) adds the last tensor's end to the
/// header length unchecked, which panics in debug builds once offsets that tile correctly reach
/// `usize::MAX` (a crafted header; found by `tests/integration/fuzz`). Only ends within 8 + the
/// header length of `usize::MAX` are caught here, so every other file gets the crate's verdict.
fn end_past_any_file(buf: &[u8]) -> Option<String> {
    let (n, header) = raw_header(buf);
    // The crate refuses headers over 100 MB before parsing them; so does this check.
    let n = usize::try_from(n).ok().filter(|&n| n <= 100_000_000)?;
    let limit = usize::MAX.checked_sub(8)?.checked_sub(n)?;
    let (name, info) = lenient_entries(header)?
        .into_iter()
        .find(|(_, i)| i.data_offsets.1 > limit)?;
    Some(format!(
        "truncated file: tensor `{name}` ends at byte {} of a {}-byte data section",
        info.data_offsets.1,
        buf.len().saturating_sub(8).saturating_sub(n)
    ))
}

/// Turns a `safetensors` rejection into a message naming the tensor at fault. The crate's errors
/// for ranges and truncation carry no tensor name (or no byte counts), so the header is parsed once
/// more, leniently, only to find the culprit; the verdict itself is always the crate's.
fn explain(buf: &[u8], err: safetensors::SafeTensorError) -> String {
    use safetensors::SafeTensorError as E;
    let (n, header) = raw_header(buf);
    let entries = || lenient_entries(header);
    let bytes_of = |i: &safetensors::tensor::TensorInfo| {
        i.shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .and_then(|c| c.checked_mul(i.dtype.bitsize()))
            .filter(|bits| bits % 8 == 0)
            .map(|bits| bits / 8)
    };
    match err {
        E::HeaderTooSmall => "truncated safetensors file: no header length".into(),
        E::HeaderTooLarge | E::InvalidHeaderLength => format!(
            "bad safetensors header length {n} (file has {} bytes)",
            buf.len()
        ),
        E::InvalidHeader(e) => format!("safetensors header is not valid JSON: {e}"),
        E::InvalidHeaderDeserialization(e) => {
            // Name the tensor whose entry is malformed (unknown dtype, missing field) when the JSON
            // itself parses.
            let raw =
                header.and_then(|h| serde_json::from_slice::<BTreeMap<String, Value>>(h).ok());
            let Some(raw) = raw else {
                return format!("safetensors header is not valid JSON: {e}");
            };
            for (name, v) in raw {
                let bad = if name == "__metadata__" {
                    serde_json::from_value::<BTreeMap<String, String>>(v).err()
                } else {
                    serde_json::from_value::<safetensors::tensor::TensorInfo>(v).err()
                };
                if let Some(bad) = bad {
                    return if name == "__metadata__" {
                        format!("`__metadata__`: {bad}")
                    } else {
                        format!("tensor `{name}`: {bad}")
                    };
                }
            }
            format!("invalid safetensors header: {e}")
        }
        E::InvalidOffset(name) => {
            let range = entries()
                .and_then(|es| es.into_iter().find(|(k, _)| *k == name))
                .map(|(_, i)| format!(" {}..{}", i.data_offsets.0, i.data_offsets.1))
                .unwrap_or_default();
            format!(
                "tensor `{name}`: byte range{range} overlaps another tensor or leaves a gap \
                 (tensors must tile the data section)"
            )
        }
        E::TensorInvalidInfo | E::MisalignedSlice | E::ValidationOverflow => {
            let culprit = entries().and_then(|es| {
                es.into_iter().find(|(_, i)| {
                    let (s, e) = i.data_offsets;
                    e < s || bytes_of(i) != Some(e - s)
                })
            });
            match culprit {
                Some((name, i)) => format!(
                    "tensor `{name}`: byte range {}..{} does not fit shape {:?} of {}",
                    i.data_offsets.0, i.data_offsets.1, i.shape, i.dtype
                ),
                None => format!("invalid safetensors header: {err}"),
            }
        }
        E::MetadataIncompleteBuffer => {
            let data_len = buf.len().saturating_sub(8).saturating_sub(n as usize);
            let es = entries().unwrap_or_default();
            if let Some((name, i)) = es.iter().find(|(_, i)| i.data_offsets.1 > data_len) {
                format!(
                    "truncated file: tensor `{name}` ends at byte {} of a {data_len}-byte data section",
                    i.data_offsets.1
                )
            } else {
                let end = es.last().map_or(0, |(_, i)| i.data_offsets.1);
                format!(
                    "{} stray bytes after the last tensor (data section is {data_len} bytes, tensors \
                     end at {end})",
                    data_len.saturating_sub(end)
                )
            }
        }
        other => format!("invalid safetensors file: {other}"),
    }
}

/// Bytes per element of a safetensors dtype.
pub fn dtype_size(dtype: &str) -> Option<usize> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E4M3" | "F8_E5M2" => 1,
        "F16" | "BF16" | "I16" | "U16" => 2,
        "F32" | "I32" | "U32" => 4,
        "F64" | "I64" | "U64" => 8,
        _ => return None,
    })
}

/// A Hugging Face model folder: config, generation config and the weight files.
#[derive(Debug, Clone)]
pub struct ModelFolder {
    /// The folder.
    pub dir: PathBuf,
    /// Parsed `config.json`.
    pub config: ModelConfig,
    /// Parsed `generation_config.json`, if present.
    pub generation: Option<GenerationConfig>,
    /// Which file holds each tensor (one entry per tensor, across shards).
    pub weight_map: BTreeMap<String, PathBuf>,
}

impl ModelFolder {
    /// Opens a folder with a `config.json` and either `model.safetensors` or a sharded
    /// `model.safetensors.index.json`. Only headers are read here.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        if !dir.is_dir() {
            return Err(Error::invalid(
                &dir,
                "not a model folder (no such directory)",
            ));
        }
        let config = ModelConfig::from_file(dir.join("config.json"))?;
        let gen_path = dir.join("generation_config.json");
        let generation = if gen_path.exists() {
            Some(GenerationConfig::from_file(&gen_path)?)
        } else {
            None
        };
        let weight_map = Self::weight_map(&dir)?;
        Ok(ModelFolder {
            dir,
            config,
            generation,
            weight_map,
        })
    }

    /// Tensor name → file, from the shard index or the single weights file.
    pub fn weight_map(dir: &Path) -> Result<BTreeMap<String, PathBuf>> {
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        if index.exists() {
            #[derive(Deserialize)]
            struct Index {
                weight_map: BTreeMap<String, String>,
            }
            let text = fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
            let idx: Index = serde_json::from_str(&text)
                .map_err(|e| Error::invalid(&index, format!("not a safetensors index: {e}")))?;
            let mut map = BTreeMap::new();
            for (name, file) in idx.weight_map {
                let p = dir.join(&file);
                if !p.exists() {
                    return Err(Error::invalid(
                        &index,
                        format!("tensor `{name}` is in shard {file}, which is missing"),
                    ));
                }
                map.insert(name, p);
            }
            Ok(map)
        } else if single.exists() {
            let header = SafetensorsHeader::read(&single)?;
            Ok(header
                .tensors
                .into_keys()
                .map(|k| (k, single.clone()))
                .collect())
        } else {
            Err(Error::invalid(
                dir,
                "no model.safetensors or model.safetensors.index.json",
            ))
        }
    }

    /// All stop ids: config.json's and generation_config.json's, deduplicated, in order.
    pub fn eos_token_ids(&self) -> Vec<u32> {
        let mut out = self.config.eos_token_ids.clone();
        for id in self.generation.iter().flat_map(|g| g.eos_token_ids.iter()) {
            if !out.contains(id) {
                out.push(*id);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_json_round_trips_every_architecture() {
        let cases = [
            r#"{"model_type":"qwen3","hidden_size":64,"num_attention_heads":4,"num_key_value_heads":2,
                "head_dim":32,"tie_word_embeddings":true,"eos_token_id":[2,3],"rope_theta":1000000.0}"#,
            r#"{"model_type":"qwen2","hidden_size":48,"num_attention_heads":6,"num_key_value_heads":2,
                "intermediate_size":96,"num_hidden_layers":3,"bos_token_id":1,"eos_token_id":2,"vocab_size":99}"#,
            r#"{"model_type":"llama","hidden_size":32,"num_attention_heads":4,"mlp_bias":true,"attention_bias":true,
                "rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,
                "original_max_position_embeddings":64},"max_position_embeddings":512}"#,
        ];
        for text in cases {
            let c = ModelConfig::from_json_str(text).unwrap();
            let again = ModelConfig::from_json_str(&c.to_hf_json().to_string()).unwrap();
            assert_eq!(again.dtype.as_deref(), Some("float32"));
            assert_eq!(
                ModelConfig {
                    dtype: c.dtype.clone(),
                    ..again
                },
                c,
                "{text}"
            );
        }
    }

    #[test]
    fn qwen3_defaults_and_tied_embeddings() {
        let c = ModelConfig::from_json_str(
            r#"{"model_type":"qwen3","hidden_size":64,"num_attention_heads":4,"num_key_value_heads":2,
                "head_dim":32,"tie_word_embeddings":true,"eos_token_id":[2,3],"rope_theta":1000000.0}"#,
        )
        .unwrap();
        assert_eq!(c.architecture, Architecture::Qwen3);
        assert_eq!(c.head_dim, 32);
        assert!(c.tie_word_embeddings);
        assert_eq!(c.eos_token_ids, vec![2, 3]);
        assert_eq!(c.rope_theta, 1e6);
        assert!(!c.qkv_bias);
    }

    #[test]
    fn llama3_rope_in_both_forms() {
        let old = r#"{"model_type":"llama","hidden_size":64,"num_attention_heads":4,"rope_theta":500000.0,
            "rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,
            "original_max_position_embeddings":8192},"eos_token_id":128001}"#;
        let new = r#"{"model_type":"llama","hidden_size":64,"num_attention_heads":4,
            "rope_parameters":{"rope_type":"llama3","rope_theta":500000.0,"factor":8.0,"low_freq_factor":1.0,
            "high_freq_factor":4.0,"original_max_position_embeddings":8192},"eos_token_id":128001}"#;
        let a = ModelConfig::from_json_str(old).unwrap();
        let b = ModelConfig::from_json_str(new).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.rope_theta, 500000.0);
        assert_eq!(a.head_dim, 16);
        assert_eq!(a.num_key_value_heads, 4);
        assert!(
            matches!(a.rope_scaling, Some(RopeScaling::Llama3 { factor, .. }) if factor == 8.0)
        );
    }

    #[test]
    fn qwen2_has_qkv_bias_and_errors_name_fields() {
        let c = ModelConfig::from_json_str(r#"{"model_type":"qwen2","hidden_size":64,"num_attention_heads":4,"num_key_value_heads":4}"#)
            .unwrap();
        assert!(c.qkv_bias && !c.o_bias);
        let e = ModelConfig::from_json_str(r#"{"model_type":"qwen2","hidden_size":"big"}"#)
            .unwrap_err();
        assert!(e.contains("hidden_size"), "{e}");
        let e = ModelConfig::from_json_str(r#"{"model_type":"gpt2"}"#).unwrap_err();
        assert!(e.contains("gpt2"), "{e}");
        let e = ModelConfig::from_json_str(
            r#"{"model_type":"llama","num_attention_heads":6,"num_key_value_heads":4}"#,
        )
        .unwrap_err();
        assert!(e.contains("num_key_value_heads"), "{e}");
        let e = ModelConfig::from_json_str(
            r#"{"model_type":"llama","rope_scaling":{"type":"yarn","factor":2.0}}"#,
        )
        .unwrap_err();
        assert!(
            e.contains("rope_scaling.rope_type") && e.contains("yarn"),
            "{e}"
        );
    }
}
