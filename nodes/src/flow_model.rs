//! `flow_model` resource: the flow-matching model being trained, with its AdamW state, its EMA
//! copy and (optionally) a frozen reference copy for the KL penalty of GRPO.

use std::any::Any;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::tensor::{Device, Tensor};
use runner::{BuildCtx, ParamDef, ParamKind, ParamValue, Registry, Resource, ResourceType};

use crate::device::open;
use crate::model::lora::{self, BaseDtype, LoraConfig, file::LORA_WEIGHTS_NAME};
use crate::model::sd3::{ExportDtype, Sd3Transformer, load_diffusers, save_diffusers};
use crate::model::{
    Conditioning, FlowModel, FlowModelConfig, Trainer, TrainerConfig, VelocityModel, load_model,
    load_safetensors, model_device, save_safetensors,
};
use crate::types::RolloutGraph;
use crate::world;

pub const TYPE: &str = "flow_model";

/// The diffusers folder of an `arch: sd3` policy inside its checkpoint directory.
pub const EXPORT_DIR: &str = "transformer";
/// The folder of a LoRA policy's adapter (diffusers' file) inside its checkpoint directory.
pub const LORA_DIR: &str = "lora";

/// The error for `activation_checkpointing` on an architecture without transformer blocks.
pub const CHECKPOINTING_ARCH: &str = "`activation_checkpointing` recomputes the SD3 transformer's blocks: it needs `arch: sd3` (the ShapeWorld UNet is small enough to keep its activations)";

pub fn register(r: &mut Registry) {
    r.add_resource(ResourceType {
        name: TYPE,
        summary: "a flow-matching text-to-image model with its optimizer, EMA and reference copy",
        doc: "`arch: shapes_unet` (default): ShapeWorld's UNet, from `checkpoint` (safetensors\n\
              written by flowrun) or fresh of `size`. `arch: sd3`: diffusers' SD3Transformer2DModel\n\
              (SD3, SD3.5) from a diffusers folder (`diffusers`: model_index.json + transformer/, or\n\
              the transformer folder; f32/f16/bf16, sharded or not) or from a flowrun checkpoint of\n\
              one; it reads latents and text embeddings (prompt_loader's `embeddings`). Trained in place by `flow_matching_train` or `grpo_update` (its one writer);\n\
              samplers read it. Every run checkpoint stores trainer.safetensors (weights, EMA,\n\
              AdamW moments, step), model.safetensors (the weights used for sampling: loadable by\n\
              `flowrun sample` and from Python) and reference.safetensors (the KL reference);\n\
              with `arch: sd3` also transformer/, the same weights as a diffusers folder (`export`).\n\
              With `rollout_graph: keep` (needs `sample_with: current`) samplers run the\n\
              trainer's autodiff model and keep each velocity's graph with its transition;\n\
              grpo_update's first, exactly on-policy step back-propagates through those graphs\n\
              instead of running the model again. Every transition's graph then lives until the\n\
              update (about 3x the memory of `recompute`).",
        params: vec![
            ParamDef::choice(
                "arch",
                "shapes_unet",
                &["shapes_unet", "sd3"],
                "architecture: ShapeWorld's UNet, or diffusers' SD3 / SD3.5 transformer (latents, text embeddings)",
            ),
            ParamDef::new("checkpoint", ParamKind::Path, "model weights to start from (a flowrun model.safetensors); empty = fresh init or `diffusers`")
                .default(ParamValue::Str(String::new())),
            ParamDef::new("diffusers", ParamKind::Path, "arch sd3: a diffusers folder (the pipeline's, or its transformer/) to start from")
                .default(ParamValue::Str(String::new())),
            ParamDef::choice("size", "small", &["tiny", "small"], "shapes_unet architecture when starting fresh"),
            ParamDef::float("lr", 1e-5, 0.0, 1.0, "AdamW learning rate"),
            ParamDef::int("warmup_steps", 0, 0, i64::MAX, "linear learning-rate warmup (optimizer steps)"),
            ParamDef::float("weight_decay", 0.0, 0.0, 1.0, "decoupled weight decay"),
            ParamDef::float("beta1", 0.9, 0.0, 1.0, "AdamW β1"),
            ParamDef::float("beta2", 0.999, 0.0, 1.0, "AdamW β2"),
            ParamDef::float("grad_clip_norm", 1.0, 0.0, 1e9, "global gradient-norm clip (0 = off)"),
            ParamDef::float("ema_decay", 0.999, 0.0, 1.0, "EMA decay of the weights; 0 = no EMA (no copy of the weights is kept: one model less in memory)"),
            ParamDef::choice(
                "ema_ramp",
                "warmup",
                &["warmup", "linear"],
                "how the EMA's decay grows to `ema_decay` over optimizer steps n: warmup (1 + n)/(10 + n), or linear rate·(n − flat) (DiffusionNFT's old policy)",
            ),
            ParamDef::float("ema_ramp_rate", 0.001, 0.0, 1.0, "ema_ramp linear: decay added per optimizer step"),
            ParamDef::int("ema_ramp_flat", 0, 0, i64::MAX, "ema_ramp linear: optimizer steps at decay 0 before the ramp starts"),
            ParamDef::choice(
                "sample_with",
                "current",
                &["current", "ema"],
                "weights samplers use: the current ones (on-policy RL) or the EMA (pretraining eval)",
            ),
            ParamDef::boolean("reference", false, "keep a frozen copy of the starting weights (needed for a KL penalty)"),
            ParamDef::choice(
                "rollout_graph",
                "recompute",
                &["recompute", "keep"],
                "keep: grpo_update back-propagates through the samplers' forward instead of recomputing it (faster, more memory)",
            ),
            ParamDef::boolean(
                "activation_checkpointing",
                false,
                "arch sd3: updates keep only each transformer block's inputs and recompute its activations in the backward, one block at a time (far less memory, about one more forward per backward; the same gradients); graphs kept by `rollout_graph: keep` are used whole",
            ),
            ParamDef::new(
                "lora",
                ParamKind::Any,
                "LoRA adapters, the base frozen: {rank: 32, alpha: 64, targets: [attn.to_q, …] (peft target_modules patterns; default: the architecture's attention projections), init: gaussian|kaiming, rslora: false}, or {weights: FILE} to start from a diffusers/peft adapter; only the adapters are trained and carry AdamW state, `reference: true` is the base with the adapters off (no copy), checkpoints hold the adapters as lora/pytorch_lora_weights.safetensors",
            )
            .default(ParamValue::Json(serde_json::Value::Null)),
            ParamDef::choice(
                "base_dtype",
                "f32",
                &BaseDtype::NAMES,
                "with `lora:` on `arch: sd3` and a libtorch device: the frozen base weights (and the transformer's activations) in bf16 or f16, about half the weights' and activations' memory; adapters, AdamW state, the loss, log-probs and ratios stay f32",
            ),
            ParamDef::choice(
                "export",
                "auto",
                &["auto", "off", "f32", "bf16", "f16"],
                "arch sd3: every run checkpoint also holds the sampling weights as a diffusers folder, resources/<name>/transformer/ (SD3Transformer2DModel.from_pretrained loads it), in this dtype; auto = f32 for sd3, off for shapes_unet",
            ),
        ],
        factory: build,
    });
}

/// The policy's weights: the trainer (model, EMA, AdamW state) and the frozen KL reference,
/// of one architecture.
pub struct PolicyModel<M: VelocityModel> {
    pub trainer: Trainer<M>,
    /// A frozen copy of the starting weights (without LoRA).
    pub reference: Option<M>,
    /// With LoRA: the adapters' settings, and whether the KL reference is the base (the
    /// trainer's model with its adapters off: the same tensors, no copy).
    pub lora: Option<LoraConfig>,
    pub reference_is_base: bool,
}

/// The architectures a `flow_model` can hold. Code that works for any of them is written once,
/// generic over [`VelocityModel`], and dispatched with [`with_policy!`](crate::with_policy).
// One per resource, never moved in bulk: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
pub enum Policy {
    /// ShapeWorld's UNet (`arch: shapes_unet`, the default).
    ShapesUnet(PolicyModel<FlowModel>),
    /// diffusers' SD3 / SD3.5 transformer (`arch: sd3`).
    Sd3(PolicyModel<Sd3Transformer>),
}

/// Run `$body` with `$p` bound to the [`PolicyModel`] inside a [`Policy`], whatever its
/// architecture: `with_policy!(&mut res.policy, p => p.trainer.step_count())`.
#[macro_export]
macro_rules! with_policy {
    ($policy:expr, $p:ident => $body:expr) => {
        match $policy {
            $crate::flow_model::Policy::ShapesUnet($p) => $body,
            $crate::flow_model::Policy::Sd3($p) => $body,
        }
    };
}

impl Policy {
    /// The architecture's name (`shapes_unet`, …).
    pub fn arch(&self) -> &'static str {
        fn arch_of<M: VelocityModel>(_: &PolicyModel<M>) -> &'static str {
            M::ARCH
        }
        with_policy!(self, p => arch_of(p))
    }
}

impl<M: VelocityModel> PolicyModel<M> {
    /// A policy around `model` (on a plain device), with a frozen copy as the KL reference if
    /// `reference`.
    pub fn new(model: M, config: &TrainerConfig, reference: bool) -> Self {
        let reference = reference.then(|| model.clone());
        PolicyModel {
            trainer: Trainer::from_model(model, config.clone()),
            reference,
            lora: None,
            reference_is_base: false,
        }
    }

    /// A LoRA policy: `model` holds its adapters (its base frozen); with `reference` the KL
    /// reference is the base itself.
    pub fn with_lora(model: M, config: &TrainerConfig, reference: bool, lora: LoraConfig) -> Self {
        PolicyModel {
            trainer: Trainer::from_model(model, config.clone()),
            reference: None,
            lora: Some(lora),
            reference_is_base: reference,
        }
    }

    /// A LoRA policy's frozen base (the trainer's model and its EMA copy: every parameter
    /// that is not trained) cast to `dtype`; the adapters and their moments stay f32. Call it
    /// before any step (the KL reference of a LoRA policy is that same base).
    pub fn cast_base(&mut self, dtype: BaseDtype) {
        if dtype.is_half() {
            let config = self.trainer.config.clone();
            let model = lora::cast_base(self.trainer.model().valid(), dtype);
            self.trainer = Trainer::from_model(model, config);
        }
    }

    /// The KL reference on the plain device, if the policy has one: the frozen copy, or a LoRA
    /// policy's base (its adapters off; the tensors are the trainer's own, not copied).
    pub fn reference_model(&self) -> Option<M> {
        if self.reference_is_base {
            return Some(lora::detach(self.trainer.model().valid()));
        }
        self.reference.clone()
    }

    /// The reference a penalty of weight `weight` (parameter `param`) needs: `None` at weight 0,
    /// an error when the policy keeps none.
    pub fn kl_reference(&self, param: &str, weight: f32) -> Result<Option<M>> {
        if weight <= 0.0 {
            return Ok(None);
        }
        if !self.has_reference() {
            bail!(
                "`{param}` > 0 needs a reference model: set `reference: true` on the flow_model resource"
            );
        }
        Ok(self.reference_model())
    }

    /// Whether the policy has a KL reference.
    pub fn has_reference(&self) -> bool {
        self.reference_is_base || self.reference.is_some()
    }

    /// The weights samplers use, on the plain device: the EMA or the current weights.
    pub fn sampling_model(&self, ema: bool) -> M {
        if ema {
            self.trainer.ema()
        } else {
            self.trainer.model().valid()
        }
    }

    fn sampler(&self, res: &FlowModelRes) -> PolicySampler {
        let keep = (res.keep_rollout_graph && !res.sample_with_ema)
            .then(|| (self.trainer.device().clone(), self.trainer.step_count()));
        PolicySampler {
            model: Box::new(self.sampling_model(res.sample_with_ema)),
            tracked: keep
                .is_some()
                .then(|| Box::new(self.trainer.model().clone()) as Box<dyn SamplerModel>),
            device: res.device.clone(),
            keep,
        }
    }

    /// Writes the policy's files into `dir`; returns the weights of `model.safetensors` (merged
    /// with any adapter) for the caller's other exports.
    fn save(&self, dir: &Path, ema: bool) -> Result<M> {
        self.trainer.save_state(&dir.join("trainer.safetensors"))?;
        let sampling = self.sampling_model(ema);
        let exported = if self.lora.is_some() {
            lora::merge(sampling.clone())
        } else {
            sampling.clone()
        };
        save_safetensors(&exported, &dir.join("model.safetensors"))?;
        if let Some(r) = &self.reference {
            save_safetensors(r, &dir.join("reference.safetensors"))?;
        }
        if let Some(cfg) = &self.lora {
            // diffusers' pipelines name the transformer's keys `transformer.…`.
            let prefix = if M::ARCH == "sd3" { "transformer." } else { "" };
            let d = dir.join(LORA_DIR);
            std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
            lora::file::save_adapters(&sampling, &d.join(LORA_WEIGHTS_NAME), prefix, cfg.init)?;
        }
        Ok(exported)
    }

    fn load(&mut self, dir: &Path, device: &Device, config: &TrainerConfig) -> Result<()> {
        let p = dir.join("trainer.safetensors");
        let mut t = if self.lora.is_some() {
            // The base is this policy's own (loaded once from its source); the adapters, their
            // EMA and moments come from the state.
            Trainer::<M>::load_state_over(&p, self.trainer.model().clone())
        } else {
            Trainer::<M>::load_state(&p, device)
        }
        .with_context(|| format!("loading {}", p.display()))?;
        // Hyper-parameters come from the (possibly overridden) pipeline, the state from disk.
        t.config = config.clone();
        self.trainer = t;
        let r = dir.join("reference.safetensors");
        if self.reference.is_some() {
            if !r.exists() {
                bail!(
                    "{} is missing (the pipeline asks for a reference model)",
                    r.display()
                );
            }
            self.reference = Some(load_model::<M>(&r, device)?.1);
        }
        Ok(())
    }
}

/// The `flow_model` resource.
pub struct FlowModelRes {
    pub policy: Policy,
    pub sample_with_ema: bool,
    /// `rollout_graph: keep`: samplers keep their forward's autodiff graph for the update.
    pub keep_rollout_graph: bool,
    /// `activation_checkpointing: true`: updates recompute each transformer block in the
    /// backward instead of keeping its activations.
    pub activation_checkpointing: bool,
    /// Plain (non-autodiff) device for inference.
    pub device: Device,
    pub source: Option<PathBuf>,
    /// `arch: sd3`: the dtype of the diffusers folder each checkpoint holds (`None`: none).
    pub export: Option<ExportDtype>,
    config: TrainerConfig,
}

fn trainer_config(ctx: &BuildCtx) -> Result<TrainerConfig> {
    let p = ctx.params;
    let linear = p.str("ema_ramp")? == "linear";
    Ok(TrainerConfig::new()
        .with_lr(p.f64("lr")?)
        .with_warmup_steps(p.i64("warmup_steps")? as u64)
        .with_weight_decay(p.f32("weight_decay")?)
        .with_beta1(p.f32("beta1")?)
        .with_beta2(p.f32("beta2")?)
        .with_grad_clip_norm(p.f32("grad_clip_norm")?)
        .with_ema_decay(p.f64("ema_decay")?)
        .with_ema_ramp_rate(linear.then_some(p.f64("ema_ramp_rate")?))
        .with_ema_ramp_flat(linear.then_some(p.i64("ema_ramp_flat")? as u64))
        .with_seed(ctx.seed))
}

fn build(ctx: &BuildCtx) -> Result<Box<dyn Resource>> {
    let p = ctx.params;
    let dev = open(ctx.device).map_err(anyhow::Error::msg)?;
    let config = trainer_config(ctx)?;
    let lora = LoraConfig::from_json(&p.json("lora")?).context("`lora`")?;
    let base_dtype: BaseDtype = p.str("base_dtype")?.parse()?;
    if let Some(why) = base_dtype_problem(base_dtype, p.str("arch")?, lora.is_some(), ctx.device) {
        bail!("`base_dtype`: {why}");
    }
    let checkpoint = match p.opt_str("checkpoint")? {
        Some(path) => {
            let path = PathBuf::from(path);
            if !path.exists() {
                bail!(
                    "checkpoint {} does not exist (set `checkpoint` to a .safetensors file written by flowrun, or leave it empty for a fresh model)",
                    path.display()
                );
            }
            // Weights taken from a run's checkpoint only if that checkpoint verifies.
            runner::rundir::verify_enclosing_checkpoint(&path)
                .with_context(|| format!("checkpoint {} is not usable", path.display()))?;
            Some(path)
        }
        None => None,
    };
    let diffusers = p.opt_str("diffusers")?.map(PathBuf::from);
    let sample_with_ema = p.str("sample_with")? == "ema";
    let keep_rollout_graph = p.str("rollout_graph")? == "keep";
    if keep_rollout_graph && sample_with_ema {
        bail!(
            "`rollout_graph: keep` needs `sample_with: current`: a graph of the EMA weights is not the update's forward"
        );
    }
    let reference = p.bool("reference")?;
    let activation_checkpointing = p.bool("activation_checkpointing")?;
    if activation_checkpointing && p.str("arch")? != "sd3" {
        bail!("{CHECKPOINTING_ARCH}");
    }
    let export = match (p.str("export")?, p.str("arch")?) {
        ("off", _) | ("auto", "shapes_unet") => None,
        ("auto", _) => Some(ExportDtype::F32),
        (dtype, "sd3") => Some(dtype.parse()?),
        (_, arch) => bail!(
            "`export` writes a diffusers SD3 transformer folder: it needs `arch: sd3` (the `{arch}` model has no diffusers counterpart; leave `export` unset)"
        ),
    };
    let (policy, source) = match p.str("arch")? {
        "sd3" => {
            let (model, source) = match (&checkpoint, &diffusers) {
                (Some(_), Some(_)) => bail!(
                    "set one of `checkpoint` (a flowrun checkpoint) and `diffusers` (a diffusers folder), not both"
                ),
                (Some(c), None) => (load_model::<Sd3Transformer>(c, &dev)?.1, c.clone()),
                (None, Some(d)) => (load_diffusers(d, &dev)?.1, d.clone()),
                (None, None) => bail!(
                    "`arch: sd3` needs weights: set `diffusers` to a diffusers folder (e.g. SD3.5-Medium's) or `checkpoint` to a flowrun checkpoint of an SD3 model"
                ),
            };
            let mut policy = make_policy(model, &config, reference, lora.as_ref(), ctx.seed)?;
            policy.cast_base(base_dtype);
            (Policy::Sd3(policy), Some(source))
        }
        _ => {
            if diffusers.is_some() {
                bail!(
                    "`diffusers` is a diffusers folder for `arch: sd3`; the ShapeWorld UNet loads `checkpoint`"
                );
            }
            let (model, source) = match &checkpoint {
                Some(path) => (load_safetensors(path, &dev)?.1, Some(path.clone())),
                None => {
                    let cfg = match p.str("size")? {
                        "tiny" => FlowModelConfig::tiny(world::vocab_size(), world::MAX_TOKENS),
                        _ => FlowModelConfig::small(world::vocab_size(), world::MAX_TOKENS),
                    }
                    .with_seed(ctx.seed);
                    (cfg.init(&dev), None)
                }
            };
            if model.config().vocab_size != world::vocab_size()
                || model.config().max_tokens != world::MAX_TOKENS
            {
                bail!(
                    "model vocabulary ({} tokens, max {}) does not match ShapeWorld's ({}, max {})",
                    model.config().vocab_size,
                    model.config().max_tokens,
                    world::vocab_size(),
                    world::MAX_TOKENS
                );
            }
            (
                Policy::ShapesUnet(make_policy(
                    model,
                    &config,
                    reference,
                    lora.as_ref(),
                    ctx.seed,
                )?),
                source,
            )
        }
    };
    Ok(Box::new(FlowModelRes {
        policy,
        sample_with_ema,
        keep_rollout_graph,
        activation_checkpointing,
        device: dev,
        source,
        export,
        config,
    }))
}

/// Why `base_dtype` cannot be `dtype` for a `flow_model` of `arch` (with or without `lora:`)
/// on the pipeline's `device`; `None` when it can. Validation and the resource's build share it.
pub fn base_dtype_problem(
    dtype: BaseDtype,
    arch: &str,
    lora: bool,
    device: &str,
) -> Option<String> {
    let name = dtype.name();
    if !dtype.is_half() {
        return None;
    }
    if !lora {
        return Some(format!(
            "`{name}` needs `lora:`: only frozen base weights are kept in half precision (a model \
             whose every weight is trained keeps them in f32 for AdamW); add `lora: {{rank: 32, \
             alpha: 64}}` or leave `base_dtype` at f32"
        ));
    }
    if arch != "sd3" {
        return Some(format!(
            "`{name}` applies to `arch: sd3` (the SD3 transformer); the `{arch}` model runs in \
             f32: leave `base_dtype` at f32"
        ));
    }
    if !device.starts_with("libtorch") {
        return Some(format!(
            "`{name}` needs `device: libtorch` or `libtorch-cuda:N`, whose kernels compute \
             half-precision norms, GELU and attention with f32 accumulation; on `{device}` \
             leave `base_dtype` at f32"
        ));
    }
    None
}

/// The policy around `model` (plain device): with `lora`, its adapters attached (fresh, seeded
/// by `seed`, or from the adapter file of `lora.weights`) and its base frozen.
pub fn make_policy<M: VelocityModel>(
    model: M,
    config: &TrainerConfig,
    reference: bool,
    lora: Option<&LoraConfig>,
    seed: u64,
) -> Result<PolicyModel<M>> {
    let Some(cfg) = lora else {
        return Ok(PolicyModel::new(model, config, reference));
    };
    let (model, cfg) = match &cfg.weights {
        Some(w) => {
            let (m, info) = lora::file::load_adapters(model, w)?;
            let mut c = info.config;
            c.weights = Some(w.clone());
            (m, c)
        }
        None => (
            lora::attach(model, cfg, M::LORA_TARGETS, seed)
                .context("`lora`")?
                .0,
            cfg.clone(),
        ),
    };
    Ok(PolicyModel::with_lora(model, config, reference, cfg))
}

impl FlowModelRes {
    /// A resource around the ShapeWorld UNet `model` (on a plain device), e.g. for tests and
    /// tools.
    pub fn new(
        model: FlowModel,
        config: TrainerConfig,
        reference: bool,
        sample_with_ema: bool,
    ) -> Self {
        let device = model_device(&model);
        FlowModelRes {
            policy: Policy::ShapesUnet(PolicyModel::new(model, &config, reference)),
            sample_with_ema,
            keep_rollout_graph: false,
            activation_checkpointing: false,
            device,
            source: None,
            export: None,
            config,
        }
    }

    /// A resource around an SD3 / SD3.5 transformer `model` (on a plain device) sampling with
    /// its current weights, as `arch: sd3` with `sample_with: current` builds it (e.g. for
    /// `flowrun bench --sd3`).
    pub fn sd3(
        model: Sd3Transformer,
        config: TrainerConfig,
        reference: bool,
        keep_rollout_graph: bool,
        lora: Option<&LoraConfig>,
        base_dtype: BaseDtype,
    ) -> Result<Self> {
        let device = model_device(&model);
        let mut policy = make_policy(model, &config, reference, lora, 0)?;
        policy.cast_base(base_dtype);
        Ok(FlowModelRes {
            policy: Policy::Sd3(policy),
            sample_with_ema: false,
            keep_rollout_graph,
            activation_checkpointing: false,
            device,
            source: None,
            export: None,
            config,
        })
    }

    /// The ShapeWorld UNet policy, or an error naming what `what` needs and what this holds.
    pub fn unet(&self, what: &str) -> Result<&PolicyModel<FlowModel>> {
        match &self.policy {
            Policy::ShapesUnet(p) => Ok(p),
            other => bail!(
                "{what} needs the ShapeWorld model (`arch: shapes_unet`), not `{}`",
                other.arch()
            ),
        }
    }

    /// Mutable [`unet`](Self::unet).
    pub fn unet_mut(&mut self, what: &str) -> Result<&mut PolicyModel<FlowModel>> {
        match &mut self.policy {
            Policy::ShapesUnet(p) => Ok(p),
            other => bail!(
                "{what} needs the ShapeWorld model (`arch: shapes_unet`), not `{}`",
                other.arch()
            ),
        }
    }

    /// The UNet weights samplers use (EMA or current), on the plain device.
    pub fn sampling_model(&self) -> Result<FlowModel> {
        Ok(self.unet("sampling")?.sampling_model(self.sample_with_ema))
    }

    /// The model a sampler node runs (see [`PolicySampler::velocity`]).
    pub fn sampler(&self) -> PolicySampler {
        with_policy!(&self.policy, p => p.sampler(self))
    }
}

/// A velocity model of any architecture, for samplers.
trait SamplerModel: Send {
    fn velocity_cfg(
        &self,
        x: Tensor<4>,
        t: Tensor<1>,
        cond: &Conditioning,
        cfg: f32,
    ) -> Result<Tensor<4>>;
    fn check_state(&self, shape: [usize; 3]) -> Result<()>;
}

impl<M: VelocityModel> SamplerModel for M {
    fn velocity_cfg(
        &self,
        x: Tensor<4>,
        t: Tensor<1>,
        cond: &Conditioning,
        cfg: f32,
    ) -> Result<Tensor<4>> {
        VelocityModel::velocity_cfg(self, x, t, cond, cfg)
    }
    fn check_state(&self, shape: [usize; 3]) -> Result<()> {
        VelocityModel::check_state(self, shape)
    }
}

/// What a sampler node needs from the policy: the model to run and where (see
/// [`FlowModelRes::sampler`]).
pub struct PolicySampler {
    /// The sampling weights on the plain device (no autodiff).
    model: Box<dyn SamplerModel>,
    /// With `rollout_graph: keep`: the trainer's own autodiff model (the same weights).
    tracked: Option<Box<dyn SamplerModel>>,
    /// Plain device: where the node's outputs live.
    pub device: Device,
    /// With `rollout_graph: keep`: the trainer's autodiff device and step count.
    keep: Option<(Device, u64)>,
}

impl PolicySampler {
    /// Whether the model takes states of `shape` [C, H, W] (they arrived on input `port`).
    pub fn check_state(&self, port: &str, shape: [usize; 3]) -> Result<()> {
        self.model.check_state(shape).map_err(|e| {
            anyhow::anyhow!(
                "input `{port}` holds states of shape {shape:?} per sample, but {e} (check \
                 `gaussian_noise`'s channels/height/width)"
            )
        })
    }

    /// v_θ(x, t, c) with classifier-free guidance `cfg`, on the plain device, and, with
    /// `rollout_graph: keep` and `train` (the update trains on this step), the forward's
    /// autodiff graph for the update. A step the update skips (an ODE step) runs without
    /// autodiff: a graph built and dropped would stay in memory until the next backward.
    /// x: [B, C, H, W] on the plain device; cond: batch B.
    pub fn velocity(
        &self,
        x: &Tensor<4>,
        t: f32,
        cond: &Conditioning,
        cfg: f32,
        train: bool,
    ) -> Result<(Tensor<4>, Option<RolloutGraph>)> {
        let b = x.dims()[0];
        match (&self.keep, &self.tracked) {
            (Some((ad, step)), Some(tracked)) if train => {
                // The state is data, not a function of the weights: the graph starts at x.
                let tt = Tensor::<1>::full([b], t, ad);
                let v = tracked.velocity_cfg(
                    x.clone().to_device(ad),
                    tt,
                    &cond.clone().to_device(ad),
                    cfg,
                )?;
                let plain = v.clone().detach().to_device(&self.device);
                Ok((plain, Some(RolloutGraph::new(v, *step))))
            }
            _ => {
                let tt = Tensor::<1>::full([b], t, &self.device);
                Ok((self.model.velocity_cfg(x.clone(), tt, cond, cfg)?, None))
            }
        }
    }
}

impl Resource for FlowModelRes {
    fn save(&self, dir: &Path) -> Result<()> {
        let ema = self.sample_with_ema;
        match &self.policy {
            Policy::ShapesUnet(p) => {
                p.save(dir, ema)?;
            }
            Policy::Sd3(p) => {
                let exported = p.save(dir, ema)?;
                if let Some(dtype) = self.export {
                    // The weights of model.safetensors (adapters merged), as diffusers reads
                    // them (streamed: no host copy).
                    save_diffusers(&exported, &dir.join(EXPORT_DIR), dtype)?;
                }
            }
        }
        Ok(())
    }
    fn load(&mut self, dir: &Path) -> Result<()> {
        let (device, config) = (self.device.clone(), self.config.clone());
        with_policy!(&mut self.policy, p => p.load(dir, &device, &config))
    }
    fn broadcast(&mut self, c: &dyn runner::Collective) -> Result<()> {
        with_policy!(&mut self.policy, p => p.trainer.broadcast_from(c, 0))
    }
    fn digest(&self) -> Result<Option<Vec<u8>>> {
        with_policy!(&self.policy, p => p.trainer.digest().map(Some))
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}
