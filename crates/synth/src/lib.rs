//! QA-pair generation from (document, rubric) with local or OpenAI-compatible generators, with provenance.
//!
//! Part of the [optimsyn](https://github.com/optimsyn/optimsyn) workspace. This crate is a
//! placeholder in the workspace layout; its API arrives with its own issue (see the README's
//! status table).
