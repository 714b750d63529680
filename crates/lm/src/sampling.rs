//! Token choice from a row of log-probs, with a per-row ChaCha generator.
//!
//! Every row owns a `ChaCha8Rng` keyed by the run seed and stream-selected by the row's key (for
//! example a hash of its id), and draws exactly one uniform number per sampled token. A row's
//! tokens therefore depend on its seed, key and prompt only: not on its batch, its position in
//! the batch, or the device. Truncation follows transformers' warpers: top-k keeps every token
//! whose value reaches the k-th largest, then top-p keeps the most probable tokens whose mass
//! before each reaches less than `p` (at least one), on the top-k-renormalized distribution.

use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};

use crate::error::{Error, Result};

/// Sampling settings shared by every row of a generation call: the decoder's own, with neutral
/// defaults (plain sampling at temperature 1). The roles that drive it keep their own settings
/// with the defaults of the released OptimSyn configuration and convert to this at the call:
/// `optimsyn_synth::GenerationParams` (the QA generator: greedy, 2048 new tokens) and
/// `optimsyn_rl_grpo::RolloutConfig` (policy rollouts: temperature 1.5, 8192 new tokens).
/// `optimsyn_data_io::SamplingParams` is not a setting but the record of the one used, written
/// with every generated sample.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SamplingParams {
    /// Most tokens generated per row (the stop token included). Default 128.
    pub max_new_tokens: usize,
    /// Softmax temperature; 0 is greedy. Default 1.0.
    pub temperature: f64,
    /// Nucleus mass in (0, 1]; 1 disables it. Default 1.0.
    pub top_p: f64,
    /// Keep only the k most probable tokens; 0 disables it. Default 0.
    pub top_k: usize,
    /// Run seed; each row's generator is keyed by `(seed, row key)`. Default 0.
    pub seed: u64,
    /// Token ids that end a row (kept as its last token). Default: none beyond the model's.
    pub stop_tokens: Vec<u32>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            max_new_tokens: 128,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
            stop_tokens: Vec::new(),
        }
    }
}

impl SamplingParams {
    /// Greedy decoding of at most `max_new_tokens`.
    pub fn greedy(max_new_tokens: usize) -> Self {
        SamplingParams {
            max_new_tokens,
            temperature: 0.0,
            ..Default::default()
        }
    }

    /// Rejects out-of-range settings with a message naming the field.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(Error::input(format!(
                "temperature must be finite and ≥ 0, got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::input(format!(
                "top_p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        Ok(())
    }

    /// Greedy (temperature 0).
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }
}

/// A stable 64-bit key for a row id (FNV-1a), so that a row keeps its random stream whatever batch
/// or order it is generated in.
pub fn row_key(id: &str) -> u64 {
    optimsyn_fsio::hash::fnv1a64(id.as_bytes())
}

/// One row's random stream.
#[derive(Debug, Clone)]
pub struct RowRng(ChaCha8Rng);

impl RowRng {
    /// The generator of row `key` under run seed `seed`.
    pub fn new(seed: u64, key: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(key);
        RowRng(rng)
    }

    /// A uniform number in `[0, 1)` with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.0.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Index of the first maximum (as `torch.argmax`).
pub fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best
}

/// Samples a token from a row of `log_softmax(logits / T)` values (full vocabulary) after top-k and
/// top-p truncation, drawing one uniform number from `rng`.
pub fn sample(logprobs: &[f32], top_k: usize, top_p: f64, rng: &mut RowRng) -> usize {
    sample_at(logprobs, top_k, top_p, rng.uniform())
}

/// [`sample`] with its uniform draw `u` in `[0, 1)` given.
pub(crate) fn sample_at(logprobs: &[f32], top_k: usize, top_p: f64, u: f64) -> usize {
    let n = logprobs.len();
    if n == 0 {
        return 0;
    }
    let truncate_k = top_k > 0 && top_k < n;
    if !truncate_k && top_p >= 1.0 {
        // No truncation: walk the CDF in vocabulary order.
        let total: f64 = logprobs.iter().map(|&l| (l as f64).exp()).sum();
        let target = u * total;
        let mut acc = 0.0;
        for (i, &l) in logprobs.iter().enumerate() {
            acc += (l as f64).exp();
            if acc > target {
                return i;
            }
        }
        return last_finite(logprobs);
    }
    // Candidates in descending order (ties by index), as sorting would give.
    let mut idx: Vec<usize> = (0..n).collect();
    let desc = |a: &usize, b: &usize| logprobs[*b].total_cmp(&logprobs[*a]).then(a.cmp(b));
    if truncate_k {
        idx.select_nth_unstable_by(top_k - 1, desc);
        let kth = logprobs[idx[top_k - 1]];
        // Keep every token that reaches the k-th value (transformers keeps ties).
        idx.retain(|&i| logprobs[i] >= kth);
    }
    idx.sort_unstable_by(desc);
    let probs: Vec<f64> = idx.iter().map(|&i| (logprobs[i] as f64).exp()).collect();
    let mut total: f64 = probs.iter().sum();
    let mut keep = probs.len();
    if top_p < 1.0 && total > 0.0 {
        let mut before = 0.0;
        for (j, p) in probs.iter().enumerate() {
            if j > 0 && before / total >= top_p {
                keep = j;
                break;
            }
            before += p;
        }
        total = probs[..keep].iter().sum();
    }
    let target = u * total;
    let mut acc = 0.0;
    for j in 0..keep {
        acc += probs[j];
        if acc > target {
            return idx[j];
        }
    }
    idx[keep.saturating_sub(1)]
}

fn last_finite(logprobs: &[f32]) -> usize {
    logprobs.iter().rposition(|l| l.is_finite()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lp(p: &[f64]) -> Vec<f32> {
        p.iter().map(|x| x.ln() as f32).collect()
    }

    #[test]
    fn argmax_takes_first_maximum() {
        assert_eq!(argmax(&[0.0, 2.0, 2.0, 1.0]), 1);
    }

    #[test]
    fn row_streams_are_keyed_and_reproducible() {
        let a: Vec<f64> = (0..4)
            .map(|_| 0.0)
            .scan(RowRng::new(7, 1), |r, _| Some(r.uniform()))
            .collect();
        let b: Vec<f64> = (0..4)
            .map(|_| 0.0)
            .scan(RowRng::new(7, 1), |r, _| Some(r.uniform()))
            .collect();
        let c: Vec<f64> = (0..4)
            .map(|_| 0.0)
            .scan(RowRng::new(7, 2), |r, _| Some(r.uniform()))
            .collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a.iter().all(|u| (0.0..1.0).contains(u)));
        assert_ne!(row_key("a"), row_key("b"));
        // The inline FNV-1a's value before optimsyn-fsio: every row's random stream keys on it.
        assert_eq!(row_key("row-3"), 0x1ea6_e346_9449_8403);
    }

    #[test]
    fn frequencies_follow_the_distribution() {
        let p = [0.1, 0.6, 0.3];
        let mut rng = RowRng::new(0, 0);
        let mut counts = [0usize; 3];
        for _ in 0..20000 {
            counts[sample(&lp(&p), 0, 1.0, &mut rng)] += 1;
        }
        for (c, p) in counts.iter().zip(p) {
            assert!((*c as f64 / 20000.0 - p).abs() < 0.02, "{counts:?}");
        }
    }

    #[test]
    fn top_k_and_top_p_truncate_like_transformers() {
        let p = lp(&[0.05, 0.5, 0.3, 0.15]);
        let mut rng = RowRng::new(1, 0);
        for _ in 0..2000 {
            // top-k 2 keeps tokens 1 and 2.
            assert!(matches!(sample(&p, 2, 1.0, &mut rng), 1 | 2));
            // top-p 0.5: token 1 alone has mass before it 0 < 0.5; token 2 has 0.5 before it → removed.
            assert_eq!(sample(&p, 0, 0.5, &mut rng), 1);
            // top-p 0.8: tokens 1, 2 kept (0.8 before token 3 is not < 0.8).
            assert!(matches!(sample(&p, 0, 0.8, &mut rng), 1 | 2));
        }
        // top-k ties at the k-th value are all kept.
        let tied = lp(&[0.2, 0.4, 0.2, 0.2]);
        let mut seen = [false; 4];
        for _ in 0..2000 {
            seen[sample(&tied, 2, 1.0, &mut rng)] = true;
        }
        assert_eq!(seen, [true, true, true, true]);
    }

    #[test]
    fn params_are_validated() {
        assert!(
            SamplingParams {
                temperature: -1.0,
                ..Default::default()
            }
            .validate()
            .is_err()
        );
        assert!(
            SamplingParams {
                top_p: 0.0,
                ..Default::default()
            }
            .validate()
            .is_err()
        );
        assert!(
            SamplingParams {
                top_p: 1.5,
                ..Default::default()
            }
            .validate()
            .is_err()
        );
        assert!(SamplingParams::greedy(4).validate().is_ok());
    }
}
