//! QA-pair generation from (document, rubric) with local or OpenAI-compatible generators, with
//! provenance.
//!
//! Part of the [optimsyn](https://github.com/optimsyn/optimsyn) workspace. In the method, a frozen
//! *generator* turns a seed document and a rubric (written by the trained policy) into one QA pair;
//! this crate is that step.
//!
//! 1. [`QaPrompt`] renders the generator's conversation from the document, its domain and the
//!    rubric's four [`RubricSections`] (built-in templates, or your own from files).
//! 2. A [`Generator`] completes a batch of prompts: [`LocalGenerator`] runs an optimsyn-lm model in
//!    this process; [`OpenAiGenerator`] calls any OpenAI-compatible `/v1/chat/completions` (vLLM,
//!    SGLang, llama.cpp, `optimsyn serve`) with bounded concurrency, a timeout and retries with
//!    backoff.
//!    Both seed each prompt the same way ([`request_seed`], [`stream_key`]), so the same seed gives
//!    the same QA pairs locally and through `optimsyn serve`.
//! 3. [`QaChecks`] extracts the QA object from the reply and checks it (it parses, question and
//!    answer are non-empty, no "according to the document", length bounds); each failure is a typed
//!    [`Rejection`].
//! 4. [`Synthesizer`] drives it: retries replies that do not parse (3 attempts, as the reference
//!    code), records [`Provenance`](optimsyn_data_io::Provenance) on every sample, appends each
//!    sample to a crash-safe [`SampleFile`] as soon as it is final, skips what a previous run
//!    finished, and reports "generated N, kept M, rejected by reason" ([`SynthCounts`]).
//!
//! The server on the other side (`optimsyn serve`) is the `optimsyn-serve` crate; the wire format
//! both speak is [`openai::wire`].
//!
//! ```no_run
//! use optimsyn_data_io::SeedDoc;
//! use optimsyn_synth::{
//!     GenerationParams, LocalGenerator, PolicyInfo, QaTask, RubricSections, SampleFile,
//!     Synthesizer,
//! };
//!
//! # fn main() -> optimsyn_synth::Result<()> {
//! let generator = LocalGenerator::load("models/qwen3-0.6b", Default::default(),
//!                                      GenerationParams::greedy(512))?;
//! let doc: SeedDoc = serde_json::from_str(r#"{"id": "d1", "text": "Aspirin inhibits COX.", "domain": "medicine"}"#).unwrap();
//! let rubric = RubricSections::from_value(&serde_json::json!({
//!     "Prompt-related": "A short-answer question on the mechanism.",
//!     "Response-related": ["Correctness: name the enzyme", "Concision"],
//! }));
//! let tasks = vec![QaTask::new(&doc, "0", rubric)];
//! let mut out = SampleFile::open("samples.jsonl")?;
//! let report = Synthesizer::new(&generator).run(&tasks, &PolicyInfo::default(), &mut out)?;
//! println!("{}", report.counts); // generated 1, kept 1, rejected 0, failed 0
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

mod error;
mod generator;
mod local;
pub mod openai;
mod prompt;
mod qa;
mod synth;

pub use error::{Error, Result};
pub use generator::{
    ChatPrompt, Completion, FinishReason, GenerationParams, Generator, request_seed, stream_key,
};
pub use local::{LocalGenerator, stop_tokens};
pub use openai::{
    OpenAiClient, OpenAiConfig, OpenAiGenerator, SampledRow, ServedSampler, TokenSampling,
};
pub use prompt::{QaPrompt, RubricSections};
pub use qa::{
    Checked, DEFAULT_LEAKAGE_PHRASES, ExtractedQa, MAX_CANDIDATES, QaChecks, Rejection, extract_qa,
};
pub use synth::{
    Failure, GenerationInfo, PolicyInfo, QaTask, SampleFile, SampleSink, SynthConfig, SynthCounts,
    SynthRecord, SynthReport, Synthesizer,
};
