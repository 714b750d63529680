//! The key/value cache of incremental decoding, owned by the caller and passed to each forward.
//!
//! Slots are preallocated (`[B, kv_heads, capacity, head_dim]` per layer) and filled left to
//! right; a boolean `[B, capacity]` map records which slots hold real tokens (left padding and any
//! padding inside a chunk are `false`), and each row's next RoPE position is kept separately, so
//! rows of different lengths share one cache.

use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result, TorchContext};

/// One layer's keys and values (post-RoPE), `[B, kv_heads, capacity, head_dim]`.
#[derive(Debug)]
pub(crate) struct LayerKv {
    pub(crate) k: Tensor,
    pub(crate) v: Tensor,
}

/// Keys and values of every layer for a batch of sequences, plus per-row positions.
#[derive(Debug)]
pub struct KvCache {
    pub(crate) layers: Vec<LayerKv>,
    /// `[B, capacity]` bool: the slot holds a real token.
    pub(crate) valid: Tensor,
    /// `[B]` i64: the RoPE position of each row's next token.
    pub(crate) next_pos: Tensor,
    /// Slots filled so far (the same for every row).
    pub(crate) len: i64,
    pub(crate) capacity: i64,
    pub(crate) batch: i64,
    /// Every filled slot is valid (no padding yet): attention can skip the mask.
    pub(crate) all_valid: bool,
}

impl KvCache {
    /// An empty cache for `batch` rows and `capacity` slots; it grows if a forward needs more.
    pub(crate) fn new(
        layers: usize,
        batch: i64,
        capacity: i64,
        kv_heads: i64,
        head_dim: i64,
        kind: Kind,
        device: Device,
    ) -> Result<Self> {
        if batch <= 0 {
            return Err(Error::input("a KV cache needs at least one row"));
        }
        let capacity = capacity.max(1);
        let alloc = || -> std::result::Result<Vec<LayerKv>, tch::TchError> {
            (0..layers)
                .map(|_| {
                    Ok(LayerKv {
                        k: Tensor::f_zeros([batch, kv_heads, capacity, head_dim], (kind, device))?,
                        v: Tensor::f_zeros([batch, kv_heads, capacity, head_dim], (kind, device))?,
                    })
                })
                .collect()
        };
        Ok(KvCache {
            layers: alloc().op("allocating the KV cache")?,
            valid: Tensor::f_zeros([batch, capacity], (Kind::Bool, device))
                .op("allocating the KV cache")?,
            next_pos: Tensor::f_zeros([batch], (Kind::Int64, device))
                .op("allocating the KV cache")?,
            len: 0,
            capacity,
            batch,
            all_valid: true,
        })
    }

    /// Rows in the batch.
    pub fn batch_size(&self) -> usize {
        self.batch as usize
    }

    /// Slots filled so far (prompt padding included).
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// Nothing has been written yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Slots allocated.
    pub fn capacity(&self) -> usize {
        self.capacity as usize
    }

    /// Makes room for `extra` more slots, reallocating (to at least double) when needed.
    pub(crate) fn reserve(&mut self, extra: i64) -> Result<()> {
        let need = self.len + extra;
        if need <= self.capacity {
            return Ok(());
        }
        let cap = need.max(self.capacity * 2);
        let grow = |t: &Tensor, dim: i64| -> std::result::Result<Tensor, tch::TchError> {
            let mut shape = t.size();
            shape[dim as usize] = cap;
            let out = Tensor::f_zeros(shape.as_slice(), (t.kind(), t.device()))?;
            out.f_narrow(dim, 0, self.len)?
                .f_copy_(&t.f_narrow(dim, 0, self.len)?)?;
            Ok(out)
        };
        let f = || -> std::result::Result<(Vec<LayerKv>, Tensor), tch::TchError> {
            let layers = self
                .layers
                .iter()
                .map(|l| {
                    Ok(LayerKv {
                        k: grow(&l.k, 2)?,
                        v: grow(&l.v, 2)?,
                    })
                })
                .collect::<std::result::Result<Vec<_>, tch::TchError>>()?;
            Ok((layers, grow(&self.valid, 1)?))
        };
        let (layers, valid) = f().op("growing the KV cache")?;
        self.layers = layers;
        self.valid = valid;
        self.capacity = cap;
        Ok(())
    }
}
