//! `flow_sde_step`: Flow-GRPO's SDE sampler step (the baseline), a Gaussian policy.
//!
//! σ = t, σ' = t_next, Δt = σ' − σ < 0, s = a·√(σ/(1−σ̃)) (σ̃ = σ, or t₂ when σ = 1):
//! μ = x·(1 + s²Δt/(2σ)) + v·(1 + s²(1−σ)/(2σ))·Δt, x' = μ + s·√(−Δt)·ε.
//!
//! t₂ is Flow-GRPO's `sigmas[1]`, the schedule's second timestep. Unless given, it is derived:
//! the step at σ = 1 is the schedule's first, so its own t_next is that second timestep
//! ([`kernel`]). Validation (`checks::schedule`) checks that the steps chain and an explicit t₂.

use anyhow::{Result, bail};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use runner::{Inputs, Node, NodeCtx, NodeType, Outputs, ParamDef, PortDef, Registry, ResourceSlot};

use crate::flow_model::{FlowModelRes, TYPE};
use crate::grpo::LinearGaussian;
use crate::grpo::gaussian_step;
use crate::model::{sample_standard_normal, tensor_from_vec};
use crate::types::{Images, PromptBatch, Transition};

pub fn register(r: &mut Registry) {
    r.add_node(NodeType {
        name: "flow_sde_step",
        summary: "Flow-GRPO SDE step from t to t_next (baseline sampler)",
        doc: "Evaluates v_θ(x_t, t, c) and takes one step of Flow-GRPO's SDE with noise level `a`:\n\
              σ = t, s = a·√(σ/(1 − σ̃)), σ̃ = σ except at σ = 1, where Flow-GRPO uses the\n\
              schedule's second timestep: `t2`, by default derived as this step's `t_next` (the\n\
              step at t = 1 is the first, so its t_next is the second timestep). An explicit `t2`\n\
              must be below 1; one that differs from that t_next is warned about.\n\
              Outputs the next state, the transition (with its old log-prob, mean over\n\
              dimensions) and the one-step prediction x̂0 = x_t − t·v (for optional dense rewards).\n\
              The input state must be at this step's `t`: validation refuses steps that do not\n\
              chain (step k's `t_next` ≠ step k+1's `t`, followed through the `x` inputs) and a\n\
              `t` of 0; at run time a state at another t fails with both values.",
        inputs: vec![
            PortDef::new("x", "images", "the state x_t"),
            PortDef::new("prompts", "prompts", "the batch's prompts"),
        ],
        outputs: vec![
            PortDef::new("x_next", "images", "the state x_{t_next}"),
            PortDef::new("transition", "transition", "the step with its old log-prob (for GRPO)"),
            PortDef::new("x0", "images", "one-step prediction x̂0 at t"),
        ],
        params: vec![
            ParamDef::float("t", 1.0, 0.0, 1.0, "timestep of the input state"),
            ParamDef::float("t_next", 0.9, 0.0, 1.0, "timestep after the step"),
            ParamDef::float("noise_level", 0.7, 0.0, 10.0, "a: the SDE noise level"),
            ParamDef::float(
                "t2",
                0.0,
                0.0,
                1.0,
                "σ̃ used when σ = 1, the schedule's second timestep; 0 = derive it (this step's t_next)",
            ),
            ParamDef::float("cfg", 1.0, 0.0, 50.0, "classifier-free guidance scale (1 = off)"),
        ],
        resources: vec![ResourceSlot { name: "policy", ty: TYPE, write: false, doc: "the model being trained" }],
        factory: |ctx| {
            let p = ctx.params;
            let kernel = kernel(p.f32("t")?, p.f32("t_next")?, p.f32("noise_level")?, p.f32("t2")?)?;
            Ok(Box::new(FlowSdeStep {
                t: p.f32("t")?,
                t_next: p.f32("t_next")?,
                noise_level: p.f32("noise_level")?,
                cfg: p.f32("cfg")?,
                kernel,
                step: ctx.step.map_or(1, |s| s.0),
            }))
        },
    });
}

/// The `t2` a step uses: the explicit value, or (0) the derived one, this step's `t_next`.
pub fn effective_t2(t_next: f32, t2: f32) -> f32 {
    if t2 > 0.0 { t2 } else { t_next }
}

/// The Gaussian kernel of a step from `t` to `t_next` with noise level `a` and the `t2`
/// parameter (0 = derived, see [`effective_t2`]).
pub fn kernel(t: f32, t_next: f32, noise_level: f32, t2: f32) -> Result<LinearGaussian> {
    LinearGaussian::flow_sde(t, t_next, noise_level, effective_t2(t_next, t2))
}

struct FlowSdeStep {
    t: f32,
    t_next: f32,
    noise_level: f32,
    cfg: f32,
    kernel: LinearGaussian,
    step: usize,
}

impl Node for FlowSdeStep {
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
        let device = policy.device.clone();
        let [b, c, h, w] = x.tensor.dims();
        let x_t = x.tensor.clone();
        let (v, graph) = policy.velocity(&x_t, self.t, &prompts.conditioning(&device), self.cfg)?;
        let k = self.kernel;
        let mut rng = ChaCha8Rng::seed_from_u64(ctx.seed_for("eps"));
        let eps = tensor_from_vec(
            sample_standard_normal(&mut rng, b * c * h * w),
            [b, c, h, w],
            &device,
        );
        let (x_next, old_logprob) = gaussian_step(&x_t, &v, k, eps)?;
        let x0 = x_t.clone() - v.mul_scalar(self.t);
        let tr = Transition {
            step: self.step,
            t: self.t,
            t_next: self.t_next,
            tau: self.noise_level,
            kernel: k,
            cfg: self.cfg,
            x_t,
            x_next: x_next.clone(),
            old_logprob,
            sampler: "flow_sde",
            graph: if k.is_stochastic() { graph } else { None },
        };
        Ok(Outputs::new()
            .with(
                "x_next",
                Images {
                    tensor: x_next,
                    t: self.t_next,
                },
            )
            .with("transition", tr)
            .with("x0", Images { tensor: x0, t: 0.0 }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn should_derive_t2_from_the_first_step_t_next() {
        // Flow-GRPO's σ̃ at σ = 1 is the schedule's second timestep, the first step's t_next.
        let derived = kernel(1.0, 0.9, 0.7, 0.0).unwrap();
        let explicit = LinearGaussian::flow_sde(1.0, 0.9, 0.7, 0.9).unwrap();
        assert_eq!(
            (derived.a, derived.b, derived.std),
            (explicit.a, explicit.b, explicit.std)
        );
        // Another schedule: the derived value follows it (at σ = 1 with σ̃ = t_next the step's
        // std is exactly `a`), where the stale hand-set 0.9 would change the first step's noise.
        let four = kernel(1.0, 0.75, 0.7, 0.0).unwrap();
        let want = LinearGaussian::flow_sde(1.0, 0.75, 0.7, 0.75).unwrap();
        assert_eq!((four.a, four.b, four.std), (want.a, want.b, want.std));
        assert!((four.std - 0.7).abs() < 1e-6, "{}", four.std);
        let stale = LinearGaussian::flow_sde(1.0, 0.75, 0.7, 0.9).unwrap();
        assert!(
            (stale.std - four.std).abs() > 0.1,
            "{} vs {}",
            stale.std,
            four.std
        );
        // An explicit value is used as given, and t2 plays no part below σ = 1.
        assert_eq!(effective_t2(0.9, 0.8), 0.8);
        let mid = kernel(0.5, 0.4, 0.7, 0.0).unwrap();
        let mid_explicit = kernel(0.5, 0.4, 0.7, 0.8).unwrap();
        assert_eq!(mid.std, mid_explicit.std);
    }
}
