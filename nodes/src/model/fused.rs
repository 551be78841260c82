//! Convolution and GroupNorm (+ SiLU) with the backend's own backward passes.
//!
//! burn 0.22 differentiates `conv2d` generically: the input gradient is a transposed
//! convolution and the weight gradient is a convolution whose "kernel" is the whole output
//! gradient (batch and channels swapped). libtorch (burn-tch) does not override those two
//! methods, so under autodiff a 3×3 convolution at 32×32 costs about twice what PyTorch's own
//! `convolution_backward` (oneDNN) does (BENCHMARKS.md, "Session 3").
//!
//! This module is a burn *backend extension* ([`FusedConv`]): one operation, `conv2d`, whose
//! autodiff implementation asks the inner backend for a "tape" at forward time and for both
//! gradients at backward time.
//! * On libtorch the tape is libtorch's own autograd graph of that one convolution (input and
//!   weight as fresh leaves that share storage with burn's tensors), and the backward runs
//!   libtorch's native convolution backward on it.
//! * On every other backend the tape is empty and the backward is burn's generic one, so
//!   results are identical to `burn::nn::conv::Conv2d::forward`.
//!
//! [`group_norm`] does the same for a GroupNorm optionally followed by SiLU, which burn
//! composes from a dozen primitive ops: on libtorch under autodiff it runs libtorch's
//! `group_norm` and `silu` (and their native backward) in one recorded graph; elsewhere it is
//! `GroupNorm::forward` + burn's `silu`.
//!
//! `FLOWRUN_FUSED_OPS=0` in the environment turns the libtorch paths off (for A/B timing).

// burn marks burn-tch (our libtorch path) deprecated; the extension macro names it.
#![allow(deprecated)]

use std::sync::OnceLock;

use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::ops::ConvOptions;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Flex, backend_extension};
use burn::nn::conv::Conv2d;
use burn::nn::{GroupNorm, PaddingConfig2d};
use burn::tensor::Tensor;

/// Whether the libtorch-native backward is enabled (`FLOWRUN_FUSED_OPS` unset or not `0`).
pub fn native_ops_enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("FLOWRUN_FUSED_OPS").map_or(true, |v| v.trim() != "0"))
}

fn options(padding: usize) -> ConvOptions<2> {
    ConvOptions::new([1, 1], [padding, padding], [1, 1], 1)
}

/// A stride-1, dilation-1, ungrouped 2-D convolution whose backward pass the backend may
/// implement natively (see the module docs).
#[backend_extension(Flex, LibTorch: cfg(feature = "tch"), Autodiff)]
pub trait FusedConv: Backend {
    /// `conv2d(x, weight) + bias`, symmetric zero padding.
    ///
    /// x: [B, Cin, H, W], weight: [Cout, Cin, k, k], bias: [Cout] → [B, Cout, H', W']
    fn fused_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        padding: usize,
    ) -> FloatTensor<Self> {
        generic_forward::<Self>(x, weight, bias, padding)
    }
}

/// What a backend keeps from a training forward for its own backward (libtorch: the output
/// with its autograd graph, and the input and weight leaves); `None` on other backends.
pub type Tape<B> = Option<(FloatTensor<B>, FloatTensor<B>, FloatTensor<B>)>;

/// What [`FusedConv`]'s autodiff implementation asks of the inner backend. Not dispatched:
/// only called on the concrete backend inside the autodiff graph.
pub trait ConvTape: Backend {
    /// Forward for training: the output and whatever the backend wants back in
    /// [`ConvTape::fused_conv2d_backward`] (`None`: nothing, use the generic backward).
    fn fused_conv2d_taped(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        padding: usize,
        grad_x: bool,
    ) -> (FloatTensor<Self>, Tape<Self>) {
        let _ = grad_x;
        (generic_forward::<Self>(x, weight, bias, padding), None)
    }

    /// Gradients with respect to the input (when `grad_x`) and the weight, given the output
    /// gradient `grad` [B, Cout, H', W'].
    fn fused_conv2d_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        tape: Tape<Self>,
        grad: FloatTensor<Self>,
        padding: usize,
        grad_x: bool,
    ) -> (Option<FloatTensor<Self>>, FloatTensor<Self>) {
        let _ = tape;
        generic_backward::<Self>(x, weight, grad, padding, grad_x)
    }
}

/// burn's convolution forward.
fn generic_forward<B: Backend>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    bias: FloatTensor<B>,
    padding: usize,
) -> FloatTensor<B> {
    B::conv2d(x, weight, Some(bias), options(padding))
}

/// burn's generic convolution backward: (input gradient when `grad_x`, weight gradient).
fn generic_backward<B: Backend>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    grad: FloatTensor<B>,
    padding: usize,
    grad_x: bool,
) -> (Option<FloatTensor<B>>, FloatTensor<B>) {
    let gx = grad_x
        .then(|| B::conv2d_x_backward(x.clone(), weight.clone(), grad.clone(), options(padding)));
    (
        gx,
        B::conv2d_weight_backward(x, weight, grad, options(padding)),
    )
}

impl FusedConv for Flex {}
impl ConvTape for Flex {}

/// A libtorch leaf sharing `t`'s storage (and burn's storage count, so that burn-tch never
/// writes in place into a tensor libtorch's graph still reads).
#[cfg(feature = "tch")]
fn libtorch_leaf(
    t: &burn::backend::libtorch::TchTensor,
    requires_grad: bool,
) -> burn::backend::libtorch::TchTensor {
    let l = t.tensor.detach().set_requires_grad(requires_grad);
    burn::backend::libtorch::TchTensor::from_existing(l, t.storage.clone())
}

/// Vector-Jacobian product through a recorded libtorch graph: the gradients of Σ(y ⊙ g) with
/// respect to `inputs` (leaves of `graph`), in their order.
#[cfg(feature = "tch")]
fn libtorch_vjp(
    graph: &burn::backend::libtorch::TchTensor,
    grad: &burn::backend::libtorch::TchTensor,
    inputs: &[&tch::Tensor],
) -> Vec<burn::backend::libtorch::TchTensor> {
    let objective = (&graph.tensor * &grad.tensor).sum(None);
    tch::Tensor::run_backward(&[objective], inputs, false, false)
        .into_iter()
        .map(burn::backend::libtorch::TchTensor::new)
        .collect()
}

#[cfg(feature = "tch")]
mod libtorch {
    use burn::backend::LibTorch;
    use burn::backend::libtorch::TchTensor;

    use super::{ConvTape, FusedConv, Tape};

    use super::libtorch_leaf as leaf;

    impl FusedConv for LibTorch {}

    impl ConvTape for LibTorch {
        fn fused_conv2d_taped(
            x: TchTensor,
            weight: TchTensor,
            bias: TchTensor,
            padding: usize,
            grad_x: bool,
        ) -> (TchTensor, Tape<LibTorch>) {
            if !super::native_ops_enabled() {
                return (
                    super::generic_forward::<LibTorch>(x, weight, bias, padding),
                    None,
                );
            }
            let xl = leaf(&x, grad_x);
            let wl = leaf(&weight, true);
            let p = padding as i64;
            // Grad mode is thread-local in libtorch: record the graph whatever this thread's is.
            let y = tch::with_grad(|| {
                tch::Tensor::conv2d(
                    &xl.tensor,
                    &wl.tensor,
                    Some(bias.tensor.detach()),
                    [1, 1],
                    [p, p],
                    [1, 1],
                    1,
                )
            });
            let out = TchTensor::new(y.detach());
            let graph = TchTensor::from_existing(y, out.storage.clone());
            (out, Some((graph, xl, wl)))
        }

        fn fused_conv2d_backward(
            x: TchTensor,
            weight: TchTensor,
            tape: Tape<LibTorch>,
            grad: TchTensor,
            padding: usize,
            grad_x: bool,
        ) -> (Option<TchTensor>, TchTensor) {
            let Some((graph, xl, wl)) = tape else {
                return super::generic_backward::<LibTorch>(x, weight, grad, padding, grad_x);
            };
            let inputs: Vec<&tch::Tensor> = if grad_x {
                vec![&xl.tensor, &wl.tensor]
            } else {
                vec![&wl.tensor]
            };
            let mut grads = super::libtorch_vjp(&graph, &grad, &inputs);
            let gw = grads.pop().expect("one gradient per input");
            (grads.pop(), gw)
        }
    }
}

/// Saved for the backward: x, weight, bias node ids, the backend's tape, padding, grad_x.
type ConvState<B> = (NodeId, NodeId, NodeId, Tape<B>, usize, bool);

#[derive(Debug)]
struct ConvBackward;

impl<B: Backend + ConvTape> Backward<B, 3> for ConvBackward {
    type State = ConvState<B>;

    fn backward(
        self,
        ops: Ops<Self::State, 3>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let [node_x, node_weight, node_bias] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (x_id, weight_id, bias_id, tape, padding, grad_x) = ops.state;
        let x = checkpointer.retrieve_node_output::<FloatTensor<B>>(x_id);
        let weight = checkpointer.retrieve_node_output::<FloatTensor<B>>(weight_id);
        if let Some(node) = node_bias {
            let bias = checkpointer.retrieve_node_output::<FloatTensor<B>>(bias_id);
            let g = B::conv2d_bias_backward(x.clone(), bias, grad.clone());
            grads.register::<B>(node.id, g);
        }
        let grad_x = grad_x && node_x.is_some();
        let (gx, gw) = B::fused_conv2d_backward(x, weight, tape, grad, padding, grad_x);
        if let (Some(node), Some(gx)) = (node_x, gx) {
            grads.register::<B>(node.id, gx);
        }
        if let Some(node) = node_weight {
            grads.register::<B>(node.id, gw);
        }
    }
}

impl<B: Backend + FusedConv + ConvTape, C: CheckpointStrategy> FusedConv for Autodiff<B, C> {
    fn fused_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        padding: usize,
    ) -> FloatTensor<Self> {
        let grad_x = x.is_tracked();
        match ConvBackward
            .prepare::<C>([x.node(), weight.node(), bias.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let x_id = prep.checkpoint(&x);
                let weight_id = prep.checkpoint(&weight);
                let bias_id = prep.checkpoint(&bias);
                let (out, tape) = B::fused_conv2d_taped(
                    x.into_primitive(),
                    weight.into_primitive(),
                    bias.into_primitive(),
                    padding,
                    grad_x,
                );
                prep.finish((x_id, weight_id, bias_id, tape, padding, grad_x), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::fused_conv2d(
                x.into_primitive(),
                weight.into_primitive(),
                bias.into_primitive(),
                padding,
            )),
        }
    }
}

/// `conv.forward(x)` through [`FusedConv`]: same result, libtorch-native backward.
///
/// Convolutions other than stride 1, dilation 1, one group, symmetric padding and a bias fall
/// back to `conv.forward`.
pub fn conv2d(conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    let padding = match conv.padding {
        PaddingConfig2d::Valid => Some(0),
        PaddingConfig2d::Explicit(t, l, b, r) if t == l && t == b && t == r => Some(t),
        _ => None,
    };
    let plain = conv.stride == [1, 1] && conv.dilation == [1, 1] && conv.groups == 1;
    let (Some(bias), Some(padding), true) = (&conv.bias, padding, plain) else {
        return conv.forward(x);
    };
    let out = <burn::backend::Dispatch as FusedConv>::fused_conv2d(
        x.into_dispatch(),
        conv.weight.val().into_dispatch(),
        bias.val().into_dispatch(),
        padding,
    );
    Tensor::from_dispatch(out)
}

/// `silu(gn(x))` (or `gn(x)` when `silu` is false). On a libtorch autodiff device
/// libtorch's fused `group_norm`/`silu` kernels and their backward run instead of
/// burn's composition of primitive ops (about 3× faster at 32 channels × 32×32); anywhere else
/// this is exactly `gn.forward(x)` followed by burn's `silu`.
///
/// x: [B, C, H, W] → [B, C, H, W]
pub fn group_norm(gn: &GroupNorm, x: Tensor<4>, silu: bool) -> Tensor<4> {
    #[cfg(feature = "tch")]
    if native_ops_enabled() && norm::is_libtorch_autodiff(&x.device()) {
        // A non-affine GroupNorm is the affine one with constant gamma = 1, beta = 0.
        let (gamma, beta) = match (&gn.gamma, &gn.beta) {
            (Some(g), Some(b)) => (g.val(), b.val()),
            _ => {
                let c = gn.num_channels;
                (
                    Tensor::ones([c], &x.device()),
                    Tensor::zeros([c], &x.device()),
                )
            }
        };
        let out = <burn::backend::Dispatch as norm::FusedNorm>::fused_group_norm(
            x.into_dispatch(),
            gamma.into_dispatch(),
            beta.into_dispatch(),
            gn.num_groups,
            gn.epsilon,
            silu,
        );
        return Tensor::from_dispatch(out);
    }
    let y = gn.forward(x);
    if silu {
        burn::tensor::activation::silu(y)
    } else {
        y
    }
}

#[cfg(feature = "tch")]
mod norm {
    use burn::backend::autodiff::checkpoint::base::Checkpointer;
    use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
    use burn::backend::autodiff::grads::Gradients;
    use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
    use burn::backend::libtorch::TchTensor;
    use burn::backend::tensor::FloatTensor;
    use burn::backend::{Autodiff, Backend, LibTorch, backend_extension};
    use burn::tensor::Device;

    /// Whether `device` is libtorch (CPU or CUDA) under autodiff.
    pub(super) fn is_libtorch_autodiff(device: &Device) -> bool {
        device.is_autodiff()
            && matches!(
                device.clone().inner().as_dispatch(),
                burn::backend::DispatchDevice::LibTorch(_)
            )
    }

    /// GroupNorm (+ SiLU) with libtorch's own kernels; see [`super::group_norm`].
    #[backend_extension(LibTorch, Autodiff)]
    pub trait FusedNorm: Backend {
        /// x: [B, C, H, W], gamma, beta: [C] → [B, C, H, W]
        fn fused_group_norm(
            x: FloatTensor<Self>,
            gamma: FloatTensor<Self>,
            beta: FloatTensor<Self>,
            groups: usize,
            eps: f64,
            silu: bool,
        ) -> FloatTensor<Self>;
    }

    fn forward(
        x: &tch::Tensor,
        gamma: &tch::Tensor,
        beta: &tch::Tensor,
        groups: usize,
        eps: f64,
        silu: bool,
    ) -> tch::Tensor {
        let y = x.group_norm(groups as i64, Some(gamma), Some(beta), eps, false);
        if silu { y.silu() } else { y }
    }

    impl FusedNorm for LibTorch {
        fn fused_group_norm(
            x: TchTensor,
            gamma: TchTensor,
            beta: TchTensor,
            groups: usize,
            eps: f64,
            silu: bool,
        ) -> TchTensor {
            TchTensor::new(forward(
                &x.tensor,
                &gamma.tensor,
                &beta.tensor,
                groups,
                eps,
                silu,
            ))
        }
    }

    /// The output with libtorch's graph, and the x, gamma, beta leaves; whether x needs a gradient.
    type NormState = ((TchTensor, TchTensor, TchTensor, TchTensor), bool);

    #[derive(Debug)]
    struct NormBackward;

    impl Backward<LibTorch, 3> for NormBackward {
        type State = NormState;

        fn backward(
            self,
            ops: Ops<Self::State, 3>,
            grads: &mut Gradients,
            _checkpointer: &mut Checkpointer,
        ) {
            let [node_x, node_gamma, node_beta] = ops.parents;
            let grad = grads.consume::<LibTorch>(&ops.node);
            let ((graph, xl, gl, bl), grad_x) = ops.state;
            let grad_x = grad_x && node_x.is_some();
            let mut inputs = vec![&gl.tensor, &bl.tensor];
            if grad_x {
                inputs.push(&xl.tensor);
            }
            let mut g = super::libtorch_vjp(&graph, &grad, &inputs).into_iter();
            for node in [node_gamma, node_beta, node_x.filter(|_| grad_x)] {
                if let (Some(node), Some(t)) = (node, g.next()) {
                    grads.register::<LibTorch>(node.id, t);
                }
            }
        }
    }

    impl<C: CheckpointStrategy> FusedNorm for Autodiff<LibTorch, C> {
        fn fused_group_norm(
            x: FloatTensor<Self>,
            gamma: FloatTensor<Self>,
            beta: FloatTensor<Self>,
            groups: usize,
            eps: f64,
            silu: bool,
        ) -> FloatTensor<Self> {
            let grad_x = x.is_tracked();
            match NormBackward
                .prepare::<C>([x.node(), gamma.node(), beta.node()])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => {
                    let (x, gamma, beta) = (
                        x.into_primitive(),
                        gamma.into_primitive(),
                        beta.into_primitive(),
                    );
                    let xl = super::libtorch_leaf(&x, grad_x);
                    let gl = super::libtorch_leaf(&gamma, true);
                    let bl = super::libtorch_leaf(&beta, true);
                    let y = tch::with_grad(|| {
                        forward(&xl.tensor, &gl.tensor, &bl.tensor, groups, eps, silu)
                    });
                    let out = TchTensor::new(y.detach());
                    let graph = TchTensor::from_existing(y, out.storage.clone());
                    prep.finish(((graph, xl, gl, bl), grad_x), out)
                }
                OpsKind::UnTracked(prep) => prep.finish(LibTorch::fused_group_norm(
                    x.into_primitive(),
                    gamma.into_primitive(),
                    beta.into_primitive(),
                    groups,
                    eps,
                    silu,
                )),
            }
        }
    }
}
