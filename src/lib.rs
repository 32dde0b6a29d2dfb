//! peft-compat: which combinations of backend x device x dtype x adapter x operation work for
//! LoRA and DoRA adapters, measured for real against a float64 reference.
//!
//! The pipeline, one stage per folder, data flowing one way: a matrix file ([`spec`]) expands
//! into [`case`]s (a [`checkpoint`]'s real layers standing in for shapes where it names one);
//! [`exec`] plans and dispatches them to backend [`worker`] processes (one per
//! backend build, each running the LoRA/DoRA math written once in the worker kit) and collects
//! their outputs; [`truth`] draws the inputs, computes the f64 reference from the same rounded
//! values and judges each output into an [`outcome`]; the outcomes become the [`report`] (also
//! streamed line by line, for `--resume`); [`verdict`] says what the report means (the matrix's
//! expectations, the accepted snapshot and the CI gate, recorded rules, comparisons); [`render`]
//! shows it (tables, Markdown, JUnit, progress); [`cli`] is the front door. [`environment`]
//! says where a run happened; [`util`] holds the small helpers every stage shares.

/// The backend side of the process boundary: the worker kit (`workers/kit`).
pub use peft_compat_kit as worker;
/// The vocabulary: axes, [`case::Point`], [`case::Shape`], [`case::Case`] and case ids (defined
/// in the worker kit, which every worker links).
pub use peft_compat_kit::case;

pub mod checkpoint;
pub mod cli;
pub mod environment;
pub mod exec;
pub mod outcome;
pub mod render;
pub mod report;
pub mod spec;
pub mod truth;
pub mod util;
pub mod verdict;
