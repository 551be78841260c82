//! [`Sd3Transformer`] as a flowrun policy ([`VelocityModel`]): conditioned on text embeddings,
//! t = σ (diffusers' pipelines pass σ·1000 as the timestep; the transformer does that itself).

use anyhow::{Result, ensure};
use burn::tensor::{Device, Tensor};

use super::{Sd3Config, Sd3Transformer};
use crate::model::{Checkpointed, Conditioning, VelocityModel};

/// The prompt's embeddings and pooled vector, and the negative prompt's broadcast to the batch:
/// the text inputs of a guided forward.
fn cfg_text(cond: &Conditioning) -> Result<(Tensor<3>, Tensor<2>, Tensor<3>, Tensor<2>)> {
    let text = cond.text(Sd3Transformer::ARCH)?;
    let [b, l, d] = text.prompt_embeds.dims();
    let [_, p] = text.pooled.dims();
    Ok((
        text.prompt_embeds.clone(),
        text.pooled.clone(),
        text.negative_embeds.clone().expand([b, l, d]),
        text.negative_pooled.clone().expand([b, p]),
    ))
}

impl VelocityModel for Sd3Transformer {
    type Config = Sd3Config;
    const ARCH: &'static str = "sd3";
    /// Flow-GRPO's: every attention projection, image and text side.
    const LORA_TARGETS: &'static [&'static str] = &[
        "attn.to_q",
        "attn.to_k",
        "attn.to_v",
        "attn.to_out.0",
        "attn.add_q_proj",
        "attn.add_k_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
    ];

    fn config(&self) -> &Sd3Config {
        &self.config
    }

    fn init_zeros(config: &Sd3Config, device: &Device) -> Self {
        config.init_zeros(device)
    }

    fn check_config(config: &Sd3Config) -> Result<()> {
        config.validate()
    }

    /// x: [B, C, H, W] latents, t: [B] = σ, cond: text embeddings → [B, C, H, W]
    fn velocity(&self, x: Tensor<4>, t: Tensor<1>, cond: &Conditioning) -> Result<Tensor<4>> {
        let text = cond.text(Self::ARCH)?;
        self.try_forward(x, t, text.prompt_embeds.clone(), text.pooled.clone())
    }

    fn velocity_cfg(
        &self,
        x: Tensor<4>,
        t: Tensor<1>,
        cond: &Conditioning,
        scale: f32,
    ) -> Result<Tensor<4>> {
        if scale <= 1.0 {
            return self.velocity(x, t, cond);
        }
        let (pe, pooled, npe, npooled) = cfg_text(cond)?;
        self.try_forward_cfg(x, t, pe, pooled, npe, npooled, scale)
    }

    fn velocity_cfg_checkpointed(
        &self,
        x: Tensor<4>,
        t: Tensor<1>,
        cond: &Conditioning,
        scale: f32,
    ) -> Result<Option<Checkpointed<'_>>> {
        let (pe, pooled, npe, npooled) = cfg_text(cond)?;
        self.forward_cfg_checkpointed(x, t, pe, pooled, npe, npooled, scale)
            .map(Some)
    }

    fn check_state(&self, shape: [usize; 3]) -> Result<()> {
        let [c, h, w] = shape;
        let takes = self.config.in_channels;
        ensure!(
            c == takes,
            "the `sd3` model takes latents of {takes} channels, not {c}"
        );
        self.config.check_latent_size(h, w)
    }
}
