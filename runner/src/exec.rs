//! Execution: run directories, the concurrent per-iteration scheduler, metrics, checkpoints and
//! resume.
//!
//! Each iteration runs the DAG once. A node starts as soon as all the nodes it reads from have
//! finished, on tokio's blocking pool, so independent nodes (scoring step k and sampling step
//! k+1, say) overlap. Nodes that took under 100 µs last time (glue: sums, constants) run inline
//! on the scheduler thread instead, which keeps the engine's own cost per iteration in the tens
//! of microseconds. A node with `every: N` runs on iterations N, 2N, …; nodes that read an
//! output of a node that did not run are skipped too in that iteration.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use tracing::{info, info_span, warn};

use crate::compile::Pipeline;
use crate::fsutil::{clean_temporaries, sync_dir, write_atomic};
use crate::node::{BuildCtx, Inputs, Node, NodeCtx, Outputs, Registry, SharedResource, Value};
use crate::rundir::{self, LATEST, STATE_FILE};
use crate::tb::{self, TbSink};

/// How to run.
#[derive(Clone)]
pub struct RunOptions {
    /// Directory under which `runs/<name>-<timestamp>/` is created.
    pub runs_root: PathBuf,
    /// Continue the run in this directory from its last checkpoint.
    pub resume: Option<PathBuf>,
    /// Show the progress bar.
    pub progress: bool,
    /// Set to stop at the next iteration boundary (Ctrl-C sets it).
    pub stop: Arc<AtomicBool>,
    /// Text of the original pipeline file and the overrides, recorded in the run directory.
    pub source_name: String,
    pub overrides: Vec<String>,
    /// Listen for Ctrl-C.
    pub handle_ctrl_c: bool,
    /// Stop (with a checkpoint) after the first iteration that ends this many seconds or more
    /// after the run (or the resumed part of it) started: equal wall-clock budgets for
    /// comparisons.
    pub time_limit_s: Option<f64>,
    /// Called once the run directory exists, before the first iteration (the CLI prints where
    /// the run is and how to watch it).
    pub on_start: Option<OnStart>,
    /// The process group of a data-parallel run (None: one process): see [`crate::dist`].
    pub collective: Option<crate::dist::SharedCollective>,
}

/// See [`RunOptions::on_start`].
pub type OnStart = Arc<dyn Fn(&StartInfo) + Send + Sync>;

/// What [`RunOptions::on_start`] is told.
pub struct StartInfo {
    pub run_dir: PathBuf,
    /// The TensorBoard event file this part of the run writes (None: `logging.tensorboard`
    /// is off).
    pub event_file: Option<PathBuf>,
    /// The first iteration this part of the run runs.
    pub first_iteration: u64,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            runs_root: PathBuf::from("runs"),
            resume: None,
            progress: false,
            stop: Arc::new(AtomicBool::new(false)),
            source_name: String::new(),
            overrides: vec![],
            handle_ctrl_c: false,
            time_limit_s: None,
            on_start: None,
            collective: None,
        }
    }
}

/// What a finished (or stopped) run reports.
#[derive(Debug)]
pub struct RunSummary {
    pub run_dir: PathBuf,
    pub last_iteration: u64,
    pub iterations: u64,
    pub stopped_early: bool,
    /// Stopped early because `time_limit_s` was reached.
    pub time_limit_reached: bool,
    pub last_metrics: BTreeMap<String, f64>,
    pub last_checkpoint: Option<PathBuf>,
}

/// A run failure, with the directory and checkpoint to resume from.
#[derive(Debug)]
pub struct RunError {
    pub error: anyhow::Error,
    pub run_dir: Option<PathBuf>,
    pub checkpoint: Option<PathBuf>,
}

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.error)
    }
}

/// Where this run's logs go (set once the run directory exists); the CLI's tracing writer
/// writes here.
pub static RUN_LOG: Mutex<Option<fs::File>> = Mutex::new(None);

struct Runtime {
    pipeline: Pipeline,
    nodes: Vec<Arc<Mutex<Box<dyn Node>>>>,
    resources: Vec<SharedResource>,
    /// For each node: the distinct nodes it reads from.
    deps: Vec<Vec<usize>>,
    dependents: Vec<Vec<usize>>,
    /// For each node: its outputs that another node reads ([`NodeCtx::is_read`]).
    read: Vec<Arc<std::collections::HashSet<&'static str>>>,
    run_dir: PathBuf,
    /// Each node's wall time the last time it ran (∞ before its first run). Nodes that took
    /// less than [`INLINE_BELOW_S`] run inline on the scheduler's thread: a hop to the blocking
    /// pool costs more than they do.
    last_secs: Vec<f64>,
    /// The process group of a data-parallel run.
    collective: Option<crate::dist::SharedCollective>,
}

/// Nodes faster than this (as last measured) skip the blocking pool. Long enough for glue nodes
/// (sums, constants, bookkeeping), far too short for anything that does tensor work, so Ctrl-C
/// and concurrency are unaffected.
const INLINE_BELOW_S: f64 = 100e-6;

/// Run `pipeline` (compiled from the file) with `registry`'s node types.
pub fn run(
    pipeline: Pipeline,
    registry: &Registry,
    opts: RunOptions,
) -> Result<RunSummary, RunError> {
    let err = |e: anyhow::Error, dir: Option<&Path>| RunError {
        error: e,
        run_dir: dir.map(Path::to_path_buf),
        checkpoint: dir.and_then(|d| rundir::newest_verified(d).map(|v| v.dir)),
    };
    let (rank, world) = crate::dist::rank_world(opts.collective.as_ref());
    // The run directory and where a resume continues from, decided by rank 0 (and told to
    // the others) before anything is changed: with no checkpoint that verifies, the run
    // directory is left as it is.
    let opened = match &opts.collective {
        Some(c) if rank != 0 => follow_rank0(c.as_ref(), &opts),
        _ => {
            let opened = open_run_dir(&pipeline, &opts, world);
            match &opts.collective {
                Some(c) => tell_ranks(c.as_ref(), opened),
                None => opened,
            }
        }
    };
    let (run_dir, _lock, resume_point) = match opened {
        Ok(o) => o,
        Err(e) => {
            if let Some(c) = &opts.collective {
                c.report_failure(&format!("{e:#}"));
            }
            return Err(RunError {
                error: e,
                run_dir: None,
                checkpoint: None,
            });
        }
    };
    let rd = Some(run_dir.as_path());
    let mut started = false;
    let result = start_and_run(
        pipeline,
        registry,
        &opts,
        &run_dir,
        resume_point,
        &mut started,
    );
    if let Ok(mut g) = RUN_LOG.lock() {
        *g = None;
    }
    if let (Err(e), Some(c)) = (&result, &opts.collective) {
        // The others' next operation fails naming this rank and why.
        c.report_failure(&format!("{e:#}"));
    }
    match result {
        Ok(s) => Ok(s),
        Err(e) if opts.resume.is_none() && !started && rank == 0 => {
            // A new run that failed while starting (building its nodes, say) leaves nothing
            // behind; one that failed in an iteration keeps its log.
            let _ = fs::remove_dir_all(&run_dir);
            Err(err(e, None))
        }
        Err(e) => Err(err(e, rd)),
    }
}

/// What a run opens: its directory, the lock (rank 0), and where a resume continues from.
type Opened = (
    PathBuf,
    Option<rundir::RunLock>,
    Option<rundir::ResumePoint>,
);

/// Rank 0 (or a single process): create or lock the run directory, find the resume point,
/// and check that the checkpoint was written by a run of as many processes.
fn open_run_dir(pipeline: &Pipeline, opts: &RunOptions, world: usize) -> Result<Opened> {
    let (run_dir, lock) = match &opts.resume {
        Some(d) => (d.clone(), rundir::lock(d)?),
        None => {
            let d = create_run_dir(&opts.runs_root, &pipeline.name)?;
            let lock = rundir::lock(&d)?;
            (d, lock)
        }
    };
    let resume_point = match &opts.resume {
        Some(_) => {
            let r = rundir::resume_point(&run_dir)?;
            for w in &r.warnings {
                warn!("{w}");
            }
            if let Some(ck) = &r.checkpoint {
                let written_by = checkpoint_world(&ck.dir)?;
                if written_by != world {
                    bail!(
                        "checkpoint {} was written by a run of {written_by} process(es), and this one \
                         has {world}: resume it with WORLD_SIZE={written_by} (the sampling split, \
                         the seeds and the trajectory shards depend on it)",
                        ck.dir.display()
                    );
                }
            }
            Some(r)
        }
        None => None,
    };
    Ok((run_dir, Some(lock), resume_point))
}

/// How many processes wrote a checkpoint (`world_size` in its state; 1 before there was any).
fn checkpoint_world(ck: &Path) -> Result<usize> {
    let path = ck.join(STATE_FILE);
    let text =
        fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let state: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", path.display()))?;
    Ok(state["world_size"].as_u64().unwrap_or(1) as usize)
}

/// Rank 0 tells the others what it opened (or why it could not).
fn tell_ranks(c: &dyn crate::dist::Collective, opened: Result<Opened>) -> Result<Opened> {
    let msg = match &opened {
        Ok((dir, _, point)) => serde_json::json!({
            "run_dir": dir.display().to_string(),
            "checkpoint": point.as_ref().and_then(|p| p.checkpoint.as_ref()).map(|v| v.dir.display().to_string()),
        }),
        Err(e) => serde_json::json!({"error": format!("{e:#}")}),
    };
    crate::dist::broadcast_bytes(c, msg.to_string().as_bytes(), 0)?;
    opened
}

/// Ranks other than 0: the run directory and checkpoint rank 0 chose. The checkpoint must be
/// readable here too (a filesystem every rank shares); the run directory is created when this
/// rank's filesystem does not have it (its trajectory shards go there).
fn follow_rank0(c: &dyn crate::dist::Collective, opts: &RunOptions) -> Result<Opened> {
    let bytes = crate::dist::broadcast_bytes(c, &[], 0)?;
    let msg: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| anyhow!("rank 0 sent a malformed start message: {e}"))?;
    if let Some(e) = msg["error"].as_str() {
        bail!("rank 0 could not start the run: {e}");
    }
    let run_dir = PathBuf::from(msg["run_dir"].as_str().unwrap_or_default());
    fs::create_dir_all(&run_dir)
        .with_context(|| format!("rank {} cannot create {}", c.rank(), run_dir.display()))?;
    let resume_point = match (&opts.resume, msg["checkpoint"].as_str()) {
        (None, _) => None,
        (Some(_), None) => Some(rundir::ResumePoint {
            checkpoint: None,
            warnings: vec![],
        }),
        (Some(_), Some(ck)) => {
            let v = rundir::verify(Path::new(ck)).with_context(|| {
                format!(
                    "rank {} cannot read checkpoint {ck}, which rank 0 resumes from: every rank \
                     must see the run directory (put it on a filesystem they share)",
                    c.rank()
                )
            })?;
            Some(rundir::ResumePoint {
                checkpoint: Some(v),
                warnings: vec![],
            })
        }
    };
    Ok((run_dir, None, resume_point))
}

fn start_and_run(
    pipeline: Pipeline,
    registry: &Registry,
    opts: &RunOptions,
    run_dir: &Path,
    resume_point: Option<rundir::ResumePoint>,
    started: &mut bool,
) -> Result<RunSummary> {
    let coll = opts.collective.clone();
    let (rank, world) = crate::dist::rank_world(coll.as_ref());
    let lead = rank == 0;
    let ckdir = run_dir.join("checkpoints");
    if lead {
        fs::create_dir_all(&ckdir).with_context(|| format!("cannot create {}", ckdir.display()))?;
        let cleaned = clean_temporaries(&ckdir) + clean_temporaries(run_dir);
        if cleaned > 0 {
            warn!(
                cleaned,
                "removed leftover temporary files of an interrupted run"
            );
        }
    }
    let log_name = if lead {
        "log.jsonl".to_string()
    } else {
        format!("log.rank-{rank}.jsonl")
    };
    if let Ok(f) = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(run_dir.join(log_name))
        && let Ok(mut g) = RUN_LOG.lock()
    {
        *g = Some(f);
    }
    if !lead {
        // Rank 0 alone writes the run's records.
    } else if opts.resume.is_none() {
        record_run(run_dir, &pipeline, opts, world)?;
    } else {
        // The resolved pipeline of this continuation (it may extend `iterations`, say), still
        // naming the file the run started from.
        let path = run_dir.join("pipeline.yaml");
        let previous = fs::read_to_string(&path).unwrap_or_default();
        let text = resolved_yaml(&pipeline, opts, Some(&previous));
        write_atomic(&path, text.as_bytes())?;
    }

    let mut rt = build(pipeline, registry, run_dir, coll.clone())?;
    let mut start = 1;
    let mut resumed_from = None;
    if let Some(point) = resume_point {
        let it = match &point.checkpoint {
            Some(ck) => {
                if ck.unchecked {
                    warn!(
                        "checkpoint {} was written by an older flowrun without checksums: its files are not verified",
                        ck.dir.display()
                    );
                }
                let it = restore(&mut rt, &ck.dir)?;
                info!(iteration = it, checkpoint = %ck.dir.display(), "resumed");
                resumed_from = Some(ck.dir.clone());
                it
            }
            None => {
                warn!(
                    "no checkpoint in {}; starting from the first iteration",
                    run_dir.display()
                );
                0
            }
        };
        // What came after the checkpoint moves aside; the run writes it again.
        if lead {
            let moved = rundir::supersede_checkpoints_after(run_dir, it)?;
            if moved > 0 {
                warn!(
                    moved,
                    "moved checkpoints after iteration {it} to {}",
                    ckdir.join(rundir::SUPERSEDED).display()
                );
            }
            truncate_metrics(run_dir, it)?;
        }
        for (n, node) in rt.pipeline.nodes.iter().zip(&rt.nodes) {
            node.lock()
                .map_err(|_| anyhow!("node `{}` is poisoned", n.id))?
                .rewind(it)
                .with_context(|| format!("rewinding node `{}` to iteration {it}", n.id))?;
        }
        start = it + 1;
    }

    if let Some(c) = &coll {
        // Every rank starts from rank 0's weights.
        sync_replicas(&rt, c.as_ref(), true)?;
        info!(rank, world, backend = %c.backend(), "data-parallel run: replicas in sync");
    }
    let mut tb_sink = if rt.pipeline.logging.tensorboard && lead {
        let text = fs::read_to_string(run_dir.join("pipeline.yaml")).unwrap_or_default();
        Some(TbSink::start(run_dir, start, &text)?)
    } else {
        None
    };
    let info = StartInfo {
        run_dir: run_dir.to_path_buf(),
        event_file: tb_sink.as_ref().map(|t| t.path().to_path_buf()),
        first_iteration: start,
    };
    info!(
        run_dir = %run_dir.display(),
        first_iteration = start,
        event_file = %info.event_file.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
        "run started"
    );
    if let Some(f) = &opts.on_start {
        f(&info);
    }
    let tokio_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    *started = true;
    let result = tokio_rt.block_on(run_loop(
        &mut rt,
        start,
        resumed_from,
        opts,
        tb_sink.as_mut(),
    ));
    tokio_rt.shutdown_background();
    let result = match (result, &coll) {
        // Rank 0 hosts the rendezvous store: nobody leaves before everyone is done with it.
        (Ok(s), Some(c)) => c.barrier().map(|()| s),
        (r, _) => r,
    };
    if let Some(t) = tb_sink.as_mut() {
        // Whatever was queued is written, also when an iteration failed.
        let written_s = t.finish();
        if let Ok(w) = &written_s {
            info!(
                event_file = %t.path().display(),
                iterations = t.batches,
                critical_path_s = t.queued_s,
                writer_thread_s = *w,
                "TensorBoard event file written"
            );
        }
        if result.is_ok() {
            written_s?;
        }
    }
    result
}

fn create_run_dir(root: &Path, name: &str) -> Result<PathBuf> {
    fs::create_dir_all(root).with_context(|| format!("cannot create {}", root.display()))?;
    let stamp = chrono::Local::now().format("%Y%m%d-%H%M%S");
    for n in 0..1000 {
        let dir = if n == 0 {
            root.join(format!("{name}-{stamp}"))
        } else {
            root.join(format!("{name}-{stamp}-{n}"))
        };
        match fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("cannot create {}", dir.display())),
        }
    }
    bail!(
        "cannot find a free run directory name under {}",
        root.display()
    )
}

/// The resolved pipeline as written into the run directory: a header naming the file the run
/// started from and every override, then the document. On resume, `previous` (the run's own
/// copy) keeps its header: the source stays the original file, and this resume's overrides are
/// added to the ones before.
fn resolved_yaml(p: &Pipeline, opts: &RunOptions, previous: Option<&str>) -> String {
    let mut text = format!(
        "# Resolved pipeline written by flowrun {}\n",
        env!("CARGO_PKG_VERSION")
    );
    let old_header: Vec<&str> = previous
        .map(|t| {
            t.lines()
                .take_while(|l| l.starts_with('#'))
                .filter(|l| l.starts_with("# source: ") || l.starts_with("# --set "))
                .collect()
        })
        .unwrap_or_default();
    if old_header.iter().any(|l| l.starts_with("# source: ")) {
        for l in &old_header {
            text.push_str(l);
            text.push('\n');
        }
        for o in &opts.overrides {
            text.push_str(&format!("# --set {o} (on resume)\n"));
        }
    } else {
        text.push_str(&format!("# source: {}\n", opts.source_name));
        for o in &opts.overrides {
            text.push_str(&format!("# --set {o}\n"));
        }
    }
    text.push_str(&crate::yaml::to_yaml_string(&p.document).unwrap_or_default());
    text
}

fn record_run(dir: &Path, p: &Pipeline, opts: &RunOptions, world: usize) -> Result<()> {
    write_atomic(
        &dir.join("pipeline.yaml"),
        resolved_yaml(p, opts, None).as_bytes(),
    )?;
    let meta = serde_json::json!({
        "name": p.name,
        "source": opts.source_name,
        "overrides": opts.overrides,
        "seed": p.seed,
        "device": p.device,
        "iterations": p.iterations,
        "world_size": world,
        "started": chrono::Local::now().to_rfc3339(),
        "flowrun_version": env!("CARGO_PKG_VERSION"),
        "nodes": p.nodes.iter().map(|n| serde_json::json!({"id": n.id, "type": n.ty, "params": n.params.to_json()})).collect::<Vec<_>>(),
    });
    write_atomic(
        &dir.join("run.json"),
        serde_json::to_string_pretty(&meta)?.as_bytes(),
    )
}

fn build(
    pipeline: Pipeline,
    registry: &Registry,
    run_dir: &Path,
    collective: Option<crate::dist::SharedCollective>,
) -> Result<Runtime> {
    let (rank, world) = crate::dist::rank_world(collective.as_ref());
    let mut resources = Vec::new();
    for r in &pipeline.resources {
        let rt = registry
            .resources
            .get(r.ty)
            .ok_or_else(|| anyhow!("unknown resource type `{}`", r.ty))?;
        let ctx = BuildCtx {
            id: &r.name,
            params: &r.params,
            device: &pipeline.device,
            seed: pipeline.seed,
            run_dir: Some(run_dir),
            step: None,
            rank,
            world,
        };
        let res = (rt.factory)(&ctx).with_context(|| format!("creating resource `{}`", r.name))?;
        resources.push(Arc::new(RwLock::new(res)));
    }
    let mut nodes = Vec::new();
    for n in &pipeline.nodes {
        let nt = registry
            .nodes
            .get(n.ty)
            .ok_or_else(|| anyhow!("unknown node type `{}`", n.ty))?;
        let ctx = BuildCtx {
            id: &n.id,
            params: &n.params,
            device: &pipeline.device,
            seed: pipeline.seed,
            run_dir: Some(run_dir),
            step: n.step.as_ref().map(|(k, c, _)| (*k, *c)),
            rank,
            world,
        };
        let node = (nt.factory)(&ctx).with_context(|| format!("creating node `{}`", n.id))?;
        nodes.push(Arc::new(Mutex::new(node)));
    }
    let count = pipeline.nodes.len();
    let mut deps = vec![Vec::new(); count];
    let mut dependents = vec![Vec::new(); count];
    let mut read = vec![std::collections::HashSet::new(); count];
    for (i, n) in pipeline.nodes.iter().enumerate() {
        for (s, port) in n.inputs.iter().flat_map(|(_, srcs)| srcs.iter()) {
            read[*s].insert(*port);
        }
        let sources = n
            .inputs
            .iter()
            .flat_map(|(_, srcs)| srcs.iter().map(|(s, _)| *s));
        for s in sources.chain(n.after.iter().copied()) {
            if !deps[i].contains(&s) {
                deps[i].push(s);
                dependents[s].push(i);
            }
        }
    }
    Ok(Runtime {
        pipeline,
        nodes,
        resources,
        deps,
        last_secs: vec![f64::INFINITY; count],
        dependents,
        read: read.into_iter().map(Arc::new).collect(),
        run_dir: run_dir.to_path_buf(),
        collective,
    })
}

/// Data-parallel runs: with `broadcast`, every resource takes rank 0's state; then the
/// resources' digests must agree on every rank (an error names the ranks that differ).
fn sync_replicas(rt: &Runtime, c: &dyn crate::dist::Collective, broadcast: bool) -> Result<()> {
    for (r, res) in rt.pipeline.resources.iter().zip(&rt.resources) {
        let mut guard = res
            .write()
            .map_err(|_| anyhow!("resource `{}` is poisoned", r.name))?;
        if broadcast {
            guard
                .broadcast(c)
                .with_context(|| format!("broadcasting resource `{}` from rank 0", r.name))?;
        }
        let digest = guard
            .digest()
            .with_context(|| format!("digest of resource `{}`", r.name))?
            .unwrap_or_default();
        crate::dist::check_same(c, &format!("the state of resource `{}`", r.name), &digest)?;
    }
    Ok(())
}

struct Done {
    idx: usize,
    result: Result<Outputs>,
    metrics: Vec<(String, f64)>,
    /// The metrics the node reduced over the ranks itself.
    global: Vec<String>,
    summaries: Vec<tb::Summary>,
    secs: f64,
}

/// `resumed_from`: the (verified) checkpoint a resume continues from.
async fn run_loop(
    rt: &mut Runtime,
    start: u64,
    resumed_from: Option<PathBuf>,
    opts: &RunOptions,
    mut tb_sink: Option<&mut TbSink>,
) -> Result<RunSummary> {
    let total = rt.pipeline.iterations;
    if opts.handle_ctrl_c {
        let stop = opts.stop.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!(
                    "\nCtrl-C: stopping after this iteration and writing a checkpoint (press again to abort)"
                );
                stop.store(true, Ordering::SeqCst);
                if tokio::signal::ctrl_c().await.is_ok() {
                    eprintln!("aborted; resume from the last checkpoint");
                    std::process::exit(130);
                }
            }
        });
    }
    let bar = if opts.progress {
        let b = indicatif::ProgressBar::new(total);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{prefix} [{elapsed_precise}] {bar:30} {pos}/{len} ({eta}) {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b.set_prefix(rt.pipeline.name.clone());
        b.set_position(start - 1);
        Some(b)
    } else {
        None
    };
    let coll = rt.collective.clone();
    let lead = crate::dist::rank_world(coll.as_ref()).0 == 0;
    let metrics_path = rt.run_dir.join("metrics.jsonl");
    // Rank 0 alone writes the metrics.
    let mut metrics_file = if lead {
        Some(
            fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&metrics_path)
                .with_context(|| format!("cannot open {}", metrics_path.display()))?,
        )
    } else {
        None
    };
    let run_start = Instant::now();
    // `elapsed_s` continues across resumes: wall-clock curves stay comparable.
    let elapsed_before = if start > 1 {
        previous_elapsed(&rt.run_dir)
    } else {
        0.0
    };
    let mut last_metrics = BTreeMap::new();
    let mut last_checkpoint = resumed_from;
    let mut last_done = start - 1;
    let every = rt.pipeline.checkpoint_every;
    for it in start..=total {
        let span = info_span!("iteration", it);
        let _g = span.enter();
        let t0 = Instant::now();
        let (row, node_times, summaries, global) = run_iteration(rt, it).await?;
        let time_up = opts
            .time_limit_s
            .is_some_and(|l| run_start.elapsed().as_secs_f64() >= l);
        let asked = opts.stop.load(Ordering::SeqCst) || time_up;
        // Every rank's metrics, averaged; the ranks stop together.
        let (row, stop) = match &coll {
            Some(c) => crate::dist::merge_iteration(c.as_ref(), &row, &global, asked)
                .with_context(|| format!("iteration {it}: sharing the metrics"))?,
            None => (row, asked),
        };
        let iter_s = t0.elapsed().as_secs_f64();
        let elapsed_s = elapsed_before + run_start.elapsed().as_secs_f64();
        let mut out = serde_json::Map::new();
        out.insert("iteration".into(), it.into());
        out.insert("iter_s".into(), serde_json::json!(iter_s));
        out.insert("elapsed_s".into(), serde_json::json!(elapsed_s));
        last_metrics.clear();
        for (k, v) in &row {
            out.insert(k.clone(), json_num(*v));
            last_metrics.insert(k.clone(), *v);
        }
        for (k, v) in &node_times {
            out.insert(format!("time/{k}"), json_num(*v));
        }
        if let Some(t) = tb_sink.as_deref_mut().filter(|_| lead) {
            // The same keys as the metrics row, against the iteration.
            let mut scalars = Vec::with_capacity(row.len() + node_times.len() + 2);
            scalars.push(("iter_s".to_string(), iter_s));
            scalars.push(("elapsed_s".to_string(), elapsed_s));
            scalars.extend(tb::scalars_of(&row));
            scalars.extend(node_times.iter().map(|(k, v)| (format!("time/{k}"), *v)));
            t.send(tb::Batch {
                step: it,
                wall_time: tb::now_s(),
                scalars,
                summaries,
            })
            // The writer's error names the event file.
            .with_context(|| format!("iteration {it}"))?;
        }
        // One `write_all` of the whole line: a reader tailing the file (a test, `flowrun
        // report` on a live run) sees whole rows, never half of one.
        let line = serde_json::Value::Object(out).to_string();
        if let Some(f) = metrics_file.as_mut() {
            rundir::append_line(
                f,
                &metrics_path,
                &line,
                &format!("iteration {it}'s metrics row"),
            )?;
        }
        info!(iter_s, metrics = %headline(&row), "iteration done");
        last_done = it;
        if let Some(b) = &bar {
            b.set_position(it);
            b.set_message(headline(&row));
        }
        if it == total || stop || (every > 0 && it.is_multiple_of(every)) {
            match &coll {
                None => last_checkpoint = Some(write_checkpoint(rt, it)?),
                Some(c) => {
                    if lead {
                        last_checkpoint = Some(write_checkpoint(rt, it)?);
                    } else {
                        // Rank 0 writes the checkpoint; here the nodes settle what they write
                        // themselves (a trajectory sink drains its queue) as they do for one.
                        quiesce(rt)?;
                        last_checkpoint = Some(
                            rt.run_dir
                                .join("checkpoints")
                                .join(rundir::checkpoint_name(it)),
                        );
                    }
                    // A barrier ends the checkpoint, and the replicas must still agree.
                    sync_replicas(rt, c.as_ref(), false)
                        .with_context(|| format!("checkpoint at iteration {it}"))?;
                }
            }
        }
        if stop && it < total {
            if let Some(b) = &bar {
                b.abandon();
            }
            return Ok(RunSummary {
                run_dir: rt.run_dir.clone(),
                last_iteration: it,
                iterations: total,
                stopped_early: true,
                time_limit_reached: time_up,
                last_metrics,
                last_checkpoint,
            });
        }
    }
    if let Some(b) = &bar {
        b.finish();
    }
    Ok(RunSummary {
        run_dir: rt.run_dir.clone(),
        last_iteration: last_done,
        iterations: total,
        stopped_early: false,
        time_limit_reached: false,
        last_metrics,
        last_checkpoint,
    })
}

fn json_num(v: f64) -> serde_json::Value {
    serde_json::Number::from_f64(v).map_or(serde_json::Value::Null, serde_json::Value::Number)
}

/// A short summary of the metrics a person watches (losses, rewards, accuracies).
fn headline(row: &BTreeMap<String, f64>) -> String {
    let keys = ["loss", "reward_mean", "accuracy", "reward"];
    let mut picked: Vec<String> = row
        .iter()
        .filter(|(k, _)| keys.iter().any(|s| k.ends_with(s)))
        .filter(|(k, _)| !k.contains('@') || k.contains("@last") || is_last_step(k, row))
        .take(4)
        .map(|(k, v)| format!("{k}={}", short_num(*v)))
        .collect();
    if picked.is_empty() {
        picked = row
            .iter()
            .take(3)
            .map(|(k, v)| format!("{k}={}", short_num(*v)))
            .collect();
    }
    picked.join(" ")
}

/// A number for the progress line: 4 decimals in [1e-3, 1e5), scientific notation outside it
/// (so a loss of −2.3e-6 does not show as `-0.0000`).
pub fn short_num(v: f64) -> String {
    let a = v.abs();
    if v == 0.0 || !v.is_finite() || (1e-3..1e5).contains(&a) {
        format!("{v:.4}")
    } else {
        format!("{v:.3e}")
    }
}

fn is_last_step(key: &str, row: &BTreeMap<String, f64>) -> bool {
    // For `node@k/metric`, keep only the highest k present.
    let Some((node, metric)) = key.split_once('/') else {
        return true;
    };
    let Some((base, k)) = node.split_once('@') else {
        return true;
    };
    let k: usize = k.parse().unwrap_or(0);
    !row.keys().any(|o| {
        o.split_once('/').is_some_and(|(n, m)| {
            m == metric
                && n.split_once('@')
                    .is_some_and(|(b, j)| b == base && j.parse::<usize>().unwrap_or(0) > k)
        })
    })
}

/// One iteration's metrics (`node/name`), node wall times and summaries (tags `node/tag`).
type IterationOutput = (
    BTreeMap<String, f64>,
    BTreeMap<String, f64>,
    Vec<tb::Summary>,
    std::collections::BTreeSet<String>,
);

/// Run the DAG once. Returns the metrics (`node/name`), node wall times and summaries.
async fn run_iteration(rt: &mut Runtime, it: u64) -> Result<IterationOutput> {
    let n = rt.nodes.len();
    let mut outputs: Vec<Option<HashMap<String, Value>>> = vec![None; n];
    let mut skipped = vec![false; n];
    let mut pending: Vec<usize> = rt.deps.iter().map(Vec::len).collect();
    // A node's outputs are dropped once every dependent has run (or been skipped), so values
    // (and whatever memory they hold) live no longer than their consumers need them.
    let mut consumers_left: Vec<usize> = rt.dependents.iter().map(Vec::len).collect();
    let release =
        |i: usize, outputs: &mut [Option<HashMap<String, Value>>], consumers_left: &mut [usize]| {
            for &s in &rt.deps[i] {
                consumers_left[s] -= 1;
                if consumers_left[s] == 0 {
                    outputs[s] = None;
                }
            }
        };
    let mut set: tokio::task::JoinSet<Done> = tokio::task::JoinSet::new();
    let mut metrics = BTreeMap::new();
    let mut times = BTreeMap::new();
    let mut summaries = Vec::new();
    let mut global = std::collections::BTreeSet::new();
    let logging = rt.pipeline.logging;
    let images_due = if it.is_multiple_of(logging.image_every) {
        logging.images
    } else {
        0
    };
    let mut finished = 0;
    let mut ready: Vec<usize> = (0..n).filter(|&i| pending[i] == 0).collect();
    let mut inline_done: Vec<Done> = Vec::new();
    loop {
        while let Some(i) = ready.pop() {
            let node = &rt.pipeline.nodes[i];
            // Skip: not this iteration, or a required source did not run.
            let missing_input = node
                .inputs
                .iter()
                .any(|(_, srcs)| srcs.iter().any(|(s, _)| skipped[*s]));
            if !it.is_multiple_of(node.every) || missing_input {
                skipped[i] = true;
                finished += 1;
                release(i, &mut outputs, &mut consumers_left);
                for &d in &rt.dependents[i] {
                    pending[d] -= 1;
                    if pending[d] == 0 {
                        ready.push(d);
                    }
                }
                continue;
            }
            let mut inputs = Inputs {
                values: HashMap::new(),
                node: node.id.clone(),
            };
            for (port, srcs) in &node.inputs {
                let mut vs = Vec::with_capacity(srcs.len());
                for (s, p) in srcs {
                    let v = outputs[*s]
                        .as_ref()
                        .and_then(|o| o.get(*p))
                        .ok_or_else(|| {
                            anyhow!("internal: output {}.{p} missing", rt.pipeline.nodes[*s].id)
                        })?;
                    vs.push(v.clone());
                }
                inputs.values.insert(port, vs);
            }
            let ctx = NodeCtx {
                id: node.id.clone(),
                iteration: it,
                iterations: rt.pipeline.iterations,
                seed: rt.pipeline.seed,
                run_dir: Some(rt.run_dir.clone()),
                resources: node
                    .uses
                    .iter()
                    .map(|(slot, ri, w)| (*slot, (rt.resources[*ri].clone(), *w)))
                    .collect(),
                metrics: Mutex::new(Vec::new()),
                summaries: logging.tensorboard.then(|| Mutex::new(Vec::new())),
                images_due,
                collective: rt.collective.clone(),
                global_metrics: Mutex::new(Vec::new()),
                read: rt.read[i].clone(),
            };
            let handle = rt.nodes[i].clone();
            let span = info_span!("node", id = %node.id, it);
            let job = move || {
                let _g = span.enter();
                let t0 = Instant::now();
                let result = match handle.lock() {
                    Ok(mut node) => node.run(&ctx, &inputs),
                    Err(_) => Err(anyhow!("node state was poisoned by an earlier failure")),
                };
                let metrics = ctx.metrics.into_inner().unwrap_or_default();
                let global = ctx.global_metrics.into_inner().unwrap_or_default();
                let summaries = ctx
                    .summaries
                    .and_then(|m| m.into_inner().ok())
                    .unwrap_or_default();
                Done {
                    idx: i,
                    result,
                    metrics,
                    global,
                    summaries,
                    secs: t0.elapsed().as_secs_f64(),
                }
            };
            if rt.last_secs[i] < INLINE_BELOW_S {
                match std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)) {
                    Ok(d) => inline_done.push(d),
                    Err(p) => bail!("a node panicked at iteration {it}: {}", panic_text(&*p)),
                }
            } else {
                set.spawn_blocking(job);
            }
        }
        let done = if let Some(d) = inline_done.pop() {
            d
        } else {
            if finished == n {
                break;
            }
            let Some(joined) = set.join_next().await else {
                bail!(
                    "internal: scheduler stalled with {} of {n} nodes done",
                    finished
                );
            };
            match joined {
                Ok(d) => d,
                Err(e) if e.is_panic() => {
                    let p = e.into_panic();
                    bail!("a node panicked at iteration {it}: {}", panic_text(&*p));
                }
                Err(e) => bail!("a node task failed at iteration {it}: {e}"),
            }
        };
        rt.last_secs[done.idx] = done.secs;
        let node = &rt.pipeline.nodes[done.idx];
        let outs = done
            .result
            .with_context(|| format!("node `{}` failed at iteration {it}", node.id))?;
        for (k, v) in done.metrics {
            metrics.insert(format!("{}/{k}", node.id), v);
        }
        for k in done.global {
            global.insert(format!("{}/{k}", node.id));
        }
        for mut s in done.summaries {
            let tag = match &mut s {
                tb::Summary::Image { tag, .. }
                | tb::Summary::Histogram { tag, .. }
                | tb::Summary::Text { tag, .. } => tag,
            };
            *tag = format!("{}/{tag}", node.id);
            summaries.push(s);
        }
        times.insert(node.id.clone(), done.secs);
        if !rt.dependents[done.idx].is_empty() {
            outputs[done.idx] = Some(outs.values);
        }
        release(done.idx, &mut outputs, &mut consumers_left);
        finished += 1;
        for &d in &rt.dependents[done.idx] {
            pending[d] -= 1;
            if pending[d] == 0 {
                ready.push(d);
            }
        }
    }
    Ok((metrics, times, summaries, global))
}

/// `elapsed_s` of the last row of a run's metrics.jsonl (0 when there is none).
fn previous_elapsed(run_dir: &Path) -> f64 {
    fs::read_to_string(run_dir.join("metrics.jsonl"))
        .ok()
        .and_then(|t| {
            t.lines()
                .rev()
                .find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        })
        .and_then(|row| row.get("elapsed_s").and_then(|v| v.as_f64()))
        .unwrap_or(0.0)
}

/// The message a panic was raised with.
fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into())
}

fn write_checkpoint(rt: &Runtime, it: u64) -> Result<PathBuf> {
    let ckdir = rt.run_dir.join("checkpoints");
    let name = rundir::checkpoint_name(it);
    let tmp = ckdir.join(format!(".tmp-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    let written = fill_checkpoint(rt, it, &tmp);
    if written.is_err() {
        // A failed checkpoint leaves nothing half-written behind; the previous one stays.
        let _ = fs::remove_dir_all(&tmp);
    }
    written.with_context(|| format!("writing checkpoint {name} into {}", ckdir.display()))?;
    let dest = ckdir.join(&name);
    if dest.exists() {
        rundir::move_aside(&dest, &ckdir.join(rundir::SUPERSEDED))?;
    }
    fs::rename(&tmp, &dest)
        .with_context(|| format!("cannot move checkpoint into {}", dest.display()))?;
    sync_dir(&ckdir);
    write_atomic(&ckdir.join(LATEST), name.as_bytes())?;
    rundir::prune_checkpoints(&ckdir, rt.pipeline.keep_checkpoints, it);
    info!(checkpoint = %dest.display(), "checkpoint written");
    Ok(dest)
}

/// Every resource's files, then `state.json`, then the checksums of them all, into `tmp`.
fn fill_checkpoint(rt: &Runtime, it: u64, tmp: &Path) -> Result<()> {
    fs::create_dir_all(tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    for (r, res) in rt.pipeline.resources.iter().zip(&rt.resources) {
        let d = tmp.join("resources").join(&r.name);
        fs::create_dir_all(&d).with_context(|| format!("cannot create {}", d.display()))?;
        let guard = res
            .read()
            .map_err(|_| anyhow!("resource `{}` is poisoned", r.name))?;
        guard
            .save(&d)
            .with_context(|| format!("saving resource `{}`", r.name))?;
    }
    let mut states = serde_json::Map::new();
    for (n, node) in rt.pipeline.nodes.iter().zip(&rt.nodes) {
        let guard = node
            .lock()
            .map_err(|_| anyhow!("node `{}` is poisoned", n.id))?;
        if let Some(s) = guard.state() {
            states.insert(n.id.clone(), s);
        }
    }
    let state = serde_json::json!({
        "format": rundir::CHECKSUMMED_FORMAT,
        "iteration": it,
        "pipeline": rt.pipeline.name,
        "world_size": crate::dist::rank_world(rt.collective.as_ref()).1,
        "nodes": states,
    });
    write_atomic(
        &tmp.join(STATE_FILE),
        serde_json::to_string_pretty(&state)?.as_bytes(),
    )?;
    rundir::write_checksums(tmp)?;
    sync_dir(tmp);
    Ok(())
}

/// What a checkpoint asks of the nodes on a rank that does not write it: their state, read
/// and dropped (a node finishes what it writes itself before it answers).
fn quiesce(rt: &Runtime) -> Result<()> {
    for (n, node) in rt.pipeline.nodes.iter().zip(&rt.nodes) {
        let guard = node
            .lock()
            .map_err(|_| anyhow!("node `{}` is poisoned", n.id))?;
        let _ = guard.state();
    }
    Ok(())
}

fn restore(rt: &mut Runtime, ck: &Path) -> Result<u64> {
    let text = fs::read_to_string(ck.join(STATE_FILE))
        .with_context(|| format!("cannot read {}", ck.join(STATE_FILE).display()))?;
    let state: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", ck.join(STATE_FILE).display()))?;
    let it = state["iteration"]
        .as_u64()
        .ok_or_else(|| anyhow!("{}: no `iteration`", ck.join(STATE_FILE).display()))?;
    for (r, res) in rt.pipeline.resources.iter().zip(&rt.resources) {
        let d = ck.join("resources").join(&r.name);
        let mut guard = res
            .write()
            .map_err(|_| anyhow!("resource `{}` is poisoned", r.name))?;
        guard
            .load(&d)
            .with_context(|| format!("restoring resource `{}` from {}", r.name, d.display()))?;
    }
    for (n, node) in rt.pipeline.nodes.iter().zip(&rt.nodes) {
        if let Some(s) = state["nodes"].get(&n.id) {
            let mut guard = node
                .lock()
                .map_err(|_| anyhow!("node `{}` is poisoned", n.id))?;
            guard
                .restore(s.clone())
                .with_context(|| format!("restoring node `{}`", n.id))?;
        }
    }
    Ok(it)
}

/// Keep metric rows up to `it`; rows of iterations that will be run again move to
/// `metrics.superseded.jsonl`, so nothing written is lost. A line that is not a whole row (cut
/// off by a crash) is dropped, so both files stay valid JSON Lines.
fn truncate_metrics(run_dir: &Path, it: u64) -> Result<()> {
    let path = run_dir.join("metrics.jsonl");
    let Ok(text) = fs::read_to_string(&path) else {
        return Ok(());
    };
    let mut keep = String::new();
    let mut moved = String::new();
    let mut partial = 0;
    for line in text.lines() {
        if line.trim().is_empty() {
            continue;
        }
        let row_it = serde_json::from_str::<serde_json::Value>(line)
            .ok()
            .map(|v| v["iteration"].as_u64());
        match row_it {
            Some(Some(r)) if r <= it => {
                keep.push_str(line);
                keep.push('\n');
            }
            Some(Some(_)) => {
                moved.push_str(line);
                moved.push('\n');
            }
            _ => partial += 1,
        }
    }
    if partial > 0 {
        warn!(
            partial,
            "dropped line(s) of {} that are not whole metric rows (cut off by a crash or a full disk)",
            path.display()
        );
    }
    if !moved.is_empty() {
        let sup = run_dir.join("metrics.superseded.jsonl");
        let mut f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&sup)
            .with_context(|| format!("cannot open {}", sup.display()))?;
        rundir::append_line(
            &mut f,
            &sup,
            &moved,
            &format!("the metric rows after iteration {it}"),
        )?;
        f.sync_all()
            .with_context(|| format!("cannot write {}", sup.display()))?;
    }
    if !moved.is_empty() || partial > 0 {
        write_atomic(&path, keep.as_bytes())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::{NodeType, PortDef};
    use std::sync::Condvar;
    use std::sync::atomic::AtomicU64;
    use std::time::Duration;

    /// Two-party rendezvous: returns only when a peer arrives in the same round, so a run
    /// succeeds only if the scheduler runs both independent nodes at the same time.
    static ROUND: Mutex<(u64, usize)> = Mutex::new((0, 0));
    static ARRIVED: Condvar = Condvar::new();
    static TICKS: AtomicU64 = AtomicU64::new(0);

    struct Rendezvous;
    impl Node for Rendezvous {
        fn run(&mut self, _: &NodeCtx, _: &Inputs) -> Result<Outputs> {
            let mut g = ROUND.lock().unwrap();
            let round = g.0;
            g.1 += 1;
            if g.1 == 2 {
                *g = (round + 1, 0);
                ARRIVED.notify_all();
            } else {
                let (g2, timeout) = ARRIVED
                    .wait_timeout_while(g, Duration::from_secs(30), |s| s.0 == round)
                    .unwrap();
                drop(g2);
                if timeout.timed_out() {
                    bail!("no peer arrived: independent nodes did not run concurrently");
                }
            }
            // Slow enough (> INLINE_BELOW_S) never to be run inline.
            std::thread::sleep(Duration::from_millis(2));
            Ok(Outputs::new().with("y", 1.0f64))
        }
    }

    struct Tick;
    impl Node for Tick {
        fn run(&mut self, _: &NodeCtx, inputs: &Inputs) -> Result<Outputs> {
            let n: f64 = inputs.all::<f64>("xs")?.iter().map(|x| **x).sum();
            TICKS.fetch_add(1, Ordering::SeqCst);
            Ok(Outputs::new().with("y", n))
        }
    }

    /// Values alive of the type below (one test uses it).
    static PROBES: AtomicU64 = AtomicU64::new(0);

    /// A value that counts its live instances.
    struct Probe;
    impl Probe {
        fn new() -> Self {
            PROBES.fetch_add(1, Ordering::SeqCst);
            Probe
        }
    }
    impl Drop for Probe {
        fn drop(&mut self) {
            PROBES.fetch_sub(1, Ordering::SeqCst);
        }
    }

    struct Emit;
    impl Node for Emit {
        fn run(&mut self, _: &NodeCtx, _: &Inputs) -> Result<Outputs> {
            Ok(Outputs::new().with("y", Probe::new()))
        }
    }

    struct Consume;
    impl Node for Consume {
        fn run(&mut self, _: &NodeCtx, inputs: &Inputs) -> Result<Outputs> {
            inputs.get::<Probe>("x")?;
            Ok(Outputs::new().with("y", 1.0f64))
        }
    }

    /// Fails unless no probe is alive when it runs.
    struct NoProbes;
    impl Node for NoProbes {
        fn run(&mut self, _: &NodeCtx, _: &Inputs) -> Result<Outputs> {
            match PROBES.load(Ordering::SeqCst) {
                0 => Ok(Outputs::new()),
                n => bail!("{n} probe value(s) still alive after their last consumer ran"),
            }
        }
    }

    /// A test node type: no params, resources or docs.
    fn test_node(
        name: &'static str,
        inputs: Vec<PortDef>,
        outputs: Vec<PortDef>,
        factory: crate::node::NodeFactory,
    ) -> NodeType {
        NodeType {
            name,
            summary: "",
            doc: "",
            inputs,
            outputs,
            params: vec![],
            resources: vec![],
            factory,
        }
    }

    fn registry() -> Registry {
        let mut r = Registry::default();
        r.add_node(test_node(
            "emit",
            vec![],
            vec![PortDef::new("y", "probe", "")],
            |_| Ok(Box::new(Emit)),
        ));
        r.add_node(test_node(
            "consume",
            vec![PortDef::new("x", "probe", "")],
            vec![PortDef::new("y", "scalar", "")],
            |_| Ok(Box::new(Consume)),
        ));
        r.add_node(test_node(
            "no_probes",
            vec![PortDef::new("after", "scalar", "")],
            vec![],
            |_| Ok(Box::new(NoProbes)),
        ));
        r.add_node(test_node(
            "rendezvous",
            vec![],
            vec![PortDef::new("y", "scalar", "")],
            |_| Ok(Box::new(Rendezvous)),
        ));
        r.add_node(test_node(
            "tick",
            vec![PortDef::new("xs", "scalar", "").many()],
            vec![PortDef::new("y", "scalar", "")],
            |_| Ok(Box::new(Tick)),
        ));
        r
    }

    #[test]
    fn should_show_small_and_large_values_in_scientific_notation() {
        assert_eq!(short_num(-2.345e-6), "-2.345e-6");
        assert_eq!(short_num(0.1234567), "0.1235");
        assert_eq!(short_num(0.0), "0.0000");
        assert_eq!(short_num(123456.0), "1.235e5");
        assert_eq!(short_num(f64::NAN), "NaN");
        let row = BTreeMap::from([("update/loss".to_string(), -3.2e-5)]);
        assert_eq!(headline(&row), "update/loss=-3.200e-5");
    }

    #[test]
    fn should_run_independent_nodes_concurrently_and_cheap_nodes_every_iteration() {
        let reg = registry();
        let yaml = "name: overlap\niterations: 5\nnodes:\n  - id: a\n    type: rendezvous\n  - id: b\n    type: rendezvous\n  - id: c\n    type: tick\n    inputs: {xs: [a.y, b.y]}\n  - id: d\n    type: tick\n    inputs: {xs: [c.y]}\n";
        let (p, _) = crate::load_str("overlap.yaml", yaml, &[], &reg).expect("valid");
        let root = std::env::temp_dir().join(format!("flowrun-exec-test-{}", std::process::id()));
        let opts = RunOptions {
            runs_root: root.clone(),
            ..Default::default()
        };
        let summary = run(p, &reg, opts).expect("both rendezvous nodes ran at once");
        assert_eq!(
            TICKS.load(Ordering::SeqCst),
            10,
            "c and d ran in every iteration"
        );
        assert_eq!(summary.last_metrics.len(), 0);
        let _ = fs::remove_dir_all(root);
    }

    #[test]
    fn should_drop_a_value_once_its_last_consumer_has_run() {
        let reg = registry();
        let yaml = "name: lifetimes\niterations: 3\nnodes:\n  - id: a\n    type: emit\n  - id: b\n    type: consume\n    inputs: {x: a.y}\n  - id: c\n    type: no_probes\n    inputs: {after: b.y}\n";
        let (p, _) = crate::load_str("lifetimes.yaml", yaml, &[], &reg).expect("valid");
        let root = std::env::temp_dir().join(format!("flowrun-exec-drop-{}", std::process::id()));
        let opts = RunOptions {
            runs_root: root.clone(),
            ..Default::default()
        };
        let r = run(p, &reg, opts);
        let _ = fs::remove_dir_all(root);
        r.expect("a's value was released before c ran");
        assert_eq!(PROBES.load(Ordering::SeqCst), 0);
    }
}
