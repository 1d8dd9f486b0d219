//! Packed weights read back as the values they were packed from: each layout is packed here as
//! its quantizer lays it out (AutoGPTQ's `pack`, AutoAWQ's `from_linear`, compressed-tensors'
//! `pack_to_int32`), from random codes, zero points and scales.

use super::*;
use crate::linalg::philox::philox4x32_10;

use crate::io::quantized::test_file;
use crate::io::RawTensor as Raw;

fn words(w: &[u32]) -> Vec<u8> {
    w.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn floats(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Random integers below `n`, drawn from `seed`.
fn draws(seed: u64, count: usize, n: u32) -> Vec<u32> {
    let key = [seed as u32, (seed >> 32) as u32];
    (0..count)
        .map(|k| philox4x32_10([k as u32, 0, 0, 0], key)[0] % n)
        .collect()
}

/// Codes `[out][in]`, zero points `[out][groups]` (unsigned stored values), scales
/// `[out][groups]` and the group of each input: a random weight of `bits` bits.
struct Quantized {
    out: usize,
    inn: usize,
    bits: usize,
    codes: Vec<u32>,
    zeros: Vec<u32>,
    scales: Vec<f32>,
    groups: usize,
    group_of: Vec<usize>,
}

impl Quantized {
    fn random(out: usize, inn: usize, bits: usize, groups: usize, seed: u64) -> Self {
        let n = 1u32 << bits;
        let scales = draws(seed + 2, out * groups, 1000)
            .into_iter()
            .map(|x| (x as f32 + 1.0) / 4096.0)
            .collect();
        Quantized {
            out,
            inn,
            bits,
            codes: draws(seed, out * inn, n),
            zeros: draws(seed + 1, out * groups, n),
            scales,
            groups,
            group_of: (0..inn).map(|i| i * groups / inn).collect(),
        }
    }

    fn value(&self, o: usize, i: usize) -> f32 {
        let g = self.group_of[i];
        let q = self.codes[o * self.inn + i] as i32 - self.zeros[o * self.groups + g] as i32;
        q as f32 * self.scales[o * self.groups + g]
    }

    /// `[groups, out]` scales, as GPTQ and AWQ store them.
    fn scales_by_group(&self) -> Vec<f32> {
        let mut t = vec![0f32; self.groups * self.out];
        for o in 0..self.out {
            for g in 0..self.groups {
                t[g * self.out + o] = self.scales[o * self.groups + g];
            }
        }
        t
    }
}

/// Writes `tensors` as one file and finds its packed weights under `config`.
fn open(
    config: serde_json::Value,
    tensors: Vec<(&str, Raw)>,
) -> (tempfile::TempDir, Vec<TensorFile>, Result<PackedWeights>) {
    let (dir, shards, index) = test_file(tensors.iter().map(|(n, t)| (*n, t)));
    let found = PackedWeights::find(&config, &shards, &index);
    (dir, shards, found)
}

/// Reads rows `rows` of `w.weight` and checks every value.
fn check(q: &Quantized, shards: &[TensorFile], found: &PackedWeights, rows: Range<usize>) {
    assert_eq!(found.shape("w.weight"), Some(&[q.out, q.inn][..]));
    let (bytes, ty, cols) = found
        .read_rows("w.weight", rows.clone(), shards)
        .unwrap()
        .unwrap();
    assert_eq!((ty, cols), (FloatType::F32, q.inn));
    let got = decode_f32(&bytes, ty);
    for (r, o) in rows.enumerate() {
        for i in 0..q.inn {
            assert_eq!(got[r * q.inn + i], q.value(o, i), "row {o}, input {i}");
        }
    }
}

/// GPTQ's layout: codes packed down the inputs, zero points along the outputs (less one in the
/// `gptq` format).
fn gptq(q: &Quantized, zero_offset: bool, g_idx: bool) -> Vec<(&'static str, Raw)> {
    let per = 32 / q.bits;
    let mut qweight = vec![0u32; q.inn / per * q.out];
    for i in 0..q.inn {
        for o in 0..q.out {
            qweight[(i / per) * q.out + o] |= q.codes[o * q.inn + i] << (q.bits * (i % per));
        }
    }
    let mut qzeros = vec![0u32; q.groups * q.out / per];
    for g in 0..q.groups {
        for o in 0..q.out {
            let z =
                q.zeros[o * q.groups + g].wrapping_sub(zero_offset as u32) & ((1 << q.bits) - 1);
            qzeros[g * q.out / per + o / per] |= z << (q.bits * (o % per));
        }
    }
    let mut t = vec![
        (
            "w.qweight",
            Raw(Dtype::I32, vec![q.inn / per, q.out], words(&qweight)),
        ),
        (
            "w.qzeros",
            Raw(Dtype::I32, vec![q.groups, q.out / per], words(&qzeros)),
        ),
        (
            "w.scales",
            Raw(
                Dtype::F32,
                vec![q.groups, q.out],
                floats(&q.scales_by_group()),
            ),
        ),
    ];
    if g_idx {
        let g: Vec<u32> = q.group_of.iter().map(|&g| g as u32).collect();
        t.push(("w.g_idx", Raw(Dtype::I32, vec![q.inn], words(&g))));
    }
    t
}

#[test]
fn gptq_weights_read_as_their_codes_less_their_zero_points_times_their_scales() {
    for (bits, zero_offset) in [(4, true), (2, false), (8, true)] {
        let mut q = Quantized::random(16, 64, bits, 4, bits as u64);
        // In the `gptq` format a stored zero point is one less than the zero point, so a zero
        // point of 0 cannot be stored.
        if zero_offset {
            q.zeros.iter_mut().for_each(|z| *z = (*z).max(1));
        }
        let format = if zero_offset { "gptq" } else { "gptq_v2" };
        let config = serde_json::json!({"quantization_config": {
            "quant_method": "gptq", "bits": bits, "group_size": 16, "checkpoint_format": format}});
        let (_dir, shards, found) = open(config.clone(), gptq(&q, zero_offset, false));
        check(&q, &shards, &found.unwrap(), 3..11);
    }
    // Activation order: a group per input, in any order.
    let mut q = Quantized::random(8, 32, 4, 4, 9);
    q.zeros.iter_mut().for_each(|z| *z = (*z).max(1));
    q.group_of = draws(11, 32, 4).into_iter().map(|g| g as usize).collect();
    let config = serde_json::json!({"quantization_config": {
        "quant_method": "gptq", "bits": 4, "group_size": 8, "desc_act": true}});
    let (_dir, shards, found) = open(config, gptq(&q, true, true));
    check(&q, &shards, &found.unwrap(), 0..8);
}

#[test]
fn awq_weights_read_in_autoawqs_order_of_outputs() {
    let q = Quantized::random(24, 32, 4, 2, 5);
    let pack = |values: &[u32], rows: usize| {
        // AutoAWQ's from_linear: word `col` of a row takes output col·8 + ORDER[k] at nibble k.
        let mut w = vec![0u32; rows * q.out / 8];
        for r in 0..rows {
            for col in 0..q.out / 8 {
                for (k, &o) in AWQ_ORDER.iter().enumerate() {
                    w[r * q.out / 8 + col] |= values[r * q.out + col * 8 + o] << (4 * k);
                }
            }
        }
        w
    };
    let by_input: Vec<u32> = (0..q.inn * q.out)
        .map(|k| q.codes[(k % q.out) * q.inn + k / q.out])
        .collect();
    let by_group: Vec<u32> = (0..q.groups * q.out)
        .map(|k| q.zeros[(k % q.out) * q.groups + k / q.out])
        .collect();
    let tensors = vec![
        (
            "w.qweight",
            Raw(
                Dtype::I32,
                vec![q.inn, q.out / 8],
                words(&pack(&by_input, q.inn)),
            ),
        ),
        (
            "w.qzeros",
            Raw(
                Dtype::I32,
                vec![q.groups, q.out / 8],
                words(&pack(&by_group, q.groups)),
            ),
        ),
        (
            "w.scales",
            Raw(
                Dtype::F32,
                vec![q.groups, q.out],
                floats(&q.scales_by_group()),
            ),
        ),
    ];
    let config = serde_json::json!({"quantization_config": {
        "quant_method": "awq", "bits": 4, "group_size": 16, "version": "gemm", "zero_point": true}});
    let (_dir, shards, found) = open(config, tensors);
    check(&q, &shards, &found.unwrap(), 0..24);
}

/// compressed-tensors' packing: each row's values as one little-endian bit stream (whole codes
/// a word at the 1, 2, 4 and 8 bits read).
fn dense(values: &[u32], rows: usize, cols: usize, bits: usize) -> Vec<u32> {
    let per_row = (cols * bits).div_ceil(32);
    let mut w = vec![0u32; rows * per_row];
    for r in 0..rows {
        for c in 0..cols {
            let (bit, v) = (c * bits, values[r * cols + c] as u64);
            let at = r * per_row + bit / 32;
            w[at] |= (v << (bit % 32)) as u32;
            if bit % 32 + bits > 32 {
                w[at + 1] |= (v >> (32 - bit % 32)) as u32;
            }
        }
    }
    w
}

fn compressed_tensors(q: &Quantized, symmetric: bool) -> Vec<(&'static str, Raw)> {
    let per_row = (q.inn * q.bits).div_ceil(32);
    let mut t = vec![
        (
            "w.weight_packed",
            Raw(
                Dtype::I32,
                vec![q.out, per_row],
                words(&dense(&q.codes, q.out, q.inn, q.bits)),
            ),
        ),
        (
            "w.weight_shape",
            Raw(
                Dtype::I64,
                vec![2],
                [q.out as i64, q.inn as i64]
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
            ),
        ),
        (
            "w.weight_scale",
            Raw(Dtype::F32, vec![q.out, q.groups], floats(&q.scales)),
        ),
    ];
    if !symmetric {
        // Packed down the outputs: the transpose's rows are streams.
        let by_group: Vec<u32> = (0..q.groups * q.out)
            .map(|k| q.zeros[(k % q.out) * q.groups + k / q.out])
            .collect();
        let packed = dense(&by_group, q.groups, q.out, q.bits);
        let rows = (q.out * q.bits).div_ceil(32);
        let transposed: Vec<u32> = (0..rows * q.groups)
            .map(|k| packed[(k % q.groups) * rows + k / q.groups])
            .collect();
        t.push((
            "w.weight_zero_point",
            Raw(Dtype::I32, vec![rows, q.groups], words(&transposed)),
        ));
    }
    t
}

#[test]
fn compressed_tensors_pack_quantized_weights_read_from_their_bit_streams() {
    let config = |bits| {
        serde_json::json!({"quantization_config": {
        "quant_method": "compressed-tensors", "format": "pack-quantized",
        "config_groups": {"group_0": {"weights": {"num_bits": bits}}}}})
    };
    // 40 inputs leave the last word of a row part empty.
    for (bits, symmetric, groups) in [(4, false, 5), (2, false, 2), (1, true, 1), (8, true, 4)] {
        let mut q = Quantized::random(9, 40, bits, groups, 20 + bits as u64);
        if symmetric {
            q.zeros.iter_mut().for_each(|z| *z = 1 << (bits - 1));
        }
        let (_dir, shards, found) = open(config(bits), compressed_tensors(&q, symmetric));
        check(&q, &shards, &found.unwrap(), 2..9);
    }
}

#[test]
fn packed_weights_that_do_not_fit_are_refused_by_name() {
    let q = Quantized::random(16, 64, 4, 4, 3);
    let gptq_config = serde_json::json!({"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 16}});
    let err = |config: serde_json::Value, tensors| open(config, tensors).2.unwrap_err().to_string();
    // No scales.
    let mut t = gptq(&q, true, false);
    t.retain(|(n, _)| *n != "w.scales");
    let e = err(gptq_config.clone(), t);
    assert!(e.contains("w.qweight") && e.contains("w.scales"), "{e}");
    // Scales whose group count the group size does not give.
    let bad_groups = serde_json::json!({"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 32}});
    let e = err(bad_groups, gptq(&q, true, false));
    assert!(e.contains("w.scales") && e.contains("4 groups"), "{e}");
    // An unread format, 3-bit GPTQ, AWQ's GEMV layout, and codes under no known method.
    for (config, says) in [
        (
            serde_json::json!({"quantization_config": {"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"}}),
            "marlin",
        ),
        (
            serde_json::json!({"quantization_config": {"quant_method": "gptq", "bits": 3}}),
            "3-bit",
        ),
        (
            serde_json::json!({"quantization_config": {"quant_method": "awq", "bits": 4, "version": "gemv"}}),
            "gemv",
        ),
        (serde_json::json!({}), "quant_method"),
    ] {
        let e = err(config, gptq(&q, true, false));
        assert!(e.contains("w.qweight") && e.contains(says), "{e}");
    }
    // A group index past the scales' groups.
    let mut t = gptq(&q, true, true);
    let g: Vec<u32> = (0..64).map(|i| if i == 7 { 9 } else { 0 }).collect();
    t.retain(|(n, _)| *n != "w.g_idx");
    t.push(("w.g_idx", Raw(Dtype::I32, vec![64], words(&g))));
    let e = err(gptq_config.clone(), t);
    assert!(
        e.contains("w.g_idx") && e.contains("input 7 is in group 9"),
        "{e}"
    );
    // A NaN scale, named with the value's row and column.
    let mut t = gptq(&q, true, false);
    let mut s = q.scales_by_group();
    s[q.out + 5] = f32::NAN; // group 1, output 5
    t.retain(|(n, _)| *n != "w.scales");
    t.push(("w.scales", Raw(Dtype::F32, vec![4, 16], floats(&s))));
    let (_dir, shards, found) = open(gptq_config, t);
    let e = found
        .unwrap()
        .read_rows("w.weight", 0..16, &shards)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("row 5, column 16") && e.contains("w.scales"),
        "{e}"
    );
    // GPTQ outputs that do not fill the zero points' words.
    let t = vec![
        ("w.qweight", Raw(Dtype::I32, vec![2, 12], vec![0; 96])),
        ("w.qzeros", Raw(Dtype::I32, vec![1, 1], vec![0; 4])),
        ("w.scales", Raw(Dtype::F32, vec![1, 12], floats(&[1.0; 12]))),
    ];
    let gptq_4 = serde_json::json!({"quantization_config": {"quant_method": "gptq", "bits": 4}});
    let e = err(gptq_4, t);
    assert!(e.contains("w.qweight") && e.contains("12 outputs"), "{e}");
    // 7-bit codes a word fill as many words as 8-bit ones: the config's width decides.
    let seven = serde_json::json!({"quantization_config": {"quant_method": "compressed-tensors",
        "config_groups": {"group_0": {"weights": {"num_bits": 7}}}}});
    let q8 = Quantized::random(16, 64, 8, 4, 4);
    let e = err(seven, compressed_tensors(&q8, true));
    assert!(
        e.contains("w.weight_packed") && e.contains("[7] bits"),
        "{e}"
    );
    // A compressed-tensors shape the words cannot hold.
    let ct = serde_json::json!({"quantization_config": {"quant_method": "compressed-tensors"}});
    let mut t = compressed_tensors(&q, true);
    t.retain(|(n, _)| *n != "w.weight_shape");
    t.push((
        "w.weight_shape",
        Raw(
            Dtype::I64,
            vec![2],
            [16i64, 640].iter().flat_map(|x| x.to_le_bytes()).collect(),
        ),
    ));
    let e = err(ct, t);
    assert!(
        e.contains("w.weight_packed") && e.contains("640 codes"),
        "{e}"
    );
}

#[test]
fn nvfp4_weights_read_as_e2m1_codes_times_their_group_and_tensor_scales() {
    let (out, inn, groups) = (6, 32, 2);
    let codes = draws(40, out * inn, 16);
    let scale_codes: Vec<u8> = draws(41, out * groups, 0x30)
        .into_iter()
        .map(|c| 0x20 + c as u8)
        .collect();
    let bytes: Vec<u8> = codes
        .chunks(2)
        .map(|p| (p[0] | (p[1] << 4)) as u8)
        .collect();
    let global = 7.3f32;
    for (divides, codes_name, scale_name) in [
        (true, "w.weight_packed", "w.weight_global_scale"),
        (false, "w.weight", "w.weight_scale_2"),
    ] {
        let tensors = vec![
            (
                codes_name,
                Raw(Dtype::U8, vec![out, inn / 2], bytes.clone()),
            ),
            (
                "w.weight_scale",
                Raw(Dtype::F8_E4M3, vec![out, groups], scale_codes.clone()),
            ),
            (scale_name, Raw(Dtype::F32, vec![1], floats(&[global]))),
        ];
        let (_dir, shards, found) = open(serde_json::json!({}), tensors);
        let found = found.unwrap();
        assert_eq!(found.shape("w.weight"), Some(&[out, inn][..]));
        // ModelOpt's weight is stored under its own name: not a name the checkpoint adds.
        assert_eq!(found.names().count(), divides as usize);
        let (got, ty, _) = found
            .read_rows("w.weight", 1..out, &shards)
            .unwrap()
            .unwrap();
        let got = decode_f32(&got, ty);
        for o in 1..out {
            for i in 0..inn {
                let e = e2m1(codes[o * inn + i] as u8);
                let s = crate::io::quantized::fp8::e4m3(scale_codes[o * groups + i / 16]);
                let want = if divides {
                    e * (s / global)
                } else {
                    e * s * global
                };
                assert_eq!(got[(o - 1) * inn + i], want, "row {o}, input {i}");
            }
        }
    }
    assert_eq!(
        (0..16).map(e2m1).collect::<Vec<_>>(),
        [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
    );
}
