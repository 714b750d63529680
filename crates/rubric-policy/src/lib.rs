//! Rubric prompts, rubric parsing and an LM-backed GRPO policy that writes rubrics from documents.
//!
//! Part of the [optimsyn](https://github.com/optimsyn/optimsyn) workspace. The policy of the
//! OptimSyn loop reads a seed document and writes a *rubric*: four standards (question, answer,
//! their alignment, technical/trainability requirements) that steer the generator's QA pair.
//!
//! - [`PolicyPrompt`]: the guiding text (system + user templates, overridable from files) rendered
//!   with the document and its domain, then the policy's own chat template;
//! - [`parse_rubric`]: the released code's parsing (text after the last `</think>`, first `{` to
//!   last `}`, the four keys with string or list values) into a typed [`Rubric`], failures
//!   classified ([`RubricError`]), never a panic;
//! - [`RubricPolicy`]: an optimsyn-lm model (LoRA or full) as an `optimsyn_rl_grpo::Policy`;
//!   [`RubricPolicy::write_rubrics`] samples and parses rubrics for documents outside training.
//!
//! ```
//! use optimsyn_rubric_policy::{PolicyPrompt, parse_rubric};
//!
//! let messages = PolicyPrompt::default().messages("medicine", "Aspirin inhibits COX-1.").unwrap();
//! assert_eq!(messages.len(), 2);
//! let out = r#"<think>…</think>{"Prompt-related": "Ask about the mechanism.",
//!   "Response-related": ["Correct", "Brief"], "Prompt-Response alignment": "Consistent.",
//!   "Technical/trainability aspects": "Plain text."}"#;
//! let rubric = parse_rubric(out).unwrap();
//! assert_eq!(rubric.response_related, "Correct; Brief");
//! ```
#![deny(missing_docs)]

mod error;
mod policy;
mod prompt;
mod rubric;

pub use error::{Error, Result};
pub use policy::{RubricDraft, RubricPolicy, RubricSampling};
pub use prompt::{DEFAULT_SYSTEM, DEFAULT_USER, PolicyPrompt};
pub use rubric::{KEYS, Rubric, RubricError, parse_rubric};
