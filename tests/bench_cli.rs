//! `flowrun bench`: the report's structure and its error messages. Never asserts a speed.

mod common;
use common::{bin, root, text, tmpdir};

use serde_json::Value;

/// Every number in `v` must be finite (NaN would have become `null`, so no `null` either,
/// except in the header's optional fields) and, outside `fits` and `header`, positive.
fn check_figures(v: &Value, path: &str, positive: bool, problems: &mut Vec<String>) {
    match v {
        Value::Null if !path.starts_with("header") => problems.push(format!("{path} is null")),
        Value::Number(n) => {
            let x = n.as_f64().unwrap_or(f64::NAN);
            if !x.is_finite() {
                problems.push(format!("{path} = {x} is not finite"));
            } else if positive && x <= 0.0 {
                problems.push(format!("{path} = {x} is not positive"));
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                check_figures(x, &format!("{path}[{i}]"), positive, problems);
            }
        }
        Value::Object(o) => {
            for (k, x) in o {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                let positive = positive && k != "fits" && k != "header";
                check_figures(x, &p, positive, problems);
            }
        }
        _ => {}
    }
}

fn numbers(v: &Value) -> Vec<u64> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

#[test]
fn should_write_a_complete_quick_report_on_flex() {
    let dir = tmpdir("bench-quick");
    let out = dir.join("bench.json");
    let o = bin()
        .current_dir(root())
        .args([
            "bench",
            "--quick",
            "--device",
            "flex",
            "--repeats",
            "2",
            "--json",
        ])
        .arg(&out)
        .output()
        .unwrap();
    let log = text(&o);
    assert!(o.status.success(), "{log}");
    for s in [
        "== flex ==",
        "matmul peak",
        "rollout (TAFS",
        "GRPO update",
        "fits (least squares",
        "width (",
    ] {
        assert!(log.contains(s), "no `{s}` in the table:\n{log}");
    }
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();

    let mut problems = Vec::new();
    check_figures(&r, "", true, &mut problems);
    assert!(problems.is_empty(), "{problems:#?}\n{r:#}");

    // Header: when, where, what.
    let h = &r["header"];
    let date = h["date_utc"].as_str().unwrap();
    assert_eq!(date.len(), 19, "{date}");
    assert_eq!(&date[4..5], "-", "{date}");
    let cmd = h["command"].as_str().unwrap();
    assert!(cmd.contains("bench --quick --device flex"), "{cmd}");
    assert!(!h["cpu_model"].as_str().unwrap().is_empty());
    assert!(h["cores"].as_u64().unwrap() >= 1);
    assert!(h["git_commit"].is_string() || h["git_commit"].is_null());
    assert!(h["load_average_start"].is_array() || h["load_average_start"].is_null());

    // Settings and model.
    let s = &r["settings"];
    assert_eq!(numbers(&s["steps"]), [1, 2]);
    assert_eq!(numbers(&s["batches"]), [8, 16]);
    assert_eq!(s["repeats"], 2);
    let m = &r["model"];
    let f = &m["forward_flops_per_sample"];
    let sum = ["conv", "linear", "attention"]
        .iter()
        .map(|k| f[k].as_f64().unwrap())
        .sum::<f64>();
    assert!(
        (sum - f["total"].as_f64().unwrap()).abs() <= 1e-9 * sum,
        "{f}"
    );
    assert!(m["params"].as_u64().unwrap() > 0);

    // One device, every configuration measured.
    let devs = r["devices"].as_array().unwrap();
    assert_eq!(devs.len(), 1);
    let d = &devs[0];
    assert_eq!(d["device"], "flex");
    assert!(d["matmul"]["gflops"].as_f64().unwrap() > 0.0);
    assert_eq!(
        d["matmul"]["timing"]["runs_ms"].as_array().unwrap().len(),
        2
    );
    let rollout = d["rollout"].as_array().unwrap();
    let mut pairs: Vec<(u64, u64)> = rollout
        .iter()
        .map(|e| (e["k"].as_u64().unwrap(), e["batch"].as_u64().unwrap()))
        .collect();
    pairs.sort();
    assert_eq!(pairs, [(1, 8), (1, 16), (2, 8), (2, 16)]);
    for e in rollout {
        assert_eq!(e["runs_ms"].as_array().unwrap().len(), 2, "{e}");
        for k in ["median_ms", "samples_per_s", "gflops", "peak_fraction"] {
            assert!(e[k].is_number(), "{k} missing in {e}");
        }
    }
    // The update needs a transition: K ≥ 2 only.
    let update = d["update"].as_array().unwrap();
    assert_eq!(update.len(), 2, "{update:#?}");
    for e in update {
        assert_eq!(e["k"], 2);
        assert_eq!(e["transitions"], 1);
        assert!(e["optimizer_steps"].as_u64().unwrap() >= 1);
        for k in ["median_ms", "ms_per_sample_step", "gflops", "peak_fraction"] {
            assert!(e[k].is_number(), "{k} missing in {e}");
        }
    }
    let widths = d["width"].as_array().unwrap();
    assert_eq!(
        widths
            .iter()
            .map(|w| w["base_width"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [8, 16]
    );
    // Fits: a line per K against the batch, per batch against K, and against width.
    let fits = &d["fits"];
    assert_eq!(fits["rollout_vs_batch"].as_array().unwrap().len(), 2);
    assert_eq!(fits["rollout_vs_k"].as_array().unwrap().len(), 2);
    assert_eq!(fits["update_vs_batch"].as_array().unwrap().len(), 1);
    for k in ["rollout_vs_sample_steps", "update_vs_sample_steps", "width"] {
        assert!(fits[k].is_object(), "{k} missing in {fits:#}");
    }
    for w in ["rollout", "update"] {
        assert!(
            fits["width"][w]["slope_ms_per_channel"].is_number(),
            "{fits:#}"
        );
    }
    // Ratios need a second device.
    assert_eq!(r["ratios"].as_array().unwrap().len(), 0);
    let _ = std::fs::remove_dir_all(&dir);
}

fn fails_with(args: &[&str], want: &str) {
    let o = bin().current_dir(root()).args(args).output().unwrap();
    let log = text(&o);
    assert!(!o.status.success(), "{args:?} succeeded:\n{log}");
    assert!(log.contains(want), "no `{want}` in:\n{log}");
    assert!(
        !log.contains("internal error") && !log.contains("panicked"),
        "{log}"
    );
}

#[test]
fn should_reject_an_unknown_device_clearly() {
    fails_with(
        &["bench", "--quick", "--device", "cuda"],
        "unknown device `cuda`",
    );
    if !cfg!(feature = "tch") {
        fails_with(
            &[
                "bench", "--quick", "--device", "flex", "--device", "libtorch",
            ],
            "--features tch",
        );
    }
}

#[test]
fn should_name_a_missing_checkpoint_and_json_directory() {
    fails_with(
        &[
            "bench",
            "--quick",
            "--checkpoint",
            "no/such/model.safetensors",
        ],
        "checkpoint no/such/model.safetensors not found",
    );
    fails_with(
        &["bench", "--quick", "--json", "no/such/dir/bench.json"],
        "directory no/such/dir does not exist",
    );
    fails_with(
        &["bench", "--quick", "--repeats", "0"],
        "--repeats must be at least 1",
    );
}

/// A tiny SD3 transformer folder written by flowrun itself (seeded weights, patch 2,
/// 16 latent channels, 8×8 latents): no Python needed.
fn tiny_sd3_folder(dir: &std::path::Path) -> std::path::PathBuf {
    use burn::tensor::Device;
    use nodes::model::sd3::{ExportDtype, Sd3Config, save_diffusers};
    let cfg = Sd3Config {
        sample_size: 8,
        patch_size: 2,
        in_channels: 16,
        out_channels: Some(16),
        num_layers: 2,
        pos_embed_max_size: Some(8),
        ..Sd3Config::tiny()
    };
    let out = dir.join("transformer");
    save_diffusers(&cfg.init(&Device::flex(), 3), &out, ExportDtype::F32).unwrap();
    out
}

/// `flowrun bench --sd3`: one TAFS-GRPO configuration on a tiny model, every figure in the
/// JSON; then the memory probe. Seconds.
#[test]
fn should_time_a_tiny_sd3_iteration_and_probe_its_memory() {
    let dir = tmpdir("bench-sd3");
    let model = tiny_sd3_folder(&dir);
    let out = dir.join("sd3.json");
    let o = bin()
        .current_dir(root())
        .args(["bench", "--sd3"])
        .arg(&model)
        .args([
            "--device",
            "flex",
            "--steps",
            "3",
            "--batches",
            "4",
            "--repeats",
            "2",
            "--text-tokens",
            "5",
            "--json",
        ])
        .arg(&out)
        .output()
        .unwrap();
    let log = text(&o);
    assert!(o.status.success(), "{log}");
    for s in [
        "== flex",
        "rollout ms/s",
        "update ms/s",
        "peak resident set",
    ] {
        assert!(log.contains(s), "no `{s}` in:\n{log}");
    }
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(r["mode"], "sd3");
    let s = &r["settings"];
    assert_eq!(numbers(&s["steps"]), [3]);
    assert_eq!(numbers(&s["batches"]), [4]);
    assert_eq!(s["cfg"], 4.5);
    assert_eq!(s["text_tokens"], 5);
    let m = &r["model"];
    assert_eq!(m["image_tokens"], 16);
    assert_eq!(m["rows_per_sample"], 2.0);
    assert!(m["params"].as_u64().unwrap() > 0);
    let d = &r["devices"][0];
    assert_eq!(d["device"], "flex");
    let c = &d["configs"][0];
    assert_eq!((c["k"].as_u64(), c["batch"].as_u64()), (Some(3), Some(4)));
    // The schedule is the pipeline's: flow-match sigmas chaining from 1 to 0.
    let sched = c["schedule"].as_array().unwrap();
    assert_eq!(sched.len(), 3);
    assert_eq!(sched[0][0], 1.0);
    assert_eq!(sched[2][1], 0.0);
    let mut problems = Vec::new();
    for k in ["rollout", "update", "iteration", "rollout_forward"] {
        assert_eq!(c[k]["runs_ms"].as_array().unwrap().len(), 2, "{k}: {c:#}");
        check_figures(&c[k], k, true, &mut problems);
    }
    for k in ["forward", "reference", "backward", "optimizer"] {
        check_figures(&c["update_breakdown"][k], k, true, &mut problems);
    }
    check_figures(&c["per_sample_ms"], "per_sample_ms", true, &mut problems);
    assert!(problems.is_empty(), "{problems:#?}");
    // The update's peak memory per sample (Linux: VmHWM after a reset), with its bytes.
    if cfg!(target_os = "linux") {
        let per = c["update_peak_mib_per_sample"].as_f64().unwrap();
        let bytes = c["update_peak_bytes"].as_f64().unwrap();
        assert!(
            per > 0.0 && (per * 4.0 * 1048576.0 - bytes).abs() < 1.0,
            "{c:#}"
        );
    }
    let it = c["iteration"]["median_ms"].as_f64().unwrap();
    let parts =
        c["rollout"]["median_ms"].as_f64().unwrap() + c["update"]["median_ms"].as_f64().unwrap();
    assert!(it <= parts * 1.0001 + 1e-9, "{it} vs {parts}");
    assert!(r["peak_rss_kib"].as_u64().unwrap() > 0);

    let out = dir.join("probe.json");
    let o = bin()
        .current_dir(root())
        .args(["bench", "--sd3"])
        .arg(&model)
        .args([
            "--device",
            "flex",
            "--memory-probe",
            "--probe-rows",
            "2",
            "--json",
        ])
        .arg(&out)
        .output()
        .unwrap();
    let log = text(&o);
    assert!(o.status.success(), "{log}");
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let probes = r["probes"].as_array().unwrap();
    // Three kinds of block at two latent sizes (the model's, 8, and 1.5×, 12).
    assert_eq!(probes.len(), 6, "{r:#}");
    for p in probes {
        let g = p["graph_bytes"].as_array().unwrap();
        let (a, b) = (g[0].as_u64().unwrap(), g[1].as_u64().unwrap());
        // Four blocks hold more than two.
        assert!(b > a && a > 0, "{p}");
    }
    let kinds: Vec<&str> = probes
        .iter()
        .map(|p| p["block"].as_str().unwrap())
        .collect();
    assert!(kinds.contains(&"SD3.5 dual"), "{kinds:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn should_name_a_missing_sd3_folder() {
    fails_with(
        &["bench", "--sd3", "no/such/model"],
        "no/such/model: not a directory",
    );
    fails_with(&["bench", "--embeddings", "x.safetensors"], "--sd3");
}
