//! `--fused-experts`: a mixture-of-experts target's adapter written as PEFT's LoRA on
//! transformers 5's fused expert parameters (`target_parameters`). Read back, it is the
//! per-expert adapter the same transfer writes, module for module; its config names what PEFT
//! matches (`<layer>.mlp.experts.gate_up_proj` / `down_proj`, `<module>.weight` for dense MLPs
//! and shared experts, attention in `target_modules`).

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::moe::*;
use common::moe_layers::*;
use common::*;
use loraxfer::io::adapter::{Adapter, LoraFactors};
use loraxfer::io::checkpoint::Checkpoint;
use loraxfer::io::safetensors::{FloatType, TensorFile};
use loraxfer::modes::Mode;
use loraxfer::plan::ModelSide;
use loraxfer::transfer;

fn fused_job(
    source: &Path,
    target: &Path,
    adapter: &Path,
    out: &Path,
    mode: Mode,
) -> transfer::Job {
    let mut j = job(source, target, adapter, out, mode);
    j.fused_experts = true;
    j
}

/// The adapter at `dir`, its fused experts named as `model`'s table names them.
fn read_back(dir: &Path, model: &Path) -> Adapter {
    let mut adapter = Adapter::open(dir).unwrap();
    let ckpt = Checkpoint::open(model).unwrap();
    let side = ModelSide::new(&ckpt).unwrap();
    loraxfer::plan::experts::name_fused_experts(&mut adapter, &side).unwrap();
    adapter
}

/// Every module of `want` has the same update in `got` (to f32 rounding: the factors are the
/// same values, restacked), and `got` has no other.
fn same_updates(want: &Adapter, got: &Adapter, what: &str) {
    assert_eq!(
        want.modules.keys().collect::<Vec<_>>(),
        got.modules.keys().collect::<Vec<_>>(),
        "{what}"
    );
    for name in want.modules.keys() {
        let (w, g) = (update_of(want, name), update_of(got, name));
        let scale = fro(&w).max(1e-30);
        assert!(fro(&(&g - &w)) / scale < 1e-6, "{what}: {name}");
    }
}

/// Onto the same model (rotate: every expert turned into its own singular coordinates, so the
/// factors are the transfer's, not the source's), the fused output reads back as the per-expert
/// one for each layered family, and its config lists what PEFT adapts under the names it
/// matches.
#[test]
fn the_fused_form_reads_back_as_the_per_expert_adapter() {
    for family in ["qwen2_moe", "glm4_moe", "qwen3_moe", "deepseek_v3"] {
        let d = Dirs::new();
        let model = Layout {
            family,
            experts: 3,
            dense: vec![0],
        };
        model.write(&d.p("m"), 1);
        model.adapter(&d.p("ad"));
        let (m, ad) = (d.p("m"), d.p("ad"));
        transfer::run(&job(&m, &m, &ad, &d.p("per"), Mode::Rotate)).unwrap();
        let mut fused = fused_job(&m, &m, &ad, &d.p("fused"), Mode::Rotate);
        // GLM-4.5 is the family whose llama.cpp LoRA holds dense layers.
        fused.gguf_adapter = family == "glm4_moe";
        transfer::run(&fused).unwrap();
        let per = Adapter::open(&d.p("per")).unwrap();
        same_updates(&per, &read_back(&d.p("fused"), &m), family);
        if fused.gguf_adapter {
            // The llama.cpp LoRA is the per-expert adapter's, byte for byte (an output named
            // alike, since the GGUF carries the name).
            std::fs::create_dir(d.p("plain")).unwrap();
            let plain_out = d.p("plain").join("fused");
            let mut plain = job(&m, &m, &ad, &plain_out, Mode::Rotate);
            plain.gguf_adapter = true;
            transfer::run(&plain).unwrap();
            let gguf = |dir: &Path| std::fs::read(dir.join("adapter_model.gguf")).unwrap();
            assert!(gguf(&plain_out) == gguf(&d.p("fused")), "{family}");
        }

        let config = common::cli::read_json(&d.p("fused").join("adapter_config.json"));
        let strings = |key: &str| -> Vec<String> {
            let list = config[key].as_array().unwrap();
            list.iter()
                .map(|v| v.as_str().unwrap().to_string())
                .collect()
        };
        let experts = "model.layers.1.mlp.experts";
        let mut want = vec![
            format!("{experts}.gate_up_proj"),
            format!("{experts}.down_proj"),
        ];
        // Dense MLPs (layer 0) and shared experts (layer 1), through their weights.
        for l in 0..LAYERS {
            for (key, _, _) in model.modules(l) {
                if key.starts_with("mlp.") && !key.starts_with("mlp.experts.") {
                    want.push(format!("model.layers.{l}.{key}.weight"));
                }
            }
        }
        let mut got = strings("target_parameters");
        got[2..].sort();
        want[2..].sort();
        assert_eq!(got, want, "{family}");
        let mut attention: Vec<String> = (0..LAYERS)
            .flat_map(|l| {
                let keys = model.modules(l).into_iter().map(|(key, _, _)| key);
                let attention = keys.filter(|key| key.starts_with("self_attn."));
                attention.map(move |key| format!("model.layers.{l}.{key}"))
            })
            .collect();
        attention.sort();
        let mut modules = strings("target_modules");
        modules.sort();
        assert_eq!(modules, attention, "{family}");
        // Gate and up keep their own A: rank 2r per expert, alpha 2·alpha for the same scale.
        assert_eq!(config["rank_pattern"][&want[0]], 8, "{family}");
        assert_eq!(config["alpha_pattern"][&want[0]], 16.0, "{family}");
        assert!(config["rank_pattern"].get(&want[1]).is_none(), "{family}");
        // PEFT's shapes: A [R·E, in], B [out, R·E]; gate_up_proj on the wrapper's base_layer.
        let file = TensorFile::open(&d.p("fused").join("adapter_model.safetensors")).unwrap();
        let shape = |key: &str| {
            file.entry(&format!("base_model.model.{key}"))
                .unwrap()
                .shape
                .clone()
        };
        let (h, width) = (DIMS.0, DIMS.5);
        assert_eq!(
            shape(&format!("{experts}.base_layer.lora_A.weight")),
            [8 * 3, h]
        );
        assert_eq!(
            shape(&format!("{experts}.base_layer.lora_B.weight")),
            [2 * width, 8 * 3]
        );
        assert_eq!(shape(&format!("{experts}.lora_A.weight")), [4 * 3, width]);
        assert_eq!(shape(&format!("{experts}.lora_B.weight")), [h, 4 * 3]);
        // Taken as a transfer's input, the fused form gives each expert its own rank back (the
        // zero columns of the other part dropped): fused again, gate_up is still 2r, not 4r.
        let again = d.p("again");
        transfer::run(&fused_job(&m, &m, &d.p("fused"), &again, Mode::Copy)).unwrap();
        let config = common::cli::read_json(&again.join("adapter_config.json"));
        assert_eq!(config["rank_pattern"][&want[0]], 8, "{family}");
        same_updates(&per, &read_back(&again, &m), family);
    }
}

/// Experts of different ranks and scales, a projection the adapter leaves out, an expert it
/// leaves alone: the wrapper takes the largest expert's rank, pads the others with zeros, folds
/// each part's scale into its B, and every update arrives as it was (copy). Mixtral's experts
/// (`block_sparse_moe.experts.<e>.w1`) are written under transformers 5's `mlp.experts`.
#[test]
fn experts_of_other_ranks_and_scales_are_padded_and_keep_their_updates() {
    let d = Dirs::new();
    let experts = 3;
    for (family, rslora) in [
        ("qwen3_moe", false),
        ("mixtral", false),
        ("qwen3_moe", true),
    ] {
        let tag = format!("{family}-{rslora}");
        let base = d.p(&tag);
        moe_model(&base, family, experts, 1);
        let names = |e| expert_modules(family, e, DIMS.5, DIMS.0);
        let mut modules: BTreeMap<String, LoraFactors> = BTreeMap::new();
        let mut rank_pattern = serde_json::Map::new();
        let mut alpha_pattern = serde_json::Map::new();
        for l in 0..LAYERS {
            for (e, (r, alpha)) in [(4, 8.0), (2, 3.0)].into_iter().enumerate() {
                // Expert 0: gate, up, down at r = 4; expert 1: up and down at r = 2, its own
                // alpha; expert 2: nothing.
                for (k, (key, out, inp)) in names(e).into_iter().enumerate() {
                    if e == 1 && k == 0 {
                        continue;
                    }
                    let name = format!("model.layers.{l}.{key}");
                    let seed = (100 * l + 10 * e + k) as u64;
                    modules.insert(
                        name.clone(),
                        random_factors(out, inp, r, alpha, seed, FloatType::F32),
                    );
                    if r != 4 {
                        rank_pattern.insert(name.clone(), r.into());
                        alpha_pattern.insert(name, alpha.into());
                    }
                }
            }
        }
        let extra = serde_json::json!({
            "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "use_rslora": rslora,
        });
        let ad = d.p(&format!("{tag}-ad"));
        write_peft(&ad, family, 4, 8.0, extra, &modules);
        let (per, fused) = (d.p(&format!("{tag}-per")), d.p(&format!("{tag}-fused")));
        transfer::run(&job(&base, &base, &ad, &per, Mode::Copy)).unwrap();
        transfer::run(&fused_job(&base, &base, &ad, &fused, Mode::Copy)).unwrap();
        let back = read_back(&fused, &base);
        // The per-expert output writes zeros for the modules left out; so does the fused one.
        let per = Adapter::open(&per).unwrap();
        same_updates(&per, &back, family);
        let source = Adapter::open(&ad).unwrap();
        for name in source.modules.keys() {
            let (w, g) = (update_of(&source, name), update_of(&back, name));
            assert!(fro(&(&g - &w)) / fro(&w) < 1e-6, "{family}: {name}");
        }
        let config = common::cli::read_json(&fused.join("adapter_config.json"));
        let gate_up = "model.layers.0.mlp.experts.gate_up_proj";
        assert_eq!(config["rank_pattern"][gate_up], 8, "{tag}: {config}");
        // The first part's scale at rank 8: 8/4 = 2, rsLoRA 8/√4 = 4.
        let alpha = config["alpha_pattern"][gate_up].as_f64().unwrap();
        let want = if rslora { 4.0 * 8f64.sqrt() } else { 16.0 };
        assert!((alpha - want).abs() < 1e-9, "{tag}: {alpha}");
        assert!(config["target_parameters"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p.as_str().unwrap().contains(".mlp.experts.")));
        // Taken as a transfer's input, every expert comes back at its own rank (the other
        // part's and the padding's zero columns dropped, an expert left alone at one zero rank):
        // fused again the wrapper's rank stays 8, and the llama.cpp LoRA stacks each layer's
        // experts at the largest.
        let again = d.p(&format!("{tag}-again"));
        let mut j = fused_job(&base, &base, &fused, &again, Mode::Copy);
        j.gguf_adapter = true;
        transfer::run(&j).unwrap();
        let config = common::cli::read_json(&again.join("adapter_config.json"));
        assert_eq!(config["rank_pattern"][gate_up], 8, "{tag}: {config}");
        same_updates(&per, &read_back(&again, &base), &tag);
        let data = std::fs::read(again.join("adapter_model.gguf")).unwrap();
        let header = loraxfer::io::gguf::header::parse(&data).unwrap();
        let dims = |name: &str| {
            let t = header.tensors.iter().find(|t| t.name == name).unwrap();
            t.dims.clone()
        };
        // Each projection's stack at its largest expert's rank (4; the others padded).
        for proj in ["gate", "up", "down"] {
            let a = dims(&format!("blk.0.ffn_{proj}_exps.weight.lora_a"));
            assert_eq!(a[1..], [4, experts], "{tag} {proj}");
        }
    }
}

/// An adapter with one of the two fused parameters' projections (no down projections, or only
/// them): each layer's one wrapper sits on the experts module itself, as PEFT places a layer's
/// only fused parameter, and reads back as the per-expert output. A wrapper whose parameter
/// target_parameters does not name is refused, naming its module.
#[test]
fn a_lone_wrapper_sits_on_the_experts_module() {
    let d = Dirs::new();
    let base = d.p("m");
    moe_model(&base, "qwen3_moe", 3, 1);
    for (kept, param, rows) in [
        ("gate-up", "gate_up_proj", 2 * DIMS.5),
        ("down", "down_proj", DIMS.0),
    ] {
        let mut modules = BTreeMap::new();
        for l in 0..LAYERS {
            for e in 0..3 {
                let all = expert_modules("qwen3_moe", e, DIMS.5, DIMS.0);
                for (k, (key, out, inp)) in all.into_iter().enumerate() {
                    if key.ends_with("down_proj") != (kept == "down") {
                        continue;
                    }
                    let seed = (100 * l + 10 * e + k) as u64;
                    let f = random_factors(out, inp, 4, 8.0, seed, FloatType::F32);
                    modules.insert(format!("model.layers.{l}.{key}"), f);
                }
            }
        }
        let (ad, per, fused) = (
            d.p(&format!("{kept}-ad")),
            d.p(&format!("{kept}-per")),
            d.p(&format!("{kept}-fused")),
        );
        write_peft(&ad, "qwen3_moe", 4, 8.0, serde_json::json!({}), &modules);
        transfer::run(&job(&base, &base, &ad, &per, Mode::Copy)).unwrap();
        transfer::run(&fused_job(&base, &base, &ad, &fused, Mode::Copy)).unwrap();
        let file = TensorFile::open(&fused.join("adapter_model.safetensors")).unwrap();
        let key = "base_model.model.model.layers.1.mlp.experts.lora_B.weight";
        assert_eq!(file.entry(key).unwrap().shape[0], rows, "{kept}");
        assert!(file.names().all(|n| !n.contains("base_layer")), "{kept}");
        let config = common::cli::read_json(&fused.join("adapter_config.json"));
        assert_eq!(
            config["target_parameters"],
            serde_json::json!([
                format!("model.layers.0.mlp.experts.{param}"),
                format!("model.layers.1.mlp.experts.{param}")
            ])
        );
        let per = Adapter::open(&per).unwrap();
        same_updates(&per, &read_back(&fused, &base), kept);
        // Layer 1's wrapper named by no entry.
        common::refusals::edit_json(&fused.join("adapter_config.json"), |c| {
            c["target_parameters"] =
                serde_json::json!([format!("model.layers.0.mlp.experts.{param}")]);
        });
        let e = Adapter::open(&fused).unwrap_err().to_string();
        assert!(
            e.contains("model.layers.1.mlp.experts.lora_A.weight")
                && e.contains(&format!("(model.layers.0.mlp.experts.{param})"))
                && e.contains("names neither `model.layers.1.mlp.experts.gate_up_proj`"),
            "{e}"
        );
    }
}

/// An adapter on the attention alone: nothing is fused, and `target_parameters` is null as
/// without the flag.
#[test]
fn an_attention_only_adapter_names_no_parameters() {
    let d = Dirs::new();
    let base = d.p("m");
    moe_model(&base, "qwen3_moe", 3, 1);
    moe_adapter(&d.p("ad"), "qwen3_moe", 3, false);
    let out = d.p("out");
    transfer::run(&fused_job(&base, &base, &d.p("ad"), &out, Mode::Copy)).unwrap();
    let config = common::cli::read_json(&out.join("adapter_config.json"));
    assert!(config["target_parameters"].is_null(), "{config}");
    assert_eq!(
        config["target_modules"].as_array().unwrap().len(),
        4 * LAYERS
    );
    let written = Adapter::open(&out).unwrap();
    same_updates(&Adapter::open(&d.p("ad")).unwrap(), &written, "attention");
}

/// A target without experts has nothing to fuse: refused before any work, naming the flag and
/// the model.
#[test]
fn a_dense_target_is_refused() {
    let d = Dirs::new();
    let model = Layout {
        family: "qwen3_moe",
        experts: 3,
        dense: vec![0],
    };
    model.write(&d.p("moe"), 1);
    model.adapter(&d.p("ad"));
    let dense = d.p("dense");
    common::cli::synth("model", &dense, &["--like", "tiny-qwen2"]);
    let out = common::cli::loraxfer(&[
        "transfer",
        "--source-base",
        common::cli::s(&d.p("moe")),
        "--target-base",
        common::cli::s(&dense),
        "--adapter",
        common::cli::s(&d.p("ad")),
        "--out",
        common::cli::s(&d.p("out")),
        "--fused-experts",
    ]);
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        e.contains("--fused-experts")
            && e.contains("has no experts")
            && e.contains(common::cli::s(&dense)),
        "{e}"
    );
    assert!(!d.p("out").exists());
}
