//! [`save_diffusers`]: an [`Sd3Transformer`] written as a diffusers `SD3Transformer2DModel`
//! folder, the inverse of [`load_diffusers`](super::load_diffusers).
//!
//! * `config.json`: every field of the model's [`Sd3Config`] under diffusers' names, with
//!   `_class_name: "SD3Transformer2DModel"` and `_diffusers_version` [`DIFFUSERS_VERSION`]
//!   (keys sorted, 2-space indent, as diffusers' `save_config` writes it).
//! * Weights: `diffusion_pytorch_model.safetensors`, or, when the tensors add up to more than
//!   the shard size, `diffusion_pytorch_model-0000i-of-0000n.safetensors` shards and the index
//!   `diffusion_pytorch_model.safetensors.index.json` (`{"metadata": {"total_size": N},
//!   "weight_map": {key: file}}`), split as `huggingface_hub.split_torch_state_dict_into_shards`
//!   splits a state dict (in parameter order; a tensor larger than the shard size gets a shard
//!   of its own). Each file carries diffusers' metadata `{"format": "pt"}`.
//! * Keys are the model's parameter paths (diffusers' state-dict keys), every one of them,
//!   including the sin-cos grid `pos_embed.pos_embed` when the model has one (diffusers keeps
//!   it in the state dict whenever `pos_embed_max_size` is set); PyTorch layouts: `Linear`
//!   weights (burn `[in, out]`) are transposed back to `[out, in]`, every other tensor is
//!   written as it is. Values are stored as [`ExportDtype`] (F16 and BF16 rounded to nearest,
//!   ties to even, as `torch.Tensor.to` rounds).
//! * Memory: tensors are copied to the host, converted and written one at a time, in chunks of
//!   `READ_CHUNK` values (16 MB of f32; a `Linear` weight a block of PyTorch rows at a time,
//!   transposed on the way): besides the model, an export holds tens of MB, never a whole
//!   tensor, let alone the file.
//! * Atomic: everything is written into a hidden temporary folder next to `dir`, each file
//!   fsynced, then the folder is renamed to `dir` and the parent fsynced; a failed export leaves
//!   nothing behind. An existing non-empty `dir` is an error naming it (never overwritten); an
//!   existing empty one is replaced.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow, bail};
use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::Tensor;

use super::Sd3Transformer;
use super::config::{SD3_CLASS_NAME, Sd3Config};
use crate::model::weights::{
    Entry, Layout, READ_CHUNK, TensorWriter, WEIGHTS_INDEX_NAME, WEIGHTS_NAME, module_entries,
};

/// The diffusers version the written `config.json` names (the one this crate's SD3 is checked
/// against).
pub const DIFFUSERS_VERSION: &str = "0.42.1";

/// diffusers 0.42.1's default `max_shard_size` of `ModelMixin.save_pretrained` ("10GB", i.e.
/// 10·10⁹ bytes).
pub const DEFAULT_MAX_SHARD_SIZE: u64 = 10_000_000_000;

/// The dtype of the written tensors.
pub use crate::model::weights::StoreDtype as ExportDtype;

/// What [`save_diffusers_sharded`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSummary {
    /// The folder.
    pub dir: PathBuf,
    /// The weight files, in shard order (one file when not sharded).
    pub files: Vec<String>,
    /// Tensors written.
    pub tensors: usize,
    /// Bytes of tensor data (the index's `total_size`).
    pub total_size: u64,
}

/// Writes `model` as a diffusers `SD3Transformer2DModel` folder at `dir` (see the module
/// documentation), sharded above diffusers' default shard size [`DEFAULT_MAX_SHARD_SIZE`].
pub fn save_diffusers(
    model: &Sd3Transformer,
    dir: &Path,
    dtype: ExportDtype,
) -> anyhow::Result<()> {
    save_diffusers_sharded(model, dir, dtype, DEFAULT_MAX_SHARD_SIZE).map(|_| ())
}

/// [`save_diffusers`] with a shard size: the weights are split into shards of at most
/// `max_shard_size` bytes of tensor data (a larger tensor gets a shard of its own) when they
/// add up to more.
pub fn save_diffusers_sharded(
    model: &Sd3Transformer,
    dir: &Path,
    dtype: ExportDtype,
    max_shard_size: u64,
) -> anyhow::Result<ExportSummary> {
    check_target(dir)?;
    let name = dir
        .file_name()
        .ok_or_else(|| anyhow!("{}: not a folder name to export into", dir.display()))?;
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&parent)
        .with_context(|| format!("cannot create the folder {}", parent.display()))?;
    let tmp = runner::fsutil::temp_path(&parent.join(name));
    fs::create_dir(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let result = write_folder(model, &tmp, dtype, max_shard_size, READ_CHUNK).and_then(|summary| {
        runner::fsutil::sync_dir(&tmp);
        // rename(2) replaces an empty directory and fails on a non-empty one, so a folder that
        // appeared meanwhile is never overwritten.
        fs::rename(&tmp, dir).map_err(|e| {
            anyhow!(
                "{}: cannot move the exported folder into place ({e}); is it there already?",
                dir.display()
            )
        })?;
        runner::fsutil::sync_dir(&parent);
        Ok(ExportSummary {
            dir: dir.to_path_buf(),
            ..summary
        })
    });
    if result.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    result.with_context(|| format!("exporting the SD3 transformer to {}", dir.display()))
}

/// Checks that `dir` can be exported into: it must not exist, or be an empty folder (the error
/// names it). [`save_diffusers`] checks it first; a caller may check before loading a model.
pub fn check_target(dir: &Path) -> anyhow::Result<()> {
    let meta = match fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => bail!("{}: cannot inspect the output folder: {e}", dir.display()),
        Ok(m) => m,
    };
    if meta.file_type().is_symlink() {
        bail!(
            "{}: the output is a symbolic link; give a new folder (export never writes through \
             or replaces an existing path)",
            dir.display()
        );
    }
    if !meta.is_dir() {
        bail!(
            "{}: already exists and is not a folder; give a new folder to export into",
            dir.display()
        );
    }
    let mut entries =
        fs::read_dir(dir).with_context(|| format!("cannot read the folder {}", dir.display()))?;
    if entries.next().is_some() {
        bail!(
            "{}: already exists and is not empty; export never overwrites a folder (remove it or \
             give another output folder)",
            dir.display()
        );
    }
    Ok(())
}

/// The JSON text diffusers' `save_config` writes for `config`: every field, `_class_name` and
/// `_diffusers_version` set, `_name_or_path` left out, keys sorted, 2-space indent, final
/// newline.
pub fn diffusers_config_json(config: &Sd3Config) -> anyhow::Result<String> {
    let config = Sd3Config {
        class_name: Some(SD3_CLASS_NAME.to_string()),
        diffusers_version: Some(DIFFUSERS_VERSION.to_string()),
        name_or_path: None,
        ..config.clone()
    };
    let value = serde_json::to_value(&config)?;
    let fields: BTreeMap<String, serde_json::Value> = value
        .as_object()
        .ok_or_else(|| anyhow!("internal: the config is not a JSON object"))?
        .clone()
        .into_iter()
        .collect();
    Ok(serde_json::to_string_pretty(&fields)? + "\n")
}

/// `huggingface_hub.split_torch_state_dict_into_shards`: tensors in order; a tensor larger
/// than `max` is a shard of its own (appended at once, while the current shard stays open);
/// otherwise a tensor that would take the current shard past `max` starts a new one. Returns
/// the shards as lists of tensor indices.
fn plan_shards(sizes: &[u64], max: u64) -> Vec<Vec<usize>> {
    let mut shards = Vec::new();
    let mut current = Vec::new();
    let mut current_size = 0u64;
    for (i, &size) in sizes.iter().enumerate() {
        if size > max {
            shards.push(vec![i]);
            continue;
        }
        if current_size + size > max {
            shards.push(std::mem::take(&mut current));
            current_size = 0;
        }
        current.push(i);
        current_size += size;
    }
    if !current.is_empty() {
        shards.push(current);
    }
    shards
}

/// Writes config, weights and (when sharded) the index into the empty folder `dir`, copying
/// `read_chunk` values of a tensor to the host at a time.
fn write_folder(
    model: &Sd3Transformer,
    dir: &Path,
    dtype: ExportDtype,
    max_shard_size: u64,
    read_chunk: usize,
) -> anyhow::Result<ExportSummary> {
    let config_path = dir.join("config.json");
    runner::fsutil::write_atomic(
        &config_path,
        diffusers_config_json(model.config())?.as_bytes(),
    )?;

    let entries = module_entries(model, "", Layout::Torch);
    let sizes: Vec<u64> = entries
        .iter()
        .map(|e| (e.numel() * dtype.size()) as u64)
        .collect();
    let total_size: u64 = sizes.iter().sum();
    let shards = plan_shards(&sizes, max_shard_size);
    let n = shards.len();
    let files: Vec<String> = if n == 1 {
        vec![WEIGHTS_NAME.to_string()]
    } else {
        (1..=n)
            .map(|i| format!("diffusion_pytorch_model-{i:05}-of-{n:05}.safetensors"))
            .collect()
    };
    // Each tensor's shard; each shard's tensors in the order they are written (parameter order).
    let mut shard_of = vec![0usize; entries.len()];
    for (s, idx) in shards.iter().enumerate() {
        for &i in idx {
            shard_of[i] = s;
        }
    }
    let mut writer = ShardWriter {
        dir,
        dtype,
        files: &files,
        shard_entries: shards
            .iter()
            .map(|idx| idx.iter().map(|&i| entries[i].clone()).collect())
            .collect(),
        remaining: shards.iter().map(Vec::len).collect(),
        shard_of,
        open: BTreeMap::new(),
        path: Vec::new(),
        next: 0,
        read_chunk,
        error: None,
    };
    model.visit(&mut writer);
    if let Some(e) = writer.error.take() {
        return Err(e);
    }
    if writer.next != entries.len() || !writer.open.is_empty() {
        bail!(
            "internal: wrote {} of {} tensors ({} shard(s) left open)",
            writer.next,
            entries.len(),
            writer.open.len()
        );
    }

    if n > 1 {
        let mut weight_map: BTreeMap<&str, &str> = BTreeMap::new();
        for (s, idx) in shards.iter().enumerate() {
            for &i in idx {
                weight_map.insert(entries[i].name.as_str(), files[s].as_str());
            }
        }
        let index = serde_json::json!({
            "metadata": {"total_size": total_size},
            "weight_map": weight_map,
        });
        let text = serde_json::to_string_pretty(&index)? + "\n";
        runner::fsutil::write_atomic(&dir.join(WEIGHTS_INDEX_NAME), text.as_bytes())?;
    }
    Ok(ExportSummary {
        dir: dir.to_path_buf(),
        files,
        tensors: entries.len(),
        total_size,
    })
}

/// Visits the parameters in order and streams each into its shard file (opened, with its
/// header, at its first tensor; flushed and fsynced after its last).
struct ShardWriter<'a> {
    dir: &'a Path,
    dtype: ExportDtype,
    files: &'a [String],
    /// Each shard's tensors, in the order they are written.
    shard_entries: Vec<Vec<Entry>>,
    /// Tensors not yet written, per shard.
    remaining: Vec<usize>,
    shard_of: Vec<usize>,
    open: BTreeMap<usize, TensorWriter<BufWriter<File>>>,
    path: Vec<String>,
    /// Index of the next parameter.
    next: usize,
    /// Values copied to the host at a time.
    read_chunk: usize,
    error: Option<anyhow::Error>,
}

impl ShardWriter<'_> {
    /// Writes one parameter into its shard.
    fn write_tensor<const D: usize>(
        &mut self,
        name: &str,
        tensor: Tensor<D>,
    ) -> anyhow::Result<()> {
        let i = self.next;
        self.next += 1;
        let s = *self
            .shard_of
            .get(i)
            .ok_or_else(|| anyhow!("internal: parameter {name} was not planned"))?;
        let path = self.dir.join(&self.files[s]);
        if !self.open.contains_key(&s) {
            let file =
                File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
            let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
            let w = TensorWriter::new(
                BufWriter::with_capacity(1 << 20, file),
                std::mem::take(&mut self.shard_entries[s]),
                self.dtype,
                &metadata,
            )
            .with_context(|| format!("writing {}", path.display()))?
            .check_finite(true)
            .read_chunk(self.read_chunk);
            self.open.insert(s, w);
        }
        let w = self.open.get_mut(&s).expect("opened above");
        w.write(name, tensor, Layout::Torch)
            .map_err(|e| anyhow!("{}: {e:#}", path.display()))?;
        self.remaining[s] -= 1;
        if self.remaining[s] == 0 {
            let w = self.open.remove(&s).expect("open");
            let file = w
                .finish()
                .and_then(|b| b.into_inner().map_err(|e| anyhow!("{}", e.error())))
                .with_context(|| format!("writing {}", path.display()))?;
            file.sync_all()
                .with_context(|| format!("cannot fsync {}", path.display()))?;
        }
        Ok(())
    }
}

impl ModuleVisitor for ShardWriter<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if self.error.is_some() {
            return;
        }
        let name = self.path.join(".");
        if let Err(e) = self.write_tensor(&name, param.val().detach()) {
            self.error = Some(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::checkpoint::collect_params;
    use crate::model::sd3::load_diffusers;
    use burn::tensor::Device;
    use burn::tensor::{bf16, f16};

    fn tmp(label: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("flowrun-sd3-export-{label}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn tiny_sd35() -> Sd3Config {
        Sd3Config {
            dual_attention_layers: vec![0],
            qk_norm: Some("rms_norm".into()),
            patch_size: 2,
            pos_embed_max_size: Some(6),
            ..Sd3Config::tiny()
        }
    }

    #[test]
    fn should_shard_as_huggingface_hub_does() {
        // Its own docstring's example: [6, 6, 2, 6, 2, 2] GB at 10 GB → [6], [6+2], [6+2+2].
        assert_eq!(
            plan_shards(&[6, 6, 2, 6, 2, 2], 10),
            vec![vec![0], vec![1, 2], vec![3, 4, 5]]
        );
        // A tensor over the limit is a shard of its own, the open shard continues after it.
        assert_eq!(
            plan_shards(&[3, 12, 4, 5], 10),
            vec![vec![1], vec![0, 2], vec![3]]
        );
        assert_eq!(plan_shards(&[1, 2, 3], 100), vec![vec![0, 1, 2]]);
        assert_eq!(plan_shards(&[5, 5], 10), vec![vec![0, 1]]);
    }

    #[test]
    fn should_parse_dtypes() {
        assert_eq!("bf16".parse::<ExportDtype>().unwrap(), ExportDtype::BF16);
        assert_eq!("Float16".parse::<ExportDtype>().unwrap(), ExportDtype::F16);
        assert_eq!("fp32".parse::<ExportDtype>().unwrap(), ExportDtype::F32);
        let e = "f64".parse::<ExportDtype>().unwrap_err();
        assert!(format!("{e}").contains("f32, f16 or bf16"), "{e}");
    }

    #[test]
    fn should_write_diffusers_config_fields_sorted() {
        let c = Sd3Config {
            out_channels: None,
            name_or_path: Some("somewhere".into()),
            diffusers_version: Some("0.30.0".into()),
            ..tiny_sd35()
        };
        let text = diffusers_config_json(&c).unwrap();
        assert!(text.ends_with("}\n"));
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["_class_name"], "SD3Transformer2DModel");
        assert_eq!(v["_diffusers_version"], DIFFUSERS_VERSION);
        assert!(v.get("_name_or_path").is_none());
        assert!(v["out_channels"].is_null());
        assert_eq!(v["qk_norm"], "rms_norm");
        let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
        // Read back: the same maths.
        let back = Sd3Config::from_json(&text).unwrap();
        assert_eq!(
            back,
            Sd3Config {
                class_name: Some(SD3_CLASS_NAME.into()),
                diffusers_version: Some(DIFFUSERS_VERSION.into()),
                name_or_path: None,
                ..c
            }
        );
    }

    #[test]
    fn should_round_trip_through_load_diffusers_single_and_sharded() {
        let dev = Device::flex();
        let model = tiny_sd35().init(&dev, 11);
        let want = collect_params(&model, "");
        for (label, shard) in [("single", DEFAULT_MAX_SHARD_SIZE), ("sharded", 3000)] {
            let dir = tmp(label);
            let summary = save_diffusers_sharded(&model, &dir, ExportDtype::F32, shard).unwrap();
            assert_eq!(summary.tensors, want.len());
            if label == "single" {
                assert_eq!(summary.files, vec![WEIGHTS_NAME.to_string()]);
                assert!(!dir.join(WEIGHTS_INDEX_NAME).exists());
            } else {
                assert!(summary.files.len() > 3, "{:?}", summary.files);
                assert!(dir.join(WEIGHTS_INDEX_NAME).is_file());
                assert!(!dir.join(WEIGHTS_NAME).exists());
            }
            let (_, back) = load_diffusers(&dir, &dev).unwrap();
            assert_eq!(collect_params(&back, ""), want, "{label}");
            // Nothing left next to it.
            let parent = dir.parent().unwrap();
            let prefix = format!(".{}.tmp", dir.file_name().unwrap().to_string_lossy());
            assert!(
                !fs::read_dir(parent)
                    .unwrap()
                    .flatten()
                    .any(|e| e.file_name().to_string_lossy().starts_with(&prefix))
            );
            fs::remove_dir_all(&dir).unwrap();
        }
    }

    #[test]
    fn should_read_tensors_in_chunks_of_any_size() {
        let dev = Device::flex();
        let model = tiny_sd35().init(&dev, 3);
        let want = collect_params(&model, "");
        // 1 value at a time; 7 (a remainder in every tensor, and Linear blocks of one row
        // where a column is longer than 7); 100 (several rows per block).
        for chunk in [1, 7, 100] {
            let dir = tmp(&format!("chunk-{chunk}"));
            fs::create_dir_all(&dir).unwrap();
            write_folder(&model, &dir, ExportDtype::F32, 5000, chunk).unwrap();
            let (_, back) = load_diffusers(&dir, &dev).unwrap();
            assert_eq!(collect_params(&back, ""), want, "read chunk {chunk}");
            fs::remove_dir_all(&dir).unwrap();
        }
    }

    #[test]
    fn should_round_half_precision_to_nearest() {
        let dev = Device::flex();
        let model = Sd3Config::tiny().init(&dev, 5);
        let want = collect_params(&model, "");
        for (label, dtype) in [("f16", ExportDtype::F16), ("bf16", ExportDtype::BF16)] {
            let dir = tmp(label);
            save_diffusers(&model, &dir, dtype).unwrap();
            let (_, back) = load_diffusers(&dir, &dev).unwrap();
            for (w, g) in want.iter().zip(collect_params(&back, "")) {
                assert_eq!(w.name, g.name);
                let rounded: Vec<f32> = w
                    .values
                    .iter()
                    .map(|&v| match dtype {
                        ExportDtype::F16 => f16::from_f32(v).to_f32(),
                        _ => bf16::from_f32(v).to_f32(),
                    })
                    .collect();
                assert_eq!(g.values, rounded, "{label} {}", w.name);
            }
            fs::remove_dir_all(&dir).unwrap();
        }
    }

    #[test]
    fn should_never_overwrite_a_folder() {
        let dev = Device::flex();
        let model = Sd3Config::tiny().init_zeros(&dev);
        let dir = tmp("exists");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("notes.txt"), b"mine").unwrap();
        let e = save_diffusers(&model, &dir, ExportDtype::F32).unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains(&dir.display().to_string()), "{msg}");
        assert!(msg.contains("already exists and is not empty"), "{msg}");
        assert_eq!(fs::read(dir.join("notes.txt")).unwrap(), b"mine");
        // A file in the way.
        let file = dir.join("notes.txt");
        let e = save_diffusers(&model, &file, ExportDtype::F32).unwrap_err();
        assert!(format!("{e:#}").contains("is not a folder"), "{e:#}");
        // An empty folder is filled.
        let empty = dir.join("empty");
        fs::create_dir(&empty).unwrap();
        save_diffusers(&model, &empty, ExportDtype::F32).unwrap();
        assert!(empty.join("config.json").is_file());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn should_refuse_values_the_dtype_cannot_hold_and_leave_nothing() {
        let dev = Device::flex();
        let mut model = Sd3Config::tiny().init(&dev, 1);
        let w = model.proj_out.weight.val();
        model.proj_out.weight = Param::from_tensor(w.add_scalar(70000.0));
        let dir = tmp("range");
        let e = save_diffusers(&model, &dir, ExportDtype::F16).unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains("proj_out.weight"), "{msg}");
        assert!(msg.contains("float16's range"), "{msg}");
        assert!(!dir.exists());
        let parent = dir.parent().unwrap();
        let prefix = format!(".{}.tmp", dir.file_name().unwrap().to_string_lossy());
        assert!(
            !fs::read_dir(parent)
                .unwrap()
                .flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with(&prefix)),
            "a temporary folder was left behind"
        );
        // bf16 holds it.
        save_diffusers(&model, &dir, ExportDtype::BF16).unwrap();
        fs::remove_dir_all(&dir).unwrap();
    }
}
