//! The map mode on targets whose correspondence with the source is known exactly: the source
//! rewritten in other coordinates (norm gains folded into the next weights, the residual stream
//! rotated — or embedded in a wider one by a semi-orthogonal map —, attention heads permuted
//! within the GQA structure, MLP neurons permuted, dead neurons added, token ids shuffled with the
//! same strings). The adapter `map` writes must be the source adapter in those coordinates.

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
const LAYERS: usize = 2;
const VOCAB: usize = 200;

fn key(l: usize, p: &str) -> String {
    let block = if matches!(p, "gate_proj" | "up_proj" | "down_proj") {
        "mlp"
    } else {
        "self_attn"
    };
    format!("model.layers.{l}.{block}.{p}")
}

/// A permutation of 0..n from a seed.
fn perm(n: usize, seed: u64) -> Vec<usize> {
    let g = gaussian(n, 1, seed, 77);
    let mut idx: Vec<usize> = (0..n).collect();
    idx.sort_by(|&a, &b| g[(a, 0)].partial_cmp(&g[(b, 0)]).unwrap());
    idx
}

struct Twin {
    /// d_t × d_s, orthonormal columns.
    q: Mat<f32>,
    /// target q head → source q head; target kv head → source kv head; target neuron → source.
    q_heads: Vec<usize>,
    kv_heads: Vec<usize>,
    neurons: Vec<Option<usize>>,
    gains: BTreeMap<String, Vec<f32>>,
    /// Inside each head (hd_t × HD, orthonormal columns): of q and k rows, and of v rows (o's
    /// columns follow v's). The identity when the head sizes agree.
    n_qk: Mat<f32>,
    n_v: Mat<f32>,
}

/// The shape of a twin: residual width, dead neurons added, head size.
#[derive(Clone, Copy)]
struct Shape {
    d_t: usize,
    extra: usize,
    hd_t: usize,
    /// Noise added to the target's embeddings (relative): a token map that no longer fits.
    noise: f32,
}

/// Rows of `w` unit by unit: target unit u holds `n ·` the rows of source unit `map(u)` (`size`
/// rows each), zeros where it has none.
fn units_by(
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

fn one() -> Mat<f32> {
    Mat::<f32>::identity(1, 1)
}

fn tokenizer(dir: &Path, id_of: &dyn Fn(usize) -> usize) {
    let vocab: serde_json::Map<String, serde_json::Value> = (0..VOCAB)
        .map(|i| (format!("w{i}"), id_of(i).into()))
        .collect();
    let json =
        serde_json::json!({"model": {"type": "WordLevel", "vocab": vocab, "unk_token": "w0"}});
    std::fs::write(dir.join("tokenizer.json"), json.to_string()).unwrap();
}

fn tensors_of(m: &BTreeMap<String, Mat<f32>>) -> BTreeMap<String, (Vec<f32>, Vec<usize>)> {
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

fn model(hidden: usize, inter: usize) -> TinyModel {
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
fn source_model(seed: u64) -> (BTreeMap<String, Mat<f32>>, BTreeMap<String, Vec<f32>>) {
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
            let (o, inp) = match *p {
                "q_proj" => (HEADS * HD, D),
                "k_proj" | "v_proj" => (KV * HD, D),
                "o_proj" => (D, HEADS * HD),
                "down_proj" => (D, INTER),
                _ => (INTER, D),
            };
            src.insert(
                format!("{}.weight", key(l, p)),
                gaussian(o, inp, seed, 10 * (l as u64 + 1) + i as u64),
            );
        }
    }
    (src, gains)
}

fn write_pair(root: &Path, shape: Shape, seed: u64) -> Twin {
    let Shape {
        d_t,
        extra,
        hd_t,
        noise,
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
    write_checkpoint(&sd, &model(D, INTER), &tensors_of(&src), FloatType::F32);
    let mut twin_model = model(d_t, INTER + extra);
    twin_model.head_dim = hd_t;
    write_checkpoint(&td, &twin_model, &tensors_of(&tgt), FloatType::F32);
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
fn write_source_adapter(
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

fn dense(f: &LoraFactors) -> Mat<f32> {
    let b = from_row_major(&f.b, f.out_features, f.r);
    let a = from_row_major(&f.a, f.r, f.in_features);
    b * a
}

/// `loraxfer transfer --mode map` on the CPU, with `extra` options.
fn map_transfer(source: &Path, target: &Path, adapter: &Path, out: &Path, extra: &[&str]) {
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
    ok(&args);
}

/// Checks a map transfer onto the twin against the source adapter in the twin's coordinates.
fn check_twin(shape: Shape, seed: u64, args: &[&str]) {
    let worst = twin_error(shape, seed, args);
    assert!(
        worst < 1e-4,
        "relative error {worst} (d_t {}, {} dead neurons, head_dim {}, {args:?})",
        shape.d_t,
        shape.extra,
        shape.hd_t
    );
}

const EQUAL: Shape = Shape {
    d_t: D,
    extra: 0,
    hd_t: HD,
    noise: 0.0,
};

/// The largest relative error of any module of a map transfer onto the twin, with `extra_args`.
fn twin_error(shape: Shape, seed: u64, extra_args: &[&str]) -> f32 {
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
            let ds = dense(&src.modules[&k]);
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
            let have = dense(&got.modules[&k]);
            worst = worst.max(fro(&(&have - &want)) / fro(&want));
        }
    }
    if extra_args.is_empty() {
        let report = read_json(&out.join("transfer_report.json"));
        for row in report["modules"].as_array().unwrap() {
            assert!(row["residual_fit"].as_f64().unwrap() < 1e-4, "{row}");
            assert!(row["matched_similarity"].as_f64().unwrap() > 0.9, "{row}");
        }
    }
    worst
}

#[test]
fn map_recovers_the_adapter_in_rotated_and_permuted_coordinates() {
    check_twin(EQUAL, 3, &[]);
}

#[test]
fn the_inner_fit_and_the_token_map_alone_are_exact_on_the_twin_too() {
    check_twin(EQUAL, 6, &["--map-inner", "fit"]);
    check_twin(EQUAL, 7, &["--map-residual", "tokens"]);
}

#[test]
fn the_per_layer_refit_repairs_a_token_map_that_does_not_fit() {
    // Noisy target embeddings: the shared tokens give a rotated, blurred map; the layers'
    // weights still correspond exactly, and refitting on them recovers most of the loss.
    let noisy = Shape {
        noise: 0.6,
        ..EQUAL
    };
    let tokens = twin_error(noisy, 11, &["--map-residual", "tokens"]);
    let layers = twin_error(noisy, 11, &["--map-residual", "layers"]);
    assert!(
        tokens > 0.05,
        "the noise should spoil the token map ({tokens})"
    );
    assert!(
        layers < 0.5 * tokens,
        "refit {layers} vs tokens alone {tokens}"
    );
}

#[test]
fn map_fits_inside_heads_of_a_different_size() {
    // Each head embedded in a larger one by a semi-orthogonal map (q·k and o·v unchanged).
    let shape = Shape {
        d_t: 40,
        extra: 4,
        hd_t: 12,
        noise: 0.0,
    };
    check_twin(shape, 8, &[]);
    // Moving heads as wholes cannot map between sizes: a clear error, not a wrong adapter.
    let dir = tempfile::tempdir().unwrap();
    write_pair(dir.path(), shape, 8);
    let p = |n: &str| dir.path().join(n);
    let out = loraxfer(&[
        "transfer",
        "--source-base",
        s(&p("source")),
        "--target-base",
        s(&p("target")),
        "--adapter",
        s(&p("adapter")),
        "--out",
        s(&p("out")),
        "--mode",
        "map",
        "--map-inner",
        "index",
        "--device",
        "cpu",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("head_dim 8") && err.contains("12"), "{err}");
}

#[test]
fn map_recovers_the_adapter_on_a_wider_twin_with_dead_neurons() {
    check_twin(
        Shape {
            d_t: 40,
            extra: 8,
            hd_t: HD,
            noise: 0.0,
        },
        4,
        &[],
    );
}

#[test]
fn each_part_of_the_map_is_needed_on_the_twin() {
    // Switching off any one part breaks the exact answer: the test above cannot pass by luck.
    for ablation in [
        &["--map-inner", "index"][..],
        &["--no-norm-fold"][..],
        &["--map-residual", "identity"][..],
    ] {
        let worst = twin_error(EQUAL, 5, ablation);
        assert!(
            worst > 0.1,
            "{ablation:?} still gives the exact adapter ({worst})"
        );
    }
}

/// A pruned sibling: residual dimensions, one query head per KV group and a quarter of the MLP
/// neurons dropped (known index sets, no healing). `map` must find which units were kept.
#[test]
fn map_recovers_the_correspondence_of_a_pruned_sibling() {
    let dir = tempfile::tempdir().unwrap();
    let seed = 9;
    let (src, _) = source_model(seed);
    let mut keep_d: Vec<usize> = perm(D, seed + 1)[..28].to_vec();
    keep_d.sort();
    let mut keep_n: Vec<usize> = perm(INTER, seed + 2)[..36].to_vec();
    keep_n.sort();
    let per_group = HEADS / KV;
    // Group g keeps query head g·per_group + kept[g].
    let kept: Vec<usize> = (0..KV).map(|g| (g + seed as usize) % per_group).collect();
    let keep_q: Vec<usize> = (0..KV).map(|g| g * per_group + kept[g]).collect();
    let rows = |w: &Mat<f32>, units: &[usize], size: usize| {
        Mat::from_fn(units.len() * size, w.ncols(), |i, j| {
            w[(units[i / size] * size + i % size, j)]
        })
    };
    let cols =
        |w: &Mat<f32>, idx: &[usize]| Mat::from_fn(w.nrows(), idx.len(), |i, j| w[(i, idx[j])]);
    let all_kv: Vec<usize> = (0..KV).collect();
    let mut tgt = BTreeMap::new();
    for (name, w) in &src {
        let t = if name.ends_with("norm.weight") || name.contains("embed_tokens") {
            cols(w, &keep_d)
        } else {
            let p = PROJECTIONS.iter().find(|p| name.contains(*p)).unwrap();
            match *p {
                "q_proj" => cols(&rows(w, &keep_q, HD), &keep_d),
                "k_proj" | "v_proj" => cols(&rows(w, &all_kv, HD), &keep_d),
                "gate_proj" | "up_proj" => cols(&rows(w, &keep_n, 1), &keep_d),
                "o_proj" => rows(
                    &cols(
                        w,
                        &(0..HEADS * HD)
                            .filter(|c| keep_q.contains(&(c / HD)))
                            .collect::<Vec<_>>(),
                    ),
                    &keep_d,
                    1,
                ),
                _ => rows(&cols(w, &keep_n), &keep_d, 1),
            }
        };
        tgt.insert(name.clone(), t);
    }
    let (sd, td) = (dir.path().join("source"), dir.path().join("target"));
    write_checkpoint(&sd, &model(D, INTER), &tensors_of(&src), FloatType::F32);
    let mut small = model(28, 36);
    small.heads = KV;
    write_checkpoint(&td, &small, &tensors_of(&tgt), FloatType::F32);
    tokenizer(&sd, &|i| i);
    tokenizer(&td, &|i| i);
    let adapter = dir.path().join("adapter");
    write_source_adapter(&src, &adapter, |_| seed);
    let out = dir.path().join("out");
    map_transfer(&sd, &td, &adapter, &out, &[]);
    let report = read_json(&out.join("transfer_report.json"));
    let (mut hits, mut total) = (0, 0);
    for layer in report["map"]["layers"].as_array().unwrap() {
        let got =
            |k: &str| -> Vec<Option<usize>> { serde_json::from_value(layer[k].clone()).unwrap() };
        for (truth, k) in [
            (&keep_q, "q_heads"),
            (&all_kv, "kv_heads"),
            (&keep_n, "neurons"),
        ] {
            for (g, t) in got(k).iter().zip(truth.iter()) {
                total += 1;
                hits += usize::from(*g == Some(*t));
            }
        }
    }
    let fraction = hits as f64 / total as f64;
    assert!(
        fraction >= 0.95,
        "map recovered {hits} of {total} units ({fraction:.3})"
    );
}
