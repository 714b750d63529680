//! The test binary starts without `LD_LIBRARY_PATH` help (rpath from build.rs) and libtorch computes.
//! (`cargo test` itself puts torch-sys's link-search folder on `LD_LIBRARY_PATH`, so the rpath is
//! checked on the binary, not through the environment.)

#[test]
fn libtorch_loads_and_computes() {
    let a = tch::Tensor::from_slice(&[1.0f32, 2.0, 3.0]);
    let s = (&a * &a).sum(tch::Kind::Float).double_value(&[]);
    assert_eq!(s, 14.0);
    let exe = std::env::current_exe().expect("test binary path");
    let bytes = std::fs::read(exe).expect("read test binary");
    let needle = b"site-packages/torch/lib";
    assert!(
        bytes.windows(needle.len()).any(|w| w == needle),
        "no rpath to libtorch in the test binary"
    );
}
