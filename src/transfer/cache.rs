//! The basis cache (docs/METHOD.md, "Basis cache"): the SVD of a base weight depends only on
//! (the file, the tensor, its rows, k, p, q, seed), so it is stored once and reused; the second
//! adapter between the same pair of models costs only the projections. One safetensors file per
//! matrix (U, S, V in f32; the key and a checksum of the values in the metadata), flushed to
//! disk before it is renamed into place; a file whose key or checksum does not match, or that
//! cannot be read, is recomputed, never trusted. Temporary files of runs that were killed are
//! removed when the cache is next opened.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use faer::Mat;

use crate::backend::{Basis, SvdParams};
use crate::error::{Error, Result};
use crate::io::safetensors::{write_file, FloatType, OutTensor, TensorFile};
use crate::linalg::{fnv1a, FNV_OFFSET};

/// A cache directory and its hit/miss counters.
#[derive(Debug)]
pub struct BasisCache {
    dir: PathBuf,
    pub hits: AtomicUsize,
    pub misses: AtomicUsize,
}

impl BasisCache {
    /// Opens (creating) a cache directory.
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(dir, "cannot create the cache directory", e))?;
        remove_stale_temporaries(dir);
        Ok(BasisCache {
            dir: dir.to_path_buf(),
            hits: AtomicUsize::new(0),
            misses: AtomicUsize::new(0),
        })
    }

    /// The key of a matrix: which bytes of which files (the weight's, then any its values are
    /// built with: an FP8 weight's or MXFP4 experts' scales in another shard), and the SVD
    /// parameters. A file is known by its canonical path, size and modification time, so a
    /// rewritten checkpoint misses.
    pub fn key(
        files: &[&Path],
        tensor: &str,
        rows: &std::ops::Range<usize>,
        p: &SvdParams,
    ) -> Result<String> {
        let mut identity = String::new();
        for file in files {
            let canon = file
                .canonicalize()
                .map_err(|e| Error::io(file, "cannot resolve", e))?;
            let meta =
                std::fs::metadata(&canon).map_err(|e| Error::io(&canon, "cannot stat", e))?;
            let mtime = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            identity += &format!("{}|{}|{}|", canon.display(), meta.len(), mtime);
        }
        Ok(format!(
            "{identity}{tensor}|{}:{}|k={}|p={}|q={}|seed={}|v3",
            rows.start, rows.end, p.rank, p.oversample, p.power_iters, p.seed
        ))
    }

    fn path_of(&self, key: &str) -> PathBuf {
        // FNV-1a over the key, twice with different offsets, for a 128-bit file name.
        let h = |offset: u64| fnv1a(offset, key.bytes().map(u64::from));
        self.dir.join(format!(
            "{:016x}{:016x}.safetensors",
            h(FNV_OFFSET),
            h(0x8422_2325_cbf2_9ce4)
        ))
    }

    /// The cached basis of `key`, if present and intact.
    pub fn get(&self, key: &str) -> Option<Basis> {
        let path = self.path_of(key);
        let found = path.is_file().then(|| read_basis(&path, key)).flatten();
        let counter = if found.is_some() {
            &self.hits
        } else {
            &self.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// Stores a basis (best effort: a cache that cannot be written only costs time).
    pub fn put(&self, key: &str, basis: &Basis) {
        // Unique per process and call: two threads may store the same key.
        static CALLS: AtomicUsize = AtomicUsize::new(0);
        let path = self.path_of(key);
        let tmp = path.with_extension(format!(
            "tmp-{}-{}",
            std::process::id(),
            CALLS.fetch_add(1, Ordering::Relaxed)
        ));
        let col_major = |m: &Mat<f32>| -> Vec<f32> {
            (0..m.ncols())
                .flat_map(|j| m.col(j).iter().copied().collect::<Vec<_>>())
                .collect()
        };
        let (k, m, n) = (basis.s.len(), basis.u.nrows(), basis.v.nrows());
        let (u, v) = (col_major(&basis.u), col_major(&basis.v));
        let next: Vec<f32> = basis.next.into_iter().collect();
        let meta = HashMap::from([
            ("key".to_string(), key.to_string()),
            ("checksum".to_string(), checksum(&[&u, &basis.s, &next, &v])),
        ]);
        let tensors = vec![
            (
                "u".to_string(),
                OutTensor::from_f32(u, vec![k, m], FloatType::F32),
            ),
            (
                "s".to_string(),
                OutTensor::from_f32(basis.s.clone(), vec![k], FloatType::F32),
            ),
            (
                "next".to_string(),
                OutTensor::from_f32(next, vec![basis.next.is_some() as usize], FloatType::F32),
            ),
            (
                "v".to_string(),
                OutTensor::from_f32(v, vec![k, n], FloatType::F32),
            ),
        ];
        // Flushed before the rename: after a crash the name holds the whole file or nothing,
        // never a file of the right size whose data never reached the disk.
        let flushed = |p: &Path| std::fs::File::open(p).and_then(|f| f.sync_all()).is_ok();
        if write_file(&tmp, &tensors, Some(meta)).is_ok()
            && flushed(&tmp)
            && std::fs::rename(&tmp, &path).is_ok()
        {
            let _ = flushed(&self.dir);
            return;
        }
        let _ = std::fs::remove_file(&tmp);
    }
}

/// FNV-1a over the bits of the values, 32 bits at a time, as 16 hex digits: catches a file
/// whose data was damaged after its header (a torn write, a bad disk), which the key cannot.
fn checksum(parts: &[&[f32]]) -> String {
    let bits = parts
        .iter()
        .flat_map(|p| p.iter())
        .map(|x| u64::from(x.to_bits()));
    format!("{:016x}", fnv1a(FNV_OFFSET, bits))
}

/// Removes `{hash}.tmp-{pid}[-{n}]` files (exactly the names [`BasisCache::put`] gives: the
/// directory may hold other files) whose process is gone (a run killed while storing).
fn remove_stale_temporaries(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if temporary_pid(&name).is_some_and(|pid| !crate::io::output::process_alive(pid)) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// The process that wrote the temporary file `name`, if it is one of ours.
fn temporary_pid(name: &str) -> Option<u32> {
    let (hash, rest) = name.split_once(".tmp-")?;
    let hex = hash.len() == 32 && hash.bytes().all(|b| b.is_ascii_hexdigit());
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let (pid, n) = rest.split_once('-').unwrap_or((rest, "0"));
    (hex && digits(pid) && digits(n)).then(|| pid.parse().ok())?
}

fn read_basis(path: &Path, key: &str) -> Option<Basis> {
    let file = TensorFile::open(path).ok()?;
    if file.metadata_value("key")? != key {
        return None;
    }
    let (ue, ve) = (
        file.entry("u")?.shape.clone(),
        file.entry("v")?.shape.clone(),
    );
    let (&[k, m], &[k2, n]) = (ue.as_slice(), ve.as_slice()) else {
        return None;
    };
    let (u, s, v) = (
        file.read_f32("u").ok()?,
        file.read_f32("s").ok()?,
        file.read_f32("v").ok()?,
    );
    let next = file.read_f32("next").ok()?;
    if k != k2 || s.len() != k || file.metadata_value("checksum")? != checksum(&[&u, &s, &next, &v])
    {
        return None;
    }
    let next = next.first().copied();
    Some(Basis {
        u: Mat::from_fn(m, k, |i, j| u[j * m + i]),
        s,
        v: Mat::from_fn(n, k, |i, j| v[j * n + i]),
        next,
        resident: None,
    })
}
