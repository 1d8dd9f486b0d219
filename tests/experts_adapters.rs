//! Adapters for mixture-of-experts models beyond one module per expert: PEFT's LoRA on fused
//! experts (`target_parameters`) read one module per expert, and LoRA GGUFs whose experts are
//! stacked as llama.cpp holds them.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::moe::*;
use common::*;
use faer::Mat;
use loraxfer::io::adapter::Adapter;
use loraxfer::io::safetensors::FloatType;
use loraxfer::modes::Mode;
use loraxfer::transfer;

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
    write_peft(&d.p("fused"), "qwen3_moe", r, 6.0, extra.clone(), &modules);

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
    // An r that divides the stacked rows into another number of experts than the model's.
    write_peft(&d.p("r2"), "qwen3_moe", 2, 6.0, extra.clone(), &modules);
    let base = d.p("qwen3_moe");
    let e = transfer::run(&job(&base, &base, &d.p("r2"), &d.p("r2-out"), Mode::Copy))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("mlp.experts") && e.contains("stacks 3 experts") && e.contains("2 per layer"),
        "{e}"
    );
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

/// A LoRA GGUF for a mixture-of-experts base stacks each layer's experts into one tensor per
/// projection, as llama.cpp's converter does (`[in, r, experts]` A, `[r, out, experts]` B; expert
/// e in the e-th slice), zeros for an expert the adapter leaves alone; experts of other ranks
/// share the largest, the smaller padded with zeros.
#[test]
fn a_lora_gguf_stacks_the_experts_of_a_layer() {
    use loraxfer::io::gguf::header::parse;
    use loraxfer::io::safetensors::decode_f32;
    let (h, width) = (DIMS.0, DIMS.5);
    let d = Dirs::new();
    let export = |adapter: &Path, base: &Path, out: &Path| {
        let progress = loraxfer::progress::Progress::default();
        loraxfer::io::gguf::lora::export(adapter, base, out, false, &progress)
    };
    for (family, arch, gate) in [
        ("qwen3_moe", "qwen3moe", "mlp.experts.{e}.gate_proj"),
        ("mixtral", "llama", "block_sparse_moe.experts.{e}.w1"),
    ] {
        let base = d.p(family);
        moe_model(&base, family, 3, 1);
        // Experts 0 and 2 of layer 1's gate, nothing else.
        let mut modules = BTreeMap::new();
        for e in [0, 2] {
            let name = format!("model.layers.1.{}", gate.replace("{e}", &e.to_string()));
            modules.insert(
                name,
                random_factors(width, h, 2, 4.0, e as u64, FloatType::F32),
            );
        }
        let adapter = d.p(&format!("{family}-ad"));
        write_peft(&adapter, family, 2, 4.0, serde_json::json!({}), &modules);
        let out = d.p(&format!("{family}.gguf"));
        export(&adapter, &base, &out).unwrap();
        let data = std::fs::read(&out).unwrap();
        let header = parse(&data).unwrap();
        assert_eq!(header.metadata["general.architecture"].as_str(), Some(arch));
        let names: Vec<&str> = header.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "blk.1.ffn_gate_exps.weight.lora_a",
                "blk.1.ffn_gate_exps.weight.lora_b"
            ]
        );
        let (a, b) = (&header.tensors[0], &header.tensors[1]);
        assert_eq!(
            (a.dims.as_slice(), b.dims.as_slice()),
            ([h, 2, 3].as_slice(), [2, width, 3].as_slice())
        );
        let (a, b) = (
            decode_f32(&data[a.start..a.end], FloatType::F32),
            decode_f32(&data[b.start..b.end], FloatType::F32),
        );
        let (len_a, len_b) = (2 * h, 2 * width);
        for e in 0..3 {
            let (a_e, b_e) = (
                &a[e * len_a..(e + 1) * len_a],
                &b[e * len_b..(e + 1) * len_b],
            );
            match modules.get(&format!(
                "model.layers.1.{}",
                gate.replace("{e}", &e.to_string())
            )) {
                Some(f) => assert_eq!(
                    (a_e, b_e),
                    (f.a.as_slice(), f.b.as_slice()),
                    "{family} expert {e}"
                ),
                None => assert!(
                    a_e.iter().chain(b_e).all(|&x| x == 0.0),
                    "{family} expert {e}"
                ),
            }
        }
    }
    // Experts of other ranks share one tensor at the largest rank, the smaller padded with zero
    // ranks, each update kept: its scale over llama.cpp's (alpha / 3) folded into its B.
    let mut modules = BTreeMap::new();
    for (e, r) in [(0, 2), (1, 3)] {
        let name = format!("model.layers.0.mlp.experts.{e}.up_proj");
        modules.insert(name, random_factors(width, h, r, 4.0, 1, FloatType::F32));
    }
    let extra = serde_json::json!({"rank_pattern": {"model.layers.0.mlp.experts.1.up_proj": 3}});
    write_peft(&d.p("ranks"), "qwen3_moe", 2, 4.0, extra, &modules);
    export(&d.p("ranks"), &d.p("qwen3_moe"), &d.p("ranks.gguf")).unwrap();
    let data = std::fs::read(d.p("ranks.gguf")).unwrap();
    let header = parse(&data).unwrap();
    let (a, b) = (&header.tensors[0], &header.tensors[1]);
    assert_eq!(
        (a.dims.as_slice(), b.dims.as_slice()),
        ([h, 3, 3].as_slice(), [3, width, 3].as_slice())
    );
    let (a, b) = (
        decode_f32(&data[a.start..a.end], FloatType::F32),
        decode_f32(&data[b.start..b.end], FloatType::F32),
    );
    for (e, r) in [(0, 2), (1, 3)] {
        let f = &modules[&format!("model.layers.0.mlp.experts.{e}.up_proj")];
        let want = mm(
            from_row_major(&f.b, width, r).as_ref(),
            from_row_major(&f.a, r, h).as_ref(),
        ) * faer::Scale(4.0 / r as f32);
        let a_e = from_row_major(&a[e * 3 * h..(e + 1) * 3 * h], 3, h);
        let b_e = from_row_major(&b[e * 3 * width..(e + 1) * 3 * width], width, 3);
        let got = mm(b_e.as_ref(), a_e.as_ref()) * faer::Scale(4.0 / 3.0);
        assert!(fro(&(&got - &want)) <= 1e-5 * fro(&want), "expert {e}");
    }
    // A GGUF with experts of an architecture without a table is refused, saying which are read.
    let gguf = d.p("dbrx.gguf");
    use loraxfer::io::gguf::write::{write_file, MetaValue};
    let meta = [
        ("general.architecture", MetaValue::Str("dbrx")),
        ("dbrx.expert_count", MetaValue::U32(8)),
    ];
    write_file(&gguf, &meta, &[]).unwrap();
    let e = loraxfer::io::checkpoint::Checkpoint::open(&gguf)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("dbrx.gguf")
            && e.contains("`dbrx` with experts")
            && e.contains("qwen3moe, olmoe, qwen2moe, glm4moe, llama"),
        "{e}"
    );
}

/// A mixture-of-experts GGUF base: each layer's experts stacked in one tensor per projection
/// (`[in, out, experts]` in GGUF order), read one expert at a time under its Hugging Face name,
/// the router as `mlp.gate`, the experts in the config; a stack of another expert count than the
/// metadata's is refused, naming it.
#[test]
fn a_moe_gguf_base_reads_each_expert_from_its_rows() {
    use loraxfer::io::checkpoint::Checkpoint;
    use loraxfer::io::gguf::write::{write_file, GgufTensor, MetaValue};
    let (hidden, width, experts) = (8usize, 4usize, 3usize);
    let values = |n: usize, seed: u64| -> Vec<f32> { row_major(&gaussian(1, n, seed, 0)) };
    let write = |path: &Path, stack_count: usize| {
        // (GGUF name, dims fastest first, values)
        let mut tensors: Vec<(String, Vec<u64>, Vec<f32>)> = vec![
            ("token_embd.weight".into(), vec![8, 16], values(128, 1)),
            ("output_norm.weight".into(), vec![8], vec![1.0; 8]),
            ("blk.0.attn_norm.weight".into(), vec![8], vec![1.0; 8]),
            ("blk.0.ffn_norm.weight".into(), vec![8], vec![1.0; 8]),
            ("blk.0.attn_q.weight".into(), vec![8, 8], values(64, 2)),
            ("blk.0.attn_k.weight".into(), vec![8, 4], values(32, 3)),
            ("blk.0.attn_v.weight".into(), vec![8, 4], values(32, 4)),
            ("blk.0.attn_output.weight".into(), vec![8, 8], values(64, 5)),
            ("blk.0.attn_q_norm.weight".into(), vec![4], vec![1.0; 4]),
            ("blk.0.attn_k_norm.weight".into(), vec![4], vec![1.0; 4]),
            (
                "blk.0.ffn_gate_inp.weight".into(),
                vec![8, experts as u64],
                values(8 * experts, 6),
            ),
        ];
        for (k, (kind, dims)) in [("gate", [8u64, 4]), ("up", [8, 4]), ("down", [4, 8])]
            .into_iter()
            .enumerate()
        {
            let n = hidden * width * stack_count;
            let dims = vec![dims[0], dims[1], stack_count as u64];
            tensors.push((
                format!("blk.0.ffn_{kind}_exps.weight"),
                dims,
                values(n, 10 + k as u64),
            ));
        }
        let gguf: Vec<GgufTensor<'_>> = tensors
            .iter()
            .map(|(name, dims, v)| GgufTensor {
                name: name.clone(),
                dims: dims.clone(),
                ty: FloatType::F32,
                produce: Box::new(move || Ok(v.iter().flat_map(|x| x.to_le_bytes()).collect())),
            })
            .collect();
        let meta = [
            ("general.architecture", MetaValue::Str("qwen3moe")),
            ("qwen3moe.block_count", MetaValue::U32(1)),
            ("qwen3moe.embedding_length", MetaValue::U32(hidden as u32)),
            ("qwen3moe.feed_forward_length", MetaValue::U32(16)),
            ("qwen3moe.attention.head_count", MetaValue::U32(2)),
            ("qwen3moe.attention.head_count_kv", MetaValue::U32(1)),
            ("qwen3moe.attention.key_length", MetaValue::U32(4)),
            ("qwen3moe.expert_count", MetaValue::U32(experts as u32)),
            (
                "qwen3moe.expert_feed_forward_length",
                MetaValue::U32(width as u32),
            ),
        ];
        write_file(path, &meta, &gguf).unwrap();
        drop(gguf);
        tensors
    };
    let d = Dirs::new();
    let path = d.p("moe.gguf");
    let tensors = write(&path, experts);
    let ckpt = Checkpoint::open(&path).unwrap();
    let e = ckpt.config.experts.clone().unwrap();
    assert_eq!(
        (ckpt.config.model_type.as_str(), e.count, e.width),
        ("qwen3_moe", 3, 4)
    );
    let stack = |kind: &str| {
        &tensors
            .iter()
            .find(|t| t.0 == format!("blk.0.ffn_{kind}_exps.weight"))
            .unwrap()
            .2
    };
    for expert in 0..experts {
        for (kind, module, shape) in [("gate", "gate_proj", [4, 8]), ("down", "down_proj", [8, 4])]
        {
            let name = format!("model.layers.0.mlp.experts.{expert}.{module}.weight");
            assert_eq!(ckpt.shape(&name).unwrap(), shape, "{name}");
            let got = ckpt.read_rows_f32(&name, 0..shape[0]).unwrap();
            let n = hidden * width;
            assert_eq!(got, stack(kind)[expert * n..(expert + 1) * n], "{name}");
        }
    }
    assert_eq!(
        ckpt.shape("model.layers.0.mlp.gate.weight").unwrap(),
        [3, 8]
    );
    // A stack of two experts where the metadata says three.
    let bad = d.p("bad.gguf");
    write(&bad, 2);
    let e = Checkpoint::open(&bad).unwrap_err().to_string();
    assert!(
        e.contains("bad.gguf")
            && e.contains("blk.0.ffn_gate_exps.weight")
            && e.contains("expert_count = 3"),
        "{e}"
    );
}

/// The routing gates of a mixture of experts (the router, `mlp.gate`; Mixtral's
/// `block_sparse_moe.gate`; a shared expert's `shared_expert_gate`), which mlx-lm's default
/// LoRA and PEFT's `all-linear` with transformers 4 adapt, are not transferred: an adapter on
/// them is refused, naming the first and `--drop-router`; with it, they are left out, the report
/// names them, and the rest transfers as the same adapter without them.
#[test]
fn routing_gate_updates_are_refused_or_left_out_by_name() {
    let (h, experts) = (DIMS.0, 3);
    let d = Dirs::new();
    moe_model(&d.p("src"), "qwen3_moe", experts, 1);
    moe_model(&d.p("tgt"), "qwen3_moe", experts, 2);
    moe_adapter(&d.p("plain"), "qwen3_moe", experts, true);
    let plain = Adapter::open(&d.p("plain")).unwrap();
    let mut modules = plain.read_all().unwrap();
    for l in 0..LAYERS {
        let gate = random_factors(experts, h, 4, 8.0, 90 + l as u64, FloatType::F32);
        modules.insert(format!("model.layers.{l}.mlp.gate"), gate);
    }
    write_peft(
        &d.p("gated"),
        "qwen3_moe",
        4,
        8.0,
        serde_json::json!({}),
        &modules,
    );
    let options = |drop_router| loraxfer::plan::Options {
        mode: Mode::Rotate,
        rank: 64,
        oversample: 4,
        drop_router,
        ..Default::default()
    };
    let refused = err_of(&cpu_job(
        &d.p("src"),
        &d.p("tgt"),
        &d.p("gated"),
        &d.p("refused"),
        options(false),
    ));
    assert!(
        refused.contains("`model.layers.0.mlp.gate` (and 1 more) adapts a routing gate")
            && refused.contains("--drop-router"),
        "{refused}"
    );
    assert!(!d.p("refused").exists());
    let mut outs = Vec::new();
    for (adapter, dropped) in [("gated", 2), ("plain", 0)] {
        let out = d.p(&format!("out-{adapter}"));
        let job = cpu_job(&d.p("src"), &d.p("tgt"), &d.p(adapter), &out, options(true));
        let report = transfer::run(&job).unwrap();
        let want: Vec<String> = (0..dropped)
            .map(|l| format!("model.layers.{l}.mlp.gate"))
            .collect();
        assert_eq!(report.dropped_router_modules, want);
        outs.push(Adapter::open(&out).unwrap().read_all().unwrap());
    }
    assert_eq!(
        outs[0].keys().collect::<Vec<_>>(),
        outs[1].keys().collect::<Vec<_>>()
    );
    for (name, got) in &outs[0] {
        let want = &outs[1][name];
        assert!(got.a == want.a && got.b == want.b, "{name}");
    }
    // Mixtral's router, and a shared expert's gate, by name; the experts are not gates.
    moe_model(&d.p("mix"), "mixtral", experts, 1);
    let mix = loraxfer::io::checkpoint::Checkpoint::open(&d.p("mix")).unwrap();
    let side = loraxfer::plan::ModelSide::new(&mix).unwrap();
    for (name, gate) in [
        ("model.layers.1.block_sparse_moe.gate", true),
        ("model.layers.0.mlp.shared_expert_gate", true),
        ("model.layers.1.block_sparse_moe.experts.0.w1", false),
        ("model.layers.x.block_sparse_moe.gate", false),
        ("model.layers.1.self_attn.q_proj", false),
    ] {
        assert_eq!(side.is_routing_gate(name), gate, "{name}");
    }
}

/// `export-mlx` with the base: each stack holds as many experts as the base's layer has (an
/// expert without a module as zeros), found under `language_model` where a multimodal port keeps
/// the language model, for an adapter named as transformers 5 names it there; a base without the
/// stack refuses it, naming it.
#[test]
fn experts_exported_for_mlx_count_the_bases_experts() {
    use loraxfer::io::adapter::mlx_write::export;
    let (h, width, experts) = (DIMS.0, DIMS.5, 3);
    let d = Dirs::new();
    moe_model(&d.p("base"), "qwen3_moe", experts, 1);
    let mut modules = BTreeMap::new();
    let f = random_factors(width, h, 4, 8.0, 3, FloatType::F32);
    modules.insert("model.layers.1.mlp.experts.1.gate_proj".to_string(), f);
    write_peft(
        &d.p("ad"),
        "qwen3_moe",
        4,
        8.0,
        serde_json::json!({}),
        &modules,
    );
    let renamed = d.p("multimodal");
    moe_model(&renamed, "qwen3_moe", experts, 1);
    rewrite(&renamed.join("model.safetensors"), |tensors| {
        for t in tensors.iter_mut() {
            t.name = t
                .name
                .replacen("model.layers.", "language_model.model.layers.", 1);
        }
    });
    let lm_named = d.p("ad-lm");
    let f = random_factors(width, h, 4, 8.0, 3, FloatType::F32);
    let modules = BTreeMap::from([(
        "model.language_model.layers.1.mlp.experts.1.gate_proj".to_string(),
        f,
    )]);
    write_peft(
        &lm_named,
        "qwen3_moe",
        4,
        8.0,
        serde_json::json!({}),
        &modules,
    );
    for (adapter, base, stack) in [
        ("ad", "base", "model.layers.1.mlp.switch_mlp.gate_proj"),
        (
            "ad",
            "multimodal",
            "language_model.model.layers.1.mlp.switch_mlp.gate_proj",
        ),
        (
            "ad-lm",
            "multimodal",
            "language_model.model.layers.1.mlp.switch_mlp.gate_proj",
        ),
    ] {
        let out = d.p(&format!("mlx-{adapter}-{base}"));
        let written = export(&d.p(adapter), Some(&d.p(base)), &out, false).unwrap();
        assert_eq!(
            (written.keys.as_slice(), written.num_layers),
            (&["mlp.switch_mlp.gate_proj".to_string()][..], 1)
        );
        let file =
            loraxfer::io::safetensors::TensorFile::open(&out.join("adapters.safetensors")).unwrap();
        assert_eq!(
            file.entry(&format!("{stack}.lora_a")).unwrap().shape,
            [experts, 4, h]
        );
        let back = Adapter::open(&out).unwrap();
        let expert =
            |e: usize| stack.replace("switch_mlp.gate_proj", &format!("experts.{e}.gate_proj"));
        let source = Adapter::open(&d.p(adapter)).unwrap();
        let want = update_of(&source, source.modules.keys().next().unwrap());
        let err = fro(&(&update_of(&back, &expert(1)) - &want)) / fro(&want);
        assert!(err < 1e-6, "{adapter} onto {base}: off by {err}");
        for e in [0, 2] {
            assert_eq!(
                fro(&update_of(&back, &expert(e))),
                0.0,
                "{adapter} onto {base}: expert {e}"
            );
        }
    }
    // A base without those experts (kept elsewhere): no stack to put them in.
    moe_model(&d.p("dense"), "qwen3_moe", experts, 1);
    rewrite(&d.p("dense/model.safetensors"), |tensors| {
        for t in tensors.iter_mut() {
            t.name = t.name.replace(".experts.", ".other_experts.");
        }
    });
    let err = export(&d.p("ad"), Some(&d.p("dense")), &d.p("x"), false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("has no experts at `model.layers.1.mlp.experts.0.gate_proj`"),
        "{err}"
    );
    assert!(!d.p("x").exists());
}
