//! The twin models of `tests/map_exact.rs`: a source and a target that computes the same
//! function in other coordinates, with the expected adapter of a map transfer between them.

use std::collections::BTreeMap;
use std::path::Path;

use crate::common::cli::*;
use crate::common::*;
pub use crate::common::{perm, projection_key as key};
use faer::Mat;
use loraxfer::io::adapter::{Adapter, LoraFactors};
use loraxfer::io::safetensors::FloatType;
pub const D: usize = 32;
pub const HEADS: usize = 4;
pub const KV: usize = 2;
pub const HD: usize = 8;
pub const INTER: usize = 48;
pub const LAYERS: usize = 2;
pub const VOCAB: usize = 200;

pub struct Twin {
    /// d_t × d_s, orthonormal columns.
    pub q: Mat<f32>,
    /// target q head → source q head; target kv head → source kv head; target neuron → source.
    pub q_heads: Vec<usize>,
    pub kv_heads: Vec<usize>,
    pub neurons: Vec<Option<usize>>,
    pub gains: BTreeMap<String, Vec<f32>>,
    /// Inside each head (hd_t × HD, orthonormal columns): of q and k rows, and of v rows (o's
    /// columns follow v's). The identity when the head sizes agree.
    pub n_qk: Mat<f32>,
    pub n_v: Mat<f32>,
}

/// The shape of a twin: residual width, dead neurons added, head size.
#[derive(Clone, Copy)]
pub struct Shape {
    pub d_t: usize,
    pub extra: usize,
    pub hd_t: usize,
    /// Noise added to the target's embeddings (relative): a token map that no longer fits.
    pub noise: f32,
    /// How both checkpoints store their weights.
    pub dtype: FloatType,
}

/// Rows of `w` unit by unit: target unit u holds `n ·` the rows of source unit `map(u)` (`size`
/// rows each), zeros where it has none.
pub fn units_by(
    w: &Mat<f32>,
    map: &dyn Fn(usize) -> Option<usize>,
    units: usize,
    n: &Mat<f32>,
) -> Mat<f32> {
    let (size_t, size_s) = (n.nrows(), n.ncols());
    let mut out = Mat::<f32>::zeros(units * size_t, w.ncols());
    for u in 0..units {
        if let Some(src) = map(u) {
            let moved = n * w.subrows(src * size_s, size_s);
            out.subrows_mut(u * size_t, size_t).copy_from(&moved);
        }
    }
    out
}

pub fn one() -> Mat<f32> {
    Mat::<f32>::identity(1, 1)
}

pub fn tokenizer(dir: &Path, id_of: &dyn Fn(usize) -> usize) {
    word_level_tokenizer(dir, VOCAB, id_of);
}

pub fn tensors_of(m: &BTreeMap<String, Mat<f32>>) -> BTreeMap<String, (Vec<f32>, Vec<usize>)> {
    m.iter()
        .map(|(k, x)| {
            let shape = if x.nrows() == 1 && k.ends_with("norm.weight") {
                vec![x.ncols()]
            } else {
                vec![x.nrows(), x.ncols()]
            };
            (k.clone(), (row_major(x), shape))
        })
        .collect()
}

pub fn model(hidden: usize, inter: usize) -> TinyModel {
    TinyModel {
        model_type: "llama",
        hidden,
        intermediate: inter,
        layers: LAYERS,
        heads: HEADS,
        kv_heads: KV,
        head_dim: HD,
    }
}

/// Writes the source model, and a twin of width `d_t` with `extra` dead neurons.
/// The source model's tensors and its norm gains (by "layer.norm").
#[allow(clippy::type_complexity)]
pub fn source_model(seed: u64) -> (BTreeMap<String, Mat<f32>>, BTreeMap<String, Vec<f32>>) {
    let mut src = BTreeMap::new();
    src.insert(
        "model.embed_tokens.weight".to_string(),
        gaussian(VOCAB, D, seed, 1),
    );
    src.insert(
        "model.norm.weight".to_string(),
        Mat::from_fn(1, D, |_, _| 1.0),
    );
    let mut gains: BTreeMap<String, Vec<f32>> = BTreeMap::new();
    for l in 0..LAYERS {
        for (n, norm) in ["input_layernorm", "post_attention_layernorm"]
            .iter()
            .enumerate()
        {
            let g = gaussian(1, D, seed, 100 + 2 * l as u64 + n as u64);
            let g = Mat::from_fn(1, D, |_, j| 1.0 + 0.3 * g[(0, j)]);
            gains.insert(format!("{l}.{norm}"), (0..D).map(|j| g[(0, j)]).collect());
            src.insert(format!("model.layers.{l}.{norm}.weight"), g);
        }
        for (i, p) in PROJECTIONS.iter().enumerate() {
            let (o, inp) = projection_shape(p, D, (HEADS, KV, HD), INTER);
            src.insert(
                format!("{}.weight", key(l, p)),
                gaussian(o, inp, seed, 10 * (l as u64 + 1) + i as u64),
            );
        }
    }
    (src, gains)
}

pub fn write_pair(root: &Path, shape: Shape, seed: u64) -> Twin {
    let Shape {
        d_t,
        extra,
        hd_t,
        noise,
        dtype,
    } = shape;
    let (src, gains) = source_model(seed);
    let semi = |stream: u64| {
        if hd_t == HD {
            Mat::<f32>::identity(HD, HD)
        } else {
            gaussian(hd_t, HD, seed, stream).qr().compute_thin_Q()
        }
    };
    let (n_qk, n_v) = (semi(30), semi(31));
    let q = gaussian(d_t, D, seed, 2).qr().compute_thin_Q();
    let c = (D as f32 / d_t as f32).sqrt();
    let group = perm(KV, seed + 1);
    let mut q_heads = Vec::new();
    for (b, &a) in group.iter().enumerate() {
        let within = perm(HEADS / KV, seed + 2 + b as u64);
        q_heads.extend(within.iter().map(|&w| a * (HEADS / KV) + w));
    }
    let nperm = perm(INTER, seed + 5);
    // Dead neurons sit at the end of a wider MLP; the live ones are permuted.
    let neurons: Vec<Option<usize>> = (0..INTER + extra).map(|u| nperm.get(u).copied()).collect();
    let tok = perm(VOCAB, seed + 6);
    let mut tgt = BTreeMap::new();
    let e = &src["model.embed_tokens.weight"];
    let et = e * q.transpose() + gaussian(VOCAB, d_t, seed, 40) * faer::Scale(noise);
    tgt.insert(
        "model.embed_tokens.weight".to_string(),
        Mat::from_fn(VOCAB, d_t, |t, j| {
            let s = tok.iter().position(|&x| x == t).unwrap();
            et[(s, j)]
        }),
    );
    tgt.insert(
        "model.norm.weight".to_string(),
        Mat::from_fn(1, d_t, |_, _| c),
    );
    for l in 0..LAYERS {
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            tgt.insert(
                format!("model.layers.{l}.{norm}.weight"),
                Mat::from_fn(1, d_t, |_, _| c),
            );
        }
        for p in PROJECTIONS {
            let w = &src[&format!("{}.weight", key(l, p))];
            let norm = if matches!(p, "gate_proj" | "up_proj") {
                "post_attention_layernorm"
            } else {
                "input_layernorm"
            };
            let g: &Vec<f32> = &gains[&format!("{l}.{norm}")];
            let read = |w: &Mat<f32>| {
                Mat::from_fn(w.nrows(), w.ncols(), |i, j| w[(i, j)] * g[j]) * q.transpose()
            };
            let t = match p {
                "q_proj" => read(&units_by(w, &|u| Some(q_heads[u]), HEADS, &n_qk)),
                "k_proj" => read(&units_by(w, &|u| Some(group[u]), KV, &n_qk)),
                "v_proj" => read(&units_by(w, &|u| Some(group[u]), KV, &n_v)),
                "gate_proj" | "up_proj" => {
                    read(&units_by(w, &|u| neurons[u], INTER + extra, &one()))
                }
                "o_proj" => {
                    &q * units_by(
                        &w.transpose().to_owned(),
                        &|u| Some(q_heads[u]),
                        HEADS,
                        &n_v,
                    )
                    .transpose()
                }
                _ => {
                    &q * units_by(
                        &w.transpose().to_owned(),
                        &|u| neurons[u],
                        INTER + extra,
                        &one(),
                    )
                    .transpose()
                }
            };
            tgt.insert(format!("{}.weight", key(l, p)), t);
        }
    }
    let (sd, td) = (root.join("source"), root.join("target"));
    write_checkpoint(&sd, &model(D, INTER), &tensors_of(&src), dtype);
    let mut twin_model = model(d_t, INTER + extra);
    twin_model.head_dim = hd_t;
    write_checkpoint(&td, &twin_model, &tensors_of(&tgt), dtype);
    tokenizer(&sd, &|i| i);
    tokenizer(&td, &|i| tok[i]);
    write_source_adapter(&src, &root.join("adapter"), |l| seed + l as u64);
    Twin {
        q,
        q_heads,
        kv_heads: group,
        neurons,
        gains,
        n_qk,
        n_v,
    }
}

/// A PEFT adapter (r = 4, alpha = 8) on every projection of the source, seeded per layer.
pub fn write_source_adapter(
    src: &BTreeMap<String, Mat<f32>>,
    dir: &Path,
    seed_of: impl Fn(usize) -> u64,
) {
    let mut modules = BTreeMap::new();
    for l in 0..LAYERS {
        for p in PROJECTIONS {
            let w = &src[&format!("{}.weight", key(l, p))];
            let f = random_factors(w.nrows(), w.ncols(), 4, 8.0, seed_of(l), FloatType::F32);
            modules.insert(key(l, p), f);
        }
    }
    write_peft(dir, "source", 4, 8.0, serde_json::json!({}), &modules);
}

pub fn dense(f: &LoraFactors) -> Mat<f32> {
    let b = from_row_major(&f.b, f.out_features, f.r);
    let a = from_row_major(&f.a, f.r, f.in_features);
    b * a
}

/// `loraxfer transfer --mode map` on the CPU, with `extra` options.
/// A map-mode transfer on the CPU that must succeed; its standard output.
pub fn map_transfer(
    source: &Path,
    target: &Path,
    adapter: &Path,
    out: &Path,
    extra: &[&str],
) -> String {
    let mut args = vec![
        "transfer",
        "--source-base",
        s(source),
        "--target-base",
        s(target),
        "--adapter",
        s(adapter),
        "--out",
        s(out),
        "--mode",
        "map",
        "--device",
        "cpu",
    ];
    args.extend_from_slice(extra);
    ok(&args).0
}

/// Checks a map transfer onto the twin against the source adapter in the twin's coordinates.
pub fn check_twin(shape: Shape, seed: u64, args: &[&str]) {
    let worst = twin_error(shape, seed, args);
    assert!(
        worst < 1e-4,
        "relative error {worst} (d_t {}, {} dead neurons, head_dim {}, {args:?})",
        shape.d_t,
        shape.extra,
        shape.hd_t
    );
}

pub const EQUAL: Shape = Shape {
    d_t: D,
    extra: 0,
    hd_t: HD,
    noise: 0.0,
    dtype: FloatType::F32,
};

/// The largest relative error of any module of a map transfer onto the twin, with `extra_args`.
pub fn twin_error(shape: Shape, seed: u64, extra_args: &[&str]) -> f32 {
    let extra = shape.extra;
    let dir = tempfile::tempdir().unwrap();
    let twin = write_pair(dir.path(), shape, seed);
    let out = dir.path().join("out");
    let (source, target) = (dir.path().join("source"), dir.path().join("target"));
    let adapter = dir.path().join("adapter");
    map_transfer(&source, &target, &adapter, &out, extra_args);
    let mut worst = 0f32;
    let src = Adapter::open(&dir.path().join("adapter")).unwrap();
    let got = Adapter::open(&out).unwrap();
    for l in 0..LAYERS {
        for p in PROJECTIONS {
            let k = key(l, p);
            let ds = dense(&src.factors(&k).unwrap());
            let norm = if matches!(p, "gate_proj" | "up_proj") {
                "post_attention_layernorm"
            } else {
                "input_layernorm"
            };
            let g = &twin.gains[&format!("{l}.{norm}")];
            let read = |m: &Mat<f32>| {
                Mat::from_fn(m.nrows(), m.ncols(), |i, j| m[(i, j)] * g[j]) * twin.q.transpose()
            };
            let dst = ds.transpose().to_owned();
            let want = match p {
                "q_proj" => read(&units_by(
                    &ds,
                    &|u| Some(twin.q_heads[u]),
                    HEADS,
                    &twin.n_qk,
                )),
                "k_proj" => read(&units_by(&ds, &|u| Some(twin.kv_heads[u]), KV, &twin.n_qk)),
                "v_proj" => read(&units_by(&ds, &|u| Some(twin.kv_heads[u]), KV, &twin.n_v)),
                "gate_proj" | "up_proj" => {
                    read(&units_by(&ds, &|u| twin.neurons[u], INTER + extra, &one()))
                }
                "o_proj" => {
                    &twin.q
                        * units_by(&dst, &|u| Some(twin.q_heads[u]), HEADS, &twin.n_v).transpose()
                }
                _ => {
                    &twin.q
                        * units_by(&dst, &|u| twin.neurons[u], INTER + extra, &one()).transpose()
                }
            };
            let have = dense(&got.factors(&k).unwrap());
            let err = fro(&(&have - &want)) / fro(&want);
            // A NaN must fail the caller's tolerance, which `f32::max` would skip.
            worst = if err.is_nan() || worst.is_nan() {
                f32::NAN
            } else {
                worst.max(err)
            };
        }
    }
    if extra_args.is_empty() {
        let report = read_json(&out.join("transfer_report.json"));
        for row in report["modules"].as_array().unwrap() {
            // bf16 weights fit to their rounding (2⁻⁸ relative), f32 ones exactly.
            let tolerance = if shape.dtype == FloatType::F32 {
                1e-4
            } else {
                1e-2
            };
            assert!(row["residual_fit"].as_f64().unwrap() < tolerance, "{row}");
            assert!(row["matched_similarity"].as_f64().unwrap() > 0.9, "{row}");
        }
    }
    worst
}
