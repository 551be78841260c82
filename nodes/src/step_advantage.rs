//! `step_advantage`: group-relative, step-aware advantages from dense per-step rewards.

use anyhow::{Result, bail};
use runner::{
    Inputs, Node, NodeCtx, NodeType, Outputs, ParamDef, ParamKind, ParamValue, PortDef, Registry,
};

use crate::grpo::{AdvantageMode, StdScope, noise_aware_weights, step_advantages};
use crate::types::{Advantages, Images, PromptBatch, Rewards, Transition};
use crate::world::chw_to_rgb8;

pub fn register(r: &mut Registry) {
    r.add_node(NodeType {
        name: "step_advantage",
        summary: "normalise rewards per prompt group and per step; credit each transition",
        doc: "Â_k = (r_k − mean_group)/(std + eps) for each step's rewards (std over the group or\n\
              the batch). Transition k (x_{t_k} → x_{t_{k+1}}) gets, by `mode`:\n\
                final   Â_K for every transition (Flow-GRPO's uniform credit)\n\
                step    Â_{k+1}, the reward right after the transition\n\
                gain    normalised r_{k+1} − r_k (Stepwise-Flow-GRPO)\n\
                return  Σ_{j>k} γ^{j−k−1}·Â_j\n\
                mix     λ·Â_{k+1} + (1−λ)·Â_K\n\
              optionally scaled by `step_weights` and, with `weighting: noise` (TempFlow-GRPO's\n\
              noise-aware weighting), by w_k = σ_k / mean_j σ_j, σ_k the std of step k's\n\
              stochastic kernel (an SDE window's ODE steps count with their SDE std), so the\n\
              weights average 1 and the early, noisier steps weigh more (metrics\n\
              `noise_weight_stepK`). With one reward per sample (the final image)\n\
              only `final` applies. Non-finite rewards stop the iteration before any update,\n\
              naming the prompt.\n\
              TensorBoard: histograms `reward/stepK` and `advantage/stepK` every iteration; with\n\
              `images` connected (each step's x̂0, e.g. `predict@*.x0`), on the pipeline's\n\
              `logging.image_every` iterations, `logging.images` of each step's predictions as\n\
              images `x0/stepK/J` captioned with their prompt and reward, and the table\n\
              `x0/captions` (step, sample, prompt, reward).",
        inputs: vec![
            PortDef::new(
                "rewards",
                "rewards",
                "rewards of each step's prediction, in step order",
            )
            .many(),
            PortDef::new("prompts", "prompts", "the batch (its GRPO groups)"),
            PortDef::new(
                "transitions",
                "transition",
                "the policy steps (their number)",
            )
            .many(),
            PortDef::new(
                "images",
                "images",
                "each step's scored images (x̂0), in step order: shown in TensorBoard with their prompt and reward",
            )
            .many()
            .optional(),
        ],
        outputs: vec![PortDef::new(
            "advantages",
            "advantages",
            "[transitions][samples]",
        )],
        params: vec![
            ParamDef::choice(
                "mode",
                "mix",
                AdvantageMode::NAMES,
                "how transitions are credited",
            ),
            ParamDef::choice(
                "std",
                "group",
                &["group", "batch"],
                "std of the normalisation",
            ),
            ParamDef::float("eps", 1e-4, 0.0, 1.0, "added to the std"),
            ParamDef::float("gamma", 1.0, 0.0, 1.0, "discount of mode `return`"),
            ParamDef::float(
                "lambda",
                0.5,
                0.0,
                1.0,
                "weight of the step reward in mode `mix`",
            ),
            ParamDef::new(
                "step_weights",
                ParamKind::FloatList { min: 0.0, max: 1e6 },
                "per-transition weights (empty = all 1)",
            )
            .default(ParamValue::FloatList(vec![])),
            ParamDef::choice(
                "weighting",
                "none",
                &["none", "noise"],
                "noise: scale transition k by σ_k / mean σ (TempFlow-GRPO's noise-aware weights)",
            ),
        ],
        resources: vec![],
        factory: |ctx| {
            let p = ctx.params;
            Ok(Box::new(StepAdvantage {
                mode: AdvantageMode::parse(p.str("mode")?, p.f32("gamma")?, p.f32("lambda")?)?,
                mode_name: p.str("mode")?.to_string(),
                scope: if p.str("std")? == "batch" {
                    StdScope::Batch
                } else {
                    StdScope::Group
                },
                eps: p.f32("eps")?,
                weights: p
                    .f64_list("step_weights")?
                    .into_iter()
                    .map(|w| w as f32)
                    .collect(),
                noise_weights: p.str("weighting")? == "noise",
            }))
        },
    });
}

struct StepAdvantage {
    mode: AdvantageMode,
    mode_name: String,
    scope: StdScope,
    eps: f32,
    weights: Vec<f32>,
    /// TempFlow-GRPO's noise-aware weights on top of `weights`.
    noise_weights: bool,
}

impl Node for StepAdvantage {
    fn run(&mut self, ctx: &NodeCtx, inputs: &Inputs) -> Result<Outputs> {
        let rewards = inputs.all::<Rewards>("rewards")?;
        let prompts = inputs.get::<PromptBatch>("prompts")?;
        let transitions = inputs.all::<Transition>("transitions")?;
        for r in &rewards {
            if let Some(i) = r.values.iter().position(|v| !v.is_finite()) {
                bail!(
                    "reward of step {} for sample {i} (prompt `{}`: \"{}\") is {}; the iteration is not applied",
                    r.step,
                    prompts.records[i].id,
                    prompts.records[i].prompt,
                    r.values[i]
                );
            }
        }
        let values: Vec<Vec<f32>> = rewards.iter().map(|r| r.values.clone()).collect();
        let mut weights = self.weights.clone();
        if self.noise_weights {
            let stds: Vec<f32> = transitions.iter().map(|t| t.sde_std).collect();
            let noise = noise_aware_weights(&stds)?;
            for (t, w) in transitions.iter().zip(&noise) {
                ctx.metric(&format!("noise_weight_step{}", t.step), *w as f64);
            }
            weights = if weights.is_empty() {
                noise
            } else if weights.len() != noise.len() {
                bail!(
                    "`step_weights` has {} values for {} transitions",
                    weights.len(),
                    noise.len()
                );
            } else {
                weights.iter().zip(&noise).map(|(a, b)| a * b).collect()
            };
        }
        let weights = (!weights.is_empty()).then_some(weights.as_slice());
        let adv = step_advantages(
            &values,
            &prompts.group,
            transitions.len(),
            self.mode,
            self.scope,
            self.eps,
            weights,
        )?;
        for (k, r) in rewards.iter().enumerate() {
            let m = r.values.iter().map(|v| *v as f64).sum::<f64>() / r.values.len().max(1) as f64;
            ctx.metric(&format!("reward_step{}", k + 1), m);
        }
        let flat: Vec<f32> = adv.iter().flatten().copied().collect();
        ctx.metric(
            "abs_mean",
            flat.iter().map(|a| a.abs() as f64).sum::<f64>() / flat.len().max(1) as f64,
        );
        // Fraction of groups whose final rewards all tie (no learning signal).
        let last = &values[values.len() - 1];
        let g = prompts.groups();
        let mut tied = 0;
        for gi in 0..g {
            let vs: Vec<f32> = last
                .iter()
                .zip(&prompts.group)
                .filter(|(_, gg)| **gg == gi)
                .map(|(v, _)| *v)
                .collect();
            if vs.windows(2).all(|w| w[0] == w[1]) {
                tied += 1;
            }
        }
        ctx.metric("tied_groups", tied as f64 / g.max(1) as f64);
        if ctx.summaries_enabled() {
            for r in &rewards {
                let vals = r.values.iter().map(|v| *v as f64).collect();
                ctx.histogram(&format!("reward/step{}", r.step), vals);
            }
            for (a, t) in adv.iter().zip(&transitions) {
                let vals = a.iter().map(|v| *v as f64).collect();
                ctx.histogram(&format!("advantage/step{}", t.step), vals);
            }
            let n = ctx.images_due();
            if n > 0 && inputs.has("images") {
                let images = inputs.all::<Images>("images")?;
                show_predictions(ctx, &images, &rewards, prompts, n)?;
            }
        }
        Ok(Outputs::new().with(
            "advantages",
            Advantages {
                values: adv,
                mode: self.mode_name.clone(),
                mask: None,
            },
        ))
    }
}

/// The samples a handful of `n` images shows out of `batch`: spread evenly, so that several
/// prompt groups appear.
pub fn shown_samples(batch: usize, n: usize) -> Vec<usize> {
    let n = n.min(batch);
    (0..n).map(|j| j * batch / n.max(1)).collect()
}

/// `n` of each step's predictions as TensorBoard images, captioned with prompt and reward.
fn show_predictions(
    ctx: &NodeCtx,
    images: &[&Images],
    rewards: &[&Rewards],
    prompts: &PromptBatch,
    n: usize,
) -> Result<()> {
    let mut table = String::from("| step | sample | reward | prompt |\n|---:|---:|---:|---|\n");
    for (im, r) in images.iter().zip(rewards) {
        let [c, h, w] = im.image_shape();
        if c != 3 {
            bail!(
                "step_advantage `{}`: input `images` holds {c}-channel images: connect the RGB \
                 images the rewards scored (decoded with `vae_decode`), not latents",
                ctx.id
            );
        }
        let batch = im.batch();
        let rows = shown_samples(batch, n);
        let idx = crate::model::int_tensor_from_vec(
            rows.iter().map(|&i| i as i64).collect(),
            [rows.len()],
            &im.tensor.device(),
        );
        let host = crate::types::to_vec(&im.tensor.clone().select(0, idx))?;
        for (j, (&i, chw)) in rows.iter().zip(host.chunks(3 * h * w)).enumerate() {
            let rgb = chw_to_rgb8(chw, h, w)?;
            let prompt = prompts.records.get(i).map_or("", |p| p.prompt.as_str());
            let reward = r.values.get(i).copied().unwrap_or(f32::NAN);
            let caption = format!("sample {i}, reward {reward:.4}: {prompt}");
            ctx.image(
                &format!("x0/step{}/{j}", r.step),
                &caption,
                w as u32,
                h as u32,
                3,
                rgb,
            )?;
            table.push_str(&format!(
                "| {} | {i} | {reward:.4} | {} |\n",
                r.step,
                prompt.replace('|', "\\|")
            ));
        }
    }
    ctx.text("x0/captions", &table);
    Ok(())
}
