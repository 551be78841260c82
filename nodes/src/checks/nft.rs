//! `nft_update`: its re-noising range must not be empty (`t_min` ≤ `t_max`), and its reference
//! term (`kl_beta` > 0) needs a policy that keeps a reference (`reference: true`). It trains
//! on fresh re-noisings of the final images and reads no rollout graph: a policy that keeps
//! them (`rollout_graph: keep`) for no `grpo_update` only holds memory, and is refused.

use runner::{Diagnostics, Pipeline};

pub fn check(p: &Pipeline) -> Diagnostics {
    let mut d = Diagnostics::default();
    for n in p.nodes.iter().filter(|n| n.ty == "nft_update") {
        if n.params.f64("kl_beta").is_ok_and(|k| k > 0.0)
            && let Some(&(_, i, _)) = n.uses.iter().find(|(slot, _, _)| *slot == "policy")
            && let r = &p.resources[i]
            && r.params.bool("reference").is_ok_and(|v| !v)
        {
            d.push(
                n.params
                    .error(
                        "kl_beta",
                        format!(
                            "kl_beta > 0 needs a reference model, but resource `{}` keeps none",
                            r.name
                        ),
                    )
                    .help(format!(
                        "set `reference: true` on `{}` (a LoRA policy's reference is its base: no copy)",
                        r.name
                    )),
            );
        }
        if let Some(&(_, i, _)) = n.uses.iter().find(|(slot, _, _)| *slot == "policy")
            && let r = &p.resources[i]
            && r.params.str("rollout_graph").ok() == Some("keep")
            && !p.nodes.iter().any(|u| {
                u.ty == "grpo_update" && u.uses.iter().any(|&(s, j, _)| s == "policy" && j == i)
            })
        {
            d.push(
                r.params
                    .error(
                        "rollout_graph",
                        format!(
                            "`rollout_graph: keep` on `{}` holds every sampler step's graph, but \
                             its update `{}` (nft_update) re-noises the final images and reads none",
                            r.name, n.id
                        ),
                    )
                    .help("set `rollout_graph: recompute` (the default)"),
            );
        }
        let (Ok(lo), Ok(hi)) = (n.params.f64("t_min"), n.params.f64("t_max")) else {
            continue;
        };
        if lo > hi {
            d.push(
                n.params
                    .error(
                        "t_min",
                        format!("t_min = {lo} is above t_max = {hi}: no time to re-noise at"),
                    )
                    .help("re-noising times are drawn uniformly from [t_min, t_max]"),
            );
        }
    }
    d
}
