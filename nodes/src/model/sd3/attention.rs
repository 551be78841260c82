//! Joint attention of the MMDiT block (diffusers' `Attention` with `JointAttnProcessor2_0`).
//!
//! Image tokens and text tokens are projected with their own weights (`to_q/k/v` and
//! `add_q/k/v_proj`), optionally RMS-normalised per head (`qk_norm = "rms_norm"`), and attend
//! together in one softmax over the joint sequence `[image ; text]`; the result is split back
//! and projected out with `to_out.0` (image) and `to_add_out` (text). The SD3.5 `attn2` is the
//! same layer without the text half (image self-attention).
//!
//! Shape letters: `B` batch, `N` image tokens, `L` text tokens, `D` inner width,
//! `heads × dh = D`.

use crate::model::lora::Linear;
use burn::module::{Module, Param};
use burn::tensor::activation::softmax;
use burn::tensor::{Device, FloatDType, Tensor};

use super::config::QkNorm;
use crate::model::fused;
use crate::model::layers::linear;

/// Epsilon of every norm of the SD3 transformer.
pub const EPS: f64 = 1e-6;

/// `x · rsqrt(mean(x²) + eps) · weight` over the last axis (diffusers' `RMSNorm`), computed in
/// f32 whatever `x`'s dtype (the result cast back to it).
#[derive(Module, Debug)]
pub struct RmsNorm {
    /// [dh], ones at init.
    pub weight: Param<Tensor<1>>,
}

impl RmsNorm {
    pub fn new(dim: usize, device: &Device) -> Self {
        Self {
            weight: Param::from_tensor(Tensor::ones([dim], device)),
        }
    }

    /// x: [..., dh] → [..., dh]
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let dtype = x.dtype();
        let x = x.cast(FloatDType::F32);
        let rms = x.clone().square().mean_dim(D - 1).add_scalar(EPS).sqrt();
        let [dim] = self.weight.dims();
        let mut shape = [1; D];
        shape[D - 1] = dim;
        let weight = self.weight.val().cast(FloatDType::F32).reshape(shape);
        (x / rms * weight).cast(dtype)
    }
}

/// One attention layer: the image projections, and for the joint attention the text ones.
#[derive(Module, Debug)]
pub struct Attention {
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    pub norm_q: Option<RmsNorm>,
    pub norm_k: Option<RmsNorm>,
    /// Text projections (joint attention only).
    pub add_q_proj: Option<Linear>,
    pub add_k_proj: Option<Linear>,
    pub add_v_proj: Option<Linear>,
    pub norm_added_q: Option<RmsNorm>,
    pub norm_added_k: Option<RmsNorm>,
    /// diffusers' `to_out` is `[Linear, Dropout]`; only `to_out.0` has weights.
    pub to_out: Vec<Linear>,
    /// Text output projection; absent in the last block (`context_pre_only`), whose text
    /// attention output is discarded.
    pub to_add_out: Option<Linear>,
    pub heads: usize,
}

impl Attention {
    /// `joint`: with the text projections; `context_out`: with `to_add_out`.
    pub fn new(
        dim: usize,
        heads: usize,
        qk_norm: QkNorm,
        joint: bool,
        context_out: bool,
        device: &Device,
    ) -> Self {
        let dh = dim / heads;
        let norm = || (qk_norm == QkNorm::RmsNorm).then(|| RmsNorm::new(dh, device));
        let proj = || joint.then(|| linear(dim, dim, device));
        Self {
            to_q: linear(dim, dim, device),
            to_k: linear(dim, dim, device),
            to_v: linear(dim, dim, device),
            norm_q: norm(),
            norm_k: norm(),
            add_q_proj: proj(),
            add_k_proj: proj(),
            add_v_proj: proj(),
            norm_added_q: if joint { norm() } else { None },
            norm_added_k: if joint { norm() } else { None },
            to_out: vec![linear(dim, dim, device)],
            to_add_out: (joint && context_out).then(|| linear(dim, dim, device)),
            heads,
        }
    }

    /// [B, T, D] → [B, heads, T, dh]
    fn split_heads(&self, x: Tensor<3>) -> Tensor<4> {
        let [b, t, d] = x.dims();
        x.reshape([b, t, self.heads, d / self.heads])
            .swap_dims(1, 2)
    }

    fn project(&self, proj: &Linear, norm: &Option<RmsNorm>, x: Tensor<3>) -> Tensor<4> {
        let y = self.split_heads(proj.forward(x));
        match norm {
            Some(n) => n.forward(y),
            None => y,
        }
    }

    /// Image self-attention (`attn2`). x: [B, N, D] → [B, N, D]
    pub fn forward_self(&self, x: Tensor<3>) -> Tensor<3> {
        let q = self.project(&self.to_q, &self.norm_q, x.clone());
        let k = self.project(&self.to_k, &self.norm_k, x.clone());
        let v = self.project(&self.to_v, &None, x);
        self.to_out[0].forward(merge_heads(sdpa(q, k, v)))
    }

    /// Joint attention. x: [B, N, D], context: [B, L, D] → (image [B, N, D], text [B, L, D] or
    /// `None` without `to_add_out`, where the text queries are not computed at all).
    pub fn forward_joint(
        &self,
        x: Tensor<3>,
        context: Tensor<3>,
    ) -> (Tensor<3>, Option<Tensor<3>>) {
        let (Some(add_q), Some(add_k), Some(add_v)) =
            (&self.add_q_proj, &self.add_k_proj, &self.add_v_proj)
        else {
            // Built by `new(joint = false)`: no text half.
            return (self.forward_self(x), None);
        };
        let [_, n, _] = x.dims();
        let [_, l, _] = context.dims();
        // [B, heads, N + L, dh]: image keys first, as diffusers concatenates.
        let k = Tensor::cat(
            vec![
                self.project(&self.to_k, &self.norm_k, x.clone()),
                self.project(add_k, &self.norm_added_k, context.clone()),
            ],
            2,
        );
        let v = Tensor::cat(
            vec![
                self.project(&self.to_v, &None, x.clone()),
                self.project(add_v, &None, context.clone()),
            ],
            2,
        );
        let q_img = self.project(&self.to_q, &self.norm_q, x);
        match &self.to_add_out {
            Some(to_add_out) => {
                let q_txt = self.project(add_q, &self.norm_added_q, context);
                // [B, N + L, D]
                let out = merge_heads(sdpa(Tensor::cat(vec![q_img, q_txt], 2), k, v));
                let img = out.clone().slice_dim(1, 0..n);
                let txt = out.slice_dim(1, n..n + l);
                (self.to_out[0].forward(img), Some(to_add_out.forward(txt)))
            }
            // The last block: text rows of the attention are discarded, so only the image
            // queries attend (the same image rows as the full joint attention).
            None => (self.to_out[0].forward(merge_heads(sdpa(q_img, k, v))), None),
        }
    }
}

/// [B, heads, T, dh] → [B, T, heads·dh]
fn merge_heads(x: Tensor<4>) -> Tensor<3> {
    let [b, h, t, dh] = x.dims();
    x.swap_dims(1, 2).reshape([b, t, h * dh])
}

/// `softmax(q kᵀ / √dh) v`, unmasked: libtorch's fused kernel on libtorch, burn's attention
/// kernel without autodiff, matmul + softmax (differentiable; the softmax in f32) with
/// autodiff.
///
/// q: [B, heads, Tq, dh], k/v: [B, heads, Tk, dh] → [B, heads, Tq, dh]
pub fn sdpa(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Tensor<4> {
    let [b, _, _, dh] = q.dims();
    let [_, _, tk, _] = k.dims();
    if fused::on_libtorch(&q) {
        let bias = Tensor::<4>::zeros([b, 1, 1, tk], &q.device()).cast(q.dtype());
        if let Some(y) = fused::attention(&q, &k, &v, &bias) {
            return y;
        }
    }
    if q.is_autodiff() {
        let scale = 1.0 / (dh as f64).sqrt();
        // [B, heads, Tq, Tk]
        let scores = q.mul_scalar(scale).matmul(k.swap_dims(2, 3));
        let dtype = scores.dtype();
        return softmax(scores.cast(FloatDType::F32), 3)
            .cast(dtype)
            .matmul(v);
    }
    burn::tensor::module::attention(q, k, v, None, None, Default::default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::checkpoint::tensor_values;
    use crate::model::tensor_from_vec;

    #[test]
    fn should_rms_normalise_the_last_axis() {
        let dev = Device::flex();
        let norm = RmsNorm::new(2, &dev);
        let x = tensor_from_vec(vec![3.0, 4.0, 0.0, 0.0], [2, 2], &dev);
        let y = tensor_values(norm.forward(x));
        // rms(3, 4) = √12.5
        let r = (12.5f32 + 1e-6).sqrt();
        assert!(
            (y[0] - 3.0 / r).abs() < 1e-6 && (y[1] - 4.0 / r).abs() < 1e-6,
            "{y:?}"
        );
        assert_eq!(&y[2..], &[0.0, 0.0]);
    }

    #[test]
    fn should_agree_with_and_without_autodiff() {
        let dev = Device::flex();
        let vals = |n: usize, s: f32| (0..n).map(|i| ((i as f32) * s).sin()).collect::<Vec<_>>();
        let q = tensor_from_vec(vals(2 * 3 * 5 * 4, 0.37), [2, 3, 5, 4], &dev);
        let k = tensor_from_vec(vals(2 * 3 * 7 * 4, 0.53), [2, 3, 7, 4], &dev);
        let v = tensor_from_vec(vals(2 * 3 * 7 * 4, 0.71), [2, 3, 7, 4], &dev);
        let plain = tensor_values(sdpa(q.clone(), k.clone(), v.clone()));
        let ad = dev.autodiff();
        let moved = |t: Tensor<4>| Tensor::<4>::from_data(t.into_data(), &ad);
        let tracked = tensor_values(sdpa(moved(q), moved(k), moved(v)));
        for (a, b) in plain.iter().zip(&tracked) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }
}

crate::impl_linears!(Attention {
    to_q,
    to_k,
    to_v,
    add_q_proj,
    add_k_proj,
    add_v_proj,
    to_out,
    to_add_out
});
