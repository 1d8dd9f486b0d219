//! `export-gguf` on the binary: the llama.cpp LoRA it writes holds the PEFT adapter's update
//! (read back with this crate's GGUF reader, Q and K rows put back in Hugging Face order), and
//! its output is as safe as every other: an existing file is replaced only with --force and only
//! when it is an earlier LoRA GGUF; a base it cannot name is refused before anything is written.
//! (Equality with llama.cpp's own converter: tests/interop/test_gguf_lora.py.)

use std::path::{Path, PathBuf};

use tempfile::TempDir;

use loraxfer::io::adapter::Adapter;
use loraxfer::io::gguf::header::parse;
use loraxfer::io::gguf::reorder::Reorder;
use loraxfer::io::safetensors::{decode_f32, FloatType};

mod common;
use common::cli::*;

/// A temporary directory with a synthetic model `base` (`like`, `layers` layers) and an adapter
/// `adapter` for it (`synth adapter` with `adapter_args`).
fn fixture(like: &str, layers: &str, adapter_args: &[&str]) -> (TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let (base, adapter) = (dir.path().join("base"), dir.path().join("adapter"));
    synth("model", &base, &["--like", like, "--layers", layers]);
    let mut args = vec!["--base", s(&base)];
    args.extend_from_slice(adapter_args);
    synth("adapter", &adapter, &args);
    (dir, base, adapter)
}

fn export(adapter: &Path, base: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "export-gguf",
        "--adapter",
        s(adapter),
        "--base",
        s(base),
        "--out",
        s(out),
    ];
    args.extend_from_slice(extra);
    loraxfer(&args)
}

#[test]
fn the_gguf_holds_the_adapter_with_q_and_k_rows_in_llama_cpp_order() {
    let (dir, base, adapter) = fixture("tiny-llama", "2", &["--r", "4"]);
    let out = dir.path().join("a.gguf");
    let run = export(&adapter, &base, &out, &[]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );

    let data = std::fs::read(&out).unwrap();
    let header = parse(&data).unwrap();
    let meta = |k: &str| header.metadata[k].clone();
    assert_eq!(meta("general.architecture").as_str(), Some("llama"));
    assert_eq!(meta("general.type").as_str(), Some("adapter"));
    assert_eq!(meta("adapter.type").as_str(), Some("lora"));
    let peft = Adapter::open(&adapter).unwrap();
    assert_eq!(
        meta("adapter.lora.alpha").as_f64(),
        Some(peft.config.lora_alpha)
    );
    assert_eq!(header.tensors.len(), 2 * peft.modules.len());
    let tensor = |name: &str| {
        let t = header
            .tensors
            .iter()
            .find(|t| t.name == name)
            .unwrap_or_else(|| panic!("no {name}"));
        (
            t.dims.clone(),
            decode_f32(&data[t.start..t.end], FloatType::F32),
        )
    };
    let (heads, kv_heads) = (6, 2); // tiny-llama
    for (gguf, module, heads) in [
        (
            "blk.1.attn_q",
            "model.layers.1.self_attn.q_proj",
            Some(heads),
        ),
        (
            "blk.0.attn_k",
            "model.layers.0.self_attn.k_proj",
            Some(kv_heads),
        ),
        ("blk.1.attn_v", "model.layers.1.self_attn.v_proj", None),
        ("blk.0.ffn_down", "model.layers.0.mlp.down_proj", None),
    ] {
        let f = peft.factors(module).unwrap();
        let (dims_a, a) = tensor(&format!("{gguf}.weight.lora_a"));
        let (dims_b, b) = tensor(&format!("{gguf}.weight.lora_b"));
        assert_eq!(dims_a, [f.in_features, f.r], "{module}");
        assert_eq!(dims_b, [f.r, f.out_features], "{module}");
        assert_eq!(a, f.a, "{module}: A as it is");
        let rows = f.out_features;
        for row in 0..rows {
            let at = heads.map_or(row, |h| {
                Reorder::RotaryHalves { heads: h }.stored(row, rows)
            });
            assert_eq!(
                b[at * f.r..(at + 1) * f.r],
                f.b[row * f.r..(row + 1) * f.r],
                "{module}: B row {row}"
            );
        }
        if heads.is_some() {
            assert_ne!(b, f.b, "{module}: the rows are permuted");
        }
    }
}

#[test]
fn an_existing_output_is_replaced_only_when_it_is_an_earlier_lora_gguf() {
    let (dir, base, adapter) = fixture("tiny-qwen2", "1", &[]);
    let out = dir.path().join("a.gguf");
    std::fs::write(&out, b"someone's notes").unwrap();
    let refused = export(&adapter, &base, &out, &[]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("already exists"));
    let refused = export(&adapter, &base, &out, &["--force"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && stderr.contains("not an earlier output"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&out).unwrap(), b"someone's notes");

    std::fs::remove_file(&out).unwrap();
    assert!(export(&adapter, &base, &out, &[]).status.success());
    let first = std::fs::read(&out).unwrap();
    let again = export(&adapter, &base, &out, &["--force"]);
    assert!(again.status.success());
    assert_eq!(std::fs::read(&out).unwrap(), first, "deterministic");
    let siblings: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(siblings.is_empty(), "temporary files left: {siblings:?}");
}

#[test]
fn bases_are_named_as_llama_cpp_converts_them_and_others_refused() {
    let (dir, base, adapter) = fixture("tiny-qwen2", "1", &[]);
    let config = base.join("config.json");
    let original = std::fs::read_to_string(&config).unwrap();
    let retype = |t: &str| {
        std::fs::write(&config, original.replace("\"qwen2\"", &format!("\"{t}\""))).unwrap()
    };
    // Mistral checkpoints convert as Llama.
    retype("mistral");
    let out = dir.path().join("m.gguf");
    assert!(export(&adapter, &base, &out, &[]).status.success());
    let data = std::fs::read(&out).unwrap();
    let arch = parse(&data).unwrap().metadata["general.architecture"].clone();
    assert_eq!(arch.as_str(), Some("llama"));
    // A model_type llama.cpp has no architecture for here: refused, naming it, nothing written.
    retype("rwkv");
    let out = dir.path().join("r.gguf");
    let run = export(&adapter, &base, &out, &[]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success());
    assert!(
        stderr.contains("rwkv") && stderr.contains("config.json"),
        "{stderr}"
    );
    assert!(!out.exists());
}

#[test]
fn a_transfer_writes_the_gguf_beside_the_peft_adapter() {
    let (dir, base, adapter) = fixture("tiny-qwen2", "1", &[]);
    let out = dir.path().join("o");
    let args = [
        "transfer",
        "--source-base",
        s(&base),
        "--target-base",
        s(&base),
        "--adapter",
        s(&adapter),
        "--out",
        s(&out),
        "--mode",
        "copy",
        "--gguf-adapter",
    ];
    ok(&args);
    let gguf = std::fs::read(out.join("adapter_model.gguf")).unwrap();
    let header = parse(&gguf).unwrap();
    assert_eq!(
        header.metadata["general.name"].as_str(),
        Some("o"),
        "named after --out, not its staging directory"
    );
    // --force replaces the whole output, the GGUF with it: again with it, and gone without it.
    let mut again = args.to_vec();
    again.push("--force");
    ok(&again);
    assert_eq!(std::fs::read(out.join("adapter_model.gguf")).unwrap(), gguf);
    again.retain(|a| *a != "--gguf-adapter");
    ok(&again);
    assert!(!out.join("adapter_model.gguf").exists(), "no stale GGUF");
}

#[test]
fn scales_llama_cpp_cannot_express_are_folded_into_b() {
    let (dir, base, adapter) = fixture("tiny-qwen2", "1", &["--r", "4", "--dtype", "bf16"]);
    let out = dir.path().join("a.gguf");
    // rslora (alpha / √r) and one module's own alpha: scales other than llama.cpp's alpha / r.
    let config = adapter.join("adapter_config.json");
    let mut c: serde_json::Value = read_json(&config);
    c["use_rslora"] = true.into();
    c["alpha_pattern"] = serde_json::json!({"model.layers.0.mlp.down_proj": 64});
    std::fs::write(&config, c.to_string()).unwrap();
    assert!(export(&adapter, &base, &out, &[]).status.success());

    let peft = Adapter::open(&adapter).unwrap();
    let data = std::fs::read(&out).unwrap();
    let header = parse(&data).unwrap();
    let alpha = header.metadata["adapter.lora.alpha"].as_f64().unwrap();
    for (gguf, module) in [
        ("blk.0.ffn_down", "model.layers.0.mlp.down_proj"),
        ("blk.0.attn_v", "model.layers.0.self_attn.v_proj"),
    ] {
        let f = peft.factors(module).unwrap();
        let m = &peft.modules[module];
        let ratio = peft.config.scale(m.r, m.alpha) / (alpha / m.r as f64);
        assert!((ratio - if module.contains("down") { 4.0 } else { 2.0 }).abs() < 1e-12);
        let read = |suffix: &str| {
            let t = header
                .tensors
                .iter()
                .find(|t| t.name == format!("{gguf}.weight.{suffix}"))
                .unwrap();
            assert_eq!(t.ty, loraxfer::io::gguf::quant::GgmlType::F32, "{module}");
            decode_f32(&data[t.start..t.end], FloatType::F32)
        };
        assert_eq!(read("lora_a"), f.a, "{module}: A as it is");
        let want: Vec<f32> = f.b.iter().map(|&v| (v as f64 * ratio) as f32).collect();
        assert_eq!(read("lora_b"), want, "{module}: B times the ratio");
    }
}

#[test]
fn a_cancelled_export_writes_nothing() {
    use loraxfer::progress::Progress;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    let (dir, base, adapter) = fixture("tiny-qwen2", "1", &[]);
    let export = |out: &Path, progress: &Progress| {
        loraxfer::io::gguf::lora::export(&adapter, &base, out, false, progress)
    };
    // Cancelled before it starts (Ctrl-C in Python), or refused at the commit (a callback).
    let cancelled = Progress {
        cancel: Some(Arc::new(AtomicBool::new(true))),
        ..Progress::hidden()
    };
    let refused = Progress {
        gate: Some(Arc::new(|| false)),
        ..Progress::hidden()
    };
    for (name, progress) in [("c.gguf", cancelled), ("r.gguf", refused)] {
        let out = dir.path().join(name);
        let err = export(&out, &progress).unwrap_err();
        assert!(matches!(err, loraxfer::Error::Cancelled), "{err}");
        assert!(!out.exists(), "{name} written");
    }
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(left.is_empty(), "temporary files left: {left:?}");
    assert!(export(&dir.path().join("ok.gguf"), &Progress::hidden()).is_ok());
}
