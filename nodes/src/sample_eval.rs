//! `sample_eval`: sample the evaluation prompts and report verifier accuracy per category and
//! per number of sampling steps (the pipeline's view of `flowrun eval`).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::Result;
use burn::tensor::{Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use runner::{
    Inputs, Node, NodeCtx, NodeType, Outputs, ParamDef, ParamKind, ParamValue, Registry,
    ResourceSlot,
};

use crate::flow_model::{FlowModelRes, TYPE};
use crate::grpo::LinearGaussian;
use crate::model::{
    Conditioning, FlowModel, VelocityModel, sample_euler, sample_standard_normal, tensor_from_vec,
};
use crate::prompt_loader::{load_prompts, make_batch};
use crate::types::to_vec;
use crate::world::{self, IMAGE_LEN, PromptRecord};

pub fn register(r: &mut Registry) {
    r.add_node(NodeType {
        name: "sample_eval",
        summary: "sample evaluation prompts and log verifier accuracy per category and step count",
        doc: "For each number of steps in `steps`, samples every prompt of `prompts` once (fixed\n\
              noise seeds, so runs are comparable) with the chosen sampler and logs\n\
              `acc_<n>step` (overall) and `acc_<n>step/<category>`, plus held-out accuracy when the\n\
              file has `eval_heldout` prompts. Writes a PNG grid of the first prompts to\n\
              <run>/samples/ and, as images `grid/Nstep`, to TensorBoard. Use `every: N` to run it\n\
              periodically.",
        inputs: vec![],
        outputs: vec![],
        params: vec![
            ParamDef::new("prompts", ParamKind::Path, "JSONL prompts with targets").default(ParamValue::Str(
                "datasets/shapes/eval.jsonl".into(),
            )),
            ParamDef::int("limit", 0, 0, i64::MAX, "use the first N prompts per split (0 = all)"),
            ParamDef::new("steps", ParamKind::IntList { min: 1, max: 1000 }, "numbers of sampling steps")
                .default(ParamValue::IntList(vec![1, 2, 4, 40])),
            ParamDef::choice("sampler", "euler", &["euler", "tafs"], "deterministic Euler ODE, or TAFS re-noising"),
            ParamDef::float("tau", 1.0, 0.0, 1.0, "TAFS temperature of the first re-noising (sampler: tafs)"),
            ParamDef::float(
                "tau_end",
                -1.0,
                -1.0,
                1.0,
                "TAFS temperature at step K, linear from `tau` over the K steps like a pipeline's `{schedule: linear}` repeat var (-1 = constant `tau`)",
            ),
            ParamDef::float("cfg", 1.0, 0.0, 50.0, "classifier-free guidance scale (1 = off)"),
            ParamDef::int("batch", 64, 1, 4096, "sampling batch size"),
            ParamDef::int("seed", 1234, 0, i64::MAX, "noise seed (fixed across evaluations)"),
            ParamDef::int("grid", 16, 0, 256, "prompts shown in the PNG grid (0 = none)"),
        ],
        resources: vec![ResourceSlot {
            name: "model",
            ty: TYPE,
            write: false,
            doc: "the model to evaluate",
        }],
        factory: |ctx| {
            let p = ctx.params;
            let mut records = load_prompts(Path::new(p.str("prompts")?))?;
            let limit = p.usize("limit")?;
            if limit > 0 {
                let mut per: BTreeMap<String, usize> = BTreeMap::new();
                records.retain(|r| {
                    let c = per.entry(r.split.as_str().to_string()).or_default();
                    *c += 1;
                    *c <= limit
                });
            }
            Ok(Box::new(SampleEval {
                records: records.into_iter().map(Arc::new).collect(),
                steps: p.usize_list("steps")?,
                tafs: p.str("sampler")? == "tafs",
                tau: p.f32("tau")?,
                tau_end: end_or(p.f32("tau_end")?, p.f32("tau")?),
                cfg: p.f32("cfg")?,
                batch: p.usize("batch")?,
                seed: p.i64("seed")? as u64,
                grid: p.usize("grid")?,
            }))
        },
    });
}

pub struct SampleEval {
    pub records: Vec<Arc<PromptRecord>>,
    pub steps: Vec<usize>,
    pub tafs: bool,
    pub tau: f32,
    /// τ at step K (the schedule is linear from `tau`; equal to `tau` for a constant one).
    pub tau_end: f32,
    pub cfg: f32,
    pub batch: usize,
    pub seed: u64,
    pub grid: usize,
}

/// Uniform timesteps 1 = t_1 > … > t_K for K-step samplers.
pub fn uniform_timesteps(k: usize) -> Vec<f32> {
    (0..k).map(|i| 1.0 - i as f32 / k as f32).collect()
}

/// A negative `tau_end` means "the same as `tau`" (a constant schedule).
pub fn end_or(tau_end: f32, tau: f32) -> f32 {
    if tau_end < 0.0 { tau } else { tau_end }
}

/// TAFS temperature of the re-noising after step `k` (0-based) of `steps`: linear from `tau.0`
/// at the first step to `tau.1` at step K, the values of a pipeline's
/// `tau: {schedule: linear, start, end}` repeat var (the last value is never used: the last
/// step does not re-noise).
pub fn tau_at(tau: (f32, f32), k: usize, steps: usize) -> f32 {
    if steps <= 1 {
        return tau.0;
    }
    tau.0 + (tau.1 - tau.0) * k as f32 / (steps - 1) as f32
}

/// TAFS sampling: predict x̂0, re-noise to the next timestep with temperature
/// [`tau_at`]`(tau, k, steps)` (`tau` = (first, at step K)), repeat; returns the last x̂0.
/// noise: [B, 3, H, W]
pub fn sample_tafs(
    model: &FlowModel,
    noise: Tensor<4>,
    tokens: Tensor<2, burn::tensor::Int>,
    steps: usize,
    tau: (f32, f32),
    cfg: f32,
    rng: &mut ChaCha8Rng,
) -> Tensor<4> {
    let ts = uniform_timesteps(steps.max(1));
    let [b, c, h, w] = noise.dims();
    let device = noise.device();
    let mut x = noise;
    let mut x0 = x.clone();
    for (k, &t) in ts.iter().enumerate() {
        let tt = Tensor::<1>::full([b], t, &device);
        let v = model.forward_cfg(x.clone(), tt, tokens.clone(), cfg);
        x0 = x.clone() - v.clone().mul_scalar(t);
        if let Some(&tn) = ts.get(k + 1) {
            let eps_hat = x.clone() + v.mul_scalar(1.0 - t);
            let fresh = tensor_from_vec(
                sample_standard_normal(rng, b * c * h * w),
                [b, c, h, w],
                &device,
            );
            let tau = tau_at(tau, k, steps);
            let keep = (1.0 - tau * tau).max(0.0).sqrt();
            x = x0.clone().mul_scalar(1.0 - tn)
                + (eps_hat.mul_scalar(keep) + fresh.mul_scalar(tau)).mul_scalar(tn);
        }
    }
    x0
}

/// TAFS sampling of any [`VelocityModel`] on a given schedule, step for step as the TAFS
/// pipelines' nodes compute it (`one_step_sampler`, then `annealed_renoiser`'s Gaussian step):
/// at each prediction time `ts[k]` (K values, decreasing, `ts[0]` the noise's time) x̂0 =
/// x − t·v_cfg(x, t); before the next step, x ← a·x + b·v + std·ε with the kernel of
/// [`LinearGaussian::tafs`]`(ts[k], ts[k+1], τ_k)`, τ_k = [`tau_at`]`(tau, k, K)`, and ε from
/// `fresh` (standard-normal, the state's shape). Returns the last x̂0.
///
/// noise: [B, C, H, W], cond: batch B → [B, C, H, W]
pub fn sample_tafs_schedule<M: VelocityModel>(
    model: &M,
    noise: Tensor<4>,
    cond: &Conditioning,
    ts: &[f32],
    tau: (f32, f32),
    cfg: f32,
    fresh: &mut dyn FnMut() -> Result<Tensor<4>>,
) -> Result<Tensor<4>> {
    if ts.is_empty() {
        anyhow::bail!("TAFS needs at least one timestep");
    }
    let [b, _, _, _] = noise.dims();
    let device = noise.device();
    let steps = ts.len();
    let mut x = noise;
    let mut x0 = x.clone();
    for (k, &t) in ts.iter().enumerate() {
        let tt = Tensor::<1>::full([b], t, &device);
        let v = model.velocity_cfg(x.clone(), tt, cond, cfg)?;
        x0 = x.clone() - v.clone().mul_scalar(t);
        if let Some(&tn) = ts.get(k + 1) {
            let kernel = LinearGaussian::tafs(t, tn, tau_at(tau, k, steps))?;
            let mean = x.mul_scalar(kernel.a) + v.mul_scalar(kernel.b);
            x = if kernel.is_stochastic() {
                mean + fresh()?.mul_scalar(kernel.std)
            } else {
                mean
            };
        }
    }
    Ok(x0)
}

/// Accuracy results: (steps, category or "all"/"heldout") → (correct, total).
pub type EvalTable = BTreeMap<(usize, String), (usize, usize)>;

/// Per step count, the first images sampled (for PNG grids).
pub type EvalGrids = Vec<(usize, Vec<Vec<f32>>)>;

impl SampleEval {
    /// Sample and score every prompt for every step count. Returns the table and, per step
    /// count, the first `grid` images.
    pub fn evaluate(&self, model: &FlowModel, device: &Device) -> Result<(EvalTable, EvalGrids)> {
        let mut table = EvalTable::new();
        let mut grids = Vec::new();
        for &steps in &self.steps {
            let mut shown = Vec::new();
            for (ci, chunk) in self.records.chunks(self.batch).enumerate() {
                let batch = make_batch(chunk, 1)?;
                let b = batch.len();
                // Noise depends only on (seed, chunk), so all step counts see the same noise.
                let mut rng =
                    ChaCha8Rng::seed_from_u64(self.seed ^ (ci as u64).wrapping_mul(0x9e37_79b9));
                let noise = tensor_from_vec(
                    sample_standard_normal(&mut rng, b * IMAGE_LEN),
                    [b, 3, 32, 32],
                    device,
                );
                let tokens = batch.tokens_tensor(device);
                let x0 = if self.tafs {
                    sample_tafs(
                        model,
                        noise,
                        tokens,
                        steps,
                        (self.tau, self.tau_end),
                        self.cfg,
                        &mut rng,
                    )
                } else {
                    sample_euler(model, noise, &tokens.into(), steps, self.cfg)?
                };
                let imgs = to_vec(&x0)?;
                for (i, rec) in chunk.iter().enumerate() {
                    let img = &imgs[i * IMAGE_LEN..(i + 1) * IMAGE_LEN];
                    let ev = world::evaluate(img, &rec.target)
                        .map_err(|e| anyhow::anyhow!("prompt `{}`: {e}", rec.id))?;
                    let heldout = rec.split == world::Split::EvalHeldout;
                    let keys = if heldout {
                        vec!["heldout".to_string()]
                    } else {
                        vec!["all".to_string(), rec.category.as_str().to_string()]
                    };
                    for key in keys {
                        let e = table.entry((steps, key)).or_default();
                        e.0 += ev.correct as usize;
                        e.1 += 1;
                    }
                    if shown.len() < self.grid {
                        shown.push(img.to_vec());
                    }
                }
            }
            grids.push((steps, shown));
        }
        Ok((table, grids))
    }
}

impl Node for SampleEval {
    fn run(&mut self, ctx: &NodeCtx, _: &Inputs) -> Result<Outputs> {
        let (model, device) = ctx.read("model", |m: &FlowModelRes| {
            Ok((m.sampling_model()?, m.device.clone()))
        })?;
        let (table, grids) = self.evaluate(&model, &device)?;
        for ((steps, key), (c, n)) in &table {
            let name = match key.as_str() {
                "all" => format!("acc_{steps}step"),
                k => format!("acc_{steps}step/{k}"),
            };
            ctx.metric(&name, *c as f64 / (*n).max(1) as f64);
        }
        if let Some(dir) = &ctx.run_dir {
            let out = dir.join("samples");
            std::fs::create_dir_all(&out)?;
            for (steps, imgs) in grids.iter().filter(|g| !g.1.is_empty()) {
                let p = out.join(format!("iter-{:06}-{steps}step.png", ctx.iteration));
                world::write_png_grid(&p, imgs, 8, 2)?;
            }
        }
        if ctx.summaries_enabled() {
            for (steps, imgs) in grids.iter().filter(|g| !g.1.is_empty()) {
                let (w, h, rgb) = world::grid_rgb8(imgs, 8, 2)?;
                let caption = format!(
                    "the first {} held-out prompts sampled in {steps} step(s)",
                    imgs.len()
                );
                ctx.image(
                    &format!("grid/{steps}step"),
                    &caption,
                    w as u32,
                    h as u32,
                    3,
                    rgb,
                )?;
            }
        }
        Ok(Outputs::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn should_anneal_tau_like_the_pipelines_linear_repeat_var() {
        // tafs_grpo.yaml: `tau: {schedule: linear, start: 1.0, end: 0.6}` over K = 4 steps;
        // its run logs renoise@1..3/tau = 1.0, 0.8667, 0.7333.
        let got: Vec<f32> = (0..3).map(|k| tau_at((1.0, 0.6), k, 4)).collect();
        for (g, want) in got.iter().zip([1.0, 0.866_666_7, 0.733_333_3]) {
            assert!((g - want).abs() < 1e-6, "{got:?}");
        }
        assert_eq!(tau_at((0.7, 0.2), 0, 1), 0.7);
        assert_eq!(tau_at((0.5, 0.5), 2, 4), 0.5);
        assert_eq!(end_or(-1.0, 0.3), 0.3);
        assert_eq!(end_or(0.6, 1.0), 0.6);
    }
}
