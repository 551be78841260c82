//! MixGRPO, BranchGRPO, DiffusionNFT and TempFlow-GRPO on an SD3 model
//! (`pipelines/mixgrpo_sd3.yaml`, `pipelines/branch_grpo_sd3.yaml`,
//! `pipelines/diffusion_nft_sd3.yaml`, `pipelines/tempflow_grpo_sd3.yaml`) end to end on the tiny
//! random diffusers SD3 pipeline of `tests/sd3_pipelines.rs` (latents, VAE decode, the reference
//! reward server): each runs two iterations with finite metrics and its method's own behaviour —
//! the sliding window moves and only its transitions train, the transformer runs once per tree
//! node (and once per seed group before a branching step), the EMA old policy resumes exactly. Needs Python with torch, diffusers and transformers
//! (`common::python_with`: required under CI). The device is flex, or `$FLOWRUN_TEST_DEVICE`.

mod common;

use std::path::{Path, PathBuf};

use common::{
    RewardServer, flowrun, metrics, metrics_without_timings, only_run_dir, root, sd3_fixture,
    sd3_overrides, text, tmpdir,
};

/// Runs `pipeline` on the tiny SD3 model with the test overrides plus `extra`, scored by `srv`;
/// returns the run directory after checking that every metric is finite.
fn run_sd3(pipeline: &str, srv: &RewardServer, runs: &Path, extra: &[&str]) -> PathBuf {
    let (model, emb) = sd3_fixture().expect("checked by the caller");
    let mut set = sd3_overrides(model, emb, &srv.url(), "nodes.score");
    set.extend(extra.iter().map(|s| s.to_string()));
    let p = root().join(pipeline);
    let o = flowrun(
        &[p.to_str().unwrap(), "--runs-dir", runs.to_str().unwrap()],
        &set,
    );
    assert!(o.status.success(), "{pipeline}: {}", text(&o));
    let run = only_run_dir(runs);
    for r in metrics(&run) {
        for (k, v) in r.as_object().unwrap() {
            if let Some(x) = v.as_f64() {
                assert!(x.is_finite(), "{pipeline}: {k} = {v} in {r}");
            }
        }
    }
    run
}

#[test]
fn should_slide_mixgrpo_window_and_train_only_its_steps_on_sd3() {
    if sd3_fixture().is_none() {
        return;
    }
    let runs = tmpdir("sd3-mixgrpo-runs");
    // The window moves every iteration: steps 1–2 (0-based 0, 1), then 2–3.
    let run = run_sd3(
        "pipelines/mixgrpo_sd3.yaml",
        &RewardServer::start(&[]),
        &runs,
        &["iterations=2", "nodes.step.nodes.sde.params.window_every=1"],
    );
    let rows = metrics(&run);
    assert_eq!(rows.len(), 2, "{rows:?}");
    let starts: Vec<f64> = rows
        .iter()
        .map(|r| r["sde@1/window_start"].as_f64().unwrap())
        .collect();
    assert_eq!(starts, [0.0, 1.0], "{rows:?}");
    for r in &rows {
        // 2 prompts × 2 samples, 2 SDE transitions each: the 8 ODE steps carry no log-prob.
        assert_eq!(r["update/transitions"].as_f64(), Some(2.0), "{r}");
        assert!(r["score/reward_mean"].is_number(), "{r}");
        let dev = (r["update/ratio_max"].as_f64().unwrap() - 1.0).abs();
        assert!(dev < 1e-3, "on-policy first minibatch: {r}");
    }
}

#[test]
fn should_branch_tempflow_seed_groups_at_one_step_on_sd3() {
    if sd3_fixture().is_none() {
        return;
    }
    let runs = tmpdir("sd3-tempflow-runs");
    let run = run_sd3(
        "pipelines/tempflow_grpo_sd3.yaml",
        &RewardServer::start(&[]),
        &runs,
        &["iterations=2"],
    );
    let rows = metrics(&run);
    assert_eq!(rows.len(), 2, "{rows:?}");
    for r in &rows {
        let l = r["sde@1/window_start"].as_f64().unwrap() as usize;
        // One trained (branching) transition; before it one transformer row per prompt (2).
        assert_eq!(r["update/transitions"].as_f64(), Some(1.0), "{r}");
        for k in 1..=l {
            let rows = r[format!("sde@{k}/seed_group_model_rows")].as_f64();
            assert_eq!(rows, Some(2.0), "step {k}: {r}");
        }
        assert!(
            r.get(format!("sde@{}/seed_group_model_rows", l + 1))
                .is_none(),
            "{r}"
        );
        let w = r["advantages/noise_weight_step1"].as_f64().unwrap();
        assert!(w > 1.0, "the first step weighs more than the mean: {r}");
        assert!(r["score/reward_mean"].is_number(), "{r}");
    }
}

#[test]
fn should_run_branch_grpo_on_sd3_with_one_transformer_row_per_tree_node() {
    if sd3_fixture().is_none() {
        return;
    }
    let runs = tmpdir("sd3-branch-runs");
    // 2 prompts, trees that split in two at steps 0 and 5: groups of 4 leaves.
    let run = run_sd3(
        "pipelines/branch_grpo_sd3.yaml",
        &RewardServer::start(&[]),
        &runs,
        &[
            "iterations=2",
            "nodes.prompts.params.group_size=4",
            "nodes.step.nodes.sde.params.branch_at=[0, 5]",
        ],
    );
    let rows = metrics(&run);
    assert_eq!(rows.len(), 2, "{rows:?}");
    for r in &rows {
        // Step 1 (index 0) evaluates the roots; the split happens after it, then 2 nodes per
        // prompt until the second split at index 5, then all 4 leaves.
        let at = |k: usize| r[format!("sde@{k}/branch_model_rows")].as_f64().unwrap();
        assert_eq!(
            [at(1), at(2), at(6), at(7), at(10)],
            [2.0, 4.0, 4.0, 8.0, 8.0],
            "{r}"
        );
        assert!(r["update/loss"].is_number(), "{r}");
        assert!(r["score/reward_mean"].is_number(), "{r}");
    }
    assert!(run.join("trajectories").is_dir());
}

#[test]
fn should_run_diffusion_nft_on_sd3_and_resume_its_old_policy_exactly() {
    if sd3_fixture().is_none() {
        return;
    }
    let srv = RewardServer::start(&[]);
    let straight = run_sd3(
        "pipelines/diffusion_nft_sd3.yaml",
        &srv,
        &tmpdir("sd3-nft-straight"),
        &["iterations=2"],
    );
    let rows = metrics_without_timings(&straight);
    assert_eq!(rows.len(), 2, "{rows:?}");
    for r in &rows {
        assert!(r["update/loss"].is_number(), "{r}");
        assert!(r["score/reward_mean"].is_number(), "{r}");
    }
    // The second iteration samples with the EMA that the first update moved: its rollout and
    // rewards depend on the checkpointed old policy, so a resume must restore it exactly.
    let resumed = run_sd3(
        "pipelines/diffusion_nft_sd3.yaml",
        &srv,
        &tmpdir("sd3-nft-resumed"),
        &["iterations=1"],
    );
    let o = flowrun(
        &["run", "--resume", resumed.to_str().unwrap()],
        &["iterations=2".to_string()],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        rows,
        metrics_without_timings(&resumed),
        "a resumed DiffusionNFT SD3 run differs from an uninterrupted one"
    );
}
