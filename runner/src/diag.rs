//! Diagnostics: errors and warnings that point at a file, line and column.
//!
//! Validation collects every problem it finds into a [`Diagnostics`] list (never stopping at the
//! first), and renders each one with a snippet of the offending line, like a compiler would:
//!
//! ```text
//! error: unknown node type `one_step_samplr` (did you mean `one_step_sampler`?)
//!   --> pipelines/tafs_grpo.yaml:12:11
//!    |
//! 12 |     type: one_step_samplr
//!    |           ^^^^^^^^^^^^^^^
//! ```

use std::fmt;
use std::sync::Arc;

/// A position in a source file (1-based line and column; 0 means unknown).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct Loc {
    pub line: u32,
    pub col: u32,
}

impl Loc {
    pub const UNKNOWN: Loc = Loc { line: 0, col: 0 };
    pub fn new(line: u32, col: u32) -> Self {
        Loc { line, col }
    }
    pub fn is_known(&self) -> bool {
        self.line > 0
    }
}

/// The widest excerpt line a diagnostic shows, in characters; a longer line is cut around the
/// column at fault, with an ellipsis on the side(s) cut.
pub const MAX_EXCERPT_CHARS: usize = 120;
/// How many characters before the column at fault a cut excerpt keeps.
const EXCERPT_CONTEXT_BEFORE: usize = 40;

/// Where a value came from: a named source (a file, or `--set`) with its text, for snippets.
#[derive(Debug, Clone)]
pub struct Source {
    pub name: String,
    pub text: Arc<str>,
    /// A command-line argument (one line, the name says which) rather than a file: positions
    /// read `--set a.b=1` rather than `file:line:col`.
    pub argument: bool,
}

impl Source {
    pub fn new(name: impl Into<String>, text: impl Into<Arc<str>>) -> Arc<Source> {
        Arc::new(Source {
            name: name.into(),
            text: text.into(),
            argument: false,
        })
    }
    /// A command-line argument as a source: `text` is the argument as typed (e.g.
    /// `--set nodes.update.params.lr=1e-5`), and also its name.
    pub fn argument(text: impl Into<String>) -> Arc<Source> {
        let text = text.into();
        Arc::new(Source {
            name: text.clone(),
            text: text.into(),
            argument: true,
        })
    }
    fn line(&self, line: u32) -> Option<&str> {
        if line == 0 {
            return None;
        }
        self.text.lines().nth(line as usize - 1)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Warning,
}

/// One problem found in a pipeline, located in its source.
#[derive(Debug, Clone)]
pub struct Diagnostic {
    pub severity: Severity,
    pub message: String,
    pub source: Option<Arc<Source>>,
    pub loc: Loc,
    /// Length of the underlined span in characters (at least 1).
    pub len: usize,
    pub help: Option<String>,
}

impl Diagnostic {
    pub fn error(message: impl Into<String>) -> Self {
        Diagnostic {
            severity: Severity::Error,
            message: message.into(),
            source: None,
            loc: Loc::UNKNOWN,
            len: 1,
            help: None,
        }
    }
    pub fn warning(message: impl Into<String>) -> Self {
        Diagnostic {
            severity: Severity::Warning,
            ..Diagnostic::error(message)
        }
    }
    pub fn at(mut self, source: &Arc<Source>, loc: Loc, len: usize) -> Self {
        self.source = Some(source.clone());
        self.loc = loc;
        self.len = len.max(1);
        self
    }
    pub fn help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }
    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }

    /// `file:line:col` (or just the file, or nothing) for this diagnostic.
    pub fn position(&self) -> String {
        match (&self.source, self.loc.is_known()) {
            (Some(s), true) if s.argument => format!("{}, column {}", s.name, self.loc.col),
            (Some(s), true) => format!("{}:{}:{}", s.name, self.loc.line, self.loc.col),
            (Some(s), false) => s.name.clone(),
            (None, _) => String::new(),
        }
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        writeln!(f, "{kind}: {}", self.message)?;
        let pos = self.position();
        if !pos.is_empty() {
            let argument = self.source.as_ref().is_some_and(|s| s.argument);
            let line_no = if argument {
                String::new()
            } else {
                self.loc.line.to_string()
            };
            let pad = " ".repeat(line_no.len().max(1));
            writeln!(f, "{pad}--> {pos}")?;
            if let Some(text) = self.source.as_ref().and_then(|s| s.line(self.loc.line)) {
                let (shown, caret) = excerpt(text, self.loc.col as usize, self.len);
                writeln!(f, "{pad} |")?;
                writeln!(f, "{line_no:>w$} | {shown}", w = pad.len())?;
                writeln!(f, "{pad} | {caret}")?;
            }
        }
        if let Some(help) = &self.help {
            writeln!(f, "  = help: {help}")?;
        }
        Ok(())
    }
}

/// The excerpt of `line` to show and the caret line under it, for a span of `len` characters at
/// 1-based character column `col`. A line longer than [`MAX_EXCERPT_CHARS`] is cut to a window
/// around the column, marked with `…`; tabs before the caret are repeated in the caret line so
/// that the caret stays under its character however the terminal expands them.
fn excerpt(line: &str, col: usize, len: usize) -> (String, String) {
    let chars: Vec<char> = line.chars().collect();
    let n = chars.len();
    let col = col.saturating_sub(1).min(n);
    let (start, end) = if n <= MAX_EXCERPT_CHARS {
        (0, n)
    } else {
        let start = col.saturating_sub(EXCERPT_CONTEXT_BEFORE);
        let end = (start + MAX_EXCERPT_CHARS).min(n);
        (end.saturating_sub(MAX_EXCERPT_CHARS).min(start), end)
    };
    let mut shown = String::new();
    let mut caret = String::new();
    if start > 0 {
        shown.push('…');
        caret.push(' ');
    }
    shown.extend(&chars[start..end]);
    if end < n {
        shown.push('…');
    }
    caret.extend(
        chars[start..col]
            .iter()
            .map(|&c| if c == '\t' { '\t' } else { ' ' }),
    );
    let len = len.min(end.saturating_sub(col)).max(1);
    caret.push_str(&"^".repeat(len));
    (shown, caret)
}

/// An ordered collection of diagnostics.
#[derive(Debug, Clone, Default)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl Diagnostics {
    pub fn push(&mut self, d: Diagnostic) {
        self.0.push(d);
    }
    pub fn has_errors(&self) -> bool {
        self.0.iter().any(Diagnostic::is_error)
    }
    pub fn errors(&self) -> impl Iterator<Item = &Diagnostic> {
        self.0.iter().filter(|d| d.is_error())
    }
    pub fn warnings(&self) -> impl Iterator<Item = &Diagnostic> {
        self.0.iter().filter(|d| !d.is_error())
    }
    pub fn extend(&mut self, other: Diagnostics) {
        self.0.extend(other.0);
    }
    /// Sort by position so the report reads top to bottom.
    pub fn sort(&mut self) {
        self.0.sort_by(|a, b| {
            let ka = (a.source.as_ref().map(|s| s.name.clone()), a.loc);
            let kb = (b.source.as_ref().map(|s| s.name.clone()), b.loc);
            ka.cmp(&kb)
        });
    }
    /// Drop repeated diagnostics (the same message at the same place, e.g. from the K expanded
    /// copies of a node in a repeat block) and cascades (a second error at the same place).
    pub fn dedup(&mut self) {
        let mut seen = std::collections::HashSet::new();
        self.0.retain(|d| {
            seen.insert((
                d.source.as_ref().map(|s| s.name.clone()),
                d.loc,
                d.message.clone(),
            ))
        });
        // One error per place: later errors at a known position already reported are
        // consequences of the first (e.g. a `$var` left unsubstituted, then mistyped).
        let mut places = std::collections::HashSet::new();
        self.0.retain(|d| {
            !d.is_error()
                || !d.loc.is_known()
                || places.insert((d.source.as_ref().map(|s| s.name.clone()), d.loc))
        });
    }
    pub fn error_count(&self) -> usize {
        self.errors().count()
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for d in &self.0 {
            writeln!(f, "{d}")?;
        }
        let n = self.error_count();
        let w = self.0.len() - n;
        if n > 0 {
            write!(
                f,
                "{n} error{} and {w} warning{} found",
                if n == 1 { "" } else { "s" },
                if w == 1 { "" } else { "s" }
            )?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostics {}

/// The closest candidate to `name` by edit distance, if it is close enough to be a likely typo.
pub fn did_you_mean<'a>(
    name: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<String> {
    let mut best: Option<(f64, &str)> = None;
    for c in candidates {
        let score = strsim::jaro_winkler(name, c);
        if score > 0.8 && best.is_none_or(|(s, _)| score > s) {
            best = Some((score, c));
        }
    }
    best.map(|(_, c)| c.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn should_render_snippet_with_caret_under_the_span() {
        let src = Source::new("p.yaml", "a: 1\nnodes:\n  - type: foo\n");
        let d = Diagnostic::error("unknown node type `foo`")
            .at(&src, Loc::new(3, 11), 3)
            .help("see `flowrun nodes`");
        let s = d.to_string();
        assert!(s.contains("--> p.yaml:3:11"), "{s}");
        assert!(s.contains("3 |   - type: foo"), "{s}");
        assert!(s.contains("  |           ^^^"), "{s}");
        assert!(s.contains("help: see"), "{s}");
    }

    #[test]
    fn should_cut_long_lines_around_the_column_keeping_the_caret_under_it() {
        let line = format!("{}BAD{}", "a".repeat(5000), "b".repeat(5000));
        let (shown, caret) = excerpt(&line, 5001, 3);
        assert!(shown.chars().count() <= MAX_EXCERPT_CHARS + 2, "{shown}");
        assert!(shown.starts_with('…') && shown.ends_with('…'), "{shown}");
        let at = caret.chars().position(|c| c == '^').unwrap();
        let under: String = shown.chars().skip(at).take(3).collect();
        assert_eq!(under, "BAD");
        assert_eq!(caret.matches('^').count(), 3);
        // Near the end: cut on the left only, the window still full.
        let (shown, caret) = excerpt(&line, 10_003, 1);
        assert!(shown.starts_with('…') && !shown.ends_with('…'), "{shown}");
        assert_eq!(shown.chars().count(), MAX_EXCERPT_CHARS + 1);
        let at = caret.chars().position(|c| c == '^').unwrap();
        assert_eq!(shown.chars().nth(at), Some('b'));
        // Short lines are shown whole; tabs before the caret are kept so it stays aligned.
        let (shown, caret) = excerpt("\tkey:\tvalue", 7, 5);
        assert_eq!(shown, "\tkey:\tvalue");
        assert_eq!(caret, "\t    \t^^^^^");
    }

    #[test]
    fn should_locate_argument_sources_by_column() {
        let src = Source::argument("--set a.b=1");
        let d = Diagnostic::error("bad").at(&src, Loc::new(1, 9), 1);
        let s = d.to_string();
        assert!(s.contains("--> --set a.b=1, column 9"), "{s}");
        assert!(s.contains("  | --set a.b=1\n  |         ^\n"), "{s}");
    }

    #[test]
    fn should_suggest_close_names_only() {
        let c = ["one_step_sampler", "annealed_renoiser"];
        assert_eq!(
            did_you_mean("one_step_samplr", c).as_deref(),
            Some("one_step_sampler")
        );
        assert_eq!(did_you_mean("zzz", c), None);
    }
}
