//! peft-compat: which combinations of backend x device x dtype x adapter x operation work for
//! LoRA and DoRA adapters, measured for real against a float64 reference.
//!
//! Data flows one way: [`matrix`] -> [`case`]s -> [`runner`] (which hands each case to a
//! backend [`worker`] process running the [`adapter`] math over its [`backend`] ops, and judges
//! the outputs against [`reference`] with [`judge`]) -> [`stream`]ed results -> [`report`] (with
//! the matrix's [`expect`]ations judged) -> [`render`] (table, Markdown, JUnit), JSON, a
//! [`snapshot`], a [`gate`] verdict, or [`record`]ed expectations.

pub mod adapter;
pub mod backend;
pub mod case;
pub mod cli;
pub mod compare;
pub mod dump;
pub mod environment;
pub mod expect;
pub mod gate;
pub mod guard;
pub mod inputs;
pub mod judge;
pub mod matrix;
pub mod partition;
pub mod progress;
pub mod record;
pub mod reference;
pub mod render;
pub mod report;
pub mod runner;
pub mod snapshot;
pub mod stream;
pub mod worker;
