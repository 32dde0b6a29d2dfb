//! peft-compat's worker kit: the backend side of the process boundary, and all that the backend
//! workers (`workers/tch`, `workers/candle`, `workers/tch-2.1`) link.
//!
//! A worker receives a [`case`] and its inputs ([`io`], [`tensor`]) over the [`protocol`], runs
//! the LoRA/DoRA math of [`adapter`] (written once) over its library's [`ops`], and answers from
//! the loop in [`serve`](mod@serve). The runner (the `peft-compat` crate) speaks the same protocol from
//! the other side and re-exports this crate as `peft_compat::worker` (and its `case` as
//! `peft_compat::case`), so the vocabulary has one definition.

pub mod adapter;
pub mod case;
pub mod fp8;
pub mod io;
pub mod ops;
pub mod parallel;
pub mod protocol;
pub mod serve;
pub mod tensor;

pub use serve::{serve, WorkerBackend};
