//! Mixture-of-experts models whose layers differ (Qwen2-MoE, GLM-4.5, Qwen3-MoE with
//! `mlp_only_layers`): a dense MLP in some layers, experts and a shared expert in the others.
//! Each module takes its update from the same block of the source layer mapped to it; a dense
//! MLP against experts and a shared expert with no counterpart are refused where selected.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::moe::*;
use common::moe_layers::*;
use common::refusals::edit_json;
use common::*;
use loraxfer::io::adapter::Adapter;
use loraxfer::io::safetensors::FloatType;
use loraxfer::modes::Mode;
use loraxfer::transfer;

/// The target tensors a transfer carried an update to, in report order.
fn carried(report: &transfer::report::Report) -> Vec<String> {
    let rows = report.modules.iter().filter(|m| m.transferred);
    rows.map(|m| m.target_key.clone()).collect()
}

fn layout(family: &'static str, dense: &[usize]) -> Layout {
    Layout {
        family,
        experts: 3,
        dense: dense.to_vec(),
    }
}

/// Every module of the source adapter arrives as it was: onto the same model, copy and rotate
/// (at full rank) give each dense MLP, expert and shared expert its own update back.
#[test]
fn each_block_takes_its_own_update_in_layers_of_both_kinds() {
    for family in [
        "qwen2_moe",
        "glm4_moe",
        "qwen3_moe",
        "deepseek_v3",
        "deepseek_v2",
    ] {
        let d = Dirs::new();
        let model = layout(family, &[0]);
        model.write(&d.p("m"), 1);
        model.adapter(&d.p("ad"));
        let source = Adapter::open(&d.p("ad")).unwrap();
        let per_layer = |l| model.modules(l).len();
        for mode in [Mode::Copy, Mode::Rotate] {
            let out = d.p(&format!("out-{}", mode.name()));
            let report = transfer::run(&job(&d.p("m"), &d.p("m"), &d.p("ad"), &out, mode)).unwrap();
            assert_eq!(
                report.modules.len(),
                per_layer(0) + per_layer(1),
                "{family}"
            );
            assert!(report.modules.iter().all(|m| m.transferred));
            // Only the layer with experts has routers to match.
            assert_eq!(report.expert_map.keys().collect::<Vec<_>>(), ["1"]);
            let written = Adapter::open(&out).unwrap();
            let names = |a: &Adapter| a.modules.keys().cloned().collect::<BTreeSet<_>>();
            assert_eq!(names(&written), names(&source), "{family}");
            for name in source.modules.keys() {
                let (want, got) = (update_of(&source, name), update_of(&written, name));
                let err = fro(&(&got - &want)) / fro(&want);
                assert!(err < 1e-4, "{family} {}: {name} off by {err}", mode.name());
            }
        }
    }
}

/// `--modules gate_proj` names every gate projection, as PEFT's `target_modules` does: the dense
/// MLP's, each expert's and the shared expert's.
#[test]
fn a_projection_name_selects_it_in_every_block() {
    let d = Dirs::new();
    let model = layout("qwen2_moe", &[0]);
    model.write(&d.p("m"), 1);
    model.adapter(&d.p("ad"));
    let mut j = job(&d.p("m"), &d.p("m"), &d.p("ad"), &d.p("out"), Mode::Copy);
    j.options.modules = Some(vec!["gate_proj".into()]);
    let selected: BTreeSet<String> = carried(&transfer::run(&j).unwrap()).into_iter().collect();
    let want: BTreeSet<String> = [
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.1.mlp.experts.0.gate_proj.weight",
        "model.layers.1.mlp.experts.1.gate_proj.weight",
        "model.layers.1.mlp.experts.2.gate_proj.weight",
        "model.layers.1.mlp.shared_expert.gate_proj.weight",
    ]
    .map(String::from)
    .into();
    assert_eq!(selected, want);
}

/// A layer whose MLP is dense in one model and experts in the other cannot carry its MLP update:
/// refused with the transfers that work (the attention alone, or layers of one kind paired).
#[test]
fn layers_of_different_kinds_are_refused_with_the_ways_around() {
    let d = Dirs::new();
    let source = layout("glm4_moe", &[0]);
    source.write(&d.p("src"), 1);
    source.adapter(&d.p("ad"));
    layout("glm4_moe", &[]).write(&d.p("tgt"), 2);
    let j = job(
        &d.p("src"),
        &d.p("tgt"),
        &d.p("ad"),
        &d.p("out"),
        Mode::Rotate,
    );
    let e = err_of(&j);
    for words in [
        "a dense MLP in layer 0 of",
        "3 experts per layer in",
        "--modules q_proj,k_proj,v_proj,o_proj",
        "--layer-map",
    ] {
        assert!(e.contains(words), "{words}: {e}");
    }
    assert!(!d.p("out").exists());
    // The attention alone.
    let mut attention = j.clone();
    attention.options.modules = Some(
        ["q_proj", "k_proj", "v_proj", "o_proj"]
            .map(String::from)
            .to_vec(),
    );
    transfer::run(&attention).unwrap();
    let written = Adapter::open(&d.p("out")).unwrap();
    let carried: Vec<&String> = written
        .modules
        .keys()
        .filter(|k| fro(&update_of(&written, k)) > 0.0)
        .collect();
    assert_eq!(carried.len(), LAYERS * 4);
    assert!(
        carried.iter().all(|k| k.contains("self_attn")),
        "{carried:?}"
    );
    std::fs::remove_dir_all(d.p("out")).unwrap();
    // Layers of one kind: both target layers from the source's expert layer. Its experts and
    // shared expert reach both; source layer 0's dense MLP is left out with it.
    let mut paired = j;
    paired.options.layer_map = Some([(0, 1), (1, 1)].into());
    let report = transfer::run(&paired).unwrap();
    assert!(report.modules.iter().all(|m| m.source_layer == 1));
    let written = Adapter::open(&d.p("out")).unwrap();
    assert_eq!(written.modules.len(), 2 * source.modules(1).len());
}

/// A shared expert goes to a shared expert: where the target has none its update is refused
/// (`--modules` leaves it out), and where the source has none the target's stays untouched.
#[test]
fn a_shared_expert_pairs_only_with_a_shared_expert() {
    let d = Dirs::new();
    let with_shared = layout("qwen2_moe", &[0]);
    with_shared.write(&d.p("qwen2"), 1);
    with_shared.adapter(&d.p("ad2"));
    let without = layout("qwen3_moe", &[0]);
    without.write(&d.p("qwen3"), 1);
    without.adapter(&d.p("ad3"));
    let j = job(
        &d.p("qwen2"),
        &d.p("qwen3"),
        &d.p("ad2"),
        &d.p("out"),
        Mode::Rotate,
    );
    let e = err_of(&j);
    assert!(
        e.contains("mlp.shared_expert.")
            && e.contains("shared expert of source layer 1")
            && e.contains("--modules ")
            && !e.contains("shared_expert.gate_proj,"),
        "{e}"
    );
    assert!(!d.p("out").exists());
    // The hint's list carries everything else.
    let list = e.rsplit_once("--modules ").unwrap().1.trim().to_string();
    let mut left_out = j.clone();
    left_out.options.modules = Some(list.split(',').map(String::from).collect());
    let report = transfer::run(&left_out).unwrap();
    assert_eq!(
        report.modules.len(),
        with_shared.modules(0).len() + without.modules(1).len()
    );
    std::fs::remove_dir_all(d.p("out")).unwrap();
    // The other way, the target's shared expert takes nothing and is not written.
    transfer::run(&job(
        &d.p("qwen3"),
        &d.p("qwen2"),
        &d.p("ad3"),
        &d.p("out"),
        Mode::Rotate,
    ))
    .unwrap();
    let written = Adapter::open(&d.p("out")).unwrap();
    assert_eq!(
        written.modules.len(),
        without.modules(0).len() + without.modules(1).len()
    );
    assert!(written.modules.keys().all(|k| !k.contains("shared")));
}

/// A config may only name layer kinds the table can read: dense layers need a table with a dense
/// MLP, a shared expert one with a shared expert.
#[test]
fn configs_naming_blocks_the_table_lacks_are_refused() {
    let d = Dirs::new();
    moe_model(&d.p("mixtral"), "mixtral", 3, 1);
    edit_json(&d.p("mixtral/config.json"), |c| {
        c.insert("mlp_only_layers".into(), vec![0].into());
    });
    moe_model(&d.p("qwen3"), "qwen3_moe", 3, 1);
    moe_model(&d.p("shared"), "qwen3_moe", 3, 1);
    edit_json(&d.p("shared/config.json"), |c| {
        c.insert("shared_expert_intermediate_size".into(), 8.into());
    });
    moe_adapter(&d.p("ad"), "qwen3_moe", 3, false);
    for (model, words) in [
        ("mixtral", "dense MLPs in layers [0], which a mixtral model"),
        (
            "shared",
            "a shared expert beside the experts, which a qwen3_moe model",
        ),
    ] {
        let e = err_of(&job(
            &d.p("qwen3"),
            &d.p(model),
            &d.p("ad"),
            &d.p("out"),
            Mode::Rotate,
        ));
        let config = d.p(model).join("config.json");
        assert!(
            e.contains(words) && e.contains(&*config.to_string_lossy()),
            "{e}"
        );
    }
}

/// Latent attention (DeepSeek) carries projection for projection. A query through a latent
/// (`q_a_proj`, `q_b_proj`) has no counterpart in a model whose query is one `q_proj`: refused,
/// with the list that leaves it out. The map mode, which matches heads of q, k and v, is refused;
/// and a table with latent attention needs the config's latent sizes.
#[test]
fn latent_attention_pairs_projection_for_projection() {
    let d = Dirs::new();
    let v3 = layout("deepseek_v3", &[0]);
    v3.write(&d.p("v3"), 1);
    v3.adapter(&d.p("ad"));
    layout("deepseek_v2", &[0]).write(&d.p("v2"), 1);
    let j = job(
        &d.p("v3"),
        &d.p("v2"),
        &d.p("ad"),
        &d.p("out"),
        Mode::Rotate,
    );
    let e = err_of(&j);
    assert!(
        e.contains("self_attn.q_a_proj`")
            && e.contains("no `q_a_proj` there")
            && !e.contains("q_b_proj,"),
        "{e}"
    );
    let list = e.rsplit_once("--modules ").unwrap().1.trim().to_string();
    let mut left_out = j.clone();
    left_out.options.modules = Some(list.split(',').map(String::from).collect());
    let report = transfer::run(&left_out).unwrap();
    assert!(report
        .modules
        .iter()
        .all(|m| m.transferred && m.source_key == m.target_key));
    assert!(report.modules.iter().all(|m| !m.target_key.contains("q_")));
    std::fs::remove_dir_all(d.p("out")).unwrap();

    let e = err_of(&job(
        &d.p("v3"),
        &d.p("v3"),
        &d.p("ad"),
        &d.p("out"),
        Mode::Map,
    ));
    assert!(
        e.contains("latent attention") && e.contains("--mode"),
        "{e}"
    );
    edit_json(&d.p("v3/config.json"), |c| {
        c.remove("kv_lora_rank");
    });
    let e = err_of(&job(
        &d.p("v3"),
        &d.p("v2"),
        &d.p("ad"),
        &d.p("out"),
        Mode::Rotate,
    ));
    assert!(
        e.contains("kv_lora_rank") && e.contains("config.json"),
        "{e}"
    );
}

/// A layer pair of different MLP kinds is refused only where the adapter has an MLP update in the
/// source layer: an adapter on the expert layer alone carries onto a model whose layers all
/// have experts. The refusal's attention list is the latent one for DeepSeek.
#[test]
fn layers_of_different_kinds_are_refused_only_where_an_update_would_be_lost() {
    let d = Dirs::new();
    let source = layout("deepseek_v3", &[0]);
    source.write(&d.p("src"), 1);
    // The same weights in layer 1 (its experts find themselves), experts in layer 0 too.
    layout("deepseek_v3", &[]).write(&d.p("tgt"), 1);
    source.adapter(&d.p("all"));
    let e = err_of(&job(
        &d.p("src"),
        &d.p("tgt"),
        &d.p("all"),
        &d.p("out"),
        Mode::Rotate,
    ));
    assert!(
        e.contains("--modules q_a_proj,q_b_proj,kv_a_proj_with_mqa,kv_b_proj,o_proj"),
        "{e}"
    );
    // Onto a standard attention (Qwen3-MoE's layout), only o_proj pairs with latent attention:
    // the list the refusal gives carries, with the attention's k and v left alone.
    let qwen = Layout {
        family: "qwen3_moe",
        experts: 3,
        dense: vec![],
    };
    qwen.write(&d.p("qwen"), 1);
    let j = job(
        &d.p("src"),
        &d.p("qwen"),
        &d.p("all"),
        &d.p("out"),
        Mode::Align,
    );
    let e = err_of(&j);
    let list = e
        .split("--modules ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap();
    assert_eq!(list.trim_end_matches(','), "o_proj", "{e}");
    let mut attention = j;
    attention.options.modules = Some(vec!["o_proj".into()]);
    transfer::run(&attention).unwrap();
    std::fs::remove_dir_all(d.p("out")).unwrap();
    let module = "model.layers.1.mlp.experts.2.up_proj";
    one_module_adapter(&d.p("one"), "deepseek_v3", module, DIMS.5, DIMS.0);
    let report = transfer::run(&job(
        &d.p("src"),
        &d.p("tgt"),
        &d.p("one"),
        &d.p("out"),
        Mode::Rotate,
    ))
    .unwrap();
    assert_eq!(carried(&report), [format!("{module}.weight")]);
}

/// A fused source module whose parts the target layer cannot all take (Phi-3's `qkv_proj` onto
/// latent attention, which has a `q_proj` but no k or v) is refused naming the parts, with the
/// list that carries the rest.
#[test]
fn fused_parts_without_a_counterpart_are_refused() {
    let d = Dirs::new();
    let (h, inter, heads, kv, dim, _) = DIMS;
    let mut t = BTreeMap::new();
    for l in 0..LAYERS {
        for (s, (name, out, inp)) in [
            ("self_attn.qkv_proj", (heads + 2 * kv) * dim, h),
            ("self_attn.o_proj", h, heads * dim),
            ("mlp.gate_up_proj", 2 * inter, h),
            ("mlp.down_proj", h, inter),
        ]
        .into_iter()
        .enumerate()
        {
            let w = gaussian(out, inp, 5, (l * 10 + s) as u64);
            t.insert(format!("model.layers.{l}.{name}.weight"), weight(&w));
        }
    }
    let model = TinyModel {
        model_type: "phi3",
        hidden: h,
        intermediate: inter,
        layers: LAYERS,
        heads,
        kv_heads: kv,
        head_dim: dim,
    };
    write_checkpoint(&d.p("phi3"), &model, &t, FloatType::F32);
    layout("deepseek_v2", &[0]).write(&d.p("v2"), 1);
    let module = "model.layers.0.self_attn.qkv_proj";
    one_module_adapter(&d.p("ad"), "phi3", module, (heads + 2 * kv) * dim, h);
    let j = job(
        &d.p("phi3"),
        &d.p("v2"),
        &d.p("ad"),
        &d.p("out"),
        Mode::Align,
    );
    let e = err_of(&j);
    assert!(
        e.contains("`k_proj`, `v_proj` of source layer 0") && e.ends_with("--modules q_proj"),
        "{e}"
    );
    // Naming the parts does not hide the left-over ones: k and v are still refused.
    let mut parts = j.clone();
    parts.options.modules = Some(
        ["q_proj", "k_proj", "v_proj", "o_proj"]
            .map(String::from)
            .to_vec(),
    );
    let e = err_of(&parts);
    assert!(
        e.contains("`k_proj`, `v_proj`") && e.ends_with("--modules q_proj"),
        "{e}"
    );
    let mut q_only = j;
    q_only.options.modules = Some(vec!["q_proj".into()]);
    let report = transfer::run(&q_only).unwrap();
    assert_eq!(carried(&report), ["model.layers.0.self_attn.q_proj.weight"]);
}

/// `synth adapter` on layered mixtures: each layer's own modules (a dense MLP or experts and the
/// shared expert; the query through its latent), and `--targets gate_proj` every gate projection,
/// named as PEFT's users name it.
#[test]
fn synthetic_adapters_follow_each_layers_blocks() {
    use loraxfer::synth::{write_adapter, AdapterSpec};
    let d = Dirs::new();
    let model = layout("deepseek_v3", &[0]);
    model.write(&d.p("m"), 1);
    std::fs::create_dir_all(d.p("all")).unwrap();
    write_adapter(&d.p("m"), &AdapterSpec::default(), &d.p("all")).unwrap();
    let all = Adapter::open(&d.p("all")).unwrap();
    let want: BTreeSet<String> = (0..LAYERS)
        .flat_map(|l| {
            model
                .modules(l)
                .into_iter()
                .map(move |m| format!("model.layers.{l}.{}", m.0))
        })
        .collect();
    assert_eq!(all.modules.keys().cloned().collect::<BTreeSet<_>>(), want);

    std::fs::create_dir_all(d.p("gate")).unwrap();
    let spec = AdapterSpec {
        targets: vec!["gate_proj".into()],
        ..AdapterSpec::default()
    };
    write_adapter(&d.p("m"), &spec, &d.p("gate")).unwrap();
    let gate = Adapter::open(&d.p("gate")).unwrap();
    assert_eq!(gate.modules.len(), 1 + model.experts + 1);
    assert!(gate.modules.keys().all(|k| k.ends_with("gate_proj")));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.p("gate/adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(config["target_modules"], serde_json::json!(["gate_proj"]));
    // A type the config leaves out of every layer is refused, not written as an empty adapter.
    let spec = AdapterSpec {
        targets: vec!["q_proj".into()],
        ..AdapterSpec::default()
    };
    std::fs::create_dir_all(d.p("none")).unwrap();
    let e = write_adapter(&d.p("m"), &spec, &d.p("none"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("--targets") && e.contains("q_proj"), "{e}");
}

/// `inspect` compares what pairs: DeepSeek-V3 against a V2-Lite layout measures every module
/// but the query latent's, which has no counterpart, instead of refusing it.
#[test]
fn inspect_compares_the_modules_that_pair() {
    let d = Dirs::new();
    layout("deepseek_v3", &[0]).write(&d.p("v3"), 1);
    let v2 = layout("deepseek_v2", &[0]);
    v2.write(&d.p("v2"), 1);
    let (stdout, _) = common::cli::ok(&[
        "inspect",
        "--source-base",
        common::cli::s(&d.p("v3")),
        "--target-base",
        common::cli::s(&d.p("v2")),
        "--rank",
        "8",
        "--json",
    ]);
    let ins: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let pairs = ins["pairs"].as_array().unwrap();
    // Every module of the V2-Lite layout but its `q_proj`, in both layers.
    let per_layer = |l| v2.modules(l).len() - 1;
    assert_eq!(pairs.len(), per_layer(0) + per_layer(1));
    assert!(pairs
        .iter()
        .all(|p| !p["module"].as_str().unwrap().starts_with("q_")));
}
