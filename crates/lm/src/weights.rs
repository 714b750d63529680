//! Memory-mapped safetensors checkpoints, single-file or sharded.
//!
//! Headers are read and checked by `optimsyn_data_io::SafetensorsHeader` (sizes, dtypes, a
//! truncated file); the data section is memory-mapped and each tensor is copied once into a
//! libtorch tensor of the checkpoint's dtype, then cast to the compute kind and moved to the device.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use optimsyn_data_io::{ModelFolder, SafetensorsHeader, TensorInfo};
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result, TorchContext};

/// One mapped `.safetensors` file.
struct MappedFile {
    path: PathBuf,
    header: SafetensorsHeader,
    map: Mmap,
}

/// Every tensor of a checkpoint, by name, readable on demand.
pub struct WeightStore {
    files: Vec<MappedFile>,
    /// Tensor name → index into `files`.
    index: BTreeMap<String, usize>,
}

impl std::fmt::Debug for WeightStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeightStore")
            .field(
                "files",
                &self.files.iter().map(|m| &m.path).collect::<Vec<_>>(),
            )
            .field("tensors", &self.index.len())
            .finish()
    }
}

/// The libtorch kind of a safetensors dtype name, for the dtypes a checkpoint's weights may use.
pub fn kind_of_dtype(dtype: &str) -> Option<Kind> {
    Some(match dtype {
        "F32" => Kind::Float,
        "BF16" => Kind::BFloat16,
        "F16" => Kind::Half,
        "F64" => Kind::Double,
        _ => return None,
    })
}

impl WeightStore {
    /// Maps every weights file of a model folder (the single file, or every shard the index names).
    pub fn open(folder: &ModelFolder) -> Result<Self> {
        let mut paths: Vec<PathBuf> = folder.weight_map.values().cloned().collect();
        paths.sort();
        paths.dedup();
        let mut store = WeightStore {
            files: Vec::with_capacity(paths.len()),
            index: BTreeMap::new(),
        };
        for path in paths {
            store.add_file(&path)?;
        }
        // A shard index that names a tensor its shard lacks is a corrupt checkpoint.
        for (name, file) in &folder.weight_map {
            match store.index.get(name) {
                Some(&i) if store.files[i].path == *file => {}
                _ => {
                    return Err(Error::weight(
                        file,
                        name,
                        "listed in model.safetensors.index.json but absent from this shard",
                    ));
                }
            }
        }
        Ok(store)
    }

    /// Maps one `.safetensors` file (used directly by tests and tools that have no folder).
    pub fn open_file(path: impl AsRef<Path>) -> Result<Self> {
        let mut store = WeightStore {
            files: Vec::new(),
            index: BTreeMap::new(),
        };
        store.add_file(path.as_ref())?;
        Ok(store)
    }

    fn add_file(&mut self, path: &Path) -> Result<()> {
        let header = SafetensorsHeader::read(path)?;
        let file = File::open(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        // SAFETY: the mapping is read-only and private to this process. Another process truncating or
        // rewriting the checkpoint while it is mapped is undefined behaviour, as with every mmap-based
        // loader (candle, safetensors); the header check above has already verified that the file is
        // long enough for every tensor, and each tensor is copied out before the store is dropped.
        let map = unsafe { Mmap::map(&file) }.map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let i = self.files.len();
        for name in header.tensors.keys() {
            if let Some(&j) = self.index.get(name) {
                return Err(Error::weight(
                    path,
                    name,
                    format!(
                        "appears in two files (also in {})",
                        self.files[j].path.display()
                    ),
                ));
            }
            self.index.insert(name.clone(), i);
        }
        self.files.push(MappedFile {
            path: path.to_path_buf(),
            header,
            map,
        });
        Ok(())
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    /// A tensor's header entry (dtype, shape, byte range) and the file holding it.
    pub fn info(&self, name: &str) -> Option<(&Path, &TensorInfo)> {
        let f = &self.files[*self.index.get(name)?];
        Some((f.path.as_path(), f.header.tensors.get(name)?))
    }

    /// Reads one tensor, cast to `kind` and placed on `device`. The result does not require grad and
    /// shares nothing with the mapping.
    pub fn load(&self, name: &str, kind: Kind, device: Device) -> Result<Tensor> {
        let Some(&i) = self.index.get(name) else {
            let path = self
                .files
                .first()
                .map(|f| f.path.clone())
                .unwrap_or_default();
            return Err(Error::weight(path, name, "missing from the checkpoint"));
        };
        let f = &self.files[i];
        let info = &f.header.tensors[name];
        let src = kind_of_dtype(&info.dtype).ok_or_else(|| {
            Error::weight(
                &f.path,
                name,
                format!("dtype {} is not a floating-point weight dtype", info.dtype),
            )
        })?;
        let (start, end) = info.data_offsets;
        let bytes = f
            .map
            .get(f.header.data_start + start..f.header.data_start + end)
            .ok_or_else(|| {
                Error::weight(
                    &f.path,
                    name,
                    "byte range lies outside the file (truncated?)",
                )
            })?;
        let shape: Vec<i64> = info.shape.iter().map(|&d| d as i64).collect();
        let t = Tensor::f_from_data_size(bytes, &shape, src)
            .op_with(|| format!("reading tensor `{name}`"))?;
        let t = if src == kind {
            t
        } else {
            t.f_to_kind(kind)
                .op_with(|| format!("casting tensor `{name}`"))?
        };
        if device == Device::Cpu {
            Ok(t)
        } else {
            t.f_to_device(device)
                .op_with(|| format!("moving tensor `{name}` to {device:?}"))
        }
    }
}

/// Copies the tensors of a safetensors file into `params` (same keys, same shapes), strictly.
pub(crate) fn load_into(path: &Path, params: &[(String, &Tensor)]) -> Result<()> {
    let store = WeightStore::open_file(path)?;
    let _g = tch::no_grad_guard();
    for (k, p) in params {
        let Some((_, info)) = store.info(k) else {
            return Err(Error::weight(path, k, "missing from the checkpoint"));
        };
        let shape: Vec<i64> = info.shape.iter().map(|&d| d as i64).collect();
        if shape != p.size() {
            return Err(Error::weight(
                path,
                k,
                format!("shape {shape:?}, the model has {:?}", p.size()),
            ));
        }
        let t = store.load(k, p.kind(), p.device())?;
        let mut dst = p.shallow_clone();
        dst.f_copy_(&t).op_with(|| format!("restoring `{k}`"))?;
    }
    if let Some(extra) = store.names().find(|n| !params.iter().any(|(k, _)| k == n)) {
        return Err(Error::weight(
            path,
            extra,
            "unexpected: the model being trained has no such parameter",
        ));
    }
    Ok(())
}
