//! Rubric prompts, rubric parsing and an LM-backed GRPO policy that writes rubrics from documents.
//!
//! Part of the [optimsyn](https://github.com/optimsyn/optimsyn) workspace. This crate is a
//! placeholder in the workspace layout; its API arrives with its own issue (see the README's
//! status table).
