//! Safetensors checkpoints.
//!
//! * Tensor names are the burn module paths (e.g. `down.1.blocks.0.conv1.weight`), dtype F32,
//!   little-endian, burn layouts: Linear weights are `[d_in, d_out]` (transposed w.r.t.
//!   PyTorch), conv weights `[c_out, c_in, kh, kw]`.
//! * The model config JSON is stored in the safetensors metadata under `flowrun.config`.
//! * Files are written atomically (temp file in the same directory, fsync, rename, fsync dir)
//!   and streamed, a tensor at a time; they are read memory-mapped ([`super::weights`]).
//! * Loading validates the header, every tensor's presence, dtype and shape, and rejects
//!   unexpected tensors, in one error naming the file and every tensor at fault.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use anyhow::{Context, anyhow, bail};
use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::tensor::{Device, Tensor};
use safetensors::{Dtype, tensor::TensorView};

use super::weights::{
    Layout, LoadOptions, Problems, StoreDtype, load_module, module_entries, save_atomic,
    unknown_keys,
};
use super::{FlowModel, FlowModelConfig, VelocityModel};

/// Metadata key holding the [`FlowModelConfig`] JSON.
pub const CONFIG_KEY: &str = "flowrun.config";
/// Metadata key identifying the file kind.
pub const FORMAT_KEY: &str = "flowrun.format";
/// Metadata key naming the architecture ([`VelocityModel::ARCH`]); absent in ShapeWorld UNet
/// files (the only architecture before there were several).
pub const ARCH_KEY: &str = "flowrun.arch";
/// Value of [`FORMAT_KEY`] for model checkpoints.
pub const MODEL_FORMAT: &str = "flowrun.flow_model.v1";

/// A named host-side f32 tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

/// Host copy of a float tensor as f32 values.
pub(crate) fn tensor_values<const D: usize>(tensor: Tensor<D>) -> Vec<f32> {
    let data = tensor.into_data().convert::<f32>();
    data.try_to_vec::<f32>().expect("f32 tensor data")
}

struct Collector {
    prefix: String,
    path: Vec<String>,
    out: Vec<NamedTensor>,
}

impl ModuleVisitor for Collector {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let tensor = param.val();
        let shape = tensor.dims().to_vec();
        self.out.push(NamedTensor {
            name: format!("{}{}", self.prefix, self.path.join(".")),
            shape,
            values: tensor_values(tensor),
        });
    }
}

/// All float parameters of `module` as host tensors named `prefix + module path`.
pub fn collect_params<M: Module>(module: &M, prefix: &str) -> Vec<NamedTensor> {
    let mut c = Collector {
        prefix: prefix.to_string(),
        path: Vec::new(),
        out: Vec::new(),
    };
    module.visit(&mut c);
    c.out
}

/// Module paths of all float parameters with their ids, in traversal order.
pub(crate) fn param_paths<M: Module>(module: &M) -> Vec<(String, ParamId, Vec<usize>)> {
    struct Paths {
        path: Vec<String>,
        out: Vec<(String, ParamId, Vec<usize>)>,
    }
    impl ModuleVisitor for Paths {
        fn enter_module(&mut self, name: &str, _container_type: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.out
                .push((self.path.join("."), param.id, param.lazy_shape().to_vec()));
        }
    }
    let mut p = Paths {
        path: Vec::new(),
        out: Vec::new(),
    };
    module.visit(&mut p);
    p.out
}

/// Checkpoints are written with the engine's crash-safe writer (temp file, fsync, rename).
pub use runner::fsutil::write_atomic;

/// Serialises named f32 tensors + metadata to safetensors bytes.
pub fn serialize_safetensors(
    tensors: &[NamedTensor],
    metadata: HashMap<String, String>,
) -> anyhow::Result<Vec<u8>> {
    let mut seen = HashSet::new();
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|t| t.values.iter().flat_map(|v| v.to_le_bytes()).collect())
        .collect();
    let mut views = Vec::with_capacity(tensors.len());
    for (t, b) in tensors.iter().zip(&bytes) {
        if !seen.insert(t.name.as_str()) {
            bail!("duplicate tensor name {}", t.name);
        }
        let view = TensorView::new(Dtype::F32, t.shape.clone(), b)
            .map_err(|e| anyhow!("tensor {}: {e:?}", t.name))?;
        views.push((t.name.clone(), view));
    }
    safetensors::serialize(views, Some(metadata))
        .map_err(|e| anyhow!("serializing safetensors: {e:?}"))
}

pub use super::weights::SafetensorsFile;

/// Loads every float parameter of `module` from `file` (tensor names `prefix + path`, burn
/// layouts, any float dtype) but the `optional` paths that the file lacks, adding the names
/// taken to `used`; one error lists every missing, mis-shaped or unreadable tensor.
pub(crate) fn load_params<M: Module>(
    module: M,
    file: &SafetensorsFile,
    prefix: &str,
    used: &mut HashSet<String>,
    optional: &[&str],
) -> anyhow::Result<M> {
    let mut problems = Problems::default();
    let opts = LoadOptions::new(Layout::Burn)
        .prefix(prefix)
        .optional(optional);
    let module = load_module(module, file, opts, used, &mut problems);
    problems.into_result(|| {
        format!(
            "checkpoint {}: the tensors do not match the model",
            file.path.display()
        )
    })?;
    Ok(module)
}

/// Unknown tensors of `file` (not in `used`): one error listing them.
pub(crate) fn no_unknown_tensors(
    file: &SafetensorsFile,
    used: &HashSet<String>,
) -> anyhow::Result<()> {
    let mut problems = Problems::default();
    unknown_keys(file, used, &[], &mut problems);
    problems.into_result(|| {
        format!(
            "checkpoint {}: the tensors do not match the model",
            file.path.display()
        )
    })
}

/// Saves `model` (weights + config JSON in metadata) to `path` atomically.
pub fn save_safetensors<M: VelocityModel>(model: &M, path: &Path) -> anyhow::Result<()> {
    let mut metadata = HashMap::new();
    metadata.insert(
        CONFIG_KEY.to_string(),
        serde_json::to_string(VelocityModel::config(model))?,
    );
    if M::ARCH != FlowModel::ARCH {
        metadata.insert(ARCH_KEY.to_string(), M::ARCH.to_string());
    }
    metadata.insert(FORMAT_KEY.to_string(), MODEL_FORMAT.to_string());
    let entries = module_entries(model, "", Layout::Burn);
    save_atomic(path, entries, StoreDtype::F32, &metadata, |w| {
        w.write_module(model, "", Layout::Burn)
    })
    .with_context(|| format!("saving checkpoint {}", path.display()))
}

/// The architecture a flowrun model checkpoint holds: its [`ARCH_KEY`] metadata, or the
/// ShapeWorld UNet's [`VelocityModel::ARCH`] when absent. Reads only the safetensors header;
/// `None` when `path` cannot be read as a safetensors file (its loader then says why).
pub fn checkpoint_arch(path: &Path) -> Option<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).ok()?;
    let len = f.metadata().ok().filter(|m| m.is_file())?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n).ok()?;
    let n = u64::from_le_bytes(n);
    // safetensors' own limit on a header (100 MB), and the file must hold it.
    if n > 100_000_000 || n > len.saturating_sub(8) {
        return None;
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).ok()?;
    let value: serde_json::Value = serde_json::from_slice(&header).ok()?;
    let arch = value
        .get("__metadata__")
        .and_then(|m| m.get(ARCH_KEY))
        .and_then(|a| a.as_str())
        .unwrap_or(FlowModel::ARCH);
    Some(arch.to_string())
}

/// Parses the model config stored in a checkpoint's metadata.
pub(crate) fn config_from_file<M: VelocityModel>(
    file: &SafetensorsFile,
) -> anyhow::Result<M::Config> {
    let json = file.meta(CONFIG_KEY)?;
    let config: M::Config = serde_json::from_str(json).with_context(|| {
        format!(
            "checkpoint {}: invalid {CONFIG_KEY} metadata",
            file.path.display()
        )
    })?;
    M::check_config(&config)
        .with_context(|| format!("checkpoint {}: invalid model config", file.path.display()))?;
    Ok(config)
}

/// Loads a ShapeWorld UNet checkpoint written by [`save_safetensors`] onto `device`.
pub fn load_safetensors(
    path: &Path,
    device: &Device,
) -> anyhow::Result<(FlowModelConfig, FlowModel)> {
    load_model::<FlowModel>(path, device)
}

/// Loads a model checkpoint of architecture `M` written by [`save_safetensors`] onto `device`.
pub fn load_model<M: VelocityModel>(
    path: &Path,
    device: &Device,
) -> anyhow::Result<(M::Config, M)> {
    let file = SafetensorsFile::read(path)?;
    let arch = file.meta(ARCH_KEY).unwrap_or(FlowModel::ARCH);
    if arch != M::ARCH {
        bail!(
            "checkpoint {}: holds a `{arch}` model, not a `{}` one",
            path.display(),
            M::ARCH
        );
    }
    let config = config_from_file::<M>(&file)?;
    let mut used = HashSet::new();
    let model = load_params(M::init_zeros(&config, device), &file, "", &mut used, &[])?;
    no_unknown_tensors(&file, &used)?;
    Ok((config, model))
}
