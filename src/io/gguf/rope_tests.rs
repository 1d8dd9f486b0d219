use std::collections::HashMap;

use serde_json::json;

use super::*;
use crate::io::gguf::names::family_of;

/// The factors llama.cpp's converter stores for Llama 3's parameters (its arithmetic: the
/// frequencies in f32, the factors stored as f32).
fn stored(factor: f64, low: f64, high: f64, context: f64, theta: f64, dims: usize) -> Vec<f32> {
    let wavelengths: Vec<f64> = (0..dims / 2)
        .map(|i| {
            let freq = 1.0f32 / (theta as f32).powf((2 * i) as f32 / dims as f32);
            2.0 * std::f64::consts::PI / freq as f64
        })
        .collect();
    llama3_factors(factor, low, high, context, &wavelengths)
        .into_iter()
        .map(|v| v as f32)
        .collect()
}

fn params(s: &Json) -> (f64, f64, f64, u64) {
    assert_eq!(s["rope_type"], "llama3", "{s}");
    (
        s["factor"].as_f64().unwrap(),
        s["low_freq_factor"].as_f64().unwrap(),
        s["high_freq_factor"].as_f64().unwrap(),
        s["original_max_position_embeddings"].as_u64().unwrap(),
    )
}

#[test]
fn the_releases_llama3_parameters_come_back_from_their_factors() {
    // Llama 3.1 8B, Llama 3.2 3B (64-wide heads), Llama 4 (no band between), and 32-wide heads
    // with one frequency between the bands.
    for (factor, high, theta, dims) in [
        (8.0, 4.0, 500000.0, 128),
        (32.0, 4.0, 500000.0, 64),
        (16.0, 1.0, 500000.0, 128),
        (8.0, 4.0, 500000.0, 32),
    ] {
        let factors = stored(factor, 1.0, high, 8192.0, theta, dims);
        let between = factors
            .iter()
            .filter(|&&v| v > 1.0 + 1e-4 && v < factor as f32 - 1e-4)
            .count();
        let got = llama3(&factors, theta, dims).unwrap().unwrap();
        assert_eq!(
            params(&got),
            (factor, 1.0, high, 8192),
            "dims {dims}, {between} between"
        );
    }
}

#[test]
fn other_llama3_parameters_come_back_as_ones_that_give_the_same_factors() {
    // Scaling context, low and high together changes nothing: l = 1 is chosen.
    let (theta, dims) = (500000.0, 128);
    let factors = stored(6.0, 2.0, 8.0, 16384.0, theta, dims);
    let got = llama3(&factors, theta, dims).unwrap().unwrap();
    assert_eq!(params(&got), (6.0, 1.0, 4.0, 8192));
    let factors = stored(4.0, 1.0, 3.0, 5000.0, theta, dims);
    let (factor, low, high, context) = params(&llama3(&factors, theta, dims).unwrap().unwrap());
    let again = stored(factor, low, high, context as f64, theta, dims);
    for (a, b) in again.iter().zip(&factors) {
        assert!((a - b).abs() <= 1e-5 * b, "{again:?} vs {factors:?}");
    }
}

#[test]
fn factors_of_one_are_no_scaling_and_other_factors_are_refused() {
    assert_eq!(llama3(&[1.0; 64], 500000.0, 128), Ok(None));
    let mut factors = stored(8.0, 1.0, 4.0, 8192.0, 500000.0, 128);
    factors[40] = 3.0; // in the band scaled by the whole factor
    let e = llama3(&factors, 500000.0, 128).unwrap_err();
    assert!(e.contains("not Llama 3's"), "{e}");
    let e = llama3(&factors[..32], 500000.0, 128).unwrap_err();
    assert!(
        e.contains("32 factors for a rotation of 128 dimensions"),
        "{e}"
    );
    factors[3] = f32::NAN;
    assert!(llama3(&factors, 500000.0, 128).unwrap_err().contains("NaN"));
}

fn metadata(arch: &str, pairs: &[(&str, Value)]) -> HashMap<String, Value> {
    pairs
        .iter()
        .map(|(k, v)| (format!("{arch}.{k}"), v.clone()))
        .collect()
}

fn no_tensor(_: &str) -> Option<Result<Vec<f32>, String>> {
    None
}

#[test]
fn linear_and_yarn_scaling_come_from_the_metadata() {
    let qwen2 = family_of("qwen2", false).unwrap();
    let config = json!({"rope_theta": 1e6, "head_dim": 64});
    let m = metadata(
        "qwen2",
        &[
            ("rope.scaling.type", Value::Str("yarn".into())),
            ("rope.scaling.factor", Value::Float(4.0)),
            ("rope.scaling.original_context_length", Value::UInt(32768)),
        ],
    );
    let s = scaling(qwen2, &m, &no_tensor, &config).unwrap().unwrap();
    let want =
        json!({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768});
    assert_eq!(s.rope_scaling, want);
    assert!(s.top_level.is_empty());
    let m = metadata(
        "qwen2",
        &[
            ("rope.scaling.type", Value::Str("linear".into())),
            ("rope.scaling.factor", Value::Float(2.0)),
        ],
    );
    let s = scaling(qwen2, &m, &no_tensor, &config).unwrap().unwrap();
    assert_eq!(
        s.rope_scaling,
        json!({"rope_type": "linear", "factor": 2.0})
    );
    let m = metadata("qwen2", &[("rope.scaling.type", Value::Str("yarn".into()))]);
    let e = scaling(qwen2, &m, &no_tensor, &config).unwrap_err();
    assert_eq!(e, "metadata `qwen2.rope.scaling.factor` is missing");
    let m = metadata("qwen2", &[("rope.scaling.type", Value::Str("su".into()))]);
    let e = scaling(qwen2, &m, &no_tensor, &config).unwrap_err();
    assert!(e.contains("`qwen2.rope.scaling.type` = `su`"), "{e}");
    assert_eq!(
        scaling(qwen2, &HashMap::new(), &no_tensor, &config),
        Ok(None)
    );
}

#[test]
fn deepseek_and_gpt_oss_yarn_carry_what_their_configs_add() {
    let yarn = |arch: &str, extra: &[(&str, Value)]| {
        let mut pairs = vec![
            ("rope.scaling.type", Value::Str("yarn".into())),
            ("rope.scaling.factor", Value::Float(40.0)),
            ("rope.scaling.original_context_length", Value::UInt(4096)),
            ("rope.scaling.yarn_beta_fast", Value::Float(32.0)),
            ("rope.scaling.yarn_beta_slow", Value::Float(1.0)),
        ];
        pairs.extend(extra.iter().cloned());
        metadata(arch, &pairs)
    };
    let deepseek = family_of("deepseek2", true).unwrap();
    let m = yarn(
        "deepseek2",
        &[("rope.scaling.yarn_log_multiplier", Value::Float(0.0707))],
    );
    let s = scaling(deepseek, &m, &no_tensor, &json!({}))
        .unwrap()
        .unwrap();
    assert!((s.rope_scaling["mscale_all_dim"].as_f64().unwrap() - 0.707).abs() < 1e-12);
    assert_eq!(s.rope_scaling["mscale"], s.rope_scaling["mscale_all_dim"]);
    assert_eq!(s.rope_scaling["beta_fast"], 32.0);
    assert_eq!(s.rope_scaling.get("truncate"), None);
    let gpt_oss = family_of("gpt-oss", true).unwrap();
    let s = scaling(gpt_oss, &yarn("gpt-oss", &[]), &no_tensor, &json!({}))
        .unwrap()
        .unwrap();
    assert_eq!(s.rope_scaling["truncate"], false);
    assert_eq!(s.rope_scaling.get("mscale"), None);
}

#[test]
fn tensors_of_factors_are_read_for_the_families_that_write_them() {
    let factors = stored(8.0, 1.0, 4.0, 8192.0, 500000.0, 128);
    let tensors: HashMap<&str, Vec<f32>> = [
        (LLAMA3_FACTORS, factors),
        (LONG_FACTORS, vec![1.0, 2.5, 7.0]),
        (SHORT_FACTORS, vec![1.0, 1.0, 1.5]),
    ]
    .into();
    let only = |names: &'static [&'static str]| {
        let tensors = tensors.clone();
        move |name: &str| names.contains(&name).then(|| Ok(tensors[name].clone()))
    };
    let config = json!({"rope_theta": 500000.0, "hidden_size": 256, "num_attention_heads": 2});
    let llama = family_of("llama", false).unwrap();
    let s = scaling(llama, &HashMap::new(), &only(&[LLAMA3_FACTORS]), &config)
        .unwrap()
        .unwrap();
    assert_eq!(params(&s.rope_scaling), (8.0, 1.0, 4.0, 8192));
    let qwen2 = family_of("qwen2", false).unwrap();
    let e = scaling(qwen2, &HashMap::new(), &only(&[LLAMA3_FACTORS]), &config).unwrap_err();
    assert!(e.contains("of a `qwen2` model"), "{e}");
    let phi3 = family_of("phi3", false).unwrap();
    let m = metadata(
        "phi3",
        &[("rope.scaling.original_context_length", Value::UInt(4096))],
    );
    let e = scaling(phi3, &m, &only(&[LONG_FACTORS, SHORT_FACTORS]), &config).unwrap_err();
    let want = "3 factors and `rope_factors_short.weight` 3, for a rotation of 128 dimensions";
    assert!(e.contains(want), "{e}");
    // Six rotary dimensions of a wider head (Phi-4-mini turns three quarters of each).
    let mut m = m;
    m.insert("phi3.rope.dimension_count".into(), Value::UInt(6));
    let s = scaling(phi3, &m, &only(&[LONG_FACTORS, SHORT_FACTORS]), &config)
        .unwrap()
        .unwrap();
    assert_eq!(s.rope_scaling["rope_type"], "longrope");
    assert_eq!(s.rope_scaling["long_factor"], json!([1.0, 2.5, 7.0]));
    assert_eq!(s.rope_scaling["short_factor"], json!([1.0, 1.0, 1.5]));
    assert_eq!(
        s.top_level,
        vec![("original_max_position_embeddings", json!(4096))]
    );
    let e = scaling(phi3, &m, &only(&[LONG_FACTORS]), &config).unwrap_err();
    assert!(e.contains("without `rope_factors_short.weight`"), "{e}");
}
