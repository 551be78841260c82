//! `shape_eval`: the built-in ShapeWorld verifier as a (non-differentiable) reward node.

use anyhow::{Result, bail};
use runner::{Inputs, Node, NodeCtx, NodeType, Outputs, ParamDef, PortDef, Registry};

use crate::types::{Images, PromptBatch, Rewards};
use crate::world::{self, IMAGE_LEN};

pub fn register(r: &mut Registry) {
    r.add_node(NodeType {
        name: "shape_eval",
        summary: "score images against their prompts with the exact ShapeWorld verifier",
        doc: "Reward = fraction of the verifier's criteria met (objects present, count, colour,\n\
              position/relation, no extra objects); `correct` when all are met. Never differentiated.\n\
              Logs reward_mean, accuracy and each criterion's pass rate. Place one per step to get\n\
              dense per-step rewards of every x̂0_k.",
        inputs: vec![
            PortDef::new("images", "images", "images to score, [B, 3, 32, 32] in [-1, 1]"),
            PortDef::new("prompts", "prompts", "the prompts (targets) of the batch"),
        ],
        outputs: vec![PortDef::new("rewards", "rewards", "one reward per sample, with criteria")],
        params: vec![ParamDef::choice(
            "reward",
            "fraction",
            &["fraction", "binary"],
            "`fraction` of criteria met, or `binary` (1 if all are met)",
        )],
        resources: vec![],
        factory: |ctx| {
            Ok(Box::new(ShapeEval {
                binary: ctx.params.str("reward")? == "binary",
                step: ctx.step.map_or(0, |s| s.0),
            }))
        },
    });
}

struct ShapeEval {
    binary: bool,
    step: usize,
}

/// Score a batch with the verifier.
pub fn score(images: &[f32], prompts: &PromptBatch, binary: bool, step: usize) -> Result<Rewards> {
    let b = prompts.len();
    if images.len() != b * IMAGE_LEN {
        bail!(
            "got {} image values for {b} prompts of {IMAGE_LEN} values each",
            images.len()
        );
    }
    let mut r = Rewards {
        step,
        ..Rewards::default()
    };
    for (i, rec) in prompts.records.iter().enumerate() {
        let img = &images[i * IMAGE_LEN..(i + 1) * IMAGE_LEN];
        let ev = world::evaluate(img, &rec.shapes("shape_eval")?.target)
            .map_err(|e| anyhow::anyhow!("prompt `{}`: {e}", rec.id))?;
        let value = if binary {
            ev.correct as u8 as f32
        } else {
            ev.reward
        };
        r.values.push(value);
        r.correct.push(ev.correct);
        r.criteria.push(
            world::CRITERIA
                .iter()
                .map(|c| (c.to_string(), ev.criterion(c)))
                .collect(),
        );
    }
    Ok(r)
}

/// Log reward_mean, accuracy and per-criterion pass rates.
pub fn log_metrics(ctx: &NodeCtx, r: &Rewards) {
    let n = r.values.len().max(1) as f64;
    ctx.metric(
        "reward_mean",
        r.values.iter().map(|v| *v as f64).sum::<f64>() / n,
    );
    if !r.correct.is_empty() {
        ctx.metric(
            "accuracy",
            r.correct.iter().filter(|c| **c).count() as f64 / n,
        );
    }
    for (ci, name) in world::CRITERIA.iter().enumerate() {
        let (mut pass, mut total) = (0usize, 0usize);
        for row in &r.criteria {
            if let Some(Some(p)) = row.get(ci).map(|c| c.1) {
                total += 1;
                pass += p as usize;
            }
        }
        if total > 0 {
            ctx.metric(&format!("crit_{name}"), pass as f64 / total as f64);
        }
    }
}

impl Node for ShapeEval {
    fn run(&mut self, ctx: &NodeCtx, inputs: &Inputs) -> Result<Outputs> {
        let images = inputs.get::<Images>("images")?;
        let prompts = inputs.get::<PromptBatch>("prompts")?;
        let r = score(&images.to_vec()?, prompts, self.binary, self.step)?;
        log_metrics(ctx, &r);
        Ok(Outputs::new().with("rewards", r))
    }
}
