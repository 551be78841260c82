//! Training helper: AdamW (burn-optim's `AdamW` update rule, driven per parameter with state
//! keyed by module path), global grad-norm clipping, linear LR warmup, CFG prompt dropout,
//! an EMA copy of the weights, and atomic save/resume of the whole training state.
//!
//! Optimizer state is keyed by parameter *path* (not burn's random `ParamId`), so a resumed
//! trainer matches its state to a freshly built model exactly.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use anyhow::{Context, bail};
use burn::config::Config;
use burn::module::{ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::{
    AdamW, AdamWConfig, AdamWState, AdaptiveMomentumState, GradientsParams, Optimizer,
};
use burn::tensor::{Device, Int, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::checkpoint::{
    ARCH_KEY, CONFIG_KEY, FORMAT_KEY, SafetensorsFile, config_from_file, load_params,
    no_unknown_tensors,
};
use super::lora::trainable_paths;
use super::weights::{Entry, Layout, StoreDtype, module_entries_where, save_atomic};
use super::{
    Conditioning, FlowModel, FlowModelConfig, VelocityModel, flow_matching_loss, model_device,
};

/// Value of the `flowrun.format` metadata key for trainer-state files.
pub const TRAINER_FORMAT: &str = "flowrun.trainer_state.v1";
const TRAINER_CONFIG_KEY: &str = "flowrun.trainer_config";
const STEP_KEY: &str = "flowrun.step";
const ADAM_TIME_KEY: &str = "flowrun.adam_time";
/// Set in states that hold only the trained parameters (a LoRA policy's adapters): the frozen
/// base is the policy's own weights, loaded once from its source, never copied into a state.
const FROZEN_KEY: &str = "flowrun.frozen_base";

/// Optimisation hyper-parameters.
#[derive(Config, Debug, PartialEq)]
pub struct TrainerConfig {
    /// Peak learning rate.
    #[config(default = 3e-4)]
    pub lr: f64,
    /// Linear warmup from 0 to `lr` over this many steps (0 = none).
    #[config(default = 0)]
    pub warmup_steps: u64,
    /// Decoupled (AdamW) weight decay.
    #[config(default = 0.0)]
    pub weight_decay: f32,
    #[config(default = 0.9)]
    pub beta1: f32,
    #[config(default = 0.999)]
    pub beta2: f32,
    #[config(default = 1e-8)]
    pub epsilon: f32,
    /// Global gradient L2-norm clipping threshold (<= 0 disables).
    #[config(default = 1.0)]
    pub grad_clip_norm: f32,
    /// EMA decay, the cap of its ramp ([`ema_decay_at`](Self::ema_decay_at)).
    #[config(default = 0.999)]
    pub ema_decay: f64,
    /// `Some(rate)`: the EMA's decay ramps linearly, `min(ema_decay, rate·(n − flat))` after n
    /// optimizer steps (DiffusionNFT's old-policy schedule); `None`: the warm-up
    /// `min(ema_decay, (1 + n)/(10 + n))`. Optional so that states written before it load.
    pub ema_ramp_rate: Option<f64>,
    /// With `ema_ramp_rate`: the first `flat` steps keep decay 0 (the EMA follows the weights).
    pub ema_ramp_flat: Option<u64>,
    /// Seed of the CFG-dropout stream (combined with the step index, so resume is exact).
    #[config(default = 0)]
    pub seed: u64,
}

impl TrainerConfig {
    /// The EMA decay applied by optimizer step `step` (0-based).
    ///
    /// Warm-up: `min(ema_decay, (1 + step)/(10 + step))`. Linear: with n = step + 1 the steps
    /// taken including this one, 0 while n < flat, then `min(ema_decay, rate·(n − flat))` (the
    /// public DiffusionNFT code's `return_decay`, whose step counter is incremented first).
    pub fn ema_decay_at(&self, step: u64) -> f64 {
        match self.ema_ramp_rate {
            None => {
                let n = step as f64;
                self.ema_decay.min((1.0 + n) / (10.0 + n))
            }
            Some(rate) => {
                let n = step + 1;
                let flat = self.ema_ramp_flat.unwrap_or(0);
                if n < flat {
                    0.0
                } else {
                    self.ema_decay.min(rate * (n - flat) as f64)
                }
            }
        }
    }
}

/// Per-parameter AdamW state, flattened.
#[derive(Clone)]
struct AdamSlot {
    time: usize,
    /// [numel]
    m: Tensor<1>,
    /// [numel]
    v: Tensor<1>,
}

/// Statistics of one optimisation step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    pub loss: f32,
    /// Global gradient L2 norm before clipping.
    pub grad_norm: f32,
    /// Learning rate used for this step.
    pub lr: f64,
}

/// Owns the trained model (on an autodiff device), its EMA copy (plain device), AdamW state.
/// Generic over the architecture ([`VelocityModel`]); ShapeWorld's UNet by default.
pub struct Trainer<M: VelocityModel = FlowModel> {
    pub config: TrainerConfig,
    model: M,
    /// `None` with `ema_decay: 0`: the EMA would be the weights themselves, so no copy is kept.
    ema: Option<M>,
    optim: AdamW,
    states: HashMap<String, AdamSlot>,
    step: u64,
    device: Device,
}

impl Trainer<FlowModel> {
    /// Fresh trainer with a freshly initialised model (deterministic from `model_config.seed`).
    /// `device` may be plain or autodiff; training always runs on `device.autodiff()`.
    pub fn new(model_config: &FlowModelConfig, config: TrainerConfig, device: &Device) -> Self {
        let ad = device.clone().autodiff();
        let model = model_config.init(&ad);
        Self::from_model(model, config)
    }

    /// One AdamW step on the flow-matching loss (with CFG dropout). Returns the loss.
    ///
    /// x0, noise: [B, 3, H, W], t: [B] in [0, 1], tokens: [B, L]
    pub fn step(
        &mut self,
        x0: Tensor<4>,
        noise: Tensor<4>,
        t: Tensor<1>,
        tokens: Tensor<2, Int>,
    ) -> f32 {
        self.step_with_stats(x0, noise, t, tokens).loss
    }

    /// Like [`step`](Self::step) but also returns the gradient norm and learning rate.
    pub fn step_with_stats(
        &mut self,
        x0: Tensor<4>,
        noise: Tensor<4>,
        t: Tensor<1>,
        tokens: Tensor<2, Int>,
    ) -> StepStats {
        self.flow_matching_step(x0, noise, t, Conditioning::Tokens(tokens))
            .expect("the UNet reads token ids")
    }
}

impl<M: VelocityModel> Trainer<M> {
    /// Trainer around an existing model (e.g. loaded with `load_safetensors`). The EMA starts
    /// as a copy of the model.
    pub fn from_model(model: M, config: TrainerConfig) -> Self {
        let device = model_device(&model).autodiff();
        let model = if model_device(&model).is_autodiff() {
            model
        } else {
            model.train()
        };
        let ema = (config.ema_decay > 0.0).then(|| model.valid());
        let optim = build_optim(&config);
        Self {
            config,
            model,
            ema,
            optim,
            states: HashMap::new(),
            step: 0,
            device,
        }
    }

    /// Data-parallel training: `grads` summed over the ranks of `c`, times `scale`, through
    /// one flat f32 buffer with the trainable parameters in the model's order (a parameter
    /// with no gradient on this rank, which had no sample in the minibatch, counts as zeros).
    /// `extra` travels at the end of the same buffer and comes back summed (the loss, say, so
    /// that every rank decides alike whether to apply the step).
    pub fn all_reduce_gradients(
        &self,
        grads: GradientsParams,
        c: &dyn runner::Collective,
        scale: f32,
        extra: &mut [f32],
    ) -> anyhow::Result<GradientsParams> {
        let mut buf = self
            .trainable_flat(Some(&grads))
            .context("reading the gradients back to the host")?;
        let n = buf.len();
        buf.extend_from_slice(extra);
        c.all_reduce_sum(&mut buf)?;
        extra.copy_from_slice(&buf[n..]);
        buf.truncate(n);
        if scale != 1.0 {
            for v in &mut buf {
                *v *= scale;
            }
        }
        let mut unflat = Unflatten {
            buf: &buf,
            at: 0,
            out: GradientsParams::new(),
        };
        self.model.visit(&mut unflat);
        Ok(unflat.out)
    }

    /// The trainable parameters' gradients in `grads` (zeros where a parameter has none), or
    /// with `None` their values, on the host, flattened in the model's order.
    fn trainable_flat(&self, grads: Option<&GradientsParams>) -> anyhow::Result<Vec<f32>> {
        let mut flat = Flatten {
            grads,
            parts: Vec::new(),
        };
        self.model.visit(&mut flat);
        if flat.parts.is_empty() {
            return Ok(Vec::new());
        }
        crate::types::to_vec(&Tensor::cat(flat.parts, 0))
    }

    /// A digest of the trainable weights and the step count (data-parallel replicas must
    /// agree on it): 64-bit FNV-1a over their bytes.
    pub fn digest(&self) -> anyhow::Result<Vec<u8>> {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let values = self
            .trainable_flat(None)
            .context("reading the weights back to the host")?;
        let bytes = values
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .chain(self.step.to_le_bytes());
        for b in bytes {
            h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
        Ok(h.to_le_bytes().to_vec())
    }

    /// Data-parallel runs: every rank takes `root`'s trainable weights (and its EMA restarts
    /// from them where the weights were not already equal).
    pub fn broadcast_from(
        &mut self,
        c: &dyn runner::Collective,
        root: usize,
    ) -> anyhow::Result<()> {
        let values = self
            .trainable_flat(None)
            .context("reading the weights back to the host")?;
        let mut bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        c.broadcast(&mut bytes, root)?;
        let theirs: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        if theirs == values {
            return Ok(());
        }
        let mut set = SetValues {
            buf: &theirs,
            at: 0,
        };
        self.model = self.model.clone().map(&mut set);
        if self.ema.is_some() {
            self.ema = Some(self.model.valid());
        }
        Ok(())
    }

    /// The model being trained (autodiff device). Use `.valid()` for inference.
    pub fn model(&self) -> &M {
        &self.model
    }

    /// EMA weights (plain device), ready for inference or `save_safetensors`: with
    /// `ema_decay: 0` the current weights (no copy of them is kept).
    pub fn ema(&self) -> M {
        match &self.ema {
            Some(ema) => ema.clone(),
            None => self.model.valid(),
        }
    }

    /// The AdamW moments (m, v, flattened) of every parameter that has taken a step, by path.
    pub fn moments(&self) -> impl Iterator<Item = (&str, &Tensor<1>, &Tensor<1>)> {
        self.states.iter().map(|(p, s)| (p.as_str(), &s.m, &s.v))
    }

    /// Number of optimisation steps taken.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// Learning rate the next step will use (warmup applied).
    pub fn current_lr(&self) -> f64 {
        let w = self.config.warmup_steps;
        if w == 0 {
            self.config.lr
        } else {
            self.config.lr * ((self.step + 1) as f64 / w as f64).min(1.0)
        }
    }

    /// Replaces the prompts of a seeded fraction `cfg_dropout` of rows by the null prompt.
    /// Deterministic in (`config.seed`, step index). `shard`: (rank, world) of a data-parallel
    /// run, whose `cond` holds this rank's rows of the global batch: the draws are the global
    /// batch's, so they do not depend on the split ((0, 1) in a single process).
    pub fn cfg_dropout(&self, cond: Conditioning, shard: (usize, usize)) -> Conditioning {
        let p = self.model.cfg_dropout();
        if p <= 0.0 {
            return cond;
        }
        let b = cond.batch();
        let mut rng = ChaCha8Rng::seed_from_u64(
            self.config.seed ^ (self.step.wrapping_add(1)).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        let (rank, world) = shard;
        let drop: Vec<bool> = (0..b * world)
            .map(|_| rng.random::<f64>() < p)
            .skip(rank * b)
            .take(b)
            .collect();
        cond.drop_rows(&drop)
    }

    /// One AdamW step on the flow-matching loss (with CFG dropout).
    ///
    /// x0, noise: [B, C, H, W], t: [B] in [0, 1], cond: batch B
    pub fn flow_matching_step(
        &mut self,
        x0: Tensor<4>,
        noise: Tensor<4>,
        t: Tensor<1>,
        cond: Conditioning,
    ) -> anyhow::Result<StepStats> {
        self.flow_matching_step_sharded(x0, noise, t, cond, None)
    }

    /// [`flow_matching_step`](Self::flow_matching_step) as one rank of a data-parallel run:
    /// the inputs are this rank's rows of the global batch (every rank holds as many), and the
    /// gradients and the loss are averaged over the ranks before the step.
    pub fn flow_matching_step_sharded(
        &mut self,
        x0: Tensor<4>,
        noise: Tensor<4>,
        t: Tensor<1>,
        cond: Conditioning,
        dist: Option<&dyn runner::Collective>,
    ) -> anyhow::Result<StepStats> {
        let shard = dist.map_or((0, 1), |c| (c.rank(), c.world()));
        let cond = self.cfg_dropout(cond, shard);
        let loss = flow_matching_loss(&self.model, x0, noise, t, &cond)?;
        let Some(c) = dist else {
            return Ok(self.apply_loss(loss));
        };
        let (grads, loss_value) = self.gradients(loss);
        let scale = 1.0 / c.world() as f32;
        let mut sum = [loss_value];
        let grads = self.all_reduce_gradients(grads, c, scale, &mut sum)?;
        Ok(self.apply_gradients(grads, sum[0] * scale))
    }

    /// One AdamW step on an arbitrary scalar `loss` computed from [`model`](Self::model) on
    /// the autodiff device (the flow-matching loss, or the GRPO surrogate): backward,
    /// global-norm clipping, AdamW, EMA update.
    pub fn apply_loss(&mut self, loss: Tensor<1>) -> StepStats {
        let (grads, loss_value) = self.gradients(loss);
        self.apply_gradients(grads, loss_value)
    }

    /// The gradients of `loss` w.r.t. the model's parameters, without reading anything back
    /// from the device.
    pub fn backward(&self, loss: Tensor<1>) -> GradientsParams {
        GradientsParams::from_grads(loss.backward(), &self.model)
    }

    /// Backward of a scalar `loss` computed from [`model`](Self::model): its gradients per
    /// parameter and its value. The graph is freed here, so several losses can be
    /// back-propagated one after another and their gradients summed with burn's
    /// `GradientsAccumulator` (peak memory of one graph).
    pub fn gradients(&self, loss: Tensor<1>) -> (GradientsParams, f32) {
        let grads = loss.backward();
        let loss_value = loss.into_scalar::<f32>();
        (GradientsParams::from_grads(grads, &self.model), loss_value)
    }

    /// One optimizer step with `grads` (of [`model`](Self::model)'s parameters): global-norm
    /// clipping, AdamW, EMA update. `loss_value` is only reported back.
    pub fn apply_gradients(&mut self, mut grads: GradientsParams, loss_value: f32) -> StepStats {
        // Global gradient norm (one host sync).
        let mut norm_visitor = GradNorm {
            grads: &grads,
            sum: None,
        };
        self.model.visit(&mut norm_visitor);
        let grad_norm = norm_visitor
            .sum
            .map(|s| s.into_scalar::<f32>().sqrt())
            .unwrap_or(0.0);
        let clip = self.config.grad_clip_norm;
        let scale = if clip > 0.0 && grad_norm.is_finite() && grad_norm > clip {
            clip / (grad_norm + 1e-6)
        } else {
            1.0
        };

        let lr = self.current_lr();
        let before =
            (self.ema.is_none() && self.config.ema_decay > 0.0).then(|| self.model.valid());
        let mut mapper = AdamMapper {
            optim: &self.optim,
            states: &mut self.states,
            grads: &mut grads,
            scale,
            lr,
            path: Vec::new(),
            updated: HashMap::new(),
        };
        self.model = self.model.clone().map(&mut mapper);
        let updated = mapper.updated;

        // EMA update, its decay ramped over the steps taken.
        let decay = self.config.ema_decay_at(self.step);
        self.ema = if self.config.ema_decay > 0.0 {
            // A resumed run may switch the EMA on: it starts from the weights before this step.
            let ema = self
                .ema
                .take()
                .unwrap_or_else(|| before.unwrap_or_else(|| self.model.valid()));
            Some(ema.map(&mut EmaMapper {
                updated: &updated,
                decay,
                path: Vec::new(),
            }))
        } else {
            None
        };

        self.step += 1;
        StepStats {
            loss: loss_value,
            grad_norm,
            lr,
        }
    }

    /// Saves model, EMA, AdamW moments, step counter and configs to one safetensors file,
    /// atomically (temp file + fsync + rename). Tensor names: `model.<path>`, `ema.<path>`,
    /// `adam.m.<path>`, `adam.v.<path>`. A model with frozen parameters (LoRA) saves only its
    /// trained ones: resume it with [`load_state_over`](Self::load_state_over) and its base.
    pub fn save_state(&self, path: &Path) -> anyhow::Result<()> {
        // With LoRA adapters only the trained parameters are saved (the base is the pipeline's
        // own); otherwise every parameter, frozen ones too (SD3's position grid).
        let partial = super::lora::is_adapted(&mut self.model.clone());
        let trained: HashSet<String> = if partial {
            trainable_paths(&self.model).into_iter().collect()
        } else {
            HashSet::new()
        };
        let keep = |p: &str| !partial || trained.contains(p);
        let mut entries = module_entries_where(&self.model, "model.", Layout::Burn, &keep);
        if let Some(ema) = &self.ema {
            entries.extend(module_entries_where(ema, "ema.", Layout::Burn, &keep));
        }
        let mut times = BTreeMap::new();
        let mut names: Vec<&String> = self.states.keys().collect();
        names.sort();
        for &name in &names {
            let slot = &self.states[name];
            let [numel] = slot.m.dims();
            times.insert(name.clone(), slot.time);
            entries.push(Entry::new(format!("adam.m.{name}"), vec![numel]));
            entries.push(Entry::new(format!("adam.v.{name}"), vec![numel]));
        }
        let mut metadata = HashMap::new();
        metadata.insert(
            CONFIG_KEY.to_string(),
            serde_json::to_string(VelocityModel::config(&self.model))?,
        );
        if M::ARCH != FlowModel::ARCH {
            metadata.insert(ARCH_KEY.to_string(), M::ARCH.to_string());
        }
        metadata.insert(
            TRAINER_CONFIG_KEY.to_string(),
            serde_json::to_string(&self.config)?,
        );
        metadata.insert(STEP_KEY.to_string(), self.step.to_string());
        metadata.insert(ADAM_TIME_KEY.to_string(), serde_json::to_string(&times)?);
        metadata.insert(FORMAT_KEY.to_string(), TRAINER_FORMAT.to_string());
        if partial {
            metadata.insert(FROZEN_KEY.to_string(), "1".to_string());
        }
        // Streamed a tensor at a time: the host never holds a copy of the whole state.
        save_atomic(path, entries, StoreDtype::F32, &metadata, |w| {
            w.write_module_where(&self.model, "model.", Layout::Burn, &keep)?;
            if let Some(ema) = &self.ema {
                w.write_module_where(ema, "ema.", Layout::Burn, &keep)?;
            }
            for name in names {
                let slot = &self.states[name];
                w.write(&format!("adam.m.{name}"), slot.m.clone(), Layout::Burn)?;
                w.write(&format!("adam.v.{name}"), slot.v.clone(), Layout::Burn)?;
            }
            Ok(())
        })
        .with_context(|| format!("saving trainer state {}", path.display()))
    }

    /// Restores a trainer written by [`save_state`](Self::save_state). Training continues
    /// bit-for-bit as if it had not been interrupted (same CFG-dropout stream, moments, EMA).
    pub fn load_state(path: &Path, device: &Device) -> anyhow::Result<Self> {
        Self::load_state_impl(path, device, None)
    }

    /// [`load_state`](Self::load_state) over `base`: the model with its frozen parameters (a
    /// LoRA policy's base, with adapters of the state's shapes), whose trained parameters, EMA
    /// and moments come from the state. The state must hold every trained parameter of `base`
    /// and nothing `base` lacks.
    pub fn load_state_over(path: &Path, base: M) -> anyhow::Result<Self> {
        let device = model_device(&base);
        Self::load_state_impl(path, &device, Some(base))
    }

    fn load_state_impl(path: &Path, device: &Device, base: Option<M>) -> anyhow::Result<Self> {
        let file = SafetensorsFile::read(path)?;
        let format = file.meta(FORMAT_KEY)?;
        if format != TRAINER_FORMAT {
            bail!(
                "{}: not a trainer state file (format {format:?}, expected {TRAINER_FORMAT:?})",
                path.display()
            );
        }
        let arch = file.meta(ARCH_KEY).unwrap_or(FlowModel::ARCH);
        if arch != M::ARCH {
            bail!(
                "{}: trainer state of a `{arch}` model, but this policy is `{}`",
                path.display(),
                M::ARCH
            );
        }
        let model_config = config_from_file::<M>(&file)?;
        let config: TrainerConfig = serde_json::from_str(file.meta(TRAINER_CONFIG_KEY)?)
            .with_context(|| format!("{}: invalid {TRAINER_CONFIG_KEY}", path.display()))?;
        let step: u64 = file
            .meta(STEP_KEY)?
            .parse()
            .with_context(|| format!("{}: invalid {STEP_KEY}", path.display()))?;
        let times: BTreeMap<String, usize> = serde_json::from_str(file.meta(ADAM_TIME_KEY)?)
            .with_context(|| format!("{}: invalid {ADAM_TIME_KEY}", path.display()))?;

        let plain = device.clone().without_autodiff();
        let ad = plain.clone().autodiff();
        let mut used = HashSet::new();
        let frozen_base = file.metadata.contains_key(FROZEN_KEY);
        let (model, ema_start, frozen) = match base {
            Some(base) => {
                let ours = serde_json::to_value(VelocityModel::config(&base))?;
                if serde_json::to_value(&model_config)? != ours {
                    bail!(
                        "{}: the state was trained on a `{}` model of another configuration \
                         than this policy's",
                        path.display(),
                        M::ARCH
                    );
                }
                let base = if model_device(&base).is_autodiff() {
                    base
                } else {
                    base.train()
                };
                let trained: HashSet<String> = trainable_paths(&base).into_iter().collect();
                let frozen: Vec<String> = super::checkpoint::param_paths(&base)
                    .into_iter()
                    .map(|(p, _, _)| p)
                    .filter(|p| !trained.contains(p))
                    .collect();
                let ema = base.valid();
                (base, ema, frozen)
            }
            None => {
                if frozen_base {
                    bail!(
                        "{}: this state holds only the trained parameters (LoRA adapters) of a frozen base: it resumes inside its pipeline, whose `flow_model` loads the base",
                        path.display()
                    );
                }
                (
                    M::init_zeros(&model_config, &ad),
                    M::init_zeros(&model_config, &plain),
                    Vec::new(),
                )
            }
        };
        let optional: Vec<&str> = frozen.iter().map(String::as_str).collect();
        let model = load_params(model, &file, "model.", &mut used, &optional)?;
        // A state saved with `ema_decay: 0` has no EMA (the weights are their own).
        let ema = if file.names().any(|n| n.starts_with("ema.")) {
            Some(load_params(ema_start, &file, "ema.", &mut used, &optional)?)
        } else {
            None
        };

        let mut states = HashMap::new();
        let shapes: HashMap<String, usize> = super::checkpoint::param_paths(&model)
            .into_iter()
            .map(|(p, _, s)| (p, s.iter().product()))
            .collect();
        for (name, time) in times {
            let Some(&numel) = shapes.get(&name) else {
                bail!(
                    "{}: optimizer state for unknown parameter {name:?}",
                    path.display()
                );
            };
            let mut load = |kind: &str| -> anyhow::Result<Tensor<1>> {
                let key = format!("adam.{kind}.{name}");
                let (shape, values) = file.get(&key)?;
                if shape != [numel] {
                    bail!(
                        "{}: tensor {key:?} has shape {shape:?}, expected [{numel}]",
                        path.display()
                    );
                }
                used.insert(key);
                Ok(super::tensor_from_vec(values, [numel], &plain))
            };
            let m = load("m")?;
            let v = load("v")?;
            states.insert(name, AdamSlot { time, m, v });
        }
        no_unknown_tensors(&file, &used)?;
        let optim = build_optim(&config);
        Ok(Self {
            config,
            model,
            ema,
            optim,
            states,
            step,
            device: ad,
        })
    }

    /// The autodiff device training runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }
}

fn build_optim(config: &TrainerConfig) -> AdamW {
    AdamWConfig::new()
        .with_beta_1(config.beta1)
        .with_beta_2(config.beta2)
        .with_epsilon(config.epsilon)
        .with_weight_decay(config.weight_decay)
        .build()
}

/// Every trainable parameter's gradient in `grads` (or zeros), or with `None` its value,
/// flattened, in the model's order. [numel]
struct Flatten<'a> {
    grads: Option<&'a GradientsParams>,
    parts: Vec<Tensor<1>>,
}

impl ModuleVisitor for Flatten<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let value = param.val();
        if !value.is_require_grad() {
            return;
        }
        let numel = value.shape().num_elements();
        self.parts.push(match self.grads {
            None => value.inner().reshape([numel]),
            Some(grads) => match grads.get::<D>(param.id) {
                Some(g) => g.reshape([numel]),
                None => Tensor::zeros([numel], &value.inner().device()),
            },
        });
    }
}

/// The inverse of [`Flatten`]: the flat buffer's slices registered as the gradients.
struct Unflatten<'a> {
    buf: &'a [f32],
    at: usize,
    out: GradientsParams,
}

impl ModuleVisitor for Unflatten<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let value = param.val();
        if !value.is_require_grad() {
            return;
        }
        let dims: [usize; D] = value.dims();
        let numel: usize = dims.iter().product();
        let slice = self.buf[self.at..self.at + numel].to_vec();
        self.at += numel;
        let device = value.inner().device();
        let g = Tensor::<1>::from_data(burn::tensor::TensorData::new(slice, [numel]), &device);
        self.out.register::<D>(param.id, g.reshape(dims));
    }
}

/// The inverse of [`Flatten`] over values: the trainable parameters take the buffer's values.
struct SetValues<'a> {
    buf: &'a [f32],
    at: usize,
}

impl ModuleMapper for SetValues<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let (id, tensor, mapper): (ParamId, Tensor<D>, _) = param.consume();
        if !tensor.is_require_grad() {
            return Param::from_mapped_value(id, tensor, mapper);
        }
        let dims: [usize; D] = tensor.dims();
        let numel: usize = dims.iter().product();
        let slice = self.buf[self.at..self.at + numel].to_vec();
        self.at += numel;
        let device = tensor.inner().device();
        let new = Tensor::<1>::from_data(burn::tensor::TensorData::new(slice, [numel]), &device)
            .reshape(dims)
            .autodiff()
            .require_grad();
        Param::from_mapped_value(id, new, mapper)
    }
}

struct GradNorm<'a> {
    grads: &'a GradientsParams,
    /// Running sum of squared gradient entries. [1]
    sum: Option<Tensor<1>>,
}

impl ModuleVisitor for GradNorm<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.grads.get::<D>(param.id) {
            let s = g.square().sum();
            self.sum = Some(match self.sum.take() {
                Some(acc) => acc + s,
                None => s,
            });
        }
    }
}

struct AdamMapper<'a> {
    optim: &'a AdamW,
    states: &'a mut HashMap<String, AdamSlot>,
    grads: &'a mut GradientsParams,
    scale: f32,
    lr: f64,
    path: Vec<String>,
    /// Updated parameter values (plain device, flattened) for the EMA.
    updated: HashMap<String, Tensor<1>>,
}

impl ModuleMapper for AdamMapper<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let (id, tensor, mapper): (ParamId, Tensor<D>, _) = param.consume();
        let Some(grad) = self.grads.remove::<D>(id) else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let path = self.path.join(".");
        let grad = if self.scale != 1.0 {
            grad.mul_scalar(self.scale)
        } else {
            grad
        };
        let shape: [usize; D] = tensor.dims();
        let numel: usize = shape.iter().product();
        let state = self.states.remove(&path).map(|s| AdamWState {
            momentum: AdaptiveMomentumState {
                time: s.time,
                moment_1: s.m.reshape(shape),
                moment_2: s.v.reshape(shape),
                max_moment_2: None,
            },
        });
        let require_grad = tensor.is_require_grad();
        let (new, state) = self.optim.step(self.lr, tensor.inner(), grad, state);
        if let Some(state) = state {
            let mom = state.momentum;
            self.states.insert(
                path.clone(),
                AdamSlot {
                    time: mom.time,
                    m: mom.moment_1.reshape([numel]),
                    v: mom.moment_2.reshape([numel]),
                },
            );
        }
        self.updated.insert(path, new.clone().reshape([numel]));
        let mut new = new.autodiff();
        if require_grad {
            new = new.require_grad();
        }
        Param::from_mapped_value(id, new, mapper)
    }
}

struct EmaMapper<'a> {
    updated: &'a HashMap<String, Tensor<1>>,
    decay: f64,
    path: Vec<String>,
}

impl ModuleMapper for EmaMapper<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let (id, ema, mapper) = param.consume();
        let path = self.path.join(".");
        let new = match self.updated.get(&path) {
            Some(p) => {
                let shape: [usize; D] = ema.dims();
                let p = p.clone().reshape(shape);
                ema.mul_scalar(self.decay) + p.mul_scalar(1.0 - self.decay)
            }
            None => ema,
        };
        Param::from_mapped_value(id, new, mapper)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn should_warm_up_the_ema_decay_by_default() {
        let c = TrainerConfig::new().with_ema_decay(0.5);
        let got: Vec<f64> = (0..4).map(|s| c.ema_decay_at(s)).collect();
        // (1 + n)/(10 + n): 0.1, 2/11, 0.25, then capped at 0.5 from n = 8 on.
        assert_eq!(got, vec![0.1, 2.0 / 11.0, 0.25, 4.0 / 13.0]);
        assert_eq!(c.ema_decay_at(8), 0.5);
    }

    #[test]
    fn should_ramp_the_ema_decay_linearly_as_diffusion_nft_does() {
        // DiffusionNFT's first setting: min(0.001·n, 0.5), n counting this step.
        let c = TrainerConfig::new()
            .with_ema_decay(0.5)
            .with_ema_ramp_rate(Some(0.001));
        assert_eq!(c.ema_decay_at(0), 0.001);
        assert_eq!(c.ema_decay_at(9), 0.01);
        assert_eq!(c.ema_decay_at(499), 0.5);
        assert_eq!(c.ema_decay_at(5000), 0.5);
        // Its second: 75 steps flat at 0, then 0.0075 per step up to 0.999.
        let c = TrainerConfig::new()
            .with_ema_decay(0.999)
            .with_ema_ramp_rate(Some(0.0075))
            .with_ema_ramp_flat(Some(75));
        assert_eq!(c.ema_decay_at(0), 0.0);
        assert_eq!(c.ema_decay_at(73), 0.0);
        assert_eq!(c.ema_decay_at(74), 0.0); // n = 75: (75 − 75)·rate
        assert!((c.ema_decay_at(75) - 0.0075).abs() < 1e-12);
        assert!((c.ema_decay_at(174) - 0.75).abs() < 1e-12);
        assert_eq!(c.ema_decay_at(1000), 0.999);
    }

    #[test]
    fn should_read_a_trainer_config_written_before_the_ramp_existed() {
        // The `flowrun.trainer_config` of a state saved before `ema_ramp_*` were added.
        let old = r#"{"lr":3e-5,"warmup_steps":0,"weight_decay":0.0,"beta1":0.9,"beta2":0.999,"epsilon":1e-8,"grad_clip_norm":1.0,"ema_decay":0.5,"seed":7}"#;
        let c: TrainerConfig = serde_json::from_str(old).unwrap();
        assert_eq!(c.ema_ramp_rate, None);
        assert_eq!(c.ema_decay_at(0), 0.1);
        let back: TrainerConfig =
            serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }
}
