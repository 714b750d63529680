//! The register-blocked `x Wᵀ` kernels: `MR` rows of `x` against `NR` rows of `W`, prefetching
//! `W` ahead when `PF`.

use std::arch::x86_64::*;

/// `y[i, j] = Σₖ x[i, k] w[j, k]` for `MR` rows of `x` and `NR` rows of `w`, `y` with row
/// stride `ldy`. Each sum runs over 16 lanes of k-strided partial sums, then across the lanes.
// Index loops: the accumulators are a register tile addressed by (j, i) on both sides.
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn block<const MR: usize, const NR: usize, const PF: bool>(
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
                    _mm_prefetch::<_MM_HINT_T1>(w.wrapping_add((4 * NR + j) * k + kk) as *const i8);
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
pub(super) unsafe fn block2<const MR: usize, const NR: usize, const PF: bool>(
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
                    _mm_prefetch::<_MM_HINT_T1>(w.wrapping_add((4 * NR + j) * k + kk) as *const i8);
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
