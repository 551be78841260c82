//! Loading (and writing) diffusers VAE folders.
//!
//! A VAE folder holds `config.json` and `diffusion_pytorch_model.safetensors`, or shards
//! listed by `diffusion_pytorch_model.safetensors.index.json`; a pipeline folder
//! (`model_index.json`) has it as `vae/`. Tensors are f32, f16, bf16 (or f64) and become f32.
//! State-dict keys are burn's parameter paths; Linear weights are transposed (torch
//! `[out, in]`, burn `[in, out]`). Encoder keys (`encoder.*`, `quant_conv.*`) are skipped;
//! every other unknown key, every missing key and every mis-shaped key is reported in one
//! error.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::module::{ModuleMapper, Param};
use burn::tensor::{Device, Tensor, TensorData, bf16, f16};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use super::{VaeConfig, VaeDecoder};
use crate::model::checkpoint::{
    NamedTensor, SafetensorsFile, collect_params, serialize_safetensors, write_atomic,
};

/// The weights file of a diffusers model folder.
pub const WEIGHTS_FILE: &str = "diffusion_pytorch_model.safetensors";
/// The index of a sharded weights file.
pub const INDEX_FILE: &str = "diffusion_pytorch_model.safetensors.index.json";
/// State-dict prefixes of the encoder side, present in a full `AutoencoderKL` and skipped.
pub const ENCODER_PREFIXES: &[&str] = &["encoder.", "quant_conv."];

/// The VAE folder of `dir`: `dir/vae` for a pipeline folder (`model_index.json`), else `dir`.
pub fn vae_dir(dir: &Path) -> Result<PathBuf> {
    let shown = dir.display();
    if !dir.is_dir() {
        if dir.exists() {
            bail!("{shown} is not a folder: give the diffusers pipeline folder or its vae/ folder");
        }
        bail!("VAE folder {shown} does not exist");
    }
    if dir.join("model_index.json").is_file() {
        let vae = dir.join("vae");
        if !vae.join("config.json").is_file() {
            bail!(
                "{shown} is a diffusers pipeline folder (model_index.json) without a VAE: \
                 {} is missing",
                vae.join("config.json").display()
            );
        }
        return Ok(vae);
    }
    if dir.join("config.json").is_file() {
        return Ok(dir.to_path_buf());
    }
    bail!(
        "{shown} holds no diffusers VAE: expected config.json and {WEIGHTS_FILE} (a vae/ folder), \
         or model_index.json and vae/ (a pipeline folder)"
    );
}

/// Loads the VAE decoder of a diffusers pipeline folder or VAE folder onto `device`
/// (see the module docs). Errors name the folder or file.
pub fn load_vae(dir: &Path, device: &Device) -> Result<(VaeConfig, VaeDecoder)> {
    let dir = vae_dir(dir)?;
    let config = VaeConfig::from_file(&dir.join("config.json"))?;
    let weights = Weights::open(&dir)?;
    let decoder = weights.load(config.init(device))?;
    Ok((config, decoder))
}

/// The safetensors files of one model, and which file holds each tensor.
struct Weights {
    dir: PathBuf,
    files: Vec<SafetensorsFile>,
    /// Tensor name → index in `files`.
    index: BTreeMap<String, usize>,
    /// Inconsistencies of a sharded index (reported with the tensor errors).
    problems: Vec<String>,
}

impl Weights {
    fn open(dir: &Path) -> Result<Self> {
        let single = dir.join(WEIGHTS_FILE);
        let index_path = dir.join(INDEX_FILE);
        let mut problems = Vec::new();
        let (files, weight_map) =
            if single.is_file() {
                (vec![SafetensorsFile::read(&single)?], None)
            } else if index_path.is_file() {
                let text = std::fs::read_to_string(&index_path)
                    .with_context(|| format!("cannot read {}", index_path.display()))?;
                let map = parse_index(&text)
                    .with_context(|| format!("sharded weights index {}", index_path.display()))?;
                let shards: BTreeSet<&String> = map.values().collect();
                let mut files = Vec::new();
                for s in shards {
                    files.push(SafetensorsFile::read(&dir.join(s)).with_context(|| {
                        format!("shard `{s}` listed in {}", index_path.display())
                    })?);
                }
                (files, Some(map))
            } else {
                let bin = dir.join("diffusion_pytorch_model.bin");
                if bin.is_file() {
                    bail!(
                        "{} holds PyTorch pickle weights ({}); only safetensors is read: re-save \
                     with `save_pretrained(..., safe_serialization=True)`",
                        dir.display(),
                        bin.display()
                    );
                }
                bail!(
                    "no VAE weights in {}: expected {WEIGHTS_FILE} or {INDEX_FILE}",
                    dir.display()
                );
            };
        let mut index = BTreeMap::new();
        for (i, f) in files.iter().enumerate() {
            for name in f.tensors().names() {
                if let Some(j) = index.insert(name.to_string(), i) {
                    problems.push(format!(
                        "`{name}` is in both {} and {}",
                        files[j].path.display(),
                        f.path.display()
                    ));
                }
            }
        }
        if let Some(map) = weight_map {
            for (name, shard) in &map {
                let found = index.get(name).map(|&i| &files[i].path);
                if found != Some(&dir.join(shard)) {
                    problems.push(format!(
                        "the index puts `{name}` in `{shard}`, which does not hold it"
                    ));
                }
            }
        }
        Ok(Weights {
            dir: dir.to_path_buf(),
            files,
            index,
            problems,
        })
    }

    /// Every parameter of `decoder` from the files, checked as the module docs say.
    fn load(&self, decoder: VaeDecoder) -> Result<VaeDecoder> {
        let st: Vec<SafeTensors<'_>> = self.files.iter().map(SafetensorsFile::tensors).collect();
        let mut loader = Loader {
            weights: self,
            st: &st,
            path: Vec::new(),
            used: BTreeSet::new(),
            missing: Vec::new(),
            misshaped: Vec::new(),
            unreadable: Vec::new(),
        };
        let decoder = burn::module::Module::map(decoder, &mut loader);
        let unexpected: Vec<String> = self
            .index
            .keys()
            .filter(|k| !loader.used.contains(*k))
            .filter(|k| !ENCODER_PREFIXES.iter().any(|p| k.starts_with(p)))
            .map(|k| format!("`{k}`"))
            .collect();
        let mut sections = Vec::new();
        for (what, list) in [
            ("missing", &loader.missing),
            ("unexpected (not in a decoder of this config)", &unexpected),
            ("wrong shape", &loader.misshaped),
            ("unreadable", &loader.unreadable),
            ("inconsistent shards", &self.problems),
        ] {
            if !list.is_empty() {
                sections.push(format!("{what} ({}): {}", list.len(), shorten(list, 12)));
            }
        }
        if !sections.is_empty() {
            bail!(
                "VAE weights in {} do not match its config.json:\n  {}",
                self.dir.display(),
                sections.join("\n  ")
            );
        }
        Ok(decoder)
    }
}

/// The first `n` entries, then how many more.
fn shorten(list: &[String], n: usize) -> String {
    let mut s = list.iter().take(n).cloned().collect::<Vec<_>>().join(", ");
    if list.len() > n {
        s.push_str(&format!(", … and {} more", list.len() - n));
    }
    s
}

/// `weight_map` of a sharded index: tensor name → shard file name (a plain file name in the
/// same folder).
fn parse_index(text: &str) -> Result<BTreeMap<String, String>> {
    let v: serde_json::Value = serde_json::from_str(text).context("not valid JSON")?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .context("no `weight_map` object")?;
    let mut out = BTreeMap::new();
    for (name, shard) in map {
        let Some(s) = shard.as_str() else {
            bail!("`weight_map` entry `{name}` is not a file name: {shard}");
        };
        let plain = Path::new(s).file_name().is_some_and(|f| f == s) && s != "..";
        if !plain || !s.ends_with(".safetensors") {
            bail!(
                "`weight_map` entry `{name}` names `{s}`: not a .safetensors file in this folder"
            );
        }
        out.insert(name.clone(), s.to_string());
    }
    Ok(out)
}

struct Loader<'a> {
    weights: &'a Weights,
    st: &'a [SafeTensors<'a>],
    path: Vec<String>,
    used: BTreeSet<String>,
    missing: Vec<String>,
    misshaped: Vec<String>,
    unreadable: Vec<String>,
}

impl ModuleMapper for Loader<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let (id, tensor, mapper) = param.consume();
        let name = self.path.join(".");
        let burn_shape: [usize; D] = tensor.dims();
        // The only 2-d parameters are Linear weights: torch stores them transposed.
        let mut torch_shape = burn_shape;
        if D == 2 {
            torch_shape.reverse();
        }
        let view = self
            .weights
            .index
            .get(&name)
            .and_then(|&i| self.st[i].tensor(&name).ok());
        self.used.insert(name.clone());
        let loaded = match view {
            None => {
                self.missing.push(format!("`{name}` {torch_shape:?}"));
                None
            }
            Some(v) if v.shape() != torch_shape.as_slice() => {
                self.misshaped.push(format!(
                    "`{name}`: file {:?}, config expects {torch_shape:?}",
                    v.shape()
                ));
                None
            }
            Some(v) => match to_f32(&v) {
                Ok(values) => Some(values),
                Err(e) => {
                    self.unreadable.push(format!("`{name}`: {e}"));
                    None
                }
            },
        };
        let new = match loaded {
            Some(values) if D == 2 => {
                let [o, i] = [torch_shape[0], torch_shape[1]];
                let mut t = vec![0.0; values.len()];
                for r in 0..o {
                    for c in 0..i {
                        t[c * o + r] = values[r * i + c];
                    }
                }
                Tensor::<D>::from_data(TensorData::new(t, burn_shape), &tensor.device())
            }
            Some(values) => {
                Tensor::<D>::from_data(TensorData::new(values, burn_shape), &tensor.device())
            }
            None => tensor,
        };
        Param::from_mapped_value(id, new, mapper)
    }
}

/// A tensor's values as f32 (f32, f16, bf16 and f64 are read).
fn to_f32(view: &TensorView<'_>) -> Result<Vec<f32>> {
    let d = view.data();
    Ok(match view.dtype() {
        Dtype::F32 => d
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => d
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => d
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F64 => d
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
            .collect(),
        other => bail!("dtype {other:?} (f32, f16, bf16 and f64 are read)"),
    })
}

/// Writes `decoder` as a diffusers VAE folder `dir` (`config.json` and an f32
/// `diffusion_pytorch_model.safetensors` in torch layouts) that [`load_vae`] reads back. No
/// encoder weights: diffusers' `AutoencoderKL.from_pretrained` would reject the folder.
pub fn save_vae(dir: &Path, decoder: &VaeDecoder) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tensors: Vec<NamedTensor> = collect_params(decoder, "")
        .into_iter()
        .map(|mut t| {
            if let [i, o] = t.shape[..] {
                let mut v = vec![0.0; t.values.len()];
                for r in 0..i {
                    for c in 0..o {
                        v[c * i + r] = t.values[r * o + c];
                    }
                }
                t.values = v;
                t.shape = vec![o, i];
            }
            t
        })
        .collect();
    let bytes = serialize_safetensors(&tensors, HashMap::from([("format".into(), "pt".into())]))?;
    write_atomic(&dir.join(WEIGHTS_FILE), &bytes)
        .with_context(|| format!("writing {}", dir.join(WEIGHTS_FILE).display()))?;
    let config = serde_json::to_string_pretty(&decoder.config().to_diffusers_json())?;
    write_atomic(&dir.join("config.json"), config.as_bytes())
        .with_context(|| format!("writing {}", dir.join("config.json").display()))
}
