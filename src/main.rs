//! `flowrun`: run, validate and inspect declarative pipelines.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};
use runner::{Diagnostics, Registry, RunOptions, StartInfo};

mod bench;
mod device_check;
mod logging;
mod oom;
mod plot;
mod report;
mod sd3_tools;
mod tools;

#[derive(Parser)]
#[command(
    name = "flowrun",
    version,
    about = "Declarative pipeline runner for RL alignment of flow-matching text-to-image models",
    long_about = "Declarative pipeline runner for RL alignment of flow-matching text-to-image models.\n\n`flowrun PIPELINE.yaml` validates and runs a pipeline (the same as `flowrun run PIPELINE.yaml`).",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Pipeline file to run.
    pipeline: Option<PathBuf>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(clap::Args, Clone, Default)]
struct RunArgs {
    /// Override a field: `--set nodes.update.params.lr=1e-5` (repeatable).
    #[arg(long = "set", value_name = "PATH=VALUE")]
    set: Vec<String>,
    /// Device for this run (overrides the pipeline's `device`): flex, libtorch, libtorch-cuda:N.
    #[arg(long)]
    device: Option<String>,
    /// Continue the run in this directory from its last checkpoint.
    #[arg(long, value_name = "RUN_DIR")]
    resume: Option<PathBuf>,
    /// Directory where run directories are created.
    #[arg(long, default_value = "runs")]
    runs_dir: PathBuf,
    /// Stop with a checkpoint after the first iteration that ends past this wall-clock budget
    /// (seconds, or with a unit: 90s, 20m, 1.5h), e.g. to compare pipelines at equal time.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_s)]
    time_limit: Option<f64>,
    /// No progress bar and only warnings on stderr.
    #[arg(long, short)]
    quiet: bool,
    /// More log output on stderr (info level).
    #[arg(long, short)]
    verbose: bool,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Copy, Clone, PartialEq, Eq, ValueEnum, Default)]
enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Copy, Clone, PartialEq, Eq, ValueEnum)]
enum GraphFormat {
    Dot,
    Mermaid,
    Text,
}

#[derive(Subcommand)]
enum Command {
    /// Validate and run a pipeline (or resume a run with `--resume runs/<dir>`).
    Run {
        pipeline: Option<PathBuf>,
        #[command(flatten)]
        args: RunArgs,
    },
    /// Check a pipeline and report every error with its file, line and column.
    Validate {
        pipeline: PathBuf,
        #[arg(long = "set", value_name = "PATH=VALUE")]
        set: Vec<String>,
    },
    /// Print the pipeline graph after repeat expansion (what actually runs).
    Graph {
        pipeline: PathBuf,
        #[arg(long, value_enum, default_value_t = GraphFormat::Dot)]
        format: GraphFormat,
        #[arg(long = "set", value_name = "PATH=VALUE")]
        set: Vec<String>,
    },
    /// List node types, or document one (ports, params, defaults).
    Nodes { name: Option<String> },
    /// Print a JSON Schema of the pipeline format (node types and their params) for editors.
    Schema,
    /// Plot a run's reward, accuracy and loss curves and its newest samples as PNG files.
    Report {
        /// The run directory (runs/<name>-<timestamp>); may be a run still in progress.
        run_dir: PathBuf,
        /// Where to write the PNG files (default: RUN_DIR/report).
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
    /// Plot one metric of several runs in one PNG (e.g. reward against wall-clock).
    Compare {
        /// Run directories.
        #[arg(required = true)]
        runs: Vec<PathBuf>,
        /// Metric to plot (repeatable: the first one a run logs is used for it).
        #[arg(long = "y", required = true, value_name = "KEY")]
        y: Vec<String>,
        /// x axis: `elapsed_s` (wall-clock) or `iteration`.
        #[arg(long, default_value = "elapsed_s", value_parser = ["elapsed_s", "iteration"])]
        x: String,
        /// Trailing moving average over this many iterations.
        #[arg(long, default_value_t = 1)]
        smooth: usize,
        #[arg(long, default_value = "compare.png")]
        out: PathBuf,
        #[arg(long)]
        title: Option<String>,
    },
    /// Check a device: agreement with flex on a checkpoint, forward and training-step speed.
    DeviceCheck {
        /// flex | libtorch | libtorch-cuda:N
        #[arg(long, default_value = "flex")]
        device: String,
        #[arg(long, default_value = "checkpoints/shapes-small.safetensors")]
        checkpoint: PathBuf,
        /// Batch size for the timings.
        #[arg(long, default_value_t = 64)]
        batch: usize,
        /// Timed repetitions (after one warm-up).
        #[arg(long, default_value_t = 5)]
        repeats: usize,
    },
    /// Sample images for prompts from a checkpoint and write a PNG grid.
    ///
    /// The model (`--checkpoint`) is the ShapeWorld UNet's checkpoint (the default) or an SD3 /
    /// SD3.5 model: a diffusers pipeline folder (model_index.json, transformer/, vae/,
    /// scheduler/), a transformer folder, or a flowrun checkpoint of an `arch: sd3` policy (a
    /// run's checkpoints/iter-N/… model.safetensors, or that checkpoint folder).
    ///
    /// ShapeWorld: the prompts are `--prompt` texts; the grid has a row of `--seeds` 32×32
    /// images per prompt, and the verifier's count of correct images is printed.
    ///
    /// SD3: the prompts come from `--embeddings FILE` (scripts/encode_prompts.py): `--prompt
    /// TEXT` picks a prompt by its text, `--prompt-id` by row or id, and without either the
    /// first `--num-prompts` (4) are drawn. Each image starts from its own seeded noise (from
    /// --seed, the prompt's row and the image's index; or `--latents FILE`), is sampled on
    /// diffusers' FlowMatchEulerDiscreteScheduler sigmas with `--shift` (the pipeline's
    /// scheduler_config.json, else 3.0) — `euler` is StableDiffusion3Pipeline's loop, `tafs`
    /// the TAFS pipelines' rollout at those K sigmas — with CFG against the file's negative
    /// prompt, and decoded by the VAE (`--vae`, default the pipeline's vae/) at `--height` ×
    /// `--width` pixels (default: the transformer's sample_size × the VAE's scale factor). The
    /// grid has a row per prompt, labelled with its text, of `--seeds` images each (small
    /// images enlarged to 64 px). `--save-latents FILE` also writes the initial and the sampled
    /// latents and the decoded images (`--latents` reads that file back).
    ///
    /// Example: flowrun sample --checkpoint models/sd3.5-medium --embeddings
    /// embeds/eval.safetensors --prompt "a photo of a cat" --sampler euler --steps 28 --cfg 4.5
    /// --seeds 4 --out cat.png
    Sample(tools::SampleArgs),
    /// Verifier accuracy (ShapeWorld) or mean reward (SD3) of a checkpoint per step count.
    ///
    /// The model (`--checkpoint`) is as for `flowrun sample`.
    ///
    /// ShapeWorld: every prompt of `--prompts` is sampled once per step count (fixed noise)
    /// and checked by the verifier: accuracy per category, held-out and overall.
    ///
    /// SD3: every prompt of `--embeddings` (or `--limit` per category) is sampled once per
    /// step count from fixed noise (seed 1234; the same noise for every step count), decoded
    /// by the VAE and scored by `--reward compressibility|incompressibility` or a reward
    /// server (`--reward-url`): the mean ± std (population) of the rewards per step count,
    /// overall and per prompt category when the file's metadata has one (`category`, or
    /// GenEval's `tag`). `--csv` columns: category, steps, n, reward_mean, reward_std.
    ///
    /// Example: flowrun eval --checkpoint runs/tafs_grpo_sd3-…/checkpoints/iter-000100 --vae
    /// models/sd3.5-medium --embeddings embeds/eval.safetensors --steps 1,2,4 --sampler tafs
    /// --cfg 4.5 --reward-url http://127.0.0.1:8000/score --csv eval.csv
    Eval(tools::EvalArgs),
    /// Velocity v_θ(x_t, t, c) of a model on inputs from a safetensors file (cross-checks).
    ///
    /// The model (`--checkpoint`) is a flowrun checkpoint — the ShapeWorld UNet, or an SD3 model
    /// (metadata `flowrun.arch` = `sd3`, e.g. a run's checkpoints/iter-N/model.safetensors of
    /// an `arch: sd3` policy) — or a diffusers folder holding an SD3 / SD3.5
    /// SD3Transformer2DModel: a pipeline folder (model_index.json + transformer/), a transformer
    /// folder (config.json + weights), or the path of that config.json.
    ///
    /// ShapeWorld UNet inputs: `x_t` [B, 3, 32, 32] f32, `t` [B] f32 and `tokens` [B, L] token
    /// ids (int64, int32 or float; or give `--prompt` once per row instead); `--cfg S` > 1
    /// guides with the null prompt.
    ///
    /// SD3 inputs: `latents` [B, C, H, W] (C = in_channels; H, W multiples of patch_size),
    /// `t` [B] (σ in [0, 1], 1 = pure noise; the transformer is given σ·1000 as diffusers'
    /// pipelines do), `prompt_embeds` [B, L, D] (D = joint_attention_dim) and `pooled` [B, P]
    /// (P = pooled_projection_dim); float32, float16, bfloat16 or float64. With `--cfg S` ≠ 1
    /// also `negative_prompt_embeds` [B or 1, L', D] and `negative_pooled` [B or 1, P]; the
    /// output is then the guided v_u + S·(v_c − v_u).
    ///
    /// The output file holds `v` [B, C_out, H, W] f32. See bench/reference/README.md.
    Velocity {
        /// A flowrun checkpoint (.safetensors) or a diffusers folder (see above).
        #[arg(long, default_value = "checkpoints/shapes-small.safetensors")]
        checkpoint: PathBuf,
        /// The inputs (safetensors; the tensors above).
        #[arg(long)]
        inputs: PathBuf,
        /// ShapeWorld UNet: prompts, one per row of `x_t` (instead of the file's `tokens`).
        #[arg(long)]
        prompt: Vec<String>,
        /// Classifier-free guidance scale (1 = off; SD3 needs the negative_* inputs for it).
        #[arg(long, default_value_t = 1.0)]
        cfg: f32,
        /// Where to write `v` (safetensors).
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "flex")]
        device: String,
    },
    /// Write a diffusers SD3Transformer2DModel folder from a flowrun checkpoint of an SD3 model.
    ///
    /// `--checkpoint` is a flowrun checkpoint of an `arch: sd3` policy (a run's
    /// checkpoints/iter-N/model.safetensors), or a diffusers folder to write again (e.g. in
    /// another dtype). `--out` gets config.json (diffusers' field names, `_class_name`
    /// SD3Transformer2DModel) and diffusion_pytorch_model.safetensors in PyTorch's layouts —
    /// sharded, with diffusion_pytorch_model.safetensors.index.json, above `--max-shard-size` —
    /// which `SD3Transformer2DModel.from_pretrained(OUT)` loads, or which can stand in for a
    /// pipeline's transformer/ folder. The folder is written atomically and must not exist (or
    /// be empty).
    Export {
        /// A flowrun checkpoint of an SD3 model, or a diffusers folder.
        #[arg(long)]
        checkpoint: PathBuf,
        /// The folder to create.
        #[arg(long)]
        out: PathBuf,
        /// Stored dtype of the weights (f32 keeps them exactly; f16 and bf16 round to nearest).
        #[arg(long, default_value = "f32", value_parser = ["f32", "bf16", "f16"])]
        dtype: String,
        /// Largest shard (bytes, or with a unit: 500MB, 10GB, 2GiB); diffusers' default.
        #[arg(long, default_value = "10GB", value_name = "SIZE")]
        max_shard_size: String,
    },
    /// Benchmark suite: rollout and GRPO-update speed, fitted slopes, matmul peak (BENCHMARKS.md).
    Bench(bench::BenchArgs),
}

/// glibc's malloc, tuned for tensor work on worker threads: nodes run on tokio's blocking pool,
/// and by default every such thread gets its own small malloc arena whose large blocks come
/// from fresh `mmap`s that are unmapped again when freed, so every iteration page-faults (and
/// the kernel zeroes) gigabytes of activations. One arena, every block on the heap (no `mmap`)
/// and freed memory not returned to the system below 2 GiB make an iteration reuse the last
/// one's memory: on libtorch CPU, system time fell from 12–16 s to 4.5 s over 5 TAFS-GRPO
/// iterations at 64 samples (BENCHMARKS.md, "Session 3: the update's memory and glibc's
/// malloc"), and from 27.8 to 5.7 s over 4 iterations at 256 samples ("Session 7"). Skipped
/// when the user set `GLIBC_TUNABLES` or `MALLOC_ARENA_MAX` (theirs wins) or
/// `FLOWRUN_DEFAULT_MALLOC` is set.
#[global_allocator]
static ALLOCATOR: oom::Allocator = oom::Allocator;

fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let user_set = [
            "GLIBC_TUNABLES",
            "MALLOC_ARENA_MAX",
            "FLOWRUN_DEFAULT_MALLOC",
        ]
        .iter()
        .any(|k| std::env::var_os(k).is_some());
        if !user_set {
            // SAFETY: mallopt only changes allocator parameters; called at start-up before any
            // other thread exists.
            unsafe {
                libc::mallopt(libc::M_ARENA_MAX, 1);
                libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
                libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
                // Larger blocks too: M_MMAP_THRESHOLD cannot exceed 32 MiB, and at 256 samples
                // an activation is 64 MiB; served by mmap, each is faulted in anew every time.
                libc::mallopt(libc::M_MMAP_MAX, 0);
            }
        }
    }
}

fn main() -> ExitCode {
    // Rust ignores SIGPIPE, so printing into a closed pipe (`flowrun nodes | head`) would be an
    // error; a command-line tool should simply stop, as `cat` does.
    #[cfg(unix)]
    // SAFETY: setting a signal disposition to its default at start-up, before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    tune_allocator();
    // A bug must never show a Rust backtrace to a user: print one clear line instead.
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| info.payload().downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown error".into());
        let at = info
            .location()
            .map(|l| format!(" ({}:{})", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!("flowrun: internal error: {msg}{at}");
    }));
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let registry = nodes::registry();
    match cli.command {
        None => match cli.pipeline {
            Some(p) => cmd_run(Some(&p), &cli.run, &registry),
            None if cli.run.resume.is_some() => cmd_run(None, &cli.run, &registry),
            None => {
                eprintln!(
                    "flowrun: give a pipeline file, e.g. `flowrun pipelines/tafs_grpo.yaml` (see `flowrun --help`)"
                );
                ExitCode::from(2)
            }
        },
        Some(Command::Run { pipeline, args }) => cmd_run(pipeline.as_deref(), &args, &registry),
        Some(Command::Validate { pipeline, set }) => cmd_validate(&pipeline, &set, &registry),
        Some(Command::Graph {
            pipeline,
            format,
            set,
        }) => cmd_graph(&pipeline, format, &set, &registry),
        Some(Command::Nodes { name }) => cmd_nodes(name.as_deref(), &registry),
        Some(Command::Schema) => {
            let schema = runner::schema::pipeline_schema(&registry);
            match serde_json::to_string_pretty(&schema) {
                Ok(s) => {
                    println!("{s}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("flowrun: error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Some(Command::Report { run_dir, out }) => report(report::run(&run_dir, out.as_deref())),
        Some(Command::Compare {
            runs,
            y,
            x,
            smooth,
            out,
            title,
        }) => report(report::compare(
            &runs,
            &y,
            &x,
            smooth,
            &out,
            title.as_deref(),
        )),
        Some(Command::DeviceCheck {
            device,
            checkpoint,
            batch,
            repeats,
        }) => report(device_check::run(
            &device,
            &checkpoint,
            batch,
            repeats.max(1),
        )),
        Some(Command::Sample(args)) => report(tools::sample(&args)),
        Some(Command::Eval(args)) => report(tools::eval(&args)),
        Some(Command::Bench(args)) => report(bench::run(&args)),
        Some(Command::Export {
            checkpoint,
            out,
            dtype,
            max_shard_size,
        }) => report(tools::export(&checkpoint, &out, &dtype, &max_shard_size)),
        Some(Command::Velocity {
            checkpoint,
            inputs,
            prompt,
            cfg,
            out,
            device,
        }) => report(tools::velocity(
            &checkpoint,
            &inputs,
            &prompt,
            cfg,
            &out,
            &device,
        )),
    }
}

fn report(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("flowrun: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn print_diags(d: &Diagnostics) {
    eprint!("{d}");
    if d.has_errors() {
        eprintln!();
    }
}

fn cmd_validate(path: &Path, set: &[String], registry: &Registry) -> ExitCode {
    match runner::load(path, set, registry) {
        Ok((p, warnings)) => {
            print_diags(&warnings);
            println!(
                "{}: ok — pipeline `{}`, {} nodes after expansion, {} resources, {} iterations",
                path.display(),
                p.name,
                p.nodes.len(),
                p.resources.len(),
                p.iterations
            );
            if let Some(est) = nodes::checks::memory::estimate(&p) {
                let machine = nodes::checks::memory::device_memory(&p.device)
                    .map(|(_, what)| format!(" of {what}"))
                    .unwrap_or_default();
                println!(
                    "estimated peak memory: {:.2} GiB{machine} ({})",
                    est.bytes / GIB,
                    est.why
                );
            }
            ExitCode::SUCCESS
        }
        Err(d) => {
            print_diags(&d);
            ExitCode::from(2)
        }
    }
}

fn cmd_graph(path: &Path, format: GraphFormat, set: &[String], registry: &Registry) -> ExitCode {
    match runner::load(path, set, registry) {
        Ok((p, _)) => {
            let text = match format {
                GraphFormat::Dot => runner::graph::to_dot(&p),
                GraphFormat::Mermaid => runner::graph::to_mermaid(&p),
                GraphFormat::Text => runner::graph::to_text(&p),
            };
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(d) => {
            print_diags(&d);
            ExitCode::from(2)
        }
    }
}

fn cmd_nodes(name: Option<&str>, registry: &Registry) -> ExitCode {
    match name {
        None => {
            print!("{}", runner::graph::list_types(registry));
            ExitCode::SUCCESS
        }
        Some(n) => {
            if let Some(t) = registry.nodes.get(n) {
                print!("{}", runner::graph::describe_node(t));
                ExitCode::SUCCESS
            } else if let Some(t) = registry.resources.get(n) {
                print!("{}", runner::graph::describe_resource(t));
                ExitCode::SUCCESS
            } else if let Some(t) = registry.schedules.get(n) {
                print!("{}", runner::graph::describe_schedule(t));
                ExitCode::SUCCESS
            } else {
                let all = registry
                    .nodes
                    .keys()
                    .chain(registry.resources.keys())
                    .chain(registry.schedules.keys())
                    .copied();
                let hint = runner::diag::did_you_mean(n, all)
                    .map(|s| format!(" (did you mean `{s}`?)"))
                    .unwrap_or_default();
                eprintln!(
                    "flowrun: unknown node or resource type `{n}`{hint}; `flowrun nodes` lists them"
                );
                ExitCode::from(2)
            }
        }
    }
}

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

fn cmd_run(pipeline: Option<&Path>, args: &RunArgs, registry: &Registry) -> ExitCode {
    let mut overrides = args.set.clone();
    if let Some(d) = &args.device {
        overrides.push(format!("device={d}"));
    }
    // A resumed run continues its own resolved pipeline (plus any new overrides).
    let (path, source_name) = match (&args.resume, pipeline) {
        (Some(dir), None) => {
            let p = dir.join("pipeline.yaml");
            if !p.exists() {
                eprintln!(
                    "flowrun: {} is not a run directory (no pipeline.yaml in it)",
                    dir.display()
                );
                return ExitCode::from(2);
            }
            (p, dir.join("pipeline.yaml").display().to_string())
        }
        (Some(_), Some(_)) => {
            eprintln!("flowrun: give either a pipeline file or `--resume RUN_DIR`, not both");
            return ExitCode::from(2);
        }
        (None, Some(p)) => (p.to_path_buf(), p.display().to_string()),
        (None, None) => {
            eprintln!("flowrun run: give a pipeline file or `--resume RUN_DIR`");
            return ExitCode::from(2);
        }
    };
    // A data-parallel run: the launcher's variables (torchrun, Slurm, PyTorchJob).
    let launch = match runner::LaunchEnv::from_env() {
        Ok(l) => l,
        Err(e) => {
            eprintln!("flowrun: {e:#}");
            return ExitCode::from(2);
        }
    };
    let (mut pipeline, mut warnings) = match runner::load(&path, &overrides, registry) {
        Ok(x) => x,
        Err(d) => {
            print_diags(&d);
            return ExitCode::from(2);
        }
    };
    if let Some(l) = &launch
        && pipeline.device == "libtorch-cuda"
    {
        // One GPU per process: `libtorch-cuda` without an index is this node's LOCAL_RANK.
        overrides.push(format!("device=libtorch-cuda:{}", l.local_rank));
        (pipeline, warnings) = match runner::load(&path, &overrides, registry) {
            Ok(x) => x,
            Err(d) => {
                print_diags(&d);
                return ExitCode::from(2);
            }
        };
    }
    let lead = launch.as_ref().is_none_or(|l| l.rank == 0);
    if lead {
        print_diags(&warnings);
    }
    let progress = lead
        && !args.quiet
        && args.log_format == LogFormat::Text
        && std::io::stderr().is_terminal();
    logging::init(args.log_format == LogFormat::Json, args.verbose, args.quiet);
    let collective = match &launch {
        None => None,
        Some(l) => match nodes::dist::connect(l, &pipeline.device) {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!("flowrun: {e:#}");
                return ExitCode::FAILURE;
            }
        },
    };
    let rank_prefix = match &launch {
        Some(l) => format!("rank {}: ", l.rank),
        None => String::new(),
    };
    let opts = RunOptions {
        runs_root: args.runs_dir.clone(),
        resume: args.resume.clone(),
        progress,
        source_name,
        overrides,
        handle_ctrl_c: true,
        time_limit_s: args.time_limit,
        // One line naming the run directory and how to watch it; `--log-format json` gets the
        // engine's `run started` record instead, and `--quiet` neither.
        on_start: (lead && !args.quiet && args.log_format == LogFormat::Text)
            .then(|| Arc::new(|i: &StartInfo| eprintln!("{}", start_line(i))) as _),
        collective,
        ..RunOptions::default()
    };
    let name = pipeline.name.clone();
    let result = runner::run(pipeline, registry, opts);
    if args.log_format == LogFormat::Json {
        // Machine-readable to the end: the outcome as one JSON record, no prose.
        return match result {
            Ok(s) => {
                tracing::info!(
                    run_dir = %s.run_dir.display(),
                    last_iteration = s.last_iteration,
                    iterations = s.iterations,
                    stopped_early = s.stopped_early,
                    time_limit_reached = s.time_limit_reached,
                    "run finished"
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                tracing::error!(
                    run_dir = %e.run_dir.as_ref().map(|d| d.display().to_string()).unwrap_or_default(),
                    checkpoint = %e.checkpoint.as_ref().map(|d| d.display().to_string()).unwrap_or_default(),
                    "run failed: {e}"
                );
                ExitCode::FAILURE
            }
        };
    }
    match result {
        Ok(s) => {
            let dir = s.run_dir.display();
            if !lead {
                // Rank 0 tells how the run ended.
            } else if s.stopped_early {
                eprintln!(
                    "stopped after iteration {}/{}{}; checkpoint written.",
                    s.last_iteration,
                    s.iterations,
                    if s.time_limit_reached {
                        " (time limit reached)"
                    } else {
                        ""
                    }
                );
                eprintln!("resume with:\n  flowrun run --resume {dir}");
            } else if !args.quiet && lead {
                eprintln!(
                    "`{name}` finished {} iterations; run directory: {dir}",
                    s.iterations
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("flowrun: {rank_prefix}error: {e}");
            if let Some(dir) = &e.run_dir {
                match &e.checkpoint {
                    Some(ck) => eprintln!(
                        "the newest checkpoint that verifies is {}; resume with:\n  flowrun run --resume {}",
                        ck.file_name()
                            .map(|n| n.to_string_lossy().into_owned())
                            .unwrap_or_default(),
                        dir.display()
                    ),
                    None => eprintln!(
                        "no checkpoint of this run verifies (or none was written); run directory: {}",
                        dir.display()
                    ),
                }
            }
            ExitCode::FAILURE
        }
    }
}

/// What a run prints when it starts: where it is and how to watch it.
fn start_line(i: &StartInfo) -> String {
    let dir = i.run_dir.display();
    let logdir = i
        .run_dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map_or_else(|| ".".to_string(), |p| p.display().to_string());
    let from = if i.first_iteration > 1 {
        format!(" (resuming at iteration {})", i.first_iteration)
    } else {
        String::new()
    };
    match &i.event_file {
        Some(_) => format!(
            "run directory: {dir}{from} · watch: tensorboard --logdir {logdir} · report: flowrun report {dir}"
        ),
        None => format!("run directory: {dir}{from} · report: flowrun report {dir}"),
    }
}

/// `90`, `90s`, `20m`, `1.5h` → seconds.
fn parse_duration_s(s: &str) -> Result<f64, String> {
    let (num, mult) = match s.trim().char_indices().last() {
        Some((i, 's')) => (&s.trim()[..i], 1.0),
        Some((i, 'm')) => (&s.trim()[..i], 60.0),
        Some((i, 'h')) => (&s.trim()[..i], 3600.0),
        _ => (s.trim(), 1.0),
    };
    match num.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v * mult),
        _ => Err(format!(
            "`{s}` is not a positive duration (write e.g. 90, 90s, 20m or 1.5h)"
        )),
    }
}
