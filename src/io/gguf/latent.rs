//! Latent attention as llama.cpp stores it (`deepseek2`: DeepSeek-V2/V3, Kimi K2, GLM-4.7-Flash).
//!
//! The converter writes the attention for its absorbed kernel: multi-query attention over the
//! latent (`head_count_kv` 1, `key_length` = kv_lora_rank + rotary width), the heads' own sizes
//! under the `*_mla` keys, and each layer's `kv_b_proj` (`[heads·(nope + v), kv_lora_rank]`, every
//! head's key rows then its value rows) split in two:
//! - `attn_k_b`, `[heads, kv_lora_rank, nope]`: each head's key rows, transposed;
//! - `attn_v_b`, `[heads, v, kv_lora_rank]`: each head's value rows, as they were.
//!
//! The engine decomposes and adapts `kv_b_proj` whole (as PEFT adapts it), so [`JoinedKvB`]
//! builds its rows back from the two on read ([`super::joined`]); the config gets the heads'
//! sizes back from the `*_mla` keys.

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;

use serde_json::{Map, Value as Json};

use super::header::{TensorInfo, Value};
use super::joined::{check_part, decode, partner};
use crate::error::Result;

/// A layer's `kv_b_proj`, joined from the two tensors the converter split it into.
#[derive(Debug, Clone)]
pub struct JoinedKvB {
    /// Header indices of `attn_k_b` and `attn_v_b`.
    pub k_b: usize,
    pub v_b: usize,
    pub heads: usize,
    /// The heads' key rows without rotary (`qk_nope_head_dim`) and value rows (`v_head_dim`).
    pub nope: usize,
    pub v: usize,
    /// `kv_lora_rank`: the row length.
    pub rank: usize,
}

impl JoinedKvB {
    /// The Hugging Face shape: `[heads·(nope + v), kv_lora_rank]`.
    pub fn shape(&self) -> [usize; 2] {
        [self.heads * (self.nope + self.v), self.rank]
    }

    /// Rows `rows` of `kv_b_proj` as f32, row-major: a head's key rows are columns of its block of
    /// `attn_k_b` (the whole block is decoded: `kv_lora_rank × nope` values), its value rows rows
    /// of `attn_v_b`. NaN and Inf are refused, named in the tensor they were read from.
    pub fn rows(
        &self,
        file: (&[u8], &Path),
        tensors: &[TensorInfo],
        rows: Range<usize>,
    ) -> Result<Vec<f32>> {
        let (k_b, v_b) = (&tensors[self.k_b], &tensors[self.v_b]);
        let per = self.nope + self.v;
        let read = |t, all, r| decode(file, t, all, r);
        let mut out = Vec::with_capacity(rows.len() * self.rank);
        let mut keys: Option<(usize, Vec<f32>)> = None;
        for row in rows {
            let (head, i) = (row / per, row % per);
            if i < self.nope {
                if keys.as_ref().map(|k| k.0) != Some(head) {
                    let block = head * self.rank..(head + 1) * self.rank;
                    keys = Some((head, read(k_b, (self.heads * self.rank, self.nope), block)?));
                }
                let (_, block) = keys.as_ref().expect("just read");
                out.extend((0..self.rank).map(|c| block[c * self.nope + i]));
            } else {
                let at = head * self.v + (i - self.nope);
                out.extend(read(v_b, (self.heads * self.v, self.rank), at..at + 1)?);
            }
        }
        Ok(out)
    }
}

impl JoinedKvB {
    /// Layer `layer`'s, from the header's `attn_k_b` (index `i`) and `attn_v_b`, their dims
    /// checked against the config's sizes.
    pub fn find(
        (tensors, index): (&[TensorInfo], &HashMap<&str, usize>),
        i: usize,
        config: &Json,
        path: &Path,
    ) -> Result<(String, JoinedKvB)> {
        let (layer, v_b) = partner((tensors, index), i, "attn_v_b", path)?;
        let size = |key: &str| config.get(key).and_then(Json::as_u64).unwrap_or(0) as usize;
        let joined = JoinedKvB {
            k_b: i,
            v_b,
            heads: size("num_attention_heads"),
            nope: size("qk_nope_head_dim"),
            v: size("v_head_dim"),
            rank: size("kv_lora_rank"),
        };
        let (h, r) = (joined.heads, joined.rank);
        for (at, want) in [(i, [joined.nope, r, h]), (v_b, [r, joined.v, h])] {
            check_part(&tensors[at], &want, "latent attention", path)?;
        }
        let name = format!("model.layers.{layer}.self_attn.kv_b_proj.weight");
        Ok((name, joined))
    }
}

/// The config fields of latent attention, from the converter's keys (`arch.` prefixed): the
/// heads' sizes, every head with its own keys and values, and DeepSeek's router fields; the model
/// DeepSeek-V3's where the router has a bias (`exp_probs_b`) or gates by sigmoid, else V2's.
pub fn config(
    arch: &str,
    metadata: &HashMap<String, Value>,
    tensors: &[TensorInfo],
    obj: &mut Map<String, Json>,
) -> std::result::Result<(), String> {
    let get = |k: &str| metadata.get(&format!("{arch}.{k}"));
    let int = |k: &str| -> std::result::Result<u64, String> {
        get(k)
            .and_then(Value::as_u64)
            .ok_or_else(|| format!("metadata `{arch}.{k}` is missing or not an integer"))
    };
    let rope = int("rope.dimension_count")?;
    // Conversions before the split gave the heads' sizes under the plain keys.
    let key = int("attention.key_length_mla").or_else(|_| int("attention.key_length"))?;
    let value = int("attention.value_length_mla").or_else(|_| int("attention.value_length"))?;
    if key <= rope {
        return Err(format!(
            "metadata: a key head of {key} holds no more than its {rope} rotary dimensions"
        ));
    }
    let heads = obj
        .get("num_attention_heads")
        .cloned()
        .unwrap_or(Json::Null);
    obj.insert("num_key_value_heads".into(), heads);
    obj.insert("kv_lora_rank".into(), int("attention.kv_lora_rank")?.into());
    obj.insert(
        "q_lora_rank".into(),
        int("attention.q_lora_rank").map_or(Json::Null, Json::from),
    );
    obj.insert("qk_nope_head_dim".into(), (key - rope).into());
    obj.insert("qk_rope_head_dim".into(), rope.into());
    obj.insert("v_head_dim".into(), value.into());
    // transformers' DeepSeek configs: head_dim is the rotary width.
    obj.insert("head_dim".into(), rope.into());
    for (field, k) in [
        ("n_group", "expert_group_count"),
        ("topk_group", "expert_group_used_count"),
    ] {
        if let Ok(v) = int(k) {
            obj.insert(field.into(), v.into());
        }
    }
    // The converter writes these two only where they change the routing (a scale, a norm that is
    // on); absent, llama.cpp neither scales nor normalizes, whatever transformers' defaults say.
    let scale = get("expert_weights_scale").and_then(Value::as_f64);
    obj.insert("routed_scaling_factor".into(), scale.unwrap_or(1.0).into());
    let norm = matches!(get("expert_weights_norm"), Some(Value::Bool(true)));
    obj.insert("norm_topk_prob".into(), norm.into());
    // transformers' DeepSeek models know dense layers only by `first_k_dense_replace`, which the
    // converter takes from a field GLM-4.7-Flash's config may leave out: the leading layers
    // without a router (`mlp_only_layers`, from the tensors) say it.
    let dense = obj.get("mlp_only_layers").and_then(Json::as_array);
    let leading = dense.map_or(0, |d| {
        (d.iter().enumerate())
            .take_while(|(i, l)| l.as_u64() == Some(*i as u64))
            .count()
    });
    if dense.is_some_and(|d| d.len() == leading) {
        obj.insert("first_k_dense_replace".into(), leading.into());
    }
    // llama.cpp's gating functions: 1 softmax, 2 sigmoid.
    let biased = tensors
        .iter()
        .any(|t| t.name.ends_with(".exp_probs_b.bias"));
    if !biased && int("expert_gating_func") != Ok(2) {
        obj.insert("model_type".into(), "deepseek_v2".into());
        obj.insert("architectures".into(), vec!["DeepseekV2ForCausalLM"].into());
        // DeepSeek-V2 routes within groups of experts (V2-Lite has one group), as its checkpoint
        // says (transformers ranks the groups by their best score, as V2's own code does; V3's
        // routing always works by groups).
        if int("expert_group_count").is_ok_and(|n| n > 1) {
            obj.insert("topk_method".into(), "group_limited_greedy".into());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::gguf::header::{parse, tests::image};

    /// `attn_k_b` and `attn_v_b` as the converter writes them from a `kv_b_proj` whose value at
    /// (row, column) is `1000·row + column`: the joined rows are that `kv_b_proj`, in any range.
    #[test]
    fn joined_rows_are_the_tensor_the_converter_split() {
        let (heads, nope, v, rank) = (3usize, 4usize, 5usize, 6usize);
        let per = nope + v;
        let kv_b = |row: usize, col: usize| (1000 * row + col) as f32;
        // `image` fills each tensor with 0, 1, 2, …; the bytes are then rewritten.
        let dims = |d: [usize; 3]| d.iter().map(|&x| x as u64).collect::<Vec<u64>>();
        let mut img = image(
            &[],
            &[
                ("blk.0.attn_k_b.weight", dims([nope, rank, heads])),
                ("blk.0.attn_v_b.weight", dims([rank, v, heads])),
            ],
        );
        let header = parse(&img).unwrap();
        let mut write = |t: &TensorInfo, values: Vec<f32>| {
            for (i, x) in values.iter().enumerate() {
                img[t.start + 4 * i..t.start + 4 * i + 4].copy_from_slice(&x.to_le_bytes());
            }
        };
        // k_b[h][c][i] = kv_b[h·per + i][c]; v_b[h][j][c] = kv_b[h·per + nope + j][c].
        let k_b = (0..heads * rank * nope)
            .map(|x| (x / (rank * nope), x / nope % rank, x % nope))
            .map(|(h, c, i)| kv_b(h * per + i, c))
            .collect();
        let v_b = (0..heads * v * rank)
            .map(|x| (x / (v * rank), x / rank % v, x % rank))
            .map(|(h, j, c)| kv_b(h * per + nope + j, c))
            .collect();
        write(&header.tensors[0], k_b);
        write(&header.tensors[1], v_b);
        let config = serde_json::json!({
            "num_attention_heads": heads, "qk_nope_head_dim": nope, "v_head_dim": v,
            "kv_lora_rank": rank,
        });
        let path = Path::new("m.gguf");
        let index = [("blk.0.attn_k_b.weight", 0), ("blk.0.attn_v_b.weight", 1)].into();
        let tensors = (&header.tensors[..], &index);
        let (name, j) = JoinedKvB::find(tensors, 0, &config, path).unwrap();
        assert_eq!(name, "model.layers.0.self_attn.kv_b_proj.weight");
        assert_eq!(j.shape(), [heads * per, rank]);
        for range in [0..heads * per, 2..3, 7..12, 13..heads * per] {
            let got = j
                .rows((&img, path), &header.tensors, range.clone())
                .unwrap();
            let want: Vec<f32> = range
                .flat_map(|r| (0..rank).map(move |c| kv_b(r, c)))
                .collect();
            assert_eq!(got, want);
        }
        // Dims that disagree with the config are refused, naming the tensor.
        let wrong = serde_json::json!({
            "num_attention_heads": heads, "qk_nope_head_dim": nope, "v_head_dim": v + 1,
            "kv_lora_rank": rank,
        });
        let e = JoinedKvB::find(tensors, 0, &wrong, path)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("blk.0.attn_v_b.weight") && e.contains("implies"),
            "{e}"
        );
    }
}
