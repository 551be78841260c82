//! [`load_diffusers`]: an [`Sd3Transformer`] from a diffusers folder.
//!
//! * `dir` is a pipeline folder (`model_index.json` + `transformer/`) or a transformer folder
//!   (`config.json` + weights).
//! * Weights: `diffusion_pytorch_model.safetensors`, or the sharded
//!   `diffusion_pytorch_model.safetensors.index.json` and the shards it names. Files are
//!   memory-mapped and converted to f32 one tensor at a time (F32, F16 and BF16 are read), so a
//!   multi-GB model is never held in memory twice; PyTorch `Linear` weights (`[out, in]`) are
//!   transposed to burn's `[in, out]` on the way.
//! * Every key of the files must be a parameter of the model and every parameter must be in the
//!   files, with diffusers' shape; the one exception is the sin-cos grid `pos_embed.pos_embed`,
//!   computed when absent (when present it is used, as diffusers uses its stored buffer).
//!   Problems are reported together in one error naming the file.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail};
use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::{Device, Tensor, TensorData, bf16, f16};
use memmap2::Mmap;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use super::config::{SD3_CLASS_NAME, Sd3Config};
use super::{POS_EMBED_KEY, Sd3Transformer};

/// The single-file weights of a diffusers model folder.
pub const WEIGHTS_NAME: &str = "diffusion_pytorch_model.safetensors";
/// The index of sharded weights.
pub const WEIGHTS_INDEX_NAME: &str = "diffusion_pytorch_model.safetensors.index.json";

/// How many names of each kind of problem an error lists.
const SHOWN: usize = 10;

/// Loads diffusers' `SD3Transformer2DModel` from `dir` (a pipeline folder or its `transformer/`
/// folder) onto `device`: config, then weights converted to f32. Use `device.autodiff()` to
/// train it. Errors name the file at fault; nothing on disk can make this panic.
pub fn load_diffusers(dir: &Path, device: &Device) -> anyhow::Result<(Sd3Config, Sd3Transformer)> {
    let tdir = transformer_dir(dir)?;
    let config_path = tdir.join("config.json");
    let text = read_small_text(&config_path)?;
    let config =
        Sd3Config::from_json(&text).map_err(|e| anyhow!("{}: {e:#}", config_path.display()))?;
    let weights = Weights::open(&tdir)?;
    let model = config.init_zeros(device);
    let model = weights.load_into(model, &config_path)?;
    Ok((config, model))
}

/// The transformer config of a diffusers folder (pipeline or transformer folder) and the file it
/// came from, without touching the weights.
pub fn read_config(dir: &Path) -> anyhow::Result<(PathBuf, Sd3Config)> {
    let config_path = transformer_dir(dir)?.join("config.json");
    let text = read_small_text(&config_path)?;
    let config =
        Sd3Config::from_json(&text).map_err(|e| anyhow!("{}: {e:#}", config_path.display()))?;
    Ok((config_path, config))
}

/// The folder holding `config.json` and the weights.
fn transformer_dir(dir: &Path) -> anyhow::Result<PathBuf> {
    if !dir.is_dir() {
        bail!(
            "{}: not a directory (expected a diffusers pipeline or transformer folder)",
            dir.display()
        );
    }
    let index = dir.join("model_index.json");
    if index.is_file() {
        let text = read_small_text(&index)?;
        let value: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| anyhow!("{}: not JSON: {e}", index.display()))?;
        match value.get("transformer") {
            None => bail!(
                "{}: the pipeline has no `transformer` component (only {SD3_CLASS_NAME} is \
                 supported)",
                index.display()
            ),
            Some(entry) => {
                // ["diffusers", "SD3Transformer2DModel"]
                let class = entry.get(1).and_then(|c| c.as_str());
                if let Some(class) = class
                    && class != SD3_CLASS_NAME
                {
                    bail!(
                        "{}: the pipeline's transformer is a {class}; only {SD3_CLASS_NAME} \
                         (Stable Diffusion 3 / 3.5) is supported",
                        index.display()
                    );
                }
            }
        }
        let tdir = dir.join("transformer");
        if !tdir.join("config.json").is_file() {
            bail!(
                "{}: missing (the pipeline folder {} has model_index.json but no \
                 transformer/config.json)",
                tdir.join("config.json").display(),
                dir.display()
            );
        }
        return Ok(tdir);
    }
    if dir.join("config.json").is_file() {
        return Ok(dir.to_path_buf());
    }
    bail!(
        "{}: missing config: neither model_index.json (a diffusers pipeline folder) nor \
         config.json (a transformer folder)",
        dir.display()
    )
}

/// A config or index file: small, so read whole (refusing anything that is not a regular file
/// or is implausibly large).
fn read_small_text(path: &Path) -> anyhow::Result<String> {
    let meta =
        std::fs::metadata(path).map_err(|e| anyhow!("{}: cannot read: {e}", path.display()))?;
    if !meta.is_file() {
        bail!("{}: not a regular file", path.display());
    }
    if meta.len() > 64 << 20 {
        bail!(
            "{}: {} bytes is too large for a JSON config",
            path.display(),
            meta.len()
        );
    }
    std::fs::read_to_string(path).map_err(|e| anyhow!("{}: cannot read: {e}", path.display()))
}

/// The memory-mapped weight files of one model.
struct Weights {
    /// What errors name: the single file or the index.
    shown: PathBuf,
    /// (file name, map), in index order.
    maps: Vec<(PathBuf, Mmap)>,
    /// Keys the index lists, when sharded.
    index_keys: Option<BTreeMap<String, String>>,
}

fn map_file(path: &Path) -> anyhow::Result<Mmap> {
    let file = File::open(path).map_err(|e| anyhow!("{}: cannot open: {e}", path.display()))?;
    let meta = file
        .metadata()
        .map_err(|e| anyhow!("{}: cannot read: {e}", path.display()))?;
    if !meta.is_file() {
        bail!("{}: not a regular file", path.display());
    }
    if meta.len() < 8 {
        bail!(
            "{}: not a safetensors file: {} bytes, fewer than its 8-byte header length",
            path.display(),
            meta.len()
        );
    }
    // SAFETY: the map is read-only; as with every memory-mapped model loader, the file must not
    // be truncated or rewritten by another process while the model loads.
    unsafe { Mmap::map(&file) }.map_err(|e| anyhow!("{}: cannot memory-map: {e}", path.display()))
}

impl Weights {
    fn open(tdir: &Path) -> anyhow::Result<Self> {
        let single = tdir.join(WEIGHTS_NAME);
        let index = tdir.join(WEIGHTS_INDEX_NAME);
        if single.exists() {
            let map = map_file(&single)?;
            return Ok(Self {
                shown: single.clone(),
                maps: vec![(single, map)],
                index_keys: None,
            });
        }
        if !index.exists() {
            let bin = tdir.join("diffusion_pytorch_model.bin");
            let hint = if bin.exists() {
                " (diffusion_pytorch_model.bin is there: PyTorch pickles are not read; \
                 re-save with safe_serialization=True)"
            } else {
                ""
            };
            bail!(
                "{}: missing weights: neither {WEIGHTS_NAME} nor {WEIGHTS_INDEX_NAME}{hint}",
                tdir.display()
            );
        }
        let text = read_small_text(&index)?;
        #[derive(serde::Deserialize)]
        struct Index {
            weight_map: BTreeMap<String, String>,
        }
        let parsed: Index = serde_json::from_str(&text).map_err(|e| {
            anyhow!(
                "{}: not a safetensors index (weight_map): {e}",
                index.display()
            )
        })?;
        let mut files: Vec<String> = Vec::new();
        for f in parsed.weight_map.values() {
            if !files.contains(f) {
                files.push(f.clone());
            }
        }
        let mut maps = Vec::with_capacity(files.len());
        for f in &files {
            let plain = Path::new(f)
                .file_name()
                .is_some_and(|n| n == std::ffi::OsStr::new(f));
            if !plain {
                bail!(
                    "{}: shard {f:?} is not a file name in the same folder",
                    index.display()
                );
            }
            let path = tdir.join(f);
            if !path.exists() {
                bail!(
                    "{}: missing shard named by {}",
                    path.display(),
                    index.display()
                );
            }
            let map = map_file(&path)?;
            maps.push((path, map));
        }
        Ok(Self {
            shown: index,
            maps,
            index_keys: Some(parsed.weight_map),
        })
    }

    /// Fills every parameter of `model` from the files; one error lists every problem.
    fn load_into(
        &self,
        model: Sd3Transformer,
        config_path: &Path,
    ) -> anyhow::Result<Sd3Transformer> {
        // Parse (and validate) every header; name → (file index, view).
        let mut views: HashMap<String, (usize, TensorView<'_>)> = HashMap::new();
        let mut duplicates = Vec::new();
        for (i, (path, map)) in self.maps.iter().enumerate() {
            let st = SafeTensors::deserialize(map)
                .map_err(|e| anyhow!("{}: not a valid safetensors file: {e}", path.display()))?;
            for (name, view) in st.tensors() {
                if views.insert(name.clone(), (i, view)).is_some() {
                    duplicates.push(name);
                }
            }
        }
        let mut loader = Loader {
            views: &views,
            maps: &self.maps,
            path: Vec::new(),
            used: HashSet::new(),
            missing: Vec::new(),
            misshaped: Vec::new(),
            bad_dtype: Vec::new(),
        };
        let model = model.map(&mut loader);
        let mut unknown: Vec<&String> = views
            .keys()
            .filter(|k| !loader.used.contains(k.as_str()))
            .collect();
        unknown.sort();
        let mut index_only: Vec<&String> = self
            .index_keys
            .iter()
            .flat_map(|m| m.keys())
            .filter(|k| !views.contains_key(k.as_str()))
            .collect();
        index_only.sort();
        duplicates.sort();

        let mut report = Vec::new();
        let mut section = |what: &str, items: Vec<String>| {
            if !items.is_empty() {
                let n = items.len();
                let more = if n > SHOWN {
                    format!(", … ({} more)", n - SHOWN)
                } else {
                    String::new()
                };
                let shown: Vec<_> = items.into_iter().take(SHOWN).collect();
                report.push(format!("{n} {what}: {}{more}", shown.join(", ")));
            }
        };
        section(
            "missing key(s) (in the model, not in the files)",
            loader.missing,
        );
        section(
            "unknown key(s) (in the files, not in the model)",
            unknown.into_iter().cloned().collect(),
        );
        section("mis-shaped key(s)", loader.misshaped);
        section(
            "key(s) of an unsupported dtype (supported: F32, F16, BF16)",
            loader.bad_dtype,
        );
        section("key(s) in more than one shard", duplicates);
        section(
            "key(s) listed in the index but in no shard",
            index_only.into_iter().cloned().collect(),
        );
        if !report.is_empty() {
            bail!(
                "{}: the weights do not match the SD3Transformer2DModel of {}:\n  {}",
                self.shown.display(),
                config_path.display(),
                report.join("\n  ")
            );
        }
        Ok(model)
    }
}

struct Loader<'a> {
    views: &'a HashMap<String, (usize, TensorView<'a>)>,
    maps: &'a [(PathBuf, Mmap)],
    path: Vec<String>,
    used: HashSet<String>,
    missing: Vec<String>,
    misshaped: Vec<String>,
    bad_dtype: Vec<String>,
}

impl ModuleMapper for Loader<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let name = self.path.join(".");
        let shape: [usize; D] = param.lazy_shape().dims();
        // PyTorch's layout: Linear weights (the only 2-D parameters) are [out, in].
        let mut torch_shape = shape.to_vec();
        if D == 2 {
            torch_shape.reverse();
        }
        let Some((file, view)) = self.views.get(&name) else {
            if name != POS_EMBED_KEY {
                self.missing.push(name);
            }
            return param;
        };
        self.used.insert(name.clone());
        let file_name = || {
            self.maps[*file]
                .0
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        if view.shape() != torch_shape.as_slice() {
            let in_file = if self.maps.len() > 1 {
                format!(" in {}", file_name())
            } else {
                String::new()
            };
            self.misshaped.push(format!(
                "{name}{in_file} (file {:?}, model {torch_shape:?})",
                view.shape()
            ));
            return param;
        }
        let Some(mut values) = to_f32(view) else {
            self.bad_dtype.push(format!("{name} ({:?})", view.dtype()));
            return param;
        };
        if D == 2 {
            values = transpose(&values, torch_shape[0], torch_shape[1]);
        }
        let device = param.lazy_device();
        let tensor = device.memory_persistent_allocations(TensorData::new(values, shape), |data| {
            Tensor::<D>::from_data(data, &device)
        });
        let id = param.id;
        param.transform_for_load(tensor, id)
    }
}

/// A tensor's little-endian data as f32; `None` for dtypes other than F32, F16 and BF16.
fn to_f32(view: &TensorView<'_>) -> Option<Vec<f32>> {
    let data = view.data();
    let pairs = || {
        data.chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
    };
    match view.dtype() {
        Dtype::F32 => Some(
            data.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        Dtype::F16 => Some(pairs().map(|b| f16::from_bits(b).to_f32()).collect()),
        Dtype::BF16 => Some(pairs().map(|b| bf16::from_bits(b).to_f32()).collect()),
        _ => None,
    }
}

/// Row-major `[rows, cols]` → `[cols, rows]`, in cache-sized tiles.
fn transpose(src: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    const TILE: usize = 32;
    let mut dst = vec![0.0f32; src.len()];
    for r0 in (0..rows).step_by(TILE) {
        for c0 in (0..cols).step_by(TILE) {
            for r in r0..(r0 + TILE).min(rows) {
                for c in c0..(c0 + TILE).min(cols) {
                    dst[c * rows + r] = src[r * cols + c];
                }
            }
        }
    }
    dst
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn should_transpose_in_tiles() {
        let (r, c) = (37, 70);
        let src: Vec<f32> = (0..r * c).map(|v| v as f32).collect();
        let t = transpose(&src, r, c);
        for i in 0..r {
            for j in 0..c {
                assert_eq!(t[j * r + i], src[i * c + j]);
            }
        }
    }

    #[test]
    fn should_say_what_a_folder_lacks() {
        let dir = std::env::temp_dir().join(format!("flowrun-sd3-empty-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let e = load_diffusers(&dir, &Device::flex()).unwrap_err();
        assert!(format!("{e}").contains("neither model_index.json"), "{e}");
        std::fs::write(
            dir.join("config.json"),
            r#"{"_class_name": "SD3Transformer2DModel"}"#,
        )
        .unwrap();
        let e = load_diffusers(&dir, &Device::flex()).unwrap_err();
        assert!(format!("{e}").contains("missing weights"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
