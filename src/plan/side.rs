//! A model as the plan sees it: its architecture table, the layer prefix its checkpoint uses,
//! and every base weight read through a check of its shape against the config.

use crate::arch::{Arch, Block, ModuleSpec};
use crate::error::{Error, Result};
use crate::io::checkpoint::Checkpoint;

/// A model as the plan sees it: its table, layer prefix and checkpoint.
pub struct ModelSide<'a> {
    pub arch: &'static Arch,
    /// Where the checkpoint stores the layers' weights.
    pub prefix: String,
    /// Where adapters name the layers' modules: the table's `module_prefix`, else `prefix`.
    pub names: String,
    pub ckpt: &'a Checkpoint,
}

impl<'a> ModelSide<'a> {
    /// How a PEFT LoRA on this model's fused expert parameters lays out its factors, with the
    /// model's hidden size to tell a lone parameter's orientation by.
    pub fn experts_layout(&self) -> crate::io::adapter::ExpertsLayout {
        crate::io::adapter::ExpertsLayout {
            hidden: Some(self.ckpt.config.hidden_size),
            ..self.arch.experts_layout()
        }
    }

    pub fn new(ckpt: &'a Checkpoint) -> Result<Self> {
        let arch = crate::arch::for_config(&ckpt.config, &ckpt.config_path())?;
        if arch.has_experts() && ckpt.config.experts.is_none() {
            return Err(Error::config(
                ckpt.config_path(),
                format!(
                    "a {} model's MLPs are experts, but config.json gives no expert count \
                     (`num_local_experts`, `num_experts` or `n_routed_experts`)",
                    arch.name
                ),
            ));
        }
        if let Some(e) = ckpt.config.experts.as_ref().filter(|_| arch.has_experts()) {
            // A layer kind the config names but the table has no modules for would be unreadable.
            let missing = if !e.dense_layers.is_empty() && !arch.has_block(Block::Mlp) {
                Some(format!("dense MLPs in layers {:?}", e.dense_layers))
            } else if e.shared_width.is_some() && !arch.has_block(Block::SharedExpert) {
                Some("a shared expert beside the experts".to_string())
            } else {
                None
            };
            if let Some(what) = missing {
                return Err(Error::config(
                    ckpt.config_path(),
                    format!(
                        "config.json gives {what}, which a {} model does not have",
                        arch.name
                    ),
                ));
            }
        }
        if arch.latent_attention() && ckpt.config.latent.is_none() {
            return Err(Error::config(
                ckpt.config_path(),
                format!(
                    "a {} model's attention is latent, but config.json gives no `kv_lora_rank`",
                    arch.name
                ),
            ));
        }
        if arch.has_block(Block::LinearAttention) && ckpt.config.linear.is_none() {
            return Err(Error::config(
                ckpt.config_path(),
                format!(
                    "a {} model has linear attention in some layers, but config.json gives no \
                     `linear_num_value_heads`",
                    arch.name
                ),
            ));
        }
        let prefix = arch.detect_prefix(ckpt)?.to_string();
        let names = arch.module_prefix.clone().unwrap_or_else(|| prefix.clone());
        Ok(ModelSide {
            arch,
            prefix,
            names,
            ckpt,
        })
    }

    /// The layer, expert and table module of an adapter's module name: under `names`, or under
    /// any of the table's layer prefixes (an adapter made on the multimodal model of a family
    /// whose causal-LM class names its layers otherwise).
    pub fn parse_module_name(
        &self,
        name: &str,
    ) -> Option<(usize, Option<usize>, &'static ModuleSpec)> {
        std::iter::once(&self.names)
            .chain(&self.arch.layer_prefixes)
            .find_map(|p| self.arch.parse_module(p, name))
    }

    /// Added to a stored norm weight of this checkpoint to get its gain: the table's offset,
    /// or its MLX one in a checkpoint mlx-lm converted.
    pub fn gain_offset(&self) -> f32 {
        let residual = &self.arch.residual;
        match residual.mlx_gain_offset {
            Some(offset) if self.ckpt.is_mlx() => offset,
            _ => residual.gain_offset,
        }
    }

    /// Whether an adapter's module is a routing gate of a layer's mixture of experts: the router
    /// (the table's `router` weight) or a shared expert's gate (Qwen2-MoE's one-row
    /// `shared_expert_gate`), under `names` or any of the table's layer prefixes.
    pub fn is_routing_gate(&self, name: &str) -> bool {
        let Some(router) = self.arch.router.as_deref() else {
            return false;
        };
        let router = router.strip_suffix(".weight").unwrap_or(router);
        std::iter::once(&self.names)
            .chain(&self.arch.layer_prefixes)
            .any(|p| {
                let Some(rest) = name
                    .strip_prefix(p.as_str())
                    .and_then(|r| r.strip_prefix('.'))
                else {
                    return false;
                };
                rest.split_once('.').is_some_and(|(layer, key)| {
                    layer.parse::<usize>().is_ok()
                        && (key == router || key.ends_with(".shared_expert_gate"))
                })
            })
    }

    /// The layer prefix an adapter's `modules` are named under, among the table's own: the one
    /// every module the table names is under (None where they are under several, or none;
    /// modules it does not name are not counted).
    pub fn prefix_of<'m>(&self, modules: impl Iterator<Item = &'m str>) -> Option<&str> {
        let mut found = modules.filter_map(|name| {
            std::iter::once(&self.names)
                .chain(&self.arch.layer_prefixes)
                .find(|p| self.arch.parse_module(p, name).is_some())
        });
        let first = found.next()?;
        found.all(|p| p == first).then_some(first.as_str())
    }

    /// The same model with its adapters' modules named under `names`.
    pub fn named(mut self, names: &str) -> Self {
        self.names = names.to_string();
        self
    }

    pub fn layers(&self) -> usize {
        self.ckpt.config.num_hidden_layers
    }

    /// How many experts each layer has (0 for a dense model).
    pub fn experts(&self) -> usize {
        self.ckpt.config.experts.as_ref().map_or(0, |e| e.count)
    }

    /// Whether `layer`'s MLP is experts (else dense: every layer of a dense model).
    pub fn sparse(&self, layer: usize) -> bool {
        self.arch.has_experts()
            && self
                .ckpt
                .config
                .experts
                .as_ref()
                .is_some_and(|e| e.sparse(layer))
    }

    /// Whether some of the model's layers have linear attention (Qwen3.5, Qwen3-Next; the others
    /// have softmax attention).
    pub fn hybrid(&self) -> bool {
        let linear = self.ckpt.config.linear.as_ref();
        self.arch.has_block(Block::LinearAttention) && linear.is_some_and(|l| !l.layers.is_empty())
    }

    /// Whether the model has dense layers among its expert layers.
    pub fn mixes_layer_kinds(&self) -> bool {
        let sparse = (0..self.layers()).filter(|&l| self.sparse(l)).count();
        sparse > 0 && sparse < self.layers()
    }

    /// Whether `layer` has modules of type `spec` (of a block the layer has, and present in a
    /// model of this config: latent attention's query projections depend on it).
    pub fn holds(&self, layer: usize, spec: &ModuleSpec) -> bool {
        self.holds_block(layer, spec.block()) && spec.present_in(&self.ckpt.config)
    }

    /// Whether `layer` has `block`: softmax attention in every layer but those the config gives
    /// linear attention, a dense MLP in the dense layers, the experts and the shared expert
    /// (where the config gives one) in the others.
    pub fn holds_block(&self, layer: usize, block: Block) -> bool {
        // `new` refused a shared expert's width for a table without one.
        let shared = || {
            let e = self.ckpt.config.experts.as_ref();
            e.is_some_and(|e| e.shared_width.is_some())
        };
        let linear = |l: usize| {
            let linear = self.ckpt.config.linear.as_ref();
            self.arch.has_block(Block::LinearAttention) && linear.is_some_and(|a| a.holds(l))
        };
        match block {
            Block::Attention => !linear(layer),
            Block::LinearAttention => linear(layer),
            Block::Mlp => !self.sparse(layer),
            Block::Experts => self.sparse(layer),
            Block::SharedExpert => self.sparse(layer) && shared(),
        }
    }

    /// The weight tensor of a module (of one expert, for an expert's module), checked against
    /// the shape the config implies (every reader of a base weight goes through it: a tensor of
    /// another shape would be read out of bounds, or sliced at the wrong rows).
    pub(crate) fn weight(
        &self,
        layer: usize,
        expert: Option<usize>,
        spec: &ModuleSpec,
    ) -> Result<(String, (usize, usize))> {
        let name = format!(
            "{}.weight",
            self.arch.module_path(&self.prefix, layer, expert, spec)
        );
        let shape = self.ckpt.shape(&name)?;
        let expected = spec.shape(&self.ckpt.config);
        if shape != [expected.0, expected.1] {
            return Err(Error::bad_tensor(
                &self.ckpt.dir,
                &name,
                format!(
                    "shape {shape:?}, but config.json implies [{}, {}]",
                    expected.0, expected.1
                ),
            ));
        }
        Ok((name, expected))
    }
}
