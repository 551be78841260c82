//! `tree_advantage`: BranchGRPO's depth-wise advantages of a tree rollout (see
//! [`crate::grpo::tree`]).

use anyhow::{Result, bail};
use runner::{
    Inputs, Node, NodeCtx, NodeType, Outputs, ParamDef, ParamKind, ParamValue, PortDef, Registry,
};

use crate::grpo::{Fusion, WidthPruning, tree_advantages};
use crate::types::{Advantages, PromptBatch, Rewards, Transition};

pub fn register(r: &mut Registry) {
    r.add_node(NodeType {
        name: "tree_advantage",
        summary: "BranchGRPO: depth-wise advantages of a branching rollout, each tree edge once",
        doc: "For the transitions of a tree rollout (`flow_sde_step` with `branch_at`): the final\n\
              rewards of the leaves (a prompt group's samples) are fused up the tree, each inner\n\
              node's reward being the mean of its children's (`fusion: mean`) or their\n\
              softmax(α·ℓ_c)-weighted sum (`fusion: prob`, ℓ_c the summed old log-probs of the\n\
              transitions into child c). Each depth's node rewards are normalised within the\n\
              prompt's group, (r − mean_d)/(std_d + eps), unbiased std, 0 for a single node or\n\
              tied rewards (std < 1e-6). A transition gets the advantage of the node it leads\n\
              into, and every tree edge is trained once: samples that share the edge leave it to\n\
              their node's first member (the advantages' mask; `grpo_update` averages over the\n\
              trained pairs). `prune_depths` leaves the edges into those depths untrained\n\
              (BranchGRPO's depth pruning); `width_pruning` trains the edges after the last split\n\
              only for the best (`top`) or the best and worst (`extremes`) `width_keep` fraction\n\
              of each group's leaves. Non-finite rewards stop the iteration before any update,\n\
              naming the prompt. Metrics: abs_mean (of the trained advantages),\n\
              trained_fraction (of the sample-transition pairs), tied_groups.",
        inputs: vec![
            PortDef::new(
                "rewards",
                "rewards",
                "the final image's rewards (the leaves')",
            ),
            PortDef::new(
                "prompts",
                "prompts",
                "the batch (its GRPO groups: one tree each)",
            ),
            PortDef::new(
                "transitions",
                "transition",
                "every step of the tree rollout, in step order",
            )
            .many(),
        ],
        outputs: vec![PortDef::new(
            "advantages",
            "advantages",
            "[transitions][samples], with the mask of the trained pairs",
        )],
        params: vec![
            ParamDef::choice(
                "fusion",
                "mean",
                &["mean", "prob"],
                "how leaf rewards reach inner nodes",
            ),
            ParamDef::float(
                "alpha",
                1.0,
                0.0,
                1e3,
                "α of `fusion: prob` (0 = uniform, the mean)",
            ),
            ParamDef::float(
                "eps",
                1e-8,
                0.0,
                1.0,
                "added to each depth's std (BranchGRPO's 1e-8)",
            ),
            ParamDef::new(
                "prune_depths",
                ParamKind::IntList {
                    min: 1,
                    max: 1 << 16,
                },
                "depths (1 = after the first split) whose edges are not trained",
            )
            .default(ParamValue::IntList(vec![])),
            ParamDef::choice(
                "width_pruning",
                "none",
                &["none", "top", "extremes"],
                "which leaves train the edges after the last split",
            ),
            ParamDef::float(
                "width_keep",
                0.5,
                0.0,
                1.0,
                "fraction of a group's leaves width pruning keeps",
            ),
        ],
        resources: vec![],
        factory: |ctx| {
            let p = ctx.params;
            let fusion = match p.str("fusion")? {
                "prob" => Fusion::Prob {
                    alpha: p.f32("alpha")?,
                },
                _ => Fusion::Mean,
            };
            let keep = p.f32("width_keep")?;
            let width = match p.str("width_pruning")? {
                "top" => WidthPruning::Top(keep),
                "extremes" => WidthPruning::Extremes(keep),
                _ => WidthPruning::None,
            };
            if width != WidthPruning::None && keep <= 0.0 {
                bail!(
                    "parameter `width_keep`: width pruning keeps a fraction above 0 of the leaves"
                );
            }
            Ok(Box::new(TreeAdvantage {
                fusion,
                eps: p.f32("eps")?,
                prune_depths: p.usize_list("prune_depths")?,
                width,
            }))
        },
    });
}

struct TreeAdvantage {
    fusion: Fusion,
    eps: f32,
    prune_depths: Vec<usize>,
    width: WidthPruning,
}

impl Node for TreeAdvantage {
    fn run(&mut self, ctx: &NodeCtx, inputs: &Inputs) -> Result<Outputs> {
        let rewards = inputs.get::<Rewards>("rewards")?;
        let prompts = inputs.get::<PromptBatch>("prompts")?;
        let transitions = inputs.all::<Transition>("transitions")?;
        if let Some(i) = rewards.values.iter().position(|v| !v.is_finite()) {
            bail!(
                "reward of sample {i} (prompt `{}`: \"{}\") is {}; the iteration is not applied",
                prompts.records[i].id,
                prompts.records[i].prompt,
                rewards.values[i]
            );
        }
        let Some(tree) = transitions.first().and_then(|t| t.branch.clone()) else {
            bail!(
                "transition 1 is not from a tree rollout: connect the steps of a `flow_sde_step` \
                 with `branch_at`"
            );
        };
        // Every step of the one tree, each once: logprob[s] is step s's.
        let mut logprob = vec![None; tree.steps];
        let mut order = Vec::with_capacity(transitions.len());
        for (k, t) in transitions.iter().enumerate() {
            match &t.branch {
                Some(b) if **b == *tree => {}
                _ => bail!(
                    "transition {} is not from the same tree rollout as transition 1",
                    k + 1
                ),
            }
            let s = t.step - 1;
            if s >= tree.steps || logprob[s].is_some() {
                bail!(
                    "transition {} is step {} of a {}-step tree rollout, which came twice or does not exist",
                    k + 1,
                    t.step,
                    tree.steps
                );
            }
            logprob[s] = Some(t.old_logprob.clone());
            order.push(s);
        }
        let Some(logprob) = logprob.into_iter().collect::<Option<Vec<_>>>() else {
            bail!(
                "{} transitions for a {}-step tree rollout: connect every step (e.g. `sde@*.transition`)",
                transitions.len(),
                tree.steps
            );
        };
        let a = tree_advantages(
            &tree,
            &rewards.values,
            &prompts.group,
            &prompts.member,
            &logprob,
            self.fusion,
            self.eps,
            &self.prune_depths,
            self.width,
        )
        .map_err(|e| anyhow::anyhow!("tree rollout: {e}"))?;
        let values: Vec<Vec<f32>> = order.iter().map(|&s| a.values[s].clone()).collect();
        let mask: Vec<Vec<bool>> = order.iter().map(|&s| a.mask[s].clone()).collect();
        let (mut sum, mut trained) = (0f64, 0usize);
        for (v, m) in values.iter().zip(&mask) {
            for (a, &m) in v.iter().zip(m) {
                if m {
                    sum += a.abs() as f64;
                    trained += 1;
                }
            }
        }
        let pairs = mask.iter().map(Vec::len).sum::<usize>().max(1);
        ctx.metric("abs_mean", sum / trained.max(1) as f64);
        ctx.metric("trained_fraction", trained as f64 / pairs as f64);
        let leaves = &a.node_reward;
        let groups = leaves.iter().filter(|g| !g.is_empty()).count();
        let tied = leaves
            .iter()
            .filter_map(|g| g.last())
            .filter(|r| r.windows(2).all(|w| w[0] == w[1]))
            .count();
        ctx.metric("tied_groups", tied as f64 / groups.max(1) as f64);
        if ctx.summaries_enabled() {
            for (v, t) in values.iter().zip(&transitions) {
                ctx.histogram(
                    &format!("advantage/step{}", t.step),
                    v.iter().map(|&a| a as f64).collect(),
                );
            }
        }
        Ok(Outputs::new().with(
            "advantages",
            Advantages {
                values,
                mode: "tree".into(),
                mask: Some(mask),
            },
        ))
    }
}
