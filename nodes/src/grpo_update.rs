//! `grpo_update`: the clipped policy-gradient (GRPO) update of the flow model.
//!
//! For every (sample, transition) the policy's log-probability is recomputed from a fresh
//! velocity: μ_θ = a·x_t + b·v_θ(x_t, t, c), log π_θ(x_next | x_t) (mean over dimensions, f32).
//! ratio ρ = exp(log π_θ − log π_old); loss = mean(max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε))) + β·KL,
//! with A clipped to ±adv_clip and KL = mean_d (μ_θ − μ_ref)²/(2σ²) to the frozen reference
//! (analytic Gaussian KL, same reduction). Several epochs over shuffled minibatches of samples;
//! each minibatch's loss covers all of its samples' transitions, and `grad_accum` minibatches
//! make one optimizer step (their gradients averaged, weighted by size).
//!
//! Memory: each transition's part of the loss is back-propagated on its own and the gradients
//! are summed, so only one transition's graph (one forward of `minibatch` samples) is alive at
//! a time — the same gradient as one backward of the whole loss, at about 1/(K−1) of the peak
//! memory (and far fewer fresh pages to fault in on CPU).
//!
//! Rollout graphs: with `rollout_graph: keep` on the policy, the samplers ran the trainer's own
//! autodiff model and each transition carries its velocity's graph. While no optimizer step has
//! been taken since sampling and a minibatch is the whole batch (the first step of the first
//! epoch with `minibatch: 0`), that graph *is* this forward — same weights, same inputs, ratio
//! exactly 1 — so the update back-propagates through it instead of running the model again.
//! Later minibatches and epochs recompute as usual. Metric `graphs_reused` counts them. The
//! kept graphs are alive together anyway, so their terms are summed and back-propagated once
//! (the update measured 5–24% faster than with a backward per transition: BENCHMARKS.md,
//! "Session 7").
//!
//! Activation checkpointing (`activation_checkpointing: true` on an SD3 policy): recomputed
//! forwards keep only each transformer block's inputs, and the backward runs the blocks again
//! one at a time ([`crate::model::Checkpointed`]); the same gradients, less memory.

use std::time::Instant;

use anyhow::{Result, bail};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::{Device, Tensor};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use runner::{Inputs, Node, NodeCtx, NodeType, Outputs, ParamDef, PortDef, Registry, ResourceSlot};

use crate::flow_model::{FlowModelRes, PolicyModel, TYPE};
use crate::grpo::log_prob;
use crate::model::{Trainer, VelocityModel, int_tensor_from_vec, tensor_from_vec};
use crate::types::{Advantages, PromptBatch, Transition, select_rows, to_vec};

pub fn register(r: &mut Registry) {
    r.add_node(NodeType {
        name: "grpo_update",
        summary: "clipped policy-gradient (GRPO) update from transitions and advantages",
        doc: "Recomputes log π_θ of every stored transition with the current model, forms the\n\
              ratio to the sampling-time log-prob and minimises the clipped surrogate plus β·KL to\n\
              the reference model, for `epochs` passes over shuffled minibatches (AdamW and\n\
              gradient clipping from the `policy` resource). Logs loss, pg_loss, kl, approx_kl,\n\
              clip_frac, ratio_mean/min/max, grad_norm, lr and `transitions`, the number trained:\n\
              transitions whose kernel is not stochastic (τ = 0, a MixGRPO window's ODE steps)\n\
              carry no log-prob and are skipped. A non-finite loss stops the run\n\
              before the update is applied. With `rollout_graph: keep` on the policy, the first\n\
              step (whole batch, no optimizer step since sampling) back-propagates through the\n\
              samplers' own forward instead of recomputing it (metric graphs_reused).",
        inputs: vec![
            PortDef::new("transitions", "transition", "the sampled policy steps").many(),
            PortDef::new("advantages", "advantages", "one advantage per transition and sample"),
            PortDef::new("prompts", "prompts", "the batch's prompts"),
        ],
        outputs: vec![],
        params: vec![
            ParamDef::float("clip_range", 1e-4, 0.0, 10.0, "ε of the ratio clip (small: log-probs are means over dimensions)"),
            ParamDef::float("adv_clip", 5.0, 0.0, 1e6, "advantages are clipped to ±adv_clip"),
            ParamDef::float("beta", 0.0, 0.0, 1e6, "weight of the KL penalty (needs `reference: true` on the model)"),
            ParamDef::int("epochs", 1, 1, 1000, "passes over the batch"),
            ParamDef::int("minibatch", 0, 0, 1 << 20, "samples per minibatch (0 = whole batch)"),
            ParamDef::int("grad_accum", 1, 1, 1 << 20, "minibatches whose gradients are averaged into one optimizer step"),
        ],
        resources: vec![ResourceSlot { name: "policy", ty: TYPE, write: true, doc: "the model to update" }],
        factory: |ctx| {
            let p = ctx.params;
            Ok(Box::new(GrpoUpdate {
                clip: p.f32("clip_range")?,
                adv_clip: p.f32("adv_clip")?,
                beta: p.f32("beta")?,
                epochs: p.usize("epochs")?,
                minibatch: p.usize("minibatch")?,
                grad_accum: p.usize("grad_accum")?,
            }))
        },
    });
}

pub struct GrpoUpdate {
    pub clip: f32,
    pub adv_clip: f32,
    pub beta: f32,
    pub epochs: usize,
    pub minibatch: usize,
    pub grad_accum: usize,
}

/// One stochastic transition with its advantages.
struct Step<'a> {
    tr: &'a Transition,
    adv: &'a [f32],
    /// Which of this rank's samples train it (`None`: all of them, see [`Advantages::mask`]).
    mask: Option<&'a [bool]>,
    /// The same for every rank's samples, by global index (`None`: all).
    global_mask: Option<Vec<bool>>,
}

impl Step<'_> {
    /// The rows of minibatch `idx` (local indices) that train this transition.
    fn rows(&self, idx: &[usize]) -> Vec<usize> {
        match self.mask {
            Some(m) => idx.iter().copied().filter(|&i| m[i]).collect(),
            None => idx.to_vec(),
        }
    }
    /// How many of the global rows `chunk` train this transition.
    fn trained_in(&self, chunk: &[usize]) -> usize {
        self.global_mask
            .as_ref()
            .map_or(chunk.len(), |m| chunk.iter().filter(|&&i| m[i]).count())
    }
}

/// Statistics of one update, summed over minibatches.
#[derive(Debug, Default, Clone)]
pub struct UpdateStats {
    pub loss: f64,
    pub pg_loss: f64,
    pub kl: f64,
    pub approx_kl: f64,
    pub clip_frac: f64,
    pub ratio_mean: f64,
    pub ratio_min: f64,
    pub ratio_max: f64,
    pub grad_norm: f64,
    pub lr: f64,
    pub steps: usize,
    /// Ratios of the very first minibatch (before any update): exactly on-policy.
    pub first_ratio_max_dev: f64,
    /// log ρ of every sample and minibatch, per transition step (for TensorBoard histograms).
    pub log_ratios: std::collections::BTreeMap<usize, Vec<f64>>,
    pub first_kl: f64,
    /// Transitions whose rollout graph (`rollout_graph: keep`) replaced the forward pass.
    pub graphs_reused: usize,
    /// Transitions trained (the stochastic ones: a MixGRPO window's SDE steps; ODE steps and
    /// τ = 0 steps carry no log-prob and are skipped).
    pub transitions: usize,
    /// Wall time of the update's phases, in seconds (summed over minibatches; exact on CPU
    /// devices, where every op runs before it returns): the policy's forward and the loss
    /// terms (`forward_s`), the KL reference's forward (`reference_s`), the backward passes
    /// with the gradients' accumulation (`backward_s`) and the optimizer steps — grad-norm
    /// clipping, AdamW, EMA (`optimizer_s`). `flowrun bench --sd3` reports them.
    pub forward_s: f64,
    pub reference_s: f64,
    pub backward_s: f64,
    pub optimizer_s: f64,
    /// Data-parallel runs: the gradients' all-reduce over the ranks (with its wait for the
    /// slowest rank).
    pub allreduce_s: f64,
}

/// Back-propagates `loss` (a share of the step's loss) into `grads`; returns its value.
/// A non-finite loss is an error, before any gradient is applied.
/// Back-propagates `loss` into `grads`, keeping its value (detached, on the device) in `diag`:
/// nothing is read back here, so the device never waits for the host.
fn backward_into<M: VelocityModel>(
    trainer: &Trainer<M>,
    grads: &mut GradientsAccumulator<M>,
    loss: Tensor<1>,
    diag: &mut Diagnostics,
) {
    diag.losses.push(loss.clone().detach());
    grads.accumulate(trainer.model(), trainer.backward(loss));
}

/// One optimizer step's diagnostics, kept on the device and read back in one transfer before
/// the step is applied (on CUDA each read is a synchronisation: one per step, not several per
/// transition).
#[derive(Default)]
struct Diagnostics {
    /// Per transition and minibatch: ratio [n], log-prob [n], policy-gradient term [1], KL [1].
    terms: Vec<Term>,
    /// The value of every back-propagated loss [1], in order.
    losses: Vec<Tensor<1>>,
}

struct Term {
    ratio: Tensor<1>,
    logp: Tensor<1>,
    pg: Tensor<1>,
    kl: Option<Tensor<1>>,
}

/// [`Diagnostics`] on the host.
struct HostTerm {
    ratio: Vec<f32>,
    logp: Vec<f32>,
    pg: f32,
    kl: Option<f32>,
}

impl Diagnostics {
    /// Everything in one device → host copy: the terms, then the loss values.
    fn read(self) -> Result<(Vec<HostTerm>, Vec<f32>)> {
        let mut parts = Vec::new();
        for t in &self.terms {
            parts.extend([t.ratio.clone(), t.logp.clone(), t.pg.clone()]);
            parts.extend(t.kl.clone());
        }
        parts.extend(self.losses.iter().cloned());
        if parts.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let all = to_vec(&Tensor::cat(parts, 0))?;
        let mut at = 0;
        let mut take = |n: usize| {
            let v = all[at..at + n].to_vec();
            at += n;
            v
        };
        let terms = self
            .terms
            .iter()
            .map(|t| {
                let [n] = t.ratio.dims();
                HostTerm {
                    ratio: take(n),
                    logp: take(n),
                    pg: take(1)[0],
                    kl: t.kl.as_ref().map(|_| take(1)[0]),
                }
            })
            .collect();
        let losses = take(self.losses.len());
        Ok((terms, losses))
    }
}

impl GrpoUpdate {
    /// Run the update on `m`; `seed` shuffles the minibatches.
    pub fn update(
        &self,
        m: &mut FlowModelRes,
        transitions: &[&Transition],
        adv: &Advantages,
        prompts: &PromptBatch,
        seed: u64,
    ) -> Result<UpdateStats> {
        self.update_sharded(m, transitions, adv, prompts, seed, None)
    }

    /// [`update`](Self::update) as one rank of a data-parallel run: `prompts` are this rank's
    /// rows of the global batch (every rank holds as many), minibatches are drawn over the
    /// global batch, and each optimizer step's gradients are summed over the ranks.
    pub fn update_sharded(
        &self,
        m: &mut FlowModelRes,
        transitions: &[&Transition],
        adv: &Advantages,
        prompts: &PromptBatch,
        seed: u64,
        dist: Option<&dyn runner::Collective>,
    ) -> Result<UpdateStats> {
        let plain = m.device.clone();
        let checkpointing = m.activation_checkpointing;
        crate::with_policy!(&mut m.policy, p => {
            self.update_policy(p, &plain, checkpointing, transitions, adv, prompts, seed, dist)
        })
    }

    /// [`update`](Self::update) for one architecture. `plain` is the inference device (the
    /// KL reference runs there); `checkpointing`: recomputed forwards keep only each block's
    /// inputs ([`VelocityModel::velocity_cfg_checkpointed`]).
    #[allow(clippy::too_many_arguments)]
    fn update_policy<M: VelocityModel>(
        &self,
        m: &mut PolicyModel<M>,
        plain: &Device,
        checkpointing: bool,
        transitions: &[&Transition],
        adv: &Advantages,
        prompts: &PromptBatch,
        seed: u64,
        dist: Option<&dyn runner::Collective>,
    ) -> Result<UpdateStats> {
        let b = prompts.len();
        // This rank's rows are [offset, offset + b) of a global batch of `global` samples.
        let (world, offset) = dist.map_or((1, 0), |c| (c.world(), c.rank() * b));
        let global = b * world;
        let mut host = Vec::new();
        for (k, tr) in transitions.iter().enumerate() {
            if !tr.kernel.is_stochastic() {
                continue;
            }
            let a = adv
                .values
                .get(k)
                .ok_or_else(|| anyhow::anyhow!("no advantages for transition {}", k + 1))?;
            if a.len() != b || tr.old_logprob.len() != b {
                bail!(
                    "transition {} has {} samples, advantages {}, prompts {b}",
                    k + 1,
                    tr.old_logprob.len(),
                    a.len()
                );
            }
            if tr.x_t.dims()[0] != b || tr.x_next.dims()[0] != b {
                bail!(
                    "transition {} holds {} states, prompts {b}",
                    k + 1,
                    tr.x_t.dims()[0]
                );
            }
            let mask = match &adv.mask {
                Some(m) => {
                    let m = m
                        .get(k)
                        .ok_or_else(|| anyhow::anyhow!("no mask for transition {}", k + 1))?;
                    if m.len() != b {
                        bail!(
                            "the advantages' mask of transition {} has {} samples, prompts {b}",
                            k + 1,
                            m.len()
                        );
                    }
                    Some(m.as_slice())
                }
                None => None,
            };
            host.push(Step {
                tr,
                adv: a,
                mask,
                global_mask: None,
            });
        }
        if adv.mask.is_some() {
            // Every rank's mask: the loss is a mean over the trained (sample, transition)
            // pairs of the whole minibatch.
            for h in &mut host {
                let local: Vec<u8> = h.mask.unwrap_or(&[]).iter().map(|&t| t as u8).collect();
                let all = match dist {
                    Some(c) => c.all_gather(&local)?,
                    None => local,
                };
                h.global_mask = Some(all.into_iter().map(|t| t != 0).collect());
            }
        }
        if host.is_empty() {
            bail!("no stochastic transitions to train on (is every τ 0?)");
        }
        let ad: Device = m.trainer.device().clone();
        // The frozen copy, or a LoRA policy's base (its adapters off: the trainer's own tensors).
        let reference = m.kl_reference("beta", self.beta)?;
        let mb = if self.minibatch == 0 {
            global
        } else {
            self.minibatch.min(global)
        };
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut st = UpdateStats {
            ratio_min: f64::INFINITY,
            ratio_max: f64::NEG_INFINITY,
            ..Default::default()
        };
        let mut n_ratio = 0usize;
        let mut reused = 0usize;
        let nt = host.len() as f32;
        for epoch in 0..self.epochs {
            let mut order: Vec<usize> = (0..global).collect();
            if epoch > 0 || self.minibatch > 0 {
                order.shuffle(&mut rng);
            }
            // Each global minibatch's rows that live on this rank, as local indices (all of
            // them in a single process; possibly none on a rank).
            // (local rows, the global minibatch's size)
            let chunks: Vec<(Vec<usize>, usize)> = order
                .chunks(mb)
                .map(|c| {
                    let local = c
                        .iter()
                        .filter(|&&i| (offset..offset + b).contains(&i))
                        .map(|&i| i - offset)
                        .collect();
                    (local, c.len())
                })
                .collect();
            let global_chunks: Vec<&[usize]> = order.chunks(mb).collect();
            for (gi, group) in chunks.chunks(self.grad_accum.max(1)).enumerate() {
                // Every rank's rows of these minibatches.
                let group_n: usize = group.iter().map(|(_, n)| n).sum();
                // The (sample, transition) pairs they train, on every rank: all of them, or
                // those the advantages' mask keeps.
                let a = self.grad_accum.max(1);
                let pairs: usize = global_chunks[gi * a..(gi * a + group.len())]
                    .iter()
                    .map(|c| host.iter().map(|h| h.trained_in(c)).sum::<usize>())
                    .sum();
                let masked = adv.mask.is_some();
                let mut grads = GradientsAccumulator::<M>::new();
                let mut diag = Diagnostics::default();
                // (trained rows, transition, weight) of each of diag's terms.
                let mut term_of: Vec<(Vec<usize>, &Transition, f32)> = Vec::new();
                let (mut lv, mut pg_sum, mut kl_sum, mut akl, mut clipped, mut rsum) =
                    (0f64, 0f64, 0f64, 0f64, 0usize, 0f64);
                for (idx, chunk_len) in group {
                    let (idx, n) = (idx.as_slice(), idx.len());
                    if n == 0 {
                        // None of this minibatch lives on this rank.
                        continue;
                    }
                    let cond_ad = prompts.conditioning_rows(idx, &ad);
                    // The KL reference runs on the plain device.
                    let cond_plain =
                        (self.beta > 0.0).then(|| prompts.conditioning_rows(idx, plain));
                    let mut joint: Option<Tensor<1>> = None;
                    for h in &host {
                        let t_forward = Instant::now();
                        let tr = h.tr;
                        let k = tr.kernel;
                        // The rows that train this transition (all of the minibatch's unless
                        // the advantages' mask leaves some out).
                        let kept_rows = h.rows(idx);
                        let (idx, n) = (kept_rows.as_slice(), kept_rows.len());
                        if n == 0 {
                            continue;
                        }
                        // This term's share of the group's loss: a mean over the samples and
                        // transitions, or over the trained pairs.
                        let w = if masked {
                            n as f32 / pairs as f32
                        } else {
                            n as f32 / group_n as f32 / nt
                        };
                        let cond_own;
                        let cond_plain_own;
                        let (cond_ad, cond_plain) = if h.mask.is_some() {
                            cond_own = prompts.conditioning_rows(idx, &ad);
                            cond_plain_own =
                                (self.beta > 0.0).then(|| prompts.conditioning_rows(idx, plain));
                            (&cond_own, &cond_plain_own)
                        } else {
                            (&cond_ad, &cond_plain)
                        };
                        // [n, C, H, W], sliced where the states live: no host round trip.
                        let x_plain = select_rows(&tr.x_t, idx);
                        let x = x_plain.clone().to_device(&ad);
                        let x_next = select_rows(&tr.x_next, idx).to_device(&ad);
                        let old = tensor_from_vec(
                            idx.iter().map(|&i| tr.old_logprob[i]).collect(),
                            [n],
                            &ad,
                        );
                        let a = tensor_from_vec(
                            idx.iter()
                                .map(|&i| h.adv[i].clamp(-self.adv_clip, self.adv_clip))
                                .collect(),
                            [n],
                            &ad,
                        );
                        // The rollout's own graph is this forward while no optimizer step
                        // has been taken since sampling and the minibatch is the whole batch.
                        let kept = tr
                            .graph
                            .as_ref()
                            .filter(|g| {
                                *chunk_len == global && g.trainer_step == m.trainer.step_count()
                            })
                            .and_then(|g| g.take());
                        let from_rollout = kept.is_some();
                        let model = m.trainer.model();
                        // Under activation checkpointing: the forward's recomputation.
                        let mut recompute = None;
                        let v = match kept {
                            Some(v) => {
                                reused += 1;
                                if idx.iter().enumerate().all(|(j, &i)| i == j) {
                                    v
                                } else {
                                    let order = int_tensor_from_vec(
                                        idx.iter().map(|&i| i as i64).collect(),
                                        [n],
                                        &ad,
                                    );
                                    v.select(0, order)
                                }
                            }
                            None => {
                                let t = Tensor::<1>::full([n], tr.t, &ad);
                                let ck = if checkpointing {
                                    model.velocity_cfg_checkpointed(
                                        x.clone(),
                                        t.clone(),
                                        cond_ad,
                                        tr.cfg,
                                    )?
                                } else {
                                    None
                                };
                                match ck {
                                    Some(ck) => {
                                        let v = ck.velocity.clone();
                                        recompute = Some(ck);
                                        v
                                    }
                                    None => model.velocity_cfg(x.clone(), t, cond_ad, tr.cfg)?,
                                }
                            }
                        };
                        let mean = x.clone().mul_scalar(k.a) + v.mul_scalar(k.b);
                        let logp = log_prob(x_next, mean.clone(), k.std); // [n]
                        let ratio = (logp.clone() - old.clone()).exp();
                        let unclipped = ratio.clone().mul(a.clone()).neg();
                        let clipped_t = ratio
                            .clone()
                            .clamp(1.0 - self.clip, 1.0 + self.clip)
                            .mul(a)
                            .neg();
                        let pg = unclipped.max_pair(clipped_t).mean();
                        let mut term = pg.clone();
                        let mut kl_value = None;
                        st.forward_s += t_forward.elapsed().as_secs_f64();
                        if let (Some(cond_plain), Some(reference)) =
                            (cond_plain, reference.as_ref())
                        {
                            let t_reference = Instant::now();
                            let vr = reference.velocity_cfg(
                                x_plain.clone(),
                                Tensor::<1>::full([n], tr.t, plain),
                                cond_plain,
                                tr.cfg,
                            )?;
                            // A constant of the loss: onto the autodiff device untracked.
                            let mean_ref =
                                (x_plain.mul_scalar(k.a) + vr.mul_scalar(k.b)).to_device(&ad);
                            let kl = (mean - mean_ref)
                                .square()
                                .mean()
                                .mul_scalar(1.0 / (2.0 * k.std * k.std));
                            kl_value = Some(kl.clone().detach());
                            term = term + kl.mul_scalar(self.beta);
                            st.reference_s += t_reference.elapsed().as_secs_f64();
                        }
                        diag.terms.push(Term {
                            ratio: ratio.detach(),
                            logp: logp.detach(),
                            pg: pg.detach(),
                            kl: kl_value,
                        });
                        term_of.push((kept_rows.clone(), tr, w));
                        let term = term.mul_scalar(w);
                        if from_rollout {
                            // Its graph is alive anyway: one backward for all such terms.
                            joint = Some(match joint.take() {
                                Some(j) => j + term,
                                None => term,
                            });
                            continue;
                        }
                        // Back-propagate this transition's share now: its graph is freed
                        // before the next transition's forward.
                        let t_backward = Instant::now();
                        match recompute {
                            Some(ck) => {
                                diag.losses.push(term.clone().detach());
                                ck.backward(term, &mut |g| {
                                    grads.accumulate(model, GradientsParams::from_grads(g, model))
                                });
                            }
                            None => backward_into(&m.trainer, &mut grads, term, &mut diag),
                        }
                        st.backward_s += t_backward.elapsed().as_secs_f64();
                    }
                    if let Some(j) = joint.take() {
                        let t_backward = Instant::now();
                        backward_into(&m.trainer, &mut grads, j, &mut diag);
                        st.backward_s += t_backward.elapsed().as_secs_f64();
                    }
                }
                // The step's diagnostics, in one read, in the order they were computed.
                let (terms, losses) = diag.read()?;
                let non_finite = |value: f64| {
                    anyhow::anyhow!(
                        "the GRPO loss is {value}; the update is not applied (lower the learning rate or check the rewards)"
                    )
                };
                for value in losses {
                    // A data-parallel rank decides on the global loss, as every rank does.
                    if !value.is_finite() && dist.is_none() {
                        return Err(non_finite(value as f64));
                    }
                    lv += value as f64;
                }
                for (t, (idx, tr, w)) in terms.iter().zip(&term_of) {
                    let w = *w;
                    let logs = st.log_ratios.entry(tr.step).or_default();
                    logs.extend(t.ratio.iter().map(|&r| (r as f64).ln()));
                    for (j, &ri) in t.ratio.iter().enumerate() {
                        let ri = ri as f64;
                        st.ratio_min = st.ratio_min.min(ri);
                        st.ratio_max = st.ratio_max.max(ri);
                        rsum += ri;
                        clipped += ((ri - 1.0).abs() > self.clip as f64) as usize;
                        akl += (tr.old_logprob[idx[j]] - t.logp[j]) as f64;
                        if st.steps == 0 {
                            st.first_ratio_max_dev = st.first_ratio_max_dev.max((ri - 1.0).abs());
                        }
                    }
                    pg_sum += (t.pg * w) as f64;
                    if let Some(klv) = t.kl {
                        let klv = klv as f64;
                        if st.steps == 0 {
                            st.first_kl += klv;
                        }
                        kl_sum += klv * w as f64;
                    }
                }
                let mut grads = grads.grads();
                if let Some(c) = dist {
                    // One flat buffer: the gradients, then the step's sums (every rank's share).
                    let mut sums =
                        [lv, pg_sum, kl_sum, akl, clipped as f64, rsum].map(|v| v as f32);
                    let t_reduce = Instant::now();
                    grads = m.trainer.all_reduce_gradients(grads, c, 1.0, &mut sums)?;
                    st.allreduce_s += t_reduce.elapsed().as_secs_f64();
                    [lv, pg_sum, kl_sum, akl] = [sums[0], sums[1], sums[2], sums[3]].map(f64::from);
                    clipped = sums[4].round() as usize;
                    rsum = sums[5] as f64;
                    if !lv.is_finite() {
                        return Err(non_finite(lv));
                    }
                }
                let t_optimizer = Instant::now();
                let stats = m.trainer.apply_gradients(grads, lv as f32);
                st.optimizer_s += t_optimizer.elapsed().as_secs_f64();
                let cnt = pairs.max(1) as f64;
                st.loss += lv;
                st.pg_loss += pg_sum;
                st.kl += kl_sum;
                st.approx_kl += akl / cnt;
                st.clip_frac += clipped as f64 / cnt;
                st.ratio_mean += rsum / cnt;
                n_ratio += 1;
                st.grad_norm += stats.grad_norm as f64;
                st.lr = stats.lr;
                st.steps += 1;
            }
        }
        if let Some(c) = dist {
            // The extremes over every rank (the sums were reduced step by step).
            let all = runner::dist::all_gather_f64(
                c,
                &[
                    st.ratio_min,
                    st.ratio_max,
                    st.first_ratio_max_dev,
                    st.first_kl,
                ],
            )?;
            st.ratio_min = all.iter().map(|v| v[0]).fold(f64::INFINITY, f64::min);
            st.ratio_max = all.iter().map(|v| v[1]).fold(f64::NEG_INFINITY, f64::max);
            st.first_ratio_max_dev = all.iter().map(|v| v[2]).fold(0.0, f64::max);
            st.first_kl = all.iter().map(|v| v[3]).sum();
        }
        st.graphs_reused = reused;
        st.transitions = host.len();
        let s = n_ratio.max(1) as f64;
        for v in [
            &mut st.loss,
            &mut st.pg_loss,
            &mut st.kl,
            &mut st.approx_kl,
            &mut st.clip_frac,
            &mut st.ratio_mean,
            &mut st.grad_norm,
        ] {
            *v /= s;
        }
        Ok(st)
    }
}

impl Node for GrpoUpdate {
    fn run(&mut self, ctx: &NodeCtx, inputs: &Inputs) -> Result<Outputs> {
        let transitions = inputs.all::<Transition>("transitions")?;
        let adv = inputs.get::<Advantages>("advantages")?;
        let prompts = inputs.get::<PromptBatch>("prompts")?;
        let seed = ctx.seed_for("minibatches");
        let st = ctx.write("policy", |m: &mut FlowModelRes| {
            self.update_sharded(m, &transitions, adv, prompts, seed, ctx.collective())
        })?;
        for (k, v) in [
            ("loss", st.loss),
            ("pg_loss", st.pg_loss),
            ("kl", st.kl),
            ("approx_kl", st.approx_kl),
            ("clip_frac", st.clip_frac),
            ("ratio_mean", st.ratio_mean),
            ("ratio_min", st.ratio_min),
            ("ratio_max", st.ratio_max),
            ("grad_norm", st.grad_norm),
            ("lr", st.lr),
            ("optimizer_steps", st.steps as f64),
            ("graphs_reused", st.graphs_reused as f64),
            ("transitions", st.transitions as f64),
        ] {
            // Reduced over the ranks above (rank 0's count of reused graphs).
            ctx.metric_global(k, v);
        }
        if ctx.collective().is_some() {
            // Rank 0's: how long the update spent in the all-reduce (and waiting for others).
            ctx.metric_global("allreduce_s", st.allreduce_s);
        }
        for (step, logs) in st.log_ratios {
            ctx.histogram(&format!("log_ratio/step{step}"), logs);
        }
        Ok(Outputs::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grpo::LinearGaussian;
    use crate::grpo::{gaussian_step, log_prob};
    use crate::model::{FlowModelConfig, TrainerConfig, sample_standard_normal};
    use crate::prompt_loader::make_batch;
    use crate::world;
    use crate::world::IMAGE_LEN;
    use burn::tensor::Device;
    use rand::SeedableRng;
    use std::sync::Arc;

    /// A tiny model moved away from its zero-velocity init by a few flow-matching steps.
    fn trained_tiny() -> FlowModelRes {
        let dev = Device::flex();
        let cfg = FlowModelConfig::tiny(world::vocab_size(), world::MAX_TOKENS).with_seed(3);
        let mut res = FlowModelRes::new(
            cfg.init(&dev),
            TrainerConfig::new().with_lr(1e-2),
            true,
            false,
        );
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for _ in 0..3 {
            let x0 = tensor_from_vec(
                sample_standard_normal(&mut rng, 4 * IMAGE_LEN),
                [4, 3, 32, 32],
                &dev,
            );
            let n = tensor_from_vec(
                sample_standard_normal(&mut rng, 4 * IMAGE_LEN),
                [4, 3, 32, 32],
                &dev,
            );
            let t = tensor_from_vec(vec![0.3, 0.5, 0.7, 0.9], [4], &dev);
            let tok = crate::model::int_tensor_from_vec(
                vec![1; 4 * world::MAX_TOKENS],
                [4, world::MAX_TOKENS],
                &dev,
            );
            let ad = res.unet_mut("test").unwrap().trainer.device().clone();
            res.unet_mut("test").unwrap().trainer.step(
                x0.to_device(&ad),
                n.to_device(&ad),
                t.to_device(&ad),
                tok.to_device(&ad),
            );
        }
        // The reference is the model *before* RL: take it now.
        let r = res.sampling_model().unwrap();
        res.unet_mut("test").unwrap().reference = Some(r);
        res
    }

    /// Sample one TAFS transition of the batch with the current policy.
    fn sample(res: &FlowModelRes, prompts: &PromptBatch, tau: f32) -> Transition {
        let dev = res.device.clone();
        let b = prompts.len();
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let x = tensor_from_vec(
            sample_standard_normal(&mut rng, b * IMAGE_LEN),
            [b, 3, 32, 32],
            &dev,
        );
        // As the samplers do: with `keep_rollout_graph` the velocity's graph comes along.
        let (v, graph) = res
            .sampler()
            .velocity(&x, 0.75, &prompts.conditioning(&dev), 1.0, true)
            .unwrap();
        let k = LinearGaussian::tafs(0.75, 0.5, tau).unwrap();
        let eps = tensor_from_vec(
            sample_standard_normal(&mut rng, b * IMAGE_LEN),
            [b, 3, 32, 32],
            &dev,
        );
        let (x_next, old) = gaussian_step(&x, &v, k, eps).unwrap();
        Transition {
            step: 1,
            t: 0.75,
            t_next: 0.5,
            tau,
            kernel: k,
            sde_std: k.std,
            cfg: 1.0,
            x_t: x,
            x_next,
            old_logprob: old,
            sampler: "tafs",
            graph,
            branch: None,
        }
    }

    /// The model's velocity on a fixed probe batch (to compare weights after updates).
    fn probe_velocity(res: &FlowModelRes, prompts: &PromptBatch) -> Vec<f32> {
        let dev = res.device.clone();
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let x = tensor_from_vec(
            sample_standard_normal(&mut rng, 6 * IMAGE_LEN),
            [6, 3, 32, 32],
            &dev,
        );
        let v = res.sampling_model().unwrap().forward(
            x,
            Tensor::<1>::full([6], 0.5, &dev),
            prompts.tokens_tensor(&dev),
        );
        to_vec(&v).unwrap()
    }

    fn max_abs(u: &[f32], w: &[f32]) -> f32 {
        u.iter()
            .zip(w)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max)
    }

    fn two_step_advantages() -> Advantages {
        Advantages {
            values: vec![
                vec![1.0, -1.0, 0.5, -0.5, 0.0, 0.2],
                vec![-0.3, 0.8, -1.2, 0.4, 1.0, -0.7],
            ],
            mode: "step".into(),
            mask: None,
        }
    }

    fn batch() -> PromptBatch {
        let recs: Vec<_> = world::generate_split(5, world::Split::Train, 2)
            .into_iter()
            .map(Arc::new)
            .collect();
        make_batch(&recs, 3).unwrap()
    }

    #[test]
    fn should_have_ratio_one_and_zero_kl_on_the_first_on_policy_minibatch() {
        let mut res = trained_tiny();
        let prompts = batch();
        let tr = sample(&res, &prompts, 0.8);
        let adv = Advantages {
            values: vec![vec![1.0, -1.0, 0.5, -0.5, 0.0, 0.2]],
            mode: "step".into(),
            mask: None,
        };
        let up = GrpoUpdate {
            clip: 0.2,
            adv_clip: 5.0,
            beta: 0.1,
            epochs: 1,
            minibatch: 0,
            grad_accum: 1,
        };
        let st = up.update(&mut res, &[&tr], &adv, &prompts, 0).unwrap();
        assert!(
            st.first_ratio_max_dev < 1e-5,
            "ratio deviates by {}",
            st.first_ratio_max_dev
        );
        assert!(st.first_kl.abs() < 1e-9, "kl {}", st.first_kl);
        assert_eq!(st.clip_frac, 0.0);
        // The update moved the model: a second pass is off-policy.
        let st2 = up.update(&mut res, &[&tr], &adv, &prompts, 0).unwrap();
        assert!(st2.first_ratio_max_dev > 1e-7, "the model did not change");
        assert!(st2.first_kl > 0.0);
    }

    #[test]
    fn should_raise_the_log_prob_of_positive_advantage_samples() {
        let mut res = trained_tiny();
        res.unet_mut("test").unwrap().trainer.config.lr = 1e-3;
        let prompts = batch();
        let tr = sample(&res, &prompts, 0.8);
        let a = vec![1.0, -1.0, 1.0, -1.0, 1.0, -1.0];
        let adv = Advantages {
            values: vec![a.clone()],
            mode: "step".into(),
            mask: None,
        };
        let up = GrpoUpdate {
            clip: 10.0,
            adv_clip: 5.0,
            beta: 0.0,
            epochs: 3,
            minibatch: 0,
            grad_accum: 1,
        };
        up.update(&mut res, &[&tr], &adv, &prompts, 0).unwrap();
        let after = sample(&res, &prompts, 0.8);
        // Same noise, new policy: log π(x_next_old) moved up where A > 0 and down where A < 0.
        let dev = res.device.clone();
        let model = res.sampling_model().unwrap();
        let v = model.forward(
            tr.x_t.clone(),
            Tensor::<1>::full([6], 0.75, &dev),
            prompts.tokens_tensor(&dev),
        );
        let mean = tr.x_t.clone().mul_scalar(tr.kernel.a) + v.mul_scalar(tr.kernel.b);
        let new = to_vec(&log_prob(tr.x_next.clone(), mean, tr.kernel.std)).unwrap();
        let gain: f32 = (0..6).map(|i| a[i] * (new[i] - tr.old_logprob[i])).sum();
        assert!(gain > 0.0, "advantage-weighted log-prob change {gain}");
        drop(after);
    }

    #[test]
    fn should_refuse_kl_without_a_reference_and_non_finite_losses() {
        let mut res = trained_tiny();
        res.unet_mut("test").unwrap().reference = None;
        let prompts = batch();
        let tr = sample(&res, &prompts, 0.8);
        let adv = Advantages {
            values: vec![vec![0.0; 6]],
            mode: "step".into(),
            mask: None,
        };
        let up = GrpoUpdate {
            clip: 0.2,
            adv_clip: 5.0,
            beta: 0.1,
            epochs: 1,
            minibatch: 0,
            grad_accum: 1,
        };
        let e = up.update(&mut res, &[&tr], &adv, &prompts, 0).unwrap_err();
        assert!(e.to_string().contains("reference"), "{e}");
        let mut bad = tr.clone();
        bad.old_logprob[0] = f32::NAN;
        let up = GrpoUpdate { beta: 0.0, ..up };
        let before = probe_velocity(&res, &prompts);
        let e = up.update(&mut res, &[&bad], &adv, &prompts, 0).unwrap_err();
        assert!(e.to_string().contains("not applied"), "{e}");
        // Nothing was applied: the weights are as they were.
        assert_eq!(probe_velocity(&res, &prompts), before);
    }

    #[test]
    fn should_take_the_same_step_with_accumulated_minibatch_gradients() {
        // One optimizer step over the whole batch (one backward per transition, summed) and one
        // over two accumulated minibatches of 3 samples must give the same weights.
        let prompts = batch();
        let velocity = |res: &FlowModelRes| probe_velocity(res, &prompts);
        let adv = two_step_advantages();
        let step = |minibatch, grad_accum| {
            let mut res = trained_tiny();
            res.unet_mut("test").unwrap().trainer.config.lr = 1e-3;
            let a = sample(&res, &prompts, 0.8);
            let b = sample(&res, &prompts, 0.5);
            let before = velocity(&res);
            let up = GrpoUpdate {
                clip: 10.0,
                adv_clip: 5.0,
                beta: 0.1,
                epochs: 1,
                minibatch,
                grad_accum,
            };
            let st = up.update(&mut res, &[&a, &b], &adv, &prompts, 0).unwrap();
            assert_eq!(st.steps, 1);
            (before, velocity(&res))
        };
        let (before, whole) = step(0, 1);
        let (_, accumulated) = step(3, 2);
        let moved = max_abs(&before, &whole);
        let diff = max_abs(&whole, &accumulated);
        assert!(moved > 1e-3, "the update did not move the model ({moved})");
        assert!(
            diff < moved * 1e-2,
            "accumulated step differs by {diff} (update moved {moved})"
        );
    }

    #[test]
    fn should_train_only_the_masked_pairs_as_a_mean_over_them() {
        // A branching rollout's duplicated rows are masked out: the loss is the mean over the
        // 7 trained (sample, transition) pairs. Unclipped and without KL, that is the update
        // whose other pairs have advantage 0 and whose kept advantages are scaled by 12/7 (a
        // mean over all 12 pairs): the same gradient, so the same weights.
        let prompts = batch();
        let base = two_step_advantages();
        let mask = vec![
            vec![true, false, true, false, true, true],
            vec![false, true, true, true, false, false],
        ];
        let masked = Advantages {
            mask: Some(mask.clone()),
            ..base.clone()
        };
        let scaled = Advantages {
            values: base
                .values
                .iter()
                .zip(&mask)
                .map(|(a, m)| {
                    a.iter()
                        .zip(m)
                        .map(|(a, &m)| if m { a * 12.0 / 7.0 } else { 0.0 })
                        .collect()
                })
                .collect(),
            ..base.clone()
        };
        let step = |adv: &Advantages, minibatch, grad_accum| {
            let mut res = trained_tiny();
            res.unet_mut("test").unwrap().trainer.config.lr = 1e-3;
            let a = sample(&res, &prompts, 0.8);
            let b = sample(&res, &prompts, 0.5);
            let before = probe_velocity(&res, &prompts);
            let up = GrpoUpdate {
                clip: 10.0,
                adv_clip: 5.0,
                beta: 0.0,
                epochs: 1,
                minibatch,
                grad_accum,
            };
            let st = up.update(&mut res, &[&a, &b], adv, &prompts, 0).unwrap();
            assert_eq!(st.steps, 1);
            (st, before, probe_velocity(&res, &prompts))
        };
        let (st_masked, before, w_masked) = step(&masked, 0, 1);
        let (st_scaled, _, w_scaled) = step(&scaled, 0, 1);
        let (_, _, w_split) = step(&masked, 3, 2);
        let (_, _, w_all) = step(&base, 0, 1);
        let moved = max_abs(&before, &w_masked);
        assert!(moved > 1e-3, "the update did not move the model ({moved})");
        let diff = max_abs(&w_masked, &w_scaled);
        assert!(
            diff < moved * 1e-3,
            "masked update differs by {diff} (moved {moved})"
        );
        assert!(
            (st_masked.grad_norm - st_scaled.grad_norm).abs() < 1e-5 * st_scaled.grad_norm,
            "{} vs {}",
            st_masked.grad_norm,
            st_scaled.grad_norm
        );
        assert!(
            (st_masked.loss - st_scaled.loss).abs() < 1e-6,
            "{} vs {}",
            st_masked.loss,
            st_scaled.loss
        );
        // Split into accumulated minibatches, the mean is still over the 7 pairs.
        let diff = max_abs(&w_masked, &w_split);
        assert!(
            diff < moved * 1e-2,
            "accumulated masked step differs by {diff}"
        );
        // Without the mask every pair trains: another update.
        assert!(max_abs(&w_masked, &w_all) > moved * 0.05);
    }

    #[test]
    fn should_take_the_same_steps_through_the_kept_rollout_graph() {
        // With `rollout_graph: keep` the first (on-policy, whole-batch) step back-propagates
        // through the samplers' own forward; every later step recomputes. The weights must come
        // out as with recomputation, for each way of splitting the batch.
        let prompts = batch();
        let adv = two_step_advantages();
        let run = |keep: bool, epochs, minibatch| {
            let mut res = trained_tiny();
            res.unet_mut("test").unwrap().trainer.config.lr = 1e-3;
            res.keep_rollout_graph = keep;
            let a = sample(&res, &prompts, 0.8);
            let b = sample(&res, &prompts, 0.5);
            assert_eq!(a.graph.is_some(), keep);
            let before = probe_velocity(&res, &prompts);
            let up = GrpoUpdate {
                clip: 10.0,
                adv_clip: 5.0,
                beta: 0.1,
                epochs,
                minibatch,
                grad_accum: 1,
            };
            let st = up.update(&mut res, &[&a, &b], &adv, &prompts, 0).unwrap();
            // The graphs were taken (or dropped unused): a second update recomputes.
            let again = up.update(&mut res, &[&a, &b], &adv, &prompts, 1).unwrap();
            assert_eq!(again.graphs_reused, 0);
            (st, before, probe_velocity(&res, &prompts))
        };
        // (minibatch 6 = the whole batch in shuffled order: the kept rows are reordered.)
        for (epochs, minibatch, reused) in [(1, 0, 2), (2, 0, 2), (1, 6, 2), (1, 3, 0)] {
            let (st_kept, before, kept) = run(true, epochs, minibatch);
            let (st_rec, _, recomputed) = run(false, epochs, minibatch);
            assert_eq!(
                st_kept.graphs_reused, reused,
                "epochs {epochs}, minibatch {minibatch}"
            );
            assert_eq!(st_rec.graphs_reused, 0);
            let moved = max_abs(&before, &recomputed);
            let diff = max_abs(&kept, &recomputed);
            assert!(moved > 1e-3, "the updates did not move the model ({moved})");
            assert!(
                diff < moved * 1e-3,
                "epochs {epochs}, minibatch {minibatch}: kept-graph weights differ by {diff} (updates moved {moved})"
            );
            assert!(
                (st_kept.grad_norm - st_rec.grad_norm).abs() < 1e-6 * st_rec.grad_norm.max(1.0)
            );
        }
        // A graph of weights that have changed since sampling is not the update's forward.
        let mut res = trained_tiny();
        res.keep_rollout_graph = true;
        let a = sample(&res, &prompts, 0.8);
        let b = sample(&res, &prompts, 0.5);
        let other = sample(&res, &prompts, 0.6);
        let up = GrpoUpdate {
            clip: 10.0,
            adv_clip: 5.0,
            beta: 0.0,
            epochs: 1,
            minibatch: 0,
            grad_accum: 1,
        };
        up.update(&mut res, &[&other], &adv, &prompts, 0).unwrap();
        let st = up.update(&mut res, &[&a, &b], &adv, &prompts, 0).unwrap();
        assert_eq!(st.graphs_reused, 0);
        assert!(
            st.first_ratio_max_dev > 1e-7,
            "recomputed with the new weights"
        );
    }
}
