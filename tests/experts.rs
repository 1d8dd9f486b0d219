//! Mixture-of-experts models (Qwen3-MoE, Mixtral, OLMoE): the config's expert count and width, one
//! module per expert, each target expert's update from the source expert its router matches, and
//! clear refusals where experts have no counterpart (a dense model, another hidden size, the map
//! mode). Adapters on fused experts and LoRA GGUFs: tests/experts_adapters.rs.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::moe::*;
use common::refusals::edit_json;
use common::*;
use loraxfer::arch;
use loraxfer::io::adapter::Adapter;
use loraxfer::io::checkpoint::ModelConfig;
use loraxfer::io::safetensors::FloatType;
use loraxfer::modes::Mode;
use loraxfer::transfer;

#[test]
fn config_reads_expert_count_and_width() {
    let parse = |extra: &str| {
        let text = format!(
            r#"{{"model_type": "qwen3_moe", "num_hidden_layers": 2, "hidden_size": 8, "intermediate_size": 16, "num_attention_heads": 2{extra}}}"#
        );
        ModelConfig::parse(&text, Path::new("m/config.json"))
    };
    let experts = |extra: &str| parse(extra).unwrap().experts.map(|e| (e.count, e.width));
    assert_eq!(experts(""), None);
    assert_eq!(experts(r#", "num_experts": 0"#), None);
    // Mixtral's experts are intermediate_size wide; Qwen3-MoE names their width apart.
    assert_eq!(experts(r#", "num_local_experts": 8"#), Some((8, 16)));
    assert_eq!(
        experts(
            r#", "num_experts": 128, "moe_intermediate_size": 6, "mlp_only_layers": [], "decoder_sparse_step": 1"#
        ),
        Some((128, 6))
    );
    // Dense layers among expert layers, and the shared expert beside them, as transformers
    // builds them: Qwen's `mlp_only_layers` and `decoder_sparse_step`, GLM-4.5's and DeepSeek's
    // `first_k_dense_replace` and `moe_layer_freq`.
    let layout = |extra: &str| {
        let e = parse(extra).unwrap().experts.unwrap();
        (e.count, e.width, e.shared_width, e.dense_layers)
    };
    assert_eq!(
        layout(r#", "num_experts": 4, "mlp_only_layers": [1]"#),
        (4, 16, None, vec![1])
    );
    assert_eq!(
        layout(r#", "num_experts": 4, "decoder_sparse_step": 2"#),
        (4, 16, None, vec![0])
    );
    assert_eq!(
        layout(
            r#", "num_experts": 4, "moe_intermediate_size": 6, "shared_expert_intermediate_size": 20"#
        ),
        (4, 6, Some(20), vec![])
    );
    assert_eq!(
        layout(
            r#", "n_routed_experts": 8, "moe_intermediate_size": 6, "n_shared_experts": 2, "first_k_dense_replace": 1"#
        ),
        (8, 6, Some(12), vec![0])
    );
    assert_eq!(
        layout(r#", "n_routed_experts": 8, "n_shared_experts": null, "moe_layer_freq": 2"#),
        (8, 16, None, vec![1])
    );
    // GLM-4.7-Flash lists each layer's kind, and without the list has layer 0 dense.
    assert_eq!(
        layout(r#", "n_routed_experts": 8, "mlp_layer_types": ["sparse", "dense"]"#).3,
        vec![1]
    );
    let lite = r#"{"model_type": "glm4_moe_lite", "num_hidden_layers": 2, "hidden_size": 8, "intermediate_size": 16, "num_attention_heads": 2, "n_routed_experts": 4}"#;
    let c = ModelConfig::parse(lite, Path::new("m/config.json")).unwrap();
    assert_eq!(c.experts.unwrap().dense_layers, vec![0]);
    for (extra, field) in [
        (r#", "num_experts": -1"#, "num_experts"),
        (r#", "num_local_experts": 2.5"#, "num_local_experts"),
        (
            r#", "num_experts": 4, "moe_intermediate_size": 0"#,
            "moe_intermediate_size",
        ),
        (
            r#", "num_experts": 4, "mlp_only_layers": [2]"#,
            "mlp_only_layers",
        ),
        (
            r#", "num_experts": 4, "mlp_only_layers": 1"#,
            "mlp_only_layers",
        ),
        (
            r#", "num_experts": 4, "decoder_sparse_step": 0"#,
            "decoder_sparse_step",
        ),
        (
            r#", "num_experts": 4, "mlp_only_layers": [0, 1]"#,
            "every layer's MLP dense",
        ),
        (
            r#", "n_routed_experts": 4, "n_shared_experts": 1000"#,
            "n_shared_experts",
        ),
        (
            r#", "n_routed_experts": 4, "mlp_layer_types": ["sparse"]"#,
            "mlp_layer_types",
        ),
        (
            r#", "n_routed_experts": 4, "mlp_layer_types": ["sparse", "moe"]"#,
            "mlp_layer_types",
        ),
    ] {
        let e = parse(extra).unwrap_err().to_string();
        assert!(
            e.contains("m/config.json") && e.contains(field),
            "{extra}: {e}"
        );
    }
}

#[test]
fn expert_tables_name_one_module_per_expert() {
    let table = arch::all().iter().find(|a| a.name == "mixtral").unwrap();
    assert!(table.has_experts());
    let w1 = table.module("w1").unwrap();
    assert!(w1.expert && w1.parts == [arch::Part::Gate]);
    let path = table.module_path("model.layers", 3, Some(7), w1);
    assert_eq!(path, "model.layers.3.block_sparse_moe.experts.7.w1");
    let parsed = table.parse_module("model.layers", &path).unwrap();
    assert_eq!(
        (parsed.0, parsed.1, parsed.2.name.as_str()),
        (3, Some(7), "w1")
    );
    // An index no checkpoint writes is no module.
    for bad in [
        "experts.07.w1",
        "experts.+7.w1",
        "experts..w1",
        "experts.x.w1",
        "experts.7.w1.x",
    ] {
        let name = format!("model.layers.3.block_sparse_moe.{bad}");
        assert!(
            table.parse_module("model.layers", &name).is_none(),
            "{name}"
        );
    }
    // The width comes from the config for expert modules only.
    let text = r#"{"model_type": "qwen3_moe", "num_hidden_layers": 2, "hidden_size": 8, "intermediate_size": 16, "num_attention_heads": 2, "num_experts": 3, "moe_intermediate_size": 6}"#;
    let c = ModelConfig::parse(text, Path::new("c")).unwrap();
    let qwen = arch::for_config(&c, Path::new("c")).unwrap();
    assert_eq!(qwen.module("experts.down_proj").unwrap().shape(&c), (8, 6));
    assert_eq!(qwen.module("mlp.down_proj").unwrap().shape(&c), (8, 16));
    assert_eq!(qwen.module("q_proj").unwrap().shape(&c), (8, 8));
    assert_eq!(
        qwen.module("experts.up_proj").unwrap().instances(&c),
        vec![Some(0), Some(1), Some(2)]
    );
    assert_eq!(
        qwen.module("mlp.up_proj").unwrap().instances(&c),
        vec![None]
    );
    // A shared expert is as wide as the config says, one module per layer.
    let text = r#"{"model_type": "glm4_moe", "num_hidden_layers": 2, "hidden_size": 8, "intermediate_size": 16, "num_attention_heads": 2, "n_routed_experts": 3, "moe_intermediate_size": 6, "n_shared_experts": 2}"#;
    let c = ModelConfig::parse(text, Path::new("c")).unwrap();
    let glm = arch::for_config(&c, Path::new("c")).unwrap();
    let shared = glm.module("shared_experts.up_proj").unwrap();
    assert_eq!(shared.block(), arch::Block::SharedExpert);
    assert_eq!(
        (shared.shape(&c), shared.instances(&c)),
        ((12, 8), vec![None])
    );
    // A table may not put attention into experts, nor name the slot twice or inside a word.
    for (key, parts) in [
        ("mlp.experts.{expert}.q_proj", r#"["q"]"#),
        ("mlp.experts.{expert}.{expert}", r#"["gate"]"#),
        ("mlp.experts{expert}.gate_proj", r#"["gate"]"#),
    ] {
        let text = format!(
            r#"{{"name":"x","model_types":["x"],"layer_prefixes":["model.layers"],
            "modules":{{"m":{{"key":"{key}","parts":{parts}}}}},
            "residual":{{"embed":"e","gain_offset":0.0,"embed_scale_sqrt_hidden":false}}}}"#
        );
        let e = arch::parse_table(&text).unwrap_err();
        assert!(e.contains("module `m`"), "{key}: {e}");
    }
    // Experts are matched by their router, which the table must name.
    let text = r#"{"name":"x","model_types":["x"],"layer_prefixes":["model.layers"],
        "modules":{"q":{"key":"q","parts":["q"]},"k":{"key":"k","parts":["k"]},"v":{"key":"v","parts":["v"]},
        "o":{"key":"o","parts":["o"]},"g":{"key":"e.{expert}.g","parts":["gate","up","down"]}},
        "residual":{"embed":"e","gain_offset":0.0,"embed_scale_sqrt_hidden":false}}"#;
    let e = arch::parse_table(text).unwrap_err();
    assert!(e.contains("router"), "{e}");
    let with_router = text.replace(
        r#""layer_prefixes""#,
        r#""router":"r.weight","layer_prefixes""#,
    );
    assert!(arch::parse_table(&with_router).unwrap().has_experts());
    // Experts stored fused are presented as one module per projection per expert.
    let stored = with_router.replace(
        r#""layer_prefixes""#,
        r#""stored_experts":{"gate_up":"e.gu","down":"e.d"},"layer_prefixes""#,
    );
    let e = arch::parse_table(&stored).unwrap_err();
    assert!(e.contains("stores experts fused"), "{e}");
    let split = stored.replace(
        r#""g":{"key":"e.{expert}.g","parts":["gate","up","down"]}"#,
        r#""g":{"key":"e.{expert}.g","parts":["gate"]},"u":{"key":"e.{expert}.u","parts":["up"]},
        "d":{"key":"e.{expert}.d","parts":["down"]}"#,
    );
    assert!(arch::parse_table(&split).unwrap().stored_experts.is_some());
    // A shared expert stands beside experts, holds the MLP's three parts, and names no expert.
    let shared = r#","s":{"key":"s","parts":["gate","up","down"],"shared_expert":true}}"#;
    let table = with_router.replacen("}},", &format!("}}{shared},"), 1);
    assert!(arch::parse_table(&table).is_ok(), "{table}");
    for (from, to, words) in [
        (
            r#""g":{"key":"e.{expert}.g","parts":["gate","up","down"]}"#,
            r#""g":{"key":"g","parts":["gate","up","down"]}"#,
            "beside experts",
        ),
        (
            r#""parts":["gate","up","down"],"shared_expert""#,
            r#""parts":["gate","up"],"shared_expert""#,
            "each MLP block",
        ),
        (r#""key":"s","#, r#""key":"s.{expert}","#, "shared expert's"),
        (
            r#""o":{"key":"o","parts":["o"]}"#,
            r#""o":{"key":"o","parts":["o","gate"]}"#,
            "not both",
        ),
    ] {
        assert!(table.contains(from), "{from}");
        let e = arch::parse_table(&table.replace(from, to)).unwrap_err();
        assert!(e.contains(words), "{to}: {e}");
    }
}

/// Onto an identical copy, copy and rotate give every expert its own update back: expert e's
/// weights and factors are read for expert e and written there, for every expert.
#[test]
fn each_expert_takes_its_own_update() {
    let d = Dirs::new();
    moe_model(&d.p("src"), "qwen3_moe", 3, 1);
    moe_model(&d.p("tgt"), "qwen3_moe", 3, 1);
    moe_adapter(&d.p("ad"), "qwen3_moe", 3, true);
    let source = Adapter::open(&d.p("ad")).unwrap();
    for mode in [Mode::Copy, Mode::Rotate] {
        let out = d.p(&format!("out-{}", mode.name()));
        let report = transfer::run(&job(&d.p("src"), &d.p("tgt"), &d.p("ad"), &out, mode)).unwrap();
        assert_eq!(report.modules.len(), LAYERS * (4 + 3 * 3));
        let written = Adapter::open(&out).unwrap();
        assert_eq!(written.modules.len(), source.modules.len());
        for name in source.modules.keys() {
            let (want, got) = (update_of(&source, name), update_of(&written, name));
            let err = fro(&(&got - &want)) / fro(&want);
            assert!(err < 1e-4, "{}: {name} off by {err}", mode.name());
        }
    }
}

/// Onto a release that drifted 5% (routers included), each expert finds itself by its router and
/// rotate pairs expert e with expert e (the report says so for every module), keeping each
/// expert's update size; a Mixtral with the same weights under its own names receives the same
/// updates under its names.
#[test]
fn experts_find_themselves_across_releases_and_layouts() {
    let d = Dirs::new();
    moe_model(&d.p("src"), "qwen3_moe", 4, 1);
    moe_model(&d.p("tgt"), "qwen3_moe", 4, 1);
    rewrite(&d.p("tgt/model.safetensors"), |tensors| {
        for (i, t) in tensors.iter_mut().enumerate() {
            let noise = gaussian(1, t.values.len(), 9, i as u64);
            for (v, g) in t.values.iter_mut().zip(noise.row(0).iter()) {
                *v *= 1.0 + 0.05 * g;
            }
        }
    });
    moe_model(&d.p("mix"), "mixtral", 4, 1);
    moe_adapter(&d.p("ad"), "qwen3_moe", 4, true);
    let report = transfer::run(&job(
        &d.p("src"),
        &d.p("tgt"),
        &d.p("ad"),
        &d.p("out"),
        Mode::Rotate,
    ))
    .unwrap();
    let expert_of = |key: &str| {
        key.split_once("experts.")
            .map(|(_, rest)| rest.split('.').next().unwrap().to_string())
    };
    let mut experts_seen = std::collections::BTreeSet::new();
    for row in &report.modules {
        assert!(row.transferred, "{}", row.target_key);
        assert_eq!(
            expert_of(&row.source_key),
            expert_of(&row.target_key),
            "{}",
            row.target_key
        );
        experts_seen.extend(expert_of(&row.target_key));
    }
    assert_eq!(experts_seen.len(), 4);
    assert_eq!(report.expert_map.len(), LAYERS);
    for m in report.expert_map.values() {
        assert_eq!(m.source_experts, [0, 1, 2, 3]);
        assert!(
            m.router_cosine.iter().all(|&c| c > 0.99),
            "{:?}",
            m.router_cosine
        );
    }
    let (source, written) = (
        Adapter::open(&d.p("ad")).unwrap(),
        Adapter::open(&d.p("out")).unwrap(),
    );
    for name in source.modules.keys() {
        let (want, got) = (
            fro(&update_of(&source, name)),
            fro(&update_of(&written, name)),
        );
        // rotate turns the update, orthogonally, into the target's coordinates.
        assert!((got / want - 1.0).abs() < 1e-3, "{name}: {got} vs {want}");
    }
    // Qwen3-MoE onto Mixtral (same weights, other names): one unit per part, expert for expert.
    transfer::run(&job(
        &d.p("src"),
        &d.p("mix"),
        &d.p("ad"),
        &d.p("mixed"),
        Mode::Copy,
    ))
    .unwrap();
    let mixed = Adapter::open(&d.p("mixed")).unwrap();
    assert_eq!(mixed.modules.len(), source.modules.len());
    for (qwen, mixtral) in [("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")] {
        for (l, e) in [(0, 0), (1, 1), (0, 1)] {
            let want = update_of(&source, &format!("model.layers.{l}.mlp.experts.{e}.{qwen}"));
            let got = update_of(
                &mixed,
                &format!("model.layers.{l}.block_sparse_moe.experts.{e}.{mixtral}"),
            );
            assert!(
                fro(&(&got - &want)) / fro(&want) < 1e-5,
                "{l}.{e}.{mixtral}"
            );
        }
    }
}

/// An expert-pruned model keeps some experts, renumbered, and their router rows: each finds its
/// original by its router, and takes exactly its original's update; an upcycled model's copies of
/// an expert share it; a model with the same experts in another order finds each where it went.
#[test]
fn pruned_and_upcycled_experts_find_theirs_by_router() {
    let d = Dirs::new();
    moe_model(&d.p("full"), "qwen3_moe", 4, 1);
    moe_adapter(&d.p("ad"), "qwen3_moe", 4, true);
    let source = Adapter::open(&d.p("ad")).unwrap();
    for (name, kept) in [
        ("pruned", vec![2, 0, 3]),
        ("upcycled", vec![1, 1, 0, 2, 3]),
        ("reordered", vec![1, 0, 3, 2]),
    ] {
        moe_model_with(&d.p(name), "qwen3_moe", &kept, 1, DIMS.0);
        for mode in [Mode::Copy, Mode::Rotate] {
            let out = d.p(&format!("{name}-{}", mode.name()));
            let report =
                transfer::run(&job(&d.p("full"), &d.p(name), &d.p("ad"), &out, mode)).unwrap();
            assert_eq!(report.expert_map.len(), LAYERS);
            for m in report.expert_map.values() {
                assert_eq!(m.source_experts, kept);
                assert!(
                    m.router_cosine.iter().all(|c| (c - 1.0).abs() < 1e-6),
                    "{:?}",
                    m.router_cosine
                );
            }
            let written = Adapter::open(&out).unwrap();
            assert_eq!(written.modules.len(), LAYERS * (4 + 3 * kept.len()));
            for l in 0..LAYERS {
                for (k, &e) in kept.iter().enumerate() {
                    for p in ["gate_proj", "up_proj", "down_proj"] {
                        let want =
                            update_of(&source, &format!("model.layers.{l}.mlp.experts.{e}.{p}"));
                        let got =
                            update_of(&written, &format!("model.layers.{l}.mlp.experts.{k}.{p}"));
                        let err = fro(&(&got - &want)) / fro(&want);
                        assert!(
                            err < 1e-4,
                            "{name} {}: layer {l} expert {k} {p}: {err}",
                            mode.name()
                        );
                    }
                }
            }
        }
    }
    // Written where the report is read: the matching and its cosines.
    let report = common::cli::read_json(&d.p("pruned-copy").join("transfer_report.json"));
    assert_eq!(
        report["expert_map"]["1"]["source_experts"],
        serde_json::json!([2, 0, 3])
    );
}

/// Experts have no counterpart in a dense model or in one of another hidden size: refused,
/// naming both models and the attention-only transfer, which then works.
#[test]
fn experts_without_a_counterpart_are_refused() {
    let d = Dirs::new();
    moe_model(&d.p("moe3"), "qwen3_moe", 3, 1);
    moe_model_with(&d.p("moe2"), "qwen3_moe", &[0, 1], 1, 40);
    moe_model_with(&d.p("moe3-wide"), "qwen3_moe", &[0, 1, 2], 1, 40);
    moe_adapter(&d.p("ad"), "qwen3_moe", 3, true);
    // A dense Qwen3 with the same attention.
    let (h, inter, heads, kv, dim, _) = DIMS;
    let mut dense = BTreeMap::new();
    for l in 0..LAYERS {
        for (s, (name, out, inp)) in attention(h).into_iter().enumerate() {
            dense.insert(
                format!("model.layers.{l}.{name}.weight"),
                weight(&gaussian(out, inp, 1, (l * 100 + s) as u64)),
            );
        }
        for (s, (name, out, inp)) in [
            ("gate_proj", inter, h),
            ("up_proj", inter, h),
            ("down_proj", h, inter),
        ]
        .into_iter()
        .enumerate()
        {
            dense.insert(
                format!("model.layers.{l}.mlp.{name}.weight"),
                weight(&gaussian(out, inp, 3, (l * 10 + s) as u64)),
            );
        }
    }
    let tiny = TinyModel {
        model_type: "qwen3",
        hidden: h,
        intermediate: inter,
        layers: LAYERS,
        heads,
        kv_heads: kv,
        head_dim: dim,
    };
    write_checkpoint(&d.p("dense"), &tiny, &dense, FloatType::F32);

    for (target, words) in [
        (
            "dense",
            ["3 experts per layer", "one dense MLP per layer", "in "].as_slice(),
        ),
        (
            "moe3-wide",
            ["3 experts per layer in", "hidden sizes 32 and 40"].as_slice(),
        ),
        (
            "moe2",
            [
                "3 experts per layer",
                "2 experts per layer",
                "hidden sizes 32 and 40",
            ]
            .as_slice(),
        ),
    ] {
        let j = job(
            &d.p("moe3"),
            &d.p(target),
            &d.p("ad"),
            &d.p("out"),
            Mode::Align,
        );
        let e = err_of(&j);
        assert!(e.contains(&*d.p(target).to_string_lossy()), "{e}");
        assert!(
            words.iter().all(|w| e.contains(w))
                && e.contains("--modules q_proj,k_proj,v_proj,o_proj"),
            "{e}"
        );
        assert!(!d.p("out").exists());
        // The attention alone carries, and only the attention is written.
        let mut j = j;
        j.options.modules = Some(
            ["q_proj", "k_proj", "v_proj", "o_proj"]
                .map(String::from)
                .to_vec(),
        );
        let report = transfer::run(&j).unwrap();
        // No expert was paired, so no router was matched.
        assert!(report.expert_map.is_empty(), "{target}");
        let written = Adapter::open(&d.p("out")).unwrap();
        assert_eq!(written.modules.len(), LAYERS * 4);
        assert!(written.modules.keys().all(|k| k.contains("self_attn")));
        std::fs::remove_dir_all(d.p("out")).unwrap();
    }
    // A dense model's MLP update has no expert to go to either.
    one_module_adapter(
        &d.p("dense-ad"),
        "qwen3",
        "model.layers.0.mlp.up_proj",
        inter,
        h,
    );
    let e = err_of(&job(
        &d.p("dense"),
        &d.p("moe3"),
        &d.p("dense-ad"),
        &d.p("out"),
        Mode::Align,
    ));
    assert!(
        e.contains("one dense MLP per layer") && e.contains("3 experts per layer"),
        "{e}"
    );
    // An expert the source does not have.
    let module = "model.layers.0.mlp.experts.3.up_proj";
    one_module_adapter(&d.p("bad-ad"), "qwen3_moe", module, DIMS.5, h);
    let e = err_of(&job(
        &d.p("moe3"),
        &d.p("moe3"),
        &d.p("bad-ad"),
        &d.p("out"),
        Mode::Copy,
    ));
    assert!(
        e.contains("experts.3.up_proj") && e.contains("expert 3") && e.contains("3 experts"),
        "{e}"
    );
    // A mixture-of-experts config that gives no expert count.
    edit_json(&d.p("moe2/config.json"), |c| {
        c.remove("num_experts");
    });
    let e = err_of(&job(
        &d.p("moe2"),
        &d.p("moe2"),
        &d.p("ad"),
        &d.p("out"),
        Mode::Copy,
    ));
    assert!(
        e.contains("moe2/config.json") && e.contains("no expert count"),
        "{e}"
    );
}

/// The map mode reads dense MLPs: named, it is refused; auto picks align instead and says why.
#[test]
fn map_is_refused_and_auto_aligns_across_depths() {
    let d = Dirs::new();
    moe_model(&d.p("src"), "qwen3_moe", 2, 1);
    moe_model(&d.p("tgt"), "qwen3_moe", 2, 2);
    edit_json(&d.p("tgt/config.json"), |c| {
        c.insert("num_hidden_layers".into(), 1.into());
    });
    common::rewrite(&d.p("tgt/model.safetensors"), |t| {
        t.retain(|t| !t.name.starts_with("model.layers.1."))
    });
    moe_adapter(&d.p("ad"), "qwen3_moe", 2, true);
    let e = err_of(&job(
        &d.p("src"),
        &d.p("tgt"),
        &d.p("ad"),
        &d.p("out"),
        Mode::Map,
    ));
    assert!(
        e.contains("--mode") && e.contains("dense MLP") && e.contains("2 experts"),
        "{e}"
    );
    let report = transfer::run(&job(
        &d.p("src"),
        &d.p("tgt"),
        &d.p("ad"),
        &d.p("out"),
        Mode::Auto,
    ))
    .unwrap();
    assert_eq!(report.mode, "align");
    let why = report.auto_reason.unwrap();
    assert!(
        why.contains("depths differ") && why.contains("experts"),
        "{why}"
    );
    assert_eq!(report.modules.len(), 4 + 2 * 3);
}
