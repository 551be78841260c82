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
    match source {
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
            items.push((YKey { name, loc: key.loc }, value));
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

/// Parse a YAML document. A syntax error comes back as one located diagnostic.
pub fn parse(source: &Arc<Source>) -> Result<YNode, Diagnostic> {
    if source.text.trim().is_empty() {
        return Err(Diagnostic::error("the pipeline file is empty").at(source, Loc::new(1, 1), 1));
    }
    match serde_saphyr::from_str::<YNode>(&source.text) {
        Ok(mut node) => {
            node.set_source(source);
            Ok(node)
        }
        Err(e) => {
            let loc = e.location().map(|l| loc_of(&l)).unwrap_or(Loc::UNKNOWN);
            let msg = first_line_without_location(&e.to_string());
            let d = Diagnostic::error(format!("invalid YAML: {msg}"));
            Err(if loc.is_known() {
                d.at(source, loc, 1)
            } else {
                d.at(source, Loc::UNKNOWN, 1)
            })
        }
    }
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

/// Parse a `--set` value: YAML scalar/flow syntax (`1e-5`, `true`, `[1, 2]`, `abc`).
pub fn parse_value(text: &str, source: &Arc<Source>) -> Result<YNode, Diagnostic> {
    let mut node = match serde_saphyr::from_str::<YNode>(text) {
        Ok(n) => n,
        Err(_) => YNode::new(YKind::Str(text.to_string())),
    };
    node.set_source(source);
    node.loc = Loc::new(1, 1);
    Ok(node)
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
    fn should_round_trip_to_yaml() {
        let n = parse_str("name: x\nlist: [1, 2]\nm: {k: v}\n").unwrap();
        let s = to_yaml_string(&n).unwrap();
        let back = parse_str(&s).unwrap();
        assert_eq!(back.to_json(), n.to_json());
    }
}
