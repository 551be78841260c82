//! Loading (and writing) diffusers VAE folders.
//!
//! A VAE folder holds `config.json` and `diffusion_pytorch_model.safetensors`, or shards
//! listed by `diffusion_pytorch_model.safetensors.index.json`; a pipeline folder
//! (`model_index.json`) has it as `vae/`. Tensors are f32, f16, bf16 (or f64) and become f32.
//! State-dict keys are burn's parameter paths; Linear weights are transposed (torch
//! `[out, in]`, burn `[in, out]`). Encoder keys (`encoder.*`, `quant_conv.*`) are skipped;
//! every other unknown key, every missing key and every mis-shaped key is reported in one
//! error.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::tensor::Device;

use super::{VaeConfig, VaeDecoder};
use crate::model::checkpoint::write_atomic;
use crate::model::weights::{
    FolderWeights, Layout, LoadOptions, StoreDtype, load_all, module_entries, save_atomic,
};
pub use crate::model::weights::{WEIGHTS_INDEX_NAME as INDEX_FILE, WEIGHTS_NAME as WEIGHTS_FILE};
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
    let weights = FolderWeights::open(&dir)?;
    let opts = LoadOptions::new(Layout::Torch);
    let decoder = load_all(
        config.init(device),
        &weights,
        opts,
        ENCODER_PREFIXES,
        || {
            format!(
                "{}: the weights do not match the VAE decoder of {}",
                weights.shown.display(),
                dir.join("config.json").display()
            )
        },
    )?;
    Ok((config, decoder))
}

/// Writes `decoder` as a diffusers VAE folder `dir` (`config.json` and an f32
/// `diffusion_pytorch_model.safetensors` in torch layouts) that [`load_vae`] reads back. No
/// encoder weights: diffusers' `AutoencoderKL.from_pretrained` would reject the folder.
pub fn save_vae(dir: &Path, decoder: &VaeDecoder) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let entries = module_entries(decoder, "", Layout::Torch);
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    save_atomic(
        &dir.join(WEIGHTS_FILE),
        entries,
        StoreDtype::F32,
        &metadata,
        |w| w.write_module(decoder, "", Layout::Torch),
    )?;
    let config = serde_json::to_string_pretty(&decoder.config().to_diffusers_json())?;
    write_atomic(&dir.join("config.json"), config.as_bytes())
        .with_context(|| format!("writing {}", dir.join("config.json").display()))
}
