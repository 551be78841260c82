//! LoRA adapters as files: diffusers' `pytorch_lora_weights.safetensors` and peft's
//! `adapter_model.safetensors`.
//!
//! * Keys are peft's, `<prefix><layer>.lora_A.weight` [r, d_in] and `<prefix><layer>.lora_B.weight`
//!   [d_out, r] (PyTorch layout), with `<prefix>` = `transformer.` in diffusers' pipeline files,
//!   `base_model.model.` in peft's `save_pretrained` files, or nothing.
//! * Rank and α: diffusers writes peft's `LoraConfig` as JSON under the `lora_adapter_metadata`
//!   key of the safetensors metadata, its fields prefixed with the component (`transformer.r`,
//!   `transformer.lora_alpha`, …); peft writes `adapter_config.json` beside the weights. Without
//!   either, diffusers takes α = r (scale 1), and so does [`load_adapters`].
//! * [`save_adapters`] writes what `StableDiffusion3Pipeline.load_lora_weights(dir)` and
//!   `SD3Transformer2DModel.load_lora_adapter(file, prefix="transformer")` read: f32 tensors,
//!   `format: pt`, the metadata with r, α, the adapted layers' full paths as `target_modules`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{Result, anyhow, bail};
use burn::module::{Module, Param};
use burn::tensor::{Tensor, TensorData};
use serde_json::{Value, json};

use super::{Factor, Linears, LoraConfig, LoraInit, adapted_layers};
use crate::model::weights::{
    Entry, Layout, Problems, SafetensorsFile, StoreDtype, read_small_text, save_atomic, to_f32,
    transpose,
};

const NOT_IN_MODEL: &str = "adapted layer(s) that are not linear layers of the model";
const MISFIT: &str = "adapter(s) of another shape than their layer";
const HALF: &str = "layer(s) with only one of lora_A and lora_B";
const NOT_FACTORS: &str =
    "key(s) that are not LoRA factors (`<layer>.lora_A.weight` / `.lora_B.weight`)";

/// diffusers' adapter file name (`load_lora_weights(dir)` looks for it).
pub const LORA_WEIGHTS_NAME: &str = "pytorch_lora_weights.safetensors";
/// peft's `save_pretrained` file names.
pub const PEFT_WEIGHTS_NAME: &str = "adapter_model.safetensors";
pub const PEFT_CONFIG_NAME: &str = "adapter_config.json";
/// diffusers' metadata key holding the adapter's `LoraConfig`.
pub const METADATA_KEY: &str = "lora_adapter_metadata";
/// The prefix of the transformer's keys in diffusers' pipeline-level files.
pub const TRANSFORMER_PREFIX: &str = "transformer.";

/// What an adapter file held.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterInfo {
    /// The file read.
    pub path: PathBuf,
    /// Adapted layers: (path, rank, scale).
    pub layers: Vec<(String, usize, f64)>,
    /// The configuration the file describes (rank: the largest; targets: the layers' paths).
    pub config: LoraConfig,
}

/// Writes `model`'s adapters to `path` as diffusers' LoRA file (see the module docs), keys
/// prefixed with `prefix` (`transformer.` for diffusers' pipelines). Atomic; f32. `init` is
/// recorded in the metadata as peft's `init_lora_weights`.
pub fn save_adapters<M: Module + Linears + Clone>(
    model: &M,
    path: &Path,
    prefix: &str,
    init: LoraInit,
) -> Result<()> {
    let mut m = model.clone();
    let layers = adapted_layers(&mut m);
    if layers.is_empty() {
        bail!("the model holds no LoRA adapter to save");
    }
    // One rank and α for the file, per-layer patterns where a layer differs (as peft writes).
    let (r0, s0) = (layers[0].1, layers[0].2);
    let alpha_of = |r: usize, s: f64| s * r as f64;
    let mut rank_pattern = BTreeMap::new();
    let mut alpha_pattern = BTreeMap::new();
    for (p, r, s) in &layers {
        if *r != r0 {
            rank_pattern.insert(format!("^{p}$"), json!(r));
        }
        if (alpha_of(*r, *s) - alpha_of(r0, s0)).abs() > 1e-9 * alpha_of(r0, s0).abs() {
            alpha_pattern.insert(format!("^{p}$"), json!(alpha_of(*r, *s)));
        }
    }
    let config = json!({
        "r": r0,
        "lora_alpha": alpha_of(r0, s0),
        "target_modules": layers.iter().map(|l| l.0.clone()).collect::<Vec<_>>(),
        "init_lora_weights": init.peft(),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_dora": false,
        "use_rslora": false,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
    });
    // diffusers prefixes every field with the component's name.
    let component = prefix.trim_end_matches('.');
    let packed: BTreeMap<String, Value> = config
        .as_object()
        .expect("an object")
        .iter()
        .map(|(k, v)| {
            let key = if component.is_empty() {
                k.clone()
            } else {
                format!("{component}.{k}")
            };
            (key, v.clone())
        })
        .collect();
    let mut metadata = HashMap::new();
    metadata.insert("format".to_string(), "pt".to_string());
    metadata.insert(METADATA_KEY.to_string(), serde_json::to_string(&packed)?);

    let mut tensors: Vec<(String, Tensor<2>)> = Vec::new();
    m.each_linear("", &mut |p, lin| {
        if let (Some(a), Some(b)) = (&lin.lora_A, &lin.lora_B) {
            tensors.push((format!("{prefix}{p}.lora_A.weight"), a.weight.val()));
            tensors.push((format!("{prefix}{p}.lora_B.weight"), b.weight.val()));
        }
    });
    let entries = tensors
        .iter()
        .map(|(n, t)| {
            let [i, o] = t.dims();
            Entry::new(n.clone(), vec![o, i])
        })
        .collect();
    save_atomic(path, entries, StoreDtype::F32, &metadata, |w| {
        for (n, t) in &tensors {
            w.write(n, t.clone().detach(), Layout::Torch)?;
        }
        Ok(())
    })
}

/// The adapter file of `path`: the file itself, or in a folder diffusers' or peft's file.
fn weights_file(path: &Path) -> Result<PathBuf> {
    if !path.is_dir() {
        if !path.exists() {
            bail!("LoRA adapter {} does not exist", path.display());
        }
        return Ok(path.to_path_buf());
    }
    for name in [LORA_WEIGHTS_NAME, PEFT_WEIGHTS_NAME] {
        let f = path.join(name);
        if f.is_file() {
            return Ok(f);
        }
    }
    bail!(
        "{}: no LoRA adapter in this folder (expected {LORA_WEIGHTS_NAME}, written by diffusers \
         and flowrun, or {PEFT_WEIGHTS_NAME}, written by peft)",
        path.display()
    )
}

/// The adapter's `LoraConfig` fields: diffusers' metadata (its `transformer.` fields, or
/// unprefixed ones), else peft's `adapter_config.json` beside the file; `None` when neither.
fn adapter_config(
    file: &SafetensorsFile,
    path: &Path,
) -> Result<Option<serde_json::Map<String, Value>>> {
    if let Some(raw) = file.metadata.get(METADATA_KEY) {
        let v: Value = serde_json::from_str(raw).map_err(|e| {
            anyhow!(
                "{}: metadata `{METADATA_KEY}` is not JSON: {e}",
                path.display()
            )
        })?;
        let Some(obj) = v.as_object() else {
            bail!(
                "{}: metadata `{METADATA_KEY}` is not a JSON object",
                path.display()
            );
        };
        let mut out = serde_json::Map::new();
        for (k, v) in obj {
            let key = k.strip_prefix(TRANSFORMER_PREFIX).unwrap_or(k);
            if !key.contains('.') {
                out.insert(key.to_string(), v.clone());
            }
        }
        return Ok(Some(out));
    }
    let cfg = path.with_file_name(PEFT_CONFIG_NAME);
    if path.file_name().is_some_and(|n| n == PEFT_WEIGHTS_NAME) && cfg.is_file() {
        let text = read_small_text(&cfg)?;
        let v: Value =
            serde_json::from_str(&text).map_err(|e| anyhow!("{}: not JSON: {e}", cfg.display()))?;
        return Ok(v.as_object().cloned());
    }
    Ok(None)
}

/// The key prefix the file's keys share (`transformer.`, `base_model.model.` or none).
fn key_prefix(names: &[&str], path: &Path) -> Result<&'static str> {
    for prefix in [TRANSFORMER_PREFIX, "base_model.model."] {
        if names.iter().all(|n| n.starts_with(prefix)) {
            return Ok(prefix);
        }
    }
    if let Some(other) = names.iter().find(|n| n.starts_with("text_encoder")) {
        bail!(
            "{}: holds text-encoder adapters ({other}, …): flowrun adapts the transformer only \
             (the text encoders run before training, as embeddings)",
            path.display()
        );
    }
    Ok("")
}

/// `model` with the adapters of `path` (a file, or a folder with diffusers' or peft's file):
/// every base parameter frozen, the file's layers adapted (their ranks and α from the file),
/// every other layer without adapter. One error lists every key of the file that is not an
/// adapter of one of the model's linear layers, every mis-shaped factor and every layer with
/// only one factor.
pub fn load_adapters<M: Module + Linears>(model: M, path: &Path) -> Result<(M, AdapterInfo)> {
    let fpath = weights_file(path)?;
    let file = SafetensorsFile::read(&fpath)?;
    let shown = fpath.display().to_string();
    let cfg = adapter_config(&file, &fpath)?.unwrap_or_default();
    let flag = |k: &str| cfg.get(k).and_then(Value::as_bool).unwrap_or(false);
    if flag("use_dora") {
        bail!("{shown}: a DoRA adapter (use_dora: true); flowrun reads plain LoRA adapters");
    }
    let rslora = flag("use_rslora");
    let names: Vec<&str> = file.names().collect();
    if names.is_empty() {
        bail!("{shown}: holds no tensor");
    }
    let prefix = key_prefix(&names, &fpath)?;
    // layer → (A, B) keys
    let mut layers: BTreeMap<String, [Option<&str>; 2]> = BTreeMap::new();
    let mut unknown: Vec<String> = Vec::new();
    for n in &names {
        let rest = &n[prefix.len()..];
        if let Some(l) = rest.strip_suffix(".lora_A.weight") {
            layers.entry(l.to_string()).or_default()[0] = Some(n);
        } else if let Some(l) = rest.strip_suffix(".lora_B.weight") {
            layers.entry(l.to_string()).or_default()[1] = Some(n);
        } else if rest.contains("lora_magnitude_vector") {
            bail!("{shown}: a DoRA adapter ({n}); flowrun reads plain LoRA adapters");
        } else {
            unknown.push(n.to_string());
        }
    }
    let pattern = |field: &str, layer: &str| -> Option<f64> {
        let pats = cfg.get(field)?.as_object()?;
        pats.iter().find_map(|(k, v)| {
            let k = k.trim_start_matches('^').trim_end_matches('$');
            (layer == k || layer.ends_with(&format!(".{k}"))).then(|| v.as_f64())?
        })
    };
    let global_alpha = cfg.get("lora_alpha").and_then(Value::as_f64);

    let mut model = model.no_grad();
    let mut problems = Problems::default();
    let mut seen = Vec::new();
    let mut adapted = Vec::new();
    model.each_linear("", &mut |p, lin| {
        lin.lora_A = None;
        lin.lora_B = None;
        let Some(keys) = layers.get(p) else {
            return;
        };
        seen.push(p.to_string());
        let [Some(ka), Some(kb)] = *keys else {
            problems.push(HALF, p.to_string());
            return;
        };
        let (Some(va), Some(vb)) = (file.view(ka), file.view(kb)) else {
            return;
        };
        let [d_in, d_out] = lin.dims();
        let (sa, sb) = (va.shape().to_vec(), vb.shape().to_vec());
        let r = sa.first().copied().unwrap_or(0);
        if sa.len() != 2 || sa[1] != d_in || sb.len() != 2 || sb != [d_out, r] || r == 0 {
            problems.push(
                MISFIT,
                format!(
                    "{p} (lora_A {sa:?}, lora_B {sb:?}; the layer takes [r, {d_in}] and \
                     [{d_out}, r])"
                ),
            );
            return;
        }
        let (a, b) = match (to_f32(&va), to_f32(&vb)) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) | (_, Err(e)) => {
                problems.push("unreadable factor(s)", format!("{p}: {e}"));
                return;
            }
        };
        let alpha = pattern("alpha_pattern", p)
            .or(global_alpha)
            .unwrap_or(r as f64);
        let scale = if rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        };
        let device = lin.weight.lazy_device();
        let factor = |v: Vec<f32>, shape: [usize; 2]| Factor {
            weight: Param::from_tensor(Tensor::from_data(TensorData::new(v, shape), &device)),
        };
        // PyTorch [r, d_in] → burn [d_in, r]; [d_out, r] → [r, d_out].
        lin.lora_A = Some(factor(transpose(&a, r, d_in), [d_in, r]));
        lin.lora_B = Some(factor(transpose(&b, d_out, r), [r, d_out]));
        lin.lora_scale = scale;
        adapted.push((p.to_string(), r, scale));
    });
    for l in layers.keys() {
        if !seen.contains(l) {
            problems.push(NOT_IN_MODEL, l.clone());
        }
    }
    unknown.sort();
    for k in unknown {
        problems.push(NOT_FACTORS, k);
    }
    problems.into_result(|| format!("{shown}: the LoRA adapter does not fit the model"))?;
    if adapted.is_empty() {
        bail!("{shown}: holds no LoRA factor");
    }
    let rank = adapted.iter().map(|l| l.1).max().unwrap_or(0);
    let alpha = global_alpha.unwrap_or(rank as f64);
    let mut config = LoraConfig::new(rank, alpha);
    config.targets = adapted.iter().map(|l| l.0.clone()).collect();
    config.rslora = rslora;
    if cfg.get("init_lora_weights") == Some(&json!(true)) {
        config.init = LoraInit::Kaiming;
    }
    Ok((
        model,
        AdapterInfo {
            path: fpath,
            layers: adapted,
            config,
        },
    ))
}
