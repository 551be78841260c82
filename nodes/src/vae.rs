//! `vae` resource: a frozen diffusers VAE decoder (SD3's `AutoencoderKL`), read by
//! `vae_decode`.

use std::any::Any;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use runner::{BuildCtx, ParamDef, ParamKind, Registry, Resource, ResourceType};

use crate::device::open;
use crate::model::vae::{VaeConfig, VaeDecoder, load_vae};

pub const TYPE: &str = "vae";

pub fn register(r: &mut Registry) {
    r.add_resource(ResourceType {
        name: TYPE,
        summary: "a frozen VAE decoder (diffusers AutoencoderKL, e.g. SD3's) that turns latents into pixels",
        doc: "Loads the decoder of diffusers' AutoencoderKL from `path`: a diffusers pipeline\n\
              folder (model_index.json and vae/) or its vae/ folder (config.json and\n\
              diffusion_pytorch_model.safetensors, or sharded with its .index.json; f32, f16 or\n\
              bf16, computed in f32). The encoder's weights are skipped. Never trained: nothing\n\
              is written to checkpoints but a note of the folder; on resume the weights are read\n\
              from `path` again. Read by `vae_decode`.",
        params: vec![ParamDef::new(
            "path",
            ParamKind::Path,
            "the diffusers pipeline folder, or its vae/ folder",
        )],
        factory: build,
    });
}

/// The `vae` resource.
pub struct VaeRes {
    pub decoder: VaeDecoder,
    pub config: VaeConfig,
    /// Plain (non-autodiff) device the decoder lives on.
    pub device: Device,
    /// The folder it was loaded from.
    pub source: PathBuf,
}

fn build(ctx: &BuildCtx) -> Result<Box<dyn Resource>> {
    let path = PathBuf::from(ctx.params.str("path")?);
    let device = open(ctx.device).map_err(anyhow::Error::msg)?;
    let res = VaeRes::load(&path, &device).with_context(|| format!("vae `{}`", ctx.id))?;
    Ok(Box::new(res))
}

impl VaeRes {
    /// Loads the VAE at `path` (see the resource docs) onto `device`.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let (config, decoder) = load_vae(path, device)?;
        if config.out_channels != 3 {
            bail!(
                "the VAE in {} decodes {}-channel images; `vae_decode` outputs RGB (out_channels 3)",
                path.display(),
                config.out_channels
            );
        }
        Ok(VaeRes {
            decoder,
            config,
            device: device.clone(),
            source: path.to_path_buf(),
        })
    }
}

impl Resource for VaeRes {
    fn save(&self, dir: &Path) -> Result<()> {
        let note = serde_json::json!({
            "source": self.source.display().to_string(),
            "config": self.config.to_diffusers_json(),
        });
        runner::fsutil::write_atomic(
            &dir.join("vae.json"),
            serde_json::to_string_pretty(&note)?.as_bytes(),
        )
    }
    fn load(&mut self, _dir: &Path) -> Result<()> {
        // Frozen: the weights are the ones at `path`.
        Ok(())
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}
