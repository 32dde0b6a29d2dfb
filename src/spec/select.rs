//! Which cases of a matrix a run takes: `--filter` (case ids containing a substring), then
//! `--partition K/N`, a deterministic share of a matrix, so N CI jobs can run one matrix
//! between them and `peft-compat merge` can join their reports into the single-job report.
//!
//! As cargo-nextest partitions tests: `count:K/N` (or plain `K/N`) takes every N-th case of
//! the (filtered) expansion starting at the K-th, which balances jobs when neighbouring cases
//! cost alike; `hash:K/N` takes the cases whose id hashes to K, which keeps a case in the same
//! partition when others are added or removed. A PEFT build's case follows its tch twin (see
//! `exec::twins`), so their agreement is measured in whichever part runs them.

use super::matrix::Matrix;
use crate::util::fnv1a;
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

/// The cases a run takes, as matrix indices in matrix order.
#[derive(Debug, Clone, PartialEq)]
pub struct Selection {
    pub indices: Vec<usize>,
    /// Cases the filter kept, before partitioning: what the N parts add up to.
    pub before_partition: usize,
    /// `filter=[..] partition=..`: what the results stream's header records, so that a resume
    /// with other flags is refused.
    pub label: String,
}

/// Why a selection is empty.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error(
    "no case id of {matrix} contains any of {filters:?}; `peft-compat list {matrix}` shows the ids"
)]
pub struct NoMatch {
    pub matrix: String,
    pub filters: Vec<String>,
}

/// The cases of `matrix` whose id contains one of `filters` (every case when there is none),
/// then those of them in `partition`.
pub fn select(
    matrix: &Matrix,
    filters: &[String],
    partition: Option<Partition>,
) -> Result<Selection, NoMatch> {
    let mut indices: Vec<usize> = (0..matrix.cases.len())
        .filter(|&i| {
            filters.is_empty() || {
                let id = matrix.cases[i].id();
                filters.iter().any(|f| id.contains(f.as_str()))
            }
        })
        .collect();
    if indices.is_empty() {
        return Err(NoMatch {
            matrix: matrix.path.display().to_string(),
            filters: filters.to_vec(),
        });
    }
    let before_partition = indices.len();
    if let Some(p) = &partition {
        // A PEFT case goes where its tch twin goes, so that each part can measure their
        // agreement and the merged report is the single run's.
        let twins = crate::exec::twins::twin_pairs(matrix, &indices);
        let pos: std::collections::HashMap<usize, usize> =
            indices.iter().enumerate().map(|(n, &i)| (i, n)).collect();
        indices.retain(|i| {
            let anchor = twins.get(i).copied().unwrap_or(*i);
            p.contains(pos[&anchor], &matrix.cases[anchor].id())
        });
    }
    Ok(Selection {
        indices,
        before_partition,
        label: format!(
            "filter={filters:?} partition={}",
            partition.map_or("-".to_string(), |p| p.to_string())
        ),
    })
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

    const MATRIX: &str = "seed: 1
axes: {backend: [tch, candle], device: [cpu], dtype: [f32, f16], adapter: [lora], op: [forward], precision: [native]}
shapes: {s: {batch: 2, in_features: 8, out_features: 4, rank: 2, alpha: 4}}
";

    fn matrix() -> Matrix {
        Matrix::parse(MATRIX, std::path::Path::new("m.yaml"), None).unwrap()
    }

    /// The filter keeps ids containing any substring; the partition then takes its share of
    /// what the filter kept, and the label records both (a resume with other flags is refused).
    #[test]
    fn filter_then_partition() {
        let m = matrix();
        let all = select(&m, &[], None).unwrap();
        assert_eq!(all.indices, vec![0, 1, 2, 3]);
        assert_eq!(all.label, "filter=[] partition=-");
        let f16 = select(&m, &["/f16/".into()], None).unwrap();
        let ids: Vec<String> = f16.indices.iter().map(|&i| m.cases[i].id()).collect();
        assert_eq!(
            ids,
            [
                "tch/cpu/f16/lora/forward/native/s",
                "candle/cpu/f16/lora/forward/native/s"
            ]
        );
        let part = select(&m, &["/f16/".into()], Some("2/2".parse().unwrap())).unwrap();
        assert_eq!(part.indices, vec![f16.indices[1]]);
        assert_eq!(part.before_partition, 2);
        assert_eq!(part.label, "filter=[\"/f16/\"] partition=count:2/2");
        let none = select(&m, &["bf16".into()], None).unwrap_err().to_string();
        assert!(
            none.contains("no case id of m.yaml contains any of [\"bf16\"]"),
            "{none}"
        );
        assert!(none.contains("peft-compat list m.yaml"), "{none}");
    }
}
