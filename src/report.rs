//! `flowrun report RUN_DIR [--out DIR]`: PNG plots of a run's reward, accuracy and loss curves
//! (from `metrics.jsonl`), a sample grid (the newest `sample_eval` grids, else the last
//! transition's states from the newest trajectory Parquet file), and a short text summary.
//! Works on a live run: an unterminated last line of `metrics.jsonl` is ignored.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use nodes::trajectory_sink::arrow::array::{Array, FixedSizeListArray, Float32Array, UInt32Array};
use nodes::trajectory_sink::arrow::compute::cast;
use nodes::trajectory_sink::arrow::datatypes::DataType;
use nodes::world::IMAGE_LEN;
use nodes::world::png::{decode_rgb8, encode_rgb8, image_to_rgb8};

use crate::plot::{self, Canvas, Chart, Series};

/// Size of a single-chart figure.
const FIG_W: usize = 1000;
const FIG_H: usize = 560;
/// Size of one panel of a multi-panel figure.
const PANEL_W: usize = 640;
const PANEL_H: usize = 400;
/// At most this many images of a trajectory file in the sample grid.
const MAX_TRAJ_IMAGES: usize = 64;

/// The rows of a metrics.jsonl: iteration → (key → value); non-numbers are dropped, `null`
/// (a non-finite value) becomes NaN.
pub struct Metrics {
    pub path: PathBuf,
    pub rows: BTreeMap<u64, BTreeMap<String, f64>>,
    /// The file ended in an unterminated line (a run writing it right now): ignored.
    pub partial_last_line: bool,
}

/// Read `<run_dir>/metrics.jsonl`. Errors name the file and the line.
pub fn read_metrics(run_dir: &Path) -> Result<Metrics> {
    if !run_dir.exists() {
        bail!("run directory {} does not exist", run_dir.display());
    }
    if !run_dir.is_dir() {
        bail!(
            "{} is not a directory: give a run directory such as runs/tafs_grpo-20261126-101500",
            run_dir.display()
        );
    }
    let path = run_dir.join("metrics.jsonl");
    if !path.exists() {
        if run_dir.join("pipeline.yaml").exists() {
            bail!(
                "{} not found: the run has not finished its first iteration yet",
                path.display()
            );
        }
        bail!(
            "{} not found: {} is not a flowrun run directory",
            path.display(),
            run_dir.display()
        );
    }
    let bytes = fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let text = String::from_utf8_lossy(&bytes);
    let mut lines: Vec<&str> = text.split('\n').collect();
    // `split` leaves the text after the last '\n': empty for a complete file, else a row
    // still being written.
    let tail = lines.pop().unwrap_or("");
    let partial_last_line = !tail.trim().is_empty();
    let mut rows = BTreeMap::new();
    for (i, line) in lines.iter().enumerate() {
        let n = i + 1;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| {
            let msg = e.to_string();
            let msg = msg.split(" at line ").next().unwrap_or(&msg);
            anyhow!(
                "{}:{n}:{}: malformed metrics row: {msg}",
                path.display(),
                e.column()
            )
        })?;
        let serde_json::Value::Object(obj) = v else {
            bail!("{}:{n}: metrics row is not a JSON object", path.display());
        };
        let it = obj
            .get("iteration")
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| {
                anyhow!(
                    "{}:{n}: metrics row has no integer `iteration`",
                    path.display()
                )
            })?;
        let mut row = BTreeMap::new();
        for (k, v) in obj {
            match v {
                serde_json::Value::Number(x) => {
                    row.insert(k, x.as_f64().unwrap_or(f64::NAN));
                }
                serde_json::Value::Null => {
                    row.insert(k, f64::NAN);
                }
                _ => {}
            }
        }
        // A repeated iteration (should not happen: resume moves old rows out) keeps the last.
        rows.insert(it, row);
    }
    if rows.is_empty() {
        bail!(
            "{} has no complete rows yet: no iteration has finished",
            path.display()
        );
    }
    Ok(Metrics {
        path,
        rows,
        partial_last_line,
    })
}

/// Which figure a metric goes to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Group {
    Reward,
    Accuracy,
    /// Per-category evaluation accuracies sharing a prefix, e.g. `eval/acc_4step`.
    Category(String),
    Loss,
}

/// The figure of `key`, if it is plotted: `*/loss`, `*_loss`; `*/reward_mean`, `*/reward`;
/// anything with `accuracy`, `acc_*` metrics and every metric of an `eval*` node (a
/// breakdown such as `eval/acc_4step/counting` goes to that prefix's category panel).
/// `reward_step*` (step_advantage's copy of the per-step rewards) is a reward only when no
/// `reward_mean` exists (see [`select`]).
pub fn classify(key: &str) -> Option<Group> {
    if matches!(key, "iteration" | "iter_s" | "elapsed_s") || key.starts_with("time/") {
        return None;
    }
    let (node, metric) = key.split_once('/').unwrap_or(("", key));
    let leaf = metric.rsplit('/').next().unwrap_or(metric);
    if leaf == "loss" || leaf.ends_with("_loss") {
        return Some(Group::Loss);
    }
    if matches!(leaf, "reward_mean" | "reward" | "mean_reward") || leaf.starts_with("reward_step") {
        return Some(Group::Reward);
    }
    let node_base = node.split('@').next().unwrap_or(node);
    let acc_like = metric.contains("accuracy") || metric.starts_with("acc_") || metric == "acc";
    if acc_like || node_base.starts_with("eval") {
        return Some(match metric.split_once('/') {
            Some((prefix, _)) => Group::Category(format!("{node}/{prefix}")),
            None => Group::Accuracy,
        });
    }
    None
}

/// Order keys with numbers compared as numbers (`score@2` before `score@10`).
pub fn natural_cmp(a: &str, b: &str) -> Ordering {
    fn chunks(s: &str) -> Vec<(bool, &str)> {
        let mut v = Vec::new();
        let mut start = 0;
        let bytes = s.as_bytes();
        for i in 1..=bytes.len() {
            if i == bytes.len() || bytes[i].is_ascii_digit() != bytes[start].is_ascii_digit() {
                v.push((bytes[start].is_ascii_digit(), &s[start..i]));
                start = i;
            }
        }
        v
    }
    let (ca, cb) = (chunks(a), chunks(b));
    for (x, y) in ca.iter().zip(&cb) {
        let o = match (x, y) {
            ((true, p), (true, q)) => {
                let (p, q) = (p.trim_start_matches('0'), q.trim_start_matches('0'));
                p.len().cmp(&q.len()).then(p.cmp(q))
            }
            ((_, p), (_, q)) => p.cmp(q),
        };
        if o != Ordering::Equal {
            return o;
        }
    }
    ca.len().cmp(&cb.len()).then(a.cmp(b))
}

/// The plotted keys per figure, in natural order.
pub fn select(m: &Metrics) -> BTreeMap<Group, Vec<String>> {
    let mut keys: Vec<String> = m
        .rows
        .values()
        .flat_map(|r| r.keys().cloned())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    keys.sort_by(|a, b| natural_cmp(a, b));
    let has_reward_mean = keys.iter().any(|k| {
        let leaf = k.rsplit('/').next().unwrap_or(k);
        classify(k) == Some(Group::Reward) && !leaf.starts_with("reward_step")
    });
    let mut groups: BTreeMap<Group, Vec<String>> = BTreeMap::new();
    for k in keys {
        let Some(g) = classify(&k) else { continue };
        let leaf = k.rsplit('/').next().unwrap_or(&k);
        if g == Group::Reward && leaf.starts_with("reward_step") && has_reward_mean {
            continue;
        }
        groups.entry(g).or_default().push(k);
    }
    groups
}

fn series(m: &Metrics, key: &str, name: &str) -> Series {
    Series {
        name: name.to_string(),
        points: m
            .rows
            .iter()
            .filter_map(|(it, r)| r.get(key).map(|v| (*it as f64, *v)))
            .collect(),
    }
}

/// A value for the summary table: 4 decimals, or scientific for tiny magnitudes.
fn fmt_value(v: f64) -> String {
    if !v.is_finite() {
        "nan".into()
    } else if v != 0.0 && v.abs() < 1e-3 {
        format!("{v:.3e}")
    } else {
        format!("{v:.4}")
    }
}

/// First and last finite value of a key, with their iterations.
fn first_last(m: &Metrics, key: &str) -> Option<((u64, f64), (u64, f64))> {
    let mut it = m
        .rows
        .iter()
        .filter_map(|(i, r)| r.get(key).filter(|v| v.is_finite()).map(|v| (*i, *v)));
    let first = it.next()?;
    let last = it.next_back().unwrap_or(first);
    Some((first, last))
}

fn write_png(path: &Path, c: &Canvas) -> Result<()> {
    let bytes = encode_rgb8(c.width, c.height, &c.pixels).map_err(|e| anyhow!("{e}"))?;
    runner::fsutil::write_atomic(path, &bytes)
}

/// The run's pipeline name (from run.json), if recorded.
fn run_name(run_dir: &Path) -> Option<String> {
    let text = fs::read_to_string(run_dir.join("run.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["name"].as_str().map(str::to_string)
}

/// What the sample grid shows.
enum Samples {
    Eval {
        iteration: u64,
        steps: Vec<usize>,
    },
    Trajectory {
        file: PathBuf,
        step: u32,
        t_next: f32,
        count: usize,
    },
    None(String),
}

/// `samples/iter-000050-4step.png` → (50, 4).
fn parse_eval_grid(name: &str) -> Option<(u64, usize)> {
    let rest = name.strip_prefix("iter-")?.strip_suffix("step.png")?;
    let (it, steps) = rest.split_once('-')?;
    Some((it.parse().ok()?, steps.parse().ok()?))
}

/// The newest iteration's eval grids, composed side by side with a label above each.
fn eval_grids(run_dir: &Path) -> Result<Option<(Canvas, u64, Vec<usize>)>> {
    let dir = run_dir.join("samples");
    let Ok(entries) = fs::read_dir(&dir) else {
        return Ok(None);
    };
    let mut found: Vec<(u64, usize, PathBuf)> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            parse_eval_grid(&name).map(|(it, s)| (it, s, e.path()))
        })
        .collect();
    let Some(newest) = found.iter().map(|f| f.0).max() else {
        return Ok(None);
    };
    found.retain(|f| f.0 == newest);
    found.sort_by_key(|f| f.1);
    let mut images = Vec::new();
    for (_, steps, path) in &found {
        let bytes = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        match decode_rgb8(&bytes) {
            Ok(img) => images.push((*steps, img)),
            Err(e) => eprintln!("flowrun report: skipping {}: {e}", path.display()),
        }
    }
    if images.is_empty() {
        return Ok(None);
    }
    let (scale, gap, pad) = (2usize, 16usize, 12usize);
    let label_h = plot::LINE_H * scale + 8;
    let head_h = plot::LINE_H * 3 + 2 * pad;
    let width =
        pad * 2 + images.iter().map(|(_, (w, _, _))| *w).sum::<usize>() + gap * (images.len() - 1);
    let height = head_h + label_h + images.iter().map(|(_, (_, h, _))| *h).max().unwrap_or(0) + pad;
    let title = format!("sample_eval grids, iteration {newest}");
    let width = width.max(plot::text_width(&title, 3) + 2 * pad);
    let mut c = Canvas::new(width, height, plot::WHITE);
    c.text(pad as i64, pad as i64, &title, 3, plot::BLACK);
    let mut x = pad;
    for (steps, (w, h, rgb)) in &images {
        let label = format!("{steps} step{}", if *steps == 1 { "" } else { "s" });
        c.text(x as i64, head_h as i64, &label, scale, plot::BLACK);
        c.blit(x as i64, (head_h + label_h) as i64, *w, *h, rgb);
        x += w + gap;
    }
    let steps = images.iter().map(|(s, _)| *s).collect();
    Ok(Some((c, newest, steps)))
}

/// The newest trajectory file's states after the last transition, as a grid.
fn trajectory_grid(run_dir: &Path) -> Result<std::result::Result<(Canvas, Samples), String>> {
    use nodes::trajectory_sink::{DIR, parse_file_name, read_file};
    let dir = run_dir.join(DIR);
    let Ok(entries) = fs::read_dir(&dir) else {
        return Ok(Err(format!(
            "no eval grids in {} and no {}",
            run_dir.join("samples").display(),
            dir.display()
        )));
    };
    let newest = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            parse_file_name(&name).map(|it| (it, e.path()))
        })
        .max_by_key(|(it, _)| *it);
    let Some((_, file)) = newest else {
        return Ok(Err(format!(
            "no eval grids in {} and no trajectory files in {}",
            run_dir.join("samples").display(),
            dir.display()
        )));
    };
    let batch = read_file(&file)?;
    let Some(x_next) = batch.column_by_name("x_next") else {
        return Ok(Err(format!(
            "no eval grids in {}, and {} has no tensor columns (trajectory_sink `tensors: none`)",
            run_dir.join("samples").display(),
            file.display()
        )));
    };
    let bad = |what: &str| anyhow!("{}: column {what} has an unexpected type", file.display());
    let list = x_next
        .as_any()
        .downcast_ref::<FixedSizeListArray>()
        .ok_or_else(|| bad("x_next"))?;
    if list.value_length() as usize != IMAGE_LEN {
        return Err(bad("x_next"));
    }
    let values = cast(list.values(), &DataType::Float32)?;
    let values = values
        .as_any()
        .downcast_ref::<Float32Array>()
        .ok_or_else(|| bad("x_next"))?;
    let step = batch
        .column_by_name("step")
        .and_then(|c| c.as_any().downcast_ref::<UInt32Array>())
        .ok_or_else(|| bad("step"))?;
    let t_next = batch
        .column_by_name("t_next")
        .and_then(|c| c.as_any().downcast_ref::<Float32Array>())
        .ok_or_else(|| bad("t_next"))?;
    let last = step.iter().flatten().max().unwrap_or(0);
    let mut images = Vec::new();
    let mut t = f32::NAN;
    for r in 0..batch.num_rows() {
        if step.is_valid(r) && step.value(r) == last && images.len() < MAX_TRAJ_IMAGES {
            let off = list.value_offset_at(r);
            let img = &values.values()[off..off + IMAGE_LEN];
            images.push(image_to_rgb8(img).map_err(|e| anyhow!("{}: {e}", file.display()))?);
            t = t_next.value(r);
        }
    }
    if images.is_empty() {
        return Ok(Err(format!("{} has no rows", file.display())));
    }
    // 8 columns, 2× nearest-neighbour upscaling, dark gutters.
    let (cols, scale, gutter, pad) = (8usize, 2usize, 2usize, 12usize);
    let cols = cols.min(images.len());
    let rows = images.len().div_ceil(cols);
    let cell = 32 * scale;
    let grid_w = cols * cell + (cols + 1) * gutter;
    let grid_h = rows * cell + (rows + 1) * gutter;
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let title = format!("{name}: x_next of step {last} (t = {t:.2})");
    let width = (grid_w + 2 * pad).max(plot::text_width(&title, 2) + 2 * pad);
    let head = plot::LINE_H * 2 + 2 * pad;
    let mut c = Canvas::new(width, head + grid_h + pad, plot::WHITE);
    c.text(pad as i64, pad as i64, &title, 2, plot::BLACK);
    c.fill_rect(
        pad as i64,
        head as i64,
        grid_w as i64,
        grid_h as i64,
        [32, 32, 32],
    );
    for (k, rgb) in images.iter().enumerate() {
        let ox = pad + gutter + (k % cols) * (cell + gutter);
        let oy = head + gutter + (k / cols) * (cell + gutter);
        for y in 0..cell {
            for x in 0..cell {
                let s = ((y / scale) * 32 + x / scale) * 3;
                c.set(
                    (ox + x) as i64,
                    (oy + y) as i64,
                    [rgb[s], rgb[s + 1], rgb[s + 2]],
                );
            }
        }
    }
    let count = images.len();
    Ok(Ok((
        c,
        Samples::Trajectory {
            file,
            step: last,
            t_next: t,
            count,
        },
    )))
}

/// `flowrun report`: write the figures into `out` (default `<run_dir>/report`) and print a
/// summary.
pub fn run(run_dir: &Path, out: Option<&Path>) -> Result<()> {
    let m = read_metrics(run_dir)?;
    let out = out
        .map(Path::to_path_buf)
        .unwrap_or_else(|| run_dir.join("report"));
    fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let groups = select(&m);

    let first_it = *m.rows.keys().next().unwrap_or(&0);
    let last_it = *m.rows.keys().next_back().unwrap_or(&0);
    let mut written: Vec<String> = Vec::new();
    let mut plotted: Vec<String> = Vec::new();
    let single = |title: &str, y: &str, keys: &[String]| Chart {
        title: title.to_string(),
        x_label: "iteration".into(),
        y_label: y.into(),
        series: keys.iter().map(|k| series(&m, k, k)).collect(),
        x_range: Some((first_it as f64, last_it as f64)),
    };
    for (group, file, title, y) in [
        (
            Group::Reward,
            "rewards.png",
            "Reward (batch mean per iteration)",
            "reward",
        ),
        (Group::Accuracy, "accuracy.png", "Accuracy", "accuracy"),
        (Group::Loss, "loss.png", "Loss", "loss"),
    ] {
        let Some(keys) = groups.get(&group) else {
            continue;
        };
        let chart = single(title, y, keys);
        let path = out.join(file);
        write_png(&path, &plot::render_chart(&chart, FIG_W, FIG_H))?;
        written.push(format!("{} ({} series)", path.display(), keys.len()));
        plotted.extend(keys.iter().cloned());
    }
    let categories: Vec<(&String, &Vec<String>)> = groups
        .iter()
        .filter_map(|(g, k)| match g {
            Group::Category(prefix) => Some((prefix, k)),
            _ => None,
        })
        .collect();
    if !categories.is_empty() {
        let mut cats: Vec<(&String, &Vec<String>)> = categories;
        cats.sort_by(|a, b| natural_cmp(a.0, b.0));
        let charts: Vec<Chart> = cats
            .iter()
            .map(|(prefix, keys)| Chart {
                title: prefix.to_string(),
                x_label: "iteration".into(),
                y_label: "accuracy".into(),
                series: keys
                    .iter()
                    .map(|k| {
                        let short = k
                            .strip_prefix(prefix.as_str())
                            .map(|s| s.trim_start_matches('/'))
                            .unwrap_or(k);
                        series(&m, k, short)
                    })
                    .collect(),
                x_range: Some((first_it as f64, last_it as f64)),
            })
            .collect();
        let path = out.join("accuracy_by_category.png");
        let canvas = plot::render_panels(
            "Evaluation accuracy by category",
            &charts,
            2,
            PANEL_W,
            PANEL_H,
        );
        write_png(&path, &canvas)?;
        written.push(format!("{} ({} panels)", path.display(), charts.len()));
        for (_, keys) in &cats {
            plotted.extend(keys.iter().cloned());
        }
    }

    // Samples: eval grids, else trajectory states, else a note.
    let samples = match eval_grids(run_dir)? {
        Some((c, iteration, steps)) => {
            write_png(&out.join("samples.png"), &c)?;
            Samples::Eval { iteration, steps }
        }
        None => match trajectory_grid(run_dir)? {
            Ok((c, s)) => {
                write_png(&out.join("samples.png"), &c)?;
                s
            }
            Err(why) => Samples::None(why),
        },
    };

    // Summary, printed at once (a closed pipe, `| head`, is not an error).
    let mut t = String::new();
    let name = run_name(run_dir)
        .map(|n| format!(" (pipeline `{n}`)"))
        .unwrap_or_default();
    let _ = writeln!(t, "run: {}{name}", run_dir.display());
    let mut iter_s: Vec<f64> = m
        .rows
        .values()
        .filter_map(|r| r.get("iter_s").copied())
        .filter(|v| v.is_finite())
        .collect();
    iter_s.sort_by(f64::total_cmp);
    let timing = iter_s
        .get(iter_s.len() / 2)
        .map(|v| format!("; median {v:.3} s per iteration"))
        .unwrap_or_default();
    let _ = writeln!(
        t,
        "iterations: {} rows, iteration {first_it} to {last_it}{timing}",
        m.rows.len()
    );
    if m.partial_last_line {
        let _ = writeln!(
            t,
            "note: ignored the incomplete last line of {} (the run is still writing it)",
            m.path.display()
        );
    }
    if plotted.is_empty() {
        let _ = writeln!(
            t,
            "no reward, accuracy or loss metrics in {} (nothing to plot)",
            m.path.display()
        );
    } else {
        let w = plotted.iter().map(|k| k.len()).max().unwrap_or(6).max(6);
        let _ = writeln!(
            t,
            "{:<w$}  {:<20}  last (iteration)",
            "metric", "first (iteration)"
        );
        for k in &plotted {
            let (first, last) = match first_last(&m, k) {
                Some(((i0, v0), (i1, v1))) => (
                    format!("{} ({i0})", fmt_value(v0)),
                    format!("{} ({i1})", fmt_value(v1)),
                ),
                None => ("-".into(), "-".into()),
            };
            let _ = writeln!(t, "{k:<w$}  {first:<20}  {last}");
        }
    }
    let _ = writeln!(t, "wrote:");
    for w in &written {
        let _ = writeln!(t, "  {w}");
    }
    let samples_png = out.join("samples.png");
    let _ = match samples {
        Samples::Eval { iteration, steps } => writeln!(
            t,
            "  {}: sample_eval grids of iteration {iteration} ({} steps)",
            samples_png.display(),
            steps
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Samples::Trajectory {
            file,
            step,
            t_next,
            count,
        } => writeln!(
            t,
            "  {}: {count} states x_next after transition {step} (t = {t_next:.2}) from {} \
             (the run has no sample_eval grids; trajectories store states, not x̂0)",
            samples_png.display(),
            file.display()
        ),
        Samples::None(why) => writeln!(t, "no samples found: {why}"),
    };
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(t.as_bytes()).and_then(|()| stdout.flush());
    Ok(())
}

/// `flowrun compare`: one metric of several runs against wall-clock (or iteration) in one chart,
/// e.g. the final-image reward of TAFS-GRPO and Flow-GRPO against seconds. `keys` are tried in
/// order for each run (runs of different pipelines name their reward differently); `smooth`
/// is a trailing moving average over that many iterations.
pub fn compare(
    runs: &[PathBuf],
    keys: &[String],
    x_key: &str,
    smooth: usize,
    out: &Path,
    title: Option<&str>,
) -> Result<()> {
    if runs.is_empty() || keys.is_empty() {
        bail!("give at least one run directory and one --y metric");
    }
    let mut series = Vec::new();
    for run in runs {
        let m = read_metrics(run)?;
        let Some(key) = keys
            .iter()
            .find(|k| m.rows.values().any(|r| r.contains_key(k.as_str())))
        else {
            bail!(
                "{}: none of the metrics {} is logged (see its metrics.jsonl)",
                m.path.display(),
                keys.join(", ")
            );
        };
        let mut pts = Vec::new();
        let mut window: std::collections::VecDeque<f64> = std::collections::VecDeque::new();
        for (it, row) in &m.rows {
            let x = if x_key == "iteration" {
                *it as f64
            } else {
                match row.get(x_key) {
                    Some(x) => *x,
                    None => bail!("{}: iteration {it} has no `{x_key}`", m.path.display()),
                }
            };
            let Some(y) = row.get(key.as_str()) else {
                continue;
            };
            window.push_back(*y);
            if window.len() > smooth.max(1) {
                window.pop_front();
            }
            pts.push((x, window.iter().sum::<f64>() / window.len() as f64));
        }
        let name = run
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| run.display().to_string());
        println!(
            "{name}: {} points of {key}; last {:.4} at {x_key} = {:.1}",
            pts.len(),
            pts.last().map_or(f64::NAN, |p| p.1),
            pts.last().map_or(f64::NAN, |p| p.0)
        );
        series.push(plot::Series {
            name: format!("{name} ({key})"),
            points: pts,
        });
    }
    let chart = plot::Chart {
        title: title.map_or_else(|| format!("{} vs {x_key}", keys[0]), str::to_string),
        x_label: if x_key == "elapsed_s" {
            "wall-clock (s)".into()
        } else {
            x_key.into()
        },
        y_label: if smooth > 1 {
            format!("mean of last {smooth}")
        } else {
            keys[0].clone()
        },
        series,
        x_range: None,
    };
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    write_png(out, &plot::render_chart(&chart, FIG_W, FIG_H))?;
    println!("wrote {}", out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn should_classify_metric_keys_into_figures() {
        assert_eq!(classify("score@1/reward_mean"), Some(Group::Reward));
        assert_eq!(classify("score@3/accuracy"), Some(Group::Accuracy));
        assert_eq!(classify("eval/acc_4step"), Some(Group::Accuracy));
        assert_eq!(
            classify("eval/acc_4step/counting"),
            Some(Group::Category("eval/acc_4step".into()))
        );
        assert_eq!(classify("update/loss"), Some(Group::Loss));
        assert_eq!(classify("update/pg_loss"), Some(Group::Loss));
        assert_eq!(classify("advantages/reward_step2"), Some(Group::Reward));
        for k in [
            "iteration",
            "iter_s",
            "time/update",
            "update/kl",
            "score@1/crit_count",
        ] {
            assert_eq!(classify(k), None, "{k}");
        }
    }

    #[test]
    fn should_sort_numbers_naturally() {
        let mut v = vec!["score@10/r", "score@2/r", "score@1/r"];
        v.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(v, ["score@1/r", "score@2/r", "score@10/r"]);
        assert_eq!(parse_eval_grid("iter-000050-4step.png"), Some((50, 4)));
        assert_eq!(parse_eval_grid(".iter-000050-4step.png.tmp-1-2"), None);
    }
}
