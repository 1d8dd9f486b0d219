//! Llama 4: experts stored fused as `[E, in, out]` (`feed_forward.experts.gate_up_proj`
//! `[E, hidden, 2·width]`, the gate's outputs first; `down_proj` `[E, width, hidden]`), a shared
//! expert beside them, dense layers `intermediate_size_mlp` wide where `moe_layers` leaves them,
//! and PEFT's LoRA on the fused parameters laid out the other way round (A `[r·E, out]`,
//! B `[in, r·E]`). `tests/interop/test_llama4.py` checks the same against transformers and PEFT.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::cli::{ok, s};
use loraxfer::io::adapter::{Adapter, ExpertsLayout, GateUpRows, LoraFactors};
use loraxfer::io::checkpoint::Checkpoint;
use loraxfer::io::config::ModelConfig;
use loraxfer::io::safetensors::{write_file, FloatType, OutTensor, TensorFile};

const HIDDEN: usize = 64;
const WIDTH: usize = 24;
const DENSE: usize = 40;
const EXPERTS: usize = 3;
const LAYERS: usize = 2;

fn values(n: usize, seed: u64) -> Vec<f32> {
    common::row_major(&common::gaussian(1, n, seed, 5))
}

/// A 2-layer Llama 4 (layer 0 dense, layer 1 experts and a shared expert); returns each layer-1
/// expert's (gate_up `[2·width, hidden]`, down `[hidden, width]`) as `[out, in]`.
fn llama4(dir: &Path, wrapper: bool) -> Vec<(Vec<f32>, Vec<f32>)> {
    std::fs::create_dir_all(dir).unwrap();
    let text = serde_json::json!({
        "model_type": "llama4_text", "hidden_size": HIDDEN, "intermediate_size": WIDTH,
        "intermediate_size_mlp": DENSE, "num_hidden_layers": LAYERS, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 32, "num_local_experts": EXPERTS,
        "num_experts_per_tok": 1, "interleave_moe_layer_step": 1, "moe_layers": [1],
    });
    let (config, prefix) = match wrapper {
        false => (text, "model"),
        true => (
            serde_json::json!({ "model_type": "llama4", "text_config": text }),
            "language_model.model",
        ),
    };
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let mut tensors: Vec<(String, OutTensor)> = Vec::new();
    let mut add = |name: String, shape: Vec<usize>, seed: u64| {
        let v = values(shape.iter().product(), seed);
        tensors.push((
            format!("{prefix}.{name}"),
            OutTensor::from_f32(v.clone(), shape, FloatType::F32),
        ));
        v
    };
    add("embed_tokens.weight".into(), vec![32, HIDDEN], 1);
    let mut experts = Vec::new();
    for l in 0..LAYERS {
        for (p, out) in [("q", 64), ("k", 32), ("v", 32), ("o", HIDDEN)] {
            let inp = if p == "o" { 64 } else { HIDDEN };
            add(
                format!("layers.{l}.self_attn.{p}_proj.weight"),
                vec![out, inp],
                10 + l as u64,
            );
        }
        let (mlp, width) = match l {
            0 => ("feed_forward", DENSE),
            _ => ("feed_forward.shared_expert", WIDTH),
        };
        add(
            format!("layers.{l}.{mlp}.gate_proj.weight"),
            vec![width, HIDDEN],
            20,
        );
        add(
            format!("layers.{l}.{mlp}.up_proj.weight"),
            vec![width, HIDDEN],
            21,
        );
        add(
            format!("layers.{l}.{mlp}.down_proj.weight"),
            vec![HIDDEN, width],
            22,
        );
        if l == 1 {
            add(
                format!("layers.{l}.feed_forward.router.weight"),
                vec![EXPERTS, HIDDEN],
                23,
            );
            let gate_up = add(
                format!("layers.{l}.feed_forward.experts.gate_up_proj"),
                vec![EXPERTS, HIDDEN, 2 * WIDTH],
                24,
            );
            let down = add(
                format!("layers.{l}.feed_forward.experts.down_proj"),
                vec![EXPERTS, WIDTH, HIDDEN],
                25,
            );
            // Stored [E, in, out]: expert e's [out, in] weight is its slab transposed.
            let turned = |t: &[f32], e: usize, inp: usize, out: usize| -> Vec<f32> {
                (0..out * inp)
                    .map(|i| t[(e * inp + i % inp) * out + i / inp])
                    .collect()
            };
            for e in 0..EXPERTS {
                experts.push((
                    turned(&gate_up, e, HIDDEN, 2 * WIDTH),
                    turned(&down, e, WIDTH, HIDDEN),
                ));
            }
        }
    }
    write_file(&dir.join("model.safetensors"), &tensors, None).unwrap();
    experts
}

#[test]
fn the_config_sizes_dense_layers_experts_and_the_shared_expert() {
    let text = |extra: &str| {
        format!(
            r#"{{"model_type": "llama4_text", "hidden_size": 64, "intermediate_size": 24,
                "intermediate_size_mlp": 40, "num_hidden_layers": 6, "num_attention_heads": 4,
                "num_local_experts": 3{extra}}}"#
        )
    };
    let parse = |extra: &str| ModelConfig::parse(&text(extra), Path::new("config.json")).unwrap();
    let c = parse(r#", "interleave_moe_layer_step": 2"#);
    assert_eq!(c.intermediate_size, 40);
    let e = c.experts.as_ref().unwrap();
    assert_eq!((e.count, e.width, e.shared_width), (3, 24, Some(24)));
    assert_eq!(e.dense_layers, [0, 2, 4]);
    // `moe_layers`, as transformers writes it, overrides the step.
    let c = parse(r#", "interleave_moe_layer_step": 2, "moe_layers": [0, 5]"#);
    assert_eq!(c.experts.unwrap().dense_layers, [1, 2, 3, 4]);
    // Neither: every layer has experts (Llama 4 Scout).
    assert!(parse("").experts.unwrap().dense_layers.is_empty());
    let bad = ModelConfig::parse(&text(r#", "moe_layers": [6]"#), Path::new("config.json"));
    let err = bad.unwrap_err().to_string();
    assert!(
        err.contains("`moe_layers`") && err.contains("below 6"),
        "{err}"
    );
}

#[test]
fn each_expert_reads_as_the_forward_uses_it_under_either_prefix() {
    for wrapper in [false, true] {
        let scratch = tempfile::tempdir().unwrap();
        let dir = scratch.path().join("base");
        let experts = llama4(&dir, wrapper);
        let prefix = if wrapper {
            "language_model.model"
        } else {
            "model"
        };
        let ckpt = Checkpoint::open(&dir).unwrap();
        for (e, (gate_up, down)) in experts.iter().enumerate() {
            let layer = format!("{prefix}.layers.1.feed_forward.experts.{e}");
            let read = |part: &str, rows: usize| {
                let name = format!("{layer}.{part}.weight");
                ckpt.read_rows_f32(&name, 0..rows).unwrap()
            };
            assert_eq!(
                read("gate_proj", WIDTH),
                gate_up[..WIDTH * HIDDEN],
                "{layer} gate"
            );
            assert_eq!(
                read("up_proj", WIDTH),
                gate_up[WIDTH * HIDDEN..],
                "{layer} up"
            );
            assert_eq!(read("down_proj", HIDDEN), *down, "{layer} down");
        }
    }
}

/// A per-expert adapter on layer 1's experts (gate, up and down, each expert its own rank) and
/// on layer 0's dense gate projection.
fn per_expert_adapter(dir: &Path, base: &Path) -> BTreeMap<String, LoraFactors> {
    let mut modules = BTreeMap::new();
    for e in 0..EXPERTS {
        for (p, out, inp) in [
            ("gate_proj", WIDTH, HIDDEN),
            ("up_proj", WIDTH, HIDDEN),
            ("down_proj", HIDDEN, WIDTH),
        ] {
            let name = format!("model.layers.1.feed_forward.experts.{e}.{p}");
            let seed = 100 + 10 * e as u64 + out as u64;
            let r = 1 + e;
            modules.insert(
                name,
                common::random_factors(out, inp, r, 2.0, seed, FloatType::F32),
            );
        }
    }
    let dense = common::random_factors(DENSE, HIDDEN, 2, 2.0, 7, FloatType::F32);
    modules.insert("model.layers.0.feed_forward.gate_proj".into(), dense);
    let ranks: serde_json::Map<String, serde_json::Value> = modules
        .iter()
        .map(|(k, f)| (k.clone(), f.r.into()))
        .collect();
    common::write_peft(
        dir,
        s(base),
        2,
        2.0,
        serde_json::json!({ "rank_pattern": ranks }),
        &modules,
    );
    modules
}

#[test]
fn the_output_is_peft_s_fused_form_turned_round_and_keeps_every_update() {
    let scratch = tempfile::tempdir().unwrap();
    let base = scratch.path().join("base");
    llama4(&base, false);
    let adapter = scratch.path().join("lora");
    let modules = per_expert_adapter(&adapter, &base);
    let out = scratch.path().join("out");
    copy(&base, &adapter, &out);
    let config = common::cli::read_json(&out.join("adapter_config.json"));
    assert_eq!(
        config["target_parameters"],
        serde_json::json!([
            "model.layers.1.feed_forward.experts.gate_up_proj",
            "model.layers.1.feed_forward.experts.down_proj",
            "model.layers.0.feed_forward.down_proj.weight",
            "model.layers.0.feed_forward.gate_proj.weight",
            "model.layers.0.feed_forward.up_proj.weight"
        ])
    );
    // PEFT's shapes: A [R·E, out], B [in, R·E], with R the largest expert's summed rank (gate
    // and up keep their own A: 2·3 for expert 2), and gate_up on down's base_layer.
    let file = TensorFile::open(&out.join("adapter_model.safetensors")).unwrap();
    let shape = |key: &str| file.entry(key).unwrap().shape.clone();
    let wrapper = "base_model.model.model.layers.1.feed_forward.experts";
    assert_eq!(
        shape(&format!("{wrapper}.base_layer.lora_A.weight")),
        [6 * EXPERTS, 2 * WIDTH]
    );
    assert_eq!(
        shape(&format!("{wrapper}.base_layer.lora_B.weight")),
        [HIDDEN, 6 * EXPERTS]
    );
    assert_eq!(
        shape(&format!("{wrapper}.lora_A.weight")),
        [3 * EXPERTS, HIDDEN]
    );
    assert_eq!(
        shape(&format!("{wrapper}.lora_B.weight")),
        [WIDTH, 3 * EXPERTS]
    );
    let input = Adapter::open(&adapter).unwrap();
    // Read back as PEFT lays it out.
    let layout = ExpertsLayout {
        gate_up: GateUpRows::Halves,
        reversed: true,
        hidden: None,
    };
    let back = Adapter::open_with(&out, layout).unwrap();
    // PEFT's delta, expert by expert: B_e·A_e (A's rows e·r.., B's columns k·E + e) is the
    // update of the stored `[in, out]` slab; gate_up's outputs are the gate's, then the up
    // projection's.
    let experts = "model.layers.1.feed_forward.experts";
    for (param, module, inputs, outputs) in [
        ("down_proj", wrapper.to_string(), WIDTH, HIDDEN),
        (
            "gate_up_proj",
            format!("{wrapper}.base_layer"),
            HIDDEN,
            2 * WIDTH,
        ),
    ] {
        let a = file.read_f32(&format!("{module}.lora_A.weight")).unwrap();
        let b = file.read_f32(&format!("{module}.lora_B.weight")).unwrap();
        let key = format!("{experts}.{param}");
        let rank = back.config.rank_for(&key);
        assert_eq!(rank, if param == "down_proj" { 3 } else { 6 });
        let (s, cols) = (
            back.config.scale(rank, back.config.alpha_for(&key)),
            rank * EXPERTS,
        );
        for e in 0..EXPERTS {
            let update = |part: &str| common::update_of(&input, &format!("{experts}.{e}.{part}"));
            let wants = match param {
                "down_proj" => vec![update("down_proj")],
                _ => vec![update("gate_proj"), update("up_proj")],
            };
            let width = outputs / wants.len();
            for i in 0..inputs {
                for o in 0..outputs {
                    let delta: f32 = (0..rank)
                        .map(|k| b[i * cols + k * EXPERTS + e] * a[(e * rank + k) * outputs + o])
                        .sum();
                    let got = delta * s as f32;
                    let w = wants[o / width][(o % width, i)];
                    assert!(
                        (got - w).abs() <= 1e-5 * (1.0 + w.abs()),
                        "{param} expert {e} ({o}, {i}): {got} vs {w}"
                    );
                }
            }
        }
    }
    // Read back, every module's update is the one written.
    common::assert_same_updates(&input, &back, modules.keys());
    // Laid out the other way (A [R·E, in], B [out, R·E]: PEFT's first `target_parameters`
    // releases), the two wrappers' shapes fit only that way round, and it is read so.
    let other = scratch.path().join("other-way");
    turn_round(&out, &other);
    let turned = Adapter::open_with(&other, layout).unwrap();
    common::assert_same_updates(&input, &turned, modules.keys());
}

#[test]
fn a_lone_parameter_laid_out_the_other_way_is_read_by_its_hidden_side() {
    // PEFT's first `target_parameters` releases (A [R·E, in], B [out, R·E]) with one parameter
    // adapted: no second wrapper to match shapes with, so the side that is the hidden state
    // (gate_up_proj reads it, down_proj writes it) tells which way round the factors lie.
    let scratch = tempfile::tempdir().unwrap();
    let base = scratch.path().join("base");
    llama4(&base, false);
    let adapter = scratch.path().join("lora");
    let modules = per_expert_adapter(&adapter, &base);
    let fused = scratch.path().join("fused");
    copy(&base, &adapter, &fused);
    let other = scratch.path().join("other-way");
    turn_round(&fused, &other);
    let input = Adapter::open(&adapter).unwrap();
    let wrapper = "base_model.model.model.layers.1.feed_forward.experts";
    // (the parameter kept, its wrapper's tensors' stem, the expert modules it holds)
    for (param, stem, parts) in [
        ("down_proj", wrapper.to_string(), &["down_proj"][..]),
        (
            "gate_up_proj",
            format!("{wrapper}.base_layer"),
            &["gate_proj", "up_proj"][..],
        ),
    ] {
        let lone = scratch.path().join(format!("lone-{param}"));
        keep_one_parameter(&other, &lone, param, &stem, wrapper);
        let out = scratch.path().join(format!("out-{param}"));
        copy(&base, &lone, &out);
        let back = Adapter::open(&out).unwrap();
        let names: Vec<&String> = modules
            .keys()
            .filter(|n| n.contains(".experts.") && parts.iter().any(|p| n.ends_with(p)))
            .collect();
        assert_eq!(names.len(), EXPERTS * parts.len(), "{param}");
        common::assert_same_updates(&input, &back, names);
    }
}

/// `transfer --mode copy` of `adapter` from `base` onto itself, into `out`.
fn copy(base: &Path, adapter: &Path, out: &Path) {
    ok(&[
        "transfer",
        "--source-base",
        s(base),
        "--target-base",
        s(base),
        "--adapter",
        s(adapter),
        "--out",
        s(out),
        "--mode",
        "copy",
    ]);
}

/// `from`'s adapter with only `param`'s wrapper (its tensors under `stem`), moved to the
/// experts module itself as PEFT names a lone wrapper, and `target_parameters` naming it alone.
fn keep_one_parameter(from: &Path, to: &Path, param: &str, stem: &str, wrapper: &str) {
    std::fs::create_dir_all(to).unwrap();
    let mut config = common::cli::read_json(&from.join("adapter_config.json"));
    let kept: Vec<serde_json::Value> = config["target_parameters"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| {
            !p.as_str().unwrap().contains(".experts.") || p.as_str().unwrap().ends_with(param)
        })
        .cloned()
        .collect();
    config["target_parameters"] = kept.into();
    std::fs::write(to.join("adapter_config.json"), config.to_string()).unwrap();
    let file = TensorFile::open(&from.join("adapter_model.safetensors")).unwrap();
    let mut tensors = Vec::new();
    for name in file.names() {
        let renamed = match name.strip_prefix(stem) {
            Some(rest) if rest.starts_with(".lora_") => format!("{wrapper}{rest}"),
            _ if name.starts_with(wrapper) => continue,
            _ => name.to_string(),
        };
        let shape = file.entry(name).unwrap().shape.clone();
        let values = file.read_f32(name).unwrap();
        tensors.push((renamed, OutTensor::from_f32(values, shape, FloatType::F32)));
    }
    write_file(&to.join("adapter_model.safetensors"), &tensors, None).unwrap();
}

/// `from`'s fused wrappers (A `[R·E, out]`, B `[in, R·E]`) written the other way round into
/// `to`: A `[R·E, in]` with expert e's rank k at row e·R + k, B `[out, R·E]` at column k·E + e.
fn turn_round(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    std::fs::copy(
        from.join("adapter_config.json"),
        to.join("adapter_config.json"),
    )
    .unwrap();
    let file = TensorFile::open(&from.join("adapter_model.safetensors")).unwrap();
    let mut tensors = Vec::new();
    for name in file.names() {
        let shape = file.entry(name).unwrap().shape.clone();
        let values = file.read_f32(name).unwrap();
        let fused = name.contains(".experts.");
        let Some(module) = name.strip_suffix(".lora_A.weight").filter(|_| fused) else {
            if !(fused && name.ends_with(".lora_B.weight")) {
                tensors.push((
                    name.to_string(),
                    OutTensor::from_f32(values, shape, FloatType::F32),
                ));
            }
            continue;
        };
        let b_name = format!("{module}.lora_B.weight");
        let b = file.read_f32(&b_name).unwrap();
        let (cols, out) = (shape[0], shape[1]);
        let (inputs, rank) = (b.len() / cols, cols / EXPERTS);
        let mut a2 = vec![0f32; cols * inputs];
        let mut b2 = vec![0f32; out * cols];
        for e in 0..EXPERTS {
            for k in 0..rank {
                for j in 0..inputs {
                    a2[(e * rank + k) * inputs + j] = b[j * cols + k * EXPERTS + e];
                }
                for p in 0..out {
                    b2[p * cols + k * EXPERTS + e] = values[(e * rank + k) * out + p];
                }
            }
        }
        let ty = FloatType::F32;
        tensors.push((
            name.to_string(),
            OutTensor::from_f32(a2, vec![cols, inputs], ty),
        ));
        tensors.push((b_name, OutTensor::from_f32(b2, vec![out, cols], ty)));
    }
    write_file(&to.join("adapter_model.safetensors"), &tensors, None).unwrap();
}
