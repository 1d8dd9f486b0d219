//! `export-gguf`: a PEFT adapter written as a llama.cpp LoRA for its base model.

use std::path::PathBuf;

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
