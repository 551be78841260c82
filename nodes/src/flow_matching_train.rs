//! `flow_matching_train`: pretraining of the flow model on freshly rendered ShapeWorld images.

use std::time::Instant;

use anyhow::Result;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use runner::{Inputs, Node, NodeCtx, NodeType, Outputs, ParamDef, Registry, ResourceSlot};

use crate::flow_model::{FlowModelRes, TYPE};
use crate::model::{
    int_tensor_from_vec, sample_logit_normal, sample_standard_normal, tensor_from_vec,
};
use crate::world::{self, IMAGE_LEN};

pub fn register(r: &mut Registry) {
    r.add_node(NodeType {
        name: "flow_matching_train",
        summary: "rectified-flow pretraining steps on rendered ShapeWorld images",
        doc: "Each run renders `batch` training examples (training distribution only: held-out\n\
              colour–shape pairs never appear), draws t from a logit-normal(mean, std) and noise\n\
              ε, and takes `steps` AdamW steps on mean((v_θ(x_t, t, c) − (ε − x0))²) with CFG\n\
              dropout. All randomness is seeded by (pipeline seed, node, iteration), so a resumed\n\
              run continues exactly. Logs loss, grad_norm, lr and images_per_s.",
        inputs: vec![],
        outputs: vec![],
        params: vec![
            ParamDef::int("batch", 64, 1, 65_536, "images per optimizer step"),
            ParamDef::int("steps", 1, 1, 10_000, "optimizer steps per iteration"),
            ParamDef::float("t_mean", 0.0, -10.0, 10.0, "logit-normal mean of t"),
            ParamDef::float("t_std", 1.0, 0.01, 10.0, "logit-normal std of t"),
        ],
        resources: vec![ResourceSlot {
            name: "model",
            ty: TYPE,
            write: true,
            doc: "the model to train",
        }],
        factory: |ctx| {
            let p = ctx.params;
            let batch = p.usize("batch")?;
            if !batch.is_multiple_of(ctx.world) {
                anyhow::bail!(
                    "`batch: {batch}` does not split evenly over the run's {} processes: make \
                     it a multiple of WORLD_SIZE",
                    ctx.world
                );
            }
            Ok(Box::new(FlowMatchingTrain {
                batch,
                steps: p.usize("steps")?,
                t_mean: p.f64("t_mean")?,
                t_std: p.f64("t_std")?,
            }))
        },
    });
}

struct FlowMatchingTrain {
    batch: usize,
    steps: usize,
    t_mean: f64,
    t_std: f64,
}

impl Node for FlowMatchingTrain {
    fn run(&mut self, ctx: &NodeCtx, _: &Inputs) -> Result<Outputs> {
        let mut rng = ChaCha8Rng::seed_from_u64(ctx.seed_for("batch"));
        let start = Instant::now();
        let (mut loss, mut gnorm, mut lr) = (0.0, 0.0, 0.0);
        // A data-parallel rank draws the whole global batch (the same stream as one process)
        // and trains on its rows of it.
        let (rank, ranks) = (ctx.rank(), ctx.world());
        for _ in 0..self.steps {
            let b = self.batch / ranks;
            let rows = |v: Vec<_>, per: usize| crate::dist::shard_rows(rank, ranks, b, per, |_| v);
            let mut images = Vec::with_capacity(self.batch * IMAGE_LEN);
            let mut tokens = Vec::with_capacity(self.batch * world::MAX_TOKENS);
            for _ in 0..self.batch {
                let ex = world::sample_training_example(&mut rng)?;
                images.extend_from_slice(&ex.image);
                tokens.extend(ex.tokens.iter().map(|&t| t as i64));
            }
            let noise = sample_standard_normal(&mut rng, self.batch * IMAGE_LEN);
            let t = sample_logit_normal(&mut rng, self.batch, self.t_mean, self.t_std);
            let (images, noise) = (rows(images, IMAGE_LEN), rows(noise, IMAGE_LEN));
            let t: Vec<f32> = crate::dist::shard_rows(rank, ranks, b, 1, |_| t);
            let tokens: Vec<i64> =
                crate::dist::shard_rows(rank, ranks, b, world::MAX_TOKENS, |_| tokens);
            let stats = ctx.write("model", |m: &mut FlowModelRes| {
                let trainer = &mut m.unet_mut("flow_matching_train")?.trainer;
                let dev = trainer.device().clone();
                let x0 = tensor_from_vec(images, [b, 3, 32, 32], &dev);
                let eps = tensor_from_vec(noise, [b, 3, 32, 32], &dev);
                let tt = tensor_from_vec(t, [b], &dev);
                let tok = int_tensor_from_vec(tokens, [b, world::MAX_TOKENS], &dev);
                trainer.flow_matching_step_sharded(
                    x0,
                    eps,
                    tt,
                    crate::model::Conditioning::Tokens(tok),
                    ctx.collective(),
                )
            })?;
            if !stats.loss.is_finite() {
                anyhow::bail!(
                    "the training loss is {} (diverged); lower the learning rate",
                    stats.loss
                );
            }
            loss += stats.loss as f64;
            gnorm += stats.grad_norm as f64;
            lr = stats.lr;
        }
        let n = self.steps as f64;
        // The loss and gradient norm are the global batch's (reduced in the step).
        ctx.metric_global("loss", loss / n);
        ctx.metric_global("grad_norm", gnorm / n);
        ctx.metric_global("lr", lr);
        // Every rank trains its share in the same time: the run's rate.
        ctx.metric_global(
            "images_per_s",
            (self.batch * self.steps) as f64 / start.elapsed().as_secs_f64(),
        );
        Ok(Outputs::new())
    }
}
