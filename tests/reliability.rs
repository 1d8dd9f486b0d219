//! "Nothing is lost": deterministic output across runs and thread counts, interrupted runs leave
//! no output and no temporary directory (or the next run removes it and says so), concurrent runs
//! to one --out cannot both succeed, a full disk gives a clear error and no partial output, and
//! checkpoint indexes that list a tensor twice are refused.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_loraxfer"))
}

fn ok(args: &[&str]) {
    let out = bin().args(args).output().unwrap();
    assert!(
        out.status.success(),
        "loraxfer {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Pair {
    dir: tempfile::TempDir,
}

impl Pair {
    /// A source, a derivative and an adapter; `like` picks the size.
    fn new(like: &str, layers: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n).to_string_lossy().into_owned();
        ok(&[
            "synth",
            "model",
            "--like",
            like,
            "--layers",
            layers,
            "--out",
            &p("s"),
            "--seed",
            "1",
        ]);
        ok(&[
            "synth",
            "model",
            "--derive-from",
            &p("s"),
            "--drift",
            "0.05",
            "--out",
            &p("t"),
        ]);
        ok(&["synth", "adapter", "--base", &p("s"), "--out", &p("a")]);
        Pair { dir }
    }

    fn path(&self, n: &str) -> PathBuf {
        self.dir.path().join(n)
    }

    fn transfer(&self, out: &Path, extra: &[&str]) -> Command {
        let mut c = bin();
        c.args(["transfer", "--source-base"]).arg(self.path("s"));
        c.arg("--target-base")
            .arg(self.path("t"))
            .arg("--adapter")
            .arg(self.path("a"));
        c.arg("--out").arg(out).args(extra);
        c
    }

    /// Entries of the directory whose name mentions `out`'s name (the output and its temporaries).
    fn leftovers(&self, out: &Path) -> Vec<String> {
        let name = out.file_name().unwrap().to_string_lossy().into_owned();
        std::fs::read_dir(out.parent().unwrap())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n == &name || n.starts_with(&format!(".{name}.")))
            .collect()
    }
}

fn run(mut c: Command) -> Output {
    c.output().unwrap()
}

fn report_rows(out: &Path) -> serde_json::Value {
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("transfer_report.json")).unwrap())
            .unwrap();
    r["modules"].clone()
}

#[test]
fn output_is_identical_across_runs_and_thread_counts() {
    let pair = Pair::new("tiny-qwen2", "4");
    let mut outs = Vec::new();
    for (i, threads) in ["1", "2", "2", "3"].iter().enumerate() {
        let out = pair.path(&format!("o{i}"));
        let mut c = pair.transfer(&out, &["--rank", "32"]);
        c.env("RAYON_NUM_THREADS", threads);
        let o = run(c);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        outs.push(out);
    }
    let weights = |o: &PathBuf| std::fs::read(o.join("adapter_model.safetensors")).unwrap();
    let config = |o: &PathBuf| std::fs::read(o.join("adapter_config.json")).unwrap();
    for o in &outs[1..] {
        assert!(
            weights(o) == weights(&outs[0]),
            "adapter bytes differ between runs / thread counts"
        );
        assert_eq!(config(o), config(&outs[0]));
        assert_eq!(report_rows(o), report_rows(&outs[0]), "report rows differ");
    }
}

/// Starts a transfer big enough to be interrupted, and waits until it is computing.
fn start_slow(pair: &Pair, out: &Path) -> Child {
    let mut c = pair.transfer(out, &["--rank", "128"]);
    c.stdout(Stdio::null()).stderr(Stdio::piped());
    let child = c.spawn().unwrap();
    std::thread::sleep(Duration::from_millis(400));
    child
}

fn signal(child: &Child, sig: &str) {
    let st = Command::new("kill")
        .args([&format!("-{sig}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

#[test]
fn interrupted_runs_leave_nothing_behind() {
    let pair = Pair::new("qwen2.5-0.5b", "2");
    for sig in ["INT", "TERM"] {
        let out = pair.path(&format!("out-{sig}"));
        let child = start_slow(&pair, &out);
        signal(&child, sig);
        let o = child.wait_with_output().unwrap();
        assert!(
            !o.status.success(),
            "the run finished before SIG{sig}: the workload is too small to test"
        );
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("interrupted"),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert_eq!(
            pair.leftovers(&out),
            Vec::<String>::new(),
            "SIG{sig} left files"
        );
    }
}

#[test]
fn a_killed_run_is_cleaned_up_by_the_next_one() {
    let pair = Pair::new("tiny-qwen2", "4");
    let out = pair.path("out");
    // What a SIGKILLed run leaves: a staging directory named after a process that is gone.
    let stale = pair.path(".out.tmp-4000000000-1");
    std::fs::create_dir(&stale).unwrap();
    std::fs::write(stale.join("adapter_model.safetensors"), b"partial").unwrap();
    let o = run(pair.transfer(&out, &[]));
    assert!(o.status.success());
    assert!(!stale.exists(), "stale staging directory kept");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("interrupted run"),
        "the cleanup is not reported"
    );
    assert_eq!(pair.leftovers(&out), vec!["out".to_string()]);
}

#[test]
fn concurrent_runs_to_one_output_cannot_both_succeed() {
    let pair = Pair::new("tiny-qwen2", "4");
    for round in 0..3 {
        let out = pair.path(&format!("race{round}"));
        let kids: Vec<Child> = (0..2)
            .map(|_| {
                let mut c = pair.transfer(&out, &["--rank", "32"]);
                c.stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let results: Vec<Output> = kids
            .into_iter()
            .map(|k| k.wait_with_output().unwrap())
            .collect();
        let wins = results.iter().filter(|o| o.status.success()).count();
        assert_eq!(wins, 1, "exactly one of two racing runs must succeed");
        let loser = results.iter().find(|o| !o.status.success()).unwrap();
        assert!(String::from_utf8_lossy(&loser.stderr).contains("already exists"));
        // The survivor is whole: its report and adapter agree, and nothing else is left.
        let rows = report_rows(&out);
        assert_eq!(rows.as_array().unwrap().len(), 28);
        assert_eq!(pair.leftovers(&out), vec![format!("race{round}")]);
    }
}

#[test]
fn full_disk_gives_a_clear_error_and_no_partial_output() {
    // A 256 KiB tmpfs: the adapter (about 300 KiB in f32) cannot fit. Needs root; skipped otherwise.
    let pair = Pair::new("tiny-qwen2", "4");
    let mnt = pair.path("small");
    std::fs::create_dir(&mnt).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k", "tmpfs"])
        .arg(&mnt)
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !mounted {
        eprintln!("skipped: cannot mount a small tmpfs here (needs root)");
        return;
    }
    let out = mnt.join("out");
    let o = run(pair.transfer(&out, &[]));
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    // What the run left on the small disk, read before unmounting hides it.
    let left: Vec<String> = std::fs::read_dir(&mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let _ = Command::new("umount").arg(&mnt).status();
    assert!(left.is_empty(), "left on the full disk: {left:?}");
    assert!(!o.status.success(), "a full disk must fail the run");
    assert!(
        stderr.contains("error:") && (stderr.contains("No space") || stderr.contains("space")),
        "{stderr}"
    );
    assert!(
        stderr.contains("small"),
        "the error names the path: {stderr}"
    );
    // Nor under the mount point once unmounted.
    assert!(!out.exists());
}

#[test]
fn an_index_listing_a_tensor_twice_is_refused() {
    let pair = Pair::new("tiny-qwen2", "4");
    let s = pair.path("s");
    std::fs::rename(
        s.join("model.safetensors"),
        s.join("model-00001-of-00001.safetensors"),
    )
    .unwrap();
    let name = "model-00001-of-00001.safetensors";
    let text = format!(
        r#"{{"metadata": {{}}, "weight_map": {{"model.norm.weight": "{name}", "model.layers.0.self_attn.q_proj.weight": "{name}", "model.norm.weight": "{name}"}}}}"#
    );
    std::fs::write(s.join("model.safetensors.index.json"), text).unwrap();
    let out = pair.path("o");
    let o = run(pair.transfer(&out, &[]));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        stderr.contains("model.norm.weight")
            && stderr.contains("twice")
            && stderr.contains("index"),
        "{stderr}"
    );
    assert!(!out.exists());
}

#[test]
fn an_immediate_interrupt_exits_promptly() {
    // The interrupt handler must not hang: a run interrupted right at start exits promptly.
    let pair = Pair::new("tiny-qwen2", "4");
    let out = pair.path("quick");
    let mut c = pair.transfer(&out, &[]);
    let child = c
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    signal(&child, "INT");
    let start = Instant::now();
    let mut child = child;
    while child.try_wait().unwrap().is_none() {
        // A hang guard, not a speed bound: the uninterrupted run takes a few seconds.
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "interrupted run did not exit"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        pair.leftovers(&out).iter().all(|n| n == "quick"),
        "{:?}",
        pair.leftovers(&out)
    );
}

#[test]
fn the_basis_cache_reproduces_the_uncached_result_and_is_reused() {
    let pair = Pair::new("tiny-qwen2", "4");
    let cache = pair.path("cache");
    let cache_arg = cache.to_string_lossy().into_owned();
    let plain = pair.path("plain");
    assert!(run(pair.transfer(&plain, &["--rank", "16"]))
        .status
        .success());
    let mut reports = Vec::new();
    for i in 0..2 {
        let out = pair.path(&format!("cached{i}"));
        let o = run(pair.transfer(&out, &["--rank", "16", "--cache-dir", &cache_arg]));
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        // Cached or not, the adapter is the same bytes.
        assert!(
            std::fs::read(out.join("adapter_model.safetensors")).unwrap()
                == std::fs::read(plain.join("adapter_model.safetensors")).unwrap()
        );
        let r: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("transfer_report.json")).unwrap(),
        )
        .unwrap();
        reports.push(r["basis_cache"].clone());
    }
    // 28 module pairs, two bases each: all computed the first time, all found the second.
    assert_eq!(reports[0]["misses"], 56);
    assert_eq!(reports[0]["hits"], 0);
    assert_eq!(reports[1]["hits"], 56);
    assert_eq!(reports[1]["misses"], 0);
    // LORAXFER_CACHE_DIR names the same cache; --no-cache sets it aside.
    let report_of = |extra: &[&str], name: &str| {
        let out = pair.path(name);
        let mut c = pair.transfer(&out, extra);
        c.env("LORAXFER_CACHE_DIR", &cache);
        let o = run(c);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let r: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("transfer_report.json")).unwrap(),
        )
        .unwrap();
        r["basis_cache"].clone()
    };
    assert_eq!(report_of(&["--rank", "16"], "env")["hits"], 56);
    let unused = report_of(&["--rank", "16", "--no-cache"], "no-cache");
    assert!(unused.is_null(), "--no-cache used the cache: {unused}");
    // A different k is a different key.
    let o = run(pair.transfer(
        &pair.path("k8"),
        &["--rank", "8", "--cache-dir", &cache_arg],
    ));
    let r: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(pair.path("k8/transfer_report.json")).unwrap(),
    )
    .unwrap();
    assert!(o.status.success());
    assert_eq!(r["basis_cache"]["hits"], 0);
    // A corrupted entry is recomputed, not trusted.
    for e in std::fs::read_dir(&cache).unwrap().flatten().take(3) {
        std::fs::write(e.path(), b"garbage").unwrap();
    }
    let out = pair.path("after-corruption");
    assert!(
        run(pair.transfer(&out, &["--rank", "16", "--cache-dir", &cache_arg]))
            .status
            .success()
    );
    assert!(
        std::fs::read(out.join("adapter_model.safetensors")).unwrap()
            == std::fs::read(plain.join("adapter_model.safetensors")).unwrap()
    );
    // Damage the key cannot see: one value's bits flipped, the header intact (the checksum
    // catches it), and a temporary file of a run that was killed (removed at the next open).
    for entry in std::fs::read_dir(&cache).unwrap().flatten() {
        let mut bytes = std::fs::read(entry.path()).unwrap();
        *bytes.last_mut().unwrap() ^= 0x40; // the exponent of V's last value
        std::fs::write(entry.path(), bytes).unwrap();
    }
    let stale = cache.join("0123456789abcdef0123456789abcdef.tmp-4000000000-0");
    std::fs::write(&stale, b"half a basis").unwrap();
    // A file of the user's that only looks alike is not the cache's to remove.
    let theirs = cache.join("notes.tmp-2024-01");
    std::fs::write(&theirs, b"mine").unwrap();
    let out = pair.path("after-bit-flip");
    let o = run(pair.transfer(&out, &["--rank", "16", "--cache-dir", &cache_arg]));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("transfer_report.json")).unwrap())
            .unwrap();
    assert_eq!(r["basis_cache"]["misses"], 56, "{}", r["basis_cache"]);
    assert_eq!(r["basis_cache"]["hits"], 0, "{}", r["basis_cache"]);
    assert!(
        std::fs::read(out.join("adapter_model.safetensors")).unwrap()
            == std::fs::read(plain.join("adapter_model.safetensors")).unwrap()
    );
    assert!(!stale.exists(), "a killed run's temporary file was kept");
    assert!(
        theirs.exists(),
        "a file the cache did not write was removed"
    );
}
