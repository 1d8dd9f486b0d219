//! The GGUF tensors beside the layers' projections whose form llama.cpp's converters changed, read
//! back as Hugging Face stores them, so that `convert --gguf` writes a checkpoint whole:
//!
//! - linear attention's own state (Qwen3.5, Qwen3-Next): the decay `A_log`, stored as
//!   `ssm_a` = −exp(A_log); `dt_bias` as `ssm_dt.bias`; the convolution `conv1d`
//!   `[channels, 1, kernel]` squeezed to `ssm_conv1d` `[channels, kernel]`; the gated norm
//!   `ssm_norm`, the one norm the converter leaves without its `+ 1`. Qwen3.5's converter moves
//!   their value heads as it moves the projections' ([`super::reorder`]).
//! - the multi-token-prediction block after the model's layers (`nextn_predict_layers`): its
//!   layer's tensors under the next block index, its fusion as `nextn.*` (`eh_proj`, `enorm`,
//!   `hnorm`, `shared_head_norm`, `embed_tokens`, `shared_head_head`). GLM-4.5's and DeepSeek's
//!   checkpoints keep the block as that layer, the fusion beside its tensors
//!   (`model.layers.<n>.eh_proj`); Qwen's keep it apart as `mtp.*` (`mtp.layers.0.*`, `mtp.fc`,
//!   `mtp.pre_fc_norm_embedding`, `mtp.pre_fc_norm_hidden`, `mtp.norm`), and the converter adds
//!   1 to its norms as to the others.

use super::names::Family;
use super::Values;

/// Qwen3.5's and Qwen3-Next's checkpoints keep the prediction block as `mtp.*`.
fn mtp_apart(f: &Family) -> bool {
    f.linear_attention || f.fused_linear_attention
}

/// The Hugging Face name of a GGUF tensor this module reads (see the module's text), under its
/// block's index (`model.layers.<l>.*`; [`after_depth`] moves Qwen's prediction block); None for
/// the others.
pub fn hf_name(f: &Family, gguf: &str) -> Option<String> {
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let linear = f.linear_attention || f.fused_linear_attention;
    let hf = match rest {
        "ssm_a" if linear => "linear_attn.A_log",
        "ssm_dt.bias" if linear => "linear_attn.dt_bias",
        "ssm_conv1d.weight" if linear => "linear_attn.conv1d.weight",
        "ssm_norm.weight" if linear => "linear_attn.norm.weight",
        "nextn.eh_proj.weight" => "eh_proj.weight",
        "nextn.enorm.weight" => "enorm.weight",
        "nextn.hnorm.weight" => "hnorm.weight",
        "nextn.shared_head_norm.weight" => "shared_head.norm.weight",
        "nextn.embed_tokens.weight" => "embed_tokens.weight",
        "nextn.shared_head_head.weight" => "shared_head.head.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}"))
}

/// `hf` as the checkpoint names it, for a model of `depth` layers: Qwen's prediction block (a
/// block past the depth) moves to `mtp.*`; every other name is kept.
pub fn after_depth(f: &Family, hf: String, depth: usize) -> String {
    let Some((layer, rest)) = hf
        .strip_prefix("model.layers.")
        .and_then(|r| r.split_once('.'))
    else {
        return hf;
    };
    let Ok(layer) = layer.parse::<usize>() else {
        return hf;
    };
    if layer < depth || !mtp_apart(f) {
        return hf;
    }
    let fusion = match rest {
        "eh_proj.weight" => "fc",
        "enorm.weight" => "pre_fc_norm_embedding",
        "hnorm.weight" => "pre_fc_norm_hidden",
        "shared_head.norm.weight" => "norm",
        _ => return format!("mtp.layers.{}.{rest}", layer - depth),
    };
    format!("mtp.{fusion}.weight")
}

/// The Hugging Face shape of `hf`, whose GGML dimensions reversed are `dims`: the convolution
/// gets back its middle dimension of 1.
pub fn hf_shape(hf: &str, mut dims: Vec<usize>) -> Vec<usize> {
    if hf.ends_with("linear_attn.conv1d.weight") && dims.len() == 2 {
        dims.insert(1, 1);
    }
    dims
}

/// How the values of `hf` are stored.
pub fn values(f: &Family, hf: &str) -> Values {
    let shifted = (hf.ends_with("norm.weight") && !hf.ends_with("linear_attn.norm.weight"))
        || hf.starts_with("mtp.pre_fc_norm_");
    if hf.ends_with("linear_attn.A_log") && (f.linear_attention || f.fused_linear_attention) {
        Values::NegatedExp
    } else if shifted && f.norm_shift != 0.0 {
        Values::Shifted(f.norm_shift)
    } else {
        Values::AsIs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::gguf::names::family_of;

    #[test]
    fn linear_attentions_state_and_the_prediction_block_are_named_as_their_checkpoints() {
        let qwen35 = family_of("qwen35", false).unwrap();
        let next = family_of("qwen3next", true).unwrap();
        let glm = family_of("glm4moe", true).unwrap();
        let llama = family_of("llama", false).unwrap();
        let read = |f, gguf: &str| hf_name(f, gguf).map(|hf| after_depth(f, hf, 4));
        for f in [qwen35, next] {
            for (gguf, want) in [
                ("blk.2.ssm_a", "model.layers.2.linear_attn.A_log"),
                ("blk.2.ssm_dt.bias", "model.layers.2.linear_attn.dt_bias"),
                (
                    "blk.0.ssm_conv1d.weight",
                    "model.layers.0.linear_attn.conv1d.weight",
                ),
                (
                    "blk.1.ssm_norm.weight",
                    "model.layers.1.linear_attn.norm.weight",
                ),
                ("blk.4.nextn.eh_proj.weight", "mtp.fc.weight"),
                (
                    "blk.4.nextn.enorm.weight",
                    "mtp.pre_fc_norm_embedding.weight",
                ),
                ("blk.4.nextn.hnorm.weight", "mtp.pre_fc_norm_hidden.weight"),
                ("blk.4.nextn.shared_head_norm.weight", "mtp.norm.weight"),
            ] {
                assert_eq!(read(f, gguf).as_deref(), Some(want), "{gguf}");
            }
            // The block's layer, as the tables name it.
            let q = "model.layers.5.self_attn.q_proj.weight".to_string();
            assert_eq!(after_depth(f, q, 4), "mtp.layers.1.self_attn.q_proj.weight");
            let kept = "model.layers.3.self_attn.q_proj.weight".to_string();
            assert_eq!(after_depth(f, kept.clone(), 4), kept);
            assert_eq!(after_depth(f, "lm_head.weight".into(), 4), "lm_head.weight");
        }
        // GLM-4.5 keeps the block as a layer; a model without linear attention has no state.
        assert_eq!(
            read(glm, "blk.4.nextn.eh_proj.weight").as_deref(),
            Some("model.layers.4.eh_proj.weight")
        );
        let q = "model.layers.4.self_attn.q_proj.weight".to_string();
        assert_eq!(after_depth(glm, q.clone(), 4), q);
        assert_eq!(read(llama, "blk.2.ssm_a"), None);
        assert_eq!(read(llama, "blk.2.attn_q.weight"), None);
    }

    #[test]
    fn values_undo_what_the_converter_did() {
        let qwen35 = family_of("qwen35", false).unwrap();
        let glm = family_of("glm4moe", true).unwrap();
        for (hf, want) in [
            ("model.layers.0.linear_attn.A_log", Values::NegatedExp),
            ("model.layers.0.linear_attn.norm.weight", Values::AsIs),
            ("model.layers.0.linear_attn.dt_bias", Values::AsIs),
            (
                "model.layers.0.input_layernorm.weight",
                Values::Shifted(1.0),
            ),
            ("mtp.pre_fc_norm_hidden.weight", Values::Shifted(1.0)),
            ("mtp.norm.weight", Values::Shifted(1.0)),
            ("mtp.fc.weight", Values::AsIs),
        ] {
            assert_eq!(values(qwen35, hf), want, "{hf}");
        }
        assert_eq!(values(glm, "model.layers.4.enorm.weight"), Values::AsIs);
        assert_eq!(
            hf_shape("model.layers.0.linear_attn.conv1d.weight", vec![96, 4]),
            [96, 1, 4]
        );
        assert_eq!(hf_shape("model.norm.weight", vec![64]), [64]);
    }
}
