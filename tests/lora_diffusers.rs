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
use burn::tensor::{DType, Device, Tensor};
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

/// Every float parameter of `m`: path → (dtype, its values' f32 bits).
fn param_bits<M: Module>(m: &M) -> std::collections::BTreeMap<String, (DType, Vec<u32>)> {
    struct V {
        path: Vec<String>,
        out: std::collections::BTreeMap<String, (DType, Vec<u32>)>,
    }
    impl burn::module::ModuleVisitor for V {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<D>>) {
            let t = p.val();
            let bits = values(t.clone()).iter().map(|v| v.to_bits()).collect();
            self.out.insert(self.path.join("."), (t.dtype(), bits));
        }
    }
    let mut v = V {
        path: Vec::new(),
        out: Default::default(),
    };
    m.visit(&mut v);
    v.out
}

/// A LoRA policy with its base in bf16 (`base_dtype: bf16`) on libtorch: the base is bf16, the
/// adapters and their AdamW moments f32; the velocity is f32 and within 1e-2 (max|Δ|/max|ref|;
/// 5e-2 with CFG 4.5) of the f32 policy's; a GRPO step (clipped-ratio surrogate at ratio 1, log-probs in f32)
/// leaves the base bit-identical and moves the adapters. Runs under
/// `FLOWRUN_TEST_DEVICE=libtorch` (`.ci/run`); on flex, where `base_dtype` is refused, it
/// only checks that refusal.
#[test]
fn should_train_adapters_over_a_bf16_base_on_libtorch() {
    use nodes::flow_model::{PolicyModel, base_dtype_problem};
    use nodes::grpo::kernel::{LinearGaussian, log_prob};
    use nodes::model::lora::BaseDtype;
    use nodes::model::sd3::Sd3Config;
    use nodes::model::{Conditioning, TextConditioning, TrainerConfig};

    let device_name = std::env::var("FLOWRUN_TEST_DEVICE").unwrap_or_else(|_| "flex".into());
    if !device_name.starts_with("libtorch") {
        let e = base_dtype_problem(BaseDtype::BF16, "sd3", true, &device_name).unwrap();
        assert!(e.contains("needs `device: libtorch`"), "{e}");
        eprintln!("NOTICE: the bf16 base is checked on libtorch (FLOWRUN_TEST_DEVICE=libtorch)");
        return;
    }
    let dev = common::test_device();
    // SD3.5-style: RMS qk-norm and the second attention in block 0.
    let c = Sd3Config {
        qk_norm: Some("rms_norm".into()),
        dual_attention_layers: vec![0],
        num_layers: 2,
        ..Sd3Config::tiny()
    };
    let cfg = LoraConfig::new(4, 8.0);
    let policy = |dtype: BaseDtype| {
        let (mut m, _) =
            lora::attach(c.init(&dev, 5), &cfg, Sd3Transformer::LORA_TARGETS, 3).unwrap();
        fill_adapters(&mut m, &dev);
        let mut p = PolicyModel::with_lora(
            m,
            &TrainerConfig::new().with_lr(1e-3).with_ema_decay(0.9),
            true,
            cfg.clone(),
        );
        p.cast_base(dtype);
        p
    };
    let (full, mut half) = (policy(BaseDtype::F32), policy(BaseDtype::BF16));

    // The base bf16, the adapters f32.
    let before = param_bits(&half.trainer.model().valid());
    for (path, (dtype, _)) in &before {
        let want = if path.contains(".lora_") {
            DType::F32
        } else {
            DType::BF16
        };
        assert_eq!(*dtype, want, "{path}");
    }
    assert!(before.keys().any(|p| p.contains(".lora_A.")));
    // The KL reference is the same bf16 base, adapters off.
    let reference = param_bits(&half.reference_model().unwrap());
    assert!(reference.keys().all(|p| !p.contains(".lora_")));
    assert!(
        reference.iter().all(|(p, v)| before[p] == *v),
        "reference ≠ base"
    );

    let vals = |n: usize, s: f32| (0..n).map(|i| ((i as f32 + 1.0) * s).sin()).collect();
    let (b, ch) = (2, c.in_channels);
    let x = tensor_from_vec(vals(b * ch * 64, 0.3), [b, ch, 8, 8], &dev);
    let t = tensor_from_vec(vec![0.7, 0.4], [b], &dev);
    let cond = Conditioning::Text(TextConditioning {
        prompt_embeds: tensor_from_vec(
            vals(b * 3 * c.joint_attention_dim, 0.7),
            [b, 3, c.joint_attention_dim],
            &dev,
        ),
        pooled: tensor_from_vec(
            vals(b * c.pooled_projection_dim, 0.9),
            [b, c.pooled_projection_dim],
            &dev,
        ),
        negative_embeds: tensor_from_vec(
            vals(3 * c.joint_attention_dim, 0.2),
            [1, 3, c.joint_attention_dim],
            &dev,
        ),
        negative_pooled: tensor_from_vec(
            vals(c.pooled_projection_dim, 0.4),
            [1, c.pooled_projection_dim],
            &dev,
        ),
    });
    let velocity = |p: &PolicyModel<Sd3Transformer>, cfg_scale: f32| {
        p.sampling_model(false)
            .velocity_cfg(x.clone(), t.clone(), &cond, cfg_scale)
            .unwrap()
    };
    let mut log = String::from("bf16 base vs f32:\n");
    // CFG 4.5 extrapolates the difference of the two branches: their errors grow with it.
    for (scale, tol) in [(1.0, 1e-2), (4.5, 5e-2)] {
        let (vh, vf) = (velocity(&half, scale), velocity(&full, scale));
        assert_eq!(vh.dtype(), DType::F32);
        let shape = vh.dims().to_vec();
        check_rel(
            &mut log,
            &format!("velocity (cfg {scale})"),
            (&shape, &values(vh)),
            (&shape, &values(vf)),
            tol,
        );
    }
    let vr = half
        .reference_model()
        .unwrap()
        .velocity(x.clone(), t.clone(), &cond)
        .unwrap();
    assert_eq!(vr.dtype(), DType::F32);
    eprint!("{log}");

    // One GRPO step on the autodiff model: the policy-gradient surrogate −A·ratio at ratio 1.
    let ad = half.trainer.device().clone();
    let k = LinearGaussian::tafs(0.7, 0.4, 0.5).unwrap();
    let (xa, ta) = (x.clone().to_device(&ad), t.clone().to_device(&ad));
    let x_next = x.clone().mul_scalar(0.9).to_device(&ad);
    let v = VelocityModel::velocity(
        half.trainer.model(),
        xa.clone(),
        ta,
        &cond.clone().to_device(&ad),
    )
    .unwrap();
    let mean = xa.mul_scalar(k.a) + v.mul_scalar(k.b);
    let logp = log_prob(x_next, mean, k.std);
    assert_eq!(logp.dtype(), DType::F32);
    let ratio = (logp.clone() - logp.detach()).exp();
    let adv = tensor_from_vec(vec![1.0, -0.5], [b], &ad);
    let loss = (ratio * adv).mean().neg();
    let stats = half.trainer.apply_loss(loss);
    assert!(
        stats.grad_norm > 0.0 && stats.grad_norm.is_finite(),
        "{stats:?}"
    );

    let after = param_bits(&half.trainer.model().valid());
    let mut moved = 0;
    for (path, (dtype, bits)) in &after {
        assert_eq!(*dtype, before[path].0, "{path}: dtype changed");
        if path.contains(".lora_") {
            moved += (*bits != before[path].1) as usize;
        } else {
            assert!(*bits == before[path].1, "base parameter {path} changed");
        }
    }
    assert!(moved > 0, "no adapter moved");
    let mut n = 0;
    for (path, m, v) in half.trainer.moments() {
        assert!(path.contains(".lora_"), "AdamW state for {path}");
        assert_eq!((m.dtype(), v.dtype()), (DType::F32, DType::F32), "{path}");
        n += 1;
    }
    assert!(n > 0, "no AdamW state");
    // The EMA keeps the base as it is (bf16) and the adapters in f32.
    for (path, (dtype, _)) in param_bits(&half.trainer.ema()) {
        assert_eq!(dtype, after[&path].0, "EMA {path}");
    }
}
