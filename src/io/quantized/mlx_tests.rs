//! MLX weights read back as the codes, scales and biases they were packed from, laid out as
//! `mx.quantize` lays them out (each row a little-endian bit stream of codes through U32 words).

use super::*;
use crate::io::quantized::test_file;
use crate::io::safetensors::decode_f32;
use crate::io::RawTensor as Raw;

fn floats(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Rows of `bits`-bit codes packed as MLX packs them: bit `b` of code `i` is bit `i·bits + b` of
/// the row's stream, bit `k` of the stream bit `k mod 32` of word `k / 32`.
fn pack(codes: &[Vec<u32>], bits: usize) -> (Vec<u8>, usize) {
    let words = codes[0].len() * bits / 32;
    let mut out = Vec::new();
    for row in codes {
        let mut w = vec![0u32; words];
        for (i, &c) in row.iter().enumerate() {
            for b in 0..bits {
                let k = i * bits + b;
                w[k / 32] |= ((c >> b) & 1) << (k % 32);
            }
        }
        out.extend(w.iter().flat_map(|x| x.to_le_bytes()));
    }
    (out, words)
}

type Tensors = Vec<(String, Raw)>;

fn open(
    config: serde_json::Value,
    tensors: Tensors,
) -> (tempfile::TempDir, Vec<TensorFile>, Result<MlxWeights>) {
    let (dir, shards, index) = test_file(tensors.iter().map(|(n, t)| (n.as_str(), t)));
    let found = MlxWeights::find(&config, &shards, &index);
    (dir, shards, found)
}

fn read(found: &MlxWeights, shards: &[TensorFile], name: &str, rows: Range<usize>) -> Vec<f32> {
    let (bytes, ty, _) = found.read_rows(name, rows, shards).unwrap().unwrap();
    decode_f32(&bytes, ty)
}

/// An affine weight `[3, 64]` of `bits`-bit codes in groups of 32: code `(7i + 3o) mod 2^bits`,
/// scale `(o + 1)/4 + g/8`, bias `−g − o/2`; the tensors and the values they stand for.
fn affine(module: &str, bits: usize) -> (Tensors, Vec<f32>) {
    let (out, inn, group) = (3usize, 64usize, 32usize);
    let codes: Vec<Vec<u32>> = (0..out)
        .map(|o| {
            (0..inn)
                .map(|i| ((7 * i + 3 * o) % (1 << bits)) as u32)
                .collect()
        })
        .collect();
    let groups = inn / group;
    let scale = |o: usize, g: usize| (o as f32 + 1.0) / 4.0 + g as f32 / 8.0;
    let bias = |o: usize, g: usize| -(g as f32) - o as f32 / 2.0;
    let want = (0..out * inn)
        .map(|k| {
            let (o, i) = (k / inn, k % inn);
            let g = i / group;
            (codes[o][i] as f64 * scale(o, g) as f64 + bias(o, g) as f64) as f32
        })
        .collect();
    let (bytes, words) = pack(&codes, bits);
    let per_group = |f: &dyn Fn(usize, usize) -> f32| -> Vec<f32> {
        (0..out * groups)
            .map(|k| f(k / groups, k % groups))
            .collect()
    };
    let tensors = vec![
        (
            format!("{module}.weight"),
            Raw(Dtype::U32, vec![out, words], bytes),
        ),
        (
            format!("{module}.scales"),
            Raw(Dtype::F32, vec![out, groups], floats(&per_group(&scale))),
        ),
        (
            format!("{module}.biases"),
            Raw(Dtype::F32, vec![out, groups], floats(&per_group(&bias))),
        ),
    ];
    (tensors, want)
}

fn config(bits: usize) -> serde_json::Value {
    serde_json::json!({"quantization": {"group_size": 32, "bits": bits}})
}

#[test]
fn affine_weights_read_as_code_times_scale_plus_bias_at_every_width() {
    for bits in [2, 3, 4, 5, 6, 8] {
        let (tensors, want) = affine("m", bits);
        let (_dir, shards, found) = open(config(bits), tensors);
        let found = found.unwrap();
        assert_eq!(found.shape("m.weight"), Some(&[3, 64][..]), "{bits} bits");
        assert_eq!(read(&found, &shards, "m.weight", 0..3), want, "{bits} bits");
        // One row alone (3, 5 and 6 bits cross words within it).
        assert_eq!(
            read(&found, &shards, "m.weight", 1..2),
            want[64..128],
            "{bits} bits"
        );
        let mut parts: Vec<String> = found.parts().collect();
        parts.sort();
        assert_eq!(parts, ["m.biases", "m.scales"]);
    }
}

#[test]
fn a_modules_own_entry_overrides_the_checkpoints_and_false_refuses_its_codes() {
    // 8-bit codes in a checkpoint quantized to 4 bits, as mlx-lm's mixed recipes write them.
    let both = || {
        let (mut tensors, want) = affine("a", 8);
        let (four, want4) = affine("b", 4);
        tensors.extend(four);
        (tensors, want, want4)
    };
    let (tensors, want, want4) = both();
    let cfg = serde_json::json!({"quantization": {"group_size": 32, "bits": 4,
        "a": {"group_size": 32, "bits": 8}}});
    let (_dir, shards, found) = open(cfg, tensors);
    let found = found.unwrap();
    assert_eq!(read(&found, &shards, "a.weight", 0..3), want);
    assert_eq!(read(&found, &shards, "b.weight", 0..3), want4);

    let cfg = serde_json::json!({"quantization": {"group_size": 32, "bits": 4, "a": false}});
    let err = open(cfg, both().0).2.unwrap_err().to_string();
    assert!(
        err.contains("a.weight") && err.contains("is false"),
        "{err}"
    );
}

/// `[2, 32]` microscaled codes: `codes` bytes a row, the scales `scale` bytes, one a group.
fn microscaled(
    mode: &str,
    group: usize,
    codes: Vec<u8>,
    scale: &[u8],
) -> Result<(Vec<f32>, usize)> {
    let (out, inn) = (2usize, 32usize);
    let words = codes.len() / 4 / out;
    let tensors = vec![
        (
            "m.weight".to_string(),
            Raw(Dtype::U32, vec![out, words], codes),
        ),
        (
            "m.scales".to_string(),
            Raw(Dtype::U8, vec![out, inn / group], scale.to_vec()),
        ),
    ];
    let cfg = serde_json::json!({"quantization": {"group_size": group, "bits": 8 * words * 4 / inn,
        "mode": mode}});
    let (_dir, shards, found) = open(cfg, tensors);
    let found = found?;
    let (bytes, ty, cols) = found.read_rows("m.weight", 0..out, &shards)?.unwrap();
    Ok((decode_f32(&bytes, ty), cols))
}

#[test]
fn microscaled_weights_read_as_float_codes_times_their_groups_scale() {
    const E2M1: [f32; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];
    let fp4 = |c: u8| E2M1[(c & 7) as usize] * if c & 8 != 0 { -1.0 } else { 1.0 };
    // Code k of a row is k mod 16, two a byte, the first in the low nibble.
    let nibbles: Vec<u8> = (0..32)
        .map(|b| ((2 * b % 16) | (((2 * b + 1) % 16) << 4)) as u8)
        .collect();
    let fp4_codes = |i: usize| fp4((i % 16) as u8);

    // mxfp4: E8M0 scales 2^(s − 127): 2^1 for row 0, 2^−3 for row 1.
    let (values, cols) = microscaled("mxfp4", 32, nibbles.clone(), &[128, 124]).unwrap();
    assert_eq!(cols, 32);
    let want: Vec<f32> = (0..64)
        .map(|k| fp4_codes(k % 32) * if k < 32 { 2.0 } else { 0.125 })
        .collect();
    assert_eq!(values, want);

    // nvfp4: F8_E4M3 scales, groups of 16: 0x38 = 1.0, 0x40 = 2.0, 0x30 = 0.5, 0x3c = 1.5.
    let (values, _) = microscaled("nvfp4", 16, nibbles, &[0x38, 0x40, 0x30, 0x3c]).unwrap();
    let scales = [1.0, 2.0, 0.5, 1.5];
    let want: Vec<f32> = (0..64)
        .map(|k| fp4_codes(k % 32) * scales[k / 16])
        .collect();
    assert_eq!(values, want);

    // mxfp8: one F8_E4M3 code a byte; 0x38 + k is 1 + k/8 for k < 8.
    let bytes: Vec<u8> = (0..64).map(|k| 0x38 + (k % 8) as u8).collect();
    let (values, _) = microscaled("mxfp8", 32, bytes, &[127, 129]).unwrap();
    let want: Vec<f32> = (0..64)
        .map(|k| (1.0 + (k % 8) as f32 / 8.0) * if k < 32 { 1.0 } else { 4.0 })
        .collect();
    assert_eq!(values, want);

    // E8M0 255 is NaN: refused, naming the value's place and its scale.
    let err = microscaled("mxfp4", 32, vec![0x11; 32], &[127, 255])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("m.weight") && err.contains("row 1, column 0"),
        "{err}"
    );
}

#[test]
fn parts_that_disagree_with_the_config_or_each_other_are_refused_naming_them() {
    let refused = |cfg: serde_json::Value, edit: &dyn Fn(&mut Tensors)| {
        let (mut tensors, _) = affine("m", 4);
        edit(&mut tensors);
        open(cfg, tensors).2.unwrap_err().to_string()
    };
    let none = |_: &mut Tensors| {};
    let err = refused(serde_json::json!({}), &none);
    assert!(
        err.contains("m.weight") && err.contains("no `quantization`"),
        "{err}"
    );
    // Group size 64 makes [3, 1] scales of these [3, 8] words, not [3, 2].
    let err = refused(
        serde_json::json!({"quantization": {"group_size": 64, "bits": 4}}),
        &none,
    );
    assert!(err.contains("m.scales") && err.contains("[3, 1]"), "{err}");
    let err = refused(config(7), &none);
    assert!(err.contains("7 bits"), "{err}");
    let err = refused(
        serde_json::json!({"quantization": {"group_size": 32, "bits": 4, "mode": "q4k"}}),
        &none,
    );
    assert!(err.contains("\"q4k\""), "{err}");
    let err = refused(config(4), &|t| t.retain(|(n, _)| n != "m.biases"));
    assert!(err.contains("without their biases (`m.biases`)"), "{err}");
    // Words that do not make whole codes: 3 bits over 5 words is 53⅓ codes.
    let err = refused(config(3), &|t| {
        t[0].1 = Raw(Dtype::U32, vec![3, 5], vec![0; 60]);
    });
    assert!(
        err.contains("m.weight") && err.contains("not whole groups"),
        "{err}"
    );
    // An mxfp4 config over affine tensors: U8 scales expected, and no biases.
    let err = refused(
        serde_json::json!({"quantization": {"group_size": 32, "bits": 4, "mode": "mxfp4"}}),
        &none,
    );
    assert!(
        err.contains("m.scales") && err.contains("expected U8"),
        "{err}"
    );
}

#[test]
fn module_entries_follow_mlx_lm_true_null_and_a_mode_left_out() {
    // `true` is the checkpoint's settings; an entry without a mode is affine even under an
    // mxfp4 checkpoint (MLX's default for the module's own parameters), 0 its default width.
    let (tensors, want) = affine("m", 4);
    for entry in [
        serde_json::json!(true),
        serde_json::json!({"group_size": 32, "bits": 0}),
    ] {
        let cfg = serde_json::json!({"quantization": {"group_size": 32, "bits": 4,
            "mode": if entry.is_boolean() { "affine" } else { "mxfp4" }, "m": entry}});
        let (tensors, _) = affine("m", 4);
        let (_dir, shards, found) = open(cfg, tensors);
        assert_eq!(read(&found.unwrap(), &shards, "m.weight", 0..3), want);
    }
    // null, as false: not quantized, so codes there are refused.
    let cfg = serde_json::json!({"quantization": {"group_size": 32, "bits": 4, "m": null}});
    let err = open(cfg, tensors).2.unwrap_err().to_string();
    assert!(err.contains("is false"), "{err}");
}

#[test]
fn other_3d_tensors_are_left_alone_and_huge_or_mismatched_shapes_refused() {
    let cfg = || config(4);
    // 3-D codes that are not a stack of experts (`switch_mlp`) are not claimed.
    let stacked = vec![
        (
            "e.weight".to_string(),
            Raw(Dtype::U32, vec![2, 3, 8], vec![0; 192]),
        ),
        (
            "e.scales".to_string(),
            Raw(Dtype::F32, vec![2, 3, 2], vec![0; 48]),
        ),
    ];
    let (_dir, _shards, found) = open(cfg(), stacked);
    assert!(!found.unwrap().has("e.weight"));
    // Nor are 2-D codes under a stack's name; a stack of no experts is refused.
    let flat = vec![
        (
            "a.switch_mlp.up_proj.weight".to_string(),
            Raw(Dtype::U32, vec![8, 4], vec![0; 128]),
        ),
        (
            "a.switch_mlp.up_proj.scales".to_string(),
            Raw(Dtype::F32, vec![8, 1], vec![0; 32]),
        ),
    ];
    let (_dir, _shards, found) = open(cfg(), flat);
    assert_eq!(found.unwrap().names().count(), 0);
    let empty = vec![(
        "a.switch_mlp.up_proj.weight".to_string(),
        Raw(Dtype::BF16, vec![0, 3, 4], vec![]),
    )];
    let err = open(cfg(), empty).2.unwrap_err().to_string();
    assert!(err.contains("no experts"), "{err}");
    // No rows and 2^59 words a row: refused before any size is multiplied.
    let huge = vec![
        (
            "m.weight".to_string(),
            Raw(Dtype::U32, vec![0, 1 << 59], vec![]),
        ),
        ("m.scales".to_string(), Raw(Dtype::F32, vec![0, 2], vec![])),
    ];
    let err = open(cfg(), huge).2.unwrap_err().to_string();
    assert!(err.contains("m.weight") && err.contains("2^24"), "{err}");
    // Biases beside mxfp4 codes (U8 scales of the right shape).
    let (mut tensors, _) = affine("m", 4);
    tensors[1].1 = Raw(Dtype::U8, vec![3, 2], vec![127; 6]);
    let cfg = serde_json::json!({"quantization": {"group_size": 32, "bits": 4, "mode": "mxfp4"}});
    let err = open(cfg, tensors).2.unwrap_err().to_string();
    assert!(
        err.contains("m.biases") && err.contains("beside mxfp4 codes"),
        "{err}"
    );
}

#[test]
fn a_stack_of_experts_reads_as_one_weight_an_expert_under_its_hugging_face_name() {
    // Two experts: affine("x", 4)'s [3, 64] weight, then the same with its rows turned (1, 2,
    // 0), codes, scales and biases alike: a stack is read as [experts·out, in], expert 1's rows
    // after expert 0's.
    let (one, want0) = affine("x", 4);
    let turned = |t: &Raw| {
        let row = t.2.len() / 3;
        [&t.2[row..], &t.2[..row]].concat()
    };
    let stacked = |t: &Raw| {
        let mut shape = vec![2];
        shape.extend(&t.1);
        Raw(t.0, shape, [t.2.clone(), turned(t)].concat())
    };
    // Expert 1's rows 1..3: expert 0's rows 2 and 0.
    let want: Vec<f32> = [&want0[128..], &want0[..64]].concat();
    for (parent, proj, name) in [
        (
            "model.layers.0.mlp",
            "gate_proj",
            "model.layers.0.mlp.experts.1.gate_proj.weight",
        ),
        (
            "model.layers.0.block_sparse_moe",
            "up_proj",
            "model.layers.0.block_sparse_moe.experts.1.w3.weight",
        ),
    ] {
        let module = format!("{parent}.switch_mlp.{proj}");
        let tensors = ["weight", "scales", "biases"]
            .iter()
            .zip(&one)
            .map(|(suffix, (_, t))| (format!("{module}.{suffix}"), stacked(t)))
            .collect();
        let (_dir, shards, found) = open(config(4), tensors);
        let found = found.unwrap();
        assert_eq!(found.shape(name), Some(&[3, 64][..]));
        assert_eq!(read(&found, &shards, name, 1..3), want, "{name}");
        assert_eq!(found.built_names().count(), 2);
        let mut parts: Vec<String> = found.parts().collect();
        parts.sort();
        parts.dedup();
        assert_eq!(parts.len(), 3, "{parts:?}");
    }
    // A float stack (experts MLX left unquantized), and one whose expert is also stored alone.
    let values: Vec<f32> = (0..2 * 3 * 4).map(|k| k as f32 - 5.0).collect();
    let float = |extra: bool| {
        let mut t = vec![(
            "m.switch_mlp.down_proj.weight".to_string(),
            Raw(Dtype::F32, vec![2, 3, 4], floats(&values)),
        )];
        if extra {
            let alone = Raw(Dtype::F32, vec![3, 4], floats(&values[..12]));
            t.push(("m.experts.0.down_proj.weight".to_string(), alone));
        }
        t
    };
    let (_dir, shards, found) = open(serde_json::json!({}), float(false));
    let found = found.unwrap();
    assert_eq!(
        read(&found, &shards, "m.experts.1.down_proj.weight", 1..3),
        values[16..]
    );
    let err = open(serde_json::json!({}), float(true))
        .2
        .unwrap_err()
        .to_string();
    assert!(err.contains("stored both here and alone"), "{err}");
}

#[test]
fn latent_attentions_kv_b_proj_is_rebuilt_from_mlx_lm_s_two_halves() {
    // Two heads; latent rank 3, key width 2, value width 2 (left in f32, as unquantized halves).
    let (heads, rank, nope, v) = (2usize, 3usize, 2usize, 2usize);
    let key = |h: usize, c: usize, j: usize| (100 * h + 10 * c + j) as f32;
    let value = |h: usize, r: usize, c: usize| -((100 * h + 10 * r + c) as f32) - 0.5;
    let embed_q: Vec<f32> = (0..heads * rank * nope)
        .map(|i| key(i / (rank * nope), i / nope % rank, i % nope))
        .collect();
    let unembed_out: Vec<f32> = (0..heads * v * rank)
        .map(|i| value(i / (v * rank), i / rank % v, i % rank))
        .collect();
    let attention = "model.layers.1.self_attn";
    let halves = |keys: Vec<usize>, values: Vec<usize>| {
        let n = |s: &[usize]| s.iter().product::<usize>();
        vec![
            (
                format!("{attention}.embed_q.weight"),
                Raw(Dtype::F32, keys.clone(), floats(&embed_q[..n(&keys)])),
            ),
            (
                format!("{attention}.unembed_out.weight"),
                Raw(
                    Dtype::F32,
                    values.clone(),
                    floats(&unembed_out[..n(&values)]),
                ),
            ),
        ]
    };
    let tensors = halves(vec![heads, rank, nope], vec![heads, v, rank]);
    let (_dir, shards, found) = open(config(4), tensors);
    let found = found.unwrap();
    let name = format!("{attention}.kv_b_proj.weight");
    assert_eq!(found.shape(&name), Some(&[heads * (nope + v), rank][..]));
    assert_eq!(found.built_names().collect::<Vec<_>>(), [name.as_str()]);
    let mut parts: Vec<String> = found.parts().collect();
    parts.sort();
    assert_eq!(
        parts,
        [
            format!("{attention}.embed_q.weight"),
            format!("{attention}.unembed_out.weight")
        ]
    );
    // Each head's key rows (its embed_q matrix's columns), then its value rows.
    let mut want = Vec::new();
    for h in 0..heads {
        for j in 0..nope {
            want.extend((0..rank).map(|c| key(h, c, j)));
        }
        for r in 0..v {
            want.extend((0..rank).map(|c| value(h, r, c)));
        }
    }
    assert_eq!(read(&found, &shards, &name, 0..heads * (nope + v)), want);
    assert_eq!(read(&found, &shards, &name, 3..6), want[3 * rank..6 * rank]);
    // A half alone, and halves of other head counts, are refused naming the stored tensor.
    let mut alone = halves(vec![heads, rank, nope], vec![heads, v, rank]);
    alone.truncate(1);
    let err = open(config(4), alone).2.unwrap_err().to_string();
    assert!(err.contains("embed_q") && err.contains("missing"), "{err}");
    let other = halves(vec![heads, rank, nope], vec![1, v, rank]);
    let err = open(config(4), other).2.unwrap_err().to_string();
    assert!(
        err.contains("unembed_out") && err.contains("must agree"),
        "{err}"
    );
}

#[test]
fn a_kv_b_proj_stored_whole_and_split_is_refused() {
    let f = |n: usize| floats(&vec![0.5; n]);
    let tensors = vec![
        (
            "a.embed_q.weight".to_string(),
            Raw(Dtype::F32, vec![2, 3, 2], f(12)),
        ),
        (
            "a.unembed_out.weight".to_string(),
            Raw(Dtype::F32, vec![2, 2, 3], f(12)),
        ),
        (
            "a.kv_b_proj.weight".to_string(),
            Raw(Dtype::F32, vec![8, 3], f(24)),
        ),
    ];
    let err = open(config(4), tensors).2.unwrap_err().to_string();
    assert!(
        err.contains("a.kv_b_proj.weight") && err.contains("both whole and split"),
        "{err}"
    );
}

#[test]
fn a_quantized_latent_half_reads_as_mlx_dequantizes_it_and_places_a_bad_value_in_its_head() {
    // One head: affine("a.embed_q", 4)'s [3, 64] weight as embed_q [1, rank 3, nope 64], and
    // float values [1, v 2, rank 3]: the key rows are its columns.
    let latent = |values: &[f32]| {
        let (mut tensors, keys) = affine("a.embed_q", 4);
        for (_, Raw(_, shape, _)) in tensors.iter_mut() {
            shape.insert(0, 1);
        }
        tensors.push((
            "a.unembed_out.weight".to_string(),
            Raw(Dtype::F32, vec![1, 2, 3], floats(values)),
        ));
        (tensors, keys)
    };
    let values: Vec<f32> = (0..6).map(|i| i as f32 - 2.5).collect();
    let (tensors, keys) = latent(&values);
    let (_dir, shards, found) = open(config(4), tensors);
    let found = found.unwrap();
    let mut want: Vec<f32> = (0..64)
        .flat_map(|j| (0..3).map(move |c| (c, j)))
        .map(|(c, j)| keys[c * 64 + j])
        .collect();
    want.extend(&values);
    assert_eq!(read(&found, &shards, "a.kv_b_proj.weight", 0..66), want);
    // A value row's NaN is named by the half, its head, and its row and column there.
    let mut bad_values = values.clone();
    bad_values[4] = f32::NAN;
    let (tensors, _) = latent(&bad_values);
    let (_dir, shards, found) = open(config(4), tensors);
    let err = found
        .unwrap()
        .read_rows("a.kv_b_proj.weight", 64..66, &shards)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("a.unembed_out.weight[0]") && err.contains("row 1, column 1"),
        "{err}"
    );
}
