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
        let bad = |reason: &str| Error::BudgetSyntax {
            input: input.to_string(),
            reason: reason.to_string(),
        };
        let text = input.trim();
        let split = text
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        if number.is_empty() {
            return Err(bad("it does not start with a number"));
        }
        let unit = unit.trim().to_ascii_lowercase();
        if matches!(unit.as_str(), "tokens" | "token" | "tok" | "slots") {
            let tokens: usize = number
                .parse()
                .map_err(|_| bad("a token count must be a whole number"))?;
            if tokens == 0 {
                return Err(bad("the budget must be positive"));
            }
            return Ok(KvBudget::Tokens(tokens));
        }
        let scale: u64 = match unit.as_str() {
            "" | "b" => 1,
            "k" | "kb" => 1_000,
            "kib" => 1 << 10,
            "m" | "mb" => 1_000_000,
            "mib" => 1 << 20,
            "g" | "gb" => 1_000_000_000,
            "gib" => 1 << 30,
            _ => return Err(bad("unknown unit")),
        };
        let value: f64 = number.parse().map_err(|_| bad("not a number"))?;
        let bytes = value * scale as f64;
        if bytes.is_nan() || bytes < 1.0 || bytes > u64::MAX as f64 {
            return Err(bad("the budget must be at least one byte"));
        }
        Ok(KvBudget::Bytes(bytes as u64))
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
        for bad in ["", "MiB", "12XB", "0", "0tokens", "1.5tokens", "-3MiB", "0.1"] {
            assert!(bad.parse::<KvBudget>().is_err(), "{bad:?} parsed");
        }
        let err = "12XB".parse::<KvBudget>().unwrap_err().to_string();
        assert!(err.contains("12XB") && err.contains("unknown unit"), "{err}");
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
