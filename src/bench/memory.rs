//! This process's peak resident memory, from Linux's `/proc/self`.

/// `VmHWM` (the peak resident set) of this process, in bytes.
pub(crate) fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_kib_field(&status, "VmHWM:")
}

/// `VmRSS` (the resident set now) of this process, in bytes.
pub(crate) fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_kib_field(&status, "VmRSS:")
}

/// Resets `VmHWM` to the current resident set (`echo 5 > clear_refs`,
/// Linux 4.0 and newer). Returns whether the kernel took it.
pub(crate) fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", b"5").is_ok()
}

fn parse_kib_field(status: &str, field: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: u64 = line[field.len()..].split_whitespace().next()?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status_fields() {
        let status = "Name:\tx\nVmPeak:\t  100 kB\nVmHWM:\t    2048 kB\nVmRSS:\t 1024 kB\n";
        assert_eq!(parse_kib_field(status, "VmHWM:"), Some(2048 * 1024));
        assert_eq!(parse_kib_field(status, "VmSwap:"), None);
    }

    #[test]
    fn reads_and_resets_the_peak() {
        // 128 MiB touched and freed: the peak holds it, a reset forgets it
        // (other tests run beside this one, hence the 64 MiB margin).
        let big = 128usize << 20;
        let buffer = std::hint::black_box(vec![1u8; big]);
        let with_buffer = peak_rss_bytes().unwrap();
        drop(buffer);
        assert!(with_buffer >= big as u64);
        if reset_peak_rss() {
            let after = peak_rss_bytes().unwrap();
            assert!(
                after + (64 << 20) < with_buffer,
                "{after} after the reset, {with_buffer} before"
            );
        }
    }
}
