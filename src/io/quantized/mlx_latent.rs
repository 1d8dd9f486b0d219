//! Latent attention's `kv_b_proj` as mlx-lm stores it (its DeepSeek-V3 and GLM-4.7-Flash ports,
//! which Kimi K2 and the other DeepSeek-V3 models share): split per head into two `MultiLinear`
//! weights, `<attention>.embed_q` `[heads, kv_lora_rank, qk_nope]` (each head's key rows,
//! transposed: queries are multiplied into the latent with it) and `<attention>.unembed_out`
//! `[heads, v_head, kv_lora_rank]` (each head's value rows), quantized or not. The Hugging Face
//! weight, `[heads·(qk_nope + v_head), kv_lora_rank]`, holds each head's key rows then its value
//! rows; it is presented under `<attention>.kv_b_proj.weight`, built from the two.

use std::collections::HashMap;
use std::ops::Range;

use super::mlx::Mlx;
use super::packed::{bad, Part};
use crate::error::Result;
use crate::io::safetensors::TensorFile;

/// Which half of `kv_b_proj` a stored MultiLinear holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LatentHalf {
    /// `embed_q`: the keys, `[heads, rank, nope]`.
    Keys,
    /// `unembed_out`: the values, `[heads, v, rank]`.
    Values,
}

impl LatentHalf {
    /// The half a module holds, if it is one (`….self_attn.embed_q`, `….self_attn.unembed_out`).
    pub(super) fn of(module: &str) -> Option<Self> {
        match module.rsplit_once('.')?.1 {
            "embed_q" => Some(LatentHalf::Keys),
            "unembed_out" => Some(LatentHalf::Values),
            _ => None,
        }
    }
}

/// A stored half: which it is, its weight (its heads' rows one after the other) and its heads.
pub(super) type Half = (LatentHalf, Mlx, usize);

/// One attention's `kv_b_proj`, built from its two halves (each a weight whose rows are its
/// heads' rows one after the other).
#[derive(Debug, Clone)]
pub(super) struct Latent {
    keys: Mlx,
    values: Mlx,
    heads: usize,
    nope: usize,
    v: usize,
    rank: usize,
    /// `[heads·(nope + v), rank]`.
    pub(super) shape: [usize; 2],
}

impl Latent {
    /// Pairs each attention's halves (module → (half, weight, heads)) into its `kv_b_proj`,
    /// refusing a half alone and halves whose heads or latent widths disagree.
    pub(super) fn pair(
        halves: HashMap<String, Half>,
        shards: &[TensorFile],
        index: &HashMap<String, usize>,
    ) -> Result<HashMap<String, Latent>> {
        let mut by_attention: HashMap<&str, [Option<&Half>; 2]> = HashMap::new();
        for (module, half) in &halves {
            let (attention, _) = module.rsplit_once('.').expect("a half's name has a dot");
            by_attention.entry(attention).or_default()[half.0 as usize] = Some(half);
        }
        let mut latent = HashMap::new();
        for (attention, found) in by_attention {
            let [Some((_, keys, heads)), Some((_, values, value_heads))] = found else {
                let there = found.iter().flatten().next().expect("one half at least");
                return Err(bad(
                    shards,
                    &there.1.codes,
                    "latent attention's key half (`embed_q`) and value half (`unembed_out`) go \
                     together: the other is missing"
                        .into(),
                ));
            };
            let rank = keys.shape[0] / heads;
            let (nope, v) = (keys.shape[1], values.shape[0] / value_heads);
            if heads != value_heads || values.shape[1] != rank {
                return Err(bad(
                    shards,
                    &values.codes,
                    format!(
                        "{value_heads} heads of [{v}, {}] values beside {heads} heads of keys \
                         [{rank}, {nope}]: the heads and the latent width must agree",
                        values.shape[1]
                    ),
                ));
            }
            let name = format!("{attention}.kv_b_proj.weight");
            if index.contains_key(&name) {
                return Err(bad(
                    shards,
                    &keys.codes,
                    format!("`{name}` is stored both whole and split into its halves"),
                ));
            }
            let shape = [heads * (nope + v), rank];
            let l = Latent {
                keys: keys.clone(),
                values: values.clone(),
                heads: *heads,
                nope,
                v,
                rank,
                shape,
            };
            latent.insert(name, l);
        }
        Ok(latent)
    }

    /// The two stored halves, keys first.
    pub(super) fn halves(&self) -> [&Mlx; 2] {
        [&self.keys, &self.values]
    }

    /// The stored tensors it is built from: each half's codes, scales and biases.
    pub(super) fn stored(&self) -> impl Iterator<Item = &Part> {
        (self.halves().into_iter()).flat_map(|h| h.parts().chain([&h.codes]))
    }

    /// Rows `rows` of `kv_b_proj` as f32: each head's key rows (its `embed_q` matrix's columns)
    /// then its value rows, the halves decoded (and checked for NaN and Inf, naming the stored
    /// tensor, the head and the row and column in it: `….embed_q.weight[3]`) a head at a time.
    pub(super) fn read(&self, rows: Range<usize>, shards: &[TensorFile]) -> Result<Vec<f32>> {
        let (per, rank) = (self.nope + self.v, self.rank);
        let mut out = Vec::with_capacity(rows.len() * rank);
        let heads = rows.start / per..rows.end.div_ceil(per).min(self.heads);
        for h in heads {
            let keys = head(&self.keys, h, rank).values(&named(&self.keys, h), 0..rank, shards)?;
            let values =
                head(&self.values, h, self.v).values(&named(&self.values, h), 0..self.v, shards)?;
            let own = rows.start.max(h * per) - h * per..rows.end.min((h + 1) * per) - h * per;
            for j in own {
                if j < self.nope {
                    out.extend((0..rank).map(|c| keys[c * self.nope + j]));
                } else {
                    let row = j - self.nope;
                    out.extend_from_slice(&values[row * rank..(row + 1) * rank]);
                }
            }
        }
        Ok(out)
    }
}

/// Head `h`'s matrix of a half (its `rows` rows), so that a bad value is placed in it.
fn head(half: &Mlx, h: usize, rows: usize) -> Mlx {
    half.rows_of(h * rows, rows)
}

/// How messages name head `h` of a half: the stored tensor indexed by the head.
fn named(half: &Mlx, h: usize) -> String {
    format!("{}[{h}]", half.codes.name)
}
