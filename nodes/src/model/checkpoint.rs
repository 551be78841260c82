//! Safetensors checkpoints.
//!
//! * Tensor names are the burn module paths (e.g. `down.1.blocks.0.conv1.weight`), dtype F32,
//!   little-endian, burn layouts: Linear weights are `[d_in, d_out]` (transposed w.r.t.
//!   PyTorch), conv weights `[c_out, c_in, kh, kw]`.
//! * The model config JSON is stored in the safetensors metadata under `flowrun.config`.
//! * Files are written atomically: temp file in the same directory, fsync, rename, fsync dir.
//! * Loading validates the header, every tensor's presence, dtype and shape, and rejects
//!   unexpected tensors, with errors naming the file and the tensor.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow, bail};
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::{Device, Tensor, TensorData};
use safetensors::{Dtype, SafeTensorError, SafeTensors, tensor::TensorView};

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

/// A safetensors file read fully into memory (validated header).
pub struct SafetensorsFile {
    pub path: PathBuf,
    bytes: Vec<u8>,
    pub metadata: HashMap<String, String>,
}

impl SafetensorsFile {
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let shown = path.display();
        // Only a regular file's length can be trusted before reading it whole (`/dev/zero`
        // would be read until memory runs out).
        let meta = std::fs::metadata(path).with_context(|| format!("cannot read {shown}"))?;
        if !meta.is_file() {
            bail!("{shown} is not a safetensors file: it is not a regular file");
        }
        let bytes = std::fs::read(path).with_context(|| format!("cannot read {shown}"))?;
        let not_safetensors =
            |e: SafeTensorError| anyhow!("{shown} is not a safetensors file: {}", why(&e, &bytes));
        let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(not_safetensors)?;
        let metadata = meta.metadata().clone().unwrap_or_default();
        // Full validation (offsets, sizes) happens here.
        SafeTensors::deserialize(&bytes).map_err(not_safetensors)?;
        Ok(Self {
            path: path.to_path_buf(),
            bytes,
            metadata,
        })
    }

    pub fn tensors(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).expect("validated in read()")
    }

    pub fn meta(&self, key: &str) -> anyhow::Result<&str> {
        self.metadata.get(key).map(String::as_str).ok_or_else(|| {
            anyhow!(
                "checkpoint {}: missing metadata key {key:?}",
                self.path.display()
            )
        })
    }

    /// Host copy of tensor `name` as f32, with its shape.
    pub fn get(&self, name: &str) -> anyhow::Result<(Vec<usize>, Vec<f32>)> {
        let st = self.tensors();
        let view = st.tensor(name).map_err(|_| {
            anyhow!(
                "checkpoint {}: missing tensor {name:?}",
                self.path.display()
            )
        })?;
        let values = view_to_f32(&view)
            .with_context(|| format!("checkpoint {}: tensor {name:?}", self.path.display()))?;
        Ok((view.shape().to_vec(), values))
    }
}

/// Why `bytes` is not a valid safetensors file, in our words (a safetensors file is an 8-byte
/// little-endian header length, a JSON header of that length, then the tensor data the header
/// describes). Says nothing of the file's content beyond its sizes.
fn why(e: &SafeTensorError, bytes: &[u8]) -> String {
    use SafeTensorError as E;
    let header_len = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()));
    let size = bytes.len();
    match e {
        E::HeaderTooSmall => format!(
            "its header is truncated ({size} bytes, fewer than the 8 that give the header's length)"
        ),
        E::HeaderTooLarge => format!(
            "its header is too large (the first 8 bytes give a length of {} bytes, over the \
             100 MB a safetensors header may have)",
            header_len.unwrap_or_default()
        ),
        E::InvalidHeaderLength => format!(
            "its header is truncated (the first 8 bytes give a length of {} bytes; the file has \
             {size} bytes)",
            header_len.unwrap_or_default()
        ),
        E::InvalidHeader(_) => "its header is not UTF-8 text".to_string(),
        E::InvalidHeaderDeserialization(_) | E::JsonError(_) => {
            "its header is not a safetensors JSON header".to_string()
        }
        E::MetadataIncompleteBuffer => format!(
            "its tensor data does not match its header (the header describes a different amount \
             of data than the file's {size} bytes hold: truncated, or extra bytes at the end)"
        ),
        E::InvalidOffset(name) => {
            format!("its header gives invalid data offsets for tensor `{name}`")
        }
        E::TensorInvalidInfo | E::ValidationOverflow | E::InvalidTensorView(..) => {
            "its header describes a tensor whose shape, type and data size disagree".to_string()
        }
        _ => "it cannot be read as one".to_string(),
    }
}

fn view_to_f32(view: &TensorView<'_>) -> anyhow::Result<Vec<f32>> {
    let data = view.data();
    match view.dtype() {
        Dtype::F32 => Ok(data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()),
        Dtype::F64 => Ok(data
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32)
            .collect()),
        other => bail!("unsupported dtype {other:?} (expected F32)"),
    }
}

/// Loads every float parameter of `module` from `file` (tensor names `prefix + path`),
/// validating presence and shape. Returns the module and the set of names consumed.
pub(crate) fn load_params<M: Module>(
    module: M,
    file: &SafetensorsFile,
    prefix: &str,
) -> anyhow::Result<(M, HashSet<String>)> {
    struct Loader<'a> {
        file: &'a SafetensorsFile,
        st: SafeTensors<'a>,
        prefix: &'a str,
        path: Vec<String>,
        errors: Vec<String>,
        used: HashSet<String>,
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
            let name = format!("{}{}", self.prefix, self.path.join("."));
            let expected: [usize; D] = tensor.dims();
            let fail = |errors: &mut Vec<String>, msg: String| {
                errors.push(format!(
                    "checkpoint {}: tensor {name:?}: {msg}",
                    self.file.path.display()
                ));
            };
            let loaded = match self.st.tensor(&name) {
                Err(_) => {
                    fail(&mut self.errors, "missing".to_string());
                    None
                }
                Ok(view) if view.shape() != expected.as_slice() => {
                    fail(
                        &mut self.errors,
                        format!(
                            "shape mismatch: file has {:?}, model expects {:?}",
                            view.shape(),
                            expected
                        ),
                    );
                    None
                }
                Ok(view) => match view_to_f32(&view) {
                    Ok(values) => Some(values),
                    Err(e) => {
                        fail(&mut self.errors, format!("{e:#}"));
                        None
                    }
                },
            };
            self.used.insert(name);
            let new = match loaded {
                Some(values) => {
                    let require_grad = tensor.is_require_grad();
                    let mut t =
                        Tensor::<D>::from_data(TensorData::new(values, expected), &tensor.device());
                    if require_grad {
                        t = t.require_grad();
                    }
                    t
                }
                None => tensor,
            };
            Param::from_mapped_value(id, new, mapper)
        }
    }
    let mut loader = Loader {
        file,
        st: file.tensors(),
        prefix,
        path: Vec::new(),
        errors: Vec::new(),
        used: HashSet::new(),
    };
    let module = module.map(&mut loader);
    if !loader.errors.is_empty() {
        let n = loader.errors.len();
        let shown: Vec<_> = loader.errors.iter().take(8).cloned().collect();
        bail!(
            "{n} tensor error(s) loading {}:\n  {}",
            file.path.display(),
            shown.join("\n  ")
        );
    }
    Ok((module, loader.used))
}

/// Saves `model` (weights + config JSON in metadata) to `path` atomically.
pub fn save_safetensors<M: VelocityModel>(model: &M, path: &Path) -> anyhow::Result<()> {
    let tensors = collect_params(model, "");
    let mut metadata = HashMap::new();
    metadata.insert(
        CONFIG_KEY.to_string(),
        serde_json::to_string(VelocityModel::config(model))?,
    );
    if M::ARCH != FlowModel::ARCH {
        metadata.insert(ARCH_KEY.to_string(), M::ARCH.to_string());
    }
    metadata.insert(FORMAT_KEY.to_string(), MODEL_FORMAT.to_string());
    let bytes = serialize_safetensors(&tensors, metadata)?;
    write_atomic(path, &bytes).with_context(|| format!("saving checkpoint {}", path.display()))
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
    let model = M::init_zeros(&config, device);
    let (model, used) = load_params(model, &file, "")?;
    let extra: BTreeMap<_, _> = file
        .tensors()
        .names()
        .into_iter()
        .filter(|n| !used.contains(*n))
        .map(|n| (n.to_string(), ()))
        .collect();
    if !extra.is_empty() {
        bail!(
            "checkpoint {}: unexpected tensor(s) not in the model: {:?}",
            path.display(),
            extra.keys().take(8).collect::<Vec<_>>()
        );
    }
    Ok((config, model))
}
