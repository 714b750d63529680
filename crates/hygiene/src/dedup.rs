//! Exact and near-duplicate detection: MinHash signatures over word shingles of the normalised
//! text, banded LSH to find candidates, the signatures' agreement to decide.
//!
//! Rows are seen in order and each is compared only with rows kept before it, so the first of a
//! cluster is kept and every later member names it. Shingles are word pairs by default, shorter than
//! the 5-grams web-scale deduplication uses, because QA pairs are short: one inserted or replaced
//! word in a twenty-word pair still leaves a Jaccard similarity above 0.8, while two pairs written
//! from one template with other facts ("… Supreme Court, within 14 days" / "… Land Court, within
//! 60 days") differ in several words and stay below it. Character shingles would call those
//! duplicates: most of their characters are the template's.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use crate::error::{Error, Result};

/// The Mersenne prime 2^61 − 1 of the universal hash family `(a·x + b) mod p`.
const PRIME: u64 = (1 << 61) - 1;

/// Near-duplicate settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DedupConfig {
    /// Rows whose estimated Jaccard similarity reaches this are near duplicates (0 < t ≤ 1).
    pub threshold: f64,
    /// Shingle length in words of the normalised text.
    pub shingle: usize,
    /// MinHash permutations (signature length).
    pub num_perm: usize,
    /// Seed of the permutations (results are a pure function of it and the rows).
    pub seed: u64,
}

impl Default for DedupConfig {
    fn default() -> Self {
        DedupConfig {
            threshold: 0.8,
            shingle: 2,
            num_perm: 128,
            seed: 0,
        }
    }
}

/// What became of one row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Duplicate {
    /// Same normalised text as an earlier row.
    Exact {
        /// The earlier (kept) row's key.
        of: String,
    },
    /// Estimated Jaccard similarity ≥ the threshold with an earlier kept row (the earliest such).
    Near {
        /// The earlier (kept) row's key.
        of: String,
        /// The estimated similarity.
        similarity: f64,
    },
}

impl Duplicate {
    /// The kept row this one duplicates.
    pub fn of(&self) -> &str {
        match self {
            Duplicate::Exact { of } | Duplicate::Near { of, .. } => of,
        }
    }
}

/// Streams rows through exact and near-duplicate detection, remembering only kept rows.
///
/// ```
/// use optimsyn_hygiene::{Deduper, DedupConfig, Duplicate};
/// let mut d = Deduper::new(DedupConfig::default())?;
/// let q = "Which organ does Tesaxan act on, and what is the usual daily dose? The thyroid; 5 mg a day.";
/// assert_eq!(d.push("a", q), None);
/// assert!(matches!(d.push("b", &q.to_uppercase().replace(';', ",")), Some(Duplicate::Exact { .. })));
/// let near = q.replace("usual daily", "usual");
/// assert!(matches!(d.push("c", &near), Some(Duplicate::Near { ref of, .. }) if of == "a"));
/// assert_eq!(d.push("d", &q.replace("Tesaxan", "Praodol").replace("thyroid", "brain")), None);
/// assert_eq!(d.kept(), 2);
/// # Ok::<(), optimsyn_hygiene::Error>(())
/// ```
pub struct Deduper {
    cfg: DedupConfig,
    coef: Vec<(u64, u64)>,
    bands: usize,
    rows_per_band: usize,
    exact: HashMap<u64, u32>,
    buckets: HashMap<u64, Vec<u32>>,
    keys: Vec<String>,
    sigs: Vec<u32>,
}

impl Deduper {
    /// A deduper with `cfg`; errors on settings that cannot work.
    pub fn new(cfg: DedupConfig) -> Result<Self> {
        if !(cfg.threshold > 0.0 && cfg.threshold <= 1.0) {
            return Err(Error::Config(format!(
                "dedup threshold must be in (0, 1], got {}",
                cfg.threshold
            )));
        }
        if cfg.shingle == 0 || cfg.num_perm == 0 {
            return Err(Error::Config(
                "dedup shingle and num_perm must be positive".into(),
            ));
        }
        let coef = (0..cfg.num_perm as u64)
            .map(|i| {
                let a = xxh3_64_with_seed(&i.to_le_bytes(), cfg.seed) % (PRIME - 1) + 1;
                let b = xxh3_64_with_seed(&i.to_le_bytes(), cfg.seed ^ 0x5851_F42D) % PRIME;
                (a, b)
            })
            .collect();
        let (bands, rows_per_band) = lsh_shape(cfg.num_perm, cfg.threshold);
        Ok(Deduper {
            cfg,
            coef,
            bands,
            rows_per_band,
            exact: HashMap::new(),
            buckets: HashMap::new(),
            keys: Vec::new(),
            sigs: Vec::new(),
        })
    }

    /// Rows kept so far.
    pub fn kept(&self) -> usize {
        self.keys.len()
    }

    /// Offers the next row (`key` names it in reports; `text` is normalised here, as
    /// [`words`](crate::words) does); returns what it duplicates, or None if it is kept.
    pub fn push(&mut self, key: &str, text: &str) -> Option<Duplicate> {
        let normalized = crate::text::words(text).join(" ");
        let digest = xxh3_64(normalized.as_bytes());
        if let Some(&k) = self.exact.get(&digest) {
            return Some(Duplicate::Exact {
                of: self.keys[k as usize].clone(),
            });
        }
        let sig = self.signature(&normalized);
        let band_keys = self.band_keys(&sig);
        // Each kept row once, however many bands it shares, earliest first: the first that is
        // similar enough is the one this row duplicates.
        let mut candidates: Vec<u32> = band_keys
            .iter()
            .flat_map(|bk| self.buckets.get(bk).into_iter().flatten().copied())
            .collect();
        candidates.sort_unstable();
        candidates.dedup();
        for k in candidates {
            let similarity = self.similarity(&sig, k);
            if similarity >= self.cfg.threshold {
                return Some(Duplicate::Near {
                    of: self.keys[k as usize].clone(),
                    similarity,
                });
            }
        }
        let id = self.keys.len() as u32;
        self.keys.push(key.to_string());
        self.exact.insert(digest, id);
        self.sigs.extend_from_slice(&sig);
        for bk in band_keys {
            self.buckets.entry(bk).or_default().push(id);
        }
        None
    }

    fn signature(&self, normalized: &str) -> Vec<u32> {
        let words: Vec<&str> = normalized.split(' ').collect();
        let k = self.cfg.shingle;
        let mut mins = vec![u64::MAX; self.coef.len()];
        let mut shingle = |ws: &[&str]| {
            let x = xxh3_64(ws.join(" ").as_bytes()) % PRIME;
            for (m, &(a, b)) in mins.iter_mut().zip(&self.coef) {
                *m = (*m).min(mod_mersenne(a as u128 * x as u128 + b as u128));
            }
        };
        if words.len() <= k {
            shingle(&words);
        } else {
            words.windows(k).for_each(&mut shingle);
        }
        // 32 bits per value: equal values still mean equal minima with probability 1 − 2⁻³².
        mins.into_iter().map(|m| m as u32).collect()
    }

    fn band_keys(&self, sig: &[u32]) -> Vec<u64> {
        (0..self.bands)
            .map(|b| {
                let band = &sig[b * self.rows_per_band..(b + 1) * self.rows_per_band];
                let bytes: Vec<u8> = band.iter().flat_map(|v| v.to_le_bytes()).collect();
                xxh3_64_with_seed(&bytes, b as u64)
            })
            .collect()
    }

    fn similarity(&self, sig: &[u32], k: u32) -> f64 {
        let m = self.coef.len();
        let other = &self.sigs[k as usize * m..(k as usize + 1) * m];
        sig.iter().zip(other).filter(|(a, b)| a == b).count() as f64 / m as f64
    }
}

/// `v mod (2^61 − 1)` for `v < 2^122` without a division: 2^61 ≡ 1, so the high bits fold onto
/// the low ones.
fn mod_mersenne(v: u128) -> u64 {
    let folded = (v & PRIME as u128) + (v >> 61);
    let folded = (folded & PRIME as u128) + (folded >> 61);
    let r = folded as u64;
    if r >= PRIME { r - PRIME } else { r }
}

/// Bands × rows for `num_perm` permutations: the most rows per band (fewest spurious candidates)
/// that still makes a pair at exactly the threshold a candidate with probability ≥ 0.99; the
/// signatures' agreement then decides.
fn lsh_shape(num_perm: usize, threshold: f64) -> (usize, usize) {
    let mut shape = (num_perm, 1);
    for r in 1..=num_perm {
        let b = num_perm / r;
        let p = 1.0 - (1.0 - threshold.powi(r as i32)).powi(b as i32);
        if p >= 0.99 {
            shape = (b, r);
        }
    }
    shape
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsh_shape_catches_pairs_at_the_threshold() {
        assert_eq!(lsh_shape(128, 0.8), (21, 6));
        let (b, r) = lsh_shape(128, 0.5);
        assert!(b * r <= 128 && r >= 1);
        assert_eq!(lsh_shape(128, 1.0).1, 128);
    }

    proptest::proptest! {
        #[test]
        fn mersenne_folding_is_the_remainder(a in 1u64..PRIME, x in 0u64..PRIME, b in 0u64..PRIME) {
            let v = a as u128 * x as u128 + b as u128;
            proptest::prop_assert_eq!(mod_mersenne(v) as u128, v % PRIME as u128);
        }
    }

    #[test]
    fn bad_settings_are_rejected() {
        for t in [0.0, -1.0, 1.5, f64::NAN] {
            let cfg = DedupConfig {
                threshold: t,
                ..Default::default()
            };
            assert!(Deduper::new(cfg).is_err(), "{t}");
        }
    }

    #[test]
    fn empty_and_tiny_texts_do_not_panic() {
        let mut d = Deduper::new(DedupConfig::default()).unwrap();
        assert_eq!(d.push("a", ""), None);
        assert!(matches!(d.push("b", "!!"), Some(Duplicate::Exact { .. })));
        assert_eq!(d.push("c", "ab"), None);
    }

    #[test]
    fn same_seed_same_decisions() {
        let texts: Vec<String> = (0..50)
            .map(|i| format!("question number {} about topic {}", i % 7, i % 5))
            .collect();
        let run = || {
            let mut d = Deduper::new(DedupConfig::default()).unwrap();
            texts
                .iter()
                .enumerate()
                .map(|(i, t)| d.push(&i.to_string(), t))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(), run());
    }
}
