//! `export-gguf`: a PEFT adapter written as a llama.cpp LoRA for its base model.

use std::path::PathBuf;

use loraxfer::io::adapter::Adapter;
use loraxfer::io::checkpoint::Checkpoint;
use loraxfer::io::gguf::lora::{family_of_base, is_lora_gguf, write_lora_gguf};
use loraxfer::io::hub::{self, Kind};
use loraxfer::io::output::{name_of, StagedFile};
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
    let (adapter_dir, hub_name) = hub::resolve(&args.adapter, Kind::Adapter)?;
    let (base_dir, _) = hub::resolve(&args.base, Kind::Model)?;
    let adapter = Adapter::open(&adapter_dir)?;
    let base = Checkpoint::open(&base_dir)?;
    let family = family_of_base(&base)?;
    let weights = adapter_dir.join(loraxfer::io::adapter::WEIGHTS_FILE);
    let inputs = [adapter_dir.as_path(), weights.as_path(), base_dir.as_path()];
    let staged = StagedFile::create(&args.out, args.force, &inputs, is_lora_gguf)?;
    // A hub adapter by its name, not its snapshot's commit.
    let name = hub_name.map_or_else(|| name_of(&adapter_dir), |h| h.name);
    write_lora_gguf(&adapter, &base, &name, staged.path())?;
    let out = staged.commit()?;
    println!(
        "wrote {} (a llama.cpp LoRA for {}: {} modules, lora_alpha {})",
        out.display(),
        family.gguf,
        adapter.modules.len(),
        adapter.config.lora_alpha
    );
    Ok(())
}
