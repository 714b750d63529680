//! The driver: (document, rubric) tasks → generator prompts → completions → checked QA pairs with
//! provenance, appended to a sink as each one finishes.
//!
//! Every task that gets a completion becomes exactly one [`SynthRecord`], valid or rejected with
//! its reason. A task whose generator call failed (the server died, retries ran out) becomes a
//! [`Failure`] in the report and is not written, so a resumed run over the same file (see
//! [`SampleFile`]) generates it again and skips every task already written.

use std::collections::{BTreeMap, HashSet};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use optimsyn_data_io::{ChatExample, SyntheticSample};
use optimsyn_data_io::{JsonlReader, JsonlWriter, Provenance, SamplingParams, SeedDoc};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::generator::{ChatPrompt, Completion, FinishReason, Generator};
use crate::prompt::{QaPrompt, RubricSections};
use crate::qa::{QaChecks, Rejection};

/// One QA pair to generate: a document and the rubric that guides the generator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QaTask {
    /// The sample's id (unique in a run; it keys the sample's random stream).
    pub id: String,
    /// The seed document's id.
    pub seed_id: String,
    /// The document's domain; `None` uses the run's default.
    pub domain: Option<String>,
    /// The document's text.
    pub document: String,
    /// The rubric's four sections.
    pub rubric: RubricSections,
    /// The rubric as the policy wrote it, for provenance; `None` records the sections as JSON.
    pub rubric_text: Option<String>,
}

impl QaTask {
    /// A task for a seed document, with id `{seed id}/{suffix}` (e.g. the rubric's index).
    pub fn new(doc: &SeedDoc, suffix: &str, rubric: RubricSections) -> Self {
        QaTask {
            id: format!("{}/{suffix}", doc.id),
            seed_id: doc.id.clone(),
            domain: doc.domain.clone(),
            document: doc.text.clone(),
            rubric,
            rubric_text: None,
        }
    }
}

/// Who wrote the rubrics, recorded on every sample.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PolicyInfo {
    /// The policy's identity (model folder, adapter, step).
    pub identity: String,
    /// How the rubrics were sampled.
    pub sampling: SamplingParams,
    /// RL step (0 for the initial pool).
    pub step: u64,
}

/// How the generation went, beside the sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationInfo {
    /// The generator's text of the last attempt, as it came.
    pub raw: String,
    /// Attempts made (more than 1 when an unparseable reply was retried).
    pub attempts: u32,
    /// Why the last completion ended.
    pub finish_reason: FinishReason,
    /// Prompt tokens of the last attempt, when reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens: Option<u64>,
    /// Completion tokens of the last attempt, when reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_tokens: Option<u64>,
}

/// One line of a samples file: a [`SyntheticSample`] (so the file also reads as synthetic samples
/// and as chat examples) plus how it was generated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SynthRecord {
    /// The QA pair (no messages when nothing could be extracted) and its provenance.
    #[serde(flatten)]
    pub sample: SyntheticSample,
    /// The generator's raw text and attempts.
    pub generation: GenerationInfo,
}

impl SynthRecord {
    /// The sample id.
    pub fn id(&self) -> &str {
        self.sample.example.id.as_deref().unwrap_or("")
    }

    /// Whether it passed every check.
    pub fn is_valid(&self) -> bool {
        self.sample.provenance.valid
    }
}

/// "generated N, kept M, rejected by reason" for a run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SynthCounts {
    /// Tasks already in the sink, not generated again.
    pub skipped: u64,
    /// Completions turned into samples (kept + rejected).
    pub generated: u64,
    /// Valid samples.
    pub kept: u64,
    /// Rejected samples by [`Rejection::code`].
    pub rejected: BTreeMap<String, u64>,
    /// Tasks whose generator call failed (not written).
    pub failed: u64,
    /// Generator calls made, retries included.
    pub calls: u64,
}

impl SynthCounts {
    /// Rejected samples over all reasons.
    pub fn rejected_total(&self) -> u64 {
        self.rejected.values().sum()
    }
}

impl std::fmt::Display for SynthCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "generated {}, kept {}, rejected {}",
            self.generated,
            self.kept,
            self.rejected_total()
        )?;
        if !self.rejected.is_empty() {
            let parts: Vec<String> = self
                .rejected
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            write!(f, " ({})", parts.join(", "))?;
        }
        write!(f, ", failed {}", self.failed)?;
        if self.skipped > 0 {
            write!(f, ", skipped {} already done", self.skipped)?;
        }
        Ok(())
    }
}

/// A task whose generation failed.
#[derive(Debug)]
pub struct Failure {
    /// The task's id.
    pub id: String,
    /// What went wrong (after the generator's own retries).
    pub error: Error,
}

/// What a run did.
#[derive(Debug, Default)]
pub struct SynthReport {
    /// The counts.
    pub counts: SynthCounts,
    /// The failed tasks, in the order they failed.
    pub failures: Vec<Failure>,
}

/// Where finished samples go.
pub trait SampleSink {
    /// Whether a sample with this id is already there (it is then not generated again).
    fn contains(&self, _id: &str) -> bool {
        false
    }
    /// Stores one finished sample.
    fn write(&mut self, record: &SynthRecord) -> Result<()>;
    /// Called once at the end of a run (a file makes its rows durable).
    fn finish(&mut self) -> Result<()> {
        Ok(())
    }
}

impl SampleSink for Vec<SynthRecord> {
    fn contains(&self, id: &str) -> bool {
        self.iter().any(|r| r.id() == id)
    }
    fn write(&mut self, record: &SynthRecord) -> Result<()> {
        self.push(record.clone());
        Ok(())
    }
}

/// A JSONL file of [`SynthRecord`]s, appended one line per finished sample with a single write,
/// so a crash loses no finished sample and never leaves half a line (a partial last line from an
/// earlier crash is cut off when the file is opened). Ids already in the file are skipped by a
/// resumed run.
pub struct SampleFile {
    writer: JsonlWriter,
    path: PathBuf,
    ids: HashSet<String>,
    existing: usize,
}

impl std::fmt::Debug for SampleFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SampleFile")
            .field("path", &self.path)
            .field("ids", &self.ids.len())
            .field("existing", &self.existing)
            .finish()
    }
}

#[derive(Deserialize)]
struct IdOnly {
    #[serde(default)]
    id: Option<serde_json::Value>,
}

impl SampleFile {
    /// Opens (or creates) `path` for appending and reads the ids already in it.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let writer = JsonlWriter::append(&path)?;
        let mut ids = HashSet::new();
        let mut existing = 0;
        for row in JsonlReader::<IdOnly>::open(&path)? {
            existing += 1;
            match row?.id {
                Some(serde_json::Value::String(s)) => {
                    ids.insert(s);
                }
                Some(serde_json::Value::Number(n)) => {
                    ids.insert(n.to_string());
                }
                _ => {}
            }
        }
        Ok(SampleFile {
            writer,
            path,
            ids,
            existing,
        })
    }

    /// Rows that were in the file when it was opened.
    pub fn existing_rows(&self) -> usize {
        self.existing
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Makes every row written so far durable (fsync).
    pub fn sync(&mut self) -> Result<()> {
        Ok(self.writer.sync()?)
    }
}

impl SampleSink for SampleFile {
    fn contains(&self, id: &str) -> bool {
        self.ids.contains(id)
    }
    fn write(&mut self, record: &SynthRecord) -> Result<()> {
        self.writer.write(record)?;
        self.ids.insert(record.id().to_string());
        Ok(())
    }
    fn finish(&mut self) -> Result<()> {
        self.sync()
    }
}

/// Run settings. Defaults: domain "general", 3 attempts until the reply parses (the reference
/// code's), default checks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SynthConfig {
    /// Domain for documents that have none.
    pub domain: String,
    /// Attempts per task while the reply holds no QA object (1 = no retry). Skipped for a
    /// greedy, reproducible generator, which would only repeat itself.
    pub max_attempts: u32,
    /// Validity checks.
    pub checks: QaChecks,
}

impl Default for SynthConfig {
    fn default() -> Self {
        SynthConfig {
            domain: "general".into(),
            max_attempts: 3,
            checks: QaChecks::default(),
        }
    }
}

/// Generates QA pairs for tasks with a generator and a prompt.
pub struct Synthesizer<'g> {
    generator: &'g dyn Generator,
    prompt: QaPrompt,
    config: SynthConfig,
}

impl std::fmt::Debug for Synthesizer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Synthesizer")
            .field("generator", &self.generator.identity())
            .field("prompt", &self.prompt)
            .field("config", &self.config)
            .finish()
    }
}

impl<'g> Synthesizer<'g> {
    /// A synthesizer with the built-in prompt and default settings.
    pub fn new(generator: &'g dyn Generator) -> Self {
        Synthesizer {
            generator,
            prompt: QaPrompt::builtin(),
            config: SynthConfig::default(),
        }
    }

    /// Uses other prompt templates.
    pub fn with_prompt(mut self, prompt: QaPrompt) -> Self {
        self.prompt = prompt;
        self
    }

    /// Uses other settings.
    pub fn with_config(mut self, config: SynthConfig) -> Self {
        self.config = config;
        self
    }

    /// The settings.
    pub fn config(&self) -> &SynthConfig {
        &self.config
    }

    /// The generator conversation of a task.
    pub fn messages(&self, task: &QaTask) -> Result<Vec<optimsyn_data_io::ChatMessage>> {
        let domain = task.domain.as_deref().unwrap_or(&self.config.domain);
        self.prompt.render(domain, &task.document, &task.rubric)
    }

    /// Generates every task not already in `sink`, writing each sample as soon as it is final.
    /// Returns an error only when the prompt cannot be rendered or the sink fails; generator
    /// failures are in the report.
    pub fn run(
        &self,
        tasks: &[QaTask],
        policy: &PolicyInfo,
        sink: &mut dyn SampleSink,
    ) -> Result<SynthReport> {
        let mut report = SynthReport::default();
        let mut seen = HashSet::new();
        let mut todo: Vec<(usize, Vec<optimsyn_data_io::ChatMessage>)> = Vec::new();
        for (i, t) in tasks.iter().enumerate() {
            if !seen.insert(t.id.as_str()) {
                return Err(Error::config(
                    "tasks",
                    format!("task id `{}` appears twice", t.id),
                ));
            }
            if sink.contains(&t.id) {
                report.counts.skipped += 1;
                continue;
            }
            todo.push((i, self.messages(t)?));
        }
        let retry = !(self.generator.reproducible() && self.generator.params().is_greedy());
        let max_attempts = if retry {
            self.config.max_attempts.max(1)
        } else {
            1
        };
        let identity = self.generator.identity();
        let gen_sampling = self.generator.params().provenance();
        let mut write_error: Option<Error> = None;
        for attempt in 1..=max_attempts {
            if todo.is_empty() {
                break;
            }
            let prompts: Vec<ChatPrompt> = todo
                .iter()
                .map(|(i, m)| ChatPrompt {
                    key: if attempt == 1 {
                        tasks[*i].id.clone()
                    } else {
                        format!("{}#{attempt}", tasks[*i].id)
                    },
                    messages: m.clone(),
                })
                .collect();
            let mut again: Vec<usize> = Vec::new();
            report.counts.calls += prompts.len() as u64;
            self.generator.generate(&prompts, &mut |j, result| {
                let Some((ti, _)) = todo.get(j) else {
                    return ControlFlow::Continue(());
                };
                let task = &tasks[*ti];
                let completion: Completion = match result {
                    Ok(c) => c,
                    Err(error) => {
                        report.counts.failed += 1;
                        report.failures.push(Failure {
                            id: task.id.clone(),
                            error,
                        });
                        return ControlFlow::Continue(());
                    }
                };
                let checked = self.config.checks.check(&completion.text);
                if let Some(r) = &checked.rejection
                    && r.is_parse_failure()
                    && attempt < max_attempts
                {
                    again.push(j);
                    return ControlFlow::Continue(());
                }
                let code = checked.rejection.as_ref().map(Rejection::code);
                let record = self.record(
                    task,
                    policy,
                    &identity,
                    &gen_sampling,
                    checked.example,
                    checked.rejection,
                    completion,
                    attempt,
                );
                match sink.write(&record) {
                    Ok(()) => {
                        report.counts.generated += 1;
                        match code {
                            None => report.counts.kept += 1,
                            Some(code) => {
                                *report.counts.rejected.entry(code.to_string()).or_default() += 1;
                            }
                        }
                        ControlFlow::Continue(())
                    }
                    Err(e) => {
                        write_error = Some(e);
                        ControlFlow::Break(())
                    }
                }
            });
            if let Some(e) = write_error {
                return Err(e);
            }
            again.sort_unstable();
            todo = again
                .into_iter()
                .filter_map(|j| todo.get(j).cloned())
                .collect();
        }
        sink.finish()?;
        tracing::info!("{}", report.counts);
        Ok(report)
    }

    #[allow(clippy::too_many_arguments)]
    fn record(
        &self,
        task: &QaTask,
        policy: &PolicyInfo,
        identity: &str,
        gen_sampling: &SamplingParams,
        mut example: ChatExample,
        rejection: Option<Rejection>,
        completion: Completion,
        attempts: u32,
    ) -> SynthRecord {
        example.id = Some(task.id.clone());
        SynthRecord {
            sample: SyntheticSample {
                example,
                provenance: Provenance {
                    seed_id: task.seed_id.clone(),
                    rubric: task
                        .rubric_text
                        .clone()
                        .unwrap_or_else(|| task.rubric.to_json_text()),
                    policy: policy.identity.clone(),
                    generator: identity.to_string(),
                    policy_sampling: policy.sampling.clone(),
                    generator_sampling: gen_sampling.clone(),
                    step: policy.step,
                    valid: rejection.is_none(),
                    rejection: rejection.map(|r| r.to_string()),
                    contamination: None,
                    duplicate_of: None,
                },
                influence: None,
                subtask_influence: None,
                reward: None,
            },
            generation: GenerationInfo {
                raw: completion.text,
                attempts,
                finish_reason: completion.finish_reason,
                prompt_tokens: completion.prompt_tokens,
                completion_tokens: completion.completion_tokens,
            },
        }
    }
}
