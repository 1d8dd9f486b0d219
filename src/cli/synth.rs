//! `synth model` and `synth adapter`.

use std::path::{Path, PathBuf};

use clap::Subcommand;

use loraxfer::io::output::StagedDir;
use loraxfer::io::safetensors::FloatType;
use loraxfer::synth::{self, AdapterSpec, ModelSpec, Preset};
use loraxfer::{Error, Result};

#[derive(Debug, Subcommand)]
pub enum SynthCommand {
    /// A Hugging Face model directory with real shapes and decaying weight spectra.
    Model(ModelArgs),
    /// A PEFT LoRA adapter for a base model directory, as PEFT saves one.
    Adapter(AdapterArgs),
}

#[derive(Debug, clap::Args)]
pub struct ModelArgs {
    /// Shapes to copy.
    #[arg(long, value_enum)]
    like: Option<Preset>,
    #[arg(long)]
    out: PathBuf,
    /// Number of layers (default: the real model's).
    #[arg(long)]
    layers: Option<usize>,
    /// Storage type of the weights: bf16, f16 or f32.
    #[arg(long, default_value = "bf16", value_parser = parse_dtype)]
    dtype: FloatType,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Make a "fine-tuned derivative" of this synthetic model (same shapes, layers and dtype as
    /// it, drifted weights).
    #[arg(long, requires = "drift", conflicts_with_all = ["like", "layers", "dtype"])]
    derive_from: Option<PathBuf>,
    /// Relative drift of the derivative: RMS of the change over RMS of the weight (only with
    /// --derive-from).
    #[arg(long, allow_negative_numbers = true)]
    drift: Option<f32>,
    /// Replace --out if it exists.
    #[arg(long)]
    force: bool,
}

#[derive(Debug, clap::Args)]
pub struct AdapterArgs {
    /// The base model directory the adapter is for.
    #[arg(long)]
    base: PathBuf,
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 16)]
    r: usize,
    #[arg(long, default_value_t = 32.0)]
    alpha: f64,
    /// Module types to adapt, by type or by the last part of the key (`gate_proj`: every
    /// block's gate projection; default: every projection the model has).
    #[arg(long, value_delimiter = ',')]
    targets: Option<Vec<String>>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Storage type of the factors: f32, f16 or bf16.
    #[arg(long, default_value = "f32", value_parser = parse_dtype)]
    dtype: FloatType,
    /// Replace --out if it exists.
    #[arg(long)]
    force: bool,
}

pub fn parse_dtype(s: &str) -> std::result::Result<FloatType, String> {
    FloatType::parse(s).ok_or_else(|| format!("`{s}` is not one of bf16, f16, f32"))
}

pub fn run(cmd: SynthCommand) -> Result<()> {
    match cmd {
        SynthCommand::Model(a) => {
            // Checked here: clap waives `requires` when a conflicting flag (--like) is given.
            if a.drift.is_some() && a.derive_from.is_none() {
                return Err(Error::arg("--drift", "applies only with --derive-from"));
            }
            let preset = match (a.like, &a.derive_from) {
                (Some(p), _) => p,
                (None, Some(_)) => Preset::TinyQwen2, // ignored: the derivative copies its source
                (None, None) => {
                    return Err(Error::arg(
                        "--like",
                        "required unless --derive-from is given",
                    ))
                }
            };
            let spec = ModelSpec {
                layers: a.layers,
                dtype: a.dtype,
                seed: a.seed,
                derive_from: a.derive_from.clone(),
                drift: a.drift.unwrap_or(0.0),
                ..ModelSpec::new(preset)
            };
            let out = model(&spec, &a.out, a.force)?;
            println!("wrote {}", out.display());
            Ok(())
        }
        SynthCommand::Adapter(a) => {
            let spec = AdapterSpec {
                r: a.r,
                alpha: a.alpha,
                targets: a.targets.unwrap_or_default(),
                seed: a.seed,
                dtype: a.dtype,
            };
            let out = adapter(&a.base, &spec, &a.out, a.force)?;
            println!("wrote {}", out.display());
            Ok(())
        }
    }
}

/// Writes a synthetic model atomically, with a progress bar.
pub fn model(spec: &ModelSpec, out: &Path, force: bool) -> Result<PathBuf> {
    let staged = StagedDir::create(
        out,
        force,
        &spec.derive_from.as_deref().into_iter().collect::<Vec<_>>(),
    )?;
    let bar = indicatif::ProgressBar::new(1).with_prefix("synth");
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix} [{bar:40}] {bytes}/{total_bytes}, {elapsed} (eta {eta})",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    synth::write_model(spec, staged.path(), |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })?;
    bar.finish_and_clear();
    staged.commit()
}

/// Writes a synthetic adapter atomically.
pub fn adapter(base: &Path, spec: &AdapterSpec, out: &Path, force: bool) -> Result<PathBuf> {
    let staged = StagedDir::create(out, force, &[base])?;
    synth::write_adapter(base, spec, staged.path())?;
    staged.commit()
}
