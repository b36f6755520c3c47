//! The token-embedding table, memory-mapped and indexed directly: a
//! `[vocab, hidden]` little-endian table in the decoder's dtype. Looking up
//! a token is a row copy; nothing is loaded into the heap.

use std::path::Path;

use memmap2::Mmap;

use crate::error::{Error, Result};
use crate::kv::{KvDtype, KvElement};

pub struct Embeddings {
    map: Mmap,
    vocab: usize,
    hidden: usize,
    dtype: KvDtype,
}

impl Embeddings {
    pub fn open(path: &Path, vocab: usize, hidden: usize, dtype: KvDtype) -> Result<Self> {
        let file_error = |reason: String| Error::ModelFile {
            path: path.to_path_buf(),
            reason,
        };
        let (file, meta) = crate::regular_file::open(path).map_err(|e| file_error(format!("cannot open: {e}")))?;
        let expected = (vocab as u64)
            .checked_mul(hidden as u64)
            .and_then(|n| n.checked_mul(dtype.size() as u64))
            .ok_or_else(|| file_error(format!("a [{vocab}, {hidden}] table overflows")))?;
        let actual = meta.len();
        if actual != expected {
            return Err(file_error(format!(
                "{actual} bytes, a [{vocab}, {hidden}] {} table has {expected}",
                dtype.name()
            )));
        }
        // SAFETY: the file is opened read-only and the model folder is not
        // written while a process uses it; a concurrent writer could change
        // embedding values, not break memory safety of these plain numbers.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| file_error(format!("cannot map: {e}")))?;
        Ok(Embeddings {
            map,
            vocab,
            hidden,
            dtype,
        })
    }

    pub fn hidden(&self) -> usize {
        self.hidden
    }

    /// Copies the rows of `ids` into `out` (`ids.len() * hidden` elements).
    pub fn gather<E: KvElement>(&self, ids: &[u32], out: &mut [E]) -> Result<()> {
        if E::DTYPE != self.dtype {
            return Err(Error::DtypeMismatch {
                pool: self.dtype.name(),
                asked: E::DTYPE.name(),
            });
        }
        if out.len() != ids.len() * self.hidden {
            return Err(Error::Shape(format!(
                "embedding output of {} elements for {} tokens of {}",
                out.len(),
                ids.len(),
                self.hidden
            )));
        }
        let table: &[E] = bytemuck::try_cast_slice(&self.map[..]).map_err(|e| Error::Shape(e.to_string()))?;
        for (&id, row) in ids.iter().zip(out.chunks_exact_mut(self.hidden)) {
            let id = id as usize;
            if id >= self.vocab {
                return Err(Error::Shape(format!(
                    "token id {id} is outside the vocabulary of {}",
                    self.vocab
                )));
            }
            row.copy_from_slice(&table[id * self.hidden..(id + 1) * self.hidden]);
        }
        Ok(())
    }
}
