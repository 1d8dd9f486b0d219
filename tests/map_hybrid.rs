//! The map mode onto a hybrid model (Qwen3.5: linear attention in some layers, softmax attention
//! with a gated query in the others), on a target whose correspondence with the source is known
//! exactly: the source rewritten with its residual stream rotated, its norm gains folded into the
//! next weights, its attention heads permuted within the GQA structure and its MLP neurons
//! permuted. From Qwen3.5 and from Qwen3 (softmax attention everywhere, no gate): the adapter
//! `map` writes must be the source adapter in the target's coordinates, the gate rows moving
//! with their heads (or empty where the source has no gate); what the map does not take is
//! refused before any map is built.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::cli::*;
use common::*;
use faer::Mat;
use loraxfer::io::adapter::{Adapter, LoraFactors};
use loraxfer::io::safetensors::FloatType;

const D: usize = 32;
const HEADS: usize = 4;
const KV: usize = 2;
const HD: usize = 8;
const INTER: usize = 48;
const LAYERS: usize = 4;
const VOCAB: usize = 200;
/// Linear attention: key heads, value heads, key and value head sizes.
const LINEAR: (usize, usize, usize, usize) = (2, 4, 8, 6);

/// Layers 1 and 3 have softmax attention in Qwen3.5 (the config's `layer_types`).
fn full(l: usize) -> bool {
    l % 2 == 1
}

#[derive(Clone, Copy, PartialEq)]
enum Family {
    /// Softmax attention in every layer, an ungated query, norms storing their gains.
    Qwen3,
    /// Hybrid; the gated query twice as tall; norms storing `gain − 1`.
    Qwen3_5,
}

impl Family {
    fn gated(self) -> bool {
        self == Family::Qwen3_5
    }

    fn softmax(self, l: usize) -> bool {
        self == Family::Qwen3 || full(l)
    }

    fn offset(self) -> f32 {
        if self.gated() {
            1.0
        } else {
            0.0
        }
    }

    fn config(self) -> serde_json::Value {
        let mut c = serde_json::json!({
            "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"],
            "hidden_size": D, "intermediate_size": INTER, "num_hidden_layers": LAYERS,
            "num_attention_heads": HEADS, "num_key_value_heads": KV, "head_dim": HD,
            "vocab_size": VOCAB, "tie_word_embeddings": true,
        });
        if self == Family::Qwen3_5 {
            let (kh, vh, kd, vd) = LINEAR;
            let kinds: Vec<&str> = (0..LAYERS)
                .map(|l| match full(l) {
                    true => "full_attention",
                    false => "linear_attention",
                })
                .collect();
            let more = serde_json::json!({
                "model_type": "qwen3_5_text", "architectures": ["Qwen3_5ForCausalLM"],
                "layer_types": kinds,
                "linear_num_key_heads": kh, "linear_num_value_heads": vh,
                "linear_key_head_dim": kd, "linear_value_head_dim": vd,
            });
            for (k, v) in more.as_object().unwrap() {
                c[k] = v.clone();
            }
        }
        c
    }

    /// The projections of layer `l`: (key below the layer, out, in).
    fn projections(self, l: usize) -> Vec<(&'static str, usize, usize)> {
        let (kh, vh, kd, vd) = LINEAR;
        let q_rows = if self.gated() { 2 } else { 1 } * HEADS * HD;
        let mut p = match self.softmax(l) {
            true => vec![
                ("self_attn.q_proj", q_rows, D),
                ("self_attn.k_proj", KV * HD, D),
                ("self_attn.v_proj", KV * HD, D),
                ("self_attn.o_proj", D, HEADS * HD),
            ],
            false => vec![
                ("linear_attn.in_proj_qkv", 2 * kh * kd + vh * vd, D),
                ("linear_attn.in_proj_z", vh * vd, D),
                ("linear_attn.in_proj_b", vh, D),
                ("linear_attn.in_proj_a", vh, D),
                ("linear_attn.out_proj", D, vh * vd),
            ],
        };
        p.extend([
            ("mlp.gate_proj", INTER, D),
            ("mlp.up_proj", INTER, D),
            ("mlp.down_proj", D, INTER),
        ]);
        p
    }
}

/// The correspondence of a source and its twin.
struct Twin {
    /// The rotation of the residual stream (d × d, orthogonal).
    q: Mat<f32>,
    q_heads: Vec<usize>,
    kv_heads: Vec<usize>,
    neurons: Vec<usize>,
    /// Effective gains of the source's `input_layernorm` and `post_attention_layernorm`, by layer.
    gains: Vec<[Vec<f32>; 2]>,
}

type Tensors = BTreeMap<String, Mat<f32>>;

fn gains_near_one(n: usize, seed: u64, stream: u64) -> Vec<f32> {
    let g = gaussian(1, n, seed, stream);
    (0..n).map(|j| 1.0 + 0.3 * g[(0, j)]).collect()
}

fn row(v: &[f32], offset: f32) -> Mat<f32> {
    Mat::from_fn(1, v.len(), |_, j| v[j] - offset)
}

/// A source model of `family`, and its Qwen3.5 twin.
fn write_pair(root: &Path, family: Family, seed: u64) -> Twin {
    let mut src: Tensors = BTreeMap::new();
    let mut tgt: Tensors = BTreeMap::new();
    let q = gaussian(D, D, seed, 2).qr().compute_thin_Q();
    let kv_heads = perm(KV, seed + 1);
    let per = HEADS / KV;
    let q_heads: Vec<usize> = (0..HEADS)
        .map(|u| kv_heads[u / per] * per + perm(per, seed + 2 + (u / per) as u64)[u % per])
        .collect();
    let neurons = perm(INTER, seed + 5);
    let tok = perm(VOCAB, seed + 6);
    let e = gaussian(VOCAB, D, seed, 1);
    let et = &e * q.transpose();
    src.insert("model.embed_tokens.weight".into(), e);
    tgt.insert(
        "model.embed_tokens.weight".into(),
        Mat::from_fn(VOCAB, D, |t, j| {
            et[(tok.iter().position(|&x| x == t).unwrap(), j)]
        }),
    );
    let ones = vec![1.0; D];
    src.insert("model.norm.weight".into(), row(&ones, family.offset()));
    tgt.insert("model.norm.weight".into(), row(&ones, 1.0));
    // Query and key norms: one gain per head coordinate, the same in every head.
    let head_gains = [gains_near_one(HD, seed, 90), gains_near_one(HD, seed, 91)];
    let mut gains = Vec::new();
    for l in 0..LAYERS {
        let layer = format!("model.layers.{l}");
        let g = [
            gains_near_one(D, seed, 100 + 2 * l as u64),
            gains_near_one(D, seed, 101 + 2 * l as u64),
        ];
        for (n, norm) in ["input_layernorm", "post_attention_layernorm"]
            .iter()
            .enumerate()
        {
            src.insert(
                format!("{layer}.{norm}.weight"),
                row(&g[n], family.offset()),
            );
            tgt.insert(format!("{layer}.{norm}.weight"), row(&ones, 1.0));
        }
        for (n, norm) in ["q_norm", "k_norm"].iter().enumerate() {
            let name = format!("{layer}.self_attn.{norm}.weight");
            if family.softmax(l) {
                src.insert(name.clone(), row(&head_gains[n], family.offset()));
            }
            if full(l) {
                tgt.insert(name, row(&head_gains[n], 1.0));
            }
        }
        let weight = |key: &str, out: usize, inp: usize, stream: u64| {
            let w = gaussian(out, inp, seed, 1000 + 20 * l as u64 + stream);
            (format!("{layer}.{key}.weight"), w)
        };
        for (i, (key, out, inp)) in family.projections(l).into_iter().enumerate() {
            let (name, w) = weight(key, out, inp, i as u64);
            src.insert(name, w);
        }
        // The twin's weights: each as the source's moved (readers: the pre-norm's gains folded
        // in, then the rotation); a linear attention's own, which the map does not read.
        let read = |w: &Mat<f32>, n: usize| {
            Mat::from_fn(w.nrows(), w.ncols(), |i, j| w[(i, j)] * g[n][j]) * q.transpose()
        };
        let source_of = |key: &str| &src[&format!("{layer}.{key}.weight")];
        for (i, (key, out, inp)) in Family::Qwen3_5.projections(l).into_iter().enumerate() {
            let name = format!("{layer}.{key}.weight");
            let w = match key {
                "self_attn.q_proj" => {
                    let gate = gaussian(HEADS * HD, D, seed, 3000 + l as u64);
                    let heads = query_heads(source_of(key), family.gated(), Some(&gate), &q_heads);
                    read(&heads, 0)
                }
                "self_attn.k_proj" | "self_attn.v_proj" => {
                    read(&units(source_of(key), &|u| kv_heads[u], KV, HD), 0)
                }
                "self_attn.o_proj" => &q * columns(source_of(key), &|u| q_heads[u], HEADS, HD),
                "mlp.gate_proj" | "mlp.up_proj" => {
                    read(&units(source_of(key), &|u| neurons[u], INTER, 1), 1)
                }
                "mlp.down_proj" => &q * columns(source_of(key), &|u| neurons[u], INTER, 1),
                _ => weight(key, out, inp, 50 + i as u64).1,
            };
            tgt.insert(name, w);
        }
        gains.push(g);
    }
    for (dir, family, tensors, ids) in [
        ("source", family, &src, None),
        ("target", Family::Qwen3_5, &tgt, Some(&tok)),
    ] {
        write_model(&root.join(dir), family, tensors);
        word_level_tokenizer(&root.join(dir), VOCAB, &|i| ids.map_or(i, |t| t[i]));
    }
    Twin {
        q,
        q_heads,
        kv_heads,
        neurons,
        gains,
    }
}

fn write_model(dir: &Path, family: Family, tensors: &Tensors) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), family.config().to_string()).unwrap();
    let out: Vec<(String, loraxfer::io::safetensors::OutTensor)> = tensors
        .iter()
        .map(|(k, m)| {
            let shape = match m.nrows() == 1 && k.ends_with("norm.weight") {
                true => vec![m.ncols()],
                false => vec![m.nrows(), m.ncols()],
            };
            let data =
                loraxfer::io::safetensors::OutTensor::from_f32(row_major(m), shape, FloatType::F32);
            (k.clone(), data)
        })
        .collect();
    let meta = loraxfer::io::safetensors::pt_metadata();
    loraxfer::io::safetensors::write_file(&dir.join("model.safetensors"), &out, meta).unwrap();
}

/// Rows of `w` in units of `size`: unit u takes the source's unit `of(u)`.
fn units(w: &Mat<f32>, of: &dyn Fn(usize) -> usize, n: usize, size: usize) -> Mat<f32> {
    Mat::from_fn(n * size, w.ncols(), |i, j| {
        w[(of(i / size) * size + i % size, j)]
    })
}

/// Columns of `w` in units of `size`, moved as [`units`] moves rows.
fn columns(w: &Mat<f32>, of: &dyn Fn(usize) -> usize, n: usize, size: usize) -> Mat<f32> {
    units(&w.transpose().to_owned(), of, n, size)
        .transpose()
        .to_owned()
}

/// A gated query's rows (per head: HD query rows, HD gate rows) from a source query, moved by
/// `q_heads`; where the source has no gate, the gate rows are `gate`'s (None: zeros).
fn query_heads(w: &Mat<f32>, gated: bool, gate: Option<&Mat<f32>>, q_heads: &[usize]) -> Mat<f32> {
    let size = if gated { 2 * HD } else { HD };
    Mat::from_fn(2 * HEADS * HD, w.ncols(), |i, j| {
        let (u, r) = (i / (2 * HD), i % (2 * HD));
        let src = q_heads[u];
        match (r < HD || gated, gate) {
            (true, _) => w[(src * size + r, j)],
            (false, Some(g)) => g[(u * HD + r - HD, j)],
            (false, None) => 0.0,
        }
    })
}

/// An adapter on `modules` (keys below `model.layers.<l>`) of the source's layers `layers`.
fn write_adapter(dir: &Path, family: Family, pick: &dyn Fn(usize, &str) -> bool, seed: u64) {
    let mut modules = BTreeMap::new();
    for l in 0..LAYERS {
        for (key, out, inp) in family.projections(l) {
            if pick(l, key) {
                let f = random_factors(out, inp, 4, 8.0, seed + l as u64, FloatType::F32);
                modules.insert(format!("model.layers.{l}.{key}"), f);
            }
        }
    }
    write_peft(dir, "source", 4, 8.0, serde_json::json!({}), &modules);
}

fn dense(f: &LoraFactors) -> Mat<f32> {
    from_row_major(&f.b, f.out_features, f.r) * from_row_major(&f.a, f.r, f.in_features)
}

fn transfer(root: &Path, mode: &str, extra: &[&str]) -> std::process::Output {
    let path = |p: &str| root.join(p).to_str().unwrap().to_string();
    let (source, target, adapter, out) =
        (path("source"), path("target"), path("adapter"), path("out"));
    let mut args = vec![
        "transfer",
        "--source-base",
        &source,
        "--target-base",
        &target,
        "--adapter",
        &adapter,
        "--out",
        &out,
        "--mode",
        mode,
        "--device",
        "cpu",
    ];
    args.extend_from_slice(extra);
    loraxfer(&args)
}

/// Maps an adapter from `family` onto its twin and checks every module against the source's
/// update in the twin's coordinates (`extra`: more options).
fn check_twin(family: Family, seed: u64, extra: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let twin = write_pair(root, family, seed);
    // Every projection the target has a counterpart for: softmax attention where the target
    // has it, the MLP everywhere.
    let pick =
        |l: usize, key: &str| key.starts_with("mlp.") || (full(l) && key.starts_with("self_attn."));
    write_adapter(&root.join("adapter"), family, &pick, seed + 10);
    let out = transfer(root, "map", extra);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let src = Adapter::open(&root.join("adapter")).unwrap();
    let got = Adapter::open(&root.join("out")).unwrap();
    let mut checked = 0;
    for name in src.modules.keys() {
        let l: usize = name.split('.').nth(2).unwrap().parse().unwrap();
        let key = name.splitn(4, '.').nth(3).unwrap();
        let ds = dense(&src.factors(name).unwrap());
        let g = &twin.gains[l];
        let read = |m: &Mat<f32>, n: usize| {
            Mat::from_fn(m.nrows(), m.ncols(), |i, j| m[(i, j)] * g[n][j]) * twin.q.transpose()
        };
        let want = match key {
            "self_attn.q_proj" => read(&query_heads(&ds, family.gated(), None, &twin.q_heads), 0),
            "self_attn.k_proj" | "self_attn.v_proj" => {
                read(&units(&ds, &|u| twin.kv_heads[u], KV, HD), 0)
            }
            "self_attn.o_proj" => &twin.q * columns(&ds, &|u| twin.q_heads[u], HEADS, HD),
            "mlp.gate_proj" | "mlp.up_proj" => read(&units(&ds, &|u| twin.neurons[u], INTER, 1), 1),
            "mlp.down_proj" => &twin.q * columns(&ds, &|u| twin.neurons[u], INTER, 1),
            other => panic!("unexpected module {other}"),
        };
        let have = dense(&got.factors(name).unwrap());
        let err = fro(&(&have - &want)) / fro(&want);
        assert!(err < 1e-4, "{name}: relative error {err}");
        checked += 1;
    }
    assert_eq!(checked, 2 * 4 + LAYERS * 3);
    // The report: heads matched in the layers with softmax attention, none in the others.
    let report = read_json(&root.join("out").join("transfer_report.json"));
    let layers = report["map"]["layers"].as_array().expect("map layers");
    assert_eq!(layers.len(), LAYERS);
    for layer in layers {
        let j = layer["target_layer"].as_u64().unwrap() as usize;
        let heads = layer["q_heads"].as_array().unwrap();
        assert_eq!(heads.len(), if full(j) { HEADS } else { 0 }, "{layer}");
        if full(j) {
            assert!(layer["head_similarity"].as_f64().unwrap() > 0.9, "{layer}");
        }
    }
}

#[test]
fn map_carries_a_qwen3_5_adapter_onto_its_twin_gates_and_all() {
    check_twin(Family::Qwen3_5, 21, &[]);
}

#[test]
fn the_inner_fit_keeps_the_hybrid_twin_exact_gates_and_all() {
    check_twin(Family::Qwen3_5, 25, &["--map-inner", "fit"]);
}

#[test]
fn map_carries_a_qwen3_adapter_onto_a_qwen3_5_twin_with_empty_gates() {
    check_twin(Family::Qwen3, 22, &[]);
}

#[test]
fn map_refuses_linear_attention_and_a_gate_with_nowhere_to_go() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write_pair(root, Family::Qwen3_5, 23);
    // Linear attention's projections: refused, naming one and the modules that can go.
    let pick = |l: usize, key: &str| {
        key == "linear_attn.in_proj_qkv" || (full(l) && key == "self_attn.v_proj")
    };
    write_adapter(&root.join("adapter"), Family::Qwen3_5, &pick, 5);
    let out = transfer(root, "map", &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("`in_proj_qkv`"), "{err}");
    assert!(err.contains("--modules v_proj"), "{err}");
    assert!(!root.join("out").exists());
    // A gated query onto a query without a gate: the source and target swapped.
    std::fs::rename(root.join("source"), root.join("qwen3_5_twin_source")).unwrap();
    std::fs::rename(root.join("target"), root.join("source")).unwrap();
    std::fs::remove_dir_all(root.join("adapter")).unwrap();
    let qwen3 = tempfile::tempdir().unwrap();
    write_pair(qwen3.path(), Family::Qwen3, 24);
    std::fs::rename(qwen3.path().join("source"), root.join("target")).unwrap();
    let pick = |l: usize, key: &str| full(l) && key == "self_attn.q_proj" || key == "mlp.up_proj";
    write_adapter(&root.join("adapter"), Family::Qwen3_5, &pick, 6);
    let out = transfer(root, "map", &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("`q_proj` also updates the gate"), "{err}");
    assert!(err.contains("--modules up_proj"), "{err}");
}
