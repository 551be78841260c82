//! Where one GRPO update's time goes: the shipped model at batch 64 under autodiff, timed as
//! forward, backward (three transitions, each back-propagated on its own as `grpo_update` does)
//! and the optimizer step (global-norm clipping, AdamW, EMA), on each device given.
//!
//! `cargo run --release --example update_breakdown -- flex` (add `--features tch` and
//! `libtorch`; the binary then needs torch's `lib/` on `LD_LIBRARY_PATH`). The PyTorch
//! reference's figures for the same work: `python bench/reference/update_breakdown.py`.
//! Results: BENCHMARKS.md, "Session 6".
use std::path::Path;
use std::time::Instant;

use burn::tensor::{Device, Distribution, Int, Tensor, TensorData};
use nodes::model::{Trainer, TrainerConfig, load_safetensors};

const BATCH: usize = 64;
const TRANSITIONS: usize = 3;
const ROUNDS: usize = 6;

fn median(mut t: Vec<f64>) -> f64 {
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

fn main() -> anyhow::Result<()> {
    for name in std::env::args().skip(1) {
        let plain = match name.as_str() {
            #[cfg(feature = "tch")]
            #[allow(deprecated)]
            // burn marks burn-tch deprecated; it is our libtorch path
            "libtorch" => Device::libtorch(),
            "flex" => Device::flex(),
            other => anyhow::bail!("unknown device `{other}` (flex or libtorch)"),
        };
        let dev = plain.clone().autodiff();
        let (config, model) =
            load_safetensors(Path::new("checkpoints/shapes-small.safetensors"), &dev)?;
        let mut trainer = Trainer::from_model(model, TrainerConfig::new().with_lr(1e-6));
        // Prompts of 6 real tokens and padding; the timesteps of the three transitions.
        let ids: Vec<i64> = (0..BATCH * config.max_tokens)
            .map(|i| {
                let j = i % config.max_tokens;
                if j < 6 {
                    (1 + (i * 7 + j) % (config.vocab_size - 1)) as i64
                } else {
                    0
                }
            })
            .collect();
        let tokens =
            Tensor::<2, Int>::from_data(TensorData::new(ids, [BATCH, config.max_tokens]), &dev);
        let (mut fwd, mut bwd, mut opt) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..=ROUNDS {
            let (mut f, mut b) = (0.0, 0.0);
            let mut grads = burn::optim::GradientsAccumulator::new();
            for k in 0..TRANSITIONS {
                let t = 1.0 - 0.25 * k as f32;
                // [B, 3, 32, 32]
                let x =
                    Tensor::<4>::random([BATCH, 3, 32, 32], Distribution::Normal(0.0, 1.0), &dev);
                let t0 = Instant::now();
                let v = trainer.model().forward(
                    x.clone(),
                    Tensor::<1>::full([BATCH], t, &dev),
                    tokens.clone(),
                );
                // A Gaussian log-prob-like scalar of the prediction, as the GRPO loss.
                let loss = (x - v).square().mean();
                let _ = loss.clone().into_scalar::<f32>();
                let t1 = Instant::now();
                let (g, _) = trainer.gradients(loss);
                grads.accumulate(trainer.model(), g);
                let t2 = Instant::now();
                f += (t1 - t0).as_secs_f64();
                b += (t2 - t1).as_secs_f64();
            }
            let t2 = Instant::now();
            trainer.apply_gradients(grads.grads(), 0.0);
            let o = t2.elapsed().as_secs_f64();
            // Round 0 is the warm-up.
            if round > 0 {
                fwd.push(f);
                bwd.push(b);
                opt.push(o);
            }
        }
        let (f, b, o) = (median(fwd), median(bwd), median(opt));
        println!(
            "{name}: forward {:.3} s, backward {:.3} s, optimizer {:.3} s, total {:.3} s \
             (batch {BATCH}, {TRANSITIONS} transitions, median of {ROUNDS})",
            f,
            b,
            o,
            f + b + o
        );
    }
    Ok(())
}
