//! Every way a transfer's inputs can be broken must end the same way: a non-zero exit, one
//! `error:` line on stderr that names the file (and the tensor, where there is one) and says what
//! is wrong, and no output directory (not even a half-written hidden staging sibling).
//!
//! Fixtures are made with `loraxfer synth` itself (tiny models take milliseconds), then damaged
//! byte by byte. The safetensors helpers below parse and re-serialize headers by hand, so the
//! damage is exactly what each test says and does not depend on the crate's own writer.

use std::path::Path;

use serde_json::{json, Map, Value};

mod common;
use common::cli::*;
use common::refusals::*;

const Q_PROJ_0: &str = "model.layers.0.self_attn.q_proj.weight";
const LORA_B_Q_0: &str = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";

impl Safetensors {
    /// Writes the file back with a header length that matches the (possibly edited) header.
    fn write(&self, path: &Path) {
        let header = serde_json::to_vec(&self.header).unwrap();
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(&header);
        bytes.extend_from_slice(&self.data);
        std::fs::write(path, bytes).expect("write safetensors");
    }

    fn offsets(&self, name: &str) -> (usize, usize) {
        let o = &self.header[name]["data_offsets"];
        (
            o[0].as_u64().unwrap() as usize,
            o[1].as_u64().unwrap() as usize,
        )
    }

    fn set_offsets(&mut self, name: &str, start: usize, end: usize) {
        self.header[name]["data_offsets"] = json!([start, end]);
    }

    /// Tensor names ordered by where their data lies.
    fn names_by_offset(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .header
            .keys()
            .filter(|k| *k != "__metadata__")
            .cloned()
            .collect();
        names.sort_by_key(|n| self.offsets(n).0);
        names
    }

    /// Drops a tensor and re-packs the data so the remaining offsets tile it exactly.
    fn without(&self, drop: &str) -> Self {
        let mut header = Map::new();
        let mut data = Vec::new();
        if let Some(meta) = self.header.get("__metadata__") {
            header.insert("__metadata__".into(), meta.clone());
        }
        for name in self.names_by_offset().into_iter().filter(|n| n != drop) {
            let (a, b) = self.offsets(&name);
            let mut entry = self.header[&name].clone();
            entry["data_offsets"] = json!([data.len(), data.len() + b - a]);
            data.extend_from_slice(&self.data[a..b]);
            header.insert(name, entry);
        }
        Safetensors { header, data }
    }

    /// Overwrites the first bytes of a tensor's data.
    fn poke(&mut self, name: &str, bytes: &[u8]) {
        let (a, _) = self.offsets(name);
        self.data[a..a + bytes.len()].copy_from_slice(bytes);
    }
}

fn edit_bytes(path: &Path, edit: impl FnOnce(&mut Vec<u8>)) {
    let mut bytes = std::fs::read(path).unwrap();
    edit(&mut bytes);
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn truncated_checkpoint_is_refused() {
    let f = Fixtures::new();
    let file = f.source_weights();
    edit_bytes(&file, |b| b.truncate(b.len() / 2));
    f.assert_refused(&f.transfer(&[]), &[s(&file), "truncated"]);
}

#[test]
fn header_length_past_end_of_file_is_refused() {
    let f = Fixtures::new();
    let file = f.source_weights();
    // Just past the end (under the crate's size cap), then absurdly large.
    let len = std::fs::metadata(&file).unwrap().len();
    edit_bytes(&file, |b| {
        b[..8].copy_from_slice(&(len + 1000).to_le_bytes())
    });
    f.assert_refused(
        &f.transfer(&[]),
        &[s(&file), "header length", "end of the file"],
    );
    edit_bytes(&file, |b| {
        b[..8].copy_from_slice(&(u64::MAX / 2).to_le_bytes())
    });
    f.assert_refused(&f.transfer(&[]), &[s(&file), "header length"]);
}

#[test]
fn corrupt_header_json_is_refused() {
    let f = Fixtures::new();
    let file = f.source_weights();
    let pristine = std::fs::read(&file).unwrap();
    // A byte that is not UTF-8 inside the header...
    edit_bytes(&file, |b| b[20] = 0xFF);
    f.assert_refused(
        &f.transfer(&[]),
        &[s(&file), "not a valid safetensors file", "header"],
    );
    // ...and valid UTF-8 that is not JSON (the opening brace replaced).
    std::fs::write(&file, &pristine).unwrap();
    edit_bytes(&file, |b| b[8] = b'x');
    f.assert_refused(
        &f.transfer(&[]),
        &[s(&file), "not a valid safetensors file"],
    );
}

#[test]
fn tensor_range_beyond_the_data_is_refused() {
    let f = Fixtures::new();
    let file = f.source_weights();
    let mut st = Safetensors::read(&file);
    // Move the last tensor's (correctly sized) range past the end of the data.
    let last = st.names_by_offset().pop().unwrap();
    let (a, b) = st.offsets(&last);
    st.set_offsets(&last, a + (b - a), b + (b - a));
    st.write(&file);
    f.assert_refused(&f.transfer(&[]), &[s(&file), &last, "offset"]);
}

#[test]
fn tensor_end_offset_beyond_the_data_names_the_tensor() {
    let f = Fixtures::new();
    let file = f.source_weights();
    let mut st = Safetensors::read(&file);
    let (a, _) = st.offsets(Q_PROJ_0);
    let end = st.data.len() + 4096;
    st.set_offsets(Q_PROJ_0, a, end);
    st.write(&file);
    f.assert_refused(&f.transfer(&[]), &[s(&file), Q_PROJ_0, "offset"]);
}

#[test]
fn missing_source_tensor_is_refused() {
    let f = Fixtures::new();
    let file = f.source_weights();
    Safetensors::read(&file).without(Q_PROJ_0).write(&file);
    f.assert_refused(&f.transfer(&[]), &[s(&f.source), Q_PROJ_0, "missing"]);
}

#[test]
fn adapter_of_another_model_is_refused() {
    let f = Fixtures::new();
    let llama = f.root.path().join("llama");
    let llama_adapter = f.root.path().join("llama-adapter");
    synth("model", &llama, &["--like", "tiny-llama"]);
    synth("adapter", &llama_adapter, &["--base", s(&llama)]);
    // A tiny-llama adapter claimed to be trained on tiny-qwen2.
    let out = f.transfer_with(&f.source, &f.target, &llama_adapter, &[]);
    let weights = llama_adapter.join("adapter_model.safetensors");
    f.assert_refused(&out, &[s(&weights), "lora_B.weight", "another model"]);
}

#[test]
fn unknown_architecture_is_refused() {
    let f = Fixtures::new();
    let config = f.source.join("config.json");
    edit_json(&config, |c| {
        c.insert("model_type".into(), json!("mamba"));
    });
    f.assert_refused(
        &f.transfer(&[]),
        &[s(&config), "mamba", "unknown architecture"],
    );
}

#[test]
fn unsupported_peft_features_are_refused() {
    let f = Fixtures::new();
    let config = f.adapter.join("adapter_config.json");
    let pristine = std::fs::read(&config).unwrap();
    for (key, named) in [
        ("use_dora", "DoRA"),
        ("lora_bias", "lora_bias"),
        ("fan_in_fan_out", "fan_in_fan_out"),
    ] {
        std::fs::write(&config, &pristine).unwrap();
        edit_json(&config, |c| {
            c.insert(key.into(), json!(true));
        });
        f.assert_refused(
            &f.transfer(&[]),
            &[s(&config), "unsupported adapter", named],
        );
    }
}

#[test]
fn pickle_only_adapter_is_refused() {
    let f = Fixtures::new();
    std::fs::remove_file(f.adapter_weights()).unwrap();
    std::fs::write(
        f.adapter.join("adapter_model.bin"),
        b"PK\x03\x04 not really a pickle",
    )
    .unwrap();
    f.assert_refused(&f.transfer(&[]), &[s(&f.adapter), "adapter_model.bin"]);
}

#[test]
fn nan_in_a_base_weight_is_refused() {
    let f = Fixtures::new();
    let file = f.source_weights();
    let mut st = Safetensors::read(&file);
    assert_eq!(
        st.header[Q_PROJ_0]["dtype"], "BF16",
        "the fixture's weights are bf16"
    );
    st.poke(Q_PROJ_0, &0x7FC0u16.to_le_bytes()); // a bf16 quiet NaN
    st.write(&file);
    f.assert_refused(&f.transfer(&[]), &[s(&file), Q_PROJ_0, "non-finite"]);
    // The batching (CUDA) path checks as it uploads: the same refusal, on the kernel emulator.
    if loraxfer::backend::cuda::emulator_available() {
        f.assert_refused(
            &f.transfer(&["--device", "emulator"]),
            &[s(&file), Q_PROJ_0, "non-finite", "row 0, column 0"],
        );
    }
}

#[test]
fn inf_in_an_adapter_factor_is_refused() {
    let f = Fixtures::new();
    let file = f.adapter_weights();
    let mut st = Safetensors::read(&file);
    assert_eq!(
        st.header[LORA_B_Q_0]["dtype"], "F32",
        "synthetic adapters are f32"
    );
    st.poke(LORA_B_Q_0, &0x7F80_0000u32.to_le_bytes()); // f32 +Inf
    st.write(&file);
    f.assert_refused(&f.transfer(&[]), &[s(&file), LORA_B_Q_0, "non-finite"]);
}

#[test]
fn rank_zero_is_refused() {
    let f = Fixtures::new();
    f.assert_refused(&f.transfer(&["--rank", "0"]), &["--rank"]);
}

#[test]
fn existing_output_needs_force() {
    let f = Fixtures::new();
    let out = f.out();
    std::fs::create_dir(&out).unwrap();
    let marker = out.join("marker");
    std::fs::write(&marker, b"keep me").unwrap();

    let refused = f.transfer(&[]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success(),
        "an existing --out was overwritten: {stderr}"
    );
    assert!(
        stderr.starts_with("error:") && stderr.contains(s(&out)) && stderr.contains("--force"),
        "{stderr}"
    );
    // Nor with --force: the directory holds something no loraxfer output holds.
    let forced = f.transfer(&["--force"]);
    let stderr = String::from_utf8_lossy(&forced.stderr);
    assert!(
        !forced.status.success(),
        "--force replaced other work: {stderr}"
    );
    assert!(
        stderr.starts_with("error:") && stderr.contains("marker") && stderr.contains(s(&out)),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read(&marker).unwrap(),
        b"keep me",
        "the existing output was touched"
    );
    assert_eq!(
        std::fs::read_dir(&out).unwrap().count(),
        1,
        "files were added to the existing output"
    );
    f.assert_no_staging_left();

    // An earlier output is replaced under --force, and only once the new one is complete.
    std::fs::remove_file(&marker).unwrap();
    std::fs::remove_dir(&out).unwrap();
    assert!(f.transfer(&[]).status.success());
    let report = out.join("transfer_report.json");
    std::fs::write(&report, b"an old report").unwrap();
    let forced = f.transfer(&["--force"]);
    assert!(
        forced.status.success(),
        "--force failed: {}",
        String::from_utf8_lossy(&forced.stderr)
    );
    assert_ne!(std::fs::read(&report).unwrap(), b"an old report");
    assert!(out.join("adapter_model.safetensors").is_file());
    f.assert_no_staging_left();
}

#[test]
fn force_never_replaces_weights_another_tool_wrote() {
    let f = Fixtures::new();
    let out = f.out();
    std::fs::create_dir(&out).unwrap();
    // A model directory saved elsewhere: the names of an output, but not loraxfer's weights.
    let mut st = Safetensors::read(&f.source_weights());
    st.header
        .insert("__metadata__".into(), json!({"format": "pt"}));
    st.write(&out.join("model.safetensors"));
    std::fs::copy(f.source.join("config.json"), out.join("config.json")).unwrap();
    let run = f.transfer(&["--force"]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        !run.status.success(),
        "--force replaced another tool's model"
    );
    assert!(
        stderr.contains("did not write") && stderr.contains("model.safetensors"),
        "{stderr}"
    );
    assert!(out.join("model.safetensors").is_file());
    f.assert_no_staging_left();
}

#[test]
fn force_never_replaces_an_input() {
    let f = Fixtures::new();
    // --out naming the target base, then the directory holding every input.
    for out in [f.target.clone(), f.root.path().to_path_buf()] {
        let mut args = vec![
            "transfer",
            "--out",
            s(&out),
            "--force",
            "--adapter",
            s(&f.adapter),
        ];
        args.extend(["--source-base", s(&f.source), "--target-base", s(&f.target)]);
        let run = loraxfer(&args);
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(
            !run.status.success(),
            "--out {} was replaced",
            out.display()
        );
        assert!(
            stderr.starts_with("error:") && stderr.contains("input"),
            "{stderr}"
        );
        assert!(f.target.join("config.json").is_file() && f.adapter_weights().is_file());
    }
}

#[test]
fn index_naming_a_missing_shard_is_refused() {
    let f = Fixtures::new();
    let (first, second) = (
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    );
    let st = Safetensors::read(&f.source_weights());
    std::fs::rename(f.source_weights(), f.source.join(first)).unwrap();
    // Every tensor is in the first shard except the last one, which the index sends to a shard
    // that was never written.
    let names = st.names_by_offset();
    let weight_map: Map<String, Value> = names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            (
                n.clone(),
                json!(if i + 1 == names.len() { second } else { first }),
            )
        })
        .collect();
    let index = f.source.join("model.safetensors.index.json");
    let body = json!({"metadata": {"total_size": st.data.len()}, "weight_map": weight_map});
    std::fs::write(&index, serde_json::to_string_pretty(&body).unwrap()).unwrap();
    f.assert_refused(&f.transfer(&[]), &[s(&index), second, "does not exist"]);
}

#[test]
fn unknown_module_is_refused() {
    let f = Fixtures::new();
    f.assert_refused(
        &f.transfer(&["--modules", "foo_proj"]),
        &["--modules", "foo_proj"],
    );
    // Known, but not adapted: the output would be all zeros.
    let only_q = f.root.path().join("only-q");
    synth(
        "adapter",
        &only_q,
        &["--base", s(&f.source), "--targets", "q_proj"],
    );
    let run = f.transfer_with(&f.source, &f.target, &only_q, &["--modules", "k_proj"]);
    f.assert_refused(&run, &["--modules", "k_proj", "adapts q_proj"]);
}

#[test]
fn project_mode_between_different_shapes_is_refused() {
    let f = Fixtures::new();
    let llama = f.root.path().join("llama");
    synth("model", &llama, &["--like", "tiny-llama"]);
    let out = f.transfer_with(&f.source, &llama, &f.adapter, &["--mode", "project"]);
    f.assert_refused(&out, &["--mode", "equal shapes"]);
}

#[test]
fn layer_map_naming_a_missing_source_layer_is_refused() {
    let f = Fixtures::new();
    let map = f.root.path().join("layers.json");
    std::fs::write(&map, r#"{"0": 9}"#).unwrap(); // tiny-qwen2 has layers 0..4
    f.assert_refused(
        &f.transfer(&["--layer-map", s(&map)]),
        &[s(&map), "source layer 9"],
    );
}

#[test]
fn impossible_model_configs_are_refused() {
    let f = Fixtures::new();
    let config = f.target.join("config.json");
    let pristine = std::fs::read(&config).unwrap();
    // tiny-qwen2: 4 attention heads over 2 key/value heads, 176 neurons, head_dim 16.
    for (key, value, named) in [
        (
            "num_key_value_heads",
            json!(3),
            "not a multiple of `num_key_value_heads` = 3",
        ),
        ("num_key_value_heads", json!(0), "must be positive"),
        ("intermediate_size", json!(0), "must be positive"),
        ("head_dim", json!(0), "`head_dim` = 0"),
    ] {
        std::fs::write(&config, &pristine).unwrap();
        edit_json(&config, |c| {
            c.insert(key.into(), value.clone());
        });
        f.assert_refused(&f.transfer(&[]), &[s(&config), named]);
    }
}

#[test]
fn sketch_sizes_beyond_any_use_are_refused() {
    let f = Fixtures::new();
    for (flag, value) in [
        ("--oversample", "18446744073709551615"),
        ("--power-iters", "1000"),
        ("--rank", "18446744073709551615"),
    ] {
        f.assert_refused(&f.transfer(&[flag, value]), &[flag, "above the limit"]);
    }
}

#[test]
fn norms_and_embeddings_of_the_wrong_width_are_refused_by_the_map() {
    let f = Fixtures::new();
    let file = f.source_weights();
    let pristine = std::fs::read(&file).unwrap();
    // Same bytes, another shape: the header alone is wrong (the embedding is 256 × 64).
    let weights = s(&file);
    for (name, shape, named) in [
        (
            "model.layers.0.input_layernorm.weight",
            json!([32, 2]),
            [weights, "expected"],
        ),
        (
            "model.embed_tokens.weight",
            json!([512, 32]),
            [weights, "expected"],
        ),
        // A projection the adapter does not touch, which the map reads all the same.
        (
            "model.layers.1.mlp.gate_proj.weight",
            json!([352, 32]),
            [s(&f.source), "config.json implies"],
        ),
    ] {
        std::fs::write(&file, &pristine).unwrap();
        let mut st = Safetensors::read(&file);
        st.header[name]["shape"] = shape;
        st.write(&file);
        let out = f.transfer(&["--mode", "map", "--modules", "q_proj"]);
        f.assert_refused(&out, &[name, named[0], named[1]]);
    }
}

#[test]
fn adapter_configs_that_would_change_the_update_are_refused() {
    let f = Fixtures::new();
    let config = f.adapter.join("adapter_config.json");
    let pristine = std::fs::read(&config).unwrap();
    for (key, value, named) in [
        // Loose types PEFT never writes, which would silently scale the update or drop a flag.
        ("lora_alpha", json!("32"), "`lora_alpha` is \"32\""),
        ("use_dora", json!("true"), "`use_dora` is \"true\""),
        ("use_rslora", json!(1), "`use_rslora` is 1"),
        // Updates that are not s·B·A over the published base.
        ("init_lora_weights", json!("pissa_niter_4"), "pissa_niter_4"),
        ("init_lora_weights", json!("olora"), "olora"),
        ("use_qalora", json!(true), "QA-LoRA"),
        (
            "layer_replication",
            json!([[0, 2], [1, 3]]),
            "layer_replication",
        ),
        (
            "alora_invocation_tokens",
            json!([27, 91]),
            "alora_invocation_tokens",
        ),
        (
            "target_parameters",
            json!(["model.layers.0.self_attn.q_proj.bias"]),
            "target_parameters",
        ),
    ] {
        std::fs::write(&config, &pristine).unwrap();
        edit_json(&config, |c| {
            c.insert(key.into(), value.clone());
        });
        f.assert_refused(&f.transfer(&[]), &[s(&config), named]);
    }
}

#[test]
fn two_adapters_in_one_file_are_refused() {
    let f = Fixtures::new();
    let file = f.adapter_weights();
    let mut st = Safetensors::read(&file);
    // A second adapter's lora_B for the same module, appended after the data.
    let (a, b) = st.offsets(LORA_B_Q_0);
    let copy = st.data[a..b].to_vec();
    let other = LORA_B_Q_0.replace("lora_B.weight", "lora_B.other.weight");
    let mut entry = st.header[LORA_B_Q_0].clone();
    entry["data_offsets"] = json!([st.data.len(), st.data.len() + copy.len()]);
    st.data.extend_from_slice(&copy);
    st.header.insert(other.clone(), entry);
    st.write(&file);
    f.assert_refused(
        &f.transfer(&[]),
        &[s(&file), "lora_B", "one adapter per file"],
    );
}
