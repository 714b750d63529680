//! Bounded-time fuzzing of every parser here that reads untrusted bytes (issue #20, item 7):
//! safetensors files and model folders ([`safetensors`], [`model_folder`]), JSONL rows
//! ([`jsonl`]), and chat templates with the conversations they render ([`template`]). There is
//! no nightly toolchain for cargo-fuzz, so these are proptest properties over arbitrary bytes and
//! over mutated valid inputs; each asserts that the parser returns a value or an error naming the
//! file (and line or field), never panics, and that what it accepts is consistent.
//!
//! Each property runs a few dozen cases by default, so the whole module adds seconds to the test
//! suite. For a longer hunt set `OPTIMSYN_FUZZ_CASES` (cases per property), e.g.
//! `OPTIMSYN_FUZZ_CASES=20000 cargo test -p optimsyn-data-io --test integration fuzz`. Inputs that
//! once made a parser panic are kept as plain regression tests next to the property that found
//! them.

mod jsonl;
mod model_folder;
mod mutate;
mod safetensors;
mod template;

use proptest::test_runner::Config;

/// `default` cases per property, or `OPTIMSYN_FUZZ_CASES` when it is set.
pub fn cases(default: u32) -> Config {
    let cases = std::env::var("OPTIMSYN_FUZZ_CASES")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default);
    Config {
        cases,
        // Shrinking a failure of a long run can take long; a short run never needs many steps.
        max_shrink_iters: 2048,
        ..Config::default()
    }
}
