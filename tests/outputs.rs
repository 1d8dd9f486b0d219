//! Where and how outputs are written: through a symbolic link `--out`, with the user's umask, in
//! the type that keeps both factors, and over a demo that was killed. (Refusals of an existing
//! `--out` are in bad_inputs.rs.)

use std::path::Path;

use loraxfer::io::safetensors::{FloatType, TensorFile};

mod common;
use common::cli::*;
use common::refusals::*;
use common::rewrite;

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_symbolic_link_out_is_written_where_it_points_and_kept() {
    let f = Fixtures::new();
    // A link to a directory that does not exist yet, on "another disk".
    let disk = f.root.path().join("disk");
    std::fs::create_dir(&disk).unwrap();
    let real = disk.join("result");
    std::os::unix::fs::symlink(&real, f.out()).unwrap();
    let first = f.transfer(&[]);
    assert!(first.status.success(), "{}", stderr(&first));
    let is_link = |p: &Path| {
        std::fs::symlink_metadata(p)
            .unwrap()
            .file_type()
            .is_symlink()
    };
    assert!(is_link(&f.out()), "--out is no longer a link");
    assert!(real.join("adapter_model.safetensors").is_file());
    // Existing now: refused without --force, replaced with it, the link kept both times.
    f.assert_refused_keeping_out(&f.transfer(&[]), "--force");
    let report = real.join("transfer_report.json");
    std::fs::write(&report, b"an old report").unwrap();
    let forced = f.transfer(&["--force"]);
    assert!(forced.status.success(), "{}", stderr(&forced));
    assert!(is_link(&f.out()));
    assert_ne!(std::fs::read(&report).unwrap(), b"an old report");
    for dir in [f.root.path(), disk.as_path()] {
        let left: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(left.is_empty(), "left in {}: {left:?}", dir.display());
    }
}

#[test]
fn a_symbolic_link_out_that_loops_is_refused() {
    let f = Fixtures::new();
    std::os::unix::fs::symlink("out", f.out()).unwrap();
    f.assert_refused_keeping_out(&f.transfer(&[]), "loops");
}

#[test]
fn weights_are_written_with_the_users_umask() {
    let f = Fixtures::new();
    for (umask, mode) in [("077", 0o600), ("022", 0o644), ("002", 0o664)] {
        let out = f.root.path().join(format!("umask{umask}"));
        let script = format!(
            "umask {umask} && exec \"$0\" transfer --out \"$1\" --adapter \"$2\" \
             --source-base \"$3\" --target-base \"$4\""
        );
        let run = std::process::Command::new("sh")
            .args(["-c", &script, env!("CARGO_BIN_EXE_loraxfer")])
            .args([&out, &f.adapter, &f.source, &f.target])
            .output()
            .unwrap();
        assert!(run.status.success(), "{}", stderr(&run));
        use std::os::unix::fs::PermissionsExt;
        for file in ["adapter_model.safetensors", "adapter_config.json"] {
            let got = std::fs::metadata(out.join(file))
                .unwrap()
                .permissions()
                .mode()
                & 0o777;
            assert_eq!(got, mode, "{file} under umask {umask}: {got:o}");
        }
    }
}

#[test]
fn factors_of_two_types_are_written_in_the_type_that_holds_both() {
    let f = Fixtures::new();
    let adapter = f.root.path().join("mixed");
    synth(
        "adapter",
        &adapter,
        &["--base", s(&f.source), "--dtype", "bf16"],
    );
    // lora_B of every module stored in f32 (values still bf16-exact), lora_A left in bf16.
    rewrite(&adapter.join("adapter_model.safetensors"), |tensors| {
        for t in tensors.iter_mut().filter(|t| t.name.contains("lora_B")) {
            t.ty = FloatType::F32;
        }
    });

    let run = f.transfer_with(&f.source, &f.target, &adapter, &[]);
    assert!(run.status.success(), "{}", stderr(&run));
    let out = TensorFile::open(&f.out().join("adapter_model.safetensors")).unwrap();
    let names: Vec<&str> = out.names().collect();
    assert!(!names.is_empty());
    for n in names {
        let ty = FloatType::from_dtype(out.entry(n).unwrap().dtype);
        assert_eq!(ty, Some(FloatType::F32), "{n}");
    }
}

#[test]
fn demo_force_replaces_a_demo_that_was_killed() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("demo");
    ok(&["demo", "--out", s(&dir)]);
    // Killed while writing its result: the result's staging directory is left, the result is
    // not there. The process (pid 4000000000) is gone: pids never reach it.
    std::fs::remove_dir_all(dir.join("transferred")).unwrap();
    let stale = dir.join(".transferred.tmp-4000000000-1");
    std::fs::create_dir(&stale).unwrap();
    std::fs::write(stale.join("adapter_model.safetensors"), b"half").unwrap();
    ok(&["demo", "--out", s(&dir), "--force"]);
    assert!(dir.join("transferred/adapter_model.safetensors").is_file());
    assert!(!stale.exists());
    // A staging directory of a live process is another run at work: refused, and kept.
    let live = dir.join(format!(".transferred.tmp-{}-1", std::process::id()));
    std::fs::create_dir(&live).unwrap();
    let refused = loraxfer(&["demo", "--out", s(&dir), "--force"]);
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("not part of a loraxfer output"),
        "{}",
        stderr(&refused)
    );
    assert!(live.is_dir() && dir.join("transferred").is_dir());
}

trait KeepingOut {
    /// A refusal that names `needle` and leaves the symbolic link `--out` a link.
    fn assert_refused_keeping_out(&self, out: &std::process::Output, needle: &str);
}

impl KeepingOut for Fixtures {
    fn assert_refused_keeping_out(&self, out: &std::process::Output, needle: &str) {
        let err = stderr(out);
        assert!(!out.status.success(), "not refused: {err}");
        assert!(err.starts_with("error:") && err.contains(needle), "{err}");
        let meta = std::fs::symlink_metadata(self.out()).unwrap();
        assert!(meta.file_type().is_symlink(), "--out was replaced");
        self.assert_no_staging_left();
    }
}

#[test]
fn the_base_model_is_named_by_an_absolute_path() {
    // Given relative to the working directory, the target is written absolute, so the adapter
    // loads (PEFT's AutoPeftModel reads base_model_name_or_path) from anywhere.
    let f = Fixtures::new();
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_loraxfer"))
        .current_dir(f.root.path())
        .args(["transfer", "--out", "out", "--adapter", "adapter"])
        .args(["--source-base", "source", "--target-base", "./target"])
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", stderr(&run));
    let config = read_json(&f.out().join("adapter_config.json"));
    let named = config["base_model_name_or_path"].as_str().unwrap();
    assert!(Path::new(named).is_absolute(), "{named}");
    assert_eq!(
        std::fs::canonicalize(named).unwrap(),
        std::fs::canonicalize(&f.target).unwrap()
    );
}

#[test]
fn printing_into_a_closed_pipe_ends_quietly() {
    // `loraxfer info | head -0`: the reader is gone before the first line.
    use std::os::unix::process::ExitStatusExt;
    // A socket pair behaves as a pipe here: writing after the peer is gone raises SIGPIPE.
    let (writer, reader) = std::os::unix::net::UnixStream::pair().unwrap();
    drop(reader);
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_loraxfer"))
        .arg("info")
        .stdout(std::process::Stdio::from(std::os::fd::OwnedFd::from(
            writer,
        )))
        .output()
        .unwrap();
    assert_eq!(
        run.status.signal(),
        Some(13),
        "{:?}: {}",
        run.status,
        stderr(&run)
    );
    assert!(!stderr(&run).contains("panicked"), "{}", stderr(&run));
}

#[test]
fn a_symbolic_link_out_with_a_trailing_slash_is_followed_too() {
    // `--out link/` as shells complete it; the link is relative, into another directory.
    let f = Fixtures::new();
    std::fs::create_dir(f.root.path().join("disk")).unwrap();
    std::os::unix::fs::symlink("disk/result", f.out()).unwrap();
    let out = format!("{}/", s(&f.out()));
    for extra in [&[][..], &["--force"][..]] {
        let mut args = vec!["transfer", "--out", &out, "--adapter", s(&f.adapter)];
        args.extend(["--source-base", s(&f.source), "--target-base", s(&f.target)]);
        args.extend_from_slice(extra);
        let run = loraxfer(&args);
        assert!(run.status.success(), "{extra:?}: {}", stderr(&run));
    }
    let meta = std::fs::symlink_metadata(f.out()).unwrap();
    assert!(meta.file_type().is_symlink(), "--out was replaced");
    let result = f.root.path().join("disk/result");
    assert!(result.join("adapter_model.safetensors").is_file());
}
