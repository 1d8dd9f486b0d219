//! `--mode auto`: one mode for the whole pair of models, chosen before the plan is built.
//!
//! The choice follows the real-weight experiment (docs/EXPERIMENTS.md):
//! - equal depths and equal shapes of every adapted module: `rotate`. It keeps the whole update
//!   and turns it into the target's singular coordinates; on a model's next release it equals
//!   `copy` item for item (where `copy` is right) and stays meaningful where the target's bases
//!   have moved, which `copy` does not. `project` and `align` keep only the update's overlap
//!   with the top-k subspaces and lost most of the gain there.
//! - otherwise `map`, when both models ship a `tokenizer.json`, neither has experts and the map
//!   takes every update the adapter has (`experts::unmapped_update`): the only mode that crosses
//!   depths, widths, head counts and tokenizers through the weights themselves, and the one that
//!   came closest to a LoRA trained on a pruned sibling.
//! - otherwise `align`, since `map` anchors its residual map on the tokens the two vocabularies
//!   share and has nothing to anchor on without them, reads each layer's dense MLP, which a
//!   mixture-of-experts layer does not have, moves linear attention's heads as wholes, which
//!   Qwen3-Next's fused projections and heads of other sizes do not allow, and has nowhere to
//!   put a gated query's gate (Qwen3.5's) on a query without one.

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::Result;
use crate::map::vocab::TOKENIZER_FILE;
use crate::modes::Mode;
use crate::plan::{self, ModelSide, Options, SourceModule};

/// The mode `auto` resolved to, and why (recorded in the report and printed).
#[derive(Debug, Clone)]
pub struct Choice {
    pub mode: Mode,
    pub reason: String,
}

/// Resolves `auto` for this pair. The probe plan resolves `auto` unit by unit (`project` where a
/// module's shapes match), which is all it takes to see whether every module has equal shapes.
pub fn choose(
    source: &ModelSide<'_>,
    target: &ModelSide<'_>,
    adapter: &BTreeMap<String, SourceModule>,
    adapter_path: &Path,
    options: &Options,
) -> Result<Choice> {
    let probe_options = Options {
        mode: Mode::Auto,
        ..options.clone()
    };
    let probe = plan::build(source, target, adapter, adapter_path, &probe_options)?;
    let equal_shapes = probe
        .units()
        .all(|u| u.skip.is_some() || u.source_shape == u.target_shape);
    let (ls, lt) = (source.layers(), target.layers());
    if ls == lt && equal_shapes {
        return Ok(Choice {
            mode: Mode::Rotate,
            reason: format!(
                "equal depths ({ls} layer{}) and equal module shapes: rotate keeps the whole \
                 update",
                if ls == 1 { "" } else { "s" }
            ),
        });
    }
    let what_differs = if ls != lt {
        format!("depths differ ({ls} and {lt} layers)")
    } else {
        "module shapes differ".to_string()
    };
    if let Some(side) = plan::experts::side_with_experts(source, target) {
        return Ok(Choice {
            mode: Mode::Align,
            reason: format!(
                "{what_differs}, and map reads dense MLPs, which {} ({} experts per layer) \
                 does not have: align",
                side.ckpt.dir.display(),
                side.experts()
            ),
        });
    }
    if let Some(u) = plan::experts::unmapped_update(source, target, adapter, options)? {
        return Ok(Choice {
            mode: Mode::Align,
            reason: format!(
                "{what_differs}, and map cannot take the adapter ({}): align",
                u.reason
            ),
        });
    }
    let missing: Vec<String> = [source, target]
        .iter()
        .filter(|side| side.ckpt.vocab_source().is_none())
        .map(|side| match side.ckpt.gguf() {
            Some(_) => format!("the vocabulary of {}", side.ckpt.dir.display()),
            None => side.ckpt.dir.join(TOKENIZER_FILE).display().to_string(),
        })
        .collect();
    if missing.is_empty() {
        // Too few shared tokens to anchor the map (a different family's tokenizer, a tiny
        // vocabulary): align, saying why, rather than a map that cannot be fitted.
        if let Some(why) = crate::map::anchors(source, target)?.shortfall {
            return Ok(Choice {
                mode: Mode::Align,
                reason: format!(
                    "{what_differs}, and map cannot anchor its residual map ({why}): align"
                ),
            });
        }
        Ok(Choice {
            mode: Mode::Map,
            reason: format!(
                "{what_differs}: map carries the update through a map built from the weights"
            ),
        })
    } else {
        Ok(Choice {
            mode: Mode::Align,
            reason: format!(
                "{what_differs}, and map needs both vocabularies but {} is missing: align",
                missing.join(" and ")
            ),
        })
    }
}
