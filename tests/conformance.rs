//! The protocol has two implementations: the Rust workers (`workers/kit/src/serve.rs`, behind
//! the tch and candle binaries) and the PEFT worker (`workers/peft/worker.py`). Each test here
//! sends every worker the same bytes and checks the same framing and the same answers: a hello
//! with a wrong version (answered with the worker's own, so the runner can refuse it), a probe,
//! a run (same output names, shapes, and values within a unit of roundoff of each other), a case
//! the library refuses (torch's words in both), stray stdout (skipped by the reader, kept as
//! stray), a failure in the worker's own code (`panicked`), an abort (end of stream), and an
//! unreadable request (`error`, exit 2).
//!
//! Needs the release workers and `.venv` (scripts/test makes both); a worker that is not there
//! is said and skipped, never passed silently.

use peft_compat::case::{
    Adapter, Backend, Case, DType, Device, Layer, Op, Point, Precision, Profile, Shape,
};
use peft_compat::truth::draws::Draws;
use peft_compat::worker::protocol::{self, Frame, Reply, Request};
use std::io::{BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

/// How to start one worker: its backend, program and arguments.
struct Spec {
    backend: Backend,
    program: PathBuf,
    args: Vec<String>,
}

fn release_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_peft-compat"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Every worker this machine has: tch, candle, and the PEFT worker on `.venv`.
fn workers() -> Vec<Spec> {
    let mut v = Vec::new();
    for (b, name) in [
        (Backend::Tch, "peft-compat-worker-tch"),
        (Backend::Candle, "peft-compat-worker-candle"),
    ] {
        let p = release_dir().join(name);
        if p.is_file() {
            v.push(Spec {
                backend: b,
                program: p,
                args: vec![],
            });
        } else {
            eprintln!("SKIPPED {b}: {} is not built", p.display());
        }
    }
    let py = Path::new(".venv/bin/python");
    if py.is_file() {
        v.push(Spec {
            backend: "peft".parse().unwrap(),
            program: py.to_path_buf(),
            args: vec!["workers/peft/worker.py".into(), "peft".into()],
        });
    } else {
        eprintln!("SKIPPED peft: no .venv (scripts/test makes it)");
    }
    v
}

struct Live {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Live {
    fn start(s: &Spec, hook: Option<&str>) -> Live {
        let mut cmd = Command::new(&s.program);
        cmd.args(&s.args)
            .env("OMP_NUM_THREADS", "1")
            .env_remove("PEFT_COMPAT_WORKER_TEST")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        if let Some(h) = hook {
            cmd.env("PEFT_COMPAT_WORKER_TEST", h);
        }
        let mut child = cmd.spawn().unwrap();
        Live {
            stdin: child.stdin.take().unwrap(),
            stdout: BufReader::new(child.stdout.take().unwrap()),
            child,
        }
    }

    fn send(&mut self, req: &Request, payload: &[protocol::Encoded]) {
        protocol::write_frame(&mut self.stdin, req, payload).unwrap();
    }

    fn recv(&mut self) -> Option<Frame<Reply>> {
        protocol::read_frame::<Reply>(&mut self.stdout, protocol::reply_bytes, || 1 << 30).unwrap()
    }

    fn call(&mut self, req: &Request, payload: &[protocol::Encoded]) -> Frame<Reply> {
        self.send(req, payload);
        self.recv().expect("a reply")
    }

    fn hello(&mut self) -> Frame<Reply> {
        self.call(
            &Request::Hello {
                files: None,
                protocol: protocol::VERSION,
                threads: 1,
            },
            &[],
        )
    }
}

fn case(backend: Backend, layer: Layer, op: Op) -> Case {
    Case {
        point: Point {
            backend,
            device: Device::Cpu,
            dtype: DType::F32,
            adapter: Adapter::Lora,
            op,
            precision: Precision::Native,
            layer,
            profile: Profile::Normal,
        },
        shape: Shape::new("tiny", 3, 12, 8, 4, 8.0),
    }
}

/// The run request for `c` with the seed's inputs, after `edit`.
fn run_request(
    c: &Case,
    edit: impl Fn(&mut peft_compat::worker::io::Inputs),
) -> (Request, Vec<protocol::Encoded>) {
    let mut inputs = Draws::generate(&c.shape, c.point.layer, c.point.profile, 7).inputs(
        c.point.dtype,
        c.point.adapter,
        c.point.op,
    );
    edit(&mut inputs);
    protocol::run_request(&c.id(), c, &inputs, |_, _, _| None)
}

#[test]
fn hello_answers_with_the_workers_own_version_and_name() {
    for s in workers() {
        let mut w = Live::start(&s, None);
        let f = w.call(
            &Request::Hello {
                files: None,
                protocol: 99,
                threads: 1,
            },
            &[],
        );
        match f.message {
            Reply::Hello {
                protocol, backend, ..
            } => {
                assert_eq!(protocol, protocol::VERSION, "{}", s.backend);
                assert_eq!(backend, s.backend.to_string());
            }
            other => panic!("{}: {other:?}", s.backend),
        }
        assert!(f.stray.is_empty(), "{}: {:?}", s.backend, f.stray);
    }
}

#[test]
fn probes_agree_on_what_this_machine_has() {
    for s in workers() {
        let mut w = Live::start(&s, None);
        w.hello();
        let cpu = w.call(
            &Request::Probe {
                device: Device::Cpu,
            },
            &[],
        );
        assert_eq!(
            cpu.message,
            Reply::Probe { unavailable: None },
            "{}",
            s.backend
        );
        // No machine here has 8 GPUs: every worker says why it cannot use cuda:7.
        let far = w.call(
            &Request::Probe {
                device: Device::Cuda(7),
            },
            &[],
        );
        match far.message {
            Reply::Probe {
                unavailable: Some(why),
            } => assert!(!why.is_empty()),
            other => panic!("{}: {other:?}", s.backend),
        }
    }
}

/// The same run through every worker: the same outputs, shapes, and values within a unit of f32
/// roundoff of the first worker's (their kernels differ in summation order only).
#[test]
fn a_run_gives_the_same_outputs_everywhere() {
    for (layer, op) in [
        (Layer::Linear, Op::Backward),
        (Layer::Embedding, Op::Forward),
        (Layer::Conv2d, Op::Merge),
    ] {
        let mut first: Option<(Backend, peft_compat::worker::io::Outputs)> = None;
        for s in workers() {
            let c = case(s.backend, layer, op);
            let (req, payload) = run_request(&c, |_| {});
            let mut w = Live::start(&s, None);
            w.hello();
            let f = w.call(&req, &payload);
            let Reply::Outputs { tensors, .. } = &f.message else {
                panic!("{} {layer} {op}: {:?}", s.backend, f.message);
            };
            let values = protocol::split_payload(tensors, &f.payload).unwrap();
            let got: peft_compat::worker::io::Outputs = tensors
                .iter()
                .zip(values)
                .map(|(h, t)| {
                    let name = peft_compat::worker::io::names::ALL
                        .iter()
                        .find(|n| **n == h.name)
                        .unwrap_or_else(|| panic!("{}: unknown output {}", s.backend, h.name));
                    (*name, t)
                })
                .collect();
            match &first {
                None => first = Some((s.backend, got)),
                Some((b0, want)) => {
                    let names = |o: &peft_compat::worker::io::Outputs| {
                        let mut v: Vec<&str> = o.iter().map(|(n, _)| *n).collect();
                        v.sort();
                        v
                    };
                    assert_eq!(
                        names(&got),
                        names(want),
                        "{} vs {b0} {layer} {op}",
                        s.backend
                    );
                    let u =
                        peft_compat::truth::judge::agreement_units(&got, want, DType::F32).unwrap();
                    // Agreement is relative to the output's largest value, in f32 units.
                    assert!(u <= 64.0, "{} vs {b0} {layer} {op}: {u} u", s.backend);
                }
            }
        }
    }
}

/// An Embedding asked for a token past its table: torch refuses it, in tch and in PEFT alike,
/// and the worker goes on.
#[test]
fn a_refused_case_carries_the_librarys_words_and_the_worker_stays() {
    for s in workers() {
        let c = case(s.backend, Layer::Embedding, Op::Forward);
        let (req, payload) = run_request(&c, |i| i.x.data[0] = 1000.0);
        let mut w = Live::start(&s, None);
        w.hello();
        let f = w.call(&req, &payload);
        match &f.message {
            Reply::Refused { message } => {
                if s.backend.family() != Backend::Candle {
                    assert!(
                        message.contains("index out of range"),
                        "{}: {message}",
                        s.backend
                    );
                }
            }
            other => panic!("{}: {other:?}", s.backend),
        }
        let again = w.call(
            &Request::Probe {
                device: Device::Cpu,
            },
            &[],
        );
        assert!(
            matches!(again.message, Reply::Probe { .. }),
            "{}",
            s.backend
        );
    }
}

#[test]
fn stray_stdout_is_skipped_and_kept_apart() {
    for s in workers() {
        let mut w = Live::start(&s, Some("stray"));
        let f = w.hello();
        assert!(matches!(f.message, Reply::Hello { .. }), "{}", s.backend);
        assert_eq!(
            f.stray,
            vec!["a stray line on stdout (PEFT_COMPAT_WORKER_TEST=stray)".to_string()],
            "{}",
            s.backend
        );
    }
}

#[test]
fn a_failure_in_the_workers_own_code_is_panicked_and_an_abort_ends_the_stream() {
    for s in workers() {
        let c = case(s.backend, Layer::Linear, Op::Forward);
        let (req, payload) = run_request(&c, |_| {});
        let mut w = Live::start(&s, Some("panic"));
        w.hello();
        match w.call(&req, &payload).message {
            Reply::Panicked { message } => assert!(
                message.contains("planted failure in the worker's own code"),
                "{}: {message}",
                s.backend
            ),
            other => panic!("{}: {other:?}", s.backend),
        }
        let mut w = Live::start(&s, Some("abort"));
        w.hello();
        w.send(&req, &payload);
        assert!(w.recv().is_none(), "{}", s.backend);
        let status = w.child.wait().unwrap();
        assert!(!status.success(), "{}: {status}", s.backend);
    }
}

#[test]
fn an_unreadable_request_is_an_error_reply_and_exit_2() {
    for s in workers() {
        let mut w = Live::start(&s, None);
        w.hello();
        w.stdin.write_all(b"PCW1 {not json\n").unwrap();
        w.stdin.flush().unwrap();
        match w.recv().map(|f| f.message) {
            Some(Reply::Error { message }) => assert!(
                message.contains("unreadable request"),
                "{}: {message}",
                s.backend
            ),
            other => panic!("{}: {other:?}", s.backend),
        }
        let status = w.child.wait().unwrap();
        assert_eq!(status.code(), Some(2), "{}", s.backend);
    }
}

/// Files (protocol.rs: a tensor's `file`): a Rust worker takes them only after reading the
/// hello's probe (a path it cannot read keeps everything in the pipe), then reads a weight from
/// the runner's memfd and answers a large output in a memfd of its own, with the very values
/// an all-pipe run gives. The PEFT worker never offers files.
#[cfg(target_os = "linux")]
#[test]
fn files_are_used_only_after_a_readable_probe_and_carry_the_same_values() {
    use std::io::Write;
    let hello = |w: &mut Live, files: Option<String>| match w
        .call(
            &Request::Hello {
                files,
                protocol: protocol::VERSION,
                threads: 1,
            },
            &[],
        )
        .message
    {
        Reply::Hello { files, .. } => files,
        other => panic!("{other:?}"),
    };
    let (mut probe, probe_path) = protocol::memfd().unwrap();
    probe.write_all(protocol::FILES_PROBE).unwrap();
    for s in workers() {
        let rust = s.backend != "peft".parse().unwrap();
        let mut w = Live::start(&s, None);
        assert!(
            !hello(&mut w, Some("/nonexistent/probe".into())),
            "{}",
            s.backend
        );
        let mut w = Live::start(&s, None);
        assert_eq!(
            hello(&mut w, Some(probe_path.clone())),
            rust,
            "{}",
            s.backend
        );
        if !rust {
            continue;
        }
        let mut c = case(s.backend, Layer::Linear, Op::Merge);
        c.shape.in_features = 512;
        c.shape.out_features = 1024;
        let inputs = Draws::generate(&c.shape, c.point.layer, c.point.profile, 7).inputs(
            c.point.dtype,
            c.point.adapter,
            c.point.op,
        );
        let (_weight, weight_path) = protocol::tensor_file(&inputs.weight, DType::F32).unwrap();
        let (req, payload) = protocol::run_request(&c.id(), &c, &inputs, |name, _, _| {
            (name == "base_layer.weight").then(|| weight_path.clone())
        });
        let f = w.call(&req, &payload);
        let Reply::Outputs { tensors, .. } = &f.message else {
            panic!("{}: {:?}", s.backend, f.message);
        };
        assert!(tensors.iter().all(|t| t.file.is_some()), "{tensors:?}");
        let from_files = protocol::split_payload(tensors, &f.payload).unwrap();
        let mut inline = Live::start(&s, None);
        inline.hello();
        let (req, payload) = protocol::run_request(&c.id(), &c, &inputs, |_, _, _| None);
        let f = inline.call(&req, &payload);
        let Reply::Outputs { tensors, .. } = &f.message else {
            panic!("{}: {:?}", s.backend, f.message);
        };
        assert!(tensors.iter().all(|t| t.file.is_none()));
        assert_eq!(
            from_files,
            protocol::split_payload(tensors, &f.payload).unwrap(),
            "{}",
            s.backend
        );
    }
}
