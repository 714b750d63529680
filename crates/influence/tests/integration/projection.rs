//! Johnson–Lindenstrauss: projected inner products stay close to the true ones, for both
//! projectors; the same seed gives the same matrix.

use optimsyn_influence::{Projector, ProjectorKind};
use proptest::prelude::*;
use tch::{Kind, Tensor};

fn check(kind: ProjectorKind, scale: f64, seed: i64) {
    // 120 rows give 7140 distinct pairs: enough that the share within the bound (~0.997 in
    // expectation at 3σ) does not swing below 0.99 on an unlucky draw, as it did with 40 rows.
    let (p, k, n) = (3000usize, 1024usize, 120i64);
    let proj = Projector::new(kind, p, 1 << 30).unwrap();
    tch::manual_seed(seed);
    let x = Tensor::randn([n, p as i64], (Kind::Float, tch::Device::Cpu));
    let y = proj.project(&x).unwrap() * scale;
    let exact = x.matmul(&x.tr());
    let approx = y.matmul(&y.tr());
    let norms = x.norm_scalaropt_dim(2, [1i64].as_slice(), true);
    let bound = norms.matmul(&norms.tr()) * (3.0 / (k as f64).sqrt());
    // Pairs of distinct rows, each once: a row with itself is its squared norm, whose estimate
    // has twice the variance and is not what the JL bound on pairs is about.
    let pairs = Tensor::ones([n, n], (Kind::Bool, tch::Device::Cpu)).triu(1);
    let ok = (exact - approx)
        .abs()
        .le_tensor(&bound)
        .masked_select(&pairs)
        .to_kind(Kind::Float)
        .mean(Kind::Float)
        .double_value(&[]);
    assert!(ok >= 0.99, "{kind:?}: only {ok} of pairs within 3/sqrt(k)");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4))]
    #[test]
    fn jl_inner_products(seed in 0i64..1000, proj_seed in 0u64..1000) {
        let k = 1024;
        check(ProjectorKind::Dense { k, seed: proj_seed }, 1.0 / (k as f64).sqrt(), seed);
        check(ProjectorKind::Sjlt { k, s: 4, seed: proj_seed }, 1.0, seed);
    }
}

#[test]
fn same_seed_same_projection_cached_or_blockwise() {
    let x = Tensor::randn([3, 2500], (Kind::Float, tch::Device::Cpu));
    let kind = ProjectorKind::Dense { k: 300, seed: 9 };
    let cached = Projector::new(kind, 2500, 1 << 30)
        .unwrap()
        .project(&x)
        .unwrap();
    let blockwise = Projector::new(kind, 2500, 0).unwrap().project(&x).unwrap();
    assert!((&cached - &blockwise).abs().max().double_value(&[]) < 1e-3);
    let other = Projector::new(ProjectorKind::Dense { k: 300, seed: 10 }, 2500, 0)
        .unwrap()
        .project(&x)
        .unwrap();
    assert!((&cached - &other).abs().max().double_value(&[]) > 1.0);
    // One row alone projects as it does in a batch.
    let one = Projector::new(kind, 2500, 0)
        .unwrap()
        .project(&x.narrow(0, 1, 1))
        .unwrap();
    assert!((one - cached.narrow(0, 1, 1)).abs().max().double_value(&[]) < 1e-3);
}

/// On a CUDA machine the dense blocks are generated on the GPU: the projection must equal the
/// CPU one (same signs; only the float accumulation order may differ), and so must the SJLT.
/// A CPU-only machine has nothing to compare and says so.
#[test]
fn projections_on_cuda_equal_the_cpu_ones() {
    if !tch::Cuda::is_available() {
        eprintln!("no CUDA device: the cpu-vs-cuda projection check is skipped on this machine");
        return;
    }
    let (p, n) = (40_000usize, 6i64);
    tch::manual_seed(3);
    let x = Tensor::randn([n, p as i64], (Kind::Float, tch::Device::Cpu));
    for kind in [
        ProjectorKind::Dense { k: 512, seed: 9 },
        ProjectorKind::Sjlt {
            k: 512,
            s: 4,
            seed: 9,
        },
    ] {
        // cache_bytes 0: the dense matrix is generated blockwise where the input lives.
        let proj = Projector::new(kind, p, 0).unwrap();
        let cpu = proj.project(&x).unwrap();
        let gpu = proj
            .project(&x.to_device(tch::Device::Cuda(0)))
            .unwrap()
            .to_device(tch::Device::Cpu);
        let err = (&cpu - &gpu).abs().max().double_value(&[]);
        let scale = cpu.abs().max().double_value(&[]);
        assert!(
            err <= 1e-5 * scale,
            "{kind:?}: max |Δ| {err} at scale {scale}"
        );
    }
}
