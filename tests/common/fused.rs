//! The fused ops of `nodes::model::fused` against burn's own compositions, on any device: run by
//! `tests/libtorch.rs` on libtorch (libtorch's kernels) and by `tests/fused_flex.rs` on flex
//! (flowrun's Rust kernels).

use burn::module::Module;
use burn::tensor::{Device, Tensor};
use nodes::types::to_vec;

/// max |a − b| / max |a|
pub fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
    let scale = a.iter().map(|x| x.abs()).fold(0.0f32, f32::max).max(1e-6);
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
        / scale
}

/// Fused vs burn: the same gradient (both present, or both absent), within 1e-4 relative.
pub fn assert_same_gradient<const D: usize>(
    what: &str,
    fused: Option<Tensor<D>>,
    burn: Option<Tensor<D>>,
) {
    match (fused, burn) {
        (Some(a), Some(b)) => {
            assert_eq!(a.dims(), b.dims(), "{what}: gradient shape");
            let d = max_rel_diff(&to_vec(&a).unwrap(), &to_vec(&b).unwrap());
            assert!(d < 1e-4, "{what}: gradients differ by {d:e} (relative)");
        }
        (None, None) => {}
        (a, b) => panic!(
            "{what}: gradient present for fused: {}, for burn: {}",
            a.is_some(),
            b.is_some()
        ),
    }
}

/// `fused::conv2d` on `dev` (its fused backward) against burn's `Conv2d`: outputs and the input,
/// weight and bias gradients, whether or not the input is tracked; odd sizes and 1×1.
pub fn conv2d_matches_burn(dev: &Device) {
    use burn::nn::PaddingConfig2d;
    use burn::nn::conv::Conv2dConfig;
    use burn::tensor::Distribution;
    use nodes::model::fused;

    let dev = dev.clone().autodiff();
    let cases = [
        (3, 1, 8, 16, 12, true),
        (1, 0, 16, 8, 6, true),
        (3, 1, 3, 8, 8, true),
        (3, 1, 4, 6, 7, false),
        (3, 0, 5, 3, 9, true),
    ];
    for (k, pad, c_in, c_out, hw, track_x) in cases {
        let mut cfg = Conv2dConfig::new([c_in, c_out], [k, k]);
        if pad > 0 {
            cfg = cfg.with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad));
        }
        let conv = cfg.init(&dev);
        let mut x = Tensor::<4>::random([5, c_in, hw, hw], Distribution::Normal(0.0, 1.0), &dev);
        if track_x {
            x = x.require_grad();
        }

        assert!(
            fused::kernels_for(&x).is_some(),
            "no fused kernels on {dev:?}"
        );
        let y_fused = fused::conv2d(&conv, x.clone());
        let y_burn = conv.forward(x.clone());
        let [_, _, h_out, w_out] = y_burn.dims();
        let r = Tensor::<4>::random(
            [5, c_out, h_out, w_out],
            Distribution::Normal(0.0, 1.0),
            &dev,
        );
        let dy = max_rel_diff(&to_vec(&y_fused).unwrap(), &to_vec(&y_burn).unwrap());
        assert!(dy < 1e-5, "k={k}: outputs differ by {dy:e} (relative)");

        let g_fused = (y_fused * r.clone()).sum().backward();
        let g_burn = (y_burn * r).sum().backward();
        let bias = conv.bias.as_ref().unwrap();
        assert_same_gradient(&format!("k={k} x"), x.grad(&g_fused), x.grad(&g_burn));
        assert_eq!(x.grad(&g_fused).is_some(), track_x, "k={k}: x gradient");
        let (gw_fused, gw_burn) = (conv.weight.grad(&g_fused), conv.weight.grad(&g_burn));
        assert!(gw_fused.is_some(), "k={k}: no weight gradient");
        assert_same_gradient(&format!("k={k} weight"), gw_fused, gw_burn);
        let (gb_fused, gb_burn) = (bias.grad(&g_fused), bias.grad(&g_burn));
        assert!(gb_fused.is_some(), "k={k}: no bias gradient");
        assert_same_gradient(&format!("k={k} bias"), gb_fused, gb_burn);
    }
}

/// `fused::group_norm` on `dev` against burn's composed GroupNorm (+ SiLU), affine or not:
/// outputs with and without autodiff, and the input, gamma and beta gradients.
pub fn group_norm_matches_burn(dev: &Device) {
    use burn::module::Param;
    use burn::nn::GroupNormConfig;
    use burn::tensor::Distribution;
    use burn::tensor::activation::silu;
    use nodes::model::fused;

    let dev = dev.clone().autodiff();
    let cases = [
        (4, 16, 6, true, true),
        (8, 32, 4, false, true),
        (2, 6, 5, true, true),
        (4, 8, 5, false, false),
    ];
    for (groups, c, hw, with_silu, affine) in cases {
        let mut gn = GroupNormConfig::new(groups, c)
            .with_affine(affine)
            .init(&dev);
        if affine {
            // Non-trivial affine parameters (init is gamma = 1, beta = 0).
            let rand = |d| Tensor::<1>::random([c], d, &dev);
            gn.gamma = Some(Param::from_tensor(rand(Distribution::Uniform(0.5, 1.5))));
            gn.beta = Some(Param::from_tensor(rand(Distribution::Normal(0.0, 0.5))));
        }
        let x = Tensor::<4>::random([3, c, hw, hw], Distribution::Normal(1.0, 2.0), &dev)
            .require_grad();
        let r = Tensor::<4>::random([3, c, hw, hw], Distribution::Normal(0.0, 1.0), &dev);

        assert!(
            fused::kernels_for(&x).is_some(),
            "no fused kernels on {dev:?}"
        );
        let y_fused = fused::group_norm(&gn, x.clone(), with_silu);
        let y_burn = if with_silu {
            silu(gn.forward(x.clone()))
        } else {
            gn.forward(x.clone())
        };
        let dy = max_rel_diff(&to_vec(&y_fused).unwrap(), &to_vec(&y_burn).unwrap());
        assert!(dy < 1e-5, "c={c}: outputs differ by {dy:e} (relative)");

        // Without autodiff (sampling) the same fused kernel runs.
        let (x_inner, gn_inner) = (x.clone().inner(), gn.valid());
        let y_inner = fused::group_norm(&gn_inner, x_inner.clone(), with_silu);
        let y_ref = if with_silu {
            silu(gn_inner.forward(x_inner))
        } else {
            gn_inner.forward(x_inner)
        };
        let d = max_rel_diff(&to_vec(&y_inner).unwrap(), &to_vec(&y_ref).unwrap());
        assert!(d < 1e-5, "c={c}: outputs without autodiff differ by {d:e}");

        let g_fused = (y_fused * r.clone()).sum().backward();
        let g_burn = (y_burn * r).sum().backward();
        let gx_fused = x.grad(&g_fused);
        assert!(gx_fused.is_some(), "c={c}: no x gradient");
        assert_same_gradient(&format!("c={c} x"), gx_fused, x.grad(&g_burn));
        for (what, p) in [("gamma", &gn.gamma), ("beta", &gn.beta)] {
            assert_eq!(p.is_some(), affine, "c={c}: {what}");
            if let Some(p) = p {
                let g = p.grad(&g_fused);
                assert!(g.is_some(), "c={c}: no {what} gradient");
                assert_same_gradient(&format!("c={c} {what}"), g, p.grad(&g_burn));
            }
        }
    }
}

/// `fused::group_norm_film_silu` on `dev` against burn's composition: outputs with and without
/// autodiff, and the gradients of x, scale, shift, gamma and beta.
pub fn group_norm_film_silu_matches_burn(dev: &Device) {
    use burn::module::Param;
    use burn::nn::GroupNormConfig;
    use burn::tensor::Distribution;
    use burn::tensor::activation::silu;
    use nodes::model::fused;

    let dev = dev.clone().autodiff();
    let (b, groups, c, hw) = (3, 4, 16, 6);
    let mut gn = GroupNormConfig::new(groups, c).init(&dev);
    let rand = |d| Tensor::<1>::random([c], d, &dev);
    gn.gamma = Some(Param::from_tensor(rand(Distribution::Uniform(0.5, 1.5))));
    gn.beta = Some(Param::from_tensor(rand(Distribution::Normal(0.0, 0.5))));
    let normal =
        |shape: [usize; 4], s| Tensor::<4>::random(shape, Distribution::Normal(0.0, s), &dev);
    let x = (normal([b, c, hw, hw], 2.0) + 1.0).require_grad();
    let scale = normal([b, c, 1, 1], 0.5).require_grad();
    let shift = normal([b, c, 1, 1], 0.5).require_grad();
    let r = normal([b, c, hw, hw], 1.0);
    let burn_film = |gn: &burn::nn::GroupNorm, x, scale: Tensor<4>, shift| {
        silu(gn.forward(x) * scale.add_scalar(1.0) + shift)
    };

    assert!(
        fused::kernels_for(&x).is_some(),
        "no fused kernels on {dev:?}"
    );
    let y_fused = fused::group_norm_film_silu(&gn, x.clone(), scale.clone(), shift.clone());
    let y_burn = burn_film(&gn, x.clone(), scale.clone(), shift.clone());
    let dy = max_rel_diff(&to_vec(&y_fused).unwrap(), &to_vec(&y_burn).unwrap());
    assert!(dy < 1e-5, "outputs differ by {dy:e} (relative)");

    // Without autodiff (sampling) the same fused kernels run.
    let gn_inner = gn.valid();
    let (xi, si, hi) = (
        x.clone().inner(),
        scale.clone().inner(),
        shift.clone().inner(),
    );
    let y_inner = fused::group_norm_film_silu(&gn_inner, xi.clone(), si.clone(), hi.clone());
    let y_ref = burn_film(&gn_inner, xi, si, hi);
    let d = max_rel_diff(&to_vec(&y_inner).unwrap(), &to_vec(&y_ref).unwrap());
    assert!(d < 1e-5, "outputs without autodiff differ by {d:e}");

    let g_fused = (y_fused * r.clone()).sum().backward();
    let g_burn = (y_burn * r).sum().backward();
    for (what, t) in [("x", &x), ("scale", &scale), ("shift", &shift)] {
        let g = t.grad(&g_fused);
        assert!(g.is_some(), "no {what} gradient");
        assert_same_gradient(what, g, t.grad(&g_burn));
    }
    for (what, p) in [("gamma", &gn.gamma), ("beta", &gn.beta)] {
        let p = p.as_ref().unwrap();
        let g = p.grad(&g_fused);
        assert!(g.is_some(), "no {what} gradient");
        assert_same_gradient(what, g, p.grad(&g_burn));
    }
}

/// `fused::attention` on `dev` against softmax(q kᵀ/√dh + bias) v from burn's ops: outputs (with
/// and without autodiff, where `dev` has a kernel for them) and the q, k, v gradients, each
/// tracked or not.
pub fn attention_matches_burn(dev: &Device) {
    use burn::tensor::Distribution;
    use burn::tensor::activation::softmax;
    use nodes::model::fused;

    // Composed like burn's autodiff path: softmax(q kᵀ/√dh + bias) v.
    fn composed(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, bias: Tensor<4>) -> Tensor<4> {
        let [_, _, _, dh] = q.dims();
        let scores = q
            .mul_scalar(1.0 / (dh as f32).sqrt())
            .matmul(k.swap_dims(2, 3))
            + bias;
        softmax(scores, 3).matmul(v)
    }

    for autodiff in [true, false] {
        let dev = if autodiff {
            dev.clone().autodiff()
        } else {
            dev.clone()
        };
        // (batch, heads, queries, keys, head width, which of q/k/v are tracked)
        for (b, h, lq, lk, dh, tracked) in [
            (3, 2, 16, 20, 8, [true, true, true]),
            (2, 4, 9, 5, 16, [false, true, false]),
        ] {
            let rand = |l| Tensor::<4>::random([b, h, l, dh], Distribution::Normal(0.0, 1.0), &dev);
            let track = |t: Tensor<4>, on: bool| if on && autodiff { t.require_grad() } else { t };
            let q = track(rand(lq), tracked[0]);
            let k = track(rand(lk), tracked[1]);
            let v = track(rand(lk), tracked[2]);
            // Key bias: the last two keys of batch 0 and every key of batch 1 masked. A fully
            // masked row (the null prompt's cross-attention) is a uniform average of
            // -1e4-shifted logits, which f32 rounds differently per kernel, so, as the model
            // does, its output is zeroed ("any key kept").
            let mut bias = vec![0.0f32; b * lk];
            bias[lk - 2..lk].fill(-1.0e4);
            bias[lk..2 * lk].fill(-1.0e4);
            let bias = Tensor::<1>::from_floats(bias.as_slice(), &dev).reshape([b, 1, 1, lk]);
            let any = bias.clone().equal_elem(0.0).float().max_dim(3);
            let r = Tensor::<4>::random([b, h, lq, dh], Distribution::Normal(0.0, 1.0), &dev);

            let what = format!("autodiff={autodiff} b={b} lq={lq} lk={lk}");
            let Some(y_fused) = fused::attention(&q, &k, &v, &bias) else {
                // flex without autodiff keeps burn's own fused attention.
                assert!(
                    !autodiff,
                    "{what}: no attention kernel under autodiff on {dev:?}"
                );
                continue;
            };
            let y_fused = y_fused * any.clone();
            let y_burn = composed(q.clone(), k.clone(), v.clone(), bias) * any;
            let dy = max_rel_diff(&to_vec(&y_fused).unwrap(), &to_vec(&y_burn).unwrap());
            assert!(dy < 1e-4, "{what}: outputs differ by {dy:e} (relative)");
            if !autodiff {
                continue;
            }
            let g_fused = (y_fused * r.clone()).sum().backward();
            let g_burn = (y_burn * r).sum().backward();
            for (name, t, on) in [
                ("q", &q, tracked[0]),
                ("k", &k, tracked[1]),
                ("v", &v, tracked[2]),
            ] {
                let g = t.grad(&g_fused);
                assert_eq!(g.is_some(), on, "{what}: {name} gradient present");
                assert_same_gradient(&format!("{what} {name}"), g, t.grad(&g_burn));
            }
        }
    }
}

/// `fused::layer_norm` on `dev` against LayerNorm over the last axis from burn's ops (no affine
/// parameters, biased variance): outputs and the input gradient, with and without autodiff.
pub fn layer_norm_matches_burn(dev: &Device) {
    use burn::tensor::Distribution;
    use nodes::model::fused;

    let composed = |x: Tensor<3>, eps: f64| {
        let centred = x.clone() - x.mean_dim(2);
        let var = centred.clone().square().mean_dim(2);
        centred / var.add_scalar(eps).sqrt()
    };
    for (b, t, d) in [(2, 5, 24), (3, 7, 37), (1, 1, 16)] {
        let what = format!("[{b}, {t}, {d}]");
        let ad = dev.clone().autodiff();
        let x =
            (Tensor::<3>::random([b, t, d], Distribution::Normal(0.5, 2.0), &ad)).require_grad();
        let y_fused = fused::layer_norm(&x, 1e-6).expect("a layer_norm kernel on this device");
        let y_burn = composed(x.clone(), 1e-6);
        let dy = max_rel_diff(&to_vec(&y_fused).unwrap(), &to_vec(&y_burn).unwrap());
        assert!(dy < 1e-5, "{what}: outputs differ by {dy:e} (relative)");
        let xi = x.clone().inner();
        let yi = fused::layer_norm(&xi, 1e-6).expect("a layer_norm kernel without autodiff");
        let di = max_rel_diff(&to_vec(&yi).unwrap(), &to_vec(&composed(xi, 1e-6)).unwrap());
        assert!(
            di < 1e-5,
            "{what}: outputs without autodiff differ by {di:e}"
        );
        let r = Tensor::<3>::random([b, t, d], Distribution::Normal(0.0, 1.0), &ad);
        let g_fused = (y_fused * r.clone()).sum().backward();
        let g_burn = (y_burn * r).sum().backward();
        let g = x.grad(&g_fused);
        assert!(g.is_some(), "{what}: no x gradient");
        assert_same_gradient(&format!("{what} x"), g, x.grad(&g_burn));
    }
}
