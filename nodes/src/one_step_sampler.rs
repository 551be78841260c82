//! `one_step_sampler`: the model's one-step prediction x̂0 = x_t − t·v_θ(x_t, t, c).

use anyhow::{Result, bail};
use runner::{Inputs, Node, NodeCtx, NodeType, Outputs, ParamDef, PortDef, Registry, ResourceSlot};

use crate::flow_model::{FlowModelRes, TYPE};
use crate::types::{Images, Prediction, PromptBatch};

pub fn register(r: &mut Registry) {
    r.add_node(NodeType {
        name: "one_step_sampler",
        summary: "predict x̂0 = x_t − t·v and ε̂ = x_t + (1 − t)·v from the current policy",
        doc: "Evaluates the velocity v_θ(x_t, t, c) of the `policy` model (with classifier-free\n\
              guidance when cfg > 1) and outputs the one-step prediction x̂0 and the noise estimate\n\
              ε̂. In TAFS-GRPO it runs once per step k of the repeat block (t = $t).\n\
              The input state must be at this `t`: validation refuses a `t` of 0 and one that is\n\
              not the `t_next` of the step feeding `x` (followed through the inputs); at run time\n\
              a state at another t fails with both values.",
        inputs: vec![
            PortDef::new("x", "images", "the state x_t"),
            PortDef::new("prompts", "prompts", "the batch's prompts"),
        ],
        outputs: vec![
            PortDef::new("pred", "prediction", "x_t, v, x̂0 and ε̂ (for the renoiser)"),
            PortDef::new("x0", "images", "the one-step prediction x̂0 (for rewards)"),
        ],
        params: vec![
            ParamDef::float("t", 1.0, 0.0, 1.0, "timestep of the input state (1 = noise)"),
            ParamDef::float("cfg", 1.0, 0.0, 50.0, "classifier-free guidance scale (1 = off)"),
        ],
        resources: vec![ResourceSlot { name: "policy", ty: TYPE, write: false, doc: "the model being trained" }],
        factory: |ctx| {
            let t = ctx.params.f32("t")?;
            if t <= 0.0 {
                bail!("`t` must be > 0 (at t = 0 the input already is the image)");
            }
            Ok(Box::new(OneStepSampler {
                t,
                cfg: ctx.params.f32("cfg")?,
                step: ctx.step.map_or(1, |s| s.0),
            }))
        },
    });
}

struct OneStepSampler {
    t: f32,
    cfg: f32,
    step: usize,
}

impl Node for OneStepSampler {
    fn run(&mut self, ctx: &NodeCtx, inputs: &Inputs) -> Result<Outputs> {
        let x = inputs.get::<Images>("x")?;
        x.expect_t("x", self.t)?;
        let prompts = inputs.get::<PromptBatch>("prompts")?;
        if x.batch() != prompts.len() {
            bail!(
                "`x` has {} samples but `prompts` has {}",
                x.batch(),
                prompts.len()
            );
        }
        let policy = ctx.read("policy", |m: &FlowModelRes| Ok(m.sampler()))?;
        policy.check_state("x", x.image_shape())?;
        let x_t = x.tensor.clone();
        let (v, graph) = policy.velocity(
            &x_t,
            self.t,
            &prompts.conditioning(&policy.device),
            self.cfg,
            // With `rollout_graph: keep` the graph rides on `pred` to a renoiser's transition;
            // a step whose `pred` nobody reads (the last, with `when: not_last`) keeps none.
            ctx.is_read("pred"),
        )?;
        let x0 = x_t.clone() - v.clone().mul_scalar(self.t);
        let eps = x_t.clone() + v.clone().mul_scalar(1.0 - self.t);
        let pred = Prediction {
            t: self.t,
            step: self.step,
            x_t,
            v,
            x0: x0.clone(),
            eps,
            cfg: self.cfg,
            graph,
        };
        Ok(Outputs::new()
            .with("pred", pred)
            .with("x0", Images { tensor: x0, t: 0.0 }))
    }
}
