//! Group-relative, step-aware advantages (GRPO).
//!
//! Rewards come per sample and per step: `r[k][i]` is the reward of the `k`-th prediction x̂0_k
//! (k = 1…K) of sample `i`. Samples of one prompt form a group of G. Each step's rewards are
//! normalised within the group: Â_k = (r_k − mean_group) / (std + eps) (or with the std of the
//! whole batch). Transition k (x_{t_k} → x_{t_{k+1}}, k = 1…K−1) then gets an advantage by one
//! of the [`AdvantageMode`]s.
//!
//! With a single reward (Flow-GRPO: the final image only) every transition gets Â of that
//! reward: the `final` mode, the only one that needs no per-step rewards.

use anyhow::{Result, bail};

/// How the advantage of transition k is integrated from the normalised step rewards.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AdvantageMode {
    /// Â_K for every transition (Flow-GRPO's uniform credit).
    Final,
    /// Â_{k+1}: the normalised reward of the prediction right after the transition.
    Step,
    /// Normalised gain r_{k+1} − r_k (Stepwise-Flow-GRPO style).
    Gain,
    /// Σ_{j>k} γ^{j−k−1}·Â_j: discounted return of the later steps.
    Return { gamma: f32 },
    /// λ·Â_{k+1} + (1−λ)·Â_K.
    Mix { lambda: f32 },
}

impl AdvantageMode {
    pub const NAMES: &'static [&'static str] = &["final", "step", "gain", "return", "mix"];
    pub fn parse(name: &str, gamma: f32, lambda: f32) -> Result<Self> {
        Ok(match name {
            "final" => AdvantageMode::Final,
            "step" => AdvantageMode::Step,
            "gain" => AdvantageMode::Gain,
            "return" => AdvantageMode::Return { gamma },
            "mix" => AdvantageMode::Mix { lambda },
            other => bail!("unknown advantage mode `{other}`"),
        })
    }
}

/// Which samples a reward is normalised against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StdScope {
    /// Mean and std within each prompt's group (GRPO).
    Group,
    /// Mean within the group, std over the whole batch (more stable with small groups).
    Batch,
}

/// Normalise `values` (one per sample) within groups: (v − mean_group) / (std + eps).
pub fn normalise(values: &[f32], groups: &[usize], scope: StdScope, eps: f32) -> Vec<f32> {
    let n_groups = groups.iter().copied().max().map_or(0, |g| g + 1);
    let mut sum = vec![0f64; n_groups];
    let mut cnt = vec![0usize; n_groups];
    for (v, &g) in values.iter().zip(groups) {
        sum[g] += *v as f64;
        cnt[g] += 1;
    }
    let mean: Vec<f64> = sum
        .iter()
        .zip(&cnt)
        .map(|(s, &c)| s / c.max(1) as f64)
        .collect();
    let std: Vec<f64> = match scope {
        StdScope::Group => {
            let mut sq = vec![0f64; n_groups];
            for (v, &g) in values.iter().zip(groups) {
                sq[g] += (*v as f64 - mean[g]).powi(2);
            }
            sq.iter()
                .zip(&cnt)
                .map(|(s, &c)| (s / c.max(1) as f64).sqrt())
                .collect()
        }
        StdScope::Batch => {
            let m = values.iter().map(|v| *v as f64).sum::<f64>() / values.len().max(1) as f64;
            let s = (values.iter().map(|v| (*v as f64 - m).powi(2)).sum::<f64>()
                / values.len().max(1) as f64)
                .sqrt();
            vec![s; n_groups]
        }
    };
    values
        .iter()
        .zip(groups)
        .map(|(v, &g)| ((*v as f64 - mean[g]) / (std[g] + eps as f64)) as f32)
        .collect()
}

/// Advantages `[transitions][samples]` from rewards `[steps][samples]`.
///
/// `transitions` is the number of policy steps. With per-step rewards (`rewards.len() ==
/// transitions + 1`, the TAFS layout) every mode applies; with one reward only `final` does.
/// `weights` (optional, one per transition) scale each transition's advantage.
pub fn step_advantages(
    rewards: &[Vec<f32>],
    groups: &[usize],
    transitions: usize,
    mode: AdvantageMode,
    scope: StdScope,
    eps: f32,
    weights: Option<&[f32]>,
) -> Result<Vec<Vec<f32>>> {
    if rewards.is_empty() {
        bail!("no rewards to compute advantages from");
    }
    let n = groups.len();
    for (k, r) in rewards.iter().enumerate() {
        if r.len() != n {
            bail!(
                "rewards of step {} have {} values for {n} samples",
                k + 1,
                r.len()
            );
        }
    }
    if let Some(w) = weights
        && w.len() != transitions
    {
        bail!(
            "`step_weights` has {} values for {transitions} transitions",
            w.len()
        );
    }
    let per_step = rewards.len() == transitions + 1;
    if !per_step && (rewards.len() != 1 || mode != AdvantageMode::Final) {
        bail!(
            "advantage mode needs one reward per prediction ({} for {transitions} transitions) but got {}; with a single final reward use mode `final`",
            transitions + 1,
            rewards.len()
        );
    }
    let norm: Vec<Vec<f32>> = rewards
        .iter()
        .map(|r| normalise(r, groups, scope, eps))
        .collect();
    let last = norm.len() - 1;
    let mut out = Vec::with_capacity(transitions);
    for k in 0..transitions {
        // Transition k (0-based) leads from prediction k to prediction k+1.
        let a: Vec<f32> = match mode {
            AdvantageMode::Final => norm[last].clone(),
            AdvantageMode::Step => norm[k + 1].clone(),
            AdvantageMode::Gain => {
                let gain: Vec<f32> = rewards[k + 1]
                    .iter()
                    .zip(&rewards[k])
                    .map(|(a, b)| a - b)
                    .collect();
                normalise(&gain, groups, scope, eps)
            }
            AdvantageMode::Return { gamma } => (0..n)
                .map(|i| {
                    (k + 1..=last)
                        .map(|j| gamma.powi((j - k - 1) as i32) * norm[j][i])
                        .sum()
                })
                .collect(),
            AdvantageMode::Mix { lambda } => (0..n)
                .map(|i| lambda * norm[k + 1][i] + (1.0 - lambda) * norm[last][i])
                .collect(),
        };
        let w = weights.map_or(1.0, |w| w[k]);
        out.push(a.into_iter().map(|x| x * w).collect());
    }
    Ok(out)
}

/// TempFlow-GRPO's noise-aware weights: transition k's loss is scaled by w_k = σ_k / mean_j σ_j,
/// where σ_k is the std of the step's stochastic kernel (`Transition::sde_std`, the SDE's
/// s_k·√(−Δt_k), also for the ODE steps of a window). The weights average 1 over the
/// trajectory's steps, so the overall step size is Flow-GRPO's while the high-noise early
/// steps, where one step's noise changes the image most, get more of it.
pub fn noise_aware_weights(stds: &[f32]) -> Result<Vec<f32>> {
    if let Some(k) = stds.iter().position(|s| !(s.is_finite() && *s >= 0.0)) {
        bail!(
            "noise-aware weights: step {}'s kernel std is {}",
            k + 1,
            stds[k]
        );
    }
    let mean = stds.iter().map(|&s| s as f64).sum::<f64>() / stds.len().max(1) as f64;
    if mean <= 0.0 {
        bail!(
            "noise-aware weights need stochastic steps: every one of the {} steps has kernel std 0",
            stds.len()
        );
    }
    Ok(stds.iter().map(|&s| (s as f64 / mean) as f32).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    // Two groups of two samples, three predictions (two transitions).
    // Group 0: sample 0 rewards [0, 1, 1], sample 1 rewards [0, 0, 1]
    // Group 1: sample 2 rewards [1, 1, 0], sample 3 rewards [0, 1, 1]
    fn rewards() -> Vec<Vec<f32>> {
        vec![
            vec![0.0, 0.0, 1.0, 0.0],
            vec![1.0, 0.0, 1.0, 1.0],
            vec![1.0, 1.0, 0.0, 1.0],
        ]
    }
    const G: [usize; 4] = [0, 0, 1, 1];
    const EPS: f32 = 1e-4;

    fn close(a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-3, "{a:?} != {b:?}");
        }
    }

    #[test]
    fn should_normalise_within_groups() {
        // Group of two with values a > b: (±0.5) / (0.5 + eps).
        let z = normalise(&[1.0, 0.0, 3.0, 3.0], &G, StdScope::Group, EPS);
        close(&z, &[0.9998, -0.9998, 0.0, 0.0]);
        // Batch std: values [1,0,3,3] have std sqrt(1.6875) = 1.2990.
        let z = normalise(&[1.0, 0.0, 3.0, 3.0], &G, StdScope::Batch, EPS);
        close(&z, &[0.5 / 1.2991, -0.5 / 1.2991, 0.0, 0.0]);
    }

    #[test]
    fn should_give_every_transition_the_final_advantage_in_final_mode() {
        let a = step_advantages(
            &rewards(),
            &G,
            2,
            AdvantageMode::Final,
            StdScope::Group,
            EPS,
            None,
        )
        .unwrap();
        // Final rewards: group 0 [1, 1] → 0, 0; group 1 [0, 1] → -1, 1.
        close(&a[0], &[0.0, 0.0, -1.0, 1.0]);
        close(&a[1], &[0.0, 0.0, -1.0, 1.0]);
    }

    #[test]
    fn should_use_the_next_step_reward_in_step_mode() {
        let a = step_advantages(
            &rewards(),
            &G,
            2,
            AdvantageMode::Step,
            StdScope::Group,
            EPS,
            None,
        )
        .unwrap();
        // Step 2 rewards: group 0 [1, 0] → 1, -1; group 1 [1, 1] → 0, 0.
        close(&a[0], &[1.0, -1.0, 0.0, 0.0]);
        close(&a[1], &[0.0, 0.0, -1.0, 1.0]);
    }

    #[test]
    fn should_normalise_the_gain_in_gain_mode() {
        let a = step_advantages(
            &rewards(),
            &G,
            2,
            AdvantageMode::Gain,
            StdScope::Group,
            EPS,
            None,
        )
        .unwrap();
        // Gains k=1: [1, 0, 0, 1] → group 0: 1, -1; group 1: -1, 1.
        close(&a[0], &[1.0, -1.0, -1.0, 1.0]);
        // Gains k=2: [0, 1, -1, 0] → group 0: -1, 1; group 1: -1, 1.
        close(&a[1], &[-1.0, 1.0, -1.0, 1.0]);
    }

    #[test]
    fn should_discount_later_steps_in_return_mode() {
        let mode = AdvantageMode::Return { gamma: 0.5 };
        let a = step_advantages(&rewards(), &G, 2, mode, StdScope::Group, EPS, None).unwrap();
        // k=1: Â_2 + 0.5·Â_3 = [1, -1, 0, 0] + 0.5·[0, 0, -1, 1]
        close(&a[0], &[1.0, -1.0, -0.5, 0.5]);
        close(&a[1], &[0.0, 0.0, -1.0, 1.0]);
    }

    #[test]
    fn should_blend_step_and_final_in_mix_mode_with_weights() {
        let mode = AdvantageMode::Mix { lambda: 0.25 };
        let a = step_advantages(
            &rewards(),
            &G,
            2,
            mode,
            StdScope::Group,
            EPS,
            Some(&[2.0, 1.0]),
        )
        .unwrap();
        // k=1: 2·(0.25·[1,-1,0,0] + 0.75·[0,0,-1,1])
        close(&a[0], &[0.5, -0.5, -1.5, 1.5]);
        close(&a[1], &[0.0, 0.0, -1.0, 1.0]);
    }

    #[test]
    fn should_accept_a_single_final_reward_only_in_final_mode() {
        let r = vec![vec![1.0, 0.0, 0.0, 0.0]];
        let a =
            step_advantages(&r, &G, 10, AdvantageMode::Final, StdScope::Group, EPS, None).unwrap();
        assert_eq!(a.len(), 10);
        close(&a[9], &[1.0, -1.0, 0.0, 0.0]);
        let e = step_advantages(&r, &G, 10, AdvantageMode::Step, StdScope::Group, EPS, None)
            .unwrap_err();
        assert!(e.to_string().contains("use mode `final`"), "{e}");
    }

    #[test]
    fn should_weight_steps_by_their_noise_std_around_one() {
        // stds 0.4, 0.2, 0.2, 0.0 (mean 0.2): weights 2, 1, 1, 0.
        let w = noise_aware_weights(&[0.4, 0.2, 0.2, 0.0]).unwrap();
        assert_eq!(w, vec![2.0, 1.0, 1.0, 0.0]);
        let mean = w.iter().sum::<f32>() / 4.0;
        assert!((mean - 1.0).abs() < 1e-6);
        assert!(noise_aware_weights(&[0.0, 0.0]).is_err());
        assert!(noise_aware_weights(&[0.1, f32::NAN]).is_err());
    }
}
