//! The run directory under damage and misuse (issue 16): a damaged `latest`, two processes on
//! one run, a full disk while appending metrics, resume advice after damage, flipped bits in
//! checkpoints, kill -9 during checkpoint writes and resumes. Each runs the real binary on the
//! tiny TAFS pipeline.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{bin, metrics, only_run_dir, root, run_new, run_with_file_size_limit, text, tmpdir};

/// The tiny TAFS pipeline with a Parquet sink, a checkpoint every iteration and all of them
/// kept, small batches.
fn pipeline(dir: &Path) -> PathBuf {
    let base = fs::read_to_string(root().join("tests/pipelines/valid-tafs-tiny.yaml")).unwrap();
    let yaml = format!(
        "{}  - id: sink\n    type: trajectory_sink\n    inputs:\n      transitions: renoise@*.transition\n      rewards: score@*.rewards\n      advantages: advantages.advantages\n      prompts: prompts.prompts\n",
        base.replace(
            "checkpoint_every: 6",
            "checkpoint_every: 1\nkeep_checkpoints: 100"
        )
        .replace(
            "prompts_per_iter: 4, group_size: 4",
            "prompts_per_iter: 2, group_size: 4"
        )
        .replace("epochs: 2, minibatch: 8", "epochs: 1, minibatch: 0")
    );
    let p = dir.join("tiny.yaml");
    fs::write(&p, yaml).unwrap();
    p
}

fn resume(rd: &Path, set: &[&str]) -> Output {
    let mut c = bin();
    c.args(["run", "--resume"]).arg(rd).arg("--quiet");
    for s in set {
        c.args(["--set", s]);
    }
    c.output().unwrap()
}

fn iterations(rd: &Path) -> Vec<u64> {
    metrics(rd)
        .iter()
        .map(|r| r["iteration"].as_u64().unwrap())
        .collect()
}

fn names(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir)
        .map(|e| {
            e.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Every file under `dir` with its bytes (to show that nothing changed).
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().is_some_and(|n| n != ".lock") {
                out.push((p.clone(), fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// Every line of a JSON Lines file parses.
fn assert_json_lines(path: &Path) {
    if let Ok(t) = fs::read_to_string(path) {
        for (i, l) in t.lines().enumerate() {
            serde_json::from_str::<serde_json::Value>(l)
                .unwrap_or_else(|e| panic!("{} line {}: {e}: {l:?}", path.display(), i + 1));
        }
    }
}

#[test]
fn should_resume_from_the_newest_checkpoint_that_verifies_when_latest_is_damaged() {
    let dir = tmpdir("rd-latest");
    let p = pipeline(&dir);
    let rd = run_new(&p, &dir.join("runs"), &["iterations=4"]);
    let ck = rd.join("checkpoints");
    let traj = rd.join("trajectories");
    assert_eq!(names(&traj).len(), 4);
    // `latest` names nothing usable: fall back to the newest checkpoint (iter-4).
    for bad in ["iter-000099", "", "../../etc"] {
        fs::write(ck.join("latest"), bad).unwrap();
        let o = resume(&rd, &["iterations=4"]);
        assert!(o.status.success(), "{}", text(&o));
        assert!(
            text(&o).contains("resuming from iter-000004, the newest checkpoint that verifies"),
            "latest = {bad:?}: {}",
            text(&o)
        );
        assert_eq!(iterations(&rd), vec![1, 2, 3, 4], "latest = {bad:?}");
    }
    // The newest checkpoint is damaged too: continue from iter-3; what came after it moves
    // aside (checkpoint, Parquet file, metrics row), none of it is deleted or overwritten.
    fs::write(
        ck.join("iter-000004/state.json"),
        b"{\"iteration\": 4, \"nod",
    )
    .unwrap();
    fs::write(ck.join("latest"), "iter-000099").unwrap();
    let o = resume(&rd, &["iterations=5"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("resuming from iter-000003"),
        "{}",
        text(&o)
    );
    assert_eq!(iterations(&rd), vec![1, 2, 3, 4, 5]);
    let superseded: Vec<u64> = fs::read_to_string(rd.join("metrics.superseded.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["iteration"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(superseded, vec![4]);
    assert!(ck.join("_superseded/iter-000004/state.json").is_file());
    assert!(traj.join("_superseded/iter-000004.parquet").is_file());
    for it in 1..=5 {
        let c = ck.join(format!("iter-{it:06}"));
        runner::rundir::verify(&c).unwrap_or_else(|e| panic!("{e:#}"));
        assert!(traj.join(format!("iter-{it:06}.parquet")).is_file());
    }
    // No checkpoint verifies: refuse, change nothing.
    for it in 1..=5 {
        let f = ck.join(format!("iter-{it:06}/resources/policy/trainer.safetensors"));
        fs::write(&f, b"truncated").unwrap();
    }
    let before = snapshot(&rd);
    let o = resume(&rd, &["iterations=6"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let out = text(&o);
    assert!(
        out.contains("no checkpoint of") && out.contains("verifies"),
        "{out}"
    );
    assert!(
        out.contains("iter-000005") && out.contains("trainer.safetensors"),
        "{out}"
    );
    assert!(out.contains("nothing was changed"), "{out}");
    assert!(!out.contains("resume with"), "{out}");
    assert_eq!(
        snapshot(&rd),
        before,
        "a refused resume changed the run directory"
    );
    let _ = fs::remove_dir_all(&dir);
}

fn spawn_resume(rd: &Path, set: &[&str]) -> Child {
    let mut c = bin();
    c.args(["run", "--resume"]).arg(rd).arg("--quiet");
    for s in set {
        c.args(["--set", s]);
    }
    c.stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn kill9(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-9", &child.id().to_string()])
        .status();
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn should_let_one_process_at_a_time_write_a_run_directory() {
    let dir = tmpdir("rd-lock");
    let p = pipeline(&dir);
    let rd = run_new(&p, &dir.join("runs"), &["iterations=2"]);
    // A long resume holds the run directory …
    let mut first = spawn_resume(&rd, &["iterations=400"]);
    let lock = rd.join(".lock");
    let pid = first.id();
    wait_until("the first resume's lock", || {
        fs::read_to_string(&lock).is_ok_and(|t| t.starts_with(&format!("{pid}\n")))
    });
    // … so a second one exits at once, naming it, and changes nothing.
    let t0 = Instant::now();
    let o = resume(&rd, &["iterations=400"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains(&format!("is in use by process {pid}")),
        "{}",
        text(&o)
    );
    assert!(t0.elapsed() < Duration::from_secs(10));
    // A lock left by a killed process does not block the next resume.
    wait_until("the first resume's third iteration", || {
        iterations(&rd).len() >= 3
    });
    kill9(&mut first);
    let o = resume(&rd, &["iterations=5"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(iterations(&rd), vec![1, 2, 3, 4, 5]);
    assert_json_lines(&rd.join("metrics.superseded.jsonl"));
    let _ = fs::remove_dir_all(&dir);
}

#[cfg(unix)]
#[test]
fn should_name_the_file_and_keep_rows_whole_when_the_disk_fills() {
    let dir = tmpdir("rd-full");
    let p = pipeline(&dir);
    let runs = dir.join("runs");
    // Metrics rows are ~1 KB: the 4th or 5th row hits the cap; checkpoints only at the end.
    let o = run_with_file_size_limit(
        &p,
        &runs,
        4000,
        &[
            "iterations=12",
            "checkpoint_every=0",
            "nodes.sink.every=1000",
            // The event file (images, the pipeline's text) would hit the cap first.
            "logging.tensorboard=false",
        ],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let out = text(&o);
    assert!(
        out.contains("metrics.jsonl") && out.contains("metrics row"),
        "the error names the file and what was written: {out}"
    );
    let rd = only_run_dir(&runs);
    let raw = fs::read_to_string(rd.join("metrics.jsonl")).unwrap();
    assert!(raw.ends_with('\n'), "a partial row was left: {raw:?}");
    assert_json_lines(&rd.join("metrics.jsonl"));
    let rows = iterations(&rd);
    assert!(!rows.is_empty() && rows.len() < 12, "{rows:?}");
    // A row cut off by a crash of an older flowrun: dropped on resume, never moved into
    // metrics.superseded.jsonl.
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(rd.join("metrics.jsonl"))
        .unwrap();
    std::io::Write::write_all(&mut f, b"{\"iteration\": 99, \"a/lo").unwrap();
    drop(f);
    let o = resume(&rd, &["iterations=3", "checkpoint_every=0"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(iterations(&rd), vec![1, 2, 3]);
    assert_json_lines(&rd.join("metrics.jsonl"));
    assert_json_lines(&rd.join("metrics.superseded.jsonl"));
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn should_advise_only_a_checkpoint_that_verifies() {
    let dir = tmpdir("rd-advice");
    let p = pipeline(&dir);
    let rd = run_new(&p, &dir.join("runs"), &["iterations=3"]);
    let ck = rd.join("checkpoints");
    // The newest checkpoint is damaged, and the resume fails (a prompt file that is gone).
    fs::write(
        ck.join("iter-000003/resources/policy/trainer.safetensors"),
        b"x",
    )
    .unwrap();
    let o = resume(
        &rd,
        &[
            "iterations=6",
            "nodes.prompts.params.path=/nonexistent.jsonl",
        ],
    );
    let out = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(out.contains("cannot read prompt file"), "{out}");
    assert!(
        out.contains("the newest checkpoint that verifies is iter-000002; resume with:"),
        "{out}"
    );
    runner::rundir::verify(&ck.join("iter-000002")).unwrap();
    // With none that verifies, no resume is advised.
    fs::write(ck.join("iter-000002/state.json"), b"{").unwrap();
    fs::write(ck.join("iter-000001/state.json"), b"{").unwrap();
    let o = resume(&rd, &["iterations=6"]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(!out.contains("resume with"), "{out}");
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn should_refuse_a_checkpoint_with_one_flipped_bit() {
    let dir = tmpdir("rd-flip");
    let p = pipeline(&dir);
    let rd = run_new(&p, &dir.join("runs"), &["iterations=2"]);
    let model = rd.join("checkpoints/iter-000002/resources/policy/model.safetensors");
    let sample = |out: &Path| {
        bin()
            .args([
                "sample",
                "--prompt",
                "a red circle",
                "--steps",
                "1",
                "--checkpoint",
            ])
            .arg(&model)
            .arg("--out")
            .arg(out)
            .output()
            .unwrap()
    };
    let o = sample(&dir.join("ok.png"));
    assert!(o.status.success(), "{}", text(&o));
    let mut bytes = fs::read(&model).unwrap();
    let i = bytes.len() - 1000; // tensor data, not the header
    bytes[i] ^= 0x04;
    fs::write(&model, &bytes).unwrap();
    // `flowrun sample` refuses it, naming the file.
    let o = sample(&dir.join("bad.png"));
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("model.safetensors is damaged"),
        "{}",
        text(&o)
    );
    // So does a pipeline that starts from it.
    let o = bin()
        .arg(&p)
        .arg("--runs-dir")
        .arg(dir.join("runs2"))
        .arg("--quiet")
        .arg("--set")
        .arg(format!(
            "resources.policy.params.checkpoint={}",
            model.display()
        ))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("model.safetensors is damaged"),
        "{}",
        text(&o)
    );
    // A resume passes over it, to the checkpoint before.
    let o = resume(&rd, &["iterations=3"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("model.safetensors is damaged")
            && text(&o).contains("resuming from iter-000001"),
        "{}",
        text(&o)
    );
    assert_eq!(iterations(&rd), vec![1, 2, 3]);
    let _ = fs::remove_dir_all(&dir);
}

/// Checkpoints `latest` names while a run goes on, read as fast as possible.
fn watch_latest(ck: &Path, seen: &mut BTreeSet<String>) {
    if let Ok(n) = fs::read_to_string(ck.join("latest")) {
        seen.insert(n.trim().to_string());
    }
}

#[test]
fn should_keep_every_checkpoint_latest_named_sound_through_kill_9() {
    let dir = tmpdir("rd-kill");
    let p = pipeline(&dir);
    let rd = run_new(&p, &dir.join("runs"), &["iterations=1"]);
    let ck = rd.join("checkpoints");
    let mut seen = BTreeSet::new();
    watch_latest(&ck, &mut seen);
    let mut killed_in_write = 0;
    // Resume and kill -9 at once (during the resume's own start), then during checkpoint
    // writes (as soon as a temporary checkpoint directory appears).
    for round in 0..4 {
        let mut child = spawn_resume(&rd, &["iterations=40"]);
        if round == 0 {
            std::thread::sleep(Duration::from_millis(30));
        } else {
            let t0 = Instant::now();
            loop {
                watch_latest(&ck, &mut seen);
                if names(&ck).iter().any(|n| n.starts_with(".tmp-iter-")) {
                    killed_in_write += 1;
                    break;
                }
                if t0.elapsed() > Duration::from_secs(120) {
                    break;
                }
                if let Ok(Some(s)) = child.try_wait() {
                    panic!("the resume ended ({s}) before it could be killed");
                }
            }
        }
        kill9(&mut child);
        watch_latest(&ck, &mut seen);
        for name in &seen {
            let c = ck.join(name);
            if c.exists() {
                let v = runner::rundir::verify(&c)
                    .unwrap_or_else(|e| panic!("round {round}: {name}: {e:#}"));
                assert!(!v.unchecked, "{name} has no checksums");
            }
        }
    }
    assert!(killed_in_write > 0, "never caught a checkpoint write");
    // The run still finishes, one row per iteration, every checkpoint sound.
    let o = resume(&rd, &["iterations=8"]);
    assert!(o.status.success(), "{}", text(&o));
    let its = iterations(&rd);
    let n = its.len() as u64;
    assert_eq!(its, (1..=n).collect::<Vec<_>>());
    assert!(n >= 8, "{its:?}");
    for name in names(&ck) {
        if runner::rundir::checkpoint_iteration(&name).is_some() {
            runner::rundir::verify(&ck.join(&name)).unwrap_or_else(|e| panic!("{e:#}"));
        }
    }
    assert_json_lines(&rd.join("metrics.jsonl"));
    assert_json_lines(&rd.join("metrics.superseded.jsonl"));
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn should_leave_no_run_directory_when_a_new_run_fails_at_start() {
    let dir = tmpdir("rd-empty");
    let p = pipeline(&dir);
    let runs = dir.join("runs");
    let o = bin()
        .arg(&p)
        .arg("--runs-dir")
        .arg(&runs)
        .arg("--quiet")
        .args([
            "--set",
            "nodes.prompts.params.path=/nonexistent/prompts.jsonl",
        ])
        .output()
        .unwrap();
    assert!(!o.status.success(), "{}", text(&o));
    assert!(!text(&o).contains("run directory:"), "{}", text(&o));
    assert!(names(&runs).is_empty(), "{:?}", names(&runs));
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn should_keep_the_original_source_in_the_resolved_pipeline_on_resume() {
    let dir = tmpdir("rd-source");
    let p = pipeline(&dir);
    let rd = run_new(&p, &dir.join("runs"), &["iterations=1"]);
    let o = resume(&rd, &["iterations=2"]);
    assert!(o.status.success(), "{}", text(&o));
    let resolved = fs::read_to_string(rd.join("pipeline.yaml")).unwrap();
    assert!(
        resolved.contains(&format!("# source: {}\n", p.display())),
        "{resolved}"
    );
    assert!(resolved.contains("# --set iterations=1\n"), "{resolved}");
    assert!(
        resolved.contains("# --set iterations=2 (on resume)\n"),
        "{resolved}"
    );
    let _ = fs::remove_dir_all(&dir);
}
