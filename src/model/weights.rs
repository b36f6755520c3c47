//! The decoder's weights, mapped once and shared by its two graphs.
//!
//! A format-2 model exported with attention sums has two decoder graphs
//! over the same weights: `decoder.onnx` (with `attn_colsum`, for the steps
//! a policy scores) and `decoder_fast.onnx` (without, for every other step).
//! Both keep their weights in `decoder.weights` as ONNX external data. Two
//! sessions loading it themselves would hold two copies; instead the file
//! is mapped here, each tensor becomes an ONNX Runtime value over the map,
//! and both sessions take those values as their initializers
//! (`AddInitializer`) with one prepacked-weights container, so the packed
//! copies ONNX Runtime makes for its kernels exist once too.
//!
//! The file (written by scripts/export/decoder_v2.py): the tensors, each at
//! a multiple of 64 bytes, then a JSON index `{"tensors": [{name, dtype,
//! shape, offset, bytes}]}`, its length as a little-endian u64, and the
//! magic `EEWEIGHT`.

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

use memmap2::{Mmap, UncheckedAdvice};
use ort::memory::MemoryInfo;
use ort::session::builder::SessionBuilder;
use ort::value::TensorElementType;
use ort::AsPointer;
use serde::Deserialize;

use crate::error::{Error, Result};

const MAGIC: &[u8; 8] = b"EEWEIGHT";
/// Where each tensor starts: SIMD loads straight from the map.
const ALIGN: u64 = 64;
/// An index larger than this is not one of ours.
const MAX_INDEX_BYTES: u64 = 16 << 20;
const MAX_RANK: usize = 8;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Index {
    tensors: Vec<Entry>,
}

/// One tensor of the index: where its bytes lie in the file.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<u64>,
    pub offset: u64,
    pub bytes: u64,
}

/// The checked index of a shared weights file's bytes: each tensor inside
/// the data part, aligned, of a known type, its shape's bytes its stated
/// bytes. An error is one line.
pub fn read_index(file: &[u8]) -> std::result::Result<Vec<Entry>, String> {
    parse_index(file).map(|index| index.tensors)
}

fn element(dtype: &str) -> Option<(TensorElementType, u64)> {
    Some(match dtype {
        "float32" => (TensorElementType::Float32, 4),
        "float16" => (TensorElementType::Float16, 2),
        "uint8" => (TensorElementType::Uint8, 1),
        "int8" => (TensorElementType::Int8, 1),
        "int32" => (TensorElementType::Int32, 4),
        "int64" => (TensorElementType::Int64, 8),
        _ => return None,
    })
}

/// One initializer: its name and an ONNX Runtime value over the map.
struct Shared {
    name: CString,
    value: NonNull<ort::sys::OrtValue>,
}

/// The mapped weights file and a value over each of its tensors. Must
/// outlive every session given them ([`SharedWeights::add_to`]): the
/// decoder declares its sessions before this, so they drop first.
pub struct SharedWeights {
    path: PathBuf,
    tensors: Vec<Shared>,
    prepacked: ort::session::builder::PrepackedWeights,
    // Last: the values above point into it.
    map: Mmap,
}

// SAFETY: the values are immutable tensors over a read-only map; ONNX
// Runtime reads initializers from any thread, and nothing here mutates them.
unsafe impl Send for SharedWeights {}
unsafe impl Sync for SharedWeights {}

impl std::fmt::Debug for SharedWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedWeights")
            .field("path", &self.path)
            .field("tensors", &self.tensors.len())
            .field("bytes", &self.map.len())
            .finish()
    }
}

impl SharedWeights {
    /// Maps `path` and checks its index: every tensor inside the data part,
    /// aligned, of a known type, its shape's bytes its stated bytes.
    pub fn open(path: &Path) -> Result<Self> {
        let bad = |reason: String| Error::ModelFile {
            path: path.to_path_buf(),
            reason,
        };
        let (file, _) = crate::regular_file::open(path).map_err(|e| bad(format!("cannot open: {e}")))?;
        // SAFETY: opened read-only; the model folder is not written while a
        // process uses it (as for the embedding table), and a concurrent
        // writer could change weight values, not lengths or memory safety.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| bad(format!("cannot map: {e}")))?;
        let index = parse_index(&map).map_err(bad)?;
        let memory = MemoryInfo::default();
        let mut tensors = Vec::with_capacity(index.tensors.len());
        for entry in &index.tensors {
            let (ty, _) = element(&entry.dtype).ok_or_else(|| {
                bad(format!(
                    "tensor {:?} has the unknown dtype {:?}",
                    entry.name, entry.dtype
                ))
            })?;
            let shape: Vec<i64> = entry
                .shape
                .iter()
                .map(|&d| i64::try_from(d))
                .collect::<std::result::Result<_, _>>()
                .map_err(|_| bad(format!("tensor {:?} has a dimension over i64", entry.name)))?;
            let name = CString::new(entry.name.as_str())
                .map_err(|_| bad(format!("tensor name {:?} holds a NUL byte", entry.name)))?;
            // Checked by parse_index: offset + bytes lies inside the map.
            let data = map[entry.offset as usize..][..entry.bytes as usize].as_ptr();
            // SAFETY: `data` spans `bytes` bytes of the map (the shape's size
            // in `ty`, checked by parse_index), which lives as long as the
            // value (dropped after it); ONNX Runtime neither frees nor writes
            // an initializer's external data.
            let value = unsafe { super::decoder::raw_tensor(&memory, data.cast(), entry.bytes as usize, &shape, ty) }?;
            tensors.push(Shared { name, value });
        }
        Ok(SharedWeights {
            path: path.to_path_buf(),
            tensors,
            prepacked: ort::session::builder::PrepackedWeights::new(),
            map,
        })
    }

    /// Gives a session builder every shared tensor as an initializer and the
    /// shared prepacked-weights container: the second session finds each
    /// packed weight there (it packs it once more while loading and drops
    /// the copy: a passing peak of the largest one, 108 MiB for the demo's
    /// fp32 head).
    pub fn add_to(&self, mut builder: SessionBuilder) -> Result<SessionBuilder> {
        let api = ort::api();
        for tensor in &self.tensors {
            // SAFETY: the options pointer is the builder's own; the name is
            // copied by ONNX Runtime; the value outlives the session (see the
            // struct's documentation).
            let status =
                unsafe { (api.AddInitializer)(builder.ptr_mut(), tensor.name.as_ptr(), tensor.value.as_ptr()) };
            super::decoder::check(status, "sharing a decoder weight between the graphs")?;
        }
        builder
            .with_prepacked_weights(&self.prepacked)
            .map_err(|e| Error::Runtime {
                context: format!("sharing the prepacked weights of {}", self.path.display()),
                reason: e.to_string(),
            })
    }

    /// Drops the map's pages from this process's resident memory once the
    /// sessions are built: ONNX Runtime has packed the weights its kernels
    /// read into buffers of its own, and whatever it still reads from the
    /// map faults back in from the page cache.
    pub fn release_pages(&self) {
        // SAFETY: a read-only, file-backed private map: MADV_DONTNEED only
        // drops clean pages, which read back the same from the file.
        if let Err(e) = unsafe { self.map.unchecked_advise(UncheckedAdvice::DontNeed) } {
            log::debug!("madvise(DONTNEED) on {}: {e}", self.path.display());
        }
    }
}

impl Drop for SharedWeights {
    fn drop(&mut self) {
        let api = ort::api();
        for tensor in &self.tensors {
            // SAFETY: created in `open`, owned only here; releasing a value
            // over external data does not free the data.
            unsafe { (api.ReleaseValue)(tensor.value.as_ptr()) };
        }
    }
}

/// The index at the end of the file, checked against the file's length.
fn parse_index(file: &[u8]) -> std::result::Result<Index, String> {
    let len = file.len() as u64;
    if len < 16 || &file[file.len() - 8..] != MAGIC {
        return Err("is not a shared weights file (no EEWEIGHT trailer): rebuild the model".into());
    }
    let mut length = [0u8; 8];
    length.copy_from_slice(&file[file.len() - 16..file.len() - 8]);
    let index_bytes = u64::from_le_bytes(length);
    if index_bytes > MAX_INDEX_BYTES || index_bytes > len - 16 {
        return Err(format!(
            "its index claims {index_bytes} bytes, more than the file or {MAX_INDEX_BYTES} holds"
        ));
    }
    let data_end = len - 16 - index_bytes;
    let text = std::str::from_utf8(&file[data_end as usize..(len - 16) as usize])
        .map_err(|_| "its index is not UTF-8".to_string())?;
    let index: Index =
        serde_json::from_str(text).map_err(|e| format!("its index: {}", crate::error::one_line(&e.to_string())))?;
    for entry in &index.tensors {
        let Some((_, size)) = element(&entry.dtype) else {
            return Err(format!(
                "tensor {:?} has the unknown dtype {:?}",
                entry.name, entry.dtype
            ));
        };
        if entry.shape.len() > MAX_RANK {
            return Err(format!(
                "tensor {:?} has rank {}, over {MAX_RANK}",
                entry.name,
                entry.shape.len()
            ));
        }
        let elements = entry.shape.iter().try_fold(1u64, |n, &d| n.checked_mul(d));
        if elements.and_then(|n| n.checked_mul(size)) != Some(entry.bytes) {
            return Err(format!(
                "tensor {:?}: shape {:?} of {} is not its {} bytes",
                entry.name, entry.shape, entry.dtype, entry.bytes
            ));
        }
        if entry.offset % ALIGN != 0 || entry.offset.checked_add(entry.bytes).is_none_or(|end| end > data_end) {
            return Err(format!(
                "tensor {:?} at {} ({} bytes) is unaligned or past the data's {data_end} bytes",
                entry.name, entry.offset, entry.bytes
            ));
        }
    }
    Ok(index)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(index: &str, data: &[u8]) -> Vec<u8> {
        let mut out = data.to_vec();
        out.extend_from_slice(index.as_bytes());
        out.extend_from_slice(&(index.len() as u64).to_le_bytes());
        out.extend_from_slice(MAGIC);
        out
    }

    #[test]
    fn an_index_is_read_from_the_trailer() {
        let text = r#"{"tensors":[{"name":"w","dtype":"float32","shape":[2,2],"offset":0,"bytes":16}]}"#;
        let index = parse_index(&file(text, &[0; 16])).unwrap();
        assert_eq!(index.tensors.len(), 1);
        assert_eq!(index.tensors[0].name, "w");
    }

    #[test]
    fn a_tensor_outside_the_data_or_of_the_wrong_size_is_refused() {
        let cases = [
            (
                r#"{"tensors":[{"name":"w","dtype":"float32","shape":[2,2],"offset":0,"bytes":16}]}"#,
                8,
                "past the data",
            ),
            (
                r#"{"tensors":[{"name":"w","dtype":"float32","shape":[3],"offset":0,"bytes":16}]}"#,
                16,
                "is not its",
            ),
            (
                r#"{"tensors":[{"name":"w","dtype":"float32","shape":[1],"offset":4,"bytes":4}]}"#,
                16,
                "unaligned",
            ),
            (
                r#"{"tensors":[{"name":"w","dtype":"bfloat8","shape":[1],"offset":0,"bytes":1}]}"#,
                16,
                "unknown dtype",
            ),
            (
                r#"{"tensors":[{"name":"w","dtype":"float32","shape":[4611686018427387904,8],"offset":0,"bytes":0}]}"#,
                16,
                "is not its",
            ),
            (
                r#"{"tensors":[{"name":"w","dtype":"uint8","shape":[8],"offset":18446744073709551552,"bytes":8}]}"#,
                16,
                "past the data",
            ),
        ];
        for (text, data, expected) in cases {
            let err = parse_index(&file(text, &vec![0; data])).map(|_| ()).unwrap_err();
            assert!(err.contains(expected), "{text}: {err}");
            assert!(!err.contains('\n'));
        }
    }

    #[test]
    fn a_file_without_the_trailer_or_with_a_lying_length_is_refused() {
        assert!(parse_index(b"").unwrap_err().contains("EEWEIGHT"));
        assert!(parse_index(&[0; 64]).unwrap_err().contains("EEWEIGHT"));
        let mut lying = file("{}", &[]);
        let n = lying.len();
        lying[n - 16..n - 8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(parse_index(&lying).unwrap_err().contains("claims"));
        let err = parse_index(&file("{\"tensors\":[], \"x\n\":1}", &[]))
            .map(|_| ())
            .unwrap_err();
        assert!(!err.contains('\n'), "{err}");
    }
}
