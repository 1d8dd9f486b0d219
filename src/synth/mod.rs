//! Synthetic test inputs, made offline: Hugging Face checkpoints with the real shapes of small
//! Qwen2.5 and Llama 3.2 models (or a drifted copy of an existing checkpoint, standing in for a
//! fine-tuned or continued-pretraining relative), and PEFT LoRA adapters for them.
//!
//! Why synthetic: the transfer engine must be tested and benchmarked at real sizes without
//! downloading gigabytes of weights. What matters to it is the shapes, the file layout (names,
//! shards, tied embeddings, biases) and weight spectra that decay like trained weights do, so that
//! truncated SVDs and subspace similarities behave as they do on real models. Every value is a
//! pure function of (seed, preset, tensor name, element index) through the counter-based Philox
//! generator, so the same spec gives byte-identical files on any thread count.

mod adapter;
pub(crate) mod derive;
mod model;
mod presets;
#[cfg(test)]
mod tests;

pub use crate::io::shards::{assign_shards, PlannedTensor, SHARD_LIMIT};
pub use adapter::{write_adapter, AdapterSpec};
pub use model::{model_tensors, write_model, ModelSpec};
pub use presets::{Family, Preset, Shape};

use crate::linalg::philox;

/// Fills `out` with standard normals number `start..start + out.len()` of stream `id`.
///
/// The stream is Philox keyed by `seed`, four normals per counter; element k lives in block k/4,
/// so any slice of the stream can be generated independently (and in parallel) and still agree.
pub(crate) fn fill_normal(seed: u64, id: u64, start: u64, out: &mut [f32]) {
    let mut k = start;
    let mut rest = out;
    while !rest.is_empty() {
        let block = k / 4;
        let lane = (k % 4) as usize;
        let values = philox::gaussian4(seed, id, (block >> 32) as u32, block as u32);
        let take = (4 - lane).min(rest.len());
        rest[..take].copy_from_slice(&values[lane..lane + take]);
        rest = &mut rest[take..];
        k += take as u64;
    }
}

/// Fills `out` with uniforms in (-1, 1), elements `start..` of stream `id` (same layout as
/// [`fill_normal`]).
pub(crate) fn fill_uniform_pm1(seed: u64, id: u64, start: u64, out: &mut [f32]) {
    let mut k = start;
    let mut rest = out;
    while !rest.is_empty() {
        let block = k / 4;
        let lane = (k % 4) as usize;
        let bits = philox::philox4x32_10(
            [
                block as u32,
                (block >> 32) as u32,
                id as u32,
                (id >> 32) as u32,
            ],
            [seed as u32, (seed >> 32) as u32],
        );
        let take = (4 - lane).min(rest.len());
        for (o, &b) in rest[..take].iter_mut().zip(&bits[lane..lane + take]) {
            *o = 2.0 * philox::uniform(b) - 1.0;
        }
        rest = &mut rest[take..];
        k += take as u64;
    }
}

/// The id of one random stream: a hash of its parts, so streams of different tensors, presets
/// and purposes never overlap.
pub(crate) fn stream_id(parts: &[&str]) -> u64 {
    philox::matrix_id(&parts.join("/"))
}
