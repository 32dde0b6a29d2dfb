//! Expansion: the `axes:` section times the shapes, less `exclude`, plus `include`, into the
//! matrix's cases (each id once, in table order).

use super::pattern::{shape_matches, values, OneOrMany, Pattern};
use super::validate::{help_axes, MatrixError, Source};
use crate::case::{
    Adapter, Backend, Case, DType, Device, Layer, Op, Point, Precision, Profile, Shape,
};
use crate::checkpoint::Pin;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;

/// The `axes:` section: every combination of these values (with every shape) is a candidate
/// case.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Axes {
    pub backend: Vec<Backend>,
    pub device: Vec<Device>,
    pub dtype: Vec<DType>,
    pub adapter: Vec<Adapter>,
    pub op: Vec<Op>,
    pub precision: Vec<Precision>,
    #[serde(default = "linear_only")]
    pub layer: Vec<Layer>,
    #[serde(default = "normal_only")]
    pub profile: Vec<Profile>,
}

fn linear_only() -> Vec<Layer> {
    vec![Layer::Linear]
}

fn normal_only() -> Vec<Profile> {
    vec![Profile::Normal]
}

impl Axes {
    /// Every axis lists at least one value.
    pub fn check(&self, src: &Source) -> Result<(), MatrixError> {
        let p = self.product();
        let empty = Point::AXES
            .iter()
            .zip(p.sizes_by_name())
            .find(|(_, n)| *n == 0);
        match empty {
            Some((name, _)) => Err(src.error_at(
                &format!("{name}:"),
                format!("axis `{name}` is empty"),
                help_axes(),
            )),
            None => Ok(()),
        }
    }

    fn product(&self) -> Product<'_> {
        Product {
            backend: &self.backend,
            device: &self.device,
            dtype: &self.dtype,
            adapter: &self.adapter,
            op: &self.op,
            precision: &self.precision,
            layer: &self.layer,
            profile: &self.profile,
        }
    }
}

/// Lists of axis values whose every combination (with every shape) is a candidate case.
#[derive(Clone, Copy)]
struct Product<'a> {
    backend: &'a [Backend],
    device: &'a [Device],
    dtype: &'a [DType],
    adapter: &'a [Adapter],
    op: &'a [Op],
    precision: &'a [Precision],
    layer: &'a [Layer],
    profile: &'a [Profile],
}

/// A checkpoint layer's fixed axis values, as slices a [`Product`] can borrow.
struct Pinned {
    layer: [Layer; 1],
    profile: [Profile; 1],
    adapter: Option<[Adapter; 1]>,
}

impl Pinned {
    fn new(pin: Pin) -> Pinned {
        Pinned {
            layer: [pin.layer],
            profile: [Profile::Normal],
            adapter: pin.adapter.map(|a| [a]),
        }
    }
}

impl<'a> Product<'a> {
    /// The product for a checkpoint layer: its layer kind, the `normal` profile (profiles
    /// reshape drawn weights; a checkpoint's are its own) and, with a saved adapter, its
    /// adapter.
    fn pinned(&self, p: &'a Pinned) -> Product<'a> {
        Product {
            layer: &p.layer,
            profile: &p.profile,
            adapter: p.adapter.as_ref().map_or(self.adapter, |a| a.as_slice()),
            ..*self
        }
    }
}

impl Product<'_> {
    /// Each axis's number of values in [`Point::AXES`] order.
    fn sizes_by_name(&self) -> [usize; 8] {
        [
            self.backend.len(),
            self.device.len(),
            self.dtype.len(),
            self.adapter.len(),
            self.op.len(),
            self.precision.len(),
            self.layer.len(),
            self.profile.len(),
        ]
    }

    /// Each axis's number of values, outermost (slowest-varying) first, in table order.
    fn sizes(&self) -> [usize; 8] {
        [
            self.backend.len(),
            self.device.len(),
            self.dtype.len(),
            self.layer.len(),
            self.profile.len(),
            self.adapter.len(),
            self.op.len(),
            self.precision.len(),
        ]
    }

    fn len(&self) -> usize {
        self.sizes()
            .iter()
            .try_fold(1usize, |acc, &n| acc.checked_mul(n))
            .unwrap_or(usize::MAX)
    }

    /// Every combination for `shape`, in table order (the last axis varies fastest), without
    /// the ones that are not cases ([`Case::not_a_case`]).
    fn for_each(&self, shape: &Shape, f: &mut dyn FnMut(Case)) {
        let sizes = self.sizes();
        if sizes.contains(&0) {
            return;
        }
        let mut at = [0usize; 8];
        loop {
            let case = Case {
                point: Point {
                    backend: self.backend[at[0]],
                    device: self.device[at[1]],
                    dtype: self.dtype[at[2]],
                    layer: self.layer[at[3]],
                    profile: self.profile[at[4]],
                    adapter: self.adapter[at[5]],
                    op: self.op[at[6]],
                    precision: self.precision[at[7]],
                },
                shape: shape.clone(),
            };
            if case.not_a_case().is_none() {
                f(case);
            }
            // Advance like an odometer; done when the outermost axis rolls over.
            let mut axis = sizes.len();
            loop {
                if axis == 0 {
                    return;
                }
                axis -= 1;
                at[axis] += 1;
                if at[axis] < sizes[axis] {
                    break;
                }
                at[axis] = 0;
            }
        }
    }
}

/// An include entry adds combinations, so it names every axis but `layer` and `profile`
/// (which default to the `axes:` lists) and `shape` (every shape).
pub fn check_includes(include: &[Pattern], src: &Source) -> Result<(), MatrixError> {
    for (i, p) in include.iter().enumerate() {
        let missing: Vec<&str> = [
            ("backend", p.backend.is_none()),
            ("device", p.device.is_none()),
            ("dtype", p.dtype.is_none()),
            ("adapter", p.adapter.is_none()),
            ("op", p.op.is_none()),
            ("precision", p.precision.is_none()),
        ]
        .into_iter()
        .filter_map(|(n, m)| m.then_some(n))
        .collect();
        if !missing.is_empty() {
            return Err(src.error_at(
                "include:",
                format!("include entry {} does not name {}", i + 1, missing.join(", ")),
                "an include entry adds combinations, so it names every axis (values may be lists); `shape` is optional",
            ));
        }
    }
    Ok(())
}

/// What the matrix expands to: the product of `axes` per shape without the `exclude`d
/// combinations, then the `include`d ones; each case id once, at most `limit` cases. `pins`
/// says what a checkpoint layer's cases hold fixed.
pub fn expand(
    axes: &Axes,
    shapes: &[Shape],
    pins: &dyn Fn(&str) -> Option<Pin>,
    exclude: &[Pattern],
    include: &[Pattern],
    limit: usize,
    src: &Source,
) -> Result<Vec<Case>, MatrixError> {
    let product = axes.product();
    let full = product.len().saturating_mul(shapes.len());
    let too_many = |count: usize, when: &str| {
        src.error_at(
            "axes:",
            format!("the matrix expands to {count} cases{when}, over the limit of {limit}"),
            "narrow the axes or shapes, add exclude rules, or raise the limit with `max_cases:` or --max-cases",
        )
    };
    // Expanding is linear in the full product; refuse absurd products before walking them.
    if full / 100 > limit {
        return Err(too_many(full, " before exclude rules"));
    }
    let mut cases = Vec::new();
    let mut seen = HashSet::new();
    let mut push = |case: Case, cases: &mut Vec<Case>| {
        if seen.insert(case.id()) {
            cases.push(case);
        }
    };
    let each = |p: &Product, shape: &Shape, f: &mut dyn FnMut(Case)| match pins(&shape.name) {
        Some(pin) => {
            let pinned = Pinned::new(pin);
            p.pinned(&pinned).for_each(shape, f)
        }
        None => p.for_each(shape, f),
    };
    for shape in shapes {
        each(&product, shape, &mut |case| {
            if !exclude.iter().any(|p| p.matches(&case.coords())) {
                push(case, &mut cases);
            }
        });
    }
    for p in include {
        let included = Product {
            backend: values(&p.backend),
            device: values(&p.device),
            dtype: values(&p.dtype),
            adapter: values(&p.adapter),
            op: values(&p.op),
            precision: values(&p.precision),
            layer: p.layer.as_ref().map_or(&axes.layer, OneOrMany::as_slice),
            profile: p
                .profile
                .as_ref()
                .map_or(&axes.profile, OneOrMany::as_slice),
        };
        for shape in shapes.iter().filter(|s| {
            p.shape
                .as_ref()
                .is_none_or(|n| n.as_slice().iter().any(|n| shape_matches(n, &s.name)))
        }) {
            each(&included, shape, &mut |case| push(case, &mut cases));
        }
    }
    if cases.len() > limit {
        return Err(too_many(cases.len(), ""));
    }
    if cases.is_empty() {
        return Err(nothing_left(axes, src));
    }
    Ok(cases)
}

/// Why a matrix expands to no case at all. PiSSA/OLoRA combinations that are not cases
/// (`Case::not_a_case`) can empty a matrix before any exclude rule does: say so, not "the
/// exclude rules".
fn nothing_left(axes: &Axes, src: &Source) -> MatrixError {
    let data_init_only = axes.adapter.iter().all(|a| a.is_data_init());
    let no_init = !axes.op.iter().any(|o| matches!(o, Op::Init | Op::InitNoop));
    let no_linear = !axes.layer.contains(&Layer::Linear);
    if data_init_only && (no_init || no_linear) {
        return src.error_at(
            "adapter:",
            "no combination of the axes is a case",
            "pissa, pissa_dora and olora run `init` and `init_noop` on `linear` layers only (once \
             initialised they are LoRA/DoRA adapters): add those values, or lora/dora",
        );
    }
    src.error_at(
        "exclude:",
        "the exclude rules remove every case",
        "loosen the exclude rules",
    )
}
