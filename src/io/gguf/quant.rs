//! GGML tensor types and their dequantization to f32, written to give the same bits as the
//! reference reader (the `gguf` Python package's `gguf.quants.dequantize`, which follows
//! ggml-quants.c): every value is formed with the same f32 operations in the same order — a scale
//! times a quant, then an offset added or subtracted, never fused. The element order inside a
//! block is the reference's; each function's comment spells it out.

use half::f16;

/// Elements per K-quant super-block.
const QK_K: usize = 256;

/// The tensor types of the GGUF format this reader knows by id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Bf16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    /// OCP Microscaling FP4 (GPT-OSS's experts): 32 E2M1 values sharing a power-of-two scale.
    Mxfp4,
    /// A type id the format defines but this reader does not dequantize (IQ*, Q8_1, Q8_K, TQ*,
    /// integer tensors, …), kept so the error can name it.
    Other(u32),
}

impl GgmlType {
    /// The type of a GGUF type id.
    pub fn from_id(id: u32) -> Self {
        match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            10 => GgmlType::Q2K,
            11 => GgmlType::Q3K,
            12 => GgmlType::Q4K,
            13 => GgmlType::Q5K,
            14 => GgmlType::Q6K,
            30 => GgmlType::Bf16,
            39 => GgmlType::Mxfp4,
            other => GgmlType::Other(other),
        }
    }

    /// The name llama.cpp gives the type.
    pub fn name(self) -> String {
        match self {
            GgmlType::F32 => "F32".into(),
            GgmlType::F16 => "F16".into(),
            GgmlType::Bf16 => "BF16".into(),
            GgmlType::Q4_0 => "Q4_0".into(),
            GgmlType::Q4_1 => "Q4_1".into(),
            GgmlType::Q5_0 => "Q5_0".into(),
            GgmlType::Q5_1 => "Q5_1".into(),
            GgmlType::Q8_0 => "Q8_0".into(),
            GgmlType::Q2K => "Q2_K".into(),
            GgmlType::Q3K => "Q3_K".into(),
            GgmlType::Q4K => "Q4_K".into(),
            GgmlType::Q5K => "Q5_K".into(),
            GgmlType::Q6K => "Q6_K".into(),
            GgmlType::Mxfp4 => "MXFP4".into(),
            GgmlType::Other(id) => match OTHER_NAMES.iter().find(|(i, _)| *i == id) {
                Some((_, n)) => (*n).into(),
                None => format!("type id {id}"),
            },
        }
    }

    /// (elements per block, bytes per block); None for types this reader cannot size.
    pub fn block(self) -> Option<(usize, usize)> {
        Some(match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::Bf16 => (1, 2),
            GgmlType::Q4_0 => (32, 18),
            GgmlType::Q4_1 => (32, 20),
            GgmlType::Q5_0 => (32, 22),
            GgmlType::Q5_1 => (32, 24),
            GgmlType::Q8_0 => (32, 34),
            GgmlType::Q2K => (QK_K, 84),
            GgmlType::Q3K => (QK_K, 110),
            GgmlType::Q4K => (QK_K, 144),
            GgmlType::Q5K => (QK_K, 176),
            GgmlType::Q6K => (QK_K, 210),
            GgmlType::Mxfp4 => (32, 17),
            GgmlType::Other(_) => return None,
        })
    }

    /// True for the plain float types (their bytes are the values, no blocks).
    pub fn is_float(self) -> bool {
        matches!(self, GgmlType::F32 | GgmlType::F16 | GgmlType::Bf16)
    }
}

/// Names of the type ids the format defines beyond those dequantized here, for errors.
const OTHER_NAMES: &[(u32, &str)] = &[
    (9, "Q8_1"),
    (15, "Q8_K"),
    (16, "IQ2_XXS"),
    (17, "IQ2_XS"),
    (18, "IQ3_XXS"),
    (19, "IQ1_S"),
    (20, "IQ4_NL"),
    (21, "IQ3_S"),
    (22, "IQ2_S"),
    (23, "IQ4_XS"),
    (24, "I8"),
    (25, "I16"),
    (26, "I32"),
    (27, "I64"),
    (28, "F64"),
    (29, "IQ1_M"),
    (34, "TQ1_0"),
    (35, "TQ2_0"),
];

/// Dequantizes whole blocks of `ty` from `bytes` into `out` (`out.len()` elements, a multiple
/// of the block size; `bytes` exactly the blocks that hold them).
///
/// # Panics
/// On a type without a block layout or lengths that do not match: callers size both from the
/// validated header.
pub fn dequantize(ty: GgmlType, bytes: &[u8], out: &mut [f32]) {
    let (elems, size) = ty.block().expect("a dequantizable type");
    assert_eq!(out.len() % elems, 0, "whole blocks");
    assert_eq!(
        bytes.len(),
        out.len() / elems * size,
        "bytes of whole blocks"
    );
    let blocks = bytes.chunks_exact(size).zip(out.chunks_exact_mut(elems));
    match ty {
        GgmlType::F32 => {
            blocks.for_each(|(b, o)| o[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        }
        GgmlType::F16 => blocks.for_each(|(b, o)| o[0] = half_at(b, 0)),
        GgmlType::Bf16 => blocks.for_each(|(b, o)| {
            o[0] = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16)
        }),
        GgmlType::Q4_0 => blocks.for_each(|(b, o)| q4_0(b, o)),
        GgmlType::Q4_1 => blocks.for_each(|(b, o)| q4_1(b, o)),
        GgmlType::Q5_0 => blocks.for_each(|(b, o)| q5_0(b, o)),
        GgmlType::Q5_1 => blocks.for_each(|(b, o)| q5_1(b, o)),
        GgmlType::Q8_0 => blocks.for_each(|(b, o)| q8_0(b, o)),
        GgmlType::Q2K => blocks.for_each(|(b, o)| q2_k(b, o)),
        GgmlType::Q3K => blocks.for_each(|(b, o)| q3_k(b, o)),
        GgmlType::Q4K => blocks.for_each(|(b, o)| q4_k(b, o)),
        GgmlType::Q5K => blocks.for_each(|(b, o)| q5_k(b, o)),
        GgmlType::Q6K => blocks.for_each(|(b, o)| q6_k(b, o)),
        GgmlType::Mxfp4 => blocks.for_each(|(b, o)| mxfp4(b, o)),
        GgmlType::Other(_) => unreachable!("no block layout"),
    }
}

/// The f16 at byte `at`, widened (exactly) to f32.
fn half_at(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// The low nibbles of `qs` are elements 0..16, the high nibbles 16..32.
fn nibble(qs: &[u8], j: usize) -> u8 {
    let half = qs.len();
    if j < half {
        qs[j] & 0x0F
    } else {
        qs[j - half] >> 4
    }
}

/// d (f16), 16 bytes of nibbles: d · (q − 8).
fn q4_0(b: &[u8], o: &mut [f32]) {
    let d = half_at(b, 0);
    for (j, v) in o.iter_mut().enumerate() {
        *v = d * (nibble(&b[2..18], j) as i32 - 8) as f32;
    }
}

/// d, m (f16), 16 bytes of nibbles: d · q + m.
fn q4_1(b: &[u8], o: &mut [f32]) {
    let (d, m) = (half_at(b, 0), half_at(b, 2));
    for (j, v) in o.iter_mut().enumerate() {
        *v = d * nibble(&b[4..20], j) as f32 + m;
    }
}

/// Bit j of the little-endian u32 at `at`: the fifth bit of element j.
fn high_bit(b: &[u8], at: usize, j: usize) -> u8 {
    let qh = u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    ((qh >> j) & 1) as u8
}

/// d, qh (u32), 16 bytes of nibbles: d · ((q | h<<4) − 16).
fn q5_0(b: &[u8], o: &mut [f32]) {
    let d = half_at(b, 0);
    for (j, v) in o.iter_mut().enumerate() {
        let q = nibble(&b[6..22], j) | (high_bit(b, 2, j) << 4);
        *v = d * (q as i32 - 16) as f32;
    }
}

/// d, m, qh, 16 bytes of nibbles: d · (q | h<<4) + m.
fn q5_1(b: &[u8], o: &mut [f32]) {
    let (d, m) = (half_at(b, 0), half_at(b, 2));
    for (j, v) in o.iter_mut().enumerate() {
        let q = nibble(&b[8..24], j) | (high_bit(b, 4, j) << 4);
        *v = d * q as f32 + m;
    }
}

/// d, 32 signed bytes: q · d.
fn q8_0(b: &[u8], o: &mut [f32]) {
    let d = half_at(b, 0);
    for (j, v) in o.iter_mut().enumerate() {
        *v = (b[2 + j] as i8) as f32 * d;
    }
}

/// scales[16] (low nibble scale, high nibble min), qs[64], d, dmin. Element e = 128h + 32s + l
/// takes bits 2s..2s+2 of qs[32h + l]; its sub-block is e / 16: (d·sc)·q − dmin·m.
fn q2_k(b: &[u8], o: &mut [f32]) {
    let (scales, qs) = (&b[0..16], &b[16..80]);
    let (d, dmin) = (half_at(b, 80), half_at(b, 82));
    for (e, v) in o.iter_mut().enumerate() {
        let (h, s, l) = (e / 128, (e / 32) % 4, e % 32);
        let q = (qs[32 * h + l] >> (2 * s)) & 3;
        let sc = scales[e / 16];
        let dl = d * (sc & 0x0F) as f32;
        let ml = dmin * (sc >> 4) as f32;
        *v = dl * q as f32 - ml;
    }
}

/// hmask[32], qs[64], scales[12] (sixteen 6-bit signed scales), d. Element e = 128h + 32s + l:
/// low bits 2s..2s+2 of qs[32h + l], high bit e / 32 of hmask[l] (set means no offset of −4):
/// (d·sc)·q.
fn q3_k(b: &[u8], o: &mut [f32]) {
    let (hmask, qs, packed) = (&b[0..32], &b[32..96], &b[96..108]);
    let d = half_at(b, 108);
    let mut dl = [0f32; 16];
    for (i, dl) in dl.iter_mut().enumerate() {
        let low = (packed[i % 8] >> (4 * (i / 8))) & 0x0F;
        let high = (packed[8 + i % 4] >> (2 * (i / 4))) & 0x03;
        let sc = ((low | (high << 4)) as i8).wrapping_sub(32);
        *dl = d * sc as f32;
    }
    for (e, v) in o.iter_mut().enumerate() {
        let (h, s, l) = (e / 128, (e / 32) % 4, e % 32);
        let low = ((qs[32 * h + l] >> (2 * s)) & 3) as i8;
        let offset = ((hmask[l] >> (e / 32)) & 1) ^ 1;
        let q = low - ((offset << 2) as i8);
        *v = dl[e / 16] * q as f32;
    }
}

/// The eight 6-bit scales and mins of a Q4_K/Q5_K super-block, packed in 12 bytes.
fn scale_min_k4(packed: &[u8]) -> ([u8; 8], [u8; 8]) {
    let (mut sc, mut mn) = ([0u8; 8], [0u8; 8]);
    for j in 0..4 {
        sc[j] = packed[j] & 0x3F;
        mn[j] = packed[4 + j] & 0x3F;
        sc[4 + j] = (packed[8 + j] & 0x0F) | ((packed[j] >> 2) & 0x30);
        mn[4 + j] = (packed[8 + j] >> 4) | ((packed[4 + j] >> 2) & 0x30);
    }
    (sc, mn)
}

/// d, dmin, scales[12], qs[128]. Element e = 64c + 32s + l takes nibble s of qs[32c + l]; its
/// sub-block is e / 32: (d·sc)·q − dmin·m.
fn q4_k(b: &[u8], o: &mut [f32]) {
    let (d, dmin) = (half_at(b, 0), half_at(b, 2));
    let (sc, mn) = scale_min_k4(&b[4..16]);
    let qs = &b[16..144];
    // A sub-block (32 elements, one scale and min) at a time: the inner loop vectorizes.
    for (j, out) in o.chunks_exact_mut(32).enumerate() {
        let (scale, min) = (d * sc[j] as f32, dmin * mn[j] as f32);
        let (q, shift) = (&qs[32 * (j / 2)..32 * (j / 2) + 32], 4 * (j % 2));
        for (v, &byte) in out.iter_mut().zip(q) {
            *v = scale * ((byte >> shift) & 0x0F) as f32 - min;
        }
    }
}

/// d, dmin, scales[12], qh[32], qs[128]: Q4_K's nibbles plus bit e / 32 of qh[l] as the fifth.
fn q5_k(b: &[u8], o: &mut [f32]) {
    let (d, dmin) = (half_at(b, 0), half_at(b, 2));
    let (sc, mn) = scale_min_k4(&b[4..16]);
    let (qh, qs) = (&b[16..48], &b[48..176]);
    for (j, out) in o.chunks_exact_mut(32).enumerate() {
        let (scale, min) = (d * sc[j] as f32, dmin * mn[j] as f32);
        let (q, shift) = (&qs[32 * (j / 2)..32 * (j / 2) + 32], 4 * (j % 2));
        for ((v, &byte), &high) in out.iter_mut().zip(q).zip(qh) {
            let q = ((byte >> shift) & 0x0F) | (((high >> j) & 1) << 4);
            *v = scale * q as f32 - min;
        }
    }
}

/// ql[128], qh[64], scales[16] (i8), d. Element e = 128h + 64s + l (l < 64) takes nibble s of
/// ql[64h + l] and bits 2t..2t+2 of qh[32h + l % 32], with t = (e % 128) / 32: (d·sc)·(q − 32).
fn q6_k(b: &[u8], o: &mut [f32]) {
    let (ql, qh, scales) = (&b[0..128], &b[128..192], &b[192..208]);
    let d = half_at(b, 208);
    // 32 elements at a time: e = 128h + 32k + i, so s = k / 2, l = 32(k % 2) + i, t = k.
    for (chunk, out) in o.chunks_exact_mut(32).enumerate() {
        let (h, k) = (chunk / 4, chunk % 4);
        let low = &ql[64 * h + 32 * (k % 2)..64 * h + 32 * (k % 2) + 32];
        let high = &qh[32 * h..32 * h + 32];
        for (half, out) in out.chunks_exact_mut(16).enumerate() {
            let scale = d * (scales[2 * chunk + half] as i8) as f32;
            let at = 16 * half;
            for ((v, &lo), &hi) in out
                .iter_mut()
                .zip(&low[at..at + 16])
                .zip(&high[at..at + 16])
            {
                let q = (((lo >> (4 * (k / 2))) & 0x0F) | (((hi >> (2 * k)) & 3) << 4)) as i8 - 32;
                *v = scale * q as f32;
            }
        }
    }
}

/// The FP4 (E2M1) values by code, doubled to integers (ggml's `kvalues_mxfp4`): the scale is
/// halved to match.
const MXFP4_DOUBLED: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];

/// Half of the E8M0 scale `2^(e − 127)`, as ggml forms it (`ggml_e8m0_to_fp32_half`): bits, not
/// arithmetic, so that e = 0 and 1 give the subnormals 2^-128 and 2^-127, and e = 255 — NaN in
/// the OCP format — gives 2^127 (the finite check refuses what it then makes infinite).
fn e8m0_half(e: u8) -> f32 {
    if e < 2 {
        f32::from_bits(0x0020_0000 << e)
    } else {
        f32::from_bits((e as u32 - 1) << 23)
    }
}

/// e (E8M0), 16 bytes of nibbles (low nibbles elements 0..16, high 16..32, as Q4_0; llama.cpp's
/// converter reorders OpenAI's pairs into this): e8m0_half(e) · kvalue(q).
fn mxfp4(b: &[u8], o: &mut [f32]) {
    let d = e8m0_half(b[0]);
    let qs = &b[1..17];
    for (j, v) in o.iter_mut().enumerate() {
        *v = d * MXFP4_DOUBLED[nibble(qs, j) as usize] as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Q4_0 block by hand: d = 0.5, nibbles 0..16 then 15..0.
    #[test]
    fn q4_0_block_by_hand() {
        let mut b = vec![0u8; 18];
        b[0..2].copy_from_slice(&f16::from_f32(0.5).to_bits().to_le_bytes());
        for j in 0..16 {
            b[2 + j] = (j as u8) | ((15 - j as u8) << 4);
        }
        let mut o = vec![0f32; 32];
        dequantize(GgmlType::Q4_0, &b, &mut o);
        for j in 0..16 {
            assert_eq!(o[j], 0.5 * (j as f32 - 8.0));
            assert_eq!(o[16 + j], 0.5 * ((15 - j) as f32 - 8.0));
        }
    }

    /// Q8_0: the signed bytes times d.
    #[test]
    fn q8_0_block_by_hand() {
        let mut b = vec![0u8; 34];
        b[0..2].copy_from_slice(&f16::from_f32(0.25).to_bits().to_le_bytes());
        for j in 0..32 {
            b[2 + j] = (j as i8 - 16) as u8;
        }
        let mut o = vec![0f32; 32];
        dequantize(GgmlType::Q8_0, &b, &mut o);
        assert!((0..32).all(|j| o[j] == (j as f32 - 16.0) * 0.25));
    }

    /// Q6_K with every quant 32 (zero after the offset) and one element set: only that element
    /// is non-zero, at the index the layout comment gives.
    #[test]
    fn q6_k_places_each_element() {
        for e in [0usize, 31, 32, 63, 64, 100, 127, 128, 200, 255] {
            let mut b = vec![0u8; 210];
            // q = 32 everywhere: low nibble 0, high bits 2 (0b10 << 4).
            for byte in &mut b[128..192] {
                *byte = 0b1010_1010;
            }
            b[192..208].iter_mut().for_each(|s| *s = 1);
            b[208..210].copy_from_slice(&f16::from_f32(1.0).to_bits().to_le_bytes());
            let (h, s, l) = (e / 128, (e / 64) % 2, e % 64);
            b[64 * h + l] |= 5 << (4 * s);
            let mut o = vec![0f32; 256];
            dequantize(GgmlType::Q6K, &b, &mut o);
            for (i, &v) in o.iter().enumerate() {
                assert_eq!(v, if i == e { 5.0 } else { 0.0 }, "element {i}, set {e}");
            }
        }
    }

    /// MXFP4: a scale byte, then codes; each element's value is its FP4 code's times 2^(e−127),
    /// element j in the low nibble of byte j and element j + 16 in its high nibble.
    #[test]
    fn mxfp4_block_by_hand() {
        const FP4: [f32; 16] = [
            0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
        ];
        for e in [0u8, 1, 2, 100, 127, 130, 254] {
            let mut b = vec![e; 17];
            for j in 0..16 {
                b[1 + j] = (j as u8) | ((15 - j as u8) << 4);
            }
            let mut o = vec![0f32; 32];
            dequantize(GgmlType::Mxfp4, &b, &mut o);
            // A power of two f32 holds exactly (2^-127 as a subnormal); 6 · 2^127 overflows.
            let scale = 2f64.powi(e as i32 - 127) as f32;
            for j in 0..16 {
                assert_eq!(o[j], FP4[j] * scale, "e {e}, element {j}");
                assert_eq!(o[16 + j], FP4[15 - j] * scale, "e {e}, element {}", 16 + j);
            }
        }
        // ggml's e = 255 is 2^127, not NaN: code 7 (6.0) overflows to infinity.
        let mut b = vec![255u8; 17];
        b[1..].iter_mut().for_each(|q| *q = 0x71);
        let mut o = vec![0f32; 32];
        dequantize(GgmlType::Mxfp4, &b, &mut o);
        assert_eq!((o[0], o[16]), (2f32.powi(127), f32::INFINITY));
    }

    #[test]
    fn type_names_and_sizes() {
        assert_eq!(GgmlType::from_id(12), GgmlType::Q4K);
        assert_eq!(GgmlType::from_id(12).name(), "Q4_K");
        assert_eq!(GgmlType::from_id(20).name(), "IQ4_NL");
        assert_eq!(GgmlType::from_id(999).name(), "type id 999");
        assert_eq!(GgmlType::from_id(20).block(), None);
        assert_eq!(GgmlType::Q6K.block(), Some((256, 210)));
        assert_eq!(GgmlType::from_id(39).name(), "MXFP4");
        assert_eq!(GgmlType::from_id(39).block(), Some((32, 17)));
    }
}
