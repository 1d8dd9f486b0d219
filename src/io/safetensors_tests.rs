//! Tests of src/io/safetensors.rs: decoding on both paths, every kind of value.

use super::*;

#[test]
fn aligned_and_misaligned_decoding_agree() {
    let values: Vec<f32> = (0..37).map(|i| (i as f32 - 18.0) * 0.37).collect();
    for ty in [FloatType::F32, FloatType::F16, FloatType::Bf16] {
        let bytes = encode_f32(&values, ty);
        // One byte of offset forces the byte-by-byte path.
        let mut shifted = vec![0u8; bytes.len() + 1];
        shifted[1..].copy_from_slice(&bytes);
        let a = decode_f32(&bytes, ty);
        let b = decode_f32(&shifted[1..], ty);
        assert_eq!(a, b, "{ty:?}");
        for (x, y) in values.iter().zip(&a) {
            assert!(
                (x - y).abs() <= x.abs() * 1e-2 + 1e-3,
                "{ty:?}: {x} decoded as {y}"
            );
        }
    }
}

/// Both paths decode every bit pattern exactly as `half` and `f32::from_bits` do: random
/// patterns (a fresh seed, printed on failure) and the special ones (±0, subnormals, ±Inf,
/// NaNs), aligned and one byte off.
#[test]
fn decoding_is_exact_for_every_kind_of_value() {
    let seed = crate::linalg::fresh_seed();
    let mut state = seed | 1;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut words: Vec<u32> = (0..4096).map(|_| next() as u32).collect();
    for special in [
        0x0000_0000,
        0x8000_0000,
        0x0000_0001,
        0x807f_ffff,
        0x7f80_0000,
        0xff80_0000,
        0x7fc0_0001,
    ] {
        words.push(special);
    }
    let halves: Vec<u16> = words
        .iter()
        .map(|&w| w as u16)
        .chain([0x0001, 0x8000, 0x7c00, 0xfc00, 0x7e01, 0x03ff])
        .collect();
    // A 16-bit type's case: the patterns' bytes, and each widened to f32 by `half`.
    let sixteen = |widen: fn(u16) -> f32| -> (Vec<u8>, Vec<u32>) {
        (
            halves.iter().flat_map(|h| h.to_le_bytes()).collect(),
            halves.iter().map(|&h| widen(h).to_bits()).collect(),
        )
    };
    let (bf16_bytes, bf16_bits) = sixteen(|h| half::bf16::from_bits(h).to_f32());
    let (f16_bytes, f16_bits) = sixteen(|h| half::f16::from_bits(h).to_f32());
    let cases: [(FloatType, Vec<u8>, Vec<u32>); 3] = [
        (
            FloatType::F32,
            words.iter().flat_map(|w| w.to_le_bytes()).collect(),
            words.clone(),
        ),
        (FloatType::Bf16, bf16_bytes, bf16_bits),
        (FloatType::F16, f16_bytes, f16_bits),
    ];
    for (ty, bytes, want) in cases {
        let mut shifted = vec![0u8; bytes.len() + 1];
        shifted[1..].copy_from_slice(&bytes);
        for (path, input) in [("aligned", &bytes[..]), ("misaligned", &shifted[1..])] {
            let got: Vec<u32> = decode_f32(input, ty).iter().map(|x| x.to_bits()).collect();
            let same = |g: u32, w: u32| {
                g == w || (f32::from_bits(g).is_nan() && f32::from_bits(w).is_nan())
            };
            let bad = got.iter().zip(&want).position(|(&g, &w)| !same(g, w));
            assert!(
                bad.is_none(),
                "{ty:?} {path}, seed {seed}: value {bad:?} differs"
            );
            assert_eq!(got.len(), want.len());
        }
    }
}
