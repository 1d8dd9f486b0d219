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

/// Reads a layer-map file: a JSON object `{"<target layer>": <source layer>, ...}` (the format of
/// the report's `layer_map`). Target layers it leaves out keep the default mapping.
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
    let mut map = default_layer_map(source_layers, target_layers);
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

    #[test]
    fn file_overrides_and_validates() {
        let p = Path::new("map.json");
        let m = parse_layer_map(r#"{"0": 3, "2": 1}"#, p, 4, 4).unwrap();
        assert_eq!((m[&0], m[&1], m[&2], m[&3]), (3, 1, 1, 3));
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
