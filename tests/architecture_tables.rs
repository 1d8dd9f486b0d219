//! Architecture tables as data: every table loads, names its modules and round-trips them, every
//! table file is found and validated, configs' model types select their tables, and the families'
//! fields (Gemma's, Granite's) give the config's scales. (Transfers through the tables:
//! `tests/architectures.rs`.)

use std::path::Path;

use loraxfer::arch::{self, Block, Part};
use loraxfer::io::checkpoint::ModelConfig;

#[test]
fn every_table_loads_and_round_trips_module_names() {
    let names: Vec<&str> = arch::all().iter().map(|a| a.name.as_str()).collect();
    for expected in [
        "llama",
        "qwen2",
        "qwen3",
        "mistral",
        "gemma",
        "gemma2",
        "gemma3",
        "phi3",
        "smollm3",
        "olmo2",
        "olmo3",
        "granite",
        "glm",
        "glm4",
        "qwen3_moe",
        "qwen2_moe",
        "glm4_moe",
        "deepseek_v2",
        "deepseek_v3",
        "glm4_moe_lite",
        "mixtral",
        "olmoe",
        "qwen3_5",
        "qwen3_5_moe",
        "seed_oss",
        "ernie4_5",
        "hunyuan_v1_dense",
        "exaone4",
        "qwen3_next",
    ] {
        assert!(names.contains(&expected), "no table for {expected}");
    }
    for a in arch::all() {
        for spec in &a.modules {
            let expert = spec.expert.then_some(11);
            let path = a.module_path(&a.layer_prefixes[0], 5, expert, spec);
            let (layer, e, parsed) = a.parse_module(&a.layer_prefixes[0], &path).unwrap();
            assert_eq!(
                (layer, e, parsed.name.as_str()),
                (5, expert, spec.name.as_str())
            );
        }
        // The attention's four parts (latent attention's six), linear attention's five, and
        // each MLP block's three.
        let blocks: std::collections::BTreeSet<Block> =
            a.modules.iter().map(|m| m.block()).collect();
        for block in &blocks {
            let of = a.modules.iter().filter(|m| m.block() == *block);
            let mut parts: Vec<_> = of.flat_map(|m| m.parts.clone()).collect();
            parts.sort();
            let want = match block {
                Block::Attention if a.latent_attention() => {
                    vec![Part::Q, Part::O, Part::QA, Part::QB, Part::KvA, Part::KvB]
                }
                Block::Attention => vec![Part::Q, Part::K, Part::V, Part::O],
                // Qwen3-Next's fused forms, or Qwen3.5's five.
                Block::LinearAttention if a.modules.iter().any(|m| m.parts == [Part::LinQkvz]) => {
                    vec![Part::LinOut, Part::LinQkvz, Part::LinBa]
                }
                Block::LinearAttention => {
                    vec![
                        Part::LinQkv,
                        Part::LinZ,
                        Part::LinB,
                        Part::LinA,
                        Part::LinOut,
                    ]
                }
                _ => vec![Part::Gate, Part::Up, Part::Down],
            };
            assert_eq!(parts, want, "{} {block:?}", a.name);
        }
        assert!(blocks.contains(&Block::Mlp) || blocks.contains(&Block::Experts));
        assert_eq!(a.has_experts(), a.router.is_some(), "{}", a.name);
    }
}

#[test]
fn every_table_file_is_found_and_validated() {
    let sources = arch::table_sources();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/arch/tables");
    let on_disk = std::fs::read_dir(&dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "json")
        })
        .count();
    assert_eq!(
        sources.len(),
        on_disk,
        "every JSON file in {dir:?} is built in"
    );
    let mut model_types = std::collections::BTreeMap::new();
    for (stem, text) in sources {
        let table = arch::parse_table(text).unwrap_or_else(|e| panic!("{stem}.json: {e}"));
        assert_eq!(
            &table.name, stem,
            "{stem}.json names itself `{}`",
            table.name
        );
        for t in &table.model_types {
            if let Some(other) = model_types.insert(t.clone(), table.name.clone()) {
                panic!(
                    "model_type `{t}` is claimed by both {other} and {}",
                    table.name
                );
            }
        }
    }
    assert_eq!(arch::all().len(), sources.len());
    // The checks reject a broken table.
    let bad = r#"{"name":"x","model_types":["x"],"layer_prefixes":["model.layers"],
        "modules":{"q_proj":{"key":"self_attn.q_proj","parts":["q","k","v","o","gate","up"]}}}"#;
    assert!(arch::parse_table(bad).is_err());
    // Linear attention whole in one of its two forms, not a mix of them; adapters named under a
    // prefix the table does not read.
    let qwen3_5 = include_str!("../src/arch/tables/qwen3_5.json");
    assert!(arch::parse_table(qwen3_5).is_ok());
    let mixed = qwen3_5.replace(r#"["lin_z"]"#, r#"["lin_qkvz"]"#);
    let e = arch::parse_table(&mixed).unwrap_err();
    assert!(e.contains("lin_qkvz, lin_ba, lin_out"), "{e}");
    let elsewhere = qwen3_5.replace(
        r#""module_prefix": "model.layers""#,
        r#""module_prefix": "language_model.layers""#,
    );
    let e = arch::parse_table(&elsewhere).unwrap_err();
    assert!(e.contains("module_prefix `language_model.layers`"), "{e}");
}

#[test]
fn config_model_types_select_tables() {
    for (mt, table) in [
        ("llama", "llama"),
        ("qwen2", "qwen2"),
        ("mistral", "mistral"),
        ("gemma", "gemma"),
        ("gemma2", "gemma2"),
        ("gemma3_text", "gemma3"),
        ("phi3", "phi3"),
        ("smollm3", "smollm3"),
        ("olmo2", "olmo2"),
        ("olmo3", "olmo3"),
        ("granite", "granite"),
        ("glm", "glm"),
        ("glm4", "glm4"),
        ("qwen3_moe", "qwen3_moe"),
        ("mixtral", "mixtral"),
        ("olmoe", "olmoe"),
        ("seed_oss", "seed_oss"),
        ("ernie4_5", "ernie4_5"),
        ("hunyuan_v1_dense", "hunyuan_v1_dense"),
        ("exaone4", "exaone4"),
    ] {
        let text = format!(
            r#"{{"model_type": "{mt}", "num_hidden_layers": 2, "hidden_size": 8, "intermediate_size": 16, "num_attention_heads": 2}}"#
        );
        let c = ModelConfig::parse(&text, Path::new("config.json")).unwrap();
        assert_eq!(
            arch::for_config(&c, Path::new("config.json")).unwrap().name,
            table
        );
    }
    let c = ModelConfig::parse(r#"{"model_type": "rwkv", "num_hidden_layers": 2, "hidden_size": 8, "intermediate_size": 16, "num_attention_heads": 2}"#, Path::new("m/config.json")).unwrap();
    let e = arch::for_config(&c, Path::new("m/config.json"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("rwkv") && e.contains("m/config.json") && e.contains("phi3"),
        "{e}"
    );
    // Gemma 3's multimodal config keeps the text model's fields in text_config.
    let c = ModelConfig::parse(r#"{"model_type": "gemma3", "text_config": {"num_hidden_layers": 3, "hidden_size": 8, "intermediate_size": 16, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4}}"#, Path::new("c")).unwrap();
    assert_eq!(
        (c.num_hidden_layers, c.num_key_value_heads, c.head_dim),
        (3, 1, 4)
    );
}

/// The forward pass's constant factors, which the map mode carries: Granite's multipliers,
/// Gemma's query_pre_attn_scalar, 1/√head_dim elsewhere; a value no model can have is refused
/// naming the field.
#[test]
fn config_scales_follow_the_family_fields() {
    let parse = |extra: &str| {
        let text = format!(
            r#"{{"model_type": "granite", "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 16, "num_attention_heads": 4{extra}}}"#
        );
        ModelConfig::parse(&text, Path::new("g/config.json"))
    };
    // Granite's defaults (transformers' GraniteConfig): every multiplier 1.
    let plain = parse("").unwrap().scales;
    assert_eq!(
        (plain.embedding, plain.residual, plain.attention),
        (1.0, 1.0, 1.0)
    );
    let granite = parse(r#", "embedding_multiplier": 12.0, "residual_multiplier": 0.22, "attention_multiplier": 0.0078125"#)
        .unwrap()
        .scales;
    assert_eq!(
        (granite.embedding, granite.residual, granite.attention),
        (12.0, 0.22, 0.0078125)
    );
    let other = |model_type: &str, extra: &str| {
        let text = format!(
            r#"{{"model_type": "{model_type}", "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 16, "num_attention_heads": 4{extra}}}"#
        );
        ModelConfig::parse(&text, Path::new("c")).unwrap().scales
    };
    let gemma2 = other("gemma2", r#", "query_pre_attn_scalar": 144"#);
    assert!((gemma2.attention - 1.0 / 12.0).abs() < 1e-12);
    assert_eq!(other("llama", "").attention, 0.25); // 1/√head_dim, head_dim 16
    for (bad, field) in [
        (r#", "residual_multiplier": 0"#, "residual_multiplier"),
        (r#", "embedding_multiplier": -1.5"#, "embedding_multiplier"),
        (r#", "attention_multiplier": "x""#, "attention_multiplier"),
        (r#", "residual_multiplier": 1e300"#, "residual_multiplier"),
        (
            r#", "attention_multiplier": 0.1, "query_pre_attn_scalar": -4"#,
            "query_pre_attn_scalar",
        ),
    ] {
        let e = parse(bad).unwrap_err().to_string();
        assert!(e.contains("g/config.json") && e.contains(field), "{e}");
    }
}
