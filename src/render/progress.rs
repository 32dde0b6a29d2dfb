//! Progress while a run goes: a bar with counts per outcome on a terminal; one plain line every
//! 5 s (and at every tenth of the run, at most once a second) otherwise, so a CI log is never silent for
//! minutes; nothing under `--quiet`.

use crate::exec::Event;
use crate::outcome::OutcomeKind;
use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, Instant};

/// How often a plain line is printed at most, when not on a terminal.
const PLAIN_EVERY: Duration = Duration::from_secs(5);

pub enum Style {
    Bar,
    Plain,
    Quiet,
}

pub struct Progress {
    style: Style,
    bar: indicatif::ProgressBar,
    total: usize,
    done: usize,
    counts: BTreeMap<OutcomeKind, usize>,
    started: Instant,
    last_line: Instant,
    last_tenth: usize,
    /// `run 2/3: ` when a run repeats.
    prefix: String,
}

impl Progress {
    pub fn new(style: Style) -> Progress {
        let bar = match style {
            Style::Bar => indicatif::ProgressBar::new(0),
            Style::Plain | Style::Quiet => indicatif::ProgressBar::hidden(),
        };
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} {elapsed} [{prefix}] {wide_msg}",
            )
            .expect("valid template"),
        );
        Progress {
            style,
            bar,
            total: 0,
            done: 0,
            counts: BTreeMap::new(),
            started: Instant::now(),
            last_line: Instant::now(),
            last_tenth: 0,
            prefix: String::new(),
        }
    }

    pub fn set_prefix(&mut self, p: String) {
        self.prefix = p;
    }

    fn counts_text(&self) -> String {
        self.counts
            .iter()
            .filter(|(_, &n)| n > 0)
            .map(|(k, n)| format!("{k} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn plain_line(&mut self) {
        self.last_line = Instant::now();
        eprintln!(
            "peft-compat: {}{}/{} cases ({}) {:.1} s",
            self.prefix,
            self.done,
            self.total,
            self.counts_text(),
            self.started.elapsed().as_secs_f64()
        );
        let _ = std::io::stderr().flush();
    }

    pub fn event(&mut self, e: &Event) {
        match e {
            Event::RunStarted { total } => {
                self.total = *total;
                self.done = 0;
                self.counts.clear();
                self.started = Instant::now();
                self.last_line = Instant::now();
                self.last_tenth = 0;
                self.bar.set_length(*total as u64);
                self.bar.set_position(0);
            }
            Event::CaseStarted { case, .. } => {
                if let Style::Bar = self.style {
                    self.bar
                        .set_message(format!("{}{}", self.prefix, case.id()));
                }
            }
            Event::CaseFinished { result } => {
                self.done += 1;
                *self.counts.entry(result.outcome.kind()).or_default() += 1;
                match self.style {
                    Style::Bar => {
                        self.bar.inc(1);
                        self.bar.set_prefix(self.counts_text());
                    }
                    Style::Plain => {
                        let tenth = self.done * 10 / self.total.max(1);
                        let since = self.last_line.elapsed();
                        let step = tenth > self.last_tenth && since >= Duration::from_secs(1);
                        if since >= PLAIN_EVERY || step {
                            self.last_tenth = tenth;
                            self.plain_line();
                        }
                    }
                    Style::Quiet => {}
                }
            }
            Event::RunFinished { .. } => self.bar.finish_and_clear(),
        }
    }
}
