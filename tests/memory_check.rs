//! Validation's peak-memory estimate (issue 16, item 6): close to measured peaks of the main
//! job, and a batch beyond the machine refused at the parameter that sets it.

mod common;

use runner::{Diagnostics, Pipeline};

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

fn load(extra: &[&str]) -> Result<(Pipeline, Diagnostics), Diagnostics> {
    load_file("pipelines/tafs_grpo.yaml", extra)
}

fn load_file(file: &str, extra: &[&str]) -> Result<(Pipeline, Diagnostics), Diagnostics> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    std::env::set_current_dir(root).unwrap();
    let sets: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    runner::load(std::path::Path::new(file), &sets, &nodes::registry())
}

#[test]
fn should_estimate_the_measured_peaks_of_the_main_job() {
    // Peak RSS over 3 iterations, measured by `scripts/memory_estimate.sh` (`/usr/bin/time -f
    // %M flowrun run PIPELINE --set iterations=3 --set nodes.eval.every=1000000 …`; README
    // "What validation estimates"), on flex.
    let tiny = [
        "resources.policy.params.checkpoint=\"\"",
        "resources.policy.params.size=tiny",
    ];
    let recompute = "resources.policy.params.rollout_graph=recompute";
    let keep = "resources.policy.params.rollout_graph=keep";
    let ppi = |n: u32| format!("nodes.prompts.params.prompts_per_iter={n}");
    let with = |extra: &[&str], n: u32| {
        let mut v = vec![ppi(n)];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let main = "pipelines/tafs_grpo.yaml";
    let cases: Vec<(&str, Vec<String>, f64)> = vec![
        (main, with(&[], 2), 0.347),
        (main, with(&[], 8), 0.950),
        (main, with(&[], 32), 3.537),
        (main, with(&[recompute], 8), 0.443),
        (main, with(&tiny, 2), 0.115),
        (main, with(&tiny, 8), 0.296),
        (main, with(&tiny, 32), 1.074),
        (main, with(&[recompute, tiny[0], tiny[1]], 32), 0.423),
        // Only the window's 2 of 10 steps keep a graph (the ODE steps keep none) …
        ("pipelines/mixgrpo.yaml", with(&[keep], 8), 0.702),
        // … where Flow-GRPO keeps all 10.
        ("pipelines/flow_grpo.yaml", with(&[keep], 4), 1.483),
    ];
    assert_estimates(cases);
}

/// The same on libtorch CPU, whose libraries take ~0.5 GiB and whose kept graphs are about
/// twice flex's (CI: `--features tch`).
#[cfg(feature = "tch")]
#[test]
fn should_estimate_the_measured_peaks_on_libtorch() {
    let tiny = [
        "resources.policy.params.checkpoint=\"\"",
        "resources.policy.params.size=tiny",
    ];
    let recompute = "resources.policy.params.rollout_graph=recompute";
    let with = |extra: &[&str], n: u32| {
        let mut v = vec![
            "device=libtorch".to_string(),
            format!("nodes.prompts.params.prompts_per_iter={n}"),
        ];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let main = "pipelines/tafs_grpo.yaml";
    assert_estimates(vec![
        (main, with(&[], 2), 0.958),
        (main, with(&[], 8), 2.236),
        (main, with(&[recompute], 8), 1.274),
        (main, with(&tiny, 2), 0.650),
        (main, with(&tiny, 8), 1.002),
    ]);
}

/// Each case's estimate within 12% of its measured peak (GiB).
fn assert_estimates(cases: Vec<(&str, Vec<String>, f64)>) {
    for (file, sets, measured) in cases {
        let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
        let (p, _) = load_file(file, &sets).expect("valid");
        let est = nodes::checks::memory::estimate(&p).unwrap().bytes / GIB;
        assert!(
            (est / measured - 1.0).abs() < 0.12,
            "{file} {sets:?}: estimated {est:.3} GiB, measured {measured} GiB"
        );
    }
}

#[test]
fn should_refuse_a_batch_beyond_the_machine_at_the_batch_parameter() {
    let huge = [
        "nodes.prompts.params.prompts_per_iter=100000",
        "nodes.prompts.params.group_size=4096",
    ];
    let d = load(&huge).expect_err("refused");
    let errors: Vec<_> = d.errors().collect();
    assert_eq!(errors.len(), 1, "{d}");
    let e = errors[0];
    assert!(e.message.contains("more than this machine's"), "{d}");
    assert!(
        e.message
            .contains("prompts_per_iter 100000 × group_size 4096"),
        "{d}"
    );
    assert!(e.loc.is_known(), "located in the file: {d}");
    // `warn`: it validates, with the same finding as a warning; `off`: not estimated.
    let mut warn = huge.to_vec();
    warn.push("memory_check=warn");
    let (_, w) = load(&warn).expect("only a warning");
    assert!(
        w.warnings()
            .any(|d| d.message.contains("more than this machine's"))
    );
    let mut off = huge.to_vec();
    off.push("memory_check=off");
    let (_, w) = load(&off).expect("not estimated");
    assert!(!w.warnings().any(|d| d.message.contains("memory")));
    // The main job as shipped fits this machine.
    load(&[]).expect("the main job validates here");
}

/// Address space capped (RLIMIT_AS) so that a large batch's allocation fails.
#[cfg(unix)]
#[test]
fn should_end_with_one_clear_line_when_memory_runs_out() {
    use std::os::unix::process::CommandExt;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let runs = std::env::temp_dir().join(format!("flowrun-test-oom-{}", std::process::id()));
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_flowrun"));
    c.current_dir(root)
        .arg("tests/pipelines/valid-tafs-tiny.yaml")
        .arg("--runs-dir")
        .arg(&runs)
        .arg("--quiet")
        .args(["--set", "memory_check=off"])
        .args(["--set", "nodes.prompts.params.prompts_per_iter=4096"])
        .args(["--set", "nodes.prompts.params.group_size=4096"]);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        c.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 3 << 30,
                rlim_max: 3 << 30,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let o = c.output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("flowrun: error: out of memory: could not allocate"),
        "{err}"
    );
    assert!(
        !err.contains("memory allocation of") && !err.contains("backtrace"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(runs);
}

/// SD3.5-Medium's transformer config (diffusers' `stabilityai/stable-diffusion-3.5-medium`),
/// with the text widths of the tiny fixture's embeddings; validation reads config.json alone.
fn sd35_medium_folder(joint: usize, pooled: usize) -> std::path::PathBuf {
    let dir = common::tmpdir("sd35m-config");
    let config = serde_json::json!({
        "_class_name": "SD3Transformer2DModel", "attention_head_dim": 64,
        "caption_projection_dim": 1536, "dual_attention_layers": (0..13).collect::<Vec<_>>(),
        "in_channels": 16, "joint_attention_dim": joint, "num_attention_heads": 24,
        "num_layers": 24, "out_channels": 16, "patch_size": 2, "pooled_projection_dim": pooled,
        "pos_embed_max_size": 384, "qk_norm": "rms_norm", "sample_size": 128,
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    dir
}

#[test]
fn should_estimate_sd3_with_and_without_lora_and_name_what_fits() {
    let Some((_, emb)) = common::sd3_fixture() else {
        return;
    };
    let dir = sd35_medium_folder(128, 96);
    let base = [
        format!("resources.policy.params.diffusers={}", dir.display()),
        format!("nodes.prompts.params.embeddings={}", emb.display()),
        "memory_check=warn".to_string(),
    ];
    let sd3 = |extra: &[&str]| {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut sets: Vec<String> = base.to_vec();
        sets.extend(extra.iter().map(|s| s.to_string()));
        runner::load(
            &root.join("pipelines/tafs_grpo_sd3.yaml"),
            &sets,
            &nodes::registry(),
        )
        .expect("valid (warnings only)")
    };
    let warning = |d: &Diagnostics| {
        d.warnings()
            .find(|w| w.message.contains("more than this machine's"))
            .map(|w| w.message.clone())
    };
    // Full fine-tuning: 6 f32 copies of ~2.2B parameters, far above this machine.
    let (p, d) = sd3(&[]);
    let full = nodes::checks::memory::estimate(&p).unwrap();
    assert!(full.bytes > 49.0 * GIB, "{:.1} GiB", full.bytes / GIB);
    assert!(full.why.contains("6 f32 copies of 2"), "{}", full.why);
    let w = warning(&d).expect("a warning");
    assert!(w.contains("train LoRA adapters"), "{w}");

    // LoRA r32: one frozen copy + adapters. At 512 px on flex one sample's graph alone is
    // beyond this machine, and the warning says so.
    let lora = "resources.policy.params.lora={rank: 32, alpha: 64}";
    let (p, d) = sd3(&[lora]);
    let est = nodes::checks::memory::estimate(&p).unwrap();
    assert!(
        est.why.contains("one frozen f32 copy of 2234M"),
        "{}",
        est.why
    );
    assert!(est.bytes < full.bytes);
    let w = warning(&d).expect("a warning");
    // It would fit with activation checkpointing (each block's inputs and one block's graph),
    // and following the advice it does.
    assert!(
        w.contains("it would fit with `activation_checkpointing: true` on `policy`"),
        "{w}"
    );
    let n: u64 = w
        .split("`minibatch: ")
        .nth(1)
        .and_then(|r| r.split('`').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no minibatch advice: {w}"));
    let ckpt = "resources.policy.params.activation_checkpointing=true";
    let mb = format!("nodes.update.params.minibatch={n}");
    let (p, d) = sd3(&[lora, ckpt, &mb]);
    assert!(warning(&d).is_none(), "{d}");
    let recomputed = nodes::checks::memory::estimate(&p).unwrap();
    assert!(recomputed.bytes < est.bytes / 4.0);
    assert!(
        recomputed.why.contains("`activation_checkpointing`"),
        "{}",
        recomputed.why
    );
    // Without checkpointing even one sample does not fit.
    let (_, d) = sd3(&[lora, "nodes.update.params.minibatch=1"]);
    let w = warning(&d).expect("a warning");
    assert!(w.contains("activation_checkpointing: true"), "{w}");
    // At 256 px, 64 samples do not fit, and the advice says how many per minibatch do.
    let (h, wd) = (
        "nodes.noise.params.height=32",
        "nodes.noise.params.width=32",
    );
    let (p, d) = sd3(&[lora, h, wd]);
    let est = nodes::checks::memory::estimate(&p).unwrap();
    let w = warning(&d).expect("a warning");
    let n: u64 = w
        .split("`minibatch: ")
        .nth(1)
        .and_then(|r| r.split('`').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no minibatch advice: {w}"));
    assert!(n >= 1, "{w}");
    // Following the advice, it fits.
    let mb = format!("nodes.update.params.minibatch={n}");
    let (p, d) = sd3(&[lora, h, wd, &mb]);
    assert!(warning(&d).is_none(), "{d}");
    let fitted = nodes::checks::memory::estimate(&p).unwrap();
    assert!(fitted.bytes < est.bytes);
    // Per-sample figures scale with the batch the update holds.
    let mb2 = format!("nodes.update.params.minibatch={}", n + 1);
    let (p2, _) = sd3(&[lora, h, wd, &mb2]);
    let more = nodes::checks::memory::estimate(&p2).unwrap();
    assert!(more.bytes > fitted.bytes);
}
