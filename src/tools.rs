//! `flowrun sample`, `eval`, `velocity` and `export`: use a checkpoint directly, outside a
//! pipeline.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use nodes::device::{device, parse_device};
use nodes::model::sd3::{Sd3Transformer, load_diffusers};
use nodes::model::{
    VelocityModel, load_model, load_safetensors, sample_euler, sample_standard_normal,
    tensor_from_vec,
};
use nodes::prompt_loader::{load_prompts, make_batch, parse_prompt};
use nodes::sample_eval::{SampleEval, sample_tafs};
use nodes::types::to_vec;
use nodes::world::{self, IMAGE_LEN, PromptRecord};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::sd3_tools;

fn load(checkpoint: &Path, dev: &str) -> Result<(nodes::model::FlowModel, burn::tensor::Device)> {
    let kind = parse_device(dev).map_err(anyhow::Error::msg)?;
    let device = device(kind);
    if !checkpoint.exists() {
        bail!("checkpoint {} does not exist", checkpoint.display());
    }
    // A model file inside a run's checkpoint is used only if that checkpoint verifies.
    runner::rundir::verify_enclosing_checkpoint(checkpoint)
        .with_context(|| format!("checkpoint {} is not usable", checkpoint.display()))?;
    let (_, model) = load_safetensors(checkpoint, &device)?;
    Ok((model, device))
}

/// `--tau` and `--tau-end` are temperatures: in [0, 1].
fn check_tau(tau: (f32, f32)) -> Result<()> {
    for (name, v) in [("--tau", tau.0), ("--tau-end", tau.1)] {
        if !(0.0..=1.0).contains(&v) {
            bail!("{name} {v} is not a TAFS temperature: give a value in [0, 1]");
        }
    }
    Ok(())
}

/// `flowrun sample`'s flags.
#[derive(clap::Args, Clone, Debug)]
pub struct SampleArgs {
    /// The model: the ShapeWorld UNet's checkpoint, or an SD3 / SD3.5 model (a diffusers
    /// pipeline or transformer folder, or a flowrun checkpoint of an `arch: sd3` policy).
    #[arg(long, default_value = "checkpoints/shapes-small.safetensors")]
    pub checkpoint: PathBuf,
    /// A prompt (repeatable). ShapeWorld: its text, e.g. "two red circles" (at least one).
    /// SD3: a prompt of --embeddings, by its text (exactly, else ignoring case and spacing).
    #[arg(long)]
    pub prompt: Vec<String>,
    #[arg(long, default_value_t = 4)]
    pub steps: usize,
    #[arg(long, default_value = "tafs", value_parser = ["euler", "tafs"])]
    pub sampler: String,
    /// TAFS temperature (of the first re-noising when --tau-end is given).
    #[arg(long, default_value_t = 1.0)]
    pub tau: f32,
    /// TAFS temperature at step K: linear from --tau, like the pipelines'
    /// `tau: {schedule: linear, start, end}` (default: constant --tau).
    #[arg(long)]
    pub tau_end: Option<f32>,
    /// Classifier-free guidance scale (1 = off). SD3 guides with the embeddings file's negative
    /// (empty) prompt; SD3.5 is usually sampled at 4.5 (Flow-GRPO's setting), SD3 Medium at 7
    /// (diffusers' default).
    #[arg(long, default_value_t = 1.0)]
    pub cfg: f32,
    /// Images per prompt.
    #[arg(long, default_value_t = 8)]
    pub seeds: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value = "grid.png")]
    pub out: PathBuf,
    #[arg(long, default_value = "flex")]
    pub device: String,
    /// A prompt of --embeddings by its row (0-based: the .jsonl sidecar's `index`) or its
    /// metadata `id` (repeatable; after the --prompt ones).
    #[arg(long, value_name = "ID", help_heading = sd3_tools::HEADING)]
    pub prompt_id: Vec<String>,
    /// Without --prompt and --prompt-id: the first N prompts of --embeddings [default: 4].
    #[arg(long, value_name = "N", help_heading = sd3_tools::HEADING)]
    pub num_prompts: Option<usize>,
    #[command(flatten)]
    pub sd3: sd3_tools::Sd3Opts,
    /// Start from these latents instead of seeded noise, as diffusers' pipeline's `latents`
    /// argument: a safetensors file with `latents` [B, C, h, w] (float32, float16, bfloat16),
    /// B = prompts × --seeds, prompt by prompt; the image size is theirs. TAFS's fresh noise
    /// is --seed's, as without --latents.
    #[arg(long, value_name = "FILE", help_heading = sd3_tools::HEADING)]
    pub latents: Option<PathBuf>,
    /// Also write the initial `latents` (what --latents reads: the run is reproduced from
    /// this file), the `sampled` latents [B, C, h, w] and the decoded `images` [B, 3, H, W] in
    /// [-1, 1], as float32 safetensors.
    #[arg(long, value_name = "FILE", help_heading = sd3_tools::HEADING)]
    pub save_latents: Option<PathBuf>,
}

/// Whether a model source holds the ShapeWorld UNet (any flowrun checkpoint that is not SD3).
fn is_unet(source: &ModelSource) -> bool {
    matches!(source, ModelSource::Checkpoint { arch } if arch.as_deref() != Some(Sd3Transformer::ARCH))
}

/// Refuses SD3-only flags for the ShapeWorld UNet.
fn reject_sd3_flags(checkpoint: &Path, flags: &[&str]) -> Result<()> {
    if !flags.is_empty() {
        bail!(
            "{} {} for SD3 models; {} holds the ShapeWorld UNet",
            flags.join(", "),
            if flags.len() == 1 { "is" } else { "are" },
            checkpoint.display()
        );
    }
    Ok(())
}

/// `flowrun sample`: the ShapeWorld UNet's grid, or an SD3 model's ([`sd3_tools::sample`]).
pub fn sample(a: &SampleArgs) -> Result<()> {
    let tau = (a.tau, a.tau_end.unwrap_or(a.tau));
    check_tau(tau)?;
    let (checkpoint, source) = model_source(&a.checkpoint)?;
    if is_unet(&source) {
        let mut flags = a.sd3.given();
        for (f, on) in [
            ("--prompt-id", !a.prompt_id.is_empty()),
            ("--num-prompts", a.num_prompts.is_some()),
            ("--latents", a.latents.is_some()),
            ("--save-latents", a.save_latents.is_some()),
        ] {
            if on {
                flags.push(f);
            }
        }
        reject_sd3_flags(&checkpoint, &flags)?;
        if a.prompt.is_empty() {
            bail!("give at least one --prompt, e.g. --prompt \"two red circles\"");
        }
        return sample_unet(
            &checkpoint,
            &a.prompt,
            a.steps,
            &a.sampler,
            tau,
            a.cfg,
            a.seeds,
            a.seed,
            &a.out,
            &a.device,
        );
    }
    sd3_tools::sample(
        &checkpoint,
        &source,
        &a.sd3,
        &sd3_tools::SampleSd3 {
            prompts: &a.prompt,
            prompt_ids: &a.prompt_id,
            num_prompts: a.num_prompts,
            seeds: a.seeds,
            seed: a.seed,
            out: &a.out,
            latents: a.latents.as_deref(),
            save_latents: a.save_latents.as_deref(),
        },
        sd3_tools::Sampler {
            name: &a.sampler,
            steps: a.steps,
            tau,
            cfg: a.cfg,
        },
        &a.device,
    )
}

/// Sample `seeds` images per prompt and write them as a PNG grid (one row per prompt).
#[allow(clippy::too_many_arguments)]
fn sample_unet(
    checkpoint: &Path,
    prompts: &[String],
    steps: usize,
    sampler: &str,
    tau: (f32, f32),
    cfg: f32,
    seeds: usize,
    seed: u64,
    out: &Path,
    dev: &str,
) -> Result<()> {
    let (model, device) = load(checkpoint, dev)?;
    let mut records = Vec::new();
    for p in prompts {
        let target = parse_prompt(p)?;
        records.push(Arc::new(PromptRecord {
            id: p.clone(),
            prompt: target.prompt(),
            category: target.category(),
            split: world::Split::Train,
            target,
        }));
    }
    let batch = make_batch(&records, seeds)?;
    let b = batch.len();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let noise = tensor_from_vec(
        sample_standard_normal(&mut rng, b * IMAGE_LEN),
        [b, 3, 32, 32],
        &device,
    );
    let tokens = batch.tokens_tensor(&device);
    let x0 = match sampler {
        "tafs" => sample_tafs(&model, noise, tokens, steps, tau, cfg, &mut rng),
        _ => sample_euler(&model, noise, &tokens.into(), steps, cfg)?,
    };
    let imgs = to_vec(&x0)?;
    let images: Vec<Vec<f32>> = imgs.chunks(IMAGE_LEN).map(<[f32]>::to_vec).collect();
    let mut correct = 0;
    for (i, img) in images.iter().enumerate() {
        correct += world::evaluate(img, &batch.records[i].shapes("eval")?.target)?.correct as usize;
    }
    world::write_png_grid(out, &images, seeds, 4)
        .with_context(|| format!("writing {}", out.display()))?;
    println!(
        "wrote {} ({} prompts × {seeds} seeds, {steps} {sampler} steps); shape_eval correct: {correct}/{b}",
        out.display(),
        prompts.len()
    );
    Ok(())
}

/// The ShapeWorld evaluation prompts `flowrun eval` reads by default.
pub const EVAL_PROMPTS: &str = "datasets/shapes/eval.jsonl";

/// `flowrun eval`'s flags.
#[derive(clap::Args, Clone, Debug)]
pub struct EvalArgs {
    /// The model: the ShapeWorld UNet's checkpoint, or an SD3 / SD3.5 model (a diffusers
    /// pipeline or transformer folder, or a flowrun checkpoint of an `arch: sd3` policy).
    #[arg(long, default_value = "checkpoints/shapes-small.safetensors")]
    pub checkpoint: PathBuf,
    /// ShapeWorld: the evaluation prompts (JSONL with targets) [default:
    /// datasets/shapes/eval.jsonl]. SD3 reads --embeddings instead.
    #[arg(long, value_name = "FILE")]
    pub prompts: Option<PathBuf>,
    /// Comma-separated step counts.
    #[arg(long, default_value = "1,2,4,40", value_delimiter = ',')]
    pub steps: Vec<usize>,
    #[arg(long, default_value = "euler", value_parser = ["euler", "tafs"])]
    pub sampler: String,
    /// TAFS temperature (of the first re-noising when --tau-end is given).
    #[arg(long, default_value_t = 1.0)]
    pub tau: f32,
    /// TAFS temperature at step K: linear from --tau, like the pipelines'
    /// `tau: {schedule: linear, start, end}` (default: constant --tau).
    #[arg(long)]
    pub tau_end: Option<f32>,
    /// Classifier-free guidance scale (1 = off; for SD3 see `flowrun sample --help`).
    #[arg(long, default_value_t = 1.0)]
    pub cfg: f32,
    /// Prompts per split and category (0 = all); SD3: per metadata category (`category`, or
    /// GenEval's `tag`).
    #[arg(long, default_value_t = 0)]
    pub limit: usize,
    /// Also write the table to FILE: CSV, or Parquet when FILE ends in `.parquet`.
    #[arg(long, value_name = "FILE")]
    pub csv: Option<PathBuf>,
    #[arg(long, default_value = "flex")]
    pub device: String,
    /// Score the decoded images with a built-in reward: DDPO's JPEG compressibility (reward =
    /// −kB at quality 95) or incompressibility (+kB).
    #[arg(long, value_name = "NAME", value_parser = ["compressibility", "incompressibility"],
          help_heading = sd3_tools::HEADING)]
    pub reward: Option<String>,
    /// Score the decoded images with a reward server (the `http_reward` protocol,
    /// flowrun-reward/1: PNG images, 32 per request, 60 s timeout, 3 retries; README "Reward
    /// plug-ins").
    #[arg(long, value_name = "URL", help_heading = sd3_tools::HEADING)]
    pub reward_url: Option<String>,
    #[command(flatten)]
    pub sd3: sd3_tools::Sd3Opts,
}

/// `flowrun eval`: the ShapeWorld verifier's accuracy table, or an SD3 model's rewards
/// ([`sd3_tools::eval`]).
pub fn eval(a: &EvalArgs) -> Result<()> {
    let tau = (a.tau, a.tau_end.unwrap_or(a.tau));
    check_tau(tau)?;
    let (checkpoint, source) = model_source(&a.checkpoint)?;
    if is_unet(&source) {
        let mut flags = a.sd3.given();
        for (f, on) in [
            ("--reward", a.reward.is_some()),
            ("--reward-url", a.reward_url.is_some()),
        ] {
            if on {
                flags.push(f);
            }
        }
        reject_sd3_flags(&checkpoint, &flags)?;
        let prompts = a
            .prompts
            .clone()
            .unwrap_or_else(|| PathBuf::from(EVAL_PROMPTS));
        return eval_unet(
            &checkpoint,
            &prompts,
            &a.steps,
            &a.sampler,
            tau,
            a.cfg,
            a.limit,
            a.csv.as_deref(),
            &a.device,
        );
    }
    if let Some(p) = &a.prompts {
        bail!(
            "--prompts {} is a ShapeWorld prompt file; {} is an SD3 model, which reads encoded \
             prompts from --embeddings",
            p.display(),
            checkpoint.display()
        );
    }
    let reward = sd3_tools::Reward::parse(a.reward.as_deref(), a.reward_url.as_deref())?;
    sd3_tools::eval(
        &checkpoint,
        &source,
        &a.sd3,
        &sd3_tools::EvalSd3 {
            reward,
            steps: &a.steps,
            limit: a.limit,
            csv: a.csv.as_deref(),
        },
        sd3_tools::Sampler {
            name: &a.sampler,
            steps: 1,
            tau,
            cfg: a.cfg,
        },
        &a.device,
    )
}

/// Verifier accuracy per category and step count; optionally written as CSV.
#[allow(clippy::too_many_arguments)]
fn eval_unet(
    checkpoint: &Path,
    prompts: &Path,
    steps: &[usize],
    sampler: &str,
    tau: (f32, f32),
    cfg: f32,
    limit: usize,
    csv: Option<&Path>,
    dev: &str,
) -> Result<()> {
    let (model, device) = load(checkpoint, dev)?;
    let mut records = load_prompts(prompts)?;
    if limit > 0 {
        let mut per = std::collections::BTreeMap::<String, usize>::new();
        records.retain(|r| {
            let c = per
                .entry(format!("{}/{}", r.split.as_str(), r.category.as_str()))
                .or_default();
            *c += 1;
            *c <= limit
        });
    }
    let ev = SampleEval {
        records: records.into_iter().map(Arc::new).collect(),
        steps: steps.to_vec(),
        tafs: sampler == "tafs",
        tau: tau.0,
        tau_end: tau.1,
        cfg,
        batch: 64,
        seed: 1234,
        grid: 0,
    };
    let (table, _) = ev.evaluate(&model, &device)?;
    let mut cats: Vec<String> = table.keys().map(|(_, c)| c.clone()).collect();
    cats.sort();
    cats.dedup();
    // "all" first, "heldout" last.
    cats.sort_by_key(|c| (c != "all", c == "heldout", c.clone()));
    let mut text = format!("{:<14}", "category");
    for s in steps {
        text.push_str(&format!(
            "{:>10}",
            format!("{s} step{}", if *s == 1 { "" } else { "s" })
        ));
    }
    text.push('\n');
    let mut rows = vec!["category,steps,correct,total,accuracy".to_string()];
    for c in &cats {
        text.push_str(&format!("{c:<14}"));
        for s in steps {
            let (k, n) = table.get(&(*s, c.clone())).copied().unwrap_or((0, 0));
            let acc = k as f64 / n.max(1) as f64;
            text.push_str(&format!("{:>10}", format!("{:.1}%", 100.0 * acc)));
            rows.push(format!("{c},{s},{k},{n},{acc:.4}"));
        }
        text.push('\n');
    }
    print!("{text}");
    println!(
        "(checkpoint {}, sampler {sampler}, cfg {cfg}, prompts {})",
        checkpoint.display(),
        prompts.display()
    );
    if let Some(p) = csv {
        if p.extension().is_some_and(|e| e == "parquet") {
            write_eval_parquet(p, &rows[1..])?;
        } else {
            runner::fsutil::write_atomic(p, (rows.join("\n") + "\n").as_bytes())?;
        }
        println!("wrote {}", p.display());
    }
    Ok(())
}

/// The eval table as Parquet: columns category (utf8), steps (int64), correct (int64), total
/// (int64), accuracy (float64); `rows` are the CSV lines without the header.
fn write_eval_parquet(path: &Path, rows: &[String]) -> Result<()> {
    use arrow::array::{ArrayRef, Float64Array, Int64Array, StringArray};
    use arrow::record_batch::RecordBatch;
    let mut cat = Vec::new();
    let (mut steps, mut correct, mut total, mut acc) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for r in rows {
        let f: Vec<&str> = r.split(',').collect();
        let [c, s, k, n, a] = f[..] else {
            bail!("internal: malformed eval row {r:?}");
        };
        cat.push(c.to_string());
        steps.push(s.parse::<i64>()?);
        correct.push(k.parse::<i64>()?);
        total.push(n.parse::<i64>()?);
        acc.push(a.parse::<f64>()?);
    }
    let batch = RecordBatch::try_from_iter([
        (
            "category",
            std::sync::Arc::new(StringArray::from(cat)) as ArrayRef,
        ),
        (
            "steps",
            std::sync::Arc::new(Int64Array::from(steps)) as ArrayRef,
        ),
        (
            "correct",
            std::sync::Arc::new(Int64Array::from(correct)) as ArrayRef,
        ),
        (
            "total",
            std::sync::Arc::new(Int64Array::from(total)) as ArrayRef,
        ),
        (
            "accuracy",
            std::sync::Arc::new(Float64Array::from(acc)) as ArrayRef,
        ),
    ])?;
    runner::fsutil::write_atomic_with(path, |f| {
        let mut w = parquet::arrow::ArrowWriter::try_new(f, batch.schema(), None)?;
        w.write(&batch)?;
        w.close()?;
        Ok(())
    })
}

/// Reads the token ids `[B, L]` of a velocity inputs file (int64, int32 or float ids).
fn read_token_ids(
    file: &nodes::model::checkpoint::SafetensorsFile,
    name: &str,
) -> Result<(Vec<usize>, Vec<i64>)> {
    let st = file.tensors();
    let view = st
        .tensor(name)
        .map_err(|_| anyhow::anyhow!("{}: missing tensor {name:?}", file.path.display()))?;
    let shape = view.shape().to_vec();
    let data = view.data();
    let ids: Vec<i64> = match format!("{:?}", view.dtype()).as_str() {
        "I64" => data
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect(),
        "I32" => data
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes")) as i64)
            .collect(),
        "F32" | "F64" => file.get(name)?.1.iter().map(|v| *v as i64).collect(),
        other => bail!(
            "{}: tensor {name:?} has dtype {other}; give token ids as int64, int32 or float32",
            file.path.display()
        ),
    };
    Ok((shape, ids))
}

/// What a `--checkpoint` path names.
pub(crate) enum ModelSource {
    /// A flowrun checkpoint file, with the architecture its header names (`None`: not readable
    /// as safetensors; the loader says why).
    Checkpoint { arch: Option<String> },
    /// A diffusers folder (pipeline or transformer folder).
    Diffusers(PathBuf),
}

/// The flowrun model files a directory without a diffusers config holds: its own
/// `model.safetensors`, and those of a run checkpoint's resources
/// (`checkpoints/iter-N/resources/<name>/model.safetensors`).
fn flowrun_models_in(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::iter::once(dir.join("model.safetensors"))
        .chain(
            std::fs::read_dir(dir.join("resources"))
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path().join("model.safetensors")),
        )
        .filter(|p| p.is_file())
        .collect();
    found.sort();
    found
}

/// A directory, or the path of a `config.json` / `model_index.json`, is a diffusers folder —
/// except a directory with no such config that holds one flowrun `model.safetensors` (itself,
/// or a run checkpoint's `resources/<name>/`): that file is meant. Anything else is a flowrun
/// checkpoint file. Returns the file or folder meant.
pub(crate) fn model_source(path: &Path) -> Result<(PathBuf, ModelSource)> {
    if path.is_dir() {
        let is_diffusers =
            path.join("config.json").exists() || path.join("model_index.json").exists();
        if !is_diffusers {
            match flowrun_models_in(path).as_slice() {
                [] => {}
                [one] => return model_source(one),
                several => bail!(
                    "{} holds several models ({}); give one of them",
                    path.display(),
                    several
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }
        }
        return Ok((
            path.to_path_buf(),
            ModelSource::Diffusers(path.to_path_buf()),
        ));
    }
    if !path.exists() {
        bail!("checkpoint {} does not exist", path.display());
    }
    let is_config = path
        .file_name()
        .is_some_and(|n| n == "config.json" || n == "model_index.json");
    if is_config {
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        return Ok((dir.clone(), ModelSource::Diffusers(dir)));
    }
    Ok((
        path.to_path_buf(),
        ModelSource::Checkpoint {
            arch: nodes::model::checkpoint::checkpoint_arch(path),
        },
    ))
}

/// An SD3 transformer from a diffusers folder or a flowrun checkpoint of one.
pub(crate) fn load_sd3(
    checkpoint: &Path,
    source: &ModelSource,
    device: &burn::tensor::Device,
) -> Result<Sd3Transformer> {
    match source {
        ModelSource::Diffusers(dir) => Ok(load_diffusers(dir, device)?.1),
        ModelSource::Checkpoint { .. } => {
            runner::rundir::verify_enclosing_checkpoint(checkpoint)
                .with_context(|| format!("checkpoint {} is not usable", checkpoint.display()))?;
            Ok(load_model::<Sd3Transformer>(checkpoint, device)?.1)
        }
    }
}

/// `flowrun velocity`: the model's velocity on inputs read from a safetensors file, written as
/// `v` f32 to `out`. Used to cross-check other implementations of the model
/// (bench/reference/check.py, tests/sd3_export.rs).
///
/// * ShapeWorld UNet (a flowrun checkpoint without `flowrun.arch`): `x_t` [B, 3, H, W] f32,
///   `t` [B] f32 and `tokens` [B, L] token ids (or `prompts`, one per row, instead of
///   `tokens`); classifier-free guidance with the null prompt when `cfg > 1`.
/// * SD3 (a diffusers folder, or a flowrun checkpoint with `flowrun.arch` = `sd3`): see
///   [`velocity_sd3`].
pub fn velocity(
    checkpoint: &Path,
    inputs: &Path,
    prompts: &[String],
    cfg: f32,
    out: &Path,
    dev: &str,
) -> Result<()> {
    let (checkpoint, source) = model_source(checkpoint)?;
    let checkpoint = checkpoint.as_path();
    match &source {
        ModelSource::Checkpoint { arch } if arch.as_deref() != Some(Sd3Transformer::ARCH) => {
            velocity_unet(checkpoint, inputs, prompts, cfg, out, dev)
        }
        _ => velocity_sd3(checkpoint, &source, inputs, prompts, cfg, out, dev),
    }
}

/// Writes `v` [B, C, H, W] to `out` atomically.
fn write_velocity(out: &Path, shape: [usize; 4], values: Vec<f32>) -> Result<()> {
    use nodes::model::checkpoint::{NamedTensor, serialize_safetensors};
    let tensors = [NamedTensor {
        name: "v".into(),
        shape: shape.to_vec(),
        values,
    }];
    let bytes = serialize_safetensors(&tensors, Default::default())?;
    runner::fsutil::write_atomic(out, &bytes)
        .with_context(|| format!("writing {}", out.display()))?;
    let [b, c, h, w] = shape;
    println!("wrote {} (v: [{b}, {c}, {h}, {w}])", out.display());
    Ok(())
}

/// The ShapeWorld UNet's `flowrun velocity`.
fn velocity_unet(
    checkpoint: &Path,
    inputs: &Path,
    prompts: &[String],
    cfg: f32,
    out: &Path,
    dev: &str,
) -> Result<()> {
    use nodes::model::checkpoint::SafetensorsFile;
    let (model, device) = load(checkpoint, dev)?;
    let file = SafetensorsFile::read(inputs)?;
    let (x_shape, x) = file.get("x_t")?;
    let &[b, c, h, w] = x_shape.as_slice() else {
        bail!(
            "{}: `x_t` must be [B, C, H, W], got {x_shape:?}",
            inputs.display()
        );
    };
    let (t_shape, t) = file.get("t")?;
    if t_shape != [b] {
        bail!(
            "{}: `t` must be [{b}] (one timestep per row of `x_t`), got {t_shape:?}",
            inputs.display()
        );
    }
    let (tok_shape, tokens) = if prompts.is_empty() {
        read_token_ids(&file, "tokens")?
    } else {
        let mut ids = Vec::new();
        for p in prompts {
            ids.extend(
                world::tokenize(p)
                    .map_err(anyhow::Error::msg)?
                    .into_iter()
                    .map(i64::from),
            );
        }
        (vec![prompts.len(), world::MAX_TOKENS], ids)
    };
    let &[tb, l] = tok_shape.as_slice() else {
        bail!("token ids must be [B, L], got {tok_shape:?}");
    };
    if tb != b {
        bail!("{b} rows in `x_t` but {tb} token rows");
    }
    let vocab = model.config().vocab_size as i64;
    if let Some(bad) = tokens.iter().find(|&&id| id < 0 || id >= vocab) {
        bail!("token id {bad} out of range (vocabulary of {vocab})");
    }
    let v = model.forward_cfg(
        tensor_from_vec(x, [b, c, h, w], &device),
        tensor_from_vec(t, [b], &device),
        nodes::model::int_tensor_from_vec(tokens, [b, l], &device),
        cfg,
    );
    write_velocity(out, [b, c, h, w], to_vec(&v)?)
}

/// The names an SD3 model's `flowrun velocity` inputs file holds.
const SD3_INPUTS: &str = "`latents` [B, C, H, W], `t` [B] (σ in [0, 1]), `prompt_embeds` \
                          [B, L, D] and `pooled` [B, P], and for --cfg also \
                          `negative_prompt_embeds` [B or 1, L', D] and `negative_pooled` \
                          [B or 1, P]";

/// Tensor `name` of an inputs file as f32 (stored as F32, F16, BF16 or F64), or `None` when
/// the file has no such tensor.
pub(crate) fn input_f32(
    file: &nodes::model::checkpoint::SafetensorsFile,
    name: &str,
) -> Result<Option<(Vec<usize>, Vec<f32>)>> {
    use burn::tensor::{bf16, f16};
    let st = file.tensors();
    let Ok(view) = st.tensor(name) else {
        return Ok(None);
    };
    let shape = view.shape().to_vec();
    let data = view.data();
    let pairs = || {
        data.chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
    };
    let values: Vec<f32> = match format!("{:?}", view.dtype()).as_str() {
        "F32" | "F64" => file.get(name)?.1,
        "F16" => pairs().map(|b| f16::from_bits(b).to_f32()).collect(),
        "BF16" => pairs().map(|b| bf16::from_bits(b).to_f32()).collect(),
        other => bail!(
            "{}: tensor `{name}` has dtype {other}; give float32, float16, bfloat16 or float64",
            file.path.display()
        ),
    };
    if let Some(bad) = values.iter().find(|v| !v.is_finite()) {
        bail!(
            "{}: tensor `{name}` holds a non-finite value ({bad})",
            file.path.display()
        );
    }
    Ok(Some((shape, values)))
}

/// `shape` as `[usize; D]`, or an error naming the tensor and the layout it must have.
fn dims<const D: usize>(
    inputs: &Path,
    name: &str,
    shape: &[usize],
    want: &str,
) -> Result<[usize; D]> {
    shape.try_into().map_err(|_| {
        anyhow::anyhow!(
            "{}: `{name}` must be {want}, got {shape:?}",
            inputs.display()
        )
    })
}

/// `flowrun velocity` of an SD3 transformer: inputs `latents` [B, C, H, W], `t` [B] (σ in
/// [0, 1]; the transformer is given σ·1000, as diffusers' pipelines do), `prompt_embeds`
/// [B, L, D] and `pooled` [B, P]. With `cfg` ≠ 1 also `negative_prompt_embeds` [B or 1, L', D]
/// and `negative_pooled` [B or 1, P] (a leading 1 is broadcast over the batch): the guided
/// `v_u + cfg·(v_c − v_u)`. Writes `v` [B, C_out, H, W].
fn velocity_sd3(
    checkpoint: &Path,
    source: &ModelSource,
    inputs: &Path,
    prompts: &[String],
    cfg: f32,
    out: &Path,
    dev: &str,
) -> Result<()> {
    use nodes::model::checkpoint::SafetensorsFile;
    if !prompts.is_empty() {
        bail!(
            "--prompt is for the ShapeWorld UNet; {} holds an SD3 model, which reads \
             `prompt_embeds` and `pooled` from --inputs",
            checkpoint.display()
        );
    }
    if !cfg.is_finite() {
        bail!("--cfg {cfg} is not a guidance scale");
    }
    let kind = parse_device(dev).map_err(anyhow::Error::msg)?;
    let device = device(kind);
    // Inputs first: a mistake there is found before a large model is loaded.
    let file = SafetensorsFile::read(inputs)?;
    let shown = inputs.display();
    let need = |name: &str| -> Result<(Vec<usize>, Vec<f32>)> {
        input_f32(&file, name)?.ok_or_else(|| {
            let hint = if name == "latents" && file.tensors().tensor("x_t").is_ok() {
                " (`x_t` is the ShapeWorld UNet's name for it)"
            } else {
                ""
            };
            anyhow::anyhow!(
                "{shown}: missing tensor `{name}`{hint}; an SD3 model's inputs are {SD3_INPUTS}"
            )
        })
    };
    let (x_shape, x) = need("latents")?;
    let x_dims: [usize; 4] = dims(inputs, "latents", &x_shape, "[B, C, H, W]")?;
    let (t_shape, t) = need("t")?;
    let t_dims: [usize; 1] = dims(inputs, "t", &t_shape, "[B] (one σ per row of `latents`)")?;
    if let Some(bad) = t.iter().find(|v| !(0.0..=1.0).contains(*v)) {
        bail!("{shown}: `t` holds {bad}; give σ in [0, 1] (1 = pure noise)");
    }
    let (p_shape, p) = need("prompt_embeds")?;
    let p_dims: [usize; 3] = dims(inputs, "prompt_embeds", &p_shape, "[B, L, D]")?;
    let (q_shape, q) = need("pooled")?;
    let q_dims: [usize; 2] = dims(inputs, "pooled", &q_shape, "[B, P]")?;
    let negatives = match (
        input_f32(&file, "negative_prompt_embeds")?,
        input_f32(&file, "negative_pooled")?,
    ) {
        (Some(n), Some(m)) => Some((n, m)),
        (None, None) => None,
        (Some(_), None) | (None, Some(_)) => bail!(
            "{shown}: `negative_prompt_embeds` and `negative_pooled` go together; the file has \
             only one of them"
        ),
    };
    let guided = cfg != 1.0;
    if guided && negatives.is_none() {
        bail!(
            "--cfg {cfg} needs the unconditional branch: add `negative_prompt_embeds` \
             [B or 1, L', D] and `negative_pooled` [B or 1, P] to {shown} (or leave --cfg at 1)"
        );
    }

    let model = load_sd3(checkpoint, source, &device)?;
    model
        .check_inputs(&x_dims, &t_dims, &p_dims, &q_dims)
        .map_err(|e| anyhow::anyhow!("{shown}: {e}"))?;
    let [b, _, h, w] = x_dims;
    let c = model.config();
    let x = tensor_from_vec(x, x_dims, &device);
    let t = tensor_from_vec(t, t_dims, &device);
    let prompt = tensor_from_vec(p, p_dims, &device);
    let pooled = tensor_from_vec(q, q_dims, &device);
    let v = match negatives {
        Some(((ns, nv), (ms, mv))) if guided => {
            let [nb, l, d] = dims(inputs, "negative_prompt_embeds", &ns, "[B or 1, L', D]")?;
            if !(nb == b || nb == 1) || l == 0 || d != c.joint_attention_dim {
                bail!(
                    "{shown}: `negative_prompt_embeds` is {ns:?}; expected [{b} or 1, L' >= 1, \
                     joint_attention_dim = {}]",
                    c.joint_attention_dim
                );
            }
            let [mb, pp] = dims(inputs, "negative_pooled", &ms, "[B or 1, P]")?;
            if !(mb == b || mb == 1) || pp != c.pooled_projection_dim {
                bail!(
                    "{shown}: `negative_pooled` is {ms:?}; expected [{b} or 1, \
                     pooled_projection_dim = {}]",
                    c.pooled_projection_dim
                );
            }
            let neg = tensor_from_vec::<3>(nv, [nb, l, d], &device).expand([b, l, d]);
            let neg_pooled = tensor_from_vec::<2>(mv, [mb, pp], &device).expand([b, pp]);
            model.try_forward_cfg(x, t, prompt, pooled, neg, neg_pooled, cfg)?
        }
        _ => model.try_forward(x, t, prompt, pooled)?,
    };
    write_velocity(out, [b, c.output_channels(), h, w], to_vec(&v)?)
}

/// A size in bytes: a number with an optional unit, `KB`/`MB`/`GB`/`TB` (powers of 1000, as
/// diffusers' `max_shard_size` reads them) or `KiB`/`MiB`/`GiB`/`TiB` (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        _ => {
            bail!("size {s:?}: unknown unit {unit:?} (use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB)")
        }
    };
    let value: f64 = num.parse().map_err(|_| {
        anyhow::anyhow!("size {s:?} is not a number with an optional unit (e.g. 10GB)")
    })?;
    let bytes = value * mult as f64;
    if !(bytes >= 1.0 && bytes < u64::MAX as f64) {
        bail!("size {s:?} must be at least 1 byte");
    }
    Ok(bytes as u64)
}

/// `flowrun export`: a diffusers `SD3Transformer2DModel` folder from a flowrun checkpoint of an
/// SD3 model (or from a diffusers folder, e.g. to change its dtype).
pub fn export(checkpoint: &Path, out: &Path, dtype: &str, max_shard_size: &str) -> Result<()> {
    use nodes::model::sd3::export::{ExportDtype, check_target, save_diffusers_sharded};
    let dtype: ExportDtype = dtype.parse()?;
    let max_shard_size = parse_size(max_shard_size).context("--max-shard-size")?;
    let (checkpoint, source) = model_source(checkpoint)?;
    let checkpoint = checkpoint.as_path();
    if let ModelSource::Checkpoint { arch: Some(arch) } = &source
        && arch == nodes::model::FlowModel::ARCH
    {
        bail!(
            "{}: export writes diffusers SD3 folders; this checkpoint holds the ShapeWorld UNet",
            checkpoint.display()
        );
    }
    // Before loading what may be a multi-GB model.
    check_target(out)?;
    let device = device(parse_device("flex").map_err(anyhow::Error::msg)?);
    let model = load_sd3(checkpoint, &source, &device)?;
    let start = std::time::Instant::now();
    let summary = save_diffusers_sharded(&model, out, dtype, max_shard_size)?;
    let files = if summary.files.len() == 1 {
        summary.files[0].clone()
    } else {
        format!(
            "{} shards + {}",
            summary.files.len(),
            nodes::model::sd3::load::WEIGHTS_INDEX_NAME
        )
    };
    println!(
        "wrote {}: SD3Transformer2DModel, {} tensors, {} bytes as {dtype} ({files}; {:.1} s)",
        out.display(),
        summary.tensors,
        summary.total_size,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
