//! Which kernel runs (AVX-512, or AVX2 + FMA), and the threaded driver that splits the output rows
//! over libgomp's threads.

use std::ffi::c_void;
use std::sync::OnceLock;

use tch::{Kind, Tensor};

use super::kernels::{block, block2};
use super::omp::{Omp, omp};
use super::{MAX_ROWS, TchResult, applies};

/// The vector extension the kernel runs on.
#[derive(Clone, Copy, PartialEq, Debug)]
pub(super) enum Isa {
    Avx512,
    /// AVX2 with FMA (8 lanes, 16 registers): AMD CPUs without AVX-512 (before Zen 4).
    Avx2,
}

/// `OPTIMSYN_SMALL_GEMM=off` uses libtorch for every row count, `avx2` the AVX2 variant
/// (wherever the CPU has AVX2 + FMA); anything else (or unset) picks per CPU (see [`isa`]).
/// Read once.
const ENV: &str = "OPTIMSYN_SMALL_GEMM";

fn isa() -> Option<Isa> {
    static HAS: OnceLock<Option<Isa>> = OnceLock::new();
    *HAS.get_or_init(|| {
        let avx2 = std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma");
        match std::env::var(ENV).ok().as_deref() {
            Some("off") => return None,
            Some("avx2") => return avx2.then_some(Isa::Avx2),
            _ => {}
        }
        if std::arch::is_x86_feature_detected!("avx512f") {
            return Some(Isa::Avx512);
        }
        // Without AVX-512: on an AMD core limited to AVX2 (libtorch, MKL and this kernel), the
        // AVX2 variant decoded the bench model 2.3x as fast as MKL at batch 1 and 1.8x at batch
        // 8 (docs/PERFORMANCE.md), MKL's small-row kernels being slow on AMD. On Intel, against
        // an AVX-512 MKL, it was no faster at 8 rows and slower at one, and no AVX2-only Intel
        // was measured, so there MKL stays.
        (avx2 && amd_cpu()).then_some(Isa::Avx2)
    })
}

/// An AMD (or Hygon, the same cores) CPU, from CPUID's vendor string.
fn amd_cpu() -> bool {
    let id = std::arch::x86_64::__cpuid(0);
    let vendor: Vec<u8> = [id.ebx, id.edx, id.ecx]
        .iter()
        .flat_map(|r| r.to_le_bytes())
        .collect();
    matches!(vendor.as_slice(), b"AuthenticAMD" | b"HygonGenuine")
}

pub(super) fn linear(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> Option<TchResult<Tensor>> {
    linear_on(x, weight, bias, isa()?)
}

/// The vector extensions this CPU can run the kernel on (tests run each).
#[cfg(test)]
pub(super) fn available() -> Vec<Isa> {
    let mut v = Vec::new();
    if std::arch::is_x86_feature_detected!("avx512f") {
        v.push(Isa::Avx512);
    }
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        v.push(Isa::Avx2);
    }
    v
}

pub(super) fn linear_on(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    isa: Isa,
) -> Option<TchResult<Tensor>> {
    let size = x.size();
    let &[out, inp] = weight.size().as_slice() else {
        return None;
    };
    let rows = size.iter().rev().skip(1).product::<i64>();
    if !(1..=MAX_ROWS).contains(&rows)
        || size.last() != Some(&inp)
        || inp == 0
        || out == 0
        || !applies(x, weight, bias)
    {
        return None;
    }
    let threads = tch::get_num_threads().max(1);
    let omp = omp();
    if threads > 1 && omp.is_none() {
        return None;
    }
    Some(run(
        x, weight, bias, rows, inp, out, size, threads, omp, isa,
    ))
}

#[allow(clippy::too_many_arguments)]
fn run(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    rows: i64,
    inp: i64,
    out: i64,
    mut shape: Vec<i64>,
    threads: i32,
    omp: Option<&'static Omp>,
    isa: Isa,
) -> TchResult<Tensor> {
    let x = x.f_reshape([rows, inp])?.f_contiguous()?;
    let y = Tensor::f_empty([rows, out], (Kind::Float, x.device()))?;
    let job = Job {
        m: rows as usize,
        k: inp as usize,
        n: out as usize,
        x: x.data_ptr() as *const f32,
        w: weight.data_ptr() as *const f32,
        y: y.data_ptr() as *mut f32,
        isa,
    };
    match omp {
        Some(o) if threads > 1 && job.n >= 64 => {
            // SAFETY: `job` outlives the parallel region (GOMP_parallel returns after every
            // thread finished), and the threads write disjoint column ranges of `y`.
            unsafe {
                let ctx = (&job, o);
                (o.parallel)(
                    body,
                    &ctx as *const (&Job, &Omp) as *mut c_void,
                    threads as u32,
                    0,
                )
            };
        }
        // SAFETY: the pointers are the live, contiguous f32 buffers described by `job`.
        _ => unsafe { job.columns(0, job.n) },
    }
    let y = match bias {
        Some(b) => y.f_add(b)?,
        None => y,
    };
    if let Some(last) = shape.last_mut() {
        *last = out;
    }
    y.f_reshape(shape.as_slice())
}

/// One `y = x Wᵀ` over raw row-major buffers: `x` `[m, k]`, `w` `[n, k]`, `y` `[m, n]`.
struct Job {
    m: usize,
    k: usize,
    n: usize,
    x: *const f32,
    w: *const f32,
    y: *mut f32,
    isa: Isa,
}

unsafe extern "C" fn body(ctx: *mut c_void) {
    // SAFETY: `ctx` is the `(&Job, &Omp)` that `run` passed to GOMP_parallel.
    unsafe {
        let (job, omp) = *(ctx as *const (&Job, &Omp));
        let (t, nt) = (
            (omp.thread_num)() as usize,
            (omp.num_threads)().max(1) as usize,
        );
        // Chunks in multiples of 16 rows of W keep every thread on whole register blocks.
        let chunk = job.n.div_ceil(nt).div_ceil(16) * 16;
        let (n0, n1) = ((t * chunk).min(job.n), ((t + 1) * chunk).min(job.n));
        if n0 < n1 {
            job.columns(n0, n1);
        }
    }
}

impl Job {
    /// Output columns `n0..n1` of every row.
    ///
    /// # Safety
    /// The buffers must be valid for the shapes in `self`, the CPU must have `self.isa`.
    // `n + NR <= n1` reads as the block bound even when NR is 1.
    #[allow(clippy::int_plus_one)]
    unsafe fn columns(&self, n0: usize, n1: usize) {
        macro_rules! go {
            ($block:ident, $mr:literal, $nr:literal, $pf:literal) => {{
                let mut n = n0;
                // SAFETY: every block reads rows n..n+NR of W (< n1 ≤ self.n) and writes
                // columns n..n+NR of y; the prefetched addresses may run past W, which
                // prefetch tolerates.
                unsafe {
                    while n + $nr <= n1 {
                        $block::<$mr, $nr, $pf>(
                            self.x,
                            self.k,
                            self.w.add(n * self.k),
                            self.y.add(n),
                            self.n,
                        );
                        n += $nr;
                    }
                    while n < n1 {
                        $block::<$mr, 1, false>(
                            self.x,
                            self.k,
                            self.w.add(n * self.k),
                            self.y.add(n),
                            self.n,
                        );
                        n += 1;
                    }
                }
            }};
        }
        // One row is bandwidth-bound and the hardware prefetcher keeps up; from two rows on
        // the compute per weight line leaves it behind without the explicit prefetch.
        match (self.isa, self.m) {
            (Isa::Avx512, 1) => go!(block, 1, 16, false),
            (Isa::Avx512, 2) => go!(block, 2, 8, true),
            (Isa::Avx512, 3) => go!(block, 3, 4, true),
            (Isa::Avx512, 4) => go!(block, 4, 4, true),
            (Isa::Avx512, 5) => go!(block, 5, 2, true),
            (Isa::Avx512, 6) => go!(block, 6, 2, true),
            (Isa::Avx512, 7) => go!(block, 7, 2, true),
            (Isa::Avx512, _) => go!(block, 8, 2, true),
            // Twelve accumulators at most, leaving registers for the loads.
            (Isa::Avx2, 1) => go!(block2, 1, 8, false),
            (Isa::Avx2, 2) => go!(block2, 2, 4, true),
            (Isa::Avx2, 3) => go!(block2, 3, 3, true),
            (Isa::Avx2, 4) => go!(block2, 4, 2, true),
            (Isa::Avx2, 5) => go!(block2, 5, 2, true),
            (Isa::Avx2, 6) => go!(block2, 6, 2, true),
            (Isa::Avx2, 7) => go!(block2, 7, 1, true),
            (Isa::Avx2, _) => go!(block2, 8, 1, true),
        }
    }
}

#[cfg(test)]
mod vendor_tests {
    #[test]
    fn the_vendor_is_the_one_the_kernel_reports() {
        let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") else {
            return; // not Linux: nothing to compare with
        };
        let listed = info.lines().any(|l| {
            l.starts_with("vendor_id") && (l.contains("AuthenticAMD") || l.contains("HygonGenuine"))
        });
        assert_eq!(super::amd_cpu(), listed);
    }
}
