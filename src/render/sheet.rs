//! A support table as data: a title, column and row labels, and cells that each carry their
//! text, their tone and the cases behind them. The terminal and Markdown tables print a cell's
//! text; the HTML page also needs to know which cases a click on it should open, so the grid
//! ([`super::grid`]), the three-path tables ([`super::paths`]) and `compare` hand it sheets,
//! with the very texts and colours the terminal shows.

use crate::report::Report;
use comfy_table::Color;
use std::collections::HashMap;

/// What a cell's colour says, named for its meaning rather than its hue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tone {
    /// Every case passes natively.
    Works,
    /// Only the fp32 upcast path passes.
    Upcast,
    /// A failure no expectation explains.
    Fails,
    /// Every failure is one the matrix expects.
    Expected,
    /// A case passed where a rule declares a failure.
    Surprise,
    /// Nothing ran here.
    Skipped,
    /// Reports disagree (`compare`).
    Differs,
    /// A figure, not a verdict.
    Plain,
}

impl Tone {
    /// The tone of a terminal colour, as the grid and the three-path tables paint cells.
    pub fn of_color(c: Color) -> Tone {
        match c {
            Color::Green => Tone::Works,
            Color::Yellow => Tone::Upcast,
            Color::Red => Tone::Fails,
            Color::Magenta => Tone::Expected,
            Color::Cyan => Tone::Surprise,
            _ => Tone::Skipped,
        }
    }

    /// The CSS class the page styles it with.
    pub fn class(self) -> &'static str {
        match self {
            Tone::Works => "works",
            Tone::Upcast => "upcast",
            Tone::Fails => "fails",
            Tone::Expected => "expected",
            Tone::Surprise => "surprise",
            Tone::Skipped => "skipped",
            Tone::Differs => "differs",
            Tone::Plain => "plain",
        }
    }
}

/// A case of one of the reports a page shows: (report, position in its `cases`).
pub type CaseRef = (usize, usize);

#[derive(Debug, Clone, PartialEq)]
pub struct SheetCell {
    pub text: String,
    pub tone: Tone,
    pub cases: Vec<CaseRef>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Sheet {
    pub title: String,
    pub columns: Vec<String>,
    /// Each row's label and its cells, one per column (`None`: not in the matrix).
    pub rows: Vec<(String, Vec<Option<SheetCell>>)>,
}

/// Each case's position in `report.cases`, by id: reports of a filter or a merge hold cases
/// whose matrix index is not their position.
pub fn positions(report: &Report) -> HashMap<&str, usize> {
    report
        .cases
        .iter()
        .enumerate()
        .map(|(i, c)| (c.id.as_str(), i))
        .collect()
}
