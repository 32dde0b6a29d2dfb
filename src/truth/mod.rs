//! What is right. Every case's inputs are [`draws`] from one seeded generator, rounded once into
//! the case dtype; the [`reference`](mod@reference) computes PEFT's formulas in f64 on exactly those rounded
//! values (in plain Rust, sharing no code with the worker kit's math); [`judge`] measures each
//! backend output against it in units of the dtype's roundoff, holds it to the tolerance model
//! and gives the [`crate::outcome::Outcome`].

pub mod draws;
pub mod judge;
pub mod reference;
