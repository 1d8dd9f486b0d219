//! bitsandbytes weights read back as the codes, maps and absmax they were stored with, laid out
//! as transformers saves them (`Params4bit`'s quant state, `Int8Params`' `SCB`).

use super::*;
use crate::io::quantized::test_file;
use crate::io::safetensors::decode_f32;
use crate::io::RawTensor as Raw;

fn floats(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn open(tensors: Vec<(String, Raw)>) -> (tempfile::TempDir, Vec<TensorFile>, Result<BnbWeights>) {
    let (dir, shards, index) = test_file(tensors.iter().map(|(n, t)| (n.as_str(), t)));
    let found = BnbWeights::find(&shards, &index);
    (dir, shards, found)
}

/// A `[5, 6]` 4-bit weight in blocks of 4 (the last partial): code k is `k mod 16`; with
/// `nested`, its 8 absmax values as codes `b` into a map of `b / 8` scaled per 4 blocks and
/// offset by 0.5, else stored as `b + 1`.
fn four_bit(nested: bool) -> (Vec<(String, Raw)>, Vec<f32>) {
    let (out, inn, bs) = (5usize, 6usize, 4usize);
    let n = out * inn;
    let codes: Vec<u8> = (0..n).map(|k| (k % 16) as u8).collect();
    let bytes: Vec<u8> = codes.chunks(2).map(|p| (p[0] << 4) | p[1]).collect();
    let map: Vec<f32> = (0..16).map(|c| c as f32 / 8.0 - 1.0).collect();
    let blocks = n.div_ceil(bs);
    let nested_map: Vec<f32> = (0..256).map(|b| b as f32 / 8.0).collect();
    let nested_scales = [1.0f32, 3.0];
    let absmax: Vec<f32> = (0..blocks)
        .map(|b| match nested {
            true => nested_map[b] * nested_scales[b / 4] + 0.5,
            false => b as f32 + 1.0,
        })
        .collect();
    let want = (0..n)
        .map(|k| map[codes[k] as usize] * absmax[k / bs])
        .collect();
    let mut state = serde_json::json!({"quant_type": "nf4", "blocksize": bs, "dtype": "bfloat16",
        "shape": [out, inn]});
    let w = "m.weight";
    let mut t = vec![
        (w.to_string(), Raw(Dtype::U8, vec![n / 2, 1], bytes)),
        (
            format!("{w}.quant_map"),
            Raw(Dtype::F32, vec![16], floats(&map)),
        ),
    ];
    if nested {
        state["nested_blocksize"] = 4.into();
        state["nested_offset"] = 0.5.into();
        let codes: Vec<u8> = (0..blocks as u8).collect();
        t.push((format!("{w}.absmax"), Raw(Dtype::U8, vec![blocks], codes)));
        t.push((
            format!("{w}.nested_absmax"),
            Raw(Dtype::F32, vec![2], floats(&nested_scales)),
        ));
        t.push((
            format!("{w}.nested_quant_map"),
            Raw(Dtype::F32, vec![256], floats(&nested_map)),
        ));
    } else {
        let stored: Vec<f32> = (0..blocks).map(|b| b as f32 + 1.0).collect();
        t.push((
            format!("{w}.absmax"),
            Raw(Dtype::F32, vec![blocks], floats(&stored)),
        ));
    }
    let json = state.to_string().into_bytes();
    t.push((
        format!("{w}.quant_state.bitsandbytes__nf4"),
        Raw(Dtype::U8, vec![json.len()], json),
    ));
    (t, want)
}

#[test]
fn four_bit_weights_read_as_their_codes_map_times_their_blocks_absmax() {
    for nested in [false, true] {
        let (tensors, want) = four_bit(nested);
        let (_dir, shards, found) = open(tensors);
        let found = found.unwrap();
        assert_eq!(found.shape("m.weight"), Some(&[5, 6][..]));
        // Rows 3..5 start past the first nested block.
        for rows in [0..5, 2..4, 3..5] {
            let (bytes, ty, cols) = found
                .read_rows("m.weight", rows.clone(), &shards)
                .unwrap()
                .unwrap();
            assert_eq!(cols, 6);
            assert_eq!(
                decode_f32(&bytes, ty),
                want[rows.start * 6..rows.end * 6],
                "nested {nested}"
            );
        }
    }
}

#[test]
fn int8_weights_read_as_their_values_times_their_rows_scb_over_127() {
    let codes: Vec<u8> = (0..12).map(|k| (k as i8 - 6) as u8).collect();
    let scb = [127.0f32, 2.0, 0.5];
    let tensors = vec![
        (
            "m.weight".to_string(),
            Raw(Dtype::I8, vec![3, 4], codes.clone()),
        ),
        ("m.SCB".to_string(), Raw(Dtype::F32, vec![3], floats(&scb))),
        (
            "m.weight_format".to_string(),
            Raw(Dtype::U8, vec![], vec![0]),
        ),
    ];
    let index: HashMap<String, usize> = tensors.iter().map(|(n, _)| (n.clone(), 0)).collect();
    let (_dir, shards, found) = open(tensors);
    let found = found.unwrap();
    let (bytes, ty, _) = found.read_rows("m.weight", 0..3, &shards).unwrap().unwrap();
    let want: Vec<f32> = (0..12)
        .map(|k| (k as f32 - 6.0) * scb[k / 4] * INV_127)
        .collect();
    assert_eq!(decode_f32(&bytes, ty), want);
    let mut parts: Vec<String> = found.parts(&index).collect();
    parts.sort();
    assert_eq!(parts, ["m.SCB", "m.weight_format"]);
}

#[test]
fn bitsandbytes_weights_without_their_parts_are_refused_by_name() {
    let (mut tensors, _) = four_bit(true);
    tensors.retain(|(n, _)| n != "m.weight.nested_quant_map");
    let e = open(tensors).2.unwrap_err().to_string();
    assert!(
        e.contains("m.weight") && e.contains("nested_quant_map"),
        "{e}"
    );
    // A quant state that is not JSON.
    let (mut tensors, _) = four_bit(false);
    tensors.retain(|(n, _)| !n.contains("quant_state"));
    tensors.push((
        "m.weight.quant_state.bitsandbytes__nf4".into(),
        Raw(Dtype::U8, vec![2], vec![0xff, 0]),
    ));
    let e = open(tensors).2.unwrap_err().to_string();
    assert!(e.contains("quant_state") && e.contains("JSON"), "{e}");
    // Codes too few for the shape.
    let (mut tensors, _) = four_bit(false);
    tensors[0].1 = Raw(Dtype::U8, vec![14, 1], vec![0; 14]);
    let e = open(tensors).2.unwrap_err().to_string();
    assert!(e.contains("m.weight") && e.contains("14 bytes"), "{e}");
    // A block size of zero, and a state for another quant type.
    for (key, value) in [
        ("blocksize", serde_json::json!(0)),
        ("quant_type", serde_json::json!("fp4")),
    ] {
        let (mut tensors, _) = four_bit(false);
        let i = tensors
            .iter()
            .position(|(n, _)| n.contains("quant_state"))
            .unwrap();
        let mut state: serde_json::Value = serde_json::from_slice(&tensors[i].1 .2).unwrap();
        state[key] = value;
        let json = state.to_string().into_bytes();
        tensors[i].1 = Raw(Dtype::U8, vec![json.len()], json);
        let e = open(tensors).2.unwrap_err().to_string();
        assert!(e.contains("quant_state") && e.contains(key), "{e}");
    }
    // An int8 weight saved in a tiled GPU layout.
    let tensors = vec![
        (
            "m.weight".to_string(),
            Raw(Dtype::I8, vec![3, 4], vec![0; 12]),
        ),
        (
            "m.SCB".to_string(),
            Raw(Dtype::F32, vec![3], floats(&[1.0; 3])),
        ),
        (
            "m.weight_format".to_string(),
            Raw(Dtype::U8, vec![], vec![2]),
        ),
    ];
    let e = open(tensors).2.unwrap_err().to_string();
    assert!(e.contains("m.weight_format") && e.contains("[2]"), "{e}");
    // A weight both NVFP4 (an F8_E4M3 scale beside U8 codes) and bitsandbytes 4-bit.
    let (mut tensors, _) = four_bit(false);
    tensors.push((
        "m.weight_scale".into(),
        Raw(Dtype::F8_E4M3, vec![5, 1], vec![0x38; 5]),
    ));
    tensors.push((
        "m.weight_scale_2".into(),
        Raw(Dtype::F32, vec![1], floats(&[1.0])),
    ));
    // (The NVFP4 reading of 15 bytes a row needs 30 inputs: rows of 3 bytes, 6 inputs.)
    tensors[0].1 = Raw(Dtype::U8, vec![5, 3], vec![0; 15]);
    let (_dir, shards, index) = test_file(tensors.iter().map(|(n, t)| (n.as_str(), t)));
    let e = crate::io::quantized::QuantizedWeights::find(&serde_json::json!({}), &shards, &index)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("m.weight") && e.contains("two quantized formats"),
        "{e}"
    );
    // An SCB of the wrong length.
    let tensors = vec![
        (
            "m.weight".to_string(),
            Raw(Dtype::I8, vec![3, 4], vec![0; 12]),
        ),
        (
            "m.SCB".to_string(),
            Raw(Dtype::F32, vec![2], floats(&[1.0, 1.0])),
        ),
    ];
    let e = open(tensors).2.unwrap_err().to_string();
    assert!(e.contains("m.SCB") && e.contains("3 floats"), "{e}");
}
