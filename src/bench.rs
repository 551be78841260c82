//! `flowrun bench`: the reproducible benchmark suite (issue #8; figures in BENCHMARKS.md).
//!
//! On each device, with the code paths a TAFS-GRPO run uses:
//! * **rollout**: the TAFS sampler for K steps — the tensor work of `gaussian_noise`, then K ×
//!   `one_step_sampler` (v_θ, x̂0, ε̂) and K − 1 × `annealed_renoiser` (fresh noise, the Gaussian
//!   step, its old log-prob read back), no reward; samples/s for each K and batch;
//! * **GRPO update**: [`GrpoUpdate::update`] itself (one epoch of the clipped surrogate over the
//!   batch's K − 1 transitions: forward, backward, grad clipping, AdamW, EMA), time per
//!   sample·step;
//! * **fits**: least-squares lines of time against batch size, K and the UNet's base channel
//!   width (fresh models with channels scaled from the benchmarked one);
//! * **matmul peak**: a large f32 n×n×n matmul, and the fraction of it the rollout and the update
//!   reach, with FLOPs counted from the model's layer shapes by [`count_flops`];
//! * **ratios** of every device to flex (or to the first device) measured in the same process.
//!
//! Every figure is a median over `--repeats` runs after one warm-up run of the same
//! configuration. Nothing here asserts a speed: tests check the report's structure only.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use burn::tensor::{Device, Int, Tensor};
use nodes::device::{open, parse_device};
use nodes::flow_model::FlowModelRes;
use nodes::grpo::LinearGaussian;
use nodes::grpo::gaussian_step;
use nodes::grpo_update::GrpoUpdate;
use nodes::model::{
    FlowModel, FlowModelConfig, TrainerConfig, load_safetensors, sample_standard_normal,
    tensor_from_vec,
};
use nodes::prompt_loader::make_batch;
use nodes::types::{Advantages, PromptBatch, Transition, to_vec};
use nodes::world::{self, IMAGE_LEN, IMAGE_SIZE};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::{Value, json};

mod sd3;

/// Learning rate, clip range and advantage clip of the update: `pipelines/tafs_grpo.yaml`'s.
const LR: f64 = 1e-5;
const CLIP_RANGE: f64 = 1e-4;
const ADV_CLIP: f64 = 5.0;
/// TAFS temperature schedule: linear from `TAU_START` at step 1 to `TAU_END` at step K (as the
/// shipped pipeline's `tau: {schedule: linear, start: 1.0, end: 0.6}`).
const TAU_START: f64 = 1.0;
const TAU_END: f64 = 0.6;
/// A training step costs about three forwards (backward ≈ 2 × forward).
const TRAIN_FLOP_FACTOR: f64 = 3.0;

/// Arguments of `flowrun bench`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Device to measure (repeatable): flex, libtorch, libtorch-cuda:N. Default: flex, plus
    /// libtorch when this binary was built with it.
    #[arg(long = "device", value_name = "DEVICE")]
    pub devices: Vec<String>,
    /// Model to benchmark (its config also sets the width sweep).
    #[arg(long, default_value = "checkpoints/shapes-small.safetensors")]
    pub checkpoint: PathBuf,
    /// A run of seconds (for CI and tests): K ∈ {1, 2}, batch {8, 16}, widths {8, 16} of a tiny
    /// freshly initialised model, a 256³ matmul.
    #[arg(long)]
    pub quick: bool,
    /// Timed runs of each configuration after one warm-up run; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Also write every figure to FILE as JSON (atomically).
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Step counts K, comma-separated [default: 1,2,4,8; --quick: 1,2].
    #[arg(long, value_delimiter = ',', value_name = "K,...")]
    pub steps: Option<Vec<usize>>,
    /// Batch sizes, comma-separated [default: 16,64,256; --quick: 8,16].
    #[arg(long, value_delimiter = ',', value_name = "B,...")]
    pub batches: Option<Vec<usize>>,
    /// Base channel widths w of the width sweep (channels scaled so the first level has w),
    /// comma-separated [default: 8,16,32; --quick: 8,16].
    #[arg(long, value_delimiter = ',', value_name = "W,...")]
    pub widths: Option<Vec<usize>>,
    /// At most this many (sample, transition) rows in one GRPO backward graph: a larger
    /// batch × (K − 1) is split into minibatches of a power of two samples (bounds memory).
    #[arg(long, default_value_t = 256)]
    pub max_update_rows: usize,
    /// Side n of the f32 n×n×n matmul of the peak [default: 1024; --quick: 256].
    #[arg(long, value_name = "N")]
    pub matmul_n: Option<usize>,
    /// SD3 mode: time TAFS-GRPO iterations of this diffusers SD3 / SD3.5 transformer (a
    /// pipeline or `transformer/` folder) instead of the ShapeWorld suite: the rollout (K
    /// one-step predictions with CFG, K − 1 annealed re-noisings) and `grpo_update` (clipped
    /// GRPO, β·KL to a reference, AdamW) as pipelines/tafs_grpo_sd3.yaml runs them, per sample,
    /// with the update split into forward, reference, backward and optimizer. --steps
    /// [default 4] and --batches [default 16] set K and the batch; --repeats the timed
    /// iterations after one warm-up. bench/reference/sd3_bench.py runs it against PyTorch +
    /// diffusers (BENCHMARKS.md, "SD3 small").
    #[arg(long, value_name = "DIR")]
    pub sd3: Option<PathBuf>,
    /// With --sd3: the prompts' embeddings (scripts/encode_prompts.py's format) [default:
    /// seeded random embeddings of --text-tokens tokens of the model's widths].
    #[arg(long, value_name = "FILE", requires = "sd3")]
    pub embeddings: Option<PathBuf>,
    /// With --sd3 and no --embeddings: text tokens per prompt (77 CLIP + 77 T5).
    #[arg(long, value_name = "L", default_value_t = 154)]
    pub text_tokens: usize,
    /// With --sd3: latent height and width [default: the model's sample_size].
    #[arg(long, value_name = "N", requires = "sd3")]
    pub latent_size: Option<usize>,
    /// With --sd3: classifier-free guidance scale (tafs_grpo_sd3.yaml's); ≤ 1 runs no
    /// unconditional branch.
    #[arg(long, value_name = "S", default_value_t = 4.5)]
    pub cfg: f32,
    /// With --sd3: weight β of the KL penalty (tafs_grpo_sd3.yaml's; 0: no reference forward).
    #[arg(long, value_name = "B", default_value_t = 0.04)]
    pub beta: f32,
    /// With --sd3: measure memory instead of time — per block and per row, the bytes an
    /// autodiff forward's graph holds and the peak resident bytes of a forward and of
    /// forward + backward, for SD3 blocks and SD3.5 blocks (RMS qk-norm, without and with the
    /// second attention) of the folder's width, at --probe-sides latent sizes with 333 text
    /// tokens per 1024 image tokens (SD3.5-Medium's ratio at 512 px).
    #[arg(long, requires = "sd3")]
    pub memory_probe: bool,
    /// With --memory-probe: latent sides, comma-separated [default: the model's and 1.5×].
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "N,...",
        requires = "memory_probe"
    )]
    pub probe_sides: Option<Vec<usize>>,
    /// With --memory-probe: rows (batch) of each probe forward.
    #[arg(long, value_name = "R", default_value_t = 4)]
    pub probe_rows: usize,
    /// With --sd3: train LoRA adapters of rank R and scale α/R on Flow-GRPO's eight attention
    /// projections instead of every weight (the base frozen; the KL reference is the base).
    #[arg(long, value_name = "R[:ALPHA]", requires = "sd3", value_parser = parse_lora)]
    pub lora: Option<(usize, f64)>,
    /// With --sd3: the update recomputes each transformer block in its backward instead of
    /// keeping the forward's activations (`activation_checkpointing: true`).
    #[arg(long, requires = "sd3")]
    pub activation_checkpointing: bool,
    /// With --lora: the frozen base's dtype (`flow_model`'s `base_dtype`): bf16 or f16 keep
    /// the base weights and the transformer's activations in half precision (libtorch devices
    /// only; adapters, AdamW state, loss and log-probs stay f32).
    #[arg(long, value_name = "DTYPE", default_value = "f32", requires = "lora", value_parser = ["f32", "bf16", "f16"])]
    pub base_dtype: String,
}

/// `R` or `R:ALPHA` (α defaults to R).
fn parse_lora(s: &str) -> Result<(usize, f64), String> {
    let (r, a) = match s.split_once(':') {
        Some((r, a)) => (r, Some(a)),
        None => (s, None),
    };
    let r: usize = r
        .parse()
        .ok()
        .filter(|r| *r >= 1)
        .ok_or_else(|| format!("rank {r:?} is not a positive integer"))?;
    let a = match a {
        Some(a) => a
            .parse::<f64>()
            .ok()
            .filter(|a| a.is_finite() && *a > 0.0)
            .ok_or_else(|| format!("alpha {a:?} is not a positive number"))?,
        None => r as f64,
    };
    Ok((r, a))
}

// ---------------------------------------------------------------------------------------------
// FLOP counting
// ---------------------------------------------------------------------------------------------

/// FLOPs of one forward of one sample (a multiply-add counts 2), by kind of layer, and the
/// number of parameters, counted from a [`FlowModelConfig`] by walking the same structure as
/// `FlowModelConfig::init`. Only convolutions, linear layers and attention (QKᵀ and AV) are
/// counted; norms, activations and other elementwise work are not (a few % here).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FlopCount {
    pub conv: f64,
    pub linear: f64,
    pub attention: f64,
    pub params: u64,
}

impl FlopCount {
    pub fn total(&self) -> f64 {
        self.conv + self.linear + self.attention
    }

    /// k×k convolution (stride 1, same padding, with bias) at an h×w output.
    fn conv(&mut self, k: usize, c_in: usize, c_out: usize, hw: usize) {
        self.conv += 2.0 * (k * k * c_in * c_out * hw) as f64;
        self.params += (k * k * c_in * c_out + c_out) as u64;
    }

    /// Linear layer (with bias) applied to `rows` vectors.
    fn linear(&mut self, rows: usize, d_in: usize, d_out: usize) {
        self.linear += 2.0 * (rows * d_in * d_out) as f64;
        self.params += (d_in * d_out + d_out) as u64;
    }

    /// Scaled dot-product attention, all heads together: QKᵀ and AV, each `lq·lk·width` MACs.
    fn attention(&mut self, lq: usize, lk: usize, width: usize) {
        self.attention += 4.0 * (lq * lk * width) as f64;
    }

    /// A normalisation layer's parameters (scale and shift when affine).
    fn norm(&mut self, channels: usize, affine: bool) {
        if affine {
            self.params += 2 * channels as u64;
        }
    }

    fn res_block(&mut self, c_in: usize, c_out: usize, cond: usize, hw: usize) {
        self.norm(c_in, true);
        self.conv(3, c_in, c_out, hw);
        self.linear(1, cond, 2 * c_out); // FiLM
        self.norm(c_out, false);
        self.conv(3, c_out, c_out, hw);
        if c_in != c_out {
            self.conv(1, c_in, c_out, hw);
        }
    }

    fn attn_block(&mut self, c: usize, text: usize, tokens: usize, hw: usize, joint: bool) {
        self.norm(c, true);
        self.linear(hw, c, if joint { 3 * c } else { c });
        self.linear(tokens, text, 2 * c);
        self.linear(hw, c, c);
        self.attention(hw, if joint { hw + tokens } else { tokens }, c);
    }
}

/// Count the forward FLOPs per sample and the parameters of the model `cfg` describes (prompts
/// padded to `max_tokens`, as flowrun always feeds them).
pub fn count_flops(cfg: &FlowModelConfig) -> FlopCount {
    let mut f = FlopCount::default();
    let (l, d, e) = (cfg.max_tokens, cfg.text_dim, cfg.cond_dim);
    // Text encoder: embeddings, pre-norm transformer layers (MLP ratio 4), final LayerNorm.
    f.params += ((cfg.vocab_size + cfg.max_tokens) * d) as u64;
    for _ in 0..cfg.text_layers {
        f.norm(d, true);
        f.linear(l, d, 3 * d);
        f.attention(l, l, d);
        f.linear(l, d, d);
        f.norm(d, true);
        f.linear(l, d, 4 * d);
        f.linear(l, 4 * d, d);
    }
    f.norm(d, true);
    // Conditioning vector.
    f.linear(1, cfg.time_freq_dim, e);
    f.linear(1, e, e);
    f.linear(1, d, e);
    // UNet.
    let ch = &cfg.channels;
    let n = ch.len();
    let side = |level: usize| cfg.image_size >> level;
    let hw = |level: usize| side(level) * side(level);
    let attn_at = |level: usize| cfg.attn_resolutions.contains(&side(level));
    let joint_at = |level: usize| cfg.joint_attn_resolutions.contains(&side(level));
    f.conv(3, cfg.image_channels, ch[0], hw(0));
    let mut c_prev = ch[0];
    for (i, &c) in ch.iter().enumerate() {
        for _ in 0..cfg.res_blocks {
            f.res_block(c_prev, c, e, hw(i));
            c_prev = c;
        }
        if attn_at(i) {
            f.attn_block(c, d, l, hw(i), joint_at(i));
        }
    }
    let c_mid = ch[n - 1];
    for _ in 0..cfg.mid_blocks.max(1) {
        f.res_block(c_mid, c_mid, e, hw(n - 1));
    }
    f.attn_block(c_mid, d, l, hw(n - 1), true);
    let mut c_cur = c_mid;
    for i in (0..n).rev() {
        let c = ch[i];
        f.res_block(c_cur + c, c, e, hw(i));
        for _ in 1..cfg.res_blocks {
            f.res_block(c, c, e, hw(i));
        }
        if attn_at(i) {
            f.attn_block(c, d, l, hw(i), joint_at(i));
        }
        if i > 0 {
            f.conv(1, c, ch[i - 1], hw(i));
        }
        c_cur = if i > 0 { ch[i - 1] } else { c };
    }
    f.norm(ch[0], true);
    f.conv(3, ch[0], cfg.image_channels, hw(0));
    f
}

// ---------------------------------------------------------------------------------------------
// Least squares
// ---------------------------------------------------------------------------------------------

/// A least-squares line y ≈ intercept + slope·x with its coefficient of determination.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Line {
    pub slope: f64,
    pub intercept: f64,
    pub r2: f64,
}

/// Ordinary least squares of `ys` on `xs`; `None` with fewer than two distinct x values.
pub fn fit_line(xs: &[f64], ys: &[f64]) -> Option<Line> {
    let n = xs.len().min(ys.len());
    if n < 2 {
        return None;
    }
    let (xs, ys) = (&xs[..n], &ys[..n]);
    let mx = xs.iter().sum::<f64>() / n as f64;
    let my = ys.iter().sum::<f64>() / n as f64;
    let sxx: f64 = xs.iter().map(|x| (x - mx) * (x - mx)).sum();
    let sxy: f64 = xs.iter().zip(ys).map(|(x, y)| (x - mx) * (y - my)).sum();
    if sxx <= 0.0 || !sxx.is_finite() {
        return None;
    }
    let slope = sxy / sxx;
    let intercept = my - slope * mx;
    let ss_tot: f64 = ys.iter().map(|y| (y - my) * (y - my)).sum();
    let ss_res: f64 = xs
        .iter()
        .zip(ys)
        .map(|(x, y)| (y - intercept - slope * x).powi(2))
        .sum();
    let r2 = if ss_tot > 0.0 {
        1.0 - ss_res / ss_tot
    } else {
        1.0
    };
    Some(Line {
        slope,
        intercept,
        r2,
    })
}

// ---------------------------------------------------------------------------------------------
// Timing
// ---------------------------------------------------------------------------------------------

/// Wall times of the timed runs of one configuration, in seconds.
#[derive(Debug, Clone)]
struct Timing {
    runs: Vec<f64>,
}

impl Timing {
    fn median(&self) -> f64 {
        let mut v = self.runs.clone();
        v.sort_by(f64::total_cmp);
        let m = v.len() / 2;
        if v.len() % 2 == 1 {
            v[m]
        } else {
            0.5 * (v[m - 1] + v[m])
        }
    }
    fn min(&self) -> f64 {
        self.runs.iter().copied().fold(f64::INFINITY, f64::min)
    }
    fn max(&self) -> f64 {
        self.runs.iter().copied().fold(f64::NEG_INFINITY, f64::max)
    }
    fn json(&self) -> Value {
        json!({
            "median_ms": self.median() * 1e3,
            "min_ms": self.min() * 1e3,
            "max_ms": self.max() * 1e3,
            "runs_ms": self.runs.iter().map(|s| s * 1e3).collect::<Vec<_>>(),
        })
    }
}

/// One warm-up run, then `repeats` timed runs of `f`; returns the timings and the last run's
/// output (each output is dropped outside the timed span).
fn measure<T>(repeats: usize, mut f: impl FnMut() -> Result<T>) -> Result<(Timing, T)> {
    let mut last = f()?;
    let mut runs = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        let t0 = Instant::now();
        let out = f()?;
        runs.push(t0.elapsed().as_secs_f64());
        last = out;
    }
    Ok((Timing { runs }, last))
}

// ---------------------------------------------------------------------------------------------
// Workloads
// ---------------------------------------------------------------------------------------------

/// Timesteps of step k (1-based) of K: t = 1 − (k−1)/K → t_next = 1 − k/K, and its temperature.
fn schedule(k: usize, steps: usize) -> (f32, f32, f32) {
    let t = 1.0 - (k - 1) as f32 / steps as f32;
    let t_next = 1.0 - k as f32 / steps as f32;
    let tau = if steps > 1 {
        (TAU_START + (TAU_END - TAU_START) * (k - 1) as f64 / (steps - 1) as f64) as f32
    } else {
        TAU_START as f32
    };
    (t, t_next, tau)
}

/// `b` training prompts in GRPO groups of 8 (of 1 when 8 does not divide `b`).
fn prompts(b: usize) -> Result<PromptBatch> {
    let g = if b.is_multiple_of(8) { 8 } else { 1 };
    let records: Vec<_> = world::generate_split(0, world::Split::Train, b / g)
        .into_iter()
        .map(Arc::new)
        .collect();
    make_batch(&records, g)
}

/// One TAFS rollout of K steps; returns its K − 1 transitions.
fn rollout(
    model: &FlowModel,
    dev: &Device,
    prompts: &PromptBatch,
    steps: usize,
    seed: u64,
) -> Result<Vec<Transition>> {
    let b = prompts.len();
    let shape = [b, world::CHANNELS, IMAGE_SIZE, IMAGE_SIZE];
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    // gaussian_noise
    let mut x = tensor_from_vec(sample_standard_normal(&mut rng, b * IMAGE_LEN), shape, dev);
    let mut transitions = Vec::with_capacity(steps.saturating_sub(1));
    let mut x0_last = None;
    for k in 1..=steps {
        let (t, t_next, tau) = schedule(k, steps);
        // one_step_sampler: v, x̂0 and ε̂ (the Prediction carries both).
        let tokens: Tensor<2, Int> = prompts.tokens_tensor(dev);
        let v = model.forward_cfg(x.clone(), Tensor::<1>::full([b], t, dev), tokens, 1.0);
        let x0 = x.clone() - v.clone().mul_scalar(t);
        let eps_hat = x.clone() + v.clone().mul_scalar(1.0 - t);
        drop(eps_hat);
        if k < steps {
            // annealed_renoiser
            let kernel = LinearGaussian::tafs(t, t_next, tau)?;
            let eps = tensor_from_vec(sample_standard_normal(&mut rng, b * IMAGE_LEN), shape, dev);
            let (x_next, old_logprob) = gaussian_step(&x, &v, kernel, eps)?;
            transitions.push(Transition {
                step: k,
                t,
                t_next,
                tau,
                kernel,
                sde_std: kernel.std,
                cfg: 1.0,
                x_t: x,
                x_next: x_next.clone(),
                old_logprob,
                sampler: "tafs",
                graph: None,
                branch: None,
            });
            x = x_next;
        }
        x0_last = Some(x0);
    }
    // Read the final prediction back, as a reward would (waits for asynchronous devices).
    if let Some(x0) = x0_last {
        let v = to_vec(&x0)?;
        ensure!(
            v.iter().all(|x| x.is_finite()),
            "the rollout produced non-finite images"
        );
    }
    Ok(transitions)
}

/// Seeded advantages for `transitions` × `b` samples (their values do not change the cost).
fn advantages(transitions: usize, b: usize) -> Advantages {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    Advantages {
        values: (0..transitions)
            .map(|_| sample_standard_normal(&mut rng, b))
            .collect(),
        mode: "bench".into(),
        mask: None,
    }
}

/// Samples per optimizer step: the whole batch (the pipeline's `minibatch: 0`) when its rows fit
/// `max_rows`, else the largest power of two that does.
fn minibatch(b: usize, transitions: usize, max_rows: usize) -> usize {
    if b * transitions <= max_rows {
        return b;
    }
    let fit = (max_rows / transitions.max(1)).max(1);
    let mut p = 1;
    while p * 2 <= fit {
        p *= 2;
    }
    p.min(b)
}

struct UpdateRun {
    timing: Timing,
    minibatch: usize,
    optimizer_steps: usize,
}

/// Time `GrpoUpdate::update` on `transitions` with a fresh trainer around `model`.
fn time_update(
    model: &FlowModel,
    transitions: &[Transition],
    prompts: &PromptBatch,
    repeats: usize,
    max_rows: usize,
) -> Result<UpdateRun> {
    let b = prompts.len();
    let mb = minibatch(b, transitions.len(), max_rows);
    let up = GrpoUpdate {
        clip: CLIP_RANGE as f32,
        adv_clip: ADV_CLIP as f32,
        beta: 0.0,
        epochs: 1,
        minibatch: if mb == b { 0 } else { mb },
        grad_accum: 1,
    };
    let mut res = FlowModelRes::new(
        model.clone(),
        TrainerConfig::new().with_lr(LR).with_grad_clip_norm(1.0),
        false,
        false,
    );
    let adv = advantages(transitions.len(), b);
    let refs: Vec<&Transition> = transitions.iter().collect();
    let (timing, stats) = measure(repeats, || up.update(&mut res, &refs, &adv, prompts, 0))?;
    Ok(UpdateRun {
        timing,
        minibatch: mb,
        optimizer_steps: stats.steps,
    })
}

/// The f32 n×n×n matmul, `per_run` products per timed run.
fn matmul_peak(dev: &Device, n: usize, per_run: usize, repeats: usize) -> Result<Timing> {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let a: Tensor<2> = tensor_from_vec(sample_standard_normal(&mut rng, n * n), [n, n], dev);
    let b: Tensor<2> = tensor_from_vec(sample_standard_normal(&mut rng, n * n), [n, n], dev);
    let (timing, ()) = measure(repeats, || {
        let mut c = None;
        for _ in 0..per_run {
            c = Some(a.clone().matmul(b.clone()));
        }
        if let Some(c) = c {
            // One element back: waits for asynchronous devices without copying the matrix.
            let v = to_vec(&c.slice([0..1, 0..1]))?;
            ensure!(v[0].is_finite(), "the matmul produced a non-finite value");
        }
        Ok(())
    })?;
    Ok(timing)
}

// ---------------------------------------------------------------------------------------------
// The suite
// ---------------------------------------------------------------------------------------------

struct Plan {
    devices: Vec<String>,
    steps: Vec<usize>,
    batches: Vec<usize>,
    widths: Vec<usize>,
    repeats: usize,
    max_rows: usize,
    matmul_n: usize,
    matmul_per_run: usize,
    /// The benchmarked model's config (the checkpoint's, or tiny with --quick).
    config: FlowModelConfig,
    /// Benchmark freshly initialised weights of `config` instead of loading the checkpoint.
    fresh: bool,
    source: String,
}

fn sorted_unique(mut v: Vec<usize>) -> Vec<usize> {
    v.sort_unstable();
    v.dedup();
    v
}

fn plan(args: &BenchArgs) -> Result<Plan> {
    let mut devices = args.devices.clone();
    if devices.is_empty() {
        devices.push("flex".into());
        if cfg!(feature = "tch") {
            devices.push("libtorch".into());
        }
    }
    let mut seen = Vec::new();
    for d in &devices {
        parse_device(d).map_err(anyhow::Error::msg)?;
        if !seen.contains(d) {
            seen.push(d.clone());
        }
    }
    let devices = seen;
    ensure!(args.repeats >= 1, "--repeats must be at least 1");
    ensure!(
        args.max_update_rows >= 1,
        "--max-update-rows must be at least 1"
    );
    let q = args.quick;
    let steps = sorted_unique(
        args.steps
            .clone()
            .unwrap_or_else(|| if q { vec![1, 2] } else { vec![1, 2, 4, 8] }),
    );
    let batches = sorted_unique(
        args.batches
            .clone()
            .unwrap_or_else(|| if q { vec![8, 16] } else { vec![16, 64, 256] }),
    );
    let widths = sorted_unique(
        args.widths
            .clone()
            .unwrap_or_else(|| if q { vec![8, 16] } else { vec![8, 16, 32] }),
    );
    ensure!(
        !steps.is_empty() && steps.iter().all(|&k| (1..=1000).contains(&k)),
        "--steps: give step counts K between 1 and 1000"
    );
    ensure!(
        !batches.is_empty() && batches.iter().all(|&b| b >= 1),
        "--batches: give batch sizes of at least 1"
    );
    ensure!(
        widths.iter().all(|&w| w >= 1),
        "--widths: give channel widths of at least 1"
    );
    let matmul_n = args.matmul_n.unwrap_or(if q { 256 } else { 1024 });
    ensure!(matmul_n >= 1, "--matmul-n must be at least 1");

    let ck = &args.checkpoint;
    if !ck.is_file() {
        bail!(
            "checkpoint {} not found (pass --checkpoint FILE, a .safetensors file written by flowrun)",
            ck.display()
        );
    }
    let (ck_config, _) = load_safetensors(ck, &Device::flex())
        .with_context(|| format!("reading checkpoint {}", ck.display()))?;
    if ck_config.vocab_size != world::vocab_size() || ck_config.max_tokens != world::MAX_TOKENS {
        bail!(
            "{}: model vocabulary ({} tokens, max {}) does not match ShapeWorld's ({}, max {})",
            ck.display(),
            ck_config.vocab_size,
            ck_config.max_tokens,
            world::vocab_size(),
            world::MAX_TOKENS
        );
    }
    let (config, source) = if q {
        (
            FlowModelConfig::tiny(ck_config.vocab_size, ck_config.max_tokens),
            "tiny config, fresh weights (--quick)".to_string(),
        )
    } else {
        (ck_config, ck.display().to_string())
    };
    for &w in &widths {
        width_config(&config, w)?;
    }
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
    Ok(Plan {
        devices,
        steps,
        batches,
        widths,
        repeats: args.repeats,
        max_rows: args.max_update_rows,
        matmul_n,
        matmul_per_run: if q { 2 } else { 4 },
        config,
        fresh: q,
        source,
    })
}

/// `base` with its channels scaled so that the first level has `w`.
fn width_config(base: &FlowModelConfig, w: usize) -> Result<FlowModelConfig> {
    let c0 = base.channels[0];
    let mut channels = Vec::with_capacity(base.channels.len());
    for &c in &base.channels {
        ensure!(
            (c * w).is_multiple_of(c0),
            "--widths: width {w} does not scale the channels {:?} to whole numbers",
            base.channels
        );
        channels.push(c * w / c0);
    }
    let cfg = base.clone().with_channels(channels);
    cfg.validate()
        .with_context(|| format!("--widths: width {w} gives an invalid model"))?;
    Ok(cfg)
}

/// Figures of one device.
struct DeviceReport {
    name: String,
    json: Value,
    table: String,
    /// (what, milliseconds or GFLOP/s, higher_is_better) for the ratios.
    figures: Vec<(String, f64, bool)>,
}

fn pct(x: f64) -> String {
    format!("{:.1}%", 100.0 * x)
}

/// Lines through `rows` (K, batch, ms): against the batch for each K (`by_k`), or against K
/// (K − 1 when `transitions`) for each batch.
fn fit_groups(
    rows: &[(usize, usize, f64)],
    by_k: bool,
    transitions: bool,
    label: &str,
    unit: &str,
    t: &mut String,
) -> Result<Vec<Value>> {
    let group = |r: &(usize, usize, f64)| if by_k { r.0 } else { r.1 };
    let x = |r: &(usize, usize, f64)| {
        if by_k {
            r.1 as f64
        } else if transitions {
            (r.0 - 1) as f64
        } else {
            r.0 as f64
        }
    };
    let mut keys: Vec<usize> = rows.iter().map(group).collect();
    keys.sort_unstable();
    keys.dedup();
    let mut out = Vec::new();
    for g in keys {
        let pts: Vec<_> = rows.iter().filter(|r| group(r) == g).collect();
        let xs: Vec<f64> = pts.iter().map(|r| x(r)).collect();
        let ys: Vec<f64> = pts.iter().map(|r| r.2).collect();
        let Some(line) = fit_line(&xs, &ys) else {
            continue;
        };
        let at = if by_k {
            format!("K={g}")
        } else {
            format!("batch={g}")
        };
        writeln!(
            t,
            "  {label:<22} {at:<10} {:>9.3} {unit} (intercept {:.1} ms, r² {:.4}, {} points)",
            line.slope,
            line.intercept,
            line.r2,
            xs.len()
        )?;
        out.push(json!({
            (if by_k { "k" } else { "batch" }): g,
            "slope_ms": line.slope,
            "intercept_ms": line.intercept,
            "r2": line.r2,
            "points": xs.len(),
        }));
    }
    Ok(out)
}

fn bench_device(
    name: &str,
    plan: &Plan,
    flops: &FlopCount,
    checkpoint: &Path,
) -> Result<DeviceReport> {
    let dev = open(name).map_err(anyhow::Error::msg)?;
    let r = plan.repeats;
    let mut figures = Vec::new();
    let mut t = String::new();
    let progress = |what: &str, timing: &Timing| {
        eprintln!("[{name}] {what}: median {:.1} ms", timing.median() * 1e3);
    };

    // Matmul peak.
    let n = plan.matmul_n;
    let mm = matmul_peak(&dev, n, plan.matmul_per_run, r)?;
    progress(&format!("matmul {n}³ ×{}", plan.matmul_per_run), &mm);
    let mm_flop = 2.0 * (n as f64).powi(3) * plan.matmul_per_run as f64;
    let peak = mm_flop / mm.median() / 1e9;
    let best = mm_flop / mm.min() / 1e9;
    figures.push(("matmul peak (GFLOP/s)".to_string(), peak, true));
    writeln!(
        t,
        "matmul peak (f32 {n}×{n}×{n}, {} per run): {peak:.1} GFLOP/s median, {best:.1} best",
        plan.matmul_per_run
    )?;

    let model = if plan.fresh {
        plan.config.init(&dev)
    } else {
        load_safetensors(checkpoint, &dev)
            .with_context(|| format!("loading {} on {name}", checkpoint.display()))?
            .1
    };
    let f = flops.total();

    // Rollout and update grid.
    let mut rollouts = Vec::new();
    let mut updates = Vec::new();
    let mut rollout_rows = Vec::new(); // (k, b, ms)
    let mut update_rows = Vec::new(); // (k, b, ms)
    writeln!(
        t,
        "\nrollout (TAFS: K one-step predictions + K−1 annealed re-noisings, no reward)"
    )?;
    writeln!(
        t,
        "{:>3} {:>6} {:>11} {:>10} {:>14} {:>9} {:>7}",
        "K", "batch", "median ms", "samples/s", "ms/sample·step", "GFLOP/s", "% peak"
    )?;
    let mut update_table = String::new();
    writeln!(
        update_table,
        "\nGRPO update (GrpoUpdate::update: one epoch over the K−1 transitions, clip {CLIP_RANGE:e}, AdamW)"
    )?;
    writeln!(
        update_table,
        "{:>3} {:>6} {:>9} {:>6} {:>11} {:>14} {:>9} {:>7}",
        "K", "batch", "minibatch", "steps", "median ms", "ms/sample·step", "GFLOP/s", "% peak"
    )?;
    for &b in &plan.batches {
        let batch = prompts(b)?;
        for &k in &plan.steps {
            let (timing, transitions) = measure(r, || rollout(&model, &dev, &batch, k, 1))?;
            progress(&format!("rollout K={k} batch={b}"), &timing);
            let s = timing.median();
            let gflops = f * (b * k) as f64 / s / 1e9;
            writeln!(
                t,
                "{k:>3} {b:>6} {:>11.1} {:>10.1} {:>14.3} {gflops:>9.2} {:>7}",
                s * 1e3,
                b as f64 / s,
                s * 1e3 / (b * k) as f64,
                pct(gflops / peak)
            )?;
            figures.push((format!("rollout K={k} batch={b} (ms)"), s * 1e3, false));
            rollout_rows.push((k, b, s * 1e3));
            let mut e = timing.json();
            let o = e.as_object_mut().expect("object");
            o.insert("k".into(), json!(k));
            o.insert("batch".into(), json!(b));
            o.insert("samples_per_s".into(), json!(b as f64 / s));
            o.insert("ms_per_sample_step".into(), json!(s * 1e3 / (b * k) as f64));
            o.insert("gflops".into(), json!(gflops));
            o.insert("peak_fraction".into(), json!(gflops / peak));
            rollouts.push(e);

            if k < 2 {
                continue;
            }
            let up = time_update(&model, &transitions, &batch, r, plan.max_rows)?;
            drop(transitions);
            progress(&format!("update K={k} batch={b}"), &up.timing);
            let s = up.timing.median();
            let rows = (b * (k - 1)) as f64;
            let gflops = TRAIN_FLOP_FACTOR * f * rows / s / 1e9;
            writeln!(
                update_table,
                "{k:>3} {b:>6} {:>9} {:>6} {:>11.1} {:>14.3} {gflops:>9.2} {:>7}",
                up.minibatch,
                up.optimizer_steps,
                s * 1e3,
                s * 1e3 / rows,
                pct(gflops / peak)
            )?;
            figures.push((format!("update K={k} batch={b} (ms)"), s * 1e3, false));
            update_rows.push((k, b, s * 1e3));
            let mut e = up.timing.json();
            let o = e.as_object_mut().expect("object");
            o.insert("k".into(), json!(k));
            o.insert("batch".into(), json!(b));
            o.insert("transitions".into(), json!(k - 1));
            o.insert("minibatch".into(), json!(up.minibatch));
            o.insert("optimizer_steps".into(), json!(up.optimizer_steps));
            o.insert("ms_per_sample_step".into(), json!(s * 1e3 / rows));
            o.insert("gflops".into(), json!(gflops));
            o.insert("peak_fraction".into(), json!(gflops / peak));
            updates.push(e);
        }
    }
    t.push_str(&update_table);
    if updates.is_empty() {
        writeln!(t, "(no K ≥ 2 in --steps: nothing to update)")?;
    }

    // Fits.
    let mut fits = serde_json::Map::new();
    writeln!(t, "\nfits (least squares, time = intercept + slope·x)")?;
    for (key, label, unit, rows, by_k, transitions) in [
        (
            "rollout_vs_batch",
            "rollout vs batch",
            "ms/sample",
            &rollout_rows,
            true,
            false,
        ),
        (
            "rollout_vs_k",
            "rollout vs K",
            "ms/step",
            &rollout_rows,
            false,
            false,
        ),
        (
            "update_vs_batch",
            "update vs batch",
            "ms/sample",
            &update_rows,
            true,
            true,
        ),
        (
            "update_vs_transitions",
            "update vs K−1",
            "ms/transition",
            &update_rows,
            false,
            true,
        ),
    ] {
        let v = fit_groups(rows, by_k, transitions, label, unit, &mut t)?;
        fits.insert(key.into(), Value::Array(v));
    }
    for (key, label, rows, tr) in [
        (
            "rollout_vs_sample_steps",
            "rollout vs batch·K",
            &rollout_rows,
            0usize,
        ),
        (
            "update_vs_sample_steps",
            "update vs batch·(K−1)",
            &update_rows,
            1usize,
        ),
    ] {
        let xs: Vec<f64> = rows.iter().map(|r| (r.1 * (r.0 - tr)) as f64).collect();
        let ys: Vec<f64> = rows.iter().map(|r| r.2).collect();
        if let Some(line) = fit_line(&xs, &ys) {
            writeln!(
                t,
                "  {label:<33} {:>9.3} ms/sample·step (intercept {:.1} ms, r² {:.4}, {} points)",
                line.slope,
                line.intercept,
                line.r2,
                xs.len()
            )?;
            fits.insert(key.into(), json!({"slope_ms": line.slope, "intercept_ms": line.intercept, "r2": line.r2, "points": xs.len()}));
        }
    }

    // Width sweep.
    let mut widths = Vec::new();
    let wb = plan.batches[plan.batches.len() / 2];
    let wk = 2;
    if !plan.widths.is_empty() {
        writeln!(
            t,
            "\nwidth (fresh weights, channels scaled from {:?}; rollout K={wk} and its update, batch {wb})",
            plan.config.channels
        )?;
        writeln!(
            t,
            "{:>5} {:>16} {:>10} {:>13} {:>11} {:>10} {:>11} {:>7}",
            "width",
            "channels",
            "params",
            "GFLOP/sample",
            "rollout ms",
            "update ms",
            "upd GFLOP/s",
            "% peak"
        )?;
        let batch = prompts(wb)?;
        let (mut xs, mut ys_r, mut ys_u) = (Vec::new(), Vec::new(), Vec::new());
        for &w in &plan.widths {
            let cfg = width_config(&plan.config, w)?;
            let wf = count_flops(&cfg);
            let m = cfg.init(&dev);
            let (rt, transitions) = measure(r, || rollout(&m, &dev, &batch, wk, 2))?;
            progress(&format!("width {w}: rollout K={wk} batch={wb}"), &rt);
            let up = time_update(&m, &transitions, &batch, r, plan.max_rows)?;
            progress(&format!("width {w}: update K={wk} batch={wb}"), &up.timing);
            let (rs, us) = (rt.median(), up.timing.median());
            let rows = (wb * (wk - 1)) as f64;
            let ug = TRAIN_FLOP_FACTOR * wf.total() * rows / us / 1e9;
            let rg = wf.total() * (wb * wk) as f64 / rs / 1e9;
            writeln!(
                t,
                "{w:>5} {:>16} {:>10} {:>13.4} {:>11.1} {:>10.1} {ug:>11.2} {:>7}",
                format!("{:?}", cfg.channels),
                m.num_params(),
                wf.total() / 1e9,
                rs * 1e3,
                us * 1e3,
                pct(ug / peak)
            )?;
            figures.push((format!("width {w} rollout (ms)"), rs * 1e3, false));
            figures.push((format!("width {w} update (ms)"), us * 1e3, false));
            xs.push(w as f64);
            ys_r.push(rs * 1e3);
            ys_u.push(us * 1e3);
            widths.push(json!({
                "base_width": w, "channels": cfg.channels, "params": m.num_params(),
                "forward_flops_per_sample": wf.total(), "batch": wb, "k": wk,
                "rollout": rt.json(), "update": up.timing.json(),
                "rollout_gflops": rg, "update_gflops": ug, "update_peak_fraction": ug / peak,
            }));
        }
        let mut wfit = serde_json::Map::new();
        for (what, ys) in [("rollout", &ys_r), ("update", &ys_u)] {
            if let Some(line) = fit_line(&xs, ys) {
                let lx: Vec<f64> = xs.iter().map(|x| x.ln()).collect();
                let ly: Vec<f64> = ys.iter().map(|y| y.max(1e-9).ln()).collect();
                let exp = fit_line(&lx, &ly).map_or(f64::NAN, |l| l.slope);
                writeln!(
                    t,
                    "  {what} vs width: {:.3} ms per channel of base width (intercept {:.1} ms, r² {:.4}); time ∝ width^{exp:.2}",
                    line.slope, line.intercept, line.r2
                )?;
                wfit.insert(what.into(), json!({"slope_ms_per_channel": line.slope, "intercept_ms": line.intercept, "r2": line.r2, "loglog_exponent": exp}));
            }
        }
        fits.insert("width".into(), Value::Object(wfit));
    }

    let json = json!({
        "device": name,
        "matmul": {"n": n, "per_run": plan.matmul_per_run, "timing": mm.json(), "gflops": peak, "best_gflops": best},
        "rollout": rollouts,
        "update": updates,
        "width": widths,
        "fits": fits,
    });
    Ok(DeviceReport {
        name: name.to_string(),
        json,
        table: t,
        figures,
    })
}

// ---------------------------------------------------------------------------------------------
// Header: machine, commit, date, command
// ---------------------------------------------------------------------------------------------

/// `YYYY-MM-DD HH:MM:SS` UTC of a Unix time (proleptic Gregorian calendar).
pub fn utc_datetime(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Days since 1970-01-01 → civil date (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn git(args: &[&str]) -> Option<String> {
    let o = std::process::Command::new("git").args(args).output().ok()?;
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

fn load_average() -> Option<Vec<f64>> {
    let s = std::fs::read_to_string("/proc/loadavg").ok()?;
    let v: Vec<f64> = s
        .split_whitespace()
        .take(3)
        .filter_map(|x| x.parse().ok())
        .collect();
    (v.len() == 3).then_some(v)
}

/// The command line as typed (arguments with spaces or quotes are single-quoted).
fn command_line() -> String {
    std::env::args()
        .map(|a| {
            if !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=,:@+%".contains(c))
            {
                a
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The first lines of a bench report: `title — date`, the command, the machine and its load.
pub(crate) fn print_run_header(title: &str, h: &Value) {
    println!("{title} — {} UTC", h["date_utc"].as_str().unwrap_or("?"));
    println!("command: {}", h["command"].as_str().unwrap_or("?"));
    println!(
        "machine: {}, {} cores; load average at start {}",
        h["cpu_model"].as_str().unwrap_or("?"),
        h["cores"],
        load_average().map_or("unknown".into(), |v| format!(
            "{:.2} {:.2} {:.2}",
            v[0], v[1], v[2]
        ))
    );
}

fn header() -> Value {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let dirty = git(&["status", "--porcelain", "--untracked-files=no"]).map(|s| !s.is_empty());
    json!({
        "date_utc": utc_datetime(secs),
        "command": command_line(),
        "flowrun_version": env!("CARGO_PKG_VERSION"),
        "built_with_libtorch": cfg!(feature = "tch"),
        "git_commit": git(&["rev-parse", "--short", "HEAD"]),
        "git_dirty": dirty,
        "cpu_model": cpu_model(),
        "cores": cores,
        "load_average_start": load_average(),
    })
}

// ---------------------------------------------------------------------------------------------
// Entry point
// ---------------------------------------------------------------------------------------------

/// `flowrun bench`.
pub fn run(args: &BenchArgs) -> Result<()> {
    if let Some(dir) = &args.sd3 {
        return sd3::run(args, dir);
    }
    let plan = plan(args)?;
    let mut header = header();
    let flops = count_flops(&plan.config);
    let params = plan.config.init(&Device::flex()).num_params();
    if params as u64 != flops.params {
        eprintln!(
            "flowrun bench: warning: the FLOP counter sees {} parameters but the model has {params}; its layer walk is out of date (src/bench.rs, count_flops)",
            flops.params
        );
    }
    let h = &header;
    print_run_header("flowrun bench", h);
    println!(
        "commit: {}{}; flowrun {}, built {} libtorch",
        h["git_commit"].as_str().unwrap_or("unknown"),
        if h["git_dirty"] == json!(true) {
            " (with uncommitted changes)"
        } else {
            ""
        },
        env!("CARGO_PKG_VERSION"),
        if cfg!(feature = "tch") {
            "with"
        } else {
            "without"
        }
    );
    println!(
        "model: {} — channels {:?}, {params} parameters, {:.4} GFLOP per sample forward (conv {:.4} + linear {:.4} + attention {:.4}; training ≈ 3×)",
        plan.source,
        plan.config.channels,
        flops.total() / 1e9,
        flops.conv / 1e9,
        flops.linear / 1e9,
        flops.attention / 1e9
    );
    println!(
        "settings: K {:?}, batch {:?}, widths {:?}; {} timed runs after 1 warm-up (medians); at most {} rows per GRPO backward",
        plan.steps, plan.batches, plan.widths, plan.repeats, plan.max_rows
    );

    let mut reports = Vec::new();
    for name in &plan.devices {
        let rep = bench_device(name, &plan, &flops, &args.checkpoint)?;
        println!("\n== {} ==\n{}", rep.name, rep.table);
        reports.push(rep);
    }

    // Ratios against flex (or the first device), same process.
    let base = reports.iter().position(|r| r.name == "flex").unwrap_or(0);
    let mut ratios = Vec::new();
    if reports.len() > 1 {
        let b = &reports[base];
        println!(
            "\n== ratios to {} (same process; > 1: faster than {}) ==",
            b.name, b.name
        );
        println!(
            "{:<32} {:>12} {:>12} {:>8}",
            "what", b.name, "other", "ratio"
        );
        for (i, r) in reports.iter().enumerate() {
            if i == base {
                continue;
            }
            for (what, v, higher) in &r.figures {
                let Some((_, bv, _)) = b.figures.iter().find(|(w, _, _)| w == what) else {
                    continue;
                };
                let ratio = if *higher { v / bv } else { bv / v };
                println!("{what:<32} {bv:>12.1} {v:>12.1} {ratio:>7.2}× ({})", r.name);
                ratios.push(json!({"device": r.name, "baseline": b.name, "what": what, "baseline_value": bv, "value": v, "speedup": ratio}));
            }
        }
    }

    if let Some(o) = header.as_object_mut() {
        o.insert("load_average_end".into(), json!(load_average()));
    }
    let report = json!({
        "header": header,
        "settings": {
            "devices": plan.devices, "steps": plan.steps, "batches": plan.batches, "widths": plan.widths,
            "repeats": plan.repeats, "warmup_runs": 1, "max_update_rows": plan.max_rows,
            "matmul_n": plan.matmul_n, "matmul_per_run": plan.matmul_per_run,
            "lr": LR, "clip_range": CLIP_RANGE, "adv_clip": ADV_CLIP,
            "tau_start": TAU_START, "tau_end": TAU_END,
            "train_flop_factor": TRAIN_FLOP_FACTOR,
        },
        "model": {
            "source": plan.source, "checkpoint": args.checkpoint.display().to_string(),
            "channels": plan.config.channels, "params": params,
            "forward_flops_per_sample": {"conv": flops.conv, "linear": flops.linear, "attention": flops.attention, "total": flops.total()},
            "train_flops_per_sample": TRAIN_FLOP_FACTOR * flops.total(),
        },
        "devices": reports.iter().map(|r| r.json.clone()).collect::<Vec<_>>(),
        "ratios": ratios,
    });
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report)?;
        runner::fsutil::write_atomic(path, text.as_bytes())?;
        println!("\nwrote {}", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One level of 2 channels at 4×4, one text layer of width 2, two tokens: small enough to
    /// count by hand.
    fn micro() -> FlowModelConfig {
        FlowModelConfig::new(5, 2)
            .with_image_size(4)
            .with_image_channels(1)
            .with_channels(vec![2])
            .with_attn_resolutions(vec![])
            .with_joint_attn_resolutions(vec![])
            .with_attn_head_dim(2)
            .with_groups(1)
            .with_text_dim(2)
            .with_text_layers(1)
            .with_text_heads(1)
            .with_time_freq_dim(2)
            .with_cond_dim(2)
    }

    #[test]
    fn should_count_the_flops_of_a_micro_model_by_hand() {
        let f = count_flops(&micro());
        // Convolutions (2·k²·c_in·c_out·H·W, H·W = 16):
        //   conv_in 3×3 1→2: 2·9·1·2·16 = 576
        //   down block 2→2: two 3×3 2→2: 2·(2·9·2·2·16) = 2304
        //   mid block 2→2: 2304
        //   up block (2+2)→2: 3×3 4→2 2304 + 3×3 2→2 1152 + 1×1 skip 4→2 2·4·2·16 = 256 → 3712
        //   out_conv 3×3 2→1: 576
        assert_eq!(f.conv, (576 + 2304 + 2304 + 3712 + 576) as f64);
        // Linear (2·rows·d_in·d_out), L = 2 tokens, D = E = F = 2:
        //   text layer: qkv 2·2·2·6 = 48, proj 2·2·2·2 = 16, fc1 2·2·2·8 = 64, fc2 64 → 192
        //   conditioning: time_fc1, time_fc2, text_cond, each 2·2·2 = 8 → 24
        //   FiLM of the three res blocks: 3 × 2·2·4 = 48
        //   mid joint attention (C = 2, 16 image tokens): qkv 2·16·2·6 = 384,
        //   text_kv 2·2·2·4 = 32, proj 2·16·2·2 = 128 → 544
        assert_eq!(f.linear, (192 + 24 + 48 + 544) as f64);
        // Attention (4·Lq·Lk·width): text 4·2·2·2 = 32; joint 4·16·(16 + 2)·2 = 2304.
        assert_eq!(f.attention, (32 + 2304) as f64);
        assert_eq!(f.total(), 12_616.0);
    }

    #[test]
    fn should_walk_the_same_layers_as_the_model() {
        let dev = Device::flex();
        let v = world::vocab_size();
        for cfg in [
            micro(),
            FlowModelConfig::tiny(v, world::MAX_TOKENS),
            FlowModelConfig::small(v, world::MAX_TOKENS),
            FlowModelConfig::tiny(v, world::MAX_TOKENS)
                .with_res_blocks(2)
                .with_mid_blocks(2),
        ] {
            let params = cfg.init(&dev).num_params() as u64;
            assert_eq!(count_flops(&cfg).params, params, "{:?}", cfg.channels);
        }
    }

    #[test]
    fn should_scale_conv_flops_with_the_square_of_the_width() {
        let base = FlowModelConfig::small(world::vocab_size(), world::MAX_TOKENS);
        let a = count_flops(&width_config(&base, 16).unwrap());
        let b = count_flops(&width_config(&base, 32).unwrap());
        // Every conv has c_in and c_out proportional to the width except conv_in/out_conv.
        let ratio = b.conv / a.conv;
        assert!(ratio > 3.5 && ratio <= 4.0, "{ratio}");
    }

    #[test]
    fn should_fit_an_exact_line_and_a_hand_computed_noisy_one() {
        let l = fit_line(
            &[16.0, 64.0, 256.0],
            &[10.0 + 2.0 * 16.0, 10.0 + 128.0, 10.0 + 512.0],
        )
        .unwrap();
        assert!((l.slope - 2.0).abs() < 1e-12 && (l.intercept - 10.0).abs() < 1e-9);
        assert!((l.r2 - 1.0).abs() < 1e-12);
        // x = 1, 2, 3; y = 1, 3, 2: x̄ = 2, ȳ = 2, Sxx = 2, Sxy = (−1)(−1) + 0 + (1)(0) = 1
        // → slope 0.5, intercept 1; residuals −0.5, 1, −0.5: SS_res = 1.5, SS_tot = 2, r² = 0.25.
        let l = fit_line(&[1.0, 2.0, 3.0], &[1.0, 3.0, 2.0]).unwrap();
        assert!((l.slope - 0.5).abs() < 1e-12, "{l:?}");
        assert!((l.intercept - 1.0).abs() < 1e-12, "{l:?}");
        assert!((l.r2 - 0.25).abs() < 1e-12, "{l:?}");
    }

    #[test]
    fn should_refuse_to_fit_fewer_than_two_distinct_x() {
        assert!(fit_line(&[3.0], &[1.0]).is_none());
        assert!(fit_line(&[2.0, 2.0], &[1.0, 5.0]).is_none());
        assert!(fit_line(&[], &[]).is_none());
    }

    #[test]
    fn should_take_the_middle_of_the_sorted_runs_as_median() {
        assert_eq!(
            Timing {
                runs: vec![3.0, 1.0, 2.0]
            }
            .median(),
            2.0
        );
        assert_eq!(
            Timing {
                runs: vec![4.0, 1.0, 2.0, 3.0]
            }
            .median(),
            2.5
        );
    }

    #[test]
    fn should_split_large_updates_into_power_of_two_minibatches() {
        assert_eq!(minibatch(64, 3, 256), 64);
        assert_eq!(minibatch(256, 1, 256), 256);
        assert_eq!(minibatch(256, 3, 256), 64);
        assert_eq!(minibatch(256, 7, 256), 32);
        assert_eq!(minibatch(16, 7, 1), 1);
    }

    #[test]
    fn should_format_unix_times_as_utc_dates() {
        assert_eq!(utc_datetime(0), "1970-01-01 00:00:00");
        assert_eq!(utc_datetime(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(utc_datetime(1_700_000_000), "2023-11-14 22:13:20");
    }

    #[test]
    fn should_follow_the_tafs_schedule() {
        assert_eq!(schedule(1, 4), (1.0, 0.75, 1.0));
        let (t, tn, tau) = schedule(4, 4);
        assert!((t - 0.25).abs() < 1e-6 && tn == 0.0 && (tau - 0.6).abs() < 1e-6);
        assert_eq!(schedule(1, 1), (1.0, 0.0, 1.0));
    }
}
