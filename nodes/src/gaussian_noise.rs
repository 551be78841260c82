//! `gaussian_noise`: the starting state x_{t_1} ~ N(0, I) of every sample.

use anyhow::Result;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use runner::{Inputs, Node, NodeCtx, NodeType, Outputs, ParamDef, PortDef, Registry};

use crate::device::open;
use crate::model::{sample_standard_normal, tensor_from_vec};
use crate::types::{Images, PromptBatch};
use crate::world::{CHANNELS, IMAGE_SIZE};

pub fn register(r: &mut Registry) {
    r.add_node(NodeType {
        name: "gaussian_noise",
        summary: "draw x_1 ~ N(0, I), one image-shaped noise per sample",
        doc: "Seeded by (pipeline seed, node id, iteration): identical across backends and runs.\n\
              The default shape is ShapeWorld's images, [B, 3, 32, 32]; a latent model's states\n\
              are latents (SD3's VAE: `channels: 16`, `height`/`width` = image size / 8).\n\
              `per: group` draws one noise per prompt group, shared by its G members\n\
              (TempFlow-GRPO's seed group: with deterministic steps before a single stochastic\n\
              one, the group's images differ only by that step's noise). Draws are made for the\n\
              global batch, so each sample's noise does not depend on how ranks split it.",
        inputs: vec![PortDef::new(
            "prompts",
            "prompts",
            "the batch (sets the number of samples)",
        )],
        outputs: vec![PortDef::new(
            "x",
            "images",
            "pure noise at t = 1, [B, channels, height, width]",
        )],
        params: vec![
            ParamDef::int(
                "channels",
                CHANNELS as i64,
                1,
                4096,
                "channels of each sample",
            ),
            ParamDef::int(
                "height",
                IMAGE_SIZE as i64,
                1,
                16_384,
                "height of each sample",
            ),
            ParamDef::int(
                "width",
                IMAGE_SIZE as i64,
                1,
                16_384,
                "width of each sample",
            ),
            ParamDef::choice(
                "per",
                "sample",
                &["sample", "group"],
                "one noise per sample, or one per prompt group shared by its members (seed group)",
            ),
        ],
        resources: vec![],
        factory: |ctx| {
            let p = ctx.params;
            Ok(Box::new(GaussianNoise {
                device: open(ctx.device).map_err(anyhow::Error::msg)?,
                shape: [p.usize("channels")?, p.usize("height")?, p.usize("width")?],
                per_group: p.str("per")? == "group",
            }))
        },
    });
}

struct GaussianNoise {
    device: burn::tensor::Device,
    /// [C, H, W]
    shape: [usize; 3],
    /// One noise per prompt group (TempFlow-GRPO's seed group).
    per_group: bool,
}

impl Node for GaussianNoise {
    fn run(&mut self, ctx: &NodeCtx, inputs: &Inputs) -> Result<Outputs> {
        let prompts = inputs.get::<PromptBatch>("prompts")?;
        let b = prompts.len();
        let mut rng = ChaCha8Rng::seed_from_u64(ctx.seed_for("noise"));
        let [c, h, w] = self.shape;
        let per = c * h * w;
        let v = if self.per_group {
            // This rank's groups of the global batch's group noises, one row per member.
            let groups = prompts.groups();
            let g = crate::dist::shard_rows(ctx.rank(), ctx.world(), groups, per, |n| {
                sample_standard_normal(&mut rng, n)
            });
            let mut v = Vec::with_capacity(b * per);
            for &gi in &prompts.group {
                v.extend_from_slice(&g[gi * per..(gi + 1) * per]);
            }
            v
        } else {
            // This rank's rows of the global batch's noise (all of it in a single process).
            crate::dist::shard_rows(ctx.rank(), ctx.world(), b, per, |n| {
                sample_standard_normal(&mut rng, n)
            })
        };
        let x = Images {
            tensor: tensor_from_vec(v, [b, c, h, w], &self.device),
            t: 1.0,
        };
        Ok(Outputs::new().with("x", x))
    }
}
