//! Random projections of gradient vectors: dense Rademacher (TRAK / LESS) and sparse JL (SJLT).
//!
//! Both are generated blockwise from ChaCha streams keyed by `(seed, block)`, so the same seed
//! gives the same matrix on every device and for every batch, and the full `P × k` matrix is never
//! stored unless it fits the cache budget. The dense blocks are generated where the projection
//! runs: on the CPU by the `rand_chacha` generator, on any other device by the same ChaCha8 in
//! integer tensor ops (`dense_device`), bit for bit the same signs. Projections accumulate in f32.
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

/// Which family of random projection: what a config or command line names (`dense`, `sjlt`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProjectorType {
    /// Dense Rademacher ±1 (TRAK, LESS, the paper).
    #[default]
    Dense,
    /// Sparse JL with 4 nonzeros per input coordinate.
    Sjlt,
}

impl ProjectorType {
    /// This family at dimension `k` (0 = exact, no projection) with `seed`.
    pub fn with_dim(self, k: usize, seed: u64) -> ProjectorKind {
        match (self, k) {
            (_, 0) => ProjectorKind::Exact,
            (ProjectorType::Dense, k) => ProjectorKind::Dense { k, seed },
            (ProjectorType::Sjlt, k) => ProjectorKind::Sjlt { k, s: 4, seed },
        }
    }
}

impl std::str::FromStr for ProjectorType {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "dense" => Ok(ProjectorType::Dense),
            "sjlt" => Ok(ProjectorType::Sjlt),
            o => Err(Error::Input(format!(
                "unknown projector `{o}` (expected dense or sjlt)"
            ))),
        }
    }
}

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
        Ok(name.parse::<ProjectorType>()?.with_dim(k, seed))
    }

    /// Output dimension for inputs of dimension `p`.
    pub fn out_dim(&self, p: usize) -> usize {
        match self {
            ProjectorKind::Exact => p,
            ProjectorKind::Dense { k, .. } | ProjectorKind::Sjlt { k, .. } => *k,
        }
    }
}

/// Rows of the dense matrix per ChaCha stream (the matrix's definition: do not change).
const DENSE_BLOCK: usize = 1024;
/// Streams generated per step on an accelerator (16 × 1024 rows × k = 8192: 512 MiB of signs):
/// fewer, larger kernels.
const DEVICE_STREAMS: usize = 16;
/// Input coordinates hashed per SJLT block.
const SJLT_BLOCK: usize = 1 << 16;

/// Input coordinates per scatter on an accelerator.
const SJLT_CHUNK: usize = 1 << 18;

/// The sign bit of an SJLT table entry.
const SIGN_BIT: u32 = 1 << 31;

/// `out[r] += Σⱼ x[r, j] · (±1/√s at the s buckets of j)` for every row `r` of `x` (`[rows, p]`),
/// `out` `[rows, k]`. Rows are split over libtorch's thread count; each thread takes its rows in
/// groups of eight, so one pass over a stretch of the table serves eight rows whose outputs
/// (8 × k floats) stay in cache.
fn sjlt_cpu(codes: &[u32], s: usize, scale: f32, x: &[f32], p: usize, out: &mut [f32], k: usize) {
    const GROUP: usize = 8;
    let rows = out.len() / k.max(1);
    let threads = (tch::get_num_threads().max(1) as usize).min(rows.max(1));
    let per = rows.div_ceil(threads).max(1);
    std::thread::scope(|sc| {
        for (t, outs) in out.chunks_mut(per * k).enumerate() {
            let r0 = t * per;
            sc.spawn(move || {
                for (g, og) in outs.chunks_mut(GROUP * k).enumerate() {
                    let first = r0 + g * GROUP;
                    let n = og.len() / k;
                    for (j, c) in codes.chunks_exact(s).enumerate().take(p) {
                        for r in 0..n {
                            let v = x[(first + r) * p + j] * scale;
                            let o = &mut og[r * k..(r + 1) * k];
                            for &code in c {
                                let signed = f32::from_bits(v.to_bits() ^ (code & SIGN_BIT));
                                o[(code & !SIGN_BIT) as usize] += signed;
                            }
                        }
                    }
                }
            });
        }
    });
}

/// The SJLT table on one device: (index, weight) tensors per chunk of input coordinates.
type DeviceTable = (Device, Vec<(Tensor, Tensor)>);

/// A projector for inputs of one dimension `P`.
#[derive(Debug)]
pub struct Projector {
    kind: ProjectorKind,
    p: usize,
    /// The whole dense matrix `[P, k]`, when it fits the cache budget.
    dense_cache: Option<Tensor>,
    /// SJLT: `P·s` entries, each an output index with the sign in bit 31 (set: −1/√s).
    sjlt: Option<Vec<u32>>,
    /// SJLT on an accelerator: the table's index and weight tensors per chunk, uploaded once to
    /// the device they were last used on (a whole table per call crossed the bus before).
    sjlt_device: std::sync::Mutex<Option<DeviceTable>>,
}

/// Eight ±1 floats for each byte: entry `j` is +1 when bit `j` is set.
const SIGNS: [[f32; 8]; 256] = {
    let mut t = [[0.0f32; 8]; 256];
    let mut b = 0;
    while b < 256 {
        let mut j = 0;
        while j < 8 {
            t[b][j] = if (b >> j) & 1 == 1 { 1.0 } else { -1.0 };
            j += 1;
        }
        b += 1;
    }
    t
};

/// The ChaCha stream of the dense matrix's block starting at row `start`: its rows' words follow
/// each other in it.
fn block_rng(seed: u64, start: usize) -> ChaCha8Rng {
    debug_assert!(start.is_multiple_of(DENSE_BLOCK));
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream((start / DENSE_BLOCK) as u64);
    rng
}

/// Writes the next `out.len() / k` rows of the dense ±1 matrix from `rng` into `out` (row
/// major). Entry `c` of a row is bit `c % 64` of the row's `c / 64`-th word.
fn fill_dense_rows(rng: &mut ChaCha8Rng, k: usize, out: &mut [f32]) {
    debug_assert!(out.len().is_multiple_of(k));
    let rows = out.len() / k;
    // ChaCha word positions count 32-bit words; a row takes two per 64 signs.
    let row_words = 2 * k.div_ceil(64) as u128;
    let threads = (tch::get_num_threads().max(1) as usize).min(rows.max(1));
    if threads > 1 && rows >= 64 {
        // Rows split between threads, each seeking the stream to its first row: the same
        // matrix as one thread writes (single-threaded, writing the signs took ~25 % of a dense
        // scoring call on the bench model).
        let first = rng.get_word_pos();
        let per = rows.div_ceil(threads);
        std::thread::scope(|scope| {
            for (i, part) in out.chunks_mut(per * k).enumerate() {
                let mut r = rng.clone();
                r.set_word_pos(first + (i * per) as u128 * row_words);
                scope.spawn(move || fill_rows(&mut r, k, part));
            }
        });
        rng.set_word_pos(first + rows as u128 * row_words);
    } else {
        fill_rows(rng, k, out);
    }
}

fn fill_rows(rng: &mut ChaCha8Rng, k: usize, out: &mut [f32]) {
    let words_per_row = k.div_ceil(64);
    let mut row_bytes = vec![0u8; words_per_row * 8];
    for row in out.chunks_exact_mut(k) {
        for w in row_bytes.chunks_exact_mut(8) {
            w.copy_from_slice(&rng.next_u64().to_le_bytes());
        }
        // A table lookup per byte (one fixed-size 32-byte copy) instead of a branch per bit:
        // this runs P·k/8 times per call.
        let mut full = row.chunks_exact_mut(8);
        for (dst, &byte) in (&mut full).zip(&row_bytes) {
            let dst: &mut [f32; 8] = dst.try_into().expect("chunks of 8");
            *dst = SIGNS[byte as usize];
        }
        let tail = full.into_remainder();
        if !tail.is_empty() {
            let n = tail.len();
            tail.copy_from_slice(&SIGNS[row_bytes[k / 8] as usize][..n]);
        }
    }
}

/// Fills the CPU f32 tensor `buf` (`[rows+, k]`, contiguous; views returned by an earlier call
/// must be dropped first: they see the new contents) with the next `rows` rows of the dense
/// matrix from `rng` and returns the `[rows, k]` view of them.
fn dense_rows_into(
    buf: &mut Tensor,
    rng: &mut ChaCha8Rng,
    rows: usize,
    k: usize,
) -> Result<Tensor> {
    let size = buf.size();
    if buf.kind() != Kind::Float
        || buf.device() != Device::Cpu
        || !buf.is_contiguous()
        || size.len() != 2
        || size[1] != k as i64
        || (size[0] as usize) < rows
    {
        return Err(Error::Input(format!(
            "dense projection buffer must be a contiguous CPU f32 [{rows}+, {k}] tensor, got {:?} {size:?}",
            buf.kind()
        )));
    }
    // SAFETY: `buf` is a contiguous CPU f32 tensor of at least `rows · k` elements (checked
    // above), it is borrowed mutably for this call and no view of it is alive, so the slice is
    // the only access to that memory while it exists.
    let out = unsafe { std::slice::from_raw_parts_mut(buf.data_ptr() as *mut f32, rows * k) };
    fill_dense_rows(rng, k, out);
    buf.f_narrow(0, 0, rows as i64).op("dense projection block")
}

/// `[rows, k]` ±1 f32: rows `start..start + rows` of the dense matrix, in a new tensor.
fn dense_rows(seed: u64, start: usize, rows: usize, k: usize) -> Result<Tensor> {
    let mut buf = Tensor::f_empty([rows as i64, k as i64], (Kind::Float, Device::Cpu))
        .op("dense projection")?;
    dense_rows_into(&mut buf, &mut block_rng(seed, start), rows, k)
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
            sjlt_device: std::sync::Mutex::new(None),
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
                if k > SIGN_BIT as usize {
                    return Err(Error::Input(format!(
                        "SJLT dimension k {k} exceeds {SIGN_BIT}"
                    )));
                }
                let mut codes: Vec<u32> = Vec::with_capacity(p * s);
                for start in (0..p).step_by(SJLT_BLOCK) {
                    let mut rng = ChaCha8Rng::seed_from_u64(seed);
                    rng.set_stream((start / SJLT_BLOCK) as u64);
                    for _ in start..(start + SJLT_BLOCK).min(p) {
                        // s distinct buckets: split k into s equal ranges (the block construction).
                        for j in 0..s {
                            let lo = j * k / s;
                            let hi = (j + 1) * k / s;
                            let r = rng.next_u64();
                            let bucket = (lo + (r >> 1) as usize % (hi - lo)) as u32;
                            // Low bit 1: +1/√s.
                            codes.push(if r & 1 == 1 {
                                bucket
                            } else {
                                bucket | SIGN_BIT
                            });
                        }
                    }
                }
                me.sjlt = Some(codes);
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
                if dev != Device::Cpu {
                    return self.dense_generated_on(&x, seed, k, dev);
                }
                let mut out =
                    Tensor::f_zeros([*b, k as i64], (Kind::Float, dev)).op("projection")?;
                // One block buffer for the whole call: a fresh 32 MiB allocation per block is a
                // fresh mapping whose page faults cost more than filling it.
                let mut buf = Tensor::f_empty(
                    [DENSE_BLOCK.min(self.p) as i64, k as i64],
                    (Kind::Float, Device::Cpu),
                )
                .op("projection")?;
                for start in (0..self.p).step_by(DENSE_BLOCK) {
                    let rows = DENSE_BLOCK.min(self.p - start);
                    let m = dense_rows_into(&mut buf, &mut block_rng(seed, start), rows, k)?;
                    let xs = x
                        .f_narrow(1, start as i64, rows as i64)
                        .op("dense projection")?;
                    let _ = out.f_addmm_(&xs, &m).op("dense projection")?;
                }
                Ok(out)
            }
            ProjectorKind::Sjlt { k, s, .. } => {
                let codes = self
                    .sjlt
                    .as_ref()
                    .ok_or_else(|| Error::Input("SJLT table missing".into()))?;
                let scale = 1.0 / (s as f32).sqrt();
                if dev == tch::Device::Cpu {
                    let x = x.f_contiguous().op("projection")?;
                    let out =
                        Tensor::f_zeros([*b, k as i64], (Kind::Float, dev)).op("projection")?;
                    let (rows, p) = (*b as usize, self.p);
                    // SAFETY: both tensors are contiguous f32 on the CPU with these shapes and
                    // live to the end of this block; `out` is not aliased.
                    let (xs, os) = unsafe {
                        (
                            std::slice::from_raw_parts(x.data_ptr() as *const f32, rows * p),
                            std::slice::from_raw_parts_mut(out.data_ptr() as *mut f32, rows * k),
                        )
                    };
                    sjlt_cpu(codes, s, scale, xs, p, os, k);
                    return Ok(out);
                }
                self.sjlt_scatter(&x, codes, s, k)
            }
        }
    }

    /// The dense projection with its blocks generated on `dev` (`x` lives there), many streams
    /// per step: nothing of size `P × k` crosses the bus.
    fn dense_generated_on(&self, x: &Tensor, seed: u64, k: usize, dev: Device) -> Result<Tensor> {
        let b = x.size()[0];
        let mut out = Tensor::f_zeros([b, k as i64], (Kind::Float, dev)).op("projection")?;
        let step = DENSE_BLOCK * DEVICE_STREAMS;
        for start in (0..self.p).step_by(step) {
            let rows = step.min(self.p - start);
            let m = crate::dense_device::dense_rows_on(seed, start, rows, k, DENSE_BLOCK, dev)?;
            let xs = x
                .f_narrow(1, start as i64, rows as i64)
                .op("dense projection")?;
            let _ = out.f_addmm_(&xs, &m).op("dense projection")?;
        }
        Ok(out)
    }

    /// The SJLT as libtorch scatter-adds over index / weight tensors built from the table (any
    /// device), in chunks that bound the `[B, chunk·s]` temporary.
    fn sjlt_scatter(&self, x: &Tensor, codes: &[u32], s: usize, k: usize) -> Result<Tensor> {
        let (dev, b) = (x.device(), x.size()[0]);
        let mut out = Tensor::f_zeros([b, k as i64], (Kind::Float, dev)).op("projection")?;
        let mut cached = self
            .sjlt_device
            .lock()
            .map_err(|_| Error::Input("SJLT device table poisoned by a panic".into()))?;
        if cached.as_ref().is_none_or(|(d, _)| *d != dev) {
            *cached = Some((dev, self.sjlt_chunks(codes, s, dev)?));
        }
        let chunks = cached.as_ref().map_or(&[][..], |(_, c)| c.as_slice());
        for (i, (is, ws)) in chunks.iter().enumerate() {
            let start = i * SJLT_CHUNK;
            let n = SJLT_CHUNK.min(self.p - start);
            let mut f = || -> std::result::Result<(), tch::TchError> {
                let xs = x
                    .f_narrow(1, start as i64, n as i64)?
                    .f_repeat_interleave_self_int(s as i64, 1, None)?;
                let _ = out.f_index_add_(1, is, &xs.f_mul(ws)?)?;
                Ok(())
            };
            f().op("SJLT projection")?;
        }
        Ok(out)
    }

    /// The SJLT table as (index, weight) tensors on `dev`, one pair per chunk of input
    /// coordinates (bounding the `[B, chunk·s]` temporary of a scatter).
    fn sjlt_chunks(&self, codes: &[u32], s: usize, dev: Device) -> Result<Vec<(Tensor, Tensor)>> {
        let scale = 1.0 / (s as f32).sqrt();
        let mut chunks = Vec::new();
        for start in (0..self.p).step_by(SJLT_CHUNK) {
            let n = SJLT_CHUNK.min(self.p - start);
            let part = &codes[start * s..(start + n) * s];
            let idx: Vec<i64> = part.iter().map(|c| (c & !SIGN_BIT) as i64).collect();
            let w: Vec<f32> = part
                .iter()
                .map(|c| if c & SIGN_BIT == 0 { scale } else { -scale })
                .collect();
            let f = || -> std::result::Result<(Tensor, Tensor), tch::TchError> {
                Ok((
                    Tensor::f_from_slice(&idx)?.f_to_device(dev)?,
                    Tensor::f_from_slice(&w)?.f_to_device(dev)?,
                ))
            };
            chunks.push(f().op("SJLT projection")?);
        }
        Ok(chunks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The matrix as first defined: each row's stream bytes unpacked bit by bit (LSB first).
    fn reference_rows(seed: u64, start: usize, rows: usize, k: usize) -> Vec<f32> {
        let words_per_row = k.div_ceil(64);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream((start / DENSE_BLOCK) as u64);
        let mut out = Vec::with_capacity(rows * k);
        for _ in 0..rows {
            let words: Vec<u64> = (0..words_per_row).map(|_| rng.next_u64()).collect();
            for c in 0..k {
                let bit = (words[c / 64] >> (c % 64)) & 1;
                out.push(if bit == 1 { 1.0 } else { -1.0 });
            }
        }
        out
    }

    #[test]
    fn dense_rows_match_the_bitwise_definition() {
        // k not a multiple of 8 or 64 exercises the partial last byte and word.
        for (seed, start, rows, k) in [(7, 0, 5, 8192), (3, 2 * DENSE_BLOCK, 9, 77), (1, 0, 3, 5)] {
            let want = reference_rows(seed, start, rows, k);
            let got = dense_rows(seed, start, rows, k).unwrap();
            let got = Vec::<f32>::try_from(got.view([-1])).unwrap();
            assert_eq!(got, want, "seed {seed} start {start} rows {rows} k {k}");
        }
    }

    #[test]
    fn threaded_fill_equals_one_thread_and_leaves_the_stream_after_it() {
        let (rows, k) = (301, 130);
        let mut one = vec![0f32; rows * k];
        let mut rng1 = block_rng(5, DENSE_BLOCK);
        fill_rows(&mut rng1, k, &mut one);
        let saved = tch::get_num_threads();
        tch::set_num_threads(3);
        let mut many = vec![0f32; rows * k];
        let mut rng3 = block_rng(5, DENSE_BLOCK);
        fill_dense_rows(&mut rng3, k, &mut many);
        tch::set_num_threads(saved);
        assert_eq!(one, many);
        assert_eq!(rng1.next_u64(), rng3.next_u64());
    }

    #[test]
    fn device_generated_rows_equal_the_cpu_generator_bit_for_bit() {
        // Several streams with a partial last one; k with a partial last word; a single short
        // stream; one row.
        for (seed, start, rows, k) in [
            (7u64, 0usize, 2 * DENSE_BLOCK + 37, 96usize),
            (3, 3 * DENSE_BLOCK, 9, 77),
            (1, 0, 1, 5),
            (u64::MAX, DENSE_BLOCK, DENSE_BLOCK, 130),
        ] {
            let mut cpu = Vec::new();
            for s in (start..start + rows).step_by(DENSE_BLOCK) {
                let n = DENSE_BLOCK.min(start + rows - s);
                let t = dense_rows(seed, s, n, k).unwrap();
                cpu.extend(Vec::<f32>::try_from(t.view([-1])).unwrap());
            }
            let dev =
                crate::dense_device::dense_rows_on(seed, start, rows, k, DENSE_BLOCK, Device::Cpu)
                    .unwrap();
            assert_eq!(dev.size(), [rows as i64, k as i64]);
            let dev = Vec::<f32>::try_from(dev.view([-1])).unwrap();
            assert!(cpu == dev, "seed {seed} start {start} rows {rows} k {k}");
        }
    }

    #[test]
    fn projecting_with_device_generated_blocks_equals_the_cpu_path() {
        let (p, k) = (DENSE_BLOCK * DEVICE_STREAMS + 3 * DENSE_BLOCK + 11, 64);
        let proj = Projector::new(ProjectorKind::Dense { k, seed: 4 }, p, 0).unwrap();
        tch::manual_seed(2);
        let x = Tensor::randn([5, p as i64], (Kind::Float, Device::Cpu));
        let cpu = proj.project(&x).unwrap();
        let on_device = proj.dense_generated_on(&x, 4, k, Device::Cpu).unwrap();
        let err = (&cpu - &on_device).abs().max().double_value(&[]);
        let scale = cpu.abs().max().double_value(&[]);
        assert!(err <= 1e-5 * scale, "max |Δ| {err} (scale {scale})");
    }

    #[test]
    fn blockwise_dense_projection_equals_the_cached_matrix() {
        let (p, k) = (2 * DENSE_BLOCK + 37, 96);
        let kind = ProjectorKind::Dense { k, seed: 11 };
        let streamed = Projector::new(kind, p, 0).unwrap();
        let cached = Projector::new(kind, p, usize::MAX).unwrap();
        let x = Tensor::randn([3, p as i64], (Kind::Float, Device::Cpu));
        let (a, b) = (streamed.project(&x).unwrap(), cached.project(&x).unwrap());
        let err = (&a - &b).abs().max().double_value(&[]);
        let scale = b.abs().max().double_value(&[]);
        assert!(err <= 1e-5 * scale, "max |Δ| {err} (scale {scale})");
    }
}

#[cfg(test)]
mod sjlt_tests {
    use super::*;

    #[test]
    fn cpu_sjlt_equals_the_scatter_definition() {
        // Odd sizes: rows not a multiple of the group, P not a multiple of the hash block.
        let (rows, p, k) = (11usize, SJLT_BLOCK + 777, 96usize);
        let proj = Projector::new(ProjectorKind::Sjlt { k, s: 4, seed: 9 }, p, 0).unwrap();
        tch::manual_seed(5);
        let x = Tensor::randn([rows as i64, p as i64], (Kind::Float, tch::Device::Cpu));
        let got = proj.project(&x).unwrap();
        let codes = proj.sjlt.as_ref().unwrap();
        let want = proj.sjlt_scatter(&x, codes, 4, k).unwrap();
        let err = (&got - &want).abs().max().double_value(&[]);
        let scale = want.abs().max().double_value(&[]);
        assert!(err <= 1e-5 * scale, "max error {err} at scale {scale}");
    }
}
