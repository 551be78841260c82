//! The two SD3 pipelines (`pipelines/tafs_grpo_sd3.yaml`, `pipelines/flow_grpo_sd3.yaml`) end to
//! end on a tiny random SD3 pipeline folder built by diffusers (`tests/python/tiny_sd3_pipeline.py`)
//! with prompts encoded by `scripts/encode_prompts.py` and the reference reward server scoring the
//! VAE-decoded images: 2 iterations, finite metrics, resume, Parquet with the latents. Needs Python
//! with torch, diffusers and transformers (`common::python_with`: required under CI). The device
//! is flex, or `$FLOWRUN_TEST_DEVICE` (e.g. `libtorch`).

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::{
    RewardServer, flowrun, metrics, only_run_dir, root, sd3_fixture, sd3_overrides as overrides,
    text, tmpdir,
};

/// Every number in every metrics row is finite; returns the rows.
fn finite_metrics(run: &Path) -> Vec<serde_json::Value> {
    let rows = metrics(run);
    for r in &rows {
        for (k, v) in r.as_object().unwrap() {
            if let Some(x) = v.as_f64() {
                assert!(x.is_finite(), "{k} = {v} in {r}");
            }
        }
    }
    rows
}

/// The Parquet files of a run: one per iteration, latents of [16, 8, 8] in x_t / x_next.
fn check_trajectories(run: &Path, iterations: usize, steps: usize) {
    let mut files: Vec<PathBuf> = fs::read_dir(run.join("trajectories"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
        .collect();
    files.sort();
    assert_eq!(files.len(), iterations, "{files:?}");
    for f in &files {
        let batch = nodes::trajectory_sink::read_file(f).unwrap();
        assert_eq!(batch.num_rows(), 4 * steps, "{}", f.display());
        let field = batch.schema().field_with_name("x_t").unwrap().clone();
        assert_eq!(
            field
                .metadata()
                .get("ARROW:extension:metadata")
                .map(String::as_str),
            Some(r#"{"shape":[16,8,8],"dim_names":["C","H","W"]}"#)
        );
    }
}

#[test]
fn should_run_tafs_grpo_sd3_end_to_end_and_resume() {
    let Some((model, emb)) = sd3_fixture() else {
        return;
    };
    let srv = RewardServer::start(&[]);
    let runs = tmpdir("sd3-tafs-runs");
    let runs_s = runs.display().to_string();
    let pipeline = root().join("pipelines/tafs_grpo_sd3.yaml");
    let p = pipeline.to_str().unwrap();
    let mut set = overrides(model, emb, &srv.url(), "nodes.step.nodes.score");
    set.push("iterations=1".into());
    let o = flowrun(&[p, "--runs-dir", &runs_s], &set);
    assert!(o.status.success(), "{}", text(&o));
    let run = only_run_dir(&runs);
    // Resume to 2 iterations from the checkpoint of the first.
    let o = flowrun(
        &["run", "--resume", run.to_str().unwrap()],
        &["iterations=2".to_string()],
    );
    assert!(o.status.success(), "{}", text(&o));
    let rows = finite_metrics(&run);
    assert_eq!(rows.len(), 2, "{rows:?}");
    for r in &rows {
        assert!(r["update/loss"].is_number(), "{r}");
        assert!(r["score@4/reward_mean"].is_number(), "{r}");
        assert_eq!(r["update/optimizer_steps"].as_f64(), Some(1.0), "{r}");
    }
    check_trajectories(&run, 2, 3);
    replay(model, emb, &run, 3);
}

/// Replays a run's stored latents (`parquet_source` with the run's `embeddings`) into a GRPO
/// update of the same model: the recomputed log-probs are the stored ones (ratio 1 on the first
/// update, the weights being the starting ones).
fn replay(model: &Path, emb: &Path, run: &Path, steps: usize) {
    let dir = run.parent().unwrap().join("replay");
    fs::create_dir_all(&dir).unwrap();
    let yaml = format!(
        "name: replay_sd3\nseed: 1\niterations: 1\nmemory_check: \"off\"\nresources:\n  policy:\n    type: flow_model\n    params: {{arch: sd3, diffusers: {m}, lr: 1.0e-5}}\nnodes:\n  - id: replay\n    type: parquet_source\n    params: {{dir: {t}, batch: 0, shuffle: false, embeddings: {e}}}\n  - repeat:\n      id: step\n      count: {steps}\n      nodes:\n        - id: pick\n          type: trajectory_step\n          inputs: {{trajectories: replay.trajectories}}\n  - id: update\n    type: grpo_update\n    uses: [policy]\n    params: {{clip_range: 1.0e-4}}\n    inputs:\n      transitions: pick@*.transition\n      advantages: replay.advantages\n      prompts: replay.prompts\n",
        m = model.display(),
        t = run.join("trajectories").display(),
        e = emb.display(),
    );
    let p = dir.join("replay.yaml");
    fs::write(&p, yaml).unwrap();
    let runs = dir.join("runs");
    let o = flowrun(
        &[p.to_str().unwrap(), "--runs-dir", runs.to_str().unwrap()],
        &[],
    );
    assert!(o.status.success(), "{}", text(&o));
    let rows = finite_metrics(&only_run_dir(&runs));
    assert_eq!(rows.len(), 1);
    // f16-stored states: the recomputed log-prob matches the stored one to f16 rounding.
    let dev = (rows[0]["update/ratio_max"].as_f64().unwrap() - 1.0).abs();
    assert!(dev < 1e-2, "{}", rows[0]);
}

#[test]
fn should_run_flow_grpo_sd3_end_to_end() {
    let Some((model, emb)) = sd3_fixture() else {
        return;
    };
    let srv = RewardServer::start(&[]);
    let runs = tmpdir("sd3-flow-runs");
    let runs_s = runs.display().to_string();
    let pipeline = root().join("pipelines/flow_grpo_sd3.yaml");
    let mut set = overrides(model, emb, &srv.url(), "nodes.score");
    set.push("iterations=2".into());
    let o = flowrun(&[pipeline.to_str().unwrap(), "--runs-dir", &runs_s], &set);
    assert!(o.status.success(), "{}", text(&o));
    let run = only_run_dir(&runs);
    let rows = finite_metrics(&run);
    assert_eq!(rows.len(), 2);
    // The on-policy first minibatch: the recomputed log-probs are the rollout's.
    for r in &rows {
        let dev = (r["update/ratio_max"].as_f64().unwrap() - 1.0).abs();
        assert!(dev < 1e-3, "{r}");
        assert!(r["score/reward_mean"].is_number(), "{r}");
    }
    check_trajectories(&run, 2, 10);
}

#[test]
fn should_refuse_embeddings_of_another_width_naming_both_files() {
    let Some((model, _)) = sd3_fixture() else {
        return;
    };
    // Embeddings of another model: width 32 instead of the transformer's 128.
    let dir = tmpdir("sd3-wrong-width");
    let other = dir.join("other.safetensors");
    write_store(&other, 93, 32, 96);
    let mut set = overrides(
        model,
        &other,
        "http://127.0.0.1:9/score",
        "nodes.step.nodes.score",
    );
    set.retain(|s| !s.starts_with("checkpoint_every"));
    let pipeline = root().join("pipelines/tafs_grpo_sd3.yaml");
    let runs = dir.join("runs");
    let o = flowrun(
        &[
            pipeline.to_str().unwrap(),
            "--runs-dir",
            runs.to_str().unwrap(),
        ],
        &set,
    );
    let out = text(&o);
    assert!(!o.status.success(), "{out}");
    assert!(
        !runs.exists(),
        "validation failed before any run directory: {out}"
    );
    assert!(out.contains("holds embeddings of width 32"), "{out}");
    assert!(out.contains(&other.display().to_string()), "{out}");
    assert!(out.contains("transformer/config.json"), "{out}");
    assert!(out.contains("joint_attention_dim 128"), "{out}");
}

#[test]
fn should_refuse_shapeworld_prompts_for_an_sd3_policy() {
    let Some((model, emb)) = sd3_fixture() else {
        return;
    };
    let mut set = overrides(
        model,
        emb,
        "http://127.0.0.1:9/score",
        "nodes.step.nodes.score",
    );
    set.retain(|s| !s.contains("embeddings="));
    set.push("nodes.prompts.params.path=datasets/shapes/train.jsonl".into());
    set.push("nodes.prompts.params.embeddings=\"\"".into());
    let pipeline = root().join("pipelines/tafs_grpo_sd3.yaml");
    let runs = tmpdir("sd3-shapes-prompts");
    let o = flowrun(
        &[
            pipeline.to_str().unwrap(),
            "--runs-dir",
            runs.to_str().unwrap(),
        ],
        &set,
    );
    let out = text(&o);
    assert!(!o.status.success(), "{out}");
    assert!(out.contains("reads text embeddings"), "{out}");
}

/// A one-file prompt store in encode_prompts.py's layout with `n = 2` prompts of [l, d] and
/// pooled [q], f32.
fn write_store(path: &Path, l: usize, d: usize, q: usize) {
    let n = 2;
    let tensors = [
        ("prompt_embeds", vec![n, l, d]),
        ("pooled_prompt_embeds", vec![n, q]),
        ("negative_prompt_embeds", vec![1, l, d]),
        ("negative_pooled_prompt_embeds", vec![1, q]),
    ];
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape) in &tensors {
        let bytes = shape.iter().product::<usize>() * 4;
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let h = serde_json::Value::Object(header).to_string();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(h.as_bytes());
    out.resize(out.len() + offset, 0);
    fs::write(path, out).unwrap();
    let sidecar: String = (0..n)
        .map(|i| format!("{{\"index\": {i}, \"prompt\": \"p{i}\", \"metadata\": {{}}}}\n"))
        .collect();
    fs::write(path.with_extension("jsonl"), sidecar).unwrap();
}

/// Bad policy and prompt settings each fail with a message saying what to set (no Python).
#[test]
fn should_say_what_an_sd3_policy_and_its_prompts_need() {
    let dir = tmpdir("sd3-bad-settings");
    let cases = [
        (
            "{arch: sd3}",
            "{embeddings: x.safetensors}",
            "`arch: sd3` needs weights: set `diffusers`",
        ),
        (
            "{arch: sd3, diffusers: /nonexistent/sd3}",
            "{embeddings: x.safetensors}",
            "/nonexistent/sd3: not a directory",
        ),
        (
            "{diffusers: /some/folder}",
            "{path: datasets/shapes/train.jsonl}",
            "`diffusers` is a diffusers folder for `arch: sd3`",
        ),
        (
            "{size: tiny}",
            "{path: datasets/shapes/train.jsonl, embeddings: x.safetensors}",
            "set one of `path` (ShapeWorld prompts) and `embeddings`",
        ),
        (
            "{size: tiny}",
            "{embeddings: x.safetensors}",
            "`policy` is ShapeWorld's UNet (`arch: shapes_unet`), which reads token ids",
        ),
        (
            "{size: tiny, export: bf16}",
            "{path: datasets/shapes/train.jsonl}",
            "`export` writes a diffusers SD3 transformer folder: it needs `arch: sd3`",
        ),
    ];
    for (i, (policy, loader, want)) in cases.iter().enumerate() {
        let yaml = format!(
            "name: bad\niterations: 1\nresources:\n  policy: {{type: flow_model, params: {policy}}}\nnodes:\n  - id: prompts\n    type: prompt_loader\n    params: {loader}\n  - id: noise\n    type: gaussian_noise\n    inputs: {{prompts: prompts.prompts}}\n  - id: predict\n    type: one_step_sampler\n    uses: [policy]\n    inputs: {{x: noise.x, prompts: prompts.prompts}}\n"
        );
        let p = dir.join(format!("bad-{i}.yaml"));
        fs::write(&p, yaml).unwrap();
        let runs = dir.join(format!("runs-{i}"));
        let o = flowrun(
            &[p.to_str().unwrap(), "--runs-dir", runs.to_str().unwrap()],
            &[],
        );
        let out = text(&o);
        assert!(!o.status.success(), "case {i}: {out}");
        assert!(out.contains(want), "case {i}: want {want:?} in:\n{out}");
        assert!(!out.contains("panicked"), "case {i}: {out}");
    }
}
