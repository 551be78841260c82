//! BranchGRPO tree rollouts (`flow_sde_step`'s `branch_*` parameters, `tree_advantage`): the
//! tree must fit the trajectory, be the same at every step, not be combined with a window, and
//! have as many leaves as the prompt loader's group size; `tree_advantage` must read the steps
//! of a tree rollout.

use runner::compile::NodeInst;
use runner::{Diagnostic, Diagnostics, Pipeline};

use super::{first_step, show, source};
use crate::flow_sde_step::{BRANCH_PARAMS, branch_tree};

pub fn check(p: &Pipeline) -> Diagnostics {
    let mut d = Diagnostics::default();
    for n in p.nodes.iter().filter(|n| n.ty == "flow_sde_step") {
        let (k, count) = n.step.as_ref().map_or((1, 1), |(k, c, _)| (*k, *c));
        if k > 1 {
            if let Some(first) = first_step(p, n) {
                for name in BRANCH_PARAMS {
                    if n.params.values.get(name) != first.params.values.get(name) {
                        d.push(n.params.error(
                            name,
                            format!(
                                "the tree differs between steps: {} at step {k}, {} at step 1 \
                                 (a trajectory has one tree; give the `branch_*` parameters as \
                                 constants)",
                                show(n, name),
                                show(first, name),
                            ),
                        ));
                    }
                }
            }
            continue;
        }
        match branch_tree(&n.params, count) {
            Ok(Ok(Some(tree))) => {
                if n.params.i64("window_size").is_ok_and(|w| w > 0) {
                    d.push(
                        n.params
                            .error("branch_at", "a tree rollout cannot be combined with an SDE window (`window_size`)")
                            .help("BranchGRPO's steps are all SDE steps: set `window_size: 0` or leave `branch_at` out"),
                    );
                }
                if let Some(loader) = source(p, n, "prompts").filter(|l| l.ty == "prompt_loader")
                    && let Ok(g) = loader.params.usize("group_size")
                    && g != tree.leaves()
                {
                    d.push(
                        loader
                            .params
                            .error(
                                "group_size",
                                format!(
                                    "group_size = {g}, but the tree rollout of `{}` has {} leaves \
                                     per prompt (branch_roots·branch_factor^|branch_at| = {}·{}^{})",
                                    n.id,
                                    tree.leaves(),
                                    tree.roots,
                                    tree.factor,
                                    tree.depth()
                                ),
                            )
                            .help(format!("set `group_size: {}`", tree.leaves())),
                    );
                }
            }
            Ok(Ok(None)) => {
                for name in &BRANCH_PARAMS[1..] {
                    if n.params.at.contains_key(*name) {
                        d.push(
                            n.params
                                .error(name, "has no effect without `branch_at` (no tree: every sample is its own trajectory)")
                                .help("list the branching steps in `branch_at`, or leave this out"),
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
            Err(e) => d.push(n.params.error("branch_at", e)),
        }
    }
    for n in p.nodes.iter().filter(|n| n.ty == "tree_advantage") {
        let sources = n
            .inputs
            .iter()
            .find(|(port, _)| *port == "transitions")
            .map_or(&[][..], |(_, s)| s.as_slice());
        for &(i, port) in sources {
            let src = &p.nodes[i];
            let branching = src.ty == "flow_sde_step"
                && src
                    .params
                    .usize_list("branch_at")
                    .is_ok_and(|a| !a.is_empty());
            if !branching {
                d.push(
                    node_error(
                        n,
                        format!(
                            "node `{}`: input `transitions` reads `{}.{port}`, which is not a step \
                             of a tree rollout",
                            n.id, src.id
                        ),
                    )
                    .help("connect the transitions of a `flow_sde_step` with `branch_at` (e.g. `sde@*.transition`)"),
                );
                break;
            }
        }
        // Depth pruning names depths of the tree (1 to its depth m).
        let tree = sources.first().and_then(|&(i, _)| {
            let src = &p.nodes[i];
            let count = src.step.as_ref().map_or(1, |(_, c, _)| *c);
            branch_tree(&src.params, count).ok()?.ok()?
        });
        if let (Some(tree), Ok(prune)) = (tree, n.params.usize_list("prune_depths"))
            && let Some(&bad) = prune.iter().find(|&&x| x > tree.depth())
        {
            d.push(n.params.error(
                "prune_depths",
                format!(
                    "depth {bad} does not exist: the tree has depths 1 to {} (one per branching step)",
                    tree.depth()
                ),
            ));
        }
    }
    d
}

/// The node feeding input `port` of `n` (its first source).
fn node_error(n: &NodeInst, text: String) -> Diagnostic {
    match &n.params.owner_at {
        Some(at) => at.error(text),
        None => Diagnostic::error(text),
    }
}
