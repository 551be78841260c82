//! [`FolderWeights`]: the weights of one diffusers model folder (a `transformer/` or `vae/`):
//! `diffusion_pytorch_model.safetensors`, or the shards that
//! `diffusion_pytorch_model.safetensors.index.json` lists, each memory-mapped.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail};
use safetensors::tensor::TensorView;

use super::{Problems, SafetensorsFile, TensorSource};

/// The single-file weights of a diffusers model folder.
pub const WEIGHTS_NAME: &str = "diffusion_pytorch_model.safetensors";
/// The index of sharded weights.
pub const WEIGHTS_INDEX_NAME: &str = "diffusion_pytorch_model.safetensors.index.json";

/// The weight files of one diffusers model folder, and which file holds each tensor.
pub struct FolderWeights {
    /// What errors name: the single file, or the index of a sharded model.
    pub shown: PathBuf,
    files: Vec<SafetensorsFile>,
    /// Tensor name → index in `files`.
    holder: HashMap<String, usize>,
    /// Inconsistencies between the shards and their index, reported with the tensor problems.
    shards: Problems,
}

impl FolderWeights {
    /// Opens the weights of the model folder `dir`. Errors name the file at fault; a folder
    /// with only PyTorch pickles says how to re-save it.
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        let single = dir.join(WEIGHTS_NAME);
        let index = dir.join(WEIGHTS_INDEX_NAME);
        if single.exists() {
            let file = SafetensorsFile::read(&single)?;
            return Ok(Self::from_files(single, vec![file], None));
        }
        if !index.exists() {
            let hint = if dir.join("diffusion_pytorch_model.bin").exists() {
                " (diffusion_pytorch_model.bin is there: PyTorch pickles are not read; re-save \
                 with `save_pretrained(..., safe_serialization=True)`)"
            } else {
                ""
            };
            bail!(
                "{}: missing weights: neither {WEIGHTS_NAME} nor {WEIGHTS_INDEX_NAME}{hint}",
                dir.display()
            );
        }
        let weight_map = parse_index(&read_small_text(&index)?)
            .map_err(|e| anyhow!("{}: not a safetensors index: {e}", index.display()))?;
        let mut names: Vec<&String> = Vec::new();
        for f in weight_map.values() {
            if !names.contains(&f) {
                names.push(f);
            }
        }
        let mut files = Vec::with_capacity(names.len());
        for f in names {
            let path = dir.join(f);
            if !path.exists() {
                bail!(
                    "{}: missing shard named by {}",
                    path.display(),
                    index.display()
                );
            }
            files.push(SafetensorsFile::read(&path)?);
        }
        Ok(Self::from_files(index, files, Some(weight_map)))
    }

    fn from_files(
        shown: PathBuf,
        files: Vec<SafetensorsFile>,
        weight_map: Option<BTreeMap<String, String>>,
    ) -> Self {
        let mut holder = HashMap::new();
        let mut shards = Problems::default();
        for (i, f) in files.iter().enumerate() {
            for name in f.names() {
                if let Some(j) = holder.insert(name.to_string(), i) {
                    shards.push(
                        "key(s) in more than one shard",
                        format!("{name} ({} and {})", file_name(&files[j]), file_name(f)),
                    );
                }
            }
        }
        for (name, shard) in weight_map.iter().flatten() {
            match holder.get(name) {
                None => shards.push("key(s) listed in the index but in no shard", name.clone()),
                Some(&i) if file_name(&files[i]) != *shard => shards.push(
                    "key(s) in another shard than the index names",
                    format!("{name} (index: {shard}, found in {})", file_name(&files[i])),
                ),
                Some(_) => {}
            }
        }
        Self {
            shown,
            files,
            holder,
            shards,
        }
    }
}

fn file_name(f: &SafetensorsFile) -> String {
    f.path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

impl TensorSource for FolderWeights {
    fn shown(&self) -> &Path {
        &self.shown
    }

    fn view(&self, name: &str) -> Option<(TensorView<'_>, Option<String>)> {
        let &i = self.holder.get(name)?;
        let f = &self.files[i];
        let shard = (self.files.len() > 1).then(|| file_name(f));
        Some((f.view(name)?, shard))
    }

    fn names(&self) -> Vec<&str> {
        self.holder.keys().map(String::as_str).collect()
    }

    fn problems(&self) -> Problems {
        self.shards.clone()
    }
}

/// `weight_map` of a sharded index: tensor name → shard file name, which must be a plain
/// `.safetensors` file name in the same folder.
fn parse_index(text: &str) -> Result<BTreeMap<String, String>, String> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or("no `weight_map` object")?;
    let mut out = BTreeMap::new();
    for (name, shard) in map {
        let Some(s) = shard.as_str() else {
            return Err(format!(
                "`weight_map` entry `{name}` is not a file name: {shard}"
            ));
        };
        let plain = Path::new(s).file_name().is_some_and(|f| f == s) && s != "..";
        if !plain || !s.ends_with(".safetensors") {
            return Err(format!(
                "`weight_map` entry `{name}` names `{s}`: not a .safetensors file in this folder"
            ));
        }
        out.insert(name.clone(), s.to_string());
    }
    Ok(out)
}

/// A config or index file: small, so read whole (refusing anything that is not a regular file
/// or is implausibly large).
pub fn read_small_text(path: &Path) -> anyhow::Result<String> {
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
