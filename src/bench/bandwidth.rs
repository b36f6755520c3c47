//! This machine's streaming-read bandwidth: the floor under a decode step,
//! which must read every weight it multiplies and every live K/V entry.
//!
//! A buffer much larger than the last-level cache is summed by `threads`
//! threads, each over its own contiguous share, several times; the best
//! pass counts (the others lost time to whatever else the machine ran).

use std::time::Instant;

use crate::error::{Error, Result};

/// One measurement.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Bandwidth {
    /// Bytes read per second in the best pass.
    pub bytes_per_s: f64,
    /// Size of the buffer read.
    pub buffer_bytes: u64,
    /// The last-level cache, when the kernel reports it.
    pub llc_bytes: Option<u64>,
    pub threads: usize,
    pub passes: usize,
    /// The median pass, for how noisy the machine was.
    pub median_bytes_per_s: f64,
}

/// The default buffer: 16 times the last-level cache, at least 256 MiB.
pub fn default_buffer_bytes() -> u64 {
    let floor = 256u64 << 20;
    last_level_cache_bytes().map_or(floor, |llc| (16 * llc).max(floor))
}

/// Size of the highest-level data or unified cache of CPU 0, from sysfs.
pub fn last_level_cache_bytes() -> Option<u64> {
    let mut best: Option<(u32, u64)> = None;
    for index in 0..8 {
        let dir = format!("/sys/devices/system/cpu/cpu0/cache/index{index}");
        let Ok(kind) = std::fs::read_to_string(format!("{dir}/type")) else {
            continue;
        };
        if kind.trim() == "Instruction" {
            continue;
        }
        let level = std::fs::read_to_string(format!("{dir}/level"))
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok());
        let size = std::fs::read_to_string(format!("{dir}/size"))
            .ok()
            .and_then(|s| parse_cache_size(s.trim()));
        if let (Some(level), Some(size)) = (level, size) {
            if best.is_none_or(|(l, _)| level > l) {
                best = Some((level, size));
            }
        }
    }
    best.map(|(_, size)| size)
}

/// sysfs cache sizes: `32768K`, `2M`, or plain bytes.
fn parse_cache_size(text: &str) -> Option<u64> {
    let (number, scale) = match text.as_bytes().last()? {
        b'K' => (&text[..text.len() - 1], 1u64 << 10),
        b'M' => (&text[..text.len() - 1], 1 << 20),
        b'G' => (&text[..text.len() - 1], 1 << 30),
        _ => (text, 1),
    };
    number.parse::<u64>().ok().map(|n| n * scale)
}

/// Reads a `buffer_bytes` buffer `passes` times with `threads` threads.
pub fn measure(buffer_bytes: u64, threads: usize, passes: usize) -> Result<Bandwidth> {
    let threads = threads.max(1);
    let passes = passes.max(1);
    let words = usize::try_from(buffer_bytes / 8)
        .map_err(|_| Error::Shape(format!("a bandwidth buffer of {buffer_bytes} bytes is too large")))?;
    if words < threads * 1024 {
        return Err(Error::Shape(format!(
            "a bandwidth buffer of {buffer_bytes} bytes is too small for {threads} threads (at least {} bytes)",
            threads * 1024 * 8
        )));
    }
    let mut buffer: Vec<u64> = Vec::new();
    buffer.try_reserve_exact(words).map_err(|_| Error::PoolAlloc {
        bytes: buffer_bytes,
        source: std::io::Error::from(std::io::ErrorKind::OutOfMemory),
    })?;
    buffer.resize(words, 0);
    let share = words.div_ceil(threads);
    // Each thread writes its own share first, so its pages are faulted in
    // (and, on a NUMA machine, placed) by the thread that reads them.
    std::thread::scope(|scope| {
        for (t, chunk) in buffer.chunks_mut(share).enumerate() {
            scope.spawn(move || {
                for (i, w) in chunk.iter_mut().enumerate() {
                    *w = (t * share + i) as u64;
                }
            });
        }
    });
    let bytes = (words * 8) as f64;
    let mut rates = Vec::with_capacity(passes);
    let mut check = 0u64;
    for _ in 0..passes {
        let start = Instant::now();
        let sum = std::thread::scope(|scope| {
            let handles: Vec<_> = buffer
                .chunks(share)
                .map(|chunk| scope.spawn(move || sum_words(chunk)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or(0))
                .fold(0u64, u64::wrapping_add)
        });
        let seconds = start.elapsed().as_secs_f64();
        check = check.wrapping_add(std::hint::black_box(sum));
        rates.push(bytes / seconds);
    }
    std::hint::black_box(check);
    rates.sort_by(f64::total_cmp);
    Ok(Bandwidth {
        bytes_per_s: rates[rates.len() - 1],
        buffer_bytes: (words * 8) as u64,
        llc_bytes: last_level_cache_bytes(),
        threads,
        passes,
        median_bytes_per_s: rates[rates.len() / 2],
    })
}

/// Sums with eight independent accumulators, so the adds keep up with the
/// loads and the compiler can use vector registers.
fn sum_words(words: &[u64]) -> u64 {
    let mut acc = [0u64; 8];
    let mut chunks = words.chunks_exact(8);
    for c in &mut chunks {
        for (a, &w) in acc.iter_mut().zip(c) {
            *a = a.wrapping_add(w);
        }
    }
    let tail = chunks.remainder().iter().fold(0u64, |a, &w| a.wrapping_add(w));
    acc.iter().fold(tail, |a, &w| a.wrapping_add(w))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_every_word() {
        let words: Vec<u64> = (0..1003).collect();
        assert_eq!(sum_words(&words), 1002 * 1003 / 2);
    }

    #[test]
    fn parses_sysfs_sizes() {
        assert_eq!(parse_cache_size("32768K"), Some(32 << 20));
        assert_eq!(parse_cache_size("2M"), Some(2 << 20));
        assert_eq!(parse_cache_size("512"), Some(512));
        assert_eq!(parse_cache_size("x"), None);
    }

    #[test]
    fn measures_a_small_buffer() {
        let bw = measure(4 << 20, 2, 3).unwrap();
        assert!(bw.bytes_per_s > 0.0 && bw.bytes_per_s >= bw.median_bytes_per_s);
        assert_eq!(bw.buffer_bytes, 4 << 20);
        assert!(measure(1024, 2, 1).is_err());
    }
}
