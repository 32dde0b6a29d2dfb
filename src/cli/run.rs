//! `run`: execute a plan with its observers (the progress display and the results stream, each
//! finished case converted to its report form once), then finish: the partial table of an
//! interrupted run, or the outputs, `--record`'s rules and the exit code.

use super::args::RunArgs;
use super::emit::{self, exit_with, print_out, use_color, Problems};
use super::plan::{self, RunPlan};
use super::{bad_input, exit, Failure};
use crate::environment::Environment;
use crate::exec::{self, Event, Workers};
use crate::render::progress::{Progress, Style};
use crate::render::render_text;
use crate::report::stream::{self, Writer};
use crate::report::{CaseReport, PartitionInfo, Report};
use crate::verdict::{self, record};
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// `peft-compat run`: plan, execute, finish.
pub fn run_matrix(args: RunArgs) -> Result<(), Failure> {
    let mut plan = plan::plan(&args)?;
    let mut problems = Problems::default();
    let executed = execute(&mut plan, &args, &mut problems)?;
    finish(plan, executed, &args, problems)
}

/// What the runs produced.
struct Executed {
    /// One report per run of the selection (more than one under `--record --repeats`).
    reports: Vec<Report>,
    environment: Environment,
    interrupted: bool,
}

/// Ctrl-C (or SIGTERM, SIGHUP: what CI cancellation and `timeout` send) once: stop starting
/// cases, keep what finished, print the partial table, exit 130. Twice: leave now.
fn install_interrupt(stop: Arc<AtomicBool>) {
    let _ = ctrlc::set_handler(move || {
        if stop.swap(true, Ordering::SeqCst) {
            std::process::exit(exit::INTERRUPTED);
        }
        eprintln!("\npeft-compat: interrupted; stopping (Ctrl-C again to leave at once)");
    });
}

/// Start the workers the selection needs and run it `plan.runs` times; the first run's cases
/// go to the results stream as they finish.
fn execute(
    plan: &mut RunPlan,
    args: &RunArgs,
    problems: &mut Problems,
) -> Result<Executed, Failure> {
    let mut pairs: Vec<_> = plan
        .to_run
        .iter()
        .map(|&i| {
            (
                plan.matrix.cases[i].point.backend,
                plan.matrix.cases[i].point.device,
            )
        })
        .collect();
    pairs.sort();
    pairs.dedup();
    // The workers first: the stream's header records the builds they report.
    let workers = Workers::start(plan.workers.clone(), &pairs, plan.pool.clone());
    let now = Environment::of_workers(&workers.info);
    let environment = match &plan.resumed {
        Some(r) => stream::resumed_environment(&plan.stream_path, r.environment.as_ref(), &now)
            .map_err(bad_input)?,
        None => now,
    };
    plan.header.environment = Some(environment.clone());
    // The stream is an output like the others: one that cannot be written is a problem (the
    // run goes on, and --resume cannot continue it), not the end.
    let opened = match &plan.resumed {
        Some(r) => Writer::append(&plan.stream_path, r.complete),
        None => Writer::create(&plan.stream_path, &plan.header),
    };
    let mut stream_error = None;
    let mut writer = opened.map_err(|e| stream_error = Some(e)).ok();
    install_interrupt(Arc::clone(&plan.options.stop));
    let style = if args.out.quiet {
        Style::Quiet
    } else if std::io::stderr().is_terminal() {
        Style::Bar
    } else {
        Style::Plain
    };
    let mut progress = Progress::new(style);
    let mut reports = Vec::with_capacity(plan.runs);
    let mut interrupted = false;
    for run in 0..plan.runs {
        if plan.runs > 1 {
            progress.set_prefix(format!("run {}/{}: ", run + 1, plan.runs));
        }
        let mut cases: Vec<CaseReport> = if run + 1 == plan.runs {
            std::mem::take(&mut plan.finished)
        } else {
            plan.finished.clone()
        };
        let (elapsed, stopped) = exec::run_streaming(
            &plan.matrix,
            Some(&plan.to_run),
            &workers,
            &plan.options,
            &mut |e| {
                progress.event(&e);
                if let Event::CaseFinished { result } = &e {
                    let c = CaseReport::from_result(result);
                    if let (0, Some(w)) = (run, writer.as_mut()) {
                        if let Err(e) = w.case(&c) {
                            stream_error = Some(e);
                            writer = None;
                        }
                    }
                    cases.push(c);
                }
            },
        );
        let elapsed = elapsed.as_secs_f64();
        let mut report = verdict::assemble(
            &plan.name,
            &plan.matrix,
            environment.clone(),
            cases,
            elapsed,
        );
        report.threads = Some(plan.pool.threads);
        report.filter = args.filter.clone();
        report.matrix_fnv = Some(plan.matrix.fingerprint.clone());
        report.dump = args.dump.as_ref().map(|d| d.display().to_string());
        reports.push(report);
        if stopped {
            interrupted = true;
            break;
        }
    }
    drop(workers);
    if let Some(e) = stream_error {
        problems.warn(format!("{e} (--resume cannot continue this run)"));
    }
    Ok(Executed {
        reports,
        environment,
        interrupted,
    })
}

/// The end of a run: the partial table and the resume hint when interrupted; else the outputs,
/// `--record`'s rules, and the exit code.
fn finish(
    mut plan: RunPlan,
    executed: Executed,
    args: &RunArgs,
    mut problems: Problems,
) -> Result<(), Failure> {
    let Executed {
        mut reports,
        environment,
        interrupted,
    } = executed;
    if let (Some(p), Some(last)) = (args.partition, reports.last_mut()) {
        last.partition = Some(PartitionInfo {
            spec: p.to_string(),
            selected: plan.selection.before_partition,
            filter: args.filter.clone(),
        });
    }
    let report = reports.last().expect("at least one run");
    if interrupted {
        if !args.out.quiet {
            print_out(&render_text(
                report,
                use_color(args.out.color),
                args.out.max_findings,
            ))?;
        }
        eprintln!(
            "interrupted: {} of {} cases finished, each kept in {}; \
             `peft-compat run {} --resume` (with the same flags) runs the rest",
            report.cases.len(),
            plan.header.total,
            plan.stream_path.display(),
            plan.name
        );
        return Err(Failure {
            code: exit::INTERRUPTED,
            error: anyhow::anyhow!("interrupted"),
        });
    }
    for c in report.cases.iter() {
        if let Some(e) = &c.dump_error {
            problems.warn(format!("{}: {e}", c.id));
        }
    }
    let code = emit::emit(report, &args.out, &args.matrix, &mut problems)?;
    if let Some(path) = &args.record {
        let m = &mut plan.matrix;
        m.cases
            .retain(|c| report.cases.iter().any(|r| r.id == c.id()));
        let recorded = record::record(m, &reports);
        let text = recorded.to_yaml(&plan.name, &environment);
        emit::write(path, "the recorded expectations", text, &mut problems);
        print_out(&format!(
            "{}\n",
            record::summary(&recorded, &path.display().to_string())
        ))?;
    }
    exit_with(code, &problems, &plan.name)
}
