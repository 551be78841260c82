//! `nft_update`: DiffusionNFT's negative-aware flow-matching update (Zheng et al. 2025), no
//! likelihoods.
//!
//! The policy's own clean samples x0 (any sampler) are re-noised, x_t = (1 − t)·x0 + t·ε with
//! t ~ U(t_min, t_max) per sample, and the model is trained by flow matching towards an
//! implicit positive policy and away through an implicit negative one, both built from the
//! trained velocity v_θ and the sampling ("old") policy's v_old (the `flow_model`'s EMA):
//!
//!   v₊ = β·v_θ + (1 − β)·v_old,   v₋ = (1 + β)·v_old − β·v_θ,
//!   x̂0± = x_t − t·v±,   L± = mean_d (x̂0± − x0)² / w±,   w± = sg(mean_d |x̂0± − x0|) ∨ 1e-5,
//!   loss = c · mean_samples[(r·L₊ + (1 − r)·L₋) / β],   r = clip(A, ±c)/(2c) + ½ ∈ [0, 1],
//!
//! with A the sample's group-relative advantage and c = `adv_clip` (the public code's
//! `adv_clip_max`). The x̂0-space losses equal the velocity losses ‖v± − (ε − x0)‖² scaled by t²;
//! w± is the public code's adaptive weighting (`adaptive_weight: false` uses w = 1). With
//! `kl_beta` = κ > 0 the loss gains the public code's optional reference term
//! κ·mean_samples mean_d (v_θ − v_ref)², v_ref the policy's frozen reference (`reference: true`)
//! at the same x_t.

use anyhow::{Result, bail};
use burn::optim::GradientsAccumulator;
use burn::tensor::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use runner::{Inputs, Node, NodeCtx, NodeType, Outputs, ParamDef, PortDef, Registry, ResourceSlot};

use crate::flow_model::{FlowModelRes, PolicyModel, TYPE};
use crate::model::{VelocityModel, sample_standard_normal, tensor_from_vec};
use crate::types::{Advantages, Images, PromptBatch, to_vec};

pub fn register(r: &mut Registry) {
    r.add_node(NodeType {
        name: "nft_update",
        summary: "DiffusionNFT: negative-aware flow matching on the policy's own samples (no likelihoods)",
        doc: "Re-noises each clean sample x0 at t ~ U(t_min, t_max), x_t = (1 − t)·x0 + t·ε, and\n\
              takes `steps` AdamW steps on DiffusionNFT's loss\n\
                c·mean[(r·L₊ + (1 − r)·L₋)/β],  L± = mean_d (x_t − t·v± − x0)²/w±,\n\
                v₊ = β·v_θ + (1 − β)·v_old,  v₋ = (1 + β)·v_old − β·v_θ,\n\
              where v_old is the old (sampling) policy, the `policy` resource's EMA (its\n\
              `ema_decay`; sample with `sample_with: ema`), r = clip(A, ±c)/(2c) + ½ the\n\
              sample's advantage mapped to [0, 1] (c = `adv_clip`) and w± the adaptive weight\n\
              sg(mean_d |x̂0± − x0|) (1 with `adaptive_weight: false`). The advantage of a\n\
              sample is the last row of `advantages` (step_advantage's `final` mode: one per\n\
              sample). No log-probs and no trajectories: any sampler (ODE steps included) can\n\
              produce `images`; CFG-free. Noise and t are seeded by (seed, node, iteration).\n\
              With `kl_beta` κ > 0 the loss adds κ·mean (v_θ − v_ref)², v_ref the policy's\n\
              frozen reference (`reference: true`) at the same x_t. Logs loss, positive_loss,\n\
              negative_loss, r_mean, old_deviation (mean (v_θ − v_old)²), kl (with kl_beta),\n\
              grad_norm, lr. A non-finite loss stops the run before the update.",
        inputs: vec![
            PortDef::new("images", "images", "the clean samples x0 (t = 0) the policy generated"),
            PortDef::new("prompts", "prompts", "the batch's prompts"),
            PortDef::new("advantages", "advantages", "group-relative advantages (the last row is used)"),
        ],
        outputs: vec![],
        params: vec![
            ParamDef::float("beta", 1.0, 1e-6, 1.0, "β: how far the implicit policies move from v_old"),
            ParamDef::float("adv_clip", 5.0, 1e-6, 1e6, "c: advantages are clipped to ±c and mapped to r = A/(2c) + ½"),
            ParamDef::float("t_min", 0.0, 0.0, 1.0, "lowest re-noising time"),
            ParamDef::float("t_max", 1.0, 0.0, 1.0, "highest re-noising time"),
            ParamDef::float("kl_beta", 0.0, 0.0, 1e6, "κ: weight of the reference term mean (v_θ − v_ref)² (0 = none; needs `reference: true` on the policy)"),
            ParamDef::boolean("adaptive_weight", true, "divide each sample's x̂0 loss by sg(mean |x̂0 − x0|), as the public code does"),
            ParamDef::int("steps", 1, 1, 10_000, "optimizer steps per iteration (fresh t and ε each)"),
            ParamDef::int("minibatch", 0, 0, 1 << 20, "samples per backward (0 = whole batch); one optimizer step per `steps`"),
        ],
        resources: vec![ResourceSlot { name: "policy", ty: TYPE, write: true, doc: "the model to update; its EMA is the old policy" }],
        factory: |ctx| {
            crate::dist::single_process_only("nft_update", ctx.world)?;
            let p = ctx.params;
            let (t_min, t_max) = (p.f32("t_min")?, p.f32("t_max")?);
            if t_min > t_max {
                bail!("`t_min` = {t_min} is above `t_max` = {t_max}");
            }
            Ok(Box::new(NftUpdate {
                beta: p.f32("beta")?,
                adv_clip: p.f32("adv_clip")?,
                t_min,
                t_max,
                adaptive: p.bool("adaptive_weight")?,
                kl_beta: p.f32("kl_beta")?,
                steps: p.usize("steps")?,
                minibatch: p.usize("minibatch")?,
            }))
        },
    });
}

pub struct NftUpdate {
    pub beta: f32,
    pub adv_clip: f32,
    pub t_min: f32,
    pub t_max: f32,
    pub adaptive: bool,
    /// κ: weight of the reference term (0 = none).
    pub kl_beta: f32,
    pub steps: usize,
    pub minibatch: usize,
}

/// One update's statistics (means over its optimizer steps).
#[derive(Debug, Default, Clone)]
pub struct NftStats {
    pub loss: f64,
    pub positive_loss: f64,
    pub negative_loss: f64,
    pub r_mean: f64,
    pub old_deviation: f64,
    /// mean (v_θ − v_ref)², with `kl_beta` > 0 (else 0).
    pub kl: f64,
    pub grad_norm: f64,
    pub lr: f64,
}

/// The re-noising draws of one optimizer step: t per sample and ε ([B·C·H·W]).
pub struct Draw {
    pub t: Vec<f32>,
    pub eps: Vec<f32>,
}

impl NftUpdate {
    /// r ∈ [0, 1] of each advantage: clip(A, ±c)/(2c) + ½.
    pub fn reward_prob(&self, adv: &[f32]) -> Vec<f32> {
        let c = self.adv_clip;
        adv.iter()
            .map(|a| (a.clamp(-c, c) / c / 2.0 + 0.5).clamp(0.0, 1.0))
            .collect()
    }

    /// The draws of optimizer step `k` under `seed`, for `b` samples of `dim` values.
    pub fn draw(&self, seed: u64, k: usize, b: usize, dim: usize) -> Draw {
        let mut rng =
            ChaCha8Rng::seed_from_u64(seed ^ (k as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let t = (0..b)
            .map(|_| self.t_min + (self.t_max - self.t_min) * rng.random::<f32>())
            .collect();
        Draw {
            t,
            eps: sample_standard_normal(&mut rng, b * dim),
        }
    }

    /// Run the update on `m`: `x0` the clean samples, `r` from [`reward_prob`](Self::reward_prob).
    pub fn update(
        &self,
        m: &mut FlowModelRes,
        x0: &Images,
        prompts: &PromptBatch,
        r: &[f32],
        seed: u64,
    ) -> Result<NftStats> {
        let plain = m.device.clone();
        crate::with_policy!(&mut m.policy, p => self.update_policy(p, &plain, x0, prompts, r, seed))
    }

    fn update_policy<M: VelocityModel>(
        &self,
        m: &mut PolicyModel<M>,
        plain: &Device,
        x0: &Images,
        prompts: &PromptBatch,
        r: &[f32],
        seed: u64,
    ) -> Result<NftStats> {
        let [b, c, h, w] = x0.tensor.dims();
        let dim = c * h * w;
        let mb = if self.minibatch == 0 {
            b
        } else {
            self.minibatch.min(b)
        };
        // The frozen copy, or a LoRA policy's base (its adapters off: the trainer's own tensors).
        let reference = m.kl_reference("kl_beta", self.kl_beta)?;
        let x0_host = x0.to_vec()?;
        let mut st = NftStats::default();
        for k in 0..self.steps {
            let d = self.draw(seed, k, b, dim);
            let ad = m.trainer.device().clone();
            let old = m.trainer.ema();
            let mut grads = GradientsAccumulator::<M>::new();
            let (mut lv, mut pos, mut neg, mut dev, mut kl) = (0f64, 0f64, 0f64, 0f64, 0f64);
            let order: Vec<usize> = (0..b).collect();
            for idx in order.chunks(mb) {
                let n = idx.len();
                let rows = |v: &[f32], per: usize| -> Vec<f32> {
                    idx.iter()
                        .flat_map(|&i| v[i * per..(i + 1) * per].iter().copied())
                        .collect()
                };
                let x0_p = tensor_from_vec(rows(&x0_host, dim), [n, c, h, w], plain);
                let eps_p = tensor_from_vec(rows(&d.eps, dim), [n, c, h, w], plain);
                let t_v = rows(&d.t, 1);
                let t_p = tensor_from_vec(t_v.clone(), [n], plain);
                let x_t = noised(&x0_p, &eps_p, &t_p);
                // The old policy: a constant of the loss, evaluated on the plain device.
                let cond_p = prompts.conditioning_rows(idx, plain);
                let v_old = old
                    .velocity(x_t.clone(), t_p.clone(), &cond_p)?
                    .to_device(&ad);
                let v_ref = match &reference {
                    Some(r) => Some(
                        r.velocity(x_t.clone(), t_p.clone(), &cond_p)?
                            .to_device(&ad),
                    ),
                    None => None,
                };
                let cond = prompts.conditioning_rows(idx, &ad);
                let (x_t, x0_a) = (x_t.to_device(&ad), x0_p.to_device(&ad));
                let t_a = tensor_from_vec(t_v, [n], &ad);
                let v = m
                    .trainer
                    .model()
                    .velocity(x_t.clone(), t_a.clone(), &cond)?;
                let r_a = tensor_from_vec(idx.iter().map(|&i| r[i]).collect(), [n], &ad);
                let terms = self.loss_terms(v, v_old, v_ref, x_t, x0_a, t_a, r_a);
                let share = n as f32 / b as f32;
                let loss = terms.loss.clone().mul_scalar(share);
                let host = to_vec(&Tensor::cat(
                    vec![
                        terms.loss.clone().detach(),
                        terms.positive.detach(),
                        terms.negative.detach(),
                        terms.old_deviation.detach(),
                        terms
                            .kl
                            .clone()
                            .unwrap_or_else(|| Tensor::zeros([1], &ad))
                            .detach(),
                    ],
                    0,
                ))?;
                if !host[0].is_finite() {
                    bail!(
                        "the DiffusionNFT loss is {}; the update is not applied (lower the learning rate or check the rewards)",
                        host[0]
                    );
                }
                let s = share as f64;
                lv += host[0] as f64 * s;
                pos += host[1] as f64 * s;
                neg += host[2] as f64 * s;
                dev += host[3] as f64 * s;
                kl += host[4] as f64 * s;
                grads.accumulate(m.trainer.model(), m.trainer.backward(loss));
            }
            let stats = m.trainer.apply_gradients(grads.grads(), lv as f32);
            st.loss += lv;
            st.positive_loss += pos;
            st.negative_loss += neg;
            st.old_deviation += dev;
            st.kl += kl;
            st.grad_norm += stats.grad_norm as f64;
            st.lr = stats.lr;
        }
        let s = self.steps as f64;
        for v in [
            &mut st.loss,
            &mut st.positive_loss,
            &mut st.negative_loss,
            &mut st.old_deviation,
            &mut st.kl,
            &mut st.grad_norm,
        ] {
            *v /= s;
        }
        st.r_mean = r.iter().map(|&v| v as f64).sum::<f64>() / r.len().max(1) as f64;
        Ok(st)
    }

    /// DiffusionNFT's loss of one minibatch (module docs) from the trained velocity `v`, the old
    /// policy's `v_old` and the reference's `v_ref` (constants; `None` without `kl_beta`), the
    /// state x_t, the clean samples, t [n] and r [n].
    #[allow(clippy::too_many_arguments)]
    pub fn loss_terms(
        &self,
        v: Tensor<4>,
        v_old: Tensor<4>,
        v_ref: Option<Tensor<4>>,
        x_t: Tensor<4>,
        x0: Tensor<4>,
        t: Tensor<1>,
        r: Tensor<1>,
    ) -> LossTerms {
        let [n, c, h, w] = v.dims();
        let beta = self.beta;
        let v_old = v_old.detach();
        let pos_v = v.clone().mul_scalar(beta) + v_old.clone().mul_scalar(1.0 - beta);
        let neg_v = v_old.clone().mul_scalar(1.0 + beta) - v.clone().mul_scalar(beta);
        let t4 = t.reshape([n, 1, 1, 1]);
        let per_sample = |pred_v: Tensor<4>| -> Tensor<1> {
            let err = x_t.clone() - pred_v * t4.clone() - x0.clone(); // x̂0 − x0
            let sq = err
                .clone()
                .square()
                .reshape([n, c * h * w])
                .mean_dim(1)
                .reshape([n]);
            if self.adaptive {
                let wgt = err
                    .abs()
                    .reshape([n, c * h * w])
                    .mean_dim(1)
                    .reshape([n])
                    .clamp_min(1e-5)
                    .detach();
                sq / wgt
            } else {
                sq
            }
        };
        let lp = per_sample(pos_v);
        let ln = per_sample(neg_v);
        let one_minus_r = r.clone().neg().add_scalar(1.0);
        let loss = (r * lp.clone() + one_minus_r * ln.clone())
            .mean()
            .mul_scalar(self.adv_clip / beta);
        // Every sample has the same c·h·w values: the mean over all is the mean over samples.
        let kl = v_ref.map(|v_ref| (v.clone() - v_ref.detach()).square().mean());
        let loss = match &kl {
            Some(kl) => loss + kl.clone().mul_scalar(self.kl_beta),
            None => loss,
        };
        let old_deviation = (v - v_old).square().mean();
        LossTerms {
            loss,
            positive: lp.mean(),
            negative: ln.mean(),
            old_deviation,
            kl,
        }
    }
}

/// [`NftUpdate::loss_terms`]: the loss [1] and its parts (means over samples, [1] each).
pub struct LossTerms {
    pub loss: Tensor<1>,
    pub positive: Tensor<1>,
    pub negative: Tensor<1>,
    pub old_deviation: Tensor<1>,
    /// mean (v_θ − v_ref)² [1], with a reference.
    pub kl: Option<Tensor<1>>,
}

/// x_t = (1 − t)·x0 + t·ε, t [n] per sample.
pub fn noised(x0: &Tensor<4>, eps: &Tensor<4>, t: &Tensor<1>) -> Tensor<4> {
    let n = t.dims()[0];
    let t4 = t.clone().reshape([n, 1, 1, 1]);
    x0.clone() * t4.clone().neg().add_scalar(1.0) + eps.clone() * t4
}

impl Node for NftUpdate {
    fn run(&mut self, ctx: &NodeCtx, inputs: &Inputs) -> Result<Outputs> {
        let images = inputs.get::<Images>("images")?;
        images.expect_t("images", 0.0)?;
        let prompts = inputs.get::<PromptBatch>("prompts")?;
        let adv = inputs.get::<Advantages>("advantages")?;
        let b = prompts.len();
        if images.batch() != b {
            bail!(
                "`images` has {} samples but `prompts` has {b}",
                images.batch()
            );
        }
        let Some(last) = adv.values.last() else {
            bail!("`advantages` is empty: no advantage per sample");
        };
        if last.len() != b {
            bail!(
                "`advantages` has {} samples per row but `prompts` has {b}",
                last.len()
            );
        }
        let r = self.reward_prob(last);
        let seed = ctx.seed_for("renoise");
        let st = ctx.write("policy", |m: &mut FlowModelRes| {
            self.update(m, images, prompts, &r, seed)
        })?;
        for (k, v) in [
            ("loss", st.loss),
            ("positive_loss", st.positive_loss),
            ("negative_loss", st.negative_loss),
            ("r_mean", st.r_mean),
            ("old_deviation", st.old_deviation),
            ("grad_norm", st.grad_norm),
            ("lr", st.lr),
        ] {
            ctx.metric(k, v);
        }
        if self.kl_beta > 0.0 {
            ctx.metric("kl", st.kl);
        }
        Ok(Outputs::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{FlowModelConfig, TrainerConfig, int_tensor_from_vec};
    use crate::prompt_loader::make_batch;
    use crate::world::{self, IMAGE_LEN};
    use std::sync::Arc;

    /// A tiny model moved away from its zero-velocity init by a few flow-matching steps (its
    /// EMA, the old policy, lags behind: v_θ ≠ v_old; its reference stays at the init).
    fn trained_tiny() -> FlowModelRes {
        let dev = Device::flex();
        let cfg = FlowModelConfig::tiny(world::vocab_size(), world::MAX_TOKENS).with_seed(3);
        let mut res = FlowModelRes::new(
            cfg.init(&dev),
            TrainerConfig::new().with_lr(1e-2),
            true,
            true,
        );
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for _ in 0..3 {
            let mk = |rng: &mut ChaCha8Rng| {
                tensor_from_vec(
                    sample_standard_normal(rng, 4 * IMAGE_LEN),
                    [4, 3, 32, 32],
                    &dev,
                )
            };
            let (x0, n) = (mk(&mut rng), mk(&mut rng));
            let t = tensor_from_vec(vec![0.3, 0.5, 0.7, 0.9], [4], &dev);
            let tok =
                int_tensor_from_vec(vec![1; 4 * world::MAX_TOKENS], [4, world::MAX_TOKENS], &dev);
            let trainer = &mut res.unet_mut("test").unwrap().trainer;
            let ad = trainer.device().clone();
            trainer.step(
                x0.to_device(&ad),
                n.to_device(&ad),
                t.to_device(&ad),
                tok.to_device(&ad),
            );
        }
        res
    }

    fn batch() -> PromptBatch {
        let recs: Vec<_> = world::generate_split(5, world::Split::Train, 5)
            .into_iter()
            .map(Arc::new)
            .collect();
        make_batch(&recs, 2).unwrap()
    }

    fn nft(beta: f32, adaptive: bool, minibatch: usize) -> NftUpdate {
        NftUpdate {
            beta,
            adv_clip: 5.0,
            t_min: 0.1,
            t_max: 0.9,
            adaptive,
            kl_beta: 0.0,
            steps: 1,
            minibatch,
        }
    }

    /// The objective written out on the host in f64 from the two models' velocities.
    fn direct(
        u: &NftUpdate,
        res: &FlowModelRes,
        x0: &[f32],
        p: &PromptBatch,
        r: &[f32],
        seed: u64,
    ) -> f64 {
        let dev = res.device.clone();
        let b = p.len();
        let d = u.draw(seed, 0, b, IMAGE_LEN);
        let x_t: Vec<f32> = (0..b * IMAGE_LEN)
            .map(|j| (1.0 - d.t[j / IMAGE_LEN]) * x0[j] + d.t[j / IMAGE_LEN] * d.eps[j])
            .collect();
        let unet = res.unet("test").unwrap();
        let xt = tensor_from_vec(x_t.clone(), [b, 3, 32, 32], &dev);
        let tt = tensor_from_vec(d.t.clone(), [b], &dev);
        let cond = p.conditioning(&dev);
        let v = to_vec(
            &unet
                .sampling_model(false)
                .velocity(xt.clone(), tt.clone(), &cond)
                .unwrap(),
        )
        .unwrap();
        let vo = to_vec(
            &unet
                .trainer
                .ema()
                .velocity(xt.clone(), tt.clone(), &cond)
                .unwrap(),
        )
        .unwrap();
        let vr = to_vec(
            &unet
                .reference_model()
                .unwrap()
                .velocity(xt, tt, &cond)
                .unwrap(),
        )
        .unwrap();
        let (beta, c) = (u.beta as f64, u.adv_clip as f64);
        let mut total = 0.0;
        for (i, &ri) in r.iter().enumerate().take(b) {
            let t = d.t[i] as f64;
            let part = |sign: f64| {
                let (mut sq, mut ab) = (0.0, 0.0);
                for j in i * IMAGE_LEN..(i + 1) * IMAGE_LEN {
                    let (vt, vold) = (v[j] as f64, vo[j] as f64);
                    let pv = if sign > 0.0 {
                        beta * vt + (1.0 - beta) * vold
                    } else {
                        (1.0 + beta) * vold - beta * vt
                    };
                    let e = x_t[j] as f64 - t * pv - x0[j] as f64;
                    sq += e * e;
                    ab += e.abs();
                }
                let (sq, ab) = (sq / IMAGE_LEN as f64, ab / IMAGE_LEN as f64);
                if u.adaptive { sq / ab.max(1e-5) } else { sq }
            };
            let ri = ri as f64;
            total += (ri * part(1.0) + (1.0 - ri) * part(-1.0)) / beta;
        }
        let kl = v
            .iter()
            .zip(&vr)
            .map(|(&a, &r)| (a as f64 - r as f64).powi(2))
            .sum::<f64>()
            / v.len() as f64;
        c * total / b as f64 + u.kl_beta as f64 * kl
    }

    #[test]
    fn should_map_advantages_to_reward_probabilities() {
        let u = nft(1.0, true, 0);
        let r = u.reward_prob(&[0.0, 2.5, -5.0, 7.0, -1.0]);
        assert_eq!(r, vec![0.5, 0.75, 0.0, 1.0, 0.4]);
    }

    #[test]
    fn should_match_a_direct_computation_of_the_objective() {
        let p = batch();
        let b = p.len();
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let x0 = sample_standard_normal(&mut rng, b * IMAGE_LEN)
            .into_iter()
            .map(|v| v.clamp(-1.0, 1.0))
            .collect::<Vec<_>>();
        let adv = [1.5, -0.5, 4.0, -6.0, 0.0, 0.7, -2.0, 2.0, 0.3, -0.3];
        assert_eq!(adv.len(), b);
        for (beta, adaptive, kl_beta) in [
            (1.0, true, 0.0),
            (0.3, true, 0.0),
            (0.6, false, 0.0),
            (0.6, true, 50.0),
        ] {
            let mut res = trained_tiny();
            let images = Images::from_vec(x0.clone(), b, 0.0, &res.device);
            let u = NftUpdate {
                kl_beta,
                ..nft(beta, adaptive, 0)
            };
            let r = u.reward_prob(&adv);
            let want = direct(&u, &res, &x0, &p, &r, 11);
            let st = u.update(&mut res, &images, &p, &r, 11).unwrap();
            let rel = (st.loss - want).abs() / want.abs().max(1e-12);
            assert!(
                rel < 1e-4,
                "β {beta}, adaptive {adaptive}: loss {} vs direct {want}",
                st.loss
            );
            assert!(
                st.old_deviation > 0.0,
                "v_θ = v_old: the test would not see β"
            );
            if kl_beta > 0.0 {
                // The reference term is a visible share of the loss (the test sees κ).
                assert!(
                    kl_beta as f64 * st.kl > 0.05 * st.loss,
                    "κ·kl {} of loss {}",
                    kl_beta as f64 * st.kl,
                    st.loss
                );
            } else {
                assert_eq!(st.kl, 0.0);
            }
            // The step was taken: the weights (and with them the objective) moved.
            assert!(st.grad_norm > 0.0);
            let after = direct(&u, &res, &x0, &p, &r, 11);
            assert!(
                (after - want).abs() > 1e-6 * want.abs(),
                "β {beta}: {want} → {after}"
            );
        }
    }

    #[test]
    fn should_give_the_same_step_with_minibatches() {
        let p = batch();
        let b = p.len();
        let x0: Vec<f32> = (0..b * IMAGE_LEN)
            .map(|j| ((j % 7) as f32 - 3.0) / 3.0)
            .collect();
        let adv = [1.0, -1.0, 2.0, -2.0, 0.0, 0.5, -0.5, 3.0, -3.0, 0.1];
        let weights = |minibatch| {
            let mut res = trained_tiny();
            let images = Images::from_vec(x0.clone(), b, 0.0, &res.device);
            let u = nft(0.5, true, minibatch);
            let r = u.reward_prob(&adv);
            let st = u.update(&mut res, &images, &p, &r, 3).unwrap();
            let unet = res.unet("test").unwrap();
            let v = unet
                .sampling_model(false)
                .velocity(
                    images.tensor.clone(),
                    tensor_from_vec(vec![0.5; b], [b], &res.device),
                    &p.conditioning(&res.device),
                )
                .unwrap();
            (st.loss, to_vec(&v).unwrap())
        };
        let (l0, v0) = weights(0);
        let (l3, v3) = weights(3);
        assert!((l0 - l3).abs() < 1e-4 * l0.abs(), "{l0} vs {l3}");
        let max = v0
            .iter()
            .zip(&v3)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(max < 1e-4, "minibatches changed the step: {max}");
    }
}
