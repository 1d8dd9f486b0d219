//! `adapter_config.json`: the parts that decide the math (r, lora_alpha, rslora, the per-module
//! `rank_pattern` and `alpha_pattern` regexes), read the way PEFT reads them; features whose
//! update is not `s·B·A` over the published base are refused, never guessed.

use std::path::Path;

use regex::Regex;

use crate::error::{Error, Result};

/// The parts of `adapter_config.json` that decide the math; `raw` keeps everything else.
#[derive(Debug, Clone)]
pub struct AdapterConfig {
    pub r: usize,
    pub lora_alpha: f64,
    pub use_rslora: bool,
    pub rank_pattern: Vec<(String, usize)>,
    pub alpha_pattern: Vec<(String, f64)>,
    /// `target_parameters`' entries for fused expert parameters (`gate_up_proj`, `down_proj`,
    /// alone or under a path), each adapted as one LoRA over all experts (PEFT's LoRA on
    /// transformers 5's fused experts).
    pub target_parameters: Vec<String>,
    /// Modules whose `weight` `target_parameters` names (`model.layers.0.mlp.gate_proj.weight`):
    /// PEFT adapts a 2-D parameter as it adapts its module (the same `lora_A`/`lora_B` keys and
    /// update), but looks its rank and alpha up under the parameter's name.
    pub weight_parameters: Vec<String>,
    pub raw: serde_json::Map<String, serde_json::Value>,
}

/// The fused expert parameters whose LoRA is read, one module per expert.
pub const EXPERT_PARAMETERS: [&str; 2] = ["gate_up_proj", "down_proj"];

impl AdapterConfig {
    /// Parses and checks a config; `path` is for messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let value: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| Error::config(path, format!("invalid JSON: {e}")))?;
        let raw = value
            .as_object()
            .cloned()
            .ok_or_else(|| Error::config(path, "adapter_config.json is not a JSON object"))?;
        let unsupported = |reason: String| Error::UnsupportedAdapter {
            path: path.to_path_buf(),
            reason,
        };
        if let Some(t) = raw.get("peft_type").and_then(|v| v.as_str()) {
            if t != "LORA" {
                return Err(unsupported(format!(
                    "peft_type is `{t}`; only LORA adapters can be transferred"
                )));
            }
        }
        // A flag given as "true" or 1 must not read as false: a present, non-null key has the
        // JSON type PEFT writes, or the config is refused.
        let flag = |key: &str| -> Result<bool> {
            match raw.get(key) {
                None | Some(serde_json::Value::Null) => Ok(false),
                Some(v) => v.as_bool().ok_or_else(|| {
                    Error::config(path, format!("`{key}` is {v}, not true or false"))
                }),
            }
        };
        let (use_dora, lora_bias, fan_in_fan_out, use_rslora, use_qalora) = (
            flag("use_dora")?,
            flag("lora_bias")?,
            flag("fan_in_fan_out")?,
            flag("use_rslora")?,
            flag("use_qalora")?,
        );
        if use_dora {
            return Err(unsupported(
                "DoRA (use_dora = true): the magnitude vector has no subspace transfer".into(),
            ));
        }
        if lora_bias {
            return Err(unsupported(
                "lora_bias = true: bias terms of lora_B are not transferred".into(),
            ));
        }
        if fan_in_fan_out {
            return Err(unsupported(
                "fan_in_fan_out = true (Conv1D-style weights) is not supported".into(),
            ));
        }
        if let Some(b) = raw.get("bias").and_then(|v| v.as_str()) {
            if b != "none" {
                return Err(unsupported(format!(
                    "bias = `{b}`: trained biases cannot be transferred; use bias = \"none\""
                )));
            }
        }
        if raw
            .get("modules_to_save")
            .is_some_and(|v| !v.is_null() && v.as_array().is_none_or(|a| !a.is_empty()))
        {
            return Err(unsupported(
                "modules_to_save holds full weight copies, which cannot be transferred".into(),
            ));
        }
        // Updates that are not s·B·A over the base as it is published.
        if let Some(init) = raw.get("init_lora_weights").and_then(|v| v.as_str()) {
            let lower = init.to_ascii_lowercase();
            if ["pissa", "olora", "corda", "loftq", "lora_ga"]
                .iter()
                .any(|m| lower.starts_with(m))
            {
                return Err(unsupported(format!(
                    "init_lora_weights = `{init}`: the adapter is relative to a base whose \
                     principal part it took over; save it converted to a plain LoRA (PEFT's \
                     save_pretrained(..., path_initial_model_for_weight_conversion=...))"
                )));
            }
        }
        if use_qalora {
            return Err(unsupported(
                "use_qalora = true: QA-LoRA pools the input of a quantized base".into(),
            ));
        }
        for (key, why) in [
            (
                "layer_replication",
                "the adapter's layers are replicas of the base's, stacked anew",
            ),
            (
                "alora_invocation_tokens",
                "activated LoRA is keyed to the source tokenizer's ids",
            ),
        ] {
            let present = raw
                .get(key)
                .is_some_and(|v| !v.is_null() && v.as_array().is_none_or(|a| !a.is_empty()));
            if present {
                return Err(unsupported(format!("{key} is set: {why}")));
            }
        }
        let r = raw
            .get("r")
            .and_then(|v| v.as_u64())
            .filter(|&r| r > 0)
            .ok_or_else(|| Error::config(path, "`r` must be a positive integer"))?
            as usize;
        let lora_alpha = match raw.get("lora_alpha") {
            None | Some(serde_json::Value::Null) => 8.0, // PEFT's default
            Some(v) => v
                .as_f64()
                .ok_or_else(|| Error::config(path, format!("`lora_alpha` is {v}, not a number")))?,
        };
        let rank_pattern = pattern_map(&raw, "rank_pattern", path, |v| {
            v.as_u64().filter(|&r| r > 0).map(|r| r as usize)
        })?;
        let alpha_pattern = pattern_map(&raw, "alpha_pattern", path, |v| v.as_f64())?;
        let (target_parameters, weight_parameters) = parameter_targets(&raw, path)?;
        Ok(AdapterConfig {
            r,
            lora_alpha,
            use_rslora,
            rank_pattern,
            alpha_pattern,
            target_parameters,
            weight_parameters,
            raw,
        })
    }

    /// Rank PEFT gives `module` (a module name such as `model.layers.3.self_attn.q_proj`).
    pub fn rank_for(&self, module: &str) -> usize {
        find_pattern(&self.rank_pattern, &self.pattern_name(module)).unwrap_or(self.r)
    }

    /// lora_alpha PEFT gives `module`.
    pub fn alpha_for(&self, module: &str) -> f64 {
        find_pattern(&self.alpha_pattern, &self.pattern_name(module)).unwrap_or(self.lora_alpha)
    }

    /// The name PEFT matches the patterns against: the module's, or its weight's where
    /// `target_parameters` adapts the module through its weight.
    fn pattern_name(&self, module: &str) -> String {
        if self.weight_parameters.iter().any(|t| names(t, module)) {
            format!("{module}.weight")
        } else {
            module.to_string()
        }
    }

    /// The scale s of ΔW = s·B·A for a module of rank `r` and alpha `alpha`.
    pub fn scale(&self, r: usize, alpha: f64) -> f64 {
        if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        }
    }

    /// The alpha that gives scale `s` at rank `r` (inverse of [`scale`](Self::scale)).
    pub fn alpha_for_scale(&self, r: usize, s: f64) -> f64 {
        if self.use_rslora {
            s * (r as f64).sqrt()
        } else {
            s * r as f64
        }
    }
}

/// What `target_parameters` names: fused experts' parameters (`gate_up_proj`, `down_proj`, alone
/// or under their module's path), and the modules whose `weight` it names (a
/// 2-D weight adapted as a parameter is a LoRA on its module). LoRA on any other parameter is
/// refused.
fn parameter_targets(
    raw: &serde_json::Map<String, serde_json::Value>,
    path: &Path,
) -> Result<(Vec<String>, Vec<String>)> {
    let Some(list) = raw.get("target_parameters").filter(|v| !v.is_null()) else {
        return Ok((Vec::new(), Vec::new()));
    };
    let entries = list
        .as_array()
        .ok_or_else(|| Error::config(path, "`target_parameters` is not a list"))?;
    let (mut experts, mut weights) = (Vec::new(), Vec::new());
    for v in entries {
        let name = v.as_str().unwrap_or_default();
        let (head, last) = name.rsplit_once('.').unwrap_or(("", name));
        if EXPERT_PARAMETERS.contains(&last) {
            experts.push(name.to_string());
        } else if last == "weight" && !head.is_empty() {
            weights.push(head.to_string());
        } else {
            return Err(Error::UnsupportedAdapter {
                path: path.to_path_buf(),
                reason: format!(
                    "target_parameters names {v}: LoRA on parameters is read only for the fused \
                     experts' {} and for a module's weight",
                    EXPERT_PARAMETERS.join(" and ")
                ),
            });
        }
    }
    Ok((experts, weights))
}

fn pattern_map<T>(
    raw: &serde_json::Map<String, serde_json::Value>,
    key: &str,
    path: &Path,
    value: impl Fn(&serde_json::Value) -> Option<T>,
) -> Result<Vec<(String, T)>> {
    let Some(obj) = raw.get(key).filter(|v| !v.is_null()) else {
        return Ok(Vec::new());
    };
    let obj = obj
        .as_object()
        .ok_or_else(|| Error::config(path, format!("`{key}` is not an object")))?;
    obj.iter()
        .map(|(k, v)| {
            Regex::new(k).map_err(|e| {
                Error::config(path, format!("`{key}` key `{k}` is not a regex: {e}"))
            })?;
            let v = value(v)
                .ok_or_else(|| Error::config(path, format!("`{key}[{k}]` has an invalid value")))?;
            Ok((k.clone(), v))
        })
        .collect()
}

/// PEFT's rule: the first pattern key `k` such that the module name matches `(^|.*\.)k$`.
fn find_pattern<T: Copy>(patterns: &[(String, T)], module: &str) -> Option<T> {
    patterns.iter().find_map(|(k, v)| {
        let re = Regex::new(&format!("^(?:.*\\.)?(?:{k})$")).ok()?;
        re.is_match(module).then_some(*v)
    })
}

/// Whether a `target_parameters` entry names `full`: whole, or a part of it after a dot (PEFT's
/// `key == entry or key.endswith("." + entry)`).
pub(super) fn names(entry: &str, full: &str) -> bool {
    full == entry
        || full
            .strip_suffix(entry)
            .is_some_and(|head| head.ends_with('.'))
}

/// A module's full name as its rank/alpha pattern key, unescaped: PEFT since 0.14 reads a key as
/// the regex `(.*\.)?(key)$`, which a full name matches (its dots match themselves, and no other
/// module's name), while earlier versions fall back to looking the full name up as it is, which an
/// escaped key would miss.
pub fn exact_pattern(module: &str) -> String {
    module.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<AdapterConfig> {
        AdapterConfig::parse(json, Path::new("adapter_config.json"))
    }

    #[test]
    fn scale_follows_alpha_over_r_or_sqrt_r() {
        let c = parse(r#"{"r": 16, "lora_alpha": 32}"#).unwrap();
        assert_eq!(c.scale(16, 32.0), 2.0);
        let c = parse(r#"{"r": 16, "lora_alpha": 32, "use_rslora": true}"#).unwrap();
        assert_eq!(c.scale(16, 32.0), 8.0);
        for rs in [false, true] {
            let c = AdapterConfig {
                use_rslora: rs,
                ..parse(r#"{"r": 4}"#).unwrap()
            };
            let a = c.alpha_for_scale(48, c.scale(16, 32.0));
            assert!((c.scale(48, a) - c.scale(16, 32.0)).abs() < 1e-12);
        }
    }

    #[test]
    fn a_weight_in_target_parameters_is_its_module_with_patterns_under_its_name() {
        let c = parse(
            r#"{"r": 4, "lora_alpha": 8,
                "target_parameters": ["model.layers.0.mlp.gate_proj.weight", "mlp.experts.gate_up_proj"],
                "rank_pattern": {"model.layers.0.mlp.gate_proj.weight": 6, "up_proj": 2},
                "alpha_pattern": {"model.layers.0.mlp.gate_proj.weight": 12}}"#,
        )
        .unwrap();
        assert_eq!(c.target_parameters, ["mlp.experts.gate_up_proj"]);
        assert_eq!(c.rank_for("model.layers.0.mlp.gate_proj"), 6);
        assert_eq!(c.alpha_for("model.layers.0.mlp.gate_proj"), 12.0);
        assert_eq!(c.rank_for("model.layers.10.mlp.gate_proj"), 4);
        assert_eq!(c.rank_for("model.layers.0.mlp.up_proj"), 2);
        // PEFT matches the weight's name only: a module-name key does not reach it.
        let c = parse(
            r#"{"r": 4, "target_parameters": ["mlp.gate_proj.weight"],
                "rank_pattern": {"model.layers.0.mlp.gate_proj": 6}}"#,
        )
        .unwrap();
        assert_eq!(c.rank_for("model.layers.0.mlp.gate_proj"), 4);
        for other in ["model.norm.bias", "weight", "experts.gate_up_proj.bias"] {
            let json = format!(r#"{{"r": 4, "target_parameters": ["{other}"]}}"#);
            let e = parse(&json).unwrap_err().to_string();
            assert!(e.contains(other) && e.contains("a module's weight"), "{e}");
        }
    }

    #[test]
    fn patterns_match_like_peft() {
        let c = parse(
            r#"{"r": 8, "lora_alpha": 16,
                "rank_pattern": {"q_proj": 4, "model.layers.1.mlp.down_proj": 2},
                "alpha_pattern": {"layers\\.[0-2]\\.self_attn\\.v_proj": 64}}"#,
        )
        .unwrap();
        assert_eq!(c.rank_for("model.layers.3.self_attn.q_proj"), 4);
        assert_eq!(
            c.rank_for("model.layers.3.self_attn.qq_proj"),
            8,
            "suffix must start at a dot"
        );
        assert_eq!(c.rank_for("model.layers.1.mlp.down_proj"), 2);
        assert_eq!(
            c.rank_for("model.layers.11.mlp.down_proj"),
            8,
            "exact names do not match other layers"
        );
        assert_eq!(c.alpha_for("model.layers.2.self_attn.v_proj"), 64.0);
        assert_eq!(c.alpha_for("model.layers.3.self_attn.v_proj"), 16.0);
        // The full names the writer emits match only their own module among a model's modules.
        let exact = AdapterConfig {
            rank_pattern: vec![(exact_pattern("model.layers.1.mlp.up_proj"), 3)],
            ..c
        };
        assert_eq!(exact.rank_for("model.layers.1.mlp.up_proj"), 3);
        for other in [
            "model.layers.11.mlp.up_proj",
            "model.layers.21.mlp.up_proj",
            "model.layers.1.mlp.gate_up_proj",
            "model.layers.1.mlp.down_proj",
        ] {
            assert_eq!(exact.rank_for(other), 8, "{other}");
        }
    }

    #[test]
    fn refuses_what_is_not_plain_lora() {
        for (json, word) in [
            (r#"{"r": 8, "use_dora": true}"#, "DoRA"),
            (r#"{"r": 8, "lora_bias": true}"#, "lora_bias"),
            (r#"{"r": 8, "fan_in_fan_out": true}"#, "fan_in_fan_out"),
            (r#"{"r": 8, "bias": "all"}"#, "bias"),
            (r#"{"r": 8, "peft_type": "IA3"}"#, "IA3"),
            (
                r#"{"r": 8, "modules_to_save": ["lm_head"]}"#,
                "modules_to_save",
            ),
            (r#"{"r": 0}"#, "r"),
            (r#"{"r": 8, "rank_pattern": {"(": 2}}"#, "regex"),
        ] {
            let e = parse(json).unwrap_err().to_string();
            assert!(
                e.contains(word) && e.contains("adapter_config.json"),
                "{json}: {e}"
            );
        }
        assert!(parse(r#"{"r": 8, "modules_to_save": null, "bias": "none"}"#).is_ok());
    }
}
