//! TensorBoard event files (issue 22): a run's `tb/` directory read back with TensorBoard's own
//! reader (`EventAccumulator`, through `tests/python/check_tensorboard.py`) against its
//! `metrics.jsonl`; a resume leaves each step once, with the resumed value; the terminal's start
//! line; `logging` switches and errors.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{bin, metrics, python_with, root, run_new, text, tmpdir};

fn tiny() -> PathBuf {
    root().join("tests/pipelines/valid-tafs-tiny.yaml")
}

fn event_files(rd: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(rd.join("tb"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// Run the checker on `rd`; it must pass.
fn check(py: &Path, rd: &Path, image_steps: &[&str]) {
    let o = Command::new(py)
        .arg(root().join("tests/python/check_tensorboard.py"))
        .arg(rd)
        .arg("--image-steps")
        .args(image_steps)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("OK"),
        "{}",
        text(&o)
    );
}

#[test]
fn should_write_every_metric_image_histogram_and_the_pipeline_for_tensorboard() {
    let Some(py) = python_with(&["tensorboard"]) else {
        return;
    };
    let dir = tmpdir("tb-run");
    let rd = run_new(
        &tiny(),
        &dir.join("runs"),
        &["iterations=3", "logging.image_every=2"],
    );
    assert_eq!(event_files(&rd).len(), 1, "{:?}", event_files(&rd));
    check(&py, &rd, &["2"]);
    let _ = fs::remove_dir_all(dir);
}

#[test]
fn should_show_sample_evals_grids_as_the_pictures_it_writes() {
    let Some(py) = python_with(&["tensorboard"]) else {
        return;
    };
    let dir = tmpdir("tb-eval");
    // The tiny pipeline with an evaluation every 2 iterations (iterations 2 and 4).
    let pipeline = dir.join("eval.yaml");
    let mut yaml = fs::read_to_string(tiny()).unwrap();
    yaml.push_str(
        "  - id: eval\n    type: sample_eval\n    every: 2\n    uses: [policy]\n    \
         params: {steps: [1, 2], sampler: tafs, tau: 1.0, limit: 4, grid: 4}\n",
    );
    fs::write(&pipeline, yaml).unwrap();
    let rd = run_new(&pipeline, &dir.join("runs"), &["iterations=4"]);
    let o = Command::new(&py)
        .arg(root().join("tests/python/check_tensorboard.py"))
        .arg(&rd)
        .args(["--images", "0", "--eval-grids", "1", "2"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("grids: [1, 2]") && out.contains("OK"),
        "{}",
        text(&o)
    );
    let _ = fs::remove_dir_all(dir);
}

/// A full disk (files capped with RLIMIT_FSIZE) while the event file grows: the run fails with
/// one message naming the event file, and what was written before stays readable.
#[cfg(unix)]
#[test]
fn should_name_the_event_file_when_it_cannot_be_written() {
    let dir = tmpdir("tb-full");
    let runs = dir.join("runs");
    // The pipeline's text and the first iteration's images already pass 4000 bytes.
    let o = common::run_with_file_size_limit(
        &tiny(),
        &runs,
        4000,
        &[
            "iterations=6",
            "checkpoint_every=0",
            "logging.image_every=1",
        ],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let out = text(&o);
    let rd = common::only_run_dir(&runs);
    let files = event_files(&rd);
    assert_eq!(files.len(), 1, "{files:?}");
    let name = files[0].file_name().unwrap().to_string_lossy().to_string();
    assert!(
        out.contains(&name),
        "the error names the event file {name}: {out}"
    );
    assert!(!out.contains("panicked"), "{out}");
    assert_eq!(
        out.lines().filter(|l| l.contains(&name)).count(),
        1,
        "named once: {out}"
    );
    // Every metrics row written before it is whole.
    for r in metrics(&rd) {
        assert!(r["iteration"].is_number(), "{r}");
    }
    eprintln!("{out}");
    let _ = fs::remove_dir_all(dir);
}

#[test]
fn should_show_each_step_once_with_the_resumed_value_after_a_resume() {
    let Some(py) = python_with(&["tensorboard"]) else {
        return;
    };
    let dir = tmpdir("tb-resume");
    let rd = run_new(
        &tiny(),
        &dir.join("runs"),
        &[
            "iterations=4",
            "checkpoint_every=2",
            "logging.image_every=2",
        ],
    );
    let before = metrics(&rd);
    // Iteration 4's checkpoint is damaged: the resume continues from iteration 2, so
    // iterations 3 and 4 are in the first event file and again in the second.
    let ck = rd.join("checkpoints/iter-000004/state.json");
    fs::write(&ck, b"{\"iteration\": 4, \"nod").unwrap();
    let o = bin()
        .args(["run", "--resume"])
        .arg(&rd)
        .arg("--quiet")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let after = metrics(&rd);
    assert_eq!(after.len(), 4);
    // The re-run iterations' values differ from the superseded ones (their times at least),
    // so a reader showing the old ones fails the check below.
    assert_ne!(before[2]["iter_s"], after[2]["iter_s"]);
    assert_ne!(before[3]["elapsed_s"], after[3]["elapsed_s"]);
    let files = event_files(&rd);
    assert_eq!(
        files.len(),
        2,
        "one event file per part of the run: {files:?}"
    );
    check(&py, &rd, &["2", "4"]);
    let _ = fs::remove_dir_all(dir);
}

#[test]
fn should_write_no_event_file_when_tensorboard_is_off() {
    let dir = tmpdir("tb-off");
    let rd = run_new(
        &tiny(),
        &dir.join("runs"),
        &["iterations=1", "logging.tensorboard=false"],
    );
    assert!(!rd.join("tb").exists());
    assert_eq!(metrics(&rd).len(), 1);
    let _ = fs::remove_dir_all(dir);
}

#[test]
fn should_name_the_run_directory_and_how_to_watch_it_at_start_but_not_in_json() {
    let dir = tmpdir("tb-start");
    let runs = dir.join("runs");
    let o = bin()
        .arg(tiny())
        .args(["--set", "iterations=1", "--runs-dir"])
        .arg(&runs)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let rd = common::only_run_dir(&runs);
    let err = String::from_utf8_lossy(&o.stderr);
    let line = err
        .lines()
        .find(|l| l.starts_with("run directory: "))
        .unwrap_or_else(|| panic!("no start line: {err}"));
    assert!(
        line.contains(&format!("tensorboard --logdir {}", runs.display()))
            && line.contains(&format!("flowrun report {}", rd.display())),
        "{line}"
    );
    // `--log-format json`: every stderr line is a JSON record, the start among them.
    let o = bin()
        .arg(tiny())
        .args([
            "--set",
            "iterations=1",
            "--log-format",
            "json",
            "--runs-dir",
        ])
        .arg(dir.join("runs-json"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let mut started = false;
    for l in String::from_utf8_lossy(&o.stderr).lines() {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        started |= v["fields"]["message"] == "run started"
            && v["fields"]["event_file"]
                .as_str()
                .is_some_and(|f| f.contains("/tb/events.out.tfevents."));
    }
    assert!(started, "no `run started` record: {}", text(&o));
    let _ = fs::remove_dir_all(dir);
}

#[test]
fn should_name_the_key_at_fault_in_a_bad_logging_setting() {
    let dir = tmpdir("tb-bad");
    for (set, want) in [
        (
            "logging.tensorboard=yes please",
            "`tensorboard` of `logging` must be true or false",
        ),
        (
            "logging.image_every=0",
            "`image_every` of `logging` must be >= 1",
        ),
        ("logging.images=65", "`images` of `logging` must be <= 64"),
        ("logging.tensorbord=true", "did you mean `tensorboard`?"),
        ("logging=3", "`logging` of the pipeline must be a mapping"),
    ] {
        let o = bin()
            .arg(tiny())
            .args(["--set", set, "--runs-dir"])
            .arg(dir.join("runs"))
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2), "{set}: {}", text(&o));
        assert!(text(&o).contains(want), "{set}: {}", text(&o));
        assert!(!text(&o).contains("panicked"), "{}", text(&o));
    }
    assert!(!dir.join("runs").exists() || fs::read_dir(dir.join("runs")).unwrap().count() == 0);
    let _ = fs::remove_dir_all(dir);
}
