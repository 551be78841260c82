//! `nodes::model::sd3` — diffusers' `SD3Transformer2DModel` (Stable Diffusion 3 and 3.5, the
//! MMDiT velocity network) in burn, loaded from a diffusers folder ([`load_diffusers`]) and
//! written back as one ([`save_diffusers`], `flowrun export`).
//!
//! ```text
//! x [B, C, H, W] ──PatchEmbed (p×p patches + centre-cropped sin-cos grid)──▶ [B, N, D]
//! σ [B] ─·1000─▶ Timesteps(256) ─MLP─┐
//! pooled [B, P] ──────────────MLP────┴─(+)─▶ temb [B, D]
//! prompt_embeds [B, L, J] ──context_embedder──▶ [B, L, D]
//! num_layers × JointTransformerBlock(x, context, silu(temb))   (last: context_pre_only)
//! AdaLayerNormContinuous(x, temb) ─proj_out─▶ [B, N, p·p·C_out] ─unpatchify─▶ [B, C_out, H, W]
//! ```
//!
//! Parameter paths of [`Sd3Transformer`] are exactly diffusers' state-dict keys (module field
//! names, `Vec` indices as path components): `transformer_blocks.0.attn.to_q.weight`,
//! `pos_embed.proj.weight`, `norm_out.linear.weight`, … — burn's `Linear` weights are the
//! transpose of PyTorch's (`[in, out]`), every other tensor has PyTorch's layout. The sin-cos
//! grid `pos_embed.pos_embed` is a persistent, untrained buffer in diffusers (in the state dict
//! whenever `pos_embed_max_size` is set): here a parameter with `require_grad` false, computed
//! when the weights do not carry it.
//!
//! The network is given the timestep `σ·1000`, as diffusers' SD3 pipelines pass it; its output
//! is the flow-matching velocity. Everything runs in the weights' dtype: f32, or with a
//! half-precision LoRA base (`base_dtype: bf16`) bf16/f16 activations from [`embed`]
//! (inputs cast there; the timestep's sin/cos features computed in f32 first) to [`head`],
//! whose output is cast back to f32, so that samplers, log-probs and losses stay f32. Norms
//! composed of burn ops (RMSNorm, LayerNorm off libtorch) compute in f32.
//!
//! [`embed`]: Sd3Transformer::embed
//! [`head`]: Sd3Transformer::head

pub mod attention;
pub mod block;
pub mod config;
pub mod embeddings;
pub mod export;
pub mod load;
mod policy;
pub mod recompute;

pub use block::JointTransformerBlock;
pub use config::{QkNorm, SD3_CLASS_NAME, Sd3Config};
pub use export::{ExportDtype, save_diffusers, save_diffusers_sharded};
pub use load::{load_diffusers, read_config};

use crate::model::lora::Linear;
use anyhow::ensure;
use burn::module::{Module, ModuleMapper, Param, ParamId};
use burn::tensor::activation::silu;
use burn::tensor::{DType, Device, FloatDType, Tensor, TensorData};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use block::{AdaLayerNorm, AdaNormKind};
use embeddings::{CombinedTimestepTextProjEmbeddings, PatchEmbed, sincos_pos_embed};

use crate::model::layers::linear;
use crate::model::standard_normal;

/// Standard deviation of the weights drawn by [`Sd3Config::init`].
pub const INIT_STD: f64 = 0.02;

/// Burn path of the sin-cos grid buffer (diffusers' key of the same name).
pub const POS_EMBED_KEY: &str = "pos_embed.pos_embed";

/// diffusers' `SD3Transformer2DModel`: the MMDiT velocity network of SD3 / SD3.5.
#[derive(Module, Debug)]
pub struct Sd3Transformer {
    pub pos_embed: PatchEmbed,
    pub time_text_embed: CombinedTimestepTextProjEmbeddings,
    /// joint_attention_dim → D
    pub context_embedder: Linear,
    pub transformer_blocks: Vec<JointTransformerBlock>,
    /// AdaLayerNormContinuous (scale, shift) on the image tokens.
    pub norm_out: AdaLayerNorm,
    /// D → p·p·C_out
    pub proj_out: Linear,
    #[module(skip)]
    pub config: Sd3Config,
}

impl Sd3Config {
    /// The model with deterministic random weights: every weight N(0, [`INIT_STD`]²) from a
    /// ChaCha RNG seeded by `seed` and the parameter's path (never burn's global RNG), biases
    /// zero, RMSNorm scales one, the sin-cos grid as diffusers computes it.
    ///
    /// Panics with [`validate`](Self::validate)'s message on an invalid config.
    pub fn init(&self, device: &Device, seed: u64) -> Sd3Transformer {
        self.init_zeros(device).map(&mut InitMapper {
            seed,
            path: Vec::new(),
        })
    }

    /// The model with every weight and bias zero, RMSNorm scales one and the sin-cos grid
    /// computed. Parameters are lazy: nothing is allocated until a tensor is used or replaced
    /// ([`load_diffusers`] replaces them without materialising the zeros).
    ///
    /// Panics with [`validate`](Self::validate)'s message on an invalid config.
    pub fn init_zeros(&self, device: &Device) -> Sd3Transformer {
        if let Err(e) = self.validate() {
            panic!("invalid Sd3Config: {e:#}");
        }
        let dim = self.inner_dim();
        let heads = self.num_attention_heads;
        let p = self.patch_size;
        let qk = self.qk_norm_kind();
        let grid = self
            .pos_embed_max_size
            .map(|m| lazy_grid(dim, m, self.base_size(), device));
        let blocks = (0..self.num_layers)
            .map(|i| {
                JointTransformerBlock::new(
                    dim,
                    heads,
                    qk,
                    i + 1 == self.num_layers,
                    self.is_dual_attention(i),
                    device,
                )
            })
            .collect();
        Sd3Transformer {
            pos_embed: PatchEmbed::new(
                self.in_channels,
                dim,
                p,
                self.pos_embed_max_size,
                self.base_size(),
                grid,
                device,
            ),
            time_text_embed: CombinedTimestepTextProjEmbeddings::new(
                dim,
                self.pooled_projection_dim,
                device,
            ),
            context_embedder: linear(self.joint_attention_dim, dim, device),
            transformer_blocks: blocks,
            norm_out: AdaLayerNorm::new(dim, AdaNormKind::Continuous, device),
            proj_out: linear(dim, p * p * self.output_channels(), device),
            config: self.clone(),
        }
    }
}

/// The `[1, M·M, D]` sin-cos grid as a lazy, untrained parameter (computed on first use).
fn lazy_grid(dim: usize, max_size: usize, base_size: usize, device: &Device) -> Param<Tensor<3>> {
    let shape = [1, max_size * max_size, dim];
    Param::uninitialized(
        ParamId::new(),
        move |device, _| {
            let values = sincos_pos_embed(dim, max_size, max_size, base_size);
            Tensor::from_data(TensorData::new(values, shape), device)
        },
        device.clone(),
        false,
        shape.into(),
    )
}

/// FNV-1a of a parameter path: each parameter draws from its own ChaCha stream.
fn hash_path(path: &str) -> u64 {
    path.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

struct InitMapper {
    seed: u64,
    path: Vec<String>,
}

impl ModuleMapper for InitMapper {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let path = self.path.join(".");
        let last = path.rsplit('.').next().unwrap_or_default();
        // The grid keeps its sin-cos values, RMSNorm scales (1-D `weight`) stay one, biases zero.
        if path == POS_EMBED_KEY || last != "weight" || D == 1 {
            return param;
        }
        let shape: [usize; D] = param.lazy_shape().dims();
        let n: usize = shape.iter().product();
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ hash_path(&path));
        let values: Vec<f32> = (0..n)
            .map(|_| (standard_normal(&mut rng) * INIT_STD) as f32)
            .collect();
        let device = param.lazy_device();
        let tensor = Tensor::from_data(TensorData::new(values, shape), &device);
        let id = param.id;
        param.transform_for_load(tensor, id)
    }
}

impl Sd3Transformer {
    /// The configuration this model was built from.
    pub fn config(&self) -> &Sd3Config {
        &self.config
    }

    /// The dtype the network computes in: its weights' (f32, or a LoRA policy's half base).
    pub fn dtype(&self) -> DType {
        self.pos_embed.proj.weight.val().dtype()
    }

    /// Checks the inputs' shapes against the model (what [`forward`](Self::forward) needs).
    pub fn check_inputs(
        &self,
        x: &[usize; 4],
        sigma: &[usize; 1],
        prompt_embeds: &[usize; 3],
        pooled: &[usize; 2],
    ) -> anyhow::Result<()> {
        let c = &self.config;
        let [b, ch, h, w] = *x;
        ensure!(b >= 1, "the batch is empty");
        ensure!(
            ch == c.in_channels,
            "latents have {ch} channels, the model takes in_channels = {}",
            c.in_channels
        );
        c.check_latent_size(h, w)?;
        ensure!(
            sigma[0] == b,
            "sigma has {} values for a batch of {b}",
            sigma[0]
        );
        let [pb, l, j] = *prompt_embeds;
        ensure!(
            pb == b && l >= 1 && j == c.joint_attention_dim,
            "prompt_embeds is [{pb}, {l}, {j}]; expected [{b}, L >= 1, joint_attention_dim = {}]",
            c.joint_attention_dim
        );
        ensure!(
            *pooled == [b, c.pooled_projection_dim],
            "pooled is {pooled:?}; expected [{b}, pooled_projection_dim = {}]",
            c.pooled_projection_dim
        );
        Ok(())
    }

    /// The velocity `v(x, σ, prompt)`, or an error naming the input whose shape does not fit.
    ///
    /// x: [B, in_channels, H, W] (H, W multiples of patch_size), sigma: [B] in [0, 1],
    /// prompt_embeds: [B, L, joint_attention_dim], pooled: [B, pooled_projection_dim]
    /// → [B, out_channels, H, W]
    pub fn try_forward(
        &self,
        x: Tensor<4>,
        sigma: Tensor<1>,
        prompt_embeds: Tensor<3>,
        pooled: Tensor<2>,
    ) -> anyhow::Result<Tensor<4>> {
        self.check_inputs(
            &x.dims(),
            &sigma.dims(),
            &prompt_embeds.dims(),
            &pooled.dims(),
        )?;
        let [_, _, hh, ww] = x.dims();
        let (mut hidden, context, temb_act) = self.embed(x, sigma, prompt_embeds, pooled);
        let mut context = Some(context);
        for block in &self.transformer_blocks {
            let ctx = context
                .take()
                .ok_or_else(|| anyhow::anyhow!("a context_pre_only block before the last"))?;
            let (x, ctx) = block.forward(hidden, ctx, temb_act.clone());
            hidden = x;
            context = ctx;
        }
        Ok(self.head(hidden, temb_act, [hh, ww]))
    }

    /// The network before its blocks: (image tokens [B, N, D], context tokens [B, L, D],
    /// silu(temb) [B, D]); inputs as [`try_forward`](Self::try_forward) takes them (checked),
    /// the outputs in the network's [`dtype`](Self::dtype).
    pub fn embed(
        &self,
        x: Tensor<4>,
        sigma: Tensor<1>,
        prompt_embeds: Tensor<3>,
        pooled: Tensor<2>,
    ) -> (Tensor<3>, Tensor<3>, Tensor<2>) {
        let dtype = self.dtype();
        // [B, N, D]
        let hidden = self.pos_embed.forward(x.cast(dtype));
        // [B, D]; every adaptive norm takes silu(temb). σ stays f32 (its sin/cos features are
        // computed in f32, then cast).
        let temb = self
            .time_text_embed
            .forward(sigma.mul_scalar(1000.0), pooled.cast(dtype));
        // [B, L, D]
        let context = self.context_embedder.forward(prompt_embeds.cast(dtype));
        (hidden, context, silu(temb))
    }

    /// The network after its blocks: image tokens [B, N, D] and silu(temb) [B, D] → the
    /// velocity [B, out_channels, H, W] for latents of `size` [H, W], in f32 whatever the
    /// network's dtype.
    pub fn head(&self, hidden: Tensor<3>, temb_act: Tensor<2>, size: [usize; 2]) -> Tensor<4> {
        let [b, _, _] = hidden.dims();
        let [hh, ww] = size;
        let p = self.config.patch_size;
        let (h, w) = (hh / p, ww / p);
        let c_out = self.config.output_channels();
        let hidden = self.norm_out.forward_continuous(hidden, temb_act);
        // [B, N, p·p·C_out] → [B, h, w, p, p, C_out] → [B, C_out, h, p, w, p]
        self.proj_out
            .forward(hidden)
            .reshape([b, h, w, p, p, c_out])
            .permute([0, 5, 1, 3, 2, 4])
            .reshape([b, c_out, hh, ww])
            .cast(FloatDType::F32)
    }

    /// [`try_forward`](Self::try_forward), panicking with its message on mis-shaped inputs
    /// (check them first with [`check_inputs`](Self::check_inputs) where they come from users).
    pub fn forward(
        &self,
        x: Tensor<4>,
        sigma: Tensor<1>,
        prompt_embeds: Tensor<3>,
        pooled: Tensor<2>,
    ) -> Tensor<4> {
        self.try_forward(x, sigma, prompt_embeds, pooled)
            .unwrap_or_else(|e| panic!("Sd3Transformer::forward: {e:#}"))
    }

    /// Classifier-free guided velocity `v_u + s·(v_c − v_u)`: the conditional (`prompt_embeds`,
    /// `pooled`) and unconditional (`negative_*`) branches in one forward of batch 2B when the
    /// prompts have the same length, else in two.
    #[allow(clippy::too_many_arguments)]
    pub fn try_forward_cfg(
        &self,
        x: Tensor<4>,
        sigma: Tensor<1>,
        prompt_embeds: Tensor<3>,
        pooled: Tensor<2>,
        negative_prompt_embeds: Tensor<3>,
        negative_pooled: Tensor<2>,
        scale: f32,
    ) -> anyhow::Result<Tensor<4>> {
        let [b, _, _, _] = x.dims();
        let outputs = self
            .cfg_forwards(
                x,
                sigma,
                prompt_embeds,
                pooled,
                negative_prompt_embeds,
                negative_pooled,
            )?
            .into_iter()
            .map(|(x, s, p, q)| self.try_forward(x, s, p, q))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(cfg_combine(outputs, b, scale))
    }

    /// The forwards classifier-free guidance runs, as (x, σ, prompt_embeds, pooled): one of
    /// batch 2B (the conditional rows first) when the prompt and the negative prompt have the
    /// same length, else the conditional and then the unconditional one. The negative branch's
    /// shapes are checked first (batching concatenates them).
    pub fn cfg_forwards(
        &self,
        x: Tensor<4>,
        sigma: Tensor<1>,
        prompt_embeds: Tensor<3>,
        pooled: Tensor<2>,
        negative_prompt_embeds: Tensor<3>,
        negative_pooled: Tensor<2>,
    ) -> anyhow::Result<Vec<ForwardInputs>> {
        self.check_inputs(
            &x.dims(),
            &sigma.dims(),
            &negative_prompt_embeds.dims(),
            &negative_pooled.dims(),
        )?;
        Ok(
            if prompt_embeds.dims()[1] == negative_prompt_embeds.dims()[1] {
                vec![(
                    Tensor::cat(vec![x.clone(), x], 0),
                    Tensor::cat(vec![sigma.clone(), sigma], 0),
                    Tensor::cat(vec![prompt_embeds, negative_prompt_embeds], 0),
                    Tensor::cat(vec![pooled, negative_pooled], 0),
                )]
            } else {
                vec![
                    (x.clone(), sigma.clone(), prompt_embeds, pooled),
                    (x, sigma, negative_prompt_embeds, negative_pooled),
                ]
            },
        )
    }
}

/// One forward's inputs: (x [B, C, H, W], σ [B], prompt_embeds [B, L, J], pooled [B, P]).
pub type ForwardInputs = (Tensor<4>, Tensor<1>, Tensor<3>, Tensor<2>);

/// The guided velocity `v_u + s·(v_c − v_u)` [b, C, H, W] from the outputs of
/// [`Sd3Transformer::cfg_forwards`]' forwards, in their order.
pub fn cfg_combine(outputs: Vec<Tensor<4>>, b: usize, scale: f32) -> Tensor<4> {
    let (v_cond, v_uncond) = match <[Tensor<4>; 2]>::try_from(outputs) {
        Ok([c, u]) => (c, u),
        Err(mut one) => {
            let v = one.remove(0);
            (v.clone().slice_dim(0, 0..b), v.slice_dim(0, b..2 * b))
        }
    };
    v_uncond.clone() + (v_cond - v_uncond).mul_scalar(scale)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::checkpoint::{param_paths, tensor_values};
    use crate::model::tensor_from_vec;

    fn inputs(
        c: &Sd3Config,
        b: usize,
        h: usize,
        w: usize,
        l: usize,
        dev: &Device,
    ) -> (Tensor<4>, Tensor<1>, Tensor<3>, Tensor<2>) {
        let wave = |n: usize, s: f32| (0..n).map(|i| (i as f32 * s).sin()).collect::<Vec<_>>();
        let ci = c.in_channels;
        (
            tensor_from_vec(wave(b * ci * h * w, 0.31), [b, ci, h, w], dev),
            tensor_from_vec((0..b).map(|i| 0.2 + 0.5 * i as f32).collect(), [b], dev),
            tensor_from_vec(
                wave(b * l * c.joint_attention_dim, 0.17),
                [b, l, c.joint_attention_dim],
                dev,
            ),
            tensor_from_vec(
                wave(b * c.pooled_projection_dim, 0.23),
                [b, c.pooled_projection_dim],
                dev,
            ),
        )
    }

    #[test]
    fn should_name_params_as_diffusers_state_dict_keys() {
        let c = Sd3Config {
            dual_attention_layers: vec![0],
            qk_norm: Some("rms_norm".into()),
            ..Sd3Config::tiny()
        };
        let m = c.init_zeros(&Device::flex());
        let paths: Vec<String> = param_paths(&m).into_iter().map(|(p, _, _)| p).collect();
        for key in [
            "pos_embed.pos_embed",
            "pos_embed.proj.weight",
            "time_text_embed.timestep_embedder.linear_1.bias",
            "time_text_embed.text_embedder.linear_2.weight",
            "context_embedder.weight",
            "transformer_blocks.0.norm1.linear.weight",
            "transformer_blocks.0.attn.to_q.weight",
            "transformer_blocks.0.attn.norm_added_k.weight",
            "transformer_blocks.0.attn.to_out.0.weight",
            "transformer_blocks.0.attn.to_add_out.bias",
            "transformer_blocks.0.attn2.to_k.weight",
            "transformer_blocks.0.ff.net.0.proj.weight",
            "transformer_blocks.0.ff_context.net.2.bias",
            "transformer_blocks.3.norm1_context.linear.weight",
            "transformer_blocks.3.attn.add_q_proj.weight",
            "norm_out.linear.weight",
            "proj_out.weight",
        ] {
            assert!(paths.iter().any(|p| p == key), "no {key} in {paths:?}");
        }
        for absent in [
            "transformer_blocks.3.attn.to_add_out.weight",
            "transformer_blocks.3.ff_context.net.0.proj.weight",
            "transformer_blocks.1.attn2.to_q.weight",
        ] {
            assert!(!paths.iter().any(|p| p == absent), "{absent} present");
        }
    }

    #[test]
    fn should_init_deterministically_from_the_seed() {
        let dev = Device::flex();
        let c = Sd3Config::tiny();
        let (x, s, p, pooled) = inputs(&c, 2, 6, 4, 3, &dev);
        let run = |seed| {
            let m = c.init(&dev, seed);
            tensor_values(m.forward(x.clone(), s.clone(), p.clone(), pooled.clone()))
        };
        let a = run(7);
        assert_eq!(a.len(), 2 * 4 * 6 * 4);
        assert_eq!(a, run(7));
        assert_ne!(a, run(8));
        assert!(a.iter().all(|v| v.is_finite()));
        assert!(
            a.iter().map(|v| v.abs()).fold(0.0f32, f32::max) > 1e-4,
            "trivial output"
        );
        // Zero weights: zero velocity.
        let z = tensor_values(c.init_zeros(&dev).forward(x, s, p, pooled));
        assert!(z.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn should_reject_mis_shaped_inputs_with_a_message() {
        let dev = Device::flex();
        let c = Sd3Config {
            patch_size: 2,
            pos_embed_max_size: Some(4),
            ..Sd3Config::tiny()
        };
        let m = c.init_zeros(&dev);
        let (x, s, p, pooled) = inputs(&c, 1, 6, 4, 2, &dev);
        assert!(
            m.try_forward(x.clone(), s.clone(), p.clone(), pooled.clone())
                .is_ok()
        );
        let (odd, ..) = inputs(&c, 1, 5, 4, 2, &dev);
        let e = m
            .try_forward(odd, s.clone(), p.clone(), pooled.clone())
            .unwrap_err();
        assert!(format!("{e}").contains("patch_size 2"), "{e}");
        let (big, ..) = inputs(&c, 1, 10, 4, 2, &dev);
        let e = m
            .try_forward(big, s.clone(), p.clone(), pooled.clone())
            .unwrap_err();
        assert!(format!("{e}").contains("pos_embed_max_size"), "{e}");
        let e = m
            .try_forward(x, s, p, pooled.clone().slice_dim(1, 0..3))
            .unwrap_err();
        assert!(format!("{e}").contains("pooled"), "{e}");
    }

    #[test]
    fn should_match_two_forwards_in_batched_cfg() {
        let dev = Device::flex();
        let c = Sd3Config::tiny();
        let m = c.init(&dev, 3);
        let (x, s, p, pooled) = inputs(&c, 2, 4, 4, 3, &dev);
        let (np, npooled) = (p.clone().mul_scalar(-0.5), pooled.clone().mul_scalar(0.3));
        let vc = tensor_values(m.forward(x.clone(), s.clone(), p.clone(), pooled.clone()));
        let vu = tensor_values(m.forward(x.clone(), s.clone(), np.clone(), npooled.clone()));
        let cfg = tensor_values(
            m.try_forward_cfg(x, s, p, pooled, np, npooled, 4.5)
                .unwrap(),
        );
        for ((c, u), g) in vc.iter().zip(&vu).zip(&cfg) {
            assert!((u + 4.5 * (c - u) - g).abs() < 1e-5);
        }
    }
}

crate::impl_linears!(Sd3Transformer {
    time_text_embed,
    context_embedder,
    transformer_blocks,
    norm_out,
    proj_out
});
