//! Timestep schedules across sampler nodes, and the node parameters that only make sense with
//! them, checked at validation instead of failing (or silently sampling something else) at run
//! time.
//!
//! States travel between samplers on their inputs: `gaussian_noise.x` is at t = 1, the `x_next`
//! of `flow_sde_step` and `annealed_renoiser` at their `t_next`, the `pred` of
//! `one_step_sampler` at its `t`. Following the actual wiring (not the node names), every
//! sampler must start where its input state is:
//!
//! - `flow_sde_step` and `one_step_sampler`: `t` equal to the t of the state on `x` (step k's
//!   `t_next` = step k+1's `t`), and t > 0 (the SDE divides by σ = t; at t = 0 the state already
//!   is the image);
//! - `flow_sde_step`: t_next < t; an explicit `t2` below 1, and a warning when it differs from the
//!   derived value (the t = 1 step's t_next, the schedule's second timestep);
//! - `annealed_renoiser`: t_next below the t of its prediction.
//!
//! Also here, a per-node check that no parameter range can express: `http_reward`'s `url` must be
//! a plain `http://` URL.
//!
//! A repeat's expanded nodes keep the location of their template, so the mismatches of all the
//! steps of one template are reported as one error (naming each step) at its `t`.

use runner::compile::NodeInst;
use runner::diag::Severity;
use runner::yaml::YNode;
use runner::{Diagnostic, Diagnostics, Pipeline};

use crate::types::T_TOLERANCE;

/// Samplers whose input state `x` must be at their own `t`.
const STATE_SAMPLERS: &[&str] = &["flow_sde_step", "one_step_sampler"];

pub fn check(p: &Pipeline) -> Diagnostics {
    let mut d = Diagnostics::default();
    for n in &p.nodes {
        match n.ty {
            "flow_sde_step" => sde_step(p, n, &mut d),
            "one_step_sampler" => {
                positive_t(p, n, &mut d);
            }
            "annealed_renoiser" => renoiser(p, n, &mut d),
            "http_reward" => {
                if let Ok(url) = n.params.str("url")
                    && let Err(m) = crate::http_reward::check_url(url)
                {
                    d.push(n.params.error("url", m));
                }
            }
            _ => {}
        }
    }
    chains(p, &mut d);
    d
}

/// A timestep as written in a message: rounded to what a schedule means (0.775, not
/// 0.7750000000000001).
fn fmt_t(t: f64) -> String {
    format!("{}", (t * 1e6).round() / 1e6)
}

fn param(n: &NodeInst, name: &str) -> Option<f64> {
    n.params.f64(name).ok()
}

/// `step k of repeat `id`` for an expanded node, else `node `id``.
fn which(n: &NodeInst) -> String {
    match &n.step {
        Some((k, _, rid)) => format!("step {k} of repeat `{rid}`"),
        None => format!("node `{}`", n.id),
    }
}

/// ` at step k of repeat `id`` for an expanded node, else nothing (the node's id is named).
fn at_step(n: &NodeInst) -> String {
    match &n.step {
        Some(_) => format!(" at {}", which(n)),
        None => String::new(),
    }
}

/// The repeat variable that parameter `name` of the expanded node `n` is written as (`t: $t`),
/// with the line of its definition in the repeat's `vars`.
fn var_of(p: &Pipeline, n: &NodeInst, name: &str) -> Option<(String, u32)> {
    let (_, _, rid) = n.step.as_ref()?;
    let base = n.id.split('@').next()?;
    let id_is = |m: &YNode, id: &str| m.get("id").and_then(YNode::as_str) == Some(id);
    let rep = p
        .document
        .get("nodes")?
        .as_seq()?
        .iter()
        .filter_map(|item| item.get("repeat"))
        .find(|r| id_is(r, rid))?;
    let template = rep
        .get("nodes")?
        .as_seq()?
        .iter()
        .find(|m| id_is(m, base))?;
    let var = template
        .get("params")?
        .get(name)?
        .as_str()?
        .strip_prefix('$')?;
    let def = rep.get("vars")?.get(var)?;
    Some((var.to_string(), def.loc.line))
}

/// Where the value of parameter `name` of `n` was written: `` `$t` on line 30`` for a repeat
/// variable (the line of its `vars` entry), `line 12`, or `its default`.
fn whence(p: &Pipeline, n: &NodeInst, name: &str) -> String {
    if let Some((var, line)) = var_of(p, n, name) {
        return format!("`${var}` on line {line}");
    }
    match n.params.at.get(name).map(|y| y.loc.line) {
        Some(line) if line > 0 => format!("line {line}"),
        _ => "its default".into(),
    }
}

/// The timestep of the state on output `port` of `n`, if its type is known, and the parameter
/// that sets it.
fn state_t(n: &NodeInst, port: &str) -> Option<(f64, Option<&'static str>)> {
    match (n.ty, port) {
        ("gaussian_noise", "x") => Some((1.0, None)),
        ("flow_sde_step" | "annealed_renoiser", "x_next") => {
            Some((param(n, "t_next")?, Some("t_next")))
        }
        ("one_step_sampler", "pred") => Some((param(n, "t")?, Some("t"))),
        ("flow_sde_step" | "one_step_sampler", "x0") => Some((0.0, None)),
        _ => None,
    }
}

/// How the t of a state that `user` is given is known, for a message: `` the `t_next` of step
/// 1, `$t_next` on line 31``.
fn state_origin(
    p: &Pipeline,
    user: &NodeInst,
    prod: &NodeInst,
    port: &str,
    via: Option<&str>,
) -> String {
    let of = match (&user.step, &prod.step) {
        (Some(a), Some(b)) if a.2 == b.2 => format!("step {}", b.0),
        _ => which(prod),
    };
    match (via, prod.ty, port) {
        (Some(name), _, _) => format!("the `{name}` of {of}, {}", whence(p, prod, name)),
        (None, "gaussian_noise", _) => "pure noise".into(),
        _ => "a one-step prediction x̂0".into(),
    }
}

/// t > 0 for a sampler that evaluates the model at `t`; false (after reporting) when it is not.
fn positive_t(p: &Pipeline, n: &NodeInst, d: &mut Diagnostics) -> bool {
    let Some(t) = param(n, "t") else { return false };
    if t > 0.0 {
        return true;
    }
    let why = if n.ty == "flow_sde_step" {
        "the SDE step divides by σ = t, and at t = 0 the state already is the image"
    } else {
        "at t = 0 the state already is the image: there is nothing to predict"
    };
    let at = match &n.step {
        Some(_) => format!(" at {} ({})", which(n), whence(p, n, "t")),
        None => String::new(),
    };
    d.push(
        n.params
            .error(
                "t",
                format!("t = {}{at}: a sampler needs t > 0 ({why})", fmt_t(t)),
            )
            .help("end the schedule of `t` above 0; the last step's `t_next` may be 0"),
    );
    false
}

fn sde_step(p: &Pipeline, n: &NodeInst, d: &mut Diagnostics) {
    let (Some(t), Some(t_next), Some(t2)) = (param(n, "t"), param(n, "t_next"), param(n, "t2"))
    else {
        return;
    };
    if positive_t(p, n, d) && t_next >= t {
        d.push(n.params.error(
            "t_next",
            format!(
                "t_next = {} must be below t = {}{}: a step goes from noise (t = 1) towards \
                 the image (t = 0)",
                fmt_t(t_next),
                fmt_t(t),
                at_step(n)
            ),
        ));
    }
    if t2 <= 0.0 {
        return; // derived
    }
    if t2 >= 1.0 {
        d.push(
            n.params
                .error(
                    "t2",
                    format!(
                        "t2 = {} must be below 1: the noise at σ = 1 is a·√(1/(1 − t2))",
                        fmt_t(t2)
                    ),
                )
                .help("leave `t2` out to use the schedule's second timestep (the t = 1 step's t_next)"),
        );
    } else if t >= 1.0 && (t2 - t_next).abs() > T_TOLERANCE {
        let mut w = n.params.error(
            "t2",
            format!(
                "t2 = {} differs from the schedule's second timestep, t_next = {} of {} ({}), \
                 which Flow-GRPO uses in place of σ = 1: the first step's noise is not Flow-GRPO's",
                fmt_t(t2),
                fmt_t(t_next),
                which(n),
                whence(p, n, "t_next")
            ),
        );
        w.severity = Severity::Warning;
        d.push(w.help("leave `t2` out to derive it from the schedule"));
    }
}

fn renoiser(p: &Pipeline, n: &NodeInst, d: &mut Diagnostics) {
    let Some(t_next) = param(n, "t_next") else {
        return;
    };
    for (prod, port) in sources(p, n, "pred") {
        let Some((t, via)) = state_t(prod, port) else {
            continue;
        };
        if t > 0.0 && t_next >= t {
            d.push(n.params.error(
                "t_next",
                format!(
                    "t_next = {}{} must be below the t = {} of its prediction `{}.{port}` ({})",
                    fmt_t(t_next),
                    at_step(n),
                    fmt_t(t),
                    prod.id,
                    state_origin(p, n, prod, port, via)
                ),
            ));
        }
    }
}

/// The nodes and ports feeding input `port` of `n`.
fn sources<'a>(p: &'a Pipeline, n: &NodeInst, port: &str) -> Vec<(&'a NodeInst, &'static str)> {
    n.inputs
        .iter()
        .filter(|(name, _)| *name == port)
        .flat_map(|(_, srcs)| srcs.iter().map(|&(i, out)| (&p.nodes[i], out)))
        .collect()
}

/// A sampler given a state at another t than its own.
struct Mismatch<'a> {
    node: &'a NodeInst,
    t: f64,
    prod: &'a NodeInst,
    port: &'static str,
    t_in: f64,
    via: Option<&'static str>,
}

/// Every `flow_sde_step` and `one_step_sampler` must start at the t of the state on its `x`.
fn chains(p: &Pipeline, d: &mut Diagnostics) {
    // Grouped by template (one error per place), in pipeline order.
    let mut groups: Vec<(String, Vec<Mismatch>)> = Vec::new();
    for n in p.nodes.iter().filter(|n| STATE_SAMPLERS.contains(&n.ty)) {
        let Some(t) = param(n, "t") else { continue };
        if t <= 0.0 {
            continue; // reported by `positive_t`
        }
        for (prod, port) in sources(p, n, "x") {
            let Some((t_in, via)) = state_t(prod, port) else {
                continue;
            };
            if (t - t_in).abs() <= T_TOLERANCE {
                continue;
            }
            let key = match &n.step {
                Some((_, _, rid)) => format!("{rid}/{}", n.id.split('@').next().unwrap_or("")),
                None => n.id.clone(),
            };
            let m = Mismatch {
                node: n,
                t,
                prod,
                port,
                t_in,
                via,
            };
            match groups.iter_mut().find(|(k, _)| *k == key) {
                Some((_, ms)) => ms.push(m),
                None => groups.push((key, vec![m])),
            }
        }
    }
    for (_, ms) in groups {
        d.push(mismatch_error(p, &ms));
    }
}

fn mismatch_error(p: &Pipeline, ms: &[Mismatch]) -> Diagnostic {
    let m = &ms[0];
    let mut text = format!(
        "{} starts at t = {} but its input `x` is `{}.{}`, a state at t = {} ({})",
        match m.node.step {
            Some(_) => which(m.node),
            None => "the step".into(),
        },
        fmt_t(m.t),
        m.prod.id,
        m.port,
        fmt_t(m.t_in),
        state_origin(p, m.node, m.prod, m.port, m.via)
    );
    if ms.len() > 1 {
        let rest: Vec<String> = ms[1..]
            .iter()
            .map(|o| {
                let k = o.node.step.as_ref().map_or(0, |s| s.0);
                format!("step {k} (t = {} after {})", fmt_t(o.t), fmt_t(o.t_in))
            })
            .collect();
        text.push_str(&format!("; also {}", rest.join(", ")));
    }
    let in_one_repeat = matches!((&m.node.step, &m.prod.step), (Some(a), Some(b)) if a.2 == b.2);
    let help = match (
        var_of(p, m.node, "t"),
        m.via.and_then(|v| var_of(p, m.prod, v)),
    ) {
        (Some((tv, tl)), Some((nv, nl))) if in_one_repeat => format!(
            "the schedule does not chain: each step's `t` (`${tv}` on line {tl}) must equal the \
             previous step's `{}` (`${nv}` on line {nl})",
            m.via.unwrap_or("t_next")
        ),
        _ => "a sampler's `t` must be the timestep of the state it is given (the `t_next` of the \
              step before it, 1 after gaussian_noise)"
            .into(),
    };
    m.node.params.error("t", text).help(help)
}
