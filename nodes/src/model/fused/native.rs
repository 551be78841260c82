//! The libtorch path of [`super`]: a burn backend extension whose ops run libtorch's own
//! kernels and differentiate through libtorch's autograd (`vjp.cpp`).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::libtorch::TchTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, DispatchDevice, LibTorch, backend_extension};
use burn::tensor::Tensor;

/// Whether the libtorch path applies to `x`: enabled, and `x` lives on libtorch (CPU or
/// CUDA), with or without autodiff.
pub(super) fn applies<const D: usize>(x: &Tensor<D>) -> bool {
    super::native_ops_enabled()
        && matches!(
            x.device().inner().as_dispatch(),
            DispatchDevice::LibTorch(_)
        )
}

pub(super) fn conv2d(
    x: Tensor<4>,
    weight: Tensor<4>,
    bias: Tensor<1>,
    padding: usize,
) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as NativeOps>::native_conv2d(
        x.into_dispatch(),
        weight.into_dispatch(),
        bias.into_dispatch(),
        padding,
    ))
}

pub(super) fn group_norm(
    x: Tensor<4>,
    gamma: Tensor<1>,
    beta: Tensor<1>,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as NativeOps>::native_group_norm(
        x.into_dispatch(),
        gamma.into_dispatch(),
        beta.into_dispatch(),
        groups,
        eps,
        silu,
    ))
}

pub(super) fn group_norm_film(
    x: Tensor<4>,
    gamma: Tensor<1>,
    beta: Tensor<1>,
    scale: Tensor<4>,
    shift: Tensor<4>,
    groups: usize,
    eps: f64,
) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as NativeOps>::native_group_norm_film(
        x.into_dispatch(),
        gamma.into_dispatch(),
        beta.into_dispatch(),
        scale.into_dispatch(),
        shift.into_dispatch(),
        groups,
        eps,
    ))
}

pub(super) fn layer_norm<const D: usize>(x: Tensor<D>, eps: f64) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as NativeOps>::native_layer_norm(
        x.into_dispatch(),
        eps,
    ))
}

pub(super) fn gelu_tanh<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as NativeOps>::native_gelu_tanh(x.into_dispatch()))
}

pub(super) fn attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, bias: Tensor<4>) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as NativeOps>::native_attention(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        bias.into_dispatch(),
    ))
}

/// Ops that run in libtorch and differentiate through libtorch's own autograd.
#[backend_extension(LibTorch, Autodiff)]
pub trait NativeOps: Backend {
    /// x: [B, Cin, H, W], weight: [Cout, Cin, k, k], bias: [Cout] → [B, Cout, H', W']
    fn native_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        padding: usize,
    ) -> FloatTensor<Self>;

    /// x: [B, C, H, W], gamma, beta: [C] → [B, C, H, W]
    fn native_group_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        groups: usize,
        eps: f64,
        silu: bool,
    ) -> FloatTensor<Self>;

    /// silu(group_norm(x) · (1 + scale) + shift). x: [B, C, H, W], gamma, beta: [C],
    /// scale, shift: [B, C, 1, 1] → [B, C, H, W]
    fn native_group_norm_film(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        shift: FloatTensor<Self>,
        groups: usize,
        eps: f64,
    ) -> FloatTensor<Self>;

    /// q: [B, H, Lq, dh], k/v: [B, H, Lk, dh], bias: [B, 1, 1, Lk] → [B, H, Lq, dh]
    fn native_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        bias: FloatTensor<Self>,
    ) -> FloatTensor<Self>;

    /// LayerNorm over the last axis, no affine parameters. x: [..., D] → [..., D]
    fn native_layer_norm(x: FloatTensor<Self>, eps: f64) -> FloatTensor<Self>;

    /// GELU, tanh approximation. Any shape.
    fn native_gelu_tanh(x: FloatTensor<Self>) -> FloatTensor<Self>;
}

fn conv_forward([x, weight, bias]: [&tch::Tensor; 3], padding: usize) -> tch::Tensor {
    let p = padding as i64;
    x.conv2d(weight, Some(bias), [1, 1], [p, p], [1, 1], 1)
}

fn norm_forward(
    [x, gamma, beta]: [&tch::Tensor; 3],
    groups: usize,
    eps: f64,
    silu: bool,
) -> tch::Tensor {
    let y = x.group_norm(groups as i64, Some(gamma), Some(beta), eps, false);
    if silu { y.silu() } else { y }
}

fn film_forward(
    [x, gamma, beta, scale, shift]: [&tch::Tensor; 5],
    groups: usize,
    eps: f64,
) -> tch::Tensor {
    let y = x.group_norm(groups as i64, Some(gamma), Some(beta), eps, false);
    (y * (scale + 1.0) + shift).silu()
}

fn layer_norm_forward([x]: [&tch::Tensor; 1], eps: f64) -> tch::Tensor {
    let d = *x.size().last().expect("a tensor with a last axis");
    x.layer_norm([d], None::<&tch::Tensor>, None::<&tch::Tensor>, eps, false)
}

fn gelu_tanh_forward([x]: [&tch::Tensor; 1]) -> tch::Tensor {
    x.gelu("tanh")
}

fn attention_forward([q, k, v, bias]: [&tch::Tensor; 4]) -> tch::Tensor {
    // Scale 1/√dh (the default); the bias broadcasts over heads and queries.
    tch::Tensor::scaled_dot_product_attention(q, k, v, Some(bias), 0.0, false, None, false)
}

impl NativeOps for LibTorch {
    fn native_conv2d(x: TchTensor, w: TchTensor, b: TchTensor, padding: usize) -> TchTensor {
        TchTensor::new(conv_forward([&x.tensor, &w.tensor, &b.tensor], padding))
    }

    fn native_group_norm(
        x: TchTensor,
        gamma: TchTensor,
        beta: TchTensor,
        groups: usize,
        eps: f64,
        silu: bool,
    ) -> TchTensor {
        let t = [&x.tensor, &gamma.tensor, &beta.tensor];
        TchTensor::new(norm_forward(t, groups, eps, silu))
    }

    fn native_group_norm_film(
        x: TchTensor,
        gamma: TchTensor,
        beta: TchTensor,
        scale: TchTensor,
        shift: TchTensor,
        groups: usize,
        eps: f64,
    ) -> TchTensor {
        let t = [
            &x.tensor,
            &gamma.tensor,
            &beta.tensor,
            &scale.tensor,
            &shift.tensor,
        ];
        TchTensor::new(film_forward(t, groups, eps))
    }

    fn native_attention(q: TchTensor, k: TchTensor, v: TchTensor, bias: TchTensor) -> TchTensor {
        TchTensor::new(attention_forward([
            &q.tensor,
            &k.tensor,
            &v.tensor,
            &bias.tensor,
        ]))
    }

    fn native_layer_norm(x: TchTensor, eps: f64) -> TchTensor {
        TchTensor::new(layer_norm_forward([&x.tensor], eps))
    }

    fn native_gelu_tanh(x: TchTensor) -> TchTensor {
        TchTensor::new(gelu_tanh_forward([&x.tensor]))
    }
}

impl<C: CheckpointStrategy> NativeOps for Autodiff<LibTorch, C> {
    fn native_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        padding: usize,
    ) -> FloatTensor<Self> {
        record::<C, 3>([x, weight, bias], |t| conv_forward(t, padding))
    }

    fn native_group_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        groups: usize,
        eps: f64,
        silu: bool,
    ) -> FloatTensor<Self> {
        record::<C, 3>([x, gamma, beta], |t| norm_forward(t, groups, eps, silu))
    }

    fn native_group_norm_film(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        shift: FloatTensor<Self>,
        groups: usize,
        eps: f64,
    ) -> FloatTensor<Self> {
        record::<C, 5>([x, gamma, beta, scale, shift], |t| {
            film_forward(t, groups, eps)
        })
    }

    fn native_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        bias: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        record::<C, 4>([q, k, v, bias], attention_forward)
    }

    fn native_layer_norm(x: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        record::<C, 1>([x], |t| layer_norm_forward(t, eps))
    }

    fn native_gelu_tanh(x: FloatTensor<Self>) -> FloatTensor<Self> {
        record::<C, 1>([x], gelu_tanh_forward)
    }
}

/// The output with libtorch's graph, and the libtorch leaf of each input (only tracked
/// inputs, those with a parent node, are asked for a gradient).
type Recording<const N: usize> = (TchTensor, [TchTensor; N]);

/// Backward of an op of `N` inputs recorded by [`record`]: one libtorch vector-Jacobian
/// product.
#[derive(Debug)]
struct Recorded<const N: usize>;

impl<const N: usize> Backward<LibTorch, N> for Recorded<N> {
    type State = Recording<N>;

    fn backward(
        self,
        ops: Ops<Self::State, N>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let grad = grads.consume::<LibTorch>(&ops.node);
        let (graph, leaves) = ops.state;
        let wanted: Vec<_> = ops
            .parents
            .into_iter()
            .zip(leaves)
            .filter_map(|(node, leaf)| Some((node?, leaf)))
            .collect();
        let inputs: Vec<&tch::Tensor> = wanted.iter().map(|(_, leaf)| &leaf.tensor).collect();
        // The vector-Jacobian product with g through libtorch's graph (`vjp.cpp`).
        let g = vjp(&graph.tensor, &grad.tensor, &inputs);
        for ((node, _), g) in wanted.iter().zip(g) {
            grads.register::<LibTorch>(node.id, TchTensor::new(g));
        }
    }
}

unsafe extern "C" {
    /// `vjp.cpp`: torch::autograd::grad({output}, inputs, {grad_output}); null or the error.
    fn flowrun_vjp(
        output: *const torch_sys::C_tensor,
        grad_output: *const torch_sys::C_tensor,
        inputs: *const *const torch_sys::C_tensor,
        n: std::os::raw::c_int,
        results: *mut *mut torch_sys::C_tensor,
    ) -> *const std::os::raw::c_char;
}

/// Gradients of `y` seeded with `g` (same shape) with respect to `inputs`, through
/// libtorch's graph of `y`, which it frees. (tch's `run_backward` only seeds with ones.)
fn vjp(y: &tch::Tensor, g: &tch::Tensor, inputs: &[&tch::Tensor]) -> Vec<tch::Tensor> {
    let ptrs: Vec<*const torch_sys::C_tensor> = inputs.iter().map(|t| t.as_ptr()).collect();
    let mut out: Vec<*mut torch_sys::C_tensor> = vec![std::ptr::null_mut(); inputs.len()];
    // SAFETY: every pointer is a live tch tensor for the duration of the call; the shim
    // only reads them and writes `inputs.len()` new heap tensors (or null) into `out`,
    // whose ownership tch's `from_ptr` takes.
    let err = unsafe {
        flowrun_vjp(
            y.as_ptr(),
            g.as_ptr(),
            ptrs.as_ptr(),
            inputs.len() as std::os::raw::c_int,
            out.as_mut_ptr(),
        )
    };
    if !err.is_null() {
        // SAFETY: a NUL-terminated string owned by the shim's thread-local buffer.
        let msg = unsafe { std::ffi::CStr::from_ptr(err) }.to_string_lossy();
        panic!("libtorch backward of a recorded op failed: {msg}");
    }
    out.into_iter()
        .zip(inputs)
        .map(|(p, x)| {
            if p.is_null() {
                x.zeros_like()
            } else {
                // SAFETY: a tensor the shim allocated for us.
                unsafe { tch::Tensor::from_ptr(p) }
            }
        })
        .collect()
}

/// Runs `op` in libtorch on the `N` inputs; when any is tracked, records libtorch's graph
/// of it (inputs as leaves sharing burn's storage, and burn's storage count, so burn-tch
/// never writes in place into a tensor the graph still reads) for [`Recorded`].
fn record<C: CheckpointStrategy, const N: usize>(
    inputs: [FloatTensor<Autodiff<LibTorch, C>>; N],
    op: impl FnOnce([&tch::Tensor; N]) -> tch::Tensor,
) -> FloatTensor<Autodiff<LibTorch, C>> {
    let tracked = inputs.each_ref().map(|t| t.is_tracked());
    let nodes = inputs.each_ref().map(|t| t.node());
    match Recorded::<N>.prepare::<C>(nodes).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let leaves: [TchTensor; N] = std::array::from_fn(|i| {
                let t = inputs[i].primitive();
                let leaf = t.tensor.detach().set_requires_grad(tracked[i]);
                TchTensor::from_existing(leaf, t.storage.clone())
            });
            // Grad mode is thread-local in libtorch: record whatever this thread's is.
            let y = tch::with_grad(|| op(leaves.each_ref().map(|l| &l.tensor)));
            let out = TchTensor::new(y.detach());
            let graph = TchTensor::from_existing(y, out.storage.clone());
            // Every leaf is kept, tracked or not: the graph may read any input in its
            // backward (a convolution's weight gradient reads its untracked input), and the
            // storage count each holds is what keeps burn-tch from writing into it.
            prep.finish((graph, leaves), out)
        }
        OpsKind::UnTracked(prep) => {
            let prims = inputs.map(|t| t.into_primitive());
            prep.finish(TchTensor::new(op(prims.each_ref().map(|p| &p.tensor))))
        }
    }
}
