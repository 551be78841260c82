//! Times one 3×3 convolution's forward + backward under autodiff, burn's `Conv2d` against
//! flowrun's `fused::conv2d` (libtorch's native backward on libtorch; flowrun's im2col + GEMM backward on
//! flex) and an im2col formulation
//! (pad, 9 shifted slices, one matmul), on each device given.
//!
//! `cargo run --release --example conv_backward -- flex` (add `--features tch` and `libtorch`;
//! the binary then needs torch's `lib/` on `LD_LIBRARY_PATH`). PyTorch's own figure for the same
//! shapes: `python bench/reference/conv_backward.py`. Results: BENCHMARKS.md, "Session 3".
use std::time::Instant;

use burn::module::Module;
use burn::nn::PaddingConfig2d;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::tensor::activation::silu;
use burn::tensor::{Device, Distribution, Tensor};

fn im2col_conv(conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    let [b, c, h, w] = x.dims();
    let weight = conv.weight.val(); // [co, c, 3, 3]
    let co = weight.dims()[0];
    let xp = x.pad((1, 1, 1, 1), burn::tensor::ops::PadMode::Constant(0.0));
    let mut cols = Vec::with_capacity(9);
    for dy in 0..3 {
        for dx in 0..3 {
            cols.push(xp.clone().slice([0..b, 0..c, dy..dy + h, dx..dx + w]));
        }
    }
    // [b, c, 9, h, w] -> [b, c*9, h*w]
    let cols = Tensor::stack::<5>(cols, 2).reshape([b, c * 9, h * w]);
    let wm = weight.reshape([1, co, c * 9]).expand([b, co, c * 9]);
    let mut y = wm.matmul(cols).reshape([b, co, h, w]);
    if let Some(bias) = &conv.bias {
        y = y + bias.val().reshape([1, co, 1, 1]);
    }
    y
}

fn time(label: &str, mut f: impl FnMut()) {
    f();
    let mut t = Vec::new();
    for _ in 0..5 {
        let t0 = Instant::now();
        f();
        t.push(t0.elapsed().as_secs_f64());
    }
    t.sort_by(f64::total_cmp);
    println!("{label}: median {:.1} ms", t[2] * 1e3);
}

fn main() {
    for name in std::env::args().skip(1) {
        let dev = match name.as_str() {
            #[cfg(feature = "tch")]
            #[allow(deprecated)]
            // burn marks burn-tch deprecated; it is our libtorch path
            "libtorch" => Device::libtorch(),
            _ => Device::flex(),
        }
        .autodiff();
        for (c, hw) in [(32usize, 32usize), (64, 16), (128, 8)] {
            let conv: Conv2d = Conv2dConfig::new([c, c], [3, 3])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .init(&dev);
            let x = Tensor::<4>::random([64, c, hw, hw], Distribution::Normal(0.0, 1.0), &dev);
            let y0 = conv.forward(x.clone());
            let y1 = im2col_conv(&conv, x.clone());
            let d = (y0 - y1).abs().max().into_scalar::<f32>();
            println!("{name} c={c} hw={hw}: max |Δy| {d:.2e}");
            time("  burn Conv2d fwd+bwd", || {
                let g = conv.forward(x.clone()).sum().backward();
                drop(conv.weight.grad(&g));
            });
            let yf = nodes::model::fused::conv2d(&conv, x.clone());
            let y0 = conv.forward(x.clone());
            let d = (y0 - yf).abs().max().into_scalar::<f32>();
            println!("  fused conv2d: max |Δy| {d:.2e}");
            time("  fused       fwd+bwd", || {
                let g = nodes::model::fused::conv2d(&conv, x.clone())
                    .sum()
                    .backward();
                drop(conv.weight.grad(&g));
            });
            // Sampling: the forward alone, without autodiff.
            let (conv_plain, x_plain) = (conv.valid(), x.clone().inner());
            time("  burn Conv2d fwd (no autodiff)", || {
                drop(conv_plain.forward(x_plain.clone()).into_data());
            });
            time("  fused       fwd (no autodiff)", || {
                drop(nodes::model::fused::conv2d(&conv_plain, x_plain.clone()).into_data());
            });
            time("  im2col      fwd+bwd", || {
                let g = im2col_conv(&conv, x.clone()).sum().backward();
                drop(conv.weight.grad(&g));
            });
            let gn = burn::nn::GroupNormConfig::new(8, c).init(&dev);
            let xt = x.clone().require_grad();
            time("  GroupNorm+SiLU fwd+bwd", || {
                let g = silu(gn.forward(xt.clone())).sum().backward();
                drop(xt.grad(&g));
            });
            time("  fused::group_norm (+SiLU) fwd+bwd", || {
                let g = nodes::model::fused::group_norm(&gn, xt.clone(), true)
                    .sum()
                    .backward();
                drop(xt.grad(&g));
            });
        }
    }
}
