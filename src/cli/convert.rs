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
    /// Output directory: model.safetensors (or shards and their index), config.json,
    /// tokenizer.json.
    #[arg(long)]
    out: PathBuf,
    /// Storage type of the written weights: f32, f16 or bf16.
    #[arg(long, default_value = "f32", value_parser = crate::cli::synth::parse_dtype)]
    dtype: FloatType,
    /// Largest weights file, in bytes of tensor data (a larger tensor gets a file of its own):
    /// past it the weights are shards with an index, as `save_pretrained` writes them. `2GB`,
    /// `5GB` (the Hub's `save_pretrained` default), `500MB`, `4GiB`, or a number of bytes.
    #[arg(long, default_value = "2GB", value_parser = parse_size)]
    max_shard_size: u64,
    /// Replace --out if it exists.
    #[arg(long)]
    force: bool,
}

/// A size such as `5GB`, `500MB`, `4GiB` or `1000000` (bytes), as transformers' `max_shard_size`
/// reads it (a unit ending in a lowercase `b`, `5Gb`, counts bits).
pub fn parse_size(text: &str) -> std::result::Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let unit = unit.trim();
    let bits = unit.len() > 1 && unit.ends_with('b');
    let scale: f64 = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        "KIB" => 1024.0,
        "MIB" => 1024.0 * 1024.0,
        "GIB" => 1024.0 * 1024.0 * 1024.0,
        "TIB" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        other => {
            return Err(format!(
                "unknown unit `{other}` (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"
            ))
        }
    };
    let scale = if bits { scale / 8.0 } else { scale };
    match number.parse::<f64>() {
        Ok(n) if n * scale >= 1.0 && (n * scale) < 1e18 => Ok((n * scale).round() as u64),
        Ok(_) => Err(format!("`{text}` is not a size of at least one byte")),
        Err(_) => Err(format!("`{text}` is not a size (e.g. 2GB, 500MB, 4GiB)")),
    }
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
    let n = write_checkpoint(
        &ckpt,
        staged.path(),
        args.dtype,
        args.max_shard_size,
        &Progress::bar(),
    )?;
    let out = staged.commit()?;
    println!(
        "wrote {} ({arch} as {}: {n} tensors, {})",
        out.display(),
        ckpt.config.model_type,
        args.dtype.torch_name()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_read_as_transformers_writes_them() {
        assert_eq!(parse_size("5GB"), Ok(5_000_000_000));
        assert_eq!(parse_size("500MB"), Ok(500_000_000));
        assert_eq!(parse_size("4GiB"), Ok(4 << 30));
        assert_eq!(parse_size("1.5 KB"), Ok(1500));
        assert_eq!(parse_size("8Mb"), Ok(1_000_000)); // bits, as transformers reads it
        assert_eq!(parse_size("123"), Ok(123));
        assert!(parse_size("5XB").unwrap_err().contains("unknown unit `XB`"));
        assert!(parse_size("0GB").unwrap_err().contains("at least one byte"));
        assert!(parse_size("GB").unwrap_err().contains("not a size"));
    }
}
