//! The checks behind the fuzz targets (`fuzz/fuzz_targets/*.rs`), kept in the library so that the
//! regression tests (`tests/fuzz_regressions.rs`) run exactly the same code on every input a
//! fuzzer ever found. Each function takes arbitrary bytes and panics only on a real defect.

use std::collections::HashSet;
use std::path::Path;

use crate::io::adapter::AdapterConfig;
use crate::io::checkpoint::{parse_index, ModelConfig};
use crate::io::safetensors::{decode_f32, index_header, FloatType};

/// Safetensors header and offsets: refused, or tensors whose ranges lie inside the file and
/// match their shape and dtype.
pub fn safetensors_header(data: &[u8]) {
    if let Ok((entries, _)) = index_header(data) {
        for entry in entries.values() {
            let (start, end) = entry.byte_range();
            assert!(start <= end && end <= data.len(), "range outside the file");
            if let Some(ty) = FloatType::from_dtype(entry.dtype) {
                let numel: usize = entry.shape.iter().product();
                assert_eq!(end - start, numel * ty.size(), "range does not match shape");
                assert_eq!(decode_f32(&data[start..end], ty).len(), numel);
            }
        }
    }
}

/// GGUF header: refused, or tensors whose byte ranges lie inside the file, hold whole blocks of
/// their type, and dequantize (the small ones, to keep each run fast) without a panic.
pub fn gguf_header(data: &[u8]) {
    use crate::io::gguf::{header, quant};
    if let Ok(h) = header::parse(data) {
        for t in &h.tensors {
            assert!(
                t.start <= t.end && t.end <= data.len(),
                "range outside the file"
            );
            if let Some((elems, size)) = t.ty.block() {
                assert_eq!(t.dims[0] % elems, 0, "rows of partial blocks");
                assert_eq!(
                    t.end - t.start,
                    t.numel() / elems * size,
                    "range does not match"
                );
                if t.numel() <= 1 << 16 {
                    let mut out = vec![0f32; t.numel()];
                    quant::dequantize(t.ty, &data[t.start..t.end], &mut out);
                }
            }
        }
    }
}

/// `adapter_config.json`: parse, then ranks, alphas and scales of typical module names.
pub fn adapter_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(c) = AdapterConfig::parse(text, Path::new("adapter_config.json")) {
        for m in [
            "model.layers.0.self_attn.q_proj",
            "model.layers.17.mlp.down_proj",
        ] {
            let r = c.rank_for(m);
            assert!(r > 0, "rank 0 accepted");
            let _ = c.scale(r, c.alpha_for(m));
        }
    }
}

/// `config.json`: parse, pick a table, compute every projection's shape and rows.
pub fn model_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("config.json");
    if let Ok(c) = ModelConfig::parse(text, path) {
        if let Ok(arch) = crate::arch::for_config(&c, path) {
            for m in &arch.modules {
                let (out, inp) = m.shape(&c);
                for &p in &m.parts {
                    let rows = m.rows_of(p, &c).expect("module holds its parts");
                    assert!(rows.end <= out);
                }
                assert!(out.checked_mul(inp).is_some());
            }
        }
    }
}

/// `model.safetensors.index.json`: each tensor once, plain shard file names.
pub fn checkpoint_index(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(entries) = parse_index(text, Path::new("model.safetensors.index.json")) {
        let mut seen = HashSet::new();
        for (tensor, shard) in &entries {
            assert!(seen.insert(tensor), "tensor listed twice");
            assert!(!shard.is_empty() && !shard.contains('/') && shard != "..");
        }
    }
}

/// Architecture tables: a parsed table's module paths parse back.
pub fn arch_table(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(arch) = crate::arch::parse_table(text) {
        let prefix = &arch.layer_prefixes[0];
        for m in &arch.modules {
            let path = arch.module_path(prefix, 3, m);
            let _ = arch.parse_module(prefix, &path);
        }
    }
}

/// `--layer-map` files: a parsed map covers every target layer with existing source layers.
pub fn layer_map(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(map) = crate::plan::layers::parse_layer_map(text, Path::new("map.json"), 28, 24) {
        assert_eq!(map.len(), 24);
        assert!(map.iter().all(|(&j, &i)| j < 24 && i < 28));
    }
}

/// A fuzz check: arbitrary bytes in, a panic only on a defect.
pub type Check = fn(&[u8]);

/// Every check by its fuzz-target name.
pub const TARGETS: &[(&str, Check)] = &[
    ("safetensors_header", safetensors_header),
    ("gguf_header", gguf_header),
    ("adapter_config", adapter_config),
    ("model_config", model_config),
    ("checkpoint_index", checkpoint_index),
    ("arch_table", arch_table),
    ("layer_map", layer_map),
];
