//! `flow_match`: the timestep schedule of diffusers' `FlowMatchEulerDiscreteScheduler` (SD3,
//! Flow-GRPO) as a repeat-var schedule, reproduced digit for digit:
//!
//! ```yaml
//! vars:
//!   t:      {schedule: flow_match, shift: 3.0}              # σ_0 … σ_{N−1}
//!   t_next: {schedule: flow_match, shift: 3.0, next: true}  # σ_1 … σ_N (σ_N = 0)
//! ```
//!
//! N is the repeat block's `count`. The arithmetic follows diffusers 0.42 step by step
//! (`scheduling_flow_match_euler_discrete.py`, default configuration: no dynamic shifting,
//! no terminal shift, no Karras/exponential/beta sigmas, not inverted):
//!
//! 1. `__init__`, in float32 (torch): the training sigmas `t / T` for t = T … 1, shifted by
//!    `shift·σ / (1 + (shift − 1)·σ)`; only their ends are used: σ_max (= 1) and σ_min (the
//!    shifted `1 / T`, so the shift is already in it).
//! 2. `set_timesteps(N)`, in float64 (numpy): `np.linspace(σ_max·T, σ_min·T, N)` (`i·step +
//!    start`, the last set to `stop`), divided by T, shifted again, then rounded to float32.
//!    `sigmas` ends with an appended 0, `timesteps` are `σ·T` in float32.
//!
//! The values are float32 numbers (carried as f64, which holds them exactly), so a node reading
//! the parameter gets exactly torch's float32 sigma.

use runner::{Diagnostic, ParamDef, ParamKind, ParamValue, Params, Registry, ScheduleType};

/// The scheduler's `sigmas` after `set_timesteps(n)`: n + 1 values, the last 0. `shift` > 0,
/// `num_train_timesteps` ≥ 1.
pub fn sigmas(n: usize, shift: f64, num_train_timesteps: u32) -> Vec<f32> {
    let t = num_train_timesteps as f64;
    // __init__ (float32 tensors): sigmas = timesteps / T; shift·σ / (1 + (shift − 1)·σ). torch
    // casts the Python-float scalars to float32 first; `shift - 1` is computed in Python.
    let shift32 = shift as f32;
    let shift_m1_32 = (shift - 1.0) as f32;
    let train_shift = |s: f32| (shift32 * s) / (1.0f32 + shift_m1_32 * s);
    // σ_max: the training sigma of t = T, f32(T) / T, is exactly 1 (T ≤ 2^24).
    let sigma_max = train_shift(1.0f32);
    let sigma_min = train_shift(1.0f32 / num_train_timesteps as f32);
    // set_timesteps (float64 numpy): linspace(_sigma_to_t(σ_max), _sigma_to_t(σ_min), n).
    let start = sigma_max as f64 * t;
    let stop = sigma_min as f64 * t;
    let timesteps = linspace(start, stop, n);
    let mut out: Vec<f32> = timesteps
        .into_iter()
        .map(|ts| {
            let s = ts / t;
            ((shift * s) / (1.0 + (shift - 1.0) * s)) as f32
        })
        .collect();
    out.push(0.0);
    out
}

/// The scheduler's `timesteps` after `set_timesteps(n)`: `σ·T` in float32, n values.
pub fn timesteps(n: usize, shift: f64, num_train_timesteps: u32) -> Vec<f32> {
    let t = num_train_timesteps as f32;
    sigmas(n, shift, num_train_timesteps)[..n]
        .iter()
        .map(|s| s * t)
        .collect()
}

/// `np.linspace(start, stop, num)` in float64, as numpy 2 computes it.
fn linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 0 {
        return vec![];
    }
    let div = num - 1;
    let delta = stop - start;
    if div == 0 {
        return vec![0.0 * delta + start];
    }
    let step = delta / div as f64;
    let mut y: Vec<f64> = (0..num)
        .map(|i| {
            if step == 0.0 {
                // numpy's handling of a zero (or underflowing) step.
                (i as f64 / div as f64) * delta + start
            } else {
                i as f64 * step + start
            }
        })
        .collect();
    y[div] = stop;
    y
}

/// The scheduler of a diffusers pipeline folder, as `flowrun sample`/`eval` read it from
/// `scheduler/scheduler_config.json`: the `FlowMatchEulerDiscreteScheduler` settings that
/// [`sigmas`] reproduces.
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerConfig {
    /// `shift` (diffusers' default 1.0; SD3 and SD3.5 ship 3.0).
    pub shift: f64,
    /// `num_train_timesteps` (default 1000).
    pub num_train_timesteps: u32,
    /// The file read.
    pub path: std::path::PathBuf,
}

/// `dir/scheduler/scheduler_config.json` of a diffusers pipeline folder, or `None` when the
/// folder has none. An error, naming the file and the field, when it is not a
/// `FlowMatchEulerDiscreteScheduler` or sets an option [`sigmas`] does not reproduce
/// (dynamic shifting, a terminal shift, Karras/exponential/beta sigmas, inverted sigmas,
/// stochastic sampling).
pub fn read_scheduler_config(dir: &std::path::Path) -> anyhow::Result<Option<SchedulerConfig>> {
    use anyhow::{Context, bail};
    use serde_json::Value;
    let path = dir.join("scheduler").join("scheduler_config.json");
    if !path.is_file() {
        return Ok(None);
    }
    let shown = path.display();
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {shown}"))?;
    let v: Value =
        serde_json::from_str(&text).with_context(|| format!("{shown} is not valid JSON"))?;
    let Value::Object(m) = v else {
        bail!("{shown} is not a JSON object");
    };
    const CLASS: &str = "FlowMatchEulerDiscreteScheduler";
    match m.get("_class_name") {
        None => {}
        Some(Value::String(c)) if c == CLASS => {}
        Some(other) => bail!(
            "{shown}: the scheduler is {other}; flowrun samples with {CLASS}'s schedule (SD3,              SD3.5): give --shift to use it anyway"
        ),
    }
    let shift = match m.get("shift") {
        None => 1.0,
        Some(Value::Number(n)) => n.as_f64().unwrap_or(f64::NAN),
        Some(other) => bail!("{shown}: `shift` is {other}, not a number"),
    };
    if !(shift.is_finite() && shift > 0.0) {
        bail!("{shown}: `shift` must be a positive number");
    }
    let num_train_timesteps = match m.get("num_train_timesteps") {
        None => 1000,
        Some(Value::Number(n)) => match n.as_u64() {
            Some(t) if (1..=1 << 24).contains(&t) => t as u32,
            _ => bail!("{shown}: `num_train_timesteps` must be an integer in 1..=16777216"),
        },
        Some(other) => bail!("{shown}: `num_train_timesteps` is {other}, not a number"),
    };
    // Options that change the sigmas: off (false / null) in SD3's and SD3.5's configs.
    for key in [
        "use_dynamic_shifting",
        "use_karras_sigmas",
        "use_exponential_sigmas",
        "use_beta_sigmas",
        "invert_sigmas",
        "stochastic_sampling",
    ] {
        match m.get(key) {
            None | Some(Value::Null) | Some(Value::Bool(false)) => {}
            Some(other) => bail!(
                "{shown}: `{key}` is {other}; flowrun's schedule is the plain shifted one (SD3, SD3.5): give --shift to sample with that anyway"
            ),
        }
    }
    match m.get("shift_terminal") {
        None | Some(Value::Null) => {}
        Some(other) => bail!(
            "{shown}: `shift_terminal` is {other}; flowrun's schedule has no terminal shift (SD3, SD3.5): give --shift to sample without it"
        ),
    }
    Ok(Some(SchedulerConfig {
        shift,
        num_train_timesteps,
        path,
    }))
}

const DOC: &str = "\
The sigmas of diffusers' FlowMatchEulerDiscreteScheduler(shift, num_train_timesteps) after
set_timesteps(N), N being the repeat block's `count`, exactly as float32 (SD3 and Flow-GRPO
use shift 3.0 and 1000 training timesteps):
  t:      {schedule: flow_match, shift: 3.0}              # sigma_0 .. sigma_{N-1} (sigma_0 = 1)
  t_next: {schedule: flow_match, shift: 3.0, next: true}  # sigma_1 .. sigma_N (sigma_N = 0)
`as: timestep` gives the scheduler's `timesteps` (sigma x num_train_timesteps, float32) instead.";

pub fn register(r: &mut Registry) {
    r.add_schedule(ScheduleType {
        name: "flow_match",
        summary: "diffusers' FlowMatchEulerDiscreteScheduler sigmas (SD3: shift 3), digit for digit",
        doc: DOC,
        params: vec![
            ParamDef::new(
                "shift",
                ParamKind::Float {
                    min: 0.0,
                    max: 1e6,
                },
                "the scheduler's `shift` (> 0; SD3 3.0, 1.0 none)",
            ),
            ParamDef::boolean(
                "next",
                false,
                "the value after each step: sigma_1 .. sigma_N instead of sigma_0 .. sigma_{N-1}",
            ),
            ParamDef::int(
                "num_train_timesteps",
                1000,
                1,
                1 << 24,
                "the scheduler's `num_train_timesteps`",
            ),
            ParamDef::new(
                "as",
                ParamKind::Enum(&["sigma", "timestep"]),
                "sigma (in [0, 1], the default) or timestep (sigma x num_train_timesteps)",
            )
            .default(ParamValue::Str("sigma".into())),
        ],
        values,
    });
}

/// A parameter accessor's error (only on a programming error: the keys were validated).
fn get<T>(r: anyhow::Result<T>) -> Result<T, Diagnostic> {
    r.map_err(|e| Diagnostic::error(format!("internal: {e}")))
}

fn values(p: &Params, count: usize) -> Result<Vec<f64>, Diagnostic> {
    let shift = get(p.f64("shift"))?;
    if shift <= 0.0 {
        return Err(p.error(
            "shift",
            format!("must be > 0, got {shift} (a shift of 0 makes every sigma 0)"),
        ));
    }
    let next = get(p.bool("next"))?;
    let train = get(p.i64("num_train_timesteps"))?;
    let train = u32::try_from(train).map_err(|_| p.error("num_train_timesteps", "out of range"))?;
    let vals = if get(p.str("as"))? == "timestep" {
        let mut ts = timesteps(count, shift, train);
        ts.push(0.0);
        ts
    } else {
        sigmas(count, shift, train)
    };
    let range = if next { 1..count + 1 } else { 0..count };
    Ok(vals[range].iter().map(|&x| x as f64).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn should_match_diffusers_sd3_sigmas_for_ten_steps() {
        // FlowMatchEulerDiscreteScheduler(shift=3.0).set_timesteps(10), diffusers 0.42.1.
        // Shortest float32 digits of torch's values.
        let want: [f32; 11] = [
            1.0,
            0.9601293,
            0.913349,
            0.8576923,
            0.79036826,
            0.7072785,
            0.60215056,
            0.46487603,
            0.27804878,
            0.008928572,
            0.0,
        ];
        assert_eq!(sigmas(10, 3.0, 1000), want);
        assert_eq!(timesteps(10, 3.0, 1000)[1], 960.129_33_f32);
    }

    #[test]
    fn should_follow_numpy_linspace_at_its_edges() {
        assert_eq!(linspace(1000.0, 3.0, 1), vec![1000.0]);
        assert_eq!(linspace(5.0, 5.0, 3), vec![5.0, 5.0, 5.0]);
        assert_eq!(linspace(1000.0, 1.0, 2), vec![1000.0, 1.0]);
        assert!(linspace(0.0, 1.0, 0).is_empty());
    }
}
