//! Memory: a transfer between Qwen2.5-1.5B- and Llama-3.2-3B-shaped checkpoints keeps anonymous
//! memory (RssAnon: heap, not the mapped weights) under 2 GiB, because weights are read from the
//! map one module at a time. Two layers of each (full widths, real vocabularies) keep it quick;
//! memory per module in flight does not depend on depth.

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

    let mut child = Command::new(env!("CARGO_BIN_EXE_loraxfer"))
        .args([
            "transfer",
            "--source-base",
            &p("qwen"),
            "--target-base",
            &p("llama"),
        ])
        .args([
            "--adapter",
            &p("adapter"),
            "--out",
            &p("out"),
            "--rank",
            "256",
            "--mode",
            "align",
        ])
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
        "transfer failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("peak RssAnon {:.0} MiB", peak as f64 / 1024.0);
    assert!(peak > 0, "RssAnon was never sampled");
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
