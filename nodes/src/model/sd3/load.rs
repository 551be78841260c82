//! [`load_diffusers`]: an [`Sd3Transformer`] from a diffusers folder.
//!
//! * `dir` is a pipeline folder (`model_index.json` + `transformer/`) or a transformer folder
//!   (`config.json` + weights).
//! * Weights: `diffusion_pytorch_model.safetensors`, or the sharded
//!   `diffusion_pytorch_model.safetensors.index.json` and the shards it names. Files are
//!   memory-mapped and converted to f32 one tensor at a time ([`crate::model::weights`]), so a
//!   multi-GB model is never held in memory twice; PyTorch `Linear` weights (`[out, in]`) are
//!   transposed to burn's `[in, out]` on the way.
//! * Every key of the files must be a parameter of the model and every parameter must be in the
//!   files, with diffusers' shape; the one exception is the sin-cos grid `pos_embed.pos_embed`,
//!   computed when absent (when present it is used, as diffusers uses its stored buffer).
//!   Problems are reported together in one error naming the file.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail};
use burn::tensor::Device;

use super::config::{SD3_CLASS_NAME, Sd3Config};
use super::{POS_EMBED_KEY, Sd3Transformer};
use crate::model::weights::{FolderWeights, Layout, LoadOptions, load_all, read_small_text};
pub use crate::model::weights::{WEIGHTS_INDEX_NAME, WEIGHTS_NAME};

/// Loads diffusers' `SD3Transformer2DModel` from `dir` (a pipeline folder or its `transformer/`
/// folder) onto `device`: config, then weights converted to f32. Use `device.autodiff()` to
/// train it. Errors name the file at fault; nothing on disk can make this panic.
pub fn load_diffusers(dir: &Path, device: &Device) -> anyhow::Result<(Sd3Config, Sd3Transformer)> {
    let tdir = transformer_dir(dir)?;
    let config_path = tdir.join("config.json");
    let text = read_small_text(&config_path)?;
    let config =
        Sd3Config::from_json(&text).map_err(|e| anyhow!("{}: {e:#}", config_path.display()))?;
    let weights = FolderWeights::open(&tdir)?;
    // The sin-cos grid `pos_embed.pos_embed` is computed when absent (when present it is used,
    // as diffusers uses its stored buffer).
    let opts = LoadOptions::new(Layout::Torch).optional(&[POS_EMBED_KEY]);
    let model = load_all(config.init_zeros(device), &weights, opts, &[], || {
        format!(
            "{}: the weights do not match the {SD3_CLASS_NAME} of {}",
            weights.shown.display(),
            config_path.display()
        )
    })?;
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

#[cfg(test)]
mod tests {
    use super::*;

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
