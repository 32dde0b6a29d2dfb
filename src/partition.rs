//! `--partition K/N`: a deterministic share of a matrix, so N CI jobs can run one matrix
//! between them and `peft-compat merge` can join their reports into the single-job report.
//!
//! As cargo-nextest partitions tests: `count:K/N` (or plain `K/N`) takes every N-th case of
//! the (filtered) expansion starting at the K-th, which balances jobs when neighbouring cases
//! cost alike; `hash:K/N` takes the cases whose id hashes to K, which keeps a case in the same
//! partition when others are added or removed.

use serde::{Deserialize, Serialize};
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Strategy {
    #[serde(rename = "count")]
    Count,
    #[serde(rename = "hash")]
    Hash,
}

/// Partition `k` (1-based) of `n`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Partition {
    pub strategy: Strategy,
    pub k: usize,
    pub n: usize,
}

impl fmt::Display for Partition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self.strategy {
            Strategy::Count => "count",
            Strategy::Hash => "hash",
        };
        write!(f, "{s}:{}/{}", self.k, self.n)
    }
}

impl std::str::FromStr for Partition {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let help = "expected K/N, count:K/N or hash:K/N with 1 <= K <= N, e.g. 2/3";
        let (strategy, rest) = match s.split_once(':') {
            None => (Strategy::Count, s),
            Some(("count", r)) => (Strategy::Count, r),
            Some(("hash", r)) => (Strategy::Hash, r),
            Some((other, _)) => return Err(format!("unknown strategy `{other}`: {help}")),
        };
        let (k, n) = rest
            .split_once('/')
            .and_then(|(k, n)| Some((k.trim().parse().ok()?, n.trim().parse().ok()?)))
            .ok_or_else(|| format!("`{s}`: {help}"))?;
        if k == 0 || n == 0 || k > n {
            return Err(format!("`{s}`: {help}"));
        }
        Ok(Partition { strategy, k, n })
    }
}

/// FNV-1a: stable across builds and platforms (std's hasher is not).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

impl Partition {
    /// Whether the case at position `pos` of the selection, with `id`, belongs to this part.
    pub fn contains(&self, pos: usize, id: &str) -> bool {
        let bucket = match self.strategy {
            Strategy::Count => pos % self.n,
            Strategy::Hash => (fnv1a(id.as_bytes()) % self.n as u64) as usize,
        };
        bucket == self.k - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_disjoint_and_cover_everything() {
        let ids: Vec<String> = (0..100).map(|i| format!("case/{i}")).collect();
        for strategy in ["count", "hash"] {
            let mut seen = vec![0; ids.len()];
            for k in 1..=3 {
                let p: Partition = format!("{strategy}:{k}/3").parse().unwrap();
                for (pos, id) in ids.iter().enumerate() {
                    if p.contains(pos, id) {
                        seen[pos] += 1;
                    }
                }
            }
            assert!(seen.iter().all(|&n| n == 1), "{strategy}");
        }
        assert_eq!("2/3".parse::<Partition>().unwrap().to_string(), "count:2/3");
        for bad in ["0/3", "4/3", "x/3", "3", "mod:1/2", "1/0"] {
            assert!(bad.parse::<Partition>().is_err(), "{bad}");
        }
    }
}
