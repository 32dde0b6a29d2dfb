//! `peft-compat merge`: the reports of the N `--partition K/N` jobs of one run joined into the
//! report a single job gives.

use super::Report;
use std::collections::BTreeMap;

/// Why partial reports cannot be merged.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MergeError {
    #[error("{0} is not a partial report (it was not run with --partition K/N)")]
    NotPartial(String),
    #[error("{a} and {b} differ in {what}: they are not parts of one run")]
    Differ {
        a: String,
        b: String,
        what: &'static str,
    },
    #[error("case {id} is in both {a} and {b}")]
    Duplicate { id: String, a: String, b: String },
    #[error("{part}: case `{id}` (index {index}) is not what its axes and shape name: {why}")]
    BadCase {
        part: String,
        id: String,
        index: usize,
        why: String,
    },
    #[error("the parts hold {got} of the {want} cases selected: missing {missing}")]
    Incomplete {
        got: usize,
        want: usize,
        missing: String,
    },
}

/// Join the reports of the N partition jobs of one run into the report a single job gives:
/// cases back in matrix order, counts recomputed, the elapsed time of the slowest part.
pub fn merge(parts: Vec<(String, Report)>) -> Result<Report, MergeError> {
    let mut parts = parts.into_iter();
    let (first_name, first) = parts
        .next()
        .ok_or_else(|| MergeError::NotPartial("(no report)".into()))?;
    let info = first
        .partition
        .clone()
        .ok_or_else(|| MergeError::NotPartial(first_name.clone()))?;
    let n_of = |spec: &str| spec.rsplit('/').next().unwrap_or("").to_string();
    let mut specs = BTreeMap::new();
    let mut owner: BTreeMap<String, String> = BTreeMap::new();
    let mut cases = Vec::new();
    let mut elapsed: f64 = 0.0;
    // Each part describes the shapes, dtypes and checkpoints its own cases use: the union.
    let (mut shapes, mut units, mut weights) = (BTreeMap::new(), BTreeMap::new(), BTreeMap::new());
    for (name, r) in std::iter::once((first_name.clone(), first.clone())).chain(parts) {
        let p = r
            .partition
            .clone()
            .ok_or_else(|| MergeError::NotPartial(name.clone()))?;
        let differ = |what| MergeError::Differ {
            a: first_name.clone(),
            b: name.clone(),
            what,
        };
        if r.matrix != first.matrix || r.seed != first.seed || r.matrix_fnv != first.matrix_fnv {
            return Err(differ("matrix or seed"));
        }
        if r.threads != first.threads {
            return Err(differ("--threads"));
        }
        if r.environment.libraries != first.environment.libraries {
            return Err(differ("library versions (use separate reports per build)"));
        }
        if p.selected != info.selected
            || p.filter != info.filter
            || n_of(&p.spec) != n_of(&info.spec)
        {
            return Err(differ("selection (--filter or the N of --partition)"));
        }
        if specs.insert(p.spec.clone(), name.clone()).is_some() {
            return Err(differ("nothing: the same partition was given twice"));
        }
        elapsed = elapsed.max(r.summary.elapsed_s);
        shapes.extend(r.shapes);
        units.extend(r.units);
        weights.extend(r.weights);
        for c in r.cases {
            let id = crate::case::case_id(&crate::case::Coords {
                point: c.point,
                shape: &c.shape,
            });
            if id != c.id {
                return Err(MergeError::BadCase {
                    part: name,
                    why: format!("they give `{id}`"),
                    id: c.id,
                    index: c.index,
                });
            }
            if let Some(prev) = owner.insert(c.id.clone(), name.clone()) {
                return Err(MergeError::Duplicate {
                    id: c.id,
                    a: prev,
                    b: name,
                });
            }
            cases.push(c);
        }
    }
    if cases.len() != info.selected {
        let n: usize = n_of(&info.spec).parse().unwrap_or(0);
        let missing = (1..=n)
            .map(|k| {
                let strategy = info.spec.split(':').next().unwrap_or("count");
                format!("{strategy}:{k}/{n}")
            })
            .filter(|s| !specs.contains_key(s))
            .collect::<Vec<_>>()
            .join(", ");
        return Err(MergeError::Incomplete {
            got: cases.len(),
            want: info.selected,
            missing: if missing.is_empty() {
                "cases from unfinished parts".into()
            } else {
                format!("partitions {missing}")
            },
        });
    }
    cases.sort_by_key(|c| c.index);
    let mut merged = Report::from_cases(
        &first.matrix,
        first.seed,
        first.environment.clone(),
        cases,
        elapsed,
    );
    merged.inactive_expectations = first.inactive_expectations;
    merged.threads = first.threads;
    merged.matrix_fnv = first.matrix_fnv;
    merged.filter = info.filter;
    merged.shapes = shapes;
    merged.units = units;
    merged.weights = weights;
    merged.dump = first.dump;
    Ok(merged)
}
