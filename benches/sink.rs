//! Parquet sink throughput: how long `trajectory_sink` takes to write one TAFS-GRPO iteration
//! (64 samples = 8 prompts × 8, K = 4 predictions → 3 transitions = 192 rows, states
//! [3, 32, 32]), without tensor columns and with f32 / f16 `x_t`, `x_next` columns, compared with
//! one TAFS iteration. `cargo bench --bench sink` (from the workspace root);
//! `cargo bench --bench sink -- RUN_DIR` also reads a real run's `time/<sink>` and `iter_s`.
//!
//! Per mode: 2 warm-up files, then 15 measured ones. Each measurement is `write` (what the
//! node's `run` does on the critical path: check shapes, queue the job) followed by `flush`
//! (wait until the writer thread has copied the tensors to the host, built the Arrow batch,
//! encoded and zstd-compressed the Parquet file, fsynced and renamed it).

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use nodes::device::{DeviceKind, device};
use nodes::grpo::LinearGaussian;
use nodes::model::{sample_standard_normal, tensor_from_vec};
use nodes::prompt_loader::{load_prompts, make_batch};
use nodes::trajectory_sink::{TensorMode, TrajectorySink, file_name};
use nodes::types::{Advantages, PromptBatch, Rewards, Transition};
use nodes::world::{CRITERIA, IMAGE_LEN, render};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const PROMPTS: usize = 8;
const GROUP: usize = 8;
const K: usize = 4;
const WARMUP: usize = 2;
const REPEATS: usize = 15;
/// One TAFS-GRPO iteration on this machine (BENCHMARKS.md, "One TAFS-GRPO iteration").
const TAFS_ITERATION_S: f64 = 12.9;

struct Batch {
    transitions: Vec<Transition>,
    rewards: Vec<Rewards>,
    advantages: Advantages,
    prompts: PromptBatch,
}

/// A realistic iteration: ShapeWorld renders of the batch's prompts as x0, noised to each
/// step's t as the sampler's states are; TAFS kernels, rewards with verifier criteria.
fn batch() -> Batch {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let records = load_prompts(&root.join("datasets/shapes/train.jsonl")).expect("prompts");
    let records: Vec<_> = records.into_iter().take(PROMPTS).map(Arc::new).collect();
    let prompts = make_batch(&records, GROUP).expect("batch");
    let b = prompts.len();
    let dev = device(DeviceKind::Flex);
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let x0: Vec<Vec<f32>> = prompts
        .records
        .iter()
        .map(|r| render(&r.shapes("bench").unwrap().target, &mut rng).expect("render"))
        .collect();
    let state = |t: f32, rng: &mut ChaCha8Rng| -> Vec<f32> {
        let eps = sample_standard_normal(rng, b * IMAGE_LEN);
        let mut v = Vec::with_capacity(b * IMAGE_LEN);
        for (i, img) in x0.iter().enumerate() {
            for (j, p) in img.iter().enumerate() {
                v.push((1.0 - t) * p + t * eps[i * IMAGE_LEN + j]);
            }
        }
        v
    };
    let ts = [1.0f32, 0.75, 0.5, 0.25];
    let taus = [1.0f32, 0.8667, 0.7333, 0.6];
    let mut transitions = Vec::new();
    let mut x_t = state(ts[0], &mut rng);
    for k in 0..K - 1 {
        let x_next = state(ts[k + 1], &mut rng);
        transitions.push(Transition {
            step: k + 1,
            t: ts[k],
            t_next: ts[k + 1],
            tau: taus[k],
            kernel: LinearGaussian::tafs(ts[k], ts[k + 1], taus[k]).expect("kernel"),
            sde_std: LinearGaussian::tafs(ts[k], ts[k + 1], taus[k])
                .expect("kernel")
                .std,
            cfg: 1.0,
            x_t: tensor_from_vec(x_t.clone(), [b, 3, 32, 32], &dev),
            x_next: tensor_from_vec(x_next.clone(), [b, 3, 32, 32], &dev),
            old_logprob: (0..b).map(|_| -1.2 + 0.1 * rng.random::<f32>()).collect(),
            sampler: "tafs",
            graph: None,
            branch: None,
        });
        x_t = x_next;
    }
    let rewards = (0..K)
        .map(|k| {
            let criteria: Vec<Vec<(String, Option<bool>)>> = (0..b)
                .map(|_| {
                    CRITERIA
                        .iter()
                        .map(|c| (c.to_string(), Some(rng.random::<bool>())))
                        .collect()
                })
                .collect();
            Rewards {
                values: criteria
                    .iter()
                    .map(|row| row.iter().filter(|c| c.1 == Some(true)).count() as f32 / 5.0)
                    .collect(),
                correct: criteria
                    .iter()
                    .map(|row| row.iter().all(|c| c.1 == Some(true)))
                    .collect(),
                criteria,
                step: k + 1,
            }
        })
        .collect();
    let advantages = Advantages {
        values: (0..K - 1)
            .map(|_| (0..b).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect())
            .collect(),
        mode: "mix".into(),
        mask: None,
    };
    Batch {
        transitions,
        rewards,
        advantages,
        prompts,
    }
}

/// CPU seconds this process has used (user + system), from /proc/self/stat; None elsewhere.
fn cpu_seconds() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat (utime, stime) are 12 and 13 after the command name.
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0) // USER_HZ is 100 on Linux
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

struct Result {
    mode: &'static str,
    enqueue_s: f64,
    total_s: f64,
    min_s: f64,
    max_s: f64,
    bytes: u64,
    cpu_s: Option<f64>,
}

fn measure(mode: TensorMode, name: &'static str, data: &Batch, root: &Path) -> Result {
    let run_dir = root.join(name);
    let _ = std::fs::remove_dir_all(&run_dir);
    std::fs::create_dir_all(&run_dir).expect("run dir");
    let mut sink = TrajectorySink::new(&run_dir, mode, 2, 3).expect("sink");
    let mut write = |it: u64| -> (f64, f64) {
        let t0 = Instant::now();
        sink.write(
            it,
            data.transitions.clone(),
            data.rewards.clone(),
            data.advantages.clone(),
            data.prompts.clone(),
        )
        .expect("write");
        let enqueue = t0.elapsed().as_secs_f64();
        sink.flush().expect("flush");
        (enqueue, t0.elapsed().as_secs_f64())
    };
    for it in 1..=WARMUP as u64 {
        write(it);
    }
    let cpu0 = cpu_seconds();
    let (mut enq, mut tot) = (Vec::new(), Vec::new());
    for r in 0..REPEATS as u64 {
        let (e, t) = write(WARMUP as u64 + 1 + r);
        enq.push(e);
        tot.push(t);
    }
    let cpu_s = match (cpu0, cpu_seconds()) {
        (Some(a), Some(b)) => Some((b - a) / REPEATS as f64),
        _ => None,
    };
    let bytes = std::fs::metadata(sink.dir().join(file_name(WARMUP as u64 + 1)))
        .map(|m| m.len())
        .unwrap_or(0);
    sink.finish().expect("finish");
    let total_s = median(&mut tot);
    Result {
        mode: name,
        enqueue_s: median(&mut enq),
        total_s,
        min_s: tot[0],
        max_s: tot[tot.len() - 1],
        bytes,
        cpu_s,
    }
}

/// Median `time/<sink node>` and `iter_s` of a real run (iteration 1 left out: warm-up).
fn real_run(dir: &Path) -> Option<(String, f64, f64, usize)> {
    let run: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("run.json")).ok()?).ok()?;
    let node = run["nodes"]
        .as_array()?
        .iter()
        .find(|n| n["type"] == "trajectory_sink")?["id"]
        .as_str()?
        .to_string();
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).ok()?;
    let (mut sink, mut iter) = (Vec::new(), Vec::new());
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["iteration"].as_u64().unwrap_or(0) < 2 {
            continue;
        }
        if let (Some(s), Some(i)) = (v[format!("time/{node}")].as_f64(), v["iter_s"].as_f64()) {
            sink.push(s);
            iter.push(i);
        }
    }
    if sink.is_empty() {
        return None;
    }
    let n = sink.len();
    Some((node, median(&mut sink), median(&mut iter), n))
}

fn main() {
    let data = batch();
    let rows = PROMPTS * GROUP * (K - 1);
    let root = std::env::temp_dir().join(format!("flowrun-bench-sink-{}", std::process::id()));
    println!(
        "trajectory_sink, one iteration: {} samples x {} transitions (K = {K}) = {rows} rows, states 3x32x32; zstd 3; {WARMUP} warm-up + {REPEATS} measured files per mode",
        PROMPTS * GROUP,
        K - 1
    );
    println!(
        "{:<8} {:>10} {:>10} {:>10} {:>10} {:>9} {:>10} {:>9} {:>10} {:>9}",
        "tensors",
        "enqueue",
        "median",
        "min",
        "max",
        "file",
        "rows/s",
        "MB/s",
        "CPU/file",
        "% of iter"
    );
    for (mode, name) in [
        (TensorMode::None, "none"),
        (TensorMode::F32, "f32"),
        (TensorMode::F16, "f16"),
    ] {
        let r = measure(mode, name, &data, &root);
        let mb = r.bytes as f64 / 1e6;
        println!(
            "{:<8} {:>8.3}ms {:>8.1}ms {:>8.1}ms {:>8.1}ms {:>7.2}MB {:>10.0} {:>9.1} {:>10} {:>8.2}%",
            r.mode,
            r.enqueue_s * 1e3,
            r.total_s * 1e3,
            r.min_s * 1e3,
            r.max_s * 1e3,
            mb,
            rows as f64 / r.total_s,
            mb / r.total_s,
            r.cpu_s
                .map(|c| format!("{:.1}ms", c * 1e3))
                .unwrap_or_else(|| "-".into()),
            100.0 * r.total_s / TAFS_ITERATION_S
        );
    }
    println!(
        "(enqueue: the node's `run` on the critical path; median/min/max: write + flush, i.e. until the file is fsynced and renamed, done by the writer thread off the critical path; MB/s: file bytes; CPU/file: process CPU time per file; % of iter: median vs one {TAFS_ITERATION_S} s TAFS-GRPO iteration)"
    );
    if let Some(dir) = std::env::args().skip(1).find(|a| !a.starts_with("--")) {
        match real_run(Path::new(&dir)) {
            Some((node, s, it, n)) => println!(
                "real run {dir}: median time/{node} = {:.3} ms, median iter_s = {it:.2} s over {n} iterations: {:.3}% of an iteration on the critical path",
                s * 1e3,
                100.0 * s / it
            ),
            None => println!("real run {dir}: no trajectory_sink timings found"),
        }
    }
    let _ = std::fs::remove_dir_all(&root);
}
