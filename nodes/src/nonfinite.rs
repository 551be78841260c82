//! The `on_nonfinite` policy shared by the reward plug-in nodes (`http_reward`,
//! `weighted_reward`): what to do when a reward is NaN or ±infinite.
//!
//! - `error` (default): the node fails with a message naming the sample's prompt; the iteration is
//!   not applied to the model (the update never runs) and the run stops, resumable from the last
//!   checkpoint.
//! - `skip`: each offending sample gets the mean of the finite rewards of its GRPO group (same
//!   prompt, same node); when the whole group is non-finite, every member gets the mean of the
//!   finite rewards of the batch (0 when there are none), so the group's advantage is exactly 0.
//!   The number of replaced samples is logged as the metric `nonfinite`.

use anyhow::{Result, bail};
use runner::{ParamDef, Params};

/// The parameter, as every reward plug-in declares it.
pub fn param() -> ParamDef {
    ParamDef::choice(
        "on_nonfinite",
        "error",
        &["error", "skip"],
        "NaN/±inf reward: `error` stops the run naming the prompt (the iteration is not applied); \
         `skip` gives the sample its group's mean finite reward and counts it in metric `nonfinite`",
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnNonFinite {
    Error,
    Skip,
}

impl OnNonFinite {
    pub fn from_params(p: &Params) -> Result<Self> {
        Ok(match p.str("on_nonfinite")? {
            "error" => OnNonFinite::Error,
            "skip" => OnNonFinite::Skip,
            other => bail!("unknown on_nonfinite `{other}`"),
        })
    }
}

/// Replace every non-finite value by the mean of the finite values of its group (`group[i]`);
/// a group with no finite value gets the mean of all finite values (0 if none). Returns how
/// many values were replaced.
pub fn fill_with_group_mean(values: &mut [f32], group: &[usize]) -> usize {
    let bad: Vec<usize> = (0..values.len())
        .filter(|&i| !values[i].is_finite())
        .collect();
    if bad.is_empty() {
        return 0;
    }
    let finite_mean = |pick: &dyn Fn(usize) -> bool| -> Option<f32> {
        let (mut s, mut n) = (0f64, 0usize);
        for (i, v) in values.iter().enumerate() {
            if v.is_finite() && pick(i) {
                s += *v as f64;
                n += 1;
            }
        }
        (n > 0).then(|| (s / n as f64) as f32)
    };
    let batch = finite_mean(&|_| true).unwrap_or(0.0);
    let fills: Vec<f32> = bad
        .iter()
        .map(|&i| match group.get(i) {
            Some(&g) => finite_mean(&|j| group.get(j) == Some(&g)).unwrap_or(batch),
            None => batch,
        })
        .collect();
    for (&i, f) in bad.iter().zip(fills) {
        values[i] = f;
    }
    bad.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn should_fill_nonfinite_rewards_with_their_group_mean() {
        let mut v = vec![1.0, f32::NAN, 3.0, f32::INFINITY, f32::NAN, 0.5];
        let g = vec![0, 0, 0, 1, 1, 2];
        assert_eq!(fill_with_group_mean(&mut v, &g), 3);
        assert_eq!(v[1], 2.0);
        // Group 1 has no finite reward: batch mean of the finite ones (1, 3, 0.5).
        assert!((v[3] - 1.5).abs() < 1e-6 && v[3] == v[4]);
        let mut all_bad = vec![f32::NAN; 2];
        assert_eq!(fill_with_group_mean(&mut all_bad, &[0, 0]), 2);
        assert_eq!(all_bad, vec![0.0, 0.0]);
    }
}
