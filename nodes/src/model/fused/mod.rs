//! Convolution, GroupNorm (+ FiLM, SiLU) and attention with fused kernels and their own backward
//! passes: libtorch's on libtorch, ours (in Rust) on flex.
//!
//! burn 0.22 differentiates `conv2d` generically: the input gradient is a transposed
//! convolution and the weight gradient is a convolution whose "kernel" is the whole output
//! gradient (batch and channels swapped). libtorch (burn-tch) does not override those two
//! methods, so under autodiff a 3×3 convolution at 32×32 costs about twice what PyTorch's own
//! `convolution_backward` (oneDNN) does; and burn composes GroupNorm and SiLU from a dozen
//! primitive ops, about 2.5× PyTorch's fused kernels, also without autodiff (BENCHMARKS.md,
//! "Session 3" and "Session 4"); differentiable attention is matmul + softmax + matmul, where
//! PyTorch has one `scaled_dot_product_attention` kernel and its backward.
//!
//! [`conv2d`], [`group_norm`], [`group_norm_film_silu`] and [`attention`] therefore go through a burn *backend extension*
//! on libtorch ([`native`]): without autodiff they simply call libtorch's kernel; under autodiff the forward
//! runs the op in libtorch with its inputs as fresh libtorch leaves (sharing burn's storage) and
//! records libtorch's own autograd graph of that one op, and burn's backward then asks libtorch
//! for the vector-Jacobian product through that graph (`vjp.cpp`: `torch::autograd::grad`
//! seeded with burn's output gradient; oneDNN `convolution_backward`,
//! `native_group_norm_backward`, `silu_backward`, the attention kernel's own backward).
//!
//! On flex, [`conv2d`], [`group_norm`] and [`group_norm_film_silu`] go through a second extension
//! ([`flex`]) whose kernels are ours, in Rust ([`kernels`]): the convolution is im2col + GEMM
//! forward and backward (burn's generic backward is a transposed convolution plus a convolution
//! with the whole output gradient as its kernel), and GroupNorm with its FiLM and SiLU is one
//! pass forward and one backward instead of a dozen differentiated ops.
//! [`layer_norm`] on flex is that GroupNorm kernel with one group per row. [`attention`] under
//! autodiff on flex is one kernel forward (the probabilities kept) and one
//! backward. Everywhere else they are exactly `Conv2d::forward`,
//! `GroupNorm::forward` (+ burn's `silu`) and burn's `attention` / matmul + softmax.
//!
//! `FLOWRUN_FUSED_OPS=0` in the environment turns both paths off (for A/B timing).

use std::sync::OnceLock;

use burn::nn::conv::Conv2d;
use burn::nn::{GroupNorm, PaddingConfig2d};
use burn::tensor::Tensor;

/// Whether the libtorch and flex paths are enabled (`FLOWRUN_FUSED_OPS` unset or not `0`).
pub fn native_ops_enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("FLOWRUN_FUSED_OPS").map_or(true, |v| v.trim() != "0"))
}

/// The symmetric padding of a stride-1, dilation-1, ungrouped convolution (`None` otherwise).
fn plain_padding(conv: &Conv2d) -> Option<usize> {
    if conv.stride != [1, 1] || conv.dilation != [1, 1] || conv.groups != 1 {
        return None;
    }
    match conv.padding {
        PaddingConfig2d::Valid => Some(0),
        PaddingConfig2d::Explicit(t, l, b, r) if t == l && t == b && t == r => Some(t),
        _ => None,
    }
}

/// `conv.forward(x)`, with libtorch's own backward on a libtorch autodiff device (see the module
/// docs). Convolutions other than stride 1, dilation 1, one group, symmetric padding and a bias
/// always take `conv.forward`.
///
/// x: [B, Cin, H, W] → [B, Cout, H', W']
pub fn conv2d(conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    #[cfg(feature = "tch")]
    if let (Some(bias), Some(padding)) = (&conv.bias, plain_padding(conv))
        && native::applies(&x)
    {
        return native::conv2d(x, conv.weight.val(), bias.val(), padding);
    }
    if let (Some(bias), Some(padding)) = (&conv.bias, plain_padding(conv))
        && flex::applies(&x)
        && all_f32(&[conv.weight.val().dtype(), bias.val().dtype()])
    {
        return flex::conv2d(x, conv.weight.val(), bias.val(), padding);
    }
    conv.forward(x)
}

/// `silu(gn(x))` (or `gn(x)` when `silu` is false), with libtorch's fused `group_norm`/`silu`
/// kernels and their backward on a libtorch autodiff device (see the module docs).
///
/// x: [B, C, H, W] → [B, C, H, W]
pub fn group_norm(gn: &GroupNorm, x: Tensor<4>, silu: bool) -> Tensor<4> {
    #[cfg(feature = "tch")]
    if native::applies(&x) {
        let (gamma, beta) = affine(gn, &x);
        return native::group_norm(x, gamma, beta, gn.num_groups, gn.epsilon, silu);
    }
    if flex::applies(&x) {
        let (gamma, beta) = affine(gn, &x);
        if all_f32(&[gamma.dtype(), beta.dtype()]) {
            return flex::group_norm(x, gamma, beta, gn.num_groups, gn.epsilon, silu);
        }
    }
    let y = gn.forward(x);
    if silu {
        burn::tensor::activation::silu(y)
    } else {
        y
    }
}

/// Whether `x` takes the libtorch path of this module: `FLOWRUN_FUSED_OPS` not `0`, and `x` on
/// libtorch (CPU or CUDA). Always false in a build without the `tch` feature.
pub fn on_libtorch<const D: usize>(x: &Tensor<D>) -> bool {
    #[cfg(feature = "tch")]
    {
        native::applies(x)
    }
    #[cfg(not(feature = "tch"))]
    {
        let _ = x;
        false
    }
}

/// Whether every other input of a flex kernel is f32 too (its kernels are f32 only; `x`'s dtype
/// is checked by `flex::applies`).
fn all_f32(dtypes: &[burn::tensor::DType]) -> bool {
    dtypes.iter().all(|&d| d == burn::tensor::DType::F32)
}

/// Which fused kernels [`conv2d`] and the GroupNorms take for `x`: `Some("libtorch")`,
/// `Some("flex")`, or `None` where they are burn's own compositions.
pub fn kernels_for<const D: usize>(x: &Tensor<D>) -> Option<&'static str> {
    if on_libtorch(x) {
        Some("libtorch")
    } else if flex::applies(x) {
        Some("flex")
    } else {
        None
    }
}

/// `silu(gn(x) · (1 + scale) + shift)`: the GroupNorm, FiLM modulation and SiLU of a residual
/// block, as one libtorch graph (its kernels and their backward) on libtorch and as one fused
/// kernel (forward and backward) on flex.
///
/// x: [B, C, H, W], scale/shift: [B, C, 1, 1] → [B, C, H, W]
pub fn group_norm_film_silu(
    gn: &GroupNorm,
    x: Tensor<4>,
    scale: Tensor<4>,
    shift: Tensor<4>,
) -> Tensor<4> {
    #[cfg(feature = "tch")]
    if native::applies(&x) {
        let (gamma, beta) = affine(gn, &x);
        return native::group_norm_film(x, gamma, beta, scale, shift, gn.num_groups, gn.epsilon);
    }
    let [b, c, _, _] = x.dims();
    if flex::applies(&x) && scale.dims() == [b, c, 1, 1] && shift.dims() == [b, c, 1, 1] {
        let (gamma, beta) = affine(gn, &x);
        if all_f32(&[gamma.dtype(), beta.dtype(), scale.dtype(), shift.dtype()]) {
            return flex::group_norm_film(x, gamma, beta, scale, shift, gn.num_groups, gn.epsilon);
        }
    }
    burn::tensor::activation::silu(gn.forward(x) * scale.add_scalar(1.0) + shift)
}

/// A GroupNorm's gamma and beta; a non-affine GroupNorm is the affine one with constant
/// (untracked) gamma = 1, beta = 0.
fn affine(gn: &GroupNorm, x: &Tensor<4>) -> (Tensor<1>, Tensor<1>) {
    match (&gn.gamma, &gn.beta) {
        (Some(g), Some(b)) => (g.val(), b.val()),
        _ => {
            let c = gn.num_channels;
            (
                Tensor::ones([c], &x.device()),
                Tensor::zeros([c], &x.device()),
            )
        }
    }
}

/// `softmax(q kᵀ / √dh + bias) v` with libtorch's `scaled_dot_product_attention` (and its
/// backward) on libtorch, and with flowrun's kernel and its backward on flex under autodiff;
/// `None` elsewhere (flex without autodiff has burn's own fused attention), where the caller
/// uses burn's ops.
///
/// q: [B, H, Lq, dh], k/v: [B, H, Lk, dh], bias: [B, 1, 1, Lk] (broadcast over heads and
/// queries; never differentiated) → [B, H, Lq, dh]
pub fn attention(
    q: &Tensor<4>,
    k: &Tensor<4>,
    v: &Tensor<4>,
    bias: &Tensor<4>,
) -> Option<Tensor<4>> {
    #[cfg(feature = "tch")]
    if native::applies(q) {
        return Some(native::attention(
            q.clone(),
            k.clone(),
            v.clone(),
            bias.clone(),
        ));
    }
    let [b, _, _, _] = q.dims();
    let [_, _, lk, _] = k.dims();
    if flex::applies(q)
        && q.is_autodiff()
        && bias.dims() == [b, 1, 1, lk]
        && all_f32(&[k.dtype(), v.dtype(), bias.dtype()])
    {
        return Some(flex::attention(
            q.clone(),
            k.clone(),
            v.clone(),
            bias.clone(),
        ));
    }
    None
}

/// LayerNorm over the last axis without affine parameters (the SD3 blocks' norms) with
/// libtorch's `layer_norm` kernel and its backward on libtorch, and on flex as flowrun's
/// GroupNorm kernel with one group over each row ([N, 1, D, 1], γ = 1, β = 0); `None`
/// elsewhere, where the caller composes it from burn's ops.
///
/// x: [..., D] → [..., D]
pub fn layer_norm<const D: usize>(x: &Tensor<D>, eps: f64) -> Option<Tensor<D>> {
    #[cfg(feature = "tch")]
    if native::applies(x) {
        return Some(native::layer_norm(x.clone(), eps));
    }
    if flex::applies(x) {
        let dims = x.dims();
        let d = dims[D - 1];
        let rows = x.shape().num_elements() / d.max(1);
        let dev = x.device();
        let (gamma, beta) = (Tensor::ones([1], &dev), Tensor::zeros([1], &dev));
        let x4 = x.clone().reshape([rows, 1, d, 1]);
        return Some(flex::group_norm(x4, gamma, beta, 1, eps, false).reshape(dims));
    }
    None
}

/// GELU with the tanh approximation (diffusers' `GELU(approximate="tanh")`): libtorch's
/// kernel and its backward on libtorch, burn's `gelu_approximate` (seven elementwise ops,
/// each differentiated on its own) elsewhere.
///
/// x: any shape → same shape
pub fn gelu_tanh<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    #[cfg(feature = "tch")]
    if native::applies(&x) {
        return native::gelu_tanh(x);
    }
    burn::tensor::activation::gelu_approximate(x)
}

mod flex;
mod kernels;
#[cfg(feature = "tch")]
#[allow(deprecated)] // burn marks burn-tch deprecated; it is our libtorch path
mod native;
