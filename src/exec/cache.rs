//! Inputs and references, shared by every case that needs them and dropped when none is left.
//!
//! Draws are made once per (shape, layer, profile); the weight is rounded once per dtype of
//! those; inputs and the f64 reference once per (shape, layer, profile, dtype, adapter, op), so
//! every backend and precision path of that key is judged against the very same numbers.
//! The runner dispatches cases grouped by key and counts down each key's remaining cases: when
//! the last one finishes, the entry goes, so memory stays flat however long the matrix is.

use crate::case::{Adapter, Case, DType, Layer, Op, Profile};
use crate::checkpoint::Weights;
use crate::truth::draws::{Draws, Rounded};
use crate::truth::reference;
use crate::worker::io::{Inputs, Outputs};
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, OnceLock};

/// A case's inputs and, computed on first use, its reference outputs and conditioning.
pub struct Prepared {
    pub inputs: Inputs,
    /// A checkpoint layer's case: how many stored weight values the case dtype rounded.
    pub weight_rounded: Option<usize>,
    reference: OnceLock<Result<(Outputs, f64), String>>,
    adapter: Adapter,
    op: Op,
}

impl Prepared {
    /// The f64 reference outputs and the op's conditioning (kappa), computed once; or why the
    /// reference could not be computed (a panic in it: the cases that need it crash, the run
    /// and every other case go on).
    pub fn reference(&self) -> Result<&(Outputs, f64), &str> {
        self.reference
            .get_or_init(|| {
                catch_unwind(AssertUnwindSafe(|| {
                    reference::compute_with_conditioning(self.adapter, self.op, &self.inputs)
                }))
                .map_err(crate::worker::serve::panic_message)
            })
            .as_ref()
            .map_err(String::as_str)
    }
}

type DrawKey = (String, Layer, Profile);
type RoundKey = (DrawKey, DType);
type Key = (DrawKey, DType, Adapter, Op);

fn draw_key(c: &Case) -> DrawKey {
    (c.shape.name.clone(), c.point.layer, c.point.profile)
}

fn round_key(c: &Case) -> RoundKey {
    (draw_key(c), c.point.dtype)
}

fn key(c: &Case) -> Key {
    (draw_key(c), c.point.dtype, c.point.adapter, c.point.op)
}

/// An entry computed once by whichever thread asks first, with the count of cases still to use it.
struct Slot<T> {
    value: Arc<OnceLock<Arc<T>>>,
    remaining: usize,
}

pub struct Cache {
    seed: u64,
    weights: Weights,
    draws: Mutex<HashMap<DrawKey, Slot<Result<Draws, String>>>>,
    rounded: Mutex<HashMap<RoundKey, Slot<Rounded>>>,
    prepared: Mutex<HashMap<Key, Slot<Result<Prepared, String>>>>,
}

/// One more case for `key`'s entry.
fn count<K: std::hash::Hash + Eq, T>(map: &mut HashMap<K, Slot<T>>, key: K) {
    map.entry(key)
        .or_insert_with(|| Slot {
            value: Arc::default(),
            remaining: 0,
        })
        .remaining += 1;
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Cache {
    /// A cache for exactly `cases`: each will `get` once and `release` once. `weights` gives
    /// the checkpoint layers that stand in for shapes.
    pub fn new<'a>(
        seed: u64,
        weights: &Weights,
        cases: impl IntoIterator<Item = &'a Case>,
    ) -> Cache {
        let mut draws: HashMap<DrawKey, Slot<Result<Draws, String>>> = HashMap::new();
        let mut prepared: HashMap<Key, Slot<Result<Prepared, String>>> = HashMap::new();
        let mut rounded: HashMap<RoundKey, Slot<Rounded>> = HashMap::new();
        for c in cases {
            count(&mut rounded, round_key(c));
            count(&mut draws, draw_key(c));
            count(&mut prepared, key(c));
        }
        Cache {
            seed,
            weights: weights.clone(),
            draws: Mutex::new(draws),
            rounded: Mutex::new(rounded),
            prepared: Mutex::new(prepared),
        }
    }

    /// The inputs of `case` (computed by the first caller; others wait for it), or why a
    /// checkpoint's tensors could not be read.
    pub fn get(&self, case: &Case) -> Arc<Result<Prepared, String>> {
        let cell = Arc::clone(
            &lock(&self.prepared)
                .get(&key(case))
                .expect("the cache was made for this case")
                .value,
        );
        Arc::clone(cell.get_or_init(|| {
            let draws = self.draws(case);
            let (dtype, adapter, op) = (case.point.dtype, case.point.adapter, case.point.op);
            Arc::new(match draws.as_ref() {
                Ok(d) => Ok(Prepared {
                    inputs: d.inputs_with(&self.rounded(case, d), adapter, op),
                    weight_rounded: d.weight_rounded(dtype),
                    reference: OnceLock::new(),
                    adapter,
                    op,
                }),
                Err(e) => Err(e.clone()),
            })
        }))
    }

    fn rounded(&self, case: &Case, draws: &Draws) -> Arc<Rounded> {
        let cell = Arc::clone(
            &lock(&self.rounded)
                .get(&round_key(case))
                .expect("the cache was made for this case")
                .value,
        );
        Arc::clone(cell.get_or_init(|| Arc::new(draws.round(case.point.dtype))))
    }

    fn draws(&self, case: &Case) -> Arc<Result<Draws, String>> {
        let cell = Arc::clone(
            &lock(&self.draws)
                .get(&draw_key(case))
                .expect("the cache was made for this case")
                .value,
        );
        Arc::clone(cell.get_or_init(|| {
            Arc::new(match self.weights.layer(&case.shape.name) {
                Some(source) => Draws::from_checkpoint(&case.shape, source, self.seed),
                None => Ok(Draws::generate(
                    &case.shape,
                    case.point.layer,
                    case.point.profile,
                    self.seed,
                )),
            })
        }))
    }

    /// `case` is done with its inputs: drop what no remaining case needs.
    pub fn release(&self, case: &Case) {
        fn down<K: std::hash::Hash + Eq, T>(m: &Mutex<HashMap<K, Slot<T>>>, k: &K) {
            let mut map = lock(m);
            if let Some(slot) = map.get_mut(k) {
                slot.remaining -= 1;
                if slot.remaining == 0 {
                    map.remove(k);
                }
            }
        }
        down(&self.prepared, &key(case));
        down(&self.rounded, &round_key(case));
        down(&self.draws, &draw_key(case));
    }
}
