//! Validation features: projected, L2-normalized plain gradients of the validation examples at
//! one checkpoint, stored on disk with a header saying what produced them and reused when the
//! same model, adapter, validation data and projection ask for them again.

use std::collections::HashMap;
use std::path::Path;

use optimsyn_lm::{CausalLm, LoraAdapter, TrainExample, WeightStore};
use tch::{Kind, Tensor};

use crate::config::ScoreConfig;
use crate::error::{Error, Result, TorchContext};
use crate::grads::gradients;
use crate::project::Projector;

/// Name of the tensor in a features file.
const TENSOR: &str = "features";

/// What produced a features file; a file is reused only when all of it matches.
fn header(
    model: &CausalLm,
    adapter_dir: &Path,
    val: &[TrainExample],
    projector: &Projector,
) -> Result<HashMap<String, String>> {
    let mut h = blake3::Hasher::new();
    for e in val {
        h.update(e.id.as_bytes());
        for t in &e.tokens {
            h.update(&t.to_le_bytes());
        }
        h.update(&e.loss_mask);
        h.update(e.subtask.as_deref().unwrap_or("").as_bytes());
    }
    let weights = adapter_dir.join(optimsyn_lm::lora::WEIGHTS_FILE);
    let adapter_hash = optimsyn_data_io::file_hash(&weights)?;
    let mut m = HashMap::new();
    m.insert(
        "producer".into(),
        format!("optimsyn-influence {}", env!("CARGO_PKG_VERSION")),
    );
    m.insert(
        "kind".into(),
        "validation SGD gradients, projected, L2-normalized".into(),
    );
    m.insert(
        "projector".into(),
        serde_json::to_string(&projector.kind()).map_err(|e| Error::Input(e.to_string()))?,
    );
    m.insert("validation".into(), h.finalize().to_hex().to_string());
    m.insert("adapter".into(), adapter_hash);
    m.insert("examples".into(), val.len().to_string());
    // Gradients through a bf16 (or f16) model are other features; f32 files predate the field and
    // stay valid.
    if model.kind() != Kind::Float {
        m.insert("dtype".into(), format!("{:?}", model.kind()));
    }
    Ok(m)
}

/// Loads the validation features of `adapter` (at `adapter_dir`) from the cache, or computes and
/// stores them.
pub(crate) fn val_features(
    model: &CausalLm,
    adapter: &LoraAdapter,
    projector: &Projector,
    val: &[TrainExample],
    adapter_dir: &Path,
    cfg: &ScoreConfig,
) -> Result<Tensor> {
    let meta = header(model, adapter_dir, val, projector)?;
    let dir = cfg
        .features_dir
        .clone()
        .unwrap_or_else(|| adapter_dir.join("influence-features"));
    let key = blake3::hash(
        format!(
            "{}{}{}{}",
            meta["projector"],
            meta["validation"],
            meta["adapter"],
            meta.get("dtype").map_or("", String::as_str)
        )
        .as_bytes(),
    );
    let path = dir.join(format!("val-{}.safetensors", &key.to_hex()[..16]));
    if path.exists()
        && let Ok((found, t)) = read(&path)
        && meta.iter().all(|(k, v)| found.get(k) == Some(v))
    {
        tracing::info!(path = %path.display(), "reusing validation features");
        return t.f_to_device(model.device()).op("features");
    }
    let idx: Vec<usize> = (0..val.len()).collect();
    let (g, _) = gradients(model, adapter, val, &idx, cfg.max_batch_tokens)?;
    let x = projector.project(&g)?;
    let n = x
        .f_norm_scalaropt_dim(2, [1i64].as_slice(), true)
        .and_then(|n| n.f_clamp_min(1e-30))
        .op("features")?;
    let feats = x.f_div(&n).op("features")?;
    std::fs::create_dir_all(&dir).map_err(|source| Error::Io {
        path: dir.clone(),
        source,
    })?;
    write(&path, &feats, meta)?;
    Ok(feats)
}

fn read(path: &Path) -> Result<(HashMap<String, String>, Tensor)> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let (_, h) =
        safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| Error::Checkpoint {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    let meta = h.metadata().clone().unwrap_or_default();
    let store = WeightStore::open_file(path)?;
    let t = store.load(TENSOR, Kind::Float, tch::Device::Cpu)?;
    Ok((meta, t))
}

fn write(path: &Path, t: &Tensor, meta: HashMap<String, String>) -> Result<()> {
    let flat = t
        .f_to_device(tch::Device::Cpu)
        .and_then(|t| t.f_contiguous()?.f_view([-1]))
        .op("features")?;
    let v = Vec::<f32>::try_from(&flat).map_err(|e| Error::Torch {
        op: "features".into(),
        source: e,
    })?;
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape, &bytes)
        .map_err(|e| Error::Checkpoint {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    let out =
        safetensors::serialize([(TENSOR, view)], Some(meta)).map_err(|e| Error::Checkpoint {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    optimsyn_data_io::write_atomic(path, &out)?;
    Ok(())
}
