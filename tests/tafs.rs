//! End-to-end TAFS-GRPO and Flow-GRPO runs through the real binary, on a tiny model.

mod common;
use common::tmpdir;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

fn pipeline(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/pipelines")
        .join(name)
}

/// Run a pipeline to completion; returns its metrics rows.
fn run(p: &Path, runs: &Path, set: &[&str]) -> Vec<serde_json::Value> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_flowrun"));
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
        .arg(p)
        .arg("--quiet")
        .arg("--runs-dir")
        .arg(runs);
    for s in set {
        cmd.args(["--set", s]);
    }
    let o = cmd.output().unwrap();
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let dir = fs::read_dir(runs)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .max()
        .unwrap();
    fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn mean(rows: &[serde_json::Value], key: &str) -> f64 {
    rows.iter().map(|r| r[key].as_f64().unwrap()).sum::<f64>() / rows.len() as f64
}

#[test]
fn should_raise_an_easy_reward_with_tafs_grpo() {
    let runs = tmpdir("rise").join("runs");
    let rows = run(&pipeline("valid-tafs-tiny.yaml"), &runs, &[]);
    assert_eq!(rows.len(), 12);
    let key = "score@3/reward_mean";
    let first = mean(&rows[..3], key);
    let last = mean(&rows[9..], key);
    // Brightness reward of the final x̂0; measured 0.53 → 0.83 with this seed. Margin: +0.1.
    assert!(
        last > first + 0.1,
        "reward did not rise: {first:.3} → {last:.3}"
    );
    // The update logged its diagnostics.
    for k in [
        "update/loss",
        "update/kl",
        "update/clip_frac",
        "update/ratio_mean",
        "update/grad_norm",
        "advantages/abs_mean",
    ] {
        assert!(rows[0][k].is_number(), "{k} missing");
    }
}

#[test]
fn should_be_deterministic_given_the_seed() {
    let d = tmpdir("det");
    let strip = |rows: Vec<serde_json::Value>| -> Vec<serde_json::Value> {
        rows.into_iter()
            .map(|mut r| {
                let o = r.as_object_mut().unwrap();
                o.retain(|k, _| {
                    !k.starts_with("time/") && !k.ends_with("_s") && !k.ends_with("per_s")
                });
                r
            })
            .collect()
    };
    let a = strip(run(
        &pipeline("valid-tafs-tiny.yaml"),
        &d.join("a"),
        &["iterations=3"],
    ));
    let b = strip(run(
        &pipeline("valid-tafs-tiny.yaml"),
        &d.join("b"),
        &["iterations=3"],
    ));
    assert_eq!(a, b);
    let c = strip(run(
        &pipeline("valid-tafs-tiny.yaml"),
        &d.join("c"),
        &["iterations=3", "seed=8"],
    ));
    assert_ne!(a, c);
}

#[test]
fn should_run_the_flow_grpo_baseline() {
    let runs = tmpdir("flowgrpo").join("runs");
    let rows = run(&pipeline("valid-flow-grpo-tiny.yaml"), &runs, &[]);
    assert_eq!(rows.len(), 3);
    assert!(rows[2]["update/optimizer_steps"].as_f64() == Some(1.0));
    assert!(rows[2]["score/reward_mean"].is_number());
}

#[test]
fn should_train_the_same_through_kept_rollout_graphs() {
    // `rollout_graph: keep`: the update back-propagates through the samplers' own forward
    // (one optimizer step over the whole batch, so every transition's graph is used) and must
    // log the same losses and gradient norms as recomputing the forward.
    let d = tmpdir("kept");
    let set = |mode: &'static str| {
        [
            "iterations=3",
            "nodes.update.params.minibatch=0",
            "nodes.update.params.epochs=1",
            if mode == "keep" {
                "resources.policy.params.rollout_graph=keep"
            } else {
                "resources.policy.params.rollout_graph=recompute"
            },
        ]
    };
    let p = pipeline("valid-tafs-tiny.yaml");
    let kept = run(&p, &d.join("keep"), &set("keep"));
    let rec = run(&p, &d.join("recompute"), &set("recompute"));
    for (k, r) in kept.iter().zip(&rec) {
        assert_eq!(k["update/graphs_reused"].as_f64(), Some(2.0), "{k}");
        assert_eq!(r["update/graphs_reused"].as_f64(), Some(0.0), "{r}");
        for key in ["update/grad_norm", "update/loss", "score@3/reward_mean"] {
            let (a, b) = (k[key].as_f64().unwrap(), r[key].as_f64().unwrap());
            assert!(
                (a - b).abs() <= 1e-4 * b.abs().max(1e-3),
                "{key}: {a} with kept graphs, {b} recomputed"
            );
        }
    }
    // The Flow-GRPO sampler keeps its graphs too (every SDE step is stochastic).
    let rows = run(
        &pipeline("valid-flow-grpo-tiny.yaml"),
        &d.join("sde"),
        &["iterations=1", "resources.policy.params.rollout_graph=keep"],
    );
    assert!(
        rows[0]["update/graphs_reused"].as_f64().unwrap() >= 1.0,
        "{}",
        rows[0]
    );
}

#[test]
fn should_refuse_kept_rollout_graphs_of_the_ema_weights() {
    let d = tmpdir("kept-ema");
    let o = Command::new(env!("CARGO_BIN_EXE_flowrun"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .arg(pipeline("valid-tafs-tiny.yaml"))
        .args(["--quiet", "--runs-dir"])
        .arg(d.join("runs"))
        .args(["--set", "resources.policy.params.rollout_graph=keep"])
        .args(["--set", "resources.policy.params.sample_with=ema"])
        .output()
        .unwrap();
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!o.status.success(), "{out}");
    assert!(
        out.contains("policy")
            && out.contains("rollout_graph: keep")
            && out.contains("sample_with: current"),
        "{out}"
    );
    assert!(!out.contains("backtrace"), "{out}");
}
