//! Hybrid attention (Qwen3.5): linear attention (Gated DeltaNet) in the layers the config names,
//! softmax attention with a gated query (`q_proj` twice as tall) in the others, in a multimodal
//! checkpoint (`model.language_model.layers`) whose causal-LM class names its modules
//! `model.layers`: the config's layer kinds, synthetic adapters and transfers that carry both
//! kinds, layers paired by kind, and the pairings that cannot be made refused with the reason.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use common::moe::Dirs;
use common::*;
use faer::Mat;
use loraxfer::io::adapter::{Adapter, LoraFactors};
use loraxfer::io::checkpoint::ModelConfig;
use loraxfer::io::safetensors::{pt_metadata, write_file, FloatType, OutTensor};
use loraxfer::modes::Mode;
use loraxfer::plan::Options;
use loraxfer::synth::{write_adapter, AdapterSpec};
use loraxfer::transfer;

const HIDDEN: usize = 32;
const INTER: usize = 48;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 8;
/// Linear attention: key heads, value heads, key and value head sizes.
const LINEAR: (usize, usize, usize, usize) = (2, 4, 8, 6);

fn text_config(layers: usize) -> serde_json::Value {
    let (kh, vh, kd, vd) = LINEAR;
    serde_json::json!({
        "model_type": "qwen3_5_text",
        "hidden_size": HIDDEN, "intermediate_size": INTER, "num_hidden_layers": layers,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM,
        "linear_num_key_heads": kh, "linear_num_value_heads": vh,
        "linear_key_head_dim": kd, "linear_value_head_dim": vd, "vocab_size": 64,
    })
}

/// Whether layer `l` has softmax attention (transformers' default: every fourth).
fn full(l: usize) -> bool {
    (l + 1) % 4 == 0
}

/// How a test checkpoint is laid out.
#[derive(Clone, Copy, PartialEq)]
enum Layout {
    /// A multimodal Qwen3.5 release (`model.language_model.layers`).
    Multimodal,
    /// Qwen3.5's text model, as `Qwen3_5ForCausalLM` saves it.
    Text,
    /// Qwen3: softmax attention in every layer, an ungated query.
    Qwen3,
}

/// The projections of layer `l` (key below the layer, out, in).
fn projections(l: usize, layout: Layout) -> Vec<(String, usize, usize)> {
    let (kh, vh, kd, vd) = LINEAR;
    let gate = if layout == Layout::Qwen3 { 1 } else { 2 };
    let attention: Vec<(&str, usize, usize)> = if full(l) || layout == Layout::Qwen3 {
        vec![
            ("self_attn.q_proj", gate * HEADS * HEAD_DIM, HIDDEN),
            ("self_attn.k_proj", KV_HEADS * HEAD_DIM, HIDDEN),
            ("self_attn.v_proj", KV_HEADS * HEAD_DIM, HIDDEN),
            ("self_attn.o_proj", HIDDEN, HEADS * HEAD_DIM),
        ]
    } else {
        vec![
            ("linear_attn.in_proj_qkv", 2 * kh * kd + vh * vd, HIDDEN),
            ("linear_attn.in_proj_z", vh * vd, HIDDEN),
            ("linear_attn.in_proj_b", vh, HIDDEN),
            ("linear_attn.in_proj_a", vh, HIDDEN),
            ("linear_attn.out_proj", HIDDEN, vh * vd),
        ]
    };
    let mlp = [
        ("mlp.gate_proj", INTER, HIDDEN),
        ("mlp.up_proj", INTER, HIDDEN),
        ("mlp.down_proj", HIDDEN, INTER),
    ];
    (attention.into_iter().chain(mlp))
        .map(|(k, o, i)| (k.to_string(), o, i))
        .collect()
}

/// A multimodal Qwen3.5 checkpoint of `layers` layers (its language model's weights only).
fn write_model(dir: &Path, layers: usize, seed: u64) {
    write_layout(dir, layers, seed, Layout::Multimodal)
}

fn write_layout(dir: &Path, layers: usize, seed: u64, layout: Layout) {
    std::fs::create_dir_all(dir).unwrap();
    let mut text = text_config(layers);
    let (config, prefix) = match layout {
        Layout::Multimodal => (
            serde_json::json!({
                "model_type": "qwen3_5",
                "architectures": ["Qwen3_5ForConditionalGeneration"],
                "text_config": text,
            }),
            "model.language_model",
        ),
        Layout::Text => (text, "model"),
        Layout::Qwen3 => {
            text["model_type"] = "qwen3".into();
            for k in ["linear_num_key_heads", "linear_num_value_heads"] {
                text.as_object_mut().unwrap().remove(k);
            }
            (text, "model")
        }
    };
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let mut tensors = vec![(
        format!("{prefix}.embed_tokens.weight"),
        row_major(&gaussian(64, HIDDEN, seed, 0)),
        vec![64, HIDDEN],
    )];
    for l in 0..layers {
        for (s, (key, out, inp)) in projections(l, layout).into_iter().enumerate() {
            let w = gaussian(out, inp, seed, (100 * l + s + 1) as u64);
            let w = row_major(&w).iter().map(|x| x * 0.05).collect();
            tensors.push((
                format!("{prefix}.layers.{l}.{key}.weight"),
                w,
                vec![out, inp],
            ));
        }
    }
    let out: Vec<(String, OutTensor)> = tensors
        .into_iter()
        .map(|(k, v, s)| (k, OutTensor::from_f32(v, s, FloatType::F32)))
        .collect();
    write_file(&dir.join("model.safetensors"), &out, pt_metadata()).unwrap();
}

/// Every module of an adapter on all projections, under the causal-LM names.
fn modules(layers: usize) -> BTreeSet<String> {
    (0..layers)
        .flat_map(|l| {
            projections(l, Layout::Text)
                .into_iter()
                .map(move |p| (l, p.0))
        })
        .map(|(l, key)| format!("model.layers.{l}.{key}"))
        .collect()
}

fn parse(config: serde_json::Value) -> loraxfer::error::Result<ModelConfig> {
    ModelConfig::parse(&config.to_string(), Path::new("config.json"))
}

#[test]
fn the_config_gives_each_layer_its_attention_kind() {
    let c = parse(text_config(8)).unwrap();
    let linear = c.linear.as_ref().unwrap();
    assert_eq!(linear.layers, [0, 1, 2, 4, 5, 6]);
    assert!(c.gated_query);
    let mut listed = text_config(3);
    listed["layer_types"] =
        serde_json::json!(["full_attention", "linear_attention", "full_attention"]);
    assert_eq!(parse(listed).unwrap().linear.unwrap().layers, [1]);
    let mut every_other = text_config(4);
    every_other["full_attention_interval"] = 2.into();
    assert_eq!(parse(every_other).unwrap().linear.unwrap().layers, [0, 2]);
    // A list of another length, or a kind transformers does not know, names the field.
    for bad in [
        serde_json::json!(["full_attention"]),
        serde_json::json!(["full_attention", "sliding_attention", "full_attention"]),
    ] {
        let mut c = text_config(3);
        c["layer_types"] = bad;
        let e = parse(c).unwrap_err().to_string();
        assert!(e.contains("`layer_types`") && e.contains("3 layers"), "{e}");
    }
    // Each key head serves a whole group of value heads.
    let mut uneven = text_config(4);
    uneven["linear_num_value_heads"] = 3.into();
    let e = parse(uneven).unwrap_err().to_string();
    assert!(
        e.contains("`linear_num_value_heads` = 3") && e.contains("`linear_num_key_heads` = 2"),
        "{e}"
    );
    let mut c = text_config(4);
    c.as_object_mut().unwrap().remove("linear_key_head_dim");
    let e = parse(c).unwrap_err().to_string();
    assert!(e.contains("linear_key_head_dim"), "{e}");
    // Qwen3.5-MoE gives no dense width: the experts' stands in.
    let mut moe = text_config(4);
    moe["model_type"] = "qwen3_5_moe_text".into();
    moe.as_object_mut().unwrap().remove("intermediate_size");
    moe["moe_intermediate_size"] = 24.into();
    moe["num_experts"] = 8.into();
    let c = parse(moe).unwrap();
    assert_eq!((c.intermediate_size, c.experts.unwrap().width), (24, 24));
    assert!(c.gated_query && c.linear.is_some());
    // Qwen3 has neither: its q_proj is heads · head_dim.
    let mut qwen3 = text_config(4);
    qwen3["model_type"] = "qwen3".into();
    for k in ["linear_num_key_heads", "linear_num_value_heads"] {
        qwen3.as_object_mut().unwrap().remove(k);
    }
    let c = parse(qwen3).unwrap();
    assert!(c.linear.is_none() && !c.gated_query);
}

/// `synth adapter` writes every module of both kinds under the causal-LM names; rotated onto a
/// drifted release, each module keeps its update's norm and is named the same.
#[test]
fn rotate_carries_both_kinds_under_the_causal_lm_names() {
    let d = Dirs::new();
    write_model(&d.p("base"), 4, 1);
    let release = loraxfer::synth::ModelSpec {
        derive_from: Some(d.p("base")),
        drift: 0.05,
        ..loraxfer::synth::ModelSpec::new(loraxfer::synth::Preset::ALL[0])
    };
    std::fs::create_dir_all(d.p("release")).unwrap();
    loraxfer::synth::write_model(&release, &d.p("release"), |_, _| {}).unwrap();
    std::fs::create_dir_all(d.p("lora")).unwrap();
    write_adapter(&d.p("base"), &AdapterSpec::default(), &d.p("lora")).unwrap();
    let lora = Adapter::open(&d.p("lora")).unwrap();
    assert_eq!(
        lora.modules.keys().cloned().collect::<BTreeSet<_>>(),
        modules(4)
    );
    // Top-8 subspaces: at a matrix's full rank the two spans are the whole space, and the
    // direct rotation between them the identity.
    let options = Options {
        mode: Mode::Rotate,
        rank: 8,
        ..Options::default()
    };
    let job = cpu_job(
        &d.p("base"),
        &d.p("release"),
        &d.p("lora"),
        &d.p("out"),
        options,
    );
    transfer::run(&job).unwrap();
    let out = Adapter::open(&d.p("out")).unwrap();
    assert_eq!(
        out.modules.keys().cloned().collect::<BTreeSet<_>>(),
        modules(4)
    );
    for module in modules(4) {
        let (want, got) = (update_of(&lora, &module), update_of(&out, &module));
        let (n, m) = (fro(&want), fro(&got));
        assert!((n - m).abs() <= 1e-4 * n, "{module}: {m} against {n}");
        let moved = Mat::from_fn(got.nrows(), got.ncols(), |i, j| got[(i, j)] - want[(i, j)]);
        assert!(
            fro(&moved) > 1e-3 * n,
            "{module} did not move: {} of {n}",
            fro(&moved)
        );
    }
    // The same adapter as made on the multimodal model (`model.language_model.layers`): the
    // output keeps those names, so that it loads on the model the adapter was trained on, and
    // the same updates.
    let multimodal = |name: &str| name.replace("model.layers.", "model.language_model.layers.");
    let renamed: BTreeMap<String, LoraFactors> = lora
        .read_all()
        .unwrap()
        .into_iter()
        .map(|(name, f)| (multimodal(&name), f))
        .collect();
    let first = renamed.values().next().unwrap();
    assert!(renamed
        .values()
        .all(|f| (f.r, f.alpha) == (first.r, first.alpha)));
    let (r, alpha) = (first.r, first.alpha);
    common::write_peft(
        &d.p("lora-mm"),
        "base",
        r,
        alpha,
        serde_json::json!({}),
        &renamed,
    );
    let job = cpu_job(
        &d.p("base"),
        &d.p("release"),
        &d.p("lora-mm"),
        &d.p("out-mm"),
        job.options.clone(),
    );
    transfer::run(&job).unwrap();
    let out_mm = Adapter::open(&d.p("out-mm")).unwrap();
    let names: BTreeSet<String> = modules(4).iter().map(|m| multimodal(m)).collect();
    assert_eq!(
        out_mm.modules.keys().cloned().collect::<BTreeSet<_>>(),
        names
    );
    for module in modules(4) {
        let (want, got) = (
            update_of(&out, &module),
            update_of(&out_mm, &multimodal(&module)),
        );
        let err = fro(&Mat::from_fn(got.nrows(), got.ncols(), |i, j| {
            got[(i, j)] - want[(i, j)]
        }));
        assert!(err <= 1e-5 * fro(&want), "{module}: {err}");
    }
    // Onto Qwen3.5's text model, stored (and loaded only) under `model.layers`, the same adapter
    // is written under those names.
    write_layout(&d.p("text"), 4, 1, Layout::Text);
    let job = cpu_job(
        &d.p("base"),
        &d.p("text"),
        &d.p("lora-mm"),
        &d.p("out-text"),
        job.options.clone(),
    );
    transfer::run(&job).unwrap();
    let out_text = Adapter::open(&d.p("out-text")).unwrap();
    assert_eq!(
        out_text.modules.keys().cloned().collect::<BTreeSet<_>>(),
        modules(4)
    );
}

/// Onto a deeper model each target layer takes a source layer of its kind; a layer map that
/// pairs softmax with linear attention is refused naming the module, the kind and the way out
/// (the map mode on hybrid models: `tests/map_hybrid.rs`).
#[test]
fn layers_pair_by_kind_or_are_refused() {
    let d = Dirs::new();
    write_model(&d.p("base"), 4, 1);
    write_model(&d.p("deeper"), 8, 2);
    std::fs::create_dir_all(d.p("lora")).unwrap();
    write_adapter(&d.p("base"), &AdapterSpec::default(), &d.p("lora")).unwrap();
    let options = |mode| Options {
        mode,
        rank: 8,
        ..Options::default()
    };
    let job = |out: &str, mode| {
        cpu_job(
            &d.p("base"),
            &d.p("deeper"),
            &d.p("lora"),
            &d.p(out),
            options(mode),
        )
    };
    let report = transfer::run(&job("out", Mode::Auto)).unwrap();
    // Neither model has a vocabulary to anchor the map on.
    let reason = report.auto_reason.clone().unwrap_or_default();
    assert!(
        report.mode == "align" && reason.contains("tokenizer.json"),
        "{reason}"
    );
    let pairs: BTreeMap<usize, usize> = report
        .layer_map
        .iter()
        .map(|(j, &i)| (j.parse().unwrap(), i))
        .collect();
    assert_eq!(pairs.len(), 8);
    assert!(pairs.iter().all(|(&j, &i)| full(j) == full(i)), "{pairs:?}");
    let out = Adapter::open(&d.p("out")).unwrap();
    assert_eq!(
        out.modules.keys().cloned().collect::<BTreeSet<_>>(),
        modules(8)
    );

    let mut by_hand = job("bad", Mode::Align);
    by_hand.options.layer_map = Some([(3, 0)].into());
    let e = transfer::run(&by_hand).unwrap_err().to_string();
    assert!(
        e.contains("`model.layers.0.linear_attn.")
            && e.contains("linear attention of source layer 0")
            && e.contains("layer 3 of this model")
            && e.contains("--layer-map"),
        "{e}"
    );
}

/// Between Qwen3.5 and a model without linear attention (Qwen3), in either direction, layers keep
/// the depth map's pairing (no pairing of kinds can help): the MLP goes layer to layer, and an
/// attention update with no module of its kind in the target layer is refused, naming it and
/// the `--modules` that leaves it out (no layer map would find it one).
#[test]
fn hybrid_and_softmax_models_pair_their_mlps_layer_to_layer() {
    let d = Dirs::new();
    write_layout(&d.p("qwen3_5"), 4, 1, Layout::Text);
    write_layout(&d.p("qwen3"), 4, 2, Layout::Qwen3);
    for (source, target, kind) in [
        ("qwen3_5", "qwen3", "linear attention"),
        ("qwen3", "qwen3_5", "`k_proj`"),
    ] {
        let lora = d.p(&format!("{source}-lora"));
        std::fs::create_dir_all(&lora).unwrap();
        write_adapter(&d.p(source), &AdapterSpec::default(), &lora).unwrap();
        let out = d.p(&format!("{source}-to-{target}"));
        let options = |modules: Option<Vec<String>>| Options {
            mode: Mode::Align,
            rank: 8,
            modules,
            ..Options::default()
        };
        let job = cpu_job(&d.p(source), &d.p(target), &lora, &out, options(None));
        let e = transfer::run(&job).unwrap_err().to_string();
        assert!(
            e.contains(kind) && e.contains("--modules") && !e.contains("--layer-map"),
            "{source} -> {target}: {e}"
        );
        let mlp = ["gate_proj", "up_proj", "down_proj"]
            .map(String::from)
            .to_vec();
        let job = cpu_job(&d.p(source), &d.p(target), &lora, &out, options(Some(mlp)));
        let report = transfer::run(&job).unwrap();
        let pairs: Vec<(String, usize)> = report.layer_map.clone().into_iter().collect();
        assert!(
            pairs.iter().all(|(j, i)| j.parse::<usize>().unwrap() == *i),
            "{pairs:?}"
        );
        let written = Adapter::open(&out).unwrap();
        let mlps = written
            .modules
            .keys()
            .filter(|m| m.contains(".mlp."))
            .count();
        assert_eq!(mlps, 4 * 3, "{source} -> {target}");
    }
}

/// A llama.cpp LoRA for a text-only Qwen3.5 checkpoint (`qwen3_5_text`): llama.cpp's `qwen35`
/// names, B's value-head rows and A's value-head columns in the converter's tiled order.
#[test]
fn a_lora_gguf_for_qwen3_5_moves_the_value_heads() {
    use loraxfer::io::gguf::header::parse;
    use loraxfer::io::gguf::reorder::Reorder;
    let d = Dirs::new();
    write_layout(&d.p("base"), 4, 1, Layout::Text);
    std::fs::create_dir_all(d.p("lora")).unwrap();
    write_adapter(&d.p("base"), &AdapterSpec::default(), &d.p("lora")).unwrap();
    let progress = loraxfer::progress::Progress::default();
    let out = d.p("lora.gguf");
    let exported =
        loraxfer::io::gguf::lora::export(&d.p("lora"), &d.p("base"), &out, false, &progress)
            .unwrap();
    assert_eq!(exported.architecture, "qwen35");
    let data = std::fs::read(&out).unwrap();
    let header = parse(&data).unwrap();
    let tensor = |name: &str| -> Vec<f32> {
        let t = header.tensors.iter().find(|t| t.name == name).unwrap();
        bytemuck::pod_collect_to_vec(&data[t.start..t.end])
    };
    let lora = Adapter::open(&d.p("lora")).unwrap();
    let (kh, vh, kd, vd) = LINEAR;
    let tiled = |start, dim| Reorder::TiledValueHeads {
        start,
        key_heads: kh,
        per_key: vh / kh,
        dim,
    };
    for (gguf, module, rows, columns) in [
        (
            "attn_qkv",
            "in_proj_qkv",
            Some(tiled(2 * kh * kd, vd)),
            None,
        ),
        ("attn_gate", "in_proj_z", Some(tiled(0, vd)), None),
        ("ssm_beta", "in_proj_b", Some(tiled(0, 1)), None),
        ("ssm_out", "out_proj", None, Some(tiled(0, vd))),
    ] {
        let f = lora
            .factors(&format!("model.layers.0.linear_attn.{module}"))
            .unwrap();
        let (a, b) = (
            tensor(&format!("blk.0.{gguf}.weight.lora_a")),
            tensor(&format!("blk.0.{gguf}.weight.lora_b")),
        );
        let (r, n, m) = (f.r, f.in_features, f.out_features);
        for row in 0..m {
            let at = rows.map_or(row, |o| o.stored(row, m));
            assert_eq!(
                b[at * r..(at + 1) * r],
                f.b[row * r..(row + 1) * r],
                "{module} B row {row}"
            );
        }
        for k in 0..r {
            for c in 0..n {
                let at = columns.map_or(c, |o| o.stored(c, n));
                assert_eq!(a[k * n + at], f.a[k * n + c], "{module} A column {c}");
            }
        }
        assert!(rows.is_none() || b != f.b, "{module}: B's rows moved");
        assert!(columns.is_none() || a != f.a, "{module}: A's columns moved");
    }
}
