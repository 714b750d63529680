//! Token choice on the model's device. Off the CPU, [`crate::sample`]'s rule (top-k, then top-p,
//! then one uniform draw walked along the cumulative mass) is evaluated with tensor ops, so a decode
//! step reads back `B` tokens and log-probs instead of the `[B, vocab]` distribution, and the host
//! does no per-token work proportional to the vocabulary (at Qwen's 151,936 entries and 32 rows
//! that host work is ~40 ms a step, far more than a small model's step on a GPU). On the CPU the
//! host rule itself runs, being faster there.
//!
//! The sums are the same sequential f64 sums as the host rule's: a cumulative sum in vocabulary
//! (or sorted) order, whose last entry is the total. Only `exp` may differ from the host's in the
//! last bit, so a token can differ from [`crate::sample`]'s only when the uniform number falls
//! within about 1e-16 of a boundary between two tokens' mass.

use tch::{Kind, Tensor};

use crate::error::{Error, Result, TorchContext};
use crate::model::{log_softmax_at, logprobs_of};
use crate::sampling::{RowRng, SamplingParams, sample_at};

type TchResult<T> = std::result::Result<T, tch::TchError>;

/// The uniform numbers a generation call draws, `[B, steps]` f64 on `device`: row `i`'s first
/// `budgets[i]` draws of its own stream, one per sampled token, as the host rule draws them. `None`
/// when no token is drawn (greedy, or top-k 1).
pub(crate) fn row_uniforms(
    params: &SamplingParams,
    keys: &[u64],
    budgets: &[usize],
    device: tch::Device,
) -> Result<Option<Tensor>> {
    if params.is_greedy() || params.top_k == 1 {
        return Ok(None);
    }
    let steps = budgets.iter().copied().max().unwrap_or(0);
    let mut u = vec![0f64; keys.len() * steps];
    for (i, (&key, &budget)) in keys.iter().zip(budgets).enumerate() {
        let mut rng = RowRng::new(params.seed, key);
        for x in &mut u[i * steps..i * steps + budget] {
            *x = rng.uniform();
        }
    }
    Tensor::f_from_slice(&u)
        .and_then(|t| {
            t.f_view([keys.len() as i64, steps as i64])?
                .f_to_device(device)
        })
        .op("uniform draws")
        .map(Some)
}

/// Every row's next token `[B]` i64 and its log-prob `[B]` f32 (at the sampling temperature), from
/// `logits` `[B, vocab]`; `u` `[B]` f64 holds this step's uniform draws when sampling.
pub(crate) fn choose(
    logits: &Tensor,
    params: &SamplingParams,
    u: Option<&Tensor>,
    host_sampling: bool,
) -> Result<(Tensor, Tensor)> {
    if params.is_greedy() {
        let tok = logits.f_argmax(-1, false).op("greedy choice")?;
        let lp = logprobs_of(logits, &tok, 0.0)?;
        return Ok((tok, lp));
    }
    let lp = log_softmax_at(logits, params.temperature)?;
    let tok = match u {
        // On the CPU the host walk is the faster of the two (32 × 151,936: 38 vs 64 ms, `cargo
        // bench --bench lm -- sample`), and there is no bus to cross.
        Some(u) if params.top_k != 1 && host_sampling => {
            sample_on_host(&lp, params.top_k, params.top_p, u)?
        }
        Some(u) if params.top_k != 1 => {
            sample_tensor(&lp, params.top_k, params.top_p, u).op("sampling")?
        }
        _ => lp.f_argmax(-1, false).op("sampling")?,
    };
    let chosen = lp
        .f_gather(-1, &tok.f_unsqueeze(-1).op("sampling")?, false)
        .and_then(|t| t.f_squeeze_dim(-1))
        .op("sampling")?;
    Ok((tok, chosen))
}

/// The host rule on each row of `lp` `[B, V]` (a CPU tensor), with `u` `[B]` its draws.
fn sample_on_host(lp: &Tensor, top_k: usize, top_p: f64, u: &Tensor) -> Result<Tensor> {
    let v = lp.size().last().copied().unwrap_or(0).max(1) as usize;
    let flat = Vec::<f32>::try_from(
        &lp.f_contiguous()
            .and_then(|t| t.f_view([-1]))
            .op("sampling")?,
    )
    .op("sampling")?;
    let u = Vec::<f64>::try_from(u).op("sampling")?;
    let tok: Vec<i64> = flat
        .chunks(v)
        .zip(u)
        .map(|(row, u)| sample_at(row, top_k, top_p, u) as i64)
        .collect();
    Ok(Tensor::from_slice(&tok))
}

/// [`sample`](crate::sample) for every row of `logprobs` (`[B, V]`, `log_softmax(logits / T)`) at
/// once, on its device: `u` (`[B]`, f64, on the same device) holds each row's uniform draw. Returns
/// the `[B]` i64 token ids. Equal to the host rule's choice up to `exp`'s last bit (see the module
/// notes), and what [`CausalLm::generate`](crate::CausalLm::generate) samples with.
///
/// ```
/// use optimsyn_lm::{RowRng, sample, sample_rows, tch::{Kind, Tensor}};
///
/// let lp = Tensor::from_slice(&[0.1f32, 2.0, -1.0, 0.5, 0.5, 3.0]).view([2, 3]).log_softmax(-1, Kind::Float);
/// let u: Vec<f64> = (0..2).map(|i| RowRng::new(7, i).uniform()).collect();
/// let tokens = Vec::<i64>::try_from(&sample_rows(&lp, 0, 0.9, &Tensor::from_slice(&u))?)?;
/// for i in 0..2 {
///     let row = Vec::<f32>::try_from(&lp.get(i))?;
///     assert_eq!(tokens[i as usize] as usize, sample(&row, 0, 0.9, &mut RowRng::new(7, i as u64)));
/// }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn sample_rows(logprobs: &Tensor, top_k: usize, top_p: f64, u: &Tensor) -> Result<Tensor> {
    let (ls, us) = (logprobs.size(), u.size());
    let [b, v] = ls.as_slice() else {
        return Err(Error::input(format!(
            "sample_rows: log-probs must be [rows, vocab], got shape {ls:?}"
        )));
    };
    if us.as_slice() != [*b] || *v == 0 {
        return Err(Error::input(format!(
            "sample_rows: {b} rows of {v} log-probs need {b} uniform draws, got shape {us:?}"
        )));
    }
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(Error::input(format!(
            "sample_rows: top_p must be in (0, 1], got {top_p}"
        )));
    }
    let u = u.f_to_kind(Kind::Double).op("sample_rows")?;
    sample_tensor(logprobs, top_k, top_p, &u).op("sample_rows")
}

fn sample_tensor(lp: &Tensor, top_k: usize, top_p: f64, u: &Tensor) -> TchResult<Tensor> {
    let v = lp.size().last().copied().unwrap_or(0);
    let truncate_k = top_k > 0 && (top_k as i64) < v;
    if !truncate_k && top_p >= 1.0 {
        return walk(lp, u);
    }
    // Candidates in descending order, ties by index (a stable sort), as the host rule orders them.
    let (vals, idx) = lp.f_sort_stable(true, -1, true)?;
    let mut keep = if truncate_k {
        // Every token that reaches the k-th value (transformers keeps ties): a prefix.
        vals.f_ge_tensor(&vals.f_narrow(-1, top_k as i64 - 1, 1)?)?
    } else {
        vals.f_ones_like()?.f_to_kind(Kind::Bool)?
    };
    let probs = vals
        .f_to_kind(Kind::Double)?
        .f_exp()?
        .f_mul(&keep.f_to_kind(Kind::Double)?)?;
    let cdf = probs.f_cumsum(-1, Kind::Double)?;
    if top_p < 1.0 {
        // Keep the most probable tokens whose mass before each is below `top_p` of the total (at
        // least one; all of them when the total is 0): again a prefix.
        let total = cdf.f_narrow(-1, v - 1, 1)?;
        let before = Tensor::f_cat(
            &[
                cdf.f_zeros_like()?.f_narrow(-1, 0, 1)?,
                cdf.f_narrow(-1, 0, v - 1)?,
            ],
            -1,
        )?;
        let first = Tensor::f_arange(v, (Kind::Int64, lp.device()))?.f_eq(0)?;
        let nucleus = before
            .f_div(&total)?
            .f_lt(top_p)?
            .f_logical_or(&first)?
            .f_logical_or(&total.f_le(0.0)?)?;
        keep = keep.f_logical_and(&nucleus)?;
    }
    let kept = keep.f_sum_dim_intlist(Some([-1i64].as_slice()), false, Kind::Int64)?;
    // The kept mass, summed in order: the cumulative sum at the last kept candidate.
    let total = cdf.f_gather(-1, &kept.f_sub_scalar(1)?.f_unsqueeze(-1)?, false)?;
    let target = u.f_unsqueeze(-1)?.f_mul(&total)?;
    let below = cdf
        .f_le_tensor(&target)?
        .f_logical_and(&keep)?
        .f_sum_dim_intlist(Some([-1i64].as_slice()), false, Kind::Int64)?;
    // Past the last kept candidate (rounding): the last kept one, as the host rule falls back.
    let j = below.f_minimum(&kept.f_sub_scalar(1)?)?;
    idx.f_gather(-1, &j.f_unsqueeze(-1)?, false)?
        .f_squeeze_dim(-1)
}

/// Without truncation: the first token whose cumulative mass (in vocabulary order) exceeds `u`
/// times the total; past the end (rounding), the last finite one.
fn walk(lp: &Tensor, u: &Tensor) -> TchResult<Tensor> {
    let v = lp.size().last().copied().unwrap_or(0);
    let cdf = lp
        .f_to_kind(Kind::Double)?
        .f_exp()?
        .f_cumsum(-1, Kind::Double)?;
    let total = cdf.f_narrow(-1, v - 1, 1)?;
    let target = u.f_unsqueeze(-1)?.f_mul(&total)?;
    let below = cdf.f_le_tensor(&target)?.f_sum_dim_intlist(
        Some([-1i64].as_slice()),
        false,
        Kind::Int64,
    )?;
    let index = Tensor::f_arange(v, (Kind::Int64, lp.device()))?;
    let last_finite = index
        .f_where_self(&lp.f_isfinite()?, &index.f_full_like(-1)?)?
        .f_amax([-1i64].as_slice(), false)?
        .f_clamp_min(0)?;
    below.f_where_self(&below.f_lt(v)?, &last_finite)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::sample;
    use proptest::prelude::*;

    /// The host rule and the tensor rule on the same rows (logits) and streams.
    fn both(rows: &[Vec<f32>], top_k: usize, top_p: f64, seed: u64) -> (Vec<i64>, Vec<i64>) {
        let v = rows[0].len() as i64;
        let lp = Tensor::from_slice(&rows.concat())
            .view([rows.len() as i64, v])
            .log_softmax(-1, None::<Kind>);
        let mut host = Vec::new();
        let mut draws = Vec::new();
        for i in 0..rows.len() {
            let row = Vec::<f32>::try_from(&lp.get(i as i64)).unwrap();
            host.push(sample(&row, top_k, top_p, &mut RowRng::new(seed, i as u64)) as i64);
            draws.push(RowRng::new(seed, i as u64).uniform());
        }
        let dev = sample_rows(&lp, top_k, top_p, &Tensor::from_slice(&draws)).unwrap();
        (host, Vec::<i64>::try_from(&dev).unwrap())
    }

    /// Logits with ties (values on a coarse grid) and masked entries (-inf), as top-k and the
    /// fall-backs meet them.
    fn logits(v: usize) -> impl Strategy<Value = Vec<f32>> {
        proptest::collection::vec(
            prop_oneof![
                8 => (-16i32..16).prop_map(|x| x as f32 / 4.0),
                1 => Just(f32::NEG_INFINITY),
            ],
            v,
        )
        .prop_filter("one finite logit", |r| r.iter().any(|x| x.is_finite()))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn tensor_rule_equals_host_rule(
            rows in proptest::collection::vec(logits(40), 1..5),
            top_k in prop_oneof![Just(0usize), 1usize..45],
            top_p in prop_oneof![Just(1.0f64), 0.01f64..1.0],
            seed in any::<u64>(),
        ) {
            let (host, dev) = both(&rows, top_k, top_p, seed);
            prop_assert_eq!(host, dev);
        }
    }

    #[test]
    fn a_full_vocabulary_row_matches_the_host_rule() {
        // Qwen's vocabulary size, random logits: the walk over 151,936 entries.
        let v = 151_936;
        let rows: Vec<Vec<f32>> = (0..4)
            .map(|r| {
                Tensor::randn([v], (Kind::Float, tch::Device::Cpu))
                    .f_mul_scalar(1.0 + r as f64)
                    .and_then(|t| Vec::<f32>::try_from(&t))
                    .unwrap()
            })
            .collect();
        for (k, p) in [(0, 1.0), (0, 0.9), (50, 1.0), (50, 0.7)] {
            for seed in 0..8 {
                let (host, dev) = both(&rows, k, p, seed);
                assert_eq!(host, dev, "top_k {k}, top_p {p}, seed {seed}");
            }
        }
    }

    #[test]
    fn uniforms_follow_each_row_stream_up_to_its_budget() {
        let params = SamplingParams {
            seed: 9,
            ..Default::default()
        };
        let u = row_uniforms(&params, &[3, 4], &[2, 3], tch::Device::Cpu)
            .unwrap()
            .unwrap();
        let got = Vec::<f64>::try_from(&u.view([-1])).unwrap();
        let mut a = RowRng::new(9, 3);
        let mut b = RowRng::new(9, 4);
        let want = vec![
            a.uniform(),
            a.uniform(),
            0.0,
            b.uniform(),
            b.uniform(),
            b.uniform(),
        ];
        assert_eq!(got, want);
        assert!(
            row_uniforms(&SamplingParams::greedy(4), &[1], &[4], tch::Device::Cpu)
                .unwrap()
                .is_none()
        );
    }
}
