//! `flowrun bench --sd3 DIR`: one TAFS-GRPO iteration of a diffusers SD3 / SD3.5 transformer,
//! timed phase by phase, and (`--memory-probe`) the memory its autodiff graph and forwards take
//! per block and per row (figures in BENCHMARKS.md, "SD3 small: flowrun vs PyTorch + diffusers";
//! `bench/reference/sd3_bench.py` runs the PyTorch + diffusers peer and this side by side).
//!
//! The iteration is `pipelines/tafs_grpo_sd3.yaml`'s, node for node, without the VAE and the
//! reward server:
//! * **rollout**: noise, then K × the `one_step_sampler`'s work (the policy's velocity through
//!   [`FlowModelRes::sampler`], classifier-free guidance as one forward of 2B rows, x̂0 and ε̂,
//!   x̂0 read back to the host as a reward would) and K − 1 × `annealed_renoiser` (fresh noise,
//!   the TAFS kernel, its old log-prob); t and t_next are diffusers' flow-match sigmas at K
//!   (shift 3), τ linear 1.0 → 0.6;
//! * **update**: [`GrpoUpdate::update`] itself over the K − 1 transitions (the pipeline's
//!   clip 1e-4, advantages clipped to ±5, β·KL to a frozen reference, one epoch, the whole
//!   batch, AdamW lr 1e-5 with grad-norm clipping at 1 and the EMA), the velocity recomputed
//!   per transition (`rollout_graph: recompute`, the pipeline's default); its
//!   forward / reference / backward / optimizer split comes from [`UpdateStats`].
//!
//! Advantages are seeded random numbers (their values do not change the cost).

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use burn::module::Module;
use burn::tensor::Device;
use nodes::device::{open, parse_device};
use nodes::flow_match_schedule::sigmas;
use nodes::flow_model::FlowModelRes;
use nodes::grpo::{LinearGaussian, gaussian_step};
use nodes::grpo_update::{GrpoUpdate, UpdateStats};
use nodes::model::sd3::{Sd3Config, Sd3Transformer, load_diffusers, read_config};
use nodes::model::text_embeddings::PromptEmbeddings;
use nodes::model::{TrainerConfig, sample_standard_normal, tensor_from_vec};
use nodes::prompt_loader::make_embedded_batch;
use nodes::types::{GroupEmbeddings, Prompt, PromptBatch, Transition, to_vec};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::{Value, json};

use super::{
    ADV_CLIP, BenchArgs, CLIP_RANGE, TAU_END, TAU_START, Timing, header, load_average, matmul_peak,
};

/// `pipelines/tafs_grpo_sd3.yaml`'s learning rate, gradient clip and flow-match shift.
const LR: f64 = 1e-5;
const GRAD_CLIP: f32 = 1.0;
const SHIFT: f64 = 3.0;
/// SD3.5-Medium at 512 px: 1024 image tokens, 333 text tokens (77 CLIP + 256 T5); the memory
/// probe keeps this ratio of text to image tokens.
const TEXT_PER_IMAGE_TOKEN: f64 = 333.0 / 1024.0;

/// Steps, temperatures and times of K: (t, t_next, τ) per step, as the pipeline's
/// `{schedule: flow_match, shift: 3.0}` and τ `{schedule: linear, start: 1.0, end: 0.6}`.
pub fn schedule(k: usize) -> Vec<(f32, f32, f32)> {
    let s = sigmas(k, SHIFT, 1000);
    (0..k)
        .map(|i| {
            let tau = if k > 1 {
                (TAU_START + (TAU_END - TAU_START) * i as f64 / (k - 1) as f64) as f32
            } else {
                TAU_START as f32
            };
            (s[i], s[i + 1], tau)
        })
        .collect()
}

/// Forward FLOPs of one row (one sample of one CFG branch) at `n` image and `l` text tokens:
/// linear layers and attention (QKᵀ and AV); norms and elementwise work not counted.
pub fn forward_flops(c: &Sd3Config, n: usize, l: usize) -> f64 {
    let d = c.inner_dim() as f64;
    let (n, l) = (n as f64, l as f64);
    let p2c = (c.patch_size * c.patch_size) as f64;
    let lin = |rows: f64, i: f64, o: f64| 2.0 * rows * i * o;
    let mut f = lin(n, c.in_channels as f64 * p2c, d) // patch embedding
        + lin(1.0, 256.0, d) + lin(1.0, d, d) // timestep MLP
        + lin(1.0, c.pooled_projection_dim as f64, d) + lin(1.0, d, d) // pooled MLP
        + lin(l, c.joint_attention_dim as f64, d); // context_embedder
    for i in 0..c.num_layers {
        let last = i + 1 == c.num_layers;
        let dual = c.is_dual_attention(i);
        f += lin(1.0, d, (if dual { 9.0 } else { 6.0 }) * d);
        f += lin(1.0, d, (if last { 2.0 } else { 6.0 }) * d);
        // Image q, k, v, out; text k, v (+ q and out unless the last block).
        f += 4.0 * lin(n, d, d) + 2.0 * lin(l, d, d);
        let tq = if last { n } else { n + l };
        if !last {
            f += 2.0 * lin(l, d, d);
        }
        f += 4.0 * tq * (n + l) * d;
        if dual {
            f += 4.0 * lin(n, d, d) + 4.0 * n * n * d;
        }
        f += 2.0 * lin(n, d, 4.0 * d);
        if !last {
            f += 2.0 * lin(l, d, 4.0 * d);
        }
    }
    f + lin(1.0, d, 2.0 * d) + lin(n, d, p2c * c.output_channels() as f64)
}

// ---------------------------------------------------------------------------------------------
// Memory readings (Linux): live heap bytes, resident set and its peak
// ---------------------------------------------------------------------------------------------

/// Bytes the C allocator has handed out and not taken back (`mallinfo2`: `uordblks` in every
/// arena + `hblkhd` in mmapped blocks): every tensor of flex (Rust's allocator is the
/// system's) and of libtorch's CPU allocator. `None` where glibc is not the allocator.
pub fn live_bytes() -> Option<u64> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 only reads the allocator's statistics.
        let m = unsafe { libc::mallinfo2() };
        Some((m.uordblks + m.hblkhd) as u64)
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        None
    }
}

/// A `/proc/self/status` field in KiB (`VmRSS`, `VmHWM`).
pub fn status_kib(field: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Returns the allocator's free pages to the system (`malloc_trim`) and resets the peak
/// resident set to the current one (`5` into `/proc/self/clear_refs`): what follows can be
/// measured as `VmHWM` − `VmRSS` now. False where either is unavailable.
pub fn reset_peak() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory to the system.
    unsafe {
        libc::malloc_trim(0);
    }
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Peak resident bytes above the resident set at the start, of `f` (see [`reset_peak`]).
fn peak_of<T>(f: impl FnOnce() -> Result<T>) -> Result<(Option<u64>, T)> {
    let ok = reset_peak();
    let before = status_kib("VmRSS");
    let out = f()?;
    let peak = status_kib("VmHWM");
    Ok(match (ok, before, peak) {
        (true, Some(b), Some(p)) => (Some(p.saturating_sub(b) * 1024), out),
        _ => (None, out),
    })
}

// ---------------------------------------------------------------------------------------------
// Inputs
// ---------------------------------------------------------------------------------------------

/// `b` samples in GRPO groups of 8 (of 1 when 8 does not divide `b`), conditioned on rows of
/// `store`, or on seeded random embeddings of `text_tokens` tokens of the model's widths.
fn prompts(
    b: usize,
    store: Option<&PromptEmbeddings>,
    cfg: &Sd3Config,
    text_tokens: usize,
) -> Result<PromptBatch> {
    let g = if b.is_multiple_of(8) { 8 } else { 1 };
    let p = b / g;
    if let Some(store) = store {
        let chosen: Vec<Arc<Prompt>> = (0..p)
            .map(|i| {
                let row = i % store.len();
                Arc::new(Prompt {
                    id: format!("bench-{row:05}"),
                    prompt: store.text(row).to_string(),
                    metadata: Default::default(),
                    shapes: None,
                    embedding_row: Some(row),
                })
            })
            .collect();
        return make_embedded_batch(store, &chosen, g);
    }
    let (j, q) = (cfg.joint_attention_dim, cfg.pooled_projection_dim);
    let mut rng = ChaCha8Rng::seed_from_u64(17);
    let mut normal = |n| sample_standard_normal(&mut rng, n);
    let emb = GroupEmbeddings {
        prompt_embeds: normal(p * text_tokens * j),
        pooled: normal(p * q),
        negative_embeds: normal(text_tokens * j),
        negative_pooled: normal(q),
        seq_len: text_tokens,
        dim: j,
        pooled_dim: q,
        uploaded: Default::default(),
    };
    let mut batch = PromptBatch {
        records: Vec::with_capacity(b),
        group: Vec::with_capacity(b),
        member: Vec::with_capacity(b),
        tokens: Vec::new(),
        max_tokens: 0,
        embeddings: Some(Arc::new(emb)),
        sample_offset: 0,
        group_offset: 0,
    };
    for i in 0..p {
        let rec = Arc::new(Prompt {
            id: format!("random-{i:05}"),
            prompt: String::new(),
            metadata: Default::default(),
            shapes: None,
            embedding_row: None,
        });
        for m in 0..g {
            batch.records.push(rec.clone());
            batch.group.push(i);
            batch.member.push(m);
        }
    }
    Ok(batch)
}

/// Seeded advantages for `transitions` × `b` samples.
fn advantages(transitions: usize, b: usize) -> nodes::types::Advantages {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    nodes::types::Advantages {
        values: (0..transitions)
            .map(|_| sample_standard_normal(&mut rng, b))
            .collect(),
        mode: "bench".into(),
        mask: None,
    }
}

// ---------------------------------------------------------------------------------------------
// One iteration
// ---------------------------------------------------------------------------------------------

/// One TAFS rollout of `sched.len()` steps: its transitions and the time spent in the
/// velocity forwards.
fn rollout(
    res: &FlowModelRes,
    prompts: &PromptBatch,
    shape: [usize; 4],
    sched: &[(f32, f32, f32)],
    cfg: f32,
    seed: u64,
) -> Result<(Vec<Transition>, f64)> {
    let sampler = res.sampler();
    let dev = sampler.device.clone();
    let n: usize = shape.iter().product();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    // gaussian_noise
    let mut x = tensor_from_vec(sample_standard_normal(&mut rng, n), shape, &dev);
    let mut transitions = Vec::with_capacity(sched.len().saturating_sub(1));
    let mut forward_s = 0.0;
    for (k, &(t, t_next, tau)) in sched.iter().enumerate() {
        // one_step_sampler
        let t0 = Instant::now();
        let (v, graph) = sampler.velocity(&x, t, &prompts.conditioning(&dev), cfg, true)?;
        forward_s += t0.elapsed().as_secs_f64();
        let x0 = x.clone() - v.clone().mul_scalar(t);
        let eps_hat = x.clone() + v.clone().mul_scalar(1.0 - t);
        drop(eps_hat);
        // The reward reads x̂0 (a stand-in for the VAE and the reward server).
        let x0 = to_vec(&x0)?;
        ensure!(
            x0.iter().all(|v| v.is_finite()),
            "the rollout produced non-finite predictions"
        );
        if k + 1 < sched.len() {
            // annealed_renoiser
            let kernel = LinearGaussian::tafs(t, t_next, tau)?;
            let eps = tensor_from_vec(sample_standard_normal(&mut rng, n), shape, &dev);
            let (x_next, old_logprob) = gaussian_step(&x, &v, kernel, eps)?;
            transitions.push(Transition {
                step: k + 1,
                t,
                t_next,
                tau,
                kernel,
                sde_std: kernel.std,
                cfg,
                x_t: x,
                x_next: x_next.clone(),
                old_logprob,
                sampler: "tafs",
                graph,
                branch: None,
            });
            x = x_next;
        }
    }
    Ok((transitions, forward_s))
}

/// The per-iteration figures of one (K, batch) on one device.
#[derive(Default)]
struct Runs {
    rollout: Vec<f64>,
    rollout_forward: Vec<f64>,
    update: Vec<f64>,
    iteration: Vec<f64>,
    forward: Vec<f64>,
    reference: Vec<f64>,
    backward: Vec<f64>,
    optimizer: Vec<f64>,
    grad_norm: Vec<f64>,
    /// Peak resident bytes of one update above the resident set before it (the rollout's
    /// transitions included), measured in one more, untimed iteration; `None` off Linux.
    update_peak: Option<u64>,
}

fn timing(v: &[f64]) -> Timing {
    Timing { runs: v.to_vec() }
}

struct Setup<'a> {
    dir: &'a Path,
    store: Option<&'a PromptEmbeddings>,
    config: &'a Sd3Config,
    text_tokens: usize,
    side: usize,
    cfg: f32,
    beta: f32,
    repeats: usize,
}

fn bench_config(
    res: &mut FlowModelRes,
    s: &Setup,
    k: usize,
    b: usize,
    progress: &dyn Fn(&str),
) -> Result<Runs> {
    let batch = prompts(b, s.store, s.config, s.text_tokens)?;
    let shape = [b, s.config.in_channels, s.side, s.side];
    let sched = schedule(k);
    let up = GrpoUpdate {
        clip: CLIP_RANGE as f32,
        adv_clip: ADV_CLIP as f32,
        beta: s.beta,
        epochs: 1,
        minibatch: 0,
        grad_accum: 1,
    };
    let adv = advantages(k - 1, b);
    let mut runs = Runs::default();
    for i in 0..=s.repeats {
        let t0 = Instant::now();
        let (transitions, fwd) = rollout(res, &batch, shape, &sched, s.cfg, 1 + i as u64)?;
        let t1 = Instant::now();
        let refs: Vec<&Transition> = transitions.iter().collect();
        let st: UpdateStats = up.update(res, &refs, &adv, &batch, i as u64)?;
        drop(refs);
        drop(transitions);
        let t2 = Instant::now();
        let (r, u) = ((t1 - t0).as_secs_f64(), (t2 - t1).as_secs_f64());
        progress(&format!(
            "K={k} batch={b} iteration {}{}: rollout {:.3} s, update {:.3} s (forward {:.3}, reference {:.3}, backward {:.3}, optimizer {:.3}), grad norm {:.4}",
            i + 1,
            if i == 0 { " (warm-up)" } else { "" },
            r,
            u,
            st.forward_s,
            st.reference_s,
            st.backward_s,
            st.optimizer_s,
            st.grad_norm
        ));
        if i == 0 {
            continue;
        }
        runs.rollout.push(r);
        runs.rollout_forward.push(fwd);
        runs.update.push(u);
        runs.iteration.push(r + u);
        runs.forward.push(st.forward_s);
        runs.reference.push(st.reference_s);
        runs.backward.push(st.backward_s);
        runs.optimizer.push(st.optimizer_s);
        runs.grad_norm.push(st.grad_norm);
    }
    // The update's memory, in an iteration of its own: resetting the peak (malloc_trim) would
    // slow the timed ones.
    let (transitions, _) = rollout(res, &batch, shape, &sched, s.cfg, 2 + s.repeats as u64)?;
    let refs: Vec<&Transition> = transitions.iter().collect();
    let (peak, _) = peak_of(|| up.update(res, &refs, &adv, &batch, 1 + s.repeats as u64))?;
    runs.update_peak = peak;
    Ok(runs)
}

// ---------------------------------------------------------------------------------------------
// Memory probe
// ---------------------------------------------------------------------------------------------

/// The kinds of block the memory probe measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    /// The folder's own blocks.
    Sd3,
    /// SD3.5's: RMS qk-norm.
    Sd35,
    /// SD3.5's with the second (image) attention, `dual_attention_layers`.
    Sd35Dual,
}

impl BlockKind {
    pub const ALL: [BlockKind; 3] = [BlockKind::Sd3, BlockKind::Sd35, BlockKind::Sd35Dual];

    pub fn name(self) -> &'static str {
        match self {
            BlockKind::Sd3 => "SD3",
            BlockKind::Sd35 => "SD3.5",
            BlockKind::Sd35Dual => "SD3.5 dual",
        }
    }
}

/// The probe's models: `base` with `layers` blocks of `kind` (the second attention, for
/// `Sd35Dual`, in every block but the last, which is `context_pre_only`), with a sin-cos grid
/// large enough for `side`.
fn probe_config(base: &Sd3Config, layers: usize, kind: BlockKind, side: usize) -> Sd3Config {
    let patches = side / base.patch_size;
    let mut c = Sd3Config {
        num_layers: layers,
        pos_embed_max_size: base.pos_embed_max_size.map(|m| m.max(patches)),
        ..base.clone()
    };
    c.dual_attention_layers.retain(|&i| i + 1 < layers);
    if kind != BlockKind::Sd3 {
        c.qk_norm = Some("rms_norm".into());
        c.dual_attention_layers.clear();
    }
    if kind == BlockKind::Sd35Dual {
        c.dual_attention_layers = (0..layers - 1).collect();
    }
    c
}

/// What one probe measured, in bytes (None where the readings are unavailable).
struct Probe {
    graph: Option<u64>,
    inference_peak: Option<u64>,
    update_peak: Option<u64>,
}

fn probe(c: &Sd3Config, dev: &Device, rows: usize, side: usize, l: usize) -> Result<Probe> {
    let model: Sd3Transformer = c.init(dev, 5);
    let ad = dev.clone().autodiff();
    let tracked = model.clone().train();
    let mut rng = ChaCha8Rng::seed_from_u64(23);
    let mut normal = |n| sample_standard_normal(&mut rng, n);
    let (ci, j, q) = (
        c.in_channels,
        c.joint_attention_dim,
        c.pooled_projection_dim,
    );
    let host = (
        normal(rows * ci * side * side),
        (0..rows).map(|i| 0.9 - 0.1 * i as f32).collect::<Vec<_>>(),
        normal(rows * l * j),
        normal(rows * q),
    );
    let inputs = |d: &Device| {
        (
            tensor_from_vec(host.0.clone(), [rows, ci, side, side], d),
            tensor_from_vec(host.1.clone(), [rows], d),
            tensor_from_vec(host.2.clone(), [rows, l, j], d),
            tensor_from_vec(host.3.clone(), [rows, q], d),
        )
    };
    // Warm-up (first-use allocations, lazy parameters) outside the readings.
    {
        let (x, s, e, p) = inputs(&ad);
        let v = tracked.try_forward(x, s, e, p)?;
        let _ = v.square().mean().backward();
    }
    // The graph: live bytes held after an autodiff forward, with its output.
    let (x, s, e, p) = inputs(&ad);
    let before = live_bytes();
    let v = tracked.try_forward(x, s, e, p)?;
    let after = live_bytes();
    drop(v);
    let graph = before.zip(after).map(|(b, a)| a.saturating_sub(b));
    // Peaks: a forward without autodiff (sampling), and forward + backward (the update).
    let (inference_peak, ()) = peak_of(|| {
        let (x, s, e, p) = inputs(dev);
        let v = model.try_forward(x, s, e, p)?;
        to_vec(&v.slice([0..1, 0..1, 0..1, 0..1]))?;
        Ok(())
    })?;
    let (update_peak, ()) = peak_of(|| {
        let (x, s, e, p) = inputs(&ad);
        let v = tracked.try_forward(x, s, e, p)?;
        let grads = v.square().mean().backward();
        drop(grads);
        Ok(())
    })?;
    Ok(Probe {
        graph,
        inference_peak,
        update_peak,
    })
}

fn mib(b: Option<u64>) -> String {
    b.map_or("—".into(), |b| {
        format!("{:.2}", b as f64 / (1 << 20) as f64)
    })
}

/// `--memory-probe`: per block and per row, the autodiff graph's bytes and the peaks of a
/// forward (sampling) and of forward + backward, at two token counts, for SD3 and SD3.5
/// blocks of the folder's width.
fn memory_probe(
    base: &Sd3Config,
    devices: &[String],
    rows: usize,
    sides: &[usize],
    out: &mut String,
) -> Result<Vec<Value>> {
    let (small, large) = (2usize, 4usize);
    let mut results = Vec::new();
    for name in devices {
        let dev = open(name).map_err(anyhow::Error::msg)?;
        writeln!(
            out,
            "\n== {name}: memory per row (MiB; {rows} rows; per block = ({large} blocks − {small} blocks) / {}) ==",
            large - small
        )?;
        writeln!(
            out,
            "{:<10} {:>6} {:>6} {:>6} {:>16} {:>16} {:>16} {:>14} {:>14}",
            "blocks",
            "image",
            "text",
            "joint",
            "graph/block/row",
            "update pk/blk/row",
            "infer pk/row",
            "graph/row all",
            "update pk/row"
        )?;
        for kind in BlockKind::ALL {
            for &side in sides {
                let p = base.patch_size;
                let n = (side / p) * (side / p);
                let l = ((n as f64 * TEXT_PER_IMAGE_TOKEN).round() as usize).max(1);
                let a = probe(&probe_config(base, small, kind, side), &dev, rows, side, l)?;
                let b = probe(&probe_config(base, large, kind, side), &dev, rows, side, l)?;
                let per = |x: Option<u64>, y: Option<u64>| {
                    x.zip(y).map(|(x, y)| {
                        y.saturating_sub(x) as f64 / (large - small) as f64 / rows as f64
                    })
                };
                let per_row = |x: Option<u64>| x.map(|x| x as f64 / rows as f64);
                let g = per(a.graph, b.graph);
                let u = per(a.update_peak, b.update_peak);
                let kind = kind.name();
                writeln!(
                    out,
                    "{kind:<10} {n:>6} {l:>6} {:>6} {:>16} {:>16} {:>16} {:>14} {:>14}",
                    n + l,
                    mib(g.map(|x| x as u64)),
                    mib(u.map(|x| x as u64)),
                    mib(per_row(b.inference_peak).map(|x| x as u64)),
                    mib(per_row(b.graph).map(|x| x as u64)),
                    mib(per_row(b.update_peak).map(|x| x as u64)),
                )?;
                results.push(json!({
                    "device": name, "block": kind, "latent_side": side, "image_tokens": n,
                    "text_tokens": l, "rows": rows, "layers": [small, large],
                    "inner_dim": base.inner_dim(), "heads": base.num_attention_heads,
                    "graph_bytes": [a.graph, b.graph],
                    "inference_peak_bytes": [a.inference_peak, b.inference_peak],
                    "update_peak_bytes": [a.update_peak, b.update_peak],
                    "graph_bytes_per_block_row": g,
                    "update_peak_bytes_per_block_row": u,
                }));
            }
        }
    }
    Ok(results)
}

// ---------------------------------------------------------------------------------------------
// Entry point
// ---------------------------------------------------------------------------------------------

/// `flowrun bench --sd3 DIR`.
pub fn run(args: &BenchArgs, dir: &Path) -> Result<()> {
    let mut devices = args.devices.clone();
    if devices.is_empty() {
        devices.push("flex".into());
        if cfg!(feature = "tch") {
            devices.push("libtorch".into());
        }
    }
    let mut seen: Vec<String> = Vec::new();
    for d in &devices {
        parse_device(d).map_err(anyhow::Error::msg)?;
        if !seen.contains(d) {
            seen.push(d.clone());
        }
    }
    let devices = seen;
    ensure!(args.repeats >= 1, "--repeats must be at least 1");
    let (config_path, config) = read_config(dir)?;
    let side = args.latent_size.unwrap_or(config.sample_size);
    config
        .check_latent_size(side, side)
        .with_context(|| format!("--latent-size {side}"))?;
    let store = match &args.embeddings {
        Some(path) => {
            let s = PromptEmbeddings::open(path)?;
            ensure!(!s.is_empty(), "{}: holds no prompts", path.display());
            ensure!(
                s.dim() == config.joint_attention_dim
                    && s.pooled_dim() == config.pooled_projection_dim,
                "{}: embeddings of width {} (pooled {}), but {} has joint_attention_dim {} \
                 (pooled_projection_dim {})",
                path.display(),
                s.dim(),
                s.pooled_dim(),
                config_path.display(),
                config.joint_attention_dim,
                config.pooled_projection_dim
            );
            Some(s)
        }
        None => None,
    };
    let text_tokens = store.as_ref().map_or(args.text_tokens, |s| s.seq_len());
    ensure!(text_tokens >= 1, "--text-tokens must be at least 1");
    ensure!(
        args.cfg.is_finite() && args.beta.is_finite() && args.beta >= 0.0,
        "--cfg and --beta must be finite, --beta at least 0"
    );
    if let Some(path) = &args.json {
        let parent = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        ensure!(
            parent.is_dir(),
            "--json {}: directory {} does not exist",
            path.display(),
            parent.display()
        );
    }
    let steps = super::sorted_unique(args.steps.clone().unwrap_or_else(|| vec![4]));
    let batches = super::sorted_unique(args.batches.clone().unwrap_or_else(|| vec![16]));
    ensure!(
        steps.iter().all(|&k| (2..=1000).contains(&k)),
        "--steps: with --sd3, give step counts K between 2 and 1000 (the update needs a transition)"
    );
    ensure!(
        batches.iter().all(|&b| b >= 1),
        "--batches: give batch sizes of at least 1"
    );

    let mut header = header();
    let p = config.patch_size;
    let n_img = (side / p) * (side / p);
    let flops_row = forward_flops(&config, n_img, text_tokens);
    let rows_per_sample = if args.cfg > 1.0 { 2.0 } else { 1.0 };
    let params = config.init_zeros(&Device::flex()).num_params_sd3();
    super::print_run_header("flowrun bench --sd3", &header);
    println!(
        "model: {} — {} blocks, {} heads × {}, joint_attention_dim {}, pooled {}, patch {}, {params} parameters; latents {}×{}×{side} ({n_img} image tokens), {text_tokens} text tokens; {:.3} GFLOP per row forward, {} rows per sample (CFG {})",
        config_path.display(),
        config.num_layers,
        config.num_attention_heads,
        config.attention_head_dim,
        config.joint_attention_dim,
        config.pooled_projection_dim,
        config.patch_size,
        config.in_channels,
        side,
        flops_row / 1e9,
        rows_per_sample,
        args.cfg
    );

    if args.memory_probe {
        let sides = match &args.probe_sides {
            Some(s) => super::sorted_unique(s.clone()),
            None => vec![side, side + side / 2 - (side / 2) % p],
        };
        for &s in &sides {
            ensure!(
                s >= p && s.is_multiple_of(p),
                "--probe-sides: {s} is not a positive multiple of patch_size {p}"
            );
        }
        let mut out = String::new();
        let probes = memory_probe(&config, &devices, args.probe_rows.max(1), &sides, &mut out)?;
        println!("{out}");
        println!(
            "graph: live heap bytes (mallinfo2) held after an autodiff forward; update pk: peak resident bytes of forward + backward (parameter gradients included), infer pk: of a forward without autodiff, both above the resident set after malloc_trim"
        );
        let report = json!({
            "header": header, "mode": "sd3-memory-probe",
            "model": {"dir": dir.display().to_string(), "config": config},
            "probes": probes,
            "peak_rss_kib": status_kib("VmHWM"),
        });
        if let Some(path) = &args.json {
            runner::fsutil::write_atomic(path, serde_json::to_string_pretty(&report)?.as_bytes())?;
            println!("wrote {}", path.display());
        }
        return Ok(());
    }

    let setup = Setup {
        dir,
        store: store.as_ref(),
        config: &config,
        text_tokens,
        side,
        cfg: args.cfg,
        beta: args.beta,
        repeats: args.repeats,
    };
    println!(
        "settings: K {steps:?}, batch {batches:?}, {} timed iterations after 1 warm-up (medians); CFG {}, β {}, lr {LR:e}, clip {CLIP_RANGE:e}, rollout_graph recompute; {}",
        args.repeats,
        args.cfg,
        args.beta,
        match args.lora {
            Some((r, a)) => format!(
                "LoRA rank {r}, alpha {a} on Flow-GRPO's attention projections (base frozen in {}, reference = base)",
                args.base_dtype
            ),
            None => "every weight trained".into(),
        },
    );
    if args.activation_checkpointing {
        println!(
            "activation checkpointing: each transformer block recomputed in the update's backward"
        );
    }
    let mut reports = Vec::new();
    let mut table = String::new();
    let mut figures: Vec<(String, String, f64)> = Vec::new();
    for name in &devices {
        let dev = open(name).map_err(anyhow::Error::msg)?;
        let mm = matmul_peak(&dev, 1024, 4, 3)?;
        let peak = 4.0 * 2.0 * 1024f64.powi(3) / mm.median() / 1e9;
        let live0 = live_bytes();
        let t_load = Instant::now();
        let (_, model) =
            load_diffusers(setup.dir, &dev).with_context(|| format!("loading on {name}"))?;
        let load_s = t_load.elapsed().as_secs_f64();
        let rss_after_load = status_kib("VmRSS");
        let lora = args.lora.map(|(r, a)| nodes::model::LoraConfig::new(r, a));
        let base_dtype: nodes::model::lora::BaseDtype = args.base_dtype.parse()?;
        if let Some(why) =
            nodes::flow_model::base_dtype_problem(base_dtype, "sd3", lora.is_some(), name)
        {
            anyhow::bail!("--base-dtype: {why}");
        }
        let mut res = FlowModelRes::sd3(
            model,
            TrainerConfig::new()
                .with_lr(LR)
                .with_grad_clip_norm(GRAD_CLIP),
            setup.beta > 0.0,
            false,
            lora.as_ref(),
            base_dtype,
        )?;
        res.activation_checkpointing = args.activation_checkpointing;
        let progress = |m: &str| eprintln!("[{name}] {m}");
        let mut configs = Vec::new();
        writeln!(
            table,
            "\n== {name} (matmul peak {peak:.1} GFLOP/s; model loaded in {load_s:.2} s) ==\n{:>3} {:>6} {:>13} {:>13} {:>13} {:>10} {:>10} {:>10} {:>10} {:>8} {:>8} {:>12}",
            "K",
            "batch",
            "rollout ms/s",
            "update ms/s",
            "iter ms/s",
            "fwd ms",
            "ref ms",
            "bwd ms",
            "optim ms",
            "roll %pk",
            "upd %pk",
            "upd MiB/s"
        )?;
        for &k in &steps {
            for &b in &batches {
                let runs = bench_config(&mut res, &setup, k, b, &progress)?;
                let med = |v: &[f64]| timing(v).median();
                let (r, u, it) = (med(&runs.rollout), med(&runs.update), med(&runs.iteration));
                let bf = b as f64;
                // Forward rows: K per sample (×2 with CFG) in the rollout; the update runs
                // K − 1 forwards + backwards (≈ 3 forwards) and, with β, K − 1 reference forwards.
                let rollout_flop = flops_row * rows_per_sample * bf * k as f64;
                let update_flop = flops_row
                    * rows_per_sample
                    * bf
                    * (k - 1) as f64
                    * (3.0 + if setup.beta > 0.0 { 1.0 } else { 0.0 });
                let (rg, ug) = (rollout_flop / r / 1e9, update_flop / u / 1e9);
                writeln!(
                    table,
                    "{k:>3} {b:>6} {:>13.1} {:>13.1} {:>13.1} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>7.1}% {:>7.1}% {:>12}",
                    r * 1e3 / bf,
                    u * 1e3 / bf,
                    it * 1e3 / bf,
                    med(&runs.forward) * 1e3,
                    med(&runs.reference) * 1e3,
                    med(&runs.backward) * 1e3,
                    med(&runs.optimizer) * 1e3,
                    100.0 * rg / peak,
                    100.0 * ug / peak,
                    runs.update_peak.map_or("-".to_string(), |p| format!(
                        "{:.1}",
                        p as f64 / bf / (1 << 20) as f64
                    ))
                )?;
                for (what, v) in [("rollout", r), ("update", u), ("iteration", it)] {
                    figures.push((
                        name.clone(),
                        format!("{what} K={k} batch={b} (ms)"),
                        v * 1e3,
                    ));
                }
                configs.push(json!({
                    "k": k, "batch": b, "schedule": schedule(k),
                    "rollout": timing(&runs.rollout).json(),
                    "rollout_forward": timing(&runs.rollout_forward).json(),
                    "update": timing(&runs.update).json(),
                    "iteration": timing(&runs.iteration).json(),
                    "per_sample_ms": {"rollout": r * 1e3 / bf, "update": u * 1e3 / bf, "iteration": it * 1e3 / bf},
                    "update_breakdown": {
                        "forward": timing(&runs.forward).json(),
                        "reference": timing(&runs.reference).json(),
                        "backward": timing(&runs.backward).json(),
                        "optimizer": timing(&runs.optimizer).json(),
                    },
                    "grad_norm": runs.grad_norm,
                    "update_peak_bytes": runs.update_peak,
                    "update_peak_mib_per_sample": runs.update_peak.map(|p| p as f64 / bf / (1 << 20) as f64),
                    "rollout_gflops": rg, "update_gflops": ug,
                    "rollout_peak_fraction": rg / peak, "update_peak_fraction": ug / peak,
                }));
            }
        }
        let live = live_bytes();
        reports.push(json!({
            "device": name,
            "matmul": {"n": 1024, "per_run": 4, "timing": mm.json(), "gflops": peak},
            "load_s": load_s,
            "rss_after_load_kib": rss_after_load,
            "configs": configs,
            "live_bytes_after": live,
            "live_bytes_before_load": live0,
            "peak_rss_kib_so_far": status_kib("VmHWM"),
        }));
        drop(res);
    }
    println!(
        "{table}\n(ms/s: milliseconds per sample; fwd/ref/bwd/optim: the update's policy forward and loss, KL reference forward, backward, optimizer step — per iteration; %pk: counted FLOPs per second over the matmul peak; upd MiB/s: the update's peak resident memory above the resident set before it, per sample, in one more untimed iteration)"
    );
    let mut ratios = Vec::new();
    if devices.len() > 1 {
        let base = devices
            .iter()
            .position(|d| d == "flex")
            .unwrap_or(0)
            .min(devices.len() - 1);
        let b = &devices[base];
        println!("\n== ratios to {b} (same process; > 1: faster than {b}) ==");
        for (dev, what, v) in figures.iter().filter(|f| &f.0 != b) {
            if let Some((_, _, bv)) = figures.iter().find(|f| &f.0 == b && &f.1 == what) {
                println!("{what:<36} {bv:>10.1} {v:>10.1} {:>7.2}× ({dev})", bv / v);
                ratios.push(json!({"device": dev, "baseline": b, "what": what, "baseline_value": bv, "value": v, "speedup": bv / v}));
            }
        }
    }
    let peak_rss = status_kib("VmHWM");
    if let Some(kib) = peak_rss {
        println!(
            "\npeak resident set of this process: {:.1} MiB (VmHWM)",
            kib as f64 / 1024.0
        );
    }
    if let Some(o) = header.as_object_mut() {
        o.insert("load_average_end".into(), json!(load_average()));
    }
    let report = json!({
        "header": header,
        "mode": "sd3",
        "settings": {
            "devices": devices, "steps": steps, "batches": batches, "repeats": args.repeats,
            "warmup_runs": 1, "cfg": args.cfg, "beta": args.beta, "lr": LR,
            "grad_clip_norm": GRAD_CLIP, "clip_range": CLIP_RANGE, "adv_clip": ADV_CLIP,
            "tau_start": TAU_START, "tau_end": TAU_END, "shift": SHIFT,
            "rollout_graph": "recompute", "latent_side": side, "text_tokens": text_tokens,
            "embeddings": args.embeddings.as_ref().map(|p| p.display().to_string()),
            "lora": args.lora.map(|(r, a)| json!({"rank": r, "alpha": a})),
            "activation_checkpointing": args.activation_checkpointing,
            "base_dtype": args.base_dtype,
        },
        "model": {
            "dir": dir.display().to_string(), "config": config, "params": params,
            "image_tokens": n_img, "text_tokens": text_tokens,
            "forward_flops_per_row": flops_row, "rows_per_sample": rows_per_sample,
        },
        "devices": reports,
        "ratios": ratios,
        "peak_rss_kib": peak_rss,
    });
    if let Some(path) = &args.json {
        runner::fsutil::write_atomic(path, serde_json::to_string_pretty(&report)?.as_bytes())?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// Parameter count of an SD3 model without materialising its (lazy) weights.
trait NumParams {
    fn num_params_sd3(&self) -> usize;
}

impl NumParams for Sd3Transformer {
    fn num_params_sd3(&self) -> usize {
        // The sin-cos grid is a buffer in diffusers, not a parameter.
        let grid = self
            .config
            .pos_embed_max_size
            .map_or(0, |m| m * m * self.config.inner_dim());
        self.num_params() - grid
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn should_follow_the_pipelines_schedule() {
        let s = schedule(4);
        assert_eq!(s.len(), 4);
        assert_eq!(s[0].0, 1.0);
        assert_eq!(s[3].1, 0.0);
        for w in s.windows(2) {
            assert_eq!(w[0].1, w[1].0, "{s:?}");
        }
        assert_eq!(s[0].2, 1.0);
        assert!((s[3].2 - 0.6).abs() < 1e-6);
    }

    #[test]
    fn should_count_a_one_block_models_flops_by_hand() {
        // One (last, context_pre_only) block of width 4, patch 1, 2 channels; 3 image and 2
        // text tokens.
        let c = Sd3Config {
            sample_size: 4,
            patch_size: 1,
            in_channels: 2,
            num_layers: 1,
            attention_head_dim: 2,
            num_attention_heads: 2,
            joint_attention_dim: 3,
            caption_projection_dim: 4,
            pooled_projection_dim: 5,
            out_channels: Some(2),
            ..Sd3Config::default()
        };
        let (n, l, d) = (3.0, 2.0, 4.0);
        let embed = 2.0 * (n * 2.0 * d + 256.0 * d + d * d + 5.0 * d + d * d + l * 3.0 * d);
        let block = 2.0 * (6.0 * d * d + 2.0 * d * d) // norm1, norm1_context (continuous)
            + 2.0 * (4.0 * n * d * d + 2.0 * l * d * d) // q k v out; text k v
            + 4.0 * n * (n + l) * d // image queries only
            + 2.0 * 2.0 * n * d * 4.0 * d; // ff
        let out = 2.0 * (2.0 * d * d + n * d * 2.0);
        assert_eq!(forward_flops(&c, 3, 2), embed + block + out);
    }

    #[test]
    fn should_build_probe_configs_of_both_kinds() {
        let base = Sd3Config::tiny();
        let c = probe_config(&base, 4, BlockKind::Sd35Dual, 48);
        assert_eq!(c.dual_attention_layers, vec![0, 1, 2]);
        assert_eq!(c.qk_norm.as_deref(), Some("rms_norm"));
        assert!(c.validate().is_ok());
        assert_eq!(c.pos_embed_max_size, Some(96));
        let c = probe_config(&base, 4, BlockKind::Sd35, 48);
        assert!(c.dual_attention_layers.is_empty() && c.qk_norm.is_some());
        let c = probe_config(&base, 2, BlockKind::Sd3, 8);
        assert!(c.dual_attention_layers.is_empty() && c.qk_norm.is_none());
    }

    #[test]
    fn should_read_live_bytes_and_status_on_linux() {
        if cfg!(all(target_os = "linux", target_env = "gnu")) {
            let before = live_bytes().unwrap();
            let v = std::hint::black_box(vec![1u8; 64 << 20]);
            let after = live_bytes().unwrap();
            assert!(after >= before + (60 << 20), "{before} → {after}");
            drop(std::hint::black_box(v));
            assert!(status_kib("VmRSS").unwrap() > 0);
        }
    }
}
