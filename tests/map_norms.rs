//! The map mode through norms other than a plain pre-norm, on two twins:
//! - Gemma 3: embeddings scaled by √d, norm gains stored as g − 1, per-head query/key norms
//!   (one gain vector shared by every head), pre-norms, and output norms after o and down;
//! - OLMo 2: no pre-norms (q, k, v, gate and up read the residual as it is), query/key norms
//!   across all heads (a gain per row of q and of k, which must follow the heads they belong to),
//!   and output norms after o and down.
//!
//! The target is the source with its residual stream in other coordinates (a signed
//! permutation, which the output norms' gains can follow), heads and neurons permuted, gains
//! permuted with the stream and the heads, and o and down scaled by constants the output norms
//! remove (and, in OLMo 2, q, k, v and up scaled by constants its norms remove, and neurons and
//! a key/value group of heads added that no source unit corresponds to). The adapter `map`
//! writes must be the source's in those coordinates: readers `c·ΔW_s Qᵀ`, writers `c·Q ΔW_s`,
//! nothing for the added units. The embeddings give μ = 1 and o and down are scaled
//! differently, so only the output norms' κ can give both writers' c.
//!
//! This checks the map's algebra, not the target's function: the added neurons write nothing,
//! but OLMo 2's query/key norms span all heads, so the added heads' live q and k rows change how
//! the others are normalized (tests/interop/test_map_exact.py checks an OLMo 2 twin that does
//! compute the source's function, without added heads).

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::cli::*;
use common::{projection_key as key, *};
use faer::Mat;
use loraxfer::io::adapter::{Adapter, LoraFactors};
use loraxfer::io::safetensors::FloatType;

const D: usize = 32;
const HEADS: usize = 4;
const KV: usize = 2;
const HD: usize = 8;
const INTER: usize = 48;
const LAYERS: usize = 2;
const VOCAB: usize = 200;
/// The scales of o and down in the target (removed by the output norms).
const C_ATTN: f32 = 2.5;
const C_MLP: f32 = 0.4;

/// Target unit u holds the rows of source unit `map[u]` (`size` rows each).
fn units(w: &Mat<f32>, map: &[usize], size: usize) -> Mat<f32> {
    Mat::from_fn(map.len() * size, w.ncols(), |i, j| {
        w[(map[i / size] * size + i % size, j)]
    })
}

#[derive(Clone, Copy)]
enum Family {
    Gemma3,
    Olmo2,
}

impl Family {
    fn model_type(self) -> &'static str {
        match self {
            Family::Gemma3 => "gemma3_text",
            Family::Olmo2 => "olmo2",
        }
    }

    /// The residual-width norms of a layer.
    fn norms(self) -> &'static [&'static str] {
        match self {
            Family::Gemma3 => &[
                "input_layernorm",
                "post_attention_layernorm",
                "pre_feedforward_layernorm",
                "post_feedforward_layernorm",
            ],
            Family::Olmo2 => &["post_attention_layernorm", "post_feedforward_layernorm"],
        }
    }

    /// The scale of a reading projection in the target. OLMo 2 normalizes q and k after their
    /// projections and each block's output (which v and up reach linearly), so these scales
    /// leave its function as it is, and the map must find them from the weights (gate's goes
    /// through the SiLU and stays 1); Gemma 3's pre-norms fix the scale, and it keeps its weights.
    fn reader_scale(self, p: &str) -> f32 {
        match (self, p) {
            (Family::Olmo2, "q_proj") => 2.0,
            (Family::Olmo2, "k_proj") => 0.5,
            (Family::Olmo2, "v_proj") => 3.0,
            (Family::Olmo2, "up_proj") => 0.25,
            _ => 1.0,
        }
    }

    /// Neurons the target has beyond the source's: live gate and up rows whose down columns are
    /// zero, so the function is the same, and nothing of the source's corresponds to them (the
    /// reading parts' κ must count the matched rows only).
    fn extra_neurons(self) -> usize {
        match self {
            Family::Gemma3 => 0,
            Family::Olmo2 => 12,
        }
    }

    /// Key/value groups (with their query heads) the target has beyond the source's: live q, k
    /// and v rows whose o columns are zero, matched to nothing (the reading parts' κ must count
    /// the matched heads only).
    fn extra_groups(self) -> usize {
        match self {
            Family::Gemma3 => 0,
            Family::Olmo2 => 1,
        }
    }

    /// Rows of q, and of k or v, the extra groups add.
    fn extra_head_rows(self) -> (usize, usize) {
        let g = self.extra_groups();
        (g * (HEADS / KV) * HD, g * HD)
    }

    /// What is stored for an effective gain of `1 + x` (Gemma stores g − 1).
    fn stored(self, x: f32) -> f32 {
        match self {
            Family::Gemma3 => x,
            Family::Olmo2 => 1.0 + x,
        }
    }
}

/// `m` with the rows of `below` under it.
fn stack(m: &Mat<f32>, below: &Mat<f32>) -> Mat<f32> {
    Mat::from_fn(m.nrows() + below.nrows(), m.ncols(), |i, j| {
        if i < m.nrows() {
            m[(i, j)]
        } else {
            below[(i - m.nrows(), j)]
        }
    })
}

/// `m` with `n` zero columns after its own.
fn zero_columns(m: &Mat<f32>, n: usize) -> Mat<f32> {
    stack(&m.transpose().to_owned(), &Mat::zeros(n, m.nrows()))
        .transpose()
        .to_owned()
}

struct Twin {
    /// `d × d` signed permutation: h_t = Q h_s.
    q: Mat<f32>,
    q_heads: Vec<usize>,
    kv_heads: Vec<usize>,
    neurons: Vec<usize>,
}

fn tokenizer(dir: &Path) {
    word_level_tokenizer(dir, VOCAB, &|i| i);
}

fn write_pair(root: &Path, family: Family, seed: u64) -> Twin {
    let pi = perm(D, seed + 1);
    let signs: Vec<f32> = (0..D)
        .map(|i| {
            if (i * 7 + seed as usize) % 3 == 0 {
                -1.0
            } else {
                1.0
            }
        })
        .collect();
    let q = Mat::from_fn(D, D, |r, c| if r == pi[c] { signs[c] } else { 0.0 });
    let group = perm(KV, seed + 2);
    let mut q_heads = Vec::new();
    for (b, &a) in group.iter().enumerate() {
        let within = perm(HEADS / KV, seed + 3 + b as u64);
        q_heads.extend(within.iter().map(|&w| a * (HEADS / KV) + w));
    }
    let neurons = perm(INTER, seed + 6);
    let (mut src, mut tgt) = (BTreeMap::new(), BTreeMap::new());
    let vector = |w: &Mat<f32>| (row_major(w), vec![w.ncols()]);
    let matrix = |w: &Mat<f32>| (row_major(w), vec![w.nrows(), w.ncols()]);
    let e = gaussian(VOCAB, D, seed, 1);
    src.insert("model.embed_tokens.weight".to_string(), matrix(&e));
    tgt.insert(
        "model.embed_tokens.weight".to_string(),
        matrix(&(&e * q.transpose())),
    );
    // A stored residual-width gain (g − 1) and the target's, permuted with the stream.
    let gain = |stream: u64| {
        let g = gaussian(1, D, seed, stream);
        let s = Mat::from_fn(1, D, |_, j| family.stored(0.3 * g[(0, j)]));
        let t = Mat::from_fn(1, D, |_, j| {
            s[(0, pi.iter().position(|&p| p == j).unwrap())]
        });
        (s, t)
    };
    let (ns, nt) = gain(90);
    src.insert("model.norm.weight".to_string(), vector(&ns));
    tgt.insert("model.norm.weight".to_string(), vector(&nt));
    let mut modules = BTreeMap::new();
    for l in 0..LAYERS {
        for (n, norm) in family.norms().iter().enumerate() {
            let (s, t) = gain(100 + 4 * l as u64 + n as u64);
            src.insert(format!("model.layers.{l}.{norm}.weight"), vector(&s));
            tgt.insert(format!("model.layers.{l}.{norm}.weight"), vector(&t));
        }
        for (n, (norm, heads)) in [("q_norm", &q_heads), ("k_norm", &group)]
            .into_iter()
            .enumerate()
        {
            let name = format!("model.layers.{l}.self_attn.{norm}.weight");
            let stream = 200 + 2 * l as u64 + n as u64;
            let (s, t) = match family {
                // One gain vector of head_dim, shared by every head on both sides.
                Family::Gemma3 => {
                    let g = gaussian(1, HD, seed, stream);
                    let g = Mat::from_fn(1, HD, |_, j| 0.3 * g[(0, j)]);
                    (g.clone(), g)
                }
                // A gain per row, which moves with its head (the extra heads' own after them).
                Family::Olmo2 => {
                    let (q_extra, kv_extra) = family.extra_head_rows();
                    let extra = if n == 0 { q_extra } else { kv_extra };
                    let rows = heads.len() * HD + extra;
                    let g = gaussian(rows, 1, seed, stream);
                    let g = Mat::from_fn(rows, 1, |i, _| 1.0 + 0.3 * g[(i, 0)]);
                    let own = g.subrows(0, heads.len() * HD).to_owned();
                    let t = stack(
                        &units(&own, heads, HD),
                        &g.subrows(heads.len() * HD, extra).to_owned(),
                    );
                    (own.transpose().to_owned(), t.transpose().to_owned())
                }
            };
            src.insert(name.clone(), vector(&s));
            tgt.insert(name, vector(&t));
        }
        for (i, p) in PROJECTIONS.iter().enumerate() {
            let (o, inp) = projection_shape(p, D, (HEADS, KV, HD), INTER);
            let w = gaussian(o, inp, seed, 10 * (l as u64 + 1) + i as u64);
            let cols = |w: &Mat<f32>, map: &[usize], size: usize| {
                units(&w.transpose().to_owned(), map, size)
                    .transpose()
                    .to_owned()
            };
            let c = faer::Scale(family.reader_scale(p));
            let t = match *p {
                "q_proj" => units(&w, &q_heads, HD) * q.transpose() * c,
                "k_proj" | "v_proj" => units(&w, &group, HD) * q.transpose() * c,
                "gate_proj" | "up_proj" => units(&w, &neurons, 1) * q.transpose() * c,
                "o_proj" => &q * cols(&w, &q_heads, HD) * faer::Scale(C_ATTN),
                _ => &q * cols(&w, &neurons, 1) * faer::Scale(C_MLP),
            };
            let extra = family.extra_neurons();
            let (q_extra, kv_extra) = family.extra_head_rows();
            let live = |rows| gaussian(rows, D, seed, 500 + 10 * l as u64 + i as u64);
            let t = match *p {
                "gate_proj" | "up_proj" => stack(&t, &live(extra)),
                "down_proj" => zero_columns(&t, extra),
                "q_proj" => stack(&t, &live(q_extra)),
                "k_proj" | "v_proj" => stack(&t, &live(kv_extra)),
                _ => zero_columns(&t, q_extra),
            };
            src.insert(format!("{}.weight", key(l, p)), matrix(&w));
            tgt.insert(format!("{}.weight", key(l, p)), matrix(&t));
            let f = random_factors(
                o,
                inp,
                4,
                8.0,
                seed + l as u64 * 7 + i as u64,
                FloatType::F32,
            );
            modules.insert(key(l, p), f);
        }
    }
    let model = TinyModel {
        model_type: family.model_type(),
        hidden: D,
        intermediate: INTER,
        layers: LAYERS,
        heads: HEADS,
        kv_heads: KV,
        head_dim: HD,
    };
    let wider = TinyModel {
        intermediate: INTER + family.extra_neurons(),
        heads: HEADS + family.extra_groups() * (HEADS / KV),
        kv_heads: KV + family.extra_groups(),
        ..model
    };
    for (dir, model, tensors) in [("source", &model, &src), ("target", &wider, &tgt)] {
        write_checkpoint(&root.join(dir), model, tensors, FloatType::F32);
        tokenizer(&root.join(dir));
    }
    write_peft(
        &root.join("adapter"),
        "source",
        4,
        8.0,
        serde_json::json!({}),
        &modules,
    );
    Twin {
        q,
        q_heads,
        kv_heads: group,
        neurons,
    }
}

fn dense(f: &LoraFactors) -> Mat<f32> {
    from_row_major(&f.b, f.out_features, f.r) * from_row_major(&f.a, f.r, f.in_features)
}

#[test]
fn map_carries_the_adapter_through_gemma3_norms() {
    map_carries_the_adapter_through(Family::Gemma3, 12);
}

#[test]
fn map_carries_the_adapter_through_olmo2_norms() {
    map_carries_the_adapter_through(Family::Olmo2, 21);
}

fn map_carries_the_adapter_through(family: Family, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let twin = write_pair(dir.path(), family, seed);
    let [source, target, adapter, out] =
        ["source", "target", "adapter", "out"].map(|n| dir.path().join(n));
    ok(&[
        "transfer",
        "--source-base",
        s(&source),
        "--target-base",
        s(&target),
        "--adapter",
        s(&adapter),
        "--out",
        s(&out),
        "--mode",
        "map",
        "--device",
        "cpu",
    ]);
    let src = Adapter::open(&adapter).unwrap();
    let got = Adapter::open(&out).unwrap();
    for l in 0..LAYERS {
        for p in PROJECTIONS {
            let ds = dense(&src.factors(&key(l, p)).unwrap());
            let cols = |w: &Mat<f32>, map: &[usize], size: usize| {
                units(&w.transpose().to_owned(), map, size)
                    .transpose()
                    .to_owned()
            };
            let c = faer::Scale(family.reader_scale(p));
            let want = match p {
                "q_proj" => units(&ds, &twin.q_heads, HD) * twin.q.transpose() * c,
                "k_proj" | "v_proj" => units(&ds, &twin.kv_heads, HD) * twin.q.transpose() * c,
                "gate_proj" | "up_proj" => units(&ds, &twin.neurons, 1) * twin.q.transpose() * c,
                "o_proj" => &twin.q * cols(&ds, &twin.q_heads, HD) * faer::Scale(C_ATTN),
                _ => &twin.q * cols(&ds, &twin.neurons, 1) * faer::Scale(C_MLP),
            };
            // The target's extra neurons and heads are unmatched: they take nothing.
            let extra = family.extra_neurons();
            let (q_extra, kv_extra) = family.extra_head_rows();
            let want = match p {
                "gate_proj" | "up_proj" => stack(&want, &Mat::zeros(extra, D)),
                "down_proj" => zero_columns(&want, extra),
                "q_proj" => stack(&want, &Mat::zeros(q_extra, D)),
                "k_proj" | "v_proj" => stack(&want, &Mat::zeros(kv_extra, D)),
                _ => zero_columns(&want, q_extra),
            };
            let have = dense(&got.factors(&key(l, p)).unwrap());
            let err = fro(&(&have - &want)) / fro(&want);
            assert!(err < 1e-4, "layer {l} {p}: relative error {err}");
        }
    }
    let report = read_json(&out.join("transfer_report.json"));
    for layer in report["map"]["layers"].as_array().unwrap() {
        let kappa = layer["writer_kappa"].as_array().unwrap();
        let (a, m) = (kappa[0].as_f64().unwrap(), kappa[1].as_f64().unwrap());
        assert!(
            (a - C_ATTN as f64).abs() < 1e-3 && (m - C_MLP as f64).abs() < 1e-3,
            "{layer}"
        );
        // The reading parts' κ: OLMo 2's target scales; none where pre-norms fix the scale.
        match family {
            Family::Gemma3 => assert!(layer["reader_kappa"].is_null(), "{layer}"),
            Family::Olmo2 => {
                let kappa = layer["reader_kappa"].as_array().unwrap();
                for (k, p) in
                    kappa
                        .iter()
                        .zip(["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"])
                {
                    let want = family.reader_scale(p) as f64;
                    assert!((k.as_f64().unwrap() - want).abs() < 1e-4, "{p}: {layer}");
                }
            }
        }
    }
}
