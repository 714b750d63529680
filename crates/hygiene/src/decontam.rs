//! Word n-gram decontamination: does a row repeat text of a reference (evaluation) row?
//!
//! The reference rows are indexed once: every word `ngram` of their segments, and, for prompt
//! segments shorter than that (most questions are), the whole segment. A candidate is contaminated
//! when any window of its normalised words equals an indexed one; the match is then extended word by
//! word to the longest common run, which is what gets reported with the reference row it came from.
//! Keys are rolling polynomial hashes of per-word xxh3 hashes, and every hit is confirmed word by
//! word, so a hash collision can cost time but never flag a row.

use std::collections::HashMap;
use std::path::Path;

use optimsyn_data_io::{JsonlReader, Overlap};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use xxhash_rust::xxh3::xxh3_64;

use crate::error::{Error, Result};
use crate::text::{Part, Segment, row_id, row_segments, words};

/// Rolling-hash base (odd, so multiplication is invertible mod 2^64).
const BASE: u64 = 0x9E37_79B9_7F4A_7C15;

/// How overlap is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DecontamConfig {
    /// Word n-gram length (13 as in the GPT-3 and Llama reports).
    pub ngram: usize,
    /// A reference prompt shorter than `ngram` words counts when a candidate repeats all of it and it
    /// has at least this many words (shorter prompts are too common to mean anything).
    pub min_words: usize,
}

impl Default for DecontamConfig {
    fn default() -> Self {
        DecontamConfig {
            ngram: 13,
            min_words: 3,
        }
    }
}

/// Which reference row a match came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefRow {
    /// The reference file (as given) or another name for the set.
    pub source: String,
    /// 1-based line in that file.
    pub row: u64,
    /// The row's `id`, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

struct RefSegment {
    row: u32,
    hashes: Vec<u64>,
    words: Vec<String>,
}

#[derive(Clone, Copy)]
struct Entry {
    seg: u32,
    offset: u32,
    len: u32,
}

/// An index of reference rows to check candidates against.
///
/// ```
/// use optimsyn_hygiene::{Reference, DecontamConfig, RefRow};
/// let mut reference = Reference::new(DecontamConfig::default());
/// let val = serde_json::json!({"id": "v1", "messages": [
///     {"role": "user", "content": "Which organ does Tesaxan act on?"},
///     {"role": "assistant", "content": "The thyroid."}]});
/// reference.add_row(RefRow { source: "val.jsonl".into(), row: 1, id: Some("v1".into()) }, &val)?;
/// let copy = serde_json::json!({"question": "Q: which organ does TESAXAN act on", "answer": "The thyroid"});
/// let hit = reference.check_row(&copy)?.expect("a restated validation question is flagged");
/// assert_eq!((hit.row, hit.words), (1, 6));
/// let clean = serde_json::json!({"question": "Which organ does Praodol act on?", "answer": "The thyroid."});
/// assert!(reference.check_row(&clean)?.is_none());
/// # Ok::<(), String>(())
/// ```
pub struct Reference {
    cfg: DecontamConfig,
    rows: Vec<RefRow>,
    segs: Vec<RefSegment>,
    grams: HashMap<u64, Entry>,
    /// Distinct window lengths that have keys: `ngram` and the short prompts' lengths.
    lens: Vec<usize>,
}

impl Reference {
    /// An empty index.
    pub fn new(cfg: DecontamConfig) -> Self {
        Reference {
            cfg,
            rows: Vec::new(),
            segs: Vec::new(),
            grams: HashMap::new(),
            lens: Vec::new(),
        }
    }

    /// The settings in use.
    pub fn config(&self) -> DecontamConfig {
        self.cfg
    }

    /// Number of reference rows indexed.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether no rows are indexed.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Indexes one JSON row (see [`row_segments`](crate::row_segments) for what text counts).
    pub fn add_row(&mut self, at: RefRow, row: &Value) -> std::result::Result<(), String> {
        let segments = row_segments(row)?;
        self.add_segments(at, &segments);
        Ok(())
    }

    /// Indexes one row given as segments.
    pub fn add_segments(&mut self, at: RefRow, segments: &[Segment]) {
        let row = self.rows.len() as u32;
        self.rows.push(at);
        let n = self.cfg.ngram.max(1);
        for s in segments {
            let ws = words(&s.text);
            let len = ws.len();
            let windows: Vec<(usize, usize)> = if len >= n {
                (0..=len - n).map(|i| (i, n)).collect()
            } else if s.part == Part::Prompt && len >= self.cfg.min_words.max(1) {
                vec![(0, len)]
            } else {
                continue;
            };
            let hashes: Vec<u64> = ws.iter().map(|w| xxh3_64(w.as_bytes())).collect();
            let prefix = prefix_hashes(&hashes);
            let seg = self.segs.len() as u32;
            for (i, l) in windows {
                let key = window_hash(&prefix, i, l);
                self.grams.entry(key).or_insert(Entry {
                    seg,
                    offset: i as u32,
                    len: l as u32,
                });
                if !self.lens.contains(&l) {
                    self.lens.push(l);
                }
            }
            self.segs.push(RefSegment {
                row,
                hashes,
                words: ws,
            });
        }
    }

    /// Indexes every row of a JSONL file; returns how many. Errors name the file and line.
    pub fn add_file(&mut self, path: impl AsRef<Path>) -> Result<usize> {
        let path = path.as_ref();
        let source = path.display().to_string();
        let mut reader = JsonlReader::<Value>::open(path)?;
        let mut n = 0;
        while let Some(row) = reader.next() {
            let row = row?;
            let at = RefRow {
                source: source.clone(),
                row: reader.line(),
                id: row_id(&row),
            };
            self.add_row(at, &row).map_err(|message| Error::Row {
                path: path.to_path_buf(),
                line: reader.line(),
                message,
            })?;
            n += 1;
        }
        Ok(n)
    }

    /// Checks one JSON row; Err says why the row has no text.
    pub fn check_row(&self, row: &Value) -> std::result::Result<Option<Overlap>, String> {
        Ok(self.check(&row_segments(row)?))
    }

    /// The longest overlap of any of `segments` with the reference, if there is one.
    pub fn check(&self, segments: &[Segment]) -> Option<Overlap> {
        let mut best: Option<(usize, u32, usize)> = None; // (words, seg, offset)
        for s in segments {
            let ws = words(&s.text);
            let hashes: Vec<u64> = ws.iter().map(|w| xxh3_64(w.as_bytes())).collect();
            let prefix = prefix_hashes(&hashes);
            for &l in &self.lens {
                let mut i = 0;
                while i + l <= hashes.len() {
                    let Some(e) = self.confirmed(&prefix, &hashes, i, l) else {
                        i += 1;
                        continue;
                    };
                    let (start, run) = self.extend(&hashes, i, e);
                    if best.is_none_or(|(w, _, _)| run > w) {
                        best = Some((run, e.seg, e.offset as usize - (i - start)));
                    }
                    // Windows inside this run cannot find a longer one on the same reference row.
                    i = (start + run + 1).saturating_sub(l).max(i + 1);
                }
            }
        }
        best.map(|(run, seg, offset)| {
            let seg = &self.segs[seg as usize];
            {
                let at = &self.rows[seg.row as usize];
                Overlap {
                    source: at.source.clone(),
                    row: at.row,
                    id: at.id.clone(),
                    words: run,
                    text: seg.words[offset..offset + run].join(" "),
                }
            }
        })
    }

    fn confirmed(&self, prefix: &[u64], hashes: &[u64], i: usize, l: usize) -> Option<Entry> {
        let e = *self.grams.get(&window_hash(prefix, i, l))?;
        let seg = &self.segs[e.seg as usize];
        let o = e.offset as usize;
        (e.len as usize == l && seg.hashes[o..o + l] == hashes[i..i + l]).then_some(e)
    }

    /// Extends a confirmed window at candidate position `i` both ways; returns (start, length).
    fn extend(&self, hashes: &[u64], i: usize, e: Entry) -> (usize, usize) {
        let seg = &self.segs[e.seg as usize].hashes;
        let (mut c0, mut r0) = (i, e.offset as usize);
        while c0 > 0 && r0 > 0 && hashes[c0 - 1] == seg[r0 - 1] {
            c0 -= 1;
            r0 -= 1;
        }
        let (mut c1, mut r1) = (i + e.len as usize, e.offset as usize + e.len as usize);
        while c1 < hashes.len() && r1 < seg.len() && hashes[c1] == seg[r1] {
            c1 += 1;
            r1 += 1;
        }
        (c0, c1 - c0)
    }
}

fn prefix_hashes(hashes: &[u64]) -> Vec<u64> {
    let mut p = Vec::with_capacity(hashes.len() + 1);
    p.push(0u64);
    for &h in hashes {
        let last = *p.last().unwrap_or(&0);
        p.push(last.wrapping_mul(BASE).wrapping_add(h));
    }
    p
}

fn window_hash(prefix: &[u64], i: usize, l: usize) -> u64 {
    prefix[i + l].wrapping_sub(prefix[i].wrapping_mul(BASE.wrapping_pow(l as u32)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn at(row: u64) -> RefRow {
        RefRow {
            source: "ref".into(),
            row,
            id: None,
        }
    }

    fn long_text() -> &'static str {
        "the committee met in the old hall on a rainy tuesday to decide where the new bridge \
         over the river should stand and who should pay for it"
    }

    #[test]
    fn long_texts_match_through_ngrams_and_report_the_longest_run() {
        let mut r = Reference::new(DecontamConfig::default());
        r.add_row(
            at(1),
            &json!({"text": "An unrelated reference text that is long enough to index."}),
        )
        .unwrap();
        r.add_row(at(2), &json!({"text": long_text()})).unwrap();
        let cand = format!("Intro words. {} And then more.", long_text().to_uppercase());
        let m = r.check_row(&json!({"answer": cand})).unwrap().unwrap();
        assert_eq!(m.row, 2);
        assert_eq!(m.words, words(long_text()).len());
        // Twelve shared words are below a 13-gram.
        let twelve: Vec<String> = words(long_text())[..12].to_vec();
        let cand = json!({"answer": twelve.join(" ")});
        assert!(r.check_row(&cand).unwrap().is_none());
    }

    #[test]
    fn short_answers_do_not_flag_but_short_prompts_do() {
        let mut r = Reference::new(DecontamConfig::default());
        r.add_row(
            at(1),
            &json!({"question": "Who discovered Tesaxan?", "answer": "Kira Tesk."}),
        )
        .unwrap();
        assert!(
            r.check_row(&json!({"text": "It was found by Kira Tesk."}))
                .unwrap()
                .is_none()
        );
        let m = r
            .check_row(&json!({"answer": "Well: who discovered tesaxan... nobody knows"}))
            .unwrap()
            .unwrap();
        assert_eq!(m.text, "who discovered tesaxan");
        // Below min_words a prompt is not indexed at all.
        let mut r = Reference::new(DecontamConfig {
            ngram: 13,
            min_words: 4,
        });
        r.add_row(at(1), &json!({"question": "Who discovered Tesaxan?"}))
            .unwrap();
        assert!(
            r.check_row(&json!({"text": "Who discovered Tesaxan?"}))
                .unwrap()
                .is_none()
        );
    }

    proptest! {
        /// Any window of ≥ ngram words cut from a reference text, wrapped in other words, is found
        /// with a run at least as long as the window.
        #[test]
        fn any_embedded_window_is_found(start in 0usize..10, len in 13usize..17, pre in "[a-z ]{0,30}") {
            let ws = words(long_text());
            let end = (start + len).min(ws.len());
            let mut r = Reference::new(DecontamConfig::default());
            r.add_row(at(7), &json!({"text": long_text()})).unwrap();
            let cand = format!("{pre} zzz {} zzz", ws[start..end].join(" "));
            let m = r.check_row(&json!({"text": cand})).unwrap().unwrap();
            prop_assert_eq!(m.row, 7);
            prop_assert!(m.words >= end - start);
        }
    }
}
