//! Helpers shared by the end-to-end tests (each test binary uses a subset).
#![allow(dead_code)]

pub mod columns;
pub mod fused;

use std::fs;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The `flowrun` binary under test.
pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_flowrun"))
}

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A fresh, empty temporary directory unique to this test process.
pub fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("flowrun-test-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).unwrap();
    d
}

/// stdout and stderr of a finished command, for assertion messages.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The rows of a run directory's metrics.jsonl.
pub fn metrics(run_dir: &Path) -> Vec<serde_json::Value> {
    fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// [`metrics`] without the timings (`time/…`, `…_s`, `…/s_…`), which differ between runs:
/// what a resumed or repeated run must reproduce exactly.
#[allow(dead_code)]
pub fn metrics_without_timings(run_dir: &Path) -> Vec<serde_json::Value> {
    metrics(run_dir)
        .into_iter()
        .map(|mut r| {
            if let Some(o) = r.as_object_mut() {
                o.retain(|k, _| {
                    !k.starts_with("time/") && !k.ends_with("_s") && !k.contains("/s_")
                });
            }
            r
        })
        .collect()
}

/// The one run directory under `runs` (a test that started exactly one run).
pub fn only_run_dir(runs: &Path) -> PathBuf {
    let dirs: Vec<PathBuf> = fs::read_dir(runs)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    dirs[0].clone()
}

/// Start a new run of `pipeline` under `runs` with `--set` overrides; it must succeed. Returns
/// its run directory (the only one under `runs`).
pub fn run_new(pipeline: &Path, runs: &Path, set: &[&str]) -> PathBuf {
    let mut c = bin();
    c.arg(pipeline).arg("--runs-dir").arg(runs).arg("--quiet");
    for s in set {
        c.arg("--set").arg(s);
    }
    let o = c.output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    only_run_dir(runs)
}

/// The first Python that can import every module in `modules`: `$FLOWRUN_PYTHON`, else
/// `.venv/bin/python`, else `python3`. Without one the test is skipped with a NOTICE — except
/// under CI (`FLOWRUN_CI=1`, set by `.ci/run`, which installs the packages), where a missing
/// package fails the test: no Python cross-check is ever skipped in CI.
pub fn python_with(modules: &[&str]) -> Option<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(p) = std::env::var_os("FLOWRUN_PYTHON") {
        candidates.push(PathBuf::from(p));
    }
    candidates.push(root().join(".venv/bin/python"));
    candidates.push(PathBuf::from("python3"));
    let import = format!("import {}", modules.join(", "));
    let found = candidates.into_iter().find(|py| {
        Command::new(py)
            .args(["-c", &import])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if found.is_none() {
        let msg = format!(
            "no Python that can `{import}` (set FLOWRUN_PYTHON, or create .venv as .ci/run does)"
        );
        if std::env::var_os("FLOWRUN_CI").is_some_and(|v| v == "1") {
            panic!("{msg}: required under CI (FLOWRUN_CI=1)");
        }
        eprintln!("NOTICE: {msg}; skipping this cross-check");
    }
    found
}

/// The tiny diffusers SD3 pipeline folder (`tests/python/tiny_sd3_pipeline.py`) and its prompt
/// embeddings (`scripts/encode_prompts.py`, 16 T5 tokens, of "a red apple", "a photo of a cat",
/// "a blue car", "a green tree"), built once per test binary; `None` without a Python with
/// torch, diffusers, transformers and safetensors (outside CI, see [`python_with`]).
pub fn sd3_fixture() -> Option<&'static (PathBuf, PathBuf)> {
    static F: OnceLock<Option<(PathBuf, PathBuf)>> = OnceLock::new();
    F.get_or_init(|| {
        let py = python_with(&["torch", "diffusers", "transformers", "safetensors"])?;
        let dir = tmpdir("sd3-fixture");
        let model = dir.join("model");
        let run = |args: &[&std::ffi::OsStr]| {
            let o = Command::new(&py)
                .args(args)
                .current_dir(root())
                .output()
                .unwrap();
            assert!(o.status.success(), "{}", text(&o));
        };
        run(&[
            root().join("tests/python/tiny_sd3_pipeline.py").as_os_str(),
            model.as_os_str(),
        ]);
        let prompts = dir.join("prompts.txt");
        fs::write(
            &prompts,
            "a red apple\na photo of a cat\na blue car\na green tree\n",
        )
        .unwrap();
        let emb = dir.join("emb.safetensors");
        run(&[
            root().join("scripts/encode_prompts.py").as_os_str(),
            model.as_os_str(),
            prompts.as_os_str(),
            "--out".as_ref(),
            emb.as_os_str(),
            "--max-sequence-length".as_ref(),
            "16".as_ref(),
        ]);
        Some((model, emb))
    })
    .as_ref()
}

/// The reference server on a free port of 127.0.0.1; killed when dropped.
pub struct RewardServer {
    child: Child,
    port: u16,
}

impl RewardServer {
    pub fn start(flags: &[&str]) -> RewardServer {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("python3")
            .arg(root().join("examples/reward_server/server.py"))
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(flags)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut s = RewardServer { child, port };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(st)) = s.child.try_wait() {
                panic!("reward server exited early: {st}");
            }
            assert!(Instant::now() < deadline, "reward server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        s
    }
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/score", self.port)
    }
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RewardServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The device library-level tests run on: flex, or `$FLOWRUN_TEST_DEVICE` (`.ci/run` reruns the
/// diffusers cross-checks on `libtorch` with `--features tch`).
pub fn test_device() -> burn::tensor::Device {
    let name = std::env::var("FLOWRUN_TEST_DEVICE").unwrap_or_else(|_| "flex".into());
    nodes::device::open(&name).unwrap_or_else(|e| panic!("FLOWRUN_TEST_DEVICE: {e}"))
}

/// A tensor's values as f32 on the host.
pub fn values<const D: usize>(t: burn::tensor::Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
}

/// max|a − b| / max|b|, after checking the shapes agree.
pub fn rel_err(what: &str, got: (&[usize], &[f32]), want: (&[usize], &[f32])) -> f32 {
    assert_eq!(got.0, want.0, "{what}: shape");
    let scale = want.1.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(scale > 0.0, "{what}: the reference is all zero");
    let diff = got
        .1
        .iter()
        .zip(want.1)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    diff / scale
}

/// Asserts the relative error is within `tol`, noting it in `log` (printed whole per case, so
/// that parallel tests do not interleave their figures); returns it.
pub fn check_rel(
    log: &mut String,
    what: &str,
    got: (&[usize], &[f32]),
    want: (&[usize], &[f32]),
    tol: f32,
) -> f32 {
    let e = rel_err(what, got, want);
    log.push_str(&format!("  {what}: max|Δ|/max|ref| = {e:.2e}\n"));
    assert!(
        e <= tol,
        "{what}: max|Δ|/max|ref| = {e:.3e} > {tol:.0e}\n{log}"
    );
    e
}

/// The `--set` overrides that point a shipped SD3 pipeline at the tiny model: 2 prompts × 2,
/// 8×8 latents, one checkpoint per iteration.
pub fn sd3_overrides(model: &Path, emb: &Path, url: &str, score: &str) -> Vec<String> {
    let m = model.display();
    vec![
        format!("resources.policy.params.diffusers={m}"),
        format!("resources.vae.params.path={m}"),
        format!("nodes.prompts.params.embeddings={}", emb.display()),
        "nodes.prompts.params.prompts_per_iter=2".into(),
        "nodes.prompts.params.group_size=2".into(),
        "nodes.noise.params.height=8".into(),
        "nodes.noise.params.width=8".into(),
        "checkpoint_every=1".into(),
        format!("{score}.params.url={url}"),
    ]
}

/// `flowrun ARGS --quiet --set …`, on `$FLOWRUN_TEST_DEVICE` when set (`.ci/run` runs these
/// tests again on `libtorch` with `--features tch`).
pub fn flowrun(args: &[&str], set: &[String]) -> Output {
    let mut c = bin();
    c.args(args).arg("--quiet");
    if let Ok(d) = std::env::var("FLOWRUN_TEST_DEVICE") {
        c.args(["--device", &d]);
    }
    for s in set {
        c.arg("--set").arg(s);
    }
    c.output().unwrap()
}

/// Run with files capped at `bytes` (RLIMIT_FSIZE): writes past it fail as on a full disk.
#[cfg(unix)]
pub fn run_with_file_size_limit(p: &Path, runs: &Path, bytes: u64, set: &[&str]) -> Output {
    use std::os::unix::process::CommandExt;
    let mut c = bin();
    c.arg(p).arg("--runs-dir").arg(runs).arg("--quiet");
    for s in set {
        c.args(["--set", s]);
    }
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        c.pre_exec(move || {
            let lim = libc::rlimit {
                rlim_cur: bytes,
                rlim_max: bytes,
            };
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    c.output().unwrap()
}

/// Runs `pipeline` for `first` iterations (a checkpoint each), resumes it to `total`, and
/// asserts that its metrics equal `straight`'s (an uninterrupted run's, without timings).
pub fn assert_resume_matches(
    pipeline: &Path,
    runs: &Path,
    first: u64,
    total: u64,
    straight: &[serde_json::Value],
    what: &str,
) {
    let resumed = run_new(
        pipeline,
        runs,
        &[&format!("iterations={first}"), "checkpoint_every=1"],
    );
    let o = flowrun(
        &["run", "--resume", resumed.to_str().unwrap()],
        &[format!("iterations={total}")],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        straight,
        metrics_without_timings(&resumed).as_slice(),
        "a resumed {what} run differs from an uninterrupted one"
    );
}

/// The mean of `key` over a run's first and last `n` iterations.
pub fn first_and_last_mean(run: &Path, key: &str, n: usize) -> (f64, f64, Vec<f64>) {
    let r: Vec<f64> = metrics_without_timings(run)
        .iter()
        .map(|r| r[key].as_f64().unwrap())
        .collect();
    let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
    (mean(&r[..n]), mean(&r[r.len() - n..]), r)
}
