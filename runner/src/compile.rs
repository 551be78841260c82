//! Raw pipeline YAML → resolved, validated pipeline.
//!
//! Compilation never stops at the first problem: every error found (unknown keys and types,
//! wrong parameters, bad references, type mismatches, resource conflicts, cycles) is collected
//! into one [`Diagnostics`] report, each located in the file.
//!
//! ## Repeat blocks
//! The few-step loop of a sampler is written once and expanded K times:
//! ```yaml
//! - repeat:
//!     id: step
//!     count: 4
//!     vars:
//!       t: [1.0, 0.75, 0.5, 0.25]
//!       tau: {schedule: cosine, start: 1.0, end: 0.3}
//!     nodes:
//!       - id: predict
//!         type: one_step_sampler
//!         params: {t: $t}
//!         inputs:
//!           x: {first: noise.x, next: renoise@prev.x_next}
//!       - id: renoise
//!         when: not_last
//!         ...
//! ```
//! Each node becomes `predict@1 … predict@4`. Inside the block `predict.x0` means the same step,
//! `renoise@prev.x_next` the previous one; anywhere, `predict@2.x0`, `predict@last.x0` and
//! `predict@*.x0` (all steps, in order, for a gathering input) name expanded nodes.
//! `$name` in a parameter is replaced by the step's value of variable `name`; `$k` is the step
//! (1-based) and `$count` the number of steps.
//!
//! A variable is a list of `count` values, one value for every step, or a schedule mapping:
//! the engine's own `{schedule: constant|linear|cosine|exponential, start, end}`, or one the
//! node library registered ([`crate::node::ScheduleType`], `{schedule: NAME, key: value, …}`,
//! its keys validated like node parameters).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use petgraph::graph::{DiGraph, NodeIndex};

use crate::diag::{Diagnostic, Diagnostics, did_you_mean};
use crate::node::Registry;
use crate::params::{Params, validate_params};
use crate::yaml::{YKey, YKind, YNode, key_error};

/// A validated pipeline, ready to run.
#[derive(Debug, Clone)]
pub struct Pipeline {
    pub name: String,
    pub description: String,
    pub seed: u64,
    pub device: String,
    pub iterations: u64,
    pub checkpoint_every: u64,
    pub keep_checkpoints: usize,
    /// What validation does when a check estimates more memory than the machine has.
    pub memory_check: MemoryCheck,
    /// What the run logs besides `metrics.jsonl` (TensorBoard event files).
    pub logging: Logging,
    pub resources: Vec<ResourceInst>,
    /// Expanded nodes in a topological order.
    pub nodes: Vec<NodeInst>,
    /// The document the pipeline was compiled from (with `--set` overrides applied).
    pub document: YNode,
}

#[derive(Debug, Clone)]
pub struct ResourceInst {
    pub name: String,
    pub ty: &'static str,
    pub params: Params,
}

#[derive(Debug, Clone)]
pub struct NodeInst {
    pub id: String,
    pub ty: &'static str,
    pub params: Params,
    /// For each connected input port: its sources (node index into `nodes`, output port).
    pub inputs: Vec<(&'static str, Vec<(usize, &'static str)>)>,
    /// (slot name, resource index, write)
    pub uses: Vec<(&'static str, usize, bool)>,
    pub every: u64,
    /// (k, count, repeat id) when expanded from a repeat block.
    pub step: Option<(usize, usize, String)>,
    /// Ordering-only dependencies: a resource's writer runs after the readers of that resource
    /// that do not depend on it, so every reader sees the same weights whatever the scheduling.
    pub after: Vec<usize>,
}

const TOP_KEYS: &[&str] = &[
    "name",
    "description",
    "seed",
    "device",
    "iterations",
    "checkpoint_every",
    "keep_checkpoints",
    "memory_check",
    "logging",
    "resources",
    "nodes",
];
const NODE_KEYS: &[&str] = &[
    "id", "type", "params", "inputs", "uses", "every", "when", "doc",
];
const REPEAT_KEYS: &[&str] = &["id", "count", "vars", "nodes"];
const RESOURCE_KEYS: &[&str] = &["type", "params", "doc"];
const WHEN: &[&str] = &["all", "first", "last", "not_first", "not_last"];

/// The pipeline's `logging`: `{tensorboard: true, image_every: 10, images: 4}` by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Logging {
    /// Write TensorBoard event files into `<run_dir>/tb/`.
    pub tensorboard: bool,
    /// Show sample images every this many iterations.
    pub image_every: u64,
    /// How many sample images per step a node shows on those iterations.
    pub images: usize,
}

impl Default for Logging {
    fn default() -> Self {
        Logging {
            tensorboard: true,
            image_every: 10,
            images: 4,
        }
    }
}

const LOGGING_KEYS: &[&str] = &["tensorboard", "image_every", "images"];

/// The pipeline's `logging` mapping, every error located at its key.
fn parse_logging(doc: &YNode, diags: &mut Diagnostics) -> Logging {
    let mut l = Logging::default();
    let Some(node) = doc.get("logging") else {
        return l;
    };
    if node.as_map().is_none() {
        diags.push(
            node.error(format!(
                "`logging` of the pipeline must be a mapping, found {}",
                node.type_name()
            ))
            .help("e.g. `logging: {tensorboard: true, image_every: 10, images: 4}`"),
        );
        return l;
    }
    check_keys(node, LOGGING_KEYS, "`logging`", diags);
    if let Some(v) = node.get("tensorboard") {
        match v.kind {
            YKind::Bool(b) => l.tensorboard = b,
            _ => diags.push(v.error(format!(
                "`tensorboard` of `logging` must be true or false, found {}",
                v.type_name()
            ))),
        }
    }
    if let Some(n) = get_uint(node, "image_every", "`logging`", 1, diags) {
        l.image_every = n;
    }
    if let Some(n) = get_uint(node, "images", "`logging`", 0, diags) {
        if n > 64 {
            diags.push(node.get("images").unwrap().error(format!(
                "`images` of `logging` must be <= 64 (images per step), found {n}"
            )));
        } else {
            l.images = n as usize;
        }
    }
    l
}

/// The pipeline's `memory_check`: what a memory estimate above the machine's memory is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryCheck {
    /// An error: the pipeline does not run (the default).
    Error,
    /// A warning: it runs anyway.
    Warn,
    /// Not estimated.
    Off,
}

impl MemoryCheck {
    pub const NAMES: &[&str] = &["error", "warn", "off"];
}

/// Report keys of `map` that are not in `allowed`, with a suggestion.
fn check_keys(map: &YNode, allowed: &[&str], what: &str, diags: &mut Diagnostics) {
    for (k, _) in map.as_map().unwrap_or(&[]) {
        if !allowed.contains(&k.name.as_str()) {
            let mut d = key_error(
                k,
                &map.source,
                format!("unknown key `{}` in {what}", k.name),
            );
            d = match did_you_mean(&k.name, allowed.iter().copied()) {
                Some(s) => d.help(format!("did you mean `{s}`?")),
                None => d.help(format!("expected one of: {}", allowed.join(", "))),
            };
            diags.push(d);
        }
    }
}

fn get_str(map: &YNode, key: &str, what: &str, diags: &mut Diagnostics) -> Option<String> {
    let v = map.get(key)?;
    match &v.kind {
        YKind::Str(s) => Some(s.clone()),
        _ => {
            diags.push(v.error(format!(
                "`{key}` of {what} must be a string, found {}",
                v.type_name()
            )));
            None
        }
    }
}

fn get_uint(map: &YNode, key: &str, what: &str, min: i64, diags: &mut Diagnostics) -> Option<u64> {
    let v = map.get(key)?;
    match v.kind {
        YKind::Int(i) if i >= min => Some(i as u64),
        YKind::Int(i) => {
            diags.push(v.error(format!("`{key}` of {what} must be >= {min}, found {i}")));
            None
        }
        _ => {
            diags.push(v.error(format!(
                "`{key}` of {what} must be an integer, found {}",
                v.type_name()
            )));
            None
        }
    }
}

/// The repeat block a node is expanded in: its members and its variables.
type BlockCtx<'b> = (
    &'b Arc<HashMap<String, Vec<usize>>>,
    &'b BTreeMap<String, Vec<YNode>>,
);

/// A node after repeat expansion, before reference resolution.
struct Expanded<'a> {
    id: String,
    id_node: Option<&'a YNode>,
    entry: &'a YNode,
    ty: Option<&'static str>,
    params: Option<YNode>,
    step: Option<(usize, usize, String)>,
    /// Base ids of the nodes of the repeat block this node belongs to.
    block: Option<Arc<HashMap<String, Vec<usize>>>>,
    every: u64,
}

/// Compile a parsed document. `source` names the file for messages.
pub fn compile(doc: &YNode, registry: &Registry) -> Result<(Pipeline, Diagnostics), Diagnostics> {
    let mut diags = Diagnostics::default();
    if doc.as_map().is_none() {
        diags.push(doc.error(format!(
            "a pipeline must be a mapping with `name` and `nodes`, found {}",
            doc.type_name()
        )));
        return Err(diags);
    }
    check_keys(doc, TOP_KEYS, "the pipeline", &mut diags);
    let name = get_str(doc, "name", "the pipeline", &mut diags).unwrap_or_default();
    if doc.get("name").is_none() {
        diags.push(
            doc.error("the pipeline has no `name`")
                .help("add `name: my_pipeline` at the top"),
        );
    } else if !name.is_empty()
        && !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
    {
        diags.push(doc.get("name").unwrap().error(format!(
            "pipeline name `{name}` may only contain letters, digits, `_`, `-` and `.` (it names the run directory)"
        )));
    }
    let description = get_str(doc, "description", "the pipeline", &mut diags).unwrap_or_default();
    let seed = get_uint(doc, "seed", "the pipeline", 0, &mut diags).unwrap_or(0);
    let iterations = get_uint(doc, "iterations", "the pipeline", 1, &mut diags).unwrap_or(1);
    let checkpoint_every =
        get_uint(doc, "checkpoint_every", "the pipeline", 0, &mut diags).unwrap_or(0);
    let keep_checkpoints =
        get_uint(doc, "keep_checkpoints", "the pipeline", 1, &mut diags).unwrap_or(2) as usize;
    let device =
        get_str(doc, "device", "the pipeline", &mut diags).unwrap_or_else(|| "flex".into());
    // (`off` unquoted is YAML 1.1's `false`: accept it as the word it was meant as.)
    let memory_check_word = match doc.get("memory_check").map(|n| &n.kind) {
        Some(YKind::Bool(false)) => Some("off".to_string()),
        _ => get_str(doc, "memory_check", "the pipeline", &mut diags),
    };
    let memory_check = match memory_check_word.as_deref() {
        None | Some("error") => MemoryCheck::Error,
        Some("warn") => MemoryCheck::Warn,
        Some("off") => MemoryCheck::Off,
        Some(other) => {
            diags.push(doc.get("memory_check").unwrap().error(format!(
                "`memory_check` must be one of {}, found `{other}`",
                MemoryCheck::NAMES.join(", ")
            )));
            MemoryCheck::Error
        }
    };
    let logging = parse_logging(doc, &mut diags);
    if let (Some(check), Some(dn)) = (registry.device_check, doc.get("device"))
        && let Err(m) = check(&device)
    {
        diags.push(dn.error(m));
    }

    // Resources.
    let mut resources: Vec<ResourceInst> = Vec::new();
    let mut resource_nodes: Vec<&YNode> = Vec::new();
    if let Some(rs) = doc.get("resources") {
        match rs.as_map() {
            Some(entries) => {
                for (key, r) in entries {
                    let what = format!("resource `{}`", key.name);
                    if r.as_map().is_none() {
                        diags.push(
                            r.error(format!("{what} must be a mapping with `type` and `params`")),
                        );
                        continue;
                    }
                    check_keys(r, RESOURCE_KEYS, &what, &mut diags);
                    let Some(tn) = r.get("type") else {
                        diags.push(key_error(key, &rs.source, format!("{what} has no `type`")));
                        continue;
                    };
                    let Some(tname) = tn.as_str() else {
                        diags.push(tn.error("`type` must be a string"));
                        continue;
                    };
                    let Some(rt) = registry.resources.get(tname) else {
                        let mut d = tn.error(format!("unknown resource type `{tname}`"));
                        if let Some(s) = did_you_mean(tname, registry.resources.keys().copied()) {
                            d = d.help(format!("did you mean `{s}`?"));
                        }
                        diags.push(d);
                        continue;
                    };
                    let params = validate_params(&what, r.get("params"), &rt.params, &mut diags, r);
                    resources.push(ResourceInst {
                        name: key.name.clone(),
                        ty: rt.name,
                        params,
                    });
                    resource_nodes.push(r);
                }
            }
            None => diags.push(rs.error("`resources` must be a mapping of name → {type, params}")),
        }
    }

    // Nodes: expand repeats.
    let mut expanded: Vec<Expanded> = Vec::new();
    let nodes_node = doc.get("nodes");
    match nodes_node {
        None => diags.push(doc.error("the pipeline has no `nodes`")),
        Some(n) => match n.as_seq() {
            None => diags.push(n.error(format!("`nodes` must be a list, found {}", n.type_name()))),
            Some(items) => {
                for item in items {
                    if item.as_map().is_none() {
                        diags.push(item.error(format!(
                            "each entry of `nodes` must be a mapping, found {}",
                            item.type_name()
                        )));
                        continue;
                    }
                    if let Some(rep) = item.get("repeat") {
                        if item.as_map().map(|m| m.len()) != Some(1) {
                            diags.push(
                                item.error("a `repeat` entry must contain only the `repeat` key"),
                            );
                        }
                        expand_repeat(rep, registry, &mut expanded, &mut diags);
                    } else {
                        push_node(item, None, None, registry, &mut expanded, &mut diags);
                    }
                }
            }
        },
    }

    // Unique ids.
    let mut index: HashMap<String, usize> = HashMap::new();
    for (i, e) in expanded.iter().enumerate() {
        if let Some(prev) = index.insert(e.id.clone(), i) {
            let first = expanded[prev].id_node.map(|n| n.loc.line).unwrap_or(0);
            let node = e.id_node.unwrap_or(e.entry);
            diags.push(node.error(format!(
                "duplicate node id `{}` (first defined on line {first})",
                e.id
            )));
        }
    }
    // Base ids of repeated nodes → their expanded indices (for `@last`, `@*`, `@N`).
    let mut repeated: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, e) in expanded.iter().enumerate() {
        if e.step.is_some()
            && let Some((base, _)) = e.id.split_once('@')
        {
            repeated.entry(base.to_string()).or_default().push(i);
        }
    }

    // Params, inputs, resources of each node.
    let mut nodes: Vec<NodeInst> = Vec::new();
    let mut read_ports: HashSet<(usize, &'static str)> = HashSet::new();
    let mut writers: HashMap<usize, Vec<usize>> = HashMap::new();
    for (i, e) in expanded.iter().enumerate() {
        let Some(tname) = e.ty else {
            nodes.push(placeholder(e));
            continue;
        };
        let nt = &registry.nodes[tname];
        let what = format!("node `{}`", e.id);
        let params = validate_params(
            &what,
            e.params.as_ref(),
            &nt.params,
            &mut diags,
            e.id_node.unwrap_or(e.entry),
        );
        let every = e.every;

        // Inputs.
        let mut inputs: Vec<(&'static str, Vec<(usize, &'static str)>)> = Vec::new();
        let inputs_node = e.entry.get("inputs");
        let entries = match inputs_node {
            None => &[][..],
            Some(n) => match n.as_map() {
                Some(m) => m,
                None => {
                    if !matches!(n.kind, YKind::Null) {
                        diags.push(n.error(format!(
                            "`inputs` of {what} must be a mapping port → node.port"
                        )));
                    }
                    &[][..]
                }
            },
        };
        for (key, v) in entries {
            let Some(port) = nt.inputs.iter().find(|p| p.name == key.name) else {
                let mut d = key_error(
                    key,
                    &inputs_node.unwrap().source,
                    format!("{what} (type `{tname}`) has no input port `{}`", key.name),
                );
                d = match did_you_mean(&key.name, nt.inputs.iter().map(|p| p.name)) {
                    Some(s) => d.help(format!("did you mean `{s}`?")),
                    None => d.help(format!(
                        "its inputs are: {}",
                        nt.inputs
                            .iter()
                            .map(|p| p.name)
                            .collect::<Vec<_>>()
                            .join(", ")
                    )),
                };
                diags.push(d);
                continue;
            };
            let sources = resolve_input(v, e, &index, &repeated, &expanded, &mut diags);
            let mut ok = Vec::new();
            for (src_node, (src_idx, src_port)) in sources {
                let src = &expanded[src_idx];
                let Some(st) = src.ty else { continue };
                let snt = &registry.nodes[st];
                let Some(out) = snt.outputs.iter().find(|p| p.name == src_port) else {
                    let mut d = src_node.error(format!(
                        "node `{}` (type `{st}`) has no output port `{src_port}`",
                        src.id
                    ));
                    d = match did_you_mean(&src_port, snt.outputs.iter().map(|p| p.name)) {
                        Some(s) => d.help(format!("did you mean `{s}`?")),
                        None => d.help(format!(
                            "its outputs are: {}",
                            snt.outputs
                                .iter()
                                .map(|p| p.name)
                                .collect::<Vec<_>>()
                                .join(", ")
                        )),
                    };
                    diags.push(d);
                    continue;
                };
                if out.ty != port.ty {
                    diags.push(src_node.error(format!(
                        "type mismatch: `{}.{}` is `{}` but input `{}` of {what} expects `{}`",
                        src.id, out.name, out.ty, port.name, port.ty
                    )));
                    continue;
                }
                read_ports.insert((src_idx, out.name));
                ok.push((src_idx, out.name));
            }
            if ok.len() > 1 && !port.many {
                diags.push(v.error(format!(
                    "input `{}` of {what} takes one value, but {} sources were given",
                    port.name,
                    ok.len()
                )));
            }
            inputs.push((port.name, ok));
        }
        for p in &nt.inputs {
            if !p.optional && !entries.iter().any(|(k, _)| k.name == p.name) {
                let at = e.id_node.unwrap_or(e.entry);
                diags.push(at.error(format!(
                    "{what} is missing input `{}` (`{}`): {}",
                    p.name, p.ty, p.doc
                )));
            }
        }

        // Resources.
        let mut uses = Vec::new();
        let uses_node = e.entry.get("uses");
        let mut bound: HashSet<&str> = HashSet::new();
        let errors_before = diags.error_count();
        if let Some(un) = uses_node {
            let names: Vec<&YNode> = match &un.kind {
                YKind::Seq(items) => items.iter().collect(),
                YKind::Str(_) => vec![un],
                _ => {
                    diags.push(un.error("`uses` must be a list of resource names"));
                    vec![]
                }
            };
            for n in names {
                let Some(rname) = n.as_str() else {
                    diags.push(n.error("a resource name must be a string"));
                    continue;
                };
                let Some(ri) = resources.iter().position(|r| r.name == rname) else {
                    let mut d = n.error(format!("unknown resource `{rname}`"));
                    if let Some(s) = did_you_mean(rname, resources.iter().map(|r| r.name.as_str()))
                    {
                        d = d.help(format!("did you mean `{s}`?"));
                    } else {
                        d = d.help("declare it under `resources:` at the top of the pipeline");
                    }
                    diags.push(d);
                    continue;
                };
                let rty = resources[ri].ty;
                let Some(slot) = nt
                    .resources
                    .iter()
                    .find(|s| s.ty == rty && !bound.contains(s.name))
                else {
                    let wanted: Vec<_> = nt
                        .resources
                        .iter()
                        .map(|s| format!("{} ({})", s.name, s.ty))
                        .collect();
                    diags.push(
                        n.error(format!(
                            "{what} (type `{tname}`) cannot use resource `{rname}` of type `{rty}`"
                        ))
                        .help(if wanted.is_empty() {
                            "this node type uses no resources".to_string()
                        } else {
                            format!("it uses: {}", wanted.join(", "))
                        }),
                    );
                    continue;
                };
                bound.insert(slot.name);
                if slot.write {
                    writers.entry(ri).or_default().push(i);
                }
                uses.push((slot.name, ri, slot.write));
            }
        }
        let uses_failed = diags.error_count() > errors_before;
        for slot in &nt.resources {
            if !bound.contains(slot.name) && !uses_failed {
                let at = uses_node.unwrap_or(e.id_node.unwrap_or(e.entry));
                diags.push(
                    at.error(format!(
                        "{what} needs a resource of type `{}` for its slot `{}` ({})",
                        slot.ty, slot.name, slot.doc
                    ))
                    .help(format!("add `uses: [<name of a {} resource>]`", slot.ty)),
                );
            }
        }

        nodes.push(NodeInst {
            id: e.id.clone(),
            ty: tname,
            params,
            inputs,
            uses,
            every,
            step: e.step.clone(),
            after: vec![],
        });
    }

    // One writer per resource.
    for (ri, ws) in &writers {
        if ws.len() > 1 {
            let names: Vec<_> = ws
                .iter()
                .map(|&w| format!("`{}`", expanded[w].id))
                .collect();
            for &w in &ws[1..] {
                let at = expanded[w].entry.get("uses").unwrap_or(expanded[w].entry);
                diags.push(
                    at.error(format!(
                        "resource `{}` has more than one writer: {}",
                        resources[*ri].name,
                        names.join(", ")
                    ))
                    .help("a resource may be written by one node only; others may read it"),
                );
            }
        }
    }

    // Readers of a resource that do not depend on its writer run before the writer.
    for (ri, ws) in &writers {
        let w = ws[0];
        let mut reach = vec![false; nodes.len()];
        let mut stack = vec![w];
        while let Some(x) = stack.pop() {
            for (j, n) in nodes.iter().enumerate() {
                if !reach[j]
                    && n.inputs
                        .iter()
                        .any(|(_, srcs)| srcs.iter().any(|(s, _)| *s == x))
                {
                    reach[j] = true;
                    stack.push(j);
                }
            }
        }
        let readers: Vec<usize> = nodes
            .iter()
            .enumerate()
            .filter(|(j, n)| *j != w && !reach[*j] && n.uses.iter().any(|(_, r, _)| r == ri))
            .map(|(j, _)| j)
            .collect();
        nodes[w].after.extend(readers);
    }

    // Cycles.
    let mut g: DiGraph<usize, ()> = DiGraph::new();
    let idx: Vec<NodeIndex> = (0..nodes.len()).map(|i| g.add_node(i)).collect();
    for (i, n) in nodes.iter().enumerate() {
        let sources = n
            .inputs
            .iter()
            .flat_map(|(_, srcs)| srcs.iter().map(|(s, _)| *s));
        for s in sources.chain(n.after.iter().copied()) {
            if g.find_edge(idx[s], idx[i]).is_none() {
                g.add_edge(idx[s], idx[i], ());
            }
        }
    }
    let mut order: Vec<usize> = Vec::new();
    match petgraph::algo::toposort(&g, None) {
        Ok(o) => order = o.into_iter().map(|n| g[n]).collect(),
        Err(_) => {
            for scc in petgraph::algo::tarjan_scc(&g) {
                let cyclic = scc.len() > 1 || g.find_edge(scc[0], scc[0]).is_some();
                if !cyclic {
                    continue;
                }
                let chain = cycle_chain(&g, &scc);
                let names: Vec<&str> = chain.iter().map(|&n| nodes[g[n]].id.as_str()).collect();
                let first = g[chain[0]];
                let at = expanded[first].id_node.unwrap_or(expanded[first].entry);
                diags.push(at.error(format!("cycle: {}", names.join(" -> "))).help(
                    "a node cannot depend on its own output; inside a repeat, use `node@prev.port` for the previous step",
                ));
            }
        }
    }

    // Outputs nobody reads (one warning per base node and port).
    if !diags.has_errors() {
        let mut warned: HashSet<(String, &str)> = HashSet::new();
        for (i, n) in nodes.iter().enumerate() {
            let nt = &registry.nodes[n.ty];
            let base = n.id.split('@').next().unwrap_or(&n.id).to_string();
            for out in &nt.outputs {
                let read_anywhere = match repeated.get(&base) {
                    Some(all) => all.iter().any(|&j| read_ports.contains(&(j, out.name))),
                    None => read_ports.contains(&(i, out.name)),
                };
                if !read_anywhere && warned.insert((base.clone(), out.name)) {
                    let at = expanded[i].id_node.unwrap_or(expanded[i].entry);
                    diags.push(at.warning(format!(
                        "output `{base}.{}` is not read by any node",
                        out.name
                    )));
                }
            }
        }
    }

    diags.sort();
    diags.dedup();
    if diags.has_errors() {
        return Err(diags);
    }
    // Reorder nodes topologically, remapping indices.
    let mut pos = vec![0usize; nodes.len()];
    for (p, &i) in order.iter().enumerate() {
        pos[i] = p;
    }
    let mut sorted: Vec<NodeInst> = order.iter().map(|&i| nodes[i].clone()).collect();
    for n in &mut sorted {
        for (_, srcs) in &mut n.inputs {
            for (s, _) in srcs.iter_mut() {
                *s = pos[*s];
            }
        }
        for a in &mut n.after {
            *a = pos[*a];
        }
    }
    let pipeline = Pipeline {
        name,
        description,
        seed,
        device,
        iterations,
        checkpoint_every,
        keep_checkpoints,
        memory_check,
        logging,
        resources,
        nodes: sorted,
        document: doc.clone(),
    };
    // Whole-pipeline checks of the node library (schedules across steps, memory).
    for check in &registry.checks {
        diags.extend(check(&pipeline));
    }
    diags.sort();
    diags.dedup();
    if diags.has_errors() {
        return Err(diags);
    }
    Ok((pipeline, diags))
}

fn placeholder(e: &Expanded) -> NodeInst {
    NodeInst {
        id: e.id.clone(),
        ty: "",
        params: Params::default(),
        inputs: vec![],
        uses: vec![],
        every: e.every,
        step: e.step.clone(),
        after: vec![],
    }
}

/// A cycle through the nodes of one strongly connected component, as a closed chain.
fn cycle_chain(g: &DiGraph<usize, ()>, scc: &[NodeIndex]) -> Vec<NodeIndex> {
    let set: HashSet<NodeIndex> = scc.iter().copied().collect();
    // Start from the lowest original index for a stable message.
    let start = *scc.iter().min_by_key(|n| g[**n]).unwrap();
    let mut path = vec![start];
    let mut seen: HashMap<NodeIndex, usize> = HashMap::from([(start, 0)]);
    let mut cur = start;
    loop {
        let mut next: Vec<NodeIndex> = g.neighbors(cur).filter(|n| set.contains(n)).collect();
        next.sort_by_key(|n| g[*n]);
        let n = next[0];
        if let Some(&p) = seen.get(&n) {
            let mut chain = path[p..].to_vec();
            chain.push(n);
            return chain;
        }
        seen.insert(n, path.len());
        path.push(n);
        cur = n;
    }
}

fn push_node<'a>(
    item: &'a YNode,
    step: Option<(usize, usize, String)>,
    block: Option<BlockCtx>,
    registry: &Registry,
    out: &mut Vec<Expanded<'a>>,
    diags: &mut Diagnostics,
) {
    let in_repeat = step.is_some();
    // Keys are checked once per block, not once per step.
    if step.as_ref().is_none_or(|s| s.0 == 1) {
        check_keys(item, NODE_KEYS, "a node", diags);
    }
    let first = step.as_ref().is_none_or(|s| s.0 == 1);
    let report = |d: Diagnostic, diags: &mut Diagnostics| {
        if first {
            diags.push(d)
        }
    };
    let id_node = item.get("id");
    let id = match id_node {
        None => {
            report(item.error("a node has no `id`"), diags);
            format!("<node on line {}>", item.loc.line)
        }
        Some(n) => match n.as_str() {
            Some(s) if valid_id(s) => s.to_string(),
            Some(s) => {
                report(n.error(format!(
                    "node id `{s}` may only contain letters, digits and `_` (`.` separates ports, `@` steps)"
                )), diags);
                s.to_string()
            }
            None => {
                report(n.error("`id` must be a string"), diags);
                format!("<node on line {}>", item.loc.line)
            }
        },
    };
    let ty = match item.get("type") {
        None => {
            report(
                item.error(format!("node `{id}` has no `type`"))
                    .help("see `flowrun nodes` for the node types"),
                diags,
            );
            None
        }
        Some(tn) => match tn.as_str() {
            Some(t) => match registry.nodes.get_key_value(t) {
                Some((k, _)) => Some(*k),
                None => {
                    let mut d = tn.error(format!("unknown node type `{t}`"));
                    d = match did_you_mean(t, registry.nodes.keys().copied()) {
                        Some(s) => d.help(format!("did you mean `{s}`?")),
                        None => d.help("see `flowrun nodes` for the node types"),
                    };
                    report(d, diags);
                    None
                }
            },
            None => {
                report(tn.error("`type` must be a string"), diags);
                None
            }
        },
    };
    let every = get_uint_quiet(item, "every", 1, first, diags).unwrap_or(1);
    let mut included = true;
    if let Some(w) = item.get("when") {
        match (w.as_str(), &step) {
            (_, None) => report(
                w.error("`when` is only meaningful inside a `repeat` block"),
                diags,
            ),
            (Some(s), Some((k, count, _))) if WHEN.contains(&s) => {
                included = match s {
                    "all" => true,
                    "first" => *k == 1,
                    "last" => k == count,
                    "not_first" => *k != 1,
                    _ => k != count,
                };
            }
            (_, Some(_)) => report(
                w.error(format!("`when` must be one of {}", WHEN.join(", "))),
                diags,
            ),
        }
    }
    if !included {
        return;
    }
    let mut params = item.get("params").cloned();
    if let (Some(p), Some((k, count, _)), Some((_, vars))) = (params.as_mut(), &step, block) {
        substitute(p, *k, *count, vars, first, diags);
    }
    let full_id = match &step {
        Some((k, _, _)) => format!("{id}@{k}"),
        None => id,
    };
    let _ = in_repeat;
    out.push(Expanded {
        id: full_id,
        id_node,
        entry: item,
        ty,
        params,
        step,
        block: block.map(|(b, _)| b.clone()),
        every,
    });
}

fn get_uint_quiet(
    map: &YNode,
    key: &str,
    min: i64,
    report: bool,
    diags: &mut Diagnostics,
) -> Option<u64> {
    let mut local = Diagnostics::default();
    let v = get_uint(map, key, "a node", min, &mut local);
    if report {
        diags.extend(local);
    }
    v
}

fn valid_id(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Replace `$var` strings in a params tree by the step's variable values.
fn substitute(
    node: &mut YNode,
    k: usize,
    count: usize,
    vars: &BTreeMap<String, Vec<YNode>>,
    report: bool,
    diags: &mut Diagnostics,
) {
    let err_node = node.clone();
    match &mut node.kind {
        YKind::Str(s) if s.starts_with('$') => {
            let name = &s[1..];
            let value = match name {
                "k" => Some(YKind::Int(k as i64)),
                "count" => Some(YKind::Int(count as i64)),
                _ => vars.get(name).map(|v| v[k - 1].kind.clone()),
            };
            match value {
                Some(v) => node.kind = v,
                None => {
                    if report {
                        let mut known: Vec<&str> = vars.keys().map(String::as_str).collect();
                        known.extend(["k", "count"]);
                        let mut d = err_node.error(format!("unknown repeat variable `{s}`"));
                        d = match did_you_mean(name, known.iter().copied()) {
                            Some(c) => d.help(format!("did you mean `${c}`?")),
                            None => d.help(format!("known variables: ${}", known.join(", $"))),
                        };
                        diags.push(d);
                    }
                }
            }
        }
        YKind::Seq(items) => items
            .iter_mut()
            .for_each(|i| substitute(i, k, count, vars, report, diags)),
        YKind::Map(items) => items
            .iter_mut()
            .for_each(|(_, v)| substitute(v, k, count, vars, report, diags)),
        _ => {}
    }
}

fn expand_repeat<'a>(
    rep: &'a YNode,
    registry: &Registry,
    out: &mut Vec<Expanded<'a>>,
    diags: &mut Diagnostics,
) {
    if rep.as_map().is_none() {
        diags.push(rep.error("`repeat` must be a mapping with `id`, `count`, `vars` and `nodes`"));
        return;
    }
    check_keys(rep, REPEAT_KEYS, "a repeat block", diags);
    let id = get_str(rep, "id", "a repeat block", diags).unwrap_or_else(|| "repeat".into());
    let Some(count) = get_uint(rep, "count", "a repeat block", 1, diags) else {
        if rep.get("count").is_none() {
            diags.push(rep.error(format!("repeat block `{id}` has no `count`")));
        }
        return;
    };
    if count > 1000 {
        diags.push(
            rep.get("count")
                .unwrap()
                .error("`count` of a repeat block must be <= 1000"),
        );
        return;
    }
    let count = count as usize;
    let mut vars: BTreeMap<String, Vec<YNode>> = BTreeMap::new();
    if let Some(vn) = rep.get("vars") {
        match vn.as_map() {
            None => diags.push(vn.error("`vars` must be a mapping of name → list or schedule")),
            Some(entries) => {
                for (key, v) in entries {
                    if key.name == "k" || key.name == "count" {
                        diags.push(key_error(
                            key,
                            &vn.source,
                            format!("`{}` is a built-in repeat variable", key.name),
                        ));
                        continue;
                    }
                    if let Some(values) = var_values(key, v, count, registry, diags) {
                        vars.insert(key.name.clone(), values);
                    }
                }
            }
        }
    }
    let Some(nodes) = rep.get("nodes").and_then(YNode::as_seq) else {
        diags.push(rep.error(format!("repeat block `{id}` needs a `nodes` list")));
        return;
    };
    // Map of base id → expanded indices, filled as steps are expanded.
    let start = out.len();
    let mut steps: Vec<Expanded<'a>> = Vec::new();
    for k in 1..=count {
        for item in nodes {
            if item.as_map().is_none() {
                if k == 1 {
                    diags.push(item.error("each entry of `nodes` must be a mapping"));
                }
                continue;
            }
            if item.get("repeat").is_some() {
                if k == 1 {
                    diags.push(item.error("repeat blocks cannot be nested"));
                }
                continue;
            }
            let placeholder_block = Arc::new(HashMap::new());
            push_node(
                item,
                Some((k, count, id.clone())),
                Some((&placeholder_block, &vars)),
                registry,
                &mut steps,
                diags,
            );
        }
    }
    let mut members: HashMap<String, Vec<usize>> = HashMap::new();
    for (j, e) in steps.iter().enumerate() {
        if let Some((base, _)) = e.id.split_once('@') {
            members.entry(base.to_string()).or_default().push(start + j);
        }
    }
    let members = Arc::new(members);
    for mut e in steps {
        e.block = Some(members.clone());
        out.push(e);
    }
}

/// Values of one repeat variable: a list of `count` values, or a schedule mapping.
fn var_values(
    key: &YKey,
    v: &YNode,
    count: usize,
    registry: &Registry,
    diags: &mut Diagnostics,
) -> Option<Vec<YNode>> {
    match &v.kind {
        YKind::Seq(items) => {
            if items.len() != count {
                diags.push(v.error(format!(
                    "variable `{}` has {} values but the block repeats {count} times",
                    key.name,
                    items.len()
                )));
                return None;
            }
            Some(items.clone())
        }
        YKind::Map(entries) => {
            let kind = match v.get("schedule") {
                None => "linear",
                Some(n) => match n.as_str() {
                    Some(s) => s,
                    None => {
                        diags.push(n.error(format!(
                            "`schedule` of variable `{}` must be a schedule name, found {}",
                            key.name,
                            n.type_name()
                        )));
                        return None;
                    }
                },
            };
            let values = match registry.schedules.get(kind) {
                Some(st) if !BUILTIN_SCHEDULES.contains(&kind) => {
                    library_schedule(key, v, entries, st, count, diags)?
                }
                _ => builtin_schedule(key, v, kind, count, registry, diags)?,
            };
            Some(
                values
                    .into_iter()
                    .map(|x| YNode {
                        loc: v.loc,
                        source: v.source.clone(),
                        kind: YKind::Float(x),
                    })
                    .collect(),
            )
        }
        _ => {
            let vals = vec![v.clone(); count];
            Some(vals)
        }
    }
}

/// The engine's own schedules, `{schedule: NAME, start, end}`.
pub const BUILTIN_SCHEDULES: &[&str] = &["constant", "linear", "cosine", "exponential"];

/// Values of a built-in schedule mapping (or the error of an unknown schedule name).
fn builtin_schedule(
    key: &YKey,
    v: &YNode,
    kind: &str,
    count: usize,
    registry: &Registry,
    diags: &mut Diagnostics,
) -> Option<Vec<f64>> {
    if !BUILTIN_SCHEDULES.contains(&kind) {
        let at = v.get("schedule").unwrap_or(v);
        let known: Vec<&str> = BUILTIN_SCHEDULES
            .iter()
            .copied()
            .chain(registry.schedules.keys().copied())
            .collect();
        let mut d = at.error(format!(
            "unknown schedule `{kind}` for variable `{}`",
            key.name
        ));
        d = match did_you_mean(kind, known.iter().copied()) {
            Some(s) => d.help(format!("did you mean `{s}`?")),
            None => d.help(format!("known schedules: {}", known.join(", "))),
        };
        diags.push(d);
        return None;
    }
    let mut local = Diagnostics::default();
    let what = format!("a `{kind}` schedule");
    check_keys(v, &["schedule", "start", "end"], &what, &mut local);
    let start = v.get("start").and_then(YNode::as_f64);
    let end = v.get("end").and_then(YNode::as_f64);
    let (Some(a), Some(b)) = (start, end.or(start)) else {
        local.push(v.error(format!(
            "schedule for `{}` needs numeric `start` (and `end`)",
            key.name
        )));
        diags.extend(local);
        return None;
    };
    let values = match schedule(kind, a, b, count) {
        Ok(vals) => vals,
        Err(m) => {
            let at = v.get("schedule").unwrap_or(v);
            local.push(at.error(m));
            diags.extend(local);
            return None;
        }
    };
    diags.extend(local);
    Some(values)
}

/// Values of a schedule the node library registered: its keys (all but `schedule`) validated
/// like parameters, then its function.
fn library_schedule(
    key: &YKey,
    v: &YNode,
    entries: &[(YKey, YNode)],
    st: &crate::node::ScheduleType,
    count: usize,
    diags: &mut Diagnostics,
) -> Option<Vec<f64>> {
    let owner = format!("schedule `{}` of variable `{}`", st.name, key.name);
    let keys = YNode {
        loc: v.loc,
        source: v.source.clone(),
        kind: YKind::Map(
            entries
                .iter()
                .filter(|(k, _)| k.name != "schedule")
                .cloned()
                .collect(),
        ),
    };
    let mut local = Diagnostics::default();
    let params = validate_params(&owner, Some(&keys), &st.params, &mut local, v);
    if local.has_errors() {
        diags.extend(local);
        return None;
    }
    match (st.values)(&params, count) {
        Ok(vals) if vals.len() == count && vals.iter().all(|x| x.is_finite()) => Some(vals),
        Ok(vals) => {
            diags.push(v.error(format!(
                "internal: {owner} gave {} values ({} finite) for {count} steps",
                vals.len(),
                vals.iter().filter(|x| x.is_finite()).count()
            )));
            None
        }
        Err(d) => {
            diags.push(d);
            None
        }
    }
}

/// Values of a named schedule from `start` (step 1) to `end` (step `count`).
pub fn schedule(kind: &str, start: f64, end: f64, count: usize) -> Result<Vec<f64>, String> {
    let frac = |i: usize| {
        if count <= 1 {
            0.0
        } else {
            i as f64 / (count - 1) as f64
        }
    };
    let f: Box<dyn Fn(f64) -> f64> = match kind {
        "constant" => Box::new(move |_| start),
        "linear" => Box::new(move |u| start + (end - start) * u),
        "cosine" => {
            Box::new(move |u| end + (start - end) * 0.5 * (1.0 + (std::f64::consts::PI * u).cos()))
        }
        "exponential" => {
            if start <= 0.0 || end <= 0.0 {
                return Err("an exponential schedule needs start > 0 and end > 0".into());
            }
            Box::new(move |u| start * (end / start).powf(u))
        }
        other => {
            return Err(format!(
                "unknown schedule `{other}`; use constant, linear, cosine or exponential"
            ));
        }
    };
    Ok((0..count).map(|i| f(frac(i))).collect())
}

/// Resolve an input's value to its sources: (the YAML node to blame, (node index, port)).
fn resolve_input<'y>(
    v: &'y YNode,
    e: &Expanded,
    index: &HashMap<String, usize>,
    repeated: &HashMap<String, Vec<usize>>,
    expanded: &[Expanded],
    diags: &mut Diagnostics,
) -> Vec<(&'y YNode, (usize, String))> {
    let first_step = e.step.as_ref().is_none_or(|s| s.0 == 1);
    let mut local = Diagnostics::default();
    let refs: Vec<&YNode> = match &v.kind {
        YKind::Str(_) => vec![v],
        YKind::Seq(items) => items.iter().collect(),
        YKind::Map(_) => {
            let Some((k, _, _)) = &e.step else {
                local.push(
                    v.error("`{first, next}` inputs are only meaningful inside a `repeat` block"),
                );
                diags.extend(local);
                return vec![];
            };
            check_keys(v, &["first", "next"], "a step-dependent input", &mut local);
            let pick = if *k == 1 { "first" } else { "next" };
            match v.get(pick) {
                Some(r) => match &r.kind {
                    YKind::Seq(items) => items.iter().collect(),
                    _ => vec![r],
                },
                None => {
                    local.push(v.error(format!("step-dependent input needs `{pick}`")));
                    vec![]
                }
            }
        }
        _ => {
            local.push(v.error(format!(
                "an input must be a reference `node.port`, found {}",
                v.type_name()
            )));
            vec![]
        }
    };
    let mut out = Vec::new();
    for r in refs {
        let Some(text) = r.as_str() else {
            local.push(r.error("an input reference must be a string `node.port`"));
            continue;
        };
        match resolve_ref(text, e, index, repeated, expanded) {
            Ok(srcs) => out.extend(srcs.into_iter().map(|s| (r, s))),
            Err((msg, help)) => {
                let mut d = r.error(msg);
                if let Some(h) = help {
                    d = d.help(h);
                }
                local.push(d);
            }
        }
    }
    // Errors in repeated nodes are reported once (from the step where they first appear).
    if first_step || !local.0.is_empty() && !already_reported(&local, diags) {
        diags.extend(local);
    }
    out
}

fn already_reported(local: &Diagnostics, diags: &Diagnostics) -> bool {
    local.0.iter().all(|d| {
        diags
            .0
            .iter()
            .any(|x| x.loc == d.loc && x.message == d.message)
    })
}

type RefError = (String, Option<String>);

fn resolve_ref(
    text: &str,
    e: &Expanded,
    index: &HashMap<String, usize>,
    repeated: &HashMap<String, Vec<usize>>,
    expanded: &[Expanded],
) -> Result<Vec<(usize, String)>, RefError> {
    let Some((node_part, port)) = text.split_once('.') else {
        return Err((
            format!("input reference `{text}` must have the form `node.port`"),
            None,
        ));
    };
    if port.is_empty() {
        return Err((format!("input reference `{text}` names no port"), None));
    }
    let (base, sel) = match node_part.split_once('@') {
        Some((b, s)) => (b, Some(s)),
        None => (node_part, None),
    };
    let in_block = e.block.as_ref().filter(|b| b.contains_key(base));
    let step_of = |i: usize| expanded[i].step.as_ref().map(|s| s.0);
    let unknown = || {
        let mut names: Vec<&str> = index
            .keys()
            .filter(|k| !k.contains('@'))
            .map(String::as_str)
            .collect();
        names.extend(repeated.keys().map(String::as_str));
        let help =
            did_you_mean(base, names.iter().copied()).map(|s| format!("did you mean `{s}`?"));
        (format!("input reference `{text}`: no node `{base}`"), help)
    };
    match sel {
        None => {
            if let Some(members) = in_block {
                let k = e.step.as_ref().map(|s| s.0).unwrap_or(0);
                return match members[base].iter().find(|&&i| step_of(i) == Some(k)) {
                    Some(&i) => Ok(vec![(i, port.to_string())]),
                    None => Err((
                        format!(
                            "input reference `{text}`: `{base}` does not run at step {k} (see its `when`)"
                        ),
                        None,
                    )),
                };
            }
            if let Some(&i) = index.get(base) {
                return Ok(vec![(i, port.to_string())]);
            }
            if repeated.contains_key(base) {
                return Err((
                    format!(
                        "input reference `{text}`: `{base}` runs once per step of a repeat block"
                    ),
                    Some(format!(
                        "name the step: `{base}@last.{port}`, `{base}@*.{port}` (all steps) or `{base}@2.{port}`"
                    )),
                ));
            }
            Err(unknown())
        }
        Some(sel) => {
            let Some(all) = repeated.get(base) else {
                if index.contains_key(base) {
                    return Err((
                        format!(
                            "input reference `{text}`: `{base}` is not inside a repeat block, so it has no steps"
                        ),
                        Some(format!("use `{base}.{port}`")),
                    ));
                }
                return Err(unknown());
            };
            match sel {
                "*" => Ok(all.iter().map(|&i| (i, port.to_string())).collect()),
                "last" => Ok(vec![(*all.last().unwrap(), port.to_string())]),
                "first" => Ok(vec![(all[0], port.to_string())]),
                "prev" => {
                    let Some(k) = in_block.and(e.step.as_ref().map(|s| s.0)) else {
                        return Err((
                            format!(
                                "input reference `{text}`: `@prev` is only meaningful inside the repeat block of `{base}`"
                            ),
                            None,
                        ));
                    };
                    if k == 1 {
                        return Err((
                            format!(
                                "input reference `{text}`: there is no previous step at step 1"
                            ),
                            Some(format!("use `{{first: <initial>.port, next: {text}}}`")),
                        ));
                    }
                    match all.iter().find(|&&i| step_of(i) == Some(k - 1)) {
                        Some(&i) => Ok(vec![(i, port.to_string())]),
                        None => Err((
                            format!(
                                "input reference `{text}`: `{base}` does not run at step {}",
                                k - 1
                            ),
                            None,
                        )),
                    }
                }
                n => match n.parse::<usize>() {
                    Ok(k) => match all.iter().find(|&&i| step_of(i) == Some(k)) {
                        Some(&i) => Ok(vec![(i, port.to_string())]),
                        None => Err((
                            format!("input reference `{text}`: `{base}` does not run at step {k}"),
                            None,
                        )),
                    },
                    Err(_) => Err((
                        format!("input reference `{text}`: unknown step selector `@{n}`"),
                        Some("use `@prev`, `@last`, `@first`, `@*` or a step number".into()),
                    )),
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn should_compute_named_schedules_from_start_to_end() {
        let lin = schedule("linear", 1.0, 0.0, 5).unwrap();
        assert_eq!(lin, vec![1.0, 0.75, 0.5, 0.25, 0.0]);
        let cos = schedule("cosine", 1.0, 0.2, 3).unwrap();
        assert!(
            (cos[0] - 1.0).abs() < 1e-12
                && (cos[1] - 0.6).abs() < 1e-12
                && (cos[2] - 0.2).abs() < 1e-12
        );
        let exp = schedule("exponential", 1.0, 0.25, 3).unwrap();
        assert!((exp[1] - 0.5).abs() < 1e-12);
        assert_eq!(schedule("constant", 0.3, 9.0, 2).unwrap(), vec![0.3, 0.3]);
        assert!(schedule("exponential", 0.0, 1.0, 3).is_err());
        assert!(
            schedule("cubic", 0.0, 1.0, 3)
                .unwrap_err()
                .contains("unknown schedule")
        );
        assert_eq!(schedule("linear", 0.7, 0.1, 1).unwrap(), vec![0.7]);
    }

    /// A registry with one node type `num` (float param `v`) and a library schedule `steps`
    /// (`scale` × k; `scale: 0` is refused by its function, `scale: 7` returns too few values).
    fn schedule_registry() -> Registry {
        use crate::node::{NodeType, ScheduleType};
        use crate::params::ParamDef;
        let mut r = Registry::default();
        r.add_node(NodeType {
            name: "num",
            summary: "",
            doc: "",
            inputs: vec![],
            outputs: vec![crate::PortDef::new("y", "scalar", "")],
            params: vec![ParamDef::float("v", 0.0, f64::MIN, f64::MAX, "")],
            resources: vec![],
            factory: |_| anyhow::bail!("not built in these tests"),
        });
        r.add_schedule(ScheduleType {
            name: "steps",
            summary: "k times scale",
            doc: "",
            params: vec![ParamDef::float("scale", 1.0, -10.0, 10.0, "")],
            values: |p, count| {
                let s = p.f64("scale").unwrap_or(1.0);
                if s == 0.0 {
                    return Err(p.error("scale", "must not be 0"));
                }
                let n = if s == 7.0 { count - 1 } else { count };
                Ok((1..=n).map(|k| k as f64 * s).collect())
            },
        });
        r
    }

    fn compile_text(text: &str, r: &Registry) -> Result<Pipeline, Diagnostics> {
        crate::load_str("s.yaml", text, &[], r).map(|(p, _)| p)
    }

    #[test]
    fn should_expand_a_schedule_the_node_library_registered() {
        let r = schedule_registry();
        let doc = |var: &str| {
            format!(
                "name: s\nnodes:\n  - repeat:\n      id: r\n      count: 3\n      vars:\n        \
                 x: {var}\n      nodes:\n        - id: a\n          type: num\n          \
                 params: {{v: $x}}\n"
            )
        };
        let values = |var: &str| {
            let p = compile_text(&doc(var), &r).unwrap();
            (1..=3)
                .map(|k| {
                    let id = format!("a@{k}");
                    let n = p.nodes.iter().find(|n| n.id == id).unwrap();
                    n.params.f64("v").unwrap()
                })
                .collect::<Vec<f64>>()
        };
        assert_eq!(values("{schedule: steps, scale: 0.5}"), vec![0.5, 1.0, 1.5]);
        // Defaults apply; the built-in schedules still work beside it.
        assert_eq!(values("{schedule: steps}"), vec![1.0, 2.0, 3.0]);
        assert_eq!(
            values("{schedule: linear, start: 1, end: 0}"),
            vec![1.0, 0.5, 0.0]
        );
        let err = |var: &str| compile_text(&doc(var), &r).unwrap_err().to_string();
        let e = err("{schedule: steps, scale: 0}");
        assert!(
            e.contains("parameter `scale` of schedule `steps` of variable `x`: must not be 0"),
            "{e}"
        );
        assert!(e.contains("s.yaml:7:"), "{e}");
        let e = err("{schedule: steps, scael: 2}");
        assert!(
            e.contains("unknown parameter `scael` for schedule `steps` of variable `x`")
                && e.contains("did you mean `scale`?"),
            "{e}"
        );
        let e = err("{schedule: step}");
        assert!(
            e.contains("unknown schedule `step` for variable `x`") && e.contains("`steps`"),
            "{e}"
        );
        let e = err("{schedule: steps, scale: 7}");
        assert!(
            e.contains("internal: schedule `steps` of variable `x` gave 2 values"),
            "{e}"
        );
        let e = err("{schedule: linear, start: 1, scale: 2}");
        assert!(
            e.contains("unknown key `scale` in a `linear` schedule"),
            "{e}"
        );
    }

    #[test]
    #[should_panic(expected = "schedule `linear` is built into the engine")]
    fn should_not_let_a_library_shadow_a_built_in_schedule() {
        let mut r = Registry::default();
        r.add_schedule(crate::node::ScheduleType {
            name: "linear",
            summary: "",
            doc: "",
            params: vec![],
            values: |_, _| Ok(vec![]),
        });
    }
}
