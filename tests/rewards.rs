//! Reward plug-ins end to end: the real binary against the reference reward server
//! (`examples/reward_server/server.py`) on 127.0.0.1, with faults (server down, slow,
//! malformed, NaN). Skipped, with a notice, when `python3` is missing.

mod common;
use common::{RewardServer as Server, only_run_dir, root, text, tmpdir};

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn python_available() -> bool {
    let ok = Command::new("python3")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("NOTICE: python3 not found; skipping this reward-server test");
    }
    ok
}

/// tests/pipelines/valid-tafs-tiny.yaml with its reward (`score`) replaced by an `http_reward`
/// with `params`, `extra` nodes added to each step, and `tail` appended to the node list.
fn pipeline(dir: &Path, iterations: u64, params: &str, extra: &str, tail: &str) -> PathBuf {
    let base = fs::read_to_string(root().join("tests/pipelines/valid-tafs-tiny.yaml")).unwrap();
    let old = "          type: image_reward\n          params: {kind: brightness, target: 1.0}\n          inputs: {images: predict.x0}\n";
    assert!(base.contains(old));
    let new = format!(
        "          type: http_reward\n          params: {{{params}}}\n          inputs: {{images: predict.x0, prompts: prompts.prompts}}\n{extra}"
    );
    let yaml = base
        .replace(old, &new)
        .replace("iterations: 12", &format!("iterations: {iterations}"))
        + tail;
    let p = dir.join("pipeline.yaml");
    fs::write(&p, yaml).unwrap();
    p
}

fn flowrun(p: &Path, runs: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_flowrun"));
    c.current_dir(root())
        .arg(p)
        .arg("--quiet")
        .arg("--runs-dir")
        .arg(runs);
    c
}

/// Run to the end (at most `limit`), returning the output.
fn run_bounded(mut c: Command, limit: Duration) -> Output {
    let mut child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + limit;
    // Drain the pipes on threads so a chatty child cannot block.
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let to = std::thread::spawn(move || {
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut out, &mut v).ok();
        v
    });
    let te = std::thread::spawn(move || {
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut err, &mut v).ok();
        v
    });
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("flowrun did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Output {
        status,
        stdout: to.join().unwrap(),
        stderr: te.join().unwrap(),
    }
}

/// The complete rows of metrics.jsonl; a row still being appended (no newline yet) while the
/// test polls a live run is not counted.
fn metrics(run_dir: &Path) -> Vec<serde_json::Value> {
    fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap_or_default()
        .split_inclusive('\n')
        .filter(|l| l.ends_with('\n') && !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn num(row: &serde_json::Value, key: &str) -> f64 {
    row[key]
        .as_f64()
        .unwrap_or_else(|| panic!("metric {key} missing in {row}"))
}

const LIMIT: Duration = Duration::from_secs(240);

#[test]
fn should_score_like_the_server_formula_in_every_encoding() {
    if !python_available() {
        return;
    }
    let srv = Server::start(&[]);
    let dir = tmpdir("match");
    let url = srv.url();
    // `score`: f32 in 2 parallel requests; `png`: uneven batches of 5; `u8`: one request.
    // `bright`/`sat`: the same formulas computed in-process by image_reward (target 1 → the
    // reward is the raw brightness / saturation). `jpeg` + `total`: a weighted combination.
    let extra = format!(
        "        - id: png\n          type: http_reward\n          params: {{url: \"{url}\", encoding: png, batch_size: 5, concurrency: 3}}\n          inputs: {{images: predict.x0, prompts: prompts.prompts}}\n\
         \x20       - id: u8\n          type: http_reward\n          params: {{url: \"{url}\", encoding: u8, batch_size: 16, concurrency: 1}}\n          inputs: {{images: predict.x0, prompts: prompts.prompts}}\n\
         \x20       - id: bright\n          type: image_reward\n          params: {{kind: brightness, target: 1.0}}\n          inputs: {{images: predict.x0}}\n\
         \x20       - id: sat\n          type: image_reward\n          params: {{kind: saturation, target: 1.0}}\n          inputs: {{images: predict.x0}}\n\
         \x20       - id: jpeg\n          type: compressibility_reward\n          params: {{kind: incompressibility, quality: 95}}\n          inputs: {{images: predict.x0}}\n\
         \x20       - id: total\n          type: weighted_reward\n          params: {{weights: [{{server: 1.0}}, {{jpeg: -0.25}}]}}\n          inputs: {{rewards: [score.rewards, jpeg.rewards], prompts: prompts.prompts}}\n"
    );
    let p = pipeline(
        &dir,
        2,
        &format!("url: \"{url}\", encoding: f32, batch_size: 8, concurrency: 2"),
        &extra,
        "",
    );
    let o = run_bounded(flowrun(&p, &dir.join("runs")), LIMIT);
    assert!(o.status.success(), "{}", text(&o));
    let rows = metrics(&only_run_dir(&dir.join("runs")));
    assert_eq!(rows.len(), 2);
    for row in &rows {
        for k in 1..=3 {
            let b = num(row, &format!("bright@{k}/reward_mean"));
            let s = num(row, &format!("sat@{k}/reward_mean"));
            // f32 carries the exact pixels: equal up to summation order.
            assert!((num(row, &format!("score@{k}/reward_mean")) - b).abs() < 1e-5);
            assert!((num(row, &format!("score@{k}/sub_brightness_mean")) - b).abs() < 1e-5);
            assert!((num(row, &format!("score@{k}/sub_saturation_mean")) - s).abs() < 1e-5);
            assert_eq!(num(row, &format!("score@{k}/requests")), 2.0);
            assert_eq!(num(row, &format!("png@{k}/requests")), 4.0);
            assert_eq!(num(row, &format!("u8@{k}/requests")), 1.0);
            // png and u8 carry 8-bit pixels: within the rounding of 0.5/255.
            for enc in ["png", "u8"] {
                let v = num(row, &format!("{enc}@{k}/reward_mean"));
                assert!((v - b).abs() < 2.5e-3, "{enc}: {v} vs {b}");
                let vs = num(row, &format!("{enc}@{k}/sub_saturation_mean"));
                assert!((vs - s).abs() < 5e-3, "{enc}: {vs} vs {s}");
            }
            // Components logged separately, and the weighted total.
            let server = num(row, &format!("total@{k}/server_mean"));
            let jpeg = num(row, &format!("total@{k}/jpeg_mean"));
            assert!((server - num(row, &format!("score@{k}/reward_mean"))).abs() < 1e-6);
            assert!((jpeg - num(row, &format!("jpeg@{k}/jpeg_kb_mean"))).abs() < 1e-6);
            assert!(
                jpeg > 0.3,
                "a 32×32 JPEG is at least a few hundred bytes: {jpeg}"
            );
            let total = num(row, &format!("total@{k}/reward_mean"));
            assert!((total - (server - 0.25 * jpeg)).abs() < 1e-4, "{total}");
        }
    }
}

#[test]
fn should_retry_a_failing_server_and_carry_on() {
    if !python_available() {
        return;
    }
    let srv = Server::start(&["--fail-first", "2"]);
    let dir = tmpdir("retry");
    let p = pipeline(
        &dir,
        1,
        &format!(
            "url: \"{}\", batch_size: 16, concurrency: 1, retries: 3, backoff_s: 0.05",
            srv.url()
        ),
        "",
        "",
    );
    let o = run_bounded(flowrun(&p, &dir.join("runs")), LIMIT);
    assert!(o.status.success(), "{}", text(&o));
    let rows = metrics(&only_run_dir(&dir.join("runs")));
    let retries: f64 = (1..=3)
        .map(|k| num(&rows[0], &format!("score@{k}/retries")))
        .sum();
    assert_eq!(retries, 2.0);
}

#[test]
fn should_stop_cleanly_with_checkpoint_and_parquet_intact_when_the_server_goes_down() {
    if !python_available() {
        return;
    }
    let mut srv = Server::start(&[]);
    let url = srv.url();
    let dir = tmpdir("down");
    let runs = dir.join("runs");
    let sink = "  - id: sink\n    type: trajectory_sink\n    inputs:\n      transitions: renoise@*.transition\n      rewards: score@*.rewards\n      advantages: advantages.advantages\n      prompts: prompts.prompts\n";
    let p = pipeline(
        &dir,
        60,
        &format!("url: \"{url}\", retries: 2, backoff_s: 0.05, timeout_s: 5"),
        "",
        sink,
    );
    let yaml = fs::read_to_string(&p)
        .unwrap()
        .replace("checkpoint_every: 6", "checkpoint_every: 1");
    fs::write(&p, yaml).unwrap();
    let out_path = dir.join("out.txt");
    let mut child = flowrun(&p, &runs)
        .stdout(fs::File::create(&out_path).unwrap())
        .stderr(fs::File::create(dir.join("err.txt")).unwrap())
        .spawn()
        .unwrap();
    // Let two iterations complete, then take the server away.
    let deadline = Instant::now() + LIMIT;
    loop {
        let done = fs::read_dir(&runs)
            .ok()
            .and_then(|mut d| d.next())
            .and_then(|e| e.ok())
            .map_or(0, |e| metrics(&e.path()).len());
        if done >= 2 {
            break;
        }
        if let Some(st) = child.try_wait().unwrap() {
            panic!("flowrun exited early ({st})");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("two iterations did not complete in time");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    srv.stop();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("flowrun did not stop after the server went down");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out =
        fs::read_to_string(&out_path).unwrap() + &fs::read_to_string(dir.join("err.txt")).unwrap();
    assert_eq!(status.code(), Some(1), "{out}");
    assert!(out.contains(&format!("reward server {url}")), "{out}");
    assert!(out.contains("gave up after 3 attempts"), "{out}");
    assert!(out.contains("flowrun run --resume"), "{out}");
    assert!(!out.contains("panicked"), "{out}");
    // Every completed iteration has its metrics row, its checkpoint and its Parquet file.
    let rd = only_run_dir(&runs);
    let n = metrics(&rd).len();
    assert!(n >= 2);
    let latest = fs::read_to_string(rd.join("checkpoints/latest")).unwrap();
    assert_eq!(latest.trim(), format!("iter-{n:06}"));
    assert!(
        rd.join("checkpoints")
            .join(latest.trim())
            .join("state.json")
            .is_file()
    );
    let mut files: Vec<PathBuf> = fs::read_dir(rd.join("trajectories"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "parquet"))
        .collect();
    files.sort();
    assert_eq!(files.len(), n, "{files:?}");
    for f in &files {
        let b = nodes::trajectory_sink::read_file(f)
            .unwrap_or_else(|e| panic!("{} does not read back: {e:#}", f.display()));
        assert_eq!(b.num_rows(), 4 * 4 * 2);
    }
}

#[test]
fn should_honour_the_timeout_of_a_slow_server() {
    if !python_available() {
        return;
    }
    let srv = Server::start(&["--sleep", "3"]);
    let dir = tmpdir("slow");
    let p = pipeline(
        &dir,
        2,
        &format!(
            "url: \"{}\", timeout_s: 0.3, retries: 1, backoff_s: 0.05",
            srv.url()
        ),
        "",
        "",
    );
    let t0 = Instant::now();
    let o = run_bounded(flowrun(&p, &dir.join("runs")), LIMIT);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(out.contains("timed out after 0.3 s (timeout_s)"), "{out}");
    assert!(out.contains("gave up after 2 attempts"), "{out}");
    assert!(
        out.contains(&srv.url()) && out.contains("prompts `"),
        "{out}"
    );
    // Two tries of 0.3 s, not the server's 3 s sleep each (generous margin for a busy machine).
    assert!(t0.elapsed() < Duration::from_secs(60));
}

#[test]
fn should_reject_a_malformed_response_naming_the_server() {
    if !python_available() {
        return;
    }
    let srv = Server::start(&["--malformed"]);
    let dir = tmpdir("malformed");
    let p = pipeline(&dir, 2, &format!("url: \"{}\"", srv.url()), "", "");
    let o = run_bounded(flowrun(&p, &dir.join("runs")), LIMIT);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(
        out.contains(&format!("reward server {}", srv.url()))
            && out.contains("`scores` has 15 values for 16 images (malformed response)")
            && out.contains("prompts `"),
        "{out}"
    );
}

#[test]
fn should_stop_on_a_nan_reward_naming_the_prompt_or_skip_it_when_asked() {
    if !python_available() {
        return;
    }
    let srv = Server::start(&["--nan"]);
    let dir = tmpdir("nan");
    let url = srv.url();
    // Default: the run stops at iteration 1 before any update, naming the prompt.
    let p = pipeline(&dir, 2, &format!("url: \"{url}\", batch_size: 8"), "", "");
    let runs = dir.join("runs");
    let o = run_bounded(flowrun(&p, &runs), LIMIT);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(
        out.contains(&format!(
            "reward server {url} returned NaN for item 0 (prompt `"
        )) && out.contains("the iteration is not applied"),
        "{out}"
    );
    assert!(metrics(&only_run_dir(&runs)).is_empty());
    // `on_nonfinite: skip`: the first item of each request (2 per step) gets its group's mean.
    let dir2 = tmpdir("nan-skip");
    let p = pipeline(
        &dir2,
        2,
        &format!("url: \"{url}\", batch_size: 8, on_nonfinite: skip"),
        "",
        "",
    );
    let runs = dir2.join("runs");
    let o = run_bounded(flowrun(&p, &runs), LIMIT);
    assert!(o.status.success(), "{}", text(&o));
    let rows = metrics(&only_run_dir(&runs));
    assert_eq!(rows.len(), 2);
    for row in &rows {
        for k in 1..=3 {
            assert_eq!(num(row, &format!("score@{k}/nonfinite")), 2.0);
            assert!(num(row, &format!("score@{k}/reward_mean")).is_finite());
        }
        assert!(num(row, "update/loss").is_finite());
    }
}
