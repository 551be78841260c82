//! Building blocks of the flow model: text encoder, conditional residual blocks,
//! joint image/text attention, timestep embedding, up/down sampling.
//!
//! Shape comments use `B` = batch, `L` = text tokens, `C` = channels, `H`/`W` = spatial,
//! `D` = text width, `E` = conditioning width.

use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{
    Embedding, EmbeddingConfig, GroupNorm, GroupNormConfig, Initializer, LayerNorm,
    LayerNormConfig, PaddingConfig2d,
};
use burn::tensor::activation::{gelu, softmax};
use burn::tensor::module::{avg_pool2d, interpolate};
use burn::tensor::ops::{AvgPoolOptions, InterpolateMode, InterpolateOptions};
use burn::tensor::{Bool, Device, Int, Tensor};

use super::fused::{self, conv2d};
pub use crate::model::lora::Linear;

/// Large negative logit added to masked (padding) keys. Finite so that rows whose keys are
/// all masked (the text self-attention of the null prompt) stay NaN-free.
const MASK_LOGIT: f32 = -1.0e4;

/// Linear layer with zero-initialised weights (deterministic init overwrites the rest).
pub(crate) fn linear(d_in: usize, d_out: usize, device: &Device) -> Linear {
    Linear::zeros(d_in, d_out, device)
}

pub(crate) fn conv3x3(c_in: usize, c_out: usize, device: &Device) -> Conv2d {
    Conv2dConfig::new([c_in, c_out], [3, 3])
        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
        .with_initializer(Initializer::Zeros)
        .init(device)
}

pub(crate) fn conv1x1(c_in: usize, c_out: usize, device: &Device) -> Conv2d {
    Conv2dConfig::new([c_in, c_out], [1, 1])
        .with_initializer(Initializer::Zeros)
        .init(device)
}

pub(crate) fn group_norm(
    groups: usize,
    channels: usize,
    affine: bool,
    device: &Device,
) -> GroupNorm {
    GroupNormConfig::new(num_groups(groups, channels), channels)
        .with_affine(affine)
        .with_epsilon(1e-5)
        .init(device)
}

/// Largest divisor of `channels` that is `<= groups`.
pub(crate) fn num_groups(groups: usize, channels: usize) -> usize {
    let mut g = groups.clamp(1, channels.max(1));
    while !channels.is_multiple_of(g) {
        g -= 1;
    }
    g
}

/// Multi-head scaled dot-product attention with an additive key bias.
///
/// On libtorch this is libtorch's `scaled_dot_product_attention` and its backward
/// ([`fused::attention`]). Elsewhere, without autodiff it uses the backend's fused attention
/// kernel (flex: gemm-based naive/flash attention); with autodiff it is composed from matmul +
/// softmax so that it is differentiable. All compute the same function.
///
/// q: [B, H, Lq, dh], k/v: [B, H, Lk, dh], key_bias: [B, 1, 1, Lk] (0 or MASK_LOGIT)
/// → [B, H, Lq, dh]
pub(crate) fn attend(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, key_bias: Tensor<4>) -> Tensor<4> {
    if let Some(y) = fused::attention(&q, &k, &v, &key_bias) {
        y
    } else if q.is_autodiff() {
        attend_composed(q, k, v, key_bias)
    } else {
        let [b, _, lq, _] = q.dims();
        let [_, _, lk, _] = k.dims();
        let bias = key_bias.expand([b, 1, lq, lk]);
        burn::tensor::module::attention(q, k, v, None, Some(bias), Default::default())
    }
}

/// Differentiable attention from primitive ops (see [`attend`]).
pub(crate) fn attend_composed(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    key_bias: Tensor<4>,
) -> Tensor<4> {
    let [_, _, _, dh] = q.dims();
    let scale = 1.0 / (dh as f32).sqrt();
    // [B, H, Lq, Lk]
    let scores = q.mul_scalar(scale).matmul(k.swap_dims(2, 3)) + key_bias;
    softmax(scores, 3).matmul(v)
}

/// [B, heads, L, dh] → [B, L, heads * dh]
pub(crate) fn merge_heads(x: Tensor<4>) -> Tensor<3> {
    let [b, h, l, dh] = x.dims();
    x.swap_dims(1, 2).reshape([b, l, h * dh])
}

/// Key bias from a pad mask: [B, L] Bool (true = pad) → [B, 1, 1, L] (0 keep / MASK_LOGIT pad).
pub(crate) fn key_bias_from_pad(pad: Tensor<2, Bool>) -> Tensor<4> {
    let [b, l] = pad.dims();
    pad.float().mul_scalar(MASK_LOGIT).reshape([b, 1, 1, l])
}

// ---------------------------------------------------------------------------------------------
// Text encoder
// ---------------------------------------------------------------------------------------------

/// Pre-norm transformer layer: x + MHA(LN(x)), x + MLP(LN(x)).
#[derive(Module, Debug)]
pub struct TextLayer {
    pub norm1: LayerNorm,
    /// Fused q, k, v projection. [D] → [3D]
    pub qkv: Linear,
    pub proj: Linear,
    pub norm2: LayerNorm,
    pub fc1: Linear,
    pub fc2: Linear,
    pub heads: usize,
}

impl TextLayer {
    pub fn new(dim: usize, heads: usize, mlp_ratio: usize, device: &Device) -> Self {
        Self {
            norm1: LayerNormConfig::new(dim).init(device),
            qkv: linear(dim, 3 * dim, device),
            proj: linear(dim, dim, device),
            norm2: LayerNormConfig::new(dim).init(device),
            fc1: linear(dim, dim * mlp_ratio, device),
            fc2: linear(dim * mlp_ratio, dim, device),
            heads,
        }
    }

    /// x: [B, L, D], key_bias: [B, 1, 1, L] → [B, L, D]
    pub fn forward(&self, x: Tensor<3>, key_bias: Tensor<4>) -> Tensor<3> {
        let [b, l, d] = x.dims();
        // [B, L, 3D]
        let qkv = self.qkv.forward(self.norm1.forward(x.clone()));
        // [B, heads, L, 3 * dh]: q, k, v for each head are contiguous along the last axis.
        let qkv = qkv
            .reshape([b, l, 3, self.heads, d / self.heads])
            .permute([0, 3, 1, 2, 4]);
        let dh = d / self.heads;
        let q = qkv
            .clone()
            .slice_dim(3, 0..1)
            .reshape([b, self.heads, l, dh]);
        let k = qkv
            .clone()
            .slice_dim(3, 1..2)
            .reshape([b, self.heads, l, dh]);
        let v = qkv.slice_dim(3, 2..3).reshape([b, self.heads, l, dh]);
        let ctx = merge_heads(attend(q, k, v, key_bias));
        let x = x + self.proj.forward(ctx);
        let h = gelu(self.fc1.forward(self.norm2.forward(x.clone())));
        x + self.fc2.forward(h)
    }
}

/// Token embedding + learned positional embedding + pre-norm transformer layers.
#[derive(Module, Debug)]
pub struct TextEncoder {
    pub token_embedding: Embedding,
    /// [max_tokens, D]
    pub pos_embedding: Param<Tensor<2>>,
    pub layers: Vec<TextLayer>,
    pub norm: LayerNorm,
}

/// Output of the text encoder.
#[derive(Debug, Clone)]
pub struct TextEncoding {
    /// [B, L, D] contextual token features (after the final LayerNorm).
    pub tokens: Tensor<3>,
    /// [B, L] true where the token is padding (id 0).
    pub pad: Tensor<2, Bool>,
    /// [B, 1, 1, L] additive attention bias: 0 for real tokens, a large negative number for pads.
    pub key_bias: Tensor<4>,
    /// [B, D] mean of the non-pad token features; exactly zero for the null (all-pad) prompt.
    pub pooled: Tensor<2>,
}

impl TextEncoder {
    pub fn new(
        vocab: usize,
        max_tokens: usize,
        dim: usize,
        layers: usize,
        heads: usize,
        device: &Device,
    ) -> Self {
        Self {
            token_embedding: EmbeddingConfig::new(vocab, dim)
                .with_initializer(Initializer::Zeros)
                .init(device),
            pos_embedding: Param::from_tensor(Tensor::zeros([max_tokens, dim], device)),
            layers: (0..layers)
                .map(|_| TextLayer::new(dim, heads, 4, device))
                .collect(),
            norm: LayerNormConfig::new(dim).init(device),
        }
    }

    /// tokens: [B, L] Int (pad id 0), L <= max_tokens
    pub fn forward(&self, tokens: Tensor<2, Int>) -> TextEncoding {
        let [b, l] = tokens.dims();
        let pad = tokens.clone().equal_elem(0);
        let key_bias = key_bias_from_pad(pad.clone());
        let [max_l, d] = self.pos_embedding.dims();
        assert!(
            l <= max_l,
            "prompt has {l} tokens but the model supports at most {max_l}"
        );
        // [B, L, D]
        let pos = self
            .pos_embedding
            .val()
            .slice_dim(0, 0..l)
            .reshape([1, l, d]);
        let mut x = self.token_embedding.forward(tokens) + pos;
        for layer in &self.layers {
            x = layer.forward(x, key_bias.clone());
        }
        let x = self.norm.forward(x);
        // Masked mean over real tokens. [B, L, 1]
        let keep = pad.clone().bool_not().float().reshape([b, l, 1]);
        let count = keep.clone().sum_dim(1).clamp_min(1.0); // [B, 1, 1]
        let pooled = (x.clone() * keep).sum_dim(1).div(count).reshape([b, d]);
        TextEncoding {
            tokens: x,
            pad,
            key_bias,
            pooled,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Conditioning
// ---------------------------------------------------------------------------------------------

/// Sinusoidal embedding of t ∈ [0, 1] (scaled by 1000, as in DDPM/ADM).
/// t: [B] → [B, dim]
pub fn timestep_embedding(t: Tensor<1>, dim: usize) -> Tensor<2> {
    let device = t.device();
    let [b] = t.dims();
    let half = dim / 2;
    let freqs: Vec<f32> = (0..half)
        .map(|i| (-(10000f32).ln() * i as f32 / half as f32).exp())
        .collect();
    // [1, half]
    let freqs = Tensor::<1>::from_floats(freqs.as_slice(), &device).reshape([1, half]);
    // [B, half]
    let args = t.mul_scalar(1000.0).reshape([b, 1]) * freqs;
    Tensor::cat(vec![args.clone().cos(), args.sin()], 1)
}

// ---------------------------------------------------------------------------------------------
// UNet blocks
// ---------------------------------------------------------------------------------------------

/// Residual block: GN → SiLU → conv3x3 → GN·(1+scale)+shift (FiLM from cond) → SiLU → conv3x3,
/// plus a 1×1 skip projection when channels change. The second conv is zero-initialised so
/// the block starts as (projected) identity.
#[derive(Module, Debug)]
pub struct ResBlock {
    pub norm1: GroupNorm,
    pub conv1: Conv2d,
    /// SiLU(cond) [B, E] → [B, 2·C_out] (scale, shift); zero-initialised.
    pub film: Linear,
    pub norm2: GroupNorm,
    pub conv2: Conv2d,
    pub skip: Option<Conv2d>,
}

impl ResBlock {
    pub fn new(c_in: usize, c_out: usize, cond_dim: usize, groups: usize, device: &Device) -> Self {
        Self {
            norm1: group_norm(groups, c_in, true, device),
            conv1: conv3x3(c_in, c_out, device),
            film: linear(cond_dim, 2 * c_out, device),
            norm2: group_norm(groups, c_out, false, device),
            conv2: conv3x3(c_out, c_out, device),
            skip: (c_in != c_out).then(|| conv1x1(c_in, c_out, device)),
        }
    }

    /// x: [B, C_in, H, W], cond_act: SiLU(cond) [B, E] → [B, C_out, H, W]
    pub fn forward(&self, x: Tensor<4>, cond_act: Tensor<2>) -> Tensor<4> {
        let h = conv2d(&self.conv1, fused::group_norm(&self.norm1, x.clone(), true));
        let [b, c, _, _] = h.dims();
        // [B, 2C, 1, 1]
        let ss = self.film.forward(cond_act).reshape([b, 2 * c, 1, 1]);
        let scale = ss.clone().slice_dim(1, 0..c);
        let shift = ss.slice_dim(1, c..2 * c);
        let h = fused::group_norm_film_silu(&self.norm2, h, scale, shift);
        let h = conv2d(&self.conv2, h);
        let x = match &self.skip {
            Some(skip) => conv2d(skip, x),
            None => x,
        };
        x + h
    }
}

/// Text-conditioned attention block with two modes:
///
/// * **joint** (`self_attn = true`): image tokens (queries) attend over the concatenation
///   `[image tokens ; text tokens]` in one softmax — self-attention and cross-attention
///   sharing one softmax (MMDiT-style joint attention, one-directional: text tokens are keys/
///   values only and are not updated here).
/// * **cross** (`self_attn = false`): image tokens attend over text tokens only (much cheaper
///   at high resolution; used at 16×16 by default).
///
/// Pad text tokens are always masked out; for the null (all-pad) prompt the cross-only block
/// therefore outputs exactly zero (rows with every key masked yield zero context).
#[derive(Module, Debug)]
pub struct AttnBlock {
    pub norm: GroupNorm,
    /// image tokens [B, HW, C] → q (cross) or q, k, v (joint): [B, HW, C or 3C]
    pub qkv: Linear,
    /// text tokens [B, L, D] → k, v [B, L, 2C]
    pub text_kv: Linear,
    /// zero-initialised output projection
    pub proj: Linear,
    pub heads: usize,
    pub self_attn: bool,
}

impl AttnBlock {
    pub fn new(
        channels: usize,
        text_dim: usize,
        head_dim: usize,
        groups: usize,
        self_attn: bool,
        device: &Device,
    ) -> Self {
        let heads = (channels / head_dim.max(1)).max(1);
        assert!(
            channels.is_multiple_of(heads),
            "attention channels {channels} not divisible by heads {heads}"
        );
        let q_width = if self_attn { 3 * channels } else { channels };
        Self {
            norm: group_norm(groups, channels, true, device),
            qkv: linear(channels, q_width, device),
            text_kv: linear(text_dim, 2 * channels, device),
            proj: linear(channels, channels, device),
            heads,
            self_attn,
        }
    }

    /// x: [B, C, H, W], text: [B, L, D], key_bias: [B, 1, 1, L] → [B, C, H, W]
    pub fn forward(&self, x: Tensor<4>, text: Tensor<3>, key_bias: Tensor<4>) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let n = h * w;
        let [_, l, _] = text.dims();
        let heads = self.heads;
        let dh = c / heads;
        // [B, HW, C]
        let tokens = fused::group_norm(&self.norm, x.clone(), false)
            .reshape([b, c, n])
            .swap_dims(1, 2);
        // [B, heads, 2, L, dh]
        let kv_txt = self
            .text_kv
            .forward(text)
            .reshape([b, l, 2, heads, dh])
            .permute([0, 3, 2, 1, 4]);
        let k_txt = kv_txt.clone().slice_dim(2, 0..1).reshape([b, heads, l, dh]);
        let v_txt = kv_txt.slice_dim(2, 1..2).reshape([b, heads, l, dh]);
        let ctx = if self.self_attn {
            // [B, heads, 3, HW, dh] after the permute
            let qkv = self
                .qkv
                .forward(tokens)
                .reshape([b, n, 3, heads, dh])
                .permute([0, 3, 2, 1, 4]);
            let q = qkv.clone().slice_dim(2, 0..1).reshape([b, heads, n, dh]);
            let k_img = qkv.clone().slice_dim(2, 1..2).reshape([b, heads, n, dh]);
            let v_img = qkv.slice_dim(2, 2..3).reshape([b, heads, n, dh]);
            // [B, heads, HW + L, dh]
            let k = Tensor::cat(vec![k_img, k_txt], 2);
            let v = Tensor::cat(vec![v_img, v_txt], 2);
            // Image keys are never masked. [B, 1, 1, HW + L]
            let bias = Tensor::cat(
                vec![Tensor::zeros([b, 1, 1, n], &key_bias.device()), key_bias],
                3,
            );
            attend(q, k, v, bias)
        } else {
            // [B, heads, HW, dh]
            let q = self
                .qkv
                .forward(tokens)
                .reshape([b, n, heads, dh])
                .swap_dims(1, 2);
            // Zero the context of fully masked rows (null prompt): multiply by "any key kept".
            // [B, 1, 1, 1]
            let any = key_bias.clone().equal_elem(0.0).float().max_dim(3);
            attend(q, k_txt, v_txt, key_bias) * any
        };
        if !fused::on_libtorch(&x) || self.proj.is_adapted() {
            // [B, HW, C]
            let out = self.proj.forward(merge_heads(ctx));
            return x + out.swap_dims(1, 2).reshape([b, c, h, w]);
        }
        // On libtorch the output projection runs channel-major, [C, C] @ [B, C, HW], so that its
        // result is contiguous NCHW. (Projecting [B, HW, C] and transposing back gives a
        // channels-last view; burn-tch computes the residual sum in place in it, and every
        // following GroupNorm and convolution then takes libtorch's channels-last kernels,
        // slower here than the NCHW ones. flex keeps the row-major projection and the composed
        // down/upsampling below: there the libtorch variants measured ~5% slower in the
        // update, BENCHMARKS.md "Session 6".)
        // [B, C, HW]
        let ctx = ctx.permute([0, 1, 3, 2]).reshape([b, c, n]);
        // [1, C_out, C_in]
        let weight = self.proj.weight.val().transpose().unsqueeze::<3>();
        let mut out = weight.matmul(ctx);
        if let Some(bias) = &self.proj.bias {
            out = out + bias.val().reshape([1, c, 1]);
        }
        x + out.reshape([b, c, h, w])
    }
}

/// 2×2 average pooling. On libtorch one `avg_pool2d` kernel (and its own backward); on flex a
/// reshape and two means (see `AttnBlock::forward` on why). [B, C, H, W] → [B, C, H/2, W/2]
pub fn downsample(x: Tensor<4>) -> Tensor<4> {
    if fused::on_libtorch(&x) {
        return avg_pool2d(x, AvgPoolOptions::new([2, 2]));
    }
    let [b, c, h, w] = x.dims();
    x.reshape([b, c, h / 2, 2, w / 2, 2])
        .mean_dim(5)
        .mean_dim(3)
        .reshape([b, c, h / 2, w / 2])
}

/// Nearest-neighbour 2× upsampling. On libtorch one `interpolate` kernel (and its own backward);
/// on flex a broadcast. [B, C, H, W] → [B, C, 2H, 2W]
pub fn upsample(x: Tensor<4>) -> Tensor<4> {
    let [b, c, h, w] = x.dims();
    if fused::on_libtorch(&x) {
        let nearest = InterpolateOptions::new(InterpolateMode::Nearest);
        return interpolate(x, nearest.with_output_size([2 * h, 2 * w]));
    }
    x.reshape([b, c, h, 1, w, 1])
        .expand([b, c, h, 2, w, 2])
        .reshape([b, c, 2 * h, 2 * w])
}

crate::impl_linears!(TextLayer {
    qkv,
    proj,
    fc1,
    fc2
});
crate::impl_linears!(TextEncoder { layers });
crate::impl_linears!(ResBlock { film });
crate::impl_linears!(AttnBlock { qkv, text_kv, proj });
