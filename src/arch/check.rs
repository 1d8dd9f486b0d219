//! The checks a table passes before it is used: what makes a table's modules a model's
//! blocks (attention, dense MLP, experts, shared expert), each part held once.

use std::collections::BTreeSet;

use super::{Arch, Block, ModuleSpec, Part, EXPERT_SLOT};

/// Parses and checks one table: at least one model type and layer prefix, the attention's four
/// canonical projections each held by exactly one module, and each MLP block's three; a table
/// whose experts are stored fused gives each of gate, up and down an expert module of its own.
pub fn parse_table(text: &str) -> std::result::Result<Arch, String> {
    let arch: Arch = serde_json::from_str(text).map_err(|e| e.to_string())?;
    if arch.model_types.is_empty() || arch.layer_prefixes.is_empty() {
        return Err(format!(
            "table `{}` needs model_types and layer_prefixes",
            arch.name
        ));
    }
    // Adapters' names are read under the layer prefixes: the one they are written under too.
    if let Some(p) = arch.module_prefix.as_ref() {
        if !arch.layer_prefixes.contains(p) {
            return Err(format!(
                "table `{}`: module_prefix `{p}` is not one of its layer_prefixes",
                arch.name
            ));
        }
    }
    if arch
        .modules
        .iter()
        .any(|m| m.parts.is_empty() || m.key.is_empty())
    {
        return Err(format!(
            "table `{}`: every module needs a key and at least one part",
            arch.name
        ));
    }
    let is_mlp = |p: &Part| p.mlp();
    for m in &arch.modules {
        // A module is one block's: attention or MLP parts, never both; an expert's names the
        // expert once, between dots; a shared expert's is an MLP's and no expert's.
        let mixed = m.parts.iter().any(is_mlp) && !m.parts.iter().all(is_mlp);
        let slot_once = m.key.matches(EXPERT_SLOT).count() == 1
            && m.key.split('.').any(|segment| segment == EXPERT_SLOT);
        let fault = if mixed {
            Some("must hold attention parts or MLP parts, not both".to_string())
        } else if m.expert && !slot_once {
            Some(format!(
                "must name `{EXPERT_SLOT}` once as a whole key segment"
            ))
        } else if (m.expert || m.shared_expert) && !m.parts.iter().all(is_mlp) {
            let whose = if m.expert {
                "an expert's"
            } else {
                "a shared expert's"
            };
            Some(format!("is {whose} and must hold only gate, up or down"))
        } else if m.expert && m.shared_expert {
            Some(format!(
                "is a shared expert's and cannot name `{EXPERT_SLOT}`"
            ))
        } else {
            None
        };
        if let Some(fault) = fault {
            return Err(format!(
                "table `{}`: module `{}` {fault}",
                arch.name, m.name
            ));
        }
    }
    // Experts stored fused are presented one projection per expert module: gate, up and down
    // each in an expert module of its own.
    let single = |part: Part| {
        arch.modules
            .iter()
            .filter(|m| m.expert && m.parts == [part])
            .count()
            == 1
    };
    if arch.stored_experts.is_some() && ![Part::Gate, Part::Up, Part::Down].into_iter().all(single)
    {
        return Err(format!(
            "table `{}` stores experts fused, and needs one expert module for each of gate, up \
             and down to present them as",
            arch.name
        ));
    }
    if arch.has_experts() && arch.router.is_none() {
        return Err(format!(
            "table `{}` has expert modules and must name their `router`",
            arch.name
        ));
    }
    let mut keys: Vec<&str> = arch.modules.iter().map(|m| m.key.as_str()).collect();
    keys.sort();
    if keys.windows(2).any(|w| w[0] == w[1]) {
        return Err(format!("table `{}`: two modules share a key", arch.name));
    }
    // The attention's four parts once each, and each MLP block's three once each: a dense MLP,
    // experts, or both (a model with dense layers among its expert layers); a shared expert
    // only beside experts.
    let blocks: BTreeSet<Block> = arch.modules.iter().map(ModuleSpec::block).collect();
    let complete = |block: Block, want: &[Part]| {
        let mut parts: Vec<Part> = arch
            .modules
            .iter()
            .filter(|m| m.block() == block)
            .flat_map(|m| m.parts.iter().copied())
            .collect();
        parts.sort();
        parts == want
    };
    let mlp = [Part::Gate, Part::Up, Part::Down];
    let complete_mlps = blocks
        .iter()
        .filter(|&&b| b != Block::Attention && b != Block::LinearAttention)
        .all(|&b| complete(b, &mlp));
    // Linear attention, where the table has it, in the layers the config names: Qwen3.5's five
    // projections, or Qwen3-Next's three.
    let linear = [
        Part::LinQkv,
        Part::LinZ,
        Part::LinB,
        Part::LinA,
        Part::LinOut,
    ];
    let fused_linear = [Part::LinOut, Part::LinQkvz, Part::LinBa];
    let complete_linear = !blocks.contains(&Block::LinearAttention)
        || complete(Block::LinearAttention, &linear)
        || complete(Block::LinearAttention, &fused_linear);
    // Latent attention (DeepSeek) in place of q, k, v: its query through `q_proj` or, where the
    // config gives a query latent, through `q_a_proj` and `q_b_proj`.
    let latent = [Part::Q, Part::O, Part::QA, Part::QB, Part::KvA, Part::KvB];
    let attention = complete(Block::Attention, &[Part::Q, Part::K, Part::V, Part::O])
        || complete(Block::Attention, &latent);
    if !attention
        || !complete_mlps
        || !complete_linear
        || !(blocks.contains(&Block::Mlp) || blocks.contains(&Block::Experts))
        || (blocks.contains(&Block::SharedExpert) && !blocks.contains(&Block::Experts))
    {
        return Err(format!(
            "table `{}` must hold each of q, k, v, o exactly once (or latent attention's q, o, \
             q_a, q_b, kv_a, kv_b), linear attention's lin_qkv, lin_z, lin_b, lin_a, lin_out \
             (or lin_qkvz, lin_ba, lin_out) exactly once where it has any, and gate, up, down \
             exactly once in each MLP block it has (a dense MLP, experts, a shared expert beside \
             experts)",
            arch.name
        ));
    }
    Ok(arch)
}
