//! Memory: a transfer between Qwen2.5-1.5B- and Llama-3.2-3B-shaped checkpoints keeps anonymous
//! memory (RssAnon: heap, not the mapped weights) under 2 GiB, because weights are read from the
//! map one module at a time; and a large adapter is held once, at its stored size, not in f32.
//! Two layers of each (full widths, real vocabularies) keep it quick; memory per module in flight
//! does not depend on depth.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

const LIMIT_KIB: u64 = 2 * 1024 * 1024;

fn loraxfer(args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_loraxfer"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "loraxfer {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// RssAnon of a running process, in KiB (None once it has exited).
fn rss_anon_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("RssAnon:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Runs loraxfer with `args` to the end, polling its RssAnon; returns the peak in KiB.
fn peak_rss_anon_kib(args: &[&str]) -> u64 {
    let mut child = Command::new(env!("CARGO_BIN_EXE_loraxfer"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut peak = 0;
    loop {
        if let Some(kib) = rss_anon_kib(child.id()) {
            peak = peak.max(kib);
        }
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "loraxfer {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{}: peak RssAnon {:.0} MiB", args[0], peak as f64 / 1024.0);
    assert!(peak > 0, "RssAnon was never sampled");
    peak
}

#[test]
fn qwen_1_5b_to_llama_3b_shapes_stay_under_2_gib_anonymous() {
    if !Path::new("/proc/self/status").exists() {
        eprintln!("skipped: needs /proc to read RssAnon");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).to_string_lossy().into_owned();
    loraxfer(&[
        "synth",
        "model",
        "--like",
        "qwen2.5-1.5b",
        "--layers",
        "2",
        "--out",
        &p("qwen"),
        "--seed",
        "1",
    ]);
    loraxfer(&[
        "synth",
        "model",
        "--like",
        "llama-3.2-3b",
        "--layers",
        "2",
        "--out",
        &p("llama"),
        "--seed",
        "2",
    ]);
    loraxfer(&[
        "synth",
        "adapter",
        "--base",
        &p("qwen"),
        "--out",
        &p("adapter"),
    ]);

    let peak = peak_rss_anon_kib(&[
        "transfer",
        "--source-base",
        &p("qwen"),
        "--target-base",
        &p("llama"),
        "--adapter",
        &p("adapter"),
        "--out",
        &p("out"),
        "--rank",
        "256",
        "--mode",
        "align",
    ]);
    assert!(peak < LIMIT_KIB, "peak RssAnon {peak} KiB is over 2 GiB");

    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("out/transfer_report.json")).unwrap(),
    )
    .unwrap();
    let rows = report["modules"].as_array().unwrap();
    assert_eq!(rows.len(), 14);
    assert!(rows
        .iter()
        .all(|r| r["mode"] == "align" && r["transferred"] == true));
    let q = rows.iter().find(|r| r["module"] == "q_proj").unwrap();
    assert_eq!(q["target_shape"], serde_json::json!([3072, 3072]));
}

/// A large adapter is held once, at its stored size: its f32 factors are read a module at a time
/// and the output is kept as it will be written. A deep, narrow model (200 tiny-llama layers)
/// with r = 256 on every projection (166 MB stored in bf16, 332 MB in f32; the rank past the
/// widths is legal in PEFT and costs nothing to synthesize) makes the adapter far larger than
/// the modules in flight; copied onto its own base (no decomposition), the adapter is the
/// memory. Reading it whole and keeping every unit's f32 factors to the end took 2.8 times its
/// f32 size; the run must stay below that size.
#[test]
fn a_large_adapter_is_held_at_its_stored_size() {
    if !Path::new("/proc/self/status").exists() {
        eprintln!("skipped: needs /proc to read RssAnon");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).to_string_lossy().into_owned();
    loraxfer(&[
        "synth",
        "model",
        "--like",
        "tiny-llama",
        "--layers",
        "200",
        "--out",
        &p("deep"),
    ]);
    loraxfer(&[
        "synth",
        "adapter",
        "--base",
        &p("deep"),
        "--out",
        &p("large"),
        "--r",
        "256",
        "--dtype",
        "bf16",
    ]);
    let stored = std::fs::metadata(dir.path().join("large/adapter_model.safetensors"))
        .unwrap()
        .len();
    let f32_kib = stored * 2 / 1024;
    let peak = peak_rss_anon_kib(&[
        "transfer",
        "--source-base",
        &p("deep"),
        "--target-base",
        &p("deep"),
        "--adapter",
        &p("large"),
        "--out",
        &p("copied"),
        "--mode",
        "copy",
    ]);
    assert!(
        peak < f32_kib,
        "peak RssAnon {peak} KiB for an adapter of {f32_kib} KiB in f32"
    );
}
