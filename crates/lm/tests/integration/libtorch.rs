//! The test binary starts without `LD_LIBRARY_PATH` (rpath from build.rs) and libtorch computes.

#[test]
fn libtorch_loads_and_computes() {
    let a = tch::Tensor::from_slice(&[1.0f32, 2.0, 3.0]);
    let s = (&a * &a).sum(tch::Kind::Float).double_value(&[]);
    assert_eq!(s, 14.0);
    assert!(std::env::var_os("LD_LIBRARY_PATH").is_none_or(|p| !p.to_string_lossy().contains("torch")));
}
