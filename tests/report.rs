//! End-to-end tests of `flowrun report RUN_DIR [--out DIR]`: PNG plots and a sample grid from a
//! real tiny TAFS-GRPO run, the fallbacks for samples, live (partially written) runs, and the
//! error messages for bad run directories.

mod common;
use common::{bin, only_run_dir, root, text, tmpdir};

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::OnceLock;

use nodes::world::png::decode_rgb8;

/// Colour of the first plotted series (plot::PALETTE[0]).
const FIRST_SERIES: [u8; 3] = [31, 119, 180];
const SINGLE_CHART: (u32, u32) = (1000, 560);

/// A real run of tests/pipelines/valid-tafs-tiny.yaml (4 iterations) with a trajectory sink
/// storing f32 tensors and a `sample_eval` every 2 iterations; shared by the tests.
fn tiny_run() -> &'static Path {
    static RUN: OnceLock<PathBuf> = OnceLock::new();
    RUN.get_or_init(|| {
        let dir = tmpdir("report-run");
        let base = fs::read_to_string(root().join("tests/pipelines/valid-tafs-tiny.yaml")).unwrap();
        let yaml = format!(
            "{base}  - id: sink\n    type: trajectory_sink\n    params: {{tensors: f32}}\n    inputs:\n      transitions: renoise@*.transition\n      rewards: score@*.rewards\n      advantages: advantages.advantages\n      prompts: prompts.prompts\n  - id: eval\n    type: sample_eval\n    every: 2\n    uses: [policy]\n    params: {{steps: [1, 2], limit: 4, grid: 8}}\n"
        );
        let p = dir.join("tiny-report.yaml");
        fs::write(&p, yaml).unwrap();
        let runs = dir.join("runs");
        let o = bin()
            .current_dir(root())
            .arg(&p)
            .args(["--set", "iterations=4", "--quiet", "--runs-dir"])
            .arg(&runs)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", text(&o));
        only_run_dir(&runs)
    })
}

fn report(args: &[&Path]) -> Output {
    let mut c = bin();
    c.arg("report");
    for a in args {
        c.arg(a);
    }
    c.output().unwrap()
}

fn report_out(run: &Path, out: &Path) -> Output {
    bin()
        .arg("report")
        .arg(run)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Checks the PNG signature and the IHDR chunk; returns (width, height) from the header.
fn png_header(path: &Path) -> (u32, u32) {
    let b = fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(b.len() > 33, "{} is too short", path.display());
    assert_eq!(
        &b[..8],
        b"\x89PNG\r\n\x1a\n",
        "{}: signature",
        path.display()
    );
    assert_eq!(&b[8..12], &[0, 0, 0, 13], "{}: IHDR length", path.display());
    assert_eq!(&b[12..16], b"IHDR", "{}: first chunk", path.display());
    let w = u32::from_be_bytes(b[16..20].try_into().unwrap());
    let h = u32::from_be_bytes(b[20..24].try_into().unwrap());
    assert_eq!(b[24], 8, "bit depth");
    (w, h)
}

/// Decoded pixels, checked against the header.
fn pixels(path: &Path) -> (usize, usize, Vec<u8>) {
    let (hw, hh) = png_header(path);
    let (w, h, rgb) = decode_rgb8(&fs::read(path).unwrap()).unwrap();
    assert_eq!((w as u32, h as u32), (hw, hh));
    (w, h, rgb)
}

fn count(rgb: &[u8], c: [u8; 3]) -> usize {
    rgb.chunks(3).filter(|p| *p == c).count()
}

/// Pixels that are neither white (background) nor grey (grid, axes, text).
fn coloured(rgb: &[u8]) -> usize {
    rgb.chunks(3)
        .filter(|p| p[0] != p[1] || p[1] != p[2])
        .count()
}

/// A chart of the given size with a drawn first curve, text and a white background.
fn assert_chart(path: &Path, size: Option<(u32, u32)>) {
    let (w, h, rgb) = pixels(path);
    if let Some(s) = size {
        assert_eq!((w as u32, h as u32), s, "{}", path.display());
    }
    let n = w * h;
    let white = count(&rgb, [255, 255, 255]);
    assert!(white > n / 2, "{}: mostly background", path.display());
    assert!(white < n, "{}: blank", path.display());
    assert!(
        count(&rgb, FIRST_SERIES) > 50,
        "{}: no curve in the first series colour",
        path.display()
    );
    let dark = rgb.chunks(3).filter(|p| p.iter().all(|v| *v < 80)).count();
    assert!(dark > 200, "{}: no axes or labels", path.display());
}

#[test]
fn should_plot_a_real_tiny_run_into_its_report_directory() {
    let run = tiny_run();
    let o = report(&[run]);
    assert!(o.status.success(), "{}", text(&o));
    let out = stdout(&o);
    let dir = run.join("report");
    for f in ["rewards.png", "loss.png", "accuracy.png"] {
        assert_chart(&dir.join(f), Some(SINGLE_CHART));
    }
    assert_chart(&dir.join("accuracy_by_category.png"), None);
    // The summary: iterations and the first/last value of every plotted metric.
    assert!(
        out.contains("iterations: 4 rows, iteration 1 to 4"),
        "{out}"
    );
    for k in [
        "score@1/reward_mean",
        "score@3/reward_mean",
        "update/loss",
        "update/pg_loss",
        "eval/acc_1step",
        "eval/acc_2step/heldout",
    ] {
        let line = out
            .lines()
            .find(|l| l.starts_with(k))
            .unwrap_or_else(|| panic!("{k} not in the summary:\n{out}"));
        assert!(line.contains("(1)") || line.contains("(2)"), "{line}");
        assert!(line.contains("(4)"), "{line}");
    }
    // Timings and per-criterion metrics are not plotted.
    assert!(!out.contains("time/"), "{out}");
    assert!(!out.contains("crit_"), "{out}");
    // The sample grid: the newest eval grids (iteration 4, 1 and 2 steps) side by side.
    assert!(
        out.contains("sample_eval grids of iteration 4 (1, 2 steps)"),
        "{out}"
    );
    let (w, h, rgb) = pixels(&dir.join("samples.png"));
    let (gw, gh, _) = pixels(&run.join("samples/iter-000004-1step.png"));
    assert!(w >= 2 * gw && h > gh, "{w}x{h} for two {gw}x{gh} grids");
    assert!(coloured(&rgb) > gw * gh / 4, "the sample images are drawn");
    // Nothing else (no temporaries) in the report directory.
    let mut names: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "accuracy.png",
            "accuracy_by_category.png",
            "loss.png",
            "rewards.png",
            "samples.png"
        ]
    );
}

#[test]
fn should_render_trajectory_states_when_the_run_has_no_eval_grids() {
    let run = tiny_run();
    let dir = tmpdir("report-traj");
    let copy = dir.join("run");
    fs::create_dir_all(copy.join("trajectories")).unwrap();
    fs::copy(run.join("metrics.jsonl"), copy.join("metrics.jsonl")).unwrap();
    for e in fs::read_dir(run.join("trajectories")).unwrap().flatten() {
        fs::copy(e.path(), copy.join("trajectories").join(e.file_name())).unwrap();
    }
    let out = dir.join("nested/out");
    let o = report_out(&copy, &out);
    assert!(o.status.success(), "{}", text(&o));
    let s = stdout(&o);
    assert!(
        s.contains("16 states x_next after transition 2 (t = 0.33)")
            && s.contains("iter-000004.parquet"),
        "{s}"
    );
    let (w, h, rgb) = pixels(&out.join("samples.png"));
    // 16 samples in 8 columns of 64 px images: at least 8·64 × 2·64 px.
    assert!(w >= 8 * 64 && h >= 2 * 64, "{w}x{h}");
    assert!(coloured(&rgb) > 16 * 64 * 64 / 2, "the states are drawn");
    assert_chart(&out.join("rewards.png"), Some(SINGLE_CHART));
    assert!(!copy.join("report").exists(), "--out is honoured");
}

#[test]
fn should_say_when_no_samples_are_found() {
    let run = tiny_run();
    let dir = tmpdir("report-nosamples");
    fs::copy(run.join("metrics.jsonl"), dir.join("metrics.jsonl")).unwrap();
    let o = report(&[&dir]);
    assert!(o.status.success(), "{}", text(&o));
    let s = stdout(&o);
    assert!(s.contains("no samples found"), "{s}");
    assert!(!dir.join("report/samples.png").exists());
    assert!(dir.join("report/loss.png").exists());

    // Trajectories without tensor columns: said so.
    fs::create_dir_all(dir.join("trajectories")).unwrap();
    let o = report(&[&dir]);
    assert!(stdout(&o).contains("no trajectory files"), "{}", text(&o));
}

/// Synthetic metrics rows: a reward rising from 0 to 1 over `n` iterations, a loss falling.
fn synthetic_rows(n: u64) -> String {
    (1..=n)
        .map(|i| {
            let r = (i - 1) as f64 / (n - 1) as f64;
            format!(
                "{{\"iteration\":{i},\"iter_s\":1.5,\"elapsed_s\":{},\"score@1/reward_mean\":{r},\"update/loss\":{},\"time/update\":0.5,\"update/kl\":null}}\n",
                1.5 * i as f64,
                1.0 - r
            )
        })
        .collect()
}

#[test]
fn should_read_a_live_run_and_ignore_its_unterminated_last_line() {
    let dir = tmpdir("report-live");
    let mut m = synthetic_rows(20);
    m.push_str("{\"iteration\":21,\"iter_s\":1.5,\"score@1/rew");
    fs::write(dir.join("metrics.jsonl"), m).unwrap();
    let o = report(&[&dir]);
    assert!(o.status.success(), "{}", text(&o));
    let s = stdout(&o);
    assert!(s.contains("20 rows, iteration 1 to 20"), "{s}");
    assert!(s.contains("incomplete last line"), "{s}");
    assert!(s.contains("median 1.500 s per iteration"), "{s}");
    let line = s
        .lines()
        .find(|l| l.starts_with("score@1/reward_mean"))
        .unwrap();
    assert!(
        line.contains("0.0000 (1)") && line.contains("1.0000 (20)"),
        "{line}"
    );
    // The rising reward is drawn rising: its pixels on the right sit higher than on the left.
    let (w, _, rgb) = pixels(&dir.join("report/rewards.png"));
    let ys = |from: usize, to: usize| -> f64 {
        let v: Vec<usize> = rgb
            .chunks(3)
            .enumerate()
            .filter(|(i, p)| *p == FIRST_SERIES && (from..to).contains(&(i % w)))
            .map(|(i, _)| i / w)
            .collect();
        assert!(!v.is_empty(), "no curve pixels in columns {from}..{to}");
        v.iter().sum::<usize>() as f64 / v.len() as f64
    };
    // Legend swatches are right of the plot area (x > 3/4 of the width): left out.
    let left = ys(w / 8, w / 3);
    let right = ys(w / 2, 2 * w / 3);
    assert!(right < left, "mean y left {left}, right {right}");
    assert_chart(&dir.join("report/loss.png"), Some(SINGLE_CHART));
    assert!(
        !dir.join("report/accuracy.png").exists(),
        "no accuracy keys"
    );
}

fn assert_fails(o: &Output, expect: &[&str]) {
    assert!(!o.status.success(), "{}", text(o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.starts_with("flowrun: error: "), "{err}");
    for e in expect {
        assert!(err.contains(e), "expected {e:?} in: {err}");
    }
    assert!(
        !err.contains("panicked") && !err.contains("internal error"),
        "{err}"
    );
}

#[test]
fn should_report_clear_errors_for_bad_run_directories() {
    let dir = tmpdir("report-errors");

    let missing = dir.join("nope");
    assert_fails(
        &report(&[&missing]),
        &[&format!(
            "run directory {} does not exist",
            missing.display()
        )],
    );

    let file = dir.join("file.txt");
    fs::write(&file, "x").unwrap();
    assert_fails(&report(&[&file]), &["is not a directory"]);

    let empty = dir.join("empty");
    fs::create_dir_all(&empty).unwrap();
    assert_fails(
        &report(&[&empty]),
        &["metrics.jsonl not found", "is not a flowrun run directory"],
    );

    let started = dir.join("started");
    fs::create_dir_all(&started).unwrap();
    fs::write(started.join("pipeline.yaml"), "name: x\n").unwrap();
    assert_fails(
        &report(&[&started]),
        &[
            "metrics.jsonl not found",
            "not finished its first iteration",
        ],
    );

    let bad = dir.join("bad");
    fs::create_dir_all(&bad).unwrap();
    let path = bad.join("metrics.jsonl");
    let rows = synthetic_rows(3);
    let mut lines: Vec<&str> = rows.lines().collect();
    lines.insert(1, "{\"iteration\": 2, \"x\": ");
    fs::write(&path, lines.join("\n") + "\n").unwrap();
    assert_fails(
        &report(&[&bad]),
        &[&format!("{}:2:", path.display()), "malformed metrics row"],
    );

    fs::write(&path, "{\"iter_s\": 1.0}\n").unwrap();
    assert_fails(
        &report(&[&bad]),
        &[&format!(
            "{}:1: metrics row has no integer `iteration`",
            path.display()
        )],
    );

    fs::write(&path, "[1, 2]\n").unwrap();
    assert_fails(
        &report(&[&bad]),
        &[&format!(
            "{}:1: metrics row is not a JSON object",
            path.display()
        )],
    );

    // Only a row still being written: nothing complete yet.
    fs::write(&path, "{\"iteration\": 1, \"it").unwrap();
    assert_fails(&report(&[&bad]), &["has no complete rows yet"]);
    assert!(!bad.join("report").exists());
}

#[test]
fn should_compare_one_metric_of_several_runs_against_wall_clock() {
    let dir = tmpdir("report-compare");
    // Two runs of different pipelines: their rewards have different names.
    let a = dir.join("tafs");
    let b = dir.join("flow");
    fs::create_dir_all(&a).unwrap();
    fs::create_dir_all(&b).unwrap();
    let mut ta = String::new();
    let mut tb = String::new();
    for i in 1..=20 {
        ta.push_str(&format!(
            "{{\"iteration\":{i},\"elapsed_s\":{},\"score@4/reward_mean\":{}}}\n",
            2.0 * i as f64,
            0.3 + 0.02 * i as f64
        ));
        tb.push_str(&format!(
            "{{\"iteration\":{i},\"elapsed_s\":{},\"score/reward_mean\":{}}}\n",
            6.0 * i as f64,
            0.3 + 0.01 * i as f64
        ));
    }
    fs::write(a.join("metrics.jsonl"), ta).unwrap();
    fs::write(b.join("metrics.jsonl"), tb).unwrap();
    let out = dir.join("plots/cmp.png");
    let o = bin()
        .arg("compare")
        .args([&a, &b])
        .args([
            "--y",
            "score@4/reward_mean",
            "--y",
            "score/reward_mean",
            "--smooth",
            "3",
        ])
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let s = stdout(&o);
    assert!(s.contains("tafs: 20 points of score@4/reward_mean"), "{s}");
    assert!(s.contains("flow: 20 points of score/reward_mean"), "{s}");
    // Trailing mean of the last 3 at iteration 20: (0.68 + 0.70 + 0.66) / 3.
    assert!(s.contains("last 0.6800 at elapsed_s = 40.0"), "{s}");
    assert_chart(&out, Some((1000, 560)));
    let (_, _, rgb) = pixels(&out);
    assert!(count(&rgb, FIRST_SERIES) > 50 && count(&rgb, [255, 127, 14]) > 50);
    // A metric neither run logs: a clear error naming the file.
    let o = bin()
        .arg("compare")
        .arg(&a)
        .args(["--y", "nope", "--out"])
        .arg(dir.join("x.png"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("metrics.jsonl: none of the metrics nope is logged"),
        "{}",
        text(&o)
    );
    assert!(!text(&o).contains("panicked"));
}
