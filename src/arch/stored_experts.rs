//! Experts a family stores fused on disk (GPT-OSS, Llama 4), and how PEFT lays out a LoRA on
//! fused expert parameters for a family.

use serde::Deserialize;

use crate::io::adapter::{ExpertsLayout, GateUpRows};

use super::Arch;

/// A layer's experts fused on disk: `gate_up` `[E, 2·width, hidden]` (the gate's and the up
/// projection's rows) and `down` `[E, hidden, width]`, each as an `[out, in]` weight per expert,
/// or `[E, in, out]` where `transposed`; the gate's and the up projection's rows alternate where
/// `interleaved` (gate j at row 2j, up j at 2j + 1), else the gate's come first. A float tensor
/// of that name, or MXFP4's `<name>_blocks` and `<name>_scales` (`[E, out, in/32, 16]` and
/// `[E, out, in/32]`, never transposed).
#[derive(Debug, Clone, Deserialize)]
pub struct StoredExperts {
    pub gate_up: String,
    pub down: String,
    #[serde(default)]
    pub transposed: bool,
    #[serde(default)]
    pub interleaved: bool,
    /// PEFT takes the stored `[E, in, out]` for `[E, out, in]` (Llama 4: transformers' experts
    /// module does not say it is transposed, as GPT-OSS's does), so its LoRA's A reads the
    /// parameter's last dimension, the outputs, and its B writes the inputs.
    #[serde(default)]
    pub peft_reversed: bool,
}

impl Arch {
    /// How a LoRA on this family's fused `gate_up_proj` holds an expert's gate and up rows.
    pub fn gate_up_rows(&self) -> GateUpRows {
        match &self.stored_experts {
            Some(s) if s.interleaved => GateUpRows::Interleaved,
            _ => GateUpRows::Halves,
        }
    }

    /// How a PEFT LoRA on this family's fused expert parameters lays out its factors.
    pub fn experts_layout(&self) -> ExpertsLayout {
        ExpertsLayout {
            gate_up: self.gate_up_rows(),
            reversed: self
                .stored_experts
                .as_ref()
                .is_some_and(|s| s.peft_reversed),
            hidden: None,
        }
    }

    /// The module holding a layer's fused experts, under the layer: transformers 5's
    /// `mlp.experts` for every family that stores experts one module each on disk, else where
    /// the stored tensors are (Llama 4's `feed_forward.experts`).
    pub fn fused_experts_module(&self) -> &str {
        self.stored_experts
            .as_ref()
            .and_then(|s| s.gate_up.strip_suffix(".gate_up_proj"))
            .unwrap_or("mlp.experts")
    }
}
