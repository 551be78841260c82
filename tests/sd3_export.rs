//! `nodes::model::sd3::export` (`save_diffusers`), `flowrun export` and `flowrun velocity` on
//! SD3 models, checked by diffusers itself.
//!
//! `tests/python/sd3_reference.py` builds the tiny random SD3 / SD3.5 folders of
//! tests/sd3_diffusers.rs (f32 pipeline folder, f32 sharded, f16, bf16) with diffusers' outputs.
//! Each is loaded with `load_diffusers` and exported — f32, f32 sharded, bf16, f16, and through
//! `flowrun export` from a flowrun checkpoint — then `tests/python/sd3_reload.py` has diffusers
//! reload every exported folder with `SD3Transformer2DModel.from_pretrained` and run the same
//! inputs. Checked: max|Δ|/max|ref| ≤ 1e-5 against our velocity and against diffusers' output on
//! the original folder; config.json's maths fields equal to the original's; the same keys as the
//! original (and as diffusers' own state dict); the stored dtype; the shard index. Then
//! `flowrun velocity` on diffusers folders and flowrun SD3 checkpoints against diffusers'
//! velocities (with and without `--cfg`), and every bad input with its message (these need no
//! Python: their model is made here).
//!
//! Needs a Python with torch, diffusers and safetensors ([`common::python_with`]) for the
//! cross-checks: without one they print a NOTICE and pass, except under CI (`FLOWRUN_CI=1`).

mod common;
use common::{check_rel, rel_err, values};

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use burn::tensor::{Device, Tensor};
use nodes::model::checkpoint::{NamedTensor, SafetensorsFile, serialize_safetensors};
use nodes::model::sd3::export::{ExportDtype, save_diffusers, save_diffusers_sharded};
use nodes::model::sd3::{Sd3Config, Sd3Transformer, load_diffusers};
use nodes::model::{save_safetensors, tensor_from_vec};

const TOL: f32 = 1e-5;
const WEIGHTS: &str = "diffusion_pytorch_model.safetensors";
const INDEX: &str = "diffusion_pytorch_model.safetensors.index.json";

/// How an export of the setup is written.
#[derive(Clone, Copy)]
enum How {
    /// `save_diffusers_sharded(model, dir, dtype, max_shard_size)`.
    Lib(ExportDtype, u64),
    /// `flowrun export` of a flowrun checkpoint of the model (`save_safetensors`), with these
    /// extra arguments.
    Cli(&'static [&'static str]),
}

/// One exported folder: its name, the reference case it comes from, how it is written, its
/// stored dtype (safetensors name) and whether it is sharded.
struct Export {
    name: &'static str,
    case: &'static str,
    how: How,
    dtype: &'static str,
    sharded: bool,
}

const DEFAULT_SHARD: u64 = nodes::model::sd3::export::DEFAULT_MAX_SHARD_SIZE;

const EXPORTS: &[Export] = &[
    // SD3, patch 1, from a pipeline folder.
    Export {
        name: "sd3_p1-f32",
        case: "sd3_p1",
        how: How::Lib(ExportDtype::F32, DEFAULT_SHARD),
        dtype: "F32",
        sharded: false,
    },
    // SD3, patch 2, a cropped grid, out_channels null; from sharded weights into one file.
    Export {
        name: "sd3_p2_crop-f32",
        case: "sd3_p2_crop",
        how: How::Lib(ExportDtype::F32, DEFAULT_SHARD),
        dtype: "F32",
        sharded: false,
    },
    // SD3.5 (dual attention, RMS qk-norm) from float16 weights, written sharded.
    Export {
        name: "sd35_dual-f32-sharded",
        case: "sd35_dual",
        how: How::Lib(ExportDtype::F32, 20_000),
        dtype: "F32",
        sharded: true,
    },
    // SD3.5 stored in bfloat16, written in bfloat16: the same values.
    Export {
        name: "sd35_bf16-bf16",
        case: "sd35_bf16",
        how: How::Lib(ExportDtype::BF16, DEFAULT_SHARD),
        dtype: "BF16",
        sharded: false,
    },
    // Sharded as sd3_reference.py has diffusers shard the original (`max_shard_size="40KB"`).
    Export {
        name: "sd3_p2_crop-f32-40KB",
        case: "sd3_p2_crop",
        how: How::Lib(ExportDtype::F32, 40_000),
        dtype: "F32",
        sharded: true,
    },
    // f32 weights rounded to float16.
    Export {
        name: "sd3_p1-f16",
        case: "sd3_p1",
        how: How::Lib(ExportDtype::F16, DEFAULT_SHARD),
        dtype: "F16",
        sharded: false,
    },
    // `flowrun export` of a run's checkpoint of an SD3.5 policy, sharded.
    Export {
        name: "sd35_dual-cli",
        case: "sd35_dual",
        how: How::Cli(&["--dtype", "f32", "--max-shard-size", "30KB"]),
        dtype: "F32",
        sharded: true,
    },
];

struct Setup {
    reference: PathBuf,
    work: PathBuf,
}

/// The flowrun checkpoint of `case`'s model the setup writes (as a run's would be).
fn checkpoint_of(work: &Path, case: &str) -> PathBuf {
    work.join(format!("run-{case}/checkpoints/iter-2/model.safetensors"))
}

/// Reference folders, exports and diffusers' reloads, made once per test binary; `None` (skip)
/// without a Python.
fn setup() -> Option<&'static Setup> {
    static SETUP: OnceLock<Option<Setup>> = OnceLock::new();
    SETUP
        .get_or_init(|| {
            let py = common::python_with(&["torch", "diffusers", "safetensors"])?;
            let reference = common::tmpdir("sd3-export-reference");
            let script = common::root().join("tests/python/sd3_reference.py");
            let start = std::time::Instant::now();
            let o = Command::new(&py)
                .arg(&script)
                .arg(&reference)
                .output()
                .unwrap();
            assert!(
                o.status.success(),
                "{}: {}",
                script.display(),
                common::text(&o)
            );
            eprintln!("sd3_reference.py: {:.1} s", start.elapsed().as_secs_f64());

            let work = common::tmpdir("sd3-export-work");
            let dev = common::test_device();
            let mut jobs = Vec::new();
            for e in EXPORTS {
                let case = Case::open(&reference, e.case);
                let (_, model) = load_diffusers(&case.folder, &dev).unwrap();
                let out = work.join(e.name);
                let start = std::time::Instant::now();
                match e.how {
                    How::Lib(dtype, shard) => {
                        save_diffusers_sharded(&model, &out, dtype, shard).unwrap();
                    }
                    How::Cli(args) => {
                        let ck = checkpoint_of(&work, e.case);
                        fs::create_dir_all(ck.parent().unwrap()).unwrap();
                        save_safetensors(&model, &ck).unwrap();
                        let o = common::bin()
                            .arg("export")
                            .arg("--checkpoint")
                            .arg(&ck)
                            .arg("--out")
                            .arg(&out)
                            .args(args)
                            .output()
                            .unwrap();
                        assert!(o.status.success(), "flowrun export: {}", common::text(&o));
                        eprint!("{}", String::from_utf8_lossy(&o.stdout));
                    }
                }
                eprintln!("export {}: {:.3} s", e.name, start.elapsed().as_secs_f64());
                jobs.push(serde_json::json!({
                    "folder": out,
                    "inputs": reference.join(format!("{}.safetensors", e.case)),
                    "out": work.join(format!("{}.reloaded.safetensors", e.name)),
                }));
            }
            let jobs_file = work.join("jobs.json");
            fs::write(&jobs_file, serde_json::to_string_pretty(&jobs).unwrap()).unwrap();
            let script = common::root().join("tests/python/sd3_reload.py");
            let start = std::time::Instant::now();
            let o = Command::new(&py)
                .arg(&script)
                .arg(&jobs_file)
                .output()
                .unwrap();
            // 1: some folder did not load; its test reports which and why.
            assert!(
                matches!(o.status.code(), Some(0 | 1)),
                "{}: {}",
                script.display(),
                common::text(&o)
            );
            eprintln!(
                "sd3_reload.py: {:.1} s\n{}",
                start.elapsed().as_secs_f64(),
                common::text(&o)
            );
            Some(Setup { reference, work })
        })
        .as_ref()
}

/// One reference case's inputs and diffusers' outputs on the original folder.
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
        tensor_from_vec(values, shape.try_into().unwrap(), dev)
    }

    /// The transformer folder (`transformer/` of a pipeline folder).
    fn transformer_dir(&self) -> PathBuf {
        let t = self.folder.join("transformer");
        if t.is_dir() { t } else { self.folder.clone() }
    }

    fn cfg_scale(&self) -> f32 {
        self.file.meta("cfg_scale").unwrap().parse().unwrap()
    }

    /// Our velocity, conditional and unconditional, of the model in `folder` on these inputs.
    fn ours(&self, folder: &Path) -> [(Vec<usize>, Vec<f32>); 2] {
        let dev = common::test_device();
        let (_, model) = load_diffusers(folder, &dev).unwrap();
        let run = |prompt: &str, pooled: &str| {
            let v = model.forward(
                self.tensor("x", &dev),
                self.tensor("sigma", &dev),
                self.tensor(prompt, &dev),
                self.tensor(pooled, &dev),
            );
            (v.dims().to_vec(), values(v))
        };
        [
            run("prompt_embeds", "pooled"),
            run("negative_prompt_embeds", "negative_pooled"),
        ]
    }
}

/// The keys of a folder's weights, and for a sharded one the index.
struct Weights {
    /// key → (file, safetensors dtype, bytes of data)
    keys: BTreeMap<String, (String, String, u64)>,
    index: Option<serde_json::Value>,
}

fn weights(dir: &Path) -> Weights {
    let mut keys = BTreeMap::new();
    for e in fs::read_dir(dir).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.ends_with(".safetensors") {
            continue;
        }
        let file = SafetensorsFile::read(&e.path()).unwrap();
        for (key, view) in file.tensors().tensors() {
            let entry = (
                name.clone(),
                format!("{:?}", view.dtype()),
                view.data().len() as u64,
            );
            assert!(keys.insert(key.clone(), entry).is_none(), "{key} twice");
        }
    }
    let index = dir
        .join(INDEX)
        .is_file()
        .then(|| serde_json::from_str(&fs::read_to_string(dir.join(INDEX)).unwrap()).unwrap());
    Weights { keys, index }
}

/// config.json without the informational fields.
fn maths_fields(config: &serde_json::Value) -> BTreeMap<String, serde_json::Value> {
    config
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| !k.starts_with('_'))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap()
}

/// Every check of one exported folder.
fn check_export(name: &str) {
    let Some(s) = setup() else { return };
    let e = EXPORTS.iter().find(|e| e.name == name).unwrap();
    let case = Case::open(&s.reference, e.case);
    let out = s.work.join(e.name);
    let mut log = format!(
        "{name} (from {}, {}):\n",
        e.case,
        case.file.meta("dtype").unwrap()
    );

    // diffusers loaded it, with no missing, unexpected or mis-shaped key.
    let reloaded =
        SafetensorsFile::read(&s.work.join(format!("{name}.reloaded.safetensors"))).unwrap();
    if let Some(err) = reloaded.metadata.get("error") {
        panic!("diffusers could not load {}: {err}", out.display());
    }

    // config.json: diffusers' fields, every maths field as in the original.
    let original_dir = case.transformer_dir();
    let config = read_json(&out.join("config.json"));
    let original_config = read_json(&original_dir.join("config.json"));
    assert_eq!(config["_class_name"], "SD3Transformer2DModel");
    assert_eq!(config["_diffusers_version"], "0.42.1");
    assert_eq!(
        maths_fields(&config),
        maths_fields(&original_config),
        "config.json"
    );
    let diffusers_config: serde_json::Value =
        serde_json::from_str(reloaded.meta("config").unwrap()).unwrap();
    assert_eq!(
        maths_fields(&diffusers_config),
        maths_fields(&original_config),
        "the config diffusers read"
    );

    // The same keys as the original folder and as diffusers' state dict, in the dtype asked.
    let ours = weights(&out);
    let original = weights(&original_dir);
    let our_keys: BTreeSet<&String> = ours.keys.keys().collect();
    assert_eq!(
        our_keys,
        original.keys.keys().collect::<BTreeSet<_>>(),
        "key set vs the original"
    );
    let state_dict: BTreeSet<String> =
        serde_json::from_str(reloaded.meta("keys").unwrap()).unwrap();
    assert_eq!(
        our_keys,
        state_dict.iter().collect::<BTreeSet<_>>(),
        "key set vs diffusers' state dict"
    );
    for (k, (_, dtype, _)) in &ours.keys {
        assert_eq!(dtype, e.dtype, "{k}");
    }
    let dtypes: BTreeMap<String, String> =
        serde_json::from_str(reloaded.meta("dtypes").unwrap()).unwrap();
    assert!(dtypes.values().all(|d| d == e.dtype), "{dtypes:?}");
    log.push_str(&format!("  {} keys, all {}\n", our_keys.len(), e.dtype));

    // The files: one, or shards with an index naming each key's shard.
    let total: u64 = ours.keys.values().map(|(_, _, b)| b).sum();
    if e.sharded {
        assert!(!out.join(WEIGHTS).exists());
        let index = ours.index.as_ref().expect("an index");
        assert_eq!(index["metadata"]["total_size"], total);
        let map = index["weight_map"].as_object().unwrap();
        assert_eq!(map.len(), ours.keys.len());
        for (k, f) in map {
            assert_eq!(f.as_str(), Some(ours.keys[k].0.as_str()), "{k}");
        }
        let files: BTreeSet<&String> = ours.keys.values().map(|(f, _, _)| f).collect();
        let n = files.len();
        assert!(n > 1, "{files:?}");
        for (i, f) in files.iter().enumerate() {
            assert_eq!(
                **f,
                format!("diffusion_pytorch_model-{:05}-of-{n:05}.safetensors", i + 1)
            );
        }
        log.push_str(&format!("  {n} shards, total_size {total}\n"));
    } else {
        assert!(ours.index.is_none() && !out.join(INDEX).exists());
        assert!(ours.keys.values().all(|(f, _, _)| f == WEIGHTS));
    }
    // No temporaries left next to it.
    let leftovers: Vec<String> = fs::read_dir(&s.work)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // diffusers' velocity on the export = ours (on the original folder, or on the export
    // where it is rounded) = diffusers' on the original folder (where nothing was rounded).
    let rounded = e.dtype == "F16" && case.file.meta("dtype").unwrap() != "float16";
    let ours_folder = if rounded {
        out.clone()
    } else {
        case.folder.clone()
    };
    let [v, v_uncond] = case.ours(&ours_folder);
    for (label, got, theirs_name) in [
        ("velocity", &v, "velocity"),
        ("v_uncond", &v_uncond, "v_uncond"),
    ] {
        let (rs, rv) = reloaded.get(theirs_name).unwrap();
        check_rel(
            &mut log,
            &format!("diffusers(export) vs ours: {label}"),
            (&rs, &rv),
            (&got.0, &got.1),
            TOL,
        );
        let (os, ov) = case.raw(theirs_name);
        if rounded {
            let err = rel_err(label, (&rs, &rv), (&os, &ov));
            log.push_str(&format!(
                "  diffusers(export) vs diffusers(original): {label} = {err:.2e} (f16-rounded weights)\n"
            ));
            assert!(err < 1e-2, "{label}: {err}");
        } else {
            check_rel(
                &mut log,
                &format!("diffusers(export) vs diffusers(original): {label}"),
                (&rs, &rv),
                (&os, &ov),
                TOL,
            );
        }
    }
    eprint!("{log}");
}

#[test]
fn should_reload_an_sd3_export_in_diffusers() {
    check_export("sd3_p1-f32");
}

#[test]
fn should_reload_an_sd3_export_with_a_cropped_grid_from_shards() {
    check_export("sd3_p2_crop-f32");
}

#[test]
fn should_reload_a_sharded_sd35_export_in_diffusers() {
    check_export("sd35_dual-f32-sharded");
}

#[test]
fn should_write_the_config_and_index_diffusers_writes() {
    check_export("sd3_p2_crop-f32-40KB");
    let Some(s) = setup() else { return };
    let case = Case::open(&s.reference, "sd3_p2_crop");
    let out = s.work.join("sd3_p2_crop-f32-40KB");
    // The same shards holding the same keys, byte for byte the same index and config.
    for file in ["config.json", INDEX] {
        assert_eq!(
            fs::read_to_string(out.join(file)).unwrap(),
            fs::read_to_string(case.folder.join(file)).unwrap(),
            "{file} differs from the one diffusers' save_pretrained wrote"
        );
    }
}

#[test]
fn should_reload_a_bf16_sd35_export_in_diffusers() {
    check_export("sd35_bf16-bf16");
}

#[test]
fn should_reload_an_f16_export_in_diffusers() {
    check_export("sd3_p1-f16");
}

#[test]
fn should_reload_what_flowrun_export_writes_from_a_checkpoint() {
    check_export("sd35_dual-cli");
}

#[test]
fn should_keep_bf16_weights_bit_for_bit() {
    let Some(s) = setup() else { return };
    let case = Case::open(&s.reference, "sd35_bf16");
    let read = |dir: &Path| -> BTreeMap<String, Vec<u8>> {
        let mut m = BTreeMap::new();
        for e in fs::read_dir(dir).unwrap().flatten() {
            if e.path().extension().is_some_and(|x| x == "safetensors") {
                let f = SafetensorsFile::read(&e.path()).unwrap();
                for (k, v) in f.tensors().tensors() {
                    m.insert(k, v.data().to_vec());
                }
            }
        }
        m
    };
    let ours = read(&s.work.join("sd35_bf16-bf16"));
    let original = read(&case.folder);
    assert_eq!(ours.len(), original.len());
    for (k, bytes) in &original {
        assert!(ours[k] == *bytes, "{k} differs from diffusers' bf16 file");
    }
}

// ---------------------------------------------------------------------------------------------
// flowrun velocity on SD3 models, against diffusers
// ---------------------------------------------------------------------------------------------

/// An SD3 inputs file of `case`'s inputs (with the negatives when `negatives`).
fn sd3_inputs(case: &Case, path: &Path, negatives: bool) {
    let mut names = vec![
        ("latents", "x"),
        ("t", "sigma"),
        ("prompt_embeds", "prompt_embeds"),
        ("pooled", "pooled"),
    ];
    if negatives {
        names.push(("negative_prompt_embeds", "negative_prompt_embeds"));
        names.push(("negative_pooled", "negative_pooled"));
    }
    write_inputs(
        path,
        names
            .into_iter()
            .map(|(to, from)| {
                let (shape, values) = case.raw(from);
                NamedTensor {
                    name: to.into(),
                    shape,
                    values,
                }
            })
            .collect(),
    );
}

fn write_inputs(path: &Path, tensors: Vec<NamedTensor>) {
    let bytes = serialize_safetensors(&tensors, Default::default()).unwrap();
    fs::write(path, bytes).unwrap();
}

/// `flowrun velocity`, on `$FLOWRUN_TEST_DEVICE` when set.
fn flowrun_velocity(model: &Path, inputs: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut c = common::bin();
    c.args(["velocity", "--checkpoint"])
        .arg(model)
        .arg("--inputs")
        .arg(inputs)
        .arg("--out")
        .arg(out)
        .args(extra);
    if let Ok(d) = std::env::var("FLOWRUN_TEST_DEVICE") {
        c.args(["--device", &d]);
    }
    c.output().unwrap()
}

/// `flowrun velocity` of `model` on `case`'s inputs, with and without `--cfg`, against
/// diffusers' `velocity` and `v_cfg` on the original folder.
fn check_velocity_cli(label: &str, case_name: &str, model: impl Fn(&Setup, &Case) -> PathBuf) {
    let Some(s) = setup() else { return };
    let case = Case::open(&s.reference, case_name);
    let model = model(s, &case);
    let dir = common::tmpdir(&format!("sd3-velocity-{label}"));
    let inputs = dir.join("inputs.safetensors");
    sd3_inputs(&case, &inputs, true);
    let mut log = format!("flowrun velocity, {label} ({case_name}):\n");
    let scale = case.cfg_scale().to_string();
    for (what, extra, want) in [
        ("velocity", vec![], "velocity"),
        ("velocity --cfg", vec!["--cfg", scale.as_str()], "v_cfg"),
    ] {
        let out = dir.join(format!("{want}.safetensors"));
        let start = std::time::Instant::now();
        let o = flowrun_velocity(&model, &inputs, &out, &extra);
        assert!(o.status.success(), "{what}: {}", common::text(&o));
        log.push_str(&format!(
            "  {what}: {:.2} s\n",
            start.elapsed().as_secs_f64()
        ));
        let got = SafetensorsFile::read(&out).unwrap().get("v").unwrap();
        let (ws, wv) = case.raw(want);
        check_rel(&mut log, what, (&got.0, &got.1), (&ws, &wv), TOL);
    }
    eprint!("{log}");
}

#[test]
fn should_give_diffusers_velocity_for_a_pipeline_folder() {
    check_velocity_cli("pipeline", "sd3_p1", |_, case| case.folder.clone());
}

#[test]
fn should_give_diffusers_velocity_for_a_transformer_config_path() {
    check_velocity_cli("config-json", "sd35_dual", |_, case| {
        case.folder.join("config.json")
    });
}

#[test]
fn should_give_diffusers_velocity_for_a_sharded_transformer_folder() {
    check_velocity_cli("sharded", "sd3_p2_crop", |_, case| case.folder.clone());
}

#[test]
fn should_give_diffusers_velocity_for_a_flowrun_sd3_checkpoint() {
    check_velocity_cli("checkpoint", "sd35_dual", |s, _| {
        checkpoint_of(&s.work, "sd35_dual")
    });
}

#[test]
fn should_give_diffusers_velocity_for_a_run_checkpoint_directory() {
    check_velocity_cli("checkpoint-dir", "sd35_dual", |s, _| {
        checkpoint_of(&s.work, "sd35_dual")
            .parent()
            .unwrap()
            .to_path_buf()
    });
}

#[test]
fn should_give_diffusers_velocity_for_an_exported_folder() {
    check_velocity_cli("exported", "sd35_dual", |s, _| {
        s.work.join("sd35_dual-f32-sharded")
    });
}

// ---------------------------------------------------------------------------------------------
// Bad inputs (no Python: a tiny random model made here)
// ---------------------------------------------------------------------------------------------

/// A tiny random SD3.5 as a diffusers folder and a flowrun checkpoint, under `dir`.
fn tiny_model(dir: &Path) -> (Sd3Transformer, PathBuf, PathBuf) {
    let config = Sd3Config {
        dual_attention_layers: vec![0],
        qk_norm: Some("rms_norm".into()),
        pos_embed_max_size: Some(8),
        ..Sd3Config::tiny()
    };
    let model = config.init(&common::test_device(), 42);
    let folder = dir.join("tiny-sd35");
    save_diffusers(&model, &folder, ExportDtype::F32).unwrap();
    let ck = dir.join("tiny-sd35.safetensors");
    save_safetensors(&model, &ck).unwrap();
    (model, folder, ck)
}

fn wave(n: usize, s: f32) -> Vec<f32> {
    (0..n).map(|i| (i as f32 * s).sin()).collect()
}

fn named(name: &str, shape: &[usize], s: f32) -> NamedTensor {
    let n = shape.iter().product();
    NamedTensor {
        name: name.into(),
        shape: shape.to_vec(),
        values: wave(n, s),
    }
}

/// Inputs for the tiny model (4 channels, D 32, P 64): batch 2, 4x6 latents, 3 tokens.
fn tiny_inputs() -> Vec<NamedTensor> {
    vec![
        named("latents", &[2, 4, 4, 6], 0.31),
        NamedTensor {
            name: "t".into(),
            shape: vec![2],
            values: vec![0.3, 0.8],
        },
        named("prompt_embeds", &[2, 3, 32], 0.17),
        named("pooled", &[2, 64], 0.23),
    ]
}

fn assert_fails_with(o: &Output, parts: &[&str]) {
    let out = common::text(o);
    assert!(!o.status.success(), "succeeded: {out}");
    assert!(!out.contains("internal error"), "{out}");
    for p in parts {
        assert!(out.contains(p), "{p:?} not in:\n{out}");
    }
}

#[test]
fn should_match_the_library_and_broadcast_a_single_negative_prompt() {
    let dir = common::tmpdir("sd3-velocity-tiny");
    let (model, folder, ck) = tiny_model(&dir);
    let dev = common::test_device();
    let mut inputs = tiny_inputs();
    // One negative prompt for the batch, of another length (two forwards).
    inputs.push(named("negative_prompt_embeds", &[1, 5, 32], -0.11));
    inputs.push(named("negative_pooled", &[1, 64], 0.07));
    let path = dir.join("inputs.safetensors");
    write_inputs(&path, inputs.clone());
    let t = |i: usize| &inputs[i];
    let to3 = |n: &NamedTensor| -> Tensor<3> {
        tensor_from_vec(n.values.clone(), n.shape.clone().try_into().unwrap(), &dev)
    };
    let to2 = |n: &NamedTensor| -> Tensor<2> {
        tensor_from_vec(n.values.clone(), n.shape.clone().try_into().unwrap(), &dev)
    };
    let x: Tensor<4> = tensor_from_vec(t(0).values.clone(), [2, 4, 4, 6], &dev);
    let s: Tensor<1> = tensor_from_vec(t(1).values.clone(), [2], &dev);
    let want_cond = values(model.forward(x.clone(), s.clone(), to3(t(2)), to2(t(3))));
    let want_cfg = values(
        model
            .try_forward_cfg(
                x,
                s,
                to3(t(2)),
                to2(t(3)),
                to3(t(4)).expand([2, 5, 32]),
                to2(t(5)).expand([2, 64]),
                3.0,
            )
            .unwrap(),
    );
    for source in [&folder, &ck] {
        for (extra, want) in [(vec![], &want_cond), (vec!["--cfg", "3"], &want_cfg)] {
            let out = dir.join("v.safetensors");
            let o = flowrun_velocity(source, &path, &out, &extra);
            assert!(o.status.success(), "{}", common::text(&o));
            let (shape, got) = SafetensorsFile::read(&out).unwrap().get("v").unwrap();
            assert_eq!(shape, [2, 4, 4, 6]);
            let e = rel_err("v", (&shape, &got), (&shape, want));
            assert!(e <= 1e-6, "{} {extra:?}: {e}", source.display());
        }
    }
}

#[test]
fn should_say_what_is_wrong_with_sd3_velocity_inputs() {
    let dir = common::tmpdir("sd3-velocity-bad");
    let (_, folder, _) = tiny_model(&dir);
    let out = dir.join("v.safetensors");
    let run = |label: &str, tensors: Vec<NamedTensor>, extra: &[&str]| {
        let p = dir.join(format!("{label}.safetensors"));
        write_inputs(&p, tensors);
        (flowrun_velocity(&folder, &p, &out, extra), p)
    };
    let without = |name: &str| -> Vec<NamedTensor> {
        tiny_inputs()
            .into_iter()
            .filter(|t| t.name != name)
            .collect()
    };

    let (o, p) = run("no-prompt", without("prompt_embeds"), &[]);
    assert_fails_with(
        &o,
        &[
            &p.display().to_string(),
            "missing tensor `prompt_embeds`",
            "`latents` [B, C, H, W], `t` [B] (σ in [0, 1])",
        ],
    );

    let mut unet_names = without("latents");
    unet_names.push(named("x_t", &[2, 4, 4, 6], 0.3));
    let (o, _) = run("x_t", unet_names, &[]);
    assert_fails_with(
        &o,
        &[
            "missing tensor `latents`",
            "`x_t` is the ShapeWorld UNet's name for it",
        ],
    );

    let (o, p) = run("cfg-no-negatives", tiny_inputs(), &["--cfg", "4.5"]);
    assert_fails_with(
        &o,
        &[
            "--cfg 4.5 needs the unconditional branch",
            "`negative_prompt_embeds`",
            &p.display().to_string(),
        ],
    );

    let mut one = tiny_inputs();
    one.push(named("negative_pooled", &[2, 64], 0.1));
    let (o, _) = run("one-negative", one, &["--cfg", "2"]);
    assert_fails_with(
        &o,
        &["`negative_prompt_embeds` and `negative_pooled` go together"],
    );

    let mut bad_neg = tiny_inputs();
    bad_neg.push(named("negative_prompt_embeds", &[3, 2, 32], 0.1));
    bad_neg.push(named("negative_pooled", &[1, 64], 0.1));
    let (o, _) = run("neg-batch", bad_neg, &["--cfg", "2"]);
    assert_fails_with(
        &o,
        &[
            "`negative_prompt_embeds` is [3, 2, 32]; expected [2 or 1, L' >= 1, joint_attention_dim = 32]",
        ],
    );

    let mut late = tiny_inputs();
    late[1].values = vec![0.5, 1.5];
    let (o, _) = run("t-range", late, &[]);
    assert_fails_with(&o, &["`t` holds 1.5; give σ in [0, 1]"]);

    let mut rgb = without("latents");
    rgb.insert(0, named("latents", &[2, 3, 4, 6], 0.3));
    let (o, p) = run("channels", rgb, &[]);
    assert_fails_with(
        &o,
        &[
            &p.display().to_string(),
            "latents have 3 channels, the model takes in_channels = 4",
        ],
    );

    let mut flat = without("latents");
    flat.insert(0, named("latents", &[2, 96], 0.3));
    let (o, _) = run("rank", flat, &[]);
    assert_fails_with(&o, &["`latents` must be [B, C, H, W], got [2, 96]"]);

    let mut wide = without("prompt_embeds");
    wide.push(named("prompt_embeds", &[2, 3, 16], 0.3));
    let (o, _) = run("width", wide, &[]);
    assert_fails_with(
        &o,
        &["prompt_embeds is [2, 3, 16]", "joint_attention_dim = 32"],
    );

    let (o, _) = run("prompt-flag", tiny_inputs(), &["--prompt", "a red circle"]);
    assert_fails_with(&o, &["--prompt is for the ShapeWorld UNet"]);

    assert!(!out.exists(), "a failed velocity wrote {}", out.display());

    // A folder without a model.
    let empty = dir.join("empty");
    fs::create_dir(&empty).unwrap();
    let p = dir.join("ok.safetensors");
    write_inputs(&p, tiny_inputs());
    let o = flowrun_velocity(&empty, &p, &out, &[]);
    assert_fails_with(&o, &[&empty.display().to_string(), "missing config"]);
}

// ---------------------------------------------------------------------------------------------
// flowrun export: errors
// ---------------------------------------------------------------------------------------------

fn flowrun_export(checkpoint: &Path, out: &Path, extra: &[&str]) -> Output {
    common::bin()
        .args(["export", "--checkpoint"])
        .arg(checkpoint)
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn should_refuse_to_export_the_shapeworld_unet() {
    let dir = common::tmpdir("sd3-export-unet");
    let unet = common::root().join("checkpoints/shapes-small.safetensors");
    assert!(unet.is_file(), "{} is missing", unet.display());
    let out = dir.join("out");
    let o = flowrun_export(&unet, &out, &[]);
    assert_fails_with(
        &o,
        &[
            &unet.display().to_string(),
            "export writes diffusers SD3 folders; this checkpoint holds the ShapeWorld UNet",
        ],
    );
    assert!(!out.exists());
}

#[test]
fn should_say_the_checkpoint_to_export_is_missing() {
    let dir = common::tmpdir("sd3-export-missing");
    let missing = dir.join("nope/model.safetensors");
    let o = flowrun_export(&missing, &dir.join("out"), &[]);
    assert_fails_with(&o, &[&missing.display().to_string(), "does not exist"]);
}

#[test]
fn should_never_export_over_an_existing_folder() {
    let dir = common::tmpdir("sd3-export-exists");
    let (_, folder, ck) = tiny_model(&dir);
    // Over a diffusers folder that is there already (here: the one the model came from).
    let before = fs::read(folder.join(WEIGHTS)).unwrap();
    let o = flowrun_export(&ck, &folder, &[]);
    assert_fails_with(
        &o,
        &[
            &folder.display().to_string(),
            "already exists and is not empty",
        ],
    );
    assert_eq!(fs::read(folder.join(WEIGHTS)).unwrap(), before);
    // Over a file.
    let o = flowrun_export(&ck, &ck, &[]);
    assert_fails_with(&o, &[&ck.display().to_string(), "is not a folder"]);
    // Into a new folder (parents created), then once more: refused.
    let out = dir.join("exports/bf16");
    let o = flowrun_export(&ck, &out, &["--dtype", "bf16"]);
    assert!(o.status.success(), "{}", common::text(&o));
    let o = flowrun_export(&ck, &out, &["--dtype", "bf16"]);
    assert_fails_with(&o, &[&out.display().to_string(), "already exists"]);
    // A diffusers folder re-exported in another dtype loads back as rounded f32.
    let (_, back) = load_diffusers(&out, &common::test_device()).unwrap();
    assert_eq!(back.config().num_layers, 4);
    // A bad shard size.
    let o = flowrun_export(&folder, &dir.join("x"), &["--max-shard-size", "10XB"]);
    assert_fails_with(&o, &["--max-shard-size", "unknown unit"]);
    // Not a safetensors file.
    let junk = dir.join("junk.safetensors");
    fs::write(&junk, b"tiny").unwrap();
    let o = flowrun_export(&junk, &dir.join("y"), &[]);
    assert_fails_with(
        &o,
        &[&junk.display().to_string(), "is not a safetensors file"],
    );
}

// ---------------------------------------------------------------------------------------------
// A real run: TAFS-GRPO on the tiny SD3 pipeline, its checkpoint exported
// ---------------------------------------------------------------------------------------------

/// One iteration of `pipelines/tafs_grpo_sd3.yaml` on the tiny SD3 pipeline (learning rate
/// raised so that the update visibly moves the weights), then `flowrun export` of its
/// checkpoint directory: diffusers loads the folder and computes what flowrun computes from the
/// checkpoint — the trained weights, not the starting ones. The checkpoint's own
/// `transformer/` folder is that export, byte for byte.
#[test]
fn should_export_a_tafs_grpo_sd3_run_checkpoint_that_diffusers_loads() {
    let Some((model_dir, emb)) = common::sd3_fixture() else {
        return;
    };
    let py = common::python_with(&["torch", "diffusers", "safetensors"]).unwrap();
    let srv = common::RewardServer::start(&[]);
    let runs = common::tmpdir("sd3-export-runs");
    let pipeline = common::root().join("pipelines/tafs_grpo_sd3.yaml");
    let mut set = common::sd3_overrides(model_dir, emb, &srv.url(), "nodes.step.nodes.score");
    set.push("iterations=1".into());
    set.push("resources.policy.params.lr=1.0e-3".into());
    let mut c = common::bin();
    c.arg(&pipeline).arg("--runs-dir").arg(&runs).arg("--quiet");
    for s in &set {
        c.arg("--set").arg(s);
    }
    let start = std::time::Instant::now();
    let o = c.output().unwrap();
    assert!(o.status.success(), "{}", common::text(&o));
    let mut log = format!(
        "tafs_grpo_sd3, 1 iteration: {:.1} s\n",
        start.elapsed().as_secs_f64()
    );
    let run = common::only_run_dir(&runs);
    let ckdir = run.join("checkpoints/iter-000001");
    let ck = ckdir.join("resources/policy/model.safetensors");
    assert!(ck.is_file(), "{} is missing", ck.display());

    // Export the checkpoint directory (its one model is meant).
    let work = common::tmpdir("sd3-export-run-work");
    let out = work.join("exported");
    let o = flowrun_export(&ckdir, &out, &[]);
    assert!(o.status.success(), "{}", common::text(&o));
    log.push_str(&String::from_utf8_lossy(&o.stdout));

    // The transformer's inputs, in sd3_reference.py's names.
    let original = model_dir.join("transformer");
    let config =
        Sd3Config::from_json(&fs::read_to_string(original.join("config.json")).unwrap()).unwrap();
    let (j, p) = (config.joint_attention_dim, config.pooled_projection_dim);
    let inputs = work.join("inputs.safetensors");
    let tensors = vec![
        named("x", &[2, config.in_channels, 8, 8], 0.37),
        NamedTensor {
            name: "sigma".into(),
            shape: vec![2],
            values: vec![0.9, 0.35],
        },
        named("prompt_embeds", &[2, 5, j], 0.13),
        named("pooled", &[2, p], 0.29),
        named("negative_prompt_embeds", &[2, 5, j], -0.21),
        named("negative_pooled", &[2, p], 0.05),
    ];
    write_inputs(&inputs, tensors.clone());
    // Every checkpoint of an sd3 policy holds the same folder already (`export: auto` = f32).
    let auto = ckdir.join("resources/policy/transformer");
    assert!(
        auto.join("config.json").is_file(),
        "{} is missing",
        auto.display()
    );
    for f in ["config.json", "diffusion_pytorch_model.safetensors"] {
        assert!(
            fs::read(auto.join(f)).unwrap() == fs::read(out.join(f)).unwrap(),
            "{f}: the checkpoint's transformer/ differs from `flowrun export` of it"
        );
    }
    let jobs = serde_json::json!([
        {"folder": auto, "inputs": inputs, "out": work.join("auto.out.safetensors")},
        {"folder": out, "inputs": inputs, "out": work.join("exported.out.safetensors")},
        {"folder": original, "inputs": inputs, "out": work.join("original.out.safetensors")},
    ]);
    let jobs_file = work.join("jobs.json");
    fs::write(&jobs_file, jobs.to_string()).unwrap();
    let script = common::root().join("tests/python/sd3_reload.py");
    let o = Command::new(&py)
        .arg(&script)
        .arg(&jobs_file)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", common::text(&o));
    let theirs = SafetensorsFile::read(&work.join("exported.out.safetensors")).unwrap();
    let before = SafetensorsFile::read(&work.join("original.out.safetensors")).unwrap();
    let auto_out = SafetensorsFile::read(&work.join("auto.out.safetensors")).unwrap();
    for label in ["velocity", "v_uncond"] {
        assert_eq!(
            auto_out.get(label).unwrap(),
            theirs.get(label).unwrap(),
            "diffusers on the checkpoint's transformer/: {label}"
        );
    }

    // Ours, from the run's checkpoint.
    let dev = common::test_device();
    let (_, ours) = nodes::model::load_model::<Sd3Transformer>(&ck, &dev).unwrap();
    let t = |name: &str| tensors.iter().find(|t| t.name == name).unwrap();
    let to3 = |n: &NamedTensor| -> Tensor<3> {
        tensor_from_vec(n.values.clone(), n.shape.clone().try_into().unwrap(), &dev)
    };
    let x: Tensor<4> = tensor_from_vec(
        t("x").values.clone(),
        t("x").shape.clone().try_into().unwrap(),
        &dev,
    );
    let sigma: Tensor<1> = tensor_from_vec(t("sigma").values.clone(), [2], &dev);
    let pooled = |n: &str| -> Tensor<2> { tensor_from_vec(t(n).values.clone(), [2, p], &dev) };
    for (label, prompt, pool) in [
        ("velocity", "prompt_embeds", "pooled"),
        ("v_uncond", "negative_prompt_embeds", "negative_pooled"),
    ] {
        let v = ours.forward(x.clone(), sigma.clone(), to3(t(prompt)), pooled(pool));
        let got = (v.dims().to_vec(), values(v));
        let (ts, tv) = theirs.get(label).unwrap();
        check_rel(
            &mut log,
            &format!("diffusers(export) vs ours(checkpoint): {label}"),
            (&ts, &tv),
            (&got.0, &got.1),
            TOL,
        );
        let (bs, bv) = before.get(label).unwrap();
        let moved = rel_err(label, (&ts, &tv), (&bs, &bv));
        log.push_str(&format!(
            "  diffusers(export) vs diffusers(starting weights): {label} = {moved:.2e}\n"
        ));
        assert!(
            moved > 1e-4,
            "{label}: the export holds the starting weights ({moved})"
        );
    }

    // config.json and keys as the pipeline's transformer/ folder has them.
    assert_eq!(
        maths_fields(&read_json(&out.join("config.json"))),
        maths_fields(&read_json(&original.join("config.json")))
    );
    assert_eq!(
        weights(&out).keys.keys().collect::<Vec<_>>(),
        weights(&original).keys.keys().collect::<Vec<_>>()
    );

    // flowrun velocity on the checkpoint directory and on the export: diffusers' velocity.
    let vin = work.join("velocity-in.safetensors");
    let renamed: Vec<NamedTensor> = tensors
        .iter()
        .map(|n| NamedTensor {
            name: match n.name.as_str() {
                "x" => "latents".into(),
                "sigma" => "t".into(),
                other => other.into(),
            },
            ..n.clone()
        })
        .collect();
    write_inputs(&vin, renamed);
    let (_, vc) = theirs.get("velocity").unwrap();
    let (shape, vu) = theirs.get("v_uncond").unwrap();
    let v_cfg: Vec<f32> = vc.iter().zip(&vu).map(|(c, u)| u + 4.5 * (c - u)).collect();
    for model in [&ckdir, &out] {
        for (extra, want) in [(vec![], &vc), (vec!["--cfg", "4.5"], &v_cfg)] {
            let vout = work.join("v.safetensors");
            let o = flowrun_velocity(model, &vin, &vout, &extra);
            assert!(o.status.success(), "{}", common::text(&o));
            let (gs, gv) = SafetensorsFile::read(&vout).unwrap().get("v").unwrap();
            check_rel(
                &mut log,
                &format!(
                    "flowrun velocity {} {extra:?} vs diffusers(export)",
                    model.file_name().unwrap().to_string_lossy()
                ),
                (&gs, &gv),
                (&shape, want),
                TOL,
            );
        }
    }
    eprint!("{log}");
}

// ---------------------------------------------------------------------------------------------
// Memory: an export holds about one tensor, never the file
// ---------------------------------------------------------------------------------------------

/// A `/proc/self/status` figure in bytes (`VmRSS`, `VmHWM`).
fn proc_status_bytes(key: &str) -> u64 {
    let status = fs::read_to_string("/proc/self/status").unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key} in /proc/self/status"));
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}

/// Peak memory of exporting a model of SD3.5-Medium's widths (`FLOWRUN_EXPORT_MEMORY_LAYERS`
/// blocks, default 2; 24 is the whole 2.2B-parameter model, 9 GB in f32): above the model
/// itself, the export's peak must stay far below one tensor (the largest, the 384² sin-cos
/// grid, is 906 MB): tensors are read in 16 MB blocks, whatever the model's size. Linux only; run it alone, as other tests' memory
/// would count: `cargo test --release --test sd3_export -- --ignored --nocapture memory`.
#[test]
#[ignore]
fn should_export_with_the_memory_of_about_one_tensor() {
    use burn::module::{Module, ModuleVisitor, Param};
    let layers: usize = std::env::var("FLOWRUN_EXPORT_MEMORY_LAYERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    // stabilityai/stable-diffusion-3.5-medium's transformer/config.json, with `layers` blocks.
    let config = Sd3Config {
        sample_size: 128,
        patch_size: 2,
        in_channels: 16,
        num_layers: layers,
        attention_head_dim: 64,
        num_attention_heads: 24,
        joint_attention_dim: 4096,
        caption_projection_dim: 1536,
        pooled_projection_dim: 2048,
        out_channels: Some(16),
        pos_embed_max_size: Some(384),
        dual_attention_layers: (0..layers.min(13)).collect(),
        qk_norm: Some("rms_norm".into()),
        ..Sd3Config::default()
    };
    let start = std::time::Instant::now();
    let model = config.init(&Device::flex(), 1);
    // Materialise every parameter (the grid, biases and norm scales are lazy) and size them.
    struct Sizes {
        count: usize,
        largest: usize,
    }
    impl ModuleVisitor for Sizes {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let n = param.val().shape().num_elements();
            self.count += n;
            self.largest = self.largest.max(n);
        }
    }
    let mut sizes = Sizes {
        count: 0,
        largest: 0,
    };
    model.visit(&mut sizes);
    eprintln!(
        "{layers} blocks: {:.3}B values ({:.2} GB in f32), largest tensor {:.1} MB; init {:.1} s",
        sizes.count as f64 / 1e9,
        sizes.count as f64 * 4.0 / 1e9,
        sizes.largest as f64 * 4.0 / 1e6,
        start.elapsed().as_secs_f64()
    );
    let dir = common::tmpdir("sd3-export-memory");
    for dtype in [ExportDtype::F32, ExportDtype::BF16] {
        let out = dir.join(dtype.name());
        // Reset the peak (VmHWM) to the current resident size.
        fs::write("/proc/self/clear_refs", "5").unwrap();
        let base = proc_status_bytes("VmRSS");
        let start = std::time::Instant::now();
        save_diffusers(&model, &out, dtype).unwrap();
        let secs = start.elapsed().as_secs_f64();
        let peak = proc_status_bytes("VmHWM");
        let over = peak.saturating_sub(base);
        let written: u64 = fs::read_dir(&out)
            .unwrap()
            .flatten()
            .map(|e| e.metadata().unwrap().len())
            .sum();
        eprintln!(
            "export {dtype}: {:.2} GB written in {secs:.1} s ({:.0} MB/s); resident {:.2} GB \
             before, peak {:.2} GB: +{:.1} MB = {:.2}× the largest tensor (f32)",
            written as f64 / 1e9,
            written as f64 / 1e6 / secs,
            base as f64 / 1e9,
            peak as f64 / 1e9,
            over as f64 / 1e6,
            over as f64 / (sizes.largest as f64 * 4.0)
        );
        let bound = 128 << 20;
        assert!(
            over <= bound,
            "the export took {over} bytes above the model; bound {bound}"
        );
        fs::remove_dir_all(&out).unwrap();
    }
}
