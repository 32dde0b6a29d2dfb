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
use std::io::{BufReader, BufWriter, Read};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How much of a worker's stderr is kept for crash messages.
const STDERR_TAIL: usize = 4096;

/// How long a worker may take to load its library and answer `hello`.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(120);

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

/// What a case's run came back as.
#[derive(Debug)]
pub enum RunReply {
    Outputs { outputs: Outputs, compute: Duration },
    Refused(String),
    Panicked(String),
}

type FrameResult = Result<protocol::Frame<Reply>, String>;

pub struct Worker {
    program: PathBuf,
    child: Child,
    stdin: BufWriter<ChildStdin>,
    frames: Receiver<FrameResult>,
    stderr: Arc<Mutex<VecDeque<u8>>>,
    stderr_reader: Option<JoinHandle<()>>,
    pub info: WorkerInfo,
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
    /// Start `program`, say hello with `threads`, and wait for its answer.
    pub fn spawn(program: &Path, threads: usize) -> Result<Worker, WorkerError> {
        let mut cmd = Command::new(program);
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
        let mut child = cmd.spawn().map_err(|e| WorkerError::Spawn {
            program: program.display().to_string(),
            message: e.to_string(),
        })?;
        let stdin = BufWriter::with_capacity(1 << 16, child.stdin.take().expect("piped"));
        let stdout = child.stdout.take().expect("piped");
        let mut stderr_pipe = child.stderr.take().expect("piped");
        let stderr = Arc::new(Mutex::new(VecDeque::with_capacity(STDERR_TAIL)));
        let sink = Arc::clone(&stderr);
        let stderr_reader = std::thread::spawn(move || {
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
        std::thread::spawn(move || {
            let mut r = BufReader::with_capacity(1 << 16, stdout);
            loop {
                let next = protocol::read_frame::<Reply>(&mut r, protocol::reply_bytes);
                let stop = !matches!(next, Ok(Some(_)));
                let msg = match next {
                    Ok(Some(f)) => Ok(f),
                    Ok(None) => Err("end of output".to_string()),
                    Err(e) => Err(e.to_string()),
                };
                if tx.send(msg).is_err() || stop {
                    break;
                }
            }
        });
        let mut w = Worker {
            program: program.to_path_buf(),
            child,
            stdin,
            frames,
            stderr,
            stderr_reader: Some(stderr_reader),
            info: WorkerInfo {
                backend: String::new(),
                libraries: BTreeMap::new(),
                cuda: None,
            },
        };
        let hello = Request::Hello {
            protocol: VERSION,
            threads,
        };
        match w.call(&hello, &[], HELLO_TIMEOUT, None)? {
            (
                Reply::Hello {
                    protocol,
                    backend,
                    libraries,
                    cuda,
                },
                _,
            ) => {
                if protocol != VERSION {
                    w.kill();
                    return Err(WorkerError::Protocol(format!(
                        "{} speaks protocol {protocol}, this peft-compat speaks {VERSION}: rebuild both",
                        w.program.display()
                    )));
                }
                w.info = WorkerInfo {
                    backend,
                    libraries,
                    cuda,
                };
                Ok(w)
            }
            (other, _) => Err(w.fail(format!("expected hello, got {other:?}"))),
        }
    }

    /// Whether `device` can be used by this worker's backend, or why not.
    pub fn probe(&mut self, device: Device) -> Result<Option<String>, WorkerError> {
        match self.call(&Request::Probe { device }, &[], HELLO_TIMEOUT, None)? {
            (Reply::Probe { unavailable }, _) => Ok(unavailable),
            (other, _) => Err(self.fail(format!("expected probe, got {other:?}"))),
        }
    }

    /// Send a case to the worker, which starts on it as soon as it has read it.
    pub fn send_run(&mut self, case: &Case, inputs: &Inputs) -> Result<(), WorkerError> {
        let (req, payload) = protocol::run_request(&case.id(), case, inputs);
        self.send(&req, &payload)
    }

    /// Wait for the reply to [`Worker::send_run`]. `stop` is polled while waiting: when it turns
    /// true the worker is killed and the call returns `Interrupted`.
    pub fn recv_run(
        &mut self,
        timeout: Duration,
        stop: Option<&AtomicBool>,
    ) -> Result<RunReply, WorkerError> {
        match self.recv(timeout, stop)? {
            (
                Reply::Outputs {
                    compute_ms,
                    tensors,
                },
                bytes,
            ) => {
                let values = protocol::split_payload(&tensors, &bytes)
                    .map_err(|e| self.fail(e.to_string()))?;
                let outputs = tensors
                    .iter()
                    .zip(values)
                    .map(|(h, t)| {
                        crate::worker::io::names::ALL
                            .iter()
                            .find(|k| **k == h.name)
                            .map(|k| (*k, t))
                            .ok_or_else(|| format!("unknown output `{}`", h.name))
                    })
                    .collect::<Result<Outputs, String>>()
                    .map_err(|e| self.fail(e))?;
                Ok(RunReply::Outputs {
                    outputs,
                    compute: Duration::from_secs_f64(compute_ms.max(0.0) / 1e3),
                })
            }
            (Reply::Refused { message }, _) => Ok(RunReply::Refused(message)),
            (Reply::Panicked { message }, _) => Ok(RunReply::Panicked(message)),
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
                Ok(Err(_)) | Err(RecvTimeoutError::Disconnected) => return Err(self.died()),
                Err(RecvTimeoutError::Timeout) => continue,
            }
        }
    }

    /// The worker's output ended: wait for its status and collect the tail of its stderr.
    fn died(&mut self) -> WorkerError {
        let status = match self.child.wait() {
            Ok(s) => describe_status(s),
            Err(e) => format!("status unknown: {e}"),
        };
        if let Some(h) = self.stderr_reader.take() {
            let _ = h.join();
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
