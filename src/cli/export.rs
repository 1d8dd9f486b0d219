//! `export-gguf` and `export-mlx`: a PEFT adapter written as a llama.cpp LoRA for its base
//! model, or as an MLX adapter.

use std::path::PathBuf;

use loraxfer::io::adapter::mlx_write;
use loraxfer::io::gguf::lora::export;
use loraxfer::progress::Progress;
use loraxfer::Result;

#[derive(Debug, clap::Args)]
pub struct ExportGgufArgs {
    /// The PEFT adapter directory (or a cached hub name).
    #[arg(long)]
    adapter: PathBuf,
    /// The base model the adapter is for: a Hugging Face directory, a GGUF file or a cached hub
    /// name. Its architecture names the tensors; its weights' shapes are checked.
    #[arg(long)]
    base: PathBuf,
    /// The GGUF file to write (for `llama-cli --lora FILE`, Ollama's `ADAPTER FILE`).
    #[arg(long)]
    out: PathBuf,
    /// Replace --out if it is an earlier LoRA GGUF.
    #[arg(long)]
    force: bool,
}

pub fn run(args: ExportGgufArgs) -> Result<()> {
    let done = export(
        &args.adapter,
        &args.base,
        &args.out,
        args.force,
        &Progress::bar(),
    )?;
    println!(
        "wrote {} (a llama.cpp LoRA for {}: {} modules, lora_alpha {})",
        done.path, done.architecture, done.modules, done.lora_alpha
    );
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct ExportMlxArgs {
    /// The adapter: a PEFT directory, an MLX one, or a cached hub name.
    #[arg(long)]
    adapter: PathBuf,
    /// The MLX model it is for (a directory or a cached hub name), optional: every module is
    /// checked against its weights, `num_layers` counted so that any mlx-lm reads it (without,
    /// it is -1: all layers, as mlx-lm 0.22 and later read it), and experts stacked as it holds
    /// them. Needed for a LoRA on fused expert parameters, whose layout is its family's.
    #[arg(long)]
    base: Option<PathBuf>,
    /// The MLX adapter directory to write (adapters.safetensors, adapter_config.json), for
    /// `mlx_lm.load(BASE, adapter_path=OUT)` and `mlx_lm.generate --adapter-path OUT`.
    #[arg(long)]
    out: PathBuf,
    /// Replace --out if it is an earlier output.
    #[arg(long)]
    force: bool,
}

pub fn run_mlx(args: ExportMlxArgs) -> Result<()> {
    let written = mlx_write::export(&args.adapter, args.base.as_deref(), &args.out, args.force)?;
    println!(
        "wrote {} (an MLX adapter: {} modules, rank {}, scale {}, num_layers {}, keys {})",
        written.path,
        written.modules,
        written.rank,
        written.scale,
        written.num_layers,
        written.keys.join(",")
    );
    Ok(())
}
