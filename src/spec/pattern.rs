//! Case patterns: the shape of every rule of a matrix file (`exclude`, `include`,
//! `tolerances`, `expectations`): each key given must match, absent keys match anything.

use crate::case::{Adapter, Backend, Coords, DType, Device, Layer, Op, Precision, Profile};
use serde::{Deserialize, Serialize};

/// The values an optional key lists; none when the key is absent.
pub fn values<T>(o: &Option<OneOrMany<T>>) -> &[T] {
    o.as_ref().map_or(&[], OneOrMany::as_slice)
}

/// Whether a pattern's `shape` value names `shape`: the shape itself, or a weights entry
/// (`minilm`) naming every layer of it (`minilm:encoder.layer.0.attention.self.query`).
pub fn shape_matches(pattern: &str, shape: &str) -> bool {
    shape == pattern
        || shape
            .strip_prefix(pattern)
            .is_some_and(|rest| rest.starts_with(':'))
}

/// One axis value or a list of them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T> OneOrMany<T> {
    pub fn as_slice(&self) -> &[T] {
        match self {
            OneOrMany::One(x) => std::slice::from_ref(x),
            OneOrMany::Many(xs) => xs,
        }
    }

    pub fn contains<Q: ?Sized>(&self, v: &Q) -> bool
    where
        T: PartialEq<Q>,
    {
        self.as_slice().iter().any(|x| x == v)
    }
}

/// A case pattern: every key given must match; absent keys match anything.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pattern {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<OneOrMany<Backend>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<OneOrMany<Device>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<OneOrMany<DType>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<OneOrMany<Adapter>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub op: Option<OneOrMany<Op>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precision: Option<OneOrMany<Precision>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer: Option<OneOrMany<Layer>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<OneOrMany<Profile>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shape: Option<OneOrMany<String>>,
}

impl Pattern {
    /// Each key the pattern gives, with the pattern without it: to name the key that leaves a
    /// rule matching nothing.
    pub fn each_key_dropped(&self) -> Vec<(&'static str, Pattern)> {
        let mut out = Vec::new();
        macro_rules! drop_key {
            ($($k:ident),*) => {$(
                if self.$k.is_some() {
                    let mut p = self.clone();
                    p.$k = None;
                    out.push((stringify!($k), p));
                }
            )*};
        }
        drop_key!(backend, device, dtype, adapter, op, precision, layer, profile, shape);
        out
    }

    pub fn matches(&self, c: &Coords) -> bool {
        fn ok<T: PartialEq<Q>, Q: ?Sized>(p: &Option<OneOrMany<T>>, v: &Q) -> bool {
            p.as_ref().is_none_or(|p| p.contains(v))
        }
        let p = &c.point;
        self.backend
            .as_ref()
            .is_none_or(|b| b.as_slice().iter().any(|&b| p.backend.matches(b)))
            && ok(&self.device, &p.device)
            && ok(&self.dtype, &p.dtype)
            && ok(&self.adapter, &p.adapter)
            && ok(&self.op, &p.op)
            && ok(&self.precision, &p.precision)
            && ok(&self.layer, &p.layer)
            && ok(&self.profile, &p.profile)
            && self
                .shape
                .as_ref()
                .is_none_or(|s| s.as_slice().iter().any(|s| shape_matches(s, c.shape)))
    }
}
