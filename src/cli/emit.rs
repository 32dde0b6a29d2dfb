//! The end of a command: print and write a finished report (table, gate verdict, JSON,
//! Markdown, JUnit, snapshot), and decide the exit code.
//!
//! One place decides what a non-fatal problem does to the exit code ([`Problems`]): an output
//! that could not be written (a report file, the results stream, a dump) is a warning when it
//! happens, every other output is still written, and the command ends with exit code 3 (unless
//! the gate failed, whose 1 says more).

use super::args::{ColorChoice, OutputArgs};
use super::{bad_input, exit, runtime, Failure};
use crate::render::{self, junit};
use crate::report::Report;
use crate::util::plural;
use crate::verdict::gate::{self, GatePolicy};
use crate::verdict::snapshot::{self, Pending};
use std::io::{IsTerminal, Write};
use std::path::Path;

/// Non-fatal problems met on the way: each is printed as a warning when it happens, and the
/// exit code says that some happened.
#[derive(Debug, Default)]
pub struct Problems {
    messages: Vec<String>,
}

impl Problems {
    pub fn warn(&mut self, message: impl Into<String>) {
        let message = message.into();
        eprintln!("warning: {message}");
        self.messages.push(message);
    }

    /// The exit code a command ends with, given its gate's (or a lost backend's): that first,
    /// then any problem, else OK.
    pub fn exit_code(&self, gate: i32) -> i32 {
        match (gate, self.messages.is_empty()) {
            (exit::OK, false) => exit::RUNTIME,
            (code, _) => code,
        }
    }
}

pub fn use_color(choice: ColorChoice) -> bool {
    match choice {
        ColorChoice::Always => true,
        ColorChoice::Never => false,
        ColorChoice::Auto => {
            std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
                && std::io::stdout().is_terminal()
        }
    }
}

/// Print to stdout; a reader that went away (`| head`) ends the output quietly.
pub fn print_out(text: &str) -> Result<(), Failure> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(runtime(e)),
    }
}

/// The command's end, from its gate's exit code and its problems: `Ok` for exit code 0, else
/// the failure the code stands for.
pub fn exit_with(gate: i32, problems: &Problems, matrix: &str) -> Result<(), Failure> {
    let code = problems.exit_code(gate);
    let error = match code {
        exit::OK => return Ok(()),
        exit::GATE_FAILED => anyhow::anyhow!("the gate failed for {matrix}"),
        exit::BACKEND_LOST => anyhow::anyhow!(
            "a backend that should run here could not (see above); its cases were not run"
        ),
        _ => anyhow::anyhow!(
            "{} could not be written (see the warnings above)",
            plural(problems.messages.len(), "output")
        ),
    };
    Err(Failure { code, error })
}

/// Write an output file (atomically: a reader never sees half a report); a failure is a
/// problem, not the end: the other outputs still go out.
pub fn write(path: &Path, what: &str, text: String, problems: &mut Problems) {
    if let Err(e) = crate::util::write_atomic(path, text.as_bytes()) {
        problems.warn(format!("cannot write {what} to {}: {e}", path.display()));
    }
}

/// Print and write a finished report (table, gate, JSON, Markdown, JUnit, snapshot); returns
/// the exit code the gate asks for (outputs that could not be written are in `problems`).
pub fn emit(
    report: &Report,
    out: &OutputArgs,
    matrix_path: &Path,
    problems: &mut Problems,
) -> Result<i32, Failure> {
    let matrix_name = report.matrix.as_str();
    if !out.quiet {
        print_out(&render::render_text(
            report,
            use_color(out.color),
            out.max_findings,
        ))?;
    }
    let verdict = if out.check {
        Some(gate_check(out, matrix_path, matrix_name, report, problems)?)
    } else {
        None
    };
    if out.json.is_some() || out.html.is_some() {
        // What the files carry beyond the run's cases: the gate's verdict and the command.
        let mut full = report.clone();
        full.gate = verdict.as_ref().map(|v| v.record());
        if full.command.is_none() {
            full.command = Some(super::command_line());
        }
        if let Some(path) = &out.json {
            write(path, "the JSON report", full.to_json(), problems);
        }
        if let Some(path) = &out.html {
            write(path, "the HTML page", render::html::page(&full), problems);
        }
    }
    if let Some(path) = &out.markdown {
        let gate = verdict.as_ref().map(|v| (v, matrix_name));
        let text = render::render_markdown(report, gate);
        write(path, "the Markdown summary", text, problems);
    }
    if let Some(path) = &out.junit {
        let text = junit::render(report, verdict.as_ref());
        write(path, "the JUnit file", text, problems);
    }
    if let Some(path) = &out.snapshot_out {
        if snapshot::in_ci() {
            return Err(bad_input(anyhow::anyhow!(
                "--snapshot-out: CI is set, and snapshots are never written under CI"
            )));
        }
        let info = snapshot::Info {
            seed: Some(report.seed),
        };
        let text = snapshot::to_file_text(matrix_name, &info, &snapshot::from_report(report));
        write(path, "the snapshot", text, problems);
    }
    match &verdict {
        Some(v) => Ok(gate_exit_code(v)),
        None => {
            // The gate, when asked, says it; else it is said here, and the exit code says it.
            let lost = report.lost_backends();
            for l in &lost {
                eprintln!("error: backend lost: {}", l.describe());
            }
            Ok(if lost.is_empty() {
                exit::OK
            } else {
                exit::BACKEND_LOST
            })
        }
    }
}

/// The command that writes the observed snapshot for review: the user's matrix, `--snapshot`
/// and `--filter`s (a filtered run's proposal keeps every entry outside the filter).
fn record_command(matrix: &str, out: &OutputArgs, report: &Report) -> String {
    let mut cmd = format!("peft-compat run {matrix} --check");
    for f in &report.filter {
        cmd.push_str(&format!(" --filter '{f}'"));
    }
    if let Some(p) = &out.snapshot {
        cmd.push_str(&format!(" --snapshot {}", p.display()));
    }
    cmd
}

/// The exit code `run --check` ends with for a verdict (tests hold planted changes to it).
pub fn gate_exit_code(v: &gate::Verdict) -> i32 {
    if v.passed() {
        exit::OK
    } else {
        exit::GATE_FAILED
    }
}

/// Compare with the accepted snapshot, print the verdict, and (outside CI) leave the observed
/// snapshot as .snap.new when something changed.
fn gate_check(
    out: &OutputArgs,
    matrix_path: &Path,
    matrix: &str,
    report: &Report,
    problems: &mut Problems,
) -> Result<gate::Verdict, Failure> {
    if let Some(p) = &report.partition {
        return Err(bad_input(anyhow::anyhow!(
            "--check on partition {} of {matrix}: gate the merged report instead",
            p.spec
        )));
    }
    let path = out
        .snapshot
        .clone()
        .unwrap_or_else(|| snapshot::default_path(matrix_path));
    let (info, accepted, missing) = match snapshot::read_with_info(&path) {
        Ok((info, s)) => (info, s, None),
        Err(e @ snapshot::SnapshotError::Missing(_)) => (
            snapshot::Info::default(),
            snapshot::Snapshot::new(),
            Some(e),
        ),
        Err(e) => return Err(bad_input(e)),
    };
    let policy = GatePolicy {
        allow_improvements: out.allow_improvements,
        allow_new: out.allow_new,
    };
    let mut verdict = gate::check_with(report, &accepted, policy);
    verdict.check_seed(info.seed, report.seed);
    verdict.command = Some(record_command(matrix, out, report));
    match &missing {
        // Every case would be listed as missing; say it once.
        Some(e) => print_out(&format!("gate FAILED: {e}\n"))?,
        None => print_out(&render::gate::text(&verdict, matrix))?,
    }
    let observed = snapshot::observed(report, &accepted);
    // Something changed that the snapshot would record (a broken expectation alone has
    // nothing to accept; noise within the drift rules is not a change).
    let changed = !verdict.changes.is_empty() && observed != accepted;
    match snapshot::pending_action(missing.is_some(), changed, snapshot::in_ci()) {
        Pending::Nothing => {}
        Pending::NotUnderCi => print_out("(CI is set: no snapshot written)\n")?,
        Pending::Write => match snapshot::write_pending(
            &path,
            matrix,
            &snapshot::Info {
                seed: Some(report.seed),
            },
            &observed,
        ) {
            Ok(pending) => print_out(&format!(
                "observed snapshot written to {}\n",
                pending.display()
            ))?,
            Err(e) => problems.warn(e.to_string()),
        },
    }
    Ok(verdict)
}
