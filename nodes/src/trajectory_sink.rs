//! `trajectory_sink`: stores every sampled policy step of an iteration as one Parquet file,
//! `<run_dir>/trajectories/iter-000123.parquet`, written off the critical path by a writer
//! thread the node owns. The column layout is documented in `docs/trajectories.md` and in the
//! node's doc (`flowrun nodes trajectory_sink`).

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use anyhow::{Context, Result, anyhow, bail};
use arrow::array::{
    ArrayRef, BooleanArray, FixedSizeListArray, Float32Array, StringArray, UInt32Array, UInt64Array,
};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, Encoding, ZstdLevel};
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;
use runner::fsutil::{clean_temporaries, sync_dir, write_atomic_with};
use runner::{Inputs, Node, NodeCtx, NodeType, Outputs, ParamDef, PortDef, Registry};

use crate::types::{Advantages, PromptBatch, Rewards, Transition, to_vec};
use crate::world::CRITERIA;

/// The Arrow and Parquet crates the files are written with (for readers and tests).
pub use arrow;
pub use parquet;

/// Name of the trajectory directory inside a run directory.
pub const DIR: &str = "trajectories";
/// Shape of one stored ShapeWorld state, [C, H, W]; a latent-space model's states are stored
/// with their own shape (e.g. [16, 64, 64]), named in the columns' extension metadata.
pub const TENSOR_SHAPE: [usize; 3] = [3, 32, 32];
/// The canonical Arrow extension type of the tensor columns.
pub const TENSOR_EXTENSION: &str = "arrow.fixed_shape_tensor";
/// The extension metadata of ShapeWorld's tensor columns ([`tensor_metadata`] of
/// [`TENSOR_SHAPE`]).
pub const TENSOR_EXTENSION_METADATA: &str = r#"{"shape":[3,32,32],"dim_names":["C","H","W"]}"#;

/// The `arrow.fixed_shape_tensor` extension metadata of states of `shape` [C, H, W].
pub fn tensor_metadata(shape: [usize; 3]) -> String {
    format!(
        r#"{{"shape":[{},{},{}],"dim_names":["C","H","W"]}}"#,
        shape[0], shape[1], shape[2]
    )
}
/// Where rolled-back files go on resume (ignored by pyarrow datasets: `_` prefix).
pub const SUPERSEDED_DIR: &str = "_superseded";

pub const DOC: &str = "Writes one Parquet file per iteration, <run_dir>/trajectories/iter-000123.parquet,\n\
with one row per (sample, transition step), sample-major. A file is written to a hidden\n\
temporary (.iter-000123.parquet.tmp-<pid>-<n>) in the same directory, closed, fsynced and renamed,\n\
so readers and `*.parquet` globs only ever see complete files; leftovers of a crash are\n\
removed when the node is built. Writing runs on a writer thread owned by the node (bounded\n\
queue of `queue` iterations); a write error fails the next iteration. Checkpoints wait for\n\
the queue to drain, and the last file is flushed when the run ends. On resume, files of\n\
iterations after the checkpoint move to trajectories/_superseded/ and are written again.\n\
In a data-parallel run (WORLD_SIZE > 1) each rank writes its own shard,\n\
iter-000123.rank-R.parquet, with global `sample` and `group`: one glob reads them as one dataset.\n\
\n\
Columns (the same in every file; see docs/trajectories.md):\n\
  run_id string         run directory name\n\
  iteration uint64      training iteration\n\
  prompt_id string, prompt string, category string\n\
  group uint32          prompt index in the batch (GRPO group)\n\
  sample uint32         index in the batch\n\
  member uint32         index within the group\n\
  step uint32           transition k (1-based): x_{t_k} -> x_{t_{k+1}}\n\
  t, t_next float32     timesteps of the transition\n\
  temperature float32   tau (TAFS) or noise level (Flow-GRPO SDE)\n\
  reward float32        reward of the prediction after the transition (rewards[k] with\n\
                        K = transitions + 1 per-step rewards), else the final reward\n\
  reward_before float32 reward of the prediction before it (rewards[k-1]); null with a\n\
                        final reward only\n\
  advantage float32     advantage of the transition as given to the update\n\
  trained bool          whether the update trains this (sample, transition): false for the\n\
                        duplicate rows of a tree rollout's shared nodes (BranchGRPO), else true\n\
  old_logprob float32   log pi_old(x_next | x_t), mean over dimensions\n\
  kl float32            always null: not known at sampling time (logged by grpo_update)\n\
  sampler string        `tafs` or `flow_sde`\n\
  cfg float32           classifier-free guidance scale\n\
  kernel_a, kernel_b, kernel_std float32   the Gaussian step x_next ~ N(a x_t + b v, std^2)\n\
  crit_objects, crit_count, crit_color, crit_position, crit_no_extra bool (nullable)\n\
                        verifier criteria of the matching reward; null when not applicable\n\
                        or the reward has no criteria\n\
  correct bool (nullable)  whether the matching reward's sample is fully correct\n\
  x_t, x_next           only with `tensors: f32|f16`: FixedSizeList<float32|float16, C·H·W>,\n\
                        Arrow extension arrow.fixed_shape_tensor with the states' shape\n\
                        [C, H, W]: [3, 32, 32] for ShapeWorld, the latents' for SD3\n\
Compression zstd; tensor columns BYTE_STREAM_SPLIT, no dictionary, no statistics.";

pub fn register(r: &mut Registry) {
    r.add_node(NodeType {
        name: "trajectory_sink",
        summary: "store each iteration's transitions, rewards and advantages as Parquet",
        doc: DOC,
        inputs: vec![
            PortDef::new("transitions", "transition", "the sampled policy steps, in step order")
                .many(),
            PortDef::new(
                "rewards",
                "rewards",
                "rewards of each step's prediction in step order (K = transitions + 1), or one final reward",
            )
            .many(),
            PortDef::new("advantages", "advantages", "one advantage per transition and sample"),
            PortDef::new("prompts", "prompts", "the batch's prompts"),
        ],
        outputs: vec![],
        params: vec![
            ParamDef::choice(
                "tensors",
                "none",
                &["none", "f32", "f16"],
                "store the states x_t and x_next (needed by parquet_source), as float32 or float16",
            ),
            ParamDef::int(
                "queue",
                2,
                1,
                1024,
                "iterations that may wait for the writer thread before `run` blocks",
            ),
            ParamDef::int(
                "zstd_level",
                3,
                1,
                22,
                "zstd compression level",
            ),
        ],
        resources: vec![],
        factory: |ctx| {
            let p = ctx.params;
            let tensors = TensorMode::parse(p.str("tensors")?)?;
            let run_dir = ctx
                .run_dir
                .ok_or_else(|| anyhow!("trajectory_sink needs a run directory"))?;
            TrajectorySink::new_sharded(
                run_dir,
                tensors,
                p.usize("queue")?,
                p.i64("zstd_level")? as i32,
                (ctx.rank, ctx.world),
            )
            .map(|s| Box::new(s) as Box<dyn Node>)
        },
    });
}

/// How the tensor columns are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorMode {
    None,
    F32,
    F16,
}

impl TensorMode {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "none" => TensorMode::None,
            "f32" => TensorMode::F32,
            "f16" => TensorMode::F16,
            other => bail!("unknown tensor storage `{other}` (none, f32, f16)"),
        })
    }
    fn value_type(self) -> Option<DataType> {
        match self {
            TensorMode::None => None,
            TensorMode::F32 => Some(DataType::Float32),
            TensorMode::F16 => Some(DataType::Float16),
        }
    }
}

/// The file name of an iteration's trajectories.
pub fn file_name(iteration: u64) -> String {
    format!("iter-{iteration:06}.parquet")
}

/// The file name of rank `rank`'s shard of an iteration's trajectories in a run of `world`
/// processes (`iter-000123.rank-1.parquet`; [`file_name`] for a single process).
pub fn shard_file_name(iteration: u64, rank: usize, world: usize) -> String {
    if world <= 1 {
        file_name(iteration)
    } else {
        format!("iter-{iteration:06}.rank-{rank}.parquet")
    }
}

/// The iteration and rank (None: a single-process file) of a trajectory file name.
pub fn parse_shard_name(name: &str) -> Option<(u64, Option<usize>)> {
    let stem = name.strip_prefix("iter-")?.strip_suffix(".parquet")?;
    match stem.split_once(".rank-") {
        Some((it, r)) => Some((it.parse().ok()?, Some(r.parse().ok()?))),
        None => Some((stem.parse().ok()?, None)),
    }
}

/// Read a whole trajectory file into one record batch (errors name the file).
pub fn read_file(path: &Path) -> Result<RecordBatch> {
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let r = (|| -> Result<RecordBatch> {
        let f = fs::File::open(path)?;
        let builder = ParquetRecordBatchReaderBuilder::try_new(f)?;
        let schema = builder.schema().clone();
        let batches = builder.build()?.collect::<Result<Vec<_>, _>>()?;
        Ok(arrow::compute::concat_batches(&schema, &batches)?)
    })();
    r.with_context(|| format!("cannot read trajectory file {}", path.display()))
}

/// The iteration of a trajectory file name (`iter-000123.parquet`, or a rank's shard
/// `iter-000123.rank-1.parquet`).
pub fn parse_file_name(name: &str) -> Option<u64> {
    parse_shard_name(name).map(|(it, _)| it)
}

/// The field of a tensor column of states of `shape` [C, H, W]: FixedSizeList<value, C·H·W>
/// with the canonical `arrow.fixed_shape_tensor` extension metadata (written by hand: pyarrow
/// rejects the `permutations: null` that arrow-rs's own extension type writes).
pub fn tensor_field(name: &str, value: DataType, shape: [usize; 3]) -> Field {
    let item = Arc::new(Field::new("item", value, true));
    let len = shape.iter().product::<usize>() as i32;
    Field::new(name, DataType::FixedSizeList(item, len), false).with_metadata(HashMap::from([
        (
            "ARROW:extension:name".to_string(),
            TENSOR_EXTENSION.to_string(),
        ),
        (
            "ARROW:extension:metadata".to_string(),
            tensor_metadata(shape),
        ),
    ]))
}

/// The scalar columns, in file order: (name, type, nullable).
pub fn scalar_columns() -> Vec<(&'static str, DataType, bool)> {
    use DataType::*;
    let mut v = vec![
        ("run_id", Utf8, false),
        ("iteration", UInt64, false),
        ("prompt_id", Utf8, false),
        ("prompt", Utf8, false),
        ("category", Utf8, false),
        ("group", UInt32, false),
        ("sample", UInt32, false),
        ("member", UInt32, false),
        ("step", UInt32, false),
        ("t", Float32, false),
        ("t_next", Float32, false),
        ("temperature", Float32, false),
        ("reward", Float32, false),
        ("reward_before", Float32, true),
        ("advantage", Float32, false),
        ("trained", Boolean, false),
        ("old_logprob", Float32, false),
        ("kl", Float32, true),
        ("sampler", Utf8, false),
        ("cfg", Float32, false),
        ("kernel_a", Float32, false),
        ("kernel_b", Float32, false),
        ("kernel_std", Float32, false),
    ];
    for c in CRITERIA_COLUMNS {
        v.push((c, Boolean, true));
    }
    v.push(("correct", Boolean, true));
    v
}

/// `crit_<name>` for each verifier criterion, in [`CRITERIA`] order.
pub const CRITERIA_COLUMNS: [&str; 5] = [
    "crit_objects",
    "crit_count",
    "crit_color",
    "crit_position",
    "crit_no_extra",
];

/// The schema of a ShapeWorld trajectory file.
pub fn schema(tensors: TensorMode) -> SchemaRef {
    schema_for(tensors, TENSOR_SHAPE)
}

/// The schema of a trajectory file whose states are of `shape` [C, H, W].
pub fn schema_for(tensors: TensorMode, shape: [usize; 3]) -> SchemaRef {
    let mut fields: Vec<Field> = scalar_columns()
        .into_iter()
        .map(|(n, t, null)| Field::new(n, t, null))
        .collect();
    if let Some(vt) = tensors.value_type() {
        fields.push(tensor_field("x_t", vt.clone(), shape));
        fields.push(tensor_field("x_next", vt, shape));
    }
    Arc::new(Schema::new(fields))
}

/// Writer properties: zstd; tensor leaves byte-stream-split, no dictionary, no statistics.
pub fn writer_properties(tensors: TensorMode, zstd_level: i32) -> Result<WriterProperties> {
    let mut b = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(zstd_level)?))
        .set_created_by(format!(
            "flowrun {} trajectory_sink",
            env!("CARGO_PKG_VERSION")
        ));
    if tensors != TensorMode::None {
        for col in ["x_t", "x_next"] {
            let path = ColumnPath::from(vec![col.to_string(), "list".into(), "item".into()]);
            b = b
                .set_column_encoding(path.clone(), Encoding::BYTE_STREAM_SPLIT)
                .set_column_dictionary_enabled(path.clone(), false)
                .set_column_statistics_enabled(path, EnabledStatistics::None);
        }
    }
    Ok(b.build())
}

/// One iteration's data, handed to the writer thread (tensors are copied to the host there).
struct Job {
    iteration: u64,
    transitions: Vec<Transition>,
    rewards: Vec<Rewards>,
    advantages: Advantages,
    prompts: PromptBatch,
}

/// Shared between the node and its writer thread.
#[derive(Default)]
struct Shared {
    state: Mutex<WriterState>,
    idle: Condvar,
}

#[derive(Default)]
struct WriterState {
    /// Jobs sent and not finished yet.
    pending: usize,
    /// The first write error, reported by the next `run` (or `flush`).
    error: Option<anyhow::Error>,
    /// The last iteration whose file was written.
    written: u64,
}

pub struct TrajectorySink {
    dir: PathBuf,
    tx: Option<SyncSender<Job>>,
    thread: Option<JoinHandle<()>>,
    shared: Arc<Shared>,
    /// The last iteration handed to the writer.
    last: u64,
    /// (rank, world) of a data-parallel run: each rank writes its own shard.
    shard: (usize, usize),
}

impl TrajectorySink {
    /// Create the node writing into `<run_dir>/trajectories` (leftover temporaries are removed).
    pub fn new(run_dir: &Path, tensors: TensorMode, queue: usize, zstd_level: i32) -> Result<Self> {
        Self::new_sharded(run_dir, tensors, queue, zstd_level, (0, 1))
    }

    /// [`new`](Self::new) for rank `shard.0` of a run of `shard.1` processes: it writes
    /// `iter-NNNNNN.rank-R.parquet` ([`shard_file_name`]) with global `sample` and `group`.
    pub fn new_sharded(
        run_dir: &Path,
        tensors: TensorMode,
        queue: usize,
        zstd_level: i32,
        shard: (usize, usize),
    ) -> Result<Self> {
        let dir = run_dir.join(DIR);
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let cleaned = clean_temporaries(&dir);
        if cleaned > 0 {
            tracing::warn!(
                cleaned,
                dir = %dir.display(),
                "removed leftover temporary trajectory files of an interrupted run"
            );
        }
        let run_id = run_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let props = writer_properties(tensors, zstd_level)?;
        let shared = Arc::new(Shared::default());
        let (tx, rx) = sync_channel::<Job>(queue.max(1));
        let w = Writer {
            dir: dir.clone(),
            run_id,
            tensors,
            props,
            shard,
        };
        let sh = shared.clone();
        let thread = std::thread::Builder::new()
            .name("trajectory-writer".into())
            .spawn(move || writer_loop(w, rx, sh))
            .context("cannot start the trajectory writer thread")?;
        Ok(TrajectorySink {
            dir,
            tx: Some(tx),
            thread: Some(thread),
            shared,
            last: 0,
            shard,
        })
    }

    /// Take the writer's first error, if any.
    fn take_error(&self) -> Result<()> {
        let mut st = self
            .shared
            .state
            .lock()
            .map_err(|_| anyhow!("trajectory writer state poisoned"))?;
        match st.error.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Wait until every queued file is written (without reporting errors).
    fn wait_idle(&self) {
        let Ok(mut st) = self.shared.state.lock() else {
            return;
        };
        while st.pending > 0 {
            st = match self.shared.idle.wait(st) {
                Ok(s) => s,
                Err(_) => return,
            };
        }
    }

    /// Block until every queued iteration's file is on disk; reports a write error.
    pub fn flush(&self) -> Result<()> {
        self.wait_idle();
        self.take_error()
    }

    /// Stop the writer thread after it has written everything queued.
    pub fn finish(&mut self) -> Result<()> {
        self.tx.take();
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            bail!("the trajectory writer thread panicked");
        }
        self.take_error()
    }

    /// The directory the files go to.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Queue one iteration's file.
    pub fn write(
        &mut self,
        iteration: u64,
        transitions: Vec<Transition>,
        rewards: Vec<Rewards>,
        advantages: Advantages,
        prompts: PromptBatch,
    ) -> Result<()> {
        self.take_error()?;
        check_shapes(&transitions, &rewards, &advantages, &prompts)?;
        let tx = self
            .tx
            .as_ref()
            .ok_or_else(|| anyhow!("the trajectory writer was stopped"))?;
        if let Ok(mut st) = self.shared.state.lock() {
            st.pending += 1;
        }
        let job = Job {
            iteration,
            transitions,
            rewards,
            advantages,
            prompts,
        };
        if tx.send(job).is_err() {
            if let Ok(mut st) = self.shared.state.lock() {
                st.pending -= 1;
            }
            self.take_error()?;
            bail!("the trajectory writer thread stopped");
        }
        self.last = iteration;
        Ok(())
    }
}

impl Drop for TrajectorySink {
    fn drop(&mut self) {
        if let Err(e) = self.finish() {
            tracing::error!(error = %format!("{e:#}"), "trajectory_sink: the last trajectory file could not be written");
            eprintln!("error: trajectory_sink: {e:#}");
        }
    }
}

fn check_shapes(
    transitions: &[Transition],
    rewards: &[Rewards],
    adv: &Advantages,
    prompts: &PromptBatch,
) -> Result<()> {
    let b = prompts.len();
    let k = transitions.len();
    if k == 0 {
        bail!("no transitions connected");
    }
    if rewards.len() != 1 && rewards.len() != k + 1 {
        bail!(
            "got {} rewards for {k} transitions: connect one final reward or one per prediction ({})",
            rewards.len(),
            k + 1
        );
    }
    let shape = transitions[0].x_t.dims();
    for (j, tr) in transitions.iter().enumerate() {
        if tr.old_logprob.len() != b || tr.x_t.dims()[0] != b {
            bail!(
                "transition {} has {} samples, prompts {b}",
                j + 1,
                tr.old_logprob.len()
            );
        }
        if tr.x_t.dims() != shape || tr.x_next.dims() != shape {
            bail!(
                "transition {} holds states of shape {:?} → {:?}, transition 1 {shape:?}: one file stores one state shape",
                j + 1,
                tr.x_t.dims(),
                tr.x_next.dims()
            );
        }
    }
    for (j, r) in rewards.iter().enumerate() {
        if r.values.len() != b {
            bail!(
                "reward {} has {} values for {b} samples",
                j + 1,
                r.values.len()
            );
        }
    }
    if adv.values.len() < k || adv.values.iter().take(k).any(|a| a.len() != b) {
        bail!(
            "advantages have {} transitions (need {k}) of {b} samples each",
            adv.values.len()
        );
    }
    Ok(())
}

struct Writer {
    dir: PathBuf,
    run_id: String,
    tensors: TensorMode,
    props: WriterProperties,
    shard: (usize, usize),
}

/// Decrements `pending` even if writing panics, so `flush` never hangs.
struct PendingGuard<'a>(&'a Shared);

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut st) = self.0.state.lock() {
            st.pending = st.pending.saturating_sub(1);
        }
        self.0.idle.notify_all();
    }
}

fn writer_loop(w: Writer, rx: Receiver<Job>, shared: Arc<Shared>) {
    while let Ok(job) = rx.recv() {
        let _guard = PendingGuard(&shared);
        let it = job.iteration;
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| w.write(&job)))
            .unwrap_or_else(|_| Err(anyhow!("the trajectory writer panicked")));
        if let Ok(mut st) = shared.state.lock() {
            match r {
                Ok(()) => st.written = st.written.max(it),
                Err(e) => {
                    if st.error.is_none() {
                        st.error =
                            Some(e.context(format!("writing trajectories of iteration {it}")));
                    }
                }
            }
        }
    }
}

impl Writer {
    fn write(&self, job: &Job) -> Result<()> {
        let batch = self.record_batch(job)?;
        let path = self
            .dir
            .join(shard_file_name(job.iteration, self.shard.0, self.shard.1));
        write_atomic_with(&path, |f| {
            let mut aw = ArrowWriter::try_new(f, batch.schema(), Some(self.props.clone()))?;
            aw.write(&batch)?;
            aw.close()?;
            Ok(())
        })
    }

    fn record_batch(&self, job: &Job) -> Result<RecordBatch> {
        let [_, c, h, w] = job.transitions[0].x_t.dims();
        let shape = [c, h, w];
        let state_len = c * h * w;
        let schema = schema_for(self.tensors, shape);
        let p = &job.prompts;
        let b = p.len();
        let k = job.transitions.len();
        let n = b * k;
        let per_step = job.rewards.len() == k + 1;
        let final_r = job.rewards.last().expect("checked: at least one reward");
        let mut cols: HashMap<&str, ArrayRef> = HashMap::new();
        // Row r = sample i, step j (0-based): r = i·k + j.
        let rows = || (0..b).flat_map(move |i| (0..k).map(move |j| (i, j)));
        let f32col = |f: &dyn Fn(usize, usize) -> f32| -> ArrayRef {
            Arc::new(Float32Array::from_iter_values(rows().map(|(i, j)| f(i, j))))
        };
        let u32col = |f: &dyn Fn(usize, usize) -> usize| -> ArrayRef {
            Arc::new(UInt32Array::from_iter_values(
                rows().map(|(i, j)| f(i, j) as u32),
            ))
        };
        let strcol = |f: &dyn Fn(usize, usize) -> String| -> ArrayRef {
            Arc::new(StringArray::from_iter_values(rows().map(|(i, j)| f(i, j))))
        };
        let tr = &job.transitions;
        // The reward scored right after transition j (0-based) and the one before it.
        let after = |j: usize| -> &Rewards {
            if per_step {
                &job.rewards[j + 1]
            } else {
                final_r
            }
        };
        cols.insert("run_id", strcol(&|_, _| self.run_id.clone()));
        cols.insert(
            "iteration",
            Arc::new(UInt64Array::from_iter_values(std::iter::repeat_n(
                job.iteration,
                n,
            ))),
        );
        cols.insert("prompt_id", strcol(&|i, _| p.records[i].id.clone()));
        cols.insert("prompt", strcol(&|i, _| p.records[i].prompt.clone()));
        cols.insert(
            "category",
            strcol(&|i, _| p.records[i].category().to_string()),
        );
        // Global indices: a data-parallel rank's shard continues where the previous one ends.
        cols.insert("group", u32col(&|i, _| p.group[i] + p.group_offset));
        cols.insert("sample", u32col(&|i, _| i + p.sample_offset));
        cols.insert("member", u32col(&|i, _| p.member[i]));
        cols.insert("step", u32col(&|_, j| j + 1));
        cols.insert("t", f32col(&|_, j| tr[j].t));
        cols.insert("t_next", f32col(&|_, j| tr[j].t_next));
        cols.insert("temperature", f32col(&|_, j| tr[j].tau));
        cols.insert("reward", f32col(&|i, j| after(j).values[i]));
        cols.insert(
            "reward_before",
            Arc::new(Float32Array::from_iter(
                rows().map(|(i, j)| per_step.then(|| job.rewards[j].values[i])),
            )),
        );
        cols.insert("advantage", f32col(&|i, j| job.advantages.values[j][i]));
        let mask = job.advantages.mask.as_ref();
        cols.insert(
            "trained",
            Arc::new(BooleanArray::from_iter(rows().map(|(i, j)| {
                Some(mask.is_none_or(|m| m.get(j).and_then(|r| r.get(i)).copied().unwrap_or(true)))
            }))),
        );
        cols.insert("old_logprob", f32col(&|i, j| tr[j].old_logprob[i]));
        cols.insert(
            "kl",
            Arc::new(Float32Array::from_iter(std::iter::repeat_n(None::<f32>, n))),
        );
        cols.insert("sampler", strcol(&|_, j| tr[j].sampler.to_string()));
        cols.insert("cfg", f32col(&|_, j| tr[j].cfg));
        cols.insert("kernel_a", f32col(&|_, j| tr[j].kernel.a));
        cols.insert("kernel_b", f32col(&|_, j| tr[j].kernel.b));
        cols.insert("kernel_std", f32col(&|_, j| tr[j].kernel.std));
        for (name, col) in CRITERIA.iter().zip(CRITERIA_COLUMNS) {
            let arr = BooleanArray::from_iter(rows().map(|(i, j)| {
                after(j)
                    .criteria
                    .get(i)
                    .and_then(|row| row.iter().find(|(c, _)| c == name))
                    .and_then(|(_, v)| *v)
            }));
            cols.insert(col, Arc::new(arr));
        }
        cols.insert(
            "correct",
            Arc::new(BooleanArray::from_iter(
                rows().map(|(i, j)| after(j).correct.get(i).copied()),
            )),
        );
        if let Some(vt) = self.tensors.value_type() {
            for (name, pick) in [("x_t", 0usize), ("x_next", 1)] {
                let host: Vec<Vec<f32>> = tr
                    .iter()
                    .map(|t| to_vec(if pick == 0 { &t.x_t } else { &t.x_next }))
                    .collect::<Result<_>>()?;
                for (j, h) in host.iter().enumerate() {
                    if h.len() != b * state_len {
                        bail!(
                            "transition {}: {name} has {} values, expected {b}×{state_len}",
                            j + 1,
                            h.len()
                        );
                    }
                }
                let mut flat = Vec::with_capacity(n * state_len);
                for (i, j) in rows() {
                    flat.extend_from_slice(&host[j][i * state_len..(i + 1) * state_len]);
                }
                let values: ArrayRef = Arc::new(Float32Array::from(flat));
                let values = if vt == DataType::Float32 {
                    values
                } else {
                    cast(&values, &vt)?
                };
                let item = Arc::new(Field::new("item", vt.clone(), true));
                let list = FixedSizeListArray::try_new(item, state_len as i32, values, None)?;
                cols.insert(name, Arc::new(list));
            }
        }
        let arrays = schema
            .fields()
            .iter()
            .map(|f| {
                cols.remove(f.name().as_str())
                    .ok_or_else(|| anyhow!("internal: column `{}` not built", f.name()))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(RecordBatch::try_new(schema, arrays)?)
    }
}

impl Node for TrajectorySink {
    fn run(&mut self, ctx: &NodeCtx, inputs: &Inputs) -> Result<Outputs> {
        let transitions: Vec<Transition> = inputs
            .all::<Transition>("transitions")?
            .into_iter()
            .cloned()
            .collect();
        let rewards: Vec<Rewards> = inputs
            .all::<Rewards>("rewards")?
            .into_iter()
            .cloned()
            .collect();
        let adv = inputs.get::<Advantages>("advantages")?.clone();
        let prompts = inputs.get::<PromptBatch>("prompts")?.clone();
        let rows = prompts.len() * transitions.len();
        self.write(ctx.iteration, transitions, rewards, adv, prompts)?;
        ctx.metric("rows", rows as f64);
        Ok(Outputs::new())
    }

    /// Checkpoints wait for the queue to drain: every file up to the checkpoint exists.
    fn state(&self) -> Option<serde_json::Value> {
        self.wait_idle();
        let written = self.shared.state.lock().map(|s| s.written).unwrap_or(0);
        Some(serde_json::json!({"last_iteration": self.last.max(written)}))
    }

    fn restore(&mut self, state: serde_json::Value) -> Result<()> {
        self.last = state["last_iteration"]
            .as_u64()
            .context("trajectory_sink state: no last_iteration")?;
        Ok(())
    }

    /// Files of iterations after the one the run continues from are rolled back (moved to
    /// `_superseded/`, under a new name if an earlier resume put one of that name there):
    /// they are written again as the run continues.
    fn rewind(&mut self, iteration: u64) -> Result<()> {
        self.last = self.last.min(iteration);
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return Ok(());
        };
        let sup = self.dir.join(SUPERSEDED_DIR);
        let mut moved = 0;
        // This rank's own files only (each rank rewinds its shards).
        let own = (self.shard.1 > 1).then_some(self.shard.0);
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if parse_shard_name(&name).is_some_and(|(it, r)| it > iteration && r == own) {
                runner::rundir::move_aside(&e.path(), &sup)?;
                moved += 1;
            }
        }
        if moved > 0 {
            sync_dir(&self.dir);
            tracing::info!(
                moved,
                "moved trajectory files of iterations after {iteration} to {}",
                sup.display()
            );
        }
        Ok(())
    }
}
