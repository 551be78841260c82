//! LoRA end to end: TAFS-GRPO with `lora:` on the ShapeWorld UNet (embedded, no Python) and on
//! the tiny diffusers SD3 pipeline (Python, required under CI): 2 iterations, resume, what the
//! checkpoints hold (the adapters only in the trainer state, diffusers' adapter file, the merged
//! weights in model.safetensors, no reference copy).

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use burn::tensor::Device;
use common::{
    RewardServer, flowrun as run, metrics, metrics_without_timings, only_run_dir, root,
    sd3_fixture, sd3_overrides, text, tmpdir,
};
use nodes::model::checkpoint::SafetensorsFile;
use nodes::model::lora::file::load_adapters;
use nodes::model::lora::{BaseDtype, cast_base};
use nodes::model::sd3::{Sd3Transformer, load_diffusers};
use nodes::model::{load_model, tensor_from_vec};

/// The policy's folder in the run's newest checkpoint.
fn policy_dir(run: &Path) -> PathBuf {
    let latest = fs::read_to_string(run.join("checkpoints/latest")).unwrap();
    run.join("checkpoints")
        .join(latest.trim())
        .join("resources/policy")
}

/// The trainer state holds adapters only (weights, EMA, moments), no reference copy is written.
fn check_checkpoint(dir: &Path) {
    let state = SafetensorsFile::read(&dir.join("trainer.safetensors")).unwrap();
    let names: Vec<&str> = state.names().collect();
    assert!(names.iter().any(|n| n.starts_with("adam.m.")), "{names:?}");
    assert!(
        names
            .iter()
            .all(|n| n.contains(".lora_A.") || n.contains(".lora_B.")),
        "a base tensor in the trainer state: {names:?}"
    );
    assert!(!dir.join("reference.safetensors").exists());
    assert!(dir.join("lora/pytorch_lora_weights.safetensors").is_file());
    // model.safetensors holds merged weights: no adapter key.
    let model = SafetensorsFile::read(&dir.join("model.safetensors")).unwrap();
    assert!(model.names().all(|n| !n.contains("lora_")));
}

#[test]
fn should_train_shapeworld_with_lora_and_resume_exactly() {
    let pipeline = root().join("tests/pipelines/valid-tafs-tiny.yaml");
    let p = pipeline.to_str().unwrap();
    let lora = "resources.policy.params.lora={rank: 2, alpha: 4}".to_string();
    let base = [lora, "checkpoint_every=1".to_string()];

    // Straight through, 2 iterations.
    let straight = tmpdir("lora-unet-straight");
    let mut set = base.to_vec();
    set.push("iterations=2".into());
    let o = run(&[p, "--runs-dir", straight.to_str().unwrap()], &set);
    assert!(o.status.success(), "{}", text(&o));
    let straight = only_run_dir(&straight);

    // 1 iteration, then resumed to 2.
    let resumed = tmpdir("lora-unet-resumed");
    let mut set = base.to_vec();
    set.push("iterations=1".into());
    let o = run(&[p, "--runs-dir", resumed.to_str().unwrap()], &set);
    assert!(o.status.success(), "{}", text(&o));
    let resumed = only_run_dir(&resumed);
    let o = run(
        &["run", "--resume", resumed.to_str().unwrap()],
        &["iterations=2".to_string()],
    );
    assert!(o.status.success(), "{}", text(&o));

    let (a, b) = (
        metrics_without_timings(&straight),
        metrics_without_timings(&resumed),
    );
    assert_eq!(a.len(), 2);
    assert_eq!(a, b, "a resumed LoRA run differs from an uninterrupted one");
    for r in &a {
        assert!(r["update/loss"].as_f64().unwrap().is_finite(), "{r}");
        // beta > 0 with `reference: true`: the KL to the base (adapters off) is computed.
        assert!(r.get("update/kl").is_some_and(|v| v.is_number()), "{r}");
    }
    check_checkpoint(&policy_dir(&straight));
}

#[test]
fn should_say_what_is_wrong_with_a_lora_setting() {
    let pipeline = root().join("tests/pipelines/valid-tafs-tiny.yaml");
    let runs = tmpdir("lora-bad");
    for (lora, want) in [
        ("{rank: 0}", "`rank` must be at least 1"),
        (
            "{rank: 4, targets: [attn.to_q]}",
            "`attn.to_q` match no linear layer",
        ),
        ("{rank: 4, dropout: 0.1}", "`dropout` 0.1 is not supported"),
        ("{rank: 4, rnak: 2}", "unknown field `rnak`"),
        ("{weights: /nonexistent/lora}", "does not exist"),
    ] {
        let o = run(
            &[
                pipeline.to_str().unwrap(),
                "--runs-dir",
                runs.to_str().unwrap(),
            ],
            &[format!("resources.policy.params.lora={lora}")],
        );
        assert!(!o.status.success(), "{lora} was accepted");
        let t = text(&o);
        assert!(t.contains(want), "{lora}: {t}");
        assert!(
            t.contains("policy"),
            "{lora}: the resource is not named: {t}"
        );
        assert!(!t.contains("panicked"), "{t}");
    }
}

#[test]
fn should_run_tafs_grpo_sd3_with_lora_and_resume() {
    let Some((model, emb)) = sd3_fixture() else {
        return;
    };
    let srv = RewardServer::start(&[]);
    let runs = tmpdir("lora-sd3-runs");
    let pipeline = root().join("pipelines/tafs_grpo_sd3.yaml");
    let mut set = sd3_overrides(model, emb, &srv.url(), "nodes.step.nodes.score");
    set.push("resources.policy.params.lora={rank: 4, alpha: 8}".into());
    set.push("resources.policy.params.lr=1.0e-3".into());
    // On libtorch (`.ci/run`), the frozen base in bf16 (`base_dtype`; flex refuses it).
    let bf16 = std::env::var("FLOWRUN_TEST_DEVICE").is_ok_and(|d| d.starts_with("libtorch"));
    if bf16 {
        set.push("resources.policy.params.base_dtype=bf16".into());
    }
    set.push("iterations=1".into());
    let o = run(
        &[
            pipeline.to_str().unwrap(),
            "--runs-dir",
            runs.to_str().unwrap(),
        ],
        &set,
    );
    assert!(o.status.success(), "{}", text(&o));
    let rd = only_run_dir(&runs);
    let o = run(
        &["run", "--resume", rd.to_str().unwrap()],
        &["iterations=2".to_string()],
    );
    assert!(o.status.success(), "{}", text(&o));
    let rows = metrics(&rd);
    assert_eq!(rows.len(), 2, "{rows:?}");
    for r in &rows {
        assert!(r["update/loss"].as_f64().unwrap().is_finite(), "{r}");
    }
    let dir = policy_dir(&rd);
    check_checkpoint(&dir);
    // The diffusers export is the merged model too (diffusers-loadable, no adapter keys).
    assert!(dir.join("transformer/config.json").is_file());
    let export =
        SafetensorsFile::read(&dir.join("transformer/diffusion_pytorch_model.safetensors"))
            .unwrap();
    assert!(
        export.names().all(|n| !n.contains("lora_")),
        "adapter keys in the diffusers export"
    );

    // The checkpoint's adapter over the base = its merged model.safetensors.
    let dev = Device::flex();
    let (_, base) = load_diffusers(model, &dev).unwrap();
    // A bf16 base trained as its bf16 rounding: the merged weights are that + the adapters'
    // term, summed in f32.
    let base = if bf16 {
        cast_base(cast_base(base, BaseDtype::BF16), BaseDtype::F32)
    } else {
        base
    };
    let (adapted, info) = load_adapters(base, &dir.join("lora")).unwrap();
    assert!(!info.layers.is_empty());
    assert!(info.layers.iter().all(|l| (l.2 - 2.0).abs() < 1e-12));
    let (_, merged) = load_model::<Sd3Transformer>(&dir.join("model.safetensors"), &dev).unwrap();
    // An unadapted weight holds bf16 values (the low 16 bits of each f32 zero) iff the base
    // was bf16.
    let (_, proj_out) = SafetensorsFile::read(&dir.join("model.safetensors"))
        .unwrap()
        .get("proj_out.weight")
        .unwrap();
    assert_eq!(
        proj_out.iter().all(|v| v.to_bits() & 0xffff == 0),
        bf16,
        "proj_out.weight in model.safetensors (bf16 base: {bf16})"
    );
    let c = merged.config.clone();
    let vals = |n: usize, s: f32| (0..n).map(|i| ((i as f32 + 1.0) * s).sin()).collect();
    let x = tensor_from_vec(
        vals(2 * c.in_channels * 64, 0.3),
        [2, c.in_channels, 8, 8],
        &dev,
    );
    let sigma = tensor_from_vec(vec![0.7, 0.2], [2], &dev);
    let pr = tensor_from_vec(
        vals(2 * 3 * c.joint_attention_dim, 0.7),
        [2, 3, c.joint_attention_dim],
        &dev,
    );
    let po = tensor_from_vec(
        vals(2 * c.pooled_projection_dim, 0.9),
        [2, c.pooled_projection_dim],
        &dev,
    );
    let va = common::values(adapted.forward(x.clone(), sigma.clone(), pr.clone(), po.clone()));
    let vm = common::values(merged.forward(x, sigma, pr, po));
    let shape = [va.len()];
    let e = common::rel_err("merged vs adapter", (&shape, &vm), (&shape, &va));
    assert!(
        e < 1e-5,
        "merged model.safetensors vs base + lora/: {e:.2e}"
    );
}

#[test]
fn should_take_the_same_update_with_activation_checkpointing() {
    // One LoRA TAFS-GRPO iteration on the tiny SD3 with the transformer's activations kept and
    // with each block recomputed in the backward: the same loss, gradient norm and adapters.
    let Some((model, emb)) = sd3_fixture() else {
        return;
    };
    let srv = RewardServer::start(&[]);
    let pipeline = root().join("pipelines/tafs_grpo_sd3.yaml");
    let mut base = sd3_overrides(model, emb, &srv.url(), "nodes.step.nodes.score");
    base.push("resources.policy.params.lora={rank: 4, alpha: 8}".into());
    base.push("resources.policy.params.lr=1.0e-3".into());
    base.push("iterations=1".into());
    let go = |checkpointing: bool| {
        let runs = tmpdir(&format!("ckpt-{checkpointing}"));
        let mut set = base.clone();
        set.push(format!(
            "resources.policy.params.activation_checkpointing={checkpointing}"
        ));
        let o = run(
            &[
                pipeline.to_str().unwrap(),
                "--runs-dir",
                runs.to_str().unwrap(),
            ],
            &set,
        );
        assert!(o.status.success(), "{}", text(&o));
        only_run_dir(&runs)
    };
    let (kept, recomputed) = (go(false), go(true));
    let (a, b) = (
        &metrics_without_timings(&kept)[0],
        &metrics_without_timings(&recomputed)[0],
    );
    // The first step's loss is −mean(A)·ρ with ρ = 1: zero up to rounding, hence the absolute
    // tolerance; the gradient norm is compared relatively.
    for (key, rel, abs) in [("update/loss", 0.0, 1e-7), ("update/grad_norm", 1e-6, 0.0)] {
        let (x, y) = (a[key].as_f64().unwrap(), b[key].as_f64().unwrap());
        assert!(y.abs() > 0.0 || key == "update/loss", "{key} is zero");
        assert!(
            (x - y).abs() <= rel * y.abs() + abs,
            "{key}: {x} kept, {y} recomputed"
        );
    }
    let adapters = |run: &Path| {
        SafetensorsFile::read(&policy_dir(run).join("lora/pytorch_lora_weights.safetensors"))
            .unwrap()
    };
    let (fa, fb) = (adapters(&kept), adapters(&recomputed));
    let mut n = 0;
    for name in fa.names().filter(|n| n.contains("lora_B")) {
        let (shape, want) = fb.get(name).unwrap();
        let (_, got) = fa.get(name).unwrap();
        if want.iter().all(|&v| v == 0.0) {
            // No gradient reaches it (the last block's unused context projections).
            assert!(got.iter().all(|&v| v == 0.0), "{name}");
            continue;
        }
        let e = common::rel_err(name, (&shape, &got), (&shape, &want));
        assert!(e <= 1e-6, "{name}: {e:.2e}");
        n += 1;
    }
    assert!(n > 0, "no adapter trained");
}
