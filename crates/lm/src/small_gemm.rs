//! `x Wᵀ` for one to eight rows of `x` on an AVX-512 CPU, for decoding without gradients.
//!
//! MKL's sgemm at a handful of rows (batched decoding, the GRPO rollout's late steps) computes
//! each weight matrix at ~20 GFLOP/s per core because the weights it streams are not prefetched
//! far enough ahead: measured on the bench model's 57 projections plus head at 8 rows, one thread,
//! 21.5 ms per step against 10.5 ms here. This kernel reads the row-major weights (`[out, in]`, as
//! checkpoints store them) once, a few output rows at a time against every input row, prefetching
//! four blocks ahead into L2 while it computes; threads split the output rows. Each output element
//! is the same sum in the same order whatever the number of rows, so a row's result does not
//! depend on the batch it is decoded in.
//!
//! Threads come from the OpenMP runtime libtorch itself runs on (`GOMP_parallel`, found at run
//! time), so the kernel and libtorch's own ops share one pool instead of two sets of threads
//! spinning against each other on few cores. Where that runtime or AVX-512 is missing, or
//! gradients are needed, [`linear`] returns `None` and the caller uses libtorch;
//! `OPTIMSYN_SMALL_GEMM=off` does that always, `=avx2` opts into the AVX2 + FMA variant.

use tch::{Device, Kind, Tensor};

type TchResult<T> = std::result::Result<T, tch::TchError>;

/// The largest row count this path takes; above it MKL's kernels do as well or better.
pub(crate) const MAX_ROWS: i64 = 8;

/// `x Wᵀ + b` for `x` `[…, in]` with at most [`MAX_ROWS`] rows, or `None` when this path does not
/// apply (not an AVX-512 CPU, not f32 on the CPU, gradients required, odd layouts).
pub(crate) fn linear(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> Option<TchResult<Tensor>> {
    #[cfg(target_arch = "x86_64")]
    {
        imp::linear(x, weight, bias)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (x, weight, bias);
        None
    }
}

fn applies(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> bool {
    // Whatever the grad mode, a product of tensors none of which requires grad has no graph.
    let grad =
        x.requires_grad() || weight.requires_grad() || bias.is_some_and(|b| b.requires_grad());
    !grad
        && x.device() == Device::Cpu
        && weight.device() == Device::Cpu
        && x.kind() == Kind::Float
        && weight.kind() == Kind::Float
        && bias.is_none_or(|b| b.kind() == Kind::Float && b.device() == Device::Cpu)
        && weight.dim() == 2
        && weight.is_contiguous()
}

#[cfg(target_arch = "x86_64")]
mod imp {
    use std::arch::x86_64::*;
    use std::ffi::c_void;
    use std::sync::OnceLock;

    use super::{MAX_ROWS, TchResult, applies};
    use tch::{Kind, Tensor};

    type Body = unsafe extern "C" fn(*mut c_void);
    type Parallel = unsafe extern "C" fn(Body, *mut c_void, u32, u32);
    type ThreadNum = unsafe extern "C" fn() -> i32;

    struct Omp {
        parallel: Parallel,
        thread_num: ThreadNum,
        num_threads: ThreadNum,
    }

    /// libgomp's entry points, if libtorch loaded it into this process.
    fn omp() -> Option<&'static Omp> {
        static OMP: OnceLock<Option<Omp>> = OnceLock::new();
        OMP.get_or_init(|| {
            // SAFETY: dlsym only looks the names up; the signatures are libgomp's stable ABI
            // (`GOMP_parallel` since GCC 4.9, the `omp_*` queries since OpenMP 1.0).
            unsafe {
                let find = |name: &std::ffi::CStr| libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr());
                let (p, t, n) = (
                    find(c"GOMP_parallel"),
                    find(c"omp_get_thread_num"),
                    find(c"omp_get_num_threads"),
                );
                if p.is_null() || t.is_null() || n.is_null() {
                    return None;
                }
                Some(Omp {
                    parallel: std::mem::transmute::<*mut c_void, Parallel>(p),
                    thread_num: std::mem::transmute::<*mut c_void, ThreadNum>(t),
                    num_threads: std::mem::transmute::<*mut c_void, ThreadNum>(n),
                })
            }
        })
        .as_ref()
    }

    /// The vector extension the kernel runs on.
    #[derive(Clone, Copy, PartialEq, Debug)]
    pub(super) enum Isa {
        Avx512,
        /// AVX2 with FMA (8 lanes, 16 registers), opt-in: CPUs without AVX-512 (AMD before Zen 4).
        Avx2,
    }

    /// `OPTIMSYN_SMALL_GEMM=off` uses libtorch for every row count, `avx2` the AVX2 variant
    /// (wherever the CPU has AVX2 + FMA); anything else (or unset) the AVX-512 one where the CPU
    /// has it. Read once.
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
            // AVX2 is opt-in: on this AVX-512 machine it decoded no faster than MKL at 8 rows
            // and slower at one (it has half the registers for the tile), so by default
            // AVX2-only CPUs keep MKL until the variant is measured on one.
            std::arch::is_x86_feature_detected!("avx512f").then_some(Isa::Avx512)
        })
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
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
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

    /// `y[i, j] = Σₖ x[i, k] w[j, k]` for `MR` rows of `x` and `NR` rows of `w`, `y` with row
    /// stride `ldy`. Each sum runs over 16 lanes of k-strided partial sums, then across the lanes.
    // Index loops: the accumulators are a register tile addressed by (j, i) on both sides.
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx512f")]
    unsafe fn block<const MR: usize, const NR: usize, const PF: bool>(
        x: *const f32,
        k: usize,
        w: *const f32,
        y: *mut f32,
        ldy: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); MR]; NR];
        let mut kk = 0;
        // SAFETY (whole body): the caller guarantees `x` holds MR rows of k floats, `w` NR rows,
        // `y` MR rows of stride ldy with NR columns; the tail uses masked loads.
        unsafe {
            while kk + 16 <= k {
                let mut wv = [_mm512_setzero_ps(); NR];
                for (j, v) in wv.iter_mut().enumerate() {
                    *v = _mm512_loadu_ps(w.add(j * k + kk));
                }
                if PF {
                    // Four blocks ahead into L2: the best of 1-16 blocks, L1 or L2, measured at
                    // 8 rows over the bench model's weights.
                    for j in 0..NR {
                        _mm_prefetch::<_MM_HINT_T1>(
                            w.wrapping_add((4 * NR + j) * k + kk) as *const i8
                        );
                    }
                }
                for i in 0..MR {
                    let xv = _mm512_loadu_ps(x.add(i * k + kk));
                    for j in 0..NR {
                        acc[j][i] = _mm512_fmadd_ps(wv[j], xv, acc[j][i]);
                    }
                }
                kk += 16;
            }
            if kk < k {
                let mask: __mmask16 = ((1u32 << (k - kk)) - 1) as u16;
                let mut wv = [_mm512_setzero_ps(); NR];
                for (j, v) in wv.iter_mut().enumerate() {
                    *v = _mm512_maskz_loadu_ps(mask, w.add(j * k + kk));
                }
                for i in 0..MR {
                    let xv = _mm512_maskz_loadu_ps(mask, x.add(i * k + kk));
                    for j in 0..NR {
                        acc[j][i] = _mm512_fmadd_ps(wv[j], xv, acc[j][i]);
                    }
                }
            }
            if MR * NR == 16 {
                let mut flat = [_mm512_setzero_ps(); 16];
                for j in 0..NR {
                    for i in 0..MR {
                        flat[j * MR + i] = acc[j][i];
                    }
                }
                let mut sums = [0f32; 16];
                _mm512_storeu_ps(sums.as_mut_ptr(), reduce16(&flat));
                for (e, &v) in sums.iter().enumerate() {
                    // Lane e holds input 4·(e mod 4) + e div 4 (see reduce16).
                    let idx = 4 * (e % 4) + e / 4;
                    *y.add((idx % MR) * ldy + idx / MR) = v;
                }
            } else {
                for i in 0..MR {
                    for j in 0..NR {
                        *y.add(i * ldy + j) = _mm512_reduce_add_ps(acc[j][i]);
                    }
                }
            }
        }
    }

    /// [`block`] on AVX2 + FMA: 8 lanes, each sum over 8 k-strided partial sums, then across
    /// the lanes in the same order for every output.
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn block2<const MR: usize, const NR: usize, const PF: bool>(
        x: *const f32,
        k: usize,
        w: *const f32,
        y: *mut f32,
        ldy: usize,
    ) {
        let mut acc = [[_mm256_setzero_ps(); MR]; NR];
        let mut kk = 0;
        // SAFETY (whole body): as for `block`; the tail uses masked loads.
        unsafe {
            while kk + 8 <= k {
                let mut wv = [_mm256_setzero_ps(); NR];
                for (j, v) in wv.iter_mut().enumerate() {
                    *v = _mm256_loadu_ps(w.add(j * k + kk));
                }
                if PF && kk % 16 == 0 {
                    // One prefetch per 64-byte line.
                    for j in 0..NR {
                        _mm_prefetch::<_MM_HINT_T1>(
                            w.wrapping_add((4 * NR + j) * k + kk) as *const i8
                        );
                    }
                }
                for i in 0..MR {
                    let xv = _mm256_loadu_ps(x.add(i * k + kk));
                    for j in 0..NR {
                        acc[j][i] = _mm256_fmadd_ps(wv[j], xv, acc[j][i]);
                    }
                }
                kk += 8;
            }
            if kk < k {
                let lanes: [i32; 8] = std::array::from_fn(|l| if kk + l < k { -1 } else { 0 });
                let mask = _mm256_loadu_si256(lanes.as_ptr() as *const __m256i);
                let mut wv = [_mm256_setzero_ps(); NR];
                for (j, v) in wv.iter_mut().enumerate() {
                    *v = _mm256_maskload_ps(w.add(j * k + kk), mask);
                }
                for i in 0..MR {
                    let xv = _mm256_maskload_ps(x.add(i * k + kk), mask);
                    for j in 0..NR {
                        acc[j][i] = _mm256_fmadd_ps(wv[j], xv, acc[j][i]);
                    }
                }
            }
            for i in 0..MR {
                for j in 0..NR {
                    let v = acc[j][i];
                    let q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
                    let d = _mm_add_ps(q, _mm_movehl_ps(q, q));
                    let o = _mm_add_ss(d, _mm_shuffle_ps::<1>(d, d));
                    *y.add(i * ldy + j) = _mm_cvtss_f32(o);
                }
            }
        }
    }

    /// The sixteen horizontal sums of `a` in one vector, in 45 shuffles and adds instead of
    /// sixteen separate reductions (~140): lane `4L + c` holds the sum of `a[4c + L]`. Each level
    /// halves the partial sums per input and doubles the inputs per vector.
    #[target_feature(enable = "avx512f")]
    fn reduce16(a: &[__m512; 16]) -> __m512 {
        // 256-bit halves: s[p] = a[2p]'s eight partials | a[2p + 1]'s.
        let s: [__m512; 8] = std::array::from_fn(|p| {
            let (x, y) = (a[2 * p], a[2 * p + 1]);
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x44>(x, y),
                _mm512_shuffle_f32x4::<0xEE>(x, y),
            )
        });
        // 128-bit quarters: u[p] quarter q = a[4p + q]'s four partials.
        let u: [__m512; 4] = std::array::from_fn(|p| {
            let (x, y) = (s[2 * p], s[2 * p + 1]);
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x88>(x, y),
                _mm512_shuffle_f32x4::<0xDD>(x, y),
            )
        });
        // Within quarters: w[p] quarter L = two partials of a[8p + L], two of a[8p + 4 + L].
        let w: [__m512; 2] = std::array::from_fn(|p| {
            let (x, y) = (u[2 * p], u[2 * p + 1]);
            _mm512_add_ps(
                _mm512_shuffle_ps::<0x44>(x, y),
                _mm512_shuffle_ps::<0xEE>(x, y),
            )
        });
        _mm512_add_ps(
            _mm512_shuffle_ps::<0x88>(w[0], w[1]),
            _mm512_shuffle_ps::<0xDD>(w[0], w[1]),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declines_what_it_does_not_handle() {
        let w = Tensor::randn([16, 16], (Kind::Float, Device::Cpu));
        let x = Tensor::randn([9, 16], (Kind::Float, Device::Cpu));
        assert!(linear(&x, &w, None).is_none(), "9 rows");
        let wg = w.set_requires_grad(true);
        assert!(linear(&x.narrow(0, 0, 2), &wg, None).is_none(), "grad");
        let xd = x.to_kind(Kind::Double);
        assert!(linear(&xd, &w.to_kind(Kind::Double), None).is_none(), "f64");
        assert!(
            linear(&x.narrow(0, 0, 2), &w.tr(), None).is_none(),
            "transposed weight"
        );
    }
}

/// Each kernel variant this CPU supports (AVX-512 and AVX2 on an AVX-512 machine).
#[cfg(all(test, target_arch = "x86_64"))]
mod kernel_tests {
    use super::imp::{available, linear_on};
    use super::*;

    fn reference(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Tensor {
        let x = x.to_kind(Kind::Double);
        let y = x.matmul(&w.to_kind(Kind::Double).tr());
        match b {
            Some(b) => y + b.to_kind(Kind::Double),
            None => y,
        }
    }

    #[test]
    fn equals_a_double_precision_product_for_every_row_count_and_odd_shapes() {
        tch::manual_seed(3);
        let _g = tch::no_grad_guard();
        for isa in available() {
            for &(out, inp) in &[(64, 512), (67, 37), (130, 16), (5, 3), (1, 1)] {
                let w = Tensor::randn([out, inp], (Kind::Float, Device::Cpu));
                let b = Tensor::randn([out], (Kind::Float, Device::Cpu));
                for rows in 1..=MAX_ROWS {
                    for bias in [None, Some(&b)] {
                        let x = Tensor::randn([rows, 1, inp], (Kind::Float, Device::Cpu));
                        let y = linear_on(&x, &w, bias, isa).expect("applies").unwrap();
                        assert_eq!(y.size(), vec![rows, 1, out]);
                        let err = (y.to_kind(Kind::Double) - reference(&x, &w, bias))
                            .abs()
                            .max()
                            .double_value(&[]);
                        assert!(
                            err < 1e-4 * (inp as f64).sqrt(),
                            "{isa:?} {out}x{inp}, {rows} rows: {err}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_row_gives_the_same_bits_alone_and_in_a_batch() {
        let _g = tch::no_grad_guard();
        let w = Tensor::randn([300, 203], (Kind::Float, Device::Cpu));
        let x = Tensor::randn([8, 203], (Kind::Float, Device::Cpu));
        for isa in available() {
            let all = linear_on(&x, &w, None, isa).expect("applies").unwrap();
            for rows in 1..=8 {
                let part = linear_on(&x.narrow(0, 0, rows), &w, None, isa)
                    .expect("applies")
                    .unwrap();
                assert!(part.equal(&all.narrow(0, 0, rows)), "{isa:?}, {rows} rows");
            }
        }
    }
}
