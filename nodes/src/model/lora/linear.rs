//! [`Linear`]: the linear layer of every flowrun architecture, optionally with a LoRA adapter.
//!
//! `y = x·W + b + s·(x·A)·B` with the frozen base `W` [d_in, d_out], the adapter's
//! down-projection `A` [d_in, r] (peft's `lora_A`), its up-projection `B` [r, d_out] (peft's
//! `lora_B`) and the scale `s = α / r` (`α / √r` with rsLoRA). The low-rank term is computed as
//! two thin matmuls through the r-wide intermediate: a dense `W + s·A·B` is never formed on the
//! forward (burn 0.22's `apply_lora` forms it on every forward), and the base's backward computes
//! only the input's gradient (its weights are frozen). Without an adapter this is exactly burn's
//! `nn::Linear` (the same kernel, the same parameter names).
//!
//! With a half-precision base (`base_dtype`), `x`, `W`, `b` and the output are bf16/f16 while
//! the adapter stays f32: its term is computed from `x` widened to f32 and cast to `x`'s dtype
//! before it is added (what peft does with an f32 adapter on a half model).
//!
//! Parameter paths are peft's: `<layer>.weight`, `<layer>.bias`, `<layer>.lora_A.weight`,
//! `<layer>.lora_B.weight`.

// The adapter's fields carry peft's names (`lora_A`, `lora_B`), which are its parameter paths.
#![allow(non_snake_case)]

use burn::module::{Module, Param};
use burn::nn::Initializer;
use burn::tensor::module::linear;
use burn::tensor::{Device, Tensor};

/// One factor of a LoRA adapter (a bias-free linear map, as peft stores it).
#[derive(Module, Debug)]
pub struct Factor {
    /// burn layout [d_in, d_out]: `lora_A` [d_in, r], `lora_B` [r, d_out].
    pub weight: Param<Tensor<2>>,
}

/// A linear layer `x·W + b`, with an optional LoRA adapter (see the module docs).
#[derive(Module, Debug)]
pub struct Linear {
    /// [d_in, d_out]
    pub weight: Param<Tensor<2>>,
    /// [d_out]
    pub bias: Option<Param<Tensor<1>>>,
    /// The adapter's down-projection [d_in, r].
    pub lora_A: Option<Factor>,
    /// The adapter's up-projection [r, d_out] (zero at init: the adapted layer starts as the
    /// base).
    pub lora_B: Option<Factor>,
    /// `s`: α / r (α / √r with rsLoRA). Unused without an adapter.
    #[module(skip)]
    pub lora_scale: f64,
}

impl Linear {
    /// A layer with zero weight and bias (lazy: nothing is allocated until used or loaded).
    pub fn zeros(d_in: usize, d_out: usize, device: &Device) -> Self {
        Self {
            weight: Initializer::Zeros.init([d_in, d_out], device),
            bias: Some(Initializer::Zeros.init([d_out], device)),
            lora_A: None,
            lora_B: None,
            lora_scale: 0.0,
        }
    }

    /// [d_in, d_out], without touching a lazy weight.
    pub fn dims(&self) -> [usize; 2] {
        self.weight.lazy_shape().dims()
    }

    /// The dtype of the (base) weight: the activations' dtype in a half-precision base.
    pub fn dtype(&self) -> burn::tensor::DType {
        self.weight.val().dtype()
    }

    /// Whether a LoRA adapter is attached.
    pub fn is_adapted(&self) -> bool {
        self.lora_A.is_some() && self.lora_B.is_some()
    }

    /// The adapter's rank (0 without one).
    pub fn rank(&self) -> usize {
        match &self.lora_A {
            Some(a) => a.weight.lazy_shape().dims::<2>()[1],
            None => 0,
        }
    }

    /// x: [..., d_in] → [..., d_out]
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let bias = self.bias.as_ref().map(|b| b.val());
        match (&self.lora_A, &self.lora_B) {
            (Some(a), Some(b)) => {
                let a = a.weight.val();
                let dtype = x.dtype();
                if dtype != a.dtype() {
                    // A half base with an f32 adapter: the low-rank term in f32.
                    let h = linear(x.clone().cast(a.dtype()), a, None).mul_scalar(self.lora_scale);
                    let delta = linear(h, b.weight.val(), None).cast(dtype);
                    return linear(x, self.weight.val(), bias) + delta;
                }
                // [..., r]
                let h = linear(x.clone(), a, None).mul_scalar(self.lora_scale);
                linear(x, self.weight.val(), bias) + linear(h, b.weight.val(), None)
            }
            _ => linear(x, self.weight.val(), bias),
        }
    }

    /// The adapter's low-rank update `s·A·B` [d_in, d_out] (`None` without one).
    pub fn delta(&self) -> Option<Tensor<2>> {
        match (&self.lora_A, &self.lora_B) {
            (Some(a), Some(b)) => Some(
                a.weight
                    .val()
                    .matmul(b.weight.val())
                    .mul_scalar(self.lora_scale),
            ),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::checkpoint::tensor_values;
    use crate::model::tensor_from_vec;

    fn vals(n: usize, s: f32) -> Vec<f32> {
        (0..n).map(|i| ((i as f32 + 1.0) * s).sin()).collect()
    }

    fn layer(dev: &Device) -> Linear {
        Linear {
            weight: Param::from_tensor(tensor_from_vec(vals(12, 0.3), [4, 3], dev)),
            bias: Some(Param::from_tensor(tensor_from_vec(vals(3, 0.7), [3], dev))),
            lora_A: None,
            lora_B: None,
            lora_scale: 0.0,
        }
    }

    #[test]
    fn should_equal_burns_linear_without_an_adapter() {
        let dev = Device::flex();
        let ours = layer(&dev);
        let theirs = burn::nn::Linear {
            weight: Param::from_tensor(ours.weight.val()),
            bias: Some(Param::from_tensor(ours.bias.as_ref().unwrap().val())),
        };
        let x = tensor_from_vec(vals(10, 0.9), [2, 5, 1], &dev).reshape([5, 2]);
        let x = Tensor::cat(vec![x.clone(), x], 1); // [5, 4]
        assert_eq!(
            tensor_values(ours.forward(x.clone())),
            tensor_values(theirs.forward(x))
        );
    }

    #[test]
    fn should_add_the_scaled_low_rank_term() {
        let dev = Device::flex();
        let mut l = layer(&dev);
        let a = tensor_from_vec(vals(8, 0.5), [4, 2], &dev);
        let b = tensor_from_vec(vals(6, 1.1), [2, 3], &dev);
        l.lora_A = Some(Factor {
            weight: Param::from_tensor(a.clone()),
        });
        l.lora_B = Some(Factor {
            weight: Param::from_tensor(b.clone()),
        });
        l.lora_scale = 2.0;
        let x = tensor_from_vec(vals(8, 0.2), [2, 4], &dev);
        let dense = l.weight.val() + a.matmul(b).mul_scalar(2.0);
        let expect =
            tensor_values(x.clone().matmul(dense) + l.bias.as_ref().unwrap().val().reshape([1, 3]));
        let got = tensor_values(l.forward(x));
        for (g, e) in got.iter().zip(&expect) {
            assert!((g - e).abs() < 1e-5, "{got:?} vs {expect:?}");
        }
        assert_eq!(l.rank(), 2);
        assert_eq!(l.dims(), [4, 3]);
    }
}
