//! Rotary position embeddings, computed in f32 exactly as transformers computes them.

use optimsyn_data_io::{ModelConfig, RopeScaling};
use tch::{Device, Kind, Tensor};

use crate::error::{Result, TorchContext};

/// The inverse frequencies of one model (length `head_dim / 2`, f32), with any scaling applied.
#[derive(Debug)]
pub struct Rotary {
    inv_freq: Tensor,
}

impl Rotary {
    /// Builds the frequencies from a config: `1 / theta^(2i/d)` in f32, then `linear` or `llama3`
    /// scaling, with the same f32 operations as transformers' `modeling_rope_utils`.
    pub fn new(config: &ModelConfig, device: Device) -> Result<Self> {
        let dim = config.head_dim as i64;
        let f = || -> std::result::Result<Tensor, tch::TchError> {
            let exps = Tensor::f_arange_start_step(0, dim, 2, (Kind::Int64, Device::Cpu))?
                .f_to_kind(Kind::Float)?
                .f_div_scalar(dim)?;
            let inv_freq = Tensor::f_pow_scalar(config.rope_theta, &exps)?.f_reciprocal()?;
            let inv_freq = match &config.rope_scaling {
                None => inv_freq,
                Some(RopeScaling::Linear { factor }) => inv_freq.f_div_scalar(*factor)?,
                Some(RopeScaling::Llama3 {
                    factor,
                    low_freq_factor,
                    high_freq_factor,
                    original_max_position_embeddings,
                }) => {
                    let old_len = *original_max_position_embeddings as f64;
                    let low_wavelen = old_len / low_freq_factor;
                    let high_wavelen = old_len / high_freq_factor;
                    let wavelen = inv_freq
                        .f_reciprocal()?
                        .f_mul_scalar(2.0 * std::f64::consts::PI)?;
                    let is_low = wavelen.f_gt(low_wavelen)?;
                    let llama = inv_freq
                        .f_div_scalar(*factor)?
                        .f_where_self(&is_low, &inv_freq)?;
                    let smooth = wavelen
                        .f_reciprocal()?
                        .f_mul_scalar(old_len)?
                        .f_sub_scalar(*low_freq_factor)?
                        .f_div_scalar(high_freq_factor - low_freq_factor)?;
                    let one_minus = smooth.f_neg()?.f_add_scalar(1.0)?;
                    let smoothed = one_minus
                        .f_mul(&llama)?
                        .f_div_scalar(*factor)?
                        .f_add(&smooth.f_mul(&llama)?)?;
                    let medium = wavelen
                        .f_lt(high_wavelen)?
                        .f_logical_not()?
                        .f_logical_and(&is_low.f_logical_not()?)?;
                    smoothed.f_where_self(&medium, &llama)?
                }
            };
            inv_freq.f_to_device(device)
        };
        Ok(Rotary {
            inv_freq: f().op("RoPE frequencies")?,
        })
    }

    /// `(cos, sin)` of shape `[B, T, head_dim]` in `kind` for integer positions `[B, T]` (computed in
    /// f32, or f64 for an f64 model).
    pub fn cos_sin(&self, positions: &Tensor, kind: Kind) -> Result<(Tensor, Tensor)> {
        let f = || -> std::result::Result<(Tensor, Tensor), tch::TchError> {
            // f32 as transformers, except for f64 models, which keep their precision throughout.
            let calc = if kind == Kind::Double {
                Kind::Double
            } else {
                Kind::Float
            };
            let freqs = positions
                .f_to_kind(calc)?
                .f_unsqueeze(-1)?
                .f_mul(&self.inv_freq.f_to_kind(calc)?)?;
            let emb = Tensor::f_cat(&[&freqs, &freqs], -1)?;
            Ok((emb.f_cos()?.f_to_kind(kind)?, emb.f_sin()?.f_to_kind(kind)?))
        };
        f().op("RoPE cos/sin")
    }
}

/// Applies RoPE to `x` of shape `[B, heads, T, D]` with `cos`/`sin` of shape `[B, T, D]`:
/// `x * cos + rotate_half(x) * sin`, as transformers' `apply_rotary_pos_emb`. The model uses
/// [`apply_rotary_signed`] with a cached [`signed_sin`]; this form is the tests' reference.
#[cfg(test)]
pub(crate) fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let f = || -> std::result::Result<(Tensor, Tensor), tch::TchError> {
        Ok((cos.f_unsqueeze(1)?, sin.f_unsqueeze(1)?))
    };
    let (cos, sin) = f().op("RoPE")?;
    apply_rotary_signed(x, &cos, &signed_sin(&sin)?)
}

/// `sin` with its first half negated, so that `rotate_half(x) * sin` becomes
/// `roll(x, D/2) * signed_sin`: `rotate_half(x) = [-x₂, x₁]` and `roll(x, D/2) = [x₂, x₁]`, and
/// `x₂ · (−s)` is `−(x₂ · s)` exactly, so the result is bit-identical.
pub(crate) fn signed_sin(sin: &Tensor) -> Result<Tensor> {
    let f = || -> std::result::Result<Tensor, tch::TchError> {
        let d = sin.size().last().copied().unwrap_or(0);
        let half = d / 2;
        Tensor::f_cat(
            &[
                &sin.f_narrow(-1, 0, half)?.f_neg()?,
                &sin.f_narrow(-1, half, d - half)?,
            ],
            -1,
        )
    };
    f().op("RoPE")
}

/// [`apply_rotary`] with `cos` and [`signed_sin`] already broadcastable to `x` (three tensor ops
/// per call instead of nine: decoding runs it twice per layer per token).
pub(crate) fn apply_rotary_signed(x: &Tensor, cos: &Tensor, signed_sin: &Tensor) -> Result<Tensor> {
    let f = || -> std::result::Result<Tensor, tch::TchError> {
        let d = x.size().last().copied().unwrap_or(0);
        let rolled = x.f_roll([d / 2].as_slice(), [-1i64].as_slice())?;
        x.f_mul(cos)?.f_add(&rolled.f_mul(signed_sin)?)
    };
    f().op("RoPE")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rolled_rotary_is_bit_identical_to_rotate_half() {
        tch::manual_seed(1);
        let x = Tensor::randn([2, 3, 5, 8], (Kind::Float, Device::Cpu));
        let cos = Tensor::randn([2, 5, 8], (Kind::Float, Device::Cpu));
        let sin = Tensor::randn([2, 5, 8], (Kind::Float, Device::Cpu));
        let rotated = Tensor::cat(&[&x.narrow(-1, 4, 4).neg(), &x.narrow(-1, 0, 4)], -1);
        let want = &x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1);
        let got = apply_rotary(&x, &cos, &sin).unwrap();
        assert!(got.equal(&want));
    }
}
