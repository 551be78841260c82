//! `flow_sde_step`: Flow-GRPO's SDE sampler step (the baseline), a Gaussian policy.
//!
//! σ = t, σ' = t_next, Δt = σ' − σ < 0, s = a·√(σ/(1−σ̃)) (σ̃ = σ, or t₂ when σ = 1):
//! μ = x·(1 + s²Δt/(2σ)) + v·(1 + s²(1−σ)/(2σ))·Δt, x' = μ + s·√(−Δt)·ε.
//!
//! t₂ is Flow-GRPO's `sigmas[1]`, the schedule's second timestep. Unless given, it is derived:
//! the step at σ = 1 is the schedule's first, so its own t_next is that second timestep
//! ([`kernel`]). Validation (`checks::schedule`) checks that the steps chain and an explicit t₂.
//!
//! MixGRPO / Flow-GRPO-Fast: with `window_size` > 0 only the steps inside the window
//! ([`SdeWindow`], a function of the iteration number) are SDE steps; the others are
//! deterministic Euler (ODE) steps, x' = x + (t_next − t)·v, whose kernel is not stochastic:
//! they carry no log-prob and `grpo_update` does not train them.

use anyhow::{Result, bail};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::sync::Arc;

use runner::{
    Inputs, Node, NodeCtx, NodeType, Outputs, ParamDef, ParamKind, ParamValue, Params, PortDef,
    Registry, ResourceSlot,
};

use crate::flow_model::{FlowModelRes, TYPE};
use crate::grpo::gaussian_step;
use crate::grpo::{BranchTree, LinearGaussian, SdeWindow, TreeError, WindowError, WindowStrategy};
use crate::model::{sample_standard_normal, tensor_from_vec};
use crate::types::{Images, PromptBatch, RolloutGraph, Transition, select_rows};

pub fn register(r: &mut Registry) {
    r.add_node(NodeType {
        name: "flow_sde_step",
        summary: "Flow-GRPO SDE step from t to t_next (baseline sampler)",
        doc: "Evaluates v_θ(x_t, t, c) and takes one step of Flow-GRPO's SDE with noise level `a`:\n\
              σ = t, s = a·√(σ/(1 − σ̃)), σ̃ = σ except at σ = 1, where Flow-GRPO uses the\n\
              schedule's second timestep: `t2`, by default derived as this step's `t_next` (the\n\
              step at t = 1 is the first, so its t_next is the second timestep). An explicit `t2`\n\
              must be below 1; one that differs from that t_next is warned about.\n\
              Outputs the next state, the transition (with its old log-prob, mean over\n\
              dimensions) and the one-step prediction x̂0 = x_t − t·v (for optional dense rewards).\n\
              The input state must be at this step's `t`: validation refuses steps that do not\n\
              chain (step k's `t_next` ≠ step k+1's `t`, followed through the `x` inputs) and a\n\
              `t` of 0; at run time a state at another t fails with both values.\n\
              MixGRPO / Flow-GRPO-Fast windows: with `window_size` w > 0, step k of the repeat\n\
              (0-based index i = k − 1) is an SDE step only while l ≤ i < l + w, where the\n\
              window start l = window_start + n·window_stride after n = ⌊(iteration − 1) /\n\
              window_every⌋ shifts; past `window_max_start` (default: steps − w) l goes back to\n\
              window_start (`window_wrap: true`, MixGRPO's roll-back) or stays there (false).\n\
              `window_every: 0` keeps the window fixed (Flow-GRPO-Fast). MixGRPO's other\n\
              `window_strategy`s: `decay` holds position l for max(m, ⌊e·(1 − l/max_start) +\n\
              m·l/max_start⌋) iterations (e = window_every, m = window_min_every), `exp_decay`\n\
              for ⌈e·exp(−k·max(0, l − window_decay_threshold))⌉, and `random` draws l every e\n\
              iterations from window_start, + window_stride, … ≤ window_max_start, seeded by the\n\
              pipeline seed (TempFlow-GRPO's branching step: a random window of one step).\n\
              Outside the window the step is a deterministic Euler (ODE) step\n\
              x' = x + (t_next − t)·v: its transition has no log-prob (kernel std 0; its\n\
              `sde_std` keeps the SDE's std for noise-aware weights) and `grpo_update` skips\n\
              it. l depends on the iteration number only, so a resumed run samples the windows\n\
              an uninterrupted one does.\n\
              The window parameters must be the same at every step (validation checks them).\n\
              BranchGRPO tree rollouts: with `branch_at` (0-based step indices) each prompt's\n\
              group is a forest of `branch_roots` trees whose nodes split into `branch_factor`\n\
              children at each listed step, so the group size must be roots·factor^|branch_at|\n\
              (validation checks it). Samples of one tree node share their state bit for bit:\n\
              the step evaluates v_θ once per node (metric `branch_model_rows`) and draws one\n\
              noise per node, or per child at a branching step, so siblings share their prefix\n\
              and differ from the split on. The transitions carry the tree for\n\
              `tree_advantage`. The branch parameters must be the same at every step, and a\n\
              tree cannot be combined with a window.",
        inputs: vec![
            PortDef::new("x", "images", "the state x_t"),
            PortDef::new("prompts", "prompts", "the batch's prompts"),
        ],
        outputs: vec![
            PortDef::new("x_next", "images", "the state x_{t_next}"),
            PortDef::new("transition", "transition", "the step with its old log-prob (for GRPO)"),
            PortDef::new("x0", "images", "one-step prediction x̂0 at t"),
        ],
        params: vec![
            ParamDef::float("t", 1.0, 0.0, 1.0, "timestep of the input state"),
            ParamDef::float("t_next", 0.9, 0.0, 1.0, "timestep after the step"),
            ParamDef::float("noise_level", 0.7, 0.0, 10.0, "a: the SDE noise level"),
            ParamDef::float(
                "t2",
                0.0,
                0.0,
                1.0,
                "σ̃ used when σ = 1, the schedule's second timestep; 0 = derive it (this step's t_next)",
            ),
            ParamDef::float("cfg", 1.0, 0.0, 50.0, "classifier-free guidance scale (1 = off)"),
            ParamDef::int("window_size", 0, 0, 1 << 20, "MixGRPO: SDE steps per window, ODE elsewhere (0 = no window: every step is SDE)"),
            ParamDef::int("window_start", 0, 0, 1 << 20, "the first window's first step (0-based)"),
            ParamDef::int("window_stride", 1, 1, 1 << 20, "steps the window moves at each shift"),
            ParamDef::int("window_every", 0, 0, 1 << 40, "iterations per window position (0 = fixed window: Flow-GRPO-Fast)"),
            ParamDef::int("window_max_start", -1, -1, 1 << 20, "the last window start (0-based); -1 = steps − window_size"),
            ParamDef::boolean("window_wrap", true, "past window_max_start: back to window_start (true, MixGRPO's roll-back) or stay (false)"),
            ParamDef::choice("window_strategy", "progressive", WindowStrategy::NAMES, "how the window moves: progressive (window_every iterations per position), decay (linearly fewer, down to window_min_every), exp_decay (⌈every·exp(−k·max(0, l − threshold))⌉), random (a drawn start every window_every iterations)"),
            ParamDef::int("window_min_every", 0, 0, 1 << 40, "decay: iterations at the last position; 0 = max(1, window_every / 4)"),
            ParamDef::boolean("seed_group", false, "TempFlow-GRPO: the group's members share their initial noise (gaussian_noise `per: group`), so before the window their states are equal and v_θ runs once per group"),
            ParamDef::int("window_decay_threshold", 13, 0, 1 << 20, "exp_decay: the start (0-based) after which the hold decays"),
            ParamDef::float("window_decay_k", 0.1, 0.0, 100.0, "exp_decay: the decay rate k per step past the threshold"),
            ParamDef::new("branch_at", ParamKind::IntList { min: 0, max: 1 << 20 }, "BranchGRPO: the steps (0-based) at which every tree node splits; [] = no tree")
                .default(ParamValue::IntList(vec![])),
            ParamDef::int("branch_factor", 2, 1, 1 << 16, "children per node at each branching step"),
            ParamDef::int("branch_roots", 1, 1, 1 << 16, "trees per prompt (independent initial noises)"),
        ],
        resources: vec![ResourceSlot { name: "policy", ty: TYPE, write: false, doc: "the model being trained" }],
        factory: |ctx| {
            let p = ctx.params;
            let kernel = kernel(p.f32("t")?, p.f32("t_next")?, p.f32("noise_level")?, p.f32("t2")?)?;
            let (k, count) = ctx.step.unwrap_or((1, 1));
            let window = window(p, count, ctx.seed)?.map_err(|e| anyhow::anyhow!("parameter `{}`: {}", e.param, e.message))?;
            let branch = branch_tree(p, count)?
                .map_err(|e| anyhow::anyhow!("parameter `{}`: {}", e.param, e.message))?
                .map(Arc::new);
            if branch.is_some() && window.is_some() {
                bail!("a tree rollout (`branch_at`) cannot be combined with an SDE window (`window_size`)");
            }
            let seed_group = p.bool("seed_group")?;
            if seed_group && window.is_none() {
                bail!("parameter `seed_group`: needs an SDE window (`window_size` > 0): without one every step is stochastic and the group's states differ from the first step on");
            }
            Ok(Box::new(FlowSdeStep {
                seed_group,
                window,
                branch,
                index: k - 1,
                ode: kernel_ode(p.f32("t")?, p.f32("t_next")?)?,
                t: p.f32("t")?,
                t_next: p.f32("t_next")?,
                noise_level: p.f32("noise_level")?,
                cfg: p.f32("cfg")?,
                kernel,
                step: ctx.step.map_or(1, |s| s.0),
            }))
        },
    });
}

/// The window parameters, in the order [`window`] reads them (for validation: the same at every
/// step of a repeat).
pub const WINDOW_PARAMS: [&str; 11] = [
    "window_size",
    "window_start",
    "window_stride",
    "window_every",
    "window_max_start",
    "window_wrap",
    "window_strategy",
    "window_min_every",
    "window_decay_threshold",
    "window_decay_k",
    "seed_group",
];

/// The parameters only one `window_strategy` reads (validation: given with another one, they
/// would do nothing).
pub const STRATEGY_PARAMS: [(&str, &str); 3] = [
    ("window_min_every", "decay"),
    ("window_decay_threshold", "exp_decay"),
    ("window_decay_k", "exp_decay"),
];

/// The SDE window of a step of a `count`-step trajectory from its parameters: `None` without
/// one (`window_size: 0`), the parameter at fault when they do not fit the trajectory. `seed`
/// (the pipeline's) seeds the `random` strategy's draws.
pub fn window(
    p: &Params,
    count: usize,
    seed: u64,
) -> Result<Result<Option<SdeWindow>, WindowError>> {
    let size = p.usize("window_size")?;
    if size == 0 {
        return Ok(Ok(None));
    }
    let max_start = p.i64("window_max_start")?;
    let every = p.usize("window_every")? as u64;
    let strategy = match p.str("window_strategy")? {
        "decay" => WindowStrategy::Decay {
            min_every: match p.usize("window_min_every")? as u64 {
                0 => SdeWindow::default_min_every(every),
                m => m,
            },
        },
        "exp_decay" => WindowStrategy::ExpDecay {
            threshold: p.usize("window_decay_threshold")?,
            k: p.f64("window_decay_k")?,
        },
        "random" => WindowStrategy::Random { seed },
        _ => WindowStrategy::Progressive,
    };
    Ok(SdeWindow::new(
        size,
        p.usize("window_start")?,
        p.usize("window_stride")?,
        every,
        usize::try_from(max_start).ok(),
        p.bool("window_wrap")?,
        count,
    )
    .and_then(|w| w.with_strategy(strategy))
    .map(Some))
}

/// The branch parameters (for validation: the same at every step of a repeat).
pub const BRANCH_PARAMS: [&str; 3] = ["branch_at", "branch_factor", "branch_roots"];

/// The tree of a step of a `count`-step trajectory from its parameters: `None` without one
/// (`branch_at: []`), the parameter at fault when they do not fit the trajectory.
pub fn branch_tree(p: &Params, count: usize) -> Result<Result<Option<BranchTree>, TreeError>> {
    let at = p.usize_list("branch_at")?;
    if at.is_empty() {
        return Ok(Ok(None));
    }
    Ok(BranchTree::new(
        p.usize("branch_roots")?,
        p.usize("branch_factor")?,
        at,
        count,
    )
    .map(Some))
}

/// The deterministic Euler (ODE) step from `t` to `t_next`: x' = x + (t_next − t)·v, the SDE
/// step with noise level 0.
pub fn kernel_ode(t: f32, t_next: f32) -> Result<LinearGaussian> {
    LinearGaussian::flow_sde(t, t_next, 0.0, 0.5)
}

/// The `t2` a step uses: the explicit value, or (0) the derived one, this step's `t_next`.
pub fn effective_t2(t_next: f32, t2: f32) -> f32 {
    if t2 > 0.0 { t2 } else { t_next }
}

/// The Gaussian kernel of a step from `t` to `t_next` with noise level `a` and the `t2`
/// parameter (0 = derived, see [`effective_t2`]).
pub fn kernel(t: f32, t_next: f32, noise_level: f32, t2: f32) -> Result<LinearGaussian> {
    LinearGaussian::flow_sde(t, t_next, noise_level, effective_t2(t_next, t2))
}

struct FlowSdeStep {
    /// The group's members start from one noise: before the window, one v_θ row per group.
    seed_group: bool,
    window: Option<SdeWindow>,
    /// BranchGRPO's tree, shared by the trajectory's steps.
    branch: Option<Arc<BranchTree>>,
    /// This step's 0-based index in the trajectory (the window's coordinates).
    index: usize,
    /// The kernel outside the window.
    ode: LinearGaussian,
    t: f32,
    t_next: f32,
    noise_level: f32,
    cfg: f32,
    kernel: LinearGaussian,
    step: usize,
}

impl Node for FlowSdeStep {
    fn run(&mut self, ctx: &NodeCtx, inputs: &Inputs) -> Result<Outputs> {
        let x = inputs.get::<Images>("x")?;
        x.expect_t("x", self.t)?;
        let prompts = inputs.get::<PromptBatch>("prompts")?;
        if x.batch() != prompts.len() {
            bail!(
                "`x` has {} samples but `prompts` has {}",
                x.batch(),
                prompts.len()
            );
        }
        let policy = ctx.read("policy", |m: &FlowModelRes| Ok(m.sampler()))?;
        policy.check_state("x", x.image_shape())?;
        let device = policy.device.clone();
        let [b, c, h, w] = x.tensor.dims();
        // Tree rollouts: each row reads its node's state (its representative's row), and v_θ
        // runs once per node.
        let before_window = self
            .window
            .is_some_and(|w| self.index < w.start_at(ctx.iteration));
        let tree = match &self.branch {
            Some(tree) => Some(TreeRows::new(tree, self.index, prompts)?),
            None if self.seed_group && before_window => Some(TreeRows::groups(prompts)),
            None => None,
        };
        let sde = self
            .window
            .is_none_or(|w| w.contains(self.index, ctx.iteration));
        if let Some(w) = &self.window
            && self.index == 0
        {
            ctx.metric("window_start", w.start_at(ctx.iteration) as f64);
        }
        // An ODE step carries no log-prob: the update skips it, so it keeps no graph.
        let (k, tau) = if sde {
            (self.kernel, self.noise_level)
        } else {
            (self.ode, 0.0)
        };
        let (x_t, v, graph) = match &tree {
            None => {
                let x_t = x.tensor.clone();
                let (v, graph) = policy.velocity(
                    &x_t,
                    self.t,
                    &prompts.conditioning(&device),
                    self.cfg,
                    k.is_stochastic(),
                )?;
                (x_t, v, graph)
            }
            Some(rows) => {
                let x_u = select_rows(&x.tensor, &rows.nodes);
                let cond = prompts.conditioning_rows(&rows.nodes, &device);
                let (v_u, graph) =
                    policy.velocity(&x_u, self.t, &cond, self.cfg, k.is_stochastic())?;
                ctx.metric(rows.metric, rows.nodes.len() as f64);
                // Back to one row per sample (through the graph too: the update trains rows).
                let graph = graph.and_then(|g| {
                    let step = g.trainer_step;
                    g.take()
                        .map(|v| RolloutGraph::new(select_rows(&v, &rows.node_of), step))
                });
                (
                    select_rows(&x_u, &rows.node_of),
                    select_rows(&v_u, &rows.node_of),
                    graph,
                )
            }
        };
        let eps = if k.is_stochastic() {
            let mut rng = ChaCha8Rng::seed_from_u64(ctx.seed_for("eps"));
            tensor_from_vec(
                crate::dist::shard_rows(ctx.rank(), ctx.world(), b, c * h * w, |n| {
                    sample_standard_normal(&mut rng, n)
                }),
                [b, c, h, w],
                &device,
            )
        } else {
            x_t.zeros_like()
        };
        // One noise per node of the depth this step writes: siblings split here or later.
        let eps = match &tree {
            Some(rows) if k.is_stochastic() => select_rows(&eps, &rows.writes),
            _ => eps,
        };
        let (x_next, old_logprob) = gaussian_step(&x_t, &v, k, eps)?;
        let x0 = x_t.clone() - v.mul_scalar(self.t);
        let tr = Transition {
            step: self.step,
            t: self.t,
            t_next: self.t_next,
            tau,
            kernel: k,
            sde_std: self.kernel.std,
            cfg: self.cfg,
            x_t,
            x_next: x_next.clone(),
            old_logprob,
            sampler: "flow_sde",
            graph,
            branch: self.branch.clone(),
        };
        Ok(Outputs::new()
            .with(
                "x_next",
                Images {
                    tensor: x_next,
                    t: self.t_next,
                },
            )
            .with("transition", tr)
            .with("x0", Images { tensor: x0, t: 0.0 }))
    }
}

/// The rows of a tree rollout's step: which rows the step evaluates, and where each row reads
/// its state and its noise.
struct TreeRows {
    /// The rows that represent the nodes of the depth the step reads (ascending).
    nodes: Vec<usize>,
    /// For every row: its node's position in `nodes`.
    node_of: Vec<usize>,
    /// For every row: the row whose noise it takes (its representative at the depth written).
    writes: Vec<usize>,
    /// The metric that logs `nodes.len()`.
    metric: &'static str,
}

impl TreeRows {
    fn new(tree: &BranchTree, index: usize, prompts: &PromptBatch) -> Result<Self> {
        let reps = |d| {
            tree.representatives(&prompts.group, &prompts.member, d)
                .map_err(|e| anyhow::anyhow!("tree rollout: {e}"))
        };
        let before = reps(tree.depth_before(index))?;
        let writes = reps(tree.depth_after(index))?;
        let mut nodes = before.clone();
        nodes.sort_unstable();
        nodes.dedup();
        let node_of = before
            .iter()
            .map(|r| nodes.binary_search(r).expect("a representative is a node"))
            .collect();
        Ok(TreeRows {
            nodes,
            node_of,
            writes,
            metric: "branch_model_rows",
        })
    }

    /// A seed group's deterministic steps: one row (the first member) per prompt group. Only
    /// used for ODE steps, whose noise is not drawn.
    fn groups(prompts: &PromptBatch) -> Self {
        let mut nodes = vec![usize::MAX; prompts.groups()];
        for (i, &g) in prompts.group.iter().enumerate() {
            if nodes[g] == usize::MAX {
                nodes[g] = i;
            }
        }
        TreeRows {
            nodes,
            // Every group of a batch has members: group g is node g.
            node_of: prompts.group.clone(),
            writes: (0..prompts.len()).collect(),
            metric: "seed_group_model_rows",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn should_derive_t2_from_the_first_step_t_next() {
        // Flow-GRPO's σ̃ at σ = 1 is the schedule's second timestep, the first step's t_next.
        let derived = kernel(1.0, 0.9, 0.7, 0.0).unwrap();
        let explicit = LinearGaussian::flow_sde(1.0, 0.9, 0.7, 0.9).unwrap();
        assert_eq!(
            (derived.a, derived.b, derived.std),
            (explicit.a, explicit.b, explicit.std)
        );
        // Another schedule: the derived value follows it (at σ = 1 with σ̃ = t_next the step's
        // std is exactly `a`), where the stale hand-set 0.9 would change the first step's noise.
        let four = kernel(1.0, 0.75, 0.7, 0.0).unwrap();
        let want = LinearGaussian::flow_sde(1.0, 0.75, 0.7, 0.75).unwrap();
        assert_eq!((four.a, four.b, four.std), (want.a, want.b, want.std));
        assert!((four.std - 0.7).abs() < 1e-6, "{}", four.std);
        let stale = LinearGaussian::flow_sde(1.0, 0.75, 0.7, 0.9).unwrap();
        assert!(
            (stale.std - four.std).abs() > 0.1,
            "{} vs {}",
            stale.std,
            four.std
        );
        // An explicit value is used as given, and t2 plays no part below σ = 1.
        assert_eq!(effective_t2(0.9, 0.8), 0.8);
        let mid = kernel(0.5, 0.4, 0.7, 0.0).unwrap();
        let mid_explicit = kernel(0.5, 0.4, 0.7, 0.8).unwrap();
        assert_eq!(mid.std, mid_explicit.std);
    }

    #[test]
    fn should_take_deterministic_euler_steps_without_log_prob_outside_the_window() {
        use burn::tensor::Device;
        let dev = Device::flex();
        let ode = kernel_ode(1.0, 0.75).unwrap();
        assert!(!ode.is_stochastic());
        assert_eq!((ode.a, ode.b, ode.std), (1.0, -0.25, 0.0));
        let x = tensor_from_vec(vec![0.5, -1.0, 2.0, 0.25], [1, 1, 2, 2], &dev);
        let v = tensor_from_vec(vec![1.0, 2.0, -4.0, 0.0], [1, 1, 2, 2], &dev);
        let noise = |seed: f32| tensor_from_vec(vec![seed; 4], [1, 1, 2, 2], &dev);
        let (a, lp_a) = gaussian_step(&x, &v, ode, noise(1.0)).unwrap();
        let (b, lp_b) = gaussian_step(&x, &v, ode, noise(-3.0)).unwrap();
        let (a, b) = (
            crate::types::to_vec(&a).unwrap(),
            crate::types::to_vec(&b).unwrap(),
        );
        // x' = x + (t_next − t)·v whatever the noise, and no log-prob.
        assert_eq!(a, vec![0.25, -1.5, 3.0, 0.25]);
        assert_eq!(a, b);
        assert_eq!((lp_a, lp_b), (vec![0.0], vec![0.0]));
        // The SDE step of the same t is stochastic.
        assert!(kernel(1.0, 0.75, 0.7, 0.0).unwrap().is_stochastic());
    }
}
