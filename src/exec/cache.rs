//! Inputs and references, shared by every case that needs them and dropped when none is left.
//!
//! Draws are made once per (shape, layer, profile); inputs and the f64 reference once per (shape,
//! layer, profile, dtype, adapter, op), so every backend and precision path of that key is judged against the very same numbers.
//! The runner dispatches cases grouped by key and counts down each key's remaining cases: when
//! the last one finishes, the entry goes, so memory stays flat however long the matrix is.

use crate::case::{Adapter, Case, DType, Layer, Op, Profile};
use crate::truth::draws::Draws;
use crate::truth::reference;
use crate::worker::io::{Inputs, Outputs};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// A case's inputs and, computed on first use, its reference outputs and conditioning.
pub struct Prepared {
    pub inputs: Inputs,
    reference: OnceLock<(Outputs, f64)>,
    adapter: Adapter,
    op: Op,
}

impl Prepared {
    /// The f64 reference outputs and the op's conditioning (kappa), computed once.
    pub fn reference(&self) -> &(Outputs, f64) {
        self.reference.get_or_init(|| {
            reference::compute_with_conditioning(self.adapter, self.op, &self.inputs)
        })
    }
}

type DrawKey = (String, Layer, Profile);
type Key = (DrawKey, DType, Adapter, Op);

fn draw_key(c: &Case) -> DrawKey {
    (c.shape.name.clone(), c.point.layer, c.point.profile)
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
    draws: Mutex<HashMap<DrawKey, Slot<Draws>>>,
    prepared: Mutex<HashMap<Key, Slot<Prepared>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Cache {
    /// A cache for exactly `cases`: each will `get` once and `release` once.
    pub fn new<'a>(seed: u64, cases: impl IntoIterator<Item = &'a Case>) -> Cache {
        let mut draws: HashMap<DrawKey, Slot<Draws>> = HashMap::new();
        let mut prepared: HashMap<Key, Slot<Prepared>> = HashMap::new();
        for c in cases {
            draws
                .entry(draw_key(c))
                .or_insert_with(|| Slot {
                    value: Arc::default(),
                    remaining: 0,
                })
                .remaining += 1;
            prepared
                .entry(key(c))
                .or_insert_with(|| Slot {
                    value: Arc::default(),
                    remaining: 0,
                })
                .remaining += 1;
        }
        Cache {
            seed,
            draws: Mutex::new(draws),
            prepared: Mutex::new(prepared),
        }
    }

    /// The inputs of `case` (computed by the first caller; others wait for it).
    pub fn get(&self, case: &Case) -> Arc<Prepared> {
        let cell = Arc::clone(
            &lock(&self.prepared)
                .get(&key(case))
                .expect("the cache was made for this case")
                .value,
        );
        Arc::clone(cell.get_or_init(|| {
            let draws = self.draws(case);
            Arc::new(Prepared {
                inputs: draws.inputs(case.point.dtype, case.point.adapter, case.point.op),
                reference: OnceLock::new(),
                adapter: case.point.adapter,
                op: case.point.op,
            })
        }))
    }

    fn draws(&self, case: &Case) -> Arc<Draws> {
        let cell = Arc::clone(
            &lock(&self.draws)
                .get(&draw_key(case))
                .expect("the cache was made for this case")
                .value,
        );
        Arc::clone(cell.get_or_init(|| {
            Arc::new(Draws::generate(
                &case.shape,
                case.point.layer,
                case.point.profile,
                self.seed,
            ))
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
        down(&self.draws, &draw_key(case));
    }
}
