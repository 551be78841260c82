//! LoRA-adapted linear layers, forward + backward, three ways: flowrun's `lora::Linear`
//! (`x·W + s·(x·A)·B`), burn 0.22's built-in `Module::apply_lora` on `nn::Linear` (which forms
//! `W + s·A·B` densely on every forward), and the dense layers trained in full. Each layer is an
//! attention projection of SD3.5-Medium at 512 px with CFG: 2 rows × 1357 tokens (1024 image +
//! 333 text), width 1536, rank 32; 4 of them chained. Reported: the median time of forward +
//! backward, and the peak resident memory over the memory held once weights and inputs exist,
//! each variant in its own process. `cargo bench --bench lora` (flex), `--features tch` adds libtorch CPU.

use std::time::Instant;

use burn::module::{Lora, Module, Param};
use burn::tensor::{Device, Distribution, Tensor};
use nodes::model::lora::{Factor, Linear};

const ROWS: usize = 2 * 1357;
const DIM: usize = 1536;
const RANK: usize = 32;
/// Layers chained in one forward (a block's q, k, v and out projections), so that what each
/// layer's graph holds adds up as it does in a model.
const LAYERS: usize = 4;
const REPEATS: usize = 5;
const KINDS: [&str; 3] = ["flowrun", "burn", "dense"];

fn random<const D: usize>(shape: [usize; D], std: f64, dev: &Device) -> Tensor<D> {
    Tensor::random(shape, Distribution::Normal(0.0, std), dev)
}

/// A field of /proc/self/status in KiB.
fn status_kib(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The median seconds of forward + backward of `forward` on fresh inputs.
fn measure(dev: &Device, forward: &dyn Fn(Tensor<2>) -> Tensor<2>) -> f64 {
    let mut times = Vec::new();
    for i in 0..=REPEATS {
        let x = random([ROWS, DIM], 1.0, dev);
        let g = random([ROWS, DIM], 1.0, dev);
        let _ = x.clone().into_data();
        let t = Instant::now();
        let loss = (forward(x) * g).sum();
        let grads = loss.backward();
        drop(grads);
        if i > 0 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// One variant in this process: prints `seconds peak_kib baseline_kib`.
fn child(kind: &str, plain: Device) {
    let dev = plain.clone().autodiff();
    let layers: Vec<_> = (0..LAYERS)
        .map(|_| {
            (
                random([DIM, DIM], 0.02, &plain),
                random([DIM], 0.02, &plain),
                random([DIM, RANK], 1.0 / RANK as f64, &plain),
                random([RANK, DIM], 0.02, &plain),
            )
        })
        .collect();
    let baseline = status_kib("VmRSS");
    let s = match kind {
        "flowrun" => {
            // flowrun: base frozen, the adapter trained, x·W + s·(x·A)·B.
            let ls: Vec<Linear> = layers
                .into_iter()
                .map(|(w, b, la, lb)| {
                    Linear {
                        weight: Param::from_tensor(w).set_require_grad(false),
                        bias: Some(Param::from_tensor(b).set_require_grad(false)),
                        lora_A: Some(Factor {
                            weight: Param::from_tensor(la),
                        }),
                        lora_B: Some(Factor {
                            weight: Param::from_tensor(lb),
                        }),
                        lora_scale: 2.0,
                    }
                    .train()
                })
                .collect();
            measure(&dev, &|x| ls.iter().fold(x, |h, l| l.forward(h)))
        }
        // burn's built-in LoRA (the base frozen, W + s·A·B formed on each forward), or full
        // fine-tuning of the dense layers.
        kind => {
            let lora = kind == "burn";
            let ls: Vec<burn::nn::Linear> = layers
                .into_iter()
                .map(|(w, b, _, _)| {
                    let dense = burn::nn::Linear {
                        weight: Param::from_tensor(w),
                        bias: Some(Param::from_tensor(b)),
                    };
                    if lora {
                        dense.apply_lora(Lora::new(RANK, 2.0 * RANK as f64)).train()
                    } else {
                        dense.train()
                    }
                })
                .collect();
            measure(&dev, &|x| ls.iter().fold(x, |h, l| l.forward(h)))
        }
    };
    println!("{s} {} {baseline}", status_kib("VmHWM"));
}

fn open(device: &str) -> Device {
    nodes::device::open(device).expect("device")
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() == 4 && args[1] == "--child" {
        return child(&args[2], open(&args[3]));
    }
    println!(
        "{LAYERS} chained linear layers [{ROWS}, {DIM}] → [{ROWS}, {DIM}], LoRA rank {RANK}, forward + backward, median of {REPEATS} after 1 warm-up, each variant in its own process; MiB: peak resident set over the set once weights and inputs exist"
    );
    let mut devices = vec!["flex"];
    if cfg!(feature = "tch") {
        devices.push("libtorch");
    }
    let exe = std::env::current_exe().expect("own path");
    for d in devices {
        let mut row = Vec::new();
        for kind in KINDS {
            let o = std::process::Command::new(&exe)
                .args(["--child", kind, d])
                .output()
                .expect("child");
            assert!(
                o.status.success(),
                "{kind} on {d}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            let out = String::from_utf8_lossy(&o.stdout);
            let v: Vec<f64> = out
                .split_whitespace()
                .map(|x| x.parse().expect("number"))
                .collect();
            row.push((v[0], (v[1] - v[2]) / 1024.0));
        }
        println!(
            "{d:>8}  flowrun lora::Linear {:7.1} ms {:6.0} MiB | burn apply_lora {:7.1} ms {:6.0} MiB | dense, all trained {:7.1} ms {:6.0} MiB",
            row[0].0 * 1e3,
            row[0].1,
            row[1].0 * 1e3,
            row[1].1,
            row[2].0 * 1e3,
            row[2].1
        );
        println!(
            "{d:>8}  burn apply_lora / flowrun: time {:.2}×, memory {:.2}×",
            row[1].0 / row[0].0,
            row[1].1 / row[0].1.max(1.0)
        );
    }
}
