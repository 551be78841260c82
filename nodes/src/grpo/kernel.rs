//! Stochastic transition kernels of the samplers, as Gaussian policies.
//!
//! Both samplers take a step x → x' with x' ~ N(μ, σ²·I) where the mean is *linear* in the
//! current state x and the model's velocity v = v_θ(x, t, c): μ = a·x + b·v. So one small type,
//! [`LinearGaussian`], describes any of them, and the GRPO updater recomputes μ_θ from a fresh
//! velocity without knowing which sampler produced the transition.
//!
//! * **TAFS annealed re-noising** (t → t'): x̂0 = x − t·v, ε̂ = x + (1−t)·v,
//!   x' = (1−t')·x̂0 + t'·(√(1−τ²)·ε̂ + τ·ε), so μ = (1−t')·x̂0 + t'·√(1−τ²)·ε̂ and σ = t'·τ.
//! * **Flow-GRPO SDE** (σ = t, σ' = t', Δt = σ' − σ < 0, noise level a):
//!   s = a·√(σ/(1−σ̃)) with σ̃ = σ (σ̃ = t₂ when σ = 1),
//!   μ = x·(1 + s²Δt/(2σ)) + v·(1 + s²(1−σ)/(2σ))·Δt, std s·√(−Δt).
//!
//! Log-probabilities are computed in f32 and reduced as a **mean over dimensions** (as
//! Flow-GRPO does), so that ratios and clip ranges do not depend on the image size:
//! log π = mean_d[−(x'_d − μ_d)²/(2σ²)] − ln σ − ½·ln 2π.

use anyhow::{Result, bail};
use burn::tensor::Tensor;

use crate::types::to_vec;

/// Per-sample mean-over-dimensions log N(x; μ, σ²) of a batch, [B, C, H, W] → B values.
pub fn log_prob(x: Tensor<4>, mean: Tensor<4>, std: f32) -> Tensor<1> {
    let [b, c, h, w] = x.dims();
    let d = (c * h * w) as f32;
    let sq = (x - mean)
        .square()
        .reshape([b, c * h * w])
        .sum_dim(1)
        .reshape([b]);
    sq.mul_scalar(-1.0 / (2.0 * std * std * d))
        .sub_scalar(std.ln() + HALF_LN_2PI)
}

/// One step of a Gaussian policy x' ~ N(a·x_t + b·v, std²) with the given standard-normal
/// `eps` ([B, C, H, W], like x_t and v): x' and log π(x' | x_t) per sample (mean over
/// dimensions). A deterministic kernel returns the mean and log-probs of 0.
pub fn gaussian_step(
    x_t: &Tensor<4>,
    v: &Tensor<4>,
    kernel: LinearGaussian,
    eps: Tensor<4>,
) -> Result<(Tensor<4>, Vec<f32>)> {
    let mean = x_t.clone().mul_scalar(kernel.a) + v.clone().mul_scalar(kernel.b);
    if !kernel.is_stochastic() {
        return Ok((mean, vec![0.0; x_t.dims()[0]]));
    }
    let x_next = mean.clone() + eps.mul_scalar(kernel.std);
    let old_logprob = to_vec(&log_prob(x_next.clone(), mean, kernel.std))?;
    Ok((x_next, old_logprob))
}

/// A Gaussian transition x' ~ N(a·x + b·v, std²).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinearGaussian {
    pub a: f32,
    pub b: f32,
    pub std: f32,
}

pub const HALF_LN_2PI: f32 = 0.918_938_5;

impl LinearGaussian {
    /// TAFS re-noising from t to t_next with temperature tau ∈ [0, 1].
    pub fn tafs(t: f32, t_next: f32, tau: f32) -> Result<Self> {
        if !(0.0..=1.0).contains(&t) || !(0.0..=1.0).contains(&t_next) || t_next >= t {
            bail!("TAFS step needs 1 >= t > t_next >= 0, got t={t}, t_next={t_next}");
        }
        if !(0.0..=1.0).contains(&tau) {
            bail!("temperature tau must be in [0, 1], got {tau}");
        }
        let keep = (1.0 - tau * tau).max(0.0).sqrt();
        // μ = (1−t')(x − t v) + t'·keep·(x + (1−t) v)
        let a = (1.0 - t_next) + t_next * keep;
        let b = -(1.0 - t_next) * t + t_next * keep * (1.0 - t);
        Ok(LinearGaussian {
            a,
            b,
            std: t_next * tau,
        })
    }

    /// Flow-GRPO's SDE step from t to t_next (noise level `a`, `t2` the second timestep).
    pub fn flow_sde(t: f32, t_next: f32, noise_level: f32, t2: f32) -> Result<Self> {
        if !(0.0..=1.0).contains(&t) || !(0.0..=1.0).contains(&t_next) || t_next >= t || t <= 0.0 {
            bail!("SDE step needs 1 >= t > t_next >= 0, got t={t}, t_next={t_next}");
        }
        let sigma = t as f64;
        let dt = (t_next - t) as f64;
        let sigma_tilde = if t >= 1.0 { t2 as f64 } else { sigma };
        if sigma_tilde >= 1.0 {
            bail!("SDE step: σ̃ must be < 1 (t2={t2})");
        }
        let s = noise_level as f64 * (sigma / (1.0 - sigma_tilde)).sqrt();
        let a = 1.0 + s * s * dt / (2.0 * sigma);
        let b = (1.0 + s * s * (1.0 - sigma) / (2.0 * sigma)) * dt;
        Ok(LinearGaussian {
            a: a as f32,
            b: b as f32,
            std: (s * (-dt).sqrt()) as f32,
        })
    }

    /// Whether the step is stochastic enough to have a log-probability.
    pub fn is_stochastic(&self) -> bool {
        self.std > 1e-8
    }

    /// Mean-over-dimensions Gaussian log-density of `x_next` given the mean.
    pub fn log_prob(&self, x_next: &[f32], mean: &[f32]) -> f32 {
        let inv = 1.0 / (2.0 * self.std * self.std);
        let sq: f32 = x_next
            .iter()
            .zip(mean)
            .map(|(x, m)| (x - m) * (x - m))
            .sum::<f32>();
        -sq * inv / x_next.len().max(1) as f32 - self.std.ln() - HALF_LN_2PI
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn should_match_the_closed_form_gaussian_log_density() {
        let k = LinearGaussian {
            a: 1.0,
            b: 0.0,
            std: 0.5,
        };
        let x = [0.3f32, -0.2];
        let m = [0.0f32, 0.0];
        // Per dimension: −x²/(2·0.25) − ln 0.5 − ½ ln 2π; averaged over the two dimensions.
        let per: Vec<f64> = x
            .iter()
            .map(|v| {
                -(*v as f64).powi(2) / 0.5 - 0.5f64.ln() - 0.5 * (2.0 * std::f64::consts::PI).ln()
            })
            .collect();
        let want = (per[0] + per[1]) / 2.0;
        assert!((k.log_prob(&x, &m) as f64 - want).abs() < 1e-6);
    }

    #[test]
    fn should_recover_the_tafs_mean_from_x0_and_eps_hat() {
        let (t, tn, tau) = (0.75f32, 0.5f32, 0.6f32);
        let k = LinearGaussian::tafs(t, tn, tau).unwrap();
        let (x, v) = (0.4f32, -1.3f32);
        let x0 = x - t * v;
        let eps = x + (1.0 - t) * v;
        let mu = (1.0 - tn) * x0 + tn * (1.0 - tau * tau).sqrt() * eps;
        assert!((k.a * x + k.b * v - mu).abs() < 1e-6);
        assert!((k.std - tn * tau).abs() < 1e-7);
        // τ = 1: the mean is the one-step prediction scaled, plain consistency re-noising.
        let k1 = LinearGaussian::tafs(t, tn, 1.0).unwrap();
        assert!((k1.a * x + k1.b * v - (1.0 - tn) * x0).abs() < 1e-6);
        // τ = 0: deterministic (DDIM-like) step.
        assert!(!LinearGaussian::tafs(t, tn, 0.0).unwrap().is_stochastic());
    }

    #[test]
    fn should_match_hand_computed_flow_grpo_steps() {
        // σ = 0.5, σ' = 0.4, a = 0.7: s = 0.7·√(0.5/0.5) = 0.7, Δt = −0.1,
        // μ = x(1 + 0.49·(−0.1)/1.0) + v(1 + 0.49·0.5/1.0)(−0.1) = 0.951·x − 0.1245·v,
        // std = 0.7·√0.1 = 0.221359.
        let k = LinearGaussian::flow_sde(0.5, 0.4, 0.7, 0.9).unwrap();
        assert!((k.a - 0.951).abs() < 1e-6, "{k:?}");
        assert!((k.b + 0.1245).abs() < 1e-6, "{k:?}");
        assert!((k.std - 0.221_359_43).abs() < 1e-6, "{k:?}");
        // σ = 1 uses σ̃ = t2 = 0.9: s = 0.7·√(1/0.1) = 2.213594, Δt = −0.1,
        // a = 1 + s²·(−0.1)/2 = 1 − 0.245 = 0.755, b = (1 + 0)·(−0.1), std = s·√0.1 = 0.7.
        let k = LinearGaussian::flow_sde(1.0, 0.9, 0.7, 0.9).unwrap();
        assert!((k.a - 0.755).abs() < 1e-5, "{k:?}");
        assert!((k.b + 0.1).abs() < 1e-6, "{k:?}");
        assert!((k.std - 0.7).abs() < 1e-5, "{k:?}");
    }

    #[test]
    fn should_reject_non_decreasing_timesteps() {
        assert!(LinearGaussian::tafs(0.5, 0.5, 0.5).is_err());
        assert!(LinearGaussian::flow_sde(0.4, 0.5, 0.7, 0.9).is_err());
        assert!(LinearGaussian::tafs(0.5, 0.25, 1.5).is_err());
    }
}
