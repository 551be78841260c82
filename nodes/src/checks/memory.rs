//! The memory a pipeline will need at its peak, estimated at validation from the batch, the
//! model and `rollout_graph`, and compared with the machine's memory (`memory_check`).
//!
//! The estimate is a model of the peak, calibrated on measured peaks (README "Runs",
//! "What validation estimates"):
//! * weights: each `flow_model` holds about [`WEIGHT_COPIES`] f32 copies of its parameters
//!   (weights, gradient, two AdamW moments, the sampling and reference copies);
//! * activations: one kept autodiff forward of one sample holds `conv · V_conv + attn · V_attn`
//!   bytes, where `V_conv` is the UNet's feature volume (channels × side² summed over its
//!   residual blocks) and `V_attn` the attention score volume (heads × image tokens × keys);
//!   with `rollout_graph: keep` the update holds one such graph per sample and trained
//!   transition (a windowed sampler's ODE steps keep none), with `recompute` about `recompute`
//!   times one per sample of the update's minibatch;
//! * a fixed `base` (binary, dataset, runtime, libtorch's libraries),
//!
//! with `conv`, `attn`, `recompute` and `base` fitted per backend ([`UNET_FLEX`],
//! [`UNET_LIBTORCH`]).
//!
//! For `arch: sd3` the activations are per transformer block and row (CFG: 2 rows per sample):
//! `α·T·D + β·heads·T²` with T image + text tokens, D the inner width, α and β per kind of
//! block ([`SD3_BLOCK_BYTES`], measured per block with `sd3_bench.py --memory`); the weights
//! are counted per copy the policy keeps (weights, gradient, two AdamW moments, EMA, reference;
//! with LoRA one frozen copy and the adapters' own). A half-precision LoRA base
//! (`base_dtype: bf16`/`f16`) counts 2 bytes per frozen parameter and scales the activations
//! by [`SD3_HALF_ACTIVATION_FACTOR`].
//!
//! The budget is the host's memory, or on `libtorch-cuda:N` the GPU's free memory
//! (`cudaMemGetInfo`), where weights and activations live ([`device_memory`]).

use std::fs;
use std::io::Read;
use std::path::Path;

use runner::{Diagnostic, Diagnostics, MemoryCheck, Pipeline};

use crate::model::checkpoint::CONFIG_KEY;
use crate::model::lora::{self, BaseDtype, Linears, LoraConfig};
use crate::model::sd3::{Sd3Config, Sd3Transformer, read_config};
use crate::model::text_embeddings::PromptEmbeddings;
use crate::model::{FlowModel, FlowModelConfig, VelocityModel};
use crate::world;

/// Bytes one row's autodiff forward keeps per SD3 block on libtorch: (α per token·channel,
/// β per head·token²) for SD3 blocks, SD3.5 blocks (RMS qk-norm) and SD3.5 blocks with the
/// second attention, fitted to `sd3_bench.py --memory` (BENCHMARKS.md, "Memory per block and
/// the SD3.5-Medium estimate"; `results/sd3-bench/memory.txt`). libtorch's fused attention
/// keeps no score matrix: β ≈ 0.
pub const SD3_BLOCK_BYTES_LIBTORCH: [(f64, f64); 3] = [(86.6, 0.0), (102.8, 0.0), (133.4, 0.0)];
/// The same on flex, whose autodiff attention keeps the heads × T² scores
/// (`results/sd3-bench/memory-flex.txt`).
pub const SD3_BLOCK_BYTES_FLEX: [(f64, f64); 3] = [(114.3, 11.8), (130.7, 11.8), (161.5, 18.6)];
/// Peak of forward + backward of one transition over its graph (the probes' ratio: 1.14 on
/// libtorch, 1.00 on flex).
pub const SD3_UPDATE_FACTOR_LIBTORCH: f64 = 1.15;
pub const SD3_UPDATE_FACTOR_FLEX: f64 = 1.0;

/// The update's memory per sample with a half-precision base over an f32 one: 62.7 / 85.8 MiB
/// measured (SD3 small, LoRA r32, libtorch CPU; BENCHMARKS.md, "The update's peak memory per
/// sample"). Not 0.5: the velocity, log-probs, loss and the adapters' path stay f32.
pub const SD3_HALF_ACTIVATION_FACTOR: f64 = 0.73;

/// The ShapeWorld UNet's memory on one backend, fitted to the peak RSS of TAFS-GRPO runs over 3
/// iterations (`small` and `tiny` models, 16–256 samples, `rollout_graph` keep and recompute;
/// README "What validation estimates" has the runs and the command).
pub struct UnetFit {
    /// Bytes one kept forward graph holds per element of the UNet's feature volume.
    pub conv: f64,
    /// Bytes per element of the attention score volume.
    pub attn: f64,
    /// Peak of a `recompute` update per sample of a minibatch (its forward and backward), as a
    /// multiple of one kept graph.
    pub recompute: f64,
    /// The process before any batch (binary, runtime, dataset; libtorch's libraries).
    pub base: f64,
}

/// flex: its fused convolution, GroupNorm and attention kernels keep little beyond their
/// inputs, so a kept graph is small and a recompute update's backward buffers exceed it.
pub const UNET_FLEX: UnetFit = UnetFit {
    conv: 36.6,
    attn: 4.15,
    recompute: 1.15,
    base: 48.0 * MIB,
};
/// libtorch CPU: the libraries take ~0.5 GiB; a kept graph is about twice flex's.
pub const UNET_LIBTORCH: UnetFit = UnetFit {
    conv: 75.1,
    attn: 4.04,
    recompute: 1.3,
    base: 512.0 * MIB,
};

/// f32 copies of the parameters a trained model holds.
pub const WEIGHT_COPIES: f64 = 6.0;
/// The process without any batch (the SD3 estimate's; the UNet's is per backend, [`UnetFit`]).
pub const BASE_BYTES: f64 = 24.0 * MIB;

const MIB: f64 = 1024.0 * 1024.0;
const GIB: f64 = 1024.0 * MIB;

/// Samplers and steps whose forward passes become the update's graph.
const TRANSITION_NODES: &[&str] = &["annealed_renoiser", "flow_sde_step"];

/// The update nodes whose `minibatch` sets how many samples one backward holds.
const UPDATE_NODES: &[&str] = &["grpo_update", "nft_update"];

pub fn check(p: &Pipeline) -> Diagnostics {
    let mut diags = Diagnostics::default();
    if p.memory_check == MemoryCheck::Off {
        return diags;
    }
    let Some(est) = estimate(p) else {
        return diags;
    };
    let Some((machine, what)) = device_memory(&p.device) else {
        return diags;
    };
    if est.bytes <= machine as f64 {
        return diags;
    }
    let message = format!(
        "the pipeline needs about {} of memory at its peak, more than {what}: {}",
        human(est.bytes),
        est.why
    );
    let help = "make the batch smaller, or set `rollout_graph: recompute` on the model; \
                `--set memory_check=warn` runs it anyway, `off` skips the estimate";
    let at = est.at.as_ref();
    let d = match (p.memory_check, at) {
        (MemoryCheck::Error, Some((node, param))) => {
            let mut d = node.params.error(param, message);
            d.help = Some(help.to_string());
            d
        }
        (MemoryCheck::Error, None) => Diagnostic::error(message).help(help),
        (_, Some((node, param))) => {
            let mut d = node.params.error(param, message);
            d.severity = runner::diag::Severity::Warning;
            d
        }
        (_, None) => Diagnostic::warning(message),
    };
    diags.push(d);
    diags
}

/// An estimate and what it is made of.
pub struct Estimate {
    pub bytes: f64,
    /// The settings it comes from, in words.
    pub why: String,
    /// The parameter that sets the batch (where an error points).
    at: Option<(runner::compile::NodeInst, &'static str)>,
}

/// The peak memory estimate of `p`, when it trains or samples a `flow_model`.
pub fn estimate(p: &Pipeline) -> Option<Estimate> {
    if let Some(r) = p
        .resources
        .iter()
        .find(|r| r.ty == crate::flow_model::TYPE && r.params.str("arch").ok() == Some("sd3"))
    {
        return estimate_sd3(p, r);
    }
    let mut weights = 0.0;
    let mut graph = 0.0f64;
    let mut keep = false;
    let mut sizes = Vec::new();
    let fit = if p.device.starts_with("libtorch") {
        &UNET_LIBTORCH
    } else {
        &UNET_FLEX
    };
    for r in super::flow_models(p) {
        // Calibrated on the ShapeWorld UNet only: no estimate for other architectures.
        if r.params.str("arch").is_ok_and(|a| a != "shapes_unet") {
            return None;
        }
        let cfg = model_config(&r.params)?;
        weights += match lora_of(&r.params) {
            // One frozen copy; the adapters' weights, gradient, moments and EMA.
            Some(l) if cfg.validate().is_ok() => {
                let mut m = cfg.init_zeros(&burn::tensor::Device::flex());
                4.0 * (param_count(&cfg) as f64
                    + 5.0 * adapter_params(&mut m, &l, FlowModel::LORA_TARGETS) as f64)
            }
            _ => WEIGHT_COPIES * 4.0 * param_count(&cfg) as f64,
        };
        graph = graph.max(graph_bytes(&cfg, fit));
        keep |= r.params.str("rollout_graph").ok() == Some("keep");
        sizes.push(format!(
            "`{}` (~{} per sample graph)",
            r.name,
            human(graph_bytes(&cfg, fit))
        ));
    }
    if sizes.is_empty() {
        return None;
    }
    // The batch: prompts × group of the loader, or a replay batch.
    let mut batch = 0u64;
    let mut at = None;
    let mut batch_words = String::new();
    for n in &p.nodes {
        let (b, words, param) = match n.ty {
            "prompt_loader" => {
                let ppi = n.params.i64("prompts_per_iter").ok()? as u64;
                let g = n.params.i64("group_size").ok()? as u64;
                (
                    ppi.saturating_mul(g),
                    format!("prompts_per_iter {ppi} × group_size {g}"),
                    "prompts_per_iter",
                )
            }
            "parquet_source" => {
                let b = n.params.i64("batch").ok()? as u64;
                (b, format!("batch {b}"), "batch")
            }
            "flow_matching_train" => {
                let b = n.params.i64("batch").ok()? as u64;
                (b, format!("batch {b}"), "batch")
            }
            _ => continue,
        };
        if b > batch {
            batch = b;
            at = Some((n.clone(), param));
            batch_words = format!("{words} in node `{}`", n.id);
        }
    }
    if batch == 0 {
        return None; // set by the data (a replay of stored iterations): not known here
    }
    let transitions = transitions(p);
    let minibatch = update_minibatch(p, batch);
    let b = batch as f64;
    let (activations, mode) = if keep {
        (
            b * transitions * graph,
            format!("{transitions} kept rollout graphs per sample (`rollout_graph: keep`)"),
        )
    } else {
        let mb = minibatch as f64;
        (
            mb * fit.recompute * graph,
            format!("a recomputed graph per sample of a minibatch of {mb}"),
        )
    };
    let bytes = fit.base + weights + activations;
    let why = format!(
        "{batch} samples per iteration ({batch_words}), {mode}, model {}",
        sizes.join(", ")
    );
    Some(Estimate { bytes, why, at })
}

/// Trained transitions per sample: the sampler steps whose forwards the update trains on, and
/// so whose graphs `rollout_graph: keep` holds. An Euler (ODE) step — `flow_sde_step` with
/// `noise_level: 0`, or outside its SDE window — keeps none; a windowed repeat keeps at most
/// `window_size` of its stochastic steps (the most any window position covers).
fn transitions(p: &Pipeline) -> f64 {
    let mut plain = 0usize;
    let mut windowed = 0usize;
    let mut window = 0usize;
    for n in p.nodes.iter().filter(|n| TRANSITION_NODES.contains(&n.ty)) {
        if n.params.f64("noise_level").is_ok_and(|a| a <= 0.0) {
            continue; // every step of it is deterministic
        }
        match n.params.usize("window_size") {
            Ok(w) if w > 0 => {
                windowed += 1;
                window = window.max(w);
            }
            _ => plain += 1,
        }
    }
    (plain + windowed.min(window)).max(1) as f64
}

/// The samples per backward of the pipeline's update (`grpo_update` or `nft_update`
/// `minibatch`), `batch` when the update takes the whole batch at once (0 or ≥ batch).
fn update_minibatch(p: &Pipeline, batch: u64) -> u64 {
    p.nodes
        .iter()
        .filter(|n| UPDATE_NODES.contains(&n.ty))
        .filter_map(|n| n.params.i64("minibatch").ok())
        .map(|m| m as u64)
        .filter(|&m| m > 0 && m < batch)
        .max()
        .unwrap_or(batch)
}

/// The resource's `lora:` settings, when valid (invalid ones are reported by their own check).
fn lora_of(params: &runner::Params) -> Option<LoraConfig> {
    LoraConfig::from_json(&params.json("lora").ok()?)
        .ok()
        .flatten()
}

/// Parameters of the adapters `l` attaches to `model` (r × (d_in + d_out) per matching layer;
/// an adapter file's own ranks are not read: its `rank` is taken as given, 0 counts none).
fn adapter_params<M: Linears>(model: &mut M, l: &LoraConfig, defaults: &[&str]) -> usize {
    let targets = l.targets_or(defaults);
    let mut n = 0;
    model.each_linear("", &mut |path, lin| {
        if targets.iter().any(|t| lora::matches(path, t)) {
            let [i, o] = lin.dims();
            n += l.rank * (i + o);
        }
    });
    n
}

/// The estimate for an `arch: sd3` policy `r` (see the module docs).
fn estimate_sd3(p: &Pipeline, r: &runner::compile::ResourceInst) -> Option<Estimate> {
    let cfg: Sd3Config = match r.params.opt_str("diffusers").ok().flatten() {
        Some(dir) => read_config(Path::new(dir)).ok()?.1,
        None => header_json(Path::new(r.params.opt_str("checkpoint").ok().flatten()?))?,
    };
    cfg.validate().ok()?;
    let mut model: Sd3Transformer = cfg.init_zeros(&burn::tensor::Device::flex());
    // Trained parameters, and the one never trained (the sin-cos position grid), kept once.
    // (Shapes only: the lazy model is never allocated.)
    let (mut params, mut frozen) = (0.0, 0.0);
    for (path, _, shape) in crate::model::checkpoint::param_paths(&model) {
        let n = shape.iter().product::<usize>() as f64;
        if path == crate::model::sd3::POS_EMBED_KEY {
            frozen += n;
        } else {
            params += n;
        }
    }
    let lora = lora_of(&r.params);
    let ema = r.params.f64("ema_decay").ok()? > 0.0;
    let reference = r.params.bool("reference").ok()?;
    let keep = r.params.str("rollout_graph").ok() == Some("keep");
    // The frozen base's dtype (only with LoRA; an invalid setting is reported by its check).
    let base = match (&lora, r.params.str("base_dtype").ok().map(str::parse)) {
        (Some(_), Some(Ok(d))) => d,
        _ => BaseDtype::F32,
    };
    let size = base.size() as f64;
    let (weights, weights_words) = match &lora {
        Some(l) => {
            let a = adapter_params(&mut model, l, Sd3Transformer::LORA_TARGETS) as f64;
            let copies = 4.0 + ema as u8 as f64;
            (
                size * (params + frozen) + 4.0 * copies * a,
                format!(
                    "one frozen {} copy of {:.0}M parameters and LoRA adapters of {:.1}M",
                    base.name(),
                    params / 1e6,
                    a / 1e6
                ),
            )
        }
        None => {
            let copies = 4.0 + ema as u8 as f64 + reference as u8 as f64;
            (
                4.0 * (copies * params + frozen),
                format!(
                    "{copies} f32 copies of {:.0}M parameters (weights, gradient, AdamW m and v{}{})",
                    params / 1e6,
                    if ema { ", EMA" } else { "" },
                    if reference { ", KL reference" } else { "" }
                ),
            )
        }
    };
    // Tokens: the latents' patches and the embeddings' text.
    let noise = p.nodes.iter().find(|n| n.ty == "gaussian_noise")?;
    let (h, w) = (
        noise.params.i64("height").ok()? as usize,
        noise.params.i64("width").ok()? as usize,
    );
    let loader = p.nodes.iter().find(|n| n.ty == "prompt_loader")?;
    let emb = loader.params.opt_str("embeddings").ok().flatten()?;
    let text = PromptEmbeddings::open(emb).ok()?.seq_len();
    let pp = cfg.patch_size.max(1);
    let t = ((h / pp) * (w / pp) + text) as f64;
    let d = cfg.inner_dim() as f64;
    let heads = cfg.num_attention_heads as f64;
    let flex = !p.device.starts_with("libtorch");
    let (table, factor) = if flex {
        (SD3_BLOCK_BYTES_FLEX, SD3_UPDATE_FACTOR_FLEX)
    } else {
        (SD3_BLOCK_BYTES_LIBTORCH, SD3_UPDATE_FACTOR_LIBTORCH)
    };
    let mut per_row = 0.0;
    let mut block_max = 0.0f64;
    for i in 0..cfg.num_layers {
        let dual = cfg.is_dual_attention(i);
        let kind = if dual {
            2
        } else if cfg.qk_norm_kind() == crate::model::sd3::QkNorm::RmsNorm {
            1
        } else {
            0
        };
        let (alpha, beta) = table[kind];
        let block = alpha * t * d + beta * heads * t * t;
        per_row += block;
        block_max = block_max.max(block);
    }
    // The table is measured with an f32 base.
    if base.is_half() {
        per_row *= SD3_HALF_ACTIVATION_FACTOR;
        block_max *= SD3_HALF_ACTIVATION_FACTOR;
    }
    let cfg_scale = p
        .nodes
        .iter()
        .filter_map(|n| n.params.f64("cfg").ok())
        .fold(0.0f64, f64::max);
    let rows = if cfg_scale > 1.0 { 2.0 } else { 1.0 };
    let per_sample = rows * per_row;
    // Activation checkpointing: each block's inputs (image and text tokens, in the base's
    // dtype) kept, one block's graph alive at a time.
    let checkpointing = r.params.bool("activation_checkpointing").unwrap_or(false);
    let width = if base.is_half() { 2.0 } else { 4.0 };
    let per_sample_ckpt = rows * ((cfg.num_layers + 1) as f64 * width * t * d + block_max);
    let batch = {
        let ppi = loader.params.i64("prompts_per_iter").ok()? as u64;
        let g = loader.params.i64("group_size").ok()? as u64;
        ppi.saturating_mul(g)
    };
    let transitions = transitions(p);
    let update = p.nodes.iter().find(|n| UPDATE_NODES.contains(&n.ty));
    let minibatch = update_minibatch(p, batch);
    let (activations, mode) = if keep {
        (
            batch as f64 * transitions * per_sample,
            format!("{transitions} kept rollout graphs per sample (`rollout_graph: keep`)"),
        )
    } else if checkpointing {
        (
            minibatch as f64 * factor * per_sample_ckpt,
            format!(
                "each block's inputs and one block's graph per sample of a minibatch of {minibatch} (`activation_checkpointing`)"
            ),
        )
    } else {
        (
            minibatch as f64 * factor * per_sample,
            format!("one transition's graph per sample of a minibatch of {minibatch}"),
        )
    };
    let bytes = BASE_BYTES + weights + activations;
    // What would fit: the largest minibatch, with the weights as they are, with and without
    // activation checkpointing.
    let room = device_memory(&p.device).map(|(m, _)| m as f64 - BASE_BYTES - weights);
    let most = |per: f64| {
        room.map(|room| (room / (factor * per)).floor())
            .filter(|n| *n >= 1.0)
    };
    let (fits, fits_ckpt) = (
        most(if checkpointing {
            per_sample_ckpt
        } else {
            per_sample
        }),
        most(per_sample_ckpt),
    );
    let at = update.map_or("grpo_update", |u| u.id.as_str());
    let advice = match (fits, &lora) {
        (Some(n), _) if n < minibatch as f64 || keep => {
            let ckpt = match fits_ckpt {
                Some(c) if !checkpointing && c > n => format!(
                    ", or `activation_checkpointing: true` on `{}` and `minibatch: {}`",
                    r.name,
                    c.min(minibatch as f64)
                ),
                _ => String::new(),
            };
            format!(
                "; it would fit with `rollout_graph: recompute` and `minibatch: {n}` on `{at}`{ckpt}"
            )
        }
        (None, _) if !checkpointing && fits_ckpt.is_some() => format!(
            "; it would fit with `activation_checkpointing: true` on `{}` and `minibatch: {}` on `{at}`",
            r.name,
            fits_ckpt.unwrap_or(1.0).min(minibatch as f64)
        ),
        (None, None) => "; the weights alone leave no room for one sample: train LoRA adapters \
             (`lora: {rank: 32, alpha: 64}` on the model) instead of every weight"
            .to_string(),
        (None, Some(_)) if flex => "; one sample alone does not fit: on `device: libtorch` \
             (its attention keeps no score matrix) a sample's graph is about a third of flex's"
            .to_string(),
        (None, Some(_)) => "; one sample alone does not fit this machine".to_string(),
        _ => String::new(),
    };
    let why = format!(
        "{batch} samples per iteration, {mode}, ~{} per sample and transition on {} ({} tokens \
         × {} blocks of width {}, {} row(s) per sample), {weights_words}{advice}",
        human(per_sample),
        if flex { "flex" } else { "libtorch" },
        t,
        cfg.num_layers,
        cfg.inner_dim(),
        rows
    );
    Some(Estimate {
        bytes,
        why,
        at: update.map(|u| (u.clone(), "minibatch")),
    })
}

/// The model a `flow_model` resource will hold: the checkpoint's config (read from the
/// safetensors header only), or the fresh `size`.
fn model_config(params: &runner::Params) -> Option<FlowModelConfig> {
    match params.opt_str("checkpoint").ok().flatten() {
        Some(path) if !path.is_empty() => header_config(Path::new(path)),
        _ => Some(match params.str("size").ok()? {
            "tiny" => FlowModelConfig::tiny(world::vocab_size(), world::MAX_TOKENS),
            _ => FlowModelConfig::small(world::vocab_size(), world::MAX_TOKENS),
        }),
    }
}

/// The `flowrun.config` metadata of a safetensors file, reading its header alone (None when
/// it cannot: the run itself reports a bad checkpoint).
fn header_config(path: &Path) -> Option<FlowModelConfig> {
    header_json(path)
}

/// [`header_config`] of any architecture's config.
fn header_json<C: serde::de::DeserializeOwned>(path: &Path) -> Option<C> {
    let mut f = fs::File::open(path).ok()?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).ok()?;
    let n = u64::from_le_bytes(len);
    if n > 100 << 20 {
        return None;
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).ok()?;
    let json: serde_json::Value = serde_json::from_slice(&header).ok()?;
    let cfg = json["__metadata__"][CONFIG_KEY].as_str()?;
    serde_json::from_str(cfg).ok()
}

/// Parameters of the model `cfg` describes (counted on a zero-initialised flex copy).
fn param_count(cfg: &FlowModelConfig) -> usize {
    if cfg.validate().is_err() {
        return 0;
    }
    cfg.init_zeros(&burn::tensor::Device::flex()).num_params()
}

/// Bytes one sample's kept autodiff forward holds on the backend of `fit` (see the module doc).
pub fn graph_bytes(cfg: &FlowModelConfig, fit: &UnetFit) -> f64 {
    let n = cfg.channels.len();
    let side = |l: usize| (cfg.image_size >> l) as f64;
    let tokens = cfg.max_tokens as f64;
    let mut conv = 0.0;
    let mut attn = 0.0;
    for (l, &c) in cfg.channels.iter().enumerate() {
        let s2 = side(l) * side(l);
        conv += 2.0 * cfg.res_blocks as f64 * c as f64 * s2;
        let res = cfg.image_size >> l;
        if cfg.attn_resolutions.contains(&res) {
            let heads = (c / cfg.attn_head_dim.max(1)).max(1) as f64;
            let keys = if cfg.joint_attn_resolutions.contains(&res) {
                s2 + tokens
            } else {
                tokens
            };
            attn += 2.0 * heads * s2 * keys; // down and up path
        }
    }
    let c_mid = cfg.channels[n - 1] as f64;
    let s2 = side(n - 1) * side(n - 1);
    conv += cfg.mid_blocks.max(1) as f64 * c_mid * s2;
    let heads = (cfg.channels[n - 1] / cfg.attn_head_dim.max(1)).max(1) as f64;
    attn += heads * s2 * (s2 + tokens);
    fit.conv * conv + fit.attn * attn
}

/// This machine's memory: the smaller of the physical memory and the cgroup's limit.
/// The memory a run on `device` has, and what it is in words: on `libtorch-cuda:N` the GPU's
/// free memory (`cudaMemGetInfo`; `None` when it cannot be asked), else the host's
/// ([`machine_memory`]).
pub fn device_memory(device: &str) -> Option<(u64, String)> {
    match crate::device::parse_device(device) {
        Ok(crate::device::DeviceKind::LibTorchCuda(i)) => {
            crate::device::cuda_memory(i).map(|(free, total)| {
                (
                    free,
                    format!(
                        "GPU {i}'s free {} (of {})",
                        human(free as f64),
                        human(total as f64)
                    ),
                )
            })
        }
        _ => machine_memory().map(|m| (m, format!("this machine's {}", human(m as f64)))),
    }
}

pub fn machine_memory() -> Option<u64> {
    let total = fs::read_to_string("/proc/meminfo").ok().and_then(|t| {
        t.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kib| kib * 1024)
    })?;
    let cgroup = fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|t| t.trim().parse::<u64>().ok());
    Some(cgroup.map_or(total, |c| c.min(total)))
}

fn human(bytes: f64) -> String {
    if bytes >= 1024.0 * GIB {
        format!("{:.1} TiB", bytes / (1024.0 * GIB))
    } else if bytes >= GIB {
        format!("{:.1} GiB", bytes / GIB)
    } else {
        format!("{:.0} MiB", bytes / MIB)
    }
}
