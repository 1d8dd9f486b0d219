//! Experts stored fused on disk (GPT-OSS): each expert's weight, read through the checkpoint, is
//! the slice of the fused tensor that transformers' GPT-OSS forward multiplies by (`gate_up_proj`
//! `[E, hidden, 2·width]` with the gate's and the up projection's outputs alternating,
//! `down_proj` `[E, width, hidden]`), in f32, bf16 and MXFP4 (checked here against a plain
//! decoder of the format; `tests/interop/test_gpt_oss.py` checks against transformers' own).

mod common;

use std::path::Path;

use std::collections::BTreeMap;

use common::cli::{ok, s};
use loraxfer::io::adapter::{Adapter, ExpertsLayout, GateUpRows, LoraFactors};
use loraxfer::io::checkpoint::Checkpoint;
use loraxfer::io::safetensors::{decode_f32, encode_f32, FloatType};

const HIDDEN: usize = 64;
const WIDTH: usize = 96;
const EXPERTS: usize = 3;
const LAYERS: usize = 2;
const FP4: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// A tensor to write: name, safetensors dtype, shape, bytes.
type Raw = (String, &'static str, Vec<usize>, Vec<u8>);

/// Writes a safetensors file by hand (the library's writer takes float tensors only).
fn write_safetensors(path: &Path, tensors: &[Raw]) {
    let mut header = serde_json::Map::new();
    let mut offset = 0;
    for (name, dtype, shape, bytes) in tensors {
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + bytes.len()]}),
        );
        offset += bytes.len();
    }
    let mut text = serde_json::to_string(&header).unwrap();
    while text.len() % 8 != 0 {
        text.push(' ');
    }
    let mut file = (text.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(text.as_bytes());
    for (_, _, _, bytes) in tensors {
        file.extend_from_slice(bytes);
    }
    std::fs::write(path, file).unwrap();
}

/// A safetensors file's bytes and where `tensor`'s data starts in them.
fn data_start(path: &Path, tensor: &str) -> (Vec<u8>, usize) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let offset = header[tensor]["data_offsets"][0].as_u64().unwrap() as usize;
    (bytes, 8 + n + offset)
}

/// Replaces `from` by `to` (of the same length) in a safetensors file's header.
fn rewrite_header(path: &Path, from: &str, to: &str) {
    assert_eq!(from.len(), to.len(), "the header keeps its length");
    let mut bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(bytes[8..8 + n].to_vec()).unwrap();
    assert!(header.contains(from), "{from}");
    bytes[8..8 + n].copy_from_slice(header.replace(from, to).as_bytes());
    std::fs::write(path, bytes).unwrap();
}

/// Values from a seed, in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

fn float(name: String, ty: FloatType, shape: Vec<usize>, v: &[f32]) -> Raw {
    let dtype = match ty {
        FloatType::F32 => "F32",
        FloatType::F16 => "F16",
        FloatType::Bf16 => "BF16",
    };
    (name, dtype, shape, encode_f32(v, ty))
}

/// How the experts are stored.
#[derive(Clone, Copy, Debug)]
enum Stored {
    Float(FloatType),
    Mxfp4,
    /// MXFP4 with the scales in a shard of their own.
    Mxfp4Sharded,
}

/// A tiny GPT-OSS checkpoint; returns each layer's (gate_up, down) as `[E, out, in]` f32 values
/// (the weights as the forward uses them: gate_up's rows alternate gate, up).
fn gpt_oss(dir: &Path, stored: Stored, unaligned: bool) -> Vec<(Vec<f32>, Vec<f32>)> {
    std::fs::create_dir_all(dir).unwrap();
    let config = serde_json::json!({
        "model_type": "gpt_oss", "architectures": ["GptOssForCausalLM"],
        "hidden_size": HIDDEN, "intermediate_size": WIDTH, "num_hidden_layers": LAYERS,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 32,
        "num_local_experts": EXPERTS, "num_experts_per_tok": 2,
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    // With `unaligned`, three bytes first: every tensor after them lies at an odd offset,
    // unaligned for its type.
    let mut tensors = Vec::new();
    if unaligned {
        tensors.push(("model.odd".to_string(), "U8", vec![3], vec![1, 2, 3]));
    }
    let mut weights = Vec::new();
    for l in 0..LAYERS {
        let layer = format!("model.layers.{l}");
        for (p, out) in [("q", 64), ("k", 32), ("v", 32), ("o", HIDDEN)] {
            let inp = if p == "o" { 64 } else { HIDDEN };
            let name = format!("{layer}.self_attn.{p}_proj.weight");
            let v = values(out * inp, (l * 10) as u64 + out as u64);
            tensors.push(float(name, FloatType::F32, vec![out, inp], &v));
        }
        let router = values(EXPERTS * HIDDEN, 77 + l as u64);
        let name = format!("{layer}.mlp.router.weight");
        tensors.push(float(name, FloatType::F32, vec![EXPERTS, HIDDEN], &router));
        let mut layer_weights = Vec::new();
        for (param, out, inp, seed) in [
            ("gate_up_proj", 2 * WIDTH, HIDDEN, 1000),
            ("down_proj", HIDDEN, WIDTH, 2000),
        ] {
            let name = format!("{layer}.mlp.experts.{param}");
            let seed = seed + l as u64;
            let w = match stored {
                Stored::Float(ty) => {
                    // [E, out, in] values, stored transposed: [E, in, out].
                    let w = decode_f32(&encode_f32(&values(EXPERTS * out * inp, seed), ty), ty);
                    let mut t = vec![0f32; w.len()];
                    for e in 0..EXPERTS {
                        for o in 0..out {
                            for i in 0..inp {
                                t[(e * inp + i) * out + o] = w[(e * out + o) * inp + i];
                            }
                        }
                    }
                    tensors.push(float(name, ty, vec![EXPERTS, inp, out], &t));
                    w
                }
                Stored::Mxfp4 | Stored::Mxfp4Sharded => {
                    let groups = inp / 32;
                    let blocks: Vec<u8> = values(EXPERTS * out * inp / 2, seed)
                        .iter()
                        .map(|x| ((x + 1.0) * 128.0) as u8)
                        .collect();
                    let scales: Vec<u8> = values(EXPERTS * out * groups, seed + 7)
                        .iter()
                        .map(|x| (127.0 + 6.0 * x) as u8)
                        .collect();
                    let w = mxfp4_reference(&blocks, &scales);
                    let shape = vec![EXPERTS, out, groups, 16];
                    tensors.push((format!("{name}_blocks"), "U8", shape, blocks));
                    let shape = vec![EXPERTS, out, groups];
                    tensors.push((format!("{name}_scales"), "U8", shape, scales));
                    w
                }
            };
            layer_weights.push(w);
        }
        let down = layer_weights.pop().unwrap();
        weights.push((layer_weights.pop().unwrap(), down));
    }
    let embed = values(32 * HIDDEN, 5);
    tensors.push(float(
        "model.embed_tokens.weight".into(),
        FloatType::F32,
        vec![32, HIDDEN],
        &embed,
    ));
    if !matches!(stored, Stored::Mxfp4Sharded) {
        write_safetensors(&dir.join("model.safetensors"), &tensors);
        return weights;
    }
    let (scales, rest): (Vec<Raw>, Vec<Raw>) =
        tensors.into_iter().partition(|t| t.0.ends_with("_scales"));
    let mut map = serde_json::Map::new();
    for (file, part) in [
        ("model-1.safetensors", rest),
        ("model-2.safetensors", scales),
    ] {
        write_safetensors(&dir.join(file), &part);
        for t in part {
            map.insert(t.0, file.into());
        }
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": map });
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    weights
}

/// MXFP4 decoded the plain way: byte k of a block holds values 2k (low nibble) and 2k + 1,
/// times 2^(scale − 127).
fn mxfp4_reference(blocks: &[u8], scales: &[u8]) -> Vec<f32> {
    let mut out = Vec::with_capacity(blocks.len() * 2);
    for (g, block) in blocks.chunks(16).enumerate() {
        let scale = 2f64.powi(scales[g] as i32 - 127);
        for &byte in block {
            out.push((FP4[(byte & 15) as usize] as f64 * scale) as f32);
            out.push((FP4[(byte >> 4) as usize] as f64 * scale) as f32);
        }
    }
    out
}

/// Expert e's weight of a part from the `[E, out, in]` values: gate rows 2j, up 2j + 1, down all.
fn expected(fused: &[f32], e: usize, part: &str) -> Vec<f32> {
    let (out, inp) = if part == "down_proj" {
        (HIDDEN, WIDTH)
    } else {
        (2 * WIDTH, HIDDEN)
    };
    let expert = &fused[e * out * inp..(e + 1) * out * inp];
    let rows: Vec<usize> = match part {
        "gate_proj" => (0..out).step_by(2).collect(),
        "up_proj" => (1..out).step_by(2).collect(),
        _ => (0..out).collect(),
    };
    rows.iter()
        .flat_map(|&r| expert[r * inp..(r + 1) * inp].to_vec())
        .collect()
}

#[test]
fn every_experts_weight_reads_as_the_forward_uses_it() {
    let scratch = tempfile::tempdir().unwrap();
    let stores = [
        Stored::Float(FloatType::F32),
        Stored::Float(FloatType::Bf16),
        Stored::Mxfp4,
        Stored::Mxfp4Sharded,
    ];
    for (stored, unaligned) in stores.into_iter().flat_map(|s| [(s, false), (s, true)]) {
        let dir = scratch.path().join(format!("{stored:?}-{unaligned}"));
        let weights = gpt_oss(&dir, stored, unaligned);
        let ckpt = Checkpoint::open(&dir).unwrap();
        for (l, (gate_up, down)) in weights.iter().enumerate() {
            for e in 0..EXPERTS {
                for (part, fused) in [
                    ("gate_proj", gate_up),
                    ("up_proj", gate_up),
                    ("down_proj", down),
                ] {
                    let name = format!("model.layers.{l}.mlp.experts.{e}.{part}.weight");
                    let want = expected(fused, e, part);
                    let shape = ckpt.shape(&name).unwrap().to_vec();
                    assert_eq!(shape[0] * shape[1], want.len(), "{stored:?} {name}");
                    assert!(ckpt.has(&name) && !ckpt.borrows(&name));
                    let got = ckpt.read_rows_f32(&name, 0..shape[0]).unwrap();
                    assert_eq!(got, want, "{stored:?} {name}");
                    // Bands of rows, as the decompositions read them (past the first 64, a
                    // gather's second tile, where the weight has that many rows).
                    for band in [3..7, 3..shape[0].min(70)] {
                        let got = ckpt.read_rows_f32(&name, band.clone()).unwrap();
                        let want = &want[band.start * shape[1]..band.end * shape[1]];
                        assert_eq!(got, want, "{stored:?} {name} {band:?}");
                    }
                    let (bytes, ty, cols) = ckpt.rows_raw(&name, 5..6).unwrap();
                    // Floats as stored, MXFP4 decoded.
                    let read_as = match stored {
                        Stored::Float(t) => t,
                        Stored::Mxfp4 | Stored::Mxfp4Sharded => FloatType::F32,
                    };
                    assert_eq!((ty, cols), (read_as, shape[1]));
                    assert_eq!(ckpt.float_type(&name), Some(read_as));
                    assert_eq!(decode_f32(&bytes, ty), want[5 * cols..6 * cols]);
                }
            }
        }
        assert!(ckpt
            .read_rows_f32("model.layers.0.mlp.experts.0.up_proj.weight", 0..WIDTH + 1)
            .is_err());
    }
}

#[test]
fn a_broken_fused_tensor_is_named() {
    let scratch = tempfile::tempdir().unwrap();
    // A shape the config does not imply: refused when the checkpoint is opened.
    let dir = scratch.path().join("shape");
    gpt_oss(&dir, Stored::Float(FloatType::F32), false);
    let path = dir.join("model.safetensors");
    // The same number of elements, another shape.
    rewrite_header(&path, "[3,64,192]", "[6,32,192]");
    let err = Checkpoint::open(&dir).unwrap_err().to_string();
    assert!(
        err.contains("model.layers.0.mlp.experts.gate_up_proj"),
        "{err}"
    );
    assert!(err.contains("[3, 64, 192]"), "{err}");

    // No fused tensor under the names the table gives: an expert's weight is missing, and the
    // error says which names were looked for.
    let dir = scratch.path().join("renamed");
    gpt_oss(&dir, Stored::Float(FloatType::F32), false);
    let path = dir.join("model.safetensors");
    rewrite_header(&path, "experts.gate_up_proj", "experts.gate_up_pr0j");
    let ckpt = Checkpoint::open(&dir).unwrap();
    let err = ckpt
        .shape("model.layers.1.mlp.experts.0.up_proj.weight")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("out of `model.layers.1.mlp.experts.gate_up_proj`") && err.contains("MXFP4"),
        "{err}"
    );
    // The down projections are still there.
    assert!(ckpt
        .shape("model.layers.1.mlp.experts.0.down_proj.weight")
        .is_ok());

    // MXFP4 blocks without their scales: refused when the checkpoint is opened.
    let dir = scratch.path().join("no-scales");
    gpt_oss(&dir, Stored::Mxfp4, false);
    let path = dir.join("model.safetensors");
    rewrite_header(
        &path,
        "layers.1.mlp.experts.down_proj_scales",
        "layers.1.mlp.experts.down_proj_scalez",
    );
    let err = Checkpoint::open(&dir).unwrap_err().to_string();
    assert!(
        err.contains("model.layers.1.mlp.experts.down_proj_scales") && err.contains("no shard"),
        "{err}"
    );

    // A scale of 255 (E8M0's NaN): refused when the expert is read, naming the scales.
    // The scales in a shard of their own: that shard is named.
    let dir = scratch.path().join("nan");
    gpt_oss(&dir, Stored::Mxfp4Sharded, false);
    let path = dir.join("model-2.safetensors");
    let (mut bytes, at) = data_start(&path, "model.layers.1.mlp.experts.down_proj_scales");
    // Expert 2's first row's first scale.
    bytes[at + 2 * HIDDEN * (WIDTH / 32)] = 255;
    std::fs::write(&path, bytes).unwrap();
    let ckpt = Checkpoint::open(&dir).unwrap();
    let err = ckpt
        .read_rows_f32("model.layers.1.mlp.experts.2.down_proj.weight", 0..HIDDEN)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("down_proj_scales")
            && err.contains("expert 2")
            && err.contains("model-2.safetensors"),
        "{err}"
    );
    assert!(ckpt
        .read_rows_f32("model.layers.1.mlp.experts.1.down_proj.weight", 0..HIDDEN)
        .is_ok());

    // An infinity in a bf16 fused tensor: refused where it is read, naming the expert and where
    // it lies in its weight (stored [E, in, out]: input 5, output 2·3 + 1 is up_proj's row 3).
    let dir = scratch.path().join("inf");
    gpt_oss(&dir, Stored::Float(FloatType::Bf16), false);
    let path = dir.join("model.safetensors");
    let (mut bytes, at) = data_start(&path, "model.layers.0.mlp.experts.gate_up_proj");
    let element = (EXPERTS - 1) * HIDDEN * 2 * WIDTH + 5 * 2 * WIDTH + 7;
    bytes[at + 2 * element..][..2].copy_from_slice(&0x7f80u16.to_le_bytes());
    std::fs::write(&path, bytes).unwrap();
    let ckpt = Checkpoint::open(&dir).unwrap();
    let up = format!("model.layers.0.mlp.experts.{}.up_proj.weight", EXPERTS - 1);
    let err = ckpt.read_rows_f32(&up, 0..WIDTH).unwrap_err().to_string();
    let expert = format!("expert {}", EXPERTS - 1);
    assert!(
        err.contains("gate_up_proj") && err.contains(&expert),
        "{err}"
    );
    assert!(err.contains("row 3, column 5"), "{err}");
    let err = ckpt.rows_raw(&up, 2..4).unwrap_err().to_string();
    assert!(err.contains("row 3, column 5"), "{err}");
    // Rows without it, and the gate beside it, read.
    assert!(ckpt.read_rows_f32(&up, 0..3).is_ok());
    let gate = format!(
        "model.layers.0.mlp.experts.{}.gate_proj.weight",
        EXPERTS - 1
    );
    assert!(ckpt.read_rows_f32(&gate, 0..WIDTH).is_ok());
}

#[test]
fn a_transfer_onto_stored_experts_writes_the_alternating_fused_form() {
    let scratch = tempfile::tempdir().unwrap();
    let base = scratch.path().join("base");
    gpt_oss(&base, Stored::Float(FloatType::Bf16), false);
    // A per-expert adapter with only gate projections adapted: in the fused output, every odd
    // row of gate_up_proj's B (the up projection's) is zero.
    let adapter = scratch.path().join("lora");
    let r = 2;
    let mut modules = BTreeMap::new();
    for l in 0..LAYERS {
        for e in 0..EXPERTS {
            let name = format!("model.layers.{l}.mlp.experts.{e}.gate_proj");
            let seed = (l * 10 + e) as u64;
            let factors = LoraFactors {
                a: values(r * HIDDEN, seed + 300),
                b: values(WIDTH * r, seed + 400),
                r,
                in_features: HIDDEN,
                out_features: WIDTH,
                alpha: 2.0 * r as f64,
                ty: FloatType::F32,
            };
            modules.insert(name, factors);
        }
    }
    common::write_peft(
        &adapter,
        s(&base),
        r,
        2.0 * r as f64,
        serde_json::json!({}),
        &modules,
    );
    let out = scratch.path().join("out");
    ok(&[
        "transfer",
        "--source-base",
        s(&base),
        "--target-base",
        s(&base),
        "--adapter",
        s(&adapter),
        "--out",
        s(&out),
        "--mode",
        "copy",
    ]);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(
        config["target_parameters"],
        serde_json::json!([
            "model.layers.0.mlp.experts.gate_up_proj",
            "model.layers.1.mlp.experts.gate_up_proj"
        ])
    );
    let written =
        loraxfer::io::safetensors::TensorFile::open(&out.join("adapter_model.safetensors"))
            .unwrap();
    let key = "base_model.model.model.layers.1.mlp.experts.lora_B.weight";
    let b = written.read_f32(key).unwrap();
    let cols = b.len() / (2 * WIDTH);
    for (row, values) in b.chunks(cols).enumerate() {
        let zero = values.iter().all(|&x| x == 0.0);
        assert_eq!(zero, row % 2 == 1, "row {row} of {key}");
    }
    // Read back as alternating rows, each expert's gate update is the one written.
    let layout = ExpertsLayout {
        gate_up: GateUpRows::Interleaved,
        reversed: false,
        hidden: None,
    };
    let back = Adapter::open_with(&out, layout).unwrap();
    let input = Adapter::open(&adapter).unwrap();
    common::assert_same_updates(&input, &back, modules.keys());
}

#[test]
fn a_drifted_copy_copies_the_fused_tensors_as_stored() {
    let scratch = tempfile::tempdir().unwrap();
    let base = scratch.path().join("base");
    let weights = gpt_oss(&base, Stored::Float(FloatType::Bf16), false);
    let derived = scratch.path().join("derived");
    ok(&[
        "synth",
        "model",
        "--derive-from",
        s(&base),
        "--drift",
        "0.05",
        "--out",
        s(&derived),
    ]);
    let (a, b) = (
        Checkpoint::open(&base).unwrap(),
        Checkpoint::open(&derived).unwrap(),
    );
    let names = |c: &Checkpoint| {
        let mut n: Vec<String> = c.names().map(str::to_string).collect();
        n.sort();
        n
    };
    assert_eq!(names(&a), names(&b));
    assert!(!names(&a).iter().any(|n| n.contains(".experts.0.")));
    // The derived experts are read out of the derived fused tensors: near the base's, not equal.
    let name = "model.layers.1.mlp.experts.2.up_proj.weight";
    let want = expected(&weights[1].0, 2, "up_proj");
    let got = b.read_rows_f32(name, 0..WIDTH).unwrap();
    let (diff, norm) = got.iter().zip(&want).fold((0f64, 0f64), |(d, n), (x, y)| {
        (d + ((x - y) as f64).powi(2), n + (*y as f64).powi(2))
    });
    let rel = (diff / norm).sqrt();
    assert!(rel > 0.01 && rel < 0.2, "{rel}");
}

/// A table whose experts are stored `[E, out, in]`, gate rows first (not GPT-OSS's layout; the
/// reader takes any the table declares): each expert's weight is whole stored rows.
#[test]
fn experts_stored_out_by_in_read_as_whole_rows() {
    let table = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/src/arch/tables/gpt_oss.json"
    ))
    .unwrap()
    .replace(r#""transposed": true"#, r#""transposed": false"#)
    .replace(r#""interleaved": true"#, r#""interleaved": false"#);
    let arch = loraxfer::arch::parse_table(&table).unwrap();
    let config = loraxfer::io::checkpoint::ModelConfig::parse(
        &serde_json::json!({
            "model_type": "gpt_oss", "hidden_size": HIDDEN, "intermediate_size": WIDTH,
            "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 16, "num_local_experts": EXPERTS,
        })
        .to_string(),
        Path::new("config.json"),
    )
    .unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let path = scratch.path().join("model.safetensors");
    let gate_up = values(EXPERTS * 2 * WIDTH * HIDDEN, 11);
    let down = values(EXPERTS * HIDDEN * WIDTH, 12);
    write_safetensors(
        &path,
        &[
            float(
                "model.layers.0.mlp.experts.gate_up_proj".into(),
                FloatType::F32,
                vec![EXPERTS, 2 * WIDTH, HIDDEN],
                &gate_up,
            ),
            float(
                "model.layers.0.mlp.experts.down_proj".into(),
                FloatType::F32,
                vec![EXPERTS, HIDDEN, WIDTH],
                &down,
            ),
        ],
    );
    let shards = [loraxfer::io::safetensors::TensorFile::open(&path).unwrap()];
    let index = shards[0].names().map(|n| (n.to_string(), 0)).collect();
    let views =
        loraxfer::io::expert_views::ExpertViews::find(&arch, &config, &shards, &index).unwrap();
    for e in 0..EXPERTS {
        let expert_gu = &gate_up[e * 2 * WIDTH * HIDDEN..][..2 * WIDTH * HIDDEN];
        for (part, want) in [
            ("gate_proj", &expert_gu[..WIDTH * HIDDEN]),
            ("up_proj", &expert_gu[WIDTH * HIDDEN..]),
            ("down_proj", &down[e * HIDDEN * WIDTH..][..HIDDEN * WIDTH]),
        ] {
            let name = format!("model.layers.0.mlp.experts.{e}.{part}.weight");
            let rows = want.len() / views.shape(&name).unwrap()[1];
            let (bytes, ty, _) = views.read_rows(&name, 0..rows, &shards).unwrap().unwrap();
            assert_eq!(decode_f32(&bytes, ty), want, "{name}");
        }
    }
}
