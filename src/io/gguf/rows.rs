//! The rows of a GGUF tensor that cannot be handed out as stored (quantized, or with reordered
//! rows or columns, or changed values), decoded on request. The CPU's products read a weight a
//! band of rows at a time, so through [`QuantizedRows`] a quantized weight is never decoded whole:
//! a 70B model's MLP weight is 940 MB in f32, once per thread decomposing one.

use std::ops::Range;
use std::path::Path;

use rayon::prelude::*;

use super::quant::{self, GgmlType};
use super::reorder::Reorder;
use crate::error::Result;
use crate::io::safetensors::{check_finite, FloatType};

/// Values decoded per parallel task.
const CHUNK_ELEMS: usize = 1 << 16;

/// Rows `first..first + rows` of a tensor, decoded to f32 on request.
#[derive(Debug, Clone, Copy)]
pub struct QuantizedRows<'a> {
    /// The tensor's bytes as stored.
    data: &'a [u8],
    ty: GgmlType,
    /// The whole tensor's rows (a reorder runs over them) and row length.
    all_rows: usize,
    cols: usize,
    first: usize,
    rows: usize,
    /// How the converter reordered the rows (Llama's q and k; Qwen3.5's value heads), and the
    /// columns (Qwen3.5's `out_proj`), if it did.
    row_order: Option<Reorder>,
    column_order: Option<Reorder>,
    /// What the converter did to the values.
    values: Values,
}

/// How a tensor's values are stored, and so how they are read back.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Values {
    /// As Hugging Face stores them.
    AsIs,
    /// Norm gains stored as g + shift (Gemma's, Qwen3.5's): the shift is taken off.
    Shifted(f32),
    /// Linear attention's decay stored as a = −exp(A_log) (Qwen3.5, Qwen3-Next): read as
    /// ln(−a). A stored value that is not negative reads as NaN, which the readers refuse.
    NegatedExp,
}

impl Values {
    fn undo(self, out: &mut [f32]) {
        match self {
            Values::AsIs => {}
            Values::Shifted(shift) => out.iter_mut().for_each(|v| *v -= shift),
            Values::NegatedExp => out.iter_mut().for_each(|v| *v = (-*v).ln()),
        }
    }
}

impl<'a> QuantizedRows<'a> {
    /// `data`: the tensor's bytes, of a type with a block layout (checked by the caller).
    pub(crate) fn new(
        data: &'a [u8],
        ty: GgmlType,
        (all_rows, cols): (usize, usize),
        rows: Range<usize>,
        (row_order, column_order): (Option<Reorder>, Option<Reorder>),
        values: Values,
    ) -> Self {
        QuantizedRows {
            data,
            ty,
            all_rows,
            cols,
            first: rows.start,
            rows: rows.len(),
            row_order,
            column_order,
            values,
        }
    }

    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// Rows `r` of these rows, as rows of their own.
    pub fn subrows(&self, r: Range<usize>) -> Self {
        assert!(r.end <= self.rows, "rows {r:?} of {}", self.rows);
        QuantizedRows {
            first: self.first + r.start,
            rows: r.len(),
            ..*self
        }
    }

    /// Where row `i` of these rows lies in the file, in rows.
    fn stored_row(&self, i: usize) -> usize {
        let row = self.first + i;
        self.row_order
            .map_or(row, |order| order.stored(row, self.all_rows))
    }

    /// Rows `r` of these rows (0 is the first) into `out`, row-major (`r.len() × cols`).
    pub fn decode(&self, r: Range<usize>, out: &mut [f32]) {
        let cols = self.cols;
        assert_eq!(out.len(), r.len() * cols, "a band's values");
        if self.row_order.is_none() {
            // Consecutive rows are consecutive in the file: one span.
            let start = (self.first + r.start) * cols;
            self.decode_span(start..start + r.len() * cols, out);
        } else {
            for (i, o) in r.zip(out.chunks_exact_mut(cols.max(1))) {
                let stored = self.stored_row(i);
                self.decode_span(stored * cols..(stored + 1) * cols, o);
            }
        }
        if let Some(order) = self.column_order {
            let mut stored = vec![0f32; cols];
            for row in out.chunks_exact_mut(cols.max(1)) {
                stored.copy_from_slice(row);
                for (c, v) in row.iter_mut().enumerate() {
                    *v = stored[order.stored(c, cols)];
                }
            }
        }
        self.values.undo(out);
    }

    /// Columns `c` of row `i` into `out` (`c.len()` values).
    pub fn decode_part(&self, i: usize, c: Range<usize>, out: &mut [f32]) {
        if self.column_order.is_some() {
            // Reordered columns are scattered over the row: the whole row, then the part.
            let mut row = vec![0f32; self.cols];
            self.decode(i..i + 1, &mut row);
            out.copy_from_slice(&row[c]);
            return;
        }
        let start = self.stored_row(i) * self.cols;
        self.decode_span(start + c.start..start + c.end, out);
        self.values.undo(out);
    }

    /// Elements `span` of the tensor into `out`: straight from the bytes when the span starts
    /// and ends on block boundaries (every row does when the row length is a multiple of the
    /// block, as GGUF writers make it), else through the blocks that hold it.
    fn decode_span(&self, span: Range<usize>, out: &mut [f32]) {
        let (elems, size) = self.ty.block().expect("checked by the caller");
        let (b0, b1) = (span.start / elems, span.end.div_ceil(elems));
        let bytes = &self.data[b0 * size..b1 * size];
        if span.start % elems == 0 && span.end % elems == 0 {
            quant::dequantize(self.ty, bytes, out);
            return;
        }
        let mut blocks = vec![0f32; (b1 - b0) * elems];
        quant::dequantize(self.ty, bytes, &mut blocks);
        let skip = span.start - b0 * elems;
        out.copy_from_slice(&blocks[skip..skip + span.len()]);
    }

    /// Rows per parallel task: about [`CHUNK_ELEMS`] values, at least one row.
    fn rows_per_task(&self) -> usize {
        (CHUNK_ELEMS / self.cols.max(1)).max(1)
    }

    /// Every row, decoded on every core.
    pub fn decode_all(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        let per_task = self.rows_per_task();
        out.par_chunks_mut((per_task * self.cols).max(1))
            .enumerate()
            .for_each(|(k, o)| {
                let start = k * per_task;
                self.decode(start..start + o.len() / self.cols.max(1), o)
            });
        out
    }

    /// Every row, decoded on every core; NaN and Inf refused (the error names `path`, `name`,
    /// the row and the column).
    pub fn to_vec(&self, path: &Path, name: &str) -> Result<Vec<f32>> {
        let out = self.decode_all();
        check_finite(
            path,
            name,
            bytemuck::cast_slice(&out),
            FloatType::F32,
            self.first,
            self.cols,
        )
        .map_err(|e| self.explained(e))?;
        Ok(out)
    }

    /// A refusal of a decay whose stored value is not negative says why it is NaN here.
    fn explained(&self, e: crate::error::Error) -> crate::error::Error {
        match (self.values, e) {
            (
                Values::NegatedExp,
                crate::error::Error::BadTensor {
                    path,
                    tensor,
                    reason,
                },
            ) => crate::error::Error::BadTensor {
                path,
                tensor,
                reason: format!(
                    "{reason}: the file stores the decay as −exp(A_log), so a stored value that \
                     is not negative has no A_log"
                ),
            },
            (_, e) => e,
        }
    }

    /// Refuses NaN and Inf as [`QuantizedRows::to_vec`] does, decoding a task's rows at a time
    /// and keeping nothing: the check before the rows are handed out to be decoded as read.
    pub fn check_finite(&self, path: &Path, name: &str) -> Result<()> {
        let per_task = self.rows_per_task();
        let tasks = self.rows.div_ceil(per_task);
        // Every task's verdict, so the error names the first bad value whatever the thread
        // count, as `to_vec`'s does.
        let verdicts: Vec<Result<()>> = (0..tasks)
            .into_par_iter()
            .map_init(Vec::new, |buf, k| {
                let r = k * per_task..((k + 1) * per_task).min(self.rows);
                buf.resize(r.len() * self.cols, 0.0);
                self.decode(r.clone(), buf);
                check_finite(
                    path,
                    name,
                    bytemuck::cast_slice(buf.as_slice()),
                    FloatType::F32,
                    self.first + r.start,
                    self.cols,
                )
            })
            .collect();
        verdicts
            .into_iter()
            .collect::<Result<()>>()
            .map_err(|e| self.explained(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linalg::philox::gaussian_matrix;

    /// Q8_0 blocks of `values` (a multiple of 32): per block an f16 scale, then 32 int8.
    fn q8_0(values: &[f32]) -> Vec<u8> {
        let mut out = Vec::new();
        for block in values.chunks(32) {
            let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = half::f16::from_f32(amax / 127.0);
            let inv = if d.to_f32() > 0.0 {
                1.0 / d.to_f32()
            } else {
                0.0
            };
            out.extend_from_slice(&d.to_bits().to_le_bytes());
            out.extend(
                block
                    .iter()
                    .map(|v| (v * inv).round().clamp(-127.0, 127.0) as i8 as u8),
            );
        }
        out
    }

    #[test]
    fn bands_decode_as_the_whole_tensor_does() {
        let seed = crate::linalg::fresh_seed();
        // Rows of 96 values (3 blocks) and of 40 (rows straddle blocks); 8 rotary heads of 6
        // rows, or 6 value heads of 6 rows after 12, tiled by 3 key heads; value heads across
        // the columns too.
        let tiled = |start, key_heads, per_key, dim| Reorder::TiledValueHeads {
            start,
            key_heads,
            per_key,
            dim,
        };
        for (cols, stream, across) in [
            (96usize, 0u64, tiled(0, 2, 3, 16)),
            (40, 1, tiled(4, 3, 2, 6)),
        ] {
            let all_rows = 48;
            let m = gaussian_matrix(seed, stream, all_rows, cols);
            let values: Vec<f32> = (0..all_rows)
                .flat_map(|i| (0..cols).map(move |j| (i, j)))
                .map(|(i, j)| m[(i, j)])
                .collect();
            let data = q8_0(&values);
            let mut whole = vec![0f32; values.len()];
            quant::dequantize(GgmlType::Q8_0, &data, &mut whole);
            let rotary = Some(Reorder::RotaryHalves { heads: 8 });
            let value_heads = Some(tiled(12, 3, 2, 6));
            for (order, shift) in [
                ((None, None), 0.0f32),
                ((rotary, None), 0.0),
                ((None, None), 1.0),
                ((value_heads, None), 0.0),
                ((None, Some(across)), 0.0),
                ((value_heads, Some(across)), 1.0),
            ] {
                let rows = 5..41;
                let q = QuantizedRows::new(
                    &data,
                    GgmlType::Q8_0,
                    (all_rows, cols),
                    rows.clone(),
                    order,
                    Values::Shifted(shift),
                );
                // The reference: each wanted value at its stored row and column, from the whole
                // tensor.
                let want = |i: usize| -> Vec<f32> {
                    let row = rows.start + i;
                    let stored = order.0.map_or(row, |o| o.stored(row, all_rows));
                    (0..cols)
                        .map(|c| order.1.map_or(c, |o| o.stored(c, cols)))
                        .map(|c| whole[stored * cols + c] - shift)
                        .collect()
                };
                let all = q.decode_all();
                for (i, got) in all.chunks(cols).enumerate() {
                    assert_eq!(got, want(i).as_slice(), "row {i} of {order:?}, {cols}");
                }
                for band in [0..1, 3..17, 30..36] {
                    let mut out = vec![0f32; band.len() * cols];
                    q.decode(band.clone(), &mut out);
                    assert_eq!(out, all[band.start * cols..band.end * cols]);
                    assert_eq!(q.subrows(band.clone()).decode_all(), out);
                }
                let mut part = vec![0f32; 13];
                q.decode_part(9, 27..40, &mut part);
                assert_eq!(part, all[9 * cols + 27..9 * cols + 40]);
                assert!(q.check_finite(Path::new("m.gguf"), "w").is_ok());
            }
        }
    }

    /// Linear attention's decay, stored as −exp(A_log): read back as A_log, in the rows' order;
    /// a stored value that is not negative is refused, naming its row.
    #[test]
    fn a_decay_stored_as_its_negated_exponential_reads_back() {
        let a_log = [0.25f32, -1.5, 2.0, 0.0, -0.75, 1.25];
        let stored: Vec<f32> = a_log.iter().map(|&x| -x.exp()).collect();
        let data: &[u8] = bytemuck::cast_slice(&stored);
        let heads = Some(Reorder::TiledValueHeads {
            start: 0,
            key_heads: 2,
            per_key: 3,
            dim: 1,
        });
        for order in [None, heads] {
            let q = QuantizedRows::new(
                data,
                GgmlType::F32,
                (6, 1),
                0..6,
                (order, None),
                Values::NegatedExp,
            );
            let got = q.to_vec(Path::new("m.gguf"), "a").unwrap();
            for (i, v) in got.iter().enumerate() {
                let row = order.map_or(i, |o| o.stored(i, 6));
                assert!(
                    (v - a_log[row]).abs() <= 1e-6,
                    "row {i}: {v} vs {}",
                    a_log[row]
                );
            }
        }
        let mut bad = stored.clone();
        bad[4] = 0.5;
        let q = QuantizedRows::new(
            bytemuck::cast_slice(&bad),
            GgmlType::F32,
            (6, 1),
            0..6,
            (None, None),
            Values::NegatedExp,
        );
        let err = q
            .check_finite(Path::new("m.gguf"), "a")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("row 4") && err.contains("−exp(A_log)"),
            "{err}"
        );
        let to_vec = q.to_vec(Path::new("m.gguf"), "a").unwrap_err().to_string();
        assert_eq!(to_vec, err);
    }

    #[test]
    fn a_non_finite_scale_is_refused_naming_its_row() {
        let values = vec![0.5f32; 10 * 64];
        let mut data = q8_0(&values);
        // Row 7's second block: its scale becomes +Inf.
        let block = 7 * 2 + 1;
        data[block * 34..block * 34 + 2]
            .copy_from_slice(&half::f16::INFINITY.to_bits().to_le_bytes());
        let q = QuantizedRows::new(
            &data,
            GgmlType::Q8_0,
            (10, 64),
            2..10,
            (None, None),
            Values::AsIs,
        );
        let err = q
            .check_finite(Path::new("m.gguf"), "blk.0.w")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("m.gguf") && err.contains("blk.0.w") && err.contains("row 7"),
            "{err}"
        );
        assert_eq!(
            q.to_vec(Path::new("m.gguf"), "blk.0.w")
                .unwrap_err()
                .to_string(),
            err
        );
    }
}
