//! optimsyn-lm benchmarks (filled in with docs/PERFORMANCE.md).

fn main() {}
