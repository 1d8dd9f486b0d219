//! `transfer` and `inspect`.

use loraxfer::backend;
use loraxfer::io::checkpoint::Checkpoint;
use loraxfer::io::hub::{self, Kind};
use loraxfer::plan::Options;
use loraxfer::timing::Phase;
use loraxfer::transfer::{self, inspect, report, Job};
use loraxfer::Result;

use super::{InspectArgs, SvdArgs, TransferArgs};

/// The SVD settings as plan options; `plan::build` validates them.
fn options(svd: &SvdArgs) -> Options {
    Options {
        rank: svd.rank,
        oversample: svd.oversample,
        power_iters: svd.power_iters,
        seed: svd.seed,
        ..Options::default()
    }
}

pub fn transfer(args: TransferArgs) -> Result<()> {
    let mut opts = options(&args.svd);
    opts.mode = args.mode;
    opts.threshold = args.threshold;
    opts.modules = args.modules.clone();
    opts.map = loraxfer::map::MapOptions {
        residual: args.map_residual,
        fold_norms: !args.no_norm_fold,
        gain_floor: args.map_gain_floor,
        inner: args.map_inner,
        depth: args.map_depth,
        seed: args.svd.seed,
    };
    let mut hub_names = std::collections::BTreeMap::new();
    let mut resolve =
        |arg: &std::path::Path, role: &str, kind: Kind| -> Result<std::path::PathBuf> {
            let (dir, name) = hub::resolve(arg, kind)?;
            if let Some(name) = name {
                hub_names.insert(role.to_string(), name);
            }
            Ok(dir)
        };
    let source_base = resolve(&args.source_base, "source_base", Kind::Model)?;
    let target_base = resolve(&args.target_base, "target_base", Kind::Model)?;
    let adapter = resolve(&args.adapter, "adapter", Kind::Adapter)?;
    let job = Job {
        hub: hub_names,
        source_base,
        target_base,
        adapter,
        out: args.out,
        options: opts,
        layer_map_file: args.layer_map,
        device: args.svd.device,
        cache_dir: args.svd.cache_dir.clone(),
        force: args.force,
        progress: true,
    };
    let report = transfer::run(&job)?;
    print_summary(&job, &report);
    if args.timings {
        eprintln!("{}", timings_table(&report));
    }
    Ok(())
}

fn print_summary(job: &Job, r: &report::Report) {
    let s = &r.summary;
    let f = |x: Option<f64>| x.map(|v| format!("{v:.4}")).unwrap_or_else(|| "n/a".into());
    println!("{}", report::summary_table(&r.modules));
    println!(
        "transferred {} of {} modules ({} skipped), mean similarity {}, mean energy kept {}{}",
        s.transferred,
        s.transferred + s.skipped,
        s.skipped,
        f(s.mean_similarity),
        f(s.mean_energy_kept),
        if s.rank_capped > 0 {
            format!(
                ", rank capped for {} (k above a matrix size)",
                s.rank_capped
            )
        } else {
            String::new()
        }
    );
    if s.weakly_resolved > 0 {
        println!(
            "note: {} modules have sigma_(k+1)/sigma_k above {} (gap_source/gap_target in the report): \
             their top-k subspaces are weakly determined and vary with --seed; a smaller --rank or \
             more --power-iters resolves them better",
            s.weakly_resolved,
            report::WEAK_GAP
        );
    }
    if let Some(reason) = &r.auto_reason {
        println!("auto chose {}: {reason}", r.mode);
    }
    println!(
        "mode {}, k {}, device {}, {:.2} s -> {}",
        r.mode,
        r.rank,
        r.device,
        r.timings_ms.get("total").copied().unwrap_or(0.0) / 1e3,
        job.out.display()
    );
}

fn timings_table(r: &report::Report) -> String {
    let mut out = String::from("phase         ms (thread time; total is wall time)\n");
    for p in Phase::ALL {
        out += &format!(
            "{:<12} {:>10.1}\n",
            p.name(),
            r.timings_ms.get(p.name()).copied().unwrap_or(0.0)
        );
    }
    out += &format!(
        "{:<12} {:>10.1}",
        "total",
        r.timings_ms.get("total").copied().unwrap_or(0.0)
    );
    out
}

pub fn inspect(args: InspectArgs) -> Result<()> {
    let opts = options(&args.svd);
    let (backend, _) = backend::select(args.svd.device)?;
    let source = Checkpoint::open(&hub::resolve(&args.source_base, Kind::Model)?.0)?;
    let target = Checkpoint::open(&hub::resolve(&args.target_base, Kind::Model)?.0)?;
    let cache = args
        .svd
        .cache_dir
        .as_deref()
        .map(loraxfer::transfer::cache::BasisCache::open)
        .transpose()?;
    let ins = inspect::run(
        &source,
        &target,
        &opts,
        backend.as_ref(),
        cache.as_ref(),
        true,
    )?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&ins).expect("serializable")
        );
    } else {
        print!("{}", inspect::table(&ins));
        let map: Vec<String> = ins
            .layer_map
            .iter()
            .map(|(j, i)| format!("{j}<-{i}"))
            .collect();
        println!("layer map (target<-source): {}", map.join(" "));
    }
    Ok(())
}
