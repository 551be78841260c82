//! The flex path of [`super`]: a burn backend extension whose convolution backward and
//! GroupNorm(+FiLM)(+SiLU) run the fused Rust kernels of [`super::kernels`] in place of burn's
//! generic compositions (a transposed convolution and a batch-swapped convolution for the
//! convolution's gradients; a dozen elementwise ops and reductions, each differentiated on its
//! own, for GroupNorm), and the convolution's forward is the same im2col + GEMM; under autodiff,
//! attention is one kernel forward and one backward (instead of matmul, softmax and matmul,
//! each differentiated on its own).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, DispatchDevice, Flex, backend_extension};
use burn::tensor::{DType, Tensor, TensorData};

use super::kernels::{self, AttnGeom, ConvGeom, Film, NormGeom};

/// Whether the flex path applies to `x`: enabled, f32, and on flex (with or without autodiff).
pub(super) fn applies<const D: usize>(x: &Tensor<D>) -> bool {
    super::native_ops_enabled()
        && x.dtype() == DType::F32
        && matches!(x.device().inner().as_dispatch(), DispatchDevice::Flex(_))
}

pub(super) fn conv2d(
    x: Tensor<4>,
    weight: Tensor<4>,
    bias: Tensor<1>,
    padding: usize,
) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as FlexOps>::flex_conv2d(
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
    Tensor::from_dispatch(<Dispatch as FlexOps>::flex_group_norm(
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
    Tensor::from_dispatch(<Dispatch as FlexOps>::flex_group_norm_film(
        x.into_dispatch(),
        gamma.into_dispatch(),
        beta.into_dispatch(),
        scale.into_dispatch(),
        shift.into_dispatch(),
        groups,
        eps,
    ))
}

pub(super) fn attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, bias: Tensor<4>) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as FlexOps>::flex_attention(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        bias.into_dispatch(),
    ))
}

/// Ops with fused Rust kernels (and their own backward) on flex.
#[backend_extension(Flex, Autodiff)]
pub trait FlexOps: Backend {
    /// Stride 1, dilation 1, one group, `padding` on every side.
    /// x: [B, Cin, H, W], weight: [Cout, Cin, k, k], bias: [Cout] → [B, Cout, H', W']
    fn flex_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        padding: usize,
    ) -> FloatTensor<Self>;

    /// silu(group_norm(x)) or group_norm(x). x: [B, C, H, W], gamma, beta: [C] → [B, C, H, W]
    fn flex_group_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        groups: usize,
        eps: f64,
        silu: bool,
    ) -> FloatTensor<Self>;

    /// silu(group_norm(x) · (1 + scale) + shift). x: [B, C, H, W], gamma, beta: [C],
    /// scale, shift: [B, C, 1, 1] → [B, C, H, W]
    fn flex_group_norm_film(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        shift: FloatTensor<Self>,
        groups: usize,
        eps: f64,
    ) -> FloatTensor<Self>;

    /// softmax(q kᵀ / √dh + bias) v. q: [B, H, Lq, dh], k/v: [B, H, Lk, dh],
    /// bias: [B, 1, 1, Lk] (a constant: never differentiated) → [B, H, Lq, dh]
    fn flex_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        bias: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
}

fn attn_geom(q: &FlexTensor, k: &FlexTensor) -> AttnGeom {
    let (qd, kd) = (dims(q), dims(k));
    AttnGeom {
        batch: qd[0],
        heads: qd[1],
        lq: qd[2],
        lk: kd[2],
        dh: qd[3],
    }
}

/// The attention's output and probabilities. [B, H, Lq, dh] and [B, H, Lq, Lk]
fn attention_forward(
    q: &FlexTensor,
    k: &FlexTensor,
    v: &FlexTensor,
    bias: &FlexTensor,
) -> (FlexTensor, FlexTensor) {
    let g = attn_geom(q, k);
    let out = kernels::attention_forward(&g, values(q), values(k), values(v), values(bias));
    (
        tensor(out.o, dims(q)),
        tensor(out.p, vec![g.batch, g.heads, g.lq, g.lk]),
    )
}

/// A contiguous f32 copy of `t` (shared, not copied, when `t` already is).
fn dense(t: &FlexTensor) -> FlexTensor {
    t.to_contiguous()
}

/// The elements of a contiguous f32 tensor from [`dense`].
fn values(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>()
        .expect("a contiguous f32 flex tensor (checked by `applies`)")
}

fn tensor(data: Vec<f32>, shape: Vec<usize>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(data, shape))
}

fn dims(t: &FlexTensor) -> Vec<usize> {
    t.layout().shape().to_vec()
}

fn conv_forward(x: FlexTensor, weight: FlexTensor, bias: FlexTensor, padding: usize) -> FlexTensor {
    let (x, weight, bias) = (dense(&x), dense(&weight), dense(&bias));
    let g = conv_geom(&x, &weight, padding);
    let y = kernels::conv2d_forward(&g, values(&x), values(&weight), values(&bias));
    tensor(y, vec![g.batch, g.c_out, g.out_h(), g.out_w()])
}

fn conv_geom(x: &FlexTensor, weight: &FlexTensor, padding: usize) -> ConvGeom {
    let (xd, wd) = (dims(x), dims(weight));
    ConvGeom {
        batch: xd[0],
        c_in: xd[1],
        c_out: wd[0],
        h: xd[2],
        w: xd[3],
        k: wd[2],
        pad: padding,
    }
}

/// What a GroupNorm's forward computes and its backward reads.
#[derive(Clone, Debug)]
struct NormInputs {
    /// [B, C, H, W], contiguous
    x: FlexTensor,
    /// [C]
    gamma: FlexTensor,
    /// [C]
    beta: FlexTensor,
    /// [B, C, 1, 1] each, contiguous
    film: Option<(FlexTensor, FlexTensor)>,
    groups: usize,
    eps: f64,
    silu: bool,
}

impl NormInputs {
    fn geom(&self) -> NormGeom {
        let d = dims(&self.x);
        NormGeom {
            batch: d[0],
            channels: d[1],
            groups: self.groups,
            pixels: d[2] * d[3],
            eps: self.eps,
        }
    }

    fn film(&self) -> Option<Film<'_>> {
        self.film.as_ref().map(|(s, t)| Film {
            scale: values(s),
            shift: values(t),
        })
    }

    /// The output, and the per-(sample, group) mean and 1/std. [B, groups] each
    fn forward(&self) -> (FlexTensor, Vec<f32>, Vec<f32>) {
        let g = self.geom();
        let out = kernels::group_norm_forward(
            &g,
            values(&self.x),
            values(&self.gamma),
            values(&self.beta),
            self.film(),
            self.silu,
        );
        (tensor(out.y, dims(&self.x)), out.mean, out.rstd)
    }
}

#[allow(clippy::too_many_arguments)]
fn norm_inputs(
    x: &FlexTensor,
    gamma: &FlexTensor,
    beta: &FlexTensor,
    film: Option<(&FlexTensor, &FlexTensor)>,
    groups: usize,
    eps: f64,
    silu: bool,
) -> NormInputs {
    NormInputs {
        x: dense(x),
        gamma: dense(gamma),
        beta: dense(beta),
        film: film.map(|(s, t)| (dense(s), dense(t))),
        groups,
        eps,
        silu,
    }
}

impl FlexOps for Flex {
    fn flex_conv2d(x: FlexTensor, w: FlexTensor, b: FlexTensor, padding: usize) -> FlexTensor {
        conv_forward(x, w, b, padding)
    }

    fn flex_group_norm(
        x: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        groups: usize,
        eps: f64,
        silu: bool,
    ) -> FlexTensor {
        norm_inputs(&x, &gamma, &beta, None, groups, eps, silu)
            .forward()
            .0
    }

    fn flex_group_norm_film(
        x: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        scale: FlexTensor,
        shift: FlexTensor,
        groups: usize,
        eps: f64,
    ) -> FlexTensor {
        norm_inputs(&x, &gamma, &beta, Some((&scale, &shift)), groups, eps, true)
            .forward()
            .0
    }

    fn flex_attention(q: FlexTensor, k: FlexTensor, v: FlexTensor, bias: FlexTensor) -> FlexTensor {
        let [q, k, v, bias] = [q, k, v, bias].map(|t| dense(&t));
        attention_forward(&q, &k, &v, &bias).0
    }
}

/// Backward of [`FlexOps::flex_attention`]: [`kernels::attention_backward`]; the bias (the
/// fourth input) gets no gradient.
#[derive(Debug)]
struct AttnBackward;

impl Backward<Flex, 4> for AttnBackward {
    /// q, k, v (contiguous) and the probabilities.
    type State = [FlexTensor; 4];

    fn backward(self, ops: Ops<Self::State, 4>, grads: &mut Gradients, _: &mut Checkpointer) {
        let go = dense(&grads.consume::<Flex>(&ops.node));
        let [q, k, v, p] = ops.state;
        let g = attn_geom(&q, &k);
        let out = kernels::attention_backward(
            &g,
            values(&q),
            values(&k),
            values(&v),
            values(&p),
            values(&go),
        );
        let [pq, pk, pv, _] = ops.parents;
        for (node, grad, shape) in [
            (pq, out.q, dims(&q)),
            (pk, out.k, dims(&k)),
            (pv, out.v, dims(&v)),
        ] {
            if let Some(node) = node {
                grads.register::<Flex>(node.id, tensor(grad, shape));
            }
        }
    }
}

/// Backward of [`FlexOps::flex_conv2d`]: [`kernels::conv2d_backward`], computing only the
/// gradients of tracked inputs.
#[derive(Debug)]
struct ConvBackward;

impl Backward<Flex, 3> for ConvBackward {
    /// (x, weight) contiguous, and the padding.
    type State = (FlexTensor, FlexTensor, usize);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let gy = dense(&grads.consume::<Flex>(&ops.node));
        let (x, weight, padding) = ops.state;
        let [px, pw, pb] = ops.parents;
        let g = conv_geom(&x, &weight, padding);
        let want = (px.is_some(), pw.is_some(), pb.is_some());
        let out = kernels::conv2d_backward(&g, values(&x), values(&weight), values(&gy), want);
        for (node, grad, shape) in [
            (px, out.x, dims(&x)),
            (pw, out.weight, dims(&weight)),
            (pb, out.bias, vec![g.c_out]),
        ] {
            if let (Some(node), Some(grad)) = (node, grad) {
                grads.register::<Flex>(node.id, tensor(grad, shape));
            }
        }
    }
}

/// Backward of the GroupNorms: [`kernels::group_norm_backward`]. Inputs x, gamma, beta and,
/// with FiLM (N = 5), scale and shift.
#[derive(Debug)]
struct NormBackward<const N: usize>;

impl<const N: usize> Backward<Flex, N> for NormBackward<N> {
    /// The inputs, and the forward's mean and 1/std.
    type State = (NormInputs, FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let gout = dense(&grads.consume::<Flex>(&ops.node));
        let (inputs, mean, rstd) = ops.state;
        let g = inputs.geom();
        let out = kernels::group_norm_backward(
            &g,
            values(&inputs.x),
            values(&inputs.gamma),
            values(&inputs.beta),
            inputs.film(),
            inputs.silu,
            (values(&mean), values(&rstd)),
            values(&gout),
        );
        let c = g.channels;
        let film_shape = vec![g.batch, c, 1, 1];
        let results = [
            (out.x, dims(&inputs.x)),
            (out.gamma, vec![c]),
            (out.beta, vec![c]),
            (out.scale, film_shape.clone()),
            (out.shift, film_shape),
        ];
        for (node, (grad, shape)) in ops.parents.into_iter().zip(results) {
            if let Some(node) = node {
                grads.register::<Flex>(node.id, tensor(grad, shape));
            }
        }
    }
}

/// Runs a GroupNorm of `N` inputs (3, or 5 with FiLM) under autodiff, recording its backward
/// when any input is tracked.
fn record_norm<C: CheckpointStrategy, const N: usize>(
    inputs: [FloatTensor<Autodiff<Flex, C>>; N],
    groups: usize,
    eps: f64,
    silu: bool,
) -> FloatTensor<Autodiff<Flex, C>> {
    let nodes = inputs.each_ref().map(|t| t.node());
    let prims = inputs.each_ref().map(|t| t.primitive());
    let film = (N == 5).then(|| (prims[3], prims[4]));
    let norm = norm_inputs(prims[0], prims[1], prims[2], film, groups, eps, silu);
    match NormBackward::<N>
        .prepare::<C>(nodes)
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let (y, mean, rstd) = norm.forward();
            // [B · groups] each
            let stats = |v: Vec<f32>| {
                let n = v.len();
                tensor(v, vec![n])
            };
            prep.finish((norm, stats(mean), stats(rstd)), y)
        }
        OpsKind::UnTracked(prep) => prep.finish(norm.forward().0),
    }
}

impl<C: CheckpointStrategy> FlexOps for Autodiff<Flex, C> {
    fn flex_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        padding: usize,
    ) -> FloatTensor<Self> {
        let nodes = [x.node(), weight.node(), bias.node()];
        match ConvBackward.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (x, w) = (dense(x.primitive()), dense(weight.primitive()));
                let y = conv_forward(x.clone(), w.clone(), bias.into_primitive(), padding);
                prep.finish((x, w, padding), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(conv_forward(
                x.into_primitive(),
                weight.into_primitive(),
                bias.into_primitive(),
                padding,
            )),
        }
    }

    fn flex_group_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        groups: usize,
        eps: f64,
        silu: bool,
    ) -> FloatTensor<Self> {
        record_norm::<C, 3>([x, gamma, beta], groups, eps, silu)
    }

    fn flex_group_norm_film(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        shift: FloatTensor<Self>,
        groups: usize,
        eps: f64,
    ) -> FloatTensor<Self> {
        record_norm::<C, 5>([x, gamma, beta, scale, shift], groups, eps, true)
    }

    fn flex_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        bias: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let nodes = [q.node(), k.node(), v.node(), bias.node()];
        let [q, k, v, bias] = [&q, &k, &v, &bias].map(|t| dense(t.primitive()));
        match AttnBackward.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (o, p) = attention_forward(&q, &k, &v, &bias);
                prep.finish([q, k, v, p], o)
            }
            OpsKind::UnTracked(prep) => prep.finish(attention_forward(&q, &k, &v, &bias).0),
        }
    }
}
