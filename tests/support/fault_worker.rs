//! A candle worker with a fault-injection hook, built only for tests (`cargo test` builds
//! examples; nothing ships it). `PEFT_COMPAT_FAULTS="SUBSTR=FAULT,..."`: a case whose id
//! contains SUBSTR, instead of running:
//! - `abort`: aborts the process (as a libtorch `TORCH_CHECK` in a destructor would);
//! - `segfault`: writes through a null pointer (SIGSEGV);
//! - `hang`: sleeps forever;
//! - `oom`: an allocation the allocator refuses (Rust prints "memory allocation of N bytes
//!   failed" and aborts);
//! - `panic`: panics (the worker survives and answers `panicked`);
//! - `stdout`: prints junk on stdout first, then runs normally (the protocol must skip it);
//! - `slow`: sleeps 150 ms first, then runs normally (for interrupting a run midway);
//! - `flood`: writes to stdout without end, in lines of 1 MiB with no newline at all (the
//!   runner's memory must stay bounded; the case times out);
//! - `hugeframe`: answers with a frame header that claims a 1 TB payload (the runner must refuse
//!   it before allocating anything; the case is `crashed`).
//! - `foreignfile`: answers with an output that names a file not its own (`/etc/hostname`)
//!   instead of a memfd of its own (the runner must refuse to read it; the case is `crashed`).
//!
//! Every other case runs on candle, as the real worker does.

use peft_compat::case::{Case, Device};
use peft_compat::worker::io::{Inputs, Outputs};
use peft_compat::worker::ops::OpResult;
use peft_compat::worker::WorkerBackend;
use peft_compat_worker_candle::Candle;
use std::collections::BTreeMap;
use std::io::Write;

struct Faulty {
    faults: Vec<(String, String)>,
}

impl WorkerBackend for Faulty {
    fn name(&self) -> String {
        Candle.name()
    }
    fn libraries(&self) -> BTreeMap<String, String> {
        Candle.libraries()
    }
    fn set_threads(&self, threads: usize) {
        Candle.set_threads(threads)
    }
    fn unavailable(&self, device: Device) -> Option<String> {
        Candle.unavailable(device)
    }
    fn run(&self, case: &Case, inputs: &Inputs) -> OpResult<Outputs> {
        let id = case.id();
        let fault = self
            .faults
            .iter()
            .find(|(s, _)| id.contains(s.as_str()))
            .map(|(_, f)| f.as_str());
        match fault {
            Some("abort") => {
                eprintln!("fault_worker: aborting on {id}");
                std::process::abort()
            }
            Some("segfault") => {
                eprintln!("fault_worker: segfaulting on {id}");
                // SAFETY: none; that is the point. A volatile write is not optimised away.
                unsafe { std::ptr::write_volatile(std::ptr::null_mut::<u64>(), 1) };
                unreachable!()
            }
            Some("hang") => loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            },
            Some("oom") => {
                // An allocation the allocator refuses: Rust's handler prints "memory allocation
                // of N bytes failed" and aborts, as the absurd shapes did. (Called directly, so
                // the outcome does not hang on the machine's overcommit setting.)
                let layout = std::alloc::Layout::from_size_align(1 << 46, 8).expect("layout");
                std::alloc::handle_alloc_error(layout)
            }
            Some("panic") => panic!("fault_worker: planted panic on {id}"),
            Some("slow") => {
                std::thread::sleep(std::time::Duration::from_millis(150));
                Candle.run(case, inputs)
            }
            Some("flood") => {
                let junk = vec![b'x'; 1 << 20];
                let mut out = std::io::stdout();
                loop {
                    if out.write_all(&junk).is_err() {
                        std::process::exit(3);
                    }
                }
            }
            Some("hugeframe") => {
                let mut out = std::io::stdout();
                let header = r#"PCW1 {"type":"outputs","compute_ms":1.0,"tensors":[{"name":"result","dtype":"f32","shape":[262144,1048576],"bytes":1099511627776}]}"#;
                let _ = writeln!(out, "{header}");
                let _ = out.flush();
                std::thread::sleep(std::time::Duration::from_secs(3600));
                unreachable!()
            }
            Some("foreignfile") => {
                let mut out = std::io::stdout();
                let header = r#"PCW1 {"type":"outputs","compute_ms":1.0,"tensors":[{"name":"result","dtype":"f16","shape":[1],"bytes":2,"file":"/etc/hostname"}]}"#;
                let _ = writeln!(out, "{header}");
                let _ = out.flush();
                std::thread::sleep(std::time::Duration::from_secs(3600));
                unreachable!()
            }
            Some("stdout") => {
                println!("fault_worker: stray output on stdout");
                Candle.run(case, inputs)
            }
            _ => Candle.run(case, inputs),
        }
    }
}

fn main() {
    let faults = std::env::var("PEFT_COMPAT_FAULTS")
        .unwrap_or_default()
        .split(',')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    std::process::exit(peft_compat::worker::serve(&Faulty { faults }));
}
