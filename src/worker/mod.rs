//! Backend workers: each tensor library runs in a process of its own, one binary per backend
//! build (`peft-compat-worker-tch`, `peft-compat-worker-candle`), and the runner hands it cases
//! over a small protocol on its stdin and stdout.
//!
//! Why processes: a diagnostic tool must survive exactly the cases it exists to find. A libtorch
//! abort, a segfault, an allocation that fails, a CUDA fault or a hang kills or stalls the
//! worker, never the run: the case is `crashed` (or `timeout`), the worker is replaced, and
//! every other case keeps its outcome. It also keeps libtorch out of the main binary, so
//! `--help`, `list` and bad-input errors start in milliseconds, and lets two builds of one
//! library (libtorch 2.1 and 2.11) sit in one run.
//!
//! - [`protocol`]: the wire format, documented message by message.
//! - [`serve`]: the worker's side: a loop that any backend crate runs from its `main`.
//! - [`client`]: the runner's side: spawn, hello, probe, run with a deadline, kill.

pub mod client;
pub mod protocol;
pub mod serve;

pub use client::{Worker, WorkerError};
pub use serve::{serve, WorkerBackend};
