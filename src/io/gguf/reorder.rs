//! The rows and columns llama.cpp's converters move, and where each Hugging Face row or column
//! lies in the file: Llama-family Q and K rows (each head's two rotary halves interleaved) and
//! Qwen3.5's linear-attention value heads (grouped by key head in Hugging Face order, tiled in the
//! file). The reader undoes them; the LoRA writer applies them to B's rows and A's columns.

use super::names::Family;
use crate::io::checkpoint::ModelConfig;

/// The head counts and sizes a tensor's reorder depends on.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Heads {
    pub heads: usize,
    pub kv_heads: usize,
    /// Linear attention: (key heads, value heads, key head size, value head size).
    pub linear: Option<(usize, usize, usize, usize)>,
}

impl Heads {
    /// From a `config.json` (a GGUF's, built from its metadata): absent or zero counts as 1.
    pub fn from_json(config: &serde_json::Value) -> Self {
        let count = |key: &str| config.get(key).and_then(|v| v.as_u64()).unwrap_or(1) as usize;
        let linear = config.get("linear_num_value_heads").map(|_| {
            let n = |key: &str| count(key).max(1);
            (
                n("linear_num_key_heads"),
                n("linear_num_value_heads"),
                n("linear_key_head_dim"),
                n("linear_value_head_dim"),
            )
        });
        Heads {
            heads: count("num_attention_heads").max(1),
            kv_heads: count("num_key_value_heads").max(1),
            linear,
        }
    }

    /// Linear attention's value heads of `dim` from index `start` on, tiled by the converter
    /// (None without linear attention).
    fn tiled(&self, start: usize, dim: usize) -> Option<Reorder> {
        let (key_heads, value_heads, _, _) = self.linear?;
        Some(Reorder::TiledValueHeads {
            start,
            key_heads,
            per_key: value_heads / key_heads.max(1),
            dim,
        })
    }

    /// From a parsed config (a base the LoRA GGUF is written for).
    pub fn from_config(c: &ModelConfig) -> Self {
        Heads {
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            linear: c
                .linear
                .as_ref()
                .map(|l| (l.key_heads, l.value_heads, l.key_head_dim, l.value_head_dim)),
        }
    }
}

/// A reorder of one dimension of a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reorder {
    /// Llama-family Q and K rows (`LlamaModel.permute`): each of `heads` heads' rows
    /// `[first half; second half]` interleaved, `(h, j, i)` stored at `(h, i, j)`.
    RotaryHalves { heads: usize },
    /// Qwen3.5's value heads (`_reorder_v_heads`): from index `start` on, heads of `dim` indices,
    /// `per_key` value heads for each of `key_heads` key heads; Hugging Face groups them by key
    /// head, `(k, g, d)`, the file tiles them, `(g, k, d)`.
    TiledValueHeads {
        start: usize,
        key_heads: usize,
        per_key: usize,
        dim: usize,
    },
}

impl Reorder {
    /// Where Hugging Face index `i` of a dimension of `len` is stored.
    pub fn stored(self, i: usize, len: usize) -> usize {
        match self {
            Reorder::RotaryHalves { heads } => {
                let d = len / heads;
                let (h, r) = (i / d, i % d);
                let (j, i) = (r / (d / 2), r % (d / 2));
                h * d + 2 * i + j
            }
            Reorder::TiledValueHeads {
                start,
                key_heads,
                per_key,
                dim,
            } => {
                if i < start {
                    return i;
                }
                let (head, d) = ((i - start) / dim, (i - start) % dim);
                let (k, g) = (head / per_key, head % per_key);
                start + (g * key_heads + k) * dim + d
            }
        }
    }

    /// Why a dimension of `len` cannot hold this layout (the file's sizes disagree with the
    /// config's), or None.
    pub fn misfit(self, len: usize) -> Option<String> {
        match self {
            Reorder::RotaryHalves { heads } => heads
                .checked_mul(2)
                .is_none_or(|pair| len % pair != 0)
                .then(|| format!("{len} rows do not split into {heads} heads of an even size")),
            Reorder::TiledValueHeads {
                start,
                key_heads,
                per_key,
                dim,
            } => {
                let want = key_heads
                    .checked_mul(per_key)
                    .and_then(|n| n.checked_mul(dim))
                    .and_then(|n| n.checked_add(start));
                (want != Some(len)).then(|| {
                    format!(
                        "{len} rows or columns, but {key_heads} key heads of {per_key} value \
                         heads of {dim} after {start} make {}",
                        want.map_or("more".to_string(), |n| n.to_string())
                    )
                })
            }
        }
    }
}

/// How the converter reordered the rows of Hugging Face tensor `hf` (None: as Hugging Face
/// stores them).
pub fn rows(f: &Family, hf: &str, h: &Heads) -> Option<Reorder> {
    let ends = |suffixes: &[&str]| suffixes.iter().any(|s| hf.ends_with(s));
    if f.permuted_qk {
        if ends(&["self_attn.q_proj.weight", "self_attn.q_proj.bias"]) {
            return Some(Reorder::RotaryHalves { heads: h.heads });
        }
        if ends(&["self_attn.k_proj.weight", "self_attn.k_proj.bias"]) {
            return Some(Reorder::RotaryHalves { heads: h.kv_heads });
        }
    }
    let (kh, _, kd, vd) = h.linear.filter(|_| f.linear_attention)?;
    // The convolution's channels are `in_proj_qkv`'s rows; the decay and time-step bias have one
    // value per value head, as `in_proj_b` and `in_proj_a` have one row.
    if ends(&[
        "linear_attn.in_proj_qkv.weight",
        "linear_attn.conv1d.weight",
    ]) {
        h.tiled(2 * kh * kd, vd)
    } else if ends(&["linear_attn.in_proj_z.weight"]) {
        h.tiled(0, vd)
    } else if ends(&[
        "linear_attn.in_proj_b.weight",
        "linear_attn.in_proj_a.weight",
        "linear_attn.A_log",
        "linear_attn.dt_bias",
    ]) {
        h.tiled(0, 1)
    } else {
        None
    }
}

/// How the converter reordered the columns of `hf`: Qwen3.5's `out_proj`, whose inputs are the
/// value heads.
pub fn columns(f: &Family, hf: &str, h: &Heads) -> Option<Reorder> {
    let (_, _, _, vd) = h.linear.filter(|_| f.linear_attention)?;
    h.tiled(0, vd)
        .filter(|_| hf.ends_with("linear_attn.out_proj.weight"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The inverse of llama.cpp's `permute`: reshape(heads, 2, d/2, ·).swapaxes(1, 2).
    #[test]
    fn rotary_halves_invert_the_converters_permutation() {
        let (heads, d) = (3, 8);
        let rows = heads * d;
        // The converter's permutation of HF rows 0..rows, written as numpy would.
        let mut permuted = vec![0; rows];
        for h in 0..heads {
            for j in 0..2 {
                for i in 0..d / 2 {
                    // HF (h, j, i) goes to position (h, i, j).
                    permuted[h * d + i * 2 + j] = h * d + j * (d / 2) + i;
                }
            }
        }
        let r = Reorder::RotaryHalves { heads };
        for row in 0..rows {
            assert_eq!(permuted[r.stored(row, rows)], row);
        }
        assert!(r.misfit(rows).is_none() && r.misfit(rows + 2).is_some());
    }

    /// `_reorder_v_heads(x, 0, key_heads, per_key, dim)`: reshape (k, g, d), swap k and g.
    #[test]
    fn tiled_value_heads_are_the_converters_reorder() {
        let (start, kh, per, dim) = (5, 2, 3, 4);
        let len = start + kh * per * dim;
        let r = Reorder::TiledValueHeads {
            start,
            key_heads: kh,
            per_key: per,
            dim,
        };
        // The converter's output, position by position: what HF index each holds.
        let mut tiled = (0..start).collect::<Vec<_>>();
        for g in 0..per {
            for k in 0..kh {
                tiled.extend((0..dim).map(|d| start + (k * per + g) * dim + d));
            }
        }
        for i in 0..len {
            assert_eq!(tiled[r.stored(i, len)], i);
        }
        assert!(r.misfit(len).is_none() && r.misfit(len - 1).is_some());
    }
}
