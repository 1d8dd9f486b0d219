//! `transfer` and `inspect`.

use loraxfer::args::{InspectArgs, TransferArgs};
use loraxfer::progress::Progress;
use loraxfer::timing::Phase;
use loraxfer::transfer::{self, inspect, report, Job};
use loraxfer::Result;

pub fn transfer(args: TransferArgs) -> Result<()> {
    let job = args.job(Progress::bar())?;
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
    if s.emptied > 0 {
        println!(
            "warning: {} transferred modules came out zero from a non-zero source update \
             (energy_kept below {} in the report): the target's weights (or the map between the \
             models) give them no direction to carry it",
            s.emptied,
            report::EMPTIED
        );
    }
    if let Some(note) = report::unmatched_note(s) {
        println!("note: {note}");
    }
    if let Some(reason) = &r.auto_reason {
        println!("auto chose {}: {reason}", r.mode);
    }
    if !job.gguf_adapter && gguf_model(&job.target_base) {
        println!(
            "note: the target is a GGUF model; --gguf-adapter also writes the adapter as a \
             llama.cpp LoRA (adapter_model.gguf) for it"
        );
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

/// Whether a model argument is a GGUF model: a `.gguf` file, or a directory holding one and no
/// config.json (as `Checkpoint::open` reads them).
fn gguf_model(path: &std::path::Path) -> bool {
    use loraxfer::io::gguf::{find_in, is_gguf};
    is_gguf(path)
        || (path.is_dir()
            && !path.join("config.json").exists()
            && matches!(find_in(path), Ok(Some(_))))
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
    let ins = args.run(&Progress::bar())?;
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
