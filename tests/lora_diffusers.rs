//! LoRA interchange with peft and diffusers themselves (`tests/python/lora_reference.py`,
//! pinned to torch 2.9.0, diffusers 0.42.1, peft 0.21.2).
//!
//! * An adapter made by peft (rank 4, non-zero B), saved by diffusers' `save_lora_weights`
//!   (α 8, in its metadata) and by peft's `save_pretrained` (α 12, in adapter_config.json), is
//!   loaded by flowrun over the same tiny random SD3.5-style transformer: the same velocity
//!   (max|Δ|/max|ref| ≤ 1e-5) and the same adapter gradients as torch autograd (≤ 1e-4).
//! * An adapter made and saved by flowrun is loaded by the README's diffusers snippet
//!   (`StableDiffusion3Pipeline.from_pretrained` + `load_lora_weights`) into the tiny pipeline:
//!   the same velocity as flowrun's (≤ 1e-5), checked by the Python side.
//! * Save → load is bit-exact; adapters that do not fit a model are refused with every problem.
//!
//! Needs a Python with torch, diffusers, peft and safetensors ([`common::python_with`]): without
//! one the tests print a NOTICE and pass, except under CI (`FLOWRUN_CI=1`), where they fail.

mod common;
use common::{check_rel, values};

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use burn::module::{Module, Param};
use burn::tensor::{Device, Tensor};
use nodes::model::checkpoint::{NamedTensor, SafetensorsFile, serialize_safetensors};
use nodes::model::lora::file::{LORA_WEIGHTS_NAME, load_adapters, save_adapters};
use nodes::model::lora::{self, Linears, LoraConfig, LoraInit};
use nodes::model::sd3::{Sd3Transformer, load_diffusers};
use nodes::model::{VelocityModel, tensor_from_vec};

const VELOCITY_TOL: f32 = 1e-5;
const GRAD_TOL: f32 = 1e-4;

/// `lora_reference.py make`'s folder, generated once per test binary; `None` without Python.
fn reference() -> Option<&'static Path> {
    static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    DIR.get_or_init(|| {
        let py = common::python_with(&["torch", "diffusers", "peft", "safetensors"])?;
        let out = common::tmpdir("lora-reference");
        let script = common::root().join("tests/python/lora_reference.py");
        let o = Command::new(py)
            .arg(&script)
            .arg("make")
            .arg(&out)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{}: {}",
            script.display(),
            common::text(&o)
        );
        Some(out)
    })
    .as_deref()
}

struct Case(SafetensorsFile);

impl Case {
    fn open(dir: &Path) -> Self {
        Case(SafetensorsFile::read(&dir.join("case.safetensors")).unwrap())
    }
    fn raw(&self, name: &str) -> (Vec<usize>, Vec<f32>) {
        self.0.get(name).unwrap()
    }
    fn tensor<const D: usize>(&self, name: &str, dev: &Device) -> Tensor<D> {
        let (shape, v) = self.raw(name);
        tensor_from_vec(v, shape.try_into().unwrap(), dev)
    }
    fn velocity(&self, model: &Sd3Transformer, dev: &Device) -> Tensor<4> {
        model.forward(
            self.tensor("x", dev),
            self.tensor("sigma", dev),
            self.tensor("prompt_embeds", dev),
            self.tensor("pooled", dev),
        )
    }
}

fn check_velocity(file: &str, want: &str, scale: f64) {
    let Some(dir) = reference() else { return };
    let case = Case::open(dir);
    let dev = common::test_device();
    let (_, base) = load_diffusers(&dir.join("base"), &dev).unwrap();
    let (mut model, info) = load_adapters(base.clone(), &dir.join(file)).unwrap();
    // 10 targets: 8 per joint block (the last has no to_add_out), attn2's 2 in block 0.
    assert_eq!(info.layers.len(), 8 + 7 + 2, "{:?}", info.layers);
    for (p, r, s) in lora::adapted_layers(&mut model) {
        assert_eq!(r, 4, "{p}");
        assert!(
            (s - scale).abs() < 1e-12,
            "{p}: scale {s}, expected {scale}"
        );
    }
    let mut log = format!("{file}:\n");
    let v = case.velocity(&model, &dev);
    let (ws, wv) = case.raw(want);
    check_rel(
        &mut log,
        "velocity",
        (&v.dims(), &values(v)),
        (&ws, &wv),
        VELOCITY_TOL,
    );
    // The adapter matters: the base alone is far from it.
    let vb = values(case.velocity(&base, &dev));
    assert!(common::rel_err("base", (&ws, &vb), (&ws, &wv)) > 1e-2);
    eprint!("{log}");
}

#[test]
fn should_load_an_adapter_saved_by_diffusers() {
    check_velocity("diffusers", "v_diffusers", 2.0);
}

#[test]
fn should_load_a_peft_save_pretrained_folder() {
    check_velocity("peft", "v_peft", 3.0);
}

#[test]
fn should_match_torch_autograd_for_the_adapter_gradients() {
    let Some(dir) = reference() else { return };
    let case = Case::open(dir);
    let ad = common::test_device().autodiff();
    let (_, base) = load_diffusers(&dir.join("base"), &ad).unwrap();
    let (model, _) = load_adapters(base, &dir.join("diffusers")).unwrap();
    let model = model.train();
    let v = case.velocity(&model, &ad);
    let grads = (v * case.tensor::<4>("w", &ad)).sum().backward();
    let wanted: Vec<String> = serde_json::from_str(&case.0.metadata["grad_keys"]).unwrap();
    let mut found: HashMap<String, (Vec<usize>, Vec<f32>)> = HashMap::new();
    let mut m = model;
    m.each_linear("", &mut |p, lin| {
        for (kind, f) in [("lora_A", &lin.lora_A), ("lora_B", &lin.lora_B)] {
            let key = format!("{p}.{kind}.weight");
            if let (true, Some(f)) = (wanted.contains(&key), f) {
                // burn [in, out] → PyTorch [out, in]
                let g = f
                    .weight
                    .val()
                    .grad(&grads)
                    .expect("adapter gradient")
                    .transpose();
                found.insert(key, (g.dims().to_vec(), values(g)));
            }
        }
    });
    let mut log = String::from("adapter gradients:\n");
    for key in &wanted {
        let got = found
            .get(key)
            .unwrap_or_else(|| panic!("{key}: no gradient"));
        let (s, r) = case.raw(&format!("grad.{key}"));
        check_rel(&mut log, key, (&got.0, &got.1), (&s, &r), GRAD_TOL);
    }
    eprint!("{log}");
}

/// Every adapter factor of `model` set to fixed non-zero values.
fn fill_adapters(model: &mut Sd3Transformer, dev: &Device) {
    let mut k = 0f32;
    model.each_linear("", &mut |_, lin| {
        for f in [&mut lin.lora_A, &mut lin.lora_B].into_iter().flatten() {
            k += 1.0;
            let [i, o] = f.weight.dims();
            let v = (0..i * o)
                .map(|j| 0.3 * ((j as f32 + k) * 0.71).sin())
                .collect();
            f.weight = Param::from_tensor(tensor_from_vec(v, [i, o], dev));
        }
    });
}

#[test]
fn should_save_adapters_that_diffusers_loads() {
    let Some((pipeline, _)) = common::sd3_fixture() else {
        return;
    };
    let Some(py) = common::python_with(&["torch", "diffusers", "peft", "safetensors"]) else {
        return;
    };
    let dev = common::test_device();
    let (_, base) = load_diffusers(pipeline, &dev).unwrap();
    let cfg = LoraConfig::new(4, 8.0);
    let (mut model, adapted) =
        lora::attach(base.clone(), &cfg, Sd3Transformer::LORA_TARGETS, 5).unwrap();
    assert!(!adapted.is_empty());
    fill_adapters(&mut model, &dev);

    let dir = common::tmpdir("lora-flowrun-adapter");
    save_adapters(
        &model,
        &dir.join(LORA_WEIGHTS_NAME),
        "transformer.",
        LoraInit::Gaussian,
    )
    .unwrap();

    // Inputs of the pipeline's transformer and flowrun's velocities.
    let c = model.config().clone();
    let (b, h, w) = (2, 8, 8);
    let vals = |n: usize, s: f32| (0..n).map(|i| ((i as f32 + 1.0) * s).sin()).collect();
    let x = tensor_from_vec(
        vals(b * c.in_channels * h * w, 0.37),
        [b, c.in_channels, h, w],
        &dev,
    );
    let sigma = tensor_from_vec(vec![0.9, 0.4], [2], &dev);
    let prompt = tensor_from_vec(
        vals(b * 6 * c.joint_attention_dim, 0.53),
        [b, 6, c.joint_attention_dim],
        &dev,
    );
    let pooled = tensor_from_vec(
        vals(b * c.pooled_projection_dim, 0.29),
        [b, c.pooled_projection_dim],
        &dev,
    );
    let v = model.forward(x.clone(), sigma.clone(), prompt.clone(), pooled.clone());
    let v_base = base.forward(x.clone(), sigma.clone(), prompt.clone(), pooled.clone());
    let named = |name: &str, t: Vec<usize>, v: Vec<f32>| NamedTensor {
        name: name.into(),
        shape: t,
        values: v,
    };
    let tensors = vec![
        named("x", x.dims().to_vec(), values(x)),
        named("sigma", vec![2], values(sigma)),
        named("prompt_embeds", prompt.dims().to_vec(), values(prompt)),
        named("pooled", pooled.dims().to_vec(), values(pooled)),
        named("velocity", v.dims().to_vec(), values(v)),
        named("v_base", v_base.dims().to_vec(), values(v_base)),
    ];
    let inputs = dir.join("inputs.safetensors");
    std::fs::write(
        &inputs,
        serialize_safetensors(&tensors, HashMap::new()).unwrap(),
    )
    .unwrap();

    let o = Command::new(py)
        .arg(common::root().join("tests/python/lora_reference.py"))
        .arg("check")
        .arg(pipeline)
        .arg(&dir)
        .arg(&inputs)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "lora_reference.py check: {}",
        common::text(&o)
    );
    eprintln!("{}", String::from_utf8_lossy(&o.stdout));
}

#[test]
fn should_round_trip_adapters_bit_exactly() {
    let Some(dir) = reference() else { return };
    let dev = Device::flex();
    let (_, base) = load_diffusers(&dir.join("base"), &dev).unwrap();
    let (mut a, _) = load_adapters(base.clone(), &dir.join("diffusers")).unwrap();
    let out = common::tmpdir("lora-round-trip").join(LORA_WEIGHTS_NAME);
    save_adapters(&a, &out, "transformer.", LoraInit::Gaussian).unwrap();
    let (mut b, info) = load_adapters(base, &out).unwrap();
    assert_eq!(info.config.rank, 4);
    assert_eq!(info.config.alpha(), 8.0);
    let bits = |m: &mut Sd3Transformer| {
        let mut out = Vec::new();
        m.each_linear("", &mut |p, lin| {
            for f in [&lin.lora_A, &lin.lora_B].into_iter().flatten() {
                let v: Vec<u32> = values(f.weight.val()).iter().map(|x| x.to_bits()).collect();
                out.push((p.to_string(), v, lin.lora_scale.to_bits()));
            }
        });
        out
    };
    let (ba, bb) = (bits(&mut a), bits(&mut b));
    assert_eq!(ba.len(), 2 * 17);
    assert!(ba == bb, "save → load changed the adapters");
}

#[test]
fn should_refuse_an_adapter_of_another_model_with_every_problem() {
    let Some(dir) = reference() else { return };
    let Some((pipeline, _)) = common::sd3_fixture() else {
        return;
    };
    let (_, other) = load_diffusers(pipeline, &Device::flex()).unwrap();
    let e = load_adapters(other, &dir.join("diffusers")).unwrap_err();
    let e = format!("{e}");
    assert!(e.contains("pytorch_lora_weights.safetensors"), "{e}");
    assert!(e.contains("does not fit the model"), "{e}");
    // Block 1 does not exist in the one-block pipeline; block 0's widths differ.
    // (the one block is the last: no to_add_out, no attn2).
    for part in [
        "10 adapted layer(s) that are not linear layers of the model: \
         transformer_blocks.0.attn.to_add_out, transformer_blocks.0.attn2.to_out.0",
        "7 adapter(s) of another shape than their layer: transformer_blocks.0.attn.to_q \
         (lora_A [4, 32], lora_B [32, 4]; the layer takes [r, 16] and [16, r])",
    ] {
        assert!(e.contains(part), "{e}");
    }

    let e = load_adapters(
        load_diffusers(&dir.join("base"), &Device::flex())
            .unwrap()
            .1,
        &dir.join("base"),
    )
    .unwrap_err();
    assert!(
        format!("{e}").contains("no LoRA adapter in this folder"),
        "{e}"
    );
}
