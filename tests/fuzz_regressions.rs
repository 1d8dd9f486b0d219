//! Every input a fuzzer found to crash a check (kept in `fuzz/regressions/<target>/`), plus the
//! real files each target is seeded with (`fuzz/seeds/<target>/` and inline), run through the
//! same checks as the fuzz targets.

use std::path::Path;

use loraxfer::fuzzing::TARGETS;

/// The recorded findings of `target` (`fuzz/regressions/<target>/`).
fn inputs(target: &str) -> Vec<(String, Vec<u8>)> {
    files("regressions", target)
}

/// The seed files of `target` (`fuzz/seeds/<target>/`, see fuzz/make_gguf_seeds.py).
fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    files("seeds", target)
}

/// The files of `fuzz/<folder>/<target>/`, by name.
fn files(folder: &str, target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join(folder)
        .join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut out: Vec<_> = entries
        .flatten()
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

#[test]
fn recorded_fuzz_findings_stay_fixed() {
    let mut total = 0;
    for (target, check) in TARGETS {
        for (name, data) in inputs(target) {
            let result = std::panic::catch_unwind(|| check(&data));
            assert!(
                result.is_ok(),
                "fuzz/regressions/{target}/{name} fails the {target} check again"
            );
            total += 1;
        }
    }
    // At least the recorded GGUF finding: a missing folder must not pass as "nothing regressed".
    assert!(
        total >= 1,
        "no recorded inputs found under fuzz/regressions/"
    );
    eprintln!("{total} recorded inputs");
}

#[test]
fn gguf_seeds_are_whole_models_and_pass_the_check() {
    use loraxfer::io::checkpoint::Checkpoint;
    use loraxfer::io::gguf::GgufModel;
    let files = seeds("gguf_header");
    assert_eq!(files.len(), 3, "fuzz/seeds/gguf_header: {files:?}");
    for (name, data) in &files {
        loraxfer::fuzzing::gguf_header(data);
        if name == "kquants.gguf" {
            let h = loraxfer::io::gguf::header::parse(data).unwrap();
            assert_eq!(h.tensors.len(), 5);
            continue;
        }
        // The model seeds must reach the deepest reads, or the fuzzer starts too shallow.
        let path = Path::new(name);
        let model = GgufModel::from_vec(path, data.clone()).unwrap();
        assert_eq!(
            model.vocab().unwrap().index().len(),
            46,
            "{name}: the vocabulary"
        );
        let ckpt = Checkpoint::from_gguf(model).unwrap();
        assert_eq!(ckpt.config.hidden_size, 64);
        loraxfer::arch::for_config(&ckpt.config, path).unwrap();
        let q = "model.layers.0.self_attn.q_proj.weight";
        assert_eq!(ckpt.shape(q).unwrap(), &[64, 64]);
        assert_eq!(ckpt.read_rows_f32(q, 0..64).unwrap().len(), 64 * 64);
    }
}

#[test]
fn a_gguf_claiming_absurd_head_counts_is_refused_naming_the_tensor() {
    // Found by reading the reader against the fuzz check: 2⁶³ heads overflowed the split of
    // the permuted q_proj rows into heads.
    let (name, data) = inputs("gguf_header")
        .into_iter()
        .find(|(n, _)| n == "absurd-head-count.gguf")
        .expect("the recorded input");
    let e = loraxfer::io::gguf::GgufModel::from_vec(Path::new(&name), data)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("model.layers.0.self_attn.q_proj.weight") && e.contains("heads"),
        "{e}"
    );
}

#[test]
fn seeds_pass_every_check() {
    // The built-in tables, a real config and adapter config, a layer map, an index, and a tiny
    // safetensors image: each accepted input must satisfy its target's invariants.
    for text in [
        include_str!("../src/arch/tables/phi3.json"),
        include_str!("../src/arch/tables/gemma3.json"),
    ] {
        assert!(loraxfer::arch::parse_table(text).is_ok());
        loraxfer::fuzzing::arch_table(text.as_bytes());
    }
    let config = br#"{"model_type": "qwen2", "num_hidden_layers": 4, "hidden_size": 64, "intermediate_size": 176, "num_attention_heads": 4, "num_key_value_heads": 2}"#;
    loraxfer::fuzzing::model_config(config);
    loraxfer::fuzzing::adapter_config(
        br#"{"r": 8, "lora_alpha": 16, "rank_pattern": {"q_proj": 4}}"#,
    );
    loraxfer::fuzzing::layer_map(br#"{"0": 27, "23": 0}"#);
    loraxfer::fuzzing::tokenizer(
        r#"{"model": {"type": "BPE", "vocab": {"Ġthe": 0, "cat": 1, "Ċ": 2}},
            "added_tokens": [{"id": 3, "content": "<|endoftext|>", "special": true}],
            "pre_tokenizer": {"type": "ByteLevel"}}"#
            .as_bytes(),
    );
    loraxfer::fuzzing::checkpoint_index(
        br#"{"weight_map": {"a": "model-00001-of-00002.safetensors"}}"#,
    );
    let mut st = Vec::new();
    let header = br#"{"w":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,12]}}"#;
    st.extend_from_slice(&(header.len() as u64).to_le_bytes());
    st.extend_from_slice(header);
    st.extend_from_slice(&[0u8; 12]);
    assert_eq!(
        loraxfer::io::safetensors::index_header(&st)
            .unwrap()
            .0
            .len(),
        1
    );
    loraxfer::fuzzing::safetensors_header(&st);
    // And the limits: sizes beyond any model are refused, not overflowed.
    let huge = br#"{"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 9223372036854775807, "intermediate_size": 8, "num_attention_heads": 1}"#;
    assert!(loraxfer::io::checkpoint::ModelConfig::parse(
        std::str::from_utf8(huge).unwrap(),
        Path::new("c")
    )
    .is_err());
    let overflow =
        br#"{"w":{"dtype":"F32","shape":[4294967296,4294967296,4294967296],"data_offsets":[0,0]}}"#;
    let mut st = (overflow.len() as u64).to_le_bytes().to_vec();
    st.extend_from_slice(overflow);
    let e = loraxfer::io::safetensors::index_header(&st).unwrap_err();
    assert!(e.contains('w') || e.contains("overflow"), "{e}");
}
