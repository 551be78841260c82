//! Typed node parameters: their declared schema and validated values.

use std::collections::BTreeMap;
use std::fmt;

use crate::diag::{Diagnostic, Diagnostics, did_you_mean};
use crate::yaml::{YKind, YNode, key_error};

/// A parameter value after validation.
#[derive(Debug, Clone, PartialEq)]
pub enum ParamValue {
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    FloatList(Vec<f64>),
    IntList(Vec<i64>),
    /// Free-form value (e.g. a nested config), kept as JSON.
    Json(serde_json::Value),
}

impl fmt::Display for ParamValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParamValue::Bool(b) => write!(f, "{b}"),
            ParamValue::Int(i) => write!(f, "{i}"),
            ParamValue::Float(x) => write!(f, "{x}"),
            ParamValue::Str(s) => write!(f, "{s:?}"),
            ParamValue::FloatList(v) => write!(f, "{v:?}"),
            ParamValue::IntList(v) => write!(f, "{v:?}"),
            ParamValue::Json(j) => write!(f, "{j}"),
        }
    }
}

impl ParamValue {
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            ParamValue::Bool(b) => (*b).into(),
            ParamValue::Int(i) => (*i).into(),
            ParamValue::Float(x) => serde_json::json!(x),
            ParamValue::Str(s) => s.clone().into(),
            ParamValue::FloatList(v) => serde_json::json!(v),
            ParamValue::IntList(v) => serde_json::json!(v),
            ParamValue::Json(j) => j.clone(),
        }
    }
}

/// The declared type of a parameter.
#[derive(Debug, Clone)]
pub enum ParamKind {
    Bool,
    Int {
        min: i64,
        max: i64,
    },
    Float {
        min: f64,
        max: f64,
    },
    Str,
    /// A path to a file or directory (relative paths are relative to the working directory).
    Path,
    Enum(&'static [&'static str]),
    FloatList {
        min: f64,
        max: f64,
    },
    IntList {
        min: i64,
        max: i64,
    },
    /// Any YAML value (nested configuration), passed on as JSON.
    Any,
}

impl ParamKind {
    pub fn describe(&self) -> String {
        match self {
            ParamKind::Bool => "bool".into(),
            ParamKind::Int { min, max } => range_desc(
                "int",
                *min as f64,
                *max as f64,
                i64::MIN as f64,
                i64::MAX as f64,
            ),
            ParamKind::Float { min, max } => {
                range_desc("float", *min, *max, f64::NEG_INFINITY, f64::INFINITY)
            }
            ParamKind::Str => "string".into(),
            ParamKind::Path => "path".into(),
            ParamKind::Enum(v) => format!("one of {}", v.join(" | ")),
            ParamKind::FloatList { min, max } => range_desc(
                "list of float",
                *min,
                *max,
                f64::NEG_INFINITY,
                f64::INFINITY,
            ),
            ParamKind::IntList { min, max } => range_desc(
                "list of int",
                *min as f64,
                *max as f64,
                i64::MIN as f64,
                i64::MAX as f64,
            ),
            ParamKind::Any => "any".into(),
        }
    }
}

fn range_desc(name: &str, min: f64, max: f64, lo: f64, hi: f64) -> String {
    match (min > lo, max < hi) {
        (true, true) => format!("{name} in [{min}, {max}]"),
        (true, false) => format!("{name} >= {min}"),
        (false, true) => format!("{name} <= {max}"),
        (false, false) => name.to_string(),
    }
}

/// Declaration of one parameter of a node or resource type.
#[derive(Debug, Clone)]
pub struct ParamDef {
    pub name: &'static str,
    pub kind: ParamKind,
    /// `None`: the parameter is required.
    pub default: Option<ParamValue>,
    pub doc: &'static str,
}

impl ParamDef {
    pub fn new(name: &'static str, kind: ParamKind, doc: &'static str) -> Self {
        ParamDef {
            name,
            kind,
            default: None,
            doc,
        }
    }
    pub fn default(mut self, v: ParamValue) -> Self {
        self.default = Some(v);
        self
    }
    // Short constructors for the common cases.
    pub fn float(name: &'static str, default: f64, min: f64, max: f64, doc: &'static str) -> Self {
        Self::new(name, ParamKind::Float { min, max }, doc).default(ParamValue::Float(default))
    }
    pub fn int(name: &'static str, default: i64, min: i64, max: i64, doc: &'static str) -> Self {
        Self::new(name, ParamKind::Int { min, max }, doc).default(ParamValue::Int(default))
    }
    pub fn boolean(name: &'static str, default: bool, doc: &'static str) -> Self {
        Self::new(name, ParamKind::Bool, doc).default(ParamValue::Bool(default))
    }
    pub fn string(name: &'static str, default: &str, doc: &'static str) -> Self {
        Self::new(name, ParamKind::Str, doc).default(ParamValue::Str(default.to_string()))
    }
    pub fn choice(
        name: &'static str,
        default: &str,
        options: &'static [&'static str],
        doc: &'static str,
    ) -> Self {
        Self::new(name, ParamKind::Enum(options), doc).default(ParamValue::Str(default.to_string()))
    }
}

/// Validated parameters of one node instance. All declared parameters are present (defaults
/// filled in), so accessors only fail on a programming error, which they report as an error.
#[derive(Debug, Clone, Default)]
pub struct Params {
    pub values: BTreeMap<String, ParamValue>,
    /// Who these belong to, for error messages (`node `update``).
    pub owner: String,
    /// Where each parameter given in the file was written (its value's node), and where the
    /// owner was declared: for checks after compilation ([`Params::error`]).
    pub at: BTreeMap<String, YNode>,
    pub owner_at: Option<YNode>,
}

impl Params {
    /// An error located at parameter `name` as written in the file (or at the owner when the
    /// default was used), prefixed with the parameter and its owner.
    pub fn error(&self, name: &str, message: impl std::fmt::Display) -> Diagnostic {
        let text = format!("parameter `{name}` of {}: {message}", self.owner);
        match (self.at.get(name), &self.owner_at) {
            (Some(n), _) | (None, Some(n)) => n.error(text),
            (None, None) => Diagnostic::error(text),
        }
    }

    fn get(&self, name: &str) -> anyhow::Result<&ParamValue> {
        self.values
            .get(name)
            .ok_or_else(|| anyhow::anyhow!("{}: parameter `{name}` is not declared", self.owner))
    }
    pub fn f64(&self, name: &str) -> anyhow::Result<f64> {
        match self.get(name)? {
            ParamValue::Float(x) => Ok(*x),
            ParamValue::Int(i) => Ok(*i as f64),
            other => anyhow::bail!(
                "{}: parameter `{name}` is {other}, not a number",
                self.owner
            ),
        }
    }
    pub fn f32(&self, name: &str) -> anyhow::Result<f32> {
        Ok(self.f64(name)? as f32)
    }
    pub fn i64(&self, name: &str) -> anyhow::Result<i64> {
        match self.get(name)? {
            ParamValue::Int(i) => Ok(*i),
            other => anyhow::bail!(
                "{}: parameter `{name}` is {other}, not an integer",
                self.owner
            ),
        }
    }
    pub fn usize(&self, name: &str) -> anyhow::Result<usize> {
        let v = self.i64(name)?;
        usize::try_from(v).map_err(|_| {
            anyhow::anyhow!("{}: parameter `{name}` must be >= 0, got {v}", self.owner)
        })
    }
    pub fn bool(&self, name: &str) -> anyhow::Result<bool> {
        match self.get(name)? {
            ParamValue::Bool(b) => Ok(*b),
            other => anyhow::bail!(
                "{}: parameter `{name}` is {other}, not a boolean",
                self.owner
            ),
        }
    }
    pub fn str(&self, name: &str) -> anyhow::Result<&str> {
        match self.get(name)? {
            ParamValue::Str(s) => Ok(s),
            other => anyhow::bail!(
                "{}: parameter `{name}` is {other}, not a string",
                self.owner
            ),
        }
    }
    /// Optional string: empty string means unset.
    pub fn opt_str(&self, name: &str) -> anyhow::Result<Option<&str>> {
        let s = self.str(name)?;
        Ok(if s.is_empty() { None } else { Some(s) })
    }
    pub fn f64_list(&self, name: &str) -> anyhow::Result<Vec<f64>> {
        match self.get(name)? {
            ParamValue::FloatList(v) => Ok(v.clone()),
            ParamValue::Float(x) => Ok(vec![*x]),
            other => anyhow::bail!("{}: parameter `{name}` is {other}, not a list", self.owner),
        }
    }
    pub fn i64_list(&self, name: &str) -> anyhow::Result<Vec<i64>> {
        match self.get(name)? {
            ParamValue::IntList(v) => Ok(v.clone()),
            ParamValue::Int(x) => Ok(vec![*x]),
            other => anyhow::bail!(
                "{}: parameter `{name}` is {other}, not a list of integers",
                self.owner
            ),
        }
    }
    /// A list of non-negative integers (declared with `min` ≥ 0).
    pub fn usize_list(&self, name: &str) -> anyhow::Result<Vec<usize>> {
        self.i64_list(name)?
            .into_iter()
            .map(|v| {
                usize::try_from(v).map_err(|_| {
                    anyhow::anyhow!("{}: parameter `{name}` holds {v}, below 0", self.owner)
                })
            })
            .collect()
    }
    pub fn json(&self, name: &str) -> anyhow::Result<serde_json::Value> {
        Ok(self.get(name)?.to_json())
    }
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::Value::Object(
            self.values
                .iter()
                .map(|(k, v)| (k.clone(), v.to_json()))
                .collect(),
        )
    }
}

/// Check `node` (a mapping of params, or absent) against `defs`; report every problem.
pub fn validate_params(
    owner: &str,
    node: Option<&YNode>,
    defs: &[ParamDef],
    diags: &mut Diagnostics,
    fallback: &YNode,
) -> Params {
    let mut values = BTreeMap::new();
    let mut at = BTreeMap::new();
    let entries: &[(crate::yaml::YKey, YNode)] = match node {
        None => &[],
        Some(n) => match &n.kind {
            YKind::Map(m) => m,
            YKind::Null => &[],
            _ => {
                diags.push(n.error(format!(
                    "`params` of {owner} must be a mapping, found {}",
                    n.type_name()
                )));
                &[]
            }
        },
    };
    let source = node.and_then(|n| n.source.clone());
    for (key, value) in entries {
        let Some(def) = defs.iter().find(|d| d.name == key.name) else {
            let mut d = key_error(
                key,
                &source,
                format!("unknown parameter `{}` for {owner}", key.name),
            );
            if let Some(s) = did_you_mean(&key.name, defs.iter().map(|d| d.name)) {
                d = d.help(format!("did you mean `{s}`?"));
            } else if !defs.is_empty() {
                let names: Vec<_> = defs.iter().map(|d| d.name).collect();
                d = d.help(format!("known parameters: {}", names.join(", ")));
            }
            diags.push(d);
            continue;
        };
        match convert(value, &def.kind) {
            Ok(v) => {
                values.insert(def.name.to_string(), v);
                at.insert(def.name.to_string(), value.clone());
            }
            Err(msg) => {
                diags.push(value.error(format!("parameter `{}` of {owner}: {msg}", def.name)))
            }
        }
    }
    for def in defs {
        if values.contains_key(def.name) || entries.iter().any(|(k, _)| k.name == def.name) {
            continue;
        }
        match &def.default {
            Some(v) => {
                values.insert(def.name.to_string(), v.clone());
            }
            None => {
                let d = Diagnostic::error(format!(
                    "{owner} is missing required parameter `{}` ({})",
                    def.name,
                    def.kind.describe()
                ));
                let mut e = node.unwrap_or(fallback).error(d.message);
                e.help = Some(def.doc.to_string());
                diags.push(e);
            }
        }
    }
    Params {
        values,
        owner: owner.to_string(),
        at,
        owner_at: Some(fallback.clone()),
    }
}

fn convert(v: &YNode, kind: &ParamKind) -> Result<ParamValue, String> {
    let wrong = |want: &str| format!("expected {want}, found {} `{}`", v.type_name(), short(v));
    match kind {
        ParamKind::Bool => match v.kind {
            YKind::Bool(b) => Ok(ParamValue::Bool(b)),
            _ => Err(wrong("a boolean")),
        },
        ParamKind::Int { min, max } => match v.kind {
            YKind::Int(i) if i < *min || i > *max => {
                Err(format!("{i} is out of range ({})", kind.describe()))
            }
            YKind::Int(i) => Ok(ParamValue::Int(i)),
            YKind::Float(f) if f.fract() == 0.0 && f.abs() < 9e15 => {
                convert(&YNode::new(YKind::Int(f as i64)), kind)
            }
            _ => Err(wrong("an integer")),
        },
        ParamKind::Float { min, max } => match v.as_f64() {
            Some(x) if !x.is_finite() => Err(format!("{x} is not a finite number")),
            Some(x) if x < *min || x > *max => {
                Err(format!("{x} is out of range ({})", kind.describe()))
            }
            Some(x) => Ok(ParamValue::Float(x)),
            None => Err(wrong("a number")),
        },
        ParamKind::Str | ParamKind::Path => match &v.kind {
            YKind::Str(s) => Ok(ParamValue::Str(s.clone())),
            _ => Err(wrong("a string")),
        },
        ParamKind::Enum(options) => match &v.kind {
            YKind::Str(s) if options.contains(&s.as_str()) => Ok(ParamValue::Str(s.clone())),
            YKind::Str(s) => {
                let mut m = format!("`{s}` is not one of {}", options.join(", "));
                if let Some(c) = did_you_mean(s, options.iter().copied()) {
                    m.push_str(&format!(" (did you mean `{c}`?)"));
                }
                Err(m)
            }
            _ => Err(wrong("a string")),
        },
        ParamKind::FloatList { min, max } => {
            let items: Vec<&YNode> = match &v.kind {
                YKind::Seq(items) => items.iter().collect(),
                YKind::Int(_) | YKind::Float(_) => vec![v],
                _ => return Err(wrong("a list of numbers")),
            };
            let mut out = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                match item.as_f64() {
                    Some(x) if !x.is_finite() || x < *min || x > *max => {
                        return Err(format!(
                            "item {i} ({x}) is out of range ({})",
                            kind.describe()
                        ));
                    }
                    Some(x) => out.push(x),
                    None => {
                        return Err(format!(
                            "item {i} is {}, expected a number",
                            item.type_name()
                        ));
                    }
                }
            }
            Ok(ParamValue::FloatList(out))
        }
        ParamKind::IntList { min, max } => {
            let items: Vec<&YNode> = match &v.kind {
                YKind::Seq(items) => items.iter().collect(),
                YKind::Int(_) | YKind::Float(_) => vec![v],
                _ => return Err(wrong("a list of integers")),
            };
            let mut out = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                let value = match item.kind {
                    YKind::Int(x) => Some(x),
                    YKind::Float(f) if f.fract() == 0.0 && f.abs() < 9e15 => Some(f as i64),
                    _ => None,
                };
                match value {
                    Some(x) if x < *min || x > *max => {
                        return Err(format!(
                            "item {i} ({x}) is out of range ({})",
                            kind.describe()
                        ));
                    }
                    Some(x) => out.push(x),
                    None => {
                        return Err(format!(
                            "item {i} is {}, expected an integer",
                            item.type_name()
                        ));
                    }
                }
            }
            Ok(ParamValue::IntList(out))
        }
        ParamKind::Any => Ok(ParamValue::Json(v.to_json())),
    }
}

fn short(v: &YNode) -> String {
    let s = v.to_json().to_string();
    if s.chars().count() > 40 {
        format!("{}…", s.chars().take(40).collect::<String>())
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diag::Source;

    fn convert_str(text: &str, kind: &ParamKind) -> Result<ParamValue, String> {
        let v = crate::yaml::parse(&Source::new("t.yaml", format!("v: {text}\n"))).unwrap();
        convert(v.get("v").unwrap(), kind)
    }

    #[test]
    fn should_read_a_list_of_integers_and_name_the_item_at_fault() {
        let kind = ParamKind::IntList { min: 0, max: 9 };
        assert_eq!(
            convert_str("[0, 3, 6.0]", &kind),
            Ok(ParamValue::IntList(vec![0, 3, 6]))
        );
        // A single integer is a one-item list.
        assert_eq!(convert_str("4", &kind), Ok(ParamValue::IntList(vec![4])));
        assert_eq!(convert_str("[]", &kind), Ok(ParamValue::IntList(vec![])));
        let e = convert_str("[1, 12]", &kind).unwrap_err();
        assert!(e.contains("item 1 (12) is out of range"), "{e}");
        let e = convert_str("[1, 2.5]", &kind).unwrap_err();
        assert!(
            e.contains("item 1 is") && e.contains("expected an integer"),
            "{e}"
        );
        let e = convert_str("abc", &kind).unwrap_err();
        assert!(e.contains("a list of integers"), "{e}");
    }
}
