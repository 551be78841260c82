//! A YAML document as a tree in which every node knows its line and column.
//!
//! Parsing goes through `serde-saphyr` (a maintained YAML 1.2 parser that reports the location of
//! every syntax error) into [`YNode`]s wrapped in `Spanned`. Everything after parsing — unknown
//! keys, wrong types, graph errors — is checked on this tree, so each problem can point at its
//! exact place in the file, and all of them can be reported together.

use std::fmt;
use std::sync::Arc;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};
use serde_saphyr::Spanned;

use crate::diag::{Diagnostic, Loc, Source};

/// A YAML value with its location.
#[derive(Debug, Clone)]
pub struct YNode {
    pub loc: Loc,
    pub source: Option<Arc<Source>>,
    pub kind: YKind,
}

#[derive(Debug, Clone)]
pub enum YKind {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Seq(Vec<YNode>),
    Map(Vec<(YKey, YNode)>),
}

/// A mapping key with its location.
#[derive(Debug, Clone)]
pub struct YKey {
    pub name: String,
    pub loc: Loc,
    /// Where the key was written when that is not where its mapping was (a key a `--set`
    /// override added to a mapping of the file); `None`: the mapping's source.
    pub source: Option<Arc<Source>>,
}

impl YNode {
    pub fn new(kind: YKind) -> Self {
        YNode {
            loc: Loc::UNKNOWN,
            source: None,
            kind,
        }
    }

    /// Human name of the node's YAML type, for messages.
    pub fn type_name(&self) -> &'static str {
        match &self.kind {
            YKind::Null => "null",
            YKind::Bool(_) => "a boolean",
            YKind::Int(_) => "an integer",
            YKind::Float(_) => "a number",
            YKind::Str(_) => "a string",
            YKind::Seq(_) => "a list",
            YKind::Map(_) => "a mapping",
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match &self.kind {
            YKind::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_map(&self) -> Option<&[(YKey, YNode)]> {
        match &self.kind {
            YKind::Map(m) => Some(m),
            _ => None,
        }
    }
    pub fn as_seq(&self) -> Option<&[YNode]> {
        match &self.kind {
            YKind::Seq(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match &self.kind {
            YKind::Int(i) => Some(*i as f64),
            YKind::Float(f) => Some(*f),
            _ => None,
        }
    }
    pub fn get(&self, key: &str) -> Option<&YNode> {
        self.as_map()?
            .iter()
            .find(|(k, _)| k.name == key)
            .map(|(_, v)| v)
    }
    pub fn get_mut(&mut self, key: &str) -> Option<&mut YNode> {
        match &mut self.kind {
            YKind::Map(m) => m.iter_mut().find(|(k, _)| k.name == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// Approximate length of the node's text in the source, for underlining.
    pub fn span_len(&self) -> usize {
        match &self.kind {
            YKind::Str(s) => s.chars().count(),
            YKind::Int(i) => i.to_string().len(),
            YKind::Float(f) => format!("{f}").len(),
            YKind::Bool(b) => b.to_string().len(),
            _ => 1,
        }
    }

    /// An error diagnostic located at this node.
    pub fn error(&self, message: impl Into<String>) -> Diagnostic {
        let d = Diagnostic::error(message);
        match &self.source {
            Some(s) => d.at(s, self.loc, self.span_len()),
            None => d,
        }
    }
    pub fn warning(&self, message: impl Into<String>) -> Diagnostic {
        let d = Diagnostic::warning(message);
        match &self.source {
            Some(s) => d.at(s, self.loc, self.span_len()),
            None => d,
        }
    }

    /// Attach `source` to this node and all its children (and their keys).
    fn set_source(&mut self, source: &Arc<Source>) {
        self.source = Some(source.clone());
        match &mut self.kind {
            YKind::Seq(items) => items.iter_mut().for_each(|n| n.set_source(source)),
            YKind::Map(items) => items.iter_mut().for_each(|(_, n)| n.set_source(source)),
            _ => {}
        }
    }

    /// Convert to JSON (for resolved params and records).
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value as J;
        match &self.kind {
            YKind::Null => J::Null,
            YKind::Bool(b) => J::Bool(*b),
            YKind::Int(i) => J::from(*i),
            YKind::Float(f) => serde_json::Number::from_f64(*f).map_or(J::Null, J::Number),
            YKind::Str(s) => J::String(s.clone()),
            YKind::Seq(items) => J::Array(items.iter().map(YNode::to_json).collect()),
            YKind::Map(items) => J::Object(
                items
                    .iter()
                    .map(|(k, v)| (k.name.clone(), v.to_json()))
                    .collect(),
            ),
        }
    }
}

/// Error diagnostic for a mapping key.
pub fn key_error(
    key: &YKey,
    source: &Option<Arc<Source>>,
    message: impl Into<String>,
) -> Diagnostic {
    let d = Diagnostic::error(message);
    match key.source.as_ref().or(source.as_ref()) {
        Some(s) => d.at(s, key.loc, key.name.chars().count()),
        None => d,
    }
}

fn loc_of(l: &serde_saphyr::Location) -> Loc {
    Loc::new(l.line() as u32, l.column() as u32)
}

impl<'de> Deserialize<'de> for YNode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let spanned = Spanned::<YKind>::deserialize(d)?;
        Ok(YNode {
            loc: loc_of(&spanned.referenced),
            source: None,
            kind: spanned.value,
        })
    }
}

impl<'de> Deserialize<'de> for YKind {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(KindVisitor)
    }
}

struct KindVisitor;

impl<'de> Visitor<'de> for KindVisitor {
    type Value = YKind;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<YKind, E> {
        Ok(YKind::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<YKind, E> {
        Ok(YKind::Int(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<YKind, E> {
        i64::try_from(v)
            .map(YKind::Int)
            .map_err(|_| E::custom(format!("integer {v} is too large")))
    }
    fn visit_i128<E: de::Error>(self, v: i128) -> Result<YKind, E> {
        i64::try_from(v)
            .map(YKind::Int)
            .map_err(|_| E::custom(format!("integer {v} is too large")))
    }
    fn visit_u128<E: de::Error>(self, v: u128) -> Result<YKind, E> {
        i64::try_from(v)
            .map(YKind::Int)
            .map_err(|_| E::custom(format!("integer {v} is too large")))
    }
    fn visit_f64<E>(self, v: f64) -> Result<YKind, E> {
        Ok(YKind::Float(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<YKind, E> {
        Ok(YKind::Str(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<YKind, E> {
        Ok(YKind::Str(v))
    }
    fn visit_unit<E>(self) -> Result<YKind, E> {
        Ok(YKind::Null)
    }
    fn visit_none<E>(self) -> Result<YKind, E> {
        Ok(YKind::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<YKind, D::Error> {
        YKind::deserialize(d)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<YKind, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<YNode>()? {
            items.push(item);
        }
        Ok(YKind::Seq(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<YKind, A::Error> {
        let mut items: Vec<(YKey, YNode)> = Vec::new();
        while let Some(key) = map.next_key::<YNode>()? {
            let name = match &key.kind {
                YKind::Str(s) => s.clone(),
                YKind::Int(i) => i.to_string(),
                YKind::Bool(b) => b.to_string(),
                YKind::Float(f) => f.to_string(),
                _ => {
                    return Err(de::Error::custom(format!(
                        "mapping keys must be plain scalars (line {}, column {})",
                        key.loc.line, key.loc.col
                    )));
                }
            };
            if items.iter().any(|(k, _)| k.name == name) {
                return Err(de::Error::custom(format!(
                    "duplicate key `{name}` (line {}, column {})",
                    key.loc.line, key.loc.col
                )));
            }
            let value = map.next_value::<YNode>()?;
            items.push((
                YKey {
                    name,
                    loc: key.loc,
                    source: None,
                },
                value,
            ));
        }
        Ok(YKind::Map(items))
    }
}

impl Serialize for YNode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match &self.kind {
            YKind::Null => s.serialize_unit(),
            YKind::Bool(b) => s.serialize_bool(*b),
            YKind::Int(i) => s.serialize_i64(*i),
            YKind::Float(f) => s.serialize_f64(*f),
            YKind::Str(v) => s.serialize_str(v),
            YKind::Seq(items) => {
                let mut seq = s.serialize_seq(Some(items.len()))?;
                for i in items {
                    seq.serialize_element(i)?;
                }
                seq.end()
            }
            YKind::Map(items) => {
                let mut m = s.serialize_map(Some(items.len()))?;
                for (k, v) in items {
                    m.serialize_entry(&k.name, v)?;
                }
                m.end()
            }
        }
    }
}

/// The most YAML nodes (scalars, lists and mappings) a pipeline may hold. Real pipelines hold a
/// few hundred; the cap bounds the memory and time a hostile file can cost.
pub const MAX_YAML_NODES: usize = 250_000;
/// The deepest nesting of lists and mappings a pipeline may use.
pub const MAX_YAML_DEPTH: usize = 64;

fn parser_options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_nodes: MAX_YAML_NODES,
            max_depth: MAX_YAML_DEPTH,
        },
    }
}

/// Parse a YAML document. A syntax error comes back as one located diagnostic.
pub fn parse(source: &Arc<Source>) -> Result<YNode, Diagnostic> {
    if source.text.trim().is_empty() {
        return Err(Diagnostic::error("the pipeline file is empty").at(source, Loc::new(1, 1), 1));
    }
    match serde_saphyr::from_str_with_options::<YNode>(&source.text, parser_options()) {
        Ok(mut node) => {
            node.set_source(source);
            Ok(node)
        }
        Err(e) => {
            let loc = e.location().map(|l| loc_of(&l)).unwrap_or(Loc::UNKNOWN);
            if let Some(tab) = indenting_tab(&source.text, loc) {
                return Err(Diagnostic::error(
                    "tabs cannot indent YAML: indent with spaces instead",
                )
                .at(source, tab, 1));
            }
            let loc = match second_document_marker(&e, &source.text, loc) {
                Some(marker) => marker,
                None => loc,
            };
            let msg = match describe(&e, loc) {
                Some(ours) => ours,
                None => format!(
                    "invalid YAML: {}",
                    first_line_without_location(&e.to_string())
                ),
            };
            Err(Diagnostic::error(msg).at(source, loc, 1))
        }
    }
}

/// For a second document, the `---` (or the `...` that ended the first) that starts it: the
/// parser points at the second document's first value, the marker is the place to fix.
fn second_document_marker(e: &serde_saphyr::Error, text: &str, loc: Loc) -> Option<Loc> {
    let mut inner = e;
    while let serde_saphyr::Error::WithSnippet { error, .. } = inner {
        inner = error;
    }
    if !matches!(inner, serde_saphyr::Error::MultipleDocuments { .. }) || !loc.is_known() {
        return None;
    }
    let lines: Vec<&str> = text.lines().take(loc.line as usize).collect();
    let i = lines
        .iter()
        .rposition(|l| l.starts_with("---") || l.starts_with("..."))?;
    (i > 0).then(|| Loc::new(i as u32 + 1, 1))
}

/// Our own words for the parser errors whose text is written for programmers (budget limits,
/// a second document); `None` for the rest.
fn describe(e: &serde_saphyr::Error, loc: Loc) -> Option<String> {
    use serde_saphyr::Error as E;
    use serde_saphyr::budget::BudgetBreach as B;
    let mut e = e;
    while let E::WithSnippet { error, .. } | E::AliasError { error, .. } = e {
        e = error;
    }
    match e {
        E::MultipleDocuments { .. } => Some(if loc.is_known() {
            format!(
                "a pipeline file holds one YAML document; found a second at line {}",
                loc.line
            )
        } else {
            "a pipeline file holds one YAML document; found a second".to_string()
        }),
        E::Budget { breach, .. } => Some(match breach {
            B::Nodes { .. } => format!(
                "the pipeline has more than {MAX_YAML_NODES} YAML nodes (values, lists and \
                 mappings), the limit for a pipeline file"
            ),
            B::Depth { .. } => format!(
                "the pipeline nests lists and mappings more than {MAX_YAML_DEPTH} levels deep, \
                 the limit for a pipeline file"
            ),
            B::Aliases { .. } | B::Anchors { .. } | B::AliasAnchorRatio { .. } => {
                "the pipeline uses too many YAML anchors or aliases (`&name`, `*name`)".to_string()
            }
            B::Documents { .. } => {
                "a pipeline file holds one YAML document; this one holds many".to_string()
            }
            B::ScalarBytes { .. } => {
                "the pipeline's text values are too large in total for a pipeline file".to_string()
            }
            _ => "the pipeline is too large or too complex for a pipeline file".to_string(),
        }),
        _ => None,
    }
}

/// The position of a tab used as indentation (a tab at the start of a line, or after the
/// leading spaces), when one lies before or just after the syntax error at `err` (the parser
/// reports it one line off, or as another error). YAML only allows spaces to indent. Lines of
/// block scalars (`key: |`) may start with tabs after their indentation, so they are skipped.
fn indenting_tab(text: &str, err: Loc) -> Option<Loc> {
    // Indentation (in spaces) of the line that opened the block scalar we are in, if any.
    let mut block: Option<usize> = None;
    for (i, line) in text.lines().enumerate() {
        let line_no = i as u32 + 1;
        if err.is_known() && line_no > err.line + 1 {
            return None;
        }
        let spaces = line.chars().take_while(|c| *c == ' ').count();
        let rest = &line[spaces..];
        if rest.trim().is_empty() || rest.trim_start().starts_with('#') {
            continue; // blank lines and comment lines may hold tabs
        }
        if let Some(opener) = block {
            if spaces > opener {
                continue;
            }
            block = None;
        }
        if rest.starts_with('\t') {
            return Some(Loc::new(line_no, spaces as u32 + 1));
        }
        if opens_block_scalar(rest) {
            block = Some(spaces);
        }
    }
    None
}

/// Whether a line's content ends with a block scalar indicator (`|`, `>-`, `|2+` …).
fn opens_block_scalar(content: &str) -> bool {
    let code = match content.find(" #") {
        Some(i) => &content[..i],
        None => content,
    };
    let last = code.trim_end().rsplit([' ', '\t']).next().unwrap_or("");
    let mut chars = last.chars();
    matches!(chars.next(), Some('|' | '>'))
        && chars.all(|c| matches!(c, '-' | '+') || c.is_ascii_digit())
}

/// serde-saphyr's messages carry their own location and snippet; keep the message line only.
fn first_line_without_location(s: &str) -> String {
    let line = s.lines().find(|l| !l.trim().is_empty()).unwrap_or(s).trim();
    let line = line.strip_prefix("error:").unwrap_or(line).trim();
    // Drop a leading "line X column Y: " or a trailing " at line X column Y" if present.
    let line = match line.strip_prefix("line ").and_then(|r| r.split_once(": ")) {
        Some((pos, rest)) if pos.contains("column") => rest,
        _ => line,
    };
    // Advice meant for programmers using the parser, not for pipeline authors.
    let line = line
        .split(", set DuplicateKeyPolicy")
        .next()
        .unwrap_or(line);
    match line.find(" at line ") {
        Some(i) => line[..i].to_string(),
        None => line.to_string(),
    }
}

/// Parse a `--set` value: YAML scalar/flow syntax (`1e-5`, `true`, `[1, 2]`, `abc`). `col` is
/// the value's column in `source` (the argument), so that the value and everything in it are
/// located there.
pub fn parse_value(text: &str, source: &Arc<Source>, col: u32) -> Result<YNode, Diagnostic> {
    let mut node = match serde_saphyr::from_str_with_options::<YNode>(text, parser_options()) {
        Ok(n) => n,
        Err(_) => YNode::new(YKind::Str(text.to_string())),
    };
    node.set_source(source);
    node.loc = Loc::new(1, 1);
    node.shift_columns(col - 1);
    Ok(node)
}

impl YNode {
    /// Move this node, its children and their keys `by` columns to the right (a value parsed
    /// on its own, then placed in a longer line).
    fn shift_columns(&mut self, by: u32) {
        self.loc.col += by;
        match &mut self.kind {
            YKind::Seq(items) => items.iter_mut().for_each(|n| n.shift_columns(by)),
            YKind::Map(items) => items.iter_mut().for_each(|(k, n)| {
                k.loc.col += by;
                n.shift_columns(by);
            }),
            _ => {}
        }
    }
}

/// Serialize the tree back to YAML text.
pub fn to_yaml_string(node: &YNode) -> Result<String, String> {
    serde_saphyr::to_string(node).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(s: &str) -> Result<YNode, Diagnostic> {
        parse(&Source::new("t.yaml", s))
    }

    #[test]
    fn should_keep_line_and_column_of_nested_values() {
        let n = parse_str("a: 1\nb:\n  c: [1, 2.5, x]\n  d: 1e-5\n").unwrap();
        let c = n.get("b").unwrap().get("c").unwrap();
        assert_eq!(c.loc.line, 3);
        let items = c.as_seq().unwrap();
        assert!(matches!(items[1].kind, YKind::Float(f) if f == 2.5));
        assert!(matches!(items[2].kind, YKind::Str(ref s) if s == "x"));
        assert_eq!(items[2].loc, Loc::new(3, 15));
        let d = n.get("b").unwrap().get("d").unwrap();
        assert!(
            matches!(d.kind, YKind::Float(f) if (f - 1e-5).abs() < 1e-12),
            "{d:?}"
        );
    }

    #[test]
    fn should_report_syntax_errors_with_a_location() {
        let e = parse_str("a: 1\nb: [1, 2\nc: 3\n").unwrap_err();
        assert!(e.loc.is_known(), "{e}");
        assert!(e.message.starts_with("invalid YAML"), "{e}");
    }

    #[test]
    fn should_reject_duplicate_keys() {
        let e = parse_str("a: 1\na: 2\n").unwrap_err();
        assert!(e.message.contains("duplicate mapping key: a"), "{e}");
        assert!(!e.message.contains("DuplicateKeyPolicy"), "{e}");
        assert_eq!(e.loc.line, 2);
    }

    #[test]
    fn should_report_tab_indentation_at_the_tab() {
        for (text, at) in [
            ("\tname: x\nnodes: []\n", Loc::new(1, 1)),
            ("name: x\n\tnodes: []\n", Loc::new(2, 1)),
            ("name: x\nnodes:\n  - id: a\n  \t type: t\n", Loc::new(4, 3)),
        ] {
            let e = parse_str(text).unwrap_err();
            assert!(
                e.message.starts_with("tabs cannot indent YAML"),
                "{text:?}: {e}"
            );
            assert_eq!(e.loc, at, "{text:?}: {e}");
        }
        // Tabs inside a block scalar and in comments are content, not indentation.
        let ok = "doc: |\n  a\n  \tb\n\t# note\nname: x\n";
        assert!(parse_str(ok).is_ok());
        let e = parse_str("doc: |\n  \tb\nname: [\n").unwrap_err();
        assert!(!e.message.contains("tabs"), "{e}");
    }

    #[test]
    fn should_describe_a_second_document_and_budget_breaches_in_our_words() {
        let e = parse_str("name: a\n---\nname: b\n").unwrap_err();
        assert_eq!(
            e.message,
            "a pipeline file holds one YAML document; found a second at line 2"
        );
        assert_eq!(e.loc.line, 2);
        let deep = format!("a: {}{}\n", "[".repeat(80), "]".repeat(80));
        let e = parse_str(&deep).unwrap_err();
        assert!(e.message.contains("more than 64 levels deep"), "{e}");
        let many = format!("a: [{}]\n", vec!["1"; MAX_YAML_NODES + 1].join(","));
        let e = parse_str(&many).unwrap_err();
        assert!(e.message.contains("more than 250000 YAML nodes"), "{e}");
        assert!(!e.message.contains("budget"), "{e}");
    }

    #[test]
    fn should_round_trip_to_yaml() {
        let n = parse_str("name: x\nlist: [1, 2]\nm: {k: v}\n").unwrap();
        let s = to_yaml_string(&n).unwrap();
        let back = parse_str(&s).unwrap();
        assert_eq!(back.to_json(), n.to_json());
    }
}
