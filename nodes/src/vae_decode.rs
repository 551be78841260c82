//! `vae_decode`: latents → pixels with the `vae` resource, for rewards that score pixels.

use std::time::Instant;

use anyhow::{Result, bail};
use burn::tensor::Tensor;
use runner::{Inputs, Node, NodeCtx, NodeType, Outputs, ParamDef, PortDef, Registry, ResourceSlot};

use crate::types::Images;
use crate::vae::{TYPE, VaeRes};

pub fn register(r: &mut Registry) {
    r.add_node(NodeType {
        name: "vae_decode",
        summary: "decode latents into RGB images with a VAE (SD3's AutoencoderKL decoder)",
        doc: "Decodes latents [B, latent_channels, h, w] (e.g. any step's one-step prediction x̂0\n\
              of a latent model) into images [B, 3, h·f, w·f], f = 2^(levels − 1) (SD3: 16\n\
              channels, f = 8), exactly as diffusers' SD3 pipeline does: vae.decode(z /\n\
              scaling_factor + shift_factor), then clamped to [-1, 1] for the rewards. Runs\n\
              `batch` samples at a time (decoder activations are large: SD3's at 1024×1024 take\n\
              several GB per sample), on the plain device: nothing is differentiated through it.\n\
              The output keeps the input's t. Logs decode_s.",
        inputs: vec![PortDef::new(
            "images",
            "images",
            "latents [B, latent_channels, h, w]",
        )],
        outputs: vec![PortDef::new(
            "images",
            "images",
            "decoded images [B, 3, H, W] in [-1, 1]",
        )],
        params: vec![ParamDef::int(
            "batch",
            4,
            1,
            100_000,
            "samples decoded at a time (memory)",
        )],
        resources: vec![ResourceSlot {
            name: "vae",
            ty: TYPE,
            write: false,
            doc: "the VAE whose decoder runs",
        }],
        factory: |ctx| {
            Ok(Box::new(VaeDecode {
                batch: ctx.params.usize("batch")?,
            }))
        },
    });
}

struct VaeDecode {
    batch: usize,
}

impl Node for VaeDecode {
    fn run(&mut self, ctx: &NodeCtx, inputs: &Inputs) -> Result<Outputs> {
        let latents = inputs.get::<Images>("images")?;
        let (decoder, device, source) = ctx.read("vae", |v: &VaeRes| {
            Ok((v.decoder.clone(), v.device.clone(), v.source.clone()))
        })?;
        let dims = latents.tensor.dims();
        if let Err(e) = decoder.check_latents(dims) {
            bail!(
                "vae_decode `{}`: input `images`: {e} (the VAE in {})",
                ctx.id,
                source.display()
            );
        }
        let t0 = Instant::now();
        // Plain device: no graph is recorded through the decoder.
        let z = latents.tensor.clone().detach().to_device(&device);
        let b = dims[0];
        let mut parts = Vec::with_capacity(b.div_ceil(self.batch));
        for start in (0..b).step_by(self.batch) {
            let chunk = z.clone().slice_dim(0, start..(start + self.batch).min(b));
            parts.push(decoder.decode(chunk).clamp(-1.0, 1.0));
        }
        // [B, 3, H, W]
        let pixels = Tensor::cat(parts, 0);
        ctx.metric("decode_s", t0.elapsed().as_secs_f64());
        Ok(Outputs::new().with(
            "images",
            Images {
                tensor: pixels,
                t: latents.t,
            },
        ))
    }
}
