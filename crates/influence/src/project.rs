//! Random projections of gradient vectors: dense Rademacher (TRAK / LESS) and sparse JL (SJLT).
//!
//! Both are generated blockwise from ChaCha streams keyed by `(seed, block)` on the CPU, so the
//! same seed gives the same matrix on every device and for every batch, and the full `P × k`
//! matrix is never stored unless it fits the cache budget. Projections accumulate in f32.
//!
//! - Dense: entries ±1 (unscaled, as TRAK's Rademacher projector; cosines do not depend on the
//!   scale). Costs `2·P·k` FLOPs per row, plus generating `P·k` signs once per call, so score many
//!   rows per call (the generated block is reused across the whole batch as one matmul).
//! - SJLT: each input coordinate goes to `s` output coordinates with signs ±1/√s (Kane–Nelson
//!   sparse JL), `O(P·s)` per row; the hash table (`P·s` indices and signs) is cached.

use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result, TorchContext};

/// Which projection, with its parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum ProjectorKind {
    /// No projection: the exact vectors (k = 0).
    Exact,
    /// Dense Rademacher ±1 to `k` dimensions.
    Dense {
        /// Output dimension.
        k: usize,
        /// Seed.
        seed: u64,
    },
    /// Sparse JL with `s` nonzeros per input coordinate.
    Sjlt {
        /// Output dimension.
        k: usize,
        /// Nonzeros per input coordinate.
        s: usize,
        /// Seed.
        seed: u64,
    },
}

impl ProjectorKind {
    /// `dense` / `sjlt` with dimension `k` (0 = exact) and `seed`; SJLT uses s = 4.
    pub fn from_name(name: &str, k: usize, seed: u64) -> Result<Self> {
        if k == 0 {
            return Ok(ProjectorKind::Exact);
        }
        match name {
            "dense" => Ok(ProjectorKind::Dense { k, seed }),
            "sjlt" => Ok(ProjectorKind::Sjlt { k, s: 4, seed }),
            o => Err(Error::Input(format!(
                "unknown projector `{o}` (expected dense or sjlt)"
            ))),
        }
    }

    /// Output dimension for inputs of dimension `p`.
    pub fn out_dim(&self, p: usize) -> usize {
        match self {
            ProjectorKind::Exact => p,
            ProjectorKind::Dense { k, .. } | ProjectorKind::Sjlt { k, .. } => *k,
        }
    }
}

/// Rows of the dense matrix generated per block.
const DENSE_BLOCK: usize = 1024;
/// Input coordinates hashed per SJLT block.
const SJLT_BLOCK: usize = 1 << 16;

/// A projector for inputs of one dimension `P`.
#[derive(Debug)]
pub struct Projector {
    kind: ProjectorKind,
    p: usize,
    /// The whole dense matrix `[P, k]`, when it fits the cache budget.
    dense_cache: Option<Tensor>,
    /// SJLT: `[P·s]` output indices and `[P·s]` signed weights.
    sjlt: Option<(Tensor, Tensor)>,
}

/// `[rows, k]` ±1 f32: rows `start..start + rows` of the dense matrix.
fn dense_rows(seed: u64, start: usize, rows: usize, k: usize) -> Result<Tensor> {
    debug_assert!(start.is_multiple_of(DENSE_BLOCK));
    let words_per_row = k.div_ceil(64);
    let mut bytes: Vec<u8> = Vec::with_capacity(rows * words_per_row * 8);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream((start / DENSE_BLOCK) as u64);
    for _ in 0..rows * words_per_row {
        bytes.extend_from_slice(&rng.next_u64().to_le_bytes());
    }
    let f = || -> std::result::Result<Tensor, tch::TchError> {
        let b =
            Tensor::f_from_slice(&bytes)?.f_view([rows as i64, (words_per_row * 8) as i64, 1])?;
        let shifts = Tensor::f_arange(8, (Kind::Uint8, Device::Cpu))?.f_view([1, 1, 8])?;
        let bits = b.f_bitwise_right_shift(&shifts)?.f_bitwise_and(1)?;
        let m = bits
            .f_view([rows as i64, -1])?
            .f_narrow(1, 0, k as i64)?
            .f_to_kind(Kind::Float)?;
        m.f_mul_scalar(2.0)?.f_sub_scalar(1.0)
    };
    f().op("dense projection block")
}

impl Projector {
    /// A projector of `kind` for `p`-dimensional inputs. The dense matrix is cached when
    /// `p·k·4` bytes fit `cache_bytes`.
    pub fn new(kind: ProjectorKind, p: usize, cache_bytes: usize) -> Result<Self> {
        let mut me = Projector {
            kind,
            p,
            dense_cache: None,
            sjlt: None,
        };
        match kind {
            ProjectorKind::Exact => {}
            ProjectorKind::Dense { k, seed } => {
                if k == 0 {
                    return Err(Error::Input(
                        "projection dimension must be positive (0 means exact)".into(),
                    ));
                }
                if p.saturating_mul(k).saturating_mul(4) <= cache_bytes {
                    let mut blocks = Vec::new();
                    for start in (0..p).step_by(DENSE_BLOCK) {
                        blocks.push(dense_rows(seed, start, DENSE_BLOCK.min(p - start), k)?);
                    }
                    me.dense_cache = Some(Tensor::f_cat(&blocks, 0).op("dense projection")?);
                }
            }
            ProjectorKind::Sjlt { k, s, seed } => {
                if k == 0 || s == 0 || s > k {
                    return Err(Error::Input(format!(
                        "SJLT needs 0 < s ≤ k, got s {s}, k {k}"
                    )));
                }
                let mut idx: Vec<i64> = Vec::with_capacity(p * s);
                let mut w: Vec<f32> = Vec::with_capacity(p * s);
                let scale = 1.0 / (s as f32).sqrt();
                for start in (0..p).step_by(SJLT_BLOCK) {
                    let mut rng = ChaCha8Rng::seed_from_u64(seed);
                    rng.set_stream((start / SJLT_BLOCK) as u64);
                    for _ in start..(start + SJLT_BLOCK).min(p) {
                        // s distinct buckets: split k into s equal ranges (the block construction).
                        for j in 0..s {
                            let lo = j * k / s;
                            let hi = (j + 1) * k / s;
                            let r = rng.next_u64();
                            idx.push((lo + (r >> 1) as usize % (hi - lo)) as i64);
                            w.push(if r & 1 == 1 { scale } else { -scale });
                        }
                    }
                }
                let f = || -> std::result::Result<(Tensor, Tensor), tch::TchError> {
                    Ok((Tensor::f_from_slice(&idx)?, Tensor::f_from_slice(&w)?))
                };
                me.sjlt = Some(f().op("SJLT table")?);
            }
        }
        Ok(me)
    }

    /// The projection's settings.
    pub fn kind(&self) -> ProjectorKind {
        self.kind
    }

    /// Projects `x` `[B, P]` to `[B, k]` f32 (exact: `x` itself, as f32).
    pub fn project(&self, x: &Tensor) -> Result<Tensor> {
        let size = x.size();
        let [b, p] = size.as_slice() else {
            return Err(Error::Input(format!(
                "projection input must be [B, P], got {size:?}"
            )));
        };
        if *p as usize != self.p {
            return Err(Error::Input(format!(
                "projection input has {p} columns, the projector {}",
                self.p
            )));
        }
        let dev = x.device();
        let x = x.f_to_kind(Kind::Float).op("projection")?;
        match self.kind {
            ProjectorKind::Exact => Ok(x),
            ProjectorKind::Dense { k, seed } => {
                if let Some(m) = &self.dense_cache {
                    return x
                        .f_matmul(&m.f_to_device(dev).op("projection")?)
                        .op("dense projection");
                }
                let mut out =
                    Tensor::f_zeros([*b, k as i64], (Kind::Float, dev)).op("projection")?;
                for start in (0..self.p).step_by(DENSE_BLOCK) {
                    let rows = DENSE_BLOCK.min(self.p - start);
                    let m = dense_rows(seed, start, rows, k)?
                        .f_to_device(dev)
                        .op("projection")?;
                    let part = x
                        .f_narrow(1, start as i64, rows as i64)
                        .and_then(|xs| xs.f_matmul(&m))
                        .op("dense projection")?;
                    out = out.f_add_(&part).op("dense projection")?;
                }
                Ok(out)
            }
            ProjectorKind::Sjlt { k, s, .. } => {
                let (idx, w) = self
                    .sjlt
                    .as_ref()
                    .ok_or_else(|| Error::Input("SJLT table missing".into()))?;
                let (idx, w) = (
                    idx.f_to_device(dev).op("projection")?,
                    w.f_to_device(dev).op("projection")?,
                );
                let mut out =
                    Tensor::f_zeros([*b, k as i64], (Kind::Float, dev)).op("projection")?;
                // Chunks of coordinates bound the [B, chunk·s] temporary.
                let chunk = 1 << 18;
                for start in (0..self.p).step_by(chunk) {
                    let n = chunk.min(self.p - start) as i64;
                    let mut f = || -> std::result::Result<(), tch::TchError> {
                        let xs = x
                            .f_narrow(1, start as i64, n)?
                            .f_repeat_interleave_self_int(s as i64, 1, None)?;
                        let ws = w.f_narrow(0, start as i64 * s as i64, n * s as i64)?;
                        let is = idx.f_narrow(0, start as i64 * s as i64, n * s as i64)?;
                        let _ = out.f_index_add_(1, &is, &xs.f_mul(&ws)?)?;
                        Ok(())
                    };
                    f().op("SJLT projection")?;
                }
                Ok(out)
            }
        }
    }
}
