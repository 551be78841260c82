//! Cross-check of `nodes::model::sd3` against diffusers' `SD3Transformer2DModel` itself.
//!
//! `tests/python/sd3_reference.py` (pinned to diffusers 0.42.1 and torch 2.9.0) builds tiny
//! random models — SD3 with patch 1 (a pipeline folder), SD3 with patch 2, H ≠ W and a cropped
//! position grid (sharded), SD3.5 with dual attention and RMS qk-norm (float16), SD3.5 with dual
//! attention in the last block (bfloat16) — saves them with `save_pretrained`, and writes inputs,
//! diffusers' velocities (with and without CFG) and torch autograd gradients. Here each folder is
//! loaded with `load_diffusers` and compared: max|Δ| / max|ref| ≤ 1e-5 for velocities, ≤ 1e-4
//! for gradients. Copies of a generated folder, edited, check every loader error.
//!
//! Needs a Python with torch, diffusers and safetensors ([`common::python_with`]): without one
//! the tests print a NOTICE and pass, except under CI (`FLOWRUN_CI=1`), where they fail.

mod common;
use common::{check_rel, values};

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{Device, Tensor};
use nodes::model::checkpoint::SafetensorsFile;
use nodes::model::sd3::embeddings::sincos_pos_embed;
use nodes::model::sd3::{Sd3Config, Sd3Transformer, load_diffusers};
use nodes::model::tensor_from_vec;

const VELOCITY_TOL: f32 = 1e-5;
const GRAD_TOL: f32 = 1e-4;

/// The reference folder, generated once per test binary; `None` (skip) without a Python.
fn reference() -> Option<&'static Path> {
    static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    DIR.get_or_init(|| {
        let py = common::python_with(&["torch", "diffusers", "safetensors"])?;
        let out = common::tmpdir("sd3-reference");
        let script = common::root().join("tests/python/sd3_reference.py");
        let start = std::time::Instant::now();
        let o = Command::new(py).arg(&script).arg(&out).output().unwrap();
        assert!(
            o.status.success(),
            "{}: {}",
            script.display(),
            common::text(&o)
        );
        eprintln!(
            "sd3_reference.py: {:.1} s\n{}",
            start.elapsed().as_secs_f64(),
            String::from_utf8_lossy(&o.stdout)
        );
        Some(out)
    })
    .as_deref()
}

/// One case's inputs and diffusers' outputs.
struct Case {
    file: SafetensorsFile,
    folder: PathBuf,
}

impl Case {
    fn open(dir: &Path, name: &str) -> Self {
        let file = SafetensorsFile::read(&dir.join(format!("{name}.safetensors"))).unwrap();
        let folder = dir.join(file.meta("folder").unwrap());
        Self { file, folder }
    }

    fn raw(&self, name: &str) -> (Vec<usize>, Vec<f32>) {
        self.file.get(name).unwrap()
    }

    fn tensor<const D: usize>(&self, name: &str, dev: &Device) -> Tensor<D> {
        let (shape, values) = self.raw(name);
        let shape: [usize; D] = shape.try_into().unwrap();
        tensor_from_vec(values, shape, dev)
    }

    fn grad_params(&self) -> Vec<String> {
        serde_json::from_str(self.file.meta("grad_params").unwrap()).unwrap()
    }

    fn cfg_scale(&self) -> f32 {
        self.file.meta("cfg_scale").unwrap().parse().unwrap()
    }
}

fn values_of<const D: usize>(t: Option<Tensor<D>>) -> Option<(Vec<usize>, Vec<f32>)> {
    t.map(|t| (t.dims().to_vec(), values(t)))
}

/// The gradients of the named parameters, in PyTorch's layout (Linear weights transposed back).
struct GradsOf<'a> {
    wanted: &'a [String],
    grads: &'a burn::tensor::Gradients,
    path: Vec<String>,
    found: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
}

impl ModuleVisitor for GradsOf<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let path = self.path.join(".");
        if !self.wanted.contains(&path) {
            return;
        }
        let g = param
            .val()
            .grad(self.grads)
            .unwrap_or_else(|| panic!("{path} has no gradient"));
        let g = if D == 2 { g.transpose() } else { g };
        self.found.insert(path, (g.dims().to_vec(), values(g)));
    }
}

/// Velocity, CFG and gradients of one generated case against diffusers'.
fn check_case(name: &str) {
    let Some(dir) = reference() else { return };
    let case = Case::open(dir, name);
    let mut log = format!("{name} ({}):\n", case.file.meta("dtype").unwrap());
    let dev = common::test_device();
    let start = std::time::Instant::now();
    let (config, model) = load_diffusers(&case.folder, &dev).unwrap();
    log.push_str(&format!(
        "  load_diffusers: {:.3} s\n",
        start.elapsed().as_secs_f64()
    ));
    assert_eq!(model.config(), &config);

    let x = case.tensor::<4>("x", &dev);
    let sigma = case.tensor::<1>("sigma", &dev);
    let prompt = case.tensor::<3>("prompt_embeds", &dev);
    let pooled = case.tensor::<2>("pooled", &dev);
    let v = model.forward(x.clone(), sigma.clone(), prompt.clone(), pooled.clone());
    let (vs, vv) = case.raw("velocity");
    check_rel(
        &mut log,
        "velocity",
        (&v.dims(), &values(v)),
        (&vs, &vv),
        VELOCITY_TOL,
    );

    let neg = case.tensor::<3>("negative_prompt_embeds", &dev);
    let neg_pooled = case.tensor::<2>("negative_pooled", &dev);
    let v_cfg = model
        .try_forward_cfg(
            x,
            sigma.clone(),
            prompt,
            pooled,
            neg,
            neg_pooled,
            case.cfg_scale(),
        )
        .unwrap();
    let (cs, cv) = case.raw("v_cfg");
    check_rel(
        &mut log,
        "v_cfg (batched)",
        (&v_cfg.dims(), &values(v_cfg)),
        (&cs, &cv),
        VELOCITY_TOL,
    );

    // Gradients of sum(velocity · w), on the autodiff device.
    let ad = dev.autodiff();
    let (_, model) = load_diffusers(&case.folder, &ad).unwrap();
    let x = case.tensor::<4>("x", &ad).require_grad();
    let prompt = case.tensor::<3>("prompt_embeds", &ad).require_grad();
    let pooled = case.tensor::<2>("pooled", &ad).require_grad();
    let sigma = case.tensor::<1>("sigma", &ad);
    let w = case.tensor::<4>("w", &ad);
    let v = model.forward(x.clone(), sigma, prompt.clone(), pooled.clone());
    let grads = (v * w).sum().backward();
    for (label, g) in [
        ("x", values_of(x.grad(&grads))),
        ("prompt_embeds", values_of(prompt.grad(&grads))),
        ("pooled", values_of(pooled.grad(&grads))),
    ] {
        let g = g.unwrap_or_else(|| panic!("{label} has no gradient"));
        let (s, r) = case.raw(&format!("grad.{label}"));
        check_rel(
            &mut log,
            &format!("grad {label}"),
            (&g.0, &g.1),
            (&s, &r),
            GRAD_TOL,
        );
    }

    let wanted = case.grad_params();
    let mut visitor = GradsOf {
        wanted: &wanted,
        grads: &grads,
        path: Vec::new(),
        found: BTreeMap::new(),
    };
    model.visit(&mut visitor);
    for name in &wanted {
        let (gs, gv) = visitor
            .found
            .get(name)
            .unwrap_or_else(|| panic!("no parameter {name}"));
        let (s, r) = case.raw(&format!("grad.param.{name}"));
        check_rel(
            &mut log,
            &format!("grad {name}"),
            (gs, gv),
            (&s, &r),
            GRAD_TOL,
        );
    }
    eprint!("{log}");
}

#[test]
fn should_match_diffusers_sd3_patch1_pipeline_folder() {
    check_case("sd3_p1");
}

#[test]
fn should_match_diffusers_sd3_patch2_cropped_grid_sharded() {
    check_case("sd3_p2_crop");
}

#[test]
fn should_match_diffusers_sd35_dual_attention_qk_norm_float16() {
    check_case("sd35_dual");
}

#[test]
fn should_match_diffusers_sd35_dual_last_block_bfloat16() {
    check_case("sd35_bf16");
}

// ---------------------------------------------------------------------------------------------
// The sin-cos grid
// ---------------------------------------------------------------------------------------------

#[test]
fn should_compute_the_grid_diffusers_stores() {
    let Some(dir) = reference() else { return };
    for name in ["sd3_p1", "sd3_p2_crop"] {
        let case = Case::open(dir, name);
        let (config, model) = load_diffusers(&case.folder, &common::test_device()).unwrap();
        let stored = values(model.pos_embed.pos_embed.as_ref().unwrap().val());
        let m = config.pos_embed_max_size.unwrap();
        let ours = sincos_pos_embed(config.inner_dim(), m, m, config.base_size());
        let diff = stored
            .iter()
            .zip(&ours)
            .fold(0f32, |d, (a, b)| d.max((a - b).abs()));
        eprintln!("{name}: stored vs computed grid max|Δ| = {diff:.2e}");
        assert!(diff <= 1e-6, "{name}: grid differs by {diff}");
    }
}

/// A safetensors file written by hand: (name, dtype, shape, little-endian bytes).
type RawTensor = (String, &'static str, Vec<usize>, Vec<u8>);

fn write_safetensors(path: &Path, tensors: &[RawTensor]) {
    let mut header = serde_json::Map::new();
    let mut offset = 0;
    for (name, dtype, shape, bytes) in tensors {
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + bytes.len()]}),
        );
        offset += bytes.len();
    }
    let mut json = serde_json::Value::Object(header).to_string();
    while !json.len().is_multiple_of(8) {
        json.push(' ');
    }
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(json.as_bytes());
    for (_, _, _, bytes) in tensors {
        out.extend_from_slice(bytes);
    }
    fs::write(path, out).unwrap();
}

/// Every tensor of an f32 safetensors file.
fn read_all(path: &Path) -> Vec<RawTensor> {
    let file = SafetensorsFile::read(path).unwrap();
    let mut names: Vec<String> = file
        .tensors()
        .names()
        .into_iter()
        .map(String::from)
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|n| {
            let (shape, v) = file.get(&n).unwrap();
            let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            (n, "F32", shape, bytes)
        })
        .collect()
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            fs::copy(e.path(), target).unwrap();
        }
    }
}

/// A copy of the `sd3_p1` transformer folder (f32, one file) with its tensors edited.
fn edited_copy(label: &str, edit: impl FnOnce(&mut Vec<RawTensor>)) -> Option<PathBuf> {
    let dir = reference()?;
    let src = dir.join("sd3_p1/transformer");
    let dst = common::tmpdir(&format!("sd3-{label}"));
    copy_dir(&src, &dst);
    let weights = dst.join("diffusion_pytorch_model.safetensors");
    let mut tensors = read_all(&weights);
    edit(&mut tensors);
    write_safetensors(&weights, &tensors);
    Some(dst)
}

#[test]
fn should_compute_the_grid_when_the_file_has_none() {
    let Some(folder) = edited_copy("no-grid", |t| t.retain(|t| t.0 != "pos_embed.pos_embed"))
    else {
        return;
    };
    let case = Case::open(reference().unwrap(), "sd3_p1");
    let dev = common::test_device();
    let (_, model) = load_diffusers(&folder, &dev).unwrap();
    let v = model.forward(
        case.tensor("x", &dev),
        case.tensor("sigma", &dev),
        case.tensor("prompt_embeds", &dev),
        case.tensor("pooled", &dev),
    );
    let (s, r) = case.raw("velocity");
    let mut log = "sd3_p1 without the stored grid:\n".to_string();
    check_rel(
        &mut log,
        "velocity",
        (&v.dims(), &values(v)),
        (&s, &r),
        VELOCITY_TOL,
    );
    eprint!("{log}");
}

// ---------------------------------------------------------------------------------------------
// Bad folders: one error, naming the file and every problem
// ---------------------------------------------------------------------------------------------

fn load_err(folder: &Path) -> String {
    match load_diffusers(folder, &common::test_device()) {
        Ok(_) => panic!("{} loaded", folder.display()),
        Err(e) => format!("{e}"),
    }
}

fn assert_has(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "{p:?} not in:\n{msg}");
    }
}

#[test]
fn should_name_the_supported_class_for_a_flux_config() {
    let Some(folder) = edited_copy("flux", |_| {}) else {
        return;
    };
    let path = folder.join("config.json");
    let text = fs::read_to_string(&path).unwrap();
    fs::write(
        &path,
        text.replace("SD3Transformer2DModel", "FluxTransformer2DModel"),
    )
    .unwrap();
    let msg = load_err(&folder);
    assert_has(
        &msg,
        &[
            &path.display().to_string(),
            "FluxTransformer2DModel",
            "only \"SD3Transformer2DModel\"",
        ],
    );
}

#[test]
fn should_name_the_supported_class_for_a_flux_pipeline() {
    let Some(dir) = reference() else { return };
    let dst = common::tmpdir("sd3-flux-pipeline");
    copy_dir(&dir.join("sd3_p1"), &dst);
    let index = dst.join("model_index.json");
    let text = fs::read_to_string(&index).unwrap();
    fs::write(
        &index,
        text.replace("SD3Transformer2DModel", "FluxTransformer2DModel"),
    )
    .unwrap();
    let msg = load_err(&dst);
    assert_has(
        &msg,
        &[
            &index.display().to_string(),
            "FluxTransformer2DModel",
            "only SD3Transformer2DModel",
        ],
    );
}

#[test]
fn should_name_an_unknown_config_field() {
    let Some(folder) = edited_copy("unknown-field", |_| {}) else {
        return;
    };
    let path = folder.join("config.json");
    let text = fs::read_to_string(&path).unwrap();
    fs::write(&path, text.replacen('{', "{\n  \"use_rope\": true,", 1)).unwrap();
    let msg = load_err(&folder);
    assert_has(
        &msg,
        &[&path.display().to_string(), "unknown field `use_rope`"],
    );
}

#[test]
fn should_reject_an_unsupported_qk_norm() {
    let Some(folder) = edited_copy("qk-norm", |_| {}) else {
        return;
    };
    let path = folder.join("config.json");
    let text = fs::read_to_string(&path).unwrap();
    fs::write(
        &path,
        text.replace("\"qk_norm\": null", "\"qk_norm\": \"layer_norm\""),
    )
    .unwrap();
    let msg = load_err(&folder);
    assert_has(
        &msg,
        &[
            &path.display().to_string(),
            "qk_norm \"layer_norm\" is not supported",
        ],
    );
}

#[test]
fn should_name_a_missing_key() {
    let key = "transformer_blocks.1.attn.to_k.bias";
    let Some(folder) = edited_copy("missing-key", |t| t.retain(|t| t.0 != key)) else {
        return;
    };
    let msg = load_err(&folder);
    let weights = folder.join("diffusion_pytorch_model.safetensors");
    assert_has(
        &msg,
        &[&weights.display().to_string(), "1 missing key(s)", key],
    );
}

#[test]
fn should_name_an_unknown_key() {
    let key = "transformer_blocks.0.attn.to_rope.weight";
    let Some(folder) = edited_copy("unknown-key", |t| {
        t.push((key.to_string(), "F32", vec![2], vec![0; 8]));
    }) else {
        return;
    };
    let msg = load_err(&folder);
    let weights = folder.join("diffusion_pytorch_model.safetensors");
    assert_has(
        &msg,
        &[&weights.display().to_string(), "1 unknown key(s)", key],
    );
}

#[test]
fn should_name_a_mis_shaped_key() {
    let key = "proj_out.weight";
    let Some(folder) = edited_copy("mis-shaped", |t| {
        let e = t.iter_mut().find(|t| t.0 == key).unwrap();
        // [4, 32] → [8, 16]: the same byte count, another shape.
        e.2 = vec![8, 16];
    }) else {
        return;
    };
    let msg = load_err(&folder);
    assert_has(
        &msg,
        &[
            &folder
                .join("diffusion_pytorch_model.safetensors")
                .display()
                .to_string(),
            "1 mis-shaped key(s)",
            "proj_out.weight (file [8, 16], model [4, 32])",
        ],
    );
}

#[test]
fn should_list_every_problem_in_one_error() {
    let Some(folder) = edited_copy("many", |t| {
        // Every key of block 1 missing (more than 10), one unknown, one of an unsupported dtype.
        t.retain(|t| !t.0.starts_with("transformer_blocks.1."));
        t.push(("extra.weight".to_string(), "F32", vec![1], vec![0; 4]));
        let e = t.iter_mut().find(|t| t.0 == "proj_out.bias").unwrap();
        e.1 = "I32";
    }) else {
        return;
    };
    let msg = load_err(&folder);
    assert_has(
        &msg,
        &[
            "missing key(s)",
            "more)",
            "transformer_blocks.1.norm1.linear.weight",
            "1 unknown key(s) (in the files, not in the model): extra.weight",
            "unsupported dtype",
            "proj_out.bias (I32)",
        ],
    );
    assert_eq!(msg.matches("missing key").count(), 1, "{msg}");
    // Ten missing names are shown, not all of them.
    let line = msg.lines().find(|l| l.contains("missing key")).unwrap();
    assert_eq!(line.matches("transformer_blocks.1.").count(), 10, "{line}");
}

#[test]
fn should_say_the_weights_file_is_missing() {
    let Some(folder) = edited_copy("no-weights", |_| {}) else {
        return;
    };
    fs::remove_file(folder.join("diffusion_pytorch_model.safetensors")).unwrap();
    let msg = load_err(&folder);
    assert_has(
        &msg,
        &[
            &folder.display().to_string(),
            "missing weights",
            "diffusion_pytorch_model.safetensors",
        ],
    );
}

#[test]
fn should_say_a_file_is_not_safetensors() {
    let Some(folder) = edited_copy("garbage", |_| {}) else {
        return;
    };
    let weights = folder.join("diffusion_pytorch_model.safetensors");
    fs::write(&weights, b"\xff\xff\xff\xff\xff\xff\xff\x7fnot a header").unwrap();
    let msg = load_err(&folder);
    assert_has(
        &msg,
        &[
            &weights.display().to_string(),
            "is not a safetensors file: its header is too large",
        ],
    );
    fs::write(&weights, b"tiny").unwrap();
    assert_has(
        &load_err(&folder),
        &[&weights.display().to_string(), "not a safetensors file"],
    );
}

#[test]
fn should_say_a_shard_is_missing() {
    let Some(dir) = reference() else { return };
    let dst = common::tmpdir("sd3-missing-shard");
    copy_dir(&dir.join("sd3_p2_crop"), &dst);
    let shard = dst.join("diffusion_pytorch_model-00003-of-00016.safetensors");
    fs::remove_file(&shard).unwrap();
    let msg = load_err(&dst);
    assert_has(&msg, &[&shard.display().to_string(), "missing shard"]);
}

#[test]
fn should_say_the_config_is_missing() {
    let Some(folder) = edited_copy("no-config", |_| {}) else {
        return;
    };
    fs::remove_file(folder.join("config.json")).unwrap();
    let msg = load_err(&folder);
    assert_has(&msg, &[&folder.display().to_string(), "missing config"]);
}

#[test]
fn should_reject_a_latent_the_model_cannot_take() {
    let Some(dir) = reference() else { return };
    let case = Case::open(dir, "sd3_p2_crop");
    let dev = common::test_device();
    let (config, model): (Sd3Config, Sd3Transformer) = load_diffusers(&case.folder, &dev).unwrap();
    let x = |h: usize, w: usize| Tensor::<4>::zeros([2, config.in_channels, h, w], &dev);
    let args = || {
        (
            case.tensor::<1>("sigma", &dev),
            case.tensor::<3>("prompt_embeds", &dev),
            case.tensor::<2>("pooled", &dev),
        )
    };
    let (s, p, q) = args();
    let e = model.try_forward(x(12, 19), s, p, q).unwrap_err();
    assert_has(&format!("{e}"), &["12x19", "patch_size 2"]);
    // 26 / 2 = 13 patches > pos_embed_max_size 12.
    let (s, p, q) = args();
    let e = model.try_forward(x(26, 20), s, p, q).unwrap_err();
    assert_has(&format!("{e}"), &["13x10 patches", "pos_embed_max_size 12"]);
}
