//! A model's vocabulary as surface strings, read from `tokenizer.json`, so that two models with
//! different tokenizers can be paired on the tokens they share. Token strings are normalized to
//! the bytes they stand for: GPT-2 byte-level BPE spells bytes with printable stand-ins (`Ġ` for
//! a space), SentencePiece spells a space `▁` and raw bytes `<0xNN>`. Special tokens are left
//! out: their spellings are conventions of each family, not text.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};

/// The largest vocabulary a tokenizer may claim (16 Mi tokens; the largest released is about
/// 256 Ki).
pub(crate) const MAX_VOCAB: usize = 16 << 20;

/// The file name of the vocabulary inside a model directory.
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// Token id → the bytes it stands for (None for special tokens and ids the file skips).
#[derive(Debug, Clone)]
pub struct Vocab {
    pub path: PathBuf,
    pub surfaces: Vec<Option<Vec<u8>>>,
}

impl Vocab {
    /// Reads `dir/tokenizer.json`.
    pub fn open(dir: &Path) -> Result<Self> {
        let path = dir.join(TOKENIZER_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            Error::io(
                &path,
                "cannot read the vocabulary (the map mode pairs the models' tokens through it)",
                e,
            )
        })?;
        let json: Value = serde_json::from_str(&text)
            .map_err(|e| Error::config(&path, format!("not valid JSON: {e}")))?;
        Self::from_json(&json, &path)
    }

    /// Parses a `tokenizer.json` document (BPE, WordPiece, WordLevel or Unigram model).
    pub fn from_json(json: &Value, path: &Path) -> Result<Self> {
        let bad = |why: String| Error::config(path, why);
        let model = json
            .get("model")
            .ok_or_else(|| bad("no `model` section".into()))?;
        let kind = model.get("type").and_then(Value::as_str).unwrap_or("BPE");
        let vocab = model
            .get("vocab")
            .ok_or_else(|| bad(format!("the {kind} model has no `vocab`")))?;
        let mut tokens: Vec<(usize, String)> = match (kind, vocab) {
            ("Unigram", Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(id, item)| {
                    item.get(0)
                        .and_then(Value::as_str)
                        .map(|t| (id, t.to_string()))
                        .ok_or_else(|| {
                            bad(format!("Unigram vocab entry {id} is not [token, score]"))
                        })
                })
                .collect::<Result<_>>()?,
            (_, Value::Object(map)) => map
                .iter()
                .map(|(t, id)| {
                    id.as_u64()
                        .map(|id| (id as usize, t.clone()))
                        .ok_or_else(|| bad(format!("token {t:?} has no integer id")))
                })
                .collect::<Result<_>>()?,
            _ => return Err(bad(format!("unsupported vocab layout for a {kind} model"))),
        };
        let mut special = std::collections::HashSet::new();
        for added in json
            .get("added_tokens")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let (Some(id), Some(content)) = (
                added.get("id").and_then(Value::as_u64),
                added.get("content").and_then(Value::as_str),
            ) else {
                continue;
            };
            if added
                .get("special")
                .and_then(Value::as_bool)
                .unwrap_or(false)
            {
                special.insert(id as usize);
            } else {
                tokens.push((id as usize, content.to_string()));
            }
        }
        let byte_level = mentions_byte_level(json.get("pre_tokenizer"))
            || mentions_byte_level(json.get("decoder"));
        // Ids index a table: refuse an absurd one by name before it sizes (or overflows) it.
        if let Some((id, token)) = tokens.iter().find(|(id, _)| *id >= MAX_VOCAB) {
            return Err(bad(format!(
                "token {token:?} has id {id}, beyond any vocabulary (at most {MAX_VOCAB})"
            )));
        }
        let len = tokens.iter().map(|(id, _)| id + 1).max().unwrap_or(0);
        let mut surfaces = vec![None; len];
        for (id, token) in tokens {
            if special.contains(&id) {
                continue;
            }
            surfaces[id] = Some(if byte_level {
                byte_level_bytes(&token)
            } else {
                sentencepiece_bytes(&token)
            });
        }
        Ok(Vocab {
            path: path.to_path_buf(),
            surfaces,
        })
    }

    /// A vocabulary given token by token (a GGUF's `tokenizer.ggml.tokens`): None for special
    /// tokens; `byte_level` for GPT-2-style spellings, else SentencePiece's.
    pub fn from_tokens(tokens: &[Option<&str>], byte_level: bool, path: &Path) -> Self {
        let surfaces = tokens
            .iter()
            .map(|t| {
                t.map(|t| {
                    if byte_level {
                        byte_level_bytes(t)
                    } else {
                        sentencepiece_bytes(t)
                    }
                })
            })
            .collect();
        Vocab {
            path: path.to_path_buf(),
            surfaces,
        }
    }

    /// Surface → token id (the lowest id when two tokens spell the same bytes).
    pub fn index(&self) -> HashMap<&[u8], usize> {
        let mut map = HashMap::new();
        for (id, s) in self.surfaces.iter().enumerate() {
            if let Some(s) = s {
                map.entry(s.as_slice()).or_insert(id);
            }
        }
        map
    }
}

/// Pairs of (source id, target id) whose tokens spell the same bytes, in source-id order; ids
/// at or past `limits` (the embedding rows each model has) are left out.
pub fn shared_tokens(
    source: &Vocab,
    target: &Vocab,
    limits: (usize, usize),
) -> Vec<(usize, usize)> {
    let index = target.index();
    let mut seen = std::collections::HashSet::new();
    source
        .surfaces
        .iter()
        .enumerate()
        .filter(|(id, _)| *id < limits.0)
        .filter_map(|(id, s)| {
            let t = *index.get(s.as_deref()?)?;
            (t < limits.1 && seen.insert(t)).then_some((id, t))
        })
        .collect()
}

fn mentions_byte_level(v: Option<&Value>) -> bool {
    match v {
        Some(Value::Object(map)) => {
            map.get("type").and_then(Value::as_str) == Some("ByteLevel")
                || map.values().any(|x| mentions_byte_level(Some(x)))
        }
        Some(Value::Array(items)) => items.iter().any(|x| mentions_byte_level(Some(x))),
        _ => false,
    }
}

/// GPT-2's byte ↔ printable-character table: bytes that are printable Latin-1 stand for
/// themselves, the other 68 are shifted to U+0100 and up, in order.
fn gpt2_char_to_byte() -> &'static HashMap<char, u8> {
    static TABLE: std::sync::OnceLock<HashMap<char, u8>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
        let mut shifted = 0;
        (0u32..256)
            .map(|b| {
                let c = if printable(b) {
                    b
                } else {
                    shifted += 1;
                    255 + shifted
                };
                (char::from_u32(c).expect("valid code point"), b as u8)
            })
            .collect()
    })
}

fn byte_level_bytes(token: &str) -> Vec<u8> {
    let table = gpt2_char_to_byte();
    let mut out = Vec::with_capacity(token.len());
    for c in token.chars() {
        match table.get(&c) {
            Some(&b) => out.push(b),
            // Not a byte-level spelling (an added token): keep its UTF-8.
            None => out.extend(c.to_string().as_bytes()),
        }
    }
    out
}

fn sentencepiece_bytes(token: &str) -> Vec<u8> {
    if let Some(hex) = token.strip_prefix("<0x").and_then(|t| t.strip_suffix('>')) {
        if let Ok(b) = u8::from_str_radix(hex, 16) {
            if hex.len() == 2 {
                return vec![b];
            }
        }
    }
    token.replace('▁', " ").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn byte_level_and_sentencepiece_spellings_meet() {
        let gpt2 = json!({
            "model": {"type": "BPE", "vocab": {"Ġthe": 0, "cat": 1, "Ċ": 2, "<|endoftext|>": 3}},
            "added_tokens": [{"id": 3, "content": "<|endoftext|>", "special": true}],
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "ByteLevel"}]}
        });
        let sp = json!({
            "model": {"type": "Unigram", "vocab": [["<eos>", 0.0], ["▁the", -1.0], ["cat", -2.0], ["<0x0A>", -3.0]]},
            "added_tokens": [{"id": 0, "content": "<eos>", "special": true}]
        });
        let a = Vocab::from_json(&gpt2, Path::new("a")).unwrap();
        let b = Vocab::from_json(&sp, Path::new("b")).unwrap();
        assert_eq!(a.surfaces[0].as_deref(), Some(&b" the"[..]));
        assert_eq!(a.surfaces[2].as_deref(), Some(&b"\n"[..]));
        assert_eq!(a.surfaces[3], None, "special tokens are not text");
        assert_eq!(shared_tokens(&a, &b, (4, 4)), vec![(0, 1), (1, 2), (2, 3)]);
        // Rows a model does not have are left out.
        assert_eq!(shared_tokens(&a, &b, (4, 3)), vec![(0, 1), (1, 2)]);
    }

    #[test]
    fn the_gpt2_table_is_a_bijection() {
        let t = gpt2_char_to_byte();
        assert_eq!(t.len(), 256);
        let mut bytes: Vec<u8> = t.values().copied().collect();
        bytes.sort();
        bytes.dedup();
        assert_eq!(bytes.len(), 256);
        assert_eq!(t[&'Ġ'], b' ');
    }

    #[test]
    fn a_broken_vocabulary_names_the_file() {
        let err = Vocab::from_json(
            &json!({"model": {"type": "BPE"}}),
            Path::new("m/tokenizer.json"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("m/tokenizer.json"), "{err}");
        // Ids that would size (or overflow) the table, in the vocabulary or the added tokens.
        for vocab in [
            json!({"model": {"type": "BPE", "vocab": {"a": 0, "zz": u64::MAX}}}),
            json!({"model": {"type": "BPE", "vocab": {"a": 0}},
                   "added_tokens": [{"id": 1u64 << 40, "content": "zz", "special": false}]}),
        ] {
            let err = Vocab::from_json(&vocab, Path::new("m/tokenizer.json"))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("m/tokenizer.json") && err.contains("\"zz\""),
                "{err}"
            );
        }
    }
}
