//! `annealed_renoiser`: TAFS's stochastic step — re-noise the one-step prediction with a
//! temperature-annealed amount of fresh noise.
//!
//! x_{t'} = (1 − t')·x̂0 + t'·(√(1−τ²)·ε̂ + τ·ε), ε ~ N(0, I) fresh. The step is a Gaussian
//! policy with mean μ = (1 − t')·x̂0 + t'·√(1−τ²)·ε̂ and std σ = t'·τ; its log-probability
//! (mean over dimensions, f32) is kept as the "old" log-prob for the GRPO ratio.

use anyhow::{Result, bail};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use runner::{Inputs, Node, NodeCtx, NodeType, Outputs, ParamDef, PortDef, Registry};

use crate::grpo::{LinearGaussian, gaussian_step};
use crate::model::{sample_standard_normal, tensor_from_vec};
use crate::types::{Images, Prediction, Transition};

pub fn register(r: &mut Registry) {
    r.add_node(NodeType {
        name: "annealed_renoiser",
        summary: "TAFS step: re-noise x̂0 to t_next with temperature τ (a Gaussian policy)",
        doc: "x_next = (1 − t_next)·x̂0 + t_next·(√(1−τ²)·ε̂ + τ·ε) with fresh ε ~ N(0, I).\n\
              τ = 1 is plain consistency-style re-noising; τ → 0 is deterministic (then the step\n\
              has no log-probability and is not trained). τ may also be annealed over training\n\
              iterations: τ(i) = τ·(1 + (iter_scale_end − 1)·s(i/iterations)) with s the\n\
              `iter_schedule` (none, linear, cosine).\n\
              `t_next` must be below the prediction's t, and the state it produces is at t_next:\n\
              the sampler it feeds must have that `t` (validation checks both).",
        inputs: vec![PortDef::new(
            "pred",
            "prediction",
            "the one-step prediction at t",
        )],
        outputs: vec![
            PortDef::new("x_next", "images", "the re-noised state x_{t_next}"),
            PortDef::new(
                "transition",
                "transition",
                "the step with its old log-prob (for GRPO)",
            ),
        ],
        params: vec![
            ParamDef::float("t_next", 0.5, 0.0, 1.0, "timestep after the step"),
            ParamDef::float("tau", 1.0, 0.0, 1.0, "temperature τ of this step"),
            ParamDef::choice(
                "iter_schedule",
                "none",
                &["none", "linear", "cosine"],
                "annealing of τ over training iterations",
            ),
            ParamDef::float(
                "iter_scale_end",
                1.0,
                0.0,
                1e3,
                "τ multiplier reached at the last iteration",
            ),
        ],
        resources: vec![],
        factory: |ctx| {
            let p = ctx.params;
            Ok(Box::new(Renoiser {
                t_next: p.f32("t_next")?,
                tau: p.f32("tau")?,
                schedule: p.str("iter_schedule")?.to_string(),
                scale_end: p.f32("iter_scale_end")?,
            }))
        },
    });
}

struct Renoiser {
    t_next: f32,
    tau: f32,
    schedule: String,
    scale_end: f32,
}

impl Renoiser {
    fn tau_at(&self, it: u64, iterations: u64) -> f32 {
        let u = if iterations <= 1 {
            0.0
        } else {
            (it - 1) as f32 / (iterations - 1) as f32
        };
        let s = match self.schedule.as_str() {
            "linear" => u,
            "cosine" => 0.5 * (1.0 - (std::f32::consts::PI * u).cos()),
            _ => 0.0,
        };
        (self.tau * (1.0 + (self.scale_end - 1.0) * s)).clamp(0.0, 1.0)
    }
}

impl Node for Renoiser {
    fn run(&mut self, ctx: &NodeCtx, inputs: &Inputs) -> Result<Outputs> {
        let pred = inputs.get::<Prediction>("pred")?;
        let tau = self.tau_at(ctx.iteration, ctx.iterations);
        if self.t_next >= pred.t {
            bail!(
                "t_next = {} must be below the prediction's t = {}",
                self.t_next,
                pred.t
            );
        }
        let kernel = LinearGaussian::tafs(pred.t, self.t_next, tau)?;
        let [b, c, h, w] = pred.x_t.dims();
        let device = pred.x_t.device();
        let mut rng = ChaCha8Rng::seed_from_u64(ctx.seed_for("eps"));
        let eps = tensor_from_vec(
            crate::dist::shard_rows(ctx.rank(), ctx.world(), b, c * h * w, |n| {
                sample_standard_normal(&mut rng, n)
            }),
            [b, c, h, w],
            &device,
        );
        let (x_next, old_logprob) = gaussian_step(&pred.x_t, &pred.v, kernel, eps)?;
        ctx.metric("tau", tau as f64);
        let tr = Transition {
            step: pred.step,
            t: pred.t,
            t_next: self.t_next,
            tau,
            kernel,
            sde_std: kernel.std,
            cfg: pred.cfg,
            x_t: pred.x_t.clone(),
            x_next: x_next.clone(),
            old_logprob,
            sampler: "tafs",
            // A deterministic step is not trained: its graph is dropped with the prediction.
            graph: if kernel.is_stochastic() {
                pred.graph.as_ref().and_then(|g| g.pass_on())
            } else {
                None
            },
            branch: None,
        };
        Ok(Outputs::new()
            .with(
                "x_next",
                Images {
                    tensor: x_next,
                    t: self.t_next,
                },
            )
            .with("transition", tr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grpo::log_prob;
    use crate::types::to_vec;
    use burn::tensor::Device;

    #[test]
    fn should_match_the_closed_form_log_density_per_sample() {
        let dev = Device::flex();
        let x = tensor_from_vec(vec![0.3, -0.2, 0.0, 1.0], [1, 1, 2, 2], &dev);
        let m = tensor_from_vec(vec![0.0; 4], [1, 1, 2, 2], &dev);
        let got = to_vec(&log_prob(x, m, 0.5)).unwrap()[0];
        let k = LinearGaussian {
            a: 1.0,
            b: 0.0,
            std: 0.5,
        };
        let want = k.log_prob(&[0.3, -0.2, 0.0, 1.0], &[0.0; 4]);
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    }

    #[test]
    fn should_be_deterministic_as_tau_goes_to_zero() {
        let r = Renoiser {
            t_next: 0.5,
            tau: 0.0,
            schedule: "none".into(),
            scale_end: 1.0,
        };
        let k = LinearGaussian::tafs(0.75, r.t_next, r.tau_at(1, 10)).unwrap();
        assert!(!k.is_stochastic());
        // τ = 0 re-noises with the model's own noise estimate: x' = (1−t')·x̂0 + t'·ε̂.
        let (x, v) = (0.2f32, -0.7f32);
        let x0 = x - 0.75 * v;
        let eps = x + 0.25 * v;
        assert!((k.a * x + k.b * v - (0.5 * x0 + 0.5 * eps)).abs() < 1e-6);
    }

    #[test]
    fn should_anneal_tau_over_iterations() {
        let r = Renoiser {
            t_next: 0.5,
            tau: 0.8,
            schedule: "linear".into(),
            scale_end: 0.5,
        };
        assert!((r.tau_at(1, 11) - 0.8).abs() < 1e-6);
        assert!((r.tau_at(6, 11) - 0.6).abs() < 1e-6);
        assert!((r.tau_at(11, 11) - 0.4).abs() < 1e-6);
    }
}
