//! End-to-end tests of the `flowrun` binary on small pipelines of utility nodes.

mod common;
use common::{bin, metrics, only_run_dir, text, tmpdir};

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn write(dir: &Path, name: &str, yaml: &str) -> PathBuf {
    let p = dir.join(name);
    fs::write(&p, yaml).unwrap();
    p
}

const ACC: &str = "name: acc\nseed: 3\niterations: 6\ncheckpoint_every: 1\nresources:\n  acc: {type: accumulator}\nnodes:\n  - id: c\n    type: constant\n    params: {value: 1, slope: 1}\n  - id: f\n    type: fail\n    params: {at: 4}\n    inputs: {x: c.value}\n  - id: keep\n    type: accumulate\n    uses: [acc]\n    inputs: {x: f.y}\n";

#[test]
fn should_run_a_pipeline_and_write_the_run_directory() {
    let dir = tmpdir("run");
    let runs = dir.join("runs");
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/pipelines/valid-sum.yaml");
    let o = bin()
        .arg(&p)
        .arg("--runs-dir")
        .arg(&runs)
        .arg("--quiet")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let rd = only_run_dir(&runs);
    assert!(
        rd.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("valid_sum-")
    );
    let rows = metrics(&rd);
    assert_eq!(rows.len(), 3);
    // total = 1 + (2 + it) per iteration; accumulator starts at 10.
    let totals: Vec<f64> = rows
        .iter()
        .map(|r| r["keep/total"].as_f64().unwrap())
        .collect();
    assert_eq!(totals, vec![14.0, 19.0, 25.0]);
    assert!(rows[0]["time/keep"].as_f64().unwrap() >= 0.0);
    let resolved = fs::read_to_string(rd.join("pipeline.yaml")).unwrap();
    assert!(resolved.contains("valid_sum"));
    assert!(rd.join("checkpoints/latest").exists());
    assert!(rd.join("run.json").exists());
}

#[test]
fn should_record_overrides_in_the_resolved_pipeline() {
    let dir = tmpdir("set");
    let runs = dir.join("runs");
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/pipelines/valid-sum.yaml");
    let o = bin()
        .arg("run")
        .arg(&p)
        .args([
            "--set",
            "iterations=2",
            "--set",
            "nodes.one.params.value=5",
            "--quiet",
            "--runs-dir",
        ])
        .arg(&runs)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let rd = only_run_dir(&runs);
    let rows = metrics(&rd);
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["total/sum"].as_f64(), Some(5.0 + 3.0));
    let resolved = fs::read_to_string(rd.join("pipeline.yaml")).unwrap();
    assert!(
        resolved.contains("# --set nodes.one.params.value=5"),
        "{resolved}"
    );
}

#[test]
fn should_fail_cleanly_then_resume_from_the_last_checkpoint() {
    let dir = tmpdir("resume");
    let runs = dir.join("runs");
    let p = write(&dir, "acc.yaml", ACC);
    let o = bin()
        .arg(&p)
        .arg("--quiet")
        .arg("--runs-dir")
        .arg(&runs)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let out = text(&o);
    assert!(out.contains("node `f` failed at iteration 4"), "{out}");
    assert!(out.contains("flowrun run --resume"), "{out}");
    assert!(
        !out.contains("panicked") && !out.contains("RUST_BACKTRACE"),
        "{out}"
    );
    let rd = only_run_dir(&runs);
    assert_eq!(metrics(&rd).len(), 3);
    // Simulate a kill in the middle of writing checkpoint 4: a half-written temporary directory
    // and a half-written `latest`. The previous checkpoint stays usable and the debris goes.
    let ck = rd.join("checkpoints");
    fs::create_dir_all(ck.join(".tmp-iter-000004-999/resources/acc")).unwrap();
    fs::write(
        ck.join(".tmp-iter-000004-999/resources/acc/total.json"),
        b"{\"tot",
    )
    .unwrap();
    fs::write(ck.join(".latest.tmp-999"), b"iter-0000").unwrap();
    assert_eq!(
        fs::read_to_string(ck.join("latest")).unwrap(),
        "iter-000003"
    );
    // Resume with the failure moved past the end.
    let o = bin()
        .arg("run")
        .arg("--resume")
        .arg(&rd)
        .args(["--set", "nodes.f.params.at=100", "--quiet"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let rows = metrics(&rd);
    let its: Vec<u64> = rows
        .iter()
        .map(|r| r["iteration"].as_u64().unwrap())
        .collect();
    assert_eq!(its, vec![1, 2, 3, 4, 5, 6]);
    // Same totals as an uninterrupted run: sum of (1 + it) = 2+3+...+7 = 27; calls restored.
    assert_eq!(rows[5]["keep/total"].as_f64(), Some(27.0));
    assert_eq!(rows[5]["keep/calls"].as_f64(), Some(6.0));
    let leftovers: Vec<_> = fs::read_dir(&ck)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // keep_checkpoints (default 2) old checkpoints are pruned.
    let kept: Vec<_> = fs::read_dir(&ck)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("iter-"))
        .collect();
    assert_eq!(kept.len(), 2);
}

#[test]
fn should_report_a_node_panic_without_a_backtrace() {
    let dir = tmpdir("panic");
    let runs = dir.join("runs");
    let p = write(
        &dir,
        "p.yaml",
        "name: p\niterations: 3\nnodes:\n  - id: f\n    type: fail\n    params: {at: 2, panic: true}\n",
    );
    let o = bin()
        .arg(&p)
        .arg("--quiet")
        .arg("--runs-dir")
        .arg(&runs)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let out = text(&o);
    assert!(out.contains("deliberate panic at iteration 2"), "{out}");
    assert!(!out.contains("stack backtrace"), "{out}");
}

#[test]
fn should_stop_on_ctrl_c_at_an_iteration_boundary_with_a_checkpoint() {
    let dir = tmpdir("sigint");
    let runs = dir.join("runs");
    let p = write(
        &dir,
        "s.yaml",
        "name: s\niterations: 1000\nnodes:\n  - id: s\n    type: sleep\n    params: {ms: 50}\n",
    );
    let child = bin()
        .arg(&p)
        .arg("--quiet")
        .arg("--runs-dir")
        .arg(&runs)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until it has run a few iterations.
    let start = std::time::Instant::now();
    loop {
        std::thread::sleep(std::time::Duration::from_millis(100));
        let rows = fs::read_dir(&runs)
            .ok()
            .and_then(|mut d| d.next())
            .and_then(|e| e.ok())
            .and_then(|e| fs::read_to_string(e.path().join("metrics.jsonl")).ok())
            .map(|t| t.matches('\n').count())
            .unwrap_or(0);
        if rows >= 3 || start.elapsed().as_secs() > 60 {
            break;
        }
    }
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let out = text(&o);
    assert!(
        out.contains("resume with:") && out.contains("flowrun run --resume"),
        "{out}"
    );
    let rd = only_run_dir(&runs);
    let n = metrics(&rd).len() as u64;
    assert!((3..1000).contains(&n));
    let latest = fs::read_to_string(rd.join("checkpoints/latest")).unwrap();
    assert_eq!(latest.trim(), format!("iter-{n:06}"));
}

#[test]
fn should_exit_2_with_located_errors_for_invalid_pipelines() {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/pipelines/invalid-ports.yaml");
    let o = bin().arg("validate").arg(&p).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    let out = text(&o);
    assert!(out.contains("invalid-ports.yaml:16:"), "{out}");
    assert!(out.contains("4 errors"), "{out}");
    // Running an invalid file refuses before creating anything.
    let dir = tmpdir("invalid-run");
    let o = bin()
        .arg(&p)
        .arg("--runs-dir")
        .arg(dir.join("runs"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(!dir.join("runs").exists());
    // A missing file is an error naming it.
    let o = bin()
        .arg("validate")
        .arg("nope/missing.yaml")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("nope/missing.yaml"));
}

#[test]
fn should_print_the_expanded_graph_and_node_docs() {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/pipelines/valid-repeat.yaml");
    let o = bin()
        .args(["graph", "--format", "mermaid"])
        .arg(&p)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("carry_at_4") && out.contains("side_at_3") && !out.contains("side_at_4"),
        "{out}"
    );
    let o = bin()
        .args(["graph", "--format", "dot"])
        .arg(&p)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stdout).contains("\"carry@3\" -> \"carry@4\""));
    let o = bin().args(["nodes", "sum"]).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("xs") && out.contains("scale") && out.contains("default: 1"),
        "{out}"
    );
    let o = bin().args(["nodes", "summ"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("did you mean `sum`?"));
}

#[test]
fn should_stop_at_the_time_limit_with_a_checkpoint_and_continue_the_clock_on_resume() {
    let dir = tmpdir("timelimit");
    let runs = dir.join("runs");
    let p = write(
        &dir,
        "slow.yaml",
        "name: slow\niterations: 1000\nnodes:\n  - id: s\n    type: sleep\n    params: {ms: 40}\n",
    );
    let o = bin()
        .arg(&p)
        .args([
            "--runs-dir",
            runs.to_str().unwrap(),
            "--quiet",
            "--time-limit",
            "0.3s",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let out = text(&o);
    assert!(out.contains("(time limit reached)"), "{out}");
    assert!(out.contains("flowrun run --resume"), "{out}");
    let rd = only_run_dir(&runs);
    let rows = metrics(&rd);
    let n = rows.len();
    assert!((1..1000).contains(&n), "{n} rows");
    let latest = fs::read_to_string(rd.join("checkpoints/latest")).unwrap();
    assert_eq!(latest.trim(), format!("iter-{n:06}"));
    // The last row is the first past the budget; the one before it was within it.
    assert!(rows[n - 1]["elapsed_s"].as_f64().unwrap() >= 0.3);
    if n > 1 {
        assert!(rows[n - 2]["elapsed_s"].as_f64().unwrap() < 0.3);
    }
    // Resume: the clock continues from the stored elapsed time.
    let o = bin()
        .args([
            "run",
            "--resume",
            rd.to_str().unwrap(),
            "--quiet",
            "--time-limit",
            "0.1",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let rows2 = metrics(&rd);
    assert!(rows2.len() > n);
    let before = rows2[n - 1]["elapsed_s"].as_f64().unwrap();
    let after = rows2[n]["elapsed_s"].as_f64().unwrap();
    assert!(after > before, "elapsed_s restarted: {before} then {after}");
    // A bad duration is a clear CLI error.
    let o = bin()
        .arg(&p)
        .args(["--time-limit", "soon"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("not a positive duration"), "{}", text(&o));
}

#[test]
fn should_write_the_eval_table_as_csv_and_parquet_with_the_same_rows() {
    use arrow::array::{Float64Array, Int64Array, StringArray};
    let dir = tmpdir("eval-table");
    let csv = dir.join("t.csv");
    let pq = dir.join("t.parquet");
    for out in [&csv, &pq] {
        let o = bin()
            .args(["eval", "--steps", "1,2", "--limit", "1", "--csv"])
            .arg(out)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", text(&o));
        assert!(text(&o).contains("heldout"), "{}", text(&o));
    }
    let csv_rows: Vec<String> = fs::read_to_string(&csv)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(csv_rows[0], "category,steps,correct,total,accuracy");
    let file = fs::File::open(&pq).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap();
    let mut pq_rows = Vec::new();
    for b in reader {
        let b = b.unwrap();
        let c = |n: &str| b.column_by_name(n).unwrap().clone();
        let cat = c("category");
        let cat = cat.as_any().downcast_ref::<StringArray>().unwrap();
        let ints: Vec<Int64Array> = ["steps", "correct", "total"]
            .iter()
            .map(|n| c(n).as_any().downcast_ref::<Int64Array>().unwrap().clone())
            .collect();
        let acc = c("accuracy");
        let acc = acc.as_any().downcast_ref::<Float64Array>().unwrap();
        for i in 0..b.num_rows() {
            pq_rows.push(format!(
                "{},{},{},{},{:.4}",
                cat.value(i),
                ints[0].value(i),
                ints[1].value(i),
                ints[2].value(i),
                acc.value(i)
            ));
        }
    }
    // Same model, seed and prompts: the same table both ways; 1 and 2 steps per category.
    assert_eq!(pq_rows, csv_rows[1..].to_vec());
    assert!(pq_rows.len() >= 2 * 7, "{pq_rows:?}");
}
