//! `demo`: the embedded default. Synthesizes a small Qwen2-shaped source, a derivative of it (the
//! "next release") and an adapter, then transfers the adapter with mode auto (rotate: the shapes
//! are equal) and shows the report.

use std::path::PathBuf;

use loraxfer::backend::Device;
use loraxfer::io::output::{check_only_outputs, check_target, resolve_links};
use loraxfer::io::safetensors::FloatType;
use loraxfer::modes::Mode;
use loraxfer::plan::Options;
use loraxfer::synth::{AdapterSpec, ModelSpec, Preset};
use loraxfer::transfer::{self, report, Job};
use loraxfer::{Error, Result};

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Where to put the demo's models, adapter and result (default: a fresh temporary directory).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Replace --out if it exists.
    #[arg(long)]
    force: bool,
}

/// The demo directory's parts: source model, target model, adapter, transferred adapter.
const PARTS: [&str; 4] = ["source", "target", "adapter", "transferred"];

pub fn run(args: DemoArgs) -> Result<()> {
    let dir = match &args.out {
        Some(given) => {
            // Through a symbolic link, to where it points (the link stays).
            let d = &resolve_links(given)?;
            if d.exists() && args.force && d.is_dir() {
                // An earlier demo: its four directories, each an output, and nothing else.
                check_only_outputs(d, &PARTS)?;
                std::fs::remove_dir_all(d).map_err(|e| Error::io(d, "cannot replace", e))?;
            } else {
                check_target(d, args.force, &[])?;
            }
            std::fs::create_dir_all(d).map_err(|e| Error::io(d, "cannot create", e))?;
            d.clone()
        }
        None => fresh_temp_dir()?,
    };
    let result = steps(&dir);
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

/// A new directory under the system's temporary directory, never one that exists (a pid is
/// reused, and a directory of that name may be someone else's).
fn fresh_temp_dir() -> Result<PathBuf> {
    let stamp = loraxfer::timing::epoch_nanos();
    let base = std::env::temp_dir();
    for attempt in 0u32.. {
        let dir = base.join(format!(
            "loraxfer-demo-{}-{stamp}-{attempt}",
            std::process::id()
        ));
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 100 => continue,
            Err(e) => return Err(Error::io(&dir, "cannot create", e)),
        }
    }
    unreachable!("the loop returns")
}

fn steps(dir: &std::path::Path) -> Result<()> {
    let [source, target, adapter, out] = PARTS.map(|part| dir.join(part));
    println!(
        "1. source model: tiny-qwen2 (4 layers, hidden 64) -> {}",
        source.display()
    );
    let base = ModelSpec {
        dtype: FloatType::Bf16,
        seed: 1,
        ..ModelSpec::new(Preset::TinyQwen2)
    };
    super::synth::model(&base, &source, false)?;
    println!(
        "2. target model: a derivative of the source, weights drifted by 5% -> {}",
        target.display()
    );
    let derived = ModelSpec {
        derive_from: Some(source.clone()),
        drift: 0.05,
        seed: 2,
        ..base
    };
    super::synth::model(&derived, &target, false)?;
    println!(
        "3. adapter for the source: r=16, alpha=32, all seven projections -> {}",
        adapter.display()
    );
    let spec = AdapterSpec {
        r: 16,
        alpha: 32.0,
        targets: Vec::new(),
        seed: 3,
        dtype: FloatType::F32,
    };
    super::synth::adapter(&source, &spec, &adapter, false)?;
    println!(
        "4. transfer (mode auto: rotate for equal shapes), k=16 -> {}\n",
        out.display()
    );
    let job = Job {
        hub: Default::default(),
        source_base: source,
        target_base: target,
        adapter,
        out: out.clone(),
        options: Options {
            mode: Mode::Auto,
            rank: 16,
            oversample: 8,
            ..Options::default()
        },
        layer_map_file: None,
        device: Device::Auto,
        cache_dir: None,
        force: false,
        gguf_adapter: false,
        fused_experts: false,
        progress: loraxfer::progress::Progress::bar(),
    };
    let r = transfer::run(&job)?;
    println!("{}", report::summary_table(&r.modules));
    println!(
        "transferred {} of {} modules in {:.2} s; mean similarity {:.4}, mean energy kept {:.4}",
        r.summary.transferred,
        r.summary.transferred + r.summary.skipped,
        r.timings_ms.get("total").copied().unwrap_or(0.0) / 1e3,
        r.summary.mean_similarity.unwrap_or(f64::NAN),
        r.summary.mean_energy_kept.unwrap_or(f64::NAN),
    );
    println!("adapter: {}/adapter_model.safetensors", out.display());
    println!("report:  {}/{}", out.display(), transfer::REPORT_FILE);
    Ok(())
}
