//! `image_reward`: classic hand-written rewards on pixels (demos, tests, sanity checks).

use anyhow::{Result, anyhow};
use runner::{Inputs, Node, NodeCtx, NodeType, Outputs, ParamDef, PortDef, Registry};

use crate::shape_eval::log_metrics;
use crate::types::{Images, Rewards};

pub fn register(r: &mut Registry) {
    r.add_node(NodeType {
        name: "image_reward",
        summary: "classic pixel rewards: brightness or saturation towards a target",
        doc: "kind `brightness`: 1 − |mean intensity − target| (intensity in [0, 1]);\n\
              kind `saturation`: 1 − |mean (max − min channel) − target|.\n\
              Easy to optimise: used to check that an RL pipeline learns at all.",
        inputs: vec![PortDef::new(
            "images",
            "images",
            "images to score, in [-1, 1]",
        )],
        outputs: vec![PortDef::new("rewards", "rewards", "one reward per sample")],
        params: vec![
            ParamDef::choice(
                "kind",
                "brightness",
                &["brightness", "saturation"],
                "what to measure",
            ),
            ParamDef::float("target", 1.0, 0.0, 1.0, "the value that earns reward 1"),
        ],
        resources: vec![],
        factory: |ctx| {
            Ok(Box::new(ImageReward {
                saturation: ctx.params.str("kind")? == "saturation",
                target: ctx.params.f32("target")?,
                step: ctx.step.map_or(0, |s| s.0),
            }))
        },
    });
}

struct ImageReward {
    saturation: bool,
    target: f32,
    step: usize,
}

/// Reward of one CHW image in [-1, 1].
pub fn pixel_reward(img: &[f32], saturation: bool, target: f32) -> f32 {
    let hw = img.len() / 3;
    let p = |c: usize, i: usize| ((img[c * hw + i] + 1.0) * 0.5).clamp(0.0, 1.0);
    let value = if saturation {
        (0..hw)
            .map(|i| {
                let (r, g, b) = (p(0, i), p(1, i), p(2, i));
                r.max(g).max(b) - r.min(g).min(b)
            })
            .sum::<f32>()
            / hw as f32
    } else {
        (0..3 * hw).map(|i| p(i / hw, i % hw)).sum::<f32>() / (3 * hw) as f32
    };
    1.0 - (value - target).abs()
}

impl Node for ImageReward {
    fn run(&mut self, ctx: &NodeCtx, inputs: &Inputs) -> Result<Outputs> {
        let (imgs, h, w) = inputs
            .get::<Images>("images")?
            .rgb("images")
            .map_err(|e| anyhow!("image_reward `{}`: {e}", ctx.id))?;
        let values: Vec<f32> = imgs
            .chunks(3 * h * w)
            .map(|im| pixel_reward(im, self.saturation, self.target))
            .collect();
        let r = Rewards {
            values,
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
    fn should_reward_brightness_and_saturation_towards_the_target() {
        let white = vec![1.0; IMAGE_LEN];
        let grey = vec![0.0; IMAGE_LEN];
        assert!((pixel_reward(&white, false, 1.0) - 1.0).abs() < 1e-6);
        assert!((pixel_reward(&grey, false, 1.0) - 0.5).abs() < 1e-6);
        let mut red = vec![-1.0; IMAGE_LEN];
        red[..IMAGE_LEN / 3].iter_mut().for_each(|v| *v = 1.0);
        assert!((pixel_reward(&red, true, 1.0) - 1.0).abs() < 1e-6);
        assert!((pixel_reward(&grey, true, 1.0) - 0.0).abs() < 1e-6);
    }
}
