//! `x Wᵀ` for one to eight rows of `x` on an AVX-512 CPU (or an AMD one with AVX2), for decoding
//! without gradients.
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
//! spinning against each other on few cores. Where that runtime or the vector extension is
//! missing (AVX-512; on AMD CPUs AVX2 + FMA will do), or gradients are needed, [`linear`] returns
//! `None` and the caller uses libtorch; `OPTIMSYN_SMALL_GEMM=off` does that always, `=avx2` runs
//! the AVX2 + FMA variant on any CPU that has it.

use tch::{Device, Kind, Tensor};

#[cfg(target_arch = "x86_64")]
mod kernels;
#[cfg(target_arch = "x86_64")]
mod omp;
#[cfg(test)]
mod tests;
#[cfg(target_arch = "x86_64")]
mod x86;

type TchResult<T> = std::result::Result<T, tch::TchError>;

/// The largest row count this path takes; above it MKL's kernels do as well or better.
pub(crate) const MAX_ROWS: i64 = 8;

/// `x Wᵀ + b` for `x` `[…, in]` with at most [`MAX_ROWS`] rows, or `None` when this path does not
/// apply (no kernel for this CPU, not f32 on the CPU, gradients required, odd layouts).
pub(crate) fn linear(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> Option<TchResult<Tensor>> {
    #[cfg(target_arch = "x86_64")]
    {
        x86::linear(x, weight, bias)
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
