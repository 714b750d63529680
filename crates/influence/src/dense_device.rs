//! The dense projection's ±1 matrix generated on the device that projects: the same ChaCha8
//! streams as the CPU generator (`rand_chacha`'s `ChaCha8Rng`, keyed by the seed, one stream per
//! block of rows), evaluated with integer tensor ops, so a GPU builds its blocks where it uses
//! them and no `P × k` matrix crosses the bus, and every device gets the same matrix bit for bit.
//!
//! ChaCha's 32-bit words live in i64 tensors in `[0, 2³²)`: additions are masked, rotations are a
//! masked left shift or'ed with a right shift (no intermediate exceeds 2⁴⁸, so nothing overflows
//! on any backend). The four quarter-rounds of a ChaCha round run as one op on `[4, …]` slices.

use rand_chacha::ChaCha8Rng;
use rand_core::SeedableRng;
use tch::{Device, Kind, Tensor};

use crate::error::{Result, TorchContext};

const M32: i64 = 0xFFFF_FFFF;
/// "expand 32-byte k".
const SIGMA: [i64; 4] = [0x6170_7865, 0x3320_646e, 0x7962_2d32, 0x6b20_6574];
/// ChaCha8: four double rounds.
const DOUBLE_ROUNDS: usize = 4;

/// The key `ChaCha8Rng::seed_from_u64(seed)` runs with, as eight little-endian words.
fn key_words(seed: u64) -> [i64; 8] {
    let key = ChaCha8Rng::seed_from_u64(seed).get_seed();
    std::array::from_fn(|i| {
        i64::from(u32::from_le_bytes([
            key[4 * i],
            key[4 * i + 1],
            key[4 * i + 2],
            key[4 * i + 3],
        ]))
    })
}

fn add(a: &Tensor, b: &Tensor) -> std::result::Result<Tensor, tch::TchError> {
    a.f_add(b)?.f_bitwise_and(M32)
}

fn rotl(x: &Tensor, n: i64) -> std::result::Result<Tensor, tch::TchError> {
    x.f_bitwise_left_shift_tensor_scalar(n)?
        .f_bitwise_and(M32)?
        .f_bitwise_or_tensor(&x.f_bitwise_right_shift_tensor_scalar(32 - n)?)
}

/// Four quarter-rounds at once on `[4, …]` slices a, b, c, d.
fn quarter_rounds(
    a: Tensor,
    b: Tensor,
    c: Tensor,
    d: Tensor,
) -> std::result::Result<[Tensor; 4], tch::TchError> {
    let a = add(&a, &b)?;
    let d = rotl(&d.f_bitwise_xor_tensor(&a)?, 16)?;
    let c = add(&c, &d)?;
    let b = rotl(&b.f_bitwise_xor_tensor(&c)?, 12)?;
    let a = add(&a, &b)?;
    let d = rotl(&d.f_bitwise_xor_tensor(&a)?, 8)?;
    let c = add(&c, &d)?;
    let b = rotl(&b.f_bitwise_xor_tensor(&c)?, 7)?;
    Ok([a, b, c, d])
}

/// ChaCha8 output words `[16, S, C]` for streams `s0..s0+S` (the nonce) and block counters
/// `0..C`, on `device`.
fn chacha_blocks(
    seed: u64,
    s0: i64,
    streams: i64,
    counters: i64,
    device: Device,
) -> std::result::Result<Tensor, tch::TchError> {
    let opts = (Kind::Int64, device);
    let shape = [streams, counters];
    let key = key_words(seed);
    let ctr = Tensor::f_arange(counters, opts)?
        .f_view([1, counters])?
        .f_expand(shape, false)?;
    let stream = Tensor::f_arange_start(s0, s0 + streams, opts)?
        .f_view([streams, 1])?
        .f_expand(shape, false)?;
    let full = |v: i64| Tensor::f_full(shape, v, opts);
    let mut words = Vec::with_capacity(16);
    for &s in &SIGMA {
        words.push(full(s)?);
    }
    for &k in &key {
        words.push(full(k)?);
    }
    words.push(ctr.f_bitwise_and(M32)?);
    words.push(ctr.f_bitwise_right_shift_tensor_scalar(32)?);
    words.push(stream.f_bitwise_and(M32)?);
    words.push(stream.f_bitwise_right_shift_tensor_scalar(32)?);
    let init = Tensor::f_stack(&words, 0)?;
    let mut x = init.shallow_clone();
    for _ in 0..DOUBLE_ROUNDS {
        let [a, b, c, d] = quarter_rounds(
            x.f_narrow(0, 0, 4)?,
            x.f_narrow(0, 4, 4)?,
            x.f_narrow(0, 8, 4)?,
            x.f_narrow(0, 12, 4)?,
        )?;
        // Diagonals (0,5,10,15), (1,6,11,12), …: lane i takes b[i+1], c[i+2], d[i+3].
        let [a, b, c, d] = quarter_rounds(
            a,
            b.f_roll([-1], [0])?,
            c.f_roll([-2], [0])?,
            d.f_roll([-3], [0])?,
        )?;
        x = Tensor::f_cat(
            &[
                a,
                b.f_roll([1], [0])?,
                c.f_roll([2], [0])?,
                d.f_roll([3], [0])?,
            ],
            0,
        )?;
    }
    add(&x, &init)
}

/// Rows `start..start + rows` of the dense matrix (`start` a multiple of `block`, the rows per
/// stream) as `[rows, k]` f32 ±1 on `device`: entry `c` of a row is bit `c % 32` of the row's
/// `c / 32`-th stream word, each row taking `2·⌈k/64⌉` words of its block's stream.
pub(crate) fn dense_rows_on(
    seed: u64,
    start: usize,
    rows: usize,
    k: usize,
    block: usize,
    device: Device,
) -> Result<Tensor> {
    debug_assert!(start.is_multiple_of(block) && rows > 0);
    let row_words = 2 * k.div_ceil(64) as i64;
    let used_words = k.div_ceil(32) as i64;
    let streams = rows.div_ceil(block) as i64;
    // Every stream yields as many rows as the first needs (the last one's extras are cut).
    let per_stream = rows.min(block) as i64;
    let counters = (per_stream * row_words + 15) / 16;
    let f = || -> std::result::Result<Tensor, tch::TchError> {
        let words = chacha_blocks(seed, (start / block) as i64, streams, counters, device)?
            .f_permute([1, 2, 0])?
            .f_reshape([streams, counters * 16])?
            .f_narrow(1, 0, per_stream * row_words)?
            .f_view([streams, per_stream, row_words])?
            .f_narrow(2, 0, used_words)?;
        // The bit expansion is the largest tensor of the step: in i32 it takes half the memory.
        // Words ≥ 2³¹ map to their two's-complement value (exactly, no cast overflow); an
        // arithmetic right shift then still leaves bit n in bit 0 for n < 32.
        let words = words
            .f_bitwise_xor(0x8000_0000i64)?
            .f_sub_scalar(0x8000_0000i64)?
            .f_to_kind(Kind::Int)?
            .f_unsqueeze(3)?;
        let shifts = Tensor::f_arange(32, (Kind::Int, device))?;
        let bits = words
            .f_bitwise_right_shift(&shifts)?
            .f_bitwise_and(1)?
            .f_reshape([streams * per_stream, used_words * 32])?
            .f_narrow(1, 0, k as i64)?
            .f_narrow(0, 0, rows as i64)?;
        bits.f_to_kind(Kind::Float)?
            .f_mul_scalar(2.0)?
            .f_sub_scalar(1.0)
    };
    f().op("dense projection on the device")
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_core::RngCore;

    #[test]
    fn chacha_words_equal_rand_chacha() {
        for (seed, stream) in [(0u64, 0i64), (7, 3), (u64::MAX, (1 << 33) + 5)] {
            let got = chacha_blocks(seed, stream, 1, 3, Device::Cpu).unwrap();
            let got =
                Vec::<i64>::try_from(got.f_permute([1, 2, 0]).unwrap().reshape([-1])).unwrap();
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            rng.set_stream(stream as u64);
            let want: Vec<i64> = (0..48).map(|_| i64::from(rng.next_u32())).collect();
            assert_eq!(got, want, "seed {seed} stream {stream}");
        }
    }
}
