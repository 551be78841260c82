//! `gaussian_noise`: the starting state x_{t_1} ~ N(0, I) of every sample.

use anyhow::Result;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use runner::{Inputs, Node, NodeCtx, NodeType, Outputs, PortDef, Registry};

use crate::device::open;
use crate::model::sample_standard_normal;
use crate::types::{Images, PromptBatch};
use crate::world::IMAGE_LEN;

pub fn register(r: &mut Registry) {
    r.add_node(NodeType {
        name: "gaussian_noise",
        summary: "draw x_1 ~ N(0, I), one image-shaped noise per sample",
        doc: "Seeded by (pipeline seed, node id, iteration): identical across backends and runs.",
        inputs: vec![PortDef::new(
            "prompts",
            "prompts",
            "the batch (sets the number of samples)",
        )],
        outputs: vec![PortDef::new(
            "x",
            "images",
            "pure noise at t = 1, [B, 3, 32, 32]",
        )],
        params: vec![],
        resources: vec![],
        factory: |ctx| {
            Ok(Box::new(GaussianNoise {
                device: open(ctx.device).map_err(anyhow::Error::msg)?,
            }))
        },
    });
}

struct GaussianNoise {
    device: burn::tensor::Device,
}

impl Node for GaussianNoise {
    fn run(&mut self, ctx: &NodeCtx, inputs: &Inputs) -> Result<Outputs> {
        let b = inputs.get::<PromptBatch>("prompts")?.len();
        let mut rng = ChaCha8Rng::seed_from_u64(ctx.seed_for("noise"));
        let v = sample_standard_normal(&mut rng, b * IMAGE_LEN);
        Ok(Outputs::new().with("x", Images::from_vec(v, b, 1.0, &self.device)))
    }
}
