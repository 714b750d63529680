//! The GRPO objective as pure functions over `[B, T]` tensors: importance ratio, clipped (and
//! dual-clipped) surrogate, KL estimators, entropy bonus and loss aggregation.
//!
//! Notation: `logp`, `old`, `ref` are per-token log-probs of the sampled completion tokens under
//! the current, the rollout ("old") and the reference policy, all at the rollout temperature;
//! `A` is the completion's advantage; `mask` marks completion tokens (1) against padding (0).
//!
//! **Ratio.** Token level (GRPO/PPO): `ρ_t = exp(clamp(logp_t − old_t, −c, c))`, `c` =
//! [`LossConfig::log_ratio_clamp`] (verl: 20). Sequence level (GSPO,
//! [`RatioLevel::Sequence`]): `s = exp(mean_t clamp(logp_t − old_t, −c, c))`, one ratio per
//! completion.
//!
//! **Surrogate** (verl `compute_policy_loss_vanilla`):
//! `L_clip = max(−A·ρ, −A·clip(ρ, 1 − ε_low, 1 + ε_high))`; with dual clip `c₃`
//! ([`LossConfig::dual_clip`], default 3), for `A < 0`: `L = min(L_clip, −A·c₃)`, so a huge ratio
//! on a bad token costs at most `c₃·|A|` and passes no gradient.
//!
//! **KL** to the reference, per token, with `d = clamp(ref − logp, −c, c)`:
//! [`K1`](KlEstimator::K1) `= −d`, [`K2`](KlEstimator::K2) `= d²/2`,
//! [`K3`](KlEstimator::K3) `= eᵈ − d − 1` (≥ 0, and 0 iff `logp = ref`), then clamped to
//! `±`[`LossConfig::kl_clamp`] (verl `low_var_kl`: 10). It is a loss term, `+ β·KL`, aggregated
//! like the policy term.
//!
//! **Aggregation** of the per-token loss `ℓ = L + β·KL` over an *optimizer step* (all its
//! micro-batches together; see [`StepNormalizer`]):
//!
//! | [`Aggregation`] | loss | name elsewhere |
//! |---|---|---|
//! | [`TokenMean`](Aggregation::TokenMean) (default) | `Σ_{i,t} ℓ_{i,t} / N_tokens` | verl `token-mean`, TRL `dapo` |
//! | [`SeqMeanTokenMean`](Aggregation::SeqMeanTokenMean) | `Σ_i (Σ_t ℓ_{i,t} / |o_i|) / N_seqs` | original GRPO, verl `seq-mean-token-mean`, TRL `grpo` |
//! | [`Constant`](Aggregation::Constant) `L` | `Σ_{i,t} ℓ_{i,t} / (N_seqs · L)` | Dr. GRPO, TRL `dr_grpo` |
//!
//! `N_tokens` and `N_seqs` count the completion tokens and the non-empty completions of the whole
//! optimizer step, so the sum of the micro-batch losses equals the loss of the full batch exactly
//! (a mean of per-micro-batch means would not, when lengths differ).
//!
//! **Entropy bonus**: `− coef · Σ_{i,t} H_{i,t} / N_tokens`, the token-mean entropy of the step in
//! every aggregation mode (as TRL).
//!
//! **Padding is inert.** Masked positions of `logp`, `old` and `ref` are replaced by 0 before
//! anything is computed, so a NaN or infinity there changes neither the loss nor its gradient.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::error::{Error, Result, TorchContext};

type TchResult<T> = std::result::Result<T, tch::TchError>;

/// Where the importance ratio is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RatioLevel {
    /// One ratio per token (GRPO, PPO). Default.
    Token,
    /// One ratio per completion: the geometric mean of its token ratios (GSPO).
    Sequence,
}

/// The per-token estimator of `KL(π_θ ‖ π_ref)` on the sampled tokens (see the [module docs](self)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KlEstimator {
    /// `logp − ref`: unbiased, can be negative.
    K1,
    /// `(logp − ref)² / 2`: ≥ 0.
    K2,
    /// `exp(ref − logp) − (ref − logp) − 1`: ≥ 0, unbiased ("low_var_kl"). Default.
    K3,
}

/// How per-token losses become one number per optimizer step (see the [module docs](self)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Aggregation {
    /// Sum over all completion tokens of the optimizer step, divided by their count. Default.
    TokenMean,
    /// Mean over completions of each completion's token mean.
    SeqMeanTokenMean,
    /// Sum over all tokens divided by `completions × length` (Dr. GRPO). `length: None` means the
    /// rollout's `max_new_tokens` (the trainer fills it in).
    Constant {
        /// The constant `L` (Dr. GRPO: the generation budget).
        length: Option<usize>,
    },
}

/// The loss terms and their coefficients. Defaults: the released OptimSyn configuration (verl
/// vanilla policy loss, clip 0.2/0.2, dual clip 3, k3 KL with β 0.001, token-mean, no entropy
/// bonus).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LossConfig {
    /// Token or sequence (GSPO) importance ratio. Default [`RatioLevel::Token`].
    pub ratio_level: RatioLevel,
    /// ε_low: the ratio is clipped below at `1 − clip_low`. Default 0.2.
    pub clip_low: f64,
    /// ε_high: the ratio is clipped above at `1 + clip_high` (DAPO's clip-higher uses 0.28).
    /// Default 0.2.
    pub clip_high: f64,
    /// Dual-clip constant `c₃ > 1` for negative advantages; `None` disables it. Default `Some(3.0)`.
    pub dual_clip: Option<f64>,
    /// Log-ratios (policy vs old, and reference vs policy in the KL) are clamped to `±` this
    /// before `exp`; `None` disables it. Default `Some(20.0)` (verl).
    pub log_ratio_clamp: Option<f64>,
    /// β, the KL coefficient; 0 skips the reference policy. Default 0.001.
    pub kl_coef: f64,
    /// The KL estimator. Default [`KlEstimator::K3`].
    pub kl_estimator: KlEstimator,
    /// The per-token KL estimate is clamped to `±` this; `None` disables it. Default `Some(10.0)`
    /// (verl `low_var_kl`).
    pub kl_clamp: Option<f64>,
    /// Loss aggregation. Default [`Aggregation::TokenMean`].
    pub aggregation: Aggregation,
    /// Entropy bonus coefficient (the loss subtracts `coef × token-mean entropy`). Default 0.
    pub entropy_coef: f64,
}

impl Default for LossConfig {
    fn default() -> Self {
        LossConfig {
            ratio_level: RatioLevel::Token,
            clip_low: 0.2,
            clip_high: 0.2,
            dual_clip: Some(3.0),
            log_ratio_clamp: Some(20.0),
            kl_coef: 0.001,
            kl_estimator: KlEstimator::K3,
            kl_clamp: Some(10.0),
            aggregation: Aggregation::TokenMean,
            entropy_coef: 0.0,
        }
    }
}

impl LossConfig {
    /// Checks ranges: `0 ≤ clip_low < 1`, `clip_high ≥ 0`, `dual_clip > 1`, positive clamps,
    /// `kl_coef ≥ 0`, finite `entropy_coef`, a positive constant length.
    pub fn validate(&self) -> Result<()> {
        let finite = |field: &'static str, v: f64| {
            if v.is_finite() {
                Ok(())
            } else {
                Err(Error::config(field, format!("must be finite, got {v}")))
            }
        };
        finite("loss.clip_low", self.clip_low)?;
        finite("loss.clip_high", self.clip_high)?;
        finite("loss.kl_coef", self.kl_coef)?;
        finite("loss.entropy_coef", self.entropy_coef)?;
        if !(0.0..1.0).contains(&self.clip_low) {
            return Err(Error::config(
                "loss.clip_low",
                format!("must be in [0, 1), got {}", self.clip_low),
            ));
        }
        if self.clip_high < 0.0 {
            return Err(Error::config(
                "loss.clip_high",
                format!("must be ≥ 0, got {}", self.clip_high),
            ));
        }
        if let Some(c) = self.dual_clip
            && !(c.is_finite() && c > 1.0)
        {
            return Err(Error::config(
                "loss.dual_clip",
                format!("must be finite and > 1 (verl asserts clip_ratio_c > 1), got {c}"),
            ));
        }
        for (field, v) in [
            ("loss.log_ratio_clamp", self.log_ratio_clamp),
            ("loss.kl_clamp", self.kl_clamp),
        ] {
            if let Some(v) = v
                && (v.is_nan() || v <= 0.0)
            {
                return Err(Error::config(field, format!("must be > 0, got {v}")));
            }
        }
        if self.kl_coef < 0.0 {
            return Err(Error::config(
                "loss.kl_coef",
                format!(
                    "must be ≥ 0 (a negative β pushes away from the reference), got {}",
                    self.kl_coef
                ),
            ));
        }
        if let Aggregation::Constant { length: Some(0) } = self.aggregation {
            return Err(Error::config(
                "loss.aggregation",
                "the constant normalizer length must be > 0",
            ));
        }
        Ok(())
    }
}

/// The counts an optimizer step's loss is normalized by: completion tokens and non-empty
/// completions over *all* its micro-batches. Compute it once per optimizer step, before the first
/// backward, and pass the same value to every micro-batch's [`grpo_loss`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StepNormalizer {
    /// Completion tokens (mask entries that are 1).
    pub tokens: f64,
    /// Completions with at least one token.
    pub sequences: f64,
}

impl StepNormalizer {
    /// From the completion lengths of every row of the optimizer step.
    pub fn from_lengths<I: IntoIterator<Item = usize>>(lengths: I) -> Self {
        let (mut tokens, mut sequences) = (0.0, 0.0);
        for l in lengths {
            tokens += l as f64;
            sequences += f64::from(u8::from(l > 0));
        }
        StepNormalizer { tokens, sequences }
    }

    /// From `[B, T]` masks (any dtype; nonzero = completion token) covering the optimizer step.
    pub fn from_masks(masks: &[&Tensor]) -> Result<Self> {
        let mut lengths = Vec::new();
        for m in masks {
            if m.dim() != 2 {
                return Err(Error::tensor(
                    "mask",
                    format!("expected [B, T], got {:?}", m.size()),
                ));
            }
            let l = m
                .f_ne(0)
                .and_then(|b| b.f_sum_dim_intlist(&[1i64][..], false, Kind::Int64))
                .and_then(|l| Vec::<i64>::try_from(&l))
                .op("counting mask tokens")?;
            lengths.extend(l.into_iter().map(|x| x.max(0) as usize));
        }
        Ok(Self::from_lengths(lengths))
    }
}

/// The tensors of one micro-batch. `[B, T]` unless said otherwise; every per-token tensor has the
/// same shape as `logprobs`.
#[derive(Debug, Clone, Copy)]
pub struct LossInputs<'a> {
    /// Current policy log-probs of the completion tokens (differentiable).
    pub logprobs: &'a Tensor,
    /// Rollout-policy log-probs; `None` means `logprobs.detach()` (the on-policy case: ratio ≡ 1).
    pub old_logprobs: Option<&'a Tensor>,
    /// Reference-policy log-probs; required when `kl_coef > 0`, ignored when it is 0.
    pub ref_logprobs: Option<&'a Tensor>,
    /// Advantages, `[B]` or `[B, 1]`.
    pub advantages: &'a Tensor,
    /// 1 for completion tokens, 0 for padding (bool, integer or float).
    pub mask: &'a Tensor,
    /// Per-token entropies of the current policy at the rollout temperature (differentiable);
    /// required when `entropy_coef ≠ 0`, used for the entropy metric when given.
    pub entropy: Option<&'a Tensor>,
}

/// Sums over one micro-batch's tokens, for metrics; add micro-batches with [`LossStats::merge`]
/// and read means with the accessor methods.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LossStats {
    /// Completion tokens.
    pub tokens: f64,
    /// Non-empty completions.
    pub sequences: f64,
    /// This micro-batch's share of the aggregated policy (surrogate) term.
    pub policy_loss: f64,
    /// This micro-batch's share of the aggregated KL term (before multiplying by β).
    pub kl_loss: f64,
    /// Sum of the per-token KL estimates (NaN-free; 0 when no reference was given).
    pub kl_sum: f64,
    /// Tokens the KL was computed on.
    pub kl_tokens: f64,
    /// Sum of the per-token entropies.
    pub entropy_sum: f64,
    /// Tokens the entropy was given for.
    pub entropy_tokens: f64,
    /// Tokens where the lower clip binds (`ρ < 1 − ε_low` and `A < 0`).
    pub clip_low: f64,
    /// Tokens where the upper clip binds (`ρ > 1 + ε_high` and `A > 0`).
    pub clip_high: f64,
    /// Tokens where the dual clip binds (`A < 0` and `−A·ρ > −A·c₃`, i.e. `ρ > c₃`).
    pub dual_clip: f64,
    /// Sum of `old − logp` over tokens (an estimate of KL(old ‖ new): verl's `ppo_kl`).
    pub ppo_kl_sum: f64,
    /// Largest ratio seen (token or sequence level).
    pub ratio_max: f64,
    /// Smallest ratio seen.
    pub ratio_min: f64,
}

impl LossStats {
    /// Adds another micro-batch's sums.
    pub fn merge(&mut self, o: &LossStats) {
        let first = self.tokens == 0.0 && self.sequences == 0.0;
        self.tokens += o.tokens;
        self.sequences += o.sequences;
        self.policy_loss += o.policy_loss;
        self.kl_loss += o.kl_loss;
        self.kl_sum += o.kl_sum;
        self.kl_tokens += o.kl_tokens;
        self.entropy_sum += o.entropy_sum;
        self.entropy_tokens += o.entropy_tokens;
        self.clip_low += o.clip_low;
        self.clip_high += o.clip_high;
        self.dual_clip += o.dual_clip;
        self.ppo_kl_sum += o.ppo_kl_sum;
        if first {
            self.ratio_max = o.ratio_max;
            self.ratio_min = o.ratio_min;
        } else if o.tokens > 0.0 {
            self.ratio_max = self.ratio_max.max(o.ratio_max);
            self.ratio_min = self.ratio_min.min(o.ratio_min);
        }
    }

    fn mean(sum: f64, n: f64) -> Option<f64> {
        (n > 0.0).then(|| sum / n)
    }

    /// Token-mean KL estimate (`None` without a reference).
    pub fn kl(&self) -> Option<f64> {
        Self::mean(self.kl_sum, self.kl_tokens)
    }

    /// Token-mean entropy (`None` when no entropy was given).
    pub fn entropy(&self) -> Option<f64> {
        Self::mean(self.entropy_sum, self.entropy_tokens)
    }

    /// Fraction of tokens where the lower clip binds.
    pub fn clip_low_fraction(&self) -> f64 {
        Self::mean(self.clip_low, self.tokens).unwrap_or(0.0)
    }

    /// Fraction of tokens where the upper clip binds.
    pub fn clip_high_fraction(&self) -> f64 {
        Self::mean(self.clip_high, self.tokens).unwrap_or(0.0)
    }

    /// Fraction of tokens where either clip binds.
    pub fn clip_fraction(&self) -> f64 {
        Self::mean(self.clip_low + self.clip_high, self.tokens).unwrap_or(0.0)
    }

    /// Fraction of tokens where the dual clip binds.
    pub fn dual_clip_fraction(&self) -> f64 {
        Self::mean(self.dual_clip, self.tokens).unwrap_or(0.0)
    }

    /// Token-mean `old − logp`.
    pub fn ppo_kl(&self) -> f64 {
        Self::mean(self.ppo_kl_sum, self.tokens).unwrap_or(0.0)
    }
}

/// A micro-batch's loss (a 0-dim tensor to call `backward` on) and its metric sums.
#[derive(Debug)]
pub struct LossOutput {
    /// `policy term + β · KL term − entropy_coef · entropy term`, normalized by the step.
    pub loss: Tensor,
    /// Sums for metrics.
    pub stats: LossStats,
}

/// The per-token KL estimate `[B, T]` of `logprobs` against `ref_logprobs` (no masking).
pub fn kl_estimate(
    logprobs: &Tensor,
    ref_logprobs: &Tensor,
    estimator: KlEstimator,
    log_ratio_clamp: Option<f64>,
    value_clamp: Option<f64>,
) -> Result<Tensor> {
    kl_tensor(
        logprobs,
        ref_logprobs,
        estimator,
        log_ratio_clamp,
        value_clamp,
    )
    .op("KL estimate")
}

fn kl_tensor(
    logprobs: &Tensor,
    ref_logprobs: &Tensor,
    estimator: KlEstimator,
    log_ratio_clamp: Option<f64>,
    value_clamp: Option<f64>,
) -> TchResult<Tensor> {
    let mut d = ref_logprobs.f_sub(logprobs)?;
    if let Some(c) = log_ratio_clamp {
        d = d.f_clamp(-c, c)?;
    }
    let mut kl = match estimator {
        KlEstimator::K1 => d.f_neg()?,
        KlEstimator::K2 => d.f_square()?.f_mul_scalar(0.5)?,
        KlEstimator::K3 => d.f_exp()?.f_sub(&d)?.f_sub_scalar(1.0)?,
    };
    if let Some(c) = value_clamp {
        kl = kl.f_clamp(-c, c)?;
    }
    Ok(kl)
}

fn check_like(argument: &'static str, t: &Tensor, like: &Tensor) -> Result<()> {
    if t.size() != like.size() {
        return Err(Error::tensor(
            argument,
            format!(
                "shape {:?} differs from `logprobs` {:?}",
                t.size(),
                like.size()
            ),
        ));
    }
    if !matches!(
        t.kind(),
        Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16
    ) {
        return Err(Error::tensor(
            argument,
            format!("must be floating point, got {:?}", t.kind()),
        ));
    }
    Ok(())
}

/// The GRPO loss of one micro-batch (see the [module docs](self) for every formula), normalized
/// by `norm`, the counts of the whole optimizer step this micro-batch belongs to
/// ([`StepNormalizer::from_masks`] of one batch gives the plain full-batch loss).
pub fn grpo_loss(
    x: &LossInputs<'_>,
    config: &LossConfig,
    norm: &StepNormalizer,
) -> Result<LossOutput> {
    let checked = check_inputs(x, config)?;
    let f = || -> TchResult<LossOutput> {
        let terms = loss_terms(x, config, norm, &checked)?;
        let stats = read_stats(x, config, &terms)?;
        Ok(LossOutput {
            loss: terms.loss,
            stats,
        })
    };
    f().op("GRPO loss")
}

/// What [`check_inputs`] established about a valid set of inputs.
struct Checked<'a> {
    /// Completions and their padded length.
    b: i64,
    t: i64,
    /// The reference log-probs, when given (required with a KL term).
    reference: Option<&'a Tensor>,
    /// The `Constant` aggregation's length (0 for the others).
    constant_length: f64,
}

/// Checks shapes, dtypes and the inputs `config` requires, naming the argument at fault.
fn check_inputs<'a>(x: &LossInputs<'a>, config: &LossConfig) -> Result<Checked<'a>> {
    config.validate()?;
    let logp = x.logprobs;
    if logp.dim() != 2 {
        return Err(Error::tensor(
            "logprobs",
            format!("expected [B, T], got {:?}", logp.size()),
        ));
    }
    check_like("logprobs", logp, logp)?;
    let (b, t) = (logp.size()[0], logp.size()[1]);
    if x.mask.size() != logp.size() {
        return Err(Error::tensor(
            "mask",
            format!(
                "shape {:?} differs from `logprobs` {:?}",
                x.mask.size(),
                logp.size()
            ),
        ));
    }
    if let Some(o) = x.old_logprobs {
        check_like("old_logprobs", o, logp)?;
    }
    let reference = if config.kl_coef != 0.0 {
        let r = x.ref_logprobs.ok_or_else(|| {
            Error::tensor(
                "ref_logprobs",
                format!("required: kl_coef is {}", config.kl_coef),
            )
        })?;
        check_like("ref_logprobs", r, logp)?;
        Some(r)
    } else {
        x.ref_logprobs
            .map(|r| check_like("ref_logprobs", r, logp).map(|()| r))
            .transpose()?
    };
    if config.entropy_coef != 0.0 && x.entropy.is_none() {
        return Err(Error::tensor(
            "entropy",
            format!("required: entropy_coef is {}", config.entropy_coef),
        ));
    }
    if let Some(h) = x.entropy {
        check_like("entropy", h, logp)?;
    }
    let adv_shape = x.advantages.size();
    if !(adv_shape == [b] || adv_shape == [b, 1]) {
        return Err(Error::tensor(
            "advantages",
            format!("expected [{b}] or [{b}, 1], got {adv_shape:?}"),
        ));
    }
    let constant_length = match config.aggregation {
        Aggregation::Constant { length: None } => {
            return Err(Error::config(
                "loss.aggregation",
                "the constant normalizer needs a length (the trainer uses max_new_tokens)",
            ));
        }
        Aggregation::Constant { length: Some(l) } => l as f64,
        _ => 0.0,
    };

    Ok(Checked {
        b,
        t,
        reference,
        constant_length,
    })
}

/// The loss and the per-token tensors its metrics are read from.
struct Terms {
    loss: Tensor,
    /// The aggregated policy (surrogate) term.
    policy_term: Tensor,
    /// The aggregated KL term (before β), when a reference was given.
    kl_term: Option<Tensor>,
    /// Per-token KL estimates and entropies (0 on padding).
    kl: Option<Tensor>,
    entropy: Option<Tensor>,
    /// The mask as bool and as the log-probs' kind; completion lengths `[B, 1]`.
    keep: Tensor,
    maskf: Tensor,
    lengths: Tensor,
    /// Current and rollout log-probs (0 on padding), advantages `[B, 1]`, the ratio.
    lp: Tensor,
    old: Tensor,
    adv: Tensor,
    negative: Tensor,
    ratio: Tensor,
}

/// The forward computation: ratios, the clipped surrogate, KL and entropy terms, aggregated.
fn loss_terms(
    x: &LossInputs<'_>,
    config: &LossConfig,
    norm: &StepNormalizer,
    checked: &Checked<'_>,
) -> TchResult<Terms> {
    let (b, t) = (checked.b, checked.t);
    let (reference, constant_length) = (checked.reference, checked.constant_length);
    let use_kl = config.kl_coef != 0.0;
    let logp = x.logprobs;
    let kind = logp.kind();
    let keep = x.mask.f_ne(0)?;
    let maskf = keep.f_to_kind(kind)?;
    let zeros = logp.f_zeros_like()?;
    // Padding is inert: every per-token input is 0 there (ratio 1, KL 0, no NaN).
    let lp = logp.f_where_self(&keep, &zeros)?;
    let old = match x.old_logprobs {
        Some(o) => o.f_detach()?.f_to_kind(kind)?.f_where_self(&keep, &zeros)?,
        None => lp.f_detach()?,
    };
    let adv = x
        .advantages
        .f_detach()?
        .f_to_kind(kind)?
        .f_reshape([b, 1])?;
    let lengths = maskf.f_sum_dim_intlist(&[1i64][..], true, kind)?; // [B, 1]

    let mut log_ratio = lp.f_sub(&old)?;
    if let Some(c) = config.log_ratio_clamp {
        log_ratio = log_ratio.f_clamp(-c, c)?;
    }
    let log_ratio = match config.ratio_level {
        RatioLevel::Token => log_ratio,
        RatioLevel::Sequence => log_ratio
            .f_mul(&maskf)?
            .f_sum_dim_intlist(&[1i64][..], true, kind)?
            .f_div(&lengths.f_clamp_min(1.0)?)?,
    };
    let ratio = log_ratio.f_exp()?; // [B, T] or [B, 1]
    let neg_adv = adv.f_neg()?;
    let pg1 = neg_adv.f_mul(&ratio)?;
    let pg2 = neg_adv.f_mul(&ratio.f_clamp(1.0 - config.clip_low, 1.0 + config.clip_high)?)?;
    let clipped = pg1.f_maximum(&pg2)?;
    let negative = adv.f_lt(0.0)?;
    let pg = match config.dual_clip {
        Some(c) => {
            let pg3 = neg_adv.f_mul_scalar(c)?;
            clipped.f_minimum(&pg3)?.f_where_self(&negative, &clipped)?
        }
        None => clipped,
    };
    let pg = pg.f_expand([b, t], false)?;

    let kl = match reference {
        Some(r) => {
            let r = r.f_detach()?.f_to_kind(kind)?.f_where_self(&keep, &zeros)?;
            Some(kl_tensor(
                &lp,
                &r,
                config.kl_estimator,
                config.log_ratio_clamp,
                config.kl_clamp,
            )?)
        }
        None => None,
    };

    // Per-token weights of the aggregation, normalized by the whole optimizer step.
    let weights = match config.aggregation {
        Aggregation::TokenMean => maskf.f_div_scalar(norm.tokens.max(1.0))?,
        Aggregation::SeqMeanTokenMean => maskf
            .f_div(&lengths.f_clamp_min(1.0)?)?
            .f_div_scalar(norm.sequences.max(1.0))?,
        Aggregation::Constant { .. } => {
            maskf.f_div_scalar((norm.sequences * constant_length).max(1.0))?
        }
    };
    let policy_term = pg.f_mul(&weights)?.f_sum(kind)?;
    let mut loss = policy_term.shallow_clone();
    let kl_term = match &kl {
        Some(k) if use_kl => {
            let term = k.f_mul(&weights)?.f_sum(kind)?;
            loss = loss.f_add(&term.f_mul_scalar(config.kl_coef)?)?;
            Some(term)
        }
        Some(k) => Some(k.f_mul(&weights)?.f_sum(kind)?),
        None => None,
    };
    let entropy = match x.entropy {
        Some(h) => Some(h.f_to_kind(kind)?.f_where_self(&keep, &zeros)?),
        None => None,
    };
    if let Some(h) = &entropy
        && config.entropy_coef != 0.0
    {
        let bonus = h
            .f_mul(&maskf)?
            .f_sum(kind)?
            .f_div_scalar(norm.tokens.max(1.0))?;
        loss = loss.f_sub(&bonus.f_mul_scalar(config.entropy_coef)?)?;
    }

    Ok(Terms {
        loss,
        policy_term,
        kl_term,
        kl,
        entropy,
        keep,
        maskf,
        lengths,
        lp,
        old,
        adv,
        negative,
        ratio,
    })
}

/// The metric sums of one micro-batch, by name; [`read_stats`] moves all of them to the host in
/// one transfer (a stacked tensor), in the order of [`MetricSums::into_array`].
struct MetricSums<T> {
    tokens: T,
    sequences: T,
    policy_loss: T,
    kl_loss: T,
    kl_sum: T,
    entropy_sum: T,
    clip_low: T,
    clip_high: T,
    dual_clip: T,
    ppo_kl_sum: T,
    ratio_max: T,
    ratio_min: T,
}

impl<T> MetricSums<T> {
    fn into_array(self) -> [T; 12] {
        [
            self.tokens,
            self.sequences,
            self.policy_loss,
            self.kl_loss,
            self.kl_sum,
            self.entropy_sum,
            self.clip_low,
            self.clip_high,
            self.dual_clip,
            self.ppo_kl_sum,
            self.ratio_max,
            self.ratio_min,
        ]
    }

    fn from_array(a: [T; 12]) -> Self {
        let [
            tokens,
            sequences,
            policy_loss,
            kl_loss,
            kl_sum,
            entropy_sum,
            clip_low,
            clip_high,
            dual_clip,
            ppo_kl_sum,
            ratio_max,
            ratio_min,
        ] = a;
        MetricSums {
            tokens,
            sequences,
            policy_loss,
            kl_loss,
            kl_sum,
            entropy_sum,
            clip_low,
            clip_high,
            dual_clip,
            ppo_kl_sum,
            ratio_max,
            ratio_min,
        }
    }
}

/// The micro-batch's metric sums (clip counts, KL, entropy, ratio range), without gradients.
fn read_stats(x: &LossInputs<'_>, config: &LossConfig, terms: &Terms) -> TchResult<LossStats> {
    let _guard = tch::no_grad_guard();
    let logp = x.logprobs;
    let (b, t) = (logp.size()[0], logp.size()[1]);
    let kind = logp.kind();
    let Terms {
        keep,
        maskf,
        lengths,
        lp,
        old,
        adv,
        negative,
        ratio,
        ..
    } = terms;
    let ratio_tok = ratio.f_expand([b, t], false)?;
    let pos = adv.f_gt(0.0)?;
    let masked_count =
        |cond: &Tensor| -> TchResult<Tensor> { cond.f_logical_and(keep)?.f_sum(Kind::Double) };
    let zero = || Tensor::f_zeros([], (Kind::Double, logp.device()));
    let big = Tensor::f_full([b, t], f64::INFINITY, (kind, logp.device()))?;
    let (rmax, rmin) = if b * t > 0 {
        (
            ratio_tok.f_where_self(keep, &big.f_neg()?)?.f_max()?,
            ratio_tok.f_where_self(keep, &big)?.f_min()?,
        )
    } else {
        (zero()?, zero()?)
    };
    let masked_sum = |v: &Option<Tensor>| match v {
        Some(v) => v.f_mul(maskf)?.f_sum(Kind::Double),
        None => zero(),
    };
    let sums = MetricSums {
        tokens: maskf.f_sum(Kind::Double)?,
        sequences: lengths.f_gt(0.0)?.f_sum(Kind::Double)?,
        policy_loss: terms.policy_term.f_detach()?.f_to_kind(Kind::Double)?,
        kl_loss: match &terms.kl_term {
            Some(k) => k.f_detach()?.f_to_kind(Kind::Double)?,
            None => zero()?,
        },
        kl_sum: masked_sum(&terms.kl)?,
        entropy_sum: masked_sum(&terms.entropy)?,
        clip_low: masked_count(
            &ratio_tok
                .f_lt(1.0 - config.clip_low)?
                .f_logical_and(negative)?,
        )?,
        clip_high: masked_count(
            &ratio_tok
                .f_gt(1.0 + config.clip_high)?
                .f_logical_and(&pos)?,
        )?,
        dual_clip: match config.dual_clip {
            Some(c) => masked_count(&ratio_tok.f_gt(c)?.f_logical_and(negative)?)?,
            None => zero()?,
        },
        ppo_kl_sum: old.f_sub(lp)?.f_mul(maskf)?.f_sum(Kind::Double)?,
        ratio_max: rmax.f_to_kind(Kind::Double)?,
        ratio_min: rmin.f_to_kind(Kind::Double)?,
    };
    let stacked = Tensor::f_stack(&sums.into_array(), 0)?;
    let v: [f64; 12] = Vec::<f64>::try_from(&stacked)?
        .try_into()
        .map_err(|v: Vec<f64>| {
            tch::TchError::Shape(format!("{} metric sums read back, not 12", v.len()))
        })?;
    let m = MetricSums::from_array(v);
    let tokens = m.tokens;
    Ok(LossStats {
        tokens,
        sequences: m.sequences,
        policy_loss: m.policy_loss,
        kl_loss: m.kl_loss,
        kl_sum: m.kl_sum,
        kl_tokens: if terms.kl.is_some() { tokens } else { 0.0 },
        entropy_sum: m.entropy_sum,
        entropy_tokens: if terms.entropy.is_some() { tokens } else { 0.0 },
        clip_low: m.clip_low,
        clip_high: m.clip_high,
        dual_clip: m.dual_clip,
        ppo_kl_sum: m.ppo_kl_sum,
        ratio_max: if tokens > 0.0 { m.ratio_max } else { 1.0 },
        ratio_min: if tokens > 0.0 { m.ratio_min } else { 1.0 },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(rows: &[&[f64]]) -> Tensor {
        let w = rows[0].len() as i64;
        let flat: Vec<f64> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_slice(&flat).view([rows.len() as i64, w])
    }

    fn scalar(x: &Tensor) -> f64 {
        x.double_value(&[])
    }

    /// The hand-worked batch (see `hand_computed_values_every_aggregation`): log-ratios
    /// row 0 [ln 1.5, ln 0.5, 0] with A = +1, row 1 [ln 4, ln 0.5, pad] with A = −2; the pad
    /// holds NaN in every input.
    fn hand_batch() -> (Tensor, Tensor, Tensor, Tensor) {
        let logp = t(&[&[-1.0, -2.0, -0.5], &[-1.5, -0.7, f64::NAN]]).set_requires_grad(true);
        let lr = t(&[
            &[1.5f64.ln(), 0.5f64.ln(), 0.0],
            &[4f64.ln(), 0.5f64.ln(), f64::NAN],
        ]);
        let old = (&logp.detach() - &lr).detach();
        let adv = Tensor::from_slice(&[1.0f64, -2.0]);
        let mask = t(&[&[1.0, 1.0, 1.0], &[1.0, 1.0, 0.0]]);
        (logp, old, adv, mask)
    }

    fn no_kl(aggregation: Aggregation, dual: Option<f64>) -> LossConfig {
        LossConfig {
            kl_coef: 0.0,
            aggregation,
            dual_clip: dual,
            ..Default::default()
        }
    }

    #[test]
    fn hand_computed_values_every_aggregation() {
        // Per token (ε = 0.2, c₃ = 3):
        //   row 0, A = +1: ρ = 1.5 → max(−1.5, −1.2) = −1.2 (upper clip binds);
        //                  ρ = 0.5 → max(−0.5, −0.8) = −0.5 (A > 0 below the range: unclipped);
        //                  ρ = 1   → −1.
        //   row 1, A = −2: ρ = 4   → max(8, 2.4) = 8, dual clip min(8, 6) = 6;
        //                  ρ = 0.5 → max(1, 1.6) = 1.6 (lower clip binds).
        // Sum 4.9 over 5 tokens; row means −0.9 and 3.8.
        let (logp, old, adv, mask) = hand_batch();
        let norm = StepNormalizer::from_masks(&[&mask]).unwrap();
        assert_eq!(
            norm,
            StepNormalizer {
                tokens: 5.0,
                sequences: 2.0
            }
        );
        let cases = [
            (Aggregation::TokenMean, Some(3.0), 4.9 / 5.0),
            (Aggregation::SeqMeanTokenMean, Some(3.0), (-0.9 + 3.8) / 2.0),
            (
                Aggregation::Constant { length: Some(4) },
                Some(3.0),
                4.9 / 8.0,
            ),
            // Without the dual clip the ρ = 4 token costs 8: sum 6.9.
            (Aggregation::TokenMean, None, 6.9 / 5.0),
            (
                Aggregation::SeqMeanTokenMean,
                None,
                (-0.9 + 9.6 / 2.0) / 2.0,
            ),
            (Aggregation::Constant { length: Some(4) }, None, 6.9 / 8.0),
        ];
        for (agg, dual, want) in cases {
            let x = LossInputs {
                logprobs: &logp,
                old_logprobs: Some(&old),
                ref_logprobs: None,
                advantages: &adv,
                mask: &mask,
                entropy: None,
            };
            let out = grpo_loss(&x, &no_kl(agg, dual), &norm).unwrap();
            let got = scalar(&out.loss);
            assert!(
                (got - want).abs() < 1e-12,
                "{agg:?} dual {dual:?}: {got} vs {want}"
            );
            assert!((out.stats.policy_loss - want).abs() < 1e-12);
            assert_eq!(out.stats.tokens, 5.0);
            assert_eq!(out.stats.clip_high, 1.0);
            assert_eq!(out.stats.clip_low, 1.0);
            assert_eq!(out.stats.dual_clip, if dual.is_some() { 1.0 } else { 0.0 });
            assert!((out.stats.ratio_max - 4.0).abs() < 1e-12);
            assert!((out.stats.ratio_min - 0.5).abs() < 1e-12);
        }
    }

    #[test]
    fn dual_clip_passes_no_gradient_where_it_binds() {
        let (logp, old, adv, mask) = hand_batch();
        let norm = StepNormalizer::from_masks(&[&mask]).unwrap();
        let x = LossInputs {
            logprobs: &logp,
            old_logprobs: Some(&old),
            ref_logprobs: None,
            advantages: &adv,
            mask: &mask,
            entropy: None,
        };
        let out = grpo_loss(&x, &no_kl(Aggregation::TokenMean, Some(3.0)), &norm).unwrap();
        out.loss.backward();
        let g = Vec::<f64>::try_from(logp.grad().flatten(0, -1)).unwrap();
        // d/dlogp of −A·ρ is −A·ρ where unclipped, 0 where a clip binds; / 5 tokens.
        let want = [0.0, -0.5 / 5.0, -1.0 / 5.0, 0.0, 0.0, 0.0];
        for (i, (a, b)) in g.iter().zip(want).enumerate() {
            assert!((a - b).abs() < 1e-12, "token {i}: {a} vs {b}");
        }
    }

    #[test]
    fn hand_computed_kl_estimators() {
        // d = ref − logp = [ln 2, 0, −1].
        let logp = t(&[&[-1.0, -0.3, -0.2]]);
        let reference = t(&[&[-1.0 + 2f64.ln(), -0.3, -1.2]]);
        let k = |e| {
            Vec::<f64>::try_from(
                kl_estimate(&logp, &reference, e, None, None)
                    .unwrap()
                    .flatten(0, -1),
            )
            .unwrap()
        };
        let l2 = 2f64.ln();
        let close = |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-12);
        assert!(close(&k(KlEstimator::K1), &[-l2, 0.0, 1.0]));
        assert!(close(&k(KlEstimator::K2), &[l2 * l2 / 2.0, 0.0, 0.5]));
        assert!(close(&k(KlEstimator::K3), &[1.0 - l2, 0.0, (-1f64).exp()]));
        // Clamps: d clamped to ±0.5 then the value to ±0.1.
        let c = Vec::<f64>::try_from(
            kl_estimate(&logp, &reference, KlEstimator::K1, Some(0.5), Some(0.1))
                .unwrap()
                .flatten(0, -1),
        )
        .unwrap();
        assert!(close(&c, &[-0.1, 0.0, 0.1]));
    }

    #[test]
    fn kl_term_and_entropy_bonus_hand_computed() {
        // One row, two tokens, A = 0 (no policy term), ratio 1.
        // k3 with d = [ln 2, 0]: [1 − ln 2, 0]; token mean (1 − ln 2)/2; β = 0.1.
        // Entropies [1, 3]: mean 2; coef 0.05 → −0.1.
        let logp = t(&[&[-1.0, -0.3]]).set_requires_grad(true);
        let reference = t(&[&[-1.0 + 2f64.ln(), -0.3]]);
        let h = t(&[&[1.0, 3.0]]);
        let mask = t(&[&[1.0, 1.0]]);
        let adv = Tensor::from_slice(&[0.0f64]);
        let cfg = LossConfig {
            kl_coef: 0.1,
            entropy_coef: 0.05,
            ..Default::default()
        };
        let norm = StepNormalizer::from_masks(&[&mask]).unwrap();
        let out = grpo_loss(
            &LossInputs {
                logprobs: &logp,
                old_logprobs: None,
                ref_logprobs: Some(&reference),
                advantages: &adv,
                mask: &mask,
                entropy: Some(&h),
            },
            &cfg,
            &norm,
        )
        .unwrap();
        let want = 0.1 * (1.0 - 2f64.ln()) / 2.0 - 0.05 * 2.0;
        assert!((scalar(&out.loss) - want).abs() < 1e-12);
        assert!((out.stats.kl().unwrap() - (1.0 - 2f64.ln()) / 2.0).abs() < 1e-12);
        assert_eq!(out.stats.entropy(), Some(2.0));
        assert_eq!(out.stats.policy_loss, 0.0);
    }

    #[test]
    fn sequence_ratio_hand_computed() {
        // Row log-ratios [ln 1.5, ln 0.5, 0]: mean ln(0.75)/3 → s = 0.75^(1/3) ≈ 0.9086, inside
        // [0.8, 1.2]: loss −A·s on all three tokens. Row 1 [ln 4, ln 0.5]: s = 2^(1/2) ≈ 1.414,
        // A = −2: max(2.83, 2.4) = 2.83 (below the dual clip 6).
        let (logp, old, adv, mask) = hand_batch();
        let norm = StepNormalizer::from_masks(&[&mask]).unwrap();
        let cfg = LossConfig {
            ratio_level: RatioLevel::Sequence,
            kl_coef: 0.0,
            aggregation: Aggregation::SeqMeanTokenMean,
            ..Default::default()
        };
        let out = grpo_loss(
            &LossInputs {
                logprobs: &logp,
                old_logprobs: Some(&old),
                ref_logprobs: None,
                advantages: &adv,
                mask: &mask,
                entropy: None,
            },
            &cfg,
            &norm,
        )
        .unwrap();
        let s0 = 0.75f64.powf(1.0 / 3.0);
        let s1 = 2f64.sqrt();
        let want = (-s0 + 2.0 * s1) / 2.0;
        assert!(
            (scalar(&out.loss) - want).abs() < 1e-12,
            "{}",
            scalar(&out.loss)
        );
    }

    #[test]
    fn first_inner_iteration_has_ratio_one_and_clipping_changes_nothing() {
        let (logp, _, adv, mask) = hand_batch();
        let norm = StepNormalizer::from_masks(&[&mask]).unwrap();
        let run = |cfg: LossConfig, old: Option<&Tensor>| {
            let lp = logp.detach().set_requires_grad(true);
            let out = grpo_loss(
                &LossInputs {
                    logprobs: &lp,
                    old_logprobs: old,
                    ref_logprobs: None,
                    advantages: &adv,
                    mask: &mask,
                    entropy: None,
                },
                &cfg,
                &norm,
            )
            .unwrap();
            out.loss.backward();
            (scalar(&out.loss), lp.grad(), out.stats)
        };
        let clipped = no_kl(Aggregation::TokenMean, Some(3.0));
        let unclipped = LossConfig {
            clip_low: 0.0,
            clip_high: 1e9,
            dual_clip: None,
            ..clipped
        };
        let (a, ga, sa) = run(clipped, None);
        let same = logp.detach();
        let (b, gb, _) = run(unclipped, Some(&same));
        assert_eq!(a, b);
        assert!(ga.allclose(&gb, 0.0, 0.0, false));
        assert_eq!((sa.ratio_max, sa.ratio_min), (1.0, 1.0));
        assert_eq!(sa.clip_low + sa.clip_high + sa.dual_clip, 0.0);
        // REINFORCE with baseline: d loss / d logp = −A · mask / N.
        let want = (&adv.view([2, 1]) * &mask).neg() / 5.0;
        assert!(ga.allclose(&want, 1e-12, 1e-12, false));
        // Loss value −(1·3 − 2·2)/5 = 0.2.
        assert!((a - 0.2).abs() < 1e-12);
    }

    #[test]
    fn shapes_and_missing_inputs_are_named() {
        let (logp, old, adv, mask) = hand_batch();
        let norm = StepNormalizer::from_masks(&[&mask]).unwrap();
        let base = LossInputs {
            logprobs: &logp,
            old_logprobs: Some(&old),
            ref_logprobs: None,
            advantages: &adv,
            mask: &mask,
            entropy: None,
        };
        let err = |x: LossInputs<'_>, cfg: LossConfig| match grpo_loss(&x, &cfg, &norm) {
            Err(Error::Tensor { argument, .. }) => argument,
            other => panic!("expected a tensor error, got {other:?}"),
        };
        let short = Tensor::zeros([2, 2], (Kind::Double, tch::Device::Cpu));
        assert_eq!(
            err(
                LossInputs {
                    old_logprobs: Some(&short),
                    ..base
                },
                no_kl(Aggregation::TokenMean, None)
            ),
            "old_logprobs"
        );
        assert_eq!(
            err(
                LossInputs {
                    mask: &short,
                    ..base
                },
                no_kl(Aggregation::TokenMean, None)
            ),
            "mask"
        );
        let a3 = Tensor::zeros([3], (Kind::Double, tch::Device::Cpu));
        assert_eq!(
            err(
                LossInputs {
                    advantages: &a3,
                    ..base
                },
                no_kl(Aggregation::TokenMean, None)
            ),
            "advantages"
        );
        assert_eq!(err(base, LossConfig::default()), "ref_logprobs");
        let ent = LossConfig {
            entropy_coef: 0.1,
            ..no_kl(Aggregation::TokenMean, None)
        };
        assert_eq!(err(base, ent), "entropy");
        assert!(matches!(
            grpo_loss(
                &base,
                &no_kl(Aggregation::Constant { length: None }, None),
                &norm
            ),
            Err(Error::Config {
                field: "loss.aggregation",
                ..
            })
        ));
    }
}
