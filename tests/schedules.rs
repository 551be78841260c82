//! Timestep schedules across sampler steps: refused at validation when they do not chain, and
//! (should a pipeline get past validation) at run time by the sampler given the state.

mod common;

use common::{bin, root, text, tmpdir};
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
