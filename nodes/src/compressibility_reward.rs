//! `compressibility_reward`: DDPO's JPEG (in)compressibility rewards (Black et al., 2023).

use anyhow::{Result, anyhow};
use runner::{Inputs, Node, NodeCtx, NodeType, Outputs, ParamDef, PortDef, Registry};

use crate::shape_eval::log_metrics;
use crate::types::{Images, Rewards};
use crate::world::{IMAGE_SIZE, chw_to_rgb8};

pub fn register(r: &mut Registry) {
    r.add_node(NodeType {
        name: "compressibility_reward",
        summary: "DDPO's JPEG compressibility / incompressibility reward",
        doc: "Encodes each image as an 8-bit RGB baseline JPEG at `quality` (4:2:0 chroma\n\
              subsampling, as PIL's default) and rewards its size in kB (1 kB = 1000 bytes):\n\
                compressibility     reward = −size (smaller files: flatter, simpler images)\n\
                incompressibility   reward = +size (busier, more detailed images)\n\
              Deterministic (a pure function of the 8-bit pixels) and always finite. Logs\n\
              reward_mean and jpeg_kb_mean. Images of any size (e.g. decoded by `vae_decode`);\n\
              on ShapeWorld's 32×32 images sizes are about 1–2.5 kB, much of it the JPEG header,\n\
              so combine it with small weights in `weighted_reward`.",
        inputs: vec![PortDef::new(
            "images",
            "images",
            "images to score, [B, 3, H, W] in [-1, 1]",
        )],
        outputs: vec![PortDef::new("rewards", "rewards", "one reward per sample")],
        params: vec![
            ParamDef::choice(
                "kind",
                "compressibility",
                &["compressibility", "incompressibility"],
                "reward −size (compressibility) or +size (incompressibility)",
            ),
            ParamDef::int("quality", 95, 1, 100, "JPEG quality (DDPO uses 95)"),
        ],
        resources: vec![],
        factory: |ctx| {
            Ok(Box::new(Compressibility {
                sign: if ctx.params.str("kind")? == "incompressibility" {
                    1.0
                } else {
                    -1.0
                },
                quality: ctx.params.usize("quality")? as u8,
                step: ctx.step.map_or(0, |s| s.0),
            }))
        },
    });
}

struct Compressibility {
    sign: f32,
    quality: u8,
    step: usize,
}

/// Size in bytes of one CHW [3, 32, 32] image in [-1, 1] as a JPEG at `quality`.
pub fn jpeg_size(img: &[f32], quality: u8) -> Result<usize> {
    jpeg_size_hw(img, IMAGE_SIZE, IMAGE_SIZE, quality)
}

/// [`jpeg_size`] of a CHW [3, height, width] image.
pub fn jpeg_size_hw(img: &[f32], height: usize, width: usize, quality: u8) -> Result<usize> {
    let rgb = chw_to_rgb8(img, height, width)?;
    let side = |n: usize| {
        u16::try_from(n).map_err(|_| anyhow!("jpeg: a {height}×{width} image is too large"))
    };
    let (h, w) = (side(height)?, side(width)?);
    let mut out = Vec::new();
    let mut enc = jpeg_encoder::Encoder::new(&mut out, quality);
    enc.set_sampling_factor(jpeg_encoder::SamplingFactor::R_4_2_0);
    enc.encode(&rgb, w, h, jpeg_encoder::ColorType::Rgb)
        .map_err(|e| anyhow!("jpeg: {e}"))?;
    Ok(out.len())
}

impl Node for Compressibility {
    fn run(&mut self, ctx: &NodeCtx, inputs: &Inputs) -> Result<Outputs> {
        let (imgs, h, w) = inputs
            .get::<Images>("images")?
            .rgb("images")
            .map_err(|e| anyhow!("compressibility_reward `{}`: {e}", ctx.id))?;
        let mut kb = Vec::with_capacity(imgs.len() / (3 * h * w).max(1));
        for im in imgs.chunks(3 * h * w) {
            kb.push(jpeg_size_hw(im, h, w, self.quality)? as f32 / 1000.0);
        }
        ctx.metric(
            "jpeg_kb_mean",
            kb.iter().map(|v| *v as f64).sum::<f64>() / kb.len().max(1) as f64,
        );
        let r = Rewards {
            values: kb.iter().map(|s| self.sign * s).collect(),
            step: self.step,
            ..Rewards::default()
        };
        log_metrics(ctx, &r);
        Ok(Outputs::new().with("rewards", r))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::world::IMAGE_LEN;

    #[test]
    fn should_find_flat_images_smaller_than_noisy_ones_deterministically() {
        let flat = vec![0.2; IMAGE_LEN];
        let mut state = 12345u64;
        let noisy: Vec<f32> = (0..IMAGE_LEN)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
            })
            .collect();
        let a = jpeg_size(&flat, 95).unwrap();
        let b = jpeg_size(&noisy, 95).unwrap();
        assert!(a < b, "flat {a} B, noisy {b} B");
        assert_eq!(b, jpeg_size(&noisy, 95).unwrap());
        // Lower quality, smaller file.
        assert!(jpeg_size(&noisy, 30).unwrap() < b);
    }

    #[test]
    fn should_encode_images_of_any_size() {
        // A 64×48 image (3·64·48 values) is not three 32×32 ones.
        let n = 3 * 64 * 48;
        let flat = vec![0.2; n];
        let ramp: Vec<f32> = (0..n).map(|i| ((i * 7) % 97) as f32 / 48.5 - 1.0).collect();
        let a = jpeg_size_hw(&flat, 64, 48, 95).unwrap();
        let b = jpeg_size_hw(&ramp, 64, 48, 95).unwrap();
        assert!(a < b, "flat {a} B, busy {b} B");
        assert!(jpeg_size_hw(&flat, 64, 64, 95).is_err());
    }
}
