//! Data hygiene in the pipeline: every dataset the run writes is checked against the evaluation
//! sets (and deduplicated where it is a dataset, not a step's rollouts), and gets a card.

use std::path::Path;

use optimsyn_hygiene::{
    DatasetCard, DecontamConfig, DedupConfig, OnContaminated, Reference, ReferenceFile, Screen,
    ScreenCounts, ScreenSettings,
};
use optimsyn_synth::SynthRecord;

use crate::config::{HygieneConfig, RunConfig};

/// The reference index and settings of one run.
pub struct Hygiene {
    cfg: HygieneConfig,
    reference: Option<Reference>,
    files: Vec<ReferenceFile>,
}

impl Hygiene {
    /// Indexes `data.val`, `data.heldout` and `data.decontaminate` (unless decontamination is off).
    pub fn load(cfg: &RunConfig) -> crate::Result<Hygiene> {
        let h = cfg.hygiene.clone();
        if !h.decontaminate {
            return Ok(Hygiene {
                cfg: h,
                reference: None,
                files: Vec::new(),
            });
        }
        let mut paths = vec![cfg.data.val.clone()];
        paths.extend(cfg.data.heldout.clone());
        paths.extend(cfg.data.decontaminate.iter().cloned());
        let dc = DecontamConfig {
            ngram: h.ngram,
            min_words: h.min_words,
        };
        let (reference, files) = optimsyn_hygiene::reference_from_files(dc, &paths)?;
        Ok(Hygiene {
            cfg: h,
            reference: Some(reference),
            files,
        })
    }

    fn dedup(&self) -> Option<DedupConfig> {
        (self.cfg.dedup_threshold > 0.0).then(|| DedupConfig {
            threshold: self.cfg.dedup_threshold,
            ..Default::default()
        })
    }

    /// Screens a dataset (the pool, a final dataset): decontamination as configured, then
    /// near-duplicate removal.
    pub fn screen_dataset(&self, recs: &mut [SynthRecord]) -> crate::Result<ScreenCounts> {
        self.screen(recs, self.cfg.contaminated, self.dedup())
    }

    /// Screens one GRPO step's rollouts: decontamination only (each rollout needs its own
    /// reward); overlapping ones are rejected only when `penalize_rollouts` is on.
    pub fn screen_rollouts(&self, recs: &mut [SynthRecord]) -> crate::Result<ScreenCounts> {
        let action = if self.cfg.penalize_rollouts {
            OnContaminated::Drop
        } else {
            OnContaminated::Keep
        };
        self.screen(recs, action, None)
    }

    fn screen(
        &self,
        recs: &mut [SynthRecord],
        on_contaminated: OnContaminated,
        dedup: Option<DedupConfig>,
    ) -> crate::Result<ScreenCounts> {
        let mut samples: Vec<_> = recs.iter().map(|r| r.sample.clone()).collect();
        let screen = Screen {
            reference: self.reference.as_ref(),
            on_contaminated,
            dedup,
        };
        let counts = screen.apply(&mut samples)?;
        for (r, s) in recs.iter_mut().zip(samples) {
            r.sample = s;
        }
        Ok(counts)
    }

    /// Writes `<dataset>.card.json` / `.card.md` beside the dataset file.
    pub fn write_card(
        &self,
        dataset: &Path,
        recs: &[SynthRecord],
        counts: ScreenCounts,
    ) -> crate::Result<()> {
        let settings = ScreenSettings {
            against: self.files.clone(),
            ngram: self.cfg.ngram,
            min_words: self.cfg.min_words,
            on_contaminated: self.cfg.contaminated,
            dedup_threshold: self.dedup().map(|d| d.threshold),
        };
        let samples: Vec<_> = recs.iter().map(|r| r.sample.clone()).collect();
        let name = dataset
            .file_name()
            .map_or(String::new(), |n| n.to_string_lossy().into_owned());
        let card = DatasetCard::build(&name, &command_line(), &samples, settings, counts);
        card.write_beside(dataset)?;
        Ok(())
    }
}

/// This process's command line, shell-quoted where needed: what reproduces the dataset.
pub fn command_line() -> String {
    std::env::args()
        .enumerate()
        .map(|(i, a)| {
            let a = if i == 0 {
                Path::new(&a)
                    .file_name()
                    .map_or(a.clone(), |n| n.to_string_lossy().into_owned())
            } else {
                a
            };
            let plain = a
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@".contains(c));
            if plain && !a.is_empty() {
                a
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}
