//! Helpers shared by the integration tests: seeded random matrices, planted spectra, exact SVDs,
//! and small checkpoints and adapters written the way Hugging Face and PEFT write them.
#![allow(dead_code)]

pub mod cli;
pub mod moe;
pub mod moe_layers;
pub mod refusals;

use std::collections::BTreeMap;
use std::path::Path;

use faer::Mat;
use loraxfer::io::adapter::{write_adapter, LoraFactors};
use loraxfer::io::safetensors::{pt_metadata, write_file, FloatType, OutTensor};
use loraxfer::linalg::philox::gaussian4;

/// The seven adaptable projections of a decoder layer, unfused.
pub const PROJECTIONS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// The PEFT module name of projection `p` (`q_proj`, …, `down_proj`) in layer `l` of a Llama-
/// style model.
pub fn projection_key(l: usize, p: &str) -> String {
    let block = if matches!(p, "gate_proj" | "up_proj" | "down_proj") {
        "mlp"
    } else {
        "self_attn"
    };
    format!("model.layers.{l}.{block}.{p}")
}

/// The weight shape (out, in) of projection `p` in a layer of width `d` with `heads` query and
/// `kv` key-value heads of size `hd` and an MLP of width `inter`.
pub fn projection_shape(
    p: &str,
    d: usize,
    (heads, kv, hd): (usize, usize, usize),
    inter: usize,
) -> (usize, usize) {
    match p {
        "q_proj" => (heads * hd, d),
        "k_proj" | "v_proj" => (kv * hd, d),
        "o_proj" => (d, heads * hd),
        "down_proj" => (d, inter),
        _ => (inter, d),
    }
}

/// A permutation of 0..n from a seed.
pub fn perm(n: usize, seed: u64) -> Vec<usize> {
    let g = gaussian(n, 1, seed, 77);
    let mut idx: Vec<usize> = (0..n).collect();
    idx.sort_by(|&a, &b| g[(a, 0)].partial_cmp(&g[(b, 0)]).unwrap());
    idx
}

/// A WordLevel `tokenizer.json` in `dir`: token `w{i}` has id `id_of(i)`, for i < vocab.
pub fn word_level_tokenizer(dir: &Path, vocab: usize, id_of: &dyn Fn(usize) -> usize) {
    let vocab: serde_json::Map<String, serde_json::Value> = (0..vocab)
        .map(|i| (format!("w{i}"), id_of(i).into()))
        .collect();
    let json =
        serde_json::json!({"model": {"type": "WordLevel", "vocab": vocab, "unk_token": "w0"}});
    std::fs::write(dir.join("tokenizer.json"), json.to_string()).unwrap();
}

/// A deterministic Gaussian `rows × cols` matrix (stream `stream` of `seed`).
pub fn gaussian(rows: usize, cols: usize, seed: u64, stream: u64) -> Mat<f32> {
    Mat::from_fn(rows, cols, |i, j| {
        gaussian4(seed, stream, i as u32, (j / 4) as u32)[j % 4]
    })
}

/// A fresh seed for a test's random inputs, printed (`LORAXFER_TEST_SEED` repeats one).
#[allow(unused_imports)] // not every test binary draws its own inputs
pub use loraxfer::linalg::fresh_seed;

/// A random `n × k` matrix with orthonormal columns.
pub fn orthonormal(n: usize, k: usize, seed: u64, stream: u64) -> Mat<f32> {
    gaussian(n, k, seed, stream).qr().compute_thin_Q()
}

/// `a · b`.
pub fn mm(a: faer::MatRef<'_, f32>, b: faer::MatRef<'_, f32>) -> Mat<f32> {
    a * b
}

/// W = U diag(σ) Vᵀ with random orthonormal U, V and the given singular values.
pub fn planted(m: usize, n: usize, sigma: &[f32], seed: u64) -> Mat<f32> {
    let k = sigma.len();
    let u = orthonormal(m, k, seed, 1);
    let v = orthonormal(n, k, seed, 2);
    let us = Mat::from_fn(m, k, |i, j| u[(i, j)] * sigma[j]);
    mm(us.as_ref(), v.transpose())
}

/// Row-major copy of a matrix.
pub fn row_major(m: &Mat<f32>) -> Vec<f32> {
    let mut out = Vec::with_capacity(m.nrows() * m.ncols());
    for i in 0..m.nrows() {
        for j in 0..m.ncols() {
            out.push(m[(i, j)]);
        }
    }
    out
}

/// A matrix from row-major data.
pub fn from_row_major(data: &[f32], rows: usize, cols: usize) -> Mat<f32> {
    Mat::from_fn(rows, cols, |i, j| data[i * cols + j])
}

/// Largest absolute entry of `a − b`, NaN when any is not finite (the library's own check).
#[allow(unused_imports)] // not every test binary compares matrices
pub use loraxfer::linalg::max_abs_diff;

/// The larger of two errors, NaN if either is (the library's own): `.fold(0.0, worst)`.
#[allow(unused_imports)] // not every test binary folds errors
pub use loraxfer::linalg::worst;

/// Frobenius norm.
pub fn fro(a: &Mat<f32>) -> f32 {
    let mut s = 0f64;
    for j in 0..a.ncols() {
        for i in 0..a.nrows() {
            s += (a[(i, j)] as f64).powi(2);
        }
    }
    s.sqrt() as f32
}

/// Exact thin SVD (faer), signs canonicalized like the engine: largest |u_i| entry positive.
pub fn exact_svd(w: &Mat<f32>) -> (Mat<f32>, Vec<f32>, Mat<f32>) {
    let svd = w.thin_svd().expect("svd converges");
    let mut u = svd.U().to_owned();
    let mut v = svd.V().to_owned();
    let s: Vec<f32> = (0..u.ncols()).map(|i| svd.S().column_vector()[i]).collect();
    for i in 0..u.ncols() {
        let col = u.col(i);
        let mut best = 0;
        for r in 1..col.nrows() {
            if col[r].abs() > col[best].abs() {
                best = r;
            }
        }
        if col[best] < 0.0 {
            u.col_mut(i).iter_mut().for_each(|x| *x = -*x);
            v.col_mut(i).iter_mut().for_each(|x| *x = -*x);
        }
    }
    (u, s, v)
}

/// Layer-level description of a small checkpoint for [`write_checkpoint`].
pub struct TinyModel {
    pub model_type: &'static str,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// Writes config.json + model.safetensors with the given tensors (name → row-major data, shape).
pub fn write_checkpoint(
    dir: &Path,
    model: &TinyModel,
    tensors: &BTreeMap<String, (Vec<f32>, Vec<usize>)>,
    ty: FloatType,
) {
    std::fs::create_dir_all(dir).unwrap();
    let config = serde_json::json!({
        "model_type": model.model_type,
        "architectures": ["TestForCausalLM"],
        "hidden_size": model.hidden,
        "intermediate_size": model.intermediate,
        "num_hidden_layers": model.layers,
        "num_attention_heads": model.heads,
        "num_key_value_heads": model.kv_heads,
        "head_dim": model.head_dim,
        "vocab_size": 32,
        "torch_dtype": ty.torch_name(),
    });
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&config).unwrap(),
    )
    .unwrap();
    let out: Vec<(String, OutTensor)> = tensors
        .iter()
        .map(|(k, (data, shape))| {
            (
                k.clone(),
                OutTensor::from_f32(data.clone(), shape.clone(), ty),
            )
        })
        .collect();
    write_file(&dir.join("model.safetensors"), &out, pt_metadata()).unwrap();
}

/// Writes a PEFT adapter (config + weights) with per-module factors.
pub fn write_peft(
    dir: &Path,
    base: &str,
    r: usize,
    alpha: f64,
    extra: serde_json::Value,
    modules: &BTreeMap<String, LoraFactors>,
) {
    std::fs::create_dir_all(dir).unwrap();
    let mut config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": r,
        "lora_alpha": alpha,
        "target_modules": modules.keys().map(|k| k.rsplit('.').next().unwrap().to_string()).collect::<std::collections::BTreeSet<_>>(),
        "bias": "none",
        "use_rslora": false,
        "use_dora": false,
        "fan_in_fan_out": false,
        "rank_pattern": {},
        "alpha_pattern": {},
    });
    if let serde_json::Value::Object(extra) = extra {
        for (k, v) in extra {
            config[k] = v;
        }
    }
    let encoded = modules
        .iter()
        .map(|(k, f)| (k.clone(), f.encode()))
        .collect();
    write_adapter(dir, config.as_object().unwrap(), &encoded).unwrap();
}

/// Factors with seeded random A and B.
pub fn random_factors(
    out: usize,
    inp: usize,
    r: usize,
    alpha: f64,
    seed: u64,
    ty: FloatType,
) -> LoraFactors {
    let a = gaussian(r, inp, seed, 11);
    let b = gaussian(out, r, seed, 12);
    LoraFactors {
        a: row_major(&a).iter().map(|x| x * 0.1).collect(),
        b: row_major(&b).iter().map(|x| x * 0.01).collect(),
        r,
        in_features: inp,
        out_features: out,
        alpha,
        ty,
    }
}

/// The CPU reference's randomized SVD of `w` (named `name` for its Ω).
pub fn rsvd_of(
    w: &Mat<f32>,
    name: &str,
    k: usize,
    p: usize,
    q: usize,
    seed: u64,
) -> loraxfer::backend::Basis {
    let data = row_major(w);
    let weight = loraxfer::backend::Weight {
        name,
        data: &data,
        rows: w.nrows(),
        cols: w.ncols(),
    };
    let params = loraxfer::backend::SvdParams {
        rank: k,
        oversample: p,
        power_iters: q,
        seed,
    };
    loraxfer::backend::cpu::rsvd::truncated_svd(
        &weight,
        &params,
        &loraxfer::timing::Timings::default(),
    )
    .unwrap()
}

/// One tensor of a checkpoint, as values.
pub struct Tensor {
    pub name: String,
    pub values: Vec<f32>,
    pub shape: Vec<usize>,
    pub ty: FloatType,
}

/// Rewrites the safetensors file `path` through `edit` on its tensors (as values, each written
/// back in its `ty`).
pub fn rewrite(path: &Path, edit: impl FnOnce(&mut Vec<Tensor>)) {
    let file = loraxfer::io::safetensors::TensorFile::open(path).unwrap();
    let mut tensors: Vec<Tensor> = file
        .names()
        .map(|n| {
            let entry = file.entry(n).unwrap();
            Tensor {
                name: n.to_string(),
                values: file.read_f32(n).unwrap(),
                shape: entry.shape.clone(),
                ty: FloatType::from_dtype(entry.dtype).unwrap(),
            }
        })
        .collect();
    drop(file);
    edit(&mut tensors);
    let out: Vec<(String, OutTensor<'_>)> = tensors
        .into_iter()
        .map(|t| (t.name, OutTensor::from_f32(t.values, t.shape, t.ty)))
        .collect();
    let tmp = path.with_extension("edited");
    write_file(&tmp, &out, pt_metadata()).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A transfer on the CPU with `options`, no cache, no GGUF, no progress.
pub fn cpu_job(
    source: &Path,
    target: &Path,
    adapter: &Path,
    out: &Path,
    options: loraxfer::plan::Options,
) -> loraxfer::transfer::Job {
    loraxfer::transfer::Job {
        hub: Default::default(),
        source_base: source.to_path_buf(),
        target_base: target.to_path_buf(),
        adapter: adapter.to_path_buf(),
        out: out.to_path_buf(),
        options,
        layer_map_file: None,
        device: loraxfer::backend::Device::Cpu,
        cache_dir: None,
        force: false,
        gguf_adapter: false,
        fused_experts: false,
        progress: Default::default(),
    }
}

/// s·B·A of one module of an adapter, as PEFT computes it from the files.
pub fn update_of(adapter: &loraxfer::io::adapter::Adapter, module: &str) -> Mat<f32> {
    let f = adapter.factors(module).unwrap();
    let s = adapter.config.scale(f.r, f.alpha) as f32;
    let b = from_row_major(&f.b, f.out_features, f.r);
    let a = from_row_major(&f.a, f.r, f.in_features);
    let d = mm(b.as_ref(), a.as_ref());
    Mat::from_fn(d.nrows(), d.ncols(), |i, j| d[(i, j)] * s)
}

/// Every module of `names` has the same update in `got` as in `want`, to 1e-6 relative.
pub fn assert_same_updates<'a>(
    want: &loraxfer::io::adapter::Adapter,
    got: &loraxfer::io::adapter::Adapter,
    names: impl IntoIterator<Item = &'a String>,
) {
    for name in names {
        let (w, g) = (update_of(want, name), update_of(got, name));
        let err = fro(&(&g - &w)) / fro(&w);
        assert!(err < 1e-6, "{name}: {err}");
    }
}
