//! Dataset cards: what a written dataset holds, what was taken out and why, and where it came from.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use optimsyn_data_io::{SyntheticSample, write_atomic};
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::screen::{OnContaminated, ScreenCounts};

/// How many flagged samples a card lists by name.
const EXAMPLES: usize = 5;

/// A reference file decontamination checked against.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReferenceFile {
    /// The file.
    pub path: String,
    /// Rows indexed from it.
    pub rows: usize,
}

/// How the data was screened (what the counts on a card mean).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScreenSettings {
    /// Reference files (empty: no decontamination).
    pub against: Vec<ReferenceFile>,
    /// Word n-gram length.
    pub ngram: usize,
    /// Shortest reference prompt matched whole.
    pub min_words: usize,
    /// What a contaminated sample became.
    pub on_contaminated: OnContaminated,
    /// Near-duplicate Jaccard threshold (none: no deduplication).
    pub dedup_threshold: Option<f64>,
}

/// Summary statistics of a score.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Distribution {
    /// Samples with a score.
    pub count: usize,
    /// Mean.
    pub mean: f64,
    /// Standard deviation (population).
    pub sd: f64,
    /// Minimum.
    pub min: f64,
    /// 10th percentile (nearest rank).
    pub p10: f64,
    /// Median (nearest rank).
    pub median: f64,
    /// 90th percentile (nearest rank).
    pub p90: f64,
    /// Maximum.
    pub max: f64,
}

impl Distribution {
    /// The distribution of `values` (None when empty or any is not finite).
    pub fn of(values: &[f64]) -> Option<Distribution> {
        if values.is_empty() || values.iter().any(|v| !v.is_finite()) {
            return None;
        }
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len() as f64;
        let mean = v.iter().sum::<f64>() / n;
        let sd = (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt();
        let rank = |q: f64| v[((q * n).ceil() as usize).clamp(1, v.len()) - 1];
        Some(Distribution {
            count: v.len(),
            mean,
            sd,
            min: v[0],
            p10: rank(0.1),
            median: rank(0.5),
            p90: rank(0.9),
            max: v[v.len() - 1],
        })
    }
}

/// A flagged sample, named on the card.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Flagged {
    /// The sample's id.
    pub id: String,
    /// Why: the overlap's reference row and words, or the id it duplicates.
    pub detail: String,
}

/// The card written next to a dataset (`<name>.card.json` and `<name>.card.md`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetCard {
    /// The dataset file's name.
    pub dataset: String,
    /// The command that wrote it.
    pub command: String,
    /// Records in the file (valid or not).
    pub records: usize,
    /// Records in the dataset (`valid: true`).
    pub kept: usize,
    /// Rejected records by reason (generation checks, `contaminated`, `duplicate`).
    pub rejected: BTreeMap<String, usize>,
    /// The screening's settings.
    pub screen: ScreenSettings,
    /// The screening's counts.
    pub counts: ScreenCounts,
    /// Longest overlap with a reference row among flagged samples, in words.
    pub longest_overlap: Option<usize>,
    /// Flagged samples per reference file.
    pub contaminated_by_source: BTreeMap<String, usize>,
    /// The first few contaminated samples.
    pub contaminated_examples: Vec<Flagged>,
    /// The first few duplicates.
    pub duplicate_examples: Vec<Flagged>,
    /// Rubric policies (identity → records).
    pub policies: BTreeMap<String, usize>,
    /// Generators (identity → records).
    pub generators: BTreeMap<String, usize>,
    /// Distinct rubric texts among kept records.
    pub distinct_rubrics: usize,
    /// Influence of kept records on the validation set, where scored.
    pub influence: Option<Distribution>,
}

impl DatasetCard {
    /// The card of `samples` (the whole file, in order), screened with `screen` / `counts`.
    pub fn build(
        dataset: &str,
        command: &str,
        samples: &[SyntheticSample],
        screen: ScreenSettings,
        counts: ScreenCounts,
    ) -> DatasetCard {
        let kept: Vec<&SyntheticSample> = samples.iter().filter(|s| s.provenance.valid).collect();
        let mut card = DatasetCard {
            dataset: dataset.to_string(),
            command: command.to_string(),
            records: samples.len(),
            kept: kept.len(),
            rejected: BTreeMap::new(),
            screen,
            counts,
            longest_overlap: None,
            contaminated_by_source: BTreeMap::new(),
            contaminated_examples: Vec::new(),
            duplicate_examples: Vec::new(),
            policies: BTreeMap::new(),
            generators: BTreeMap::new(),
            distinct_rubrics: 0,
            influence: None,
        };
        for s in samples {
            card.tally(s);
        }
        let rubrics: std::collections::HashSet<&str> =
            kept.iter().map(|s| s.provenance.rubric.as_str()).collect();
        card.distinct_rubrics = rubrics.len();
        let scores: Vec<f64> = kept.iter().filter_map(|s| s.influence).collect();
        card.influence = Distribution::of(&scores);
        card
    }

    fn tally(&mut self, s: &SyntheticSample) {
        let p = &s.provenance;
        let id = s.example.id.clone().unwrap_or_default();
        if let Some(r) = p.rejection.as_ref().filter(|_| !p.valid) {
            *self.rejected.entry(r.clone()).or_default() += 1;
        }
        *self.policies.entry(p.policy.clone()).or_default() += 1;
        *self.generators.entry(p.generator.clone()).or_default() += 1;
        if let Some(o) = &p.contamination {
            *self
                .contaminated_by_source
                .entry(o.source.clone())
                .or_default() += 1;
            self.longest_overlap = self.longest_overlap.max(Some(o.words));
            if self.contaminated_examples.len() < EXAMPLES {
                let row = o.id.as_ref().map_or(String::new(), |i| format!(" ({i})"));
                self.contaminated_examples.push(Flagged {
                    id: id.clone(),
                    detail: format!(
                        "{} words of {} line {}{row}: \"{}\"",
                        o.words, o.source, o.row, o.text
                    ),
                });
            }
        }
        if let Some(of) = &p.duplicate_of
            && self.duplicate_examples.len() < EXAMPLES
        {
            self.duplicate_examples.push(Flagged {
                id,
                detail: format!("duplicates {of}"),
            });
        }
    }

    /// The card as Markdown.
    pub fn to_markdown(&self) -> String {
        let mut md = String::new();
        let _ = writeln!(md, "# Dataset card: {}\n", self.dataset);
        let _ = writeln!(md, "Written by `{}`.\n", self.command);
        let _ = writeln!(
            md,
            "- records: {}, kept in the dataset: {}",
            self.records, self.kept
        );
        for (reason, n) in &self.rejected {
            let _ = writeln!(md, "- rejected `{reason}`: {n}");
        }
        self.screen_section(&mut md);
        if !(self.policies.is_empty() && self.generators.is_empty()) {
            let _ = writeln!(md, "\n## Where it came from\n");
            for (what, map) in [("policy", &self.policies), ("generator", &self.generators)] {
                for (identity, n) in map {
                    let _ = writeln!(md, "- {what} `{identity}`: {n} records");
                }
            }
            let _ = writeln!(
                md,
                "- distinct rubrics among kept records: {}",
                self.distinct_rubrics
            );
        }
        let _ = writeln!(md, "\n## Influence on the validation set\n");
        match &self.influence {
            Some(d) => {
                let _ = writeln!(
                    md,
                    "{} scored: mean {:.4} (sd {:.4}), min {:.4}, p10 {:.4}, median {:.4}, p90 {:.4}, max {:.4}",
                    d.count, d.mean, d.sd, d.min, d.p10, d.median, d.p90, d.max
                );
            }
            None => {
                let _ = writeln!(
                    md,
                    "not scored (the pool, or `synthesize.score_influence` off)"
                );
            }
        }
        md
    }

    fn screen_section(&self, md: &mut String) {
        let s = &self.screen;
        let c = &self.counts;
        let _ = writeln!(md, "\n## Decontamination\n");
        if s.against.is_empty() {
            let _ = writeln!(md, "not checked");
        } else {
            let files: Vec<String> = s
                .against
                .iter()
                .map(|f| format!("{} ({} rows)", f.path, f.rows))
                .collect();
            let _ = writeln!(
                md,
                "Against {}; word {}-grams, whole prompts of ≥ {} words; contaminated samples {}.\n",
                files.join(", "),
                s.ngram,
                s.min_words,
                match s.on_contaminated {
                    OnContaminated::Drop => "are dropped",
                    OnContaminated::Keep => "are kept, flagged",
                }
            );
            let longest = self
                .longest_overlap
                .map_or("none".to_string(), |w| format!("{w} words"));
            let _ = writeln!(
                md,
                "- checked {}, contaminated {}, dropped {}, longest overlap: {longest}",
                c.checked, c.contaminated, c.contaminated_dropped
            );
            for (src, n) in &self.contaminated_by_source {
                let _ = writeln!(md, "- from {src}: {n}");
            }
            for f in &self.contaminated_examples {
                let _ = writeln!(md, "- `{}`: {}", f.id, f.detail);
            }
        }
        let _ = writeln!(md, "\n## Duplicates\n");
        match s.dedup_threshold {
            None => {
                let _ = writeln!(md, "not checked");
            }
            Some(t) => {
                let _ = writeln!(
                    md,
                    "MinHash near duplicates at Jaccard ≥ {t}: exact {}, near {} (the first of each cluster is kept)",
                    c.exact_duplicates, c.near_duplicates
                );
                if !self.duplicate_examples.is_empty() {
                    md.push('\n');
                }
                for f in &self.duplicate_examples {
                    let _ = writeln!(md, "- `{}`: {}", f.id, f.detail);
                }
            }
        }
    }

    /// Writes `<dataset stem>.card.json` and `.card.md` beside `dataset`; returns their paths.
    pub fn write_beside(&self, dataset: &Path) -> Result<(PathBuf, PathBuf)> {
        let stem = dataset
            .file_stem()
            .map_or("dataset".into(), |s| s.to_string_lossy().into_owned());
        let json = dataset.with_file_name(format!("{stem}.card.json"));
        let md = dataset.with_file_name(format!("{stem}.card.md"));
        let text = serde_json::to_string_pretty(self).map_err(|e| {
            crate::Error::Config(format!(
                "cannot serialize the card of {}: {e}",
                self.dataset
            ))
        })?;
        write_atomic(&json, text.as_bytes())?;
        write_atomic(&md, self.to_markdown().as_bytes())?;
        Ok((json, md))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distribution_nearest_rank() {
        let d = Distribution::of(&[5.0, 1.0, 3.0, 2.0, 4.0]).unwrap();
        assert_eq!((d.min, d.median, d.max, d.count), (1.0, 3.0, 5.0, 5));
        assert_eq!((d.p10, d.p90), (1.0, 5.0));
        assert!((d.mean - 3.0).abs() < 1e-12);
        assert!(Distribution::of(&[]).is_none());
        assert!(Distribution::of(&[1.0, f64::NAN]).is_none());
    }
}
