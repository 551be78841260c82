//! `parquet_source` + `trajectory_step`: replay stored trajectories (written by
//! `trajectory_sink` with `tensors: f32|f16`) into `grpo_update`.
//!
//! `grpo_update` takes its transitions on a gathering (`many`) port, one value per step, so a
//! source cannot hand it a variable number of values. The replay is therefore split in two:
//!
//! * `parquet_source` (one node) picks the samples of an iteration, reads their rows (all
//!   transition steps of each chosen sample) and emits `prompts`, `advantages` and one
//!   `trajectories` value (port type `trajectory_batch`) holding every step's [`Transition`];
//! * `trajectory_step` (inside a `repeat` block of `count` = the number of stored transition
//!   steps) takes step k out of it, so `grpo_update` gathers `pick@*.transition` exactly as it
//!   gathers `renoise@*.transition` when sampling on-policy.
//!
//! The file is read once per iteration and every step sees the same samples by construction.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use arrow::array::{
    Array, ArrayRef, BooleanArray, FixedSizeListArray, Float32Array, StringArray, UInt32Array,
    UInt64Array,
};
use arrow::compute::{cast, concat_batches};
use arrow::datatypes::DataType;
use arrow::record_batch::RecordBatch;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReaderBuilder, RowSelection, RowSelector};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use runner::{
    Inputs, Node, NodeCtx, NodeType, Outputs, ParamDef, ParamKind, ParamValue, PortDef, Registry,
};

use crate::device::open;
use crate::grpo::LinearGaussian;
use crate::model::tensor_from_vec;
use crate::model::text_embeddings::PromptEmbeddings;
use crate::prompt_loader::{make_batch, make_embedded_batch, parse_prompt};
use crate::trajectory_sink::{TENSOR_SHAPE, scalar_columns};
use crate::types::{Advantages, Prompt, PromptBatch, Transition};
use crate::world::{IMAGE_LEN, PromptRecord, Split};

/// Port type of [`TrajectoryBatch`].
pub const BATCH_TYPE: &str = "trajectory_batch";

/// Every transition step of the samples replayed in one iteration (`transitions[k-1]` is
/// step k, all over the same samples in the same order).
#[derive(Debug, Clone)]
pub struct TrajectoryBatch {
    pub transitions: Vec<Transition>,
}

pub fn register(r: &mut Registry) {
    r.add_node(NodeType {
        name: "parquet_source",
        summary: "replay stored trajectories (trajectory_sink files with tensors) for GRPO",
        doc: "Reads the trajectory files (`*.parquet`, not hidden) in `dir`, written by\n\
              trajectory_sink with `tensors: f32` or `f16`. Each iteration emits a batch of stored\n\
              samples with all their transition steps: `batch: 0` replays one stored iteration\n\
              (file) per iteration, in stored sample order; `batch: N` draws N samples from all\n\
              files. Files (batch 0) or samples (batch N) are walked epoch by epoch, shuffled with\n\
              the pipeline seed when `shuffle` is set; the position is checkpointed.\n\
              Outputs the prompts (rebuilt from the stored prompt text), the stored advantages\n\
              and a `trajectory_batch`; place a `trajectory_step` per step in a repeat block to\n\
              turn it into the `transition` values grpo_update gathers. The old log-probs are the\n\
              stored ones, so the GRPO ratio is taken against the sampling-time policy.\n\
              Samples of one step must share t, t_next, τ, cfg and kernel (true within a file; with\n\
              `batch: N` across files too, else use `batch: 0`). Logs reward_mean (final stored\n\
              reward), source_iteration (mean), epoch. Files without tensor columns, corrupt files\n\
              and files of another schema are errors naming the file.",
        inputs: vec![],
        outputs: vec![
            PortDef::new("prompts", "prompts", "the replayed samples' prompts (groups as stored)"),
            PortDef::new("advantages", "advantages", "stored advantages, [steps][samples]"),
            PortDef::new(
                "trajectories",
                BATCH_TYPE,
                "every stored transition step of the samples (split by trajectory_step)",
            ),
        ],
        params: vec![
            ParamDef::new("dir", ParamKind::Path, "directory of trajectory files (e.g. runs/<run>/trajectories)"),
            ParamDef::int("batch", 0, 0, 1 << 20, "samples per iteration (0 = one stored iteration per iteration)"),
            ParamDef::boolean("shuffle", true, "shuffle files (batch 0) or samples (batch N), each epoch anew"),
            ParamDef::new(
                "embeddings",
                ParamKind::Path,
                "trajectories of a model conditioned on text embeddings: the prompt_loader's `embeddings` file (prompts are looked up by their text)",
            )
            .default(ParamValue::Str(String::new())),
        ],
        resources: vec![],
        factory: |ctx| {
            crate::dist::single_process_only("parquet_source", ctx.world)?;
            let p = ctx.params;
            let mut src = ParquetSource::open(
                Path::new(p.str("dir")?),
                p.usize("batch")?,
                p.bool("shuffle")?,
                ctx.seed,
                open(ctx.device).map_err(anyhow::Error::msg)?,
            )?;
            if let Some(path) = p.opt_str("embeddings")? {
                src.embeddings = Some(ReplayEmbeddings::open(Path::new(path))?);
            }
            Ok(Box::new(src))
        },
    });
    r.add_node(NodeType {
        name: "trajectory_step",
        summary: "take one transition step out of a replayed trajectory_batch",
        doc: "Emits step `step` (1-based) of a parquet_source's trajectory_batch as a `transition`.\n\
              With `step: 0` (default) the node must sit in a repeat block: it takes the block's\n\
              step k, and the block's `count` must equal the number of stored transition steps.",
        inputs: vec![PortDef::new("trajectories", BATCH_TYPE, "the replayed batch")],
        outputs: vec![PortDef::new("transition", "transition", "stored step k with its old log-prob")],
        params: vec![ParamDef::int("step", 0, 0, 100_000, "transition step (1-based); 0 = the repeat step")],
        resources: vec![],
        factory: |ctx| {
            crate::dist::single_process_only("parquet_source", ctx.world)?;
            let step = ctx.params.usize("step")?;
            let (step, count) = match (step, ctx.step) {
                (0, Some((k, count))) => (k, Some(count)),
                (0, None) => bail!("`step: 0` needs a repeat block: set `step` or place the node in a repeat"),
                (s, _) => (s, None),
            };
            Ok(Box::new(TrajectoryStep { step, count }))
        },
    });
}

struct TrajectoryStep {
    step: usize,
    count: Option<usize>,
}

impl Node for TrajectoryStep {
    fn run(&mut self, _ctx: &NodeCtx, inputs: &Inputs) -> Result<Outputs> {
        let b = inputs.get::<TrajectoryBatch>("trajectories")?;
        let n = b.transitions.len();
        if let Some(c) = self.count
            && c != n
        {
            bail!(
                "the repeat block has count {c}, but the stored trajectories have {n} transition steps"
            );
        }
        let tr = b
            .transitions
            .get(self.step.wrapping_sub(1))
            .ok_or_else(|| {
                anyhow!(
                    "step {} requested, the stored trajectories have {n}",
                    self.step
                )
            })?;
        Ok(Outputs::new().with("transition", tr.clone()))
    }
}

/// Per-step values of one stored row.
#[derive(Debug, Clone, PartialEq)]
struct StepMeta {
    row: usize,
    t: f32,
    t_next: f32,
    tau: f32,
    cfg: f32,
    kernel: LinearGaussian,
    sampler: String,
    old_logprob: f32,
    advantage: f32,
    /// The `trained` column (true in files written before it).
    trained: bool,
    reward: f32,
}

#[derive(Debug, Clone)]
struct StoredSample {
    iteration: u64,
    group: u32,
    prompt_id: String,
    prompt: String,
    /// Transition steps 1..=K in order.
    steps: Vec<StepMeta>,
}

#[derive(Debug)]
struct StoredFile {
    path: PathBuf,
    samples: Vec<StoredSample>,
    /// Shape of one stored state, [C, H, W] (the tensor columns' extension metadata).
    shape: [usize; 3],
}

pub struct ParquetSource {
    files: Vec<StoredFile>,
    steps: usize,
    batch: usize,
    shuffle: bool,
    seed: u64,
    epoch: u64,
    cursor: usize,
    order: Vec<usize>,
    /// (file, sample) of every stored sample (batch > 0).
    pool: Vec<(usize, usize)>,
    device: burn::tensor::Device,
    records: HashMap<String, Arc<PromptRecord>>,
    /// Prompt embeddings to rebuild encoded prompts from (`embeddings`).
    embeddings: Option<ReplayEmbeddings>,
}

/// An embeddings store with its rows indexed by prompt text.
struct ReplayEmbeddings {
    store: PromptEmbeddings,
    rows: HashMap<String, usize>,
}

impl ReplayEmbeddings {
    fn open(path: &Path) -> Result<Self> {
        let store = PromptEmbeddings::open(path)?;
        let mut rows = HashMap::new();
        for i in (0..store.len()).rev() {
            rows.insert(store.text(i).to_string(), i);
        }
        Ok(ReplayEmbeddings { store, rows })
    }

    /// The encoded prompt of a stored sample.
    fn prompt(&self, s: &StoredSample) -> Result<Arc<Prompt>> {
        let Some(&row) = self.rows.get(&s.prompt) else {
            bail!(
                "prompt `{}` (\"{}\") is not in {}: replay with the embeddings file the run sampled with",
                s.prompt_id,
                s.prompt,
                self.store.path().display()
            );
        };
        let metadata = match self.store.metadata(row) {
            serde_json::Value::Object(m) => m.clone(),
            _ => serde_json::Map::new(),
        };
        Ok(Arc::new(Prompt {
            id: s.prompt_id.clone(),
            prompt: s.prompt.clone(),
            metadata,
            shapes: None,
            embedding_row: Some(row),
        }))
    }
}

/// The trajectory files of `dir`: `*.parquet`, not hidden (`.`) or set aside (`_`), by name.
pub fn trajectory_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = fs::read_dir(dir)
        .with_context(|| format!("cannot read trajectory directory {}", dir.display()))?;
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.ends_with(".parquet") && !n.starts_with('.') && !n.starts_with('_')
        })
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    Ok(files)
}

fn column<'a, T: 'static>(b: &'a RecordBatch, name: &str) -> Result<&'a T> {
    b.column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<T>())
        .ok_or_else(|| anyhow!("column `{name}` missing or of another type"))
}

/// The state shape [C, H, W] a tensor column's `arrow.fixed_shape_tensor` metadata names; a
/// column without it is ShapeWorld's [3, 32, 32] if its length says so.
fn tensor_shape(f: &arrow::datatypes::Field, len: usize) -> Result<[usize; 3]> {
    let meta = f.metadata().get("ARROW:extension:metadata");
    let shape: Option<Vec<usize>> = meta
        .and_then(|m| serde_json::from_str::<serde_json::Value>(m).ok())
        .and_then(|v| serde_json::from_value(v.get("shape")?.clone()).ok());
    let shape = match (meta, shape) {
        (None, _) if len == IMAGE_LEN => return Ok(TENSOR_SHAPE),
        (_, Some(s)) => s,
        (m, None) => bail!(
            "tensor column `{}` has no usable state shape in its extension metadata ({m:?})",
            f.name()
        ),
    };
    match shape[..] {
        [c, h, w] if c * h * w == len && len > 0 => Ok([c, h, w]),
        _ => bail!(
            "tensor column `{}`: its metadata's shape {shape:?} does not hold its {len} values per row",
            f.name()
        ),
    }
}

/// Check a file's schema: every scalar column with its type, and the tensor columns. Returns
/// the state shape [C, H, W].
fn check_schema(schema: &arrow::datatypes::Schema) -> Result<[usize; 3]> {
    for (name, ty, _) in scalar_columns() {
        match schema.field_with_name(name) {
            Ok(f) if f.data_type() == &ty => {}
            // Files written before the column existed: every row was trained.
            Err(_) if name == "trained" => {}
            Ok(f) => bail!(
                "schema mismatch: column `{name}` is {}, expected {ty} (not a trajectory_sink file?)",
                f.data_type()
            ),
            Err(_) => bail!("schema mismatch: no column `{name}` (not a trajectory_sink file?)"),
        }
    }
    let mut shapes = Vec::new();
    for name in ["x_t", "x_next"] {
        let Ok(f) = schema.field_with_name(name) else {
            bail!(
                "no tensor column `{name}`: replay needs the states; write the trajectories with `tensors: f32` (or f16) on trajectory_sink"
            );
        };
        match f.data_type() {
            DataType::FixedSizeList(item, n)
                if matches!(item.data_type(), DataType::Float32 | DataType::Float16) =>
            {
                shapes.push(tensor_shape(f, *n as usize)?);
            }
            other => bail!(
                "schema mismatch: tensor column `{name}` is {other}, expected FixedSizeList<float32|float16, C·H·W>"
            ),
        }
    }
    if shapes[0] != shapes[1] {
        bail!(
            "schema mismatch: x_t holds states of shape {:?}, x_next {:?}",
            shapes[0],
            shapes[1]
        );
    }
    Ok(shapes[0])
}

/// Read the scalar columns of one file and group its rows by sample.
fn index_file(path: &Path) -> Result<(StoredFile, usize)> {
    let f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let builder =
        ParquetRecordBatchReaderBuilder::try_new(f).context("not a readable Parquet file")?;
    let shape = check_schema(builder.schema())?;
    let schema = builder.schema().clone();
    let roots: Vec<usize> = scalar_columns()
        .iter()
        .filter_map(|(n, _, _)| schema.index_of(n).ok())
        .collect();
    let mask = ProjectionMask::roots(builder.parquet_schema(), roots);
    let reader = builder.with_projection(mask).build()?;
    let batches = reader
        .collect::<Result<Vec<_>, _>>()
        .context("cannot decode")?;
    let Some(first) = batches.first() else {
        return Ok((
            StoredFile {
                path: path.to_path_buf(),
                samples: vec![],
                shape,
            },
            0,
        ));
    };
    let b = concat_batches(&first.schema(), &batches)?;
    let it = column::<UInt64Array>(&b, "iteration")?;
    let pid = column::<StringArray>(&b, "prompt_id")?;
    let prompt = column::<StringArray>(&b, "prompt")?;
    let group = column::<UInt32Array>(&b, "group")?;
    let sample = column::<UInt32Array>(&b, "sample")?;
    let step = column::<UInt32Array>(&b, "step")?;
    let f32c = |n: &str| column::<Float32Array>(&b, n);
    let (t, tn, tau, cfg) = (
        f32c("t")?,
        f32c("t_next")?,
        f32c("temperature")?,
        f32c("cfg")?,
    );
    let (ka, kb, ks) = (f32c("kernel_a")?, f32c("kernel_b")?, f32c("kernel_std")?);
    let (olp, adv, rew) = (f32c("old_logprob")?, f32c("advantage")?, f32c("reward")?);
    let sampler = column::<StringArray>(&b, "sampler")?;
    let trained = match b.column_by_name("trained") {
        Some(_) => Some(column::<BooleanArray>(&b, "trained")?),
        None => None,
    };
    let mut by_sample: BTreeMap<u32, (StoredSample, Vec<(u32, StepMeta)>)> = BTreeMap::new();
    for r in 0..b.num_rows() {
        let meta = StepMeta {
            row: r,
            t: t.value(r),
            t_next: tn.value(r),
            tau: tau.value(r),
            cfg: cfg.value(r),
            kernel: LinearGaussian {
                a: ka.value(r),
                b: kb.value(r),
                std: ks.value(r),
            },
            sampler: sampler.value(r).to_string(),
            old_logprob: olp.value(r),
            advantage: adv.value(r),
            trained: trained.is_none_or(|c| c.value(r)),
            reward: rew.value(r),
        };
        let e = by_sample.entry(sample.value(r)).or_insert_with(|| {
            (
                StoredSample {
                    iteration: it.value(r),
                    group: group.value(r),
                    prompt_id: pid.value(r).to_string(),
                    prompt: prompt.value(r).to_string(),
                    steps: vec![],
                },
                vec![],
            )
        });
        e.1.push((step.value(r), meta));
    }
    let mut k = None;
    let mut samples = Vec::with_capacity(by_sample.len());
    for (s, (mut smp, mut steps)) in by_sample {
        steps.sort_by_key(|(k, _)| *k);
        if steps
            .iter()
            .enumerate()
            .any(|(j, (k, _))| *k as usize != j + 1)
        {
            bail!("sample {s}: transition steps are not 1..=K");
        }
        if *k.get_or_insert(steps.len()) != steps.len() {
            bail!(
                "sample {s} has {} transition steps, others {}",
                steps.len(),
                k.unwrap_or(0)
            );
        }
        smp.steps = steps.into_iter().map(|(_, m)| m).collect();
        samples.push(smp);
    }
    Ok((
        StoredFile {
            path: path.to_path_buf(),
            samples,
            shape,
        },
        k.unwrap_or(0),
    ))
}

/// Read `x_t` and `x_next` (as f32) of the given rows of a file: row → (x_t, x_next).
/// Row index → (x_t, x_next) of the rows read.
type RowTensors = HashMap<usize, (Vec<f32>, Vec<f32>)>;

fn read_tensors(path: &Path, rows: &[usize]) -> Result<RowTensors> {
    let mut sorted = rows.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let builder =
        ParquetRecordBatchReaderBuilder::try_new(f).context("not a readable Parquet file")?;
    let schema = builder.schema().clone();
    let roots = ["x_t", "x_next"]
        .iter()
        .map(|n| schema.index_of(n))
        .collect::<Result<Vec<_>, _>>()?;
    let mask = ProjectionMask::roots(builder.parquet_schema(), roots);
    let mut sel = Vec::new();
    let mut next = 0usize;
    for &r in &sorted {
        if r > next {
            sel.push(RowSelector::skip(r - next));
        }
        sel.push(RowSelector::select(1));
        next = r + 1;
    }
    let reader = builder
        .with_projection(mask)
        .with_row_selection(RowSelection::from(sel))
        .build()?;
    let mut out = HashMap::with_capacity(sorted.len());
    let mut pos = 0usize;
    for batch in reader {
        let batch = batch.context("cannot decode the tensor columns")?;
        let mut cols = Vec::new();
        for name in ["x_t", "x_next"] {
            let list = column::<FixedSizeListArray>(&batch, name)?;
            let values: ArrayRef = cast(list.values(), &DataType::Float32)?;
            let values = values
                .as_any()
                .downcast_ref::<Float32Array>()
                .ok_or_else(|| anyhow!("tensor column `{name}` is not float"))?
                .values()
                .clone();
            let len = list.value_length() as usize;
            let rows: Vec<Vec<f32>> = (0..list.len())
                .map(|i| {
                    let s = list.value_offset_at(i);
                    values[s..s + len].to_vec()
                })
                .collect();
            cols.push(rows);
        }
        let x_next = cols.pop().unwrap_or_default();
        let x_t = cols.pop().unwrap_or_default();
        for (a, b) in x_t.into_iter().zip(x_next) {
            let r = *sorted
                .get(pos)
                .ok_or_else(|| anyhow!("more rows than selected"))?;
            out.insert(r, (a, b));
            pos += 1;
        }
    }
    if pos != sorted.len() {
        bail!("read {pos} of {} selected rows", sorted.len());
    }
    Ok(out)
}

impl ParquetSource {
    pub fn open(
        dir: &Path,
        batch: usize,
        shuffle: bool,
        seed: u64,
        device: burn::tensor::Device,
    ) -> Result<Self> {
        let paths = trajectory_files(dir)?;
        if paths.is_empty() {
            bail!("no trajectory files (*.parquet) in {}", dir.display());
        }
        let mut files = Vec::new();
        let mut steps: Option<(usize, PathBuf)> = None;
        for p in paths {
            let (f, k) =
                index_file(&p).with_context(|| format!("trajectory file {}", p.display()))?;
            if f.samples.is_empty() {
                continue;
            }
            match &steps {
                None => steps = Some((k, p.clone())),
                Some((k0, p0)) if *k0 != k => bail!(
                    "trajectory file {} has {k} transition steps per sample, {} has {k0}",
                    p.display(),
                    p0.display()
                ),
                _ => {}
            }
            files.push(f);
        }
        let Some((steps, _)) = steps else {
            bail!("the trajectory files in {} hold no rows", dir.display());
        };
        let pool = files
            .iter()
            .enumerate()
            .flat_map(|(fi, f)| (0..f.samples.len()).map(move |s| (fi, s)))
            .collect();
        Ok(ParquetSource {
            files,
            steps,
            batch,
            shuffle,
            seed,
            epoch: 0,
            cursor: 0,
            order: vec![],
            pool,
            device,
            records: HashMap::new(),
            embeddings: None,
        })
    }

    fn units(&self) -> usize {
        if self.batch == 0 {
            self.files.len()
        } else {
            self.pool.len()
        }
    }

    fn reorder(&mut self) {
        self.order = (0..self.units()).collect();
        if self.shuffle {
            let mut rng = ChaCha8Rng::seed_from_u64(
                self.seed ^ self.epoch.wrapping_mul(0x9e37_79b9_7f4a_7c15),
            );
            self.order.shuffle(&mut rng);
        }
    }

    fn next_unit(&mut self) -> usize {
        if self.order.is_empty() {
            self.reorder();
        }
        if self.cursor >= self.order.len() {
            self.epoch += 1;
            self.cursor = 0;
            self.reorder();
        }
        let u = self.order[self.cursor];
        self.cursor += 1;
        u
    }

    /// The (file, sample) pairs of the next iteration.
    fn next_selection(&mut self) -> Vec<(usize, usize)> {
        if self.batch == 0 {
            let f = self.next_unit();
            (0..self.files[f].samples.len()).map(|s| (f, s)).collect()
        } else {
            (0..self.batch)
                .map(|_| {
                    let u = self.next_unit();
                    self.pool[u]
                })
                .collect()
        }
    }

    fn record(&mut self, s: &StoredSample) -> Result<Arc<PromptRecord>> {
        if let Some(r) = self.records.get(&s.prompt) {
            return Ok(r.clone());
        }
        let target = parse_prompt(&s.prompt)?;
        let rec = Arc::new(PromptRecord {
            id: s.prompt_id.clone(),
            prompt: s.prompt.clone(),
            category: target.category(),
            split: Split::Train,
            target,
        });
        self.records.insert(s.prompt.clone(), rec.clone());
        Ok(rec)
    }

    /// Build the outputs for a selection of stored samples.
    fn load(
        &mut self,
        sel: &[(usize, usize)],
    ) -> Result<(PromptBatch, Advantages, TrajectoryBatch, f64, f64)> {
        let n = sel.len();
        let k = self.steps;
        // Prompts, groups as stored (one group per distinct (file, stored group)).
        let mut prompts = if let Some(e) = &self.embeddings {
            let recs = sel
                .iter()
                .map(|&(f, s)| {
                    e.prompt(&self.files[f].samples[s]).with_context(|| {
                        format!("trajectory file {}", self.files[f].path.display())
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            make_embedded_batch(&e.store, &recs, 1)?
        } else {
            let mut recs = Vec::with_capacity(n);
            for &(f, s) in sel {
                let smp = self.files[f].samples[s].clone();
                let r = self
                    .record(&smp)
                    .with_context(|| format!("trajectory file {}", self.files[f].path.display()))?;
                recs.push(r);
            }
            make_batch(&recs, 1)?
        };
        let mut gid: HashMap<(usize, u32), (usize, usize)> = HashMap::new();
        for (i, &(f, s)) in sel.iter().enumerate() {
            let next = gid.len();
            let e = gid
                .entry((f, self.files[f].samples[s].group))
                .or_insert((next, 0));
            prompts.group[i] = e.0;
            prompts.member[i] = e.1;
            e.1 += 1;
        }
        // Tensors, file by file.
        let mut by_file: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for &(f, s) in sel {
            by_file
                .entry(f)
                .or_default()
                .extend(self.files[f].samples[s].steps.iter().map(|m| m.row));
        }
        let mut tensors = HashMap::new();
        for (f, rows) in by_file {
            let path = &self.files[f].path;
            let t = read_tensors(path, &rows)
                .with_context(|| format!("trajectory file {}", path.display()))?;
            tensors.insert(f, t);
        }
        let (f0, _) = sel[0];
        let [c, h, w] = self.files[f0].shape;
        if let Some(&(f, _)) = sel.iter().find(|&&(f, _)| self.files[f].shape != [c, h, w]) {
            bail!(
                "{} stores states of shape {:?}, {} of {:?}: one batch replays one state shape",
                self.files[f0].path.display(),
                [c, h, w],
                self.files[f].path.display(),
                self.files[f].shape
            );
        }
        let state_len = c * h * w;
        let mut transitions = Vec::with_capacity(k);
        let mut adv = Vec::with_capacity(k);
        let mut mask = Vec::with_capacity(k);
        for j in 0..k {
            let (f0, s0) = sel[0];
            let m0 = &self.files[f0].samples[s0].steps[j];
            let mut x_t = Vec::with_capacity(n * state_len);
            let mut x_next = Vec::with_capacity(n * state_len);
            let mut olp = Vec::with_capacity(n);
            let mut a = Vec::with_capacity(n);
            let mut trained = Vec::with_capacity(n);
            for &(f, s) in sel {
                let m = &self.files[f].samples[s].steps[j];
                if (m.t, m.t_next, m.tau, m.cfg, m.kernel, &m.sampler)
                    != (m0.t, m0.t_next, m0.tau, m0.cfg, m0.kernel, &m0.sampler)
                {
                    bail!(
                        "step {}: samples of {} and {} were taken with different t/τ/cfg/kernel; replay them in separate iterations (`batch: 0`)",
                        j + 1,
                        self.files[f0].path.display(),
                        self.files[f].path.display()
                    );
                }
                let (xt, xn) = &tensors[&f][&m.row];
                x_t.extend_from_slice(xt);
                x_next.extend_from_slice(xn);
                olp.push(m.old_logprob);
                a.push(m.advantage);
                trained.push(m.trained);
            }
            transitions.push(Transition {
                step: j + 1,
                t: m0.t,
                t_next: m0.t_next,
                tau: m0.tau,
                kernel: m0.kernel,
                sde_std: m0.kernel.std,
                cfg: m0.cfg,
                x_t: tensor_from_vec(x_t, [n, c, h, w], &self.device),
                x_next: tensor_from_vec(x_next, [n, c, h, w], &self.device),
                old_logprob: olp,
                sampler: sampler_name(&m0.sampler),
                graph: None,
                branch: None,
            });
            adv.push(a);
            mask.push(trained);
        }
        // A tree rollout's duplicated rows stay untrained on replay, as in the run that wrote them.
        let mask = mask.iter().flatten().any(|t| !t).then_some(mask);
        let reward_mean = sel
            .iter()
            .map(|&(f, s)| self.files[f].samples[s].steps[k - 1].reward as f64)
            .sum::<f64>()
            / n.max(1) as f64;
        let it_mean = sel
            .iter()
            .map(|&(f, s)| self.files[f].samples[s].iteration as f64)
            .sum::<f64>()
            / n.max(1) as f64;
        Ok((
            prompts,
            Advantages {
                values: adv,
                mode: "replay".into(),
                mask,
            },
            TrajectoryBatch { transitions },
            reward_mean,
            it_mean,
        ))
    }
}

fn sampler_name(s: &str) -> &'static str {
    match s {
        "tafs" => "tafs",
        "flow_sde" => "flow_sde",
        _ => "replay",
    }
}

impl Node for ParquetSource {
    fn run(&mut self, ctx: &NodeCtx, _: &Inputs) -> Result<Outputs> {
        let sel = self.next_selection();
        let (prompts, adv, batch, reward_mean, it_mean) = self.load(&sel)?;
        ctx.metric("reward_mean", reward_mean);
        ctx.metric("source_iteration", it_mean);
        ctx.metric("epoch", self.epoch as f64);
        Ok(Outputs::new()
            .with("prompts", prompts)
            .with("advantages", adv)
            .with("trajectories", batch))
    }
    fn state(&self) -> Option<serde_json::Value> {
        Some(serde_json::json!({"epoch": self.epoch, "cursor": self.cursor}))
    }
    fn restore(&mut self, s: serde_json::Value) -> Result<()> {
        self.epoch = s["epoch"]
            .as_u64()
            .context("parquet_source state: no epoch")?;
        self.cursor = s["cursor"]
            .as_u64()
            .context("parquet_source state: no cursor")? as usize;
        self.reorder();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trajectory_sink::{TensorMode, TrajectorySink};
    use crate::types::{Rewards, to_vec};

    /// A latent-space model's states ([16, 8, 6], not ShapeWorld's [3, 32, 32]) go through the
    /// sink and come back from replay with their shape, values and `trained` mask; a file
    /// without the `trained` column (written before it) replays every row.
    #[test]
    fn should_replay_states_of_any_shape() {
        let dev = burn::tensor::Device::flex();
        let run = std::env::temp_dir().join(format!("flowrun-latent-sink-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&run);
        std::fs::create_dir_all(&run).unwrap();
        let recs: Vec<Arc<PromptRecord>> = crate::prompt_loader::load_prompts(Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../datasets/shapes/train.jsonl"
        )))
        .unwrap()
        .into_iter()
        .take(2)
        .map(Arc::new)
        .collect();
        let prompts = make_batch(&recs, 2).unwrap();
        let b = prompts.len();
        let shape = [b, 16, 8, 6];
        let len: usize = shape.iter().product();
        let state = |off: f32| {
            let v: Vec<f32> = (0..len).map(|i| (i as f32 * 0.001 + off).sin()).collect();
            tensor_from_vec(v, shape, &dev)
        };
        let (x_t, x_next) = (state(0.0), state(1.0));
        let tr = Transition {
            step: 1,
            t: 1.0,
            t_next: 0.5,
            tau: 0.8,
            kernel: LinearGaussian::tafs(1.0, 0.5, 0.8).unwrap(),
            sde_std: LinearGaussian::tafs(1.0, 0.5, 0.8).unwrap().std,
            cfg: 4.5,
            x_t: x_t.clone(),
            x_next: x_next.clone(),
            old_logprob: vec![-1.0; b],
            sampler: "tafs",
            graph: None,
            branch: None,
        };
        let rewards = Rewards {
            values: vec![0.5; b],
            ..Rewards::default()
        };
        // Every other row untrained, as a tree rollout's duplicates are.
        let trained: Vec<bool> = (0..b).map(|i| i % 2 == 0).collect();
        let adv = Advantages {
            values: vec![vec![0.25; b]],
            mode: "test".into(),
            mask: Some(vec![trained.clone()]),
        };
        let mut sink = TrajectorySink::new(&run, TensorMode::F32, 2, 1).unwrap();
        sink.write(1, vec![tr], vec![rewards], adv, prompts)
            .unwrap();
        sink.finish().unwrap();

        let mut src =
            ParquetSource::open(&run.join("trajectories"), 0, false, 0, dev.clone()).unwrap();
        let sel = src.next_selection();
        let (_, adv, batch, _, _) = src.load(&sel).unwrap();
        let got = &batch.transitions[0];
        assert_eq!(got.x_t.dims(), shape);
        assert_eq!(to_vec(&got.x_t).unwrap(), to_vec(&x_t).unwrap());
        assert_eq!(to_vec(&got.x_next).unwrap(), to_vec(&x_next).unwrap());
        assert_eq!(adv.mask, Some(vec![trained]));

        // A file written before the `trained` column: replayed with every row trained.
        let file = run.join("trajectories/iter-000001.parquet");
        let full = crate::trajectory_sink::read_file(&file).unwrap();
        let keep: Vec<usize> = (0..full.num_columns())
            .filter(|&i| full.schema().field(i).name() != "trained")
            .collect();
        let old = full.project(&keep).unwrap();
        let mut w =
            parquet::arrow::ArrowWriter::try_new(File::create(&file).unwrap(), old.schema(), None)
                .unwrap();
        w.write(&old).unwrap();
        w.close().unwrap();
        let mut src = ParquetSource::open(&run.join("trajectories"), 0, false, 0, dev).unwrap();
        let sel = src.next_selection();
        let (_, adv, batch, _, _) = src.load(&sel).unwrap();
        assert_eq!(adv.mask, None);
        assert_eq!(
            to_vec(&batch.transitions[0].x_t).unwrap(),
            to_vec(&x_t).unwrap()
        );
        let _ = std::fs::remove_dir_all(&run);
    }
}
