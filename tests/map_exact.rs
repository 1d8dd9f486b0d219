//! The map mode on targets whose correspondence with the source is known exactly: the source
//! rewritten in other coordinates (norm gains folded into the next weights, the residual stream
//! rotated — or embedded in a wider one by a semi-orthogonal map —, attention heads permuted
//! within the GQA structure, MLP neurons permuted, dead neurons added, token ids shuffled with the
//! same strings). The adapter `map` writes must be the source adapter in those coordinates.

mod common;
#[path = "map_exact/twin.rs"]
mod twin;

use std::collections::BTreeMap;

use common::cli::*;
use common::*;
use faer::Mat;
use loraxfer::io::adapter::Adapter;
use loraxfer::io::safetensors::FloatType;
use twin::*;

#[test]
fn map_recovers_the_adapter_in_rotated_and_permuted_coordinates() {
    check_twin(EQUAL, 3, &[]);
}

#[test]
fn a_wider_twin_stored_in_bf16_is_mapped_to_bf16_rounding() {
    // bf16 rounds each stored weight by up to 2⁻⁸ relative, in the directions a narrower model
    // never uses too: the fits must not invert that noise into the map.
    let shape = Shape {
        d_t: 48,
        extra: 8,
        dtype: FloatType::Bf16,
        ..EQUAL
    };
    let worst = twin_error(shape, 13, &[]);
    assert!(worst < 2e-2, "relative error {worst} in bf16");
}

#[test]
fn map_and_rotate_give_back_the_source_adapter_on_an_identical_target() {
    let dir = tempfile::tempdir().unwrap();
    write_pair(dir.path(), EQUAL, 14);
    let (source, adapter) = (dir.path().join("source"), dir.path().join("adapter"));
    let src = Adapter::open(&adapter).unwrap();
    for mode in ["map", "rotate"] {
        let out = dir.path().join(mode);
        ok(&[
            "transfer",
            "--source-base",
            s(&source),
            "--target-base",
            s(&source),
            "--adapter",
            s(&adapter),
            "--out",
            s(&out),
            "--mode",
            mode,
            "--rank",
            "8",
            "--device",
            "cpu",
        ]);
        let got = Adapter::open(&out).unwrap();
        for k in src.modules.keys() {
            let want = dense(&src.factors(k).unwrap());
            let err = fro(&(&dense(&got.factors(k).unwrap()) - &want)) / fro(&want);
            assert!(err < 1e-5, "{mode} {k}: relative error {err}");
        }
    }
}

#[test]
fn the_inner_fit_and_the_token_map_alone_are_exact_on_the_twin_too() {
    check_twin(EQUAL, 6, &["--map-inner", "fit"]);
    check_twin(EQUAL, 7, &["--map-residual", "tokens"]);
}

#[test]
fn the_per_layer_refit_repairs_a_token_map_that_does_not_fit() {
    // Noisy target embeddings: the shared tokens give a rotated, blurred map; the layers'
    // weights still correspond exactly, and refitting on them recovers most of the loss.
    let noisy = Shape {
        noise: 0.6,
        ..EQUAL
    };
    let tokens = twin_error(noisy, 11, &["--map-residual", "tokens"]);
    let layers = twin_error(noisy, 11, &["--map-residual", "layers"]);
    assert!(
        tokens > 0.05,
        "the noise should spoil the token map ({tokens})"
    );
    assert!(
        layers < 0.5 * tokens,
        "refit {layers} vs tokens alone {tokens}"
    );
}

#[test]
fn map_fits_inside_heads_of_a_different_size() {
    // Each head embedded in a larger one by a semi-orthogonal map (q·k and o·v unchanged).
    let shape = Shape {
        d_t: 40,
        extra: 4,
        hd_t: 12,
        noise: 0.0,
        dtype: FloatType::F32,
    };
    check_twin(shape, 8, &[]);
    // Moving heads as wholes cannot map between sizes: a clear error, not a wrong adapter.
    let dir = tempfile::tempdir().unwrap();
    write_pair(dir.path(), shape, 8);
    let p = |n: &str| dir.path().join(n);
    let out = loraxfer(&[
        "transfer",
        "--source-base",
        s(&p("source")),
        "--target-base",
        s(&p("target")),
        "--adapter",
        s(&p("adapter")),
        "--out",
        s(&p("out")),
        "--mode",
        "map",
        "--map-inner",
        "index",
        "--device",
        "cpu",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("head_dim 8") && err.contains("12"), "{err}");
}

#[test]
fn map_recovers_the_adapter_on_a_wider_twin_with_dead_neurons() {
    check_twin(
        Shape {
            d_t: 40,
            extra: 8,
            hd_t: HD,
            noise: 0.0,
            dtype: FloatType::F32,
        },
        4,
        &[],
    );
}

#[test]
fn each_part_of_the_map_is_needed_on_the_twin() {
    // Switching off any one part breaks the exact answer: the test above cannot pass by luck.
    for ablation in [
        &["--map-inner", "index"][..],
        &["--no-norm-fold"][..],
        &["--map-residual", "identity"][..],
    ] {
        let worst = twin_error(EQUAL, 5, ablation);
        assert!(
            worst > 0.1,
            "{ablation:?} still gives the exact adapter ({worst})"
        );
    }
}

/// A pruned sibling: residual dimensions, one query head per KV group and a quarter of the MLP
/// neurons dropped (known index sets, no healing). `map` must find which units were kept.
#[test]
fn map_recovers_the_correspondence_of_a_pruned_sibling() {
    let dir = tempfile::tempdir().unwrap();
    let seed = 9;
    let (src, _) = source_model(seed);
    let mut keep_d: Vec<usize> = perm(D, seed + 1)[..28].to_vec();
    keep_d.sort();
    let mut keep_n: Vec<usize> = perm(INTER, seed + 2)[..36].to_vec();
    keep_n.sort();
    let per_group = HEADS / KV;
    // Group g keeps query head g·per_group + kept[g].
    let kept: Vec<usize> = (0..KV).map(|g| (g + seed as usize) % per_group).collect();
    let keep_q: Vec<usize> = (0..KV).map(|g| g * per_group + kept[g]).collect();
    let rows = |w: &Mat<f32>, units: &[usize], size: usize| {
        Mat::from_fn(units.len() * size, w.ncols(), |i, j| {
            w[(units[i / size] * size + i % size, j)]
        })
    };
    let cols =
        |w: &Mat<f32>, idx: &[usize]| Mat::from_fn(w.nrows(), idx.len(), |i, j| w[(i, idx[j])]);
    let all_kv: Vec<usize> = (0..KV).collect();
    let mut tgt = BTreeMap::new();
    for (name, w) in &src {
        let t = if name.ends_with("norm.weight") || name.contains("embed_tokens") {
            cols(w, &keep_d)
        } else {
            let p = PROJECTIONS.iter().find(|p| name.contains(*p)).unwrap();
            match *p {
                "q_proj" => cols(&rows(w, &keep_q, HD), &keep_d),
                "k_proj" | "v_proj" => cols(&rows(w, &all_kv, HD), &keep_d),
                "gate_proj" | "up_proj" => cols(&rows(w, &keep_n, 1), &keep_d),
                "o_proj" => rows(
                    &cols(
                        w,
                        &(0..HEADS * HD)
                            .filter(|c| keep_q.contains(&(c / HD)))
                            .collect::<Vec<_>>(),
                    ),
                    &keep_d,
                    1,
                ),
                _ => rows(&cols(w, &keep_n), &keep_d, 1),
            }
        };
        tgt.insert(name.clone(), t);
    }
    let (sd, td) = (dir.path().join("source"), dir.path().join("target"));
    write_checkpoint(&sd, &model(D, INTER), &tensors_of(&src), FloatType::F32);
    let mut small = model(28, 36);
    small.heads = KV;
    write_checkpoint(&td, &small, &tensors_of(&tgt), FloatType::F32);
    tokenizer(&sd, &|i| i);
    tokenizer(&td, &|i| i);
    let adapter = dir.path().join("adapter");
    write_source_adapter(&src, &adapter, |_| seed);
    let out = dir.path().join("out");
    map_transfer(&sd, &td, &adapter, &out, &[]);
    let report = read_json(&out.join("transfer_report.json"));
    let (mut hits, mut total) = (0, 0);
    for layer in report["map"]["layers"].as_array().unwrap() {
        let got =
            |k: &str| -> Vec<Option<usize>> { serde_json::from_value(layer[k].clone()).unwrap() };
        for (truth, k) in [
            (&keep_q, "q_heads"),
            (&all_kv, "kv_heads"),
            (&keep_n, "neurons"),
        ] {
            for (g, t) in got(k).iter().zip(truth.iter()) {
                total += 1;
                hits += usize::from(*g == Some(*t));
            }
        }
    }
    let fraction = hits as f64 / total as f64;
    assert!(
        fraction >= 0.95,
        "map recovered {hits} of {total} units ({fraction:.3})"
    );
    // Every unit of the smaller target has a source unit.
    let counts = |report: &serde_json::Value, key: &str| -> Vec<[usize; 2]> {
        let rows = report["modules"].as_array().unwrap();
        rows.iter()
            .map(|r| serde_json::from_value(r[key].clone()).unwrap_or([0, 0]))
            .collect()
    };
    assert_eq!(report["summary"]["matched_heads"], 1.0);
    assert_eq!(report["summary"]["matched_neurons"], 1.0);
    // Back from the pruned model: the units it lacks have no source and take no update, which
    // the report counts per module and the summary (and a note) says.
    let back = dir.path().join("back");
    let stdout = map_transfer(&td, &sd, &out, &back, &[]);
    let report = read_json(&back.join("transfer_report.json"));
    for (row, (heads, neurons)) in report["modules"].as_array().unwrap().iter().zip(
        counts(&report, "matched_heads")
            .into_iter()
            .zip(counts(&report, "matched_neurons")),
    ) {
        let (module, expected) = match row["module"].as_str().unwrap() {
            m @ ("q_proj" | "o_proj") => (m, (heads, [KV, HEADS])),
            m @ ("k_proj" | "v_proj") => (m, (heads, [KV, KV])),
            m => (m, (neurons, [36, INTER])),
        };
        assert_eq!(expected.0, expected.1, "{module}: matched units");
    }
    let share = |k: &str| report["summary"][k].as_f64().unwrap();
    // Per layer: q and o follow KV of HEADS query heads, k and v all KV groups.
    let heads = (2 * KV + 2 * KV) as f64 / (2 * HEADS + 2 * KV) as f64;
    assert!(
        (share("matched_heads") - heads).abs() < 1e-12,
        "{}",
        share("matched_heads")
    );
    assert!((share("matched_neurons") - 36.0 / INTER as f64).abs() < 1e-12);
    assert!(
        stdout.contains("note: the map matched 66.6% of the target's attention heads and 75.0% of the target's MLP neurons"),
        "{stdout}"
    );
}
