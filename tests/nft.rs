//! DiffusionNFT end to end through the real binary, on the tiny model
//! (`tests/pipelines/valid-nft-tiny.yaml`): it trains, and a resumed run (the old policy, the
//! flow_model's EMA, comes back from the checkpoint) equals an uninterrupted one.

mod common;
use common::{metrics_without_timings, root, run_new, tmpdir};

#[test]
fn should_train_with_diffusion_nft_and_resume_exactly() {
    let dir = tmpdir("nft");
    let pipeline = root().join("tests/pipelines/valid-nft-tiny.yaml");
    let straight = run_new(
        &pipeline,
        &dir.join("straight"),
        &["iterations=3", "checkpoint_every=1"],
    );
    let a = metrics_without_timings(&straight);
    assert_eq!(a.len(), 3);
    for r in &a {
        let loss = r["update/loss"].as_f64().unwrap();
        assert!(loss.is_finite() && loss > 0.0, "{r}");
        assert!(r["update/grad_norm"].as_f64().unwrap() > 0.0, "{r}");
        let rm = r["update/r_mean"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&rm), "{r}");
    }
    // After the first update the trained weights have left the old policy (the EMA).
    assert!(
        a[1]["update/old_deviation"].as_f64().unwrap() > 0.0,
        "{}",
        a[1]
    );

    common::assert_resume_matches(&pipeline, &dir.join("resumed"), 1, 3, &a, "DiffusionNFT");
}

#[test]
fn should_raise_an_easy_reward_with_diffusion_nft() {
    // The brightness reward of the final image over 12 iterations of 4 NFT steps each:
    // measured 0.504 (first 3) → 0.531 (last 3) with this seed. Margin: +0.01.
    let run = run_new(
        &root().join("tests/pipelines/valid-nft-tiny.yaml"),
        &tmpdir("nft-rise").join("runs"),
        &["iterations=12", "nodes.update.params.steps=4"],
    );
    let (first, last, r) = common::first_and_last_mean(&run, "score/reward_mean", 3);
    assert!(last > first + 0.01, "reward {first:.3} → {last:.3}: {r:?}");
}

#[test]
fn should_move_the_old_policy_by_its_ramp() {
    // A linear ramp of rate 0 keeps decay 0: after every update the old policy (the EMA) is the
    // new weights, so the next update starts with v_θ = v_old. The file's rate 0.1 (decay 0.1,
    // then 0.2) leaves them apart.
    let dir = tmpdir("nft-ramp");
    let pipeline = root().join("tests/pipelines/valid-nft-tiny.yaml");
    let deviation = |name: &str, set: &[&str]| -> Vec<f64> {
        let mut all = vec!["iterations=3"];
        all.extend_from_slice(set);
        metrics_without_timings(&run_new(&pipeline, &dir.join(name), &all))
            .iter()
            .map(|r| r["update/old_deviation"].as_f64().unwrap())
            .collect()
    };
    let zero = deviation("zero", &["resources.policy.params.ema_ramp_rate=0.0"]);
    let ramp = deviation("ramp", &[]);
    for k in 1..3 {
        assert!(
            zero[k] <= 1e-6 * ramp[k] && ramp[k] > 0.0,
            "iteration {k}: old deviation {} with decay 0, {} with rate 0.1",
            zero[k],
            ramp[k]
        );
    }
}
