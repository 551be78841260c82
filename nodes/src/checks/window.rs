//! `flow_sde_step`'s MixGRPO window (`window_*` parameters): it must fit the trajectory (the
//! repeat's step count), its parameters must be the same at every step, and none is given
//! without `window_size` (where it would do nothing).

use runner::{Diagnostics, Pipeline};

use super::{first_step, show, source};
use crate::flow_sde_step::{STRATEGY_PARAMS, WINDOW_PARAMS, window};

pub fn check(p: &Pipeline) -> Diagnostics {
    let mut d = Diagnostics::default();
    for n in p.nodes.iter().filter(|n| n.ty == "flow_sde_step") {
        let (k, count) = n.step.as_ref().map_or((1, 1), |(k, c, _)| (*k, *c));
        if k > 1 {
            // Reported once, at the first step, unless this step's window differs.
            if let Some(first) = first_step(p, n) {
                for name in WINDOW_PARAMS {
                    if n.params.values.get(name) != first.params.values.get(name) {
                        d.push(n.params.error(
                            name,
                            format!(
                                "the window differs between steps: {} at step {k}, {} at step 1 \
                                 (a trajectory has one window; give the `window_*` parameters \
                                 as constants)",
                                show(n, name),
                                show(first, name),
                            ),
                        ));
                    }
                }
            }
            continue;
        }
        match window(&n.params, count, p.seed) {
            Ok(Ok(Some(_))) => {
                if n.params.bool("seed_group").unwrap_or(false)
                    && let Some(noise) = source(p, n, "x")
                    && !(noise.ty == "gaussian_noise"
                        && noise.params.str("per").is_ok_and(|v| v == "group"))
                {
                    let what = if noise.ty == "gaussian_noise" {
                        format!("`{}` (gaussian_noise) draws one noise per sample", noise.id)
                    } else {
                        format!(
                            "it comes from `{}` ({}), not a gaussian_noise node",
                            noise.id, noise.ty
                        )
                    };
                    d.push(
                        n.params
                            .error("seed_group", format!("the group's members must start from one noise, but {what}"))
                            .help("set `per: group` on the gaussian_noise node that feeds the first step's `x`"),
                    );
                }
                let strategy = n.params.str("window_strategy").unwrap_or("progressive");
                for (name, only) in STRATEGY_PARAMS {
                    if strategy != only && n.params.at.contains_key(name) {
                        d.push(
                            n.params
                                .error(name, format!("has no effect with window_strategy `{strategy}` (only `{only}` reads it)"))
                                .help(format!("set `window_strategy: {only}`, or leave this out")),
                        );
                    }
                }
            }
            Ok(Ok(None)) => {
                for name in &WINDOW_PARAMS[1..] {
                    if n.params.at.contains_key(*name) {
                        d.push(
                            n.params
                                .error(name, "has no effect without `window_size` (no window: every step is an SDE step)")
                                .help("set `window_size` to the number of SDE steps per window, or leave this out"),
                        );
                    }
                }
            }
            Ok(Err(e)) => {
                let steps = match &n.step {
                    Some((_, c, rid)) => format!(" (the {c} steps of repeat `{rid}`)"),
                    None => " (a single step outside a repeat)".into(),
                };
                d.push(n.params.error(e.param, format!("{}{steps}", e.message)));
            }
            Err(e) => d.push(n.params.error("window_size", e)),
        }
    }
    d
}
