//! Input embeddings of the SD3 transformer: latent patches with the 2-D sin-cos position
//! embedding (diffusers' `PatchEmbed`), and the conditioning vector from the timestep and the
//! pooled prompt embedding (`CombinedTimestepTextProjEmbeddings`).
//!
//! Shape letters: `B` batch, `C` latent channels, `H`/`W` latent size, `p` patch size,
//! `h = H/p`, `w = W/p`, `N = h·w` image tokens, `D` inner width.

use burn::module::{Module, Param};
use burn::nn::Initializer;
use burn::nn::conv::{Conv2d, Conv2dConfig};

use crate::model::lora::Linear;
use burn::tensor::activation::silu;
use burn::tensor::{Device, FloatDType, Tensor, TensorData};

use super::config::TIME_PROJ_DIM;
use crate::model::layers::linear;

/// The 2-D sin-cos position embedding of a `grid_h × grid_w` grid, row-major `[grid_h·grid_w, dim]`,
/// computed as diffusers' `get_2d_sincos_pos_embed(dim, (grid_h, grid_w), base_size)` does:
/// positions `i / (grid / base_size)` in f32, the sines and cosines in f64, rounded to f32. The
/// first `dim/2` channels encode the column, the last `dim/2` the row; each half is
/// `[sin(pos·ω_k), cos(pos·ω_k)]` with `ω_k = 10000^(−k/(dim/4))`, `k < dim/4`.
///
/// `dim` must be divisible by 4 ([`Sd3Config::validate`](super::Sd3Config::validate)).
pub fn sincos_pos_embed(dim: usize, grid_h: usize, grid_w: usize, base_size: usize) -> Vec<f32> {
    let quarter = dim / 4;
    // ω_k, as diffusers: arange(D/4) / (D/4) in f64, then 1 / 10000^that.
    let omega: Vec<f64> = (0..quarter)
        .map(|k| 1.0 / 10000f64.powf(k as f64 / quarter as f64))
        .collect();
    // Grid coordinates in f32: arange(n) / (n / base_size).
    let coords = |n: usize| -> Vec<f32> {
        let step = (n as f64 / base_size as f64) as f32;
        (0..n).map(|i| i as f32 / step).collect()
    };
    let (rows, cols) = (coords(grid_h), coords(grid_w));
    let mut out = Vec::with_capacity(grid_h * grid_w * dim);
    let half = |pos: f32, out: &mut Vec<f32>| {
        let pos = pos as f64;
        out.extend(omega.iter().map(|w| (pos * w).sin() as f32));
        out.extend(omega.iter().map(|w| (pos * w).cos() as f32));
    };
    for &r in &rows {
        for &c in &cols {
            half(c, &mut out);
            half(r, &mut out);
        }
    }
    out
}

/// Latent → patch tokens, plus the (centre-cropped) sin-cos position embedding.
#[derive(Module, Debug)]
pub struct PatchEmbed {
    /// A `p × p`, stride-`p` convolution `C → D` (applied as one matmul over patches).
    /// weight: [D, C, p, p], bias: [D]
    pub proj: Conv2d,
    /// diffusers' persistent buffer (in the state dict when `pos_embed_max_size` is set): the
    /// sin-cos grid of `pos_embed_max_size²` positions. Never trained (`require_grad` false).
    /// [1, M·M, D]
    pub pos_embed: Option<Param<Tensor<3>>>,
    pub patch_size: usize,
    /// `pos_embed_max_size` (`M`), or `None`: the grid is then computed for each latent size.
    pub pos_embed_max_size: Option<usize>,
    /// `sample_size / patch_size`.
    pub base_size: usize,
}

impl PatchEmbed {
    /// With `pos_embed = None` when `pos_embed_max_size` is set, the caller must set the grid
    /// (see [`PatchEmbed::grid_param`]).
    pub fn new(
        in_channels: usize,
        dim: usize,
        patch_size: usize,
        pos_embed_max_size: Option<usize>,
        base_size: usize,
        pos_embed: Option<Param<Tensor<3>>>,
        device: &Device,
    ) -> Self {
        let proj = Conv2dConfig::new([in_channels, dim], [patch_size, patch_size])
            .with_stride([patch_size, patch_size])
            .with_initializer(Initializer::Zeros)
            .init(device);
        Self {
            proj,
            pos_embed,
            patch_size,
            pos_embed_max_size,
            base_size,
        }
    }

    /// The `[1, M·M, D]` sin-cos grid as an untrained parameter.
    pub fn grid_param(
        dim: usize,
        max_size: usize,
        base_size: usize,
        device: &Device,
    ) -> Param<Tensor<3>> {
        let values = sincos_pos_embed(dim, max_size, max_size, base_size);
        let t = Tensor::from_data(
            TensorData::new(values, [1, max_size * max_size, dim]),
            device,
        );
        Param::from_tensor(t).set_require_grad(false)
    }

    /// The position embedding of an `h × w`-patch latent: the centre crop of the stored grid
    /// (`top = (M − h) / 2`, `left = (M − w) / 2`, floor, as diffusers), or without
    /// `pos_embed_max_size` the grid computed for `h × w`. → [1, h·w, D]
    pub fn pos_embed_for(&self, h: usize, w: usize, dim: usize, device: &Device) -> Tensor<3> {
        match (&self.pos_embed, self.pos_embed_max_size) {
            (Some(grid), Some(m)) => {
                let top = (m - h) / 2;
                let left = (m - w) / 2;
                grid.val()
                    .reshape([m, m, dim])
                    .slice([top..top + h, left..left + w])
                    .reshape([1, h * w, dim])
            }
            _ => {
                let values = sincos_pos_embed(dim, h, w, self.base_size);
                let dtype = self.proj.weight.val().dtype();
                Tensor::<3>::from_data(TensorData::new(values, [1, h * w, dim]), device).cast(dtype)
            }
        }
    }

    /// x: [B, C, H, W] (H, W multiples of p, checked by the caller) → tokens [B, N, D]
    pub fn forward(&self, x: Tensor<4>) -> Tensor<3> {
        let [b, c, hh, ww] = x.dims();
        let device = x.device();
        let p = self.patch_size;
        let (h, w) = (hh / p, ww / p);
        let weight = self.proj.weight.val();
        let [dim, _, _, _] = weight.dims();
        // [B·N, C·p·p], each patch flattened in the conv weight's (c, ky, kx) order.
        let patches = x
            .reshape([b, c, h, p, w, p])
            .permute([0, 2, 4, 1, 3, 5])
            .reshape([b * h * w, c * p * p]);
        // [C·p·p, D]
        let weight = weight.reshape([dim, c * p * p]).transpose();
        let mut tokens = patches.matmul(weight);
        if let Some(bias) = &self.proj.bias {
            tokens = tokens + bias.val().reshape([1, dim]);
        }
        let tokens = tokens.reshape([b, h * w, dim]);
        tokens + self.pos_embed_for(h, w, dim, &device)
    }
}

/// diffusers' `get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=0)`:
/// `[cos(t·f_i), sin(t·f_i)]`, `f_i = exp(−ln(10000)·i/128)`, in f32 as diffusers computes it.
/// timestep: [B] (σ·1000) → [B, 256]
pub fn timestep_proj(timestep: Tensor<1>) -> Tensor<2> {
    let [b] = timestep.dims();
    let half = TIME_PROJ_DIM / 2;
    let neg_ln = -(10000f64.ln() as f32);
    let freqs: Vec<f32> = (0..half)
        .map(|i| ((neg_ln * i as f32 / half as f32) as f64).exp() as f32)
        .collect();
    // [1, 128]
    let freqs = Tensor::<1>::from_floats(freqs.as_slice(), &timestep.device()).reshape([1, half]);
    // [B, 128]
    let args = timestep.reshape([b, 1]) * freqs;
    Tensor::cat(vec![args.clone().cos(), args.sin()], 1)
}

/// Two linears with a SiLU between (diffusers' `TimestepEmbedding` and
/// `PixArtAlphaTextProjection(act_fn="silu")` share this form).
#[derive(Module, Debug)]
pub struct Mlp {
    pub linear_1: Linear,
    pub linear_2: Linear,
}

impl Mlp {
    pub fn new(d_in: usize, dim: usize, device: &Device) -> Self {
        Self {
            linear_1: linear(d_in, dim, device),
            linear_2: linear(dim, dim, device),
        }
    }

    /// x: [B, d_in] → [B, D]
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.linear_2.forward(silu(self.linear_1.forward(x)))
    }
}

/// The conditioning vector `temb = MLP_t(timestep_proj(σ·1000)) + MLP_text(pooled)`.
#[derive(Module, Debug)]
pub struct CombinedTimestepTextProjEmbeddings {
    /// 256 → D → D
    pub timestep_embedder: Mlp,
    /// pooled_projection_dim → D → D
    pub text_embedder: Mlp,
}

impl CombinedTimestepTextProjEmbeddings {
    pub fn new(dim: usize, pooled_projection_dim: usize, device: &Device) -> Self {
        Self {
            timestep_embedder: Mlp::new(TIME_PROJ_DIM, dim, device),
            text_embedder: Mlp::new(pooled_projection_dim, dim, device),
        }
    }

    /// timestep: [B] (σ·1000), pooled: [B, pooled_projection_dim] → temb [B, D], in the
    /// weights' dtype (the sin/cos features are computed from `timestep` in f32, then cast).
    pub fn forward(&self, timestep: Tensor<1>, pooled: Tensor<2>) -> Tensor<2> {
        let dtype = self.timestep_embedder.linear_1.dtype();
        let features = timestep_proj(timestep.cast(FloatDType::F32)).cast(dtype);
        self.timestep_embedder.forward(features) + self.text_embedder.forward(pooled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::checkpoint::tensor_values;

    #[test]
    fn should_encode_column_then_row_in_the_sincos_grid() {
        // dim 8: ω = [1, 1/100]; grid 2×3, base 2: rows at i/(2/2) = i, cols at j/(3/2).
        let g = sincos_pos_embed(8, 2, 3, 2);
        assert_eq!(g.len(), 6 * 8);
        // Token (row 1, col 2) = index 5: column position 2/1.5, row position 1.
        let col = 2.0f32 / 1.5f32;
        let t = &g[5 * 8..6 * 8];
        let expect = [
            (col as f64).sin(),
            (col as f64 / 100.0).sin(),
            (col as f64).cos(),
            (col as f64 / 100.0).cos(),
            1f64.sin(),
            0.01f64.sin(),
            1f64.cos(),
            0.01f64.cos(),
        ];
        for (a, b) in t.iter().zip(expect) {
            assert!((*a as f64 - b).abs() < 1e-6, "{t:?}");
        }
    }

    #[test]
    fn should_centre_crop_the_grid() {
        let dev = Device::flex();
        let (dim, m) = (4, 5);
        let grid = PatchEmbed::grid_param(dim, m, 3, &dev);
        let full = sincos_pos_embed(dim, m, m, 3);
        let pe = PatchEmbed::new(1, dim, 1, Some(m), 3, Some(grid), &dev);
        // 2×3 patches: top = (5−2)/2 = 1, left = (5−3)/2 = 1.
        let crop = tensor_values(pe.pos_embed_for(2, 3, dim, &dev));
        let mut expect = Vec::new();
        for r in 1..3 {
            for c in 1..4 {
                expect.extend_from_slice(&full[(r * m + c) * dim..(r * m + c + 1) * dim]);
            }
        }
        assert_eq!(crop, expect);
    }

    #[test]
    fn should_put_cos_first_in_the_timestep_features() {
        let dev = Device::flex();
        let t = Tensor::<1>::from_floats([0.0f32, 500.0], &dev);
        let e = tensor_values(timestep_proj(t));
        assert_eq!(e.len(), 2 * 256);
        // t = 0: cos = 1, sin = 0.
        assert!(e[..128].iter().all(|&v| v == 1.0));
        assert!(e[128..256].iter().all(|&v| v == 0.0));
        // t = 500, i = 0 (f = 1): [cos 500, …, sin 500, …].
        assert!((e[256] - 500f32.cos()).abs() < 1e-5);
        assert!((e[384] - 500f32.sin()).abs() < 1e-5);
    }
}

crate::impl_linears!(Mlp { linear_1, linear_2 });
crate::impl_linears!(CombinedTimestepTextProjEmbeddings {
    timestep_embedder,
    text_embedder
});
