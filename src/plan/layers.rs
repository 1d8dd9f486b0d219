//! Depth mapping: which source layer each target layer takes its adapter from
//! (docs/METHOD.md, "Modules, layers and fused projections").

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::{Error, Result};

/// Target layer j takes source layer round(j·(L_s−1)/(L_t−1)); equal depths map j to j.
pub fn default_layer_map(source_layers: usize, target_layers: usize) -> BTreeMap<usize, usize> {
    (0..target_layers)
        .map(|j| {
            let i = if target_layers <= 1 || source_layers <= 1 {
                0
            } else {
                (j as f64 * (source_layers - 1) as f64 / (target_layers - 1) as f64).round()
                    as usize
            };
            (j, i)
        })
        .collect()
}

/// Moves each target layer whose source layer has the other kind (linear attention against
/// softmax attention, in hybrid models such as Qwen3.5) to the nearest source layer of its own
/// kind (the shallower of two as near), where the source has one: the depth map pairs like
/// with like, so every attention update has a module to go to.
pub fn pair_kinds(
    map: &mut BTreeMap<usize, usize>,
    source_layers: usize,
    source_kind: impl Fn(usize) -> bool,
    target_kind: impl Fn(usize) -> bool,
) {
    for (&j, i) in map.iter_mut() {
        let want = target_kind(j);
        if source_kind(*i) == want {
            continue;
        }
        let near = (0..source_layers)
            .filter(|&l| source_kind(l) == want)
            .min_by_key(|&l| (l.abs_diff(*i), l));
        if let Some(l) = near {
            *i = l;
        }
    }
}

/// The default depth map of two models: [`default_layer_map`], with each layer paired with one
/// of its own attention kind where both models mix linear and softmax attention. Where only one
/// does, the depth map is kept, so that the MLPs go layer to layer.
pub fn default_pairs(
    source: &super::ModelSide<'_>,
    target: &super::ModelSide<'_>,
) -> BTreeMap<usize, usize> {
    use crate::arch::Block;
    let mut map = default_layer_map(source.layers(), target.layers());
    if source.hybrid() && target.hybrid() {
        let linear =
            |side: &super::ModelSide<'_>, l: usize| side.holds_block(l, Block::LinearAttention);
        pair_kinds(
            &mut map,
            source.layers(),
            |i| linear(source, i),
            |j| linear(target, j),
        );
    }
    map
}

/// Reads a layer-map file: a JSON object `{"<target layer>": <source layer>, ...}` (the format of
/// the report's `layer_map`): the target layers it names (the others keep the default mapping).
pub fn read_layer_map(
    path: &Path,
    source_layers: usize,
    target_layers: usize,
) -> Result<BTreeMap<usize, usize>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, "cannot read", e))?;
    parse_layer_map(&text, path, source_layers, target_layers)
}

/// Parses the text of a layer-map file; `path` is for messages.
pub fn parse_layer_map(
    text: &str,
    path: &Path,
    source_layers: usize,
    target_layers: usize,
) -> Result<BTreeMap<usize, usize>> {
    let value: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| Error::config(path, format!("invalid JSON: {e}")))?;
    let obj = value.as_object().ok_or_else(|| {
        Error::config(
            path,
            "a layer map is a JSON object {\"<target layer>\": <source layer>}",
        )
    })?;
    let mut map = BTreeMap::new();
    for (key, v) in obj {
        let j: usize = key
            .trim()
            .parse()
            .map_err(|_| Error::config(path, format!("key `{key}` is not a layer number")))?;
        if j >= target_layers {
            return Err(Error::config(
                path,
                format!("target layer {j} does not exist (the target has {target_layers} layers)"),
            ));
        }
        let i = v.as_u64().ok_or_else(|| {
            Error::config(path, format!("value for layer {j} is not a layer number"))
        })? as usize;
        if i >= source_layers {
            return Err(Error::config(
                path,
                format!("source layer {i} (for target layer {j}) does not exist (the source has {source_layers} layers)"),
            ));
        }
        map.insert(j, i);
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_depths_map_identically() {
        let m = default_layer_map(28, 28);
        assert_eq!(m.len(), 28);
        assert!(m.iter().all(|(j, i)| i == j));
    }

    #[test]
    fn deeper_source_is_subsampled_with_rounding() {
        // 28 -> 24: j * 27/23, rounded.
        let m = default_layer_map(28, 24);
        assert_eq!(m[&0], 0);
        assert_eq!(m[&1], 1); // 1.17
        assert_eq!(m[&12], 14); // 14.09
        assert_eq!(m[&2], 2); // 2.35
        assert_eq!(m[&3], 4); // 3.52
        assert_eq!(m[&23], 27);
    }

    #[test]
    fn shallower_source_repeats_layers() {
        let m = default_layer_map(2, 5);
        assert_eq!(m.values().copied().collect::<Vec<_>>(), vec![0, 0, 1, 1, 1]);
        assert_eq!(default_layer_map(4, 1)[&0], 0);
    }

    /// Qwen3.5's pattern (every fourth layer softmax attention) at 8 and at 12 layers: each
    /// target layer takes a source layer of its kind near the depth map's choice.
    #[test]
    fn hybrid_layers_pair_like_with_like() {
        let full = |l: usize| (l + 1) % 4 == 0;
        let linear = |l: usize| !full(l);
        let mut m = default_layer_map(8, 12);
        pair_kinds(&mut m, 8, linear, linear);
        assert!(m.iter().all(|(&j, &i)| full(j) == full(i)), "{m:?}");
        // 12 -> 8: layer 3 (full) would take source layer 5 (linear): the nearest full is 3.
        assert_eq!(default_layer_map(12, 8)[&3], 5);
        let mut m = default_layer_map(12, 8);
        pair_kinds(&mut m, 12, linear, linear);
        assert_eq!((m[&3], m[&7]), (3, 11));
        assert!(m.iter().all(|(&j, &i)| full(j) == full(i)), "{m:?}");
        // A source with no layer of the kind keeps the depth map's choice.
        let mut m = default_layer_map(4, 4);
        pair_kinds(&mut m, 4, |_| false, linear);
        assert_eq!(m, default_layer_map(4, 4));
    }

    #[test]
    fn file_overrides_and_validates() {
        let p = Path::new("map.json");
        let m = parse_layer_map(r#"{"0": 3, "2": 1}"#, p, 4, 4).unwrap();
        assert_eq!(m, [(0, 3), (2, 1)].into());
        let e = parse_layer_map(r#"{"9": 0}"#, p, 4, 4)
            .unwrap_err()
            .to_string();
        assert!(e.contains("target layer 9"), "{e}");
        let e = parse_layer_map(r#"{"0": 4}"#, p, 4, 4)
            .unwrap_err()
            .to_string();
        assert!(e.contains("source layer 4"), "{e}");
        assert!(parse_layer_map("[1,2]", p, 4, 4).is_err());
        assert!(parse_layer_map(r#"{"x": 1}"#, p, 4, 4).is_err());
    }
}
