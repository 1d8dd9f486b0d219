//! Hugging Face tensors llama.cpp's converters split into several GGUF tensors, built back from
//! them as their rows are read: latent attention's `kv_b_proj` ([`super::latent`]) and Qwen3-Next's
//! `in_proj_qkvz` ([`FusedQkvz`]). Each half is dequantized as any tensor is
//! ([`super::QuantizedRows`]); the rows are handed out in f32, NaN and Inf refused.

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;

use super::header::TensorInfo;
use super::latent::JoinedKvB;
use super::names::Family;
use super::{QuantizedRows, Values};
use crate::error::{Error, Result};

/// A tensor built from several of the file's.
#[derive(Debug, Clone)]
pub enum Joined {
    KvB(JoinedKvB),
    Qkvz(FusedQkvz),
}

impl Joined {
    /// The Hugging Face shape.
    pub fn shape(&self) -> [usize; 2] {
        match self {
            Joined::KvB(j) => j.shape(),
            Joined::Qkvz(j) => j.shape(),
        }
    }

    /// The header index of the first of the tensors it is built from (whose type it reports).
    pub fn first(&self) -> usize {
        match self {
            Joined::KvB(j) => j.k_b,
            Joined::Qkvz(j) => j.qkv,
        }
    }

    /// Rows `rows` as f32, row-major.
    pub fn rows(
        &self,
        file: (&[u8], &Path),
        tensors: &[TensorInfo],
        rows: Range<usize>,
    ) -> Result<Vec<f32>> {
        match self {
            Joined::KvB(j) => j.rows(file, tensors, rows),
            Joined::Qkvz(j) => j.rows(file, tensors, rows),
        }
    }
}

/// Every joined tensor of a file of family `f` (by Hugging Face name): each layer's `attn_k_b`
/// with its `attn_v_b` (latent attention), `attn_qkv` with its `attn_gate` (Qwen3-Next).
pub fn all(
    f: &Family,
    tensors: &[TensorInfo],
    config: &serde_json::Value,
    path: &Path,
) -> Result<HashMap<String, Joined>> {
    let index: HashMap<&str, usize> = (tensors.iter().enumerate())
        .map(|(i, t)| (t.name.as_str(), i))
        .collect();
    let mut out = HashMap::new();
    for (i, t) in tensors.iter().enumerate() {
        let is = |module: &str| t.name.starts_with("blk.") && t.name.ends_with(module);
        let (name, joined) = if f.latent_attention && is(".attn_k_b.weight") {
            let (name, j) = JoinedKvB::find((tensors, &index), i, config, path)?;
            (name, Joined::KvB(j))
        } else if f.fused_linear_attention && is(".attn_qkv.weight") {
            let (name, j) = FusedQkvz::find((tensors, &index), i, config, path)?;
            (name, Joined::Qkvz(j))
        } else {
            continue;
        };
        out.insert(name, joined);
    }
    Ok(out)
}

/// The layer of header tensor `first` (`blk.<layer>.…`) and the header index of its partner,
/// `blk.<layer>.<partner>.weight`, refused when the file lacks it.
pub(super) fn partner<'t>(
    (tensors, index): (&'t [TensorInfo], &HashMap<&str, usize>),
    first: usize,
    partner: &str,
    path: &Path,
) -> Result<(&'t str, usize)> {
    let t = &tensors[first];
    let layer = t.name.split('.').nth(1).unwrap_or_default();
    let name = format!("blk.{layer}.{partner}.weight");
    let at = *index
        .get(name.as_str())
        .ok_or_else(|| Error::bad_tensor(path, &t.name, format!("is here without `{name}`")))?;
    Ok((layer, at))
}

/// Refuses a part whose GGML dims are not `want` (the config's `what` implies them) or whose type
/// this reader does not dequantize.
pub(super) fn check_part(t: &TensorInfo, want: &[usize], what: &str, path: &Path) -> Result<()> {
    if t.dims == want && t.ty.block().is_some() {
        return Ok(());
    }
    Err(Error::bad_tensor(
        path,
        &t.name,
        format!(
            "dims {:?} of type {}: the metadata's {what} implies {want:?} of a type this reader \
             dequantizes",
            t.dims,
            t.ty.name()
        ),
    ))
}

/// Rows `rows` of header tensor `t`, seen as `all` = (rows, row length), decoded to f32.
pub(super) fn decode(
    (map, path): (&[u8], &Path),
    t: &TensorInfo,
    all: (usize, usize),
    rows: Range<usize>,
) -> Result<Vec<f32>> {
    QuantizedRows::new(
        &map[t.start..t.end],
        t.ty,
        all,
        rows,
        (None, None),
        Values::AsIs,
    )
    .to_vec(path, &t.name)
}

/// Qwen3-Next's `linear_attn.in_proj_qkvz` (`[key_heads·(2·hk + 2·G·hv), hidden]`: per key head its
/// query rows, key rows, its G value heads' rows, their gates' rows), which llama.cpp's converter
/// regroups into `attn_qkv` (every query row, then every key row, then every value row) and
/// `attn_gate` (every gate row).
#[derive(Debug, Clone)]
pub struct FusedQkvz {
    /// Header indices of `attn_qkv` and `attn_gate`.
    pub qkv: usize,
    pub gate: usize,
    pub key_heads: usize,
    /// Rows of a key head's query (and key), and of its value heads together (and gates).
    pub key_rows: usize,
    pub value_rows: usize,
    pub hidden: usize,
}

impl FusedQkvz {
    /// The layout of a model's `in_proj_qkvz` (no tensors behind it: `qkv` and `gate` are 0), for
    /// the LoRA writer.
    pub fn of_config(c: &crate::io::checkpoint::ModelConfig) -> Option<Self> {
        let l = c.linear.as_ref()?;
        Some(FusedQkvz {
            qkv: 0,
            gate: 0,
            key_heads: l.key_heads,
            key_rows: l.key_head_dim,
            value_rows: l.value_heads / l.key_heads.max(1) * l.value_head_dim,
            hidden: c.hidden_size,
        })
    }

    /// The Hugging Face rows the file's `attn_qkv` and `attn_gate` hold, in their stored order:
    /// a LoRA's B rows for each of the two tensors.
    pub fn split_rows(&self) -> [Vec<usize>; 2] {
        let (kh, kr, vr) = (self.key_heads, self.key_rows, self.value_rows);
        let mut out = [vec![0; kh * (2 * kr + vr)], vec![0; kh * vr]];
        for row in 0..self.shape()[0] {
            let (gate, at) = self.stored(row);
            out[gate as usize][at] = row;
        }
        out
    }

    pub fn shape(&self) -> [usize; 2] {
        [self.key_heads * self.per_head(), self.hidden]
    }

    fn per_head(&self) -> usize {
        2 * self.key_rows + 2 * self.value_rows
    }

    /// Where Hugging Face row `row` is stored: in `attn_gate` (true) or `attn_qkv`, at which row.
    fn stored(&self, row: usize) -> (bool, usize) {
        let (h, o) = (row / self.per_head(), row % self.per_head());
        let (kh, kr, vr) = (self.key_heads, self.key_rows, self.value_rows);
        match o {
            o if o < kr => (false, h * kr + o),
            o if o < 2 * kr => (false, kh * kr + h * kr + o - kr),
            o if o < 2 * kr + vr => (false, 2 * kh * kr + h * vr + o - 2 * kr),
            o => (true, h * vr + o - 2 * kr - vr),
        }
    }

    /// Rows `rows`, each run of rows stored one after another in one tensor decoded at once.
    pub fn rows(
        &self,
        file: (&[u8], &Path),
        tensors: &[TensorInfo],
        rows: Range<usize>,
    ) -> Result<Vec<f32>> {
        let (kh, kr, vr) = (self.key_heads, self.key_rows, self.value_rows);
        let all = |gate| match gate {
            true => (kh * vr, self.hidden),
            false => (kh * (2 * kr + vr), self.hidden),
        };
        let mut out = Vec::with_capacity(rows.len() * self.hidden);
        let mut row = rows.start;
        while row < rows.end {
            let (gate, start) = self.stored(row);
            let mut end = row + 1;
            while end < rows.end && self.stored(end) == (gate, start + end - row) {
                end += 1;
            }
            let t = &tensors[if gate { self.gate } else { self.qkv }];
            out.extend(decode(file, t, all(gate), start..start + end - row)?);
            row = end;
        }
        Ok(out)
    }

    /// Layer `layer`'s, from the header's `attn_qkv` (index `qkv`) and `attn_gate`, their dims
    /// checked against the config's sizes.
    pub fn find(
        (tensors, index): (&[TensorInfo], &HashMap<&str, usize>),
        qkv: usize,
        config: &serde_json::Value,
        path: &Path,
    ) -> Result<(String, FusedQkvz)> {
        let (layer, gate) = partner((tensors, index), qkv, "attn_gate", path)?;
        let size = |key: &str| config.get(key).and_then(|v| v.as_u64()).unwrap_or(0) as usize;
        let (kh, vh) = (size("linear_num_key_heads"), size("linear_num_value_heads"));
        let j = FusedQkvz {
            qkv,
            gate,
            key_heads: kh,
            key_rows: size("linear_key_head_dim"),
            value_rows: vh / kh.max(1) * size("linear_value_head_dim"),
            hidden: size("hidden_size"),
        };
        let qkv_rows = kh * (2 * j.key_rows + j.value_rows);
        for (i, rows) in [(qkv, qkv_rows), (gate, kh * j.value_rows)] {
            check_part(&tensors[i], &[j.hidden, rows], "linear attention", path)?;
        }
        let name = format!("model.layers.{layer}.linear_attn.in_proj_qkvz.weight");
        Ok((name, j))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every Hugging Face row is stored once, in the converter's order: per key head
    /// `[q, k, v, z]` regrouped into `[q…, k…, v…]` and `[z…]`.
    #[test]
    fn qkvz_rows_are_the_converters_regrouping_undone() {
        let j = FusedQkvz {
            qkv: 0,
            gate: 1,
            key_heads: 3,
            key_rows: 2,
            value_rows: 4,
            hidden: 5,
        };
        // The converter's order, written out: (part, head, offset) → stored.
        let mut want = Vec::new();
        for h in 0..3 {
            want.extend((0..2).map(|o| (false, h * 2 + o)));
            want.extend((0..2).map(|o| (false, 6 + h * 2 + o)));
            want.extend((0..4).map(|o| (false, 12 + h * 4 + o)));
            want.extend((0..4).map(|o| (true, h * 4 + o)));
        }
        let got: Vec<(bool, usize)> = (0..j.shape()[0]).map(|r| j.stored(r)).collect();
        assert_eq!(got, want);
        // The LoRA writer's rows: each tensor's stored rows, back to Hugging Face rows.
        let [qkv, gate] = j.split_rows();
        assert_eq!(qkv.len() + gate.len(), j.shape()[0]);
        for (row, &(g, at)) in want.iter().enumerate() {
            assert_eq!(if g { gate[at] } else { qkv[at] }, row);
        }
    }
}
