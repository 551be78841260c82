//! The SD3 rollouts against diffusers: a 4-step TAFS rollout (`pipelines/tafs_grpo_sd3.yaml`)
//! and a 10-step Flow-GRPO SDE rollout (`pipelines/flow_grpo_sd3.yaml`) with fixed noise,
//! log-probs included, agree with diffusers to max|Δ| / max|ref| ≤ 1e-4 in f32 on CPU.
//!
//! Each pipeline runs one iteration on the tiny diffusers SD3 folder ([`common::sd3_fixture`]:
//! 2 prompts × 2, 8×8 latents, CFG 4.5, shift 3) with `trajectory_sink` storing the latents in
//! f32. The rollout's noise is regenerated here, the way the nodes draw it (the `noise` node's
//! initial state, each step's ε), and `tests/python/sd3_rollout_check.py` — written from the
//! published formulas: diffusers' `SD3Transformer2DModel` with `StableDiffusion3Pipeline`'s CFG,
//! `FlowMatchEulerDiscreteScheduler`'s sigmas, TAFS's re-noising, Flow-GRPO's
//! `sde_step_with_logprob` — recomputes every transition from the Parquet file: velocity, mean,
//! std, the kernel's a and b, log-prob of the stored x_next, the whole chain again from the noise,
//! and the rewards of the predictions (VAE-decoded brightness, the reference server's score). It
//! also checks bit for bit that the regenerated noise is the first x_t, that each x_next is the
//! next x_t and that the stored timesteps are diffusers' sigmas.
//!
//! Needs Python with torch, diffusers, transformers, safetensors and pyarrow
//! ([`common::python_with`]: skipped with a NOTICE locally, required under CI). The device is
//! flex, or `$FLOWRUN_TEST_DEVICE` (e.g. `libtorch`).

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use common::{RewardServer, bin, only_run_dir, python_with, root, sd3_fixture, text, tmpdir};
use nodes::model::sample_standard_normal;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// max|Δ| / max|ref| for every recomputed quantity.
const TOL: f64 = 1e-4;
/// The pipeline seed (set explicitly, so that the noise regenerated here is the run's).
const SEED: u64 = 5;
/// The tiny fixture's batch (2 prompts × 2) and latent shape.
const BATCH: usize = 4;
const LATENT: [usize; 3] = [16, 8, 8];

/// The quantities the check script must report: relative errors, and the bit-exact ones.
const REL: &[&str] = &[
    "velocity",
    "mean",
    "mean_kernel",
    "x_next",
    "std",
    "kernel_a",
    "kernel_b",
    "logprob",
    "chain",
    "chain_logprob",
    "reward",
];
const EXACT: &[&str] = &[
    "noise_is_x_t_1",
    "x_next_is_next_x_t",
    "t_vs_diffusers",
    "t_next_vs_diffusers",
];

/// One SD3 pipeline and its settings, as shipped.
struct Case {
    pipeline: &'static str,
    sampler: &'static str,
    /// The repeat block's count N.
    steps: usize,
    /// Ids of the nodes that draw each transition's ε (`<id>@k`, k = 1…).
    step_node: &'static str,
    transitions: usize,
    /// Where the reward node sits (for the URL override).
    score: &'static str,
    /// The script's sampler flags (the pipeline's τ schedule or noise level).
    flags: &'static [&'static str],
}

const TAFS: Case = Case {
    pipeline: "pipelines/tafs_grpo_sd3.yaml",
    sampler: "tafs",
    steps: 4,
    step_node: "renoise",
    transitions: 3,
    score: "nodes.step.nodes.score",
    flags: &["--tau-start", "1.0", "--tau-end", "0.6"],
};

const FLOW_GRPO: Case = Case {
    pipeline: "pipelines/flow_grpo_sd3.yaml",
    sampler: "flow_sde",
    steps: 10,
    step_node: "sde",
    transitions: 10,
    score: "nodes.score",
    flags: &["--noise-level", "0.7"],
};

/// `runner::NodeCtx::seed_for` for a node `id` at iteration `iteration`.
fn seed_for(seed: u64, id: &str, iteration: u64, stream: &str) -> u64 {
    runner::stream_seed(seed, id, iteration, stream)
}

/// The standard-normal [BATCH, C, H, W] draw of node `id`'s `stream` at iteration 1, as
/// `gaussian_noise`, `annealed_renoiser` and `flow_sde_step` draw it.
fn draw(id: &str, stream: &str) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed_for(SEED, id, 1, stream));
    sample_standard_normal(&mut rng, BATCH * LATENT.iter().product::<usize>())
}

/// A float32 safetensors file of [BATCH, C, H, W] tensors.
fn write_noise(path: &Path, tensors: &[(String, Vec<f32>)]) {
    let shape = [BATCH, LATENT[0], LATENT[1], LATENT[2]];
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, v) in tensors {
        let bytes = v.len() * 4;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let h = serde_json::Value::Object(header).to_string();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(h.as_bytes());
    for (_, v) in tensors {
        out.extend(v.iter().flat_map(|x| x.to_le_bytes()));
    }
    fs::write(path, out).unwrap();
}

/// Runs `case`'s pipeline for one iteration on the tiny model, regenerates its noise and runs
/// the check script; returns the script's JSON.
fn run_and_check(case: &Case, name: &str) -> Option<serde_json::Value> {
    let py = python_with(&[
        "torch",
        "diffusers",
        "transformers",
        "safetensors",
        "pyarrow",
    ])?;
    let (model, emb) = sd3_fixture()?;
    let srv = RewardServer::start(&[]);
    let dir = tmpdir(name);
    let runs = dir.join("runs");
    let set = [
        format!("resources.policy.params.diffusers={}", model.display()),
        format!("resources.vae.params.path={}", model.display()),
        format!("nodes.prompts.params.embeddings={}", emb.display()),
        "nodes.prompts.params.prompts_per_iter=2".into(),
        "nodes.prompts.params.group_size=2".into(),
        format!("nodes.noise.params.channels={}", LATENT[0]),
        format!("nodes.noise.params.height={}", LATENT[1]),
        format!("nodes.noise.params.width={}", LATENT[2]),
        "nodes.trajectories.params.tensors=f32".into(),
        "iterations=1".into(),
        format!("seed={SEED}"),
        format!("{}.params.url={}", case.score, srv.url()),
    ];
    let mut c = bin();
    c.arg(root().join(case.pipeline))
        .arg("--runs-dir")
        .arg(&runs)
        .arg("--quiet");
    if let Ok(d) = std::env::var("FLOWRUN_TEST_DEVICE") {
        c.args(["--device", &d]);
    }
    for s in &set {
        c.arg("--set").arg(s);
    }
    let start = Instant::now();
    let o = c.output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let run_s = start.elapsed().as_secs_f64();
    let parquet: PathBuf = only_run_dir(&runs).join("trajectories/iter-000001.parquet");
    assert!(parquet.is_file(), "{}", parquet.display());

    let mut noise = vec![("noise".to_string(), draw("noise", "noise"))];
    for k in 1..=case.transitions {
        let id = format!("{}@{k}", case.step_node);
        noise.push((format!("eps@{k}"), draw(&id, "eps")));
    }
    let noise_file = dir.join("noise.safetensors");
    write_noise(&noise_file, &noise);

    let out = dir.join("result.json");
    let start = Instant::now();
    let o = Command::new(py)
        .arg(root().join("tests/python/sd3_rollout_check.py"))
        .args(["--model".as_ref(), model.as_os_str()])
        .args(["--embeddings".as_ref(), emb.as_os_str()])
        .args(["--parquet".as_ref(), parquet.as_os_str()])
        .args(["--noise".as_ref(), noise_file.as_os_str()])
        .args(["--sampler", case.sampler])
        .args(["--steps", &case.steps.to_string()])
        .args(["--shift", "3.0", "--cfg", "4.5"])
        .args(case.flags)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "sd3_rollout_check.py: {}", text(&o));
    eprintln!(
        "{}: flowrun {run_s:.1} s, sd3_rollout_check.py {:.1} s\n{}",
        case.pipeline,
        start.elapsed().as_secs_f64(),
        String::from_utf8_lossy(&o.stdout)
    );
    Some(serde_json::from_str(&fs::read_to_string(&out).unwrap()).unwrap())
}

/// Asserts every figure of the script's result: the relative errors ≤ [`TOL`], the bit-exact
/// ones 0, the stored temperature and cfg the pipeline's.
fn check(case: &Case, r: &serde_json::Value, extra_rel: &[&str]) {
    let info = &r["info"];
    assert_eq!(
        info["transitions"].as_u64(),
        Some(case.transitions as u64),
        "{r}"
    );
    assert_eq!(info["samples"].as_u64(), Some(BATCH as u64), "{r}");
    let mut failed = Vec::new();
    for k in REL.iter().chain(extra_rel) {
        let e = r["rel"][k]
            .as_f64()
            .unwrap_or_else(|| panic!("rel.{k} missing or not a number: {r}"));
        if e.is_nan() || e > TOL {
            failed.push(format!("rel {k} = {e:.3e} > {TOL:.0e}"));
        }
    }
    for k in EXACT {
        let e = r["exact"][k]
            .as_f64()
            .unwrap_or_else(|| panic!("exact.{k} missing: {r}"));
        if e != 0.0 {
            failed.push(format!("exact {k}: max|Δ| = {e:.3e}, not bit-identical"));
        }
    }
    for k in ["temperature", "cfg"] {
        let e = r["abs"][k]
            .as_f64()
            .unwrap_or_else(|| panic!("abs.{k} missing: {r}"));
        if e.is_nan() || e > 1e-6 {
            failed.push(format!("abs {k}: max|Δ| = {e:.3e}"));
        }
    }
    assert!(
        failed.is_empty(),
        "{}: {}\n{}",
        case.pipeline,
        failed.join("; "),
        serde_json::to_string_pretty(r).unwrap()
    );
}

#[test]
fn should_agree_with_diffusers_on_a_4_step_tafs_rollout() {
    let Some(r) = run_and_check(&TAFS, "sd3-rollout-tafs") else {
        return;
    };
    check(&TAFS, &r, &["final_x0"]);
}

#[test]
fn should_agree_with_diffusers_on_a_10_step_flow_grpo_sde_rollout() {
    let Some(r) = run_and_check(&FLOW_GRPO, "sd3-rollout-flow-grpo") else {
        return;
    };
    check(&FLOW_GRPO, &r, &[]);
}
