//! `flowrun sample` and `flowrun eval` on an SD3 / SD3.5 model: a diffusers folder or a flowrun
//! checkpoint of one, prompts from an embeddings file (`scripts/encode_prompts.py`), the
//! shifted flow-match schedule of diffusers' `FlowMatchEulerDiscreteScheduler`, latents decoded
//! by the pipeline's VAE.
//!
//! * Noise: sample `j` of prompt row `r` starts from its own standard-normal draw, seeded by
//!   (`--seed`, r, j) — an image does not change with the other prompts picked, the batch size
//!   or the device's batching; TAFS's fresh noise continues the same stream. `eval` uses seed
//!   1234 and j = 0 for every step count, as the ShapeWorld evaluation does.
//! * Sampling: `euler` is `StableDiffusion3Pipeline`'s loop, x ← x + (σ_{i+1} − σ_i)·v on the
//!   scheduler's sigmas after `set_timesteps(K)`; `tafs` is the TAFS pipelines' rollout
//!   (one-step prediction, annealed re-noising) at the first K of those sigmas.
//! * Decoding: `vae.decode(z / scaling_factor + shift_factor)`, clamped to [-1, 1].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use burn::tensor::{Device, Tensor};
use nodes::checks::conditioning::width_mismatch;
use nodes::device::{device, parse_device};
use nodes::flow_match_schedule::{read_scheduler_config, sigmas};
use nodes::http_reward::{Encoding, RewardClient};
use nodes::model::checkpoint::{NamedTensor, SafetensorsFile, serialize_safetensors};
use nodes::model::sd3::{Sd3Config, Sd3Transformer, load_diffusers, read_config};
use nodes::model::text_embeddings::PromptEmbeddings;
use nodes::model::{sample_euler_sigmas, sample_standard_normal, tensor_from_vec};
use nodes::prompt_loader::{embedded_prompts, make_embedded_batch};
use nodes::sample_eval::sample_tafs_schedule;
use nodes::types::{Prompt, PromptBatch, to_vec};
use nodes::vae::VaeRes;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::plot::{self, Canvas};
use crate::tools::{ModelSource, input_f32, load_sd3};

/// The help heading of the SD3-only flags.
pub const HEADING: &str = "SD3 / SD3.5 models (a diffusers folder or a flowrun SD3 checkpoint)";

/// The flow-match shift when neither `--shift` nor a scheduler config gives one: SD3's and
/// SD3.5's `scheduler_config.json`.
pub const DEFAULT_SHIFT: f64 = 3.0;
/// Samples per transformer forward and VAE decode without `--batch`.
pub const DEFAULT_BATCH: usize = 4;
/// Prompts `sample` takes from the file without `--prompt` / `--prompt-id`.
pub const DEFAULT_NUM_PROMPTS: usize = 4;
/// The most images one `sample` makes (a grid side is at most 32768 px anyway).
pub const MAX_IMAGES: usize = 1 << 20;
/// The noise seed of `eval` (the ShapeWorld evaluation's).
pub const EVAL_SEED: u64 = 1234;
/// JPEG quality of `--reward compressibility` (DDPO's, `compressibility_reward`'s default).
pub const JPEG_QUALITY: u8 = 95;

/// The flags `sample` and `eval` share for SD3 models.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct Sd3Opts {
    /// The prompt embeddings (scripts/encode_prompts.py's --out: the .safetensors file or its
    /// .index.json), with the negative prompt CFG uses. Required for an SD3 model.
    #[arg(long, value_name = "FILE", help_heading = HEADING)]
    pub embeddings: Option<PathBuf>,
    /// The VAE that decodes the latents: a diffusers pipeline folder or its vae/ folder
    /// [default: the vae/ of the pipeline folder --checkpoint is, or whose transformer/ it is;
    /// required for a flowrun checkpoint].
    #[arg(long, value_name = "DIR", help_heading = HEADING)]
    pub vae: Option<PathBuf>,
    /// The flow-match schedule's shift, σ ↦ shift·σ / (1 + (shift − 1)·σ) [default: `shift`
    /// of the pipeline's scheduler/scheduler_config.json (of --checkpoint's, else --vae's
    /// pipeline folder), else 3.0 as SD3 and SD3.5 ship].
    #[arg(long, help_heading = HEADING)]
    pub shift: Option<f64>,
    /// Image height in pixels, a multiple of the VAE's scale factor (8 for SD3) times the
    /// patch size [default: the transformer's sample_size × the scale factor: 1024 for SD3
    /// Medium and SD3.5 Medium/Large, as diffusers' pipeline].
    #[arg(long, value_name = "PX", help_heading = HEADING)]
    pub height: Option<usize>,
    /// Image width in pixels (as --height).
    #[arg(long, value_name = "PX", help_heading = HEADING)]
    pub width: Option<usize>,
    /// Samples per transformer forward and per VAE decode (memory) [default: 4]; each image's
    /// noise is its own, so the images do not depend on it (up to float rounding).
    #[arg(long, value_name = "N", help_heading = HEADING)]
    pub batch: Option<usize>,
}

impl Sd3Opts {
    /// The SD3-only flags given, as spelt on the command line.
    pub fn given(&self) -> Vec<&'static str> {
        [
            ("--embeddings", self.embeddings.is_some()),
            ("--vae", self.vae.is_some()),
            ("--shift", self.shift.is_some()),
            ("--height", self.height.is_some()),
            ("--width", self.width.is_some()),
            ("--batch", self.batch.is_some()),
        ]
        .into_iter()
        .filter_map(|(f, on)| on.then_some(f))
        .collect()
    }
}

/// How the latents are sampled.
#[derive(Debug, Clone, Copy)]
pub struct Sampler<'a> {
    /// `euler` or `tafs`.
    pub name: &'a str,
    pub steps: usize,
    /// TAFS temperature (first, at step K).
    pub tau: (f32, f32),
    pub cfg: f32,
}

/// The schedule's settings and where they came from.
struct Schedule {
    shift: f64,
    num_train_timesteps: u32,
    from: String,
}

/// A loaded SD3 model with its VAE, prompts and image size.
struct Setup {
    model: Sd3Transformer,
    store: PromptEmbeddings,
    embeddings: PathBuf,
    vae: VaeRes,
    schedule: Schedule,
    /// Latent [C, h, w].
    latent: [usize; 3],
    /// The VAE's scale factor (pixels per latent).
    upscale: usize,
    batch: usize,
    device: Device,
}

impl Setup {
    fn pixels(&self) -> (usize, usize) {
        (self.latent[1] * self.upscale, self.latent[2] * self.upscale)
    }
}

/// The diffusers pipeline folder a model source belongs to: the folder itself
/// (`model_index.json`), or the one a transformer folder sits in.
fn pipeline_dir(source: &ModelSource) -> Option<PathBuf> {
    let ModelSource::Diffusers(dir) = source else {
        return None;
    };
    if dir.join("model_index.json").is_file() {
        return Some(dir.clone());
    }
    let parent = dir.canonicalize().ok()?.parent()?.to_path_buf();
    parent.join("model_index.json").is_file().then_some(parent)
}

/// Loads everything an SD3 `sample`/`eval` needs, checking the cheap things first (flags,
/// embeddings, VAE, sizes) so that a mistake is reported before a large transformer loads.
/// `latent_hw`: the latent size of a `--latents` file.
fn setup(
    checkpoint: &Path,
    source: &ModelSource,
    o: &Sd3Opts,
    dev: &str,
    latent_hw: Option<(usize, usize)>,
) -> Result<Setup> {
    let kind = parse_device(dev).map_err(anyhow::Error::msg)?;
    let device = device(kind);
    let shown = checkpoint.display();
    let batch = o.batch.unwrap_or(DEFAULT_BATCH);
    if batch == 0 {
        bail!("--batch must be at least 1");
    }
    let Some(embeddings) = o.embeddings.clone() else {
        bail!(
            "{shown} is an SD3 model, which is conditioned on encoded prompts: give --embeddings \
             FILE (written by scripts/encode_prompts.py with this model's text encoders)"
        );
    };
    let store = PromptEmbeddings::open(&embeddings).context("--embeddings")?;
    if store.is_empty() {
        bail!("--embeddings {} holds no prompts", embeddings.display());
    }
    let pipeline = pipeline_dir(source);
    let vae_path = match (&o.vae, &pipeline) {
        (Some(v), _) => v.clone(),
        (None, Some(p)) if p.join("vae").join("config.json").is_file() => p.clone(),
        (None, Some(p)) => bail!(
            "the pipeline folder {} has no vae/ to decode the latents with: give --vae DIR (a \
             diffusers pipeline folder or its vae/ folder)",
            p.display()
        ),
        (None, None) => bail!(
            "{shown} holds the transformer only, no VAE to decode the latents with: give --vae \
             DIR (the diffusers pipeline folder the model comes from, or its vae/ folder)"
        ),
    };
    let schedule = match o.shift {
        Some(s) if !(s.is_finite() && s > 0.0) => {
            bail!("--shift {s} is not a flow-match shift: give a number > 0 (SD3: 3.0, 1 = none)")
        }
        Some(s) => Schedule {
            shift: s,
            num_train_timesteps: 1000,
            from: "--shift".into(),
        },
        None => {
            // The model's pipeline folder, else the VAE's when that is a pipeline folder.
            let vae_pipeline = o
                .vae
                .as_ref()
                .filter(|v| v.join("model_index.json").is_file())
                .cloned();
            let mut found = None;
            for dir in pipeline.iter().chain(vae_pipeline.iter()) {
                if let Some(c) = read_scheduler_config(dir)? {
                    found = Some(c);
                    break;
                }
            }
            match found {
                Some(c) => Schedule {
                    shift: c.shift,
                    num_train_timesteps: c.num_train_timesteps,
                    from: c.path.display().to_string(),
                },
                None => Schedule {
                    shift: DEFAULT_SHIFT,
                    num_train_timesteps: 1000,
                    from: "SD3's default; no scheduler_config.json found".into(),
                },
            }
        }
    };
    // A diffusers folder's config is read before its weights, so that a mismatch is found
    // before a large model loads; a flowrun checkpoint's comes with its weights (after the VAE).
    let check_widths = |config: &Sd3Config, config_file: Option<&Path>| -> Result<()> {
        let described = match config_file {
            Some(f) => format!("{shown} ({})", f.display()),
            None => shown.to_string(),
        };
        match width_mismatch(
            &format!("--embeddings {}", embeddings.display()),
            &store,
            &described,
            config,
        ) {
            Some(msg) => bail!("{msg}"),
            None => Ok(()),
        }
    };
    if let ModelSource::Diffusers(dir) = source {
        let (file, config) = read_config(dir)?;
        check_widths(&config, Some(&file))?;
    }
    let vae = VaeRes::load(&vae_path, &device)
        .with_context(|| format!("--vae {}", vae_path.display()))?;
    let model = match source {
        ModelSource::Diffusers(dir) => {
            // The size checks need only the config: the weights load last.
            let (_, config) = read_config(dir)?;
            check_vae(&config, &vae, &vae_path, checkpoint)?;
            latent_size(&config, vae.config.upscale(), o, latent_hw)?;
            load_diffusers(dir, &device)?.1
        }
        ModelSource::Checkpoint { .. } => {
            let m = load_sd3(checkpoint, source, &device)?;
            check_widths(m.config(), None)?;
            m
        }
    };
    let config = model.config().clone();
    check_vae(&config, &vae, &vae_path, checkpoint)?;
    let upscale = vae.config.upscale();
    let latent = latent_size(&config, upscale, o, latent_hw)?;
    Ok(Setup {
        model,
        store,
        embeddings,
        vae,
        schedule,
        latent,
        upscale,
        batch,
        device,
    })
}

/// The VAE must decode what the transformer makes, and the transformer must make a velocity of
/// its input's shape.
fn check_vae(config: &Sd3Config, vae: &VaeRes, vae_path: &Path, checkpoint: &Path) -> Result<()> {
    if config.in_channels != config.output_channels() {
        bail!(
            "the transformer of {} takes {}-channel latents but outputs {} channels: a \
             flow-matching velocity has its state's shape, so it cannot be sampled",
            checkpoint.display(),
            config.in_channels,
            config.output_channels()
        );
    }
    if vae.config.latent_channels != config.output_channels() {
        bail!(
            "the VAE in {} decodes {}-channel latents, but the transformer of {} makes \
             {}-channel ones: give the VAE of this model's pipeline (--vae)",
            vae_path.display(),
            vae.config.latent_channels,
            checkpoint.display(),
            config.output_channels()
        );
    }
    Ok(())
}

/// The latent [C, h, w] from `--height`/`--width` (pixels) or a `--latents` file's size.
fn latent_size(
    config: &Sd3Config,
    upscale: usize,
    o: &Sd3Opts,
    latent_hw: Option<(usize, usize)>,
) -> Result<[usize; 3]> {
    let c = config.in_channels;
    let default_px = config.sample_size * upscale;
    let (h, w) = match latent_hw {
        Some((h, w)) => {
            for (flag, px, lat) in [("--height", o.height, h), ("--width", o.width, w)] {
                if let Some(px) = px
                    && px != lat * upscale
                {
                    bail!(
                        "{flag} {px} disagrees with --latents, whose {lat} latents make {} px \
                         (leave {flag} out)",
                        lat * upscale
                    );
                }
            }
            (h, w)
        }
        None => {
            let side = |flag: &str, px: Option<usize>| -> Result<usize> {
                let px = px.unwrap_or(default_px);
                if px == 0 || !px.is_multiple_of(upscale) {
                    bail!(
                        "{flag} {px} is not a positive multiple of the VAE's scale factor \
                         {upscale} (pixels per latent)"
                    );
                }
                Ok(px / upscale)
            };
            (side("--height", o.height)?, side("--width", o.width)?)
        }
    };
    config.check_latent_size(h, w).map_err(|e| {
        anyhow::anyhow!(
            "images of {}x{} px are {h}x{w} latents: {e} (choose --height/--width accordingly)",
            h * upscale,
            w * upscale
        )
    })?;
    Ok([c, h, w])
}

/// The noise stream of sample `j` of prompt row `row` under `seed`.
fn noise_rng(seed: u64, row: usize, j: usize) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(runner::stream_seed(
        seed,
        &format!("prompt-{row}"),
        j as u64,
        "noise",
    ))
}

/// The latents and decoded images of a batch.
struct Generated {
    /// [B, C, h, w] initial states.
    noise: Vec<f32>,
    /// [B, C, h, w] sampled latents.
    latents: Vec<f32>,
    /// [B, 3, H, W] in [-1, 1].
    images: Vec<f32>,
}

/// Samples every member of `batch` (sample i from `rngs[i]`, or from `init`'s i-th state),
/// `s.batch` at a time, and decodes the latents.
fn generate(
    s: &Setup,
    batch: &PromptBatch,
    rngs: &mut [ChaCha8Rng],
    init: Option<&[f32]>,
    sampler: Sampler,
) -> Result<Generated> {
    let [c, h, w] = s.latent;
    let n = c * h * w;
    let sig = sigmas(
        sampler.steps,
        s.schedule.shift,
        s.schedule.num_train_timesteps,
    );
    let (ph, pw) = s.pixels();
    let mut out = Generated {
        noise: Vec::with_capacity(batch.len() * n),
        latents: Vec::with_capacity(batch.len() * n),
        images: Vec::with_capacity(batch.len() * 3 * ph * pw),
    };
    let all: Vec<usize> = (0..batch.len()).collect();
    for idx in all.chunks(s.batch) {
        let b = idx.len();
        let mut x = Vec::with_capacity(b * n);
        for &i in idx {
            // Drawn either way, so that TAFS's fresh noise does not depend on --latents: a
            // run's --save-latents file given back as --latents reproduces it.
            let drawn = sample_standard_normal(&mut rngs[i], n);
            match init {
                Some(v) => x.extend_from_slice(&v[i * n..(i + 1) * n]),
                None => x.extend(drawn),
            }
        }
        out.noise.extend_from_slice(&x);
        let x = tensor_from_vec(x, [b, c, h, w], &s.device);
        let cond = batch.conditioning_rows(idx, &s.device);
        let z = match sampler.name {
            "tafs" => {
                let device = s.device.clone();
                let mut fresh = || -> Result<Tensor<4>> {
                    let mut e = Vec::with_capacity(b * n);
                    for &i in idx {
                        e.extend(sample_standard_normal(&mut rngs[i], n));
                    }
                    Ok(tensor_from_vec(e, [b, c, h, w], &device))
                };
                sample_tafs_schedule(
                    &s.model,
                    x,
                    &cond,
                    &sig[..sampler.steps],
                    sampler.tau,
                    sampler.cfg,
                    &mut fresh,
                )?
            }
            _ => sample_euler_sigmas(&s.model, x, &cond, &sig, sampler.cfg)?,
        };
        let img = s.vae.decoder.decode(z.clone()).clamp(-1.0, 1.0);
        out.latents.extend(to_vec(&z)?);
        out.images.extend(to_vec(&img)?);
    }
    if let Some(bad) = out.latents.iter().find(|v| !v.is_finite()) {
        bail!(
            "sampling produced a non-finite latent ({bad}): the model's weights or the \
             embeddings hold non-finite values, or --cfg is too large"
        );
    }
    Ok(out)
}

/// Unguided sampling is rarely what an SD3 user wants: say so (the default stays ShapeWorld's).
fn note_cfg(cfg: f32) {
    if cfg <= 1.0 {
        println!(
            "note: --cfg {cfg} samples without guidance; SD3 models are usually sampled with \
             --cfg 4.5 (SD3.5, the SD3 pipelines) to 7 (SD3 Medium, diffusers' default)"
        );
    }
}

/// Checks the sampler's settings.
fn check_sampler(s: &Sampler) -> Result<()> {
    if s.steps == 0 {
        bail!("--steps must be at least 1");
    }
    if !s.cfg.is_finite() || s.cfg < 0.0 {
        bail!(
            "--cfg {} is not a guidance scale: give a number >= 0 (1 = off)",
            s.cfg
        );
    }
    Ok(())
}

/// The prompts `sample` draws: `--prompt` texts, then `--prompt-id`s, else the first
/// `--num-prompts`.
pub fn pick_prompts(
    store: &PromptEmbeddings,
    emb: &Path,
    texts: &[String],
    ids: &[String],
    num: Option<usize>,
) -> Result<Vec<Arc<Prompt>>> {
    let all = embedded_prompts(store);
    let shown = emb.display();
    if all.is_empty() {
        bail!("--embeddings {shown} holds no prompts");
    }
    if texts.is_empty() && ids.is_empty() {
        let n = num.unwrap_or(DEFAULT_NUM_PROMPTS);
        if n == 0 {
            bail!("--num-prompts must be at least 1");
        }
        return Ok(all.into_iter().take(n).collect());
    }
    if num.is_some() {
        bail!(
            "--num-prompts takes the first prompts of --embeddings; it does not go with \
             --prompt or --prompt-id"
        );
    }
    let norm = |s: &str| {
        s.split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .to_lowercase()
    };
    let mut out = Vec::new();
    for t in texts {
        let found = all
            .iter()
            .find(|p| p.prompt == *t)
            .or_else(|| all.iter().find(|p| norm(&p.prompt) == norm(t)));
        match found {
            Some(p) => out.push(p.clone()),
            None => {
                let hint = runner::diag::did_you_mean(t, all.iter().map(|p| p.prompt.as_str()))
                    .map(|s| format!(" (did you mean \"{s}\"?)"))
                    .unwrap_or_default();
                bail!(
                    "--prompt \"{t}\" is not a prompt of --embeddings {shown}{hint}: an SD3 \
                     model samples prompts encoded beforehand (scripts/encode_prompts.py); \
                     its {} prompts are listed in its .jsonl sidecar, or pick one by row with \
                     --prompt-id",
                    all.len()
                );
            }
        }
    }
    for id in ids {
        let found = all
            .iter()
            .find(|p| p.id == *id)
            .or_else(|| id.trim().parse::<usize>().ok().and_then(|row| all.get(row)));
        match found {
            Some(p) => out.push(p.clone()),
            None => bail!(
                "--prompt-id {id}: --embeddings {shown} has no prompt with that id, nor that \
                 row (rows 0 to {})",
                all.len() - 1
            ),
        }
    }
    Ok(out)
}

/// `flowrun sample`'s SD3-only arguments.
pub struct SampleSd3<'a> {
    pub prompts: &'a [String],
    pub prompt_ids: &'a [String],
    pub num_prompts: Option<usize>,
    pub seeds: usize,
    pub seed: u64,
    pub out: &'a Path,
    pub latents: Option<&'a Path>,
    pub save_latents: Option<&'a Path>,
}

/// Reads `latents` [B, C, h, w] of a `--latents` file.
fn read_latents(path: &Path, b: usize) -> Result<(Vec<usize>, Vec<f32>)> {
    let file = SafetensorsFile::read(path).context("--latents")?;
    let shown = path.display();
    let Some((shape, values)) = input_f32(&file, "latents")? else {
        bail!(
            "--latents {shown} has no tensor `latents` [B, C, h, w] (the initial noise, one \
             state per image: prompts × --seeds, prompt by prompt)"
        );
    };
    match shape.as_slice() {
        [n, _, h, w] if *n == b && *h > 0 && *w > 0 => Ok((shape, values)),
        _ => bail!(
            "--latents {shown}: `latents` is {shape:?}; expected [{b}, C, h, w] (one state per \
             image: prompts × --seeds = {b})"
        ),
    }
}

/// `flowrun sample` on an SD3 model: the grid, and optionally the latents.
pub fn sample(
    checkpoint: &Path,
    source: &ModelSource,
    o: &Sd3Opts,
    a: &SampleSd3,
    sampler: Sampler,
    dev: &str,
) -> Result<()> {
    check_sampler(&sampler)?;
    if a.seeds == 0 {
        bail!("--seeds must be at least 1 (images per prompt)");
    }
    // The prompts first (their errors need only the embeddings file).
    let emb = o
        .embeddings
        .as_deref()
        .ok_or_else(|| {
            anyhow::anyhow!(
                "{} is an SD3 model, which is conditioned on encoded prompts: give --embeddings \
                 FILE (written by scripts/encode_prompts.py with this model's text encoders)",
                checkpoint.display()
            )
        })?
        .to_path_buf();
    let store = PromptEmbeddings::open(&emb).context("--embeddings")?;
    let chosen = pick_prompts(&store, &emb, a.prompts, a.prompt_ids, a.num_prompts)?;
    drop(store);
    let b = chosen
        .len()
        .checked_mul(a.seeds)
        .filter(|&b| b <= MAX_IMAGES)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "{} prompts × --seeds {} is more than {MAX_IMAGES} images",
                chosen.len(),
                a.seeds
            )
        })?;
    let init = a.latents.map(|p| read_latents(p, b)).transpose()?;
    let hw = init.as_ref().map(|(s, _)| (s[2], s[3]));
    let s = setup(checkpoint, source, o, dev, hw)?;
    if let Some((shape, _)) = &init
        && shape[1] != s.latent[0]
    {
        bail!(
            "--latents {}: `latents` has {} channels; the transformer takes in_channels = {}",
            a.latents
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            shape[1],
            s.latent[0]
        );
    }
    let batch = make_embedded_batch(&s.store, &chosen, a.seeds)?;
    let mut rngs: Vec<ChaCha8Rng> = (0..b)
        .map(|i| {
            let row = chosen[i / a.seeds].embedding_row.unwrap_or(0);
            noise_rng(a.seed, row, i % a.seeds)
        })
        .collect();
    let g = generate(
        &s,
        &batch,
        &mut rngs,
        init.as_ref().map(|(_, v)| v.as_slice()),
        sampler,
    )?;
    let (ph, pw) = s.pixels();
    let labels: Vec<String> = chosen.iter().map(|p| p.prompt.clone()).collect();
    let grid = grid(&g.images, ph, pw, a.seeds, &labels)?;
    let bytes = nodes::world::png::encode_rgb8(grid.width, grid.height, &grid.pixels)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    runner::fsutil::write_atomic(a.out, &bytes)
        .with_context(|| format!("writing {}", a.out.display()))?;
    if let Some(p) = a.save_latents {
        let [c, h, w] = s.latent;
        let tensors = [
            NamedTensor {
                name: "latents".into(),
                shape: vec![b, c, h, w],
                values: g.noise,
            },
            NamedTensor {
                name: "sampled".into(),
                shape: vec![b, c, h, w],
                values: g.latents,
            },
            NamedTensor {
                name: "images".into(),
                shape: vec![b, 3, ph, pw],
                values: g.images,
            },
        ];
        let meta = [
            ("sampler", sampler.name.to_string()),
            ("steps", sampler.steps.to_string()),
            ("cfg", sampler.cfg.to_string()),
            ("shift", s.schedule.shift.to_string()),
            (
                "prompt_rows",
                chosen
                    .iter()
                    .map(|p| p.embedding_row.unwrap_or(0).to_string())
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            ("seeds", a.seeds.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (format!("flowrun.{k}"), v))
        .collect();
        let bytes = serialize_safetensors(&tensors, meta)?;
        runner::fsutil::write_atomic(p, &bytes)
            .with_context(|| format!("writing {}", p.display()))?;
        println!(
            "wrote {} (latents and sampled [{b}, {c}, {h}, {w}], images [{b}, 3, {ph}, {pw}])",
            p.display()
        );
    }
    println!(
        "wrote {} ({} prompts × {} seeds, {} {} steps, shift {} ({}), cfg {}, {ph}x{pw} px)",
        a.out.display(),
        chosen.len(),
        a.seeds,
        sampler.steps,
        sampler.name,
        s.schedule.shift,
        s.schedule.from,
        sampler.cfg
    );
    note_cfg(sampler.cfg);
    for (i, p) in chosen.iter().enumerate() {
        println!(
            "  row {}: {} (prompt {}, row {} of {})",
            i + 1,
            p.prompt,
            p.id,
            p.embedding_row.unwrap_or(0),
            s.embeddings.display()
        );
    }
    Ok(())
}

/// The smallest cell side: smaller images are enlarged (nearest neighbour) to at least this.
const MIN_CELL: usize = 64;
const GUTTER: usize = nodes::world::png::GUTTER;
const GUTTER_RGB: plot::Rgb = [32, 32, 32];
const LABEL_RGB: plot::Rgb = [235, 235, 235];

/// The grid's geometry for `rows` × `cols` images of `h` × `w` px: (enlargement, text scale,
/// label strip height, width, height). Each row is a label strip with the prompt's text above
/// its images; cells and strips are separated by [`GUTTER`]-px dark gutters.
pub fn grid_layout(
    rows: usize,
    cols: usize,
    h: usize,
    w: usize,
) -> (usize, usize, usize, usize, usize) {
    let scale = MIN_CELL.div_ceil(h.max(w).max(1)).clamp(1, 16);
    let (ch, cw) = (h * scale, w * scale);
    let text = (cw * cols / 256).clamp(1, 4);
    let label = (plot::LINE_H + 4) * text;
    let width = cols * cw + (cols + 1) * GUTTER;
    let height = rows * (label + ch) + (rows + 1) * GUTTER;
    (scale, text, label, width, height)
}

/// The PNG grid: a row per prompt (`cols` images each, CHW in [-1, 1]) under its label.
fn grid(images: &[f32], h: usize, w: usize, cols: usize, labels: &[String]) -> Result<Canvas> {
    let rows = labels.len();
    let (scale, text, label, width, height) = grid_layout(rows, cols, h, w);
    if width > 1 << 15 || height > 1 << 15 {
        bail!(
            "a grid of {width}x{height} px is too large for a PNG: fewer --seeds or prompts, or \
             smaller --height/--width"
        );
    }
    let (ch, cw) = (h * scale, w * scale);
    let mut c = Canvas::new(width, height, GUTTER_RGB);
    let per = 3 * h * w;
    for (r, text_label) in labels.iter().enumerate() {
        let y0 = GUTTER + r * (label + ch + GUTTER);
        let fits = (width - 2 * GUTTER) / (plot::ADVANCE * text);
        c.text(
            GUTTER as i64,
            (y0 + 2 * text) as i64,
            &plot::truncate(text_label, fits.max(3)),
            text,
            LABEL_RGB,
        );
        for j in 0..cols {
            let k = r * cols + j;
            let rgb = nodes::world::chw_to_rgb8(&images[k * per..(k + 1) * per], h, w)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let big = if scale == 1 {
                rgb
            } else {
                let mut big = vec![0u8; ch * cw * 3];
                for y in 0..ch {
                    for x in 0..cw {
                        let src = ((y / scale) * w + x / scale) * 3;
                        big[(y * cw + x) * 3..][..3].copy_from_slice(&rgb[src..src + 3]);
                    }
                }
                big
            };
            let x0 = GUTTER + j * (cw + GUTTER);
            c.blit(x0 as i64, (y0 + label) as i64, cw, ch, &big);
        }
    }
    Ok(c)
}

/// How `eval` scores the decoded images.
pub enum Reward {
    /// JPEG size in kB at [`JPEG_QUALITY`], negated (`compressibility`) or not.
    Jpeg { incompressible: bool },
    /// A `flowrun-reward/1` server.
    Server(RewardClient),
}

impl Reward {
    /// From `--reward` / `--reward-url`: exactly one.
    pub fn parse(name: Option<&str>, url: Option<&str>) -> Result<Self> {
        match (name, url) {
            (Some(_), Some(_)) => bail!(
                "give one of --reward (a built-in reward) and --reward-url (a reward server), \
                 not both"
            ),
            (None, None) => bail!(
                "an SD3 model has no built-in verifier: score its images with --reward \
                 compressibility (or incompressibility: DDPO's JPEG size) or --reward-url URL (a \
                 flowrun-reward/1 server, README \"Reward plug-ins\")"
            ),
            (Some("compressibility"), None) => Ok(Reward::Jpeg {
                incompressible: false,
            }),
            (Some("incompressibility"), None) => Ok(Reward::Jpeg {
                incompressible: true,
            }),
            (Some(other), None) => {
                bail!("--reward {other}: use compressibility or incompressibility")
            }
            (None, Some(u)) => Ok(Reward::Server(
                RewardClient::new(u, Encoding::Png, 32, 2, 60.0, 3, 1.0).context("--reward-url")?,
            )),
        }
    }

    fn describe(&self) -> String {
        match self {
            Reward::Jpeg {
                incompressible: false,
            } => format!("compressibility (−JPEG kB at quality {JPEG_QUALITY})"),
            Reward::Jpeg {
                incompressible: true,
            } => format!("incompressibility (+JPEG kB at quality {JPEG_QUALITY})"),
            Reward::Server(c) => format!("server {}", c.url()),
        }
    }

    /// One reward per image of `batch`.
    fn score(
        &self,
        images: &[f32],
        (h, w): (usize, usize),
        batch: &PromptBatch,
        steps: usize,
    ) -> Result<Vec<f64>> {
        match self {
            Reward::Jpeg { incompressible } => {
                let sign = if *incompressible { 1.0 } else { -1.0 };
                images
                    .chunks(3 * h * w)
                    .map(|im| {
                        let bytes =
                            nodes::compressibility_reward::jpeg_size_hw(im, h, w, JPEG_QUALITY)?;
                        Ok(sign * bytes as f64 / 1000.0)
                    })
                    .collect()
            }
            Reward::Server(client) => {
                let where_ = format!("evaluating {steps}-step samples");
                let scored = client.score(images, (h, w), batch, (0, 0, 0.0), &where_)?;
                if let Some(i) = scored.scores.iter().position(|v| !v.is_finite()) {
                    let rec = &batch.records[i];
                    bail!(
                        "reward server {} returned {} for prompt `{}` (\"{}\") {where_}",
                        client.url(),
                        scored.scores[i],
                        rec.id,
                        rec.prompt
                    );
                }
                Ok(scored.scores)
            }
        }
    }
}

/// `flowrun eval`'s SD3-only arguments.
pub struct EvalSd3<'a> {
    pub reward: Reward,
    pub steps: &'a [usize],
    /// Prompts per category (0 = all).
    pub limit: usize,
    pub csv: Option<&'a Path>,
}

/// Mean and (population) standard deviation.
fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len().max(1) as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

/// `flowrun eval` on an SD3 model: the reward's mean ± std per step count (and prompt category).
pub fn eval(
    checkpoint: &Path,
    source: &ModelSource,
    o: &Sd3Opts,
    a: &EvalSd3,
    sampler: Sampler,
    dev: &str,
) -> Result<()> {
    if a.steps.is_empty() {
        bail!("--steps: give at least one step count");
    }
    for &k in a.steps {
        check_sampler(&Sampler {
            steps: k,
            ..sampler
        })?;
    }
    let s = setup(checkpoint, source, o, dev, None)?;
    let mut prompts = embedded_prompts(&s.store);
    if a.limit > 0 {
        let mut per = BTreeMap::<String, usize>::new();
        prompts.retain(|p| {
            let n = per.entry(p.category().to_string()).or_default();
            *n += 1;
            *n <= a.limit
        });
    }
    let has_categories = prompts.iter().any(|p| !p.category().is_empty());
    let (ph, pw) = s.pixels();
    // (steps, category) → rewards
    let mut table = BTreeMap::<(usize, String), Vec<f64>>::new();
    for &k in a.steps {
        for chunk in prompts.chunks(s.batch.max(1)) {
            let batch = make_embedded_batch(&s.store, chunk, 1)?;
            let mut rngs: Vec<ChaCha8Rng> = chunk
                .iter()
                .map(|p| noise_rng(EVAL_SEED, p.embedding_row.unwrap_or(0), 0))
                .collect();
            let g = generate(
                &s,
                &batch,
                &mut rngs,
                None,
                Sampler {
                    steps: k,
                    ..sampler
                },
            )?;
            let rewards = a.reward.score(&g.images, (ph, pw), &batch, k)?;
            for (p, r) in chunk.iter().zip(rewards) {
                table.entry((k, "all".into())).or_default().push(r);
                if has_categories {
                    let cat = match p.category() {
                        "" => "(none)",
                        c => c,
                    };
                    table.entry((k, cat.to_string())).or_default().push(r);
                }
            }
        }
    }
    let mut cats: Vec<String> = table.keys().map(|(_, c)| c.clone()).collect();
    cats.sort();
    cats.dedup();
    cats.sort_by_key(|c| (c != "all", c.clone()));
    let col = 20;
    let mut text = format!("{:<16}", "category");
    for k in a.steps {
        text.push_str(&format!(
            "{:>col$}",
            format!("{k} step{}", if *k == 1 { "" } else { "s" })
        ));
    }
    text.push('\n');
    let mut rows = Vec::new();
    for c in &cats {
        text.push_str(&format!("{:<16}", plot::truncate(c, 15)));
        for &k in a.steps {
            let v = table.get(&(k, c.clone())).map_or(&[][..], Vec::as_slice);
            let (m, sd) = mean_std(v);
            text.push_str(&format!("{:>col$}", format!("{m:.4} ± {sd:.4}")));
            rows.push((c.clone(), k, v.len(), m, sd));
        }
        text.push('\n');
    }
    print!("{text}");
    println!(
        "(reward {}, mean ± std over {} prompts, one image each; checkpoint {}, sampler {}, \
         shift {}, cfg {}, {ph}x{pw} px, prompts {})",
        a.reward.describe(),
        prompts.len(),
        checkpoint.display(),
        sampler.name,
        s.schedule.shift,
        sampler.cfg,
        s.embeddings.display()
    );
    note_cfg(sampler.cfg);
    if let Some(p) = a.csv {
        if p.extension().is_some_and(|e| e == "parquet") {
            write_parquet(p, &rows)?;
        } else {
            let mut csv = String::from("category,steps,n,reward_mean,reward_std\n");
            for (c, k, n, m, sd) in &rows {
                csv.push_str(&format!("{},{k},{n},{m},{sd}\n", csv_field(c)));
            }
            runner::fsutil::write_atomic(p, csv.as_bytes())?;
        }
        println!("wrote {}", p.display());
    }
    Ok(())
}

/// A CSV field, quoted when it holds a comma, quote or line break.
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// The SD3 eval table as Parquet: category (utf8), steps (int64), n (int64), reward_mean
/// (float64), reward_std (float64).
fn write_parquet(path: &Path, rows: &[(String, usize, usize, f64, f64)]) -> Result<()> {
    use arrow::array::{ArrayRef, Float64Array, Int64Array, StringArray};
    use arrow::record_batch::RecordBatch;
    let batch = RecordBatch::try_from_iter([
        (
            "category",
            Arc::new(StringArray::from(
                rows.iter().map(|r| r.0.clone()).collect::<Vec<_>>(),
            )) as ArrayRef,
        ),
        (
            "steps",
            Arc::new(Int64Array::from(
                rows.iter().map(|r| r.1 as i64).collect::<Vec<_>>(),
            )) as ArrayRef,
        ),
        (
            "n",
            Arc::new(Int64Array::from(
                rows.iter().map(|r| r.2 as i64).collect::<Vec<_>>(),
            )) as ArrayRef,
        ),
        (
            "reward_mean",
            Arc::new(Float64Array::from(
                rows.iter().map(|r| r.3).collect::<Vec<_>>(),
            )) as ArrayRef,
        ),
        (
            "reward_std",
            Arc::new(Float64Array::from(
                rows.iter().map(|r| r.4).collect::<Vec<_>>(),
            )) as ArrayRef,
        ),
    ])?;
    runner::fsutil::write_atomic_with(path, |f| {
        let mut w = parquet::arrow::ArrowWriter::try_new(f, batch.schema(), None)?;
        w.write(&batch)?;
        w.close()?;
        Ok(())
    })
}
