//! `--set path=value` overrides, applied to the document before compilation.
//!
//! A path walks mappings by key and lists by item `id` (or a repeat block's `id`, or an index):
//! `nodes.update.params.lr=1e-5`, `nodes.step.count=8`, `iterations=100`,
//! `nodes.step.nodes.predict.params.cfg=4.5`. Missing final keys (and missing `params`/`inputs`
//! mappings on the way) are created, so any documented parameter can be set.
//!
//! Each override is its own [`Source`] (the argument as typed, `--set nodes.update.params.lr=1e-5`),
//! so an error it causes — here or later, at compilation — points at the argument, not the file.

use std::sync::Arc;

use crate::diag::{Diagnostic, Loc, Source};
use crate::yaml::{YKey, YKind, YNode, parse_value};

/// How the argument is shown (and the text columns count in).
const FLAG: &str = "--set ";

/// Apply one `path=value` override to `doc`.
pub fn apply(doc: &mut YNode, spec: &str) -> Result<(), Diagnostic> {
    let source = Source::argument(format!("{FLAG}{spec}"));
    let whole = spec.chars().count().max(1);
    let flag_cols = FLAG.chars().count() as u32;
    let Some((path_text, value_text)) = spec.split_once('=') else {
        return Err(Diagnostic::error(
            "expected `path=value`, e.g. `--set nodes.update.params.lr=1e-5`",
        )
        .at(&source, Loc::new(1, flag_cols + 1), whole));
    };
    let path = path_text.trim();
    if path.is_empty() {
        return Err(Diagnostic::error("empty path before `=`").at(
            &source,
            Loc::new(1, flag_cols + 1),
            1,
        ));
    }
    // Column (1-based, in the argument as shown) and length of each path segment.
    let mut col = flag_cols + 1 + leading_spaces(path_text);
    let segments: Vec<Segment> = path
        .split('.')
        .map(|name| {
            let seg = Segment {
                name,
                loc: Loc::new(1, col),
            };
            col += name.chars().count() as u32 + 1;
            seg
        })
        .collect();
    let value_col =
        flag_cols + 1 + path_text.chars().count() as u32 + 1 + leading_spaces(value_text);
    let value = parse_value(value_text.trim(), &source, value_col)?;
    set_path(doc, &segments, value, &source)
        .map_err(|(m, seg)| Diagnostic::error(m).at(&source, seg.loc, seg.name.chars().count()))
}

fn leading_spaces(s: &str) -> u32 {
    s.chars().take_while(|c| c.is_whitespace()).count() as u32
}

/// One `.`-separated step of an override's path, with its place in the argument.
#[derive(Clone, Copy)]
struct Segment<'a> {
    name: &'a str,
    loc: Loc,
}

fn set_path<'a>(
    node: &mut YNode,
    segs: &[Segment<'a>],
    value: YNode,
    source: &Arc<Source>,
) -> Result<(), (String, Segment<'a>)> {
    let (seg, rest) = (segs[0], &segs[1..]);
    let head = seg.name;
    // A key this override adds is located in the override, not in the file.
    let new_key = || YKey {
        name: head.to_string(),
        loc: seg.loc,
        source: Some(source.clone()),
    };
    match &mut node.kind {
        YKind::Map(items) => {
            let pos = items.iter().position(|(k, _)| k.name == head);
            if rest.is_empty() {
                match pos {
                    Some(i) => items[i].1 = value,
                    None => items.push((new_key(), value)),
                }
                return Ok(());
            }
            let i = match pos {
                Some(i) => i,
                None if matches!(head, "params" | "inputs" | "vars" | "resources" | "logging") => {
                    items.push((
                        new_key(),
                        YNode {
                            loc: seg.loc,
                            source: Some(source.clone()),
                            kind: YKind::Map(vec![]),
                        },
                    ));
                    items.len() - 1
                }
                None => {
                    let keys: Vec<_> = items.iter().map(|(k, _)| k.name.as_str()).collect();
                    return Err((
                        format!("no key `{head}` here (keys: {})", keys.join(", ")),
                        seg,
                    ));
                }
            };
            set_path(&mut items[i].1, rest, value, source)
        }
        YKind::Seq(items) => {
            let found = items.iter().position(|it| {
                it.get("id").and_then(YNode::as_str) == Some(head)
                    || it
                        .get("repeat")
                        .and_then(|r| r.get("id"))
                        .and_then(YNode::as_str)
                        == Some(head)
            });
            let i = match found {
                Some(i) => i,
                None => match head.parse::<usize>() {
                    Ok(i) if i < items.len() => i,
                    _ => {
                        let ids: Vec<String> = items
                            .iter()
                            .filter_map(|it| {
                                it.get("id")
                                    .or_else(|| it.get("repeat").and_then(|r| r.get("id")))
                                    .and_then(YNode::as_str)
                                    .map(str::to_string)
                            })
                            .collect();
                        return Err((
                            format!("no item `{head}` in this list (ids: {})", ids.join(", ")),
                            seg,
                        ));
                    }
                },
            };
            if rest.is_empty() {
                items[i] = value;
                return Ok(());
            }
            let item = &mut items[i];
            // Step into a repeat block transparently.
            if item.get("repeat").is_some() && item.get("id").is_none() {
                let rep = item.get_mut("repeat").unwrap();
                return set_path(rep, rest, value, source);
            }
            set_path(item, rest, value, source)
        }
        _ => Err((
            format!("`{head}`: cannot descend into {}", node.type_name()),
            seg,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::yaml::parse;

    fn doc() -> YNode {
        parse(&Source::new(
            "p.yaml",
            "name: x\niterations: 3\nnodes:\n  - id: update\n    type: t\n    params: {lr: 0.001}\n  - repeat:\n      id: step\n      count: 4\n      nodes:\n        - id: predict\n          type: s\n",
        ))
        .unwrap()
    }

    #[test]
    fn should_override_nested_params_by_node_id() {
        let mut d = doc();
        apply(&mut d, "nodes.update.params.lr=1e-5").unwrap();
        apply(&mut d, "iterations=10").unwrap();
        let j = d.to_json();
        assert_eq!(j["nodes"][0]["params"]["lr"], serde_json::json!(1e-5));
        assert_eq!(j["iterations"], serde_json::json!(10));
    }

    #[test]
    fn should_step_into_repeat_blocks_and_create_params() {
        let mut d = doc();
        apply(&mut d, "nodes.step.count=8").unwrap();
        apply(&mut d, "nodes.step.nodes.predict.params.cfg=4.5").unwrap();
        let j = d.to_json();
        assert_eq!(j["nodes"][1]["repeat"]["count"], serde_json::json!(8));
        assert_eq!(
            j["nodes"][1]["repeat"]["nodes"][0]["params"]["cfg"],
            serde_json::json!(4.5)
        );
    }

    #[test]
    fn should_explain_unknown_paths() {
        let mut d = doc();
        let e = apply(&mut d, "nodes.updat.params.lr=1").unwrap_err();
        assert!(e.message.contains("no item `updat`"), "{e}");
        assert!(e.message.contains("update"), "{e}");
        let e = apply(&mut d, "iterations").unwrap_err();
        assert!(e.message.contains("expected `path=value`"), "{e}");
    }

    #[test]
    fn should_locate_what_an_override_adds_in_the_argument() {
        let mut d = doc();
        apply(&mut d, "nodes.update.params.x=1").unwrap();
        apply(&mut d, "nodes.update.params.y= [1, {k: 2}]").unwrap();
        let params = d.get("nodes").unwrap().as_seq().unwrap()[0]
            .get("params")
            .unwrap();
        let (key, value) = &params.as_map().unwrap()[1];
        assert_eq!(key.name, "x");
        let s = key.source.as_ref().expect("the key's own source");
        assert_eq!(s.name, "--set nodes.update.params.x=1");
        assert_eq!(key.loc, Loc::new(1, 27));
        assert_eq!(value.loc, Loc::new(1, 29));
        assert_eq!(&s.text[28..], "1");
        // Values parsed from flow syntax are shifted to their place in the argument.
        let (_, y) = &params.as_map().unwrap()[2];
        assert_eq!(y.loc, Loc::new(1, 30));
        let inner = &y.as_seq().unwrap()[1];
        let (k, two) = &inner.as_map().unwrap()[0];
        assert_eq!((k.loc, two.loc), (Loc::new(1, 35), Loc::new(1, 38)));
        let text = &y.source.as_ref().unwrap().text;
        assert_eq!(&text[34..35], "k");
        assert_eq!(&text[37..38], "2");
        // A path error is located at the segment at fault.
        let e = apply(&mut d, "nodes.nope.x=1").unwrap_err();
        assert_eq!(e.position(), "--set nodes.nope.x=1, column 13");
        assert_eq!(e.len, 4);
    }
}
