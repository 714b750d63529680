//! Saving models as Hugging Face folders that transformers loads.

use std::path::Path;

use tch::{Kind, Tensor};

use crate::error::{Error, Result, TorchContext};
use crate::model::CausalLm;

impl CausalLm {
    /// Replaces every weight with those of a `model.safetensors` written by
    /// [`CausalLm::save_pretrained`] for the same configuration (strict: same names and shapes).
    pub fn load_weights(&self, file: impl AsRef<Path>) -> Result<()> {
        crate::weights::load_into(file.as_ref(), &self.named_parameters())
    }

    /// Writes `config.json`, `model.safetensors` (in the model's compute kind; a tied output
    /// projection is stored once, as transformers does) and `generation_config.json` into `dir`,
    /// each file atomically. Copy the tokenizer files beside them to make a complete folder.
    /// Refuses a model with adapters attached: merge them ([`crate::LoraAdapter::merge_into`]) or
    /// save the adapter on its own.
    pub fn save_pretrained(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        if self.layers.iter().any(|l| {
            let a = &l.self_attn;
            let m = &l.mlp;
            [
                &a.q_proj,
                &a.k_proj,
                &a.v_proj,
                &a.o_proj,
                &m.gate_proj,
                &m.up_proj,
                &m.down_proj,
            ]
            .iter()
            .any(|lin| lin.adapter.is_some())
        }) {
            return Err(Error::input(
                "the model has adapters attached: merge them into the base or save the adapter instead",
            ));
        }
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let named: Vec<(String, Tensor)> = self
            .named_parameters()
            .into_iter()
            .map(|(k, t)| Ok((k, t.f_detach().op("saving weights")?)))
            .collect::<Result<_>>()?;
        let mut meta = std::collections::HashMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        write_atomic(
            &dir.join("model.safetensors"),
            &safetensors_bytes(&named, Some(meta))?,
        )?;
        let mut config = self.config().clone();
        config.dtype = Some(
            match self.kind() {
                Kind::BFloat16 => "bfloat16",
                Kind::Half => "float16",
                Kind::Double => "float64",
                _ => "float32",
            }
            .to_string(),
        );
        let json = |v: &serde_json::Value| {
            serde_json::to_vec_pretty(v).map_err(|e| Error::input(e.to_string()))
        };
        write_atomic(&dir.join("config.json"), &json(&config.to_hf_json())?)?;
        let eos = match self.eos_token_ids() {
            [] => serde_json::Value::Null,
            [one] => (*one).into(),
            many => many.to_vec().into(),
        };
        let generation = serde_json::json!({
            "bos_token_id": config.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": config.pad_token_id,
        });
        write_atomic(&dir.join("generation_config.json"), &json(&generation)?)
    }
}

/// Serializes named f32 tensors as a safetensors file.
pub(crate) fn safetensors_bytes(
    named: &[(String, Tensor)],
    meta: Option<std::collections::HashMap<String, String>>,
) -> Result<Vec<u8>> {
    use safetensors::tensor::{Dtype, TensorView};
    let mut data: Vec<(String, Vec<u8>, Vec<usize>, Dtype)> = Vec::with_capacity(named.len());
    for (k, t) in named {
        let (dtype, kind) = match t.kind() {
            Kind::BFloat16 => (Dtype::BF16, Kind::BFloat16),
            Kind::Half => (Dtype::F16, Kind::Half),
            Kind::Double => (Dtype::F64, Kind::Double),
            _ => (Dtype::F32, Kind::Float),
        };
        let flat = t
            .f_to_kind(kind)
            .and_then(|t| {
                t.f_to_device(tch::Device::Cpu)?
                    .f_contiguous()?
                    .f_view([-1])
            })
            .op_with(|| format!("serializing `{k}`"))?;
        let n = flat.numel();
        let mut bytes = vec![0u8; n * kind.elt_size_in_bytes()];
        flat.f_copy_data_u8(&mut bytes, n)
            .op_with(|| format!("serializing `{k}`"))?;
        data.push((
            k.clone(),
            bytes,
            t.size().iter().map(|&d| d as usize).collect(),
            dtype,
        ));
    }
    let views = data
        .iter()
        .map(|(k, b, s, d)| {
            TensorView::new(*d, s.clone(), b)
                .map(|v| (k.as_str(), v))
                .map_err(|e| Error::input(format!("`{k}`: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize(views, meta)
        .map_err(|e| Error::input(format!("serializing safetensors: {e}")))
}

/// Writes a file atomically and durably ([`optimsyn_fsio::write_atomic`]), so readers see the old
/// or the new contents, never a torn file.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    optimsyn_fsio::write_atomic(path, bytes).map_err(fs_error)
}

/// Publishes the finished folder `tmp` as `dir` ([`optimsyn_fsio::publish_dir`]): an existing `dir`
/// is moved aside and removed only once the new one is in place, so a crash never leaves neither.
pub(crate) fn publish_dir(tmp: &Path, dir: &Path) -> Result<()> {
    optimsyn_fsio::publish_dir(tmp, dir).map_err(fs_error)
}

/// The crate's I/O error for a failed file-system step, keeping what was being done.
fn fs_error(e: optimsyn_fsio::Error) -> Error {
    Error::Folder(e.into())
}
