//! Argument definitions and the commands behind them.

mod convert;
mod demo;
mod export;
mod info;
mod selftest;
mod synth;
mod transfer;

use clap::{Parser, Subcommand};

use loraxfer::args::{InspectArgs, TransferArgs};
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
    /// Write a PEFT adapter as a llama.cpp LoRA (GGUF) for its base model, as llama.cpp's
    /// convert_lora_to_gguf.py does, with per-module and rslora scales folded in.
    ExportGguf(export::ExportGgufArgs),
    /// Write an adapter as an MLX adapter (mlx-lm's adapters.safetensors and
    /// adapter_config.json) for the same base: one rank and one scale for all modules, the
    /// update unchanged.
    ExportMlx(export::ExportMlxArgs),
    /// Print the version, the kernels, the GPU (if any) and the backend --device auto picks.
    Info,
    /// Check every CUDA kernel against the CPU reference on fresh random inputs; exits non-zero
    /// on any mismatch.
    Selftest(selftest::SelftestArgs),
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Transfer(args) => transfer::transfer(args),
        Command::Inspect(args) => transfer::inspect(args),
        Command::Synth(cmd) => synth::run(cmd),
        Command::Demo(args) => demo::run(args),
        Command::Convert(args) => convert::run(args),
        Command::ExportGguf(args) => export::run(args),
        Command::ExportMlx(args) => export::run_mlx(args),
        Command::Info => {
            info::print();
            Ok(())
        }
        Command::Selftest(args) => selftest::run(args),
    }
}
