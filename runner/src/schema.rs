//! A JSON Schema (draft 2020-12) of the pipeline format, generated from a [`Registry`]: editors
//! (e.g. VS Code with the YAML extension) then complete keys, node types and each type's
//! parameters, and show their docs. Validation proper stays `flowrun validate`: the schema
//! cannot express port types, references or cycles.

use serde_json::{Map, Value, json};

use crate::node::{NodeType, Registry, ResourceType};
use crate::params::{ParamDef, ParamKind};

/// A `$var` placeholder from a repeat block's `vars`, allowed wherever a parameter value is.
fn var_ref() -> Value {
    json!({"type": "string", "pattern": "^\\$[A-Za-z_][A-Za-z0-9_]*$"})
}

/// A finite bound, or none for the kind's full range.
fn bound(v: f64, unbounded: f64) -> Option<Value> {
    (v.is_finite() && v != unbounded && v.abs() < 1e300).then(|| json!(v))
}

fn param_schema(p: &ParamDef) -> Value {
    let mut s = match &p.kind {
        ParamKind::Bool => json!({"type": "boolean"}),
        ParamKind::Int { min, max } => {
            let mut m = json!({"type": "integer"});
            if let Some(b) = bound(*min as f64, i64::MIN as f64) {
                m["minimum"] = b;
            }
            if let Some(b) = bound(*max as f64, i64::MAX as f64) {
                m["maximum"] = b;
            }
            m
        }
        ParamKind::Float { min, max } => {
            let mut m = json!({"type": "number"});
            if let Some(b) = bound(*min, f64::MIN) {
                m["minimum"] = b;
            }
            if let Some(b) = bound(*max, f64::MAX) {
                m["maximum"] = b;
            }
            m
        }
        ParamKind::Str | ParamKind::Path => json!({"type": "string"}),
        ParamKind::Enum(values) => json!({"enum": values}),
        ParamKind::FloatList { .. } => json!({"type": "array", "items": {"type": "number"}}),
        ParamKind::IntList { .. } => json!({"type": "array", "items": {"type": "integer"}}),
        ParamKind::Any => json!({}),
    };
    if !matches!(p.kind, ParamKind::Any | ParamKind::Str | ParamKind::Path) {
        s = json!({"anyOf": [s, var_ref()]});
    }
    let mut desc = format!("{} ({})", p.doc, p.kind.describe());
    if p.default.is_none() {
        desc.push_str("; required");
    }
    s["description"] = json!(desc);
    if let Some(d) = &p.default {
        s["default"] = d.to_json();
    }
    s
}

fn params_schema(defs: &[ParamDef]) -> Value {
    let props: Map<String, Value> = defs
        .iter()
        .map(|p| (p.name.to_string(), param_schema(p)))
        .collect();
    let required: Vec<&str> = defs
        .iter()
        .filter(|p| p.default.is_none())
        .map(|p| p.name)
        .collect();
    let mut s = json!({"type": "object", "properties": props, "additionalProperties": false});
    if !required.is_empty() {
        s["required"] = json!(required);
    }
    s
}

/// `if type == T then params/inputs follow T's definition`.
fn node_rule(t: &NodeType) -> Value {
    let inputs: Map<String, Value> = t
        .inputs
        .iter()
        .map(|p| {
            (
                p.name.to_string(),
                json!({"description": format!("{} ({}{})", p.doc, p.ty, if p.many { ", many" } else { "" })}),
            )
        })
        .collect();
    json!({
        "if": {"properties": {"type": {"const": t.name}}, "required": ["type"]},
        "then": {"properties": {
            "params": params_schema(&t.params),
            "inputs": {"type": "object", "properties": inputs, "additionalProperties": false},
        }},
    })
}

fn resource_rule(t: &ResourceType) -> Value {
    json!({
        "if": {"properties": {"type": {"const": t.name}}, "required": ["type"]},
        "then": {"properties": {"params": params_schema(&t.params)}},
    })
}

/// The schema for pipelines using `registry`'s node and resource types.
pub fn pipeline_schema(registry: &Registry) -> Value {
    let node_types: Vec<Value> = registry
        .nodes
        .values()
        .map(|t| json!({"const": t.name, "description": t.summary}))
        .collect();
    let resource_types: Vec<Value> = registry
        .resources
        .values()
        .map(|t| json!({"const": t.name, "description": t.summary}))
        .collect();
    let refs =
        json!({"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]});
    let input_ref = json!({
        "description": "`node.port`, `node@prev.port`, `node@*.port`, a list of them, or {first, next} in a repeat block",
        "anyOf": [
            {"type": "string"},
            {"type": "array", "items": {"type": "string"}},
            {"type": "object", "properties": {"first": refs, "next": refs}, "additionalProperties": false},
        ],
    });
    let node = json!({
        "type": "object",
        "required": ["id", "type"],
        "additionalProperties": false,
        "properties": {
            "id": {"type": "string", "description": "unique node id (letters, digits, _ and -)"},
            "type": {"oneOf": node_types},
            "params": {"type": "object"},
            "inputs": {"type": "object", "additionalProperties": input_ref},
            "uses": {"type": "array", "items": {"type": "string"}, "description": "resources this node reads or writes"},
            "every": {"type": "integer", "minimum": 1, "description": "run only on every N-th iteration"},
            "when": {"enum": ["all", "first", "last", "not_first", "not_last"], "description": "inside a repeat block: at which steps this node runs"},
            "doc": {"type": "string"},
        },
        "allOf": registry.nodes.values().map(node_rule).collect::<Vec<_>>(),
    });
    let builtin = json!({
        "type": "object",
        "required": ["schedule", "start"],
        "additionalProperties": false,
        "properties": {
            "schedule": {"enum": crate::compile::BUILTIN_SCHEDULES},
            "start": {"type": "number"},
            "end": {"type": "number"},
        },
    });
    let mut schedules = vec![builtin];
    for t in registry.schedules.values() {
        let mut s = params_schema(&t.params);
        s["properties"]["schedule"] = json!({"const": t.name, "description": t.summary});
        let mut required = vec![json!("schedule")];
        if let Some(r) = s["required"].as_array() {
            required.extend(r.iter().cloned());
        }
        s["required"] = json!(required);
        schedules.push(s);
    }
    let schedule = json!({"anyOf": schedules});
    let repeat = json!({
        "type": "object",
        "required": ["repeat"],
        "additionalProperties": false,
        "properties": {"repeat": {
            "type": "object",
            "required": ["id", "count", "nodes"],
            "additionalProperties": false,
            "properties": {
                "id": {"type": "string"},
                "count": {"type": "integer", "minimum": 1, "description": "number of steps (K)"},
                "vars": {"type": "object", "additionalProperties": {"anyOf": [
                    {"type": "array"}, schedule, {"type": ["number", "string", "boolean"]},
                ]}, "description": "per-step values: a list with one item per step, or a schedule"},
                "nodes": {"type": "array", "items": {"$ref": "#/$defs/node"}},
            },
        }},
    });
    let resource = json!({
        "type": "object",
        "required": ["type"],
        "additionalProperties": false,
        "properties": {
            "type": {"oneOf": resource_types},
            "params": {"type": "object"},
            "doc": {"type": "string"},
        },
        "allOf": registry.resources.values().map(resource_rule).collect::<Vec<_>>(),
    });
    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "flowrun pipeline",
        "description": "A flowrun pipeline: a DAG of typed nodes run once per iteration. Generated by `flowrun schema`.",
        "type": "object",
        "required": ["name", "nodes"],
        "additionalProperties": false,
        "properties": {
            "name": {"type": "string"},
            "description": {"type": "string"},
            "seed": {"type": "integer", "minimum": 0},
            "device": {"type": "string", "description": "flex (default), libtorch, libtorch-cuda:N"},
            "iterations": {"type": "integer", "minimum": 1},
            "checkpoint_every": {"type": "integer", "minimum": 0},
            "keep_checkpoints": {"type": "integer", "minimum": 0},
            "memory_check": {"enum": ["error", "warn", "off"], "description": "what validation does when the estimated peak memory exceeds the machine's: refuse (default), warn, or skip the estimate"},
            "logging": {"type": "object", "additionalProperties": false, "description": "what a run logs besides metrics.jsonl", "properties": {
                "tensorboard": {"type": "boolean", "description": "write TensorBoard event files into <run_dir>/tb/ (default true)"},
                "image_every": {"type": "integer", "minimum": 1, "description": "show sample images every this many iterations (default 10)"},
                "images": {"type": "integer", "minimum": 0, "maximum": 64, "description": "sample images per step on those iterations (default 4)"},
            }},
            "resources": {"type": "object", "additionalProperties": {"$ref": "#/$defs/resource"}},
            "nodes": {"type": "array", "items": {"anyOf": [{"$ref": "#/$defs/node"}, {"$ref": "#/$defs/repeat"}]}},
        },
        "$defs": {"node": node, "repeat": repeat, "resource": resource},
    })
}
