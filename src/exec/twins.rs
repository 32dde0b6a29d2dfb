//! Twins: a PEFT build's case and the `tch` build's case on the same libtorch (same device,
//! dtype, adapter, op, path, layer, profile and shape, hence the same inputs). PEFT's own code
//! and our restatement of it then run the same kernels on the same numbers, so their outputs
//! should agree to a unit of roundoff; the PEFT case's report carries how far apart they are
//! (`agreement`), and the gate holds that figure like an error.
//!
//! The dispatcher hands every finished case here: a tch case's outputs are kept until its PEFT
//! twins finish (dispatch groups cases by inputs, so that is soon), a PEFT case finished first
//! is held until its twin does. Nothing else is kept.

use super::runner::CaseResult;
use crate::case::{Backend, Point};
use crate::outcome::Agreement;
use crate::spec::Matrix;
use crate::truth::judge::agreement_units;
use crate::worker::io::Outputs;
use std::collections::HashMap;

pub struct Twins {
    /// PEFT case -> its tch twin (both in this run).
    twin_of: HashMap<usize, usize>,
    /// tch case -> its PEFT twins that have not finished.
    waiting: HashMap<usize, Vec<usize>>,
    /// Finished tch cases with waiting twins: id and outputs.
    kept: HashMap<usize, (String, Option<Outputs>)>,
    /// Finished PEFT cases whose twin has not: the result and its outputs.
    held: HashMap<usize, (CaseResult, Option<Outputs>)>,
}

impl Twins {
    /// Pair the cases of `to_run`.
    pub fn new(matrix: &Matrix, to_run: &[usize]) -> Twins {
        let twin_of = twin_pairs(matrix, to_run);
        let mut waiting: HashMap<usize, Vec<usize>> = HashMap::new();
        for (&p, &t) in &twin_of {
            waiting.entry(t).or_default().push(p);
        }
        Twins {
            twin_of,
            waiting,
            kept: HashMap::new(),
            held: HashMap::new(),
        }
    }

    /// Every case with a twin in this run (a PEFT case, or the tch case it is paired with):
    /// their outputs are kept whole until both are judged.
    pub fn cases(&self) -> std::collections::HashSet<usize> {
        self.twin_of.iter().flat_map(|(&p, &t)| [p, t]).collect()
    }

    /// A case finished: the results to report now (its own, and any twin it releases).
    pub fn finished(&mut self, mut r: CaseResult) -> Vec<CaseResult> {
        let outputs = r.outputs.take();
        if let Some(&t) = self.twin_of.get(&r.index) {
            let Some((id, twin)) = self.kept.get(&t) else {
                self.held.insert(r.index, (r, outputs));
                return vec![];
            };
            attach(&mut r, outputs.as_ref(), id, twin.as_ref());
            self.release(t, r.index);
            return vec![r];
        }
        let Some(twins) = self.waiting.get(&r.index).cloned() else {
            return vec![r];
        };
        let id = r.case.id();
        let mut out = vec![];
        for p in twins {
            if let Some((mut pr, pout)) = self.held.remove(&p) {
                attach(&mut pr, pout.as_ref(), &id, outputs.as_ref());
                out.push(pr);
                self.release(r.index, p);
            }
        }
        if self.waiting.contains_key(&r.index) {
            self.kept.insert(r.index, (id, outputs));
        }
        out.insert(0, r);
        out
    }

    /// PEFT cases still held when the run ends (their twin was stopped): reported without an
    /// agreement, in matrix order.
    pub fn unpaired(&mut self) -> Vec<CaseResult> {
        let mut v: Vec<CaseResult> = self.held.drain().map(|(_, (r, _))| r).collect();
        v.sort_by_key(|r| r.index);
        v
    }

    /// PEFT case `peft` has its agreement: its tch twin's outputs go once no twin waits.
    fn release(&mut self, tch: usize, peft: usize) {
        if let Some(w) = self.waiting.get_mut(&tch) {
            w.retain(|&p| p != peft);
            if w.is_empty() {
                self.waiting.remove(&tch);
                self.kept.remove(&tch);
            }
        }
    }
}

/// PEFT case -> its tch twin, among `indices` (matrix positions).
pub fn twin_pairs(matrix: &Matrix, indices: &[usize]) -> HashMap<usize, usize> {
    let tch: HashMap<(Point, &str), usize> = indices
        .iter()
        .map(|&i| (i, &matrix.cases[i]))
        .filter(|(_, c)| c.point.backend.family() == Backend::Tch)
        .map(|(i, c)| ((c.point, c.shape.name.as_str()), i))
        .collect();
    indices
        .iter()
        .filter_map(|&i| {
            let c = &matrix.cases[i];
            let j = *tch.get(&(c.twin_point()?, c.shape.name.as_str()))?;
            Some((i, j))
        })
        .collect()
}

fn attach(r: &mut CaseResult, got: Option<&Outputs>, id: &str, twin: Option<&Outputs>) {
    if let (Some(g), Some(t)) = (got, twin) {
        r.agreement = agreement_units(g, t, r.case.point.dtype).map(|max_u| Agreement {
            with: id.to_string(),
            max_u,
        });
    }
}
