//! Flags that would be ignored or misread are refused before any work: a negative value reaches
//! its range check, and `synth model` refuses combinations it would silently ignore.

mod common;
use common::cli::*;

#[test]
fn flags_that_would_be_ignored_or_misparsed_are_refused() {
    let f = Fixtures::new();
    let out = f.root.path().join("never");
    for (args, says) in [
        // A negative value reaches the range check instead of being taken for a flag.
        (vec!["transfer", "--threshold", "-0.1"], "outside [0, 1]"),
        // A derivative copies its source's shapes, layers and dtype.
        (
            vec![
                "synth",
                "model",
                "--derive-from",
                s(&f.source),
                "--drift",
                "0.1",
                "--layers",
                "2",
            ],
            "cannot be used with",
        ),
        (
            vec!["synth", "model", "--like", "tiny-qwen2", "--drift", "0.3"],
            "--derive-from",
        ),
    ] {
        let mut args = args.clone();
        args.extend(["--out", s(&out)]);
        if args[0] == "transfer" {
            args.extend(["--adapter", s(&f.adapter), "--source-base", s(&f.source)]);
            args.extend(["--target-base", s(&f.target)]);
        }
        let run = loraxfer(&args);
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(!run.status.success(), "{args:?} ran");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        assert!(!out.exists());
    }
}
