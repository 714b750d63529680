//! Build script: rpath to libtorch for this package's test and binary targets.

// Test, bench, example and binary targets load libtorch at run time: give them an rpath to the lib
// folder torch-sys found (it exports it to direct dependents only), and keep libtorch_cuda linked.
fn main() {
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys exports its lib folder");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch");
}
