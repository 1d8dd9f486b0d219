//! The options of `transfer` and `inspect`, defined once for the command line and the Python
//! module: both parse them with clap (the module turns its keyword arguments into the same
//! flags), so their names, defaults, checks and error messages cannot drift apart.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::{CommandFactory, Parser};

use crate::backend::{self, Device};
use crate::error::{Error, Result};
use crate::io::checkpoint::Checkpoint;
use crate::io::hub::{self, Kind};
use crate::modes::Mode;
use crate::plan::Options;
use crate::progress::Progress;
use crate::transfer::inspect::{self, Inspection};
use crate::transfer::Job;

/// The SVD settings shared by transfer and inspect.
#[derive(Debug, clap::Args)]
pub struct SvdArgs {
    /// Rank k of the truncated SVDs (capped per matrix at its sizes, and reported).
    #[arg(long, default_value_t = crate::plan::DEFAULT_RANK)]
    pub rank: usize,
    /// Oversampling p of the randomized SVD.
    #[arg(long, default_value_t = crate::plan::DEFAULT_OVERSAMPLE)]
    pub oversample: usize,
    /// Power iterations q of the randomized SVD.
    #[arg(long, default_value_t = crate::plan::DEFAULT_POWER_ITERS)]
    pub power_iters: usize,
    /// Seed of the random test matrices.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Backend.
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    pub device: Device,
    /// Keep the SVDs of base weights here and reuse them: a second adapter between the same
    /// models then costs only the projections.
    #[arg(long, env = "LORAXFER_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Use no SVD cache, even where --cache-dir or LORAXFER_CACHE_DIR names one.
    #[arg(long)]
    pub no_cache: bool,
}

#[derive(Debug, clap::Args)]
pub struct TransferArgs {
    /// The model the adapter was trained on: a Hugging Face directory, a GGUF file (or a
    /// directory holding one), or a hub name (`org/name[@revision]`) in the local Hugging Face
    /// cache.
    #[arg(long)]
    pub source_base: PathBuf,
    /// The model to transfer onto (a directory, a GGUF file or a cached hub name).
    #[arg(long)]
    pub target_base: PathBuf,
    /// PEFT adapter (adapter_config.json + adapter_model.safetensors), or an MLX one
    /// (adapter_config.json + adapters.safetensors): a directory or a cached
    /// hub name.
    #[arg(long)]
    pub adapter: PathBuf,
    /// Output directory for the new adapter and transfer_report.json.
    #[arg(long)]
    pub out: PathBuf,
    /// How to carry the adapter over. auto picks one mode for the pair: rotate when the depths
    /// and every module's shapes are equal, else map (both models need a vocabulary: a
    /// tokenizer.json, or a GGUF's own), else align; rotate and map keep the whole update (docs/EXPERIMENTS.md has the evidence).
    #[arg(long, value_enum, default_value_t = Mode::Auto)]
    pub mode: Mode,
    #[command(flatten)]
    pub svd: SvdArgs,
    /// Modules whose subspace similarity (in map mode: matched similarity) is below this, in
    /// [0, 1], are skipped (B = 0).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub threshold: f32,
    /// Transfer only these module types (e.g. q_proj,k_proj,v_proj,o_proj); others get B = 0.
    #[arg(long, value_delimiter = ',')]
    pub modules: Option<Vec<String>>,
    /// JSON file {"<target layer>": <source layer>} overriding the default depth mapping
    /// (target layers it leaves out take the linear map).
    #[arg(long)]
    pub layer_map: Option<PathBuf>,
    /// Replace --out if it exists.
    #[arg(long)]
    pub force: bool,
    /// Also write the adapter as a llama.cpp LoRA for the target base (`adapter_model.gguf`,
    /// for `llama-cli --lora` or Ollama's `ADAPTER`).
    #[arg(long)]
    pub gguf_adapter: bool,
    /// Write the experts' updates as PEFT's LoRA on transformers 5's fused expert parameters
    /// (`target_parameters`: `mlp.experts.gate_up_proj` and `down_proj`), and the dense MLPs' and
    /// shared experts' through their weights: the form PEFT with transformers 5 loads whole.
    /// Default: one module per expert, which transformers 4 loads (--gguf-adapter writes the
    /// same llama.cpp LoRA either way); always fused for GPT-OSS, whose experts are fused on
    /// disk.
    #[arg(long)]
    pub fused_experts: bool,
    /// Leave out the adapter's updates to the routing gates of a mixture of experts (the
    /// router, `mlp.gate`; Qwen2-MoE's `shared_expert_gate`), which are not transferred:
    /// without it such an adapter is refused. mlx-lm's default LoRA and PEFT's `all-linear`
    /// with transformers 4 adapt them.
    #[arg(long)]
    pub drop_router: bool,
    /// Print the time spent in each phase (on stderr).
    #[arg(long)]
    pub timings: bool,
    /// map mode: how the residual streams are paired: the shared-token map refined per layer
    /// (layers), the shared-token map alone (tokens) or the identity (ablations).
    #[arg(long, value_enum, default_value_t = crate::map::ResidualFit::Layers)]
    pub map_residual: crate::map::ResidualFit,
    /// map mode: do not fold the norm gains into the maps (ablation).
    #[arg(long)]
    pub no_norm_fold: bool,
    /// map mode: target gains below this fraction of their RMS count as switching their
    /// channel off where a fold divides by them (0: divide by every nonzero gain).
    #[arg(long, default_value_t = crate::map::GAIN_FLOOR, allow_negative_numbers = true)]
    pub map_gain_floor: f32,
    /// map mode: how heads and neurons are paired: matched (heads of different sizes fitted
    /// inside), matched then fitted inside every softmax head (fit; linear attention's heads
    /// move whole), or by index (ablation).
    #[arg(long, value_enum, default_value_t = crate::map::InnerMatch::Match)]
    pub map_inner: crate::map::InnerMatch,
    /// map mode, depths differ: pair layers by the similarity of their weights (similarity)
    /// or spread them evenly (linear, ablation). A --layer-map file overrides both.
    #[arg(long, value_enum, default_value_t = crate::map::DepthFit::Similarity)]
    pub map_depth: crate::map::DepthFit,
}

#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    /// The first model: a Hugging Face directory, a GGUF file or a cached hub name
    /// (`org/name[@revision]`).
    #[arg(long)]
    pub source_base: PathBuf,
    /// The second model (a directory, a GGUF file or a cached hub name).
    #[arg(long)]
    pub target_base: PathBuf,
    #[command(flatten)]
    pub svd: SvdArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

impl SvdArgs {
    /// The SVD settings as plan options; `plan::build` validates them.
    pub fn options(&self) -> Options {
        Options {
            rank: self.rank,
            oversample: self.oversample,
            power_iters: self.power_iters,
            seed: self.seed,
            ..Options::default()
        }
    }

    /// The cache directory in use: none under `--no-cache`.
    fn cache_dir(&self) -> Option<PathBuf> {
        self.cache_dir.clone().filter(|_| !self.no_cache)
    }

    fn cache(&self) -> Result<Option<crate::transfer::cache::BasisCache>> {
        self.cache_dir()
            .as_deref()
            .map(crate::transfer::cache::BasisCache::open)
            .transpose()
    }
}

impl TransferArgs {
    /// The job these options describe, its hub names resolved in the local cache.
    pub fn job(&self, progress: Progress) -> Result<Job> {
        let mut opts = self.svd.options();
        opts.mode = self.mode;
        opts.threshold = self.threshold;
        opts.modules = self.modules.clone();
        opts.drop_router = self.drop_router;
        opts.map = crate::map::MapOptions {
            residual: self.map_residual,
            fold_norms: !self.no_norm_fold,
            gain_floor: self.map_gain_floor,
            inner: self.map_inner,
            depth: self.map_depth,
            seed: self.svd.seed,
        };
        let mut hub_names = BTreeMap::new();
        let mut resolve = |arg: &Path, role: &str, kind: Kind| -> Result<PathBuf> {
            let (dir, name) = hub::resolve(arg, kind)?;
            if let Some(name) = name {
                hub_names.insert(role.to_string(), name);
            }
            Ok(dir)
        };
        let source_base = resolve(&self.source_base, "source_base", Kind::Model)?;
        let target_base = resolve(&self.target_base, "target_base", Kind::Model)?;
        let adapter = resolve(&self.adapter, "adapter", Kind::Adapter)?;
        Ok(Job {
            hub: hub_names,
            source_base,
            target_base,
            adapter,
            out: self.out.clone(),
            options: opts,
            layer_map_file: self.layer_map.clone(),
            device: self.svd.device,
            cache_dir: self.svd.cache_dir(),
            force: self.force,
            gguf_adapter: self.gguf_adapter,
            fused_experts: self.fused_experts,
            progress,
        })
    }
}

impl InspectArgs {
    /// Measures every module pair of the two models.
    pub fn run(&self, progress: &Progress) -> Result<Inspection> {
        let opts = self.svd.options();
        let (backend, _) = backend::select(self.svd.device)?;
        let source = Checkpoint::open(&hub::resolve(&self.source_base, Kind::Model)?.0)?;
        let target = Checkpoint::open(&hub::resolve(&self.target_base, Kind::Model)?.0)?;
        let cache = self.svd.cache()?;
        inspect::run(
            &source,
            &target,
            &opts,
            backend.as_ref(),
            cache.as_ref(),
            progress,
        )
    }
}

/// `transfer`'s options as one command, for parsing a list of flags.
#[derive(Debug, Parser)]
#[command(name = "loraxfer transfer", no_binary_name = true)]
struct TransferCommand {
    #[command(flatten)]
    args: TransferArgs,
}

/// `inspect`'s options as one command.
#[derive(Debug, Parser)]
#[command(name = "loraxfer inspect", no_binary_name = true)]
struct InspectCommand {
    #[command(flatten)]
    args: InspectArgs,
}

/// Parses `transfer`'s flags (`--source-base`, `D`, …) as the command line does. The error is
/// clap's message without `error: `, e.g. "invalid value 'x' for '--rank <RANK>': …".
pub fn parse_transfer(flags: &[String]) -> Result<TransferArgs> {
    TransferCommand::try_parse_from(flags)
        .map(|c| c.args)
        .map_err(flag_error)
}

/// Parses `inspect`'s flags.
pub fn parse_inspect(flags: &[String]) -> Result<InspectArgs> {
    InspectCommand::try_parse_from(flags)
        .map(|c| c.args)
        .map_err(flag_error)
}

fn flag_error(e: clap::Error) -> Error {
    // clap's message is its first paragraph ("error: invalid value …" and, for a choice, the
    // "[possible values: …]" line); the usage and "try --help" after it are for a terminal.
    let text = e.to_string();
    let message: Vec<&str> = text
        .lines()
        .map(str::trim)
        .take_while(|l| !l.is_empty() && !l.starts_with("Usage:"))
        .collect();
    let message = message.join(" ");
    Error::Flags(
        message
            .strip_prefix("error: ")
            .unwrap_or(&message)
            .to_string(),
    )
}

/// One option of a command as the command line defines it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct OptionSpec {
    /// The flag without dashes, with underscores (`power_iters`).
    pub name: String,
    /// The default as the command line prints it (`None`: no default, and for a switch).
    pub default: Option<String>,
    /// A flag that takes no value.
    pub switch: bool,
    pub required: bool,
    /// The values an enumerated option accepts.
    pub choices: Vec<String>,
    pub help: String,
}

/// The options of `transfer` or `inspect`, in the order the command line lists them.
pub fn option_specs(command: &str) -> Result<Vec<OptionSpec>> {
    let cmd = match command {
        "transfer" => TransferCommand::command(),
        "inspect" => InspectCommand::command(),
        other => {
            return Err(Error::arg(
                "command",
                format!("`{other}` is not transfer or inspect"),
            ))
        }
    };
    Ok(cmd
        .get_arguments()
        .filter(|a| a.get_long().is_some())
        .map(|a| OptionSpec {
            name: a.get_id().as_str().to_string(),
            default: a
                .get_default_values()
                .first()
                .map(|v| v.to_string_lossy().into_owned()),
            switch: !a.get_action().takes_values(),
            required: a.is_required_set(),
            choices: a
                .get_possible_values()
                .iter()
                .map(|v| v.get_name().to_string())
                .collect(),
            help: a.get_help().map(|h| h.to_string()).unwrap_or_default(),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn flags_parse_as_on_the_command_line() {
        let a = parse_transfer(&flags(
            "--source-base s --target-base t --adapter a --out o --rank 8 --modules q_proj,v_proj --force",
        ))
        .unwrap();
        assert_eq!(a.svd.rank, 8);
        assert_eq!(a.modules, Some(vec!["q_proj".into(), "v_proj".into()]));
        assert!(a.force);
        assert_eq!(a.mode, Mode::Auto);
        let e = parse_transfer(&flags(
            "--source-base s --target-base t --adapter a --out o --rank x",
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("invalid value 'x' for '--rank <RANK>'"), "{e}");
        assert!(!e.contains("error:") && !e.contains("Usage"), "{e}");
        let e = parse_transfer(&flags(
            "--source-base s --target-base t --adapter a --out o --mode x",
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("[possible values: auto, copy"), "{e}");
        let e = parse_transfer(&flags("--source-base s"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--target-base"), "{e}");
    }

    #[test]
    fn specs_carry_the_defaults() {
        let specs = option_specs("transfer").unwrap();
        let get = |n: &str| specs.iter().find(|s| s.name == n).unwrap().clone();
        assert_eq!(
            get("rank").default,
            Some(crate::plan::DEFAULT_RANK.to_string())
        );
        assert_eq!(get("mode").default.as_deref(), Some("auto"));
        assert!(get("mode").choices.contains(&"rotate".to_string()));
        assert!(get("force").switch);
        assert!(get("source_base").required);
        assert!(option_specs("inspect")
            .unwrap()
            .iter()
            .any(|s| s.name == "json"));
        assert!(option_specs("merge").is_err());
    }
}
