//! Graph export (after repeat expansion) and node-type documentation.

use std::fmt::Write;

use crate::compile::Pipeline;
use crate::node::{NodeType, Registry};
use crate::params::ParamValue;

/// Graphviz DOT of the expanded pipeline; repeat steps are grouped in clusters.
pub fn to_dot(p: &Pipeline) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "digraph \"{}\" {{", p.name);
    let _ = writeln!(
        s,
        "  rankdir=LR;\n  node [shape=box, fontname=\"Helvetica\"];"
    );
    let mut clusters: Vec<(String, usize)> = Vec::new();
    for n in &p.nodes {
        if let Some((k, _, rid)) = &n.step
            && !clusters.iter().any(|(r, kk)| r == rid && kk == k)
        {
            clusters.push((rid.clone(), *k));
        }
    }
    for (rid, k) in &clusters {
        let _ = writeln!(
            s,
            "  subgraph \"cluster_{rid}_{k}\" {{\n    label=\"{rid} k={k}\";"
        );
        for n in p.nodes.iter().filter(|n| {
            n.step
                .as_ref()
                .is_some_and(|(kk, _, r)| r == rid && kk == k)
        }) {
            let _ = writeln!(s, "    \"{}\" [label=\"{}\\n{}\"];", n.id, n.id, n.ty);
        }
        let _ = writeln!(s, "  }}");
    }
    for n in p.nodes.iter().filter(|n| n.step.is_none()) {
        let _ = writeln!(s, "  \"{}\" [label=\"{}\\n{}\"];", n.id, n.id, n.ty);
    }
    for (i, r) in p.resources.iter().enumerate() {
        let _ = writeln!(
            s,
            "  \"res:{}\" [label=\"{}\\n{}\", shape=cylinder];",
            r.name, r.name, r.ty
        );
        for n in &p.nodes {
            for (_, ri, w) in &n.uses {
                if *ri == i {
                    let style = if *w { "bold" } else { "dashed" };
                    let _ = writeln!(
                        s,
                        "  \"res:{}\" -> \"{}\" [style={style}, dir={}];",
                        r.name,
                        n.id,
                        if *w { "both" } else { "forward" }
                    );
                }
            }
        }
    }
    for n in &p.nodes {
        for (port, srcs) in &n.inputs {
            for (src, sport) in srcs {
                let _ = writeln!(
                    s,
                    "  \"{}\" -> \"{}\" [label=\"{sport}→{port}\"];",
                    p.nodes[*src].id, n.id
                );
            }
        }
    }
    s.push_str("}\n");
    s
}

/// Mermaid flowchart of the expanded pipeline.
pub fn to_mermaid(p: &Pipeline) -> String {
    let id = |s: &str| s.replace('@', "_at_");
    let mut s = String::from("flowchart LR\n");
    for n in &p.nodes {
        let _ = writeln!(s, "  {}[\"{}<br/><i>{}</i>\"]", id(&n.id), n.id, n.ty);
    }
    for r in &p.resources {
        let _ = writeln!(
            s,
            "  res_{}[(\"{}<br/><i>{}</i>\")]",
            id(&r.name),
            r.name,
            r.ty
        );
    }
    for n in &p.nodes {
        for (port, srcs) in &n.inputs {
            for (src, sport) in srcs {
                let _ = writeln!(
                    s,
                    "  {} -->|{sport}→{port}| {}",
                    id(&p.nodes[*src].id),
                    id(&n.id)
                );
            }
        }
        for (_, ri, w) in &n.uses {
            let arrow = if *w { "<==>" } else { "-.->" };
            let _ = writeln!(
                s,
                "  res_{} {arrow} {}",
                id(&p.resources[*ri].name),
                id(&n.id)
            );
        }
    }
    s
}

/// Plain-text listing of the expanded pipeline: what actually runs, in order.
pub fn to_text(p: &Pipeline) -> String {
    let mut s = format!(
        "pipeline `{}`: {} nodes, {} iterations, device {}\n",
        p.name,
        p.nodes.len(),
        p.iterations,
        p.device
    );
    for (i, n) in p.nodes.iter().enumerate() {
        let _ = write!(s, "{:>3}. {} ({})", i + 1, n.id, n.ty);
        if n.every > 1 {
            let _ = write!(s, " every {}", n.every);
        }
        s.push('\n');
        for (port, srcs) in &n.inputs {
            let from: Vec<String> = srcs
                .iter()
                .map(|(x, sp)| format!("{}.{sp}", p.nodes[*x].id))
                .collect();
            let _ = writeln!(s, "       {port} <- {}", from.join(", "));
        }
        let changed: Vec<String> = n
            .params
            .values
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        if !changed.is_empty() {
            let _ = writeln!(s, "       params: {}", changed.join(" "));
        }
    }
    s
}

fn fmt_default(v: &Option<ParamValue>) -> String {
    match v {
        None => "required".into(),
        Some(ParamValue::Str(s)) if s.is_empty() => "default: (unset)".into(),
        Some(v) => format!("default: {v}"),
    }
}

/// Documentation of one node type, generated from the definition validation uses.
pub fn describe_node(t: &NodeType) -> String {
    let mut s = format!("{} — {}\n\n", t.name, t.summary);
    if !t.doc.is_empty() {
        for line in t.doc.trim().lines() {
            let _ = writeln!(s, "  {line}");
        }
        s.push('\n');
    }
    let ports = |s: &mut String, title: &str, ps: &[crate::node::PortDef]| {
        if ps.is_empty() {
            return;
        }
        let _ = writeln!(s, "  {title}:");
        for p in ps {
            let mut flags = Vec::new();
            if p.many {
                flags.push("gathers node@*.port");
            }
            if p.optional {
                flags.push("optional");
            }
            let flags = if flags.is_empty() {
                String::new()
            } else {
                format!(" [{}]", flags.join(", "))
            };
            let _ = writeln!(s, "    {:<14} {:<14} {}{flags}", p.name, p.ty, p.doc);
        }
    };
    ports(&mut s, "inputs", &t.inputs);
    ports(&mut s, "outputs", &t.outputs);
    if !t.resources.is_empty() {
        let _ = writeln!(s, "  resources (uses):");
        for r in &t.resources {
            let _ = writeln!(
                s,
                "    {:<14} {:<14} {}{}",
                r.name,
                r.ty,
                if r.write { "[writes] " } else { "" },
                r.doc
            );
        }
    }
    if !t.params.is_empty() {
        let _ = writeln!(s, "  params:");
        for p in &t.params {
            let _ = writeln!(
                s,
                "    {:<18} {:<28} {}",
                p.name,
                p.kind.describe(),
                fmt_default(&p.default)
            );
            let _ = writeln!(s, "      {}", p.doc);
        }
    }
    s
}

/// Listing of all node and resource types.
pub fn list_types(r: &Registry) -> String {
    let mut s = String::from("node types:\n");
    for t in r.nodes.values() {
        let _ = writeln!(s, "  {:<22} {}", t.name, t.summary);
    }
    s.push_str("\nresource types:\n");
    for t in r.resources.values() {
        let _ = writeln!(s, "  {:<22} {}", t.name, t.summary);
    }
    if !r.schedules.is_empty() {
        s.push_str(
            "\nschedules for repeat vars (besides constant, linear, cosine, exponential):\n",
        );
        for t in r.schedules.values() {
            let _ = writeln!(s, "  {:<22} {}", t.name, t.summary);
        }
    }
    s.push_str("\n`flowrun nodes TYPE` shows a type's ports, parameters and defaults.\n");
    s
}

/// Documentation of a schedule for repeat `vars`.
pub fn describe_schedule(t: &crate::node::ScheduleType) -> String {
    let mut s = format!("{} (schedule for repeat vars) — {}\n\n", t.name, t.summary);
    for line in t.doc.trim().lines() {
        let _ = writeln!(s, "  {line}");
    }
    if !t.params.is_empty() {
        let _ = writeln!(s, "\n  keys (besides `schedule: {}`):", t.name);
        for p in &t.params {
            let _ = writeln!(
                s,
                "    {:<18} {:<28} {}",
                p.name,
                p.kind.describe(),
                fmt_default(&p.default)
            );
            let _ = writeln!(s, "      {}", p.doc);
        }
    }
    s
}

/// Documentation of a resource type.
pub fn describe_resource(t: &crate::node::ResourceType) -> String {
    let mut s = format!("{} (resource) — {}\n\n", t.name, t.summary);
    for line in t.doc.trim().lines() {
        let _ = writeln!(s, "  {line}");
    }
    if !t.params.is_empty() {
        let _ = writeln!(s, "\n  params:");
        for p in &t.params {
            let _ = writeln!(
                s,
                "    {:<18} {:<28} {}",
                p.name,
                p.kind.describe(),
                fmt_default(&p.default)
            );
            let _ = writeln!(s, "      {}", p.doc);
        }
    }
    s
}
