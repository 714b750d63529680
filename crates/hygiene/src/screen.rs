//! Decontamination and deduplication applied to synthetic samples, recorded in their provenance.

use optimsyn_data_io::{ChatExample, SyntheticSample};
use serde::{Deserialize, Serialize};

use crate::decontam::Reference;
use crate::dedup::{DedupConfig, Deduper, Duplicate};
use crate::error::Result;
use crate::text::{example_segments, normalized_text};

/// The rejection reason of a sample that overlaps an evaluation set.
pub const CONTAMINATED: &str = "contaminated";
/// The rejection reason of a sample that (nearly) repeats an earlier one.
pub const DUPLICATE: &str = "duplicate";

/// What to do with a sample that overlaps an evaluation set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnContaminated {
    /// Reject it (`valid: false`, rejection `contaminated`); it stays in the file, flagged.
    #[default]
    Drop,
    /// Keep it in the dataset, flagged in its provenance.
    Keep,
}

/// Counts of one screening pass.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ScreenCounts {
    /// Valid samples checked.
    pub checked: usize,
    /// Of those, overlapping a reference row.
    pub contaminated: usize,
    /// Of those, rejected for it.
    pub contaminated_dropped: usize,
    /// Rejected as exact duplicates of an earlier sample.
    pub exact_duplicates: usize,
    /// Rejected as near duplicates of an earlier sample.
    pub near_duplicates: usize,
}

/// A screening pass: which checks run and what a hit does.
///
/// Screening is idempotent: samples it rejected before are checked again from scratch, so a
/// resumed run, or one with other settings, ends in the same state as a fresh one.
pub struct Screen<'a> {
    /// Reference rows to decontaminate against (none: no decontamination).
    pub reference: Option<&'a Reference>,
    /// What a contaminated sample becomes.
    pub on_contaminated: OnContaminated,
    /// Near-duplicate settings (none: no deduplication).
    pub dedup: Option<DedupConfig>,
}

impl Screen<'_> {
    /// Screens `samples` in order (the first of a duplicate cluster is kept); returns the counts.
    ///
    /// ```
    /// use optimsyn_data_io::{ChatExample, Provenance, SyntheticSample};
    /// use optimsyn_hygiene::{DecontamConfig, OnContaminated, RefRow, Reference, Screen};
    /// let sample = |id: &str, q: &str| SyntheticSample {
    ///     example: ChatExample { id: Some(id.into()), ..ChatExample::qa(q, "An answer.") },
    ///     provenance: Provenance { valid: true, ..Default::default() },
    ///     influence: None, subtask_influence: None, reward: None,
    /// };
    /// let mut reference = Reference::new(DecontamConfig::default());
    /// let val = serde_json::json!({"question": "What does the liver store?"});
    /// reference.add_row(RefRow { source: "val.jsonl".into(), row: 1, id: None }, &val)?;
    /// let mut samples = vec![
    ///     sample("a", "What does the LIVER store?"),
    ///     sample("b", "How long is the Nile river in total?"),
    ///     sample("c", "How long is the Nile river, in total?"),
    /// ];
    /// let screen = Screen { reference: Some(&reference), on_contaminated: OnContaminated::Drop,
    ///     dedup: Some(Default::default()) };
    /// let counts = screen.apply(&mut samples).unwrap();
    /// assert_eq!((counts.contaminated, counts.exact_duplicates), (1, 1));
    /// assert_eq!(samples[0].provenance.rejection.as_deref(), Some("contaminated"));
    /// assert!(samples[1].provenance.valid);
    /// assert_eq!(samples[2].provenance.duplicate_of.as_deref(), Some("b"));
    /// # Ok::<(), String>(())
    /// ```
    pub fn apply(&self, samples: &mut [SyntheticSample]) -> Result<ScreenCounts> {
        let mut dedup = self.dedup.map(Deduper::new).transpose()?;
        let mut counts = ScreenCounts::default();
        for (i, s) in samples.iter_mut().enumerate() {
            reset(s);
            if !s.provenance.valid {
                continue;
            }
            counts.checked += 1;
            let segments = example_segments(&s.example);
            if let Some(overlap) = self.reference.and_then(|r| r.check(&segments)) {
                counts.contaminated += 1;
                s.provenance.contamination = Some(overlap);
                if self.on_contaminated == OnContaminated::Drop {
                    counts.contaminated_dropped += 1;
                    reject(s, CONTAMINATED);
                    continue;
                }
            }
            let Some(d) = dedup.as_mut() else { continue };
            let key = s
                .example
                .id
                .clone()
                .unwrap_or_else(|| format!("row {}", i + 1));
            match d.push(&key, &normalized_text(&segments)) {
                None => {}
                Some(dup) => {
                    match dup {
                        Duplicate::Exact { .. } => counts.exact_duplicates += 1,
                        Duplicate::Near { .. } => counts.near_duplicates += 1,
                    }
                    s.provenance.duplicate_of = Some(dup.of().to_string());
                    reject(s, DUPLICATE);
                }
            }
        }
        Ok(counts)
    }
}

/// `examples` without exact and near duplicates (the first of each cluster kept, order kept), and
/// how many were left out.
///
/// ```
/// use optimsyn_data_io::ChatExample;
/// use optimsyn_hygiene::{DedupConfig, dedup_examples};
/// let rows = vec![
///     ChatExample::qa("Which river runs through Ostra?", "The Vell."),
///     ChatExample::qa("WHICH river runs through Ostra", "The Vell"),
///     ChatExample::qa("Which river runs through Kemmin?", "The Aros."),
/// ];
/// let (kept, dropped) = dedup_examples(rows, DedupConfig::default())?;
/// assert_eq!((kept.len(), dropped), (2, 1));
/// # Ok::<(), optimsyn_hygiene::Error>(())
/// ```
pub fn dedup_examples(
    examples: Vec<ChatExample>,
    cfg: DedupConfig,
) -> Result<(Vec<ChatExample>, usize)> {
    let mut d = Deduper::new(cfg)?;
    let n = examples.len();
    let kept: Vec<ChatExample> = examples
        .into_iter()
        .enumerate()
        .filter(|(i, e)| {
            let text = normalized_text(&example_segments(e));
            d.push(&format!("row {}", i + 1), &text).is_none()
        })
        .map(|(_, e)| e)
        .collect();
    let dropped = n - kept.len();
    Ok((kept, dropped))
}

/// Undoes an earlier screening's marks, so the sample is judged afresh.
fn reset(s: &mut SyntheticSample) {
    let p = &mut s.provenance;
    if matches!(p.rejection.as_deref(), Some(CONTAMINATED | DUPLICATE)) {
        p.valid = true;
        p.rejection = None;
    }
    p.contamination = None;
    p.duplicate_of = None;
}

fn reject(s: &mut SyntheticSample, reason: &str) {
    s.provenance.valid = false;
    s.provenance.rejection = Some(reason.to_string());
}
