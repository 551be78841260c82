//! End-to-end tests of trajectory storage: `trajectory_sink` writes one Parquet file per
//! iteration through the real binary, files survive a SIGKILL, and `parquet_source` replays
//! them into `grpo_update`.

mod common;
use common::{bin, metrics, root, run_new, text, tmpdir};

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nodes::trajectory_sink::arrow::array::{
    Array, BooleanArray, FixedSizeListArray, Float32Array, StringArray, UInt32Array, UInt64Array,
};
use nodes::trajectory_sink::arrow::datatypes::DataType;
use nodes::trajectory_sink::arrow::record_batch::RecordBatch;
use nodes::trajectory_sink::read_file;

/// The tiny pipeline: P = 4 prompts × G = 4 samples, K = 3 predictions → 2 transitions.
const P: usize = 4;
const G: usize = 4;
const K: usize = 3;
const ROWS: usize = P * G * (K - 1);

/// tests/pipelines/valid-tafs-tiny.yaml with a trajectory_sink (and an on-policy update:
/// one minibatch, one epoch) written into `dir`.
fn tiny_with_sink(dir: &Path, tensors: &str) -> PathBuf {
    let base = fs::read_to_string(root().join("tests/pipelines/valid-tafs-tiny.yaml")).unwrap();
    let yaml = format!(
        "{}  - id: sink\n    type: trajectory_sink\n    params: {{tensors: {tensors}}}\n    inputs:\n      transitions: renoise@*.transition\n      rewards: score@*.rewards\n      advantages: advantages.advantages\n      prompts: prompts.prompts\n",
        base.replace("epochs: 2, minibatch: 8", "epochs: 1, minibatch: 0")
    );
    let p = dir.join("tiny-sink.yaml");
    fs::write(&p, yaml).unwrap();
    p
}

/// A replay of `traj` with the tiny model of the same seed (so its initial weights are the
/// ones that sampled iteration 1).
fn replay_pipeline(dir: &Path, traj: &Path) -> PathBuf {
    let yaml = format!(
        "name: replay_tiny\nseed: 7\niterations: 2\ncheckpoint_every: 1\nkeep_checkpoints: 5\nresources:\n  policy:\n    type: flow_model\n    params: {{size: tiny, lr: 3.0e-3, sample_with: current, reference: true}}\nnodes:\n  - id: replay\n    type: parquet_source\n    params: {{dir: {}, batch: 0, shuffle: false}}\n  - repeat:\n      id: step\n      count: {}\n      nodes:\n        - id: pick\n          type: trajectory_step\n          inputs: {{trajectories: replay.trajectories}}\n  - id: update\n    type: grpo_update\n    uses: [policy]\n    params: {{clip_range: 0.2, beta: 0.01, epochs: 1, minibatch: 0}}\n    inputs:\n      transitions: pick@*.transition\n      advantages: replay.advantages\n      prompts: replay.prompts\n",
        serde_json::to_string(&traj.display().to_string()).unwrap(),
        K - 1
    );
    let p = dir.join("replay-tiny.yaml");
    fs::write(&p, yaml).unwrap();
    p
}

fn parquet_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy().into_owned();
            n.ends_with(".parquet") && !n.starts_with('.')
        })
        .collect();
    v.sort();
    v
}

fn hidden_files(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect()
}

fn col<'a, T: 'static>(b: &'a RecordBatch, name: &str) -> &'a T {
    b.column_by_name(name)
        .unwrap_or_else(|| panic!("no column {name}"))
        .as_any()
        .downcast_ref::<T>()
        .unwrap_or_else(|| {
            panic!(
                "column {name} has type {:?}",
                b.column_by_name(name).unwrap().data_type()
            )
        })
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol
}

const COLUMNS: [&str; 29] = [
    "run_id",
    "iteration",
    "prompt_id",
    "prompt",
    "category",
    "group",
    "sample",
    "member",
    "step",
    "t",
    "t_next",
    "temperature",
    "reward",
    "reward_before",
    "advantage",
    "trained",
    "old_logprob",
    "kl",
    "sampler",
    "cfg",
    "kernel_a",
    "kernel_b",
    "kernel_std",
    "crit_objects",
    "crit_count",
    "crit_color",
    "crit_position",
    "crit_no_extra",
    "correct",
];

/// Check one file's layout and its values against the iteration's logged metrics.
fn check_file(path: &Path, run_dir: &Path, row: &serde_json::Value, tensors: Option<DataType>) {
    let b = read_file(path).unwrap();
    let it = row["iteration"].as_u64().unwrap();
    assert_eq!(b.num_rows(), ROWS, "{}", path.display());
    let names: Vec<String> = b
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    let mut expected: Vec<String> = COLUMNS.iter().map(|s| s.to_string()).collect();
    if tensors.is_some() {
        expected.extend(["x_t".to_string(), "x_next".to_string()]);
    }
    assert_eq!(names, expected);
    let run_id = run_dir.file_name().unwrap().to_string_lossy().into_owned();
    let iteration = col::<UInt64Array>(&b, "iteration");
    let step = col::<UInt32Array>(&b, "step");
    let sample = col::<UInt32Array>(&b, "sample");
    let group = col::<UInt32Array>(&b, "group");
    let member = col::<UInt32Array>(&b, "member");
    let reward = col::<Float32Array>(&b, "reward");
    let before = col::<Float32Array>(&b, "reward_before");
    let adv = col::<Float32Array>(&b, "advantage");
    let olp = col::<Float32Array>(&b, "old_logprob");
    let tau = col::<Float32Array>(&b, "temperature");
    let t = col::<Float32Array>(&b, "t");
    let kl = col::<Float32Array>(&b, "kl");
    assert_eq!(kl.null_count(), ROWS, "kl is not known at sampling time");
    assert!(
        col::<StringArray>(&b, "run_id")
            .iter()
            .all(|v| v == Some(run_id.as_str()))
    );
    assert!(
        col::<StringArray>(&b, "sampler")
            .iter()
            .all(|v| v == Some("tafs"))
    );
    // brightness reward: no verifier criteria.
    assert_eq!(col::<BooleanArray>(&b, "crit_count").null_count(), ROWS);
    assert_eq!(col::<BooleanArray>(&b, "correct").null_count(), ROWS);
    let mut sums = [0f64; K];
    let mut abs_adv = 0f64;
    for r in 0..ROWS {
        assert_eq!(iteration.value(r), it);
        let (i, k) = (sample.value(r) as usize, step.value(r) as usize);
        assert_eq!((i, k), (r / (K - 1), r % (K - 1) + 1), "sample-major rows");
        assert_eq!(group.value(r) as usize, i / G);
        assert_eq!(member.value(r) as usize, i % G);
        assert!(olp.value(r).is_finite());
        assert!(!before.is_null(r));
        sums[k] += reward.value(r) as f64;
        if k == 1 {
            sums[0] += before.value(r) as f64;
        }
        abs_adv += adv.value(r).abs() as f64;
        let tk = [1.0f32, 0.66][k - 1];
        assert!((t.value(r) - tk).abs() < 1e-6);
        let tau_logged = row[format!("renoise@{k}/tau")].as_f64().unwrap();
        assert!(close(tau.value(r) as f64, tau_logged, 1e-6));
    }
    for (k, s) in sums.iter().enumerate() {
        let mean = s / (P * G) as f64;
        let logged = row[format!("score@{}/reward_mean", k + 1)]
            .as_f64()
            .unwrap();
        assert!(
            close(mean, logged, 1e-5),
            "iteration {it}, prediction {}: file mean {mean}, logged {logged}",
            k + 1
        );
    }
    let logged = row["advantages/abs_mean"].as_f64().unwrap();
    assert!(close(abs_adv / ROWS as f64, logged, 1e-5));
    if let Some(vt) = tensors {
        for name in ["x_t", "x_next"] {
            let field = b.schema().field_with_name(name).unwrap().clone();
            assert_eq!(
                field
                    .metadata()
                    .get("ARROW:extension:name")
                    .map(String::as_str),
                Some("arrow.fixed_shape_tensor")
            );
            assert_eq!(
                field
                    .metadata()
                    .get("ARROW:extension:metadata")
                    .map(String::as_str),
                Some(r#"{"shape":[3,32,32],"dim_names":["C","H","W"]}"#)
            );
            let l = col::<FixedSizeListArray>(&b, name);
            assert_eq!(l.value_length(), 3072);
            assert_eq!(l.value_type(), vt);
        }
    }
}

/// Run tests/python/check_parquet.py when pyarrow, polars and pandas are importable.
fn python_check(run_dir: &Path, tensors: &str) {
    let ok = Command::new("python3")
        .args(["-c", "import pyarrow, polars, pandas"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!(
            "SKIP python check: python3 with pyarrow, polars and pandas not available (pip install pyarrow polars pandas)"
        );
        return;
    }
    let o = Command::new("python3")
        .arg(root().join("tests/python/check_parquet.py"))
        .arg(run_dir)
        .args(["--tensors", tensors, "--rows", &ROWS.to_string()])
        .output()
        .unwrap();
    assert!(o.status.success(), "check_parquet.py failed:\n{}", text(&o));
}

#[test]
fn should_write_one_parquet_file_per_iteration_matching_the_logged_metrics() {
    let dir = tmpdir("write");
    let p = tiny_with_sink(&dir, "f16");
    let rd = run_new(&p, &dir.join("runs"), &["iterations=3"]);
    let traj = rd.join("trajectories");
    let files = parquet_files(&traj);
    let names: Vec<String> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "iter-000001.parquet",
            "iter-000002.parquet",
            "iter-000003.parquet"
        ]
    );
    assert!(hidden_files(&traj).is_empty(), "{:?}", hidden_files(&traj));
    let rows = metrics(&rd);
    assert_eq!(rows.len(), 3);
    for (f, row) in files.iter().zip(&rows) {
        check_file(f, &rd, row, Some(DataType::Float16));
    }
    python_check(&rd, "f16");
    // The node's documentation lists the columns.
    let o = bin().args(["nodes", "trajectory_sink"]).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    for c in COLUMNS {
        assert!(text(&o).contains(c), "doc lacks column {c}");
    }
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn should_leave_only_complete_files_when_killed_and_resume_to_the_end() {
    let dir = tmpdir("kill");
    let p = tiny_with_sink(&dir, "f32");
    let runs = dir.join("runs");
    let total = 7;
    let mut child = bin()
        .arg(&p)
        .arg("--runs-dir")
        .arg(&runs)
        .arg("--quiet")
        .args([
            "--set",
            &format!("iterations={total}"),
            "--set",
            "checkpoint_every=2",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill (SIGKILL, no chance to clean up) once 3 files exist: mid-run, right after a
    // file and during iteration 4's work.
    let t0 = Instant::now();
    let rd = loop {
        if let Ok(mut e) = fs::read_dir(&runs)
            && let Some(Ok(d)) = e.next()
        {
            let traj = d.path().join("trajectories");
            if traj.is_dir() && parquet_files(&traj).len() >= 3 {
                break d.path();
            }
        }
        if let Ok(Some(s)) = child.try_wait() {
            panic!("the run ended ({s}) before it could be killed");
        }
        assert!(t0.elapsed() < Duration::from_secs(600), "run too slow");
        std::thread::sleep(Duration::from_millis(20));
    };
    let pid = child.id().to_string();
    let killed = Command::new("kill").args(["-9", &pid]).status();
    if !killed.is_ok_and(|s| s.success()) {
        child.kill().unwrap(); // SIGKILL as well
    }
    let status = child.wait().unwrap();
    assert!(!status.success(), "the run finished before the kill");
    let traj = rd.join("trajectories");
    let files = parquet_files(&traj);
    assert!(files.len() >= 3 && files.len() < total, "{files:?}");
    for f in &files {
        let b = read_file(f).unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(b.num_rows(), ROWS);
    }
    // Resume and finish.
    let o = bin()
        .args(["run", "--resume"])
        .arg(&rd)
        .arg("--quiet")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let files = parquet_files(&traj);
    assert_eq!(files.len(), total, "{files:?}");
    assert!(hidden_files(&traj).is_empty(), "{:?}", hidden_files(&traj));
    let rows = metrics(&rd);
    assert_eq!(rows.len(), total);
    for (f, row) in files.iter().zip(&rows) {
        check_file(f, &rd, row, Some(DataType::Float32));
    }
    python_check(&rd, "f32");
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn should_replay_stored_trajectories_reproducing_the_on_policy_loss() {
    let dir = tmpdir("replay");
    let p = tiny_with_sink(&dir, "f32");
    let src = run_new(&p, &dir.join("runs"), &["iterations=2"]);
    let src_rows = metrics(&src);
    let rp = replay_pipeline(&dir, &src.join("trajectories"));
    let rd = run_new(&rp, &dir.join("replay-runs"), &[]);
    let rows = metrics(&rd);
    assert_eq!(rows.len(), 2);
    let get = |r: &serde_json::Value, k: &str| {
        r[k].as_f64()
            .unwrap_or_else(|| panic!("no metric {k} in {r}"))
    };
    // Iteration 1 replays iteration 1's samples with the weights that sampled them: the
    // first (only) minibatch is on-policy, ratio 1, and the loss is the logged one.
    let (a, b) = (&rows[0], &src_rows[0]);
    assert_eq!(get(a, "replay/source_iteration"), 1.0);
    assert!(close(get(a, "update/ratio_min"), 1.0, 1e-4), "{a}");
    assert!(close(get(a, "update/ratio_max"), 1.0, 1e-4), "{a}");
    for k in ["update/loss", "update/pg_loss", "update/kl"] {
        assert!(
            close(get(a, k), get(b, k), 1e-5 + 1e-4 * get(b, k).abs()),
            "{k}: replay {} vs sampled {}",
            get(a, k),
            get(b, k)
        );
    }
    assert!(close(
        get(a, "replay/reward_mean"),
        get(b, "score@3/reward_mean"),
        1e-5
    ));
    assert_eq!(get(&rows[1], "replay/source_iteration"), 2.0);
    // The update changed the model.
    let model = |it: u64| {
        fs::read(rd.join(format!(
            "checkpoints/iter-{it:06}/resources/policy/model.safetensors"
        )))
        .unwrap()
    };
    assert_ne!(model(1), model(2), "the replay did not change the model");

    // Errors name the file: a corrupt file, then files without tensor columns.
    let bad = dir.join("bad");
    fs::create_dir_all(&bad).unwrap();
    fs::copy(
        src.join("trajectories/iter-000001.parquet"),
        bad.join("iter-000001.parquet"),
    )
    .unwrap();
    fs::write(bad.join("iter-000002.parquet"), b"PAR1 not really").unwrap();
    let rp = replay_pipeline(&bad, &bad);
    let o = bin()
        .arg(&rp)
        .arg("--runs-dir")
        .arg(dir.join("bad-runs"))
        .arg("--quiet")
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(text(&o).contains("iter-000002.parquet"), "{}", text(&o));
    let none = dir.join("none");
    fs::create_dir_all(&none).unwrap();
    let p = tiny_with_sink(&none, "none");
    let nd = run_new(&p, &none.join("runs"), &["iterations=1"]);
    let rp = replay_pipeline(&none, &nd.join("trajectories"));
    let o = bin()
        .arg(&rp)
        .arg("--runs-dir")
        .arg(none.join("replay-runs"))
        .arg("--quiet")
        .output()
        .unwrap();
    assert!(!o.status.success());
    let t = text(&o);
    assert!(
        t.contains("iter-000001.parquet") && t.contains("tensor"),
        "{t}"
    );
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn should_read_back_columns_per_step_in_a_stable_order() {
    // Column set is the same for every tensor mode except the two tensor columns.
    let s = nodes::trajectory_sink::schema(nodes::trajectory_sink::TensorMode::None);
    let names: Vec<&str> = s.fields().iter().map(|f| f.name().as_str()).collect();
    assert_eq!(names, COLUMNS);
    let s = nodes::trajectory_sink::schema(nodes::trajectory_sink::TensorMode::F16);
    let m: BTreeMap<_, _> = s
        .field_with_name("x_t")
        .unwrap()
        .metadata()
        .clone()
        .into_iter()
        .collect();
    assert_eq!(m["ARROW:extension:name"], "arrow.fixed_shape_tensor");
}
