//! Data-parallel runs (issue 19): two processes over loopback on libtorch's c10d (Gloo), as
//! torchrun would start them, against one process on the whole batch. Needs a binary built
//! with `--features tch` (CI runs this file in its libtorch step).
#![cfg(feature = "tch")]

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{bin, metrics_without_timings, only_run_dir, root, text, tmpdir};
use nodes::model::weights::SafetensorsFile;

/// A free TCP port on loopback for the rendezvous store.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The tiny TAFS-GRPO pipeline with a trajectory sink, checkpointing every iteration (so the
/// replicas' weights are compared across ranks after every update).
fn tafs_pipeline(dir: &Path) -> PathBuf {
    let base = fs::read_to_string(root().join("tests/pipelines/valid-tafs-tiny.yaml")).unwrap();
    let text = format!(
        "{base}  - id: sink\n    type: trajectory_sink\n    inputs:\n      transitions: renoise@*.transition\n      rewards: score@*.rewards\n      advantages: advantages.advantages\n      prompts: prompts.prompts\n"
    );
    let p = dir.join("tafs-dist.yaml");
    fs::write(&p, text).unwrap();
    p
}

/// Pretraining of the tiny model: one flow-matching step of 8 images per iteration.
fn pretrain_pipeline(dir: &Path) -> PathBuf {
    let p = dir.join("pretrain-dist.yaml");
    fs::write(
        &p,
        "name: pretrain_tiny\nseed: 3\niterations: 3\ncheckpoint_every: 1\nkeep_checkpoints: 10\nresources:\n  model:\n    type: flow_model\n    params: {size: tiny, lr: 1.0e-3}\nnodes:\n  - id: train\n    type: flow_matching_train\n    uses: [model]\n    params: {batch: 8, steps: 1}\n",
    )
    .unwrap();
    p
}

/// `flowrun run` with these arguments as rank `rank` of `world` (None: no launcher variables).
fn command(args: &[&str], dist: Option<(usize, usize, u16)>) -> Command {
    let mut c = bin();
    c.arg("run").args(args).arg("--quiet");
    // One thread per process: two ranks share this machine's cores.
    c.env("RAYON_NUM_THREADS", "1").env("OMP_NUM_THREADS", "1");
    c.env_remove("WORLD_SIZE").env_remove("RANK");
    if let Some((rank, world, port)) = dist {
        c.env("RANK", rank.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .env("FLOWRUN_DIST_TIMEOUT_S", "60");
    }
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    c
}

/// Both ranks of a two-process run; their outputs in rank order.
fn run_two(args: &[&str]) -> Vec<Output> {
    let port = free_port();
    let children: Vec<Child> = (0..2)
        .map(|r| command(args, Some((r, 2, port))).spawn().unwrap())
        .collect();
    children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect()
}

fn assert_ok(outs: &[Output]) {
    for (r, o) in outs.iter().enumerate() {
        assert!(o.status.success(), "rank {r} failed:\n{}", text(o));
    }
}

/// Every tensor (as f32) of every safetensors file under `dir`, by file and tensor name.
fn tensors(dir: &Path) -> BTreeMap<String, Vec<f32>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "safetensors") {
                let f = SafetensorsFile::read(&p).unwrap();
                let file = p.strip_prefix(dir).unwrap().display().to_string();
                for name in f.names() {
                    out.insert(format!("{file}:{name}"), f.get(name).unwrap().1);
                }
            }
        }
    }
    out
}

/// ‖a − b‖ / ‖b‖ over every f32 tensor of the checkpoints' resources (weights, EMA and AdamW
/// moments), in f64. A global norm, not an element-wise maximum: AdamW's first steps move
/// every weight by about ±lr whatever its gradient's size, so a weight whose gradient is
/// rounding noise (a zero-initialised layer's, say) differs by up to 2·lr between two
/// summation orders of the same gradient.
fn rel_diff(a: &Path, b: &Path) -> f64 {
    let (ta, tb) = (tensors(a), tensors(b));
    assert_eq!(
        ta.keys().collect::<Vec<_>>(),
        tb.keys().collect::<Vec<_>>(),
        "the checkpoints hold different tensors"
    );
    assert!(!ta.is_empty(), "no tensors under {}", a.display());
    let (mut diff, mut norm) = (0f64, 0f64);
    for (k, va) in &ta {
        for (x, y) in va.iter().zip(&tb[k]) {
            diff += (*x as f64 - *y as f64).powi(2);
            norm += (*y as f64).powi(2);
        }
    }
    (diff / norm.max(1e-30)).sqrt()
}

/// `child`'s output once it exits, or None after `limit` (it is then killed).
fn exit_within(child: Child, limit: Duration) -> Option<Output> {
    let mut child = child;
    let t0 = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Some(child.wait_with_output().unwrap())
}

fn checkpoint(run: &Path, it: u64) -> PathBuf {
    run.join(format!("checkpoints/iter-{it:06}/resources"))
}

#[test]
fn should_train_two_processes_like_one_on_the_whole_batch_and_resume_alike() {
    let dir = tmpdir("dist-tafs");
    let p = tafs_pipeline(&dir);
    let ps = p.to_str().unwrap();
    let (one, two, part) = (dir.join("one"), dir.join("two"), dir.join("part"));
    let set = [
        "--set",
        "iterations=3",
        "--set",
        "checkpoint_every=1",
        "--set",
        "keep_checkpoints=10",
    ];
    let mut args = vec![ps, "--runs-dir", one.to_str().unwrap()];
    args.extend(set);
    let o = command(&args, None).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let mut args = vec![ps, "--runs-dir", two.to_str().unwrap()];
    args.extend(set);
    assert_ok(&run_two(&args));
    let (one, two) = (only_run_dir(&one), only_run_dir(&two));

    // Same weights after each of the 3 updates (the replicas were also compared with each
    // other at every checkpoint: a mismatch fails the run).
    for it in 1..=3 {
        let d = rel_diff(&checkpoint(&two, it), &checkpoint(&one, it));
        eprintln!("TAFS-GRPO update {it}: relative difference 2 processes vs 1: {d:.3e}");
        assert!(d <= 1e-5, "iteration {it}: {d}");
    }
    // The logged metrics are the whole batch's: the update's loss as one process saw it.
    let (m1, m2) = (metrics_without_timings(&one), metrics_without_timings(&two));
    assert_eq!(m1.len(), 3);
    assert_eq!(m2.len(), 3);
    for (a, b) in m1.iter().zip(&m2) {
        for key in ["update/loss", "score@3/reward_mean", "update/grad_norm"] {
            let (x, y) = (a[key].as_f64().unwrap(), b[key].as_f64().unwrap());
            assert!((x - y).abs() <= 1e-4 * (1.0 + x.abs()), "{key}: {x} vs {y}");
        }
    }
    // Rank 0 alone wrote the records; each rank its trajectory shard.
    assert!(two.join("log.rank-1.jsonl").is_file());
    let run_json: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(two.join("run.json")).unwrap()).unwrap();
    assert_eq!(run_json["world_size"], 2);
    for it in 1..=3 {
        for r in 0..2 {
            let f = two.join(format!("trajectories/iter-{it:06}.rank-{r}.parquet"));
            assert!(f.is_file(), "{} missing", f.display());
        }
        assert!(
            !two.join(format!("trajectories/iter-{it:06}.parquet"))
                .exists()
        );
    }

    // Resume: 2 iterations, then on to 3, equals the uninterrupted 2-process run bit for bit.
    let mut args = vec![ps, "--runs-dir", part.to_str().unwrap()];
    args.extend(["--set", "iterations=2", "--set", "checkpoint_every=1"]);
    args.extend(["--set", "keep_checkpoints=10"]);
    assert_ok(&run_two(&args));
    let part = only_run_dir(&part);
    // With another world size, the resume is refused before anything changes.
    let o = command(
        &["--resume", part.to_str().unwrap(), "--set", "iterations=3"],
        None,
    )
    .output()
    .unwrap();
    assert!(!o.status.success());
    assert!(
        text(&o).contains("written by a run of 2 process(es), and this one has 1"),
        "{}",
        text(&o)
    );
    assert_ok(&run_two(&[
        "--resume",
        part.to_str().unwrap(),
        "--set",
        "iterations=3",
    ]));
    assert_eq!(rel_diff(&checkpoint(&part, 3), &checkpoint(&two, 3)), 0.0);
}

#[test]
fn should_read_the_shards_as_one_dataset() {
    let Some(py) = common::python_with(&["pyarrow", "polars"]) else {
        return;
    };
    let dir = tmpdir("dist-shards");
    let p = tafs_pipeline(&dir);
    let runs = dir.join("runs");
    assert_ok(&run_two(&[
        p.to_str().unwrap(),
        "--runs-dir",
        runs.to_str().unwrap(),
        "--set",
        "iterations=2",
    ]));
    let run = only_run_dir(&runs);
    let script = r#"
import sys, pyarrow.dataset as ds, polars as pl
d = sys.argv[1] + "/trajectories"
t = ds.dataset(d, format="parquet").to_table()
df = pl.read_parquet(d + "/*.parquet")
assert t.num_rows == df.height, (t.num_rows, df.height)
# 2 iterations x 16 samples x 2 transitions; every global sample once per (iteration, step)
assert df.height == 2 * 16 * 2, df.height
per = df.group_by(["iteration", "step"]).agg(pl.col("sample").n_unique().alias("n"), pl.col("sample").max().alias("mx"))
assert per["n"].to_list() == [16] * 4 and per["mx"].to_list() == [15] * 4, per
assert sorted(df["group"].unique().to_list()) == [0, 1, 2, 3]
print("rows", df.height)
"#;
    let o = Command::new(py)
        .arg("-c")
        .arg(script)
        .arg(&run)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn should_pretrain_two_processes_like_one() {
    let dir = tmpdir("dist-pretrain");
    let p = pretrain_pipeline(&dir);
    let ps = p.to_str().unwrap();
    let (one, two) = (dir.join("one"), dir.join("two"));
    let o = command(&[ps, "--runs-dir", one.to_str().unwrap()], None)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert_ok(&run_two(&[ps, "--runs-dir", two.to_str().unwrap()]));
    let (one, two) = (only_run_dir(&one), only_run_dir(&two));
    for it in 1..=3 {
        let d = rel_diff(&checkpoint(&two, it), &checkpoint(&one, it));
        eprintln!("pretraining step {it}: relative difference 2 processes vs 1: {d:.3e}");
        assert!(d <= 1e-5, "step {it}: {d}");
    }
    // The gradient's scale (AdamW alone would not show it): the same loss and gradient norm.
    for (a, b) in metrics_without_timings(&one)
        .iter()
        .zip(&metrics_without_timings(&two))
    {
        for key in ["train/loss", "train/grad_norm"] {
            let (x, y) = (a[key].as_f64().unwrap(), b[key].as_f64().unwrap());
            assert!((x - y).abs() <= 1e-5 * x.abs(), "{key}: {x} vs {y}");
        }
    }

    // WORLD_SIZE=1 is the single-process run, bit for bit.
    let solo = dir.join("solo");
    let mut c = command(&[ps, "--runs-dir", solo.to_str().unwrap()], None);
    c.env("WORLD_SIZE", "1").env("RANK", "0");
    let o = c.output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        rel_diff(&checkpoint(&only_run_dir(&solo), 3), &checkpoint(&one, 3)),
        0.0
    );
}

#[test]
fn should_stop_the_others_naming_the_rank_that_died() {
    let dir = tmpdir("dist-kill");
    let p = tafs_pipeline(&dir);
    let runs = dir.join("runs");
    let port = free_port();
    let args = [
        p.to_str().unwrap(),
        "--runs-dir",
        runs.to_str().unwrap(),
        "--set",
        "iterations=200",
        "--set",
        "checkpoint_every=2",
    ];
    let r0 = command(&args, Some((0, 2, port))).spawn().unwrap();
    let mut r1 = command(&args, Some((1, 2, port))).spawn().unwrap();
    // Once a checkpoint is written, kill rank 1 mid-run.
    let t0 = Instant::now();
    let ck = loop {
        let found = fs::read_dir(&runs)
            .ok()
            .and_then(|mut e| e.next())
            .and_then(|e| e.ok());
        if let Some(run) = found.map(|e| e.path())
            && run.join("checkpoints/latest").is_file()
        {
            break run;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "no checkpoint appeared"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    r1.kill().unwrap();
    let _ = r1.wait();
    let killed = Instant::now();
    let out = exit_within(r0, Duration::from_secs(90))
        .expect("rank 0 did not stop within 90 s of rank 1's death");
    let msg = text(&out);
    eprintln!(
        "rank 0 stopped {:.1} s after rank 1 was killed:\n{msg}",
        killed.elapsed().as_secs_f64()
    );
    assert!(!out.status.success());
    assert!(msg.contains("rank(s) 1 stopped answering"), "{msg}");
    // The last checkpoint stays intact: a resume starts from it (and is refused here only
    // for its world size).
    let o = command(&["--resume", ck.to_str().unwrap()], None)
        .output()
        .unwrap();
    assert!(
        text(&o).contains("written by a run of 2 process(es)"),
        "{}",
        text(&o)
    );
}

#[test]
fn should_stop_the_others_within_the_timeout_when_a_rank_hangs() {
    let dir = tmpdir("dist-hang");
    let p = tafs_pipeline(&dir);
    let runs = dir.join("runs");
    let port = free_port();
    let args = [
        p.to_str().unwrap(),
        "--runs-dir",
        runs.to_str().unwrap(),
        "--set",
        "iterations=200",
    ];
    let spawn = |r| {
        let mut c = command(&args, Some((r, 2, port)));
        c.env("FLOWRUN_DIST_TIMEOUT_S", "5");
        c.spawn().unwrap()
    };
    let (r0, mut r1) = (spawn(0), spawn(1));
    // Once an iteration is done, stop rank 1 (SIGSTOP: alive, silent).
    let t0 = Instant::now();
    loop {
        let run = fs::read_dir(&runs)
            .ok()
            .and_then(|mut e| e.next())
            .and_then(|e| e.ok());
        if run.is_some_and(|e| {
            fs::read_to_string(e.path().join("metrics.jsonl")).is_ok_and(|t| !t.is_empty())
        }) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "no iteration finished"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = r1.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-STOP", &pid])
            .status()
            .unwrap()
            .success()
    );
    let stopped = Instant::now();
    let out = exit_within(r0, Duration::from_secs(60));
    let waited = stopped.elapsed().as_secs_f64();
    let _ = r1.kill();
    let _ = r1.wait();
    let out = out.expect("rank 0 still waits 60 s after rank 1 hung (timeout 5 s)");
    let msg = text(&out);
    eprintln!("rank 0 stopped {waited:.1} s after rank 1 hung (timeout 5 s):\n{msg}");
    assert!(!out.status.success());
    assert!(msg.contains("rank(s) 1 stopped answering"), "{msg}");
}

#[test]
fn should_refuse_a_batch_that_does_not_split_and_bad_launcher_variables() {
    let dir = tmpdir("dist-refuse");
    let p = tafs_pipeline(&dir);
    let runs = dir.join("runs");
    // 4 prompts per iteration over 3 processes: refused on every rank, before any iteration.
    let port = free_port();
    let args = [
        p.to_str().unwrap(),
        "--runs-dir",
        runs.to_str().unwrap(),
        "--set",
        "iterations=1",
    ];
    let outs: Vec<Output> = (0..3)
        .map(|r| command(&args, Some((r, 3, port))).spawn().unwrap())
        .collect::<Vec<_>>()
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    for o in &outs {
        assert!(!o.status.success());
    }
    assert!(
        text(&outs[0]).contains("`prompts_per_iter: 4` does not split evenly over the run's 3"),
        "{}",
        text(&outs[0])
    );
    let mut c = command(&args, None);
    c.env("WORLD_SIZE", "2").env("RANK", "5");
    let o = c.output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o).contains("RANK=5 is not below WORLD_SIZE=2"),
        "{}",
        text(&o)
    );
}
