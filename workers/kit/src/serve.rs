//! The worker's side of the protocol: read requests from stdin, run them on one backend, answer
//! on stdout. A backend crate's `main` is `std::process::exit(serve(&MyBackend))`.

use super::protocol::{self, Reply, Request, VERSION};
use crate::case::{Case, Device};
use crate::io::{Inputs, Outputs};
use crate::ops::OpResult;
use std::collections::BTreeMap;
use std::io::{self, BufReader, BufWriter};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

/// What a worker binary provides: its library, the devices it can use, and the case runner
/// (the shared adapter math over its `TensorOps`).
pub trait WorkerBackend {
    /// The backend axis value it runs (`tch`, `candle`).
    fn name(&self) -> String;
    /// Library name -> version, for the report's environment block.
    fn libraries(&self) -> BTreeMap<String, String>;
    /// The CUDA version the library was built for, if any.
    fn cuda(&self) -> Option<String> {
        None
    }
    /// Size the library's intra-op thread pool; called once, before any op.
    fn set_threads(&self, threads: usize);
    /// Why `device` cannot be used here, or `None`.
    fn unavailable(&self, device: Device) -> Option<String>;
    /// Run one case on its inputs.
    fn run(&self, case: &Case, inputs: &Inputs) -> OpResult<Outputs>;
}

/// The text of a caught panic.
pub fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic with a non-string payload".into())
}

/// Answer requests until stdin ends; returns the process exit code (0 at end of input, 2 when
/// the stream could not be read or written).
pub fn serve(backend: &dyn WorkerBackend) -> i32 {
    // Panics are answered as `panicked`; keep the default hook's text off stderr.
    std::panic::set_hook(Box::new(|_| {}));
    let mut input = BufReader::new(io::stdin().lock());
    let mut output = BufWriter::new(io::stdout().lock());
    // Whether the runner reads reply tensors from files, and the files of the last reply
    // (closed once the next request is read: the runner has read them by then).
    let mut files = false;
    let mut _last_files: Vec<std::fs::File> = Vec::new();
    loop {
        let frame =
            match protocol::read_frame::<Request>(&mut input, protocol::request_bytes, || {
                usize::MAX
            }) {
                Ok(Some(f)) => f,
                Ok(None) => return 0,
                Err(e) => {
                    let _ = protocol::write_frame(
                        &mut output,
                        &Reply::Error {
                            message: format!("unreadable request: {e}"),
                        },
                        &[],
                    );
                    return 2;
                }
            };
        _last_files.clear();
        if let Request::Hello { files: probe, .. } = &frame.message {
            files = probe.as_deref().is_some_and(protocol::files_readable);
        }
        let (reply, payload, kept) = answer(backend, frame.message, &frame.payload, files);
        _last_files = kept;
        if test_hook() == Some(TestHook::Stray) {
            use std::io::Write;
            let _ = writeln!(
                output,
                "a stray line on stdout (PEFT_COMPAT_WORKER_TEST=stray)"
            );
        }
        if protocol::write_frame(&mut output, &reply, &payload).is_err() {
            return 2;
        }
    }
}

/// The protocol's test levers (`PEFT_COMPAT_WORKER_TEST`, see `protocol`), honoured by every
/// worker so that one conformance test can drive them all.
#[derive(Debug, Clone, Copy, PartialEq)]
enum TestHook {
    Stray,
    Panic,
    Abort,
}

fn test_hook() -> Option<TestHook> {
    match std::env::var("PEFT_COMPAT_WORKER_TEST").ok()?.as_str() {
        "stray" => Some(TestHook::Stray),
        "panic" => Some(TestHook::Panic),
        "abort" => Some(TestHook::Abort),
        _ => None,
    }
}

fn answer(
    backend: &dyn WorkerBackend,
    req: Request,
    payload: &[u8],
    files: bool,
) -> (Reply, Vec<protocol::Encoded>, Vec<std::fs::File>) {
    match req {
        Request::Hello {
            protocol, threads, ..
        } => {
            if protocol == VERSION {
                backend.set_threads(threads.max(1));
                crate::parallel::set_threads(threads);
            }
            (
                Reply::Hello {
                    protocol: VERSION,
                    backend: backend.name(),
                    libraries: backend.libraries(),
                    cuda: backend.cuda(),
                    files,
                },
                vec![],
                vec![],
            )
        }
        Request::Probe { device } => (
            Reply::Probe {
                unavailable: backend.unavailable(device),
            },
            vec![],
            vec![],
        ),
        Request::Run { case, tensors, .. } => {
            if test_hook() == Some(TestHook::Abort) {
                std::process::abort();
            }
            let case = case.case();
            let inputs = match protocol::inputs_from(&case, &tensors, payload) {
                Ok(i) => i,
                Err(e) => {
                    return (
                        Reply::Error {
                            message: e.to_string(),
                        },
                        vec![],
                        vec![],
                    )
                }
            };
            let t0 = Instant::now();
            let planted = test_hook() == Some(TestHook::Panic);
            match catch_unwind(AssertUnwindSafe(|| {
                if planted {
                    panic!(
                        "planted failure in the worker's own code (PEFT_COMPAT_WORKER_TEST=panic)"
                    );
                }
                backend.run(&case, &inputs)
            })) {
                Ok(Ok(outputs)) => protocol::outputs_reply(
                    &case,
                    &outputs,
                    t0.elapsed().as_secs_f64() * 1e3,
                    files,
                ),
                Ok(Err(e)) => (Reply::Refused { message: e.message }, vec![], vec![]),
                Err(p) => (
                    Reply::Panicked {
                        message: panic_message(p),
                    },
                    vec![],
                    vec![],
                ),
            }
        }
    }
}
