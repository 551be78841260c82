//! `nodes::model` — the velocity models flowrun trains, behind one small interface.
//!
//! * Convention (rectified flow, as diffusers' SD3 has it): `x_t = (1 − t)·x0 + t·ε`,
//!   `t ∈ [0, 1]`, `t = 1` is pure noise; a model predicts the velocity `v ≈ ε − x0`. Sampling
//!   integrates `dx/dt = v` from t = 1 to t = 0. States are `[B, C, H, W]`: pixels for
//!   ShapeWorld, latents for a latent-space model.
//! * [`VelocityModel`] is what every architecture implements: `v_θ(x_t, t, c)` under a
//!   [`Conditioning`] (token ids for ShapeWorld, text-encoder embeddings for SD3), the config
//!   it was built from, and an all-zero constructor for loading. Samplers, the GRPO update and
//!   the [`Trainer`] are written against it, never against one architecture.
//! * Classifier-free guidance ([`VelocityModel::velocity_cfg`]) runs the conditional and the
//!   null branch in one batched forward; the null prompt is the conditioning's own
//!   ([`Conditioning::null`]): the all-pad prompt for token ids, the encoded empty prompt for
//!   embeddings.
//!
//! Architectures: [`shapes_unet`] (ShapeWorld's 2.4M-parameter UNet, the default).

pub mod checkpoint;
pub mod fused;
pub mod lora;
pub mod sd3;
pub mod shapes_unet;
pub mod text_embeddings;
pub mod train;
pub mod vae;
pub mod weights;

mod conditioning;

pub use checkpoint::{load_model, load_safetensors, save_safetensors};
pub use conditioning::{Conditioning, TextConditioning};
pub use lora::{Linear, Linears, LoraConfig};
pub use shapes_unet::{FlowModel, FlowModelConfig, Level, layers};
pub use train::{Trainer, TrainerConfig};

use burn::module::Module;
use burn::tensor::{Device, Gradients, Int, Tensor, TensorData};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// A flow-matching velocity model `v_θ(x_t, t, c)`: the one interface samplers, the GRPO update
/// and the trainer use.
pub trait VelocityModel: Module + Linears + 'static {
    /// The architecture's configuration (stored as JSON in flowrun's checkpoints).
    type Config: Clone + std::fmt::Debug + Serialize + DeserializeOwned + Send + Sync + 'static;

    /// The architecture's name, as the `flow_model` resource's `arch` parameter spells it.
    const ARCH: &'static str;

    /// The layers a `lora:` without `targets` adapts (peft `target_modules` patterns).
    const LORA_TARGETS: &'static [&'static str];

    /// The configuration this model was built from.
    fn config(&self) -> &Self::Config;

    /// The model's structure with every parameter zero (norm scales one), for loaders that
    /// overwrite every tensor.
    fn init_zeros(config: &Self::Config, device: &Device) -> Self;

    /// Whether `config` describes a model this code can build (a loaded file's config).
    fn check_config(_config: &Self::Config) -> anyhow::Result<()> {
        Ok(())
    }

    /// The velocity at state `x` ([B, C, H, W]) and time `t` ([B] in [0, 1]) under `cond`
    /// (batch B) → [B, C, H, W]. An error when `cond` is not the kind this architecture reads.
    fn velocity(
        &self,
        x: Tensor<4>,
        t: Tensor<1>,
        cond: &Conditioning,
    ) -> anyhow::Result<Tensor<4>>;

    /// Classifier-free guided velocity `v_u + s·(v_c − v_u)`: the conditional and the null
    /// branch in one batched forward of size 2B. `scale <= 1` runs the plain conditional
    /// forward (`scale == 1` is identical to it).
    fn velocity_cfg(
        &self,
        x: Tensor<4>,
        t: Tensor<1>,
        cond: &Conditioning,
        scale: f32,
    ) -> anyhow::Result<Tensor<4>> {
        if scale <= 1.0 {
            return self.velocity(x, t, cond);
        }
        let b = x.dims()[0];
        let both = cond.clone().cat(cond.null())?;
        let v = self.velocity(
            Tensor::cat(vec![x.clone(), x], 0),
            Tensor::cat(vec![t.clone(), t], 0),
            &both,
        )?;
        let v_cond = v.clone().slice_dim(0, 0..b);
        let v_uncond = v.slice_dim(0, b..2 * b);
        Ok(v_uncond.clone() + (v_cond - v_uncond).mul_scalar(scale))
    }

    /// [`velocity_cfg`](Self::velocity_cfg) with activation checkpointing, for a model on an
    /// autodiff device: the forward keeps only what a recomputation block by block needs (each
    /// block's inputs), and [`Checkpointed::backward`] runs it again one block at a time during
    /// the backward. `None` when the architecture has no blocks to checkpoint (the caller then
    /// runs [`velocity_cfg`](Self::velocity_cfg)).
    fn velocity_cfg_checkpointed(
        &self,
        _x: Tensor<4>,
        _t: Tensor<1>,
        _cond: &Conditioning,
        _scale: f32,
    ) -> anyhow::Result<Option<Checkpointed<'_>>> {
        Ok(None)
    }

    /// Whether the model takes states of `shape` [C, H, W]; the error says what it takes.
    fn check_state(&self, shape: [usize; 3]) -> anyhow::Result<()>;

    /// Probability with which flow-matching training replaces a prompt by the null prompt
    /// (so that the model learns the unconditional branch CFG needs). 0 = never.
    fn cfg_dropout(&self) -> f64 {
        0.0
    }
}

/// A forward run under activation checkpointing
/// ([`VelocityModel::velocity_cfg_checkpointed`]): the velocity, computed from the outputs of
/// one or more forwards that recorded no graph, and what recomputes them.
///
/// The loss is built on [`velocity`](Self::velocity) as on a tracked velocity; its backward
/// ([`backward`](Self::backward)) stops at the forwards' outputs (autodiff leaves), whose
/// gradients then seed a recomputation block by block: each block runs again with autodiff on
/// its saved inputs and is back-propagated on its own (seeded by the gradient at its output
/// through `Σ out ⊙ g`, whose gradient is exactly `g`), so only one block's graph is alive at
/// a time. The gradients are those of one backward through the whole forward, up to the order
/// in which the contributions of shared inputs (the timestep embedding every block reads) are
/// summed.
pub struct Checkpointed<'a> {
    /// The velocity [B, C, H, W] (autodiff, tracked from the parts' outputs).
    pub velocity: Tensor<4>,
    parts: Vec<Recompute<'a>>,
}

/// One checkpointed forward: its output as an autodiff leaf and its recomputation.
pub struct Recompute<'a> {
    /// The forward's output (autodiff leaf that requires its gradient).
    pub output: Tensor<4>,
    /// Given the gradient at `output`, recomputes the forward block by block and hands each
    /// backward's gradients to the sink.
    #[allow(clippy::type_complexity)]
    pub backward: Box<dyn FnOnce(Tensor<4>, &mut dyn FnMut(Gradients)) + 'a>,
}

impl<'a> Checkpointed<'a> {
    pub fn new(velocity: Tensor<4>, parts: Vec<Recompute<'a>>) -> Self {
        Self { velocity, parts }
    }

    /// Back-propagates `loss` (built on [`velocity`](Self::velocity)) through the recomputed
    /// forwards, handing every partial backward's gradients to `sink` (e.g. to sum them per
    /// parameter with burn's `GradientsAccumulator`).
    pub fn backward(self, loss: Tensor<1>, sink: &mut dyn FnMut(Gradients)) {
        let mut grads = loss.backward();
        let seeds: Vec<Option<Tensor<4>>> = self
            .parts
            .iter()
            .map(|p| p.output.grad_remove(&mut grads))
            .collect();
        // Whatever else the loss reached directly.
        sink(grads);
        for (part, seed) in self.parts.into_iter().zip(seeds) {
            if let Some(g) = seed {
                (part.backward)(g, sink);
            }
        }
    }
}

/// Rectified-flow matching loss `mean((v_θ(x_t, t, c) − (ε − x0))²)` with
/// `x_t = (1 − t)·x0 + t·ε`. `t` is sampled by the caller (e.g. logit-normal, see
/// [`sample_logit_normal`]) so that all randomness stays explicit and seeded.
///
/// x0, noise: [B, C, H, W], t: [B], cond: batch B → scalar loss [1]
pub fn flow_matching_loss<M: VelocityModel>(
    model: &M,
    x0: Tensor<4>,
    noise: Tensor<4>,
    t: Tensor<1>,
    cond: &Conditioning,
) -> anyhow::Result<Tensor<1>> {
    let [b, _, _, _] = x0.dims();
    // [B, 1, 1, 1]
    let t4 = t.clone().reshape([b, 1, 1, 1]);
    let x_t = x0.clone() * t4.clone().neg().add_scalar(1.0) + noise.clone() * t4;
    let target = noise - x0;
    let v = model.velocity(x_t, t, cond)?;
    Ok((v - target).square().mean())
}

/// Deterministic Euler sampler: integrates from t = 1 (pure `noise`) to t = 0 in `steps`
/// uniform steps, `x ← x − (1/steps)·v_cfg(x, t)`. Runs on whatever device the model lives
/// on; pass a model on a non-autodiff device (e.g. `model.valid()`) for inference.
///
/// noise: [B, C, H, W], cond: batch B → x0 estimate [B, C, H, W]
pub fn sample_euler<M: VelocityModel>(
    model: &M,
    noise: Tensor<4>,
    cond: &Conditioning,
    steps: usize,
    cfg: f32,
) -> anyhow::Result<Tensor<4>> {
    let steps = steps.max(1);
    let [b, _, _, _] = noise.dims();
    let device = noise.device();
    let dt = 1.0 / steps as f32;
    let mut x = noise;
    for i in 0..steps {
        let t = 1.0 - i as f32 * dt;
        let t = Tensor::<1>::full([b], t, &device);
        let v = model.velocity_cfg(x.clone(), t, cond, cfg)?;
        x = x - v.mul_scalar(dt);
    }
    Ok(x)
}

/// Deterministic Euler sampler on a given schedule, as diffusers'
/// `FlowMatchEulerDiscreteScheduler.step` integrates: `x ← x + (σ_{i+1} − σ_i)·v_cfg(x, σ_i)`
/// for i = 0 … N−1 over `sigmas` = σ_0 > σ_1 > … > σ_N (N + 1 values, e.g.
/// [`crate::flow_match_schedule::sigmas`]: σ_0 = 1, σ_N = 0). Returns the last state.
///
/// noise: [B, C, H, W], cond: batch B → [B, C, H, W]
pub fn sample_euler_sigmas<M: VelocityModel>(
    model: &M,
    noise: Tensor<4>,
    cond: &Conditioning,
    sigmas: &[f32],
    cfg: f32,
) -> anyhow::Result<Tensor<4>> {
    if sigmas.len() < 2 {
        anyhow::bail!("an Euler schedule needs at least 2 sigmas, got {sigmas:?}");
    }
    if let Some(w) = sigmas
        .windows(2)
        .find(|w| w[1].partial_cmp(&w[0]) != Some(std::cmp::Ordering::Less))
    {
        anyhow::bail!(
            "the Euler schedule's sigmas must decrease, got {} then {}",
            w[0],
            w[1]
        );
    }
    let [b, _, _, _] = noise.dims();
    let device = noise.device();
    let mut x = noise;
    for w in sigmas.windows(2) {
        let t = Tensor::<1>::full([b], w[0], &device);
        let v = model.velocity_cfg(x.clone(), t, cond, cfg)?;
        x = x + v.mul_scalar(w[1] - w[0]);
    }
    Ok(x)
}

/// The device a model's parameters live on.
pub fn model_device<M: Module>(model: &M) -> Device {
    model
        .devices()
        .into_iter()
        .next()
        .unwrap_or_else(Device::flex)
}

/// Standard normal sample via Box–Muller (rand 0.9 has no `StandardNormal` without rand_distr).
pub(crate) fn standard_normal<R: rand::Rng + ?Sized>(rng: &mut R) -> f64 {
    let u1: f64 = 1.0 - rng.random::<f64>(); // (0, 1]
    let u2: f64 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// Float tensor from a flat row-major vector. Panics if `v.len()` ≠ product of `shape`.
pub fn tensor_from_vec<const D: usize>(
    v: Vec<f32>,
    shape: [usize; D],
    device: &Device,
) -> Tensor<D> {
    Tensor::from_data(TensorData::new(v, shape), device)
}

/// Int tensor from a flat row-major vector of token ids.
pub fn int_tensor_from_vec<const D: usize>(
    v: Vec<i64>,
    shape: [usize; D],
    device: &Device,
) -> Tensor<D, Int> {
    Tensor::from_data(TensorData::new(v, shape), device)
}

/// Logit-normal timesteps `t = sigmoid(mean + std·z)`, z ~ N(0, 1), from the caller's RNG.
pub fn sample_logit_normal<R: rand::Rng + ?Sized>(
    rng: &mut R,
    n: usize,
    mean: f64,
    std: f64,
) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let z = standard_normal(rng);
            (1.0 / (1.0 + (-(mean + std * z)).exp())) as f32
        })
        .collect()
}

/// Standard-normal values (Box–Muller) from the caller's RNG, e.g. for noise tensors.
pub fn sample_standard_normal<R: rand::Rng + ?Sized>(rng: &mut R, n: usize) -> Vec<f32> {
    (0..n).map(|_| standard_normal(rng) as f32).collect()
}
