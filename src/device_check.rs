//! `flowrun device-check`: is this device usable, does it compute what flex computes, and how
//! fast is it? For a machine one copies a binary to (see `scripts/gpu_check.sh`): it needs no
//! Rust toolchain, only the checkpoint.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::tensor::{Device, Int, Tensor};
use nodes::device::{DeviceKind, cuda_device_count, open, parse_device};
use nodes::model::{
    Trainer, TrainerConfig, int_tensor_from_vec, load_safetensors, sample_standard_normal,
    tensor_from_vec,
};
use nodes::types::to_vec;
use nodes::world;
use rand::SeedableRng;

/// Relative tolerance on max |Δv| / max |v| against flex. CUDA convolutions may use TF32
/// (cuDNN's default), which keeps ~10 mantissa bits, hence the looser bound there.
fn tolerance(kind: DeviceKind) -> f32 {
    match kind {
        DeviceKind::LibTorchCuda(_) => 5e-3,
        _ => 1e-4,
    }
}

const PROMPTS: [&str; 4] = [
    "a red circle",
    "two blue squares",
    "a green cross",
    "a circle",
];

/// Fixed inputs: x_t ~ N(0, I) from a seeded generator, t spread over (0, 1], four prompts.
fn inputs(b: usize, dev: &Device) -> Result<(Tensor<4>, Tensor<1>, Tensor<2, Int>)> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let x = tensor_from_vec(
        sample_standard_normal(&mut rng, b * world::IMAGE_LEN),
        [b, 3, world::IMAGE_SIZE, world::IMAGE_SIZE],
        dev,
    );
    let t: Vec<f32> = (0..b).map(|i| 1.0 - i as f32 / b as f32).collect();
    let t = tensor_from_vec(t, [b], dev);
    let mut toks = Vec::with_capacity(b * world::MAX_TOKENS);
    for i in 0..b {
        let ids = world::tokenize(PROMPTS[i % PROMPTS.len()])
            .map_err(|e| anyhow::anyhow!("tokenizing a built-in prompt: {e}"))?;
        toks.extend(ids.into_iter().map(|x| x as i64));
    }
    Ok((x, t, int_tensor_from_vec(toks, [b, world::MAX_TOKENS], dev)))
}

fn velocity(checkpoint: &Path, dev: &Device, b: usize) -> Result<Vec<f32>> {
    let (_, model) = load_safetensors(checkpoint, dev)?;
    let (x, t, tok) = inputs(b, dev)?;
    to_vec(&model.forward(x, t, tok))
}

/// Median wall time in seconds of `repeats` runs of `f`, after one untimed warm-up run.
fn median_time(repeats: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut v = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        let t0 = Instant::now();
        f()?;
        v.push(t0.elapsed().as_secs_f64());
    }
    v.sort_by(f64::total_cmp);
    Ok(v[v.len() / 2])
}

/// Run the check; returns an error (non-zero exit) when the device disagrees with flex.
pub fn run(device_name: &str, checkpoint: &Path, batch: usize, repeats: usize) -> Result<()> {
    let kind = parse_device(device_name).map_err(anyhow::Error::msg)?;
    if is_peer() {
        return run_peer(device_name);
    }
    if !checkpoint.is_file() {
        bail!(
            "checkpoint {} not found (pass --checkpoint FILE)",
            checkpoint.display()
        );
    }
    println!(
        "flowrun {} — built {} libtorch",
        env!("CARGO_PKG_VERSION"),
        if cfg!(feature = "tch") {
            "with"
        } else {
            "without"
        }
    );
    println!("CUDA devices seen by libtorch: {}", cuda_device_count());
    if let Some(n) = nodes::device::libtorch_threads() {
        let other = std::thread::spawn(nodes::device::libtorch_threads)
            .join()
            .ok()
            .flatten()
            .unwrap_or(-1);
        println!("libtorch intra-op threads: {n} (main thread), {other} (another thread)");
    }
    let dev = open(device_name).map_err(anyhow::Error::msg)?;
    println!("device: {device_name}");

    // 1. Agreement with flex on the same weights and inputs.
    let b = 8;
    let reference = velocity(checkpoint, &Device::flex(), b).context("flex forward")?;
    let got = velocity(checkpoint, &dev, b).with_context(|| format!("{device_name} forward"))?;
    if got.iter().any(|v| !v.is_finite()) {
        bail!("{device_name} returned non-finite velocities");
    }
    let scale = reference.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
    let diff = reference
        .iter()
        .zip(&got)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
        / scale;
    let tol = tolerance(kind);
    println!(
        "velocity vs flex ({b} inputs, {}): max |Δv| / max |v| = {diff:.3e} (tolerance {tol:.0e})",
        checkpoint.display()
    );

    // 2. Throughput: inference forward and one training step (fwd + bwd + AdamW + EMA).
    let (_, model) = load_safetensors(checkpoint, &dev)?;
    let (x, t, tok) = inputs(batch, &dev)?;
    let f = median_time(repeats, || {
        let v = model.forward(x.clone(), t.clone(), tok.clone());
        to_vec(&v).map(|_| ()) // forces the (possibly asynchronous) device to finish
    })?;
    println!(
        "forward, batch {batch}: median {:.1} ms ({:.0} images/s, {repeats} runs after 1 warm-up)",
        f * 1e3,
        batch as f64 / f
    );
    let ad = dev.clone().autodiff();
    let (_, model) = load_safetensors(checkpoint, &ad)?;
    let mut trainer = Trainer::from_model(model, TrainerConfig::new());
    let (x0, t, tok) = inputs(batch, &ad)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(8);
    let noise = tensor_from_vec(
        sample_standard_normal(&mut rng, batch * world::IMAGE_LEN),
        [batch, 3, world::IMAGE_SIZE, world::IMAGE_SIZE],
        &ad,
    );
    let s = median_time(repeats, || {
        let loss = trainer.step(x0.clone(), noise.clone(), t.clone(), tok.clone());
        if !loss.is_finite() {
            bail!("{device_name}: training step gave a non-finite loss");
        }
        Ok(())
    })?;
    println!(
        "training step, batch {batch}: median {:.1} ms ({:.0} images/s)",
        s * 1e3,
        batch as f64 / s
    );
    if diff.is_nan() || diff > tol {
        bail!("{device_name} disagrees with flex: {diff:.3e} > {tol:.0e}");
    }
    collective_check(device_name)?;
    println!("ok");
    Ok(())
}

/// Set in the second process `device-check` starts to measure the collective over loopback.
const PEER_VAR: &str = "FLOWRUN_DEVICE_CHECK_PEER";

/// The all-reduce sizes (f32 elements) and timed repetitions of the collective check; its peer
/// runs the same operations (one warm-up each).
const ALL_REDUCE_SIZES: [usize; 2] = [1 << 16, 1 << 22];
const ALL_REDUCE_REPEATS: usize = 5;

/// The collective backend data-parallel runs of this device use, and its measured all-reduce.
/// Under a launcher (WORLD_SIZE > 1) between the launched ranks; otherwise between this
/// process and a second one it starts on loopback.
fn collective_check(device_name: &str) -> Result<()> {
    let backend = match nodes::dist::backend_for(device_name) {
        Ok(b) => b,
        Err(e) => {
            println!("collective: none ({e:#})");
            return Ok(());
        }
    };
    let (env, peer) = match runner::LaunchEnv::from_env()? {
        Some(env) => (env, None),
        None => {
            let port = std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port();
            let env = runner::LaunchEnv {
                rank: 0,
                world: 2,
                local_rank: 0,
                master_addr: "127.0.0.1".into(),
                master_port: port,
            };
            let peer = std::process::Command::new(std::env::current_exe()?)
                .args(["device-check", "--device", device_name])
                .env(PEER_VAR, "1")
                .env("RANK", "1")
                .env("WORLD_SIZE", "2")
                .env("LOCAL_RANK", "0")
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .stdout(std::process::Stdio::null())
                .spawn()
                .context("starting the loopback peer")?;
            (env, Some(peer))
        }
    };
    let c = nodes::dist::connect(&env, device_name)?;
    let lead = env.rank == 0;
    let world = env.world;
    for n in ALL_REDUCE_SIZES {
        let mut buf = vec![1f32; n];
        c.all_reduce_sum(&mut buf)?; // warm-up (connections, buffers)
        let mut times = Vec::new();
        for _ in 0..ALL_REDUCE_REPEATS {
            let t0 = Instant::now();
            c.all_reduce_sum(&mut buf)?;
            times.push(t0.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        let t = times[times.len() / 2];
        let bytes = (n * 4) as f64;
        // The bus bandwidth convention of nccl-tests: 2(W−1)/W of the buffer crosses each link.
        let bus = bytes * 2.0 * (world - 1) as f64 / world as f64 / t;
        if lead {
            println!(
                "collective: {backend} (c10d), {world} processes{}: all-reduce of {:.1} MiB: median {:.2} ms, bus bandwidth {:.2} GB/s",
                if peer.is_some() { " on loopback" } else { "" },
                bytes / (1 << 20) as f64,
                t * 1e3,
                bus / 1e9
            );
        }
    }
    c.barrier()?;
    if let Some(mut p) = peer {
        let st = p.wait()?;
        if !st.success() {
            bail!("the loopback peer of the collective check failed ({st})");
        }
    }
    Ok(())
}

/// The peer half of [`collective_check`]: only the collective.
pub fn is_peer() -> bool {
    std::env::var_os(PEER_VAR).is_some()
}

/// Run as [`collective_check`]'s loopback peer.
pub fn run_peer(device_name: &str) -> Result<()> {
    let env = runner::LaunchEnv::from_env()?
        .ok_or_else(|| anyhow::anyhow!("the collective check's peer needs WORLD_SIZE and RANK"))?;
    let c = nodes::dist::connect(&env, device_name)?;
    for n in ALL_REDUCE_SIZES {
        let mut buf = vec![1f32; n];
        for _ in 0..1 + ALL_REDUCE_REPEATS {
            c.all_reduce_sum(&mut buf)?;
        }
    }
    c.barrier()
}
