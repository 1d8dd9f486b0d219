//! Tests of src/io/safetensors.rs: decoding on both paths, every kind of value.

use super::*;

#[test]
fn aligned_and_misaligned_decoding_agree() {
    let values: Vec<f32> = (0..37).map(|i| (i as f32 - 18.0) * 0.37).collect();
    for ty in [FloatType::F32, FloatType::F16, FloatType::Bf16] {
        let bytes = encode_f32(&values, ty);
        // One byte of offset forces the byte-by-byte path.
        let mut shifted = vec![0u8; bytes.len() + 1];
        shifted[1..].copy_from_slice(&bytes);
        let a = decode_f32(&bytes, ty);
        let b = decode_f32(&shifted[1..], ty);
        assert_eq!(a, b, "{ty:?}");
        for (x, y) in values.iter().zip(&a) {
            assert!(
                (x - y).abs() <= x.abs() * 1e-2 + 1e-3,
                "{ty:?}: {x} decoded as {y}"
            );
        }
    }
}

/// Both paths decode every bit pattern exactly as `half` and `f32::from_bits` do: random
/// patterns (a fresh seed, printed on failure) and the special ones (±0, subnormals, ±Inf,
/// NaNs), aligned and one byte off.
#[test]
fn decoding_is_exact_for_every_kind_of_value() {
    let seed = crate::linalg::fresh_seed();
    let mut state = seed | 1;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut words: Vec<u32> = (0..4096).map(|_| next() as u32).collect();
    for special in [
        0x0000_0000,
        0x8000_0000,
        0x0000_0001,
        0x807f_ffff,
        0x7f80_0000,
        0xff80_0000,
        0x7fc0_0001,
    ] {
        words.push(special);
    }
    let halves: Vec<u16> = words
        .iter()
        .map(|&w| w as u16)
        .chain([0x0001, 0x8000, 0x7c00, 0xfc00, 0x7e01, 0x03ff])
        .collect();
    // A 16-bit type's case: the patterns' bytes, and each widened to f32 by `half`.
    let sixteen = |widen: fn(u16) -> f32| -> (Vec<u8>, Vec<u32>) {
        (
            halves.iter().flat_map(|h| h.to_le_bytes()).collect(),
            halves.iter().map(|&h| widen(h).to_bits()).collect(),
        )
    };
    let (bf16_bytes, bf16_bits) = sixteen(|h| half::bf16::from_bits(h).to_f32());
    let (f16_bytes, f16_bits) = sixteen(|h| half::f16::from_bits(h).to_f32());
    let cases: [(FloatType, Vec<u8>, Vec<u32>); 3] = [
        (
            FloatType::F32,
            words.iter().flat_map(|w| w.to_le_bytes()).collect(),
            words.clone(),
        ),
        (FloatType::Bf16, bf16_bytes, bf16_bits),
        (FloatType::F16, f16_bytes, f16_bits),
    ];
    for (ty, bytes, want) in cases {
        let mut shifted = vec![0u8; bytes.len() + 1];
        shifted[1..].copy_from_slice(&bytes);
        for (path, input) in [("aligned", &bytes[..]), ("misaligned", &shifted[1..])] {
            let got: Vec<u32> = decode_f32(input, ty).iter().map(|x| x.to_bits()).collect();
            let same = |g: u32, w: u32| {
                g == w || (f32::from_bits(g).is_nan() && f32::from_bits(w).is_nan())
            };
            let bad = got.iter().zip(&want).position(|(&g, &w)| !same(g, w));
            assert!(
                bad.is_none(),
                "{ty:?} {path}, seed {seed}: value {bad:?} differs"
            );
            assert_eq!(got.len(), want.len());
        }
    }
}

/// The reference writer's file for the same tensors, its header's keys sorted as ours are.
fn reference_file(
    tensors: &[(String, OutTensor<'_>)],
    metadata: HashMap<String, String>,
) -> Vec<u8> {
    struct Plain(safetensors::Dtype, Vec<usize>, Vec<u8>);
    impl safetensors::View for &Plain {
        fn dtype(&self) -> safetensors::Dtype {
            self.0
        }
        fn shape(&self) -> &[usize] {
            &self.1
        }
        fn data(&self) -> std::borrow::Cow<'_, [u8]> {
            std::borrow::Cow::Borrowed(&self.2)
        }
        fn data_len(&self) -> usize {
            self.2.len()
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("one.safetensors");
    write_file(&path, tensors, None).unwrap();
    let ours = TensorFile::open(&path).unwrap();
    let plain: Vec<(String, Plain)> = tensors
        .iter()
        .map(|(n, t)| {
            let bytes = ours.bytes(n).unwrap().to_vec();
            (n.clone(), Plain(t.ty.dtype(), t.shape.clone(), bytes))
        })
        .collect();
    let bytes =
        safetensors::serialize(plain.iter().map(|(n, p)| (n.as_str(), p)), Some(metadata)).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let sort = |v: serde_json::Value| {
        let mut entries: Vec<_> = v.as_object().unwrap().clone().into_iter().collect();
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        serde_json::Value::Object(entries.into_iter().collect())
    };
    let mut header = sort(header);
    header["__metadata__"] = sort(header["__metadata__"].take());
    let mut sorted = serde_json::to_vec(&header).unwrap();
    sorted.resize(n, b' ');
    [&bytes[..8], &sorted, &bytes[8 + n..]].concat()
}

#[test]
fn the_writer_lays_out_files_as_the_reference_writer_does() {
    // Names and dtypes whose orders differ, a streamed tensor given in uneven pieces, a
    // borrowed and a produced one, metadata in several keys.
    let values = |n: usize, seed: f32| (0..n).map(|i| (i as f32 * 0.37 + seed).sin()).collect();
    let streamed_values: Vec<f32> = values(7 * 5, 0.5);
    let borrowed = encode_f32(&values(6, 1.5), FloatType::F16);
    let streamed = OutTensor::streamed(FloatType::Bf16, vec![7, 5], |sink| {
        let bytes = encode_f32(&streamed_values, FloatType::Bf16);
        for piece in bytes.chunks(11) {
            sink(piece)?;
        }
        Ok(())
    });
    let tensors = vec![
        (
            "b.weight".to_string(),
            OutTensor::from_f32(values(12, 0.1), vec![3, 4], FloatType::F32),
        ),
        ("a.weight".to_string(), streamed),
        (
            "c.bias".to_string(),
            OutTensor::borrowed(FloatType::F16, vec![6], &borrowed),
        ),
        (
            "a.bias".to_string(),
            OutTensor::from_f32(values(3, 2.5), vec![3], FloatType::F32),
        ),
    ];
    let metadata = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        ("producer".to_string(), "loraxfer".to_string()),
        ("alpha".to_string(), "x".to_string()),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    write_file(&path, &tensors, Some(metadata.clone())).unwrap();
    let got = std::fs::read(&path).unwrap();
    assert_eq!(got, reference_file(&tensors, metadata));
    let back = TensorFile::open(&path).unwrap();
    let read = decode_f32(back.bytes("a.weight").unwrap(), FloatType::Bf16);
    let want = decode_f32(
        &encode_f32(&streamed_values, FloatType::Bf16),
        FloatType::Bf16,
    );
    assert_eq!(read, want);
}

#[test]
fn a_stream_that_fails_or_falls_short_leaves_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let short = OutTensor::streamed(FloatType::F32, vec![4], |sink| sink(&[0u8; 12]));
    let e = write_file(&path, &[("w".to_string(), short)], None).unwrap_err();
    assert!(e.to_string().contains("`w` gave 12 bytes"), "{e}");
    let failing = OutTensor::streamed(FloatType::F32, vec![4], |sink| {
        sink(&[0u8; 8])?;
        Err(Error::internal("the source went away".to_string()))
    });
    let e = write_file(&path, &[("w".to_string(), failing)], None).unwrap_err();
    assert!(e.to_string().contains("the source went away"), "{e}");
    let twice = ["w", "w"].map(|n| {
        (
            n.to_string(),
            OutTensor::from_f32(vec![1.0], vec![1], FloatType::F32),
        )
    });
    let e = write_file(&path, &twice, None).unwrap_err();
    assert!(e.to_string().contains("two tensors named `w`"), "{e}");
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
}
