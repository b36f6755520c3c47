//! How big the cache may be: the device's hard byte budget (`--kv-budget`)
//! and the paper's keep ratio (`--keep`).

use std::str::FromStr;

use crate::error::{Error, Result};

/// `--kv-budget`: bytes (`64MiB`, `1.5GB`, `65536`) or a slot count
/// (`4096tokens`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvBudget {
    Bytes(u64),
    Tokens(usize),
}

impl KvBudget {
    /// The byte budget for a pool whose slot costs `bytes_per_slot`.
    pub fn bytes(self, bytes_per_slot: u64) -> u64 {
        match self {
            KvBudget::Bytes(bytes) => bytes,
            KvBudget::Tokens(tokens) => (tokens as u64).saturating_mul(bytes_per_slot),
        }
    }

    /// The bytes a pool of this budget takes: whole slots of `bytes_per_slot`.
    pub fn pool_bytes(self, bytes_per_slot: u64) -> u64 {
        let bytes = self.bytes(bytes_per_slot);
        match bytes_per_slot {
            0 => bytes,
            per_slot => bytes / per_slot * per_slot,
        }
    }
}

impl std::fmt::Display for KvBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KvBudget::Bytes(b) => write!(f, "{b} bytes"),
            KvBudget::Tokens(t) => write!(f, "{t} tokens"),
        }
    }
}

impl FromStr for KvBudget {
    type Err = Error;

    fn from_str(input: &str) -> Result<Self> {
        let bad = |reason: String| Error::BudgetSyntax {
            input: input.to_string(),
            reason,
        };
        let (number, unit) = split_number(input.trim());
        if matches!(unit.to_ascii_lowercase().as_str(), "tokens" | "token" | "tok" | "slots") {
            let tokens: u64 = match number.parse() {
                Ok(tokens) => tokens,
                Err(_) if !number.is_empty() && number.bytes().all(|b| b.is_ascii_digit()) => u64::MAX,
                Err(_) => return Err(bad("a token count must be a whole number".into())),
            };
            if tokens == 0 {
                return Err(bad("the budget must be at least one token".into()));
            }
            if tokens > MAX_TOKENS {
                return Err(bad(format!(
                    "{number} tokens is more than the largest budget accepted, {MAX_TOKENS} tokens"
                )));
            }
            return Ok(KvBudget::Tokens(tokens as usize));
        }
        parse_bytes(input).map(KvBudget::Bytes).map_err(bad)
    }
}

/// The largest byte count accepted (a typo guard; far above any memory).
pub const MAX_BYTES: u64 = 1 << 50;

/// The largest slot count accepted (positions are 32-bit).
pub const MAX_TOKENS: u64 = u32::MAX as u64;

/// `text` as its number (digits, a decimal point, an exponent: `1.5`,
/// `1e9`) and what follows it.
fn split_number(text: &str) -> (&str, &str) {
    let bytes = text.as_bytes();
    let mut end = bytes.iter().take_while(|b| b.is_ascii_digit() || **b == b'.').count();
    // An exponent only when digits follow it: `1e9`, `2.5E+3`; `1e` is not one.
    if end > 0 && matches!(bytes.get(end), Some(b'e' | b'E')) {
        let mut at = end + 1;
        if matches!(bytes.get(at), Some(b'+' | b'-')) {
            at += 1;
        }
        let digits = bytes[at.min(bytes.len())..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count();
        if digits > 0 {
            end = at + digits;
        }
    }
    let (number, unit) = text.split_at(end);
    (number, unit.trim())
}

/// A byte count: a number and an optional unit (`B`; `k`/`kB`, `M`/`MB`,
/// `G`/`GB`, `T`/`TB`, `P`/`PB` in powers of 1000; `KiB`, `MiB`, `GiB`,
/// `TiB`, `PiB` in powers of 1024; any case), from one byte to
/// [`MAX_BYTES`]. The error is the reason, for the caller to name the value.
pub fn parse_bytes(input: &str) -> std::result::Result<u64, String> {
    let (number, unit) = split_number(input.trim());
    if number.is_empty() {
        return Err("it does not start with a number".into());
    }
    let scale: u64 = match unit.to_ascii_lowercase().as_str() {
        "tokens" | "token" | "tok" | "slots" => {
            return Err("a token count is not a size: give bytes (like 256MiB)".into())
        }
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        "t" | "tb" => 1_000_000_000_000,
        "tib" => 1 << 40,
        "p" | "pb" => 1_000_000_000_000_000,
        "pib" => 1 << 50,
        _ => {
            return Err(format!(
                "unknown unit {unit:?} (use B, kB, MB, GB, TB, KiB, MiB, GiB or TiB)"
            ))
        }
    };
    let value: f64 = number.parse().map_err(|_| format!("{number:?} is not a number"))?;
    let bytes = value * scale as f64;
    if bytes.is_nan() || bytes < 1.0 {
        return Err("it must be at least one byte".into());
    }
    if bytes > MAX_BYTES as f64 {
        return Err(format!(
            "{} bytes is more than the largest accepted, 1 PiB ({MAX_BYTES} bytes)",
            number_of_bytes(bytes)
        ));
    }
    Ok(bytes as u64)
}

/// A large byte count as written in a message: `1e30`, not 31 digits.
fn number_of_bytes(bytes: f64) -> String {
    if bytes < 1e18 {
        format!("{}", bytes as u64)
    } else {
        format!("{bytes:e}")
    }
}

/// The paper's budget: after every step the cache holds about `keep * n`
/// entries, `n` being the tokens processed so far.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KeepRatio(f64);

impl KeepRatio {
    pub const FULL: KeepRatio = KeepRatio(1.0);

    pub fn new(keep: f64) -> Result<Self> {
        if keep > 0.0 && keep <= 1.0 {
            Ok(KeepRatio(keep))
        } else {
            Err(Error::KeepRatio(keep))
        }
    }

    pub fn get(self) -> f64 {
        self.0
    }

    /// How many entries are over budget: `trunc(len - n * keep)`, computed in
    /// f64 and truncated toward zero as the authors' `int()` does; never
    /// negative.
    pub fn excess(self, len: usize, processed: usize) -> usize {
        let excess = (len as f64 - processed as f64 * self.0).trunc();
        if excess > 0.0 {
            excess as usize
        } else {
            0
        }
    }
}

impl FromStr for KeepRatio {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let keep: f64 = s
            .trim()
            .parse()
            .map_err(|_| Error::Policy(format!("keep ratio {s:?} is not a number")))?;
        KeepRatio::new(keep)
    }
}

/// Memory kept free beside the model's files and the pool: activations,
/// ONNX Runtime's arenas and this process.
pub const MEMORY_MARGIN: u64 = 150 << 20;

/// `MemAvailable` from `/proc/meminfo`, in bytes (`None` where there is
/// none: not Linux, or an unreadable /proc).
pub fn memory_available() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib.saturating_mul(1024))
}

/// The largest pool that fits in `available` bytes next to `model_bytes` of
/// model files and [`MEMORY_MARGIN`] (what `doctor` reports).
pub fn largest_budget(available: u64, model_bytes: u64) -> u64 {
    available.saturating_sub(model_bytes.saturating_add(MEMORY_MARGIN))
}

/// Refuses a pool that cannot fit in the memory available now: the pages
/// of an anonymous (or tmpfs-backed) pool are touched as the cache fills,
/// so an oversized budget would fill the machine instead of failing.
/// `budget_bytes` is the pool's size, `model_bytes` the model's files (0
/// once they are loaded and so already out of `MemAvailable`). Passes where
/// the available memory is unknown.
pub fn check_fits_memory(budget_bytes: u64, model_bytes: u64) -> Result<()> {
    let Some(available) = memory_available() else {
        return Ok(());
    };
    let largest = largest_budget(available, model_bytes);
    if budget_bytes <= largest {
        return Ok(());
    }
    Err(Error::BudgetOverMemory {
        budget_bytes,
        available,
        model_bytes,
        largest,
        largest_text: human_bytes(largest),
        available_text: human_bytes(available),
    })
}

/// A byte count for a person: `19.84 GiB`, `512.00 MiB`.
pub fn human_bytes(bytes: u64) -> String {
    const GIB: f64 = (1u64 << 30) as f64;
    const MIB: f64 = (1u64 << 20) as f64;
    if bytes as f64 >= GIB {
        format!("{:.2} GiB", bytes as f64 / GIB)
    } else {
        format!("{:.2} MiB", bytes as f64 / MIB)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sizes_and_tokens() {
        assert_eq!("64MiB".parse::<KvBudget>().unwrap(), KvBudget::Bytes(64 << 20));
        assert_eq!("1.5 GB".parse::<KvBudget>().unwrap(), KvBudget::Bytes(1_500_000_000));
        assert_eq!("512kib".parse::<KvBudget>().unwrap(), KvBudget::Bytes(512 << 10));
        assert_eq!("65536".parse::<KvBudget>().unwrap(), KvBudget::Bytes(65536));
        assert_eq!("4096tokens".parse::<KvBudget>().unwrap(), KvBudget::Tokens(4096));
        assert_eq!(KvBudget::Tokens(10).bytes(80), 800);
    }

    #[test]
    fn rejects_nonsense_budgets() {
        for bad in [
            "",
            "MiB",
            "12XB",
            "0",
            "0tokens",
            "1.5tokens",
            "-3MiB",
            "0.1",
            "1e",
            "NaN",
            "inf",
        ] {
            assert!(bad.parse::<KvBudget>().is_err(), "{bad:?} parsed");
        }
        let err = "12XB".parse::<KvBudget>().unwrap_err().to_string();
        assert!(err.contains("12XB") && err.contains("unknown unit \"XB\""), "{err}");
    }

    #[test]
    fn large_budgets_are_told_they_are_large() {
        assert_eq!("1TiB".parse::<KvBudget>().unwrap(), KvBudget::Bytes(1 << 40));
        assert_eq!("2TB".parse::<KvBudget>().unwrap(), KvBudget::Bytes(2_000_000_000_000));
        assert_eq!("1PiB".parse::<KvBudget>().unwrap(), KvBudget::Bytes(MAX_BYTES));
        assert_eq!("1e9".parse::<KvBudget>().unwrap(), KvBudget::Bytes(1_000_000_000));
        assert_eq!("2.5e3KiB".parse::<KvBudget>().unwrap(), KvBudget::Bytes(2_560_000));
        for (big, said) in [
            ("1e30", "1e30 bytes is more than the largest accepted, 1 PiB"),
            ("1000000000000000000000000000000", "1e30 bytes is more than"),
            ("2PiB", "2251799813685248 bytes is more than"),
            (
                "99999999999999999999999tokens",
                "tokens is more than the largest budget accepted",
            ),
            (
                "5000000000tokens",
                "more than the largest budget accepted, 4294967295 tokens",
            ),
        ] {
            let err = big.parse::<KvBudget>().unwrap_err().to_string();
            assert!(err.contains(said) && !err.contains("at least one"), "{big}: {err}");
        }
        let err = "0.1".parse::<KvBudget>().unwrap_err().to_string();
        assert!(err.contains("at least one byte"), "{err}");
        // The plain size parser says nothing of a KV budget.
        assert_eq!(parse_bytes("256MiB"), Ok(256 << 20));
        assert_eq!(parse_bytes("0"), Err("it must be at least one byte".into()));
        assert!(parse_bytes("10tokens")
            .unwrap_err()
            .contains("a token count is not a size"));
    }

    #[test]
    fn keep_ratio_must_be_in_zero_one() {
        for bad in [0.0, -0.1, 1.01, f64::NAN] {
            assert!(KeepRatio::new(bad).is_err(), "{bad}");
        }
        assert!(KeepRatio::new(1.0).is_ok());
        assert!("abc".parse::<KeepRatio>().is_err());
    }

    #[test]
    fn excess_truncates_like_python_int() {
        let half = KeepRatio::new(0.5).unwrap();
        assert_eq!(half.excess(650, 650), 325);
        assert_eq!(half.excess(326, 651), 0); // 0.5 -> 0
        assert_eq!(half.excess(327, 652), 1);
        assert_eq!(half.excess(10, 100), 0); // negative -> 0
    }
}
