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

fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
    let scale = a.iter().map(|x| x.abs()).fold(0.0f32, f32::max).max(1e-6);
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
        / scale
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
