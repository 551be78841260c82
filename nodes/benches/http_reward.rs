//! Does HTTP scoring overlap sampling? The tiny TAFS-GRPO pipeline (K = 3 steps, 16 samples)
//! scored by `http_reward` against the reference server sleeping S seconds per request, versus
//! the same pipeline with an instant server plus 3·S (what the three scoring calls would add if
//! each one blocked the loop). `score@k` runs in parallel with `renoise@k` → `predict@k+1`, so up
//! to 2 of the 3 waits hide behind sampling. Needs python3.
//! `cargo bench --bench http_reward` (from the workspace root).

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const ITERATIONS: u64 = 8;

fn server(root: &Path, sleep: f64) -> (Child, u16) {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("python3")
        .arg(root.join("examples/reward_server/server.py"))
        .args(["--port", &port.to_string(), "--sleep", &sleep.to_string()])
        .stdout(Stdio::null())
        .spawn()
        .expect("python3");
    let t0 = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "server did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (child, port)
}

/// Median per-iteration seconds (first iteration dropped) and the mean of some node times.
fn run(root: &Path, port: u16, tag: &str) -> (f64, f64, f64) {
    let base = std::fs::read_to_string(root.join("tests/pipelines/valid-tafs-tiny.yaml")).unwrap();
    let yaml = base
        .replace(
            "          type: image_reward\n          params: {kind: brightness, target: 1.0}\n          inputs: {images: predict.x0}\n",
            &format!("          type: http_reward\n          params: {{url: \"http://127.0.0.1:{port}/score\", encoding: u8, batch_size: 16, concurrency: 1}}\n          inputs: {{images: predict.x0, prompts: prompts.prompts}}\n"),
        )
        .replace("iterations: 12", &format!("iterations: {ITERATIONS}"))
        .replace("checkpoint_every: 6", "checkpoint_every: 1000");
    let reg = nodes::registry();
    let (p, _) = runner::load_str("bench.yaml", &yaml, &[], &reg).expect("valid");
    let runs =
        std::env::temp_dir().join(format!("flowrun-bench-http-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&runs);
    let opts = runner::RunOptions {
        runs_root: runs.clone(),
        ..Default::default()
    };
    runner::run(p, &reg, opts).expect("runs");
    let dir: PathBuf = std::fs::read_dir(&runs)
        .unwrap()
        .flatten()
        .next()
        .unwrap()
        .path();
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let _ = std::fs::remove_dir_all(&runs);
    let rows = &rows[1..];
    let mut it: Vec<f64> = rows.iter().map(|r| r["iter_s"].as_f64().unwrap()).collect();
    it.sort_by(f64::total_cmp);
    let mean =
        |f: &dyn Fn(&serde_json::Value) -> f64| rows.iter().map(f).sum::<f64>() / rows.len() as f64;
    let score = mean(&|r| {
        (1..=3)
            .map(|k| r[format!("time/score@{k}")].as_f64().unwrap())
            .sum()
    });
    let sample = mean(&|r| {
        (2..=3)
            .map(|k| r[format!("time/predict@{k}")].as_f64().unwrap())
            .sum::<f64>()
            + (1..=2)
                .map(|k| r[format!("time/renoise@{k}")].as_f64().unwrap())
                .sum::<f64>()
    });
    (it[it.len() / 2], score, sample)
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    std::env::set_current_dir(&root).unwrap();
    let s = std::env::var("SLEEP_S")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.25);
    let (mut fast, port) = server(&root, 0.0);
    let (base, base_score, sample) = run(&root, port, "fast");
    let _ = fast.kill();
    let _ = fast.wait();
    let (mut slow, port) = server(&root, s);
    let (slowed, slow_score, _) = run(&root, port, "slow");
    let _ = slow.kill();
    let _ = slow.wait();
    let serial = base + 3.0 * s;
    println!(
        "http_reward overlap ({} iterations, median of the last {}; server sleep S = {s} s per request, 3 requests per iteration)",
        ITERATIONS,
        ITERATIONS - 1
    );
    println!(
        "  instant server:           {base:.3} s/iteration (scoring {base_score:.3} s of node time)"
    );
    println!(
        "  sleeping server:          {slowed:.3} s/iteration (scoring {slow_score:.3} s of node time)"
    );
    println!("  sum of parts (base + 3S): {serial:.3} s/iteration");
    println!(
        "  hidden behind sampling:   {:.3} s/iteration (sampling after step 1 takes {sample:.3} s; at most min(2S, that) can hide)",
        serial - slowed
    );
}
