//! Where a case's math runs: the [`Backends`] seam.
//!
//! [`Workers`] is the real one: each backend in its own worker process
//! ([`crate::worker`]), replaced when it dies or hangs. [`InProcess`] runs a function in this
//! process; tests use it to plant broken kernels and refusals.

use super::client::{Launch, RunReply, Worker, WorkerError};
use crate::case::{Backend, Case, Device, LibtorchBuild, PeftBuild, Version};
use crate::environment::WorkerInfo;
use crate::outcome::{Skip, SkipKind};
use crate::worker::io::{Inputs, Outputs};
use crate::worker::ops::OpResult;
use std::collections::{BTreeMap, HashMap};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What running a case came to.
#[derive(Debug)]
pub enum Execution {
    Ran {
        outputs: Outputs,
        /// Outputs left in the worker's files (when the caller did not ask for them `whole`).
        files: Vec<(&'static str, crate::worker::protocol::TensorFile)>,
        compute: Duration,
    },
    /// The library refused an operation: its words.
    Refused(String),
    /// A panic, or the worker died: what we know.
    Crashed(String),
    TimedOut(String),
    /// The build cannot express the case (a PEFT release without the adapter, layer or
    /// option): a skip with the reason.
    NotApplicable(String),
    /// The run was stopped while this case ran; it is not reported.
    Interrupted,
}

/// One slot's way to run cases, used by one thread at a time.
pub trait Executor: Send {
    /// Start `case` (a worker begins computing while the runner prepares the reference).
    fn start(&mut self, case: &Case, inputs: &Inputs) -> Result<(), Execution>;
    /// Wait for the case started last. Unless `whole`, outputs that a worker left in files may
    /// stay there (`Execution::Ran`'s `files`): the caller only judges them.
    fn finish(
        &mut self,
        case: &Case,
        inputs: &Inputs,
        timeout: Duration,
        stop: &AtomicBool,
        whole: bool,
    ) -> Execution;
}

/// The backends a run can use.
pub trait Backends: Sync {
    /// Why (backend, device) cannot run here, and whose doing that is; `None` when it can.
    fn unavailable(&self, backend: Backend, device: Device) -> Option<Skip>;
    /// A fresh executor for slot `slot` of `jobs`.
    fn executor(&self, slot: usize) -> Box<dyn Executor + '_>;
    /// How many cases may run at once.
    fn jobs(&self) -> usize;
}

/// A function that runs a case in this process.
pub type CaseFn<'a> = dyn Fn(&Case, &Inputs) -> OpResult<Outputs> + Sync + 'a;
/// Why a (backend, device) pair is unavailable (the hardware is absent), for [`InProcess`].
pub type AvailFn<'a> = dyn Fn(Backend, Device) -> Option<String> + Sync + 'a;

/// Runs cases with a function in this process, one at a time; a panic is `crashed`.
pub struct InProcess<'a> {
    pub run: &'a CaseFn<'a>,
    pub unavailable: &'a AvailFn<'a>,
}

struct InProcessExecutor<'a> {
    run: &'a CaseFn<'a>,
}

impl Executor for InProcessExecutor<'_> {
    fn start(&mut self, _: &Case, _: &Inputs) -> Result<(), Execution> {
        Ok(())
    }
    fn finish(
        &mut self,
        case: &Case,
        inputs: &Inputs,
        _: Duration,
        _: &AtomicBool,
        _: bool,
    ) -> Execution {
        let t0 = Instant::now();
        // A panicking case is reported as `crashed` (the panic hook, a process-wide setting, is
        // left as it is: tests run beside each other).
        match catch_unwind(AssertUnwindSafe(|| (self.run)(case, inputs))) {
            Ok(Ok(outputs)) => Execution::Ran {
                outputs,
                files: Vec::new(),
                compute: t0.elapsed(),
            },
            Ok(Err(e)) => Execution::Refused(e.message),
            Err(p) => Execution::Crashed(crate::worker::serve::panic_message(p)),
        }
    }
}

impl Backends for InProcess<'_> {
    fn unavailable(&self, backend: Backend, device: Device) -> Option<Skip> {
        (self.unavailable)(backend, device).map(|r| Skip::new(SkipKind::Absent, r))
    }
    fn executor(&self, _: usize) -> Box<dyn Executor + '_> {
        Box::new(InProcessExecutor { run: self.run })
    }
    fn jobs(&self) -> usize {
        1
    }
}

/// How each backend's worker starts: `--worker BACKEND=PATH`, else `peft-compat-worker-BACKEND`
/// beside the running binary (or one folder up, where test binaries live); a PEFT build is the
/// Python worker (`workers/peft/worker.py`) in its build's environment (for a PEFT build,
/// `--worker` names the Python interpreter of a ready environment).
#[derive(Debug, Clone, Default)]
pub struct WorkerPaths {
    pub overrides: BTreeMap<Backend, PathBuf>,
}

/// The peft-compat checkout: `PEFT_COMPAT_ROOT` (scripts/env.sh sets it), else where this binary
/// was built from. The PEFT worker, its provisioning script and its environments live there.
pub fn checkout_root() -> PathBuf {
    std::env::var_os("PEFT_COMPAT_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

impl WorkerPaths {
    /// `peft-compat-worker-tch`, `peft-compat-worker-tch-2.4.1`, `peft-compat-worker-candle`.
    pub fn file_name(b: Backend) -> String {
        format!("peft-compat-worker-{}", b.to_string().replace('@', "-"))
    }

    /// How to start `b`'s worker, or why it cannot be.
    pub fn find(&self, b: Backend) -> Result<Launch, String> {
        if let Backend::Peft(build) = b {
            return self.find_peft(b, build);
        }
        if let Some(p) = self.overrides.get(&b) {
            return if p.is_file() {
                Ok(Launch::binary(p.clone()))
            } else {
                Err(format!(
                    "{b} worker {} does not exist (--worker)",
                    p.display()
                ))
            };
        }
        if let Backend::TchAt(v) = b {
            if let Some(why) = LibtorchBuild::missing_minor(v) {
                return Err(why);
            }
        }
        let name = Self::file_name(b);
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let dir = exe.parent().unwrap_or(Path::new("."));
        let look = || {
            [dir.join(&name), dir.join("..").join(&name)]
                .into_iter()
                .find(|p| p.is_file())
        };
        if let Some(p) = look() {
            return Ok(Launch::binary(p));
        }
        if let Backend::TchAt(v) = b {
            // A libtorch build not made yet: scripts/libtorch.sh provisions it (minutes, once).
            provision_libtorch(v)?;
            if let Some(p) = look() {
                return Ok(Launch::binary(p));
            }
        }
        Err(format!(
            "{b} worker not built: no {name} beside {} ({}, or name one with --worker {b}=PATH)",
            exe.display(),
            match b {
                Backend::TchAt(v) =>
                    format!("scripts/libtorch.sh {v} provisions libtorch {v} and builds it"),
                _ => format!("build it with `cargo build --release -p {name}`"),
            }
        ))
    }

    /// The PEFT worker for `build`: its environment provisioned first when it is not there yet
    /// (scripts/peft-env.sh; minutes, once), or why it cannot be made (pip's own words).
    fn find_peft(&self, b: Backend, build: PeftBuild) -> Result<Launch, String> {
        let root = checkout_root();
        let script = root.join("workers/peft/worker.py");
        if !script.is_file() {
            return Err(format!(
                "{b}: the PEFT worker {} does not exist (set PEFT_COMPAT_ROOT to the peft-compat checkout)",
                script.display()
            ));
        }
        let (python, release) = match self.overrides.get(&b) {
            Some(p) if !p.is_file() => {
                return Err(format!(
                    "{b}: Python interpreter {} does not exist (--worker)",
                    p.display()
                ))
            }
            Some(p) => (p.clone(), None),
            None => {
                let (python, release, ready) = peft_layout(&root, build);
                if !ready {
                    provision(&root, build)?;
                }
                (python, release)
            }
        };
        let mut env = vec![("PYTHONNOUSERSITE".to_string(), "1".into())];
        env.extend(release.map(|r| ("PYTHONPATH".to_string(), r.into_os_string())));
        Ok(Launch {
            program: python,
            args: vec![script.into_os_string(), b.to_string().into()],
            env,
        })
    }
}

/// Where scripts/peft-env.sh puts `build`: its Python (`.venv`'s for torch 2.11.0, else
/// `.peft/torch-T`'s), the folder of its PEFT release to put on `PYTHONPATH` (none for the
/// pinned one, which `.venv` holds), and whether both are made (each marked by its lock).
fn peft_layout(root: &Path, build: PeftBuild) -> (PathBuf, Option<PathBuf>, bool) {
    let made = |dir: &Path| dir.join(".peft-compat-lock").is_file();
    let (torch, torch_made) = if build.torch == PeftBuild::PINNED.torch {
        (root.join(".venv"), true)
    } else {
        let dir = root.join(format!(".peft/torch-{}", build.torch));
        let m = made(&dir);
        (dir, m)
    };
    let python = torch.join("bin/python");
    let release =
        (build != PeftBuild::PINNED).then(|| root.join(format!(".peft/peft-{}", build.peft)));
    let ready = torch_made && python.is_file() && release.as_deref().is_none_or(made);
    (python, release, ready)
}

/// Run `script` with `args`, announcing `what`; its stderr's tail is the error when it fails.
fn run_script(script: &Path, args: &[String], what: &str) -> Result<(), String> {
    eprintln!(
        "peft-compat: provisioning {what} (once; {})",
        script.display()
    );
    let out = std::process::Command::new(script)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("{what}: cannot run {}: {e}", script.display()))?;
    if out.status.success() {
        return Ok(());
    }
    let err = String::from_utf8_lossy(&out.stderr);
    let tail: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = tail[tail.len().saturating_sub(4)..].join(" | ");
    Err(format!(
        "{what}: its environment cannot be made ({} {}: {}): {tail}",
        script.display(),
        args.join(" "),
        super::client::describe_status(out.status)
    ))
}

/// Provision libtorch `v` and build its worker (scripts/libtorch.sh).
fn provision_libtorch(v: Version) -> Result<(), String> {
    let script = checkout_root().join("scripts/libtorch.sh");
    run_script(&script, &[v.to_string()], &format!("tch@{v}"))
}

/// Run scripts/peft-env.sh for `build`; its stderr's tail is the error when it fails.
fn provision(root: &Path, build: PeftBuild) -> Result<(), String> {
    let b = Backend::Peft(build);
    let script = root.join("scripts/peft-env.sh");
    if build == PeftBuild::PINNED {
        return Err(format!(
            "{b}: {} has no Python environment; scripts/peft-compat makes it (scripts/env.sh)",
            root.display()
        ));
    }
    run_script(
        &script,
        &[build.peft.to_string(), build.torch.to_string()],
        &b.to_string(),
    )
}

/// How the workers of a run are started.
#[derive(Debug, Clone)]
pub struct Pool {
    /// Slots: cases run at once, each slot with its own worker per backend.
    pub jobs: usize,
    /// Intra-op threads per worker.
    pub threads: usize,
    /// How long a worker may take to load its library and answer (`--timeout`).
    pub timeout: Duration,
    /// Backends declared not expected here (`--skip-backend`), with where that was said: they
    /// are not started, and their cases are skipped as `declared`.
    pub not_expected: BTreeMap<Backend, String>,
}

impl Default for Pool {
    fn default() -> Pool {
        Pool {
            jobs: 1,
            threads: 1,
            timeout: super::DEFAULT_TIMEOUT,
            not_expected: BTreeMap::new(),
        }
    }
}

/// The real backends: one worker process per backend and slot, started on first use.
pub struct Workers {
    paths: WorkerPaths,
    pool: Pool,
    available: HashMap<(Backend, Device), Option<Skip>>,
    /// Workers started up front, one set per slot, handed to each slot's executor.
    ready: Mutex<Vec<HashMap<Backend, Worker>>>,
    /// What each backend's worker said in `hello`.
    pub info: BTreeMap<Backend, WorkerInfo>,
}

impl Workers {
    /// Start `pool.jobs` workers per backend in `pairs` (all at once: loading libtorch takes
    /// most of a second, and a worker started lazily would stall its first case), ask the first
    /// of each backend about its devices. A backend whose first worker cannot start is lost:
    /// its cases skip as `backend_lost`, which fails the run, unless it was declared not
    /// expected. The processes are started from this thread (a worker dies with the thread
    /// that started it, and this one outlives the run); the handshakes run in parallel.
    pub fn start(paths: WorkerPaths, pairs: &[(Backend, Device)], pool: Pool) -> Workers {
        let jobs = pool.jobs.max(1);
        let mut backends: Vec<Backend> = pairs.iter().map(|p| p.0).collect();
        backends.sort();
        backends.dedup();
        let mut available = HashMap::new();
        for (&b, said) in &pool.not_expected {
            for &(_, d) in pairs.iter().filter(|p| p.0 == b) {
                let why = format!("{b} is declared not expected on this runner ({said})");
                available.insert((b, d), Some(Skip::new(SkipKind::Declared, why)));
            }
        }
        backends.retain(|b| !pool.not_expected.contains_key(b));
        // Found (and provisioned, when a build is missing) once per backend, not per slot: a
        // provisioning that failed is not tried again by every slot.
        let found: HashMap<Backend, Result<Launch, String>> =
            backends.iter().map(|&b| (b, paths.find(b))).collect();
        let launched: Vec<(usize, Backend, Result<Worker, String>)> = (0..jobs)
            .flat_map(|slot| backends.iter().map(move |&b| (slot, b)))
            .map(|(slot, b)| {
                let w = found[&b].clone().and_then(|p| {
                    Worker::launch(&p, pool.threads)
                        .map_err(|e| format!("{b} worker failed to start: {e}"))
                });
                (slot, b, w)
            })
            .collect();
        let started: Vec<(usize, Backend, Result<Worker, String>)> = std::thread::scope(|s| {
            let handles: Vec<_> = launched
                .into_iter()
                .map(|(slot, b, w)| {
                    let (threads, timeout) = (pool.threads, pool.timeout);
                    let handle = std::thread::Builder::new().spawn_scoped(s, move || {
                        w.and_then(|w| {
                            w.handshake(threads, timeout)
                                .map_err(|e| format!("{b} worker failed to start: {e}"))
                        })
                    });
                    (slot, b, handle)
                })
                .collect();
            handles
                .into_iter()
                .map(|(slot, b, h)| {
                    let w = match h {
                        Ok(h) => h.join().expect("worker start thread"),
                        Err(e) => Err(format!("{b} worker: no thread for its handshake: {e}")),
                    };
                    (slot, b, w)
                })
                .collect()
        });
        let mut info = BTreeMap::new();
        let mut ready: Vec<HashMap<Backend, Worker>> = (0..jobs).map(|_| HashMap::new()).collect();
        for (slot, b, w) in started {
            match w {
                Ok(mut w) => {
                    if slot == 0 {
                        info.insert(b, w.info.clone());
                        for &(_, d) in pairs.iter().filter(|p| p.0 == b) {
                            let why = match w.probe(d, pool.timeout) {
                                Ok(why) => why.map(|r| Skip::new(SkipKind::Absent, r)),
                                Err(e) => Some(Skip::new(
                                    SkipKind::BackendLost,
                                    format!("{b} worker failed to answer a probe: {e}"),
                                )),
                            };
                            available.insert((b, d), why);
                        }
                    }
                    ready[slot].insert(b, w);
                }
                Err(why) if slot == 0 => {
                    // No tch release targets this libtorch: nothing could ever run it.
                    let kind = match b {
                        Backend::TchAt(v) if LibtorchBuild::missing_minor(v).is_some() => {
                            SkipKind::NotApplicable
                        }
                        _ => SkipKind::BackendLost,
                    };
                    for &(_, d) in pairs.iter().filter(|p| p.0 == b) {
                        available.insert((b, d), Some(Skip::new(kind, why.clone())));
                    }
                }
                // Another slot's worker failed to start: that slot retries when it needs one.
                Err(_) => {}
            }
        }
        Workers {
            paths,
            pool: Pool { jobs, ..pool },
            available,
            ready: Mutex::new(ready),
            info,
        }
    }
}

impl Backends for Workers {
    fn unavailable(&self, backend: Backend, device: Device) -> Option<Skip> {
        self.available
            .get(&(backend, device))
            .cloned()
            .unwrap_or_else(|| {
                Some(Skip::new(
                    SkipKind::BackendLost,
                    format!("{backend} on {device} was not probed"),
                ))
            })
    }
    fn executor(&self, slot: usize) -> Box<dyn Executor + '_> {
        let workers = self
            .ready
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(slot)
            .map(std::mem::take)
            .unwrap_or_default();
        Box::new(WorkerSet {
            owner: self,
            workers,
        })
    }
    fn jobs(&self) -> usize {
        self.pool.jobs
    }
}

/// One slot's workers, one per backend, each replaced when it dies.
struct WorkerSet<'a> {
    owner: &'a Workers,
    workers: HashMap<Backend, Worker>,
}

impl WorkerSet<'_> {
    fn worker(&mut self, b: Backend) -> Result<&mut Worker, String> {
        if !self.workers.contains_key(&b) {
            let path = self.owner.paths.find(b)?;
            let w = Worker::spawn(&path, self.owner.pool.threads, self.owner.pool.timeout)
                .map_err(|e| format!("{b} worker failed to start: {e}"))?;
            self.workers.insert(b, w);
        }
        Ok(self.workers.get_mut(&b).expect("just inserted"))
    }
}

impl Executor for WorkerSet<'_> {
    fn start(&mut self, case: &Case, inputs: &Inputs) -> Result<(), Execution> {
        // The worker reads the request at once and starts computing while the runner prepares
        // the reference.
        let w = self
            .worker(case.point.backend)
            .map_err(Execution::Crashed)?;
        w.send_run(case, inputs).map_err(|e| {
            self.workers.remove(&case.point.backend);
            Execution::Crashed(e.to_string())
        })
    }

    fn finish(
        &mut self,
        case: &Case,
        _: &Inputs,
        timeout: Duration,
        stop: &AtomicBool,
        whole: bool,
    ) -> Execution {
        let Some(w) = self.workers.get_mut(&case.point.backend) else {
            return Execution::Crashed("no worker was running this case".into());
        };
        let r = w.recv_run(timeout, Some(stop), !whole);
        if r.is_err() {
            // Dead, killed or confused: the next case gets a fresh worker.
            self.workers.remove(&case.point.backend);
        }
        match r {
            Ok(RunReply::Outputs {
                outputs,
                files,
                compute,
            }) => Execution::Ran {
                outputs,
                files,
                compute,
            },
            Ok(RunReply::Refused(m)) => Execution::Refused(m),
            Ok(RunReply::Panicked(m)) => Execution::Crashed(format!("panicked: {m}")),
            Ok(RunReply::NotApplicable(m)) => Execution::NotApplicable(m),
            Err(WorkerError::Interrupted) => Execution::Interrupted,
            Err(e @ WorkerError::TimedOut { .. }) => Execution::TimedOut(e.to_string()),
            Err(e) => Execution::Crashed(e.to_string()),
        }
    }
}
