//! Cross-checks against the PyTorch reference peer (`bench/reference/`): runs
//! `bench/reference/check.py` with this build's `flowrun` binary. The script compares the
//! velocity of the same weights and inputs (`flowrun velocity` vs the reference model), the
//! stored old log-probs and advantages of a short TAFS-GRPO run, and one replayed GRPO update.
//!
//! Needs a Python with torch, numpy and safetensors (and pyarrow for the trajectory part):
//! `$FLOWRUN_PYTHON`, else `.venv/bin/python`, else `python3`. Without one the test prints a
//! NOTICE and passes.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{bin, root, text, tmpdir};

/// The first Python that can import torch, numpy and safetensors.
fn python() -> Option<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(p) = std::env::var_os("FLOWRUN_PYTHON") {
        candidates.push(PathBuf::from(p));
    }
    candidates.push(root().join(".venv/bin/python"));
    candidates.push(PathBuf::from("python3"));
    candidates.into_iter().find(|py| {
        Command::new(py)
            .args(["-c", "import torch, numpy, safetensors"])
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

#[test]
fn should_match_the_pytorch_reference() {
    let Some(py) = python() else {
        eprintln!(
            "NOTICE: no Python with torch, numpy and safetensors (set FLOWRUN_PYTHON or create \
             .venv, see README \"Running on libtorch\"); skipping the PyTorch reference checks"
        );
        return;
    };
    // Make sure the binary under test is the one `velocity` and the pipeline run use.
    let flowrun = bin().get_program().to_owned();
    let work = tmpdir("reference");
    let o = Command::new(&py)
        .arg(root().join("bench/reference/check.py"))
        .arg("--flowrun")
        .arg(&flowrun)
        .arg("--work")
        .arg(&work)
        .current_dir(root())
        .output()
        .expect("running bench/reference/check.py");
    let out = text(&o);
    println!("{out}");
    assert!(
        o.status.success(),
        "bench/reference/check.py failed ({}):\n{out}",
        o.status
    );
    assert!(out.contains("all reference checks passed"), "{out}");
    let _ = std::fs::remove_dir_all(&work);
}
