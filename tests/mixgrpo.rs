//! MixGRPO / Flow-GRPO-Fast windows end to end through the real binary, on the tiny model
//! (`tests/pipelines/valid-mixgrpo-tiny.yaml`: T = 4, a window of 2 SDE steps moving by 1 every
//! iteration up to start 2): which steps are SDE steps per iteration, that the ODE steps carry
//! no log-prob and are not trained, and that a resumed run equals an uninterrupted one.

mod common;
use common::columns::{col, with_sink};
use common::{metrics_without_timings, root, run_new, tmpdir};

use std::fs;

use nodes::trajectory_sink::arrow::array::{Float32Array, UInt32Array, UInt64Array};
use nodes::trajectory_sink::read_file;

#[test]
fn should_train_only_the_window_and_resume_exactly() {
    let dir = tmpdir("mixgrpo");
    let pipeline = with_sink(&dir, "valid-mixgrpo-tiny", "none");

    // Straight through, 4 iterations: window starts 0, 1, 2, then back to 0.
    let straight = run_new(
        &pipeline,
        &dir.join("straight"),
        &["iterations=4", "checkpoint_every=1"],
    );
    let a = metrics_without_timings(&straight);
    assert_eq!(a.len(), 4);
    for (r, start) in a.iter().zip([0.0, 1.0, 2.0, 0.0]) {
        assert!(
            r["update/grad_norm"].as_f64().unwrap() > 0.0,
            "no gradient: {r}"
        );
        assert_eq!(r["sde@1/window_start"].as_f64(), Some(start), "{r}");
        // Only the window's 2 transitions of the 4 are trained.
        assert_eq!(r["update/transitions"].as_f64(), Some(2.0), "{r}");
        assert!(r["update/loss"].as_f64().unwrap().is_finite(), "{r}");
    }

    // The stored transitions: SDE steps inside the window, ODE (Euler, no log-prob) outside.
    for (it, start) in [(1u64, 0u32), (2, 1), (3, 2), (4, 0)] {
        let b = read_file(&straight.join(format!("trajectories/iter-{it:06}.parquet"))).unwrap();
        let step = col::<UInt32Array>(&b, "step");
        let iteration = col::<UInt64Array>(&b, "iteration");
        let (t, t_next) = (
            col::<Float32Array>(&b, "t"),
            col::<Float32Array>(&b, "t_next"),
        );
        let std = col::<Float32Array>(&b, "kernel_std");
        let (ka, kb) = (
            col::<Float32Array>(&b, "kernel_a"),
            col::<Float32Array>(&b, "kernel_b"),
        );
        let logp = col::<Float32Array>(&b, "old_logprob");
        let tau = col::<Float32Array>(&b, "temperature");
        assert_eq!(b.num_rows(), 8 * 4);
        let mut sde = std::collections::BTreeSet::new();
        for j in 0..b.num_rows() {
            assert_eq!(iteration.value(j), it);
            let i = step.value(j) - 1; // 0-based index
            let inside = (start..start + 2).contains(&i);
            if inside {
                sde.insert(i);
                assert!(
                    std.value(j) > 0.0,
                    "it {it} step {}: std {}",
                    i + 1,
                    std.value(j)
                );
                assert!(logp.value(j) != 0.0);
                assert!((tau.value(j) - 0.7).abs() < 1e-6);
            } else {
                // x' = x + (t_next − t)·v exactly: a = 1, b = Δt, no noise, no log-prob.
                assert_eq!(std.value(j), 0.0, "it {it} step {}", i + 1);
                assert_eq!(logp.value(j), 0.0);
                assert_eq!(tau.value(j), 0.0);
                assert_eq!(ka.value(j), 1.0);
                assert!((kb.value(j) - (t_next.value(j) - t.value(j))).abs() < 1e-6);
            }
        }
        assert_eq!(sde.len(), 2, "iteration {it}: SDE steps {sde:?}");
    }

    // 2 iterations, then resumed to 4: the same windows and the same numbers.
    common::assert_resume_matches(&pipeline, &dir.join("resumed"), 2, 4, &a, "MixGRPO");
}

#[test]
fn should_keep_a_fixed_window_for_flow_grpo_fast() {
    // `window_every: 0`: the window stays at `window_start` (Flow-GRPO-Fast), here step 2 only.
    let dir = tmpdir("flow-grpo-fast");
    let p = root().join("tests/pipelines/valid-mixgrpo-tiny.yaml");
    let src = fs::read_to_string(&p)
        .unwrap()
        .replace("window_size: 2", "window_size: 1")
        .replace("window_every: 1", "window_every: 0")
        .replace("window_stride: 1", "window_start: 1");
    let fast = dir.join("fast.yaml");
    fs::write(&fast, src).unwrap();
    let run = run_new(&fast, &dir.join("runs"), &["iterations=3"]);
    let r = metrics_without_timings(&run);
    assert_eq!(r.len(), 3);
    for row in &r {
        assert_eq!(row["sde@1/window_start"].as_f64(), Some(1.0), "{row}");
        assert_eq!(row["update/transitions"].as_f64(), Some(1.0), "{row}");
    }
}

#[test]
fn should_raise_an_easy_reward_with_mixgrpo() {
    // The brightness reward of the final image over 12 iterations, only the window trained:
    // measured 0.501 (first 3) → 0.591 (last 3) with this seed. Margin: +0.04.
    let run = run_new(
        &root().join("tests/pipelines/valid-mixgrpo-tiny.yaml"),
        &tmpdir("mixgrpo-rise").join("runs"),
        &["iterations=12"],
    );
    let (first, last, r) = common::first_and_last_mean(&run, "score/reward_mean", 3);
    assert!(last > first + 0.04, "reward {first:.3} → {last:.3}: {r:?}");
}

#[test]
fn should_train_on_group_normalised_rewards_summed_by_weight() {
    // Each reward normalised per prompt group has mean 0 in every group, so the weighted total's
    // batch mean is 0; summed raw, it is the weighted sum of the components' means.
    let dir = tmpdir("multi-reward");
    let pipeline = root().join("tests/pipelines/valid-multi-reward-tiny.yaml");
    let num = |r: &serde_json::Value, k: &str| r[k].as_f64().unwrap_or_else(|| panic!("{k}: {r}"));
    let normalised = metrics_without_timings(&run_new(&pipeline, &dir.join("norm"), &[]));
    let raw = metrics_without_timings(&run_new(
        &pipeline,
        &dir.join("raw"),
        &["nodes.total.params.normalise=none"],
    ));
    assert_eq!(normalised.len(), 2);
    for (n, r) in normalised.iter().zip(&raw) {
        assert!(num(n, "total/reward_mean").abs() < 1e-5, "{n}");
        let want = num(r, "total/bright_mean") + 0.5 * num(r, "total/sat_mean");
        assert!((num(r, "total/reward_mean") - want).abs() < 1e-5, "{r}");
        assert!(want > 0.1, "the raw sum is visibly not 0: {want}");
        assert!(num(n, "update/grad_norm") > 0.0, "{n}");
    }
    // The first iteration's samples are the same; their components' means too.
    assert_eq!(
        num(&normalised[0], "total/bright_mean"),
        num(&raw[0], "total/bright_mean")
    );
}
