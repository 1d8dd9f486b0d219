//! Mixture-of-experts models (Qwen3-MoE, Mixtral, OLMoE): the config's expert count and width, one
//! module per expert, expert e's update from the source's expert e and no other, and clear
//! refusals where experts have no counterpart (a dense model, another expert count, the map mode).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::refusals::edit_json;
use common::*;
use faer::Mat;
use loraxfer::arch;
use loraxfer::io::adapter::Adapter;
use loraxfer::io::checkpoint::ModelConfig;
use loraxfer::io::safetensors::FloatType;
use loraxfer::modes::Mode;
use loraxfer::plan::Options;
use loraxfer::transfer::{self, Job};

// hidden, dense MLP width, heads, kv heads, head_dim, expert width.
const DIMS: (usize, usize, usize, usize, usize, usize) = (32, 48, 4, 2, 8, 12);
const LAYERS: usize = 2;

/// A mixture-of-experts checkpoint: `family` picks the names (`qwen3_moe`: `mlp.experts.E.*_proj`,
/// `mixtral`: `block_sparse_moe.experts.E.w1|w2|w3`), `experts` the count; `seed` the weights.
fn moe_model(dir: &Path, family: &'static str, experts: usize, seed: u64) {
    moe_model_with(dir, family, &(0..experts).collect::<Vec<_>>(), seed, DIMS.0);
}

/// The same, with the model of `seed`'s experts `kept` (in this order: an expert-pruned model
/// when they are fewer) at hidden size `h`.
fn moe_model_with(dir: &Path, family: &'static str, kept: &[usize], seed: u64, h: usize) {
    let (_, inter, heads, kv, d, width) = DIMS;
    let experts = kept.len();
    let mut t = BTreeMap::new();
    for l in 0..LAYERS {
        for (s, (name, out, inp)) in attention(h).into_iter().enumerate() {
            let w = gaussian(out, inp, seed, (l * 100 + s) as u64);
            t.insert(format!("model.layers.{l}.{name}.weight"), weight(&w));
        }
        let router = gaussian(16, h, seed, (l * 100 + 99) as u64);
        let rows = Mat::from_fn(experts, h, |k, c| router[(kept[k], c)]);
        let block = if family == "mixtral" {
            "block_sparse_moe"
        } else {
            "mlp"
        };
        t.insert(
            format!("model.layers.{l}.{block}.gate.weight"),
            weight(&rows),
        );
        for (k, &e) in kept.iter().enumerate() {
            for (s, (name, out, inp)) in expert_modules(family, k, width, h).into_iter().enumerate()
            {
                let w = gaussian(out, inp, seed, (l * 100 + 10 + e * 3 + s) as u64);
                t.insert(format!("model.layers.{l}.{name}.weight"), weight(&w));
            }
        }
    }
    let model = TinyModel {
        model_type: family,
        hidden: h,
        intermediate: inter,
        layers: LAYERS,
        heads,
        kv_heads: kv,
        head_dim: d,
    };
    write_checkpoint(dir, &model, &t, FloatType::F32);
    edit_json(&dir.join("config.json"), |c| match family {
        "mixtral" => {
            c.insert("num_local_experts".into(), experts.into());
            c.insert("intermediate_size".into(), width.into());
        }
        _ => {
            c.insert("num_experts".into(), experts.into());
            c.insert("moe_intermediate_size".into(), width.into());
        }
    });
}

fn weight(w: &Mat<f32>) -> (Vec<f32>, Vec<usize>) {
    (row_major(w), vec![w.nrows(), w.ncols()])
}

/// The attention projections of a layer at hidden size `h`: (key, out, in).
fn attention(h: usize) -> Vec<(String, usize, usize)> {
    let (_, _, heads, kv, d, _) = DIMS;
    [
        ("q", heads * d, h),
        ("k", kv * d, h),
        ("v", kv * d, h),
        ("o", h, heads * d),
    ]
    .into_iter()
    .map(|(p, out, inp)| (format!("self_attn.{p}_proj"), out, inp))
    .collect()
}

/// Expert `e`'s gate, up and down under `family`'s names: (key, out, in).
fn expert_modules(family: &str, e: usize, width: usize, h: usize) -> Vec<(String, usize, usize)> {
    let names = match family {
        "mixtral" => [
            ("block_sparse_moe", "w1"),
            ("block_sparse_moe", "w3"),
            ("block_sparse_moe", "w2"),
        ],
        _ => [
            ("mlp", "gate_proj"),
            ("mlp", "up_proj"),
            ("mlp", "down_proj"),
        ],
    };
    let shapes = [(width, h), (width, h), (h, width)];
    names
        .iter()
        .zip(shapes)
        .map(|(&(block, n), (out, inp))| (format!("{block}.experts.{e}.{n}"), out, inp))
        .collect()
}

/// A PEFT adapter on `family` with every attention module and every expert's modules, each
/// expert's factors its own.
fn moe_adapter(dir: &Path, family: &str, experts: usize, with_experts: bool) {
    let mut modules = BTreeMap::new();
    for l in 0..LAYERS {
        let mut all = attention(DIMS.0);
        if with_experts {
            for e in 0..experts {
                all.extend(expert_modules(family, e, DIMS.5, DIMS.0));
            }
        }
        for (s, (name, out, inp)) in all.into_iter().enumerate() {
            let seed = (l * 1000 + s) as u64;
            modules.insert(
                format!("model.layers.{l}.{name}"),
                random_factors(out, inp, 4, 8.0, seed, FloatType::F32),
            );
        }
    }
    write_peft(dir, family, 4, 8.0, serde_json::json!({}), &modules);
}

fn job(source: &Path, target: &Path, adapter: &Path, out: &Path, mode: Mode) -> Job {
    let options = Options {
        mode,
        rank: 64,
        oversample: 4,
        ..Options::default()
    };
    cpu_job(source, target, adapter, out, options)
}

/// An adapter on `base` (a model type) with one module of shape `out × inp`.
fn one_module_adapter(dir: &Path, base: &str, module: &str, out: usize, inp: usize) {
    let mut modules = BTreeMap::new();
    let f = random_factors(out, inp, 2, 4.0, 1, FloatType::F32);
    modules.insert(module.to_string(), f);
    write_peft(dir, base, 2, 4.0, serde_json::json!({}), &modules);
}

struct Dirs {
    _tmp: tempfile::TempDir,
    root: PathBuf,
}

impl Dirs {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        Dirs {
            root: tmp.path().to_path_buf(),
            _tmp: tmp,
        }
    }
    fn p(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }
}

fn err_of(j: &Job) -> String {
    transfer::run(j).unwrap_err().to_string()
}

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
    for (extra, field) in [
        (r#", "num_experts": -1"#, "num_experts"),
        (r#", "num_local_experts": 2.5"#, "num_local_experts"),
        (
            r#", "num_experts": 4, "moe_intermediate_size": 0"#,
            "moe_intermediate_size",
        ),
        (
            r#", "num_experts": 4, "mlp_only_layers": [1]"#,
            "mlp_only_layers",
        ),
        (
            r#", "num_experts": 4, "decoder_sparse_step": 2"#,
            "decoder_sparse_step",
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
    assert_eq!(qwen.module("down_proj").unwrap().shape(&c), (8, 6));
    assert_eq!(qwen.module("q_proj").unwrap().shape(&c), (8, 8));
    assert_eq!(
        qwen.module("up_proj").unwrap().instances(&c),
        vec![Some(0), Some(1), Some(2)]
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
        assert!(e.contains("expert module `m`"), "{key}: {e}");
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

/// Onto a drifted release, rotate pairs expert e with expert e (the report says so for every
/// module), keeps each expert's update size, and a Mixtral with the same weights under its own
/// names receives the same updates under its names.
#[test]
fn experts_pair_by_index_across_releases_and_layouts() {
    let d = Dirs::new();
    moe_model(&d.p("src"), "qwen3_moe", 2, 1);
    moe_model(&d.p("tgt"), "qwen3_moe", 2, 2);
    moe_model(&d.p("mix"), "mixtral", 2, 1);
    moe_adapter(&d.p("ad"), "qwen3_moe", 2, true);
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
    assert_eq!(experts_seen.len(), 2);
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
/// an expert share it.
#[test]
fn pruned_and_upcycled_experts_find_theirs_by_router() {
    let d = Dirs::new();
    moe_model(&d.p("full"), "qwen3_moe", 4, 1);
    moe_adapter(&d.p("ad"), "qwen3_moe", 4, true);
    let source = Adapter::open(&d.p("ad")).unwrap();
    for (name, kept) in [("pruned", vec![2, 0, 3]), ("upcycled", vec![1, 1, 0, 2, 3])] {
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

/// Experts have no counterpart in a dense model or in one of another expert count: refused,
/// naming both models and the attention-only transfer, which then works.
#[test]
fn experts_without_a_counterpart_are_refused() {
    let d = Dirs::new();
    moe_model(&d.p("moe3"), "qwen3_moe", 3, 1);
    moe_model_with(&d.p("moe2"), "qwen3_moe", &[0, 1], 1, 40);
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
        transfer::run(&j).unwrap();
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

/// PEFT's LoRA on fused experts (`target_parameters`): per expert, A in rows `e·r..(e+1)·r` of
/// the stacked A, B in columns `k·E + e` of the stacked B; `gate_up_proj`'s rows the gate's then
/// the up projection's. Written here from per-expert factors in that layout, it reads back as
/// them, one module per expert, under the names of the source's table (Mixtral's too), and
/// transfers as them.
#[test]
fn a_lora_on_fused_experts_reads_one_module_per_expert() {
    let (h, width, r, experts) = (DIMS.0, DIMS.5, 3, 2);
    let d = Dirs::new();
    let per_expert: Vec<[Mat<f32>; 4]> = (0..experts)
        .map(|e| {
            let s = 10 * e as u64;
            [
                gaussian(r, h, 7, s),             // gate_up's A
                gaussian(2 * width, r, 7, s + 1), // gate_up's B: gate rows, then up rows
                gaussian(r, width, 7, s + 2),     // down's A
                gaussian(h, r, 7, s + 3),         // down's B
            ]
        })
        .collect();
    // PEFT's stacking: A's blocks one after the other, B's columns interleaved by expert.
    let stack = |which: usize| {
        let a = &per_expert[0][which];
        Mat::from_fn(r * experts, a.ncols(), |i, c| {
            per_expert[i / r][which][(i % r, c)]
        })
    };
    let interleave = |which: usize| {
        let b = &per_expert[0][which];
        Mat::from_fn(b.nrows(), r * experts, |o, j| {
            per_expert[j % experts][which][(o, j / experts)]
        })
    };
    let factors = |a: Mat<f32>, b: Mat<f32>| loraxfer::io::adapter::LoraFactors {
        r: a.nrows(),
        in_features: a.ncols(),
        out_features: b.nrows(),
        a: row_major(&a),
        b: row_major(&b),
        alpha: 6.0,
        ty: FloatType::F32,
    };
    let mut modules = BTreeMap::new();
    for l in 0..LAYERS {
        // The second parameter wrapped sits on the first wrapper's `base_layer`.
        modules.insert(
            format!("model.layers.{l}.mlp.experts"),
            factors(stack(2), interleave(3)),
        );
        modules.insert(
            format!("model.layers.{l}.mlp.experts.base_layer"),
            factors(stack(0), interleave(1)),
        );
    }
    let extra = serde_json::json!({"target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]});
    write_peft(&d.p("fused"), "qwen3_moe", r, 6.0, extra, &modules);

    let adapter = Adapter::open(&d.p("fused")).unwrap();
    assert_eq!(adapter.modules.len(), LAYERS * experts * 3);
    for (e, [a_gu, b_gu, a_down, b_down]) in per_expert.iter().enumerate() {
        for (part, a, b) in [
            ("gate_proj", a_gu, b_gu.subrows(0, width).to_owned()),
            ("up_proj", a_gu, b_gu.subrows(width, width).to_owned()),
            ("down_proj", a_down, b_down.clone()),
        ] {
            let f = adapter
                .factors(&format!("model.layers.1.mlp.experts.{e}.{part}"))
                .unwrap();
            assert_eq!((f.r, f.alpha), (r, 6.0));
            assert_eq!(
                (f.a, f.b),
                (row_major(a), row_major(&b)),
                "expert {e} {part}"
            );
        }
    }
    // Transferred from a Mixtral, whose checkpoint names the experts `block_sparse_moe.…w1`.
    for family in ["qwen3_moe", "mixtral"] {
        let base = d.p(family);
        moe_model(&base, family, experts, 1);
        let out = d.p(&format!("{family}-out"));
        transfer::run(&job(&base, &base, &d.p("fused"), &out, Mode::Copy)).unwrap();
        let written = Adapter::open(&out).unwrap();
        assert_eq!(written.modules.len(), adapter.modules.len());
        let names = expert_modules(family, 1, width, h);
        for (k, part) in ["gate_proj", "up_proj", "down_proj"]
            .into_iter()
            .enumerate()
        {
            let want = update_of(&adapter, &format!("model.layers.0.mlp.experts.1.{part}"));
            let got = update_of(&written, &format!("model.layers.0.{}", names[k].0));
            assert!(fro(&(&got - &want)) / fro(&want) < 1e-5, "{family} {part}");
        }
        let config = common::cli::read_json(&out.join("adapter_config.json"));
        assert!(config["target_parameters"].is_null());
    }
    // Shapes that fit no reading are refused, naming the tensor.
    let mut odd = modules.clone();
    odd.insert(
        "model.layers.0.mlp.experts".into(),
        factors(stack(2), interleave(3).subcols(0, 5).to_owned()),
    );
    odd.get_mut("model.layers.0.mlp.experts")
        .unwrap()
        .a
        .truncate(5 * width);
    odd.get_mut("model.layers.0.mlp.experts").unwrap().r = 5;
    let extra = serde_json::json!({"target_parameters": ["gate_up_proj", "down_proj"]});
    write_peft(&d.p("odd"), "qwen3_moe", r, 6.0, extra, &odd);
    let e = Adapter::open(&d.p("odd")).unwrap_err().to_string();
    assert!(
        e.contains("model.layers.0.mlp.experts.lora_A.weight")
            && e.contains("not r = 3 (adapter_config.json) per expert"),
        "{e}"
    );
}
