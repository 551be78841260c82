//! `--set path=value` overrides, applied to the document before compilation.
//!
//! A path walks mappings by key and lists by item `id` (or a repeat block's `id`, or an index):
//! `nodes.update.params.lr=1e-5`, `nodes.step.count=8`, `iterations=100`,
//! `nodes.step.nodes.predict.params.cfg=4.5`. Missing final keys (and missing `params`/`inputs`
//! mappings on the way) are created, so any documented parameter can be set.

use std::sync::Arc;

use crate::diag::{Diagnostic, Source};
use crate::yaml::{YKey, YKind, YNode, parse_value};

/// Apply one `path=value` override to `doc`.
pub fn apply(doc: &mut YNode, spec: &str) -> Result<(), Diagnostic> {
    let source = Source::new(format!("--set {spec}"), spec.to_string());
    let Some((path, value)) = spec.split_once('=') else {
        return Err(Diagnostic::error(format!(
            "`--set {spec}`: expected `path=value`, e.g. `--set nodes.update.params.lr=1e-5`"
        )));
    };
    let path = path.trim();
    if path.is_empty() {
        return Err(Diagnostic::error(format!("`--set {spec}`: empty path")));
    }
    let value = parse_value(value.trim(), &source)?;
    let segments: Vec<&str> = path.split('.').collect();
    set_path(doc, &segments, value, &source)
        .map_err(|m| Diagnostic::error(format!("`--set {spec}`: {m}")))
}

fn set_path(
    node: &mut YNode,
    segs: &[&str],
    value: YNode,
    source: &Arc<Source>,
) -> Result<(), String> {
    let (head, rest) = (segs[0], &segs[1..]);
    match &mut node.kind {
        YKind::Map(items) => {
            let pos = items.iter().position(|(k, _)| k.name == head);
            if rest.is_empty() {
                match pos {
                    Some(i) => items[i].1 = value,
                    None => items.push((
                        YKey {
                            name: head.to_string(),
                            loc: value.loc,
                        },
                        value,
                    )),
                }
                return Ok(());
            }
            let i = match pos {
                Some(i) => i,
                None if matches!(head, "params" | "inputs" | "vars" | "resources") => {
                    items.push((
                        YKey {
                            name: head.to_string(),
                            loc: Default::default(),
                        },
                        YNode {
                            loc: value.loc,
                            source: Some(source.clone()),
                            kind: YKind::Map(vec![]),
                        },
                    ));
                    items.len() - 1
                }
                None => {
                    let keys: Vec<_> = items.iter().map(|(k, _)| k.name.as_str()).collect();
                    return Err(format!("no key `{head}` here (keys: {})", keys.join(", ")));
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
                        return Err(format!(
                            "no item `{head}` in this list (ids: {})",
                            ids.join(", ")
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
        _ => Err(format!(
            "`{head}`: cannot descend into {}",
            node.type_name()
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
}
