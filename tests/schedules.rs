//! Timestep schedules across sampler steps: refused at validation when they do not chain, and
//! (should a pipeline get past validation) at run time by the sampler given the state.

mod common;

use common::{bin, python_with, root, text, tmpdir};
use runner::{ParamValue, Pipeline, RunOptions};

/// Two-step Flow-GRPO (`sde`) or TAFS (`predict`/`renoise`) pipelines on the tiny model.
fn tiny(sampler: &str) -> Pipeline {
    let steps = match sampler {
        "sde" => {
            "      vars: {t: [1.0, 0.5], t_next: [0.5, 0.0]}
      nodes:
        - id: sde
          type: flow_sde_step
          uses: [policy]
          params: {t: $t, t_next: $t_next}
          inputs: {x: {first: noise.x, next: sde@prev.x_next}, prompts: prompts.prompts}
  - id: score
    type: image_reward
    params: {kind: brightness}
    inputs: {images: sde@last.x_next}"
        }
        _ => {
            "      vars: {t: [1.0, 0.5], t_next: [0.5, 0.0]}
      nodes:
        - id: predict
          type: one_step_sampler
          uses: [policy]
          params: {t: $t}
          inputs: {x: {first: noise.x, next: renoise@prev.x_next}, prompts: prompts.prompts}
        - id: renoise
          type: annealed_renoiser
          when: not_last
          params: {t_next: $t_next}
          inputs: {pred: predict.pred}
  - id: score
    type: image_reward
    params: {kind: brightness}
    inputs: {images: predict@last.x0}"
        }
    };
    let text = format!(
        "name: tiny_{sampler}
iterations: 1
resources:
  policy:
    type: flow_model
    params: {{size: tiny}}
nodes:
  - id: prompts
    type: prompt_loader
    params: {{path: datasets/shapes/train.jsonl, prompts_per_iter: 1, group_size: 2}}
  - id: noise
    type: gaussian_noise
    inputs: {{prompts: prompts.prompts}}
  - repeat:
      id: step
      count: 2
{steps}
"
    );
    let reg = nodes::registry();
    match runner::load_str("tiny.yaml", &text, &[], &reg) {
        Ok((p, _)) => p,
        Err(d) => panic!("the tiny pipeline should validate:\n{d}"),
    }
}

/// Set parameter `t` of node `id` after validation (as a pipeline built in code could), run it
/// and return the error.
fn run_with_t(mut p: Pipeline, id: &str, t: f64, name: &str) -> String {
    let node = p.nodes.iter_mut().find(|n| n.id == id).unwrap();
    node.params.values.insert("t".into(), ParamValue::Float(t));
    let opts = RunOptions {
        runs_root: tmpdir(name),
        ..RunOptions::default()
    };
    match runner::run(p, &nodes::registry(), opts) {
        Ok(_) => panic!("a step given a state at another t should fail"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn should_refuse_flow_grpo_with_a_step_count_its_schedule_does_not_chain_at() {
    // With 5 steps the `t` schedule (1.0 → 0.1) and the `t_next` one (0.9 → 0) no longer meet:
    // step 1 goes to 0.9 and step 2 starts at 0.775.
    let out = bin()
        .current_dir(root())
        .args([
            "validate",
            "pipelines/flow_grpo.yaml",
            "--set",
            "nodes.step.count=5",
        ])
        .output()
        .unwrap();
    let msg = text(&out);
    assert!(!out.status.success(), "{msg}");
    assert!(
        msg.contains(
            "parameter `t` of node `sde@2`: step 2 of repeat `step` starts at t = 0.775 but its \
             input `x` is `sde@1.x_next`, a state at t = 0.9 (the `t_next` of step 1, `$t_next` \
             on line 31); also step 3 (t = 0.55 after 0.675), step 4 (t = 0.325 after 0.45), \
             step 5 (t = 0.1 after 0.225)"
        ),
        "{msg}"
    );
    assert!(msg.contains("pipelines/flow_grpo.yaml:36:"), "{msg}");
    assert!(msg.contains("1 error"), "{msg}");
    // The shipped step count chains.
    let ok = bin()
        .current_dir(root())
        .args(["validate", "pipelines/flow_grpo.yaml"])
        .output()
        .unwrap();
    assert!(ok.status.success(), "{}", text(&ok));
}

#[test]
fn should_warn_about_an_explicit_t2_that_is_not_the_schedule_second_timestep() {
    let reg = nodes::registry();
    let path = root().join("pipelines/flow_grpo.yaml");
    let load = |set: &[&str]| {
        let set: Vec<String> = set.iter().map(|s| s.to_string()).collect();
        match runner::load(&path, &set, &reg) {
            Ok((_, warnings)) => warnings
                .warnings()
                .filter(|w| w.message.contains("`t2`"))
                .map(|w| w.message.clone())
                .collect::<Vec<_>>(),
            Err(d) => panic!("an explicit t2 below 1 is allowed:\n{d}"),
        }
    };
    assert_eq!(load(&[]), Vec::<String>::new());
    assert_eq!(
        load(&["nodes.step.nodes.sde.params.t2=0.9"]),
        Vec::<String>::new()
    );
    let w = load(&["nodes.step.nodes.sde.params.t2=0.8"]);
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].contains(
            "t2 = 0.8 differs from the schedule's second timestep, t_next = 0.9 of step 1 of \
             repeat `step` (`$t_next` on line 31)"
        ),
        "{w:?}"
    );
}

#[test]
fn should_fail_an_sde_step_given_a_state_at_another_t() {
    let err = run_with_t(tiny("sde"), "sde@2", 0.625, "sched-sde");
    assert!(
        err.contains("input `x` is a state at t = 0.5 but this step's `t` is 0.625"),
        "{err}"
    );
}

#[test]
fn should_fail_a_one_step_prediction_given_a_state_at_another_t() {
    let err = run_with_t(tiny("tafs"), "predict@2", 0.625, "sched-tafs");
    assert!(
        err.contains("input `x` is a state at t = 0.5 but this step's `t` is 0.625"),
        "{err}"
    );
}

/// Per step of a repeat of `count` steps: (σ_k, σ_{k+1}, timestep_k) as the `flow_match`
/// schedule resolves them into the parameters of the nodes of a compiled pipeline.
fn flow_match_values(count: usize, shift: f64, train: u32) -> Vec<(f64, f64, f64)> {
    let text = format!(
        "name: flow_match_{count}
nodes:
  - repeat:
      id: step
      count: {count}
      vars:
        t: {{schedule: flow_match, shift: {shift:?}, num_train_timesteps: {train}}}
        t_next: {{schedule: flow_match, shift: {shift:?}, num_train_timesteps: {train}, next: true}}
        ts: {{schedule: flow_match, shift: {shift:?}, num_train_timesteps: {train}, as: timestep}}
      nodes:
        - id: sigma
          type: constant
          params: {{value: $t, slope: $t_next}}
        - id: timestep
          type: constant
          params: {{value: $ts}}
  - id: gather
    type: sum
    inputs: {{xs: [sigma@*.value, timestep@*.value]}}
"
    );
    let reg = nodes::registry();
    let p = match runner::load_str("flow_match.yaml", &text, &[], &reg) {
        Ok((p, _)) => p,
        Err(d) => panic!("a flow_match schedule should validate:\n{d}\n{text}"),
    };
    let param = |id: String, name: &str| {
        let n = p.nodes.iter().find(|n| n.id == id).unwrap();
        n.params.f64(name).unwrap()
    };
    (1..=count)
        .map(|k| {
            (
                param(format!("sigma@{k}"), "value"),
                param(format!("sigma@{k}"), "slope"),
                param(format!("timestep@{k}"), "value"),
            )
        })
        .collect()
}

/// diffusers' own `FlowMatchEulerDiscreteScheduler(shift, num_train_timesteps)` after
/// `set_timesteps(n)`, for each case: (sigmas, n + 1 values; timesteps, n values), torch's
/// float32 numbers sent as their bits (a decimal through JSON could be parsed 1 ulp off).
fn diffusers_flow_match(
    py: &std::path::Path,
    cases: &[(usize, f64, u32)],
) -> Vec<(Vec<f32>, Vec<f32>)> {
    let script = "
import json, sys
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
out = []
for n, shift, train in json.loads(sys.argv[1]):
    s = FlowMatchEulerDiscreteScheduler(num_train_timesteps=train, shift=shift)
    s.set_timesteps(n)
    assert str(s.sigmas.dtype) == 'torch.float32' and str(s.timesteps.dtype) == 'torch.float32'
    bits = lambda t: [int(b) & 0xFFFFFFFF for b in t.view(torch.int32)]
    out.append([bits(s.sigmas), bits(s.timesteps)])
print(json.dumps(out))
";
    let arg = serde_json::to_string(cases).unwrap();
    let o = std::process::Command::new(py)
        .args(["-c", script, &arg])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let v: Vec<(Vec<u32>, Vec<u32>)> = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v.len(), cases.len());
    let floats = |b: &[u32]| b.iter().map(|&b| f32::from_bits(b)).collect::<Vec<_>>();
    v.iter().map(|(s, t)| (floats(s), floats(t))).collect()
}

#[test]
fn should_resolve_flow_match_to_diffusers_sigmas_and_timesteps_digit_for_digit() {
    let Some(py) = python_with(&["torch", "diffusers"]) else {
        return;
    };
    // SD3 / Flow-GRPO evaluation (10 steps, shift 3), a few-step one, no shift; then odd
    // shifts (not exact in float32), one and two steps, other training lengths.
    let cases: &[(usize, f64, u32)] = &[
        (10, 3.0, 1000),
        (4, 3.0, 1000),
        (40, 1.0, 1000),
        (1, 3.0, 1000),
        (2, 3.0, 1000),
        (28, 2.7, 1000),
        (16, 0.5, 1000),
        (7, 5.0, 500),
        // Where σ_min computed in float64 would round to another float32 than torch's
        // float32 arithmetic in `__init__` gives.
        (10, 5.0, 1000),
        (4, 7.3, 1000),
        (10, 2.7, 500),
    ];
    let want = diffusers_flow_match(&py, cases);
    for (&(n, shift, train), (sigmas, timesteps)) in cases.iter().zip(&want) {
        assert_eq!(sigmas.len(), n + 1);
        assert_eq!(sigmas[n], 0.0);
        let got = flow_match_values(n, shift, train);
        // Exactly torch's float32 number, and carried exactly (an f64 holding a float32).
        let same = |got: f64, want: f32, what: &str| {
            assert_eq!(
                got, want as f64,
                "{what}, n={n} shift={shift} T={train}: {got} vs diffusers {want}"
            );
            assert_eq!((got as f32).to_bits(), want.to_bits());
        };
        for (k, &(t, t_next, ts)) in got.iter().enumerate() {
            same(t, sigmas[k], &format!("σ_{k} (`t` of step {})", k + 1));
            same(t_next, sigmas[k + 1], &format!("σ_{} (`t_next`)", k + 1));
            same(ts, timesteps[k], &format!("timestep {k}"));
        }
        // The library functions give the same numbers.
        let lib = nodes::flow_match_schedule::sigmas(n, shift, train);
        assert_eq!(&lib, sigmas, "n={n} shift={shift} T={train}");
        let lib = nodes::flow_match_schedule::timesteps(n, shift, train);
        assert_eq!(&lib, timesteps, "n={n} shift={shift} T={train}");
    }
    let sd3: Vec<String> = want[0].0.iter().map(|x| format!("{x}")).collect();
    eprintln!("SD3 sigmas (N=10, shift=3): {}", sd3.join(", "));
}

#[test]
fn should_chain_flow_grpo_sde_steps_on_the_flow_match_schedule() {
    // σ_{k+1} of step k is exactly step k+1's σ: the chain check passes with no warnings.
    let text = std::fs::read_to_string(root().join("tests/pipelines/valid-flow-grpo-tiny.yaml"))
        .unwrap()
        .replace(
            "t:      {schedule: linear, start: 1.0, end: 0.25}",
            "t:      {schedule: flow_match, shift: 3.0}",
        )
        .replace(
            "t_next: {schedule: linear, start: 0.75, end: 0.0}",
            "t_next: {schedule: flow_match, shift: 3.0, next: true}",
        );
    assert!(text.contains("flow_match, shift: 3.0, next: true"));
    let reg = nodes::registry();
    let load = |text: &str| match runner::load_str("tiny.yaml", text, &[], &reg) {
        Ok((p, w)) => {
            let w: Vec<String> = w.warnings().map(|d| d.message.clone()).collect();
            (p, w)
        }
        Err(d) => panic!("{d}"),
    };
    let (p, warnings) = load(&text);
    // No warning the linear schedule does not have (e.g. about an unread output).
    let (_, linear) = load(
        &std::fs::read_to_string(root().join("tests/pipelines/valid-flow-grpo-tiny.yaml")).unwrap(),
    );
    assert_eq!(warnings, linear);
    let sde1 = p.nodes.iter().find(|n| n.id == "sde@1").unwrap();
    assert_eq!(sde1.params.f64("t").unwrap(), 1.0);
    assert_eq!(sde1.params.f64("t_next").unwrap(), 0.857_692_301_273_346);
    let sde4 = p.nodes.iter().find(|n| n.id == "sde@4").unwrap();
    assert_eq!(sde4.params.f64("t_next").unwrap(), 0.0);
}
