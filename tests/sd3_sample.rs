//! `flowrun sample` and `flowrun eval` on SD3 models.
//!
//! * Against diffusers itself: with the Euler sampler, `flowrun sample` on the tiny diffusers
//!   pipeline folder ([`common::sd3_fixture`]) from given initial latents gives
//!   `StableDiffusion3Pipeline`'s sampled latents and decoded images (same embeddings, negative
//!   prompt, steps, guidance, size) to max|Δ|/max|ref| ≤ 1e-4, checked by
//!   `tests/python/sd3_sample_check.py` (needs Python with torch, diffusers, transformers and
//!   safetensors: skipped with a NOTICE locally, required under CI).
//! * Without Python, on a tiny pipeline folder built here (random SD3 transformer and VAE,
//!   `model_index.json`, a scheduler config, an embeddings file with prompt categories): the
//!   grid's size and labels, determinism for a seed, per-image noise, TAFS at τ = 0 against
//!   Euler, flowrun checkpoints and transformer folders against their pipeline folder,
//!   `--latents` reproducing `--save-latents`, eval with compressibility (recomputed here from
//!   `flowrun sample`'s images) and with the reference reward server, and every bad input's
//!   message.
//!
//! The device is flex, or `$FLOWRUN_TEST_DEVICE` (e.g. `libtorch`).

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use burn::tensor::Device;
use common::{RewardServer, bin, python_with, root, sd3_fixture, text, tmpdir};
use nodes::model::checkpoint::{NamedTensor, SafetensorsFile, serialize_safetensors};
use nodes::model::sd3::export::{ExportDtype, save_diffusers};
use nodes::model::sd3::{Sd3Config, load_diffusers};
use nodes::model::vae::{VaeConfig, save_vae};
use nodes::model::{sample_standard_normal, save_safetensors};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// max|Δ| / max|ref| against diffusers.
const TOL: f64 = 1e-4;

/// `flowrun ARGS` on `$FLOWRUN_TEST_DEVICE` when set.
fn flowrun(args: &[&str]) -> Output {
    let mut c = bin();
    c.args(args);
    if let Ok(d) = std::env::var("FLOWRUN_TEST_DEVICE") {
        c.args(["--device", &d]);
    }
    c.current_dir(root()).output().unwrap()
}

/// [`flowrun`], which must succeed; returns its output text.
fn ok(args: &[&str]) -> String {
    let o = flowrun(args);
    assert!(
        o.status.success(),
        "flowrun {}: {}",
        args.join(" "),
        text(&o)
    );
    text(&o)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A float32 safetensors file of named tensors.
fn write_tensors(path: &Path, tensors: &[(&str, Vec<usize>, Vec<f32>)]) {
    let named: Vec<NamedTensor> = tensors
        .iter()
        .map(|(n, shape, v)| NamedTensor {
            name: n.to_string(),
            shape: shape.clone(),
            values: v.clone(),
        })
        .collect();
    fs::write(
        path,
        serialize_safetensors(&named, Default::default()).unwrap(),
    )
    .unwrap();
}

/// Tensor `name` of a safetensors file: (shape, values).
fn read(path: &Path, name: &str) -> (Vec<usize>, Vec<f32>) {
    SafetensorsFile::read(path).unwrap().get(name).unwrap()
}

/// Asserts max|Δ|/max|ref| ≤ `tol`: the same images batched with other prompts (batched
/// kernels may round differently, e.g. libtorch's).
fn assert_close(got: &[f32], want: &[f32], tol: f64, what: &str) {
    let e = rel(got, want);
    assert!(e <= tol, "{what}: max|Δ|/max|ref| = {e:.3e} > {tol:.0e}");
}

/// Asserts bit-identical values without printing them all.
fn assert_same(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
        panic!(
            "{what}: element {i} is {} instead of {} (max|Δ|/max|ref| = {:.3e})",
            got[i],
            want[i],
            rel(got, want)
        );
    }
}

fn rel(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
    let diff = got
        .iter()
        .zip(want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs())) as f64;
    diff / scale
}

/// Standard-normal values.
fn normal(seed: u64, n: usize) -> Vec<f32> {
    sample_standard_normal(&mut ChaCha8Rng::seed_from_u64(seed), n)
}

/// The prompts of [`rust_pipeline`]'s embeddings file, with their metadata.
const PROMPTS: &[(&str, &str)] = &[
    ("a red apple", r#"{"category": "food"}"#),
    ("a photo of a cat", r#"{"category": "animals"}"#),
    ("a blue car", r#"{}"#),
    ("a green tree", r#"{"tag": "food"}"#),
    ("two dogs", r#"{"category": "animals", "id": "dogs"}"#),
];
/// Token length, width and pooled width of the embeddings (the transformer's).
const EMB: (usize, usize, usize) = (5, 32, 24);

/// An embeddings file as `scripts/encode_prompts.py` lays it out (f32, no header metadata),
/// with a sidecar of [`PROMPTS`]; `d` is the token width.
fn write_store(path: &Path, d: usize) {
    let (l, _, q) = EMB;
    let n = PROMPTS.len();
    let wave = |k: usize, s: f32| (0..k).map(|i| (i as f32 * s).sin()).collect::<Vec<_>>();
    write_tensors(
        path,
        &[
            ("prompt_embeds", vec![n, l, d], wave(n * l * d, 0.37)),
            ("pooled_prompt_embeds", vec![n, q], wave(n * q, 0.71)),
            ("negative_prompt_embeds", vec![1, l, d], wave(l * d, 0.13)),
            ("negative_pooled_prompt_embeds", vec![1, q], wave(q, 0.29)),
        ],
    );
    let sidecar: String = PROMPTS
        .iter()
        .enumerate()
        .map(|(i, (p, m))| format!("{{\"index\": {i}, \"prompt\": \"{p}\", \"metadata\": {m}}}\n"))
        .collect();
    fs::write(path.with_extension("jsonl"), sidecar).unwrap();
}

/// A tiny SD3 pipeline folder made here (no Python): a random transformer (16 latent channels,
/// patch 2, sample_size 8 → 16×16 px images), a random VAE (×2), `model_index.json`, the
/// scheduler config of SD3 (shift 3), and an embeddings file of [`PROMPTS`].
fn rust_pipeline() -> &'static (PathBuf, PathBuf) {
    static P: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    P.get_or_init(|| {
        let dir = tmpdir("sd3-sample-pipeline");
        let model = dir.join("model");
        let config = Sd3Config {
            sample_size: 8,
            patch_size: 2,
            in_channels: 16,
            out_channels: Some(16),
            num_layers: 2,
            attention_head_dim: 8,
            num_attention_heads: 2,
            joint_attention_dim: EMB.1,
            caption_projection_dim: 16,
            pooled_projection_dim: EMB.2,
            pos_embed_max_size: Some(16),
            ..Sd3Config::tiny()
        };
        let dev = Device::flex();
        let transformer = model.join("transformer");
        save_diffusers(&config.init(&dev, 11), &transformer, ExportDtype::F32).unwrap();
        // Weights 6× the init's (std 0.12): at 0.02 the velocity hardly depends on the state
        // and the time, and every schedule would give about the same latents.
        let weights = transformer.join("diffusion_pytorch_model.safetensors");
        let file = SafetensorsFile::read(&weights).unwrap();
        let mut names: Vec<String> = file
            .tensors()
            .names()
            .into_iter()
            .map(String::from)
            .collect();
        names.sort();
        let scaled: Vec<(String, Vec<usize>, Vec<f32>)> = names
            .into_iter()
            .map(|n| {
                let (shape, mut v) = file.get(&n).unwrap();
                if n.ends_with(".weight") {
                    v.iter_mut().for_each(|x| *x *= 6.0);
                }
                (n, shape, v)
            })
            .collect();
        let scaled: Vec<(&str, Vec<usize>, Vec<f32>)> = scaled
            .into_iter()
            .map(|(n, s, v)| (&*n.leak(), s, v))
            .collect();
        write_tensors(&weights, &scaled);
        let vae = VaeConfig::new()
            .with_latent_channels(16)
            .with_block_out_channels(vec![8, 16])
            .with_norm_num_groups(4)
            .with_up_block_types(vec!["UpDecoderBlock2D".into(); 2])
            .with_scaling_factor(1.5305)
            .with_shift_factor(Some(0.0609))
            .with_use_post_quant_conv(false);
        save_vae(&model.join("vae"), &vae.init_seeded(3, &dev)).unwrap();
        fs::write(
            model.join("model_index.json"),
            r#"{"_class_name": "StableDiffusion3Pipeline",
                "transformer": ["diffusers", "SD3Transformer2DModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}"#,
        )
        .unwrap();
        fs::create_dir_all(model.join("scheduler")).unwrap();
        fs::write(
            model.join("scheduler/scheduler_config.json"),
            r#"{"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
                "shift": 3.0, "use_dynamic_shifting": false, "shift_terminal": null}"#,
        )
        .unwrap();
        let emb = dir.join("emb.safetensors");
        write_store(&emb, EMB.1);
        (model, emb)
    })
}

/// One diffusers comparison: flowrun's flags and the script's case.
struct Case {
    name: &'static str,
    /// `--prompt` texts, then `--prompt-id`s, and the rows they are in the fixture's file.
    prompts: &'static [&'static str],
    ids: &'static [&'static str],
    rows: &'static [usize],
    seeds: usize,
    steps: usize,
    cfg: f32,
    /// Pixels.
    size: (usize, usize),
}

#[test]
fn should_match_diffusers_stable_diffusion_3_pipeline_with_the_euler_sampler() {
    let Some(py) = python_with(&["torch", "diffusers", "transformers", "safetensors"]) else {
        return;
    };
    let Some((model, emb)) = sd3_fixture() else {
        return;
    };
    let dir = tmpdir("sd3-sample-diffusers");
    let cases = [
        Case {
            name: "cfg4.5-24x16",
            prompts: &["a blue car"],
            ids: &["0"],
            rows: &[2, 0],
            seeds: 2,
            steps: 6,
            cfg: 4.5,
            size: (24, 16),
        },
        Case {
            name: "nocfg-16x16",
            prompts: &[],
            ids: &["1", "3"],
            rows: &[1, 3],
            seeds: 1,
            steps: 3,
            cfg: 1.0,
            size: (16, 16),
        },
    ];
    let mut script_cases = Vec::new();
    for (k, c) in cases.iter().enumerate() {
        // Initial latents made here: the VAE of the tiny pipeline is ×2.
        let b = c.rows.len() * c.seeds;
        let shape = vec![b, 16, c.size.0 / 2, c.size.1 / 2];
        let noise = dir.join(format!("{}-noise.safetensors", c.name));
        let n = shape.iter().product();
        write_tensors(&noise, &[("latents", shape, normal(100 + k as u64, n))]);
        let saved = dir.join(format!("{}-out.safetensors", c.name));
        let grid = dir.join(format!("{}.png", c.name));
        let (steps, cfg, seeds) = (c.steps.to_string(), c.cfg.to_string(), c.seeds.to_string());
        let mut args = vec![
            "sample",
            "--checkpoint",
            s(model),
            "--embeddings",
            s(emb),
            "--sampler",
            "euler",
            "--steps",
            &steps,
            "--cfg",
            &cfg,
            "--seeds",
            &seeds,
            "--latents",
            s(&noise),
            "--save-latents",
            s(&saved),
            "--out",
            s(&grid),
        ];
        for p in c.prompts {
            args.extend(["--prompt", p]);
        }
        for i in c.ids {
            args.extend(["--prompt-id", i]);
        }
        let out = ok(&args);
        assert!(out.contains("shift 3"), "{out}");
        script_cases.push(serde_json::json!({
            "name": c.name, "latents": noise, "saved": saved, "rows": c.rows, "seeds": c.seeds,
            "steps": c.steps, "cfg": c.cfg, "height": c.size.0, "width": c.size.1,
        }));
    }
    let cases_file = dir.join("cases.json");
    fs::write(&cases_file, serde_json::to_string(&script_cases).unwrap()).unwrap();
    let result = dir.join("result.json");
    let o = Command::new(py)
        .arg(root().join("tests/python/sd3_sample_check.py"))
        .args(["--model", s(model), "--embeddings", s(emb)])
        .args(["--cases", s(&cases_file), "--out", s(&result)])
        .output()
        .unwrap();
    assert!(o.status.success(), "sd3_sample_check.py: {}", text(&o));
    let r: serde_json::Value = serde_json::from_str(&fs::read_to_string(&result).unwrap()).unwrap();
    eprintln!("{}", serde_json::to_string_pretty(&r).unwrap());
    for c in &cases {
        let got = &r[c.name];
        assert_eq!(got["info"]["shift"].as_f64(), Some(3.0), "{got}");
        assert_eq!(got["exact"]["initial_latents"].as_f64(), Some(0.0), "{got}");
        for k in ["sampled", "images"] {
            let e = got["rel"][k].as_f64().unwrap_or(f64::NAN);
            assert!(
                e <= TOL,
                "{}: {k}: max|Δ|/max|ref| = {e:.3e} > {TOL:.0e}",
                c.name
            );
        }
    }
}

/// `--save-latents` of a `flowrun sample` run with `args` (plus the model, embeddings and out).
fn sample_latents(dir: &Path, name: &str, model: &Path, emb: &Path, args: &[&str]) -> PathBuf {
    let saved = dir.join(format!("{name}.safetensors"));
    let grid = dir.join(format!("{name}.png"));
    let mut all = vec![
        "sample",
        "--checkpoint",
        s(model),
        "--embeddings",
        s(emb),
        "--save-latents",
        s(&saved),
        "--out",
        s(&grid),
    ];
    all.extend(args);
    ok(&all);
    saved
}

#[test]
fn should_sample_tafs_at_tau_0_as_the_euler_sampler_on_the_shifted_schedule() {
    let (model, emb) = rust_pipeline();
    let dir = tmpdir("sd3-sample-tafs");
    let common = ["--steps", "5", "--cfg", "3", "--seeds", "2"];
    let run = |name: &str, extra: &[&str]| {
        let mut a = common.to_vec();
        a.extend(extra);
        read(&sample_latents(&dir, name, model, emb, &a), "sampled").1
    };
    let euler = run("euler", &["--sampler", "euler"]);
    // x' = (1−t')(x − t·v) + t'·(x + (1−t)·v) = x + (t' − t)·v: TAFS without fresh noise is
    // Euler's step, so its last x̂0 is Euler's result on the same sigmas.
    let tafs0 = run("tafs0", &["--sampler", "tafs", "--tau", "0"]);
    let e = rel(&tafs0, &euler);
    eprintln!("TAFS at τ = 0 vs Euler: max|Δ|/max|ref| = {e:.2e}");
    assert!(e <= 1e-5, "TAFS τ=0 vs Euler: {e:.3e}");
    // Not the same on another schedule, nor with fresh noise.
    let unshifted = run(
        "unshifted",
        &["--sampler", "tafs", "--tau", "0", "--shift", "1"],
    );
    assert!(rel(&unshifted, &euler) > 1e-3);
    let tafs = run(
        "tafs",
        &["--sampler", "tafs", "--tau", "1", "--tau-end", "0.6"],
    );
    assert!(rel(&tafs, &euler) > 1e-3);
    assert!(tafs.iter().all(|v| v.is_finite()));
}

#[test]
fn should_chain_tafs_steps_as_the_pipelines_do_from_the_seeded_noise() {
    // A 3-step TAFS sample recomputed here with `flowrun velocity` (the transformer, checked
    // against diffusers by tests/sd3_export.rs) and TAFS's published step: x̂0 = x − t·v,
    // ε̂ = x + (1−t)·v, x' = (1−t')·x̂0 + t'·(√(1−τ²)·ε̂ + τ·ε), τ linear from --tau to
    // --tau-end over the K steps, t the shifted sigmas; the noise regenerated from the seed
    // (the image's own stream: its initial state, then each step's ε).
    let (model, emb) = rust_pipeline();
    let dir = tmpdir("sd3-sample-tafs-chain");
    let (seed, row, cfg) = (5u64, 1usize, 2.0f32);
    let saved = sample_latents(
        &dir,
        "tafs",
        model,
        emb,
        &[
            "--sampler",
            "tafs",
            "--steps",
            "3",
            "--tau",
            "1",
            "--tau-end",
            "0.6",
            "--cfg",
            "2",
            "--seeds",
            "1",
            "--seed",
            "5",
            "--prompt-id",
            "1",
        ],
    );
    let (shape, x_init) = read(&saved, "latents");
    let n = x_init.len();
    let mut rng = ChaCha8Rng::seed_from_u64(runner::stream_seed(
        seed,
        &format!("prompt-{row}"),
        0,
        "noise",
    ));
    assert_same(
        &sample_standard_normal(&mut rng, n),
        &x_init,
        "initial noise",
    );
    let store = nodes::model::text_embeddings::PromptEmbeddings::open(emb).unwrap();
    let (pe, pooled) = store.rows(&[row]).unwrap();
    let (ne, npooled) = store.negative();
    let (l, d, q) = EMB;
    let velocity = |x: &[f32], t: f32, k: usize| -> Vec<f32> {
        let inputs = dir.join(format!("v{k}-in.safetensors"));
        let out = dir.join(format!("v{k}.safetensors"));
        write_tensors(
            &inputs,
            &[
                ("latents", shape.clone(), x.to_vec()),
                ("t", vec![1], vec![t]),
                ("prompt_embeds", vec![1, l, d], pe.clone()),
                ("pooled", vec![1, q], pooled.clone()),
                ("negative_prompt_embeds", vec![1, l, d], ne.clone()),
                ("negative_pooled", vec![1, q], npooled.clone()),
            ],
        );
        ok(&[
            "velocity",
            "--checkpoint",
            s(model),
            "--inputs",
            s(&inputs),
            "--cfg",
            &cfg.to_string(),
            "--out",
            s(&out),
        ]);
        read(&out, "v").1
    };
    let sig = nodes::flow_match_schedule::sigmas(3, 3.0, 1000);
    let taus = [1.0f32, 0.8];
    let mut x = x_init.clone();
    let mut x0 = Vec::new();
    for k in 0..3 {
        let t = sig[k];
        let v = velocity(&x, t, k);
        x0 = x.iter().zip(&v).map(|(x, v)| x - t * v).collect();
        if k < 2 {
            let (tn, tau) = (sig[k + 1], taus[k]);
            let eps = sample_standard_normal(&mut rng, n);
            let keep = (1.0 - tau * tau).max(0.0).sqrt();
            x = (0..n)
                .map(|i| {
                    let eps_hat = x[i] + (1.0 - t) * v[i];
                    (1.0 - tn) * x0[i] + tn * (keep * eps_hat + tau * eps[i])
                })
                .collect();
        }
    }
    let e = rel(&read(&saved, "sampled").1, &x0);
    eprintln!("TAFS chain recomputed: max|Δ|/max|ref| = {e:.2e}");
    assert!(e <= 1e-5, "TAFS chain: max|Δ|/max|ref| = {e:.3e}");
}

#[test]
fn should_write_a_labelled_grid_of_the_right_size_deterministically_for_a_seed() {
    use nodes::world::png::decode_rgb8;
    let (model, emb) = rust_pipeline();
    let dir = tmpdir("sd3-sample-grid");
    let grid = |name: &str, args: &[&str]| {
        let out = dir.join(format!("{name}.png"));
        let saved = dir.join(format!("{name}.safetensors"));
        let mut a = vec![
            "sample",
            "--checkpoint",
            s(model),
            "--embeddings",
            s(emb),
            "--steps",
            "2",
            "--out",
            s(&out),
            "--save-latents",
            s(&saved),
        ];
        a.extend(args);
        let log = ok(&a);
        (fs::read(&out).unwrap(), saved, log)
    };
    // The first 4 prompts (no --prompt), 3 images each, 16×16 px enlarged 4× to 64 px: a
    // label strip of 13 px above each row, 2 px gutters.
    let (png, saved, log) = grid("a", &["--seeds", "3", "--seed", "7"]);
    assert!(log.contains("4 prompts × 3 seeds"), "{log}");
    let (w, h, rgb) = decode_rgb8(&png).unwrap();
    assert_eq!((w, h), (3 * 64 + 4 * 2, 4 * (13 + 64) + 5 * 2));
    // Cell (row 1, image 2) is image 1·3 + 2 of the saved images, enlarged.
    let (shape, images) = read(&saved, "images");
    assert_eq!(shape, [12, 3, 16, 16]);
    // Decoded images are clamped to [-1, 1] (this VAE decodes some pixels beyond).
    assert!(images.iter().all(|v| (-1.0..=1.0).contains(v)));
    assert!(images.iter().any(|v| v.abs() == 1.0));
    let k = 3 + 2;
    let cell = nodes::world::chw_to_rgb8(&images[k * 768..(k + 1) * 768], 16, 16).unwrap();
    let (x0, y0) = (2 + 2 * 66, 2 + 77 + 2 + 13);
    for (y, x) in [(0, 0), (17, 9), (63, 63)] {
        let i = ((y0 + y) * w + x0 + x) * 3;
        let j = ((y / 4) * 16 + x / 4) * 3;
        assert_eq!(
            rgb[i..i + 3],
            cell[j..j + 3],
            "pixel ({x}, {y}) of cell (1, 2)"
        );
    }
    // Each label strip holds the prompt's text: light pixels on the dark gutter colour.
    for r in 0..4 {
        let top = 2 + r * 79;
        let light = (top..top + 13)
            .flat_map(|y| (0..w).map(move |x| (y * w + x) * 3))
            .filter(|&i| rgb[i] > 200)
            .count();
        assert!(light > 20, "label of row {r}: {light} light pixels");
    }
    // The same seed gives the same file; another seed another one.
    assert_eq!(grid("b", &["--seeds", "3", "--seed", "7"]).0, png);
    assert_ne!(grid("c", &["--seeds", "3", "--seed", "8"]).0, png);
    // An image depends on its prompt, index and seed only, not on the other prompts drawn.
    let (_, alone, _) = grid(
        "d",
        &[
            "--seeds",
            "2",
            "--seed",
            "7",
            "--prompt",
            "a photo of a cat",
        ],
    );
    let (_, all) = read(&saved, "sampled");
    let (_, one) = read(&alone, "sampled");
    let n = 16 * 8 * 8;
    assert_close(&one, &all[3 * n..5 * n], 1e-5, "one prompt alone");
    // Prompts in the order given: --prompt texts (exactly, else ignoring case and spacing),
    // then --prompt-id (a row, or the metadata's `id`).
    let (_, picked, log) = grid(
        "f",
        &[
            "--seeds",
            "1",
            "--seed",
            "7",
            "--prompt",
            "a green tree",
            "--prompt",
            "A  Red apple",
            "--prompt-id",
            "dogs",
            "--prompt-id",
            "1",
        ],
    );
    for (i, p) in [
        "a green tree",
        "a red apple",
        "two dogs",
        "a photo of a cat",
    ]
    .iter()
    .enumerate()
    {
        assert!(log.contains(&format!("row {}: {p} (", i + 1)), "{log}");
    }
    let (_, picked) = read(&picked, "sampled");
    assert_close(
        &picked[..n],
        &all[9 * n..10 * n],
        1e-5,
        "a green tree, image 0",
    );
    assert_close(&picked[n..2 * n], &all[..n], 1e-5, "a red apple, image 0");
    assert_close(
        &picked[3 * n..],
        &all[3 * n..4 * n],
        1e-5,
        "a photo of a cat, image 0",
    );
    // --height/--width in pixels: 24×32 px images enlarged 2× (cells 48×64).
    let (png, ..) = grid(
        "e",
        &[
            "--seeds",
            "2",
            "--num-prompts",
            "1",
            "--height",
            "24",
            "--width",
            "32",
        ],
    );
    let (w, h, _) = decode_rgb8(&png).unwrap();
    assert_eq!((w, h), (2 * 64 + 3 * 2, 13 + 48 + 2 * 2));
}

#[test]
fn should_sample_a_flowrun_checkpoint_and_a_transformer_folder_as_their_pipeline_folder() {
    let (model, emb) = rust_pipeline();
    let dir = tmpdir("sd3-sample-sources");
    let args = [
        "--steps",
        "3",
        "--seeds",
        "2",
        "--cfg",
        "2",
        "--num-prompts",
        "2",
    ];
    let want = sample_latents(&dir, "pipeline", model, emb, &args);
    let want_latents = read(&want, "sampled").1;
    // The transformer folder inside the pipeline folder finds its VAE and scheduler there.
    let t = sample_latents(&dir, "transformer", &model.join("transformer"), emb, &args);
    assert_same(&read(&t, "sampled").1, &want_latents, "transformer folder");
    // A flowrun checkpoint of the same weights, with the pipeline's VAE.
    let ck = dir.join("sd3.safetensors");
    save_safetensors(&load_diffusers(model, &Device::flex()).unwrap().1, &ck).unwrap();
    let mut with_vae = args.to_vec();
    with_vae.extend(["--vae", s(model)]);
    let c = sample_latents(&dir, "checkpoint", &ck, emb, &with_vae);
    assert_same(&read(&c, "sampled").1, &want_latents, "flowrun checkpoint");
    // The shift comes from the pipeline's scheduler config: a copy whose config says 1.5
    // samples as --shift 1.5 does, and a flowrun checkpoint takes it from --vae's pipeline.
    let other = dir.join("shift1.5");
    for sub in ["transformer", "vae", "scheduler"] {
        fs::create_dir_all(other.join(sub)).unwrap();
        for e in fs::read_dir(model.join(sub)).unwrap().flatten() {
            fs::copy(e.path(), other.join(sub).join(e.file_name())).unwrap();
        }
    }
    fs::copy(
        model.join("model_index.json"),
        other.join("model_index.json"),
    )
    .unwrap();
    fs::write(
        other.join("scheduler/scheduler_config.json"),
        r#"{"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 1.5}"#,
    )
    .unwrap();
    let from_config = read(
        &sample_latents(&dir, "config", &other, emb, &args),
        "sampled",
    )
    .1;
    let mut flag = args.to_vec();
    flag.extend(["--shift", "1.5"]);
    let from_flag = read(&sample_latents(&dir, "flag", model, emb, &flag), "sampled").1;
    assert_same(&from_config, &from_flag, "shift from scheduler_config.json");
    assert!(rel(&from_config, &want_latents) > 1e-3);
    let mut ck_other = args.to_vec();
    ck_other.extend(["--vae", s(&other)]);
    let c = sample_latents(&dir, "checkpoint-other", &ck, emb, &ck_other);
    assert_same(
        &read(&c, "sampled").1,
        &from_flag,
        "shift from --vae's pipeline",
    );
    // --latents from a --save-latents file reproduces the run, grid included.
    let mut again = args.to_vec();
    again.extend(["--latents", s(&want)]);
    let r = sample_latents(&dir, "again", model, emb, &again);
    assert_same(&read(&r, "sampled").1, &want_latents, "--latents");
    assert_eq!(
        fs::read(dir.join("again.png")).unwrap(),
        fs::read(dir.join("pipeline.png")).unwrap()
    );
}

/// The eval table's CSV rows: (category, steps, n, mean, std).
fn csv_rows(path: &Path) -> Vec<(String, usize, usize, f64, f64)> {
    let text = fs::read_to_string(path).unwrap();
    let mut lines = text.lines();
    assert_eq!(
        lines.next(),
        Some("category,steps,n,reward_mean,reward_std")
    );
    lines
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (
                f[0].to_string(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
                f[3].parse().unwrap(),
                f[4].parse().unwrap(),
            )
        })
        .collect()
}

/// The images `eval` scores for `steps` (seed 1234, one image per prompt, Euler), made by
/// `flowrun sample` of every prompt: [prompts][3·16·16].
fn eval_images(dir: &Path, steps: usize) -> Vec<Vec<f32>> {
    let (model, emb) = rust_pipeline();
    let n = PROMPTS.len().to_string();
    let st = steps.to_string();
    let args = [
        "--sampler",
        "euler",
        "--steps",
        &st,
        "--seeds",
        "1",
        "--seed",
        "1234",
        "--num-prompts",
        &n,
    ];
    let saved = sample_latents(dir, &format!("eval-{steps}"), model, emb, &args);
    read(&saved, "images")
        .1
        .chunks(768)
        .map(<[f32]>::to_vec)
        .collect()
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

#[test]
fn should_report_compressibility_per_step_count_and_category_as_csv_and_parquet() {
    let (model, emb) = rust_pipeline();
    let dir = tmpdir("sd3-eval-jpeg");
    let csv = dir.join("eval.csv");
    let base = [
        "eval",
        "--checkpoint",
        s(model),
        "--embeddings",
        s(emb),
        "--steps",
        "1,3",
        "--reward",
        "compressibility",
    ];
    let mut a = base.to_vec();
    a.extend(["--csv", s(&csv)]);
    let out = ok(&a);
    assert!(out.contains("compressibility"), "{out}");
    let rows = csv_rows(&csv);
    // Categories: `category` or GenEval's `tag`, "(none)" for a prompt without; "all" first.
    let cats: Vec<(&str, usize)> = rows
        .iter()
        .filter(|r| r.1 == 1)
        .map(|r| (r.0.as_str(), r.2))
        .collect();
    assert_eq!(
        cats,
        [("all", 5), ("(none)", 1), ("animals", 2), ("food", 2)]
    );
    assert_eq!(rows.len(), 8);
    for (c, _, _, m, sd) in &rows {
        assert!(
            m.is_finite() && *m < 0.0 && sd.is_finite() && *sd >= 0.0,
            "{c}: {m} ± {sd}"
        );
    }
    // The rewards are −JPEG kB (quality 95) of the images `flowrun sample` makes from eval's
    // noise: recomputed here, per step count.
    for steps in [1, 3] {
        let kb: Vec<f64> = eval_images(&dir, steps)
            .iter()
            .map(|im| {
                -(nodes::compressibility_reward::jpeg_size_hw(im, 16, 16, 95).unwrap() as f64)
                    / 1000.0
            })
            .collect();
        let all = rows.iter().find(|r| r.0 == "all" && r.1 == steps).unwrap();
        assert!((all.3 - mean(&kb)).abs() < 1e-9, "{all:?} vs {kb:?}");
        let food = rows.iter().find(|r| r.0 == "food" && r.1 == steps).unwrap();
        let (m, sd) = ((kb[0] + kb[3]) / 2.0, (kb[0] - kb[3]).abs() / 2.0);
        assert!(
            (food.3 - m).abs() < 1e-9 && (food.4 - sd).abs() < 1e-9,
            "{food:?}"
        );
    }
    // Parquet: the same rows.
    let pq = dir.join("eval.parquet");
    let mut a = base.to_vec();
    a.extend(["--csv", s(&pq)]);
    ok(&a);
    let file = fs::File::open(&pq).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap();
    let mut got = Vec::new();
    for b in reader {
        use arrow::array::{Float64Array, Int64Array, StringArray};
        let b = b.unwrap();
        let col = |n: &str| b.column_by_name(n).unwrap().clone();
        let (c, st, n, m, sd) = (
            col("category"),
            col("steps"),
            col("n"),
            col("reward_mean"),
            col("reward_std"),
        );
        let c = c.as_any().downcast_ref::<StringArray>().unwrap();
        let st = st.as_any().downcast_ref::<Int64Array>().unwrap();
        let n = n.as_any().downcast_ref::<Int64Array>().unwrap();
        let m = m.as_any().downcast_ref::<Float64Array>().unwrap();
        let sd = sd.as_any().downcast_ref::<Float64Array>().unwrap();
        for i in 0..b.num_rows() {
            got.push((
                c.value(i).to_string(),
                st.value(i) as usize,
                n.value(i) as usize,
                m.value(i),
                sd.value(i),
            ));
        }
    }
    assert_eq!(got, rows);
    // --limit: prompts per category; incompressibility is the opposite sign.
    let mut a = base.to_vec();
    a.extend(["--limit", "1", "--csv", s(&csv)]);
    a[8] = "incompressibility";
    ok(&a);
    let limited = csv_rows(&csv);
    assert_eq!(limited[0].2, 3, "{limited:?}");
    assert!(limited.iter().all(|r| r.2 <= 3 && r.3 > 0.0), "{limited:?}");
}

#[test]
fn should_score_with_a_reward_server_per_step_count() {
    let (model, emb) = rust_pipeline();
    let dir = tmpdir("sd3-eval-server");
    let srv = RewardServer::start(&[]);
    let csv = dir.join("eval.csv");
    let url = srv.url();
    let out = ok(&[
        "eval",
        "--checkpoint",
        s(model),
        "--embeddings",
        s(emb),
        "--steps",
        "2",
        "--reward-url",
        &url,
        "--csv",
        s(&csv),
    ]);
    assert!(out.contains(&url), "{out}");
    let rows = csv_rows(&csv);
    // The reference server's score is the mean brightness of the 8-bit RGB image.
    let bright: Vec<f64> = eval_images(&dir, 2)
        .iter()
        .map(|im| {
            let rgb = nodes::world::chw_to_rgb8(im, 16, 16).unwrap();
            rgb.iter().map(|&v| v as f64).sum::<f64>() / rgb.len() as f64 / 255.0
        })
        .collect();
    let all = rows.iter().find(|r| r.0 == "all").unwrap();
    assert_eq!(all.2, 5);
    assert!(
        (all.3 - mean(&bright)).abs() < 1e-6,
        "{all:?} vs {bright:?}"
    );
    // A server that answers NaN: the error names it and the prompt.
    let mut bad = RewardServer::start(&["--nan"]);
    let o = flowrun(&[
        "eval",
        "--checkpoint",
        s(model),
        "--embeddings",
        s(emb),
        "--steps",
        "1",
        "--reward-url",
        &bad.url(),
    ]);
    bad.stop();
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(
        t.contains(&bad.url()) && t.contains("returned NaN for prompt `000000`"),
        "{t}"
    );
}

#[test]
fn should_explain_every_bad_sd3_input() {
    let (model, emb) = rust_pipeline();
    let dir = tmpdir("sd3-sample-errors");
    let (m, e) = (s(model), s(emb));
    // A transformer folder without a pipeline around it; a flowrun checkpoint.
    let lone = dir.join("lone");
    fs::create_dir_all(&lone).unwrap();
    for f in ["config.json", "diffusion_pytorch_model.safetensors"] {
        fs::copy(model.join("transformer").join(f), lone.join(f)).unwrap();
    }
    let ck = dir.join("sd3.safetensors");
    save_safetensors(&load_diffusers(model, &Device::flex()).unwrap().1, &ck).unwrap();
    // Embeddings of another width; latents of the wrong shape; a bad scheduler config.
    let wide = dir.join("wide.safetensors");
    write_store(&wide, 48);
    let latents = dir.join("latents.safetensors");
    write_tensors(
        &latents,
        &[("latents", vec![3, 16, 8, 8], vec![0.0; 3 * 1024])],
    );
    let flux = dir.join("flux");
    fs::create_dir_all(flux.join("scheduler")).unwrap();
    fs::copy(
        model.join("model_index.json"),
        flux.join("model_index.json"),
    )
    .unwrap();
    for sub in ["transformer", "vae"] {
        fs::create_dir_all(flux.join(sub)).unwrap();
        for f in ["config.json", "diffusion_pytorch_model.safetensors"] {
            fs::copy(model.join(sub).join(f), flux.join(sub).join(f)).unwrap();
        }
    }
    fs::write(
        flux.join("scheduler/scheduler_config.json"),
        r#"{"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0, "use_dynamic_shifting": true}"#,
    )
    .unwrap();
    let vae4 = dir.join("vae4");
    let four = VaeConfig::new()
        .with_latent_channels(4)
        .with_block_out_channels(vec![8])
        .with_norm_num_groups(4)
        .with_use_post_quant_conv(false);
    save_vae(&vae4, &four.init_seeded(1, &Device::flex())).unwrap();
    let vae4 = s(&vae4);
    let (lone, ck, wide, latents, flux) = (s(&lone), s(&ck), s(&wide), s(&latents), s(&flux));
    let out = dir.join("g.png");
    let g = s(&out);
    let sample = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["sample", "--out", g]
            .iter()
            .map(|x| x.to_string())
            .collect();
        v.extend(extra.iter().map(|x| x.to_string()));
        v
    };
    let cases: Vec<(Vec<String>, Vec<&str>)> = vec![
        (
            sample(&["--checkpoint", m]),
            vec!["SD3 model", "give --embeddings FILE"],
        ),
        (
            sample(&[
                "--checkpoint",
                m,
                "--embeddings",
                "/nonexistent/e.safetensors",
            ]),
            vec!["--embeddings", "/nonexistent/e.safetensors"],
        ),
        (
            sample(&["--checkpoint", m, "--embeddings", wide]),
            vec![
                "holds embeddings of width 48",
                wide,
                "transformer/config.json",
                "joint_attention_dim 32",
            ],
        ),
        (
            sample(&["--checkpoint", ck, "--embeddings", wide, "--vae", m]),
            vec!["holds embeddings of width 48", ck],
        ),
        (
            sample(&["--checkpoint", lone, "--embeddings", e]),
            vec!["holds the transformer only", "give --vae DIR"],
        ),
        (
            sample(&["--checkpoint", ck, "--embeddings", e]),
            vec!["holds the transformer only", "give --vae DIR"],
        ),
        (
            sample(&[
                "--checkpoint",
                m,
                "--embeddings",
                e,
                "--vae",
                "/nonexistent/vae",
            ]),
            vec!["--vae /nonexistent/vae", "does not exist"],
        ),
        (
            sample(&[
                "--checkpoint",
                m,
                "--embeddings",
                e,
                "--prompt",
                "a red aple",
            ]),
            vec![
                "--prompt \"a red aple\" is not a prompt of --embeddings",
                "did you mean \"a red apple\"",
                "--prompt-id",
            ],
        ),
        (
            sample(&["--checkpoint", m, "--embeddings", e, "--prompt-id", "17"]),
            vec!["--prompt-id 17", "rows 0 to 4"],
        ),
        (
            sample(&[
                "--checkpoint",
                m,
                "--embeddings",
                e,
                "--prompt-id",
                "1",
                "--num-prompts",
                "2",
            ]),
            vec!["--num-prompts", "does not go with"],
        ),
        (
            sample(&["--checkpoint", m, "--embeddings", e, "--height", "17"]),
            vec!["--height 17", "multiple of the VAE's scale factor 2"],
        ),
        (
            sample(&["--checkpoint", m, "--embeddings", e, "--width", "80"]),
            vec!["40 latents", "pos_embed_max_size 16", "--height/--width"],
        ),
        (
            sample(&["--checkpoint", m, "--embeddings", e, "--height", "18"]),
            vec!["patch_size 2"],
        ),
        (
            sample(&["--checkpoint", m, "--embeddings", e, "--shift", "0"]),
            vec!["--shift 0", "> 0"],
        ),
        (
            sample(&["--checkpoint", m, "--embeddings", e, "--steps", "0"]),
            vec!["--steps must be at least 1"],
        ),
        (
            sample(&["--checkpoint", m, "--embeddings", e, "--seeds", "0"]),
            vec!["--seeds must be at least 1"],
        ),
        (
            sample(&["--checkpoint", m, "--embeddings", e, "--batch", "0"]),
            vec!["--batch must be at least 1"],
        ),
        (
            sample(&["--checkpoint", m, "--embeddings", e, "--latents", latents]),
            vec![
                "--latents",
                latents,
                "[3, 16, 8, 8]",
                "expected [32, C, h, w]",
            ],
        ),
        (
            sample(&["--checkpoint", m, "--embeddings", e, "--latents", e]),
            vec!["has no tensor `latents`"],
        ),
        (
            sample(&["--checkpoint", flux, "--embeddings", e]),
            vec!["scheduler_config.json", "use_dynamic_shifting", "--shift"],
        ),
        (
            sample(&["--checkpoint", m, "--embeddings", e, "--vae", vae4]),
            vec!["decodes 4-channel latents", "16-channel", "--vae"],
        ),
        (
            sample(&["--checkpoint", m, "--embeddings", e, "--seeds", "100000000"]),
            vec!["--seeds 100000000 is more than 1048576 images"],
        ),
        (
            sample(&["--checkpoint", m, "--embeddings", e, "--tau", "2"]),
            vec!["--tau 2 is not a TAFS temperature"],
        ),
        (
            vec![
                "eval".into(),
                "--checkpoint".into(),
                m.into(),
                "--embeddings".into(),
                e.into(),
            ],
            vec![
                "no built-in verifier",
                "--reward compressibility",
                "--reward-url",
            ],
        ),
        (
            [
                "eval",
                "--checkpoint",
                m,
                "--embeddings",
                e,
                "--reward",
                "compressibility",
                "--reward-url",
                "http://127.0.0.1:9/score",
            ]
            .map(String::from)
            .to_vec(),
            vec!["not both"],
        ),
        (
            [
                "eval",
                "--checkpoint",
                m,
                "--embeddings",
                e,
                "--reward-url",
                "ftp://x/score",
            ]
            .map(String::from)
            .to_vec(),
            vec!["--reward-url", "must start with http://"],
        ),
        (
            [
                "eval",
                "--checkpoint",
                m,
                "--embeddings",
                e,
                "--reward",
                "compressibility",
                "--prompts",
                "datasets/shapes/eval.jsonl",
            ]
            .map(String::from)
            .to_vec(),
            vec![
                "--prompts datasets/shapes/eval.jsonl is a ShapeWorld prompt file",
                "--embeddings",
            ],
        ),
        (
            [
                "eval",
                "--checkpoint",
                m,
                "--embeddings",
                e,
                "--reward",
                "compressibility",
                "--steps",
                "0",
            ]
            .map(String::from)
            .to_vec(),
            vec!["--steps must be at least 1"],
        ),
        (
            ["eval", "--embeddings", e].map(String::from).to_vec(),
            vec!["--embeddings is for SD3 models", "ShapeWorld UNet"],
        ),
        (
            ["eval", "--reward", "compressibility", "--shift", "3"]
                .map(String::from)
                .to_vec(),
            vec!["--shift, --reward are for SD3 models"],
        ),
        (
            [
                "sample",
                "--out",
                g,
                "--prompt",
                "two red circles",
                "--vae",
                m,
                "--latents",
                latents,
            ]
            .map(String::from)
            .to_vec(),
            vec!["--vae, --latents are for SD3 models"],
        ),
        (
            ["sample", "--out", g].map(String::from).to_vec(),
            vec!["give at least one --prompt"],
        ),
    ];
    let mut failed = Vec::new();
    for (args, want) in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = flowrun(&args);
        let t = text(&o);
        if o.status.code() != Some(1) || t.contains("internal error") || t.contains("panicked") {
            failed.push(format!(
                "flowrun {}: exit {:?}\n{t}",
                args.join(" "),
                o.status.code()
            ));
            continue;
        }
        for w in want {
            if !t.contains(w) {
                failed.push(format!("flowrun {}: no `{w}` in\n{t}", args.join(" ")));
            }
        }
    }
    assert!(!out.exists(), "an error wrote the grid");
    assert!(failed.is_empty(), "{}", failed.join("\n\n"));
}

#[test]
fn should_keep_shapeworld_sampling_as_it_was() {
    let dir = tmpdir("shapes-sample");
    let out = dir.join("g.png");
    let log = ok(&[
        "sample",
        "--prompt",
        "two red circles",
        "--prompt",
        "a blue square",
        "--steps",
        "2",
        "--seeds",
        "3",
        "--out",
        s(&out),
    ]);
    assert!(log.contains("shape_eval correct"), "{log}");
    let (w, h, _) = nodes::world::png::decode_rgb8(&fs::read(&out).unwrap()).unwrap();
    // 32×32 images enlarged 4×, 2 px gutters, no labels.
    assert_eq!((w, h), (3 * 128 + 4 * 2, 2 * 128 + 3 * 2));
}
