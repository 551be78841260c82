//! What a node library plugs into the engine: node types, resource types, and the runtime
//! interface nodes implement. The engine knows nothing about what flows through the ports;
//! values are type-erased and checked by port type name.

use std::any::Any;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use anyhow::{Context, Result, anyhow, bail};

use crate::params::{ParamDef, Params};

/// A value travelling along an edge.
pub type Value = Arc<dyn Any + Send + Sync>;

/// Declaration of one port.
#[derive(Debug, Clone)]
pub struct PortDef {
    pub name: &'static str,
    /// Type name checked on every edge (e.g. `images`, `prompts`, `rewards`).
    pub ty: &'static str,
    pub doc: &'static str,
    /// Input only: gathers one value from each step of a repeat (`node@*.port`), in step order.
    pub many: bool,
    /// Input only: may be left unconnected.
    pub optional: bool,
}

impl PortDef {
    pub fn new(name: &'static str, ty: &'static str, doc: &'static str) -> Self {
        PortDef {
            name,
            ty,
            doc,
            many: false,
            optional: false,
        }
    }
    pub fn many(mut self) -> Self {
        self.many = true;
        self
    }
    pub fn optional(mut self) -> Self {
        self.optional = true;
        self
    }
}

/// A resource a node type needs: bound in YAML by `uses: [name]`, matched by resource type.
#[derive(Debug, Clone)]
pub struct ResourceSlot {
    pub name: &'static str,
    pub ty: &'static str,
    pub write: bool,
    pub doc: &'static str,
}

/// Everything a node or resource factory gets.
pub struct BuildCtx<'a> {
    pub id: &'a str,
    pub params: &'a Params,
    /// The pipeline's `device` string (interpreted by the node library).
    pub device: &'a str,
    pub seed: u64,
    pub run_dir: Option<&'a Path>,
    /// The expanded step of a repeat this node belongs to: (k, count), 1-based.
    pub step: Option<(usize, usize)>,
    /// This process's rank and the number of processes of a data-parallel run (0 and 1 for a
    /// single process): see [`crate::dist`].
    pub rank: usize,
    pub world: usize,
}

/// A check of a whole compiled pipeline that no single parameter can make (a schedule across
/// repeat steps, a memory estimate): run by [`crate::compile()`] after everything else
/// validated, its errors located with [`crate::Params::error`].
pub type PipelineCheck = fn(&crate::Pipeline) -> crate::Diagnostics;

/// A named schedule for a repeat block's `vars` that a node library adds to the engine's own
/// (`constant`, `linear`, `cosine`, `exponential`): `x: {schedule: NAME, key: value, …}` gives
/// step k the k-th of `count` numbers. The keys besides `schedule` are declared and validated
/// like node parameters (unknown keys with a suggestion, types, ranges, required ones); what the
/// numbers mean is the library's business.
pub struct ScheduleType {
    pub name: &'static str,
    pub summary: &'static str,
    pub doc: &'static str,
    /// The keys besides `schedule`.
    pub params: Vec<ParamDef>,
    /// The values of steps 1 ..= `count` from the validated keys.
    pub values: ScheduleFn,
}

/// Computes a [`ScheduleType`]'s `count` values; an error is located with [`Params::error`]
/// (at the key it names as written, else at the schedule mapping).
pub type ScheduleFn = fn(&Params, usize) -> std::result::Result<Vec<f64>, crate::Diagnostic>;

/// Checks a pipeline's `device` string; `Err` is the message to show.
pub type DeviceCheck = fn(&str) -> std::result::Result<(), String>;

pub type NodeFactory = fn(&BuildCtx) -> Result<Box<dyn Node>>;
pub type ResourceFactory = fn(&BuildCtx) -> Result<Box<dyn Resource>>;

/// A node type: its ports, parameters and docs live together with its factory.
pub struct NodeType {
    pub name: &'static str,
    pub summary: &'static str,
    pub doc: &'static str,
    pub inputs: Vec<PortDef>,
    pub outputs: Vec<PortDef>,
    pub params: Vec<ParamDef>,
    pub resources: Vec<ResourceSlot>,
    pub factory: NodeFactory,
}

pub struct ResourceType {
    pub name: &'static str,
    pub summary: &'static str,
    pub doc: &'static str,
    pub params: Vec<ParamDef>,
    pub factory: ResourceFactory,
}

/// The set of node and resource types a binary knows.
#[derive(Default)]
pub struct Registry {
    pub nodes: BTreeMap<&'static str, NodeType>,
    pub resources: BTreeMap<&'static str, ResourceType>,
    /// Checks the pipeline's `device` string; `Err` is the message to show.
    pub device_check: Option<DeviceCheck>,
    /// Whole-pipeline checks, run in order once the pipeline compiled.
    pub checks: Vec<PipelineCheck>,
    /// Named schedules for repeat `vars`, besides the engine's built-in ones.
    pub schedules: BTreeMap<&'static str, ScheduleType>,
}

impl Registry {
    pub fn add_node(&mut self, t: NodeType) {
        self.nodes.insert(t.name, t);
    }
    pub fn add_resource(&mut self, t: ResourceType) {
        self.resources.insert(t.name, t);
    }
    /// Add a named schedule. Its name must not be one of the built-in schedules
    /// ([`crate::compile::BUILTIN_SCHEDULES`]), which would shadow it: a programming error.
    pub fn add_schedule(&mut self, t: ScheduleType) {
        assert!(
            !crate::compile::BUILTIN_SCHEDULES.contains(&t.name),
            "schedule `{}` is built into the engine",
            t.name
        );
        self.schedules.insert(t.name, t);
    }
}

/// A stateful object shared by several nodes (a model with its optimizer, say). Saved in every
/// checkpoint and restored on resume.
pub trait Resource: Send + Sync + Any {
    /// Write the state into `dir` (an empty directory inside the checkpoint being written).
    fn save(&self, dir: &Path) -> Result<()>;
    /// Restore the state from a directory written by `save`.
    fn load(&mut self, dir: &Path) -> Result<()>;
    fn as_any(&self) -> &dyn Any;
    fn as_any_mut(&mut self) -> &mut dyn Any;
    /// Data-parallel runs: make this rank's state rank 0's (weights broadcast once the run is
    /// built or restored). A resource whose state every rank builds identically may leave it.
    fn broadcast(&mut self, _c: &dyn crate::dist::Collective) -> Result<()> {
        Ok(())
    }
    /// Data-parallel runs: a digest of the state that must stay the same on every rank (the
    /// weights), compared across ranks at every checkpoint; None when there is none.
    fn digest(&self) -> Result<Option<Vec<u8>>> {
        Ok(None)
    }
}

pub type SharedResource = Arc<RwLock<Box<dyn Resource>>>;

/// A node's computation, run once per iteration (or every `every` iterations).
pub trait Node: Send {
    fn run(&mut self, ctx: &NodeCtx, inputs: &Inputs) -> Result<Outputs>;
    /// Extra state to keep in checkpoints (e.g. a data loader's position).
    fn state(&self) -> Option<serde_json::Value> {
        None
    }
    fn restore(&mut self, _state: serde_json::Value) -> Result<()> {
        Ok(())
    }
    /// On resume, after [`Node::restore`]: the run continues after iteration `iteration` (0
    /// when it starts again from the first), so whatever the node wrote itself for later
    /// iterations is rolled back — moved aside, never deleted.
    fn rewind(&mut self, _iteration: u64) -> Result<()> {
        Ok(())
    }
}

/// Runtime context of one node run.
pub struct NodeCtx {
    pub id: String,
    pub iteration: u64,
    pub iterations: u64,
    pub seed: u64,
    pub run_dir: Option<PathBuf>,
    pub(crate) resources: HashMap<&'static str, (SharedResource, bool)>,
    pub(crate) metrics: Mutex<Vec<(String, f64)>>,
    /// What the node emitted for TensorBoard (None: the pipeline turned it off).
    pub(crate) summaries: Option<Mutex<Vec<crate::tb::Summary>>>,
    /// Sample images to show this iteration (`logging.images` on the pipeline's
    /// `logging.image_every` iterations, else 0).
    pub(crate) images_due: usize,
    /// The run's process group (None: a single process).
    pub(crate) collective: Option<crate::dist::SharedCollective>,
    /// Metrics the node already reduced over all ranks ([`NodeCtx::metric_global`]).
    pub(crate) global_metrics: Mutex<Vec<String>>,
    /// The node's outputs that another node reads.
    pub(crate) read: Arc<std::collections::HashSet<&'static str>>,
}

/// The seed [`NodeCtx::seed_for`] gives node `id` at `iteration` for `stream`, under the
/// pipeline's `seed` (for tools and tests that regenerate a run's random draws).
pub fn stream_seed(seed: u64, id: &str, iteration: u64, stream: &str) -> u64 {
    let mut h = splitmix(seed ^ 0x9e37_79b9_7f4a_7c15);
    for b in id.bytes().chain([0xff]).chain(stream.bytes()) {
        h = splitmix(h ^ b as u64);
    }
    splitmix(h ^ iteration)
}

impl NodeCtx {
    /// A seed unique to this node, this iteration and `stream`: deterministic whatever the
    /// scheduling order.
    pub fn seed_for(&self, stream: &str) -> u64 {
        stream_seed(self.seed, &self.id, self.iteration, stream)
    }

    /// Whether another node reads output `port` (from the pipeline's wiring): a node may skip
    /// the work, or the memory, of an output nobody reads.
    pub fn is_read(&self, port: &str) -> bool {
        self.read.contains(port)
    }

    /// Record a metric for this iteration (logged as `node_id/name`). In a data-parallel run
    /// this is this rank's value: the logged one is the mean over ranks.
    pub fn metric(&self, name: &str, value: f64) {
        if let Ok(mut m) = self.metrics.lock() {
            m.push((name.to_string(), value));
        }
    }

    /// Record a metric that is already the same on every rank (the node reduced it over the
    /// process group itself): rank 0's value is logged as it is.
    pub fn metric_global(&self, name: &str, value: f64) {
        self.metric(name, value);
        if self.collective.is_some()
            && let Ok(mut g) = self.global_metrics.lock()
        {
            g.push(name.to_string());
        }
    }

    /// This process's rank in a data-parallel run (0 for a single process).
    pub fn rank(&self) -> usize {
        crate::dist::rank_world(self.collective.as_ref()).0
    }

    /// The number of processes of the run (1 for a single process).
    pub fn world(&self) -> usize {
        crate::dist::rank_world(self.collective.as_ref()).1
    }

    /// The run's process group, when it has more than one process.
    pub fn collective(&self) -> Option<&dyn crate::dist::Collective> {
        self.collective.as_deref()
    }

    /// Whether summaries ([`NodeCtx::image`], [`NodeCtx::histogram`], [`NodeCtx::text`]) are
    /// recorded in this run (`logging: {tensorboard: false}` turns them off): a node can skip
    /// preparing them.
    pub fn summaries_enabled(&self) -> bool {
        self.summaries.is_some()
    }

    /// How many sample images to show this iteration: the pipeline's `logging.images` every
    /// `logging.image_every` iterations, 0 otherwise (and when summaries are off).
    pub fn images_due(&self) -> usize {
        if self.summaries.is_some() {
            self.images_due
        } else {
            0
        }
    }

    /// Record a summary for this iteration's TensorBoard step (its tag is logged as
    /// `node_id/tag`). An image whose pixels do not match its size is an error naming it.
    pub fn summary(&self, s: crate::tb::Summary) -> Result<()> {
        s.check()
            .map_err(|e| anyhow!("node `{}`: summary {e}", self.id))?;
        if let Some(m) = &self.summaries
            && let Ok(mut m) = m.lock()
        {
            m.push(s);
        }
        Ok(())
    }

    /// An 8-bit image (`channels` 1, 3 or 4 per pixel, row-major) with a caption.
    pub fn image(
        &self,
        tag: &str,
        caption: &str,
        width: u32,
        height: u32,
        channels: u8,
        pixels: Vec<u8>,
    ) -> Result<()> {
        self.summary(crate::tb::Summary::Image {
            tag: tag.to_string(),
            caption: caption.to_string(),
            width,
            height,
            channels,
            pixels,
        })
    }

    /// The distribution of `values` (non-finite ones are left out).
    pub fn histogram(&self, tag: &str, values: Vec<f64>) {
        if self.summaries.is_some() {
            let _ = self.summary(crate::tb::Summary::Histogram {
                tag: tag.to_string(),
                values,
            });
        }
    }

    /// Markdown text.
    pub fn text(&self, tag: &str, text: &str) {
        if self.summaries.is_some() {
            let _ = self.summary(crate::tb::Summary::Text {
                tag: tag.to_string(),
                text: text.to_string(),
            });
        }
    }

    /// Read access to the resource bound to `slot`.
    pub fn read<T: 'static, R>(&self, slot: &str, f: impl FnOnce(&T) -> Result<R>) -> Result<R> {
        let (res, _) = self
            .resources
            .get(slot)
            .ok_or_else(|| anyhow!("node `{}` has no resource slot `{slot}`", self.id))?;
        let guard = res
            .read()
            .map_err(|_| anyhow!("resource `{slot}` was poisoned by an earlier failure"))?;
        let r = guard
            .as_any()
            .downcast_ref::<T>()
            .ok_or_else(|| anyhow!("resource `{slot}` has an unexpected type"))?;
        f(r)
    }

    /// Write access to the resource bound to `slot` (the node must be declared its writer).
    pub fn write<T: 'static, R>(
        &self,
        slot: &str,
        f: impl FnOnce(&mut T) -> Result<R>,
    ) -> Result<R> {
        let (res, write) = self
            .resources
            .get(slot)
            .ok_or_else(|| anyhow!("node `{}` has no resource slot `{slot}`", self.id))?;
        if !write {
            bail!("node `{}` may only read resource slot `{slot}`", self.id);
        }
        let mut guard = res
            .write()
            .map_err(|_| anyhow!("resource `{slot}` was poisoned by an earlier failure"))?;
        let r = guard
            .as_any_mut()
            .downcast_mut::<T>()
            .ok_or_else(|| anyhow!("resource `{slot}` has an unexpected type"))?;
        f(r)
    }
}

pub(crate) fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The values arriving at a node's input ports.
#[derive(Default)]
pub struct Inputs {
    pub(crate) values: HashMap<&'static str, Vec<Value>>,
    pub(crate) node: String,
}

impl Inputs {
    /// The value of a single-valued input port.
    pub fn get<T: 'static>(&self, port: &str) -> Result<&T> {
        let v = self
            .values
            .get(port)
            .and_then(|v| v.first())
            .ok_or_else(|| anyhow!("node `{}`: input `{port}` is not connected", self.node))?;
        v.downcast_ref::<T>().with_context(|| {
            format!(
                "node `{}`: input `{port}` has an unexpected type",
                self.node
            )
        })
    }
    /// The shared handle of a single-valued input (to pass it on without copying).
    pub fn get_arc<T: Send + Sync + 'static>(&self, port: &str) -> Result<Arc<T>> {
        let v = self
            .values
            .get(port)
            .and_then(|v| v.first())
            .ok_or_else(|| anyhow!("node `{}`: input `{port}` is not connected", self.node))?;
        v.clone().downcast::<T>().map_err(|_| {
            anyhow!(
                "node `{}`: input `{port}` has an unexpected type",
                self.node
            )
        })
    }
    pub fn has(&self, port: &str) -> bool {
        self.values.get(port).is_some_and(|v| !v.is_empty())
    }
    /// All values of a gathering (`many`) port, in step order.
    pub fn all<T: 'static>(&self, port: &str) -> Result<Vec<&T>> {
        let vs = self.values.get(port).map(Vec::as_slice).unwrap_or(&[]);
        vs.iter()
            .map(|v| {
                v.downcast_ref::<T>().with_context(|| {
                    format!(
                        "node `{}`: input `{port}` has an unexpected type",
                        self.node
                    )
                })
            })
            .collect()
    }
}

/// The values a node produced.
#[derive(Default)]
pub struct Outputs {
    pub(crate) values: HashMap<String, Value>,
}

impl Outputs {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn with<T: Send + Sync + 'static>(mut self, port: &str, v: T) -> Self {
        self.values.insert(port.to_string(), Arc::new(v));
        self
    }
    pub fn with_arc<T: Send + Sync + 'static>(mut self, port: &str, v: Arc<T>) -> Self {
        self.values.insert(port.to_string(), v);
        self
    }
    pub fn set<T: Send + Sync + 'static>(&mut self, port: &str, v: T) {
        self.values.insert(port.to_string(), Arc::new(v));
    }
}
