//! The decoder's blocks, each named as in diffusers so that burn's parameter paths are the
//! state-dict keys: [`VaeGroupNorm`] (`torch.nn.GroupNorm`), [`ResnetBlock2D`],
//! [`VaeAttention`] (the mid block's single-head self-attention), [`Upsample2D`],
//! [`UNetMidBlock2D`] and [`UpDecoderBlock2D`].
//!
//! Every norm uses ε = 1e-6 and every activation is SiLU, as in diffusers' VAE decoder. No
//! dropout (inference only).

use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{GroupNorm, Initializer, Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::module::attention;
use burn::tensor::{Device, Tensor};

use crate::model::fused;

/// ε of every GroupNorm in diffusers' VAE decoder.
pub const NORM_EPS: f64 = 1e-6;

/// 3×3 convolution, padding 1 (weights zero: the loader overwrites them).
pub fn conv3x3(c_in: usize, c_out: usize, device: &Device) -> Conv2d {
    Conv2dConfig::new([c_in, c_out], [3, 3])
        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
        .with_initializer(Initializer::Zeros)
        .init(device)
}

/// 1×1 convolution (weights zero).
pub fn conv1x1(c_in: usize, c_out: usize, device: &Device) -> Conv2d {
    Conv2dConfig::new([c_in, c_out], [1, 1])
        .with_initializer(Initializer::Zeros)
        .init(device)
}

/// Linear layer (weights zero). burn stores the weight `[in, out]`, torch `[out, in]`.
fn linear(c_in: usize, c_out: usize, device: &Device) -> Linear {
    LinearConfig::new(c_in, c_out)
        .with_initializer(Initializer::Zeros)
        .init(device)
}

/// `torch.nn.GroupNorm(num_groups, C, eps, affine=True)` with torch's parameter names
/// (`weight`, `bias`; burn's own `GroupNorm` calls them `gamma`, `beta`).
#[derive(Module, Debug)]
pub struct VaeGroupNorm {
    /// [C]
    pub weight: Param<Tensor<1>>,
    /// [C]
    pub bias: Param<Tensor<1>>,
    pub num_groups: usize,
}

impl VaeGroupNorm {
    pub fn new(num_groups: usize, channels: usize, device: &Device) -> Self {
        Self {
            weight: Param::from_tensor(Tensor::ones([channels], device)),
            bias: Param::from_tensor(Tensor::zeros([channels], device)),
            num_groups,
        }
    }

    /// `gn(x)`, then SiLU when `silu` (libtorch's fused kernels on libtorch, see
    /// [`fused::group_norm`]).
    ///
    /// x: [batch, channels, h, w] → [batch, channels, h, w]
    pub fn forward(&self, x: Tensor<4>, silu: bool) -> Tensor<4> {
        let gn = GroupNorm {
            gamma: Some(self.weight.clone()),
            beta: Some(self.bias.clone()),
            num_groups: self.num_groups,
            num_channels: x.dims()[1],
            epsilon: NORM_EPS,
            affine: true,
        };
        fused::group_norm(&gn, x, silu)
    }
}

/// diffusers' `ResnetBlock2D` without a time embedding:
/// `shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))))))`, the shortcut a 1×1 conv when
/// the channel count changes.
#[derive(Module, Debug)]
pub struct ResnetBlock2D {
    pub norm1: VaeGroupNorm,
    pub conv1: Conv2d,
    pub norm2: VaeGroupNorm,
    pub conv2: Conv2d,
    pub conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock2D {
    pub fn new(c_in: usize, c_out: usize, groups: usize, device: &Device) -> Self {
        Self {
            norm1: VaeGroupNorm::new(groups, c_in, device),
            conv1: conv3x3(c_in, c_out, device),
            norm2: VaeGroupNorm::new(groups, c_out, device),
            conv2: conv3x3(c_out, c_out, device),
            conv_shortcut: (c_in != c_out).then(|| conv1x1(c_in, c_out, device)),
        }
    }

    /// x: [batch, c_in, h, w] → [batch, c_out, h, w]
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let h = fused::conv2d(&self.conv1, self.norm1.forward(x.clone(), true));
        let h = fused::conv2d(&self.conv2, self.norm2.forward(h, true));
        let skip = match &self.conv_shortcut {
            Some(conv) => fused::conv2d(conv, x),
            None => x,
        };
        skip + h
    }
}

/// The VAE mid block's attention (diffusers `Attention` with one head of width C, a
/// GroupNorm before q/k/v, a residual connection and output scale 1):
/// `x + to_out(softmax(q kᵀ / √C) v)` over the h·w pixels, q, k, v = to_{q,k,v}(gn(x)).
#[derive(Module, Debug)]
pub struct VaeAttention {
    pub group_norm: VaeGroupNorm,
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    /// diffusers' `to_out` is `[Linear, Dropout]`: only `to_out.0` has weights.
    pub to_out: Vec<Linear>,
}

impl VaeAttention {
    pub fn new(channels: usize, groups: usize, device: &Device) -> Self {
        Self {
            group_norm: VaeGroupNorm::new(groups, channels, device),
            to_q: linear(channels, channels, device),
            to_k: linear(channels, channels, device),
            to_v: linear(channels, channels, device),
            to_out: vec![linear(channels, channels, device)],
        }
    }

    /// x: [batch, channels, h, w] → [batch, channels, h, w]
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        // [batch, h·w, channels]
        let tokens = self
            .group_norm
            .forward(x.clone(), false)
            .reshape([b, c, h * w])
            .swap_dims(1, 2);
        // [batch, 1 head, h·w, channels]
        let head = |l: &Linear| l.forward(tokens.clone()).reshape([b, 1, h * w, c]);
        let (q, k, v) = (head(&self.to_q), head(&self.to_k), head(&self.to_v));
        // [batch, h·w, channels]
        let ctx = attention(q, k, v, None, None, Default::default()).reshape([b, h * w, c]);
        let out = self.to_out[0].forward(ctx);
        // [batch, channels, h, w]
        out.swap_dims(1, 2).reshape([b, c, h, w]) + x
    }
}

/// diffusers' `Upsample2D(use_conv=True)`: nearest-neighbour 2× then a 3×3 conv.
#[derive(Module, Debug)]
pub struct Upsample2D {
    pub conv: Conv2d,
}

impl Upsample2D {
    pub fn new(channels: usize, device: &Device) -> Self {
        Self {
            conv: conv3x3(channels, channels, device),
        }
    }

    /// x: [batch, channels, h, w] → [batch, channels, 2h, 2w]
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        // Each pixel repeated 2×2 (exactly torch's `interpolate(scale_factor=2, "nearest")`).
        let up = x
            .reshape([b, c, h, 1, w, 1])
            .expand([b, c, h, 2, w, 2])
            .reshape([b, c, 2 * h, 2 * w]);
        fused::conv2d(&self.conv, up)
    }
}

/// diffusers' `UNetMidBlock2D` (one layer): `resnets.0` → `attentions.0` (when
/// `mid_block_add_attention`) → `resnets.1`.
#[derive(Module, Debug)]
pub struct UNetMidBlock2D {
    pub resnets: Vec<ResnetBlock2D>,
    /// Empty without mid-block attention.
    pub attentions: Vec<VaeAttention>,
}

impl UNetMidBlock2D {
    pub fn new(channels: usize, groups: usize, attention: bool, device: &Device) -> Self {
        Self {
            resnets: (0..2)
                .map(|_| ResnetBlock2D::new(channels, channels, groups, device))
                .collect(),
            attentions: if attention {
                vec![VaeAttention::new(channels, groups, device)]
            } else {
                Vec::new()
            },
        }
    }

    /// x: [batch, channels, h, w] → [batch, channels, h, w]
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let mut h = self.resnets[0].forward(x);
        for (i, resnet) in self.resnets.iter().enumerate().skip(1) {
            if let Some(attn) = self.attentions.get(i - 1) {
                h = attn.forward(h);
            }
            h = resnet.forward(h);
        }
        h
    }
}

/// diffusers' `UpDecoderBlock2D`: `layers` residual blocks (the first one c_in → c_out), then
/// `upsamplers.0` unless it is the last (highest-resolution) block.
#[derive(Module, Debug)]
pub struct UpDecoderBlock2D {
    pub resnets: Vec<ResnetBlock2D>,
    /// One [`Upsample2D`], or empty for the last block.
    pub upsamplers: Vec<Upsample2D>,
}

impl UpDecoderBlock2D {
    pub fn new(
        c_in: usize,
        c_out: usize,
        layers: usize,
        groups: usize,
        upsample: bool,
        device: &Device,
    ) -> Self {
        Self {
            resnets: (0..layers)
                .map(|i| {
                    ResnetBlock2D::new(if i == 0 { c_in } else { c_out }, c_out, groups, device)
                })
                .collect(),
            upsamplers: if upsample {
                vec![Upsample2D::new(c_out, device)]
            } else {
                Vec::new()
            },
        }
    }

    /// x: [batch, c_in, h, w] → [batch, c_out, 2h, 2w] (or [batch, c_out, h, w], last block)
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let mut h = x;
        for resnet in &self.resnets {
            h = resnet.forward(h);
        }
        for up in &self.upsamplers {
            h = up.forward(h);
        }
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tensor_from_vec;

    fn dev() -> Device {
        Device::flex()
    }

    #[test]
    fn should_upsample_each_pixel_to_a_2x2_block() {
        let mut up = Upsample2D::new(1, &dev());
        // A 1×1 identity "conv" is not 3×3: check the nearest-neighbour step directly through
        // a conv whose only non-zero tap is the centre.
        let mut w = vec![0.0; 9];
        w[4] = 1.0;
        up.conv.weight = Param::from_tensor(tensor_from_vec(w, [1, 1, 3, 3], &dev()));
        let x = tensor_from_vec(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [1, 1, 2, 3], &dev());
        let y = crate::types::to_vec(&up.forward(x)).unwrap();
        #[rustfmt::skip]
        let want = vec![
            1.0, 1.0, 2.0, 2.0, 3.0, 3.0,
            1.0, 1.0, 2.0, 2.0, 3.0, 3.0,
            4.0, 4.0, 5.0, 5.0, 6.0, 6.0,
            4.0, 4.0, 5.0, 5.0, 6.0, 6.0,
        ];
        assert_eq!(y, want);
    }

    #[test]
    fn should_normalise_over_groups_of_channels_with_torch_names() {
        // Two groups of two channels: each group has its own mean and variance.
        let gn = VaeGroupNorm::new(2, 4, &dev());
        let x: Vec<f32> = vec![0.0, 2.0, 4.0, 6.0, 10.0, 10.0, 30.0, 30.0];
        let y = crate::types::to_vec(&gn.forward(tensor_from_vec(x, [1, 4, 1, 2], &dev()), false))
            .unwrap();
        // Group 0: mean 3, var 5; group 1: mean 20, var 100.
        let want = [-3.0, -1.0, 1.0, 3.0].map(|v: f32| v / 5f32.sqrt());
        for (a, b) in y[..4].iter().zip(want) {
            assert!((a - b).abs() < 1e-5, "{y:?}");
        }
        for (a, b) in y[4..].iter().zip([-1.0, -1.0, 1.0, 1.0]) {
            assert!((a - b).abs() < 1e-5, "{y:?}");
        }
        let names: Vec<String> = crate::model::checkpoint::collect_params(&gn, "")
            .into_iter()
            .map(|t| t.name)
            .collect();
        assert_eq!(names, ["weight", "bias"]);
    }

    #[test]
    fn should_add_a_shortcut_conv_only_when_the_width_changes() {
        let d = dev();
        assert!(ResnetBlock2D::new(8, 8, 4, &d).conv_shortcut.is_none());
        assert!(ResnetBlock2D::new(8, 16, 4, &d).conv_shortcut.is_some());
        let block = UpDecoderBlock2D::new(16, 8, 3, 4, true, &d);
        assert_eq!(block.resnets.len(), 3);
        let y = block.forward(Tensor::zeros([2, 16, 3, 5], &d));
        assert_eq!(y.dims(), [2, 8, 6, 10]);
        let attn = VaeAttention::new(8, 4, &d);
        assert_eq!(
            attn.forward(Tensor::ones([1, 8, 2, 3], &d)).dims(),
            [1, 8, 2, 3]
        );
    }
}
