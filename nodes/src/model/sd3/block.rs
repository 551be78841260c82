//! The MMDiT block (diffusers' `JointTransformerBlock`) and its adaptive layer norms.
//!
//! ```text
//! x̂, g_msa, β_mlp, γ_mlp, g_mlp [, x̂₂, g_msa2] = norm1(x, temb)      (AdaLN-Zero / SD3.5 X)
//! ĉ, c_g_msa, c_β_mlp, c_γ_mlp, c_g_mlp  = norm1_context(c, temb)    (last block: AdaLN-Cont.)
//! a_x, a_c = attn(x̂, ĉ)                                               (joint softmax)
//! x += g_msa · a_x;        [x += g_msa2 · attn2(x̂₂)]
//! x += g_mlp · ff(LN(x) · (1 + γ_mlp) + β_mlp)
//! c += c_g_msa · a_c;      c += c_g_mlp · ff_context(LN(c) · (1 + c_γ_mlp) + c_β_mlp)
//! ```
//!
//! Every LayerNorm here has no affine parameters and eps 1e-6. Shape letters: `B` batch,
//! `T` tokens, `D` inner width.

use crate::model::lora::Linear;
use burn::module::Module;
use burn::module::{
    Content, Devices, ModuleDisplay, ModuleDisplayDefault, ModuleMapper, ModuleVisitor,
};
use burn::tensor::{Device, FloatDType, Tensor};

use super::attention::{Attention, EPS};
use super::config::QkNorm;
use crate::model::fused;
use crate::model::layers::linear;

/// LayerNorm over the last axis without affine parameters (libtorch's kernel on libtorch,
/// which accumulates a half-precision `x` in f32; elsewhere composed in f32 and cast back).
/// x: [B, T, D] → [B, T, D]
pub fn layer_norm(x: Tensor<3>) -> Tensor<3> {
    if let Some(y) = fused::layer_norm(&x, EPS) {
        return y;
    }
    let dtype = x.dtype();
    let x = x.cast(FloatDType::F32);
    let mean = x.clone().mean_dim(2);
    let centred = x - mean;
    let var = centred.clone().square().mean_dim(2);
    (centred / var.add_scalar(EPS).sqrt()).cast(dtype)
}

/// Which adaptive norm an [`AdaLayerNorm`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdaNormKind {
    /// diffusers' `AdaLayerNormZero`: 6 chunks (shift, scale, gate for attention and MLP).
    Zero,
    /// diffusers' `SD35AdaLayerNormZeroX`: 9 chunks, the last 3 for the second attention.
    ZeroX,
    /// diffusers' `AdaLayerNormContinuous`: 2 chunks, **scale then shift**.
    Continuous,
}

impl AdaNormKind {
    pub fn chunks(self) -> usize {
        match self {
            Self::Zero => 6,
            Self::ZeroX => 9,
            Self::Continuous => 2,
        }
    }
}

/// An adaptive LayerNorm: `linear(silu(temb))` gives per-sample shifts, scales and gates.
#[derive(Module, Debug)]
pub struct AdaLayerNorm {
    /// D → chunks·D
    pub linear: Linear,
    #[module(skip)]
    pub kind: AdaNormKind,
}

/// The outputs of [`AdaLayerNorm::forward_zero`]; every modulation is [B, 1, D].
#[derive(Debug, Clone)]
pub struct ZeroOut {
    /// LN(x)·(1 + scale_msa) + shift_msa. [B, T, D]
    pub x: Tensor<3>,
    pub gate_msa: Tensor<3>,
    pub shift_mlp: Tensor<3>,
    pub scale_mlp: Tensor<3>,
    pub gate_mlp: Tensor<3>,
    /// SD3.5 only: LN(x)·(1 + scale_msa2) + shift_msa2, and gate_msa2.
    pub x2: Option<(Tensor<3>, Tensor<3>)>,
}

impl AdaLayerNorm {
    pub fn new(dim: usize, kind: AdaNormKind, device: &Device) -> Self {
        Self {
            linear: linear(dim, kind.chunks() * dim, device),
            kind,
        }
    }

    /// The modulation vectors of `silu(temb)`, each [B, 1, D].
    fn chunks(&self, temb_act: Tensor<2>) -> Vec<Tensor<3>> {
        let [b, _] = temb_act.dims();
        let n = self.kind.chunks();
        // [B, n, D]
        let emb = self
            .linear
            .forward(temb_act)
            .reshape([b as i32, n as i32, -1]);
        (0..n).map(|i| emb.clone().slice_dim(1, i..i + 1)).collect()
    }

    /// `Zero` / `ZeroX`. x: [B, T, D], temb_act = silu(temb): [B, D]
    pub fn forward_zero(&self, x: Tensor<3>, temb_act: Tensor<2>) -> ZeroOut {
        assert!(
            self.kind != AdaNormKind::Continuous,
            "forward_zero on {:?}",
            self.kind
        );
        let mut m = self.chunks(temb_act).into_iter();
        let mut next = || m.next().expect("chunk count matches the kind");
        let (shift_msa, scale_msa, gate_msa) = (next(), next(), next());
        let (shift_mlp, scale_mlp, gate_mlp) = (next(), next(), next());
        let normed = layer_norm(x);
        let x2 = (self.kind == AdaNormKind::ZeroX).then(|| {
            let (shift2, scale2, gate2) = (next(), next(), next());
            (normed.clone() * scale2.add_scalar(1.0) + shift2, gate2)
        });
        ZeroOut {
            x: normed * scale_msa.add_scalar(1.0) + shift_msa,
            gate_msa,
            shift_mlp,
            scale_mlp,
            gate_mlp,
            x2,
        }
    }

    /// `Continuous`: LN(x)·(1 + scale) + shift. x: [B, T, D], temb_act: [B, D] → [B, T, D]
    pub fn forward_continuous(&self, x: Tensor<3>, temb_act: Tensor<2>) -> Tensor<3> {
        assert!(
            self.kind == AdaNormKind::Continuous,
            "forward_continuous on {:?}",
            self.kind
        );
        let mut m = self.chunks(temb_act).into_iter();
        let scale = m.next().expect("2 chunks");
        let shift = m.next().expect("2 chunks");
        layer_norm(x) * scale.add_scalar(1.0) + shift
    }
}

/// `net.0` of diffusers' `FeedForward`: `GELU(approximate="tanh")` with its input projection.
#[derive(Module, Debug)]
pub struct GeluTanh {
    /// D → 4D
    pub proj: Linear,
}

/// diffusers' `FeedForward.net` = `[GELU, Dropout, Linear]`: its parameters are `0.proj.*`
/// and `2.*`, which no derived struct can name, hence the hand-written [`Module`] impl.
#[derive(Debug, Clone)]
pub struct FeedForwardNet {
    /// `net.0`
    pub gelu: GeluTanh,
    /// `net.2`: 4D → D
    pub out: Linear,
}

const FF_NET: &str = "Struct:FeedForwardNet";

impl Module for FeedForwardNet {
    fn collect_devices(&self, devices: Devices) -> Devices {
        let devices = self.gelu.collect_devices(devices);
        self.out.collect_devices(devices)
    }

    fn fork(self, device: &Device) -> Self {
        Self {
            gelu: self.gelu.fork(device),
            out: self.out.fork(device),
        }
    }

    fn to_device(self, device: &Device) -> Self {
        Self {
            gelu: self.gelu.to_device(device),
            out: self.out.to_device(device),
        }
    }

    fn train(self) -> Self {
        Self {
            gelu: self.gelu.train(),
            out: self.out.train(),
        }
    }

    fn valid(&self) -> Self {
        Self {
            gelu: self.gelu.valid(),
            out: self.out.valid(),
        }
    }

    fn materialize(self) -> Self {
        Self {
            gelu: self.gelu.materialize(),
            out: self.out.materialize(),
        }
    }

    fn num_params(&self) -> usize {
        Module::num_params(&self.gelu) + Module::num_params(&self.out)
    }

    fn visit<V: ModuleVisitor>(&self, visitor: &mut V) {
        visitor.enter_module("0", FF_NET);
        self.gelu.visit(visitor);
        visitor.exit_module("0", FF_NET);
        visitor.enter_module("2", FF_NET);
        self.out.visit(visitor);
        visitor.exit_module("2", FF_NET);
    }

    fn map<M: ModuleMapper>(self, mapper: &mut M) -> Self {
        mapper.enter_module("0", FF_NET);
        let gelu = self.gelu.map(mapper);
        mapper.exit_module("0", FF_NET);
        mapper.enter_module("2", FF_NET);
        let out = self.out.map(mapper);
        mapper.exit_module("2", FF_NET);
        Self { gelu, out }
    }
}

impl ModuleDisplayDefault for FeedForwardNet {
    fn content(&self, content: Content) -> Option<Content> {
        content
            .add("0", &self.gelu)
            .add("2", &self.out)
            .set_top_level_type("FeedForwardNet")
            .optional()
    }
}

impl ModuleDisplay for FeedForwardNet {}

/// `Linear(D, 4D) → GELU(tanh) → Linear(4D, D)`.
#[derive(Module, Debug)]
pub struct FeedForward {
    pub net: FeedForwardNet,
}

impl FeedForward {
    pub fn new(dim: usize, device: &Device) -> Self {
        Self {
            net: FeedForwardNet {
                gelu: GeluTanh {
                    proj: linear(dim, 4 * dim, device),
                },
                out: linear(4 * dim, dim, device),
            },
        }
    }

    /// x: [B, T, D] → [B, T, D]
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let h = fused::gelu_tanh(self.net.gelu.proj.forward(x));
        self.net.out.forward(h)
    }
}

/// One MMDiT block. The last block of the model is `context_pre_only`: its text branch is only
/// a key/value source (AdaLN-Continuous, no `to_add_out`, no `ff_context`, no text output).
#[derive(Module, Debug)]
pub struct JointTransformerBlock {
    /// `Zero`, or `ZeroX` with the SD3.5 second attention.
    pub norm1: AdaLayerNorm,
    /// `Zero`, or `Continuous` when `context_pre_only`.
    pub norm1_context: AdaLayerNorm,
    pub attn: Attention,
    /// SD3.5 (`dual_attention_layers`): image self-attention on the second modulation.
    pub attn2: Option<Attention>,
    pub ff: FeedForward,
    pub ff_context: Option<FeedForward>,
    pub context_pre_only: bool,
}

impl JointTransformerBlock {
    pub fn new(
        dim: usize,
        heads: usize,
        qk_norm: QkNorm,
        context_pre_only: bool,
        dual_attention: bool,
        device: &Device,
    ) -> Self {
        let norm1_kind = if dual_attention {
            AdaNormKind::ZeroX
        } else {
            AdaNormKind::Zero
        };
        let context_kind = if context_pre_only {
            AdaNormKind::Continuous
        } else {
            AdaNormKind::Zero
        };
        Self {
            norm1: AdaLayerNorm::new(dim, norm1_kind, device),
            norm1_context: AdaLayerNorm::new(dim, context_kind, device),
            attn: Attention::new(dim, heads, qk_norm, true, !context_pre_only, device),
            attn2: dual_attention
                .then(|| Attention::new(dim, heads, qk_norm, false, false, device)),
            ff: FeedForward::new(dim, device),
            ff_context: (!context_pre_only).then(|| FeedForward::new(dim, device)),
            context_pre_only,
        }
    }

    /// x: [B, N, D], context: [B, L, D], temb_act = silu(temb): [B, D]
    /// → (x [B, N, D], context [B, L, D], or `None` after a `context_pre_only` block)
    pub fn forward(
        &self,
        x: Tensor<3>,
        context: Tensor<3>,
        temb_act: Tensor<2>,
    ) -> (Tensor<3>, Option<Tensor<3>>) {
        let m = self.norm1.forward_zero(x.clone(), temb_act.clone());
        let (normed_ctx, ctx_mod) = if self.context_pre_only {
            let normed = self
                .norm1_context
                .forward_continuous(context.clone(), temb_act);
            (normed, None)
        } else {
            let cm = self.norm1_context.forward_zero(context.clone(), temb_act);
            (cm.x.clone(), Some(cm))
        };
        let (attn_x, attn_ctx) = self.attn.forward_joint(m.x, normed_ctx);
        let mut x = x + m.gate_msa * attn_x;
        if let (Some(attn2), Some((x2, gate2))) = (&self.attn2, m.x2) {
            x = x + gate2 * attn2.forward_self(x2);
        }
        let h = layer_norm(x.clone()) * m.scale_mlp.add_scalar(1.0) + m.shift_mlp;
        let x = x + m.gate_mlp * self.ff.forward(h);

        let context = match (ctx_mod, attn_ctx, &self.ff_context) {
            (Some(cm), Some(attn_ctx), Some(ff_context)) => {
                let c = context + cm.gate_msa * attn_ctx;
                let h = layer_norm(c.clone()) * cm.scale_mlp.add_scalar(1.0) + cm.shift_mlp;
                Some(c.clone() + cm.gate_mlp * ff_context.forward(h))
            }
            _ => None,
        };
        (x, context)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::checkpoint::{param_paths, tensor_values};
    use crate::model::tensor_from_vec;

    #[test]
    fn should_name_feed_forward_params_as_diffusers() {
        let ff = FeedForward::new(4, &Device::flex());
        let paths: Vec<String> = param_paths(&ff).into_iter().map(|(p, _, _)| p).collect();
        assert_eq!(
            paths,
            [
                "net.0.proj.weight",
                "net.0.proj.bias",
                "net.2.weight",
                "net.2.bias"
            ]
        );
        assert_eq!(Module::num_params(&ff), 4 * 16 + 16 + 16 * 4 + 4);
    }

    #[test]
    fn should_layer_normalise_without_affine() {
        let dev = Device::flex();
        let x = tensor_from_vec(vec![1.0, 2.0, 3.0, 4.0, 5.0, 5.0], [1, 2, 3], &dev);
        let y = tensor_values(layer_norm(x));
        let s = (2.0f32 / 3.0 + 1e-6).sqrt();
        let expect = [
            -1.0 / s,
            0.0,
            1.0 / s,
            -2.0 / 3.0 / ((2.0f32 / 9.0) + 1e-6).sqrt(),
        ];
        for (a, b) in y.iter().zip(expect) {
            assert!((a - b).abs() < 1e-5, "{y:?}");
        }
    }

    #[test]
    fn should_order_continuous_modulation_scale_then_shift() {
        let dev = Device::flex();
        let norm = AdaLayerNorm::new(2, AdaNormKind::Continuous, &dev);
        // linear(silu(temb)) = bias only: scale = [1, 1], shift = [10, 20].
        let norm = AdaLayerNorm {
            linear: Linear {
                weight: norm.linear.weight,
                bias: Some(burn::module::Param::from_tensor(tensor_from_vec(
                    vec![1.0, 1.0, 10.0, 20.0],
                    [4],
                    &dev,
                ))),
                ..norm.linear
            },
            kind: norm.kind,
        };
        let x = tensor_from_vec(vec![-1.0, 1.0], [1, 1, 2], &dev);
        let temb = tensor_from_vec(vec![0.0, 0.0], [1, 2], &dev);
        let y = tensor_values(norm.forward_continuous(x, temb));
        // LN([-1, 1]) ≈ [-1, 1]; ·(1 + 1) + [10, 20]
        assert!(
            (y[0] - 8.0).abs() < 1e-4 && (y[1] - 22.0).abs() < 1e-4,
            "{y:?}"
        );
    }
}

crate::impl_linears!(AdaLayerNorm { linear });
crate::impl_linears!(GeluTanh { proj });
crate::impl_linears!(FeedForward { net });
crate::impl_linears!(JointTransformerBlock {
    norm1,
    norm1_context,
    attn,
    attn2,
    ff,
    ff_context
});

/// `net.0.proj` and `net.2`, as the hand-written [`Module`] impl names them.
impl crate::model::lora::Linears for FeedForwardNet {
    fn each_linear(
        &mut self,
        path: &str,
        f: &mut dyn FnMut(&str, &mut crate::model::lora::Linear),
    ) {
        use crate::model::lora::join;
        self.gelu.each_linear(&join(path, "0"), f);
        self.out.each_linear(&join(path, "2"), f);
    }
}
