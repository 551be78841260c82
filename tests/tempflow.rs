//! TempFlow-GRPO end to end through the real binary, on the tiny model
//! (`tests/pipelines/valid-tempflow-tiny.yaml`: T = 4, seed groups, one random SDE branching
//! step per iteration, noise-aware weights): a group's members share every state up to the
//! branching step bit for bit and differ after it, only that step is stochastic and trained,
//! its advantage is the group-normalised final reward times σ_k / mean σ, a resumed run equals
//! an uninterrupted one, and an easy reward rises.

mod common;
use common::columns::{col, state, with_sink};
use common::{metrics_without_timings, root, run_new, tmpdir};

use std::collections::{BTreeSet, HashMap};

use nodes::trajectory_sink::arrow::array::{Float32Array, UInt32Array};
use nodes::trajectory_sink::read_file;

#[test]
fn should_branch_a_seed_group_at_one_step_and_credit_it_by_its_noise() {
    let dir = tmpdir("tempflow");
    let pipeline = with_sink(&dir, "valid-tempflow-tiny", "f32");
    let straight = run_new(
        &pipeline,
        &dir.join("straight"),
        &["iterations=6", "checkpoint_every=1"],
    );
    let a = metrics_without_timings(&straight);
    assert_eq!(a.len(), 6);
    let mut branched = BTreeSet::new();
    for (i, r) in a.iter().enumerate() {
        let it = i as u64 + 1;
        let l = r["sde@1/window_start"].as_f64().unwrap() as u32; // 0-based branching step
        branched.insert(l);
        assert_eq!(r["update/transitions"].as_f64(), Some(1.0), "{r}");
        assert!(r["update/grad_norm"].as_f64().unwrap() > 0.0, "{r}");
        // The ODE steps before the branch run the model once per group (2 prompts).
        for k in 1..=l {
            assert_eq!(
                r[format!("sde@{k}/seed_group_model_rows")].as_f64(),
                Some(2.0),
                "iteration {it}, step {k}: {r}"
            );
        }
        for k in l + 1..=4 {
            assert!(
                r.get(format!("sde@{k}/seed_group_model_rows")).is_none(),
                "iteration {it}, step {k} (at or after the branch) shares rows: {r}"
            );
        }
        // The weights average 1 over the 4 steps and fall with the noise.
        let w: Vec<f64> = (1..=4)
            .map(|k| {
                r[format!("advantages/noise_weight_step{k}")]
                    .as_f64()
                    .unwrap()
            })
            .collect();
        assert!((w.iter().sum::<f64>() / 4.0 - 1.0).abs() < 1e-5, "{w:?}");
        assert!(w.windows(2).all(|p| p[0] > p[1]), "{w:?}");

        let b = read_file(&straight.join(format!("trajectories/iter-{it:06}.parquet"))).unwrap();
        let (step, group, member) = (
            col::<UInt32Array>(&b, "step"),
            col::<UInt32Array>(&b, "group"),
            col::<UInt32Array>(&b, "member"),
        );
        let (std, adv, reward) = (
            col::<Float32Array>(&b, "kernel_std"),
            col::<Float32Array>(&b, "advantage"),
            col::<Float32Array>(&b, "reward"),
        );
        let row: HashMap<(u32, u32, u32), usize> = (0..b.num_rows())
            .map(|j| ((step.value(j), group.value(j), member.value(j)), j))
            .collect();
        for k in 1..=4u32 {
            let stochastic = k - 1 == l;
            for g in 0..2 {
                for m in 1..4 {
                    let (j0, j1) = (row[&(k, g, 0)], row[&(k, g, m)]);
                    // Up to the branch every member reads and writes the same state bit for
                    // bit; the branching step reads it and writes different ones.
                    assert_eq!(
                        state(&b, "x_t", j0) == state(&b, "x_t", j1),
                        k - 1 <= l,
                        "iteration {it}, step {k}, group {g}, member {m} reads"
                    );
                    assert_eq!(
                        state(&b, "x_next", j0) == state(&b, "x_next", j1),
                        k - 1 < l,
                        "iteration {it}, step {k}, group {g}, member {m} writes"
                    );
                }
                // Prompts differ: their seed groups have different noises.
                assert_ne!(
                    state(&b, "x_t", row[&(k, 0, 0)]),
                    state(&b, "x_t", row[&(k, 1, 0)])
                );
                let j = row[&(k, g, 0)];
                assert_eq!(std.value(j) > 0.0, stochastic, "iteration {it}, step {k}");
            }
            if !stochastic {
                continue;
            }
            // Step k's advantage: (r − mean)/(std + 1e-4) over the group of 4 (population
            // std), times w_k, by hand.
            for g in 0..2 {
                let rs: Vec<f64> = (0..4)
                    .map(|m| reward.value(row[&(k, g, m)]) as f64)
                    .collect();
                let mean = rs.iter().sum::<f64>() / 4.0;
                let sd = (rs.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 4.0).sqrt();
                for (m, rv) in rs.iter().enumerate() {
                    let want = (rv - mean) / (sd + 1e-4) * w[k as usize - 1];
                    let got = adv.value(row[&(k, g, m as u32)]) as f64;
                    assert!(
                        (got - want).abs() < 1e-4 * want.abs().max(1.0),
                        "iteration {it}, step {k}, group {g}, member {m}: {got} vs {want}"
                    );
                }
            }
        }
    }
    assert!(
        branched.len() >= 2,
        "the branching step never moved: {branched:?}"
    );

    // 3 iterations, then resumed to 6: the same branching steps and the same numbers.
    common::assert_resume_matches(&pipeline, &dir.join("resumed"), 3, 6, &a, "TempFlow-GRPO");
}

#[test]
fn should_raise_an_easy_reward_with_tempflow_grpo() {
    // The brightness reward of the final image over 12 iterations, one branching step each.
    let run = run_new(
        &root().join("tests/pipelines/valid-tempflow-tiny.yaml"),
        &tmpdir("tempflow-rise").join("runs"),
        &["iterations=12"],
    );
    let (first, last, r) = common::first_and_last_mean(&run, "score/reward_mean", 3);
    assert!(last > first + 0.04, "reward {first:.3} → {last:.3}: {r:?}");
}
