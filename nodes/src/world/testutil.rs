//! Test helpers: image degradations and target pools.

use rand::Rng;

use super::{IMAGE_SIZE, Split, Target, generate_split};

/// Standard normal sample (Box–Muller).
pub(crate) fn gauss<R: Rng + ?Sized>(rng: &mut R) -> f32 {
    let u1: f32 = rng.random_range(f32::EPSILON..1.0);
    let u2: f32 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

/// Separable Gaussian blur (σ in px, clamped edges) of a CHW image.
pub(crate) fn blur(img: &[f32], sigma: f32) -> Vec<f32> {
    let n = IMAGE_SIZE as isize;
    let r = (3.0 * sigma).ceil() as isize;
    let k: Vec<f32> = (-r..=r)
        .map(|i| (-(i * i) as f32 / (2.0 * sigma * sigma)).exp())
        .collect();
    let ks: f32 = k.iter().sum();
    let at = |v: isize| v.clamp(0, n - 1) as usize;
    let mut tmp = img.to_vec();
    let mut out = img.to_vec();
    for c in 0..3 {
        let p = c * (n * n) as usize;
        for y in 0..n {
            for x in 0..n {
                let s: f32 = (-r..=r)
                    .map(|i| k[(i + r) as usize] * img[p + y as usize * n as usize + at(x + i)])
                    .sum();
                tmp[p + (y * n + x) as usize] = s / ks;
            }
        }
        for y in 0..n {
            for x in 0..n {
                let s: f32 = (-r..=r)
                    .map(|i| k[(i + r) as usize] * tmp[p + at(y + i) * n as usize + x as usize])
                    .sum();
                out[p + (y * n + x) as usize] = s / ks;
            }
        }
    }
    out
}

/// Adds a uniform per-channel offset in `[-amount, amount]` (intensity units,
/// i.e. `2·amount` in image units), clamped to `[-1, 1]`.
pub(crate) fn drift<R: Rng + ?Sized>(img: &[f32], rng: &mut R, amount: f32) -> Vec<f32> {
    let plane = IMAGE_SIZE * IMAGE_SIZE;
    let off: [f32; 3] = std::array::from_fn(|_| 2.0 * rng.random_range(-amount..=amount));
    img.iter()
        .enumerate()
        .map(|(i, v)| (v + off[i / plane]).clamp(-1.0, 1.0))
        .collect()
}

/// Adds i.i.d. Gaussian noise of σ `sigma` (intensity units, i.e. `2σ` in image
/// units), clamped to `[-1, 1]`.
pub(crate) fn noise<R: Rng + ?Sized>(img: &[f32], rng: &mut R, sigma: f32) -> Vec<f32> {
    img.iter()
        .map(|v| (v + 2.0 * sigma * gauss(rng)).clamp(-1.0, 1.0))
        .collect()
}

/// `n` evaluation targets over all categories: 5/6 held-in, 1/6 held-out.
pub(crate) fn eval_targets(seed: u64, n: usize) -> Vec<Target> {
    let heldout = n / 6;
    let mut t: Vec<Target> = generate_split(seed, Split::EvalHeldin, n - heldout)
        .into_iter()
        .map(|r| r.target)
        .collect();
    t.extend(
        generate_split(seed, Split::EvalHeldout, heldout)
            .into_iter()
            .map(|r| r.target),
    );
    t
}
