use std::path::PathBuf;
use std::time::Instant;

use burn::module::Module;
use burn::tensor::{Device, Int, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::*;
use crate::model::*;

const VOCAB: usize = 20;
const MAX_TOKENS: usize = 8;

fn device() -> Device {
    Device::flex()
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "flowrun-model-{name}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Deterministic mini-batch: (x0, noise, t, tokens) as host vectors.
fn batch_data(b: usize, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<i64>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n = b * 3 * 32 * 32;
    // Structured "images": a colour per prompt, a square whose position depends on the row.
    let mut x0 = vec![-1.0f32; n];
    let mut tokens = vec![0i64; b * MAX_TOKENS];
    for i in 0..b {
        let colour = i % 3;
        let off = (i * 5) % 16;
        for y in off..off + 12 {
            for x in off..off + 12 {
                x0[i * 3072 + colour * 1024 + y * 32 + x] = 1.0;
            }
        }
        let len = 2 + i % 4;
        for j in 0..len {
            tokens[i * MAX_TOKENS + j] = (1 + (colour * 5 + j + off) % (VOCAB - 1)) as i64;
        }
    }
    let noise = sample_standard_normal(&mut rng, n);
    let t = sample_logit_normal(&mut rng, b, 0.0, 1.0);
    (x0, noise, t, tokens)
}

fn batch(b: usize, seed: u64, dev: &Device) -> (Tensor<4>, Tensor<4>, Tensor<1>, Tensor<2, Int>) {
    let (x0, noise, t, tokens) = batch_data(b, seed);
    (
        tensor_from_vec(x0, [b, 3, 32, 32], dev),
        tensor_from_vec(noise, [b, 3, 32, 32], dev),
        tensor_from_vec(t, [b], dev),
        int_tensor_from_vec(tokens, [b, MAX_TOKENS], dev),
    )
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    checkpoint::tensor_values(t)
}

/// Model with non-zero output conv so outputs depend on every part of the network.
fn perturbed_tiny(dev: &Device) -> FlowModel {
    let cfg = FlowModelConfig::tiny(VOCAB, MAX_TOKENS);
    let mut trainer = Trainer::from_model(cfg.init(dev), TrainerConfig::new().with_lr(1e-2));
    let (x0, noise, t, tokens) = batch(4, 1, dev);
    for _ in 0..2 {
        trainer.step(x0.clone(), noise.clone(), t.clone(), tokens.clone());
    }
    trainer.model().valid()
}

#[test]
fn should_produce_velocity_with_image_shape() {
    let dev = device();
    let model = FlowModelConfig::tiny(VOCAB, MAX_TOKENS).init(&dev);
    let (x0, _, t, tokens) = batch(2, 0, &dev);
    let v = model.forward(x0, t, tokens);
    assert_eq!(v.dims(), [2, 3, 32, 32]);
}

#[test]
fn should_predict_zero_velocity_at_init() {
    let dev = device();
    let model = FlowModelConfig::tiny(VOCAB, MAX_TOKENS).init(&dev);
    let (x0, _, t, tokens) = batch(2, 0, &dev);
    let v = values(model.forward(x0, t, tokens));
    assert!(v.iter().all(|x| *x == 0.0));
}

#[test]
fn should_init_deterministically_from_seed() {
    let dev = device();
    let cfg = FlowModelConfig::tiny(VOCAB, MAX_TOKENS);
    let a = checkpoint::collect_params(&cfg.init(&dev), "");
    let b = checkpoint::collect_params(&cfg.init(&dev), "");
    assert_eq!(a, b);
    let c = checkpoint::collect_params(&cfg.clone().with_seed(1).init(&dev), "");
    assert_ne!(a, c);
}

#[test]
fn should_have_about_2_5m_params_in_small_config() {
    let dev = device();
    let model = FlowModelConfig::small(64, 16).init(&dev);
    let n = model.num_params();
    println!("small config params: {n}");
    assert!((2_000_000..3_200_000).contains(&n), "params = {n}");
}

#[test]
fn should_match_plain_forward_when_cfg_scale_is_one() {
    let dev = device();
    let model = perturbed_tiny(&dev);
    let (x0, _, t, tokens) = batch(2, 3, &dev);
    let a = values(model.forward(x0.clone(), t.clone(), tokens.clone()));
    let b = values(model.forward_cfg(x0.clone(), t.clone(), tokens.clone(), 1.0));
    assert_eq!(a, b);
    // s = 2: v_u + 2 (v_c − v_u) computed from separate forwards.
    let vc = values(model.forward(x0.clone(), t.clone(), tokens.clone()));
    let vu = values(model.forward(x0.clone(), t.clone(), tokens.clone().zeros_like()));
    let g = values(model.forward_cfg(x0, t, tokens, 2.0));
    for i in 0..g.len() {
        let want = vu[i] + 2.0 * (vc[i] - vu[i]);
        assert!((g[i] - want).abs() < 1e-4, "{i}: {} vs {want}", g[i]);
    }
}

#[test]
fn should_ignore_padding_tokens_beyond_prompt() {
    // Changing the tokens' padded length (more trailing pads) must not change the output.
    let dev = device();
    let model = perturbed_tiny(&dev);
    let (x0, _, t, _) = batch(1, 3, &dev);
    let short = int_tensor_from_vec(vec![3, 4, 5, 0], [1, 4], &dev);
    let long = int_tensor_from_vec(vec![3, 4, 5, 0, 0, 0, 0, 0], [1, 8], &dev);
    let a = values(model.forward(x0.clone(), t.clone(), short));
    let b = values(model.forward(x0, t, long));
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() < 1e-5);
    }
}

#[test]
fn should_match_fused_and_composed_attention() {
    let dev = device();
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let (b, h, lq, lk, dh) = (2, 2, 5, 7, 4);
    let q = tensor_from_vec(
        sample_standard_normal(&mut rng, b * h * lq * dh),
        [b, h, lq, dh],
        &dev,
    );
    let k = tensor_from_vec(
        sample_standard_normal(&mut rng, b * h * lk * dh),
        [b, h, lk, dh],
        &dev,
    );
    let v = tensor_from_vec(
        sample_standard_normal(&mut rng, b * h * lk * dh),
        [b, h, lk, dh],
        &dev,
    );
    let pad = int_tensor_from_vec(
        vec![1, 1, 1, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 0],
        [b, lk],
        &dev,
    )
    .equal_elem(0);
    let bias = layers::key_bias_from_pad(pad);
    let fused = values(layers::attend(
        q.clone(),
        k.clone(),
        v.clone(),
        bias.clone(),
    ));
    let composed = values(layers::attend_composed(q, k, v, bias));
    for (a, c) in fused.iter().zip(&composed) {
        assert!((a - c).abs() < 1e-4, "{a} vs {c}");
    }
}

#[test]
fn should_match_inference_and_autodiff_forward() {
    let dev = device();
    let model = perturbed_tiny(&dev);
    let (x0, _, t, tokens) = batch(2, 8, &dev);
    let a = values(model.forward(x0.clone(), t.clone(), tokens.clone()));
    let ad = model.train();
    let b = values(ad.forward(x0, t, tokens));
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() < 1e-4, "{x} vs {y}");
    }
}

#[test]
fn should_decrease_loss_on_fixed_batch() {
    let dev = device();
    let cfg = FlowModelConfig::tiny(VOCAB, MAX_TOKENS).with_cfg_dropout(0.0);
    let mut trainer = Trainer::new(&cfg, TrainerConfig::new().with_lr(3e-3), &dev);
    let (x0, noise, t, tokens) = batch(8, 7, &dev);
    let start = Instant::now();
    let mut losses = Vec::new();
    for _ in 0..50 {
        losses.push(trainer.step(x0.clone(), noise.clone(), t.clone(), tokens.clone()));
    }
    println!(
        "tiny: 50 steps in {:?}, loss {:.4} -> {:.4}",
        start.elapsed(),
        losses[0],
        losses[49]
    );
    assert!(losses.iter().all(|l| l.is_finite()));
    let first = losses[..5].iter().sum::<f32>() / 5.0;
    let last = losses[45..].iter().sum::<f32>() / 5.0;
    assert!(last < 0.7 * first, "loss {first} -> {last}");
}

#[test]
fn should_be_deterministic_across_runs() {
    let dev = device();
    let cfg = FlowModelConfig::tiny(VOCAB, MAX_TOKENS).with_cfg_dropout(0.5);
    let run = || {
        let mut trainer = Trainer::new(&cfg, TrainerConfig::new().with_lr(1e-3), &dev);
        let (x0, noise, t, tokens) = batch(4, 2, &dev);
        (0..3)
            .map(|_| trainer.step(x0.clone(), noise.clone(), t.clone(), tokens.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(run(), run());
}

#[test]
fn should_flow_gradient_to_text_encoder() {
    let dev = device().autodiff();
    // Perturb so that the zero-init output conv does not block gradients to earlier layers.
    let model = perturbed_tiny(&device()).train();
    let (x0, noise, t, tokens) = batch(2, 5, &dev);
    let loss = flow_matching_loss(&model, x0, noise, t, &tokens.into()).unwrap();
    let grads = loss.backward();
    let emb = model.text.token_embedding.weight.val();
    let g = emb.grad(&grads).expect("token embedding has a gradient");
    let gsum: f32 = values(g.abs().sum())[0];
    assert!(gsum > 0.0, "token embedding gradient is zero");
    let pos = model.text.pos_embedding.val();
    let g = pos.grad(&grads).expect("pos embedding has a gradient");
    assert!(values(g.abs().sum())[0] > 0.0);
    let qkv = model.text.layers[0].qkv.weight.val();
    let g = qkv.grad(&grads).expect("text attention has a gradient");
    assert!(values(g.abs().sum())[0] > 0.0);
}

#[test]
fn should_average_2x2_blocks_and_repeat_pixels_with_their_gradients() {
    let dev = device().autodiff();
    // [1, 2, 2, 4]: two channels, values 0..16.
    let x = tensor_from_vec((0..16).map(|v| v as f32).collect(), [1, 2, 2, 4], &dev).require_grad();
    let down = layers::downsample(x.clone());
    assert_eq!(down.dims(), [1, 2, 1, 2]);
    // Each output is the mean of one 2×2 block.
    assert_eq!(values(down.clone()), vec![2.5, 4.5, 10.5, 12.5]);
    // [1, 2, 1, 2] → [1, 2, 2, 4]: every pixel repeated in a 2×2 block.
    let up = layers::upsample(down.clone());
    assert_eq!(up.dims(), [1, 2, 2, 4]);
    assert_eq!(
        values(up.clone()),
        vec![
            2.5, 2.5, 4.5, 4.5, 2.5, 2.5, 4.5, 4.5, 10.5, 10.5, 12.5, 12.5, 10.5, 10.5, 12.5, 12.5
        ]
    );
    // d/dx Σ w·up(down(x)) with w = 1..16: each block's four weights summed, spread back as /4.
    let w = tensor_from_vec((1..=16).map(|v| v as f32).collect(), [1, 2, 2, 4], &dev);
    let grads = (up * w).sum().backward();
    let g = values(x.grad(&grads).expect("input has a gradient"));
    // Block sums of w: [1,2,5,6]=14, [3,4,7,8]=22, [9,10,13,14]=46, [11,12,15,16]=54.
    let per_block = [14.0f32, 22.0, 46.0, 54.0].map(|s| s / 4.0);
    let expected: Vec<f32> = (0..16)
        .map(|i| {
            // Channel i / 8, column i % 4 (both rows of a block share it).
            per_block[(i / 8) * 2 + (i % 4) / 2]
        })
        .collect();
    assert_eq!(g, expected);
}

#[test]
fn should_round_trip_safetensors_checkpoint() {
    let dev = device();
    let model = perturbed_tiny(&dev);
    let dir = temp_dir("roundtrip");
    let path = dir.join("model.safetensors");
    save_safetensors(&model, &path).unwrap();
    let (cfg, loaded) = load_safetensors(&path, &dev).unwrap();
    assert_eq!(&cfg, model.config());
    let (x0, _, t, tokens) = batch(2, 9, &dev);
    let a = values(model.forward(x0.clone(), t.clone(), tokens.clone()));
    let b = values(loaded.forward(x0, t, tokens));
    assert_eq!(a, b);
    // No temp files left behind.
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["model.safetensors".to_string()]);
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn should_error_on_corrupt_or_mismatched_checkpoint() {
    let dev = device();
    let dir = temp_dir("corrupt");
    // Garbage bytes.
    let garbage = dir.join("garbage.safetensors");
    std::fs::write(&garbage, b"not a safetensors file at all").unwrap();
    let err = load_safetensors(&garbage, &dev).unwrap_err().to_string();
    assert!(err.contains("garbage.safetensors"), "{err}");

    // Truncated file.
    let model = FlowModelConfig::tiny(VOCAB, MAX_TOKENS).init(&dev);
    let good = dir.join("good.safetensors");
    save_safetensors(&model, &good).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let truncated = dir.join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() - 100]).unwrap();
    let err = format!("{:#}", load_safetensors(&truncated, &dev).unwrap_err());
    assert!(err.contains("truncated.safetensors"), "{err}");

    // Mismatched shapes: weights of one config, metadata of another.
    let other = FlowModelConfig::tiny(VOCAB, MAX_TOKENS).with_text_dim(16);
    let tensors = checkpoint::collect_params(&model, "");
    let mut meta = std::collections::HashMap::new();
    meta.insert(
        checkpoint::CONFIG_KEY.to_string(),
        serde_json::to_string(&other).unwrap(),
    );
    let mismatched = dir.join("mismatched.safetensors");
    std::fs::write(
        &mismatched,
        checkpoint::serialize_safetensors(&tensors, meta).unwrap(),
    )
    .unwrap();
    let err = format!("{:#}", load_safetensors(&mismatched, &dev).unwrap_err());
    assert!(err.contains("mismatched.safetensors"), "{err}");
    assert!(
        err.contains("text.token_embedding.weight (file [20, 32], model [20, 16])"),
        "{err}"
    );
    assert!(err.contains("mis-shaped key(s)"), "{err}");

    // Missing config metadata.
    let nometa = dir.join("nometa.safetensors");
    std::fs::write(
        &nometa,
        checkpoint::serialize_safetensors(&tensors, Default::default()).unwrap(),
    )
    .unwrap();
    let err = format!("{:#}", load_safetensors(&nometa, &dev).unwrap_err());
    assert!(err.contains("flowrun.config"), "{err}");

    // Missing file.
    assert!(load_safetensors(&dir.join("absent.safetensors"), &dev).is_err());
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn should_resume_training_exactly_from_saved_state() {
    let dev = device();
    let cfg = FlowModelConfig::tiny(VOCAB, MAX_TOKENS).with_cfg_dropout(0.5);
    let tcfg = TrainerConfig::new()
        .with_lr(2e-3)
        .with_warmup_steps(2)
        .with_ema_decay(0.9);
    let (x0, noise, t, tokens) = batch(4, 11, &dev);
    let mut a = Trainer::new(&cfg, tcfg.clone(), &dev);
    for _ in 0..3 {
        a.step(x0.clone(), noise.clone(), t.clone(), tokens.clone());
    }
    let dir = temp_dir("resume");
    let path = dir.join("state.safetensors");
    a.save_state(&path).unwrap();
    let mut b = Trainer::load_state(&path, &dev).unwrap();
    assert_eq!(b.step_count(), 3);
    assert_eq!(b.config, tcfg);
    for _ in 0..2 {
        let la = a.step(x0.clone(), noise.clone(), t.clone(), tokens.clone());
        let lb = b.step(x0.clone(), noise.clone(), t.clone(), tokens.clone());
        assert_eq!(la, lb);
    }
    assert_eq!(
        checkpoint::collect_params(&a.ema(), ""),
        checkpoint::collect_params(&b.ema(), "")
    );
    assert_eq!(
        checkpoint::collect_params(&a.model().valid(), ""),
        checkpoint::collect_params(&b.model().valid(), "")
    );
    // A model checkpoint is not a trainer state.
    let model_path = dir.join("model.safetensors");
    save_safetensors(&a.ema(), &model_path).unwrap();
    assert!(Trainer::<FlowModel>::load_state(&model_path, &dev).is_err());
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn should_keep_no_ema_copy_with_ema_decay_zero_and_resume_either_way() {
    let dev = device();
    let cfg = FlowModelConfig::tiny(VOCAB, MAX_TOKENS);
    let tcfg = TrainerConfig::new().with_lr(2e-3).with_ema_decay(0.0);
    let (x0, noise, t, tokens) = batch(4, 11, &dev);
    let mut with = Trainer::new(&cfg, tcfg.clone().with_ema_decay(0.5), &dev);
    let mut without = Trainer::new(&cfg, tcfg.clone(), &dev);
    for _ in 0..2 {
        let a = with.step(x0.clone(), noise.clone(), t.clone(), tokens.clone());
        let b = without.step(x0.clone(), noise.clone(), t.clone(), tokens.clone());
        assert_eq!(a, b, "the EMA must not change training");
    }
    // The "EMA" of decay 0 is the weights themselves.
    let weights = checkpoint::collect_params(&without.model().valid(), "");
    assert_eq!(checkpoint::collect_params(&without.ema(), ""), weights);
    assert_ne!(checkpoint::collect_params(&with.ema(), ""), weights);
    let dir = temp_dir("no-ema");
    let path = dir.join("state.safetensors");
    without.save_state(&path).unwrap();
    let file = checkpoint::SafetensorsFile::read(&path).unwrap();
    assert!(file.names().any(|n| n.starts_with("model.")));
    assert!(
        !file.names().any(|n| n.starts_with("ema.")),
        "no EMA copy saved"
    );
    // Resumed without an EMA, then switched on: it starts from the weights before the step.
    let mut resumed = Trainer::<FlowModel>::load_state(&path, &dev).unwrap();
    assert_eq!(checkpoint::collect_params(&resumed.ema(), ""), weights);
    resumed.config.ema_decay = 0.5;
    let before = checkpoint::collect_params(&resumed.model().valid(), "");
    resumed.step(x0.clone(), noise.clone(), t.clone(), tokens.clone());
    let after = checkpoint::collect_params(&resumed.model().valid(), "");
    let ema = checkpoint::collect_params(&resumed.ema(), "");
    // decay min(0.5, (1 + 2) / (10 + 2)) = 0.25: ema = 0.25·before + 0.75·after.
    for ((e, b), a) in ema.iter().zip(&before).zip(&after) {
        for ((ev, bv), av) in e.values.iter().zip(&b.values).zip(&a.values) {
            assert!((ev - (0.25 * bv + 0.75 * av)).abs() <= 1e-6, "{}", e.name);
        }
    }
    resumed.save_state(&path).unwrap();
    let file = checkpoint::SafetensorsFile::read(&path).unwrap();
    assert!(file.names().any(|n| n.starts_with("ema.")));
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn should_sample_with_euler_deterministically() {
    let dev = device();
    let model = perturbed_tiny(&dev);
    let (_, noise, _, tokens) = batch(2, 4, &dev);
    let a = values(sample_euler(&model, noise.clone(), &tokens.clone().into(), 4, 3.0).unwrap());
    let b = values(sample_euler(&model, noise, &tokens.into(), 4, 3.0).unwrap());
    assert_eq!(a, b);
    assert!(a.iter().all(|x| x.is_finite()));
}

fn python_has_safetensors() -> bool {
    std::process::Command::new("python3")
        .args(["-c", "import safetensors, numpy"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

#[test]
fn should_be_readable_from_python_safetensors() {
    if !python_has_safetensors() {
        println!("skipping: python3 with safetensors + numpy not available");
        return;
    }
    let dev = device();
    let model = perturbed_tiny(&dev);
    let dir = temp_dir("python");
    let path = dir.join("model.safetensors");
    save_safetensors(&model, &path).unwrap();
    let name = "down.0.blocks.0.conv1.weight";
    let expected = values(model.down[0].blocks[0].conv1.weight.val());
    let script = format!(
        "import json, sys\n\
         from safetensors.numpy import load_file\n\
         from safetensors import safe_open\n\
         t = load_file(sys.argv[1])\n\
         a = t['{name}']\n\
         with safe_open(sys.argv[1], framework='np') as f:\n\
         \x20   cfg = json.loads(f.metadata()['flowrun.config'])\n\
         print(json.dumps({{'shape': list(a.shape), 'dtype': str(a.dtype), 'values': [float(x) for x in a.reshape(-1)], 'vocab': cfg['vocab_size']}}))\n"
    );
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(&script)
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["dtype"], "float32");
    assert_eq!(v["vocab"], VOCAB);
    let shape: Vec<usize> = serde_json::from_value(v["shape"].clone()).unwrap();
    assert_eq!(
        shape,
        model.down[0].blocks[0].conv1.weight.val().dims().to_vec()
    );
    let got: Vec<f32> = serde_json::from_value::<Vec<f64>>(v["values"].clone())
        .unwrap()
        .into_iter()
        .map(|x| x as f32)
        .collect();
    assert_eq!(got, expected);
    std::fs::remove_dir_all(dir).ok();
}

/// Timing report for the default config (release build):
/// `cargo test --release -p flowrun-nodes model::tests::should_report_timings -- --ignored --nocapture`
#[test]
#[ignore]
fn should_report_timings() {
    let b: usize = std::env::var("FLOWRUN_BENCH_BATCH")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(64);
    let dev = device();
    let cfg = FlowModelConfig::small(64, 16);
    let mut trainer = Trainer::new(&cfg, TrainerConfig::new(), &dev);
    println!("params: {}", trainer.model().num_params());
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let x0 = tensor_from_vec(
        sample_standard_normal(&mut rng, b * 3072),
        [b, 3, 32, 32],
        &dev,
    );
    let noise = tensor_from_vec(
        sample_standard_normal(&mut rng, b * 3072),
        [b, 3, 32, 32],
        &dev,
    );
    let t = tensor_from_vec(sample_logit_normal(&mut rng, b, 0.0, 1.0), [b], &dev);
    let toks: Vec<i64> = (0..b * 16)
        .map(|i| ((i * 7) % 63 + 1) as i64 * ((i % 16 < 10) as i64))
        .collect();
    let tokens = int_tensor_from_vec(toks, [b, 16], &dev);
    let iters: usize = std::env::var("FLOWRUN_BENCH_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let mut best = f64::MAX;
    for i in 0..iters {
        let s = Instant::now();
        let loss = trainer.step(x0.clone(), noise.clone(), t.clone(), tokens.clone());
        best = best.min(s.elapsed().as_secs_f64());
        println!("train step {i} (batch {b}): {:?} loss {loss}", s.elapsed());
    }
    println!("train step best (batch {b}): {best:.3}s");
    let model = trainer.model().valid();
    let mut best = f64::MAX;
    for i in 0..iters {
        let s = Instant::now();
        let v = model.forward(x0.clone(), t.clone(), tokens.clone());
        let _ = values(v.sum());
        best = best.min(s.elapsed().as_secs_f64());
        println!("forward {i} (batch {b}): {:?}", s.elapsed());
    }
    println!("forward best (batch {b}): {best:.3}s");
    let mut best = f64::MAX;
    for _ in 0..iters {
        let s = Instant::now();
        let v = model.forward_cfg(x0.clone(), t.clone(), tokens.clone(), 4.0);
        let _ = values(v.sum());
        best = best.min(s.elapsed().as_secs_f64());
    }
    println!("forward_cfg best (batch {b}, 2x{b} rows): {best:.3}s");
}

/// Micro-benchmarks of the building blocks at batch 64 (release build):
/// `cargo test --release -p flowrun-nodes model::tests::should_report_op_timings -- --ignored --nocapture`
#[test]
#[ignore]
fn should_report_op_timings() {
    use burn::tensor::activation::silu;
    let b = 64;
    let plain = device();
    let dev = plain.clone().autodiff();
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let mut rand_t = |shape: [usize; 4]| {
        let n = shape.iter().product();
        tensor_from_vec(sample_standard_normal(&mut rng, n), shape, &dev)
    };
    fn time<F: FnMut() -> Tensor<1>>(name: &str, mut f: F) {
        for i in 0..2 {
            let s = Instant::now();
            let loss = f();
            let fwd = s.elapsed();
            let _g = loss.backward();
            if i == 1 {
                println!("{name}: fwd {:?}, fwd+bwd {:?}", fwd, s.elapsed());
            }
        }
    }
    let conv32 = layers::conv3x3(32, 32, &dev);
    let conv96 = layers::conv3x3(96, 32, &dev);
    let x32 = rand_t([b, 32, 32, 32]).require_grad();
    let x96 = rand_t([b, 96, 32, 32]).require_grad();
    time("conv3x3 32->32 @32", || conv32.forward(x32.clone()).sum());
    time("conv3x3 96->32 @32", || conv96.forward(x96.clone()).sum());
    let conv128 = layers::conv3x3(128, 128, &dev);
    let x128 = rand_t([b, 128, 8, 8]).require_grad();
    time("conv3x3 128->128 @8", || {
        conv128.forward(x128.clone()).sum()
    });
    let gn = layers::group_norm(8, 32, true, &dev);
    time("groupnorm 32 @32", || gn.forward(x32.clone()).sum());
    time("silu 32 @32", || silu(x32.clone()).sum());
    let rb = layers::ResBlock::new(32, 32, 256, 8, &dev);
    let cond = tensor_from_vec(vec![0.1; b * 256], [b, 256], &dev);
    time("resblock 32 @32", || {
        rb.forward(x32.clone(), cond.clone()).sum()
    });
    let x64 = rand_t([b, 64, 16, 16]).require_grad();
    let text = tensor_from_vec(vec![0.1; b * 16 * 128], [b, 16, 128], &dev);
    let bias = Tensor::<4>::zeros([b, 1, 1, 16], &dev);
    for joint in [true, false] {
        let attn = layers::AttnBlock::new(64, 128, 32, 8, joint, &dev);
        time(&format!("attn 64 @16 joint={joint}"), || {
            attn.forward(x64.clone(), text.clone(), bias.clone()).sum()
        });
        let attn = attn.valid();
        let (x, tx, bs) = (
            x64.clone().inner(),
            text.clone().inner(),
            bias.clone().inner(),
        );
        let s = Instant::now();
        let _ = values(attn.forward(x, tx, bs).sum());
        println!("attn 64 @16 joint={joint} inference fwd: {:?}", s.elapsed());
    }
    time("downsample 32 @32", || {
        layers::downsample(x32.clone()).sum()
    });
    time("upsample 64 @16", || layers::upsample(x64.clone()).sum());
    time("cat skip 32+64 @32", || {
        Tensor::cat(vec![x32.clone(), layers::upsample(x64.clone())], 1).sum()
    });
}

/// Per-stage forward timing of the default model (plain device, batch 64).
#[test]
#[ignore]
fn should_report_forward_breakdown() {
    use burn::tensor::activation::silu;
    let b = 64;
    let dev = device();
    let model = FlowModelConfig::small(64, 16).init(&dev);
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let x = tensor_from_vec(
        sample_standard_normal(&mut rng, b * 3072),
        [b, 3, 32, 32],
        &dev,
    );
    let t = tensor_from_vec(sample_logit_normal(&mut rng, b, 0.0, 1.0), [b], &dev);
    let toks: Vec<i64> = (0..b * 16)
        .map(|i| ((i * 7) % 63 + 1) as i64 * ((i % 16 < 10) as i64))
        .collect();
    let tokens = int_tensor_from_vec(toks, [b, 16], &dev);
    for _ in 0..2 {
        let mut s = Instant::now();
        let mut lap = |name: &str| {
            println!("  {name}: {:?}", s.elapsed());
            s = Instant::now();
        };
        let text = model.text.forward(tokens.clone());
        lap("text");
        let temb = layers::timestep_embedding(t.clone(), model.config.time_freq_dim);
        let cond = model.time_fc2.forward(silu(model.time_fc1.forward(temb)))
            + model.text_cond.forward(text.pooled.clone());
        let cond_act = silu(cond);
        lap("cond");
        let mut h = model.conv_in.forward(x.clone());
        lap("conv_in");
        let mut skips = vec![];
        for (i, level) in model.down.iter().enumerate() {
            h = level.forward(h, &cond_act, &text);
            lap(&format!("down {i}"));
            skips.push(h.clone());
            if i + 1 < 3 {
                h = layers::downsample(h);
                lap("downsample");
            }
        }
        h = model.mid.blocks[0].forward(h, cond_act.clone());
        if let Some(a) = &model.mid.attn {
            h = a.forward(h, text.tokens.clone(), text.key_bias.clone());
        }
        lap("mid");
        for (j, level) in model.up.iter().enumerate() {
            let skip = skips.pop().unwrap();
            let hc = Tensor::cat(vec![h, skip], 1);
            lap("cat");
            h = level.forward(hc, &cond_act, &text);
            if let Some(r) = &level.reduce {
                h = r.forward(h);
            }
            lap(&format!("up {j}"));
            if j + 1 < 3 {
                h = layers::upsample(h);
                lap("upsample");
            }
        }
        let out = model.out_conv.forward(silu(model.out_norm.forward(h)));
        let _ = values(out.sum());
        lap("out");
        println!("--");
    }
}
