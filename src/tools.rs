//! `flowrun sample` and `flowrun eval`: use a checkpoint directly, outside a pipeline.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use nodes::device::{device, parse_device};
use nodes::model::{load_safetensors, sample_euler, sample_standard_normal, tensor_from_vec};
use nodes::prompt_loader::{load_prompts, make_batch, parse_prompt};
use nodes::sample_eval::{SampleEval, sample_tafs};
use nodes::types::to_vec;
use nodes::world::{self, IMAGE_LEN, PromptRecord};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

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

/// Sample `seeds` images per prompt and write them as a PNG grid (one row per prompt).
#[allow(clippy::too_many_arguments)]
pub fn sample(
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
    check_tau(tau)?;
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

/// Verifier accuracy per category and step count; optionally written as CSV.
#[allow(clippy::too_many_arguments)]
pub fn eval(
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
    check_tau(tau)?;
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

/// `flowrun velocity`: the model's velocity v_θ(x_t, t, c) (with classifier-free guidance when
/// `cfg > 1`) on inputs read from a safetensors file — `x_t` [B, 3, H, W] f32, `t` [B] f32 and
/// `tokens` [B, L] token ids (or `prompts`, one per row, instead of `tokens`) — written as `v`
/// [B, 3, H, W] f32 to `out`. Used to cross-check other implementations of the model
/// (bench/reference/check.py).
pub fn velocity(
    checkpoint: &Path,
    inputs: &Path,
    prompts: &[String],
    cfg: f32,
    out: &Path,
    dev: &str,
) -> Result<()> {
    use nodes::model::checkpoint::{NamedTensor, SafetensorsFile, serialize_safetensors};
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
    let tensors = [NamedTensor {
        name: "v".into(),
        shape: vec![b, c, h, w],
        values: to_vec(&v)?,
    }];
    let bytes = serialize_safetensors(&tensors, Default::default())?;
    runner::fsutil::write_atomic(out, &bytes)
        .with_context(|| format!("writing {}", out.display()))?;
    println!("wrote {} (v: [{b}, {c}, {h}, {w}])", out.display());
    Ok(())
}
