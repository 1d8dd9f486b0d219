//! The twins of `tests/map_hybrid.rs`: a source (Qwen3.5, or Qwen3) and a Qwen3.5 target that
//! computes what the source computes in other coordinates, layer by layer from a chosen source
//! layer, with what the map must recover of the correspondence.

use std::collections::BTreeMap;
use std::path::Path;

use crate::common::*;
use faer::Mat;
use loraxfer::io::safetensors::{pt_metadata, write_file, FloatType, OutTensor};

pub const D: usize = 32;
pub const HEADS: usize = 4;
pub const KV: usize = 2;
pub const HD: usize = 8;
pub const INTER: usize = 48;
/// The source's depth.
pub const LAYERS: usize = 4;
pub const VOCAB: usize = 200;
/// Linear attention: key heads, value heads, key and value head sizes.
pub const LINEAR: (usize, usize, usize, usize) = (2, 4, 8, 6);

/// Whether the source's layer `l` has softmax attention in Qwen3.5 (1 and 3; the others linear).
pub fn full(l: usize) -> bool {
    l % 2 == 1
}

#[derive(Clone, Copy, PartialEq)]
pub enum Family {
    /// Softmax attention in every layer, an ungated query, norms storing their gains.
    Qwen3,
    /// Hybrid; the gated query twice as tall; norms storing `gain − 1`.
    Qwen3_5,
}

impl Family {
    pub fn gated(self) -> bool {
        self == Family::Qwen3_5
    }

    fn offset(self) -> f32 {
        if self.gated() {
            1.0
        } else {
            0.0
        }
    }
}

/// A model of a pair: its family, and which of its layers have softmax attention as Qwen3.5.
pub struct Model {
    pub family: Family,
    pub full: Vec<bool>,
}

impl Model {
    /// The source: [`LAYERS`] layers, [`full`]'s pattern.
    pub fn source(family: Family) -> Self {
        Model {
            family,
            full: (0..LAYERS).map(full).collect(),
        }
    }

    /// The Qwen3.5 twin whose layer j is source layer `src_of[j]`, of its kind.
    pub fn twin(src_of: &[usize]) -> Self {
        Model {
            family: Family::Qwen3_5,
            full: src_of.iter().map(|&i| full(i)).collect(),
        }
    }

    pub fn softmax(&self, l: usize) -> bool {
        self.family == Family::Qwen3 || self.full[l]
    }

    fn config(&self) -> serde_json::Value {
        let mut c = serde_json::json!({
            "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"],
            "hidden_size": D, "intermediate_size": INTER, "num_hidden_layers": self.full.len(),
            "num_attention_heads": HEADS, "num_key_value_heads": KV, "head_dim": HD,
            "vocab_size": VOCAB, "tie_word_embeddings": true,
        });
        if self.family == Family::Qwen3_5 {
            let (kh, vh, kd, vd) = LINEAR;
            let kinds: Vec<&str> = (self.full.iter())
                .map(|&f| {
                    if f {
                        "full_attention"
                    } else {
                        "linear_attention"
                    }
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
    pub fn projections(&self, l: usize) -> Vec<(&'static str, usize, usize)> {
        let (kh, vh, kd, vd) = LINEAR;
        let q_rows = if self.family.gated() { 2 } else { 1 } * HEADS * HD;
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

    fn write(&self, dir: &Path, tensors: &BTreeMap<String, Mat<f32>>) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("config.json"), self.config().to_string()).unwrap();
        let out: Vec<(String, OutTensor)> = tensors
            .iter()
            .map(|(k, m)| {
                let shape = match m.nrows() == 1 && k.ends_with("norm.weight") {
                    true => vec![m.ncols()],
                    false => vec![m.nrows(), m.ncols()],
                };
                (
                    k.clone(),
                    OutTensor::from_f32(row_major(m), shape, FloatType::F32),
                )
            })
            .collect();
        write_file(&dir.join("model.safetensors"), &out, pt_metadata()).unwrap();
    }
}

/// The correspondence of a source and its twin.
pub struct Twin {
    /// The rotation of the residual stream (d × d, orthogonal).
    pub q: Mat<f32>,
    pub q_heads: Vec<usize>,
    pub kv_heads: Vec<usize>,
    /// Per value coordinate of a softmax head, the sign the twin gives it (v's rows, o's columns).
    pub signs: Vec<f32>,
    pub neurons: Vec<usize>,
    /// Linear attention's key heads and value heads (target → source).
    pub key_heads: Vec<usize>,
    pub value_heads: Vec<usize>,
    /// Effective gains of the source's `input_layernorm` and `post_attention_layernorm`, by layer.
    pub gains: Vec<[Vec<f32>; 2]>,
}

impl Twin {
    /// A source reading weight (or update) of layer `l` as the twin reads: the pre-norm's
    /// gains (`norm` 0 before attention, 1 before the MLP) folded in, then the rotation.
    pub fn read(&self, w: &Mat<f32>, l: usize, norm: usize) -> Mat<f32> {
        let g = &self.gains[l][norm];
        Mat::from_fn(w.nrows(), w.ncols(), |i, j| w[(i, j)] * g[j]) * self.q.transpose()
    }

    /// A source weight (or update) of `key` in layer `l` as the twin holds it; a gated query's
    /// gate rows from `gate` where the source has none (None: zeros).
    pub fn moved(
        &self,
        key: &str,
        w: &Mat<f32>,
        l: usize,
        gated: bool,
        gate: Option<&Mat<f32>>,
    ) -> Mat<f32> {
        let (_, vh, _, vd) = LINEAR;
        let value_rows =
            |m: Mat<f32>| Mat::from_fn(m.nrows(), m.ncols(), |i, j| m[(i, j)] * self.signs[i % HD]);
        match key {
            "self_attn.q_proj" => self.read(&query_heads(w, gated, gate, &self.q_heads), l, 0),
            "self_attn.k_proj" => self.read(&units(w, &|u| self.kv_heads[u], KV, HD), l, 0),
            "self_attn.v_proj" => {
                self.read(&value_rows(units(w, &|u| self.kv_heads[u], KV, HD)), l, 0)
            }
            "self_attn.o_proj" => {
                let moved = units(&w.transpose().to_owned(), &|u| self.q_heads[u], HEADS, HD);
                &self.q * value_rows(moved).transpose()
            }
            "mlp.gate_proj" | "mlp.up_proj" => {
                self.read(&units(w, &|u| self.neurons[u], INTER, 1), l, 1)
            }
            "mlp.down_proj" => &self.q * columns(w, &|u| self.neurons[u], INTER, 1),
            "linear_attn.in_proj_qkv" => {
                self.read(&linear_qkv(w, &self.key_heads, &self.value_heads), l, 0)
            }
            "linear_attn.in_proj_z" => self.read(&units(w, &|u| self.value_heads[u], vh, vd), l, 0),
            "linear_attn.out_proj" => &self.q * columns(w, &|u| self.value_heads[u], vh, vd),
            "linear_attn.in_proj_b" | "linear_attn.in_proj_a" => {
                self.read(&units(w, &|u| self.value_heads[u], vh, 1), l, 0)
            }
            other => panic!("unexpected module {other}"),
        }
    }
}

fn gains_near_one(n: usize, seed: u64, stream: u64) -> Vec<f32> {
    let g = gaussian(1, n, seed, stream);
    (0..n).map(|j| 1.0 + 0.3 * g[(0, j)]).collect()
}

fn row(v: &[f32], offset: f32) -> Mat<f32> {
    Mat::from_fn(1, v.len(), |_, j| v[j] - offset)
}

/// A source model of `family` under `root/source`, and under `root/target` its Qwen3.5 twin whose
/// layer j is source layer `src_of[j]`; with `flip`, half of each softmax head's value
/// coordinates change sign (v's rows and o's columns), which only a head fit follows.
pub fn write_pair(root: &Path, family: Family, src_of: &[usize], flip: bool, seed: u64) -> Twin {
    let (source, target) = (Model::source(family), Model::twin(src_of));
    let mut src = BTreeMap::new();
    let mut tgt = BTreeMap::new();
    let per = HEADS / KV;
    let kv_heads = perm(KV, seed + 1);
    let (kh, vh, _, _) = LINEAR;
    let r = vh / kh;
    // Reversed, so that a key group matched to the wrong one shows.
    let key_heads: Vec<usize> = (0..kh).rev().collect();
    let tok = perm(VOCAB, seed + 6);
    let mut twin = Twin {
        q: gaussian(D, D, seed, 2).qr().compute_thin_Q(),
        q_heads: (0..HEADS)
            .map(|u| kv_heads[u / per] * per + perm(per, seed + 2 + (u / per) as u64)[u % per])
            .collect(),
        kv_heads,
        signs: (0..HD)
            .map(|c| if flip && c % 2 == 1 { -1.0 } else { 1.0 })
            .collect(),
        neurons: perm(INTER, seed + 5),
        value_heads: (0..vh)
            .map(|u| key_heads[u / r] * r + perm(r, seed + 8 + (u / r) as u64)[u % r])
            .collect(),
        key_heads,
        gains: Vec::new(),
    };
    let e = gaussian(VOCAB, D, seed, 1);
    let et = &e * twin.q.transpose();
    src.insert("model.embed_tokens.weight".to_string(), e);
    let source_id = |t: usize| tok.iter().position(|&x| x == t).unwrap();
    tgt.insert(
        "model.embed_tokens.weight".to_string(),
        Mat::from_fn(VOCAB, D, |t, j| et[(source_id(t), j)]),
    );
    let ones = vec![1.0; D];
    src.insert("model.norm.weight".to_string(), row(&ones, family.offset()));
    tgt.insert("model.norm.weight".to_string(), row(&ones, 1.0));
    // Query and key norms: one gain per head coordinate, the same in every head.
    let head_gains = [gains_near_one(HD, seed, 90), gains_near_one(HD, seed, 91)];
    let norms = ["input_layernorm", "post_attention_layernorm"];
    for l in 0..LAYERS {
        let at = format!("model.layers.{l}");
        let g = [100, 101].map(|s| gains_near_one(D, seed, s + 2 * l as u64));
        for (n, norm) in norms.iter().enumerate() {
            src.insert(format!("{at}.{norm}.weight"), row(&g[n], family.offset()));
        }
        for (n, norm) in ["q_norm", "k_norm"].iter().enumerate() {
            if source.softmax(l) {
                let name = format!("{at}.self_attn.{norm}.weight");
                src.insert(name, row(&head_gains[n], family.offset()));
            }
        }
        for (i, (key, out, inp)) in source.projections(l).into_iter().enumerate() {
            let w = gaussian(out, inp, seed, 1000 + 20 * l as u64 + i as u64);
            src.insert(format!("{at}.{key}.weight"), w);
        }
        twin.gains.push(g);
    }
    for (j, &l) in src_of.iter().enumerate() {
        let at = format!("model.layers.{j}");
        for norm in norms {
            tgt.insert(format!("{at}.{norm}.weight"), row(&ones, 1.0));
        }
        for (n, norm) in ["q_norm", "k_norm"].iter().enumerate() {
            if target.softmax(j) {
                let name = format!("{at}.self_attn.{norm}.weight");
                tgt.insert(name, row(&head_gains[n], 1.0));
            }
        }
        // Each weight as the source layer's moved; from Qwen3, the gate rows and linear
        // attention the twin's own (the map reads neither).
        for (i, (key, out, inp)) in target.projections(j).into_iter().enumerate() {
            let own = gaussian(out, inp, seed, 3000 + 20 * j as u64 + i as u64);
            let w = match src.get(&format!("model.layers.{l}.{key}.weight")) {
                Some(w) => twin.moved(key, w, l, family.gated(), Some(&own)),
                None if key == "self_attn.q_proj" => {
                    unreachable!("a softmax twin layer has a softmax source layer")
                }
                None => own,
            };
            tgt.insert(format!("{at}.{key}.weight"), w);
        }
    }
    for (dir, model, tensors, ids) in [
        ("source", &source, &src, None),
        ("target", &target, &tgt, Some(&tok)),
    ] {
        model.write(&root.join(dir), tensors);
        word_level_tokenizer(&root.join(dir), VOCAB, &|i| ids.map_or(i, |t| t[i]));
    }
    twin
}

/// Rows of `w` in units of `size`: unit u takes the source's unit `of(u)`.
pub fn units(w: &Mat<f32>, of: &dyn Fn(usize) -> usize, n: usize, size: usize) -> Mat<f32> {
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

/// Rows of `in_proj_qkv` moved head by head: q's and k's with the key heads, v's with the
/// value heads.
fn linear_qkv(w: &Mat<f32>, key_heads: &[usize], value_heads: &[usize]) -> Mat<f32> {
    let (kh, vh, kd, vd) = LINEAR;
    let block = |start: usize, rows: usize| w.subrows(start, rows).to_owned();
    let q = units(&block(0, kh * kd), &|u| key_heads[u], kh, kd);
    let k = units(&block(kh * kd, kh * kd), &|u| key_heads[u], kh, kd);
    let v = units(&block(2 * kh * kd, vh * vd), &|u| value_heads[u], vh, vd);
    Mat::from_fn(w.nrows(), w.ncols(), |i, j| match i {
        i if i < kh * kd => q[(i, j)],
        i if i < 2 * kh * kd => k[(i - kh * kd, j)],
        i => v[(i - 2 * kh * kd, j)],
    })
}

/// A gated query's rows (per head: HD query rows, HD gate rows) from a source query, moved by
/// `q_heads`; where the source has no gate, the gate rows are `gate`'s (None: zeros).
fn query_heads(w: &Mat<f32>, gated: bool, gate: Option<&Mat<f32>>, q_heads: &[usize]) -> Mat<f32> {
    let size = if gated { 2 * HD } else { HD };
    Mat::from_fn(2 * HEADS * HD, w.ncols(), |i, j| {
        let (u, r) = (i / (2 * HD), i % (2 * HD));
        match (r < HD || gated, gate) {
            (true, _) => w[(q_heads[u] * size + r, j)],
            (false, Some(g)) => g[(u * 2 * HD + r, j)],
            (false, None) => 0.0,
        }
    })
}
