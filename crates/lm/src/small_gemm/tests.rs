//! The small-row path declines what it does not handle; every kernel variant this CPU has agrees
//! with a double-precision product, and gives a row the same bits alone and in a batch.

use tch::{Device, Kind, Tensor};

use super::linear;

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

/// Each kernel variant this CPU supports (AVX-512 and AVX2 on an AVX-512 machine).
#[cfg(target_arch = "x86_64")]
mod kernels {
    use super::super::MAX_ROWS;
    use super::super::x86::{available, linear_on};
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
