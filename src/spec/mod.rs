//! What to run. A matrix file is deserialized ([`validate`] locates every error at its line and
//! column), each section checked beside its type, expanded into cases ([`expand`]) and its
//! rules compiled ([`pattern`] for the case patterns every rule shares, [`rules`] for the
//! expectations with their reasons and environment conditions); [`select`] then takes the
//! cases a run asks for (`--filter`, `--partition`).

pub mod expand;
pub mod matrix;
pub mod pattern;
pub mod rules;
pub mod select;
pub mod validate;

pub use matrix::Matrix;
pub use validate::MatrixError;
