//! `shapes_unet` — the ShapeWorld velocity model: a small conditional flow-matching (rectified flow) text-to-image UNet.
//!
//! * Images: 32×32 RGB, CHW, values in [-1, 1].
//! * Prompts: token ids from a closed vocabulary, `[B, L]` with `L <= max_tokens`; pad id is 0.
//! * Convention: `x_t = (1 − t)·x0 + t·ε`, `t ∈ [0, 1]`, `t = 1` is pure noise; the network
//!   predicts the velocity `v ≈ ε − x0`. Sampling integrates `dx/dt = v` from t = 1 to t = 0.
//! * Classifier-free guidance: the **null prompt is the all-pad prompt** (every id 0). Its text
//!   tokens are fully masked out of the image attention and its pooled text vector is exactly
//!   zero, so the unconditional branch sees no text at all. During training a fraction
//!   `cfg_dropout` of prompts is replaced by the null prompt ([`Trainer`] does this).
//!
//! Architecture (see [`FlowModel`]): a transformer text encoder (token + learned positional
//! embeddings, pre-norm layers, pad key-masking, masked-mean pooled vector) and a conditional
//! UNet velocity net: levels `channels = [32, 64, 128]` at 32→16→8, GroupNorm+SiLU residual
//! blocks with FiLM scale/shift from `MLP(sinusoidal(t)) + Linear(pooled text)`; attention
//! at 16×16 (cross-attention to the text tokens) and at 8×8 + bottleneck (joint attention:
//! image tokens attend over `[image tokens ; text tokens]` in one softmax) — see
//! `attn_resolutions` / `joint_attn_resolutions`; concatenated skip connections with a 1×1
//! channel reduction before each nearest upsampling; zero-initialised output conv.
//! Default config: ~2.42M parameters.
//!
//! All randomness is explicit: weights are initialised from `FlowModelConfig::seed` with a
//! ChaCha RNG (never burn's global RNG), and noise / timesteps are passed in as tensors.

mod init;
pub mod layers;

#[cfg(test)]
mod tests;

use crate::model::lora::Linear;
use burn::config::Config;
use burn::module::Module;
use burn::nn::GroupNorm;
use burn::nn::conv::Conv2d;
use burn::tensor::activation::silu;
use burn::tensor::{Device, Int, Tensor};

use super::{Conditioning, VelocityModel};

use super::fused;
use layers::{AttnBlock, ResBlock, TextEncoder, downsample, timestep_embedding, upsample};

/// Configuration of [`FlowModel`]. Serialised as JSON into checkpoints (`flowrun.config`).
#[derive(Config, Debug, PartialEq)]
pub struct FlowModelConfig {
    /// Vocabulary size (token ids in `0..vocab_size`, 0 = pad).
    pub vocab_size: usize,
    /// Maximum prompt length in tokens.
    pub max_tokens: usize,
    /// Image side length (square images). Must be divisible by `2^(channels.len() - 1)`.
    #[config(default = 32)]
    pub image_size: usize,
    /// Image channels.
    #[config(default = 3)]
    pub image_channels: usize,
    /// UNet channels per resolution level (each level halves the resolution).
    #[config(default = "vec![32, 64, 128]")]
    pub channels: Vec<usize>,
    /// Residual blocks per level on the down path (the up path has the same count).
    #[config(default = 1)]
    pub res_blocks: usize,
    /// Residual blocks in the bottleneck (the joint attention follows the first one).
    #[config(default = 1)]
    pub mid_blocks: usize,
    /// Resolutions (side length) at which text-conditioned attention is applied.
    #[config(default = "vec![16, 8]")]
    pub attn_resolutions: Vec<usize>,
    /// Subset of `attn_resolutions` (plus the bottleneck, always joint) whose attention is
    /// *joint* (image tokens attend over [image ; text]); the others are cross-attention to
    /// the text tokens only, which is much cheaper at 16×16 on CPU.
    #[config(default = "vec![8]")]
    pub joint_attn_resolutions: Vec<usize>,
    /// Per-head width of the image attention (heads = channels / attn_head_dim).
    #[config(default = 32)]
    pub attn_head_dim: usize,
    /// GroupNorm groups (clamped to a divisor of the channel count).
    #[config(default = 8)]
    pub groups: usize,
    /// Text encoder width D.
    #[config(default = 128)]
    pub text_dim: usize,
    /// Text encoder transformer layers.
    #[config(default = 2)]
    pub text_layers: usize,
    /// Text encoder attention heads.
    #[config(default = 4)]
    pub text_heads: usize,
    /// Width of the sinusoidal timestep features.
    #[config(default = 128)]
    pub time_freq_dim: usize,
    /// Width E of the conditioning vector fed to every FiLM layer.
    #[config(default = 256)]
    pub cond_dim: usize,
    /// Training-time classifier-free-guidance dropout probability (prompt → null prompt).
    #[config(default = 0.1)]
    pub cfg_dropout: f64,
    /// Seed of the deterministic weight initialisation.
    #[config(default = 0)]
    pub seed: u64,
}

impl FlowModelConfig {
    /// Default-size model (~2.5M parameters): channels [32, 64, 128], 2 text layers.
    pub fn small(vocab_size: usize, max_tokens: usize) -> Self {
        Self::new(vocab_size, max_tokens)
    }

    /// Tiny model for tests: channels [8, 16, 32], 1 text layer of width 32.
    pub fn tiny(vocab_size: usize, max_tokens: usize) -> Self {
        Self::new(vocab_size, max_tokens)
            .with_channels(vec![8, 16, 32])
            .with_attn_head_dim(8)
            .with_groups(4)
            .with_text_dim(32)
            .with_text_layers(1)
            .with_text_heads(2)
            .with_time_freq_dim(32)
            .with_cond_dim(32)
    }

    /// Checks internal consistency; `init` panics with this message on an invalid config.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.vocab_size >= 2,
            "vocab_size must be >= 2 (0 is the pad id)"
        );
        anyhow::ensure!(self.max_tokens >= 1, "max_tokens must be >= 1");
        anyhow::ensure!(!self.channels.is_empty(), "channels must not be empty");
        anyhow::ensure!(self.res_blocks >= 1, "res_blocks must be >= 1");
        let down = 1usize << (self.channels.len() - 1);
        anyhow::ensure!(
            self.image_size.is_multiple_of(down),
            "image_size {} not divisible by {down}",
            self.image_size
        );
        anyhow::ensure!(
            self.text_dim.is_multiple_of(self.text_heads),
            "text_dim {} not divisible by text_heads {}",
            self.text_dim,
            self.text_heads
        );
        anyhow::ensure!(
            self.time_freq_dim.is_multiple_of(2),
            "time_freq_dim must be even"
        );
        for &c in &self.channels {
            let heads = (c / self.attn_head_dim.max(1)).max(1);
            anyhow::ensure!(
                c % heads == 0,
                "channels {c} not divisible by attention heads {heads}"
            );
        }
        Ok(())
    }

    /// Builds the model with deterministic weights (from `self.seed`) on `device`.
    /// Use `device.autodiff()` for training.
    pub fn init(&self, device: &Device) -> FlowModel {
        if let Err(e) = self.validate() {
            panic!("invalid FlowModelConfig: {e:#}");
        }
        let model = self.init_zeros(device);
        init::init_weights(model, self.seed)
    }

    /// Builds the model structure with every parameter at zero / one (norm scales).
    /// Used by the checkpoint loader, which overwrites every tensor anyway.
    pub(crate) fn init_zeros(&self, device: &Device) -> FlowModel {
        let e = self.cond_dim;
        let g = self.groups;
        let ch = &self.channels;
        let n = ch.len();
        let text = TextEncoder::new(
            self.vocab_size,
            self.max_tokens,
            self.text_dim,
            self.text_layers,
            self.text_heads,
            device,
        );
        let attn_at = |level: usize| {
            let res = self.image_size >> level;
            self.attn_resolutions.contains(&res)
        };
        let joint_at = |level: usize| {
            let res = self.image_size >> level;
            self.joint_attn_resolutions.contains(&res)
        };
        let mut down = Vec::with_capacity(n);
        let mut c_prev = ch[0];
        for (i, &c) in ch.iter().enumerate() {
            let mut blocks = Vec::new();
            for _ in 0..self.res_blocks {
                blocks.push(ResBlock::new(c_prev, c, e, g, device));
                c_prev = c;
            }
            let attn = attn_at(i).then(|| {
                AttnBlock::new(c, self.text_dim, self.attn_head_dim, g, joint_at(i), device)
            });
            down.push(Level {
                blocks,
                attn,
                reduce: None,
            });
        }
        let c_mid = ch[n - 1];
        let mid = Level {
            blocks: (0..self.mid_blocks.max(1))
                .map(|_| ResBlock::new(c_mid, c_mid, e, g, device))
                .collect(),
            attn: Some(AttnBlock::new(
                c_mid,
                self.text_dim,
                self.attn_head_dim,
                g,
                true,
                device,
            )),
            reduce: None,
        };
        let mut up = Vec::with_capacity(n);
        let mut c_cur = c_mid;
        for i in (0..n).rev() {
            let c = ch[i];
            let mut blocks = vec![ResBlock::new(c_cur + c, c, e, g, device)];
            for _ in 1..self.res_blocks {
                blocks.push(ResBlock::new(c, c, e, g, device));
            }
            let attn = attn_at(i).then(|| {
                AttnBlock::new(c, self.text_dim, self.attn_head_dim, g, joint_at(i), device)
            });
            // 1×1 channel reduction before upsampling (cheap at the lower resolution; keeps
            // the next level's skip-concat at 2·c instead of c_prev + c).
            let reduce = (i > 0).then(|| layers::conv1x1(c, ch[i - 1], device));
            c_cur = if i > 0 { ch[i - 1] } else { c };
            up.push(Level {
                blocks,
                attn,
                reduce,
            });
        }
        FlowModel {
            text,
            time_fc1: layers::linear(self.time_freq_dim, e, device),
            time_fc2: layers::linear(e, e, device),
            text_cond: layers::linear(self.text_dim, e, device),
            conv_in: layers::conv3x3(self.image_channels, ch[0], device),
            down,
            mid,
            up,
            out_norm: layers::group_norm(g, ch[0], true, device),
            out_conv: layers::conv3x3(ch[0], self.image_channels, device),
            config: self.clone(),
        }
    }
}

/// One UNet resolution level: residual blocks followed by an optional attention block.
#[derive(Module, Debug)]
pub struct Level {
    pub blocks: Vec<ResBlock>,
    pub attn: Option<AttnBlock>,
    /// Up path only: 1×1 conv to the next (higher-resolution) level's width, applied
    /// before the nearest-neighbour upsampling.
    pub reduce: Option<Conv2d>,
}

impl Level {
    fn forward(
        &self,
        mut h: Tensor<4>,
        cond_act: &Tensor<2>,
        text: &layers::TextEncoding,
    ) -> Tensor<4> {
        for block in &self.blocks {
            h = block.forward(h, cond_act.clone());
        }
        if let Some(attn) = &self.attn {
            h = attn.forward(h, text.tokens.clone(), text.key_bias.clone());
        }
        h
    }
}

/// Conditional flow-matching velocity model v_θ(x_t, t, c).
#[derive(Module, Debug)]
pub struct FlowModel {
    pub text: TextEncoder,
    pub time_fc1: Linear,
    pub time_fc2: Linear,
    /// pooled text [B, D] → [B, E], added to the timestep conditioning.
    pub text_cond: Linear,
    pub conv_in: Conv2d,
    /// Down path, highest resolution first.
    pub down: Vec<Level>,
    /// Bottleneck: `blocks[0]` → joint attention → `blocks[1..]`.
    pub mid: Level,
    /// Up path, lowest resolution first; the first block of each level takes the skip concat.
    pub up: Vec<Level>,
    pub out_norm: GroupNorm,
    /// Zero-initialised: the model predicts v = 0 at init.
    pub out_conv: Conv2d,
    /// The configuration this model was built from (stored in checkpoints).
    #[module(skip)]
    pub config: FlowModelConfig,
}

impl FlowModel {
    /// v_θ(x_t, t, c).
    ///
    /// x: [B, 3, 32, 32], t: [B] in [0, 1], tokens: [B, L] Int (pad 0) → velocity [B, 3, 32, 32]
    pub fn forward(&self, x: Tensor<4>, t: Tensor<1>, tokens: Tensor<2, Int>) -> Tensor<4> {
        let text = self.text.forward(tokens);
        // [B, E]
        let temb = timestep_embedding(t, self.config.time_freq_dim);
        let cond = self.time_fc2.forward(silu(self.time_fc1.forward(temb)))
            + self.text_cond.forward(text.pooled.clone());
        let cond_act = silu(cond);

        // [B, C0, H, W]
        let mut h = fused::conv2d(&self.conv_in, x);
        let n = self.down.len();
        let mut skips = Vec::with_capacity(n);
        for (i, level) in self.down.iter().enumerate() {
            h = level.forward(h, &cond_act, &text);
            skips.push(h.clone());
            if i + 1 < n {
                h = downsample(h);
            }
        }
        // Bottleneck.
        h = self.mid.blocks[0].forward(h, cond_act.clone());
        if let Some(attn) = &self.mid.attn {
            h = attn.forward(h, text.tokens.clone(), text.key_bias.clone());
        }
        for block in &self.mid.blocks[1..] {
            h = block.forward(h, cond_act.clone());
        }
        for (j, level) in self.up.iter().enumerate() {
            let skip = skips.pop().expect("one skip per level");
            h = level.forward(Tensor::cat(vec![h, skip], 1), &cond_act, &text);
            if let Some(reduce) = &level.reduce {
                h = fused::conv2d(reduce, h);
            }
            if j + 1 < n {
                h = upsample(h);
            }
        }
        fused::conv2d(&self.out_conv, fused::group_norm(&self.out_norm, h, true))
    }

    /// Classifier-free guided velocity `v_u + s·(v_c − v_u)`, computing the conditional and
    /// unconditional (null = all-pad prompt) branches in one batched forward of size 2B.
    /// `scale <= 1` runs the plain conditional forward (`scale == 1` is identical to it).
    ///
    /// x: [B, 3, H, W], t: [B], tokens: [B, L] → [B, 3, H, W]
    pub fn forward_cfg(
        &self,
        x: Tensor<4>,
        t: Tensor<1>,
        tokens: Tensor<2, Int>,
        scale: f32,
    ) -> Tensor<4> {
        if scale <= 1.0 {
            return self.forward(x, t, tokens);
        }
        let [b, _, _, _] = x.dims();
        let null = tokens.zeros_like();
        let v = self.forward(
            Tensor::cat(vec![x.clone(), x], 0),
            Tensor::cat(vec![t.clone(), t], 0),
            Tensor::cat(vec![tokens, null], 0),
        );
        let v_cond = v.clone().slice_dim(0, 0..b);
        let v_uncond = v.slice_dim(0, b..2 * b);
        v_uncond.clone() + (v_cond - v_uncond).mul_scalar(scale)
    }

    /// The configuration this model was built from.
    pub fn config(&self) -> &FlowModelConfig {
        &self.config
    }

    /// Number of scalar parameters.
    pub fn num_params(&self) -> usize {
        Module::num_params(self)
    }
}

impl VelocityModel for FlowModel {
    type Config = FlowModelConfig;
    const ARCH: &'static str = "shapes_unet";
    /// The image attention's projections (text-conditioned joint/cross attention).
    const LORA_TARGETS: &'static [&'static str] = &["attn.qkv", "attn.text_kv", "attn.proj"];

    fn config(&self) -> &FlowModelConfig {
        &self.config
    }

    fn init_zeros(config: &FlowModelConfig, device: &Device) -> Self {
        config.init_zeros(device)
    }

    fn check_config(config: &FlowModelConfig) -> anyhow::Result<()> {
        config.validate()
    }

    fn velocity(
        &self,
        x: Tensor<4>,
        t: Tensor<1>,
        cond: &Conditioning,
    ) -> anyhow::Result<Tensor<4>> {
        Ok(self.forward(x, t, cond.tokens(Self::ARCH)?.clone()))
    }

    fn velocity_cfg(
        &self,
        x: Tensor<4>,
        t: Tensor<1>,
        cond: &Conditioning,
        scale: f32,
    ) -> anyhow::Result<Tensor<4>> {
        Ok(self.forward_cfg(x, t, cond.tokens(Self::ARCH)?.clone(), scale))
    }

    fn check_state(&self, shape: [usize; 3]) -> anyhow::Result<()> {
        let c = &self.config;
        let takes = [c.image_channels, c.image_size, c.image_size];
        if shape != takes {
            anyhow::bail!("the `{}` model takes {takes:?}", Self::ARCH);
        }
        Ok(())
    }

    fn cfg_dropout(&self) -> f64 {
        self.config.cfg_dropout
    }
}

crate::impl_linears!(Level { blocks, attn });
crate::impl_linears!(FlowModel {
    text,
    time_fc1,
    time_fc2,
    text_cond,
    down,
    mid,
    up
});
