//! The runner's side of the protocol: one [`Worker`] is one live worker process.
//!
//! Two threads per worker read its stdout (frames, forwarded over a channel so that the runner
//! can wait with a deadline) and its stderr (the last few KiB, for the message of a case whose
//! worker died). Each worker gets its own process group, so a Ctrl-C in the terminal reaches
//! only the runner, which then ends its workers itself.

use crate::case::{Case, Device};
use crate::environment::WorkerInfo;
use crate::worker::io::{Inputs, Outputs};
use crate::worker::protocol::{self, Reply, Request, VERSION};
use std::collections::{BTreeMap, VecDeque};
use std::ffi::OsString;
use std::io::{BufReader, BufWriter, Read};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How much of a worker's stderr is kept for crash messages.
const STDERR_TAIL: usize = 4096;

/// The payload a reply may carry when no case is in flight (`hello` and `probe` carry none).
const NO_PAYLOAD: usize = 0;

/// How long a worker that closed its output may take to exit before it is killed.
const EXIT_GRACE: Duration = Duration::from_secs(2);

/// Why a worker could not answer.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WorkerError {
    #[error("cannot start {program}: {message}")]
    Spawn { program: String, message: String },
    #[error("the worker died ({status}){}", tail_suffix(.stderr))]
    Died { status: String, stderr: String },
    #[error("no answer within {:.1} s; the worker was killed{}", .after.as_secs_f64(), tail_suffix(.stderr))]
    TimedOut { after: Duration, stderr: String },
    #[error("stopped: the run was interrupted")]
    Interrupted,
    #[error("worker protocol: {0}")]
    Protocol(String),
}

fn tail_suffix(stderr: &str) -> String {
    let t = stderr.trim();
    if t.is_empty() {
        String::new()
    } else {
        format!("; stderr: {t}")
    }
}

/// How to start one worker: a Rust worker is its binary; the PEFT worker is a Python
/// interpreter with the worker script and the build as arguments, and the release first on
/// `PYTHONPATH`.
#[derive(Debug, Clone, PartialEq)]
pub struct Launch {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    pub env: Vec<(String, OsString)>,
}

impl Launch {
    /// A worker binary, started without arguments.
    pub fn binary(program: PathBuf) -> Launch {
        Launch {
            program,
            args: Vec::new(),
            env: Vec::new(),
        }
    }

    /// The command line, for messages.
    pub fn display(&self) -> String {
        std::iter::once(self.program.display().to_string())
            .chain(self.args.iter().map(|a| a.to_string_lossy().into_owned()))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// What a case's run came back as.
#[derive(Debug)]
pub enum RunReply {
    Outputs {
        outputs: Outputs,
        /// With `lazy`: the outputs left in the worker's files, opened, not read.
        files: Vec<(&'static str, protocol::TensorFile)>,
        compute: Duration,
    },
    Refused(String),
    Panicked(String),
    NotApplicable(String),
}

/// What the stdout reader forwards: a frame, or why there is none.
type FrameResult = Result<protocol::Frame<Reply>, ReadEnd>;

enum ReadEnd {
    /// The worker closed its stdout (it exited, or is about to).
    Eof,
    /// What came was not the protocol: the worker is alive but cannot be trusted.
    Broken(String),
}

pub struct Worker {
    program: String,
    child: Child,
    stdin: BufWriter<ChildStdin>,
    frames: Receiver<FrameResult>,
    stderr: Arc<Mutex<VecDeque<u8>>>,
    stderr_reader: Option<JoinHandle<()>>,
    /// The most payload the next reply may carry (set with each request).
    max_payload: Arc<AtomicUsize>,
    pub info: WorkerInfo,
    /// Whether the worker reads request tensors from files ([`super::shared`]).
    files: bool,
}

/// A signal's name, for the messages of cases whose worker it killed.
fn signal_name(sig: i32) -> &'static str {
    match sig {
        1 => "SIGHUP",
        2 => "SIGINT",
        4 => "SIGILL",
        5 => "SIGTRAP",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL (killed: out of memory?)",
        11 => "SIGSEGV",
        13 => "SIGPIPE",
        15 => "SIGTERM",
        _ => "signal",
    }
}

/// `exit status 3`, `signal 11 (SIGSEGV)`.
pub fn describe_status(s: ExitStatus) -> String {
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(sig)) => format!("signal {sig} ({})", signal_name(sig)),
        (None, None) => "unknown status".into(),
    }
}

impl Worker {
    /// Start `program`, say hello with `threads`, and wait up to `timeout` for its answer.
    pub fn spawn(
        program: &Launch,
        threads: usize,
        timeout: Duration,
    ) -> Result<Worker, WorkerError> {
        Self::launch(program, threads)?.handshake(threads, timeout)
    }

    /// Start `program` without waiting for it: [`Worker::handshake`] does. Starting is quick;
    /// the handshake waits for the library to load, so callers start many workers from one
    /// long-lived thread (a worker dies with the thread that started it) and shake hands in
    /// parallel.
    pub fn launch(program: &Launch, threads: usize) -> Result<Worker, WorkerError> {
        let mut cmd = Command::new(&program.program);
        cmd.args(&program.args);
        for (k, v) in &program.env {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        // The libraries' own pools: one worker's share of the cores, and no spin-waiting
        // (libgomp's default spin ate 72% of the CPU on 2 cores).
        for var in ["OMP_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS"] {
            cmd.env(var, threads.to_string());
        }
        if std::env::var_os("OMP_WAIT_POLICY").is_none() {
            cmd.env("OMP_WAIT_POLICY", "PASSIVE");
        }
        // A worker dies with the runner, however the runner ends (kill -9 included): no orphan
        // keeps its memory. Linux delivers the signal when the *thread* that forked it ends,
        // hence `launch` runs on long-lived threads.
        // SAFETY: prctl is async-signal-safe and touches only the child's own state.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|e| WorkerError::Spawn {
            program: program.display(),
            message: e.to_string(),
        })?;
        let stdin = BufWriter::with_capacity(1 << 16, child.stdin.take().expect("piped"));
        let stdout = child.stdout.take().expect("piped");
        let mut stderr_pipe = child.stderr.take().expect("piped");
        let stderr = Arc::new(Mutex::new(VecDeque::with_capacity(STDERR_TAIL)));
        let sink = Arc::clone(&stderr);
        let stderr_reader = std::thread::Builder::new()
            .name("worker-stderr".into())
            .spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = stderr_pipe.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let mut tail = sink.lock().unwrap_or_else(|p| p.into_inner());
                    tail.extend(&buf[..n]);
                    let excess = tail.len().saturating_sub(STDERR_TAIL);
                    tail.drain(..excess);
                }
            });
        let (tx, frames) = mpsc::channel();
        let max_payload = Arc::new(AtomicUsize::new(NO_PAYLOAD));
        let limit = Arc::clone(&max_payload);
        let reader = std::thread::Builder::new()
            .name("worker-stdout".into())
            .spawn(move || {
                let mut r = BufReader::with_capacity(1 << 16, stdout);
                loop {
                    let next = protocol::read_frame::<Reply>(&mut r, protocol::reply_bytes, || {
                        limit.load(Ordering::Relaxed)
                    });
                    let stop = !matches!(next, Ok(Some(_)));
                    let msg = match next {
                        Ok(Some(f)) => Ok(f),
                        Ok(None) => Err(ReadEnd::Eof),
                        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                            Err(ReadEnd::Broken(e.to_string()))
                        }
                        Err(_) => Err(ReadEnd::Eof),
                    };
                    if tx.send(msg).is_err() || stop {
                        break;
                    }
                }
            });
        let stderr_reader = match (reader, stderr_reader) {
            (Ok(_), Ok(h)) => h,
            (Err(e), _) | (_, Err(e)) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(WorkerError::Spawn {
                    program: program.display(),
                    message: format!("cannot start a thread to read it: {e}"),
                });
            }
        };
        Ok(Worker {
            program: program.display(),
            child,
            stdin,
            frames,
            stderr,
            stderr_reader: Some(stderr_reader),
            max_payload,
            info: WorkerInfo {
                backend: String::new(),
                libraries: BTreeMap::new(),
                cuda: None,
            },
            files: false,
        })
    }

    /// Say hello and wait up to `timeout` for the answer: the worker's library loaded and its
    /// protocol version matches. A worker that does not answer in time is killed.
    pub fn handshake(mut self, threads: usize, timeout: Duration) -> Result<Worker, WorkerError> {
        let w = &mut self;
        // The probe file lives until the answer: a worker that can read it can take files.
        let probe = protocol::memfd().and_then(|(mut f, path)| {
            std::io::Write::write_all(&mut f, protocol::FILES_PROBE)?;
            Ok((f, path))
        });
        let hello = Request::Hello {
            protocol: VERSION,
            threads,
            files: probe.as_ref().ok().map(|(_, path)| path.clone()),
        };
        match w.call(&hello, &[], timeout, None)? {
            (
                Reply::Hello {
                    protocol,
                    backend,
                    libraries,
                    cuda,
                    files,
                },
                _,
            ) => {
                w.files = files;
                if protocol != VERSION {
                    w.kill();
                    return Err(WorkerError::Protocol(format!(
                        "{} speaks protocol {protocol}, this peft-compat speaks {VERSION}: rebuild both",
                        w.program
                    )));
                }
                w.info = WorkerInfo {
                    backend,
                    libraries,
                    cuda,
                };
                Ok(self)
            }
            (other, _) => Err(w.fail(format!("expected hello, got {other:?}"))),
        }
    }

    /// Whether `device` can be used by this worker's backend, or why not.
    pub fn probe(
        &mut self,
        device: Device,
        timeout: Duration,
    ) -> Result<Option<String>, WorkerError> {
        match self.call(&Request::Probe { device }, &[], timeout, None)? {
            (Reply::Probe { unavailable }, _) => Ok(unavailable),
            (other, _) => Err(self.fail(format!("expected probe, got {other:?}"))),
        }
    }

    /// Send a case to the worker, which starts on it as soon as it has read it.
    pub fn send_run(&mut self, case: &Case, inputs: &Inputs) -> Result<(), WorkerError> {
        let files = self.files;
        let (req, payload) = protocol::run_request(&case.id(), case, inputs, |_, t, dtype| {
            if files && std::ptr::eq(t, &*inputs.weight) {
                super::shared::file_for(&inputs.weight, dtype)
            } else {
                None
            }
        });
        self.max_payload
            .store(protocol::max_reply_bytes(case, inputs), Ordering::Relaxed);
        self.send(&req, &payload)
    }

    /// Wait for the reply to [`Worker::send_run`]. `stop` is polled while waiting: when it turns
    /// true the worker is killed and the call returns `Interrupted`.
    /// With `lazy`, outputs that came in files stay there (opened: the judge reads them a chunk
    /// at a time; they outlive the worker's copy); else every output is decoded.
    pub fn recv_run(
        &mut self,
        timeout: Duration,
        stop: Option<&AtomicBool>,
        lazy: bool,
    ) -> Result<RunReply, WorkerError> {
        match self.recv(timeout, stop)? {
            (
                Reply::Outputs {
                    compute_ms,
                    tensors,
                },
                bytes,
            ) => {
                // Tensors in files are bounded like the payload: a broken worker's claim is
                // refused before anything is allocated for it.
                let in_files = tensors
                    .iter()
                    .filter(|t| t.file.is_some())
                    .fold(0usize, |a, t| a.saturating_add(t.bytes));
                let limit = self.max_payload.load(Ordering::Relaxed);
                if in_files > limit {
                    return Err(self.fail(format!(
                        "a reply claims {in_files} bytes in files, more than the {limit} this request can need"
                    )));
                }
                // A reply's file is one of the worker's own memfds, nothing else on this machine.
                let own = format!("/proc/{}/fd/", self.child.id());
                if let Some(f) = tensors
                    .iter()
                    .filter_map(|t| t.file.as_deref())
                    .find(|f| !f.starts_with(&own) || f[own.len()..].contains('/'))
                {
                    return Err(self.fail(format!(
                        "a reply names the file {f}, not one of the worker's own ({own}N)"
                    )));
                }
                let name = |h: &protocol::TensorHeader| {
                    crate::worker::io::names::ALL
                        .iter()
                        .find(|k| **k == h.name)
                        .copied()
                        .ok_or_else(|| format!("unknown output `{}`", h.name))
                };
                let (in_files, decoded): (Vec<_>, Vec<_>) =
                    tensors.into_iter().partition(|h| lazy && h.file.is_some());
                let values = protocol::split_payload(&decoded, &bytes)
                    .map_err(|e| self.fail(e.to_string()))?;
                let outputs = decoded
                    .iter()
                    .zip(values)
                    .map(|(h, t)| Ok((name(h)?, t)))
                    .collect::<Result<Outputs, String>>()
                    .map_err(|e| self.fail(e))?;
                let files = in_files
                    .iter()
                    .map(|h| {
                        let file = protocol::TensorFile::open(h).map_err(|e| e.to_string())?;
                        Ok((name(h)?, file))
                    })
                    .collect::<Result<Vec<_>, String>>()
                    .map_err(|e| self.fail(e))?;
                Ok(RunReply::Outputs {
                    outputs,
                    files,
                    compute: Duration::from_secs_f64(compute_ms.max(0.0) / 1e3),
                })
            }
            (Reply::Refused { message }, _) => Ok(RunReply::Refused(message)),
            (Reply::Panicked { message }, _) => Ok(RunReply::Panicked(message)),
            (Reply::NotApplicable { message }, _) => Ok(RunReply::NotApplicable(message)),
            (other, _) => Err(self.fail(format!("unexpected reply {other:?}"))),
        }
    }

    /// Send one request and wait for its reply.
    fn call(
        &mut self,
        req: &Request,
        payload: &[protocol::Encoded],
        timeout: Duration,
        stop: Option<&AtomicBool>,
    ) -> Result<(Reply, Vec<u8>), WorkerError> {
        self.send(req, payload)?;
        self.recv(timeout, stop)
    }

    fn send(&mut self, req: &Request, payload: &[protocol::Encoded]) -> Result<(), WorkerError> {
        protocol::write_frame(&mut self.stdin, req, payload).map_err(|_| {
            // The worker is gone; its exit status says why.
            self.died()
        })
    }

    fn recv(
        &mut self,
        timeout: Duration,
        stop: Option<&AtomicBool>,
    ) -> Result<(Reply, Vec<u8>), WorkerError> {
        let deadline = Instant::now() + timeout;
        loop {
            let now = Instant::now();
            if now >= deadline {
                self.kill();
                return Err(WorkerError::TimedOut {
                    after: timeout,
                    stderr: self.stderr_tail(),
                });
            }
            if stop.is_some_and(|s| s.load(Ordering::Relaxed)) {
                self.kill();
                return Err(WorkerError::Interrupted);
            }
            let slice = (deadline - now).min(Duration::from_millis(100));
            match self.frames.recv_timeout(slice) {
                Ok(Ok(frame)) => {
                    if !frame.stray.is_empty() {
                        let mut tail = self.stderr.lock().unwrap_or_else(|p| p.into_inner());
                        for l in &frame.stray {
                            tail.extend(format!("(stdout) {l}\n").bytes());
                        }
                    }
                    if let Reply::Error { message } = &frame.message {
                        let message = message.clone();
                        return Err(
                            self.fail(format!("the worker could not read the request: {message}"))
                        );
                    }
                    return Ok((frame.message, frame.payload));
                }
                Ok(Err(ReadEnd::Broken(why))) => {
                    return Err(self.fail(format!("unreadable output: {why}")))
                }
                Ok(Err(ReadEnd::Eof)) | Err(RecvTimeoutError::Disconnected) => {
                    return Err(self.died())
                }
                Err(RecvTimeoutError::Timeout) => continue,
            }
        }
    }

    /// The worker's output ended: wait (briefly: a worker that closed stdout but lives on is
    /// killed) for its status and collect the tail of its stderr.
    fn died(&mut self) -> WorkerError {
        let deadline = Instant::now() + EXIT_GRACE;
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(s)) => break describe_status(s),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Ok(None) => {
                    self.kill();
                    break format!(
                        "closed its output and was still running {:.0} s later; killed",
                        EXIT_GRACE.as_secs_f64()
                    );
                }
                Err(e) => break format!("status unknown: {e}"),
            }
        };
        if let Some(h) = self.stderr_reader.take() {
            // The last lines say why it died; but the pipe may be held open by the worker's own
            // children, so the wait for them is bounded.
            let until = Instant::now() + Duration::from_millis(500);
            while !h.is_finished() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(5));
            }
            if h.is_finished() {
                let _ = h.join();
            }
        }
        WorkerError::Died {
            status,
            stderr: self.stderr_tail(),
        }
    }

    fn fail(&mut self, message: String) -> WorkerError {
        self.kill();
        WorkerError::Protocol(message)
    }

    fn stderr_tail(&self) -> String {
        let tail = self.stderr.lock().unwrap_or_else(|p| p.into_inner());
        let bytes: Vec<u8> = tail.iter().copied().collect();
        String::from_utf8_lossy(&bytes).trim().to_string()
    }

    /// End the worker now (SIGKILL) and reap it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // A worker keeps no state worth a goodbye: end it and reap it.
        self.kill();
    }
}
