//! Mixture-of-experts models in the plan: an expert's module (`mlp.experts.5.up_proj`) takes its
//! update from the same expert of the source, so expert modules pair only with expert modules,
//! and only when both models have as many experts per layer. Experts of unrelated models share no
//! index (training assigns them freely), and a dense MLP is not any one expert: those pairs are
//! refused where the user selects them, with the attention-only transfer that still works.

use crate::arch::{ModuleSpec, Part};
use crate::error::{Error, Result};
use crate::modes::Mode;

use super::{ModelSide, ModuleFilter};

/// The target module types whose units can be paired expert for expert; a type whose pairing
/// does not hold is dropped when `--modules` leaves all of it out, and refused otherwise.
pub(super) fn check_pairing(
    source: &ModelSide<'_>,
    target: &ModelSide<'_>,
    specs: Vec<&'static ModuleSpec>,
    same_layout: bool,
    filter: &ModuleFilter,
) -> Result<Vec<&'static ModuleSpec>> {
    let mut kept = Vec::with_capacity(specs.len());
    for spec in specs {
        let pieces: Vec<(Option<Part>, &ModuleSpec)> = if same_layout {
            vec![(None, source.arch.module(&spec.name).expect("same layout"))]
        } else {
            spec.parts
                .iter()
                .map(|&p| (Some(p), source.arch.module_with(p)))
                .collect()
        };
        let mut mismatch = None;
        let mut selected = false;
        for (part, src_spec) in pieces {
            if let Some(why) = pairing_fault(source, target, src_spec, spec) {
                let label = part.map_or(spec.name.as_str(), Part::module_name);
                selected |= filter(label, &spec.name, &src_spec.name);
                mismatch.get_or_insert(why);
            }
        }
        match mismatch {
            None => kept.push(spec),
            Some(why) if selected => {
                return Err(Error::Config {
                    path: target.ckpt.dir.clone(),
                    reason: format!(
                        "the adapter's `{}` cannot be carried onto this model: {why}; transfer the \
                         attention alone with --modules q_proj,k_proj,v_proj,o_proj",
                        spec.name
                    ),
                })
            }
            Some(_) => {}
        }
    }
    Ok(kept)
}

/// Why a source module cannot fill a target module expert for expert, if it cannot.
fn pairing_fault(
    source: &ModelSide<'_>,
    target: &ModelSide<'_>,
    src_spec: &ModuleSpec,
    spec: &ModuleSpec,
) -> Option<String> {
    let describe = |side: &ModelSide<'_>, s: &ModuleSpec| match s.expert {
        true => format!(
            "{} experts per layer in {}",
            side.experts(),
            side.ckpt.dir.display()
        ),
        false => format!("one dense MLP per layer in {}", side.ckpt.dir.display()),
    };
    let fault = match (src_spec.expert, spec.expert) {
        (false, false) => false,
        (true, true) => source.experts() != target.experts(),
        _ => true,
    };
    fault.then(|| {
        format!(
            "{} against {}",
            describe(source, src_spec),
            describe(target, spec)
        )
    })
}

/// The map mode reads every layer's dense MLP (its neurons anchor the layer's map and its depth
/// similarity), which a mixture-of-experts layer does not have.
pub fn refuse_map(mode: Mode, source: &ModelSide<'_>, target: &ModelSide<'_>) -> Result<()> {
    if mode != Mode::Map {
        return Ok(());
    }
    match [source, target].into_iter().find(|s| s.arch.has_experts()) {
        None => Ok(()),
        Some(side) => Err(Error::arg(
            "--mode",
            format!(
                "map reads each layer's dense MLP, and {} ({}) has {} experts per layer instead; \
                 use rotate where the shapes agree, or align",
                side.ckpt.dir.display(),
                side.arch.name,
                side.experts()
            ),
        )),
    }
}
