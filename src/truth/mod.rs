//! What is right. Every case's inputs are [`draws`] from one seeded generator, rounded once into
//! the case dtype; the [`reference`](mod@reference) computes PEFT's formulas in f64 on exactly those rounded
//! values (in plain Rust, sharing no code with the worker kit's math); [`judge`] measures each
//! backend output against it in units of the dtype's roundoff, holds it to the tolerance model
//! and gives the [`crate::outcome::Outcome`]. All three split LLM-sized work over the cores
//! ([`parallel`], shared with the workers) without their results depending on how many.

pub mod draws;
pub mod judge;
pub mod reference;

pub use crate::worker::parallel;
