//! Argument definitions and the commands behind them.

mod convert;
mod demo;
mod info;
mod selftest;
mod synth;
mod transfer;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use loraxfer::backend::Device;
use loraxfer::modes::Mode;
use loraxfer::Result;

/// Transfer a PEFT LoRA adapter from one base model to another, without training.
#[derive(Debug, Parser)]
#[command(name = "loraxfer", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Transfer an adapter trained on --source-base onto --target-base.
    Transfer(TransferArgs),
    /// Show the subspace similarity of every module pair and the layer map of two base models.
    Inspect(InspectArgs),
    /// Write synthetic checkpoints and adapters (realistic shapes and spectra) for tests and demos.
    #[command(subcommand)]
    Synth(synth::SynthCommand),
    /// Run the whole pipeline on a built-in demo pair: synthesize a small source, a derived
    /// target and an adapter, then transfer.
    Demo(demo::DemoArgs),
    /// Write a GGUF base model as the engine reads it: a safetensors checkpoint under the
    /// Hugging Face names (dequantized), its config.json and its vocabulary.
    Convert(convert::ConvertArgs),
    /// Print the version, the kernels, the GPU (if any) and the backend --device auto picks.
    Info,
    /// Check every CUDA kernel against the CPU reference on fresh random inputs; exits non-zero
    /// on any mismatch.
    Selftest(selftest::SelftestArgs),
}

/// The SVD settings shared by transfer and inspect.
#[derive(Debug, clap::Args)]
pub struct SvdArgs {
    /// Rank k of the truncated SVDs (capped per matrix at its sizes, and reported).
    #[arg(long, default_value_t = loraxfer::plan::DEFAULT_RANK)]
    rank: usize,
    /// Oversampling p of the randomized SVD.
    #[arg(long, default_value_t = loraxfer::plan::DEFAULT_OVERSAMPLE)]
    oversample: usize,
    /// Power iterations q of the randomized SVD.
    #[arg(long, default_value_t = loraxfer::plan::DEFAULT_POWER_ITERS)]
    power_iters: usize,
    /// Seed of the random test matrices.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Backend.
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    device: Device,
    /// Keep the SVDs of base weights here and reuse them: a second adapter between the same
    /// models then costs only the projections.
    #[arg(long, env = "LORAXFER_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct TransferArgs {
    /// The model the adapter was trained on: a Hugging Face directory, or a hub name
    /// (`org/name[@revision]`) in the local Hugging Face cache.
    #[arg(long)]
    source_base: PathBuf,
    /// The model to transfer onto (a directory or a cached hub name).
    #[arg(long)]
    target_base: PathBuf,
    /// PEFT adapter (adapter_config.json + adapter_model.safetensors): a directory or a cached
    /// hub name.
    #[arg(long)]
    adapter: PathBuf,
    /// Output directory for the new adapter and transfer_report.json.
    #[arg(long)]
    out: PathBuf,
    /// How to carry the adapter over. auto picks one mode for the pair: rotate when the depths
    /// and every module's shapes are equal, else map (both models need a tokenizer.json), else
    /// align; rotate and map keep the whole update (docs/EXPERIMENTS.md has the evidence).
    #[arg(long, value_enum, default_value_t = Mode::Auto)]
    mode: Mode,
    #[command(flatten)]
    svd: SvdArgs,
    /// Modules whose subspace similarity is below this get B = 0 (skipped).
    #[arg(long, default_value_t = 0.0)]
    threshold: f32,
    /// Transfer only these module types (e.g. q_proj,k_proj,v_proj,o_proj); others get B = 0.
    #[arg(long, value_delimiter = ',')]
    modules: Option<Vec<String>>,
    /// JSON file {"<target layer>": <source layer>} overriding the default depth mapping.
    #[arg(long)]
    layer_map: Option<PathBuf>,
    /// Replace --out if it exists.
    #[arg(long)]
    force: bool,
    /// Print the time spent in each phase.
    #[arg(long)]
    timings: bool,
    /// map mode: how the residual streams are paired: the shared-token map refined per layer
    /// (layers), the shared-token map alone (tokens) or the identity (ablations).
    #[arg(long, value_enum, default_value_t = loraxfer::map::ResidualFit::Layers)]
    map_residual: loraxfer::map::ResidualFit,
    /// map mode: do not fold the norm gains into the maps (ablation).
    #[arg(long)]
    no_norm_fold: bool,
    /// map mode: target gains below this fraction of their RMS count as switching their
    /// channel off where a fold divides by them (0: divide by every nonzero gain).
    #[arg(long, default_value_t = loraxfer::map::GAIN_FLOOR)]
    map_gain_floor: f32,
    /// map mode: how heads and neurons are paired: matched (heads of different sizes fitted
    /// inside), matched then fitted inside every head (fit), or by index (ablation).
    #[arg(long, value_enum, default_value_t = loraxfer::map::InnerMatch::Match)]
    map_inner: loraxfer::map::InnerMatch,
    /// map mode, depths differ: pair layers by the similarity of their weights (similarity)
    /// or spread them evenly (linear, ablation). A --layer-map file overrides both.
    #[arg(long, value_enum, default_value_t = loraxfer::map::DepthFit::Similarity)]
    map_depth: loraxfer::map::DepthFit,
}

#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    /// The first model: a Hugging Face directory or a cached hub name (`org/name[@revision]`).
    #[arg(long)]
    source_base: PathBuf,
    /// The second model (a directory or a cached hub name).
    #[arg(long)]
    target_base: PathBuf,
    #[command(flatten)]
    svd: SvdArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Transfer(args) => transfer::transfer(args),
        Command::Inspect(args) => transfer::inspect(args),
        Command::Synth(cmd) => synth::run(cmd),
        Command::Demo(args) => demo::run(args),
        Command::Convert(args) => convert::run(args),
        Command::Info => {
            info::print();
            Ok(())
        }
        Command::Selftest(args) => selftest::run(args),
    }
}
