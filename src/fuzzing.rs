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

/// A GGUF file, read as the engine reads one: refused, or a header whose tensors lie inside the
/// file and hold whole blocks of their type, then (if the metadata describes a model) a
/// checkpoint whose config passes `config.json`'s checks, whose small tensors read back with the
/// lengths their shapes give (NaN and Inf refused, never a panic), and whose vocabulary is
/// refused or read.
pub fn gguf_header(data: &[u8]) {
    use crate::io::gguf::{header, quant, GgufModel};
    let Ok(h) = header::parse(data) else {
        return;
    };
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
    let path = Path::new("fuzz.gguf");
    let Ok(model) = GgufModel::from_vec(path, data.to_vec()) else {
        return;
    };
    let _ = model.vocab();
    let Ok(ckpt) = crate::io::checkpoint::Checkpoint::from_gguf(model) else {
        return;
    };
    if let Ok(arch) = crate::arch::for_config(&ckpt.config, path) {
        for m in &arch.modules {
            let (out, inp) = m.shape(&ckpt.config);
            assert!(out.checked_mul(inp).is_some());
        }
    }
    let mut names: Vec<String> = ckpt.names().map(str::to_string).collect();
    names.sort();
    for name in names {
        let shape = ckpt
            .shape(&name)
            .expect("a listed tensor has a shape")
            .to_vec();
        let numel: usize = shape.iter().product();
        if numel > 1 << 16 {
            continue;
        }
        let rows = shape[0];
        if let Ok(values) = ckpt.read_rows_f32(&name, 0..rows) {
            assert_eq!(values.len(), numel, "{name}: rows read");
        }
        if let Ok((bytes, ty, cols)) = ckpt.rows_raw(&name, 0..rows) {
            assert_eq!(cols * rows, numel, "{name}: row length");
            assert_eq!(bytes.len(), numel * ty.size(), "{name}: bytes read");
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
            let expert = m.expert.then_some(5);
            let path = arch.module_path(prefix, 3, expert, m);
            // A name parses as a module of the table that names it so (another module's key may
            // spell the same name in a table nobody should write; the name still round-trips).
            let parsed = arch.parse_module(prefix, &path);
            assert!(
                parsed.is_some_and(|(l, e, p)| arch.module_path(prefix, l, e, p) == path),
                "{path} does not parse back"
            );
        }
    }
}

/// `--layer-map` files: a parsed map names only existing target layers, each with an existing
/// source layer (the target layers it leaves out keep the default pairing).
pub fn layer_map(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(map) = crate::plan::layers::parse_layer_map(text, Path::new("map.json"), 28, 24) {
        assert!(map.len() <= 24);
        assert!(map.iter().all(|(&j, &i)| j < 24 && i < 28));
    }
}

/// `tokenizer.json` files, read as the map mode reads one: refused (naming the file), or a
/// vocabulary of a sane size whose spellings pair with themselves, token for token.
pub fn tokenizer(data: &[u8]) {
    use crate::map::vocab::{shared_tokens, Vocab, MAX_VOCAB};
    let Ok(json) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let path = Path::new("m/tokenizer.json");
    match Vocab::from_json(&json, path) {
        Err(e) => assert!(e.to_string().contains("m/tokenizer.json"), "{e}"),
        Ok(vocab) => {
            let n = vocab.surfaces.len();
            assert!(n <= MAX_VOCAB, "a vocabulary of {n} tokens was accepted");
            // Paired with itself, each spelled token meets its own id or a twin spelled alike.
            let rows = n.min(4096);
            for (s, t) in shared_tokens(&vocab, &vocab, (rows, rows)) {
                assert!(s < rows && t < rows);
                assert_eq!(vocab.surfaces[s], vocab.surfaces[t]);
            }
        }
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
    ("tokenizer", tokenizer),
];
