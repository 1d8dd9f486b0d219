//! `convert`: a GGUF base model written out as the engine reads it.

use std::path::PathBuf;

use loraxfer::io::checkpoint::Checkpoint;
use loraxfer::io::gguf::convert::write_checkpoint;
use loraxfer::io::hub::{self, Kind};
use loraxfer::io::output::StagedDir;
use loraxfer::io::safetensors::FloatType;
use loraxfer::progress::Progress;
use loraxfer::{Error, Result};

#[derive(Debug, clap::Args)]
pub struct ConvertArgs {
    /// The GGUF model: a `.gguf` file, a directory holding one, or a cached hub name.
    #[arg(long)]
    gguf: PathBuf,
    /// Output directory: model.safetensors, config.json, tokenizer.json.
    #[arg(long)]
    out: PathBuf,
    /// Storage type of the written weights: f32, f16 or bf16.
    #[arg(long, default_value = "f32", value_parser = crate::cli::synth::parse_dtype)]
    dtype: FloatType,
    /// Replace --out if it exists.
    #[arg(long)]
    force: bool,
}

pub fn run(args: ConvertArgs) -> Result<()> {
    let (path, _) = hub::resolve(&args.gguf, Kind::Model)?;
    let ckpt = Checkpoint::open(&path)?;
    let Some(model) = ckpt.gguf() else {
        return Err(Error::config(
            &path,
            "not a GGUF model (convert reads .gguf files; this is already a safetensors checkpoint)",
        ));
    };
    let arch = model.architecture();
    let staged = StagedDir::create(&args.out, args.force, &[&path])?;
    let n = write_checkpoint(&ckpt, staged.path(), args.dtype, &Progress::bar())?;
    let out = staged.commit()?;
    println!(
        "wrote {} ({arch} as {}: {n} tensors, {})",
        out.display(),
        ckpt.config.model_type,
        args.dtype.torch_name()
    );
    Ok(())
}
