//! Cross-backend checks, compiled only with `--features tch`: the same weights and inputs give
//! the same velocity on flex and on libtorch (CPU; CUDA when `FLOWRUN_TEST_CUDA=1`).
#![cfg(feature = "tch")]

use burn::module::Module;
use burn::tensor::{Device, Tensor};
use nodes::device::{DeviceKind, device};
use nodes::model::{
    FlowModelConfig, load_safetensors, sample_standard_normal, save_safetensors, tensor_from_vec,
};
use nodes::types::to_vec;
use nodes::world;
use rand::SeedableRng;

mod common;
use common::fused::{assert_same_gradient, max_rel_diff};

fn velocity(kind: DeviceKind, path: &std::path::Path) -> Vec<f32> {
    let dev: Device = device(kind);
    let (_, model) = load_safetensors(path, &dev).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
    let b = 4;
    let x = tensor_from_vec(
        sample_standard_normal(&mut rng, b * world::IMAGE_LEN),
        [b, 3, 32, 32],
        &dev,
    );
    let t = tensor_from_vec(vec![1.0, 0.7, 0.4, 0.1], [b], &dev);
    let toks: Vec<i64> = (0..b)
        .flat_map(|i| {
            world::tokenize(
                [
                    "a red circle",
                    "two blue squares",
                    "a green cross",
                    "a circle",
                ][i],
            )
            .unwrap()
        })
        .map(|x| x as i64)
        .collect();
    let tokens = nodes::model::int_tensor_from_vec(toks, [b, world::MAX_TOKENS], &dev);
    let v: Tensor<4> = model.forward(x, t, tokens);
    to_vec(&v).unwrap()
}

#[test]
fn should_give_the_same_velocity_on_flex_and_libtorch() {
    // A small model with non-zero output weights (the default init zeroes the output conv):
    // train it briefly on flex so the comparison is not 0 == 0.
    let dev = Device::flex();
    let cfg = FlowModelConfig::tiny(world::vocab_size(), world::MAX_TOKENS).with_seed(11);
    let mut trainer =
        nodes::model::Trainer::new(&cfg, nodes::model::TrainerConfig::new().with_lr(1e-2), &dev);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
    let ad = trainer.device().clone();
    for _ in 0..3 {
        let x0 = tensor_from_vec(
            sample_standard_normal(&mut rng, 4 * world::IMAGE_LEN),
            [4, 3, 32, 32],
            &ad,
        );
        let n = tensor_from_vec(
            sample_standard_normal(&mut rng, 4 * world::IMAGE_LEN),
            [4, 3, 32, 32],
            &ad,
        );
        let t = tensor_from_vec(vec![0.2, 0.4, 0.6, 0.8], [4], &ad);
        let tok = nodes::model::int_tensor_from_vec(
            vec![3; 4 * world::MAX_TOKENS],
            [4, world::MAX_TOKENS],
            &ad,
        );
        trainer.step(x0, n, t, tok);
    }
    let dir = std::env::temp_dir().join(format!("flowrun-xbackend-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("m.safetensors");
    save_safetensors(&trainer.model().valid(), &path).unwrap();
    let flex = velocity(DeviceKind::Flex, &path);
    assert!(
        flex.iter().any(|v| v.abs() > 1e-4),
        "velocity is zero: nothing compared"
    );
    let torch = velocity(DeviceKind::LibTorch, &path);
    let d = max_rel_diff(&flex, &torch);
    println!("flex vs libtorch CPU: max |Δv| / max |v| = {d:e}");
    assert!(d < 1e-4, "flex and libtorch differ: {d}");
    if std::env::var("FLOWRUN_TEST_CUDA").as_deref() == Ok("1") {
        let cuda = velocity(DeviceKind::LibTorchCuda(0), &path);
        let d = max_rel_diff(&flex, &cuda);
        println!("flex vs libtorch CUDA: max |Δv| / max |v| = {d:e}");
        assert!(d < 1e-3, "flex and libtorch CUDA differ: {d}");
    }
}

/// `fused::conv2d` on libtorch back-propagates through libtorch's own convolution backward.
#[test]
#[allow(deprecated)] // burn marks burn-tch deprecated; it is our libtorch path
fn should_match_burns_conv_gradients_with_the_native_libtorch_backward() {
    common::fused::conv2d_matches_burn(&Device::libtorch());
}

/// `fused::group_norm` on libtorch runs libtorch's `group_norm` (+ `silu`) and their backward.
#[test]
#[allow(deprecated)] // burn marks burn-tch deprecated; it is our libtorch path
fn should_match_burns_group_norm_with_the_native_libtorch_kernels() {
    common::fused::group_norm_matches_burn(&Device::libtorch());
}

#[test]
#[allow(deprecated)] // burn marks burn-tch deprecated; it is our libtorch path
fn should_match_burns_group_norm_film_silu_with_libtorchs_kernels() {
    common::fused::group_norm_film_silu_matches_burn(&Device::libtorch());
}

/// The convolution's weight gradient reads its (untracked) input: after the forward, an op that
/// burn-tch could run in place on that input (`x - y`, with `x` consumed) must not overwrite what
/// libtorch's graph saved. Regression: this failed libtorch's version check in the backward.
#[test]
#[allow(deprecated)] // burn marks burn-tch deprecated; it is our libtorch path
fn should_keep_an_untracked_input_intact_for_the_native_backward() {
    use burn::nn::PaddingConfig2d;
    use burn::nn::conv::Conv2dConfig;
    use burn::tensor::Distribution;
    use nodes::model::fused;

    let dev = Device::libtorch().autodiff();
    let conv = Conv2dConfig::new([3, 3], [3, 3])
        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
        .init(&dev);
    let data = Tensor::<4>::random([4, 3, 8, 8], Distribution::Normal(0.0, 1.0), &dev).into_data();
    let gradients = |native: bool| {
        let x = Tensor::<4>::from_data(data.clone(), &dev);
        let y = if native {
            fused::conv2d(&conv, x.clone())
        } else {
            conv.forward(x.clone())
        };
        // `x` is consumed here: burn-tch may write `x - y` into x's storage unless something
        // else still holds it.
        let loss = (x - y).square().mean();
        let grads = loss.backward();
        conv.weight.grad(&grads).expect("weight gradient")
    };
    assert_same_gradient("weight", Some(gradients(true)), Some(gradients(false)));
}

#[test]
#[allow(deprecated)] // burn marks burn-tch deprecated; it is our libtorch path
fn should_match_burns_layer_norm_with_libtorchs_kernel() {
    common::fused::layer_norm_matches_burn(&Device::libtorch());
}

#[test]
#[allow(deprecated)] // burn marks burn-tch deprecated; it is our libtorch path
fn should_match_burns_attention_with_libtorchs_kernel() {
    common::fused::attention_matches_burn(&Device::libtorch());
}

/// Sample one TAFS transition from `x` at t → t_next with the policy (as the samplers do).
fn kept_transition(
    res: &nodes::flow_model::FlowModelRes,
    prompts: &nodes::types::PromptBatch,
    x: &Tensor<4>,
    (t, t_next, tau): (f32, f32, f32),
    seed: u64,
) -> nodes::types::Transition {
    use nodes::grpo::LinearGaussian;
    let dev = res.device.clone();
    let b = prompts.len();
    let (v, graph) = res
        .sampler()
        .velocity(x, t, &prompts.conditioning(&dev), 1.0, true)
        .unwrap();
    let k = LinearGaussian::tafs(t, t_next, tau).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let eps = tensor_from_vec(
        sample_standard_normal(&mut rng, b * world::IMAGE_LEN),
        [b, 3, 32, 32],
        &dev,
    );
    let (x_next, old_logprob) = nodes::grpo::gaussian_step(x, &v, k, eps).unwrap();
    nodes::types::Transition {
        step: 1,
        t,
        t_next,
        tau,
        kernel: k,
        sde_std: k.std,
        cfg: 1.0,
        x_t: x.clone(),
        x_next,
        old_logprob,
        sampler: "tafs",
        graph,
        branch: None,
    }
}

#[test]
fn should_take_the_same_grpo_step_through_the_kept_rollout_graph_on_libtorch() {
    // Two chained transitions of the shipped model on libtorch (recorded native ops in every
    // graph, both graphs alive at once): back-propagating through the samplers' kept graphs must
    // give the recomputed update's gradient and weights.
    use nodes::flow_model::FlowModelRes;
    use nodes::grpo_update::GrpoUpdate;
    use nodes::model::TrainerConfig;
    use nodes::types::Advantages;
    use std::sync::Arc;
    let dev = device(DeviceKind::LibTorch);
    let recs: Vec<_> = world::generate_split(5, world::Split::Train, 3)
        .into_iter()
        .map(Arc::new)
        .collect();
    let prompts = nodes::prompt_loader::make_batch(&recs, 2).unwrap();
    let b = prompts.len();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(12);
    let noise = tensor_from_vec(
        sample_standard_normal(&mut rng, b * world::IMAGE_LEN),
        [b, 3, 32, 32],
        &dev,
    );
    let probe = |res: &FlowModelRes| {
        let v = res.sampling_model().unwrap().forward(
            noise.clone(),
            Tensor::<1>::full([b], 0.6, &dev),
            prompts.tokens_tensor(&dev),
        );
        to_vec(&v).unwrap()
    };
    let run = |keep: bool| {
        let path = std::path::Path::new("checkpoints/shapes-small.safetensors");
        let (_, model) = load_safetensors(path, &dev).unwrap();
        let mut res = FlowModelRes::new(model, TrainerConfig::new().with_lr(1e-3), false, false);
        res.keep_rollout_graph = keep;
        let first = kept_transition(&res, &prompts, &noise, (1.0, 0.75, 0.8), 1);
        let second = kept_transition(&res, &prompts, &first.x_next, (0.75, 0.5, 0.5), 2);
        let adv = Advantages {
            values: vec![
                vec![1.0, -1.0, 0.5, -0.5, 0.3, -0.3],
                vec![-0.2, 0.9, -1.1, 0.4, 1.0, -1.0],
            ],
            mode: "step".into(),
            mask: None,
        };
        let before = probe(&res);
        let up = GrpoUpdate {
            clip: 10.0,
            adv_clip: 5.0,
            beta: 0.0,
            epochs: 1,
            minibatch: 0,
            grad_accum: 1,
        };
        let st = up
            .update(&mut res, &[&first, &second], &adv, &prompts, 0)
            .unwrap();
        (st, before, probe(&res))
    };
    let (kept, before, w_kept) = run(true);
    let (rec, _, w_rec) = run(false);
    assert_eq!(kept.graphs_reused, 2);
    assert_eq!(rec.graphs_reused, 0);
    let rel = (kept.grad_norm - rec.grad_norm).abs() / rec.grad_norm;
    assert!(
        rec.grad_norm > 0.0 && rel < 1e-4,
        "grad norm {} vs {}",
        kept.grad_norm,
        rec.grad_norm
    );
    let moved = max_rel_diff(&before, &w_rec);
    let diff = max_rel_diff(&w_kept, &w_rec);
    assert!(moved > 1e-4, "the update did not move the model ({moved})");
    assert!(
        diff < moved * 1e-2,
        "kept-graph weights differ by {diff} (update moved {moved})"
    );
}
