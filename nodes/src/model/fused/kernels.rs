//! Plain-slice CPU kernels behind flex's fused ops ([`super::flex`]): a stride-1 convolution
//! forward and backward (im2col + GEMM on the `gemm` crate burn-flex itself uses, one sample per
//! rayon task), and GroupNorm with its optional FiLM modulation and SiLU, forward and backward,
//! in one pass over each (sample, group), compiled a second time for AVX2 + FMA.
//!
//! Every buffer is row-major and contiguous; shapes are given in the comments.

use std::ops::Range;

use rayon::prelude::*;

/// Largest im2col matrix (elements) a convolution builds at once per thread: 16 MiB of f32.
const COL_BUDGET: usize = 1 << 22;

/// A 2-D convolution with stride 1, dilation 1, one group and `pad` zeros on every side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeom {
    pub batch: usize,
    pub c_in: usize,
    pub c_out: usize,
    pub h: usize,
    pub w: usize,
    /// Square kernel size.
    pub k: usize,
    pub pad: usize,
}

impl ConvGeom {
    pub fn out_h(&self) -> usize {
        self.h + 2 * self.pad + 1 - self.k
    }

    pub fn out_w(&self) -> usize {
        self.w + 2 * self.pad + 1 - self.k
    }

    /// Rows of the im2col matrix: Cin·k·k.
    fn rows(&self) -> usize {
        self.c_in * self.k * self.k
    }

    /// Output pixels per sample: H'·W'.
    fn pixels(&self) -> usize {
        self.out_h() * self.out_w()
    }

    /// Output rows per im2col tile: the whole image unless its im2col matrix would exceed
    /// [`COL_BUDGET`] elements (large images: a VAE's 512×512 levels), at least one row.
    fn tile_rows(&self) -> usize {
        if self.is_pointwise() {
            return self.out_h().max(1);
        }
        (COL_BUDGET / (self.rows() * self.out_w()).max(1)).clamp(1, self.out_h().max(1))
    }

    /// The output-row tiles of one sample.
    fn tiles(&self) -> impl Iterator<Item = Range<usize>> + '_ {
        let (oh, step) = (self.out_h(), self.tile_rows());
        (0..oh).step_by(step).map(move |r| r..(r + step).min(oh))
    }

    /// Elements of one tile's im2col matrix (0 for a pointwise convolution).
    fn col_len(&self) -> usize {
        if self.is_pointwise() {
            0
        } else {
            self.rows() * self.tile_rows() * self.out_w()
        }
    }

    /// A 1×1 convolution without padding reads its input as its own im2col matrix.
    fn is_pointwise(&self) -> bool {
        self.k == 1 && self.pad == 0
    }

    /// For kernel column `kx`: the output columns `ox` whose input column `ox + kx − pad` lies
    /// inside the image, as a half-open range (possibly empty).
    fn valid_cols(&self, kx: usize) -> (usize, usize) {
        let lo = self.pad.saturating_sub(kx).min(self.out_w());
        let hi = (self.w + self.pad).saturating_sub(kx).min(self.out_w());
        (lo, hi.max(lo))
    }
}

/// col: [Cin·k·k, |rows|·W'] ← x: [Cin, H, W] (one sample), for the output rows `rows`.
fn im2col(g: &ConvGeom, x: &[f32], rows: Range<usize>, col: &mut [f32]) {
    let (ow, k) = (g.out_w(), g.k);
    let p = rows.len() * ow;
    for ci in 0..g.c_in {
        let plane = &x[ci * g.h * g.w..(ci + 1) * g.h * g.w];
        for ky in 0..k {
            for kx in 0..k {
                let row = &mut col[((ci * k + ky) * k + kx) * p..][..p];
                let (lo, hi) = g.valid_cols(kx);
                for (at, oy) in rows.clone().enumerate() {
                    let dst = &mut row[at * ow..(at + 1) * ow];
                    let iy = (oy + ky) as isize - g.pad as isize;
                    if iy < 0 || iy >= g.h as isize {
                        dst.fill(0.0);
                        continue;
                    }
                    dst[..lo].fill(0.0);
                    dst[hi..].fill(0.0);
                    if lo < hi {
                        let start = iy as usize * g.w + lo + kx - g.pad;
                        dst[lo..hi].copy_from_slice(&plane[start..start + (hi - lo)]);
                    }
                }
            }
        }
    }
}

/// dx: [Cin, H, W] += the adjoint of [`im2col`] applied to dcol: [Cin·k·k, |rows|·W'].
fn col2im_add(g: &ConvGeom, dcol: &[f32], rows: Range<usize>, dx: &mut [f32]) {
    let (ow, k) = (g.out_w(), g.k);
    let p = rows.len() * ow;
    for ci in 0..g.c_in {
        let plane = &mut dx[ci * g.h * g.w..(ci + 1) * g.h * g.w];
        for ky in 0..k {
            for kx in 0..k {
                let row = &dcol[((ci * k + ky) * k + kx) * p..][..p];
                let (lo, hi) = g.valid_cols(kx);
                if lo >= hi {
                    continue;
                }
                for (at, oy) in rows.clone().enumerate() {
                    let iy = (oy + ky) as isize - g.pad as isize;
                    if iy < 0 || iy >= g.h as isize {
                        continue;
                    }
                    let start = iy as usize * g.w + lo + kx - g.pad;
                    let dst = &mut plane[start..start + (hi - lo)];
                    for (d, s) in dst.iter_mut().zip(&row[at * ow + lo..at * ow + hi]) {
                        *d += s;
                    }
                }
            }
        }
    }
}

/// dst[m, n] (row stride `dst_rs`) = (`acc` ? dst : 0) + lhs · rhs, with lhs [m, k] and rhs
/// [k, n] given by (row stride, column stride), on `par`'s threads.
#[allow(clippy::too_many_arguments)]
fn matmul(
    par: gemm::Parallelism,
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    dst_rs: usize,
    acc: bool,
    lhs: &[f32],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[f32],
    (rhs_rs, rhs_cs): (usize, usize),
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !acc {
            for r in 0..m {
                dst[r * dst_rs..r * dst_rs + n].fill(0.0);
            }
        }
        return;
    }
    assert!(dst.len() >= (m - 1) * dst_rs + n);
    assert!(lhs.len() > (m - 1) * lhs_rs + (k - 1) * lhs_cs);
    assert!(rhs.len() > (k - 1) * rhs_rs + (n - 1) * rhs_cs);
    // SAFETY: the asserts above keep every index `gemm` reads or writes inside the slices;
    // `dst` is borrowed mutably and does not alias `lhs` or `rhs`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            acc,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

/// At most this many groups of samples sum their weight and bias gradients separately (see
/// [`conv2d_backward`]).
const SUM_GROUPS: usize = 16;

/// Whether a convolution over `batch` samples runs one sample per thread (single-threaded
/// GEMMs), or one sample after another with GEMMs on every thread (fewer samples than threads).
fn over_samples(batch: usize) -> bool {
    batch >= rayon::current_num_threads()
}

/// y = conv(x, weight) + bias.
///
/// x: [B, Cin, H, W], weight: [Cout, Cin, k, k], bias: [Cout] → y: [B, Cout, H', W'].
/// Per sample b: y_b = W · im2col(x_b) + bias, with W as [Cout, Cin·k·k].
pub fn conv2d_forward(g: &ConvGeom, x: &[f32], weight: &[f32], bias: &[f32]) -> Vec<f32> {
    let (rows, pixels) = (g.rows(), g.pixels());
    let x_len = g.c_in * g.h * g.w;
    let y_len = g.c_out * pixels;
    assert_eq!(x.len(), g.batch * x_len, "conv2d: input size");
    assert_eq!(weight.len(), g.c_out * rows, "conv2d: weight size");
    assert_eq!(bias.len(), g.c_out, "conv2d: bias size");
    let mut y = vec![0.0f32; g.batch * y_len];
    let step = |par: gemm::Parallelism, col: &mut Vec<f32>, b: usize, y_b: &mut [f32]| {
        let x_b = &x[b * x_len..(b + 1) * x_len];
        for (row, &bv) in y_b.chunks_mut(pixels.max(1)).zip(bias) {
            row.fill(bv);
        }
        let ow = g.out_w();
        for tile in g.tiles() {
            let (at, tp) = (tile.start * ow, tile.len() * ow);
            let col: &[f32] = if g.is_pointwise() {
                x_b
            } else {
                im2col(g, x_b, tile, col);
                col
            };
            // [Cout, R] · [R, tile], added to the bias; y_b's rows keep their stride P.
            let (w_s, col_s) = ((rows, 1), (tp, 1));
            let dst = &mut y_b[at..];
            matmul(
                par,
                (g.c_out, tp, rows),
                dst,
                pixels,
                true,
                weight,
                w_s,
                col,
                col_s,
            );
        }
    };
    let col_len = g.col_len();
    if over_samples(g.batch) {
        y.par_chunks_mut(y_len.max(1)).enumerate().for_each_init(
            || vec![0.0f32; col_len],
            |col, (b, y_b)| step(gemm::Parallelism::None, col, b, y_b),
        );
    } else {
        let mut col = vec![0.0f32; col_len];
        for (b, y_b) in y.chunks_mut(y_len.max(1)).enumerate() {
            step(gemm::Parallelism::Rayon(0), &mut col, b, y_b);
        }
    }
    y
}

/// Gradients of a convolution (see [`ConvGeom`]) from its output gradient; each only when asked.
#[derive(Debug, Default)]
pub struct ConvGrads {
    /// [B, Cin, H, W]
    pub x: Option<Vec<f32>>,
    /// [Cout, Cin, k, k]
    pub weight: Option<Vec<f32>>,
    /// [Cout]
    pub bias: Option<Vec<f32>>,
}

/// Per-task scratch and partial sums of [`conv2d_backward`].
struct ConvAcc {
    /// [Cout, Cin·k·k]
    dw: Vec<f32>,
    /// [Cout]
    db: Vec<f32>,
    /// [Cin·k·k, H'·W'] im2col of the sample (weight gradient)
    col: Vec<f32>,
    /// [Cin·k·k, H'·W'] gradient of the im2col matrix (input gradient)
    dcol: Vec<f32>,
}

/// Backward of `y = conv(x, weight) + bias` given gy = ∂L/∂y.
///
/// x: [B, Cin, H, W], weight: [Cout, Cin, k, k], gy: [B, Cout, H', W'].
/// Per sample b: dW += gy_b · im2col(x_b)ᵀ, db += Σ gy_b, dx_b = col2im(Wᵀ · gy_b); samples run
/// in parallel in at most [`SUM_GROUPS`] fixed groups, each with its own partial dW and db, summed
/// at the end in group order (deterministic whatever the thread count).
pub fn conv2d_backward(
    g: &ConvGeom,
    x: &[f32],
    weight: &[f32],
    gy: &[f32],
    (want_x, want_weight, want_bias): (bool, bool, bool),
) -> ConvGrads {
    let (rows, pixels) = (g.rows(), g.pixels());
    let x_len = g.c_in * g.h * g.w;
    let y_len = g.c_out * pixels;
    assert_eq!(x.len(), g.batch * x_len, "conv2d_backward: input size");
    assert_eq!(weight.len(), g.c_out * rows, "conv2d_backward: weight size");
    assert_eq!(
        gy.len(),
        g.batch * y_len,
        "conv2d_backward: output gradient size"
    );
    let pointwise = g.is_pointwise();

    let mut dx = if want_x {
        vec![0.0f32; g.batch * x_len]
    } else {
        Vec::new()
    };
    let targets: Vec<Option<&mut [f32]>> = if want_x {
        dx.chunks_mut(x_len.max(1)).map(Some).collect()
    } else {
        (0..g.batch).map(|_| None).collect()
    };
    let new_acc = || ConvAcc {
        dw: if want_weight {
            vec![0.0; g.c_out * rows]
        } else {
            Vec::new()
        },
        db: if want_bias {
            vec![0.0; g.c_out]
        } else {
            Vec::new()
        },
        col: if want_weight {
            vec![0.0; g.col_len()]
        } else {
            Vec::new()
        },
        dcol: if want_x {
            vec![0.0; g.col_len()]
        } else {
            Vec::new()
        },
    };
    // One sample's share: im2col, the two GEMMs and col2im.
    let step = |par: gemm::Parallelism, acc: &mut ConvAcc, b: usize, dx_b: Option<&mut [f32]>| {
        let x_b = &x[b * x_len..(b + 1) * x_len];
        let gy_b = &gy[b * y_len..(b + 1) * y_len];
        if want_bias {
            for (db, row) in acc.db.iter_mut().zip(gy_b.chunks(pixels.max(1))) {
                *db += row.iter().sum::<f32>();
            }
        }
        let ow = g.out_w();
        let mut dx_b = dx_b;
        for tile in g.tiles() {
            let (at, tp) = (tile.start * ow, tile.len() * ow);
            // This tile's columns of gy_b: [Cout, tile], row stride P.
            let (gy_t, gy_s) = (&gy_b[at..], (pixels, 1));
            if want_weight {
                let col: &[f32] = if pointwise {
                    x_b
                } else {
                    im2col(g, x_b, tile.clone(), &mut acc.col);
                    &acc.col
                };
                // [Cout, tile] · [tile, R] (col read transposed)
                let dims = (g.c_out, rows, tp);
                matmul(par, dims, &mut acc.dw, rows, true, gy_t, gy_s, col, (1, tp));
            }
            if let Some(dx_b) = dx_b.as_deref_mut() {
                // [R, Cout] (weight read transposed) · [Cout, tile]
                let (dims, w_s) = ((rows, tp, g.c_out), (1, rows));
                if pointwise {
                    matmul(par, dims, dx_b, pixels, false, weight, w_s, gy_t, gy_s);
                } else {
                    let dcol = &mut acc.dcol;
                    matmul(par, dims, dcol, tp, false, weight, w_s, gy_t, gy_s);
                    col2im_add(g, dcol, tile, dx_b);
                }
            }
        }
    };
    // Fixed groups of samples (a function of the batch size alone), each summed in sample order
    // by one task, and the groups' partial sums added in group order: the gradients do not
    // depend on the thread count or on how rayon schedules the groups.
    let per_group = g.batch.div_ceil(SUM_GROUPS).max(1);
    let groups = g.batch.div_ceil(per_group);
    let par = if groups >= rayon::current_num_threads() {
        gemm::Parallelism::None
    } else {
        gemm::Parallelism::Rayon(0)
    };
    let mut targets = targets.into_iter();
    let work: Vec<(usize, Vec<Option<&mut [f32]>>)> = (0..groups)
        .map(|i| (i * per_group, targets.by_ref().take(per_group).collect()))
        .collect();
    let partials: Vec<ConvAcc> = work
        .into_par_iter()
        .map(|(first, dx)| {
            let mut acc = new_acc();
            for (b, dx_b) in (first..).zip(dx) {
                step(par, &mut acc, b, dx_b);
            }
            acc
        })
        .collect();
    let mut partials = partials.into_iter();
    let (mut dw, mut db) = match partials.next() {
        Some(acc) => (acc.dw, acc.db),
        None => (vec![0.0; g.c_out * rows], vec![0.0; g.c_out]),
    };
    for acc in partials {
        dw.iter_mut().zip(&acc.dw).for_each(|(a, b)| *a += b);
        db.iter_mut().zip(&acc.db).for_each(|(a, b)| *a += b);
    }
    ConvGrads {
        x: want_x.then_some(dx),
        weight: want_weight.then_some(dw),
        bias: want_bias.then_some(db),
    }
}

/// A GroupNorm over [B, C, H·W] with `groups` groups of C / groups channels.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NormGeom {
    pub batch: usize,
    pub channels: usize,
    pub groups: usize,
    /// H·W
    pub pixels: usize,
    pub eps: f64,
}

impl NormGeom {
    fn per_group(&self) -> usize {
        self.channels / self.groups
    }

    /// Elements of one (sample, group).
    fn group_len(&self) -> usize {
        self.per_group() * self.pixels
    }
}

/// The optional FiLM modulation `y · (1 + scale) + shift`, per (sample, channel).
#[derive(Clone, Copy, Debug)]
pub struct Film<'a> {
    /// [B, C]
    pub scale: &'a [f32],
    /// [B, C]
    pub shift: &'a [f32],
}

/// The forward's output and the statistics its backward reads.
#[derive(Debug)]
pub struct NormOut {
    /// [B, C, H·W]
    pub y: Vec<f32>,
    /// [B, groups]
    pub mean: Vec<f32>,
    /// [B, groups]: 1 / √(var + eps), with the biased variance.
    pub rstd: Vec<f32>,
}

/// e^x without a libm call, so that the loops around it vectorise: e^x = 2^n · e^r with
/// n = ⌊x / ln 2 + ½⌋ and r = x − n·ln 2 ∈ [−ln 2 / 2, ln 2 / 2] (ln 2 split in two for an exact
/// subtraction), e^r by its degree-6 Taylor polynomial (truncation < 1.2e-7 on that interval)
/// and 2^n from the exponent bits. x is clamped to [−87.3, 88.3], where 2^n stays a normal f32.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let x = x.clamp(-87.3, 88.3);
    let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

#[inline(always)]
fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + exp(-z))
}

/// Lanes of the vectorised sums: each reduction keeps this many partial sums, added in a fixed
/// order at the end (deterministic, and no worse than a sequential sum).
const LANES: usize = 16;

/// Σ f(v) over `xs` in f64, lane-wise.
#[inline(always)]
fn sum_f64(xs: &[f32], f: impl Fn(f64) -> f64) -> f64 {
    let mut acc = [0.0f64; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f(v as f64);
        }
    }
    let tail: f64 = chunks.remainder().iter().map(|&v| f(v as f64)).sum();
    acc.iter().sum::<f64>() + tail
}

/// out = act((x − μ) / √(σ² + eps) · γ + β) [· (1 + scale) + shift], act = SiLU or identity.
///
/// x: [B, C, H·W], gamma, beta: [C], film: [B, C] each.
pub fn group_norm_forward(
    g: &NormGeom,
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    film: Option<Film<'_>>,
    silu: bool,
) -> NormOut {
    let (n, pixels) = (g.group_len(), g.pixels);
    assert_eq!(
        x.len(),
        g.batch * g.channels * pixels,
        "group_norm: input size"
    );
    assert!(gamma.len() == g.channels && beta.len() == g.channels);
    let bg = g.batch * g.groups;
    let mut y = vec![0.0f32; x.len()];
    let mut mean = vec![0.0f32; bg];
    let mut rstd = vec![0.0f32; bg];
    y.par_chunks_mut(n.max(1))
        .zip(mean.par_iter_mut().zip(rstd.par_iter_mut()))
        .enumerate()
        .for_each(|(i, (y, (mu, rs)))| {
            let xs = &x[i * n..(i + 1) * n];
            let args = (g, (i / g.groups, i % g.groups), xs, gamma, beta, film, silu);
            // SAFETY: the AVX2 + FMA version runs only where the CPU has both.
            (*mu, *rs) = if has_avx2() {
                unsafe { norm_forward_group_avx2(args, y) }
            } else {
                norm_forward_group(args, y)
            };
        });
    NormOut { y, mean, rstd }
}

/// One (sample, group) of a GroupNorm: geometry, (sample, group), its input x: [C/G, H·W],
/// gamma, beta, FiLM and whether SiLU follows.
type NormGroup<'a> = (
    &'a NormGeom,
    (usize, usize),
    &'a [f32],
    &'a [f32],
    &'a [f32],
    Option<Film<'a>>,
    bool,
);

/// The per-channel (1 + scale, shift) of FiLM for sample `b`, channel `c` ((1, 0) without).
#[inline(always)]
fn film_at(film: Option<Film<'_>>, channels: usize, b: usize, c: usize) -> (f32, f32) {
    match film {
        Some(film) => (
            1.0 + film.scale[b * channels + c],
            film.shift[b * channels + c],
        ),
        None => (1.0, 0.0),
    }
}

/// [`group_norm_forward`] of one (sample, group) into y: [C/G, H·W]; returns (mean, 1/std).
#[inline(always)]
fn norm_forward_group(
    (g, (b, grp), xs, gamma, beta, film, silu): NormGroup<'_>,
    y: &mut [f32],
) -> (f32, f32) {
    let (cpg, n, pixels) = (g.per_group(), g.group_len(), g.pixels);
    let m = sum_f64(xs, |v| v) / n as f64;
    let var = sum_f64(xs, |v| (v - m) * (v - m)) / n as f64;
    let r = 1.0 / (var + g.eps).sqrt();
    for j in 0..cpg {
        let c = grp * cpg + j;
        let (f, t) = film_at(film, g.channels, b, c);
        // z = x · a + off, folding normalisation, affine and FiLM.
        let a = (r as f32) * gamma[c] * f;
        let off = (beta[c] - (m * r) as f32 * gamma[c]) * f + t;
        let src = &xs[j * pixels..(j + 1) * pixels];
        let dst = &mut y[j * pixels..(j + 1) * pixels];
        if silu {
            for (d, &v) in dst.iter_mut().zip(src) {
                let z = v * a + off;
                *d = z * sigmoid(z);
            }
        } else {
            for (d, &v) in dst.iter_mut().zip(src) {
                *d = v * a + off;
            }
        }
    }
    (m as f32, r as f32)
}

/// [`norm_forward_group`] compiled for AVX2 + FMA (the build's baseline is SSE2: without this,
/// `floor` in [`exp`] is a libm call and nothing vectorises).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn norm_forward_group_avx2(args: NormGroup<'_>, y: &mut [f32]) -> (f32, f32) {
    norm_forward_group(args, y)
}

/// Where one (sample, group)'s backward writes: dx: [C/G, H·W]; FiLM's ds, dt and this sample's
/// share of dγ, dβ: [C/G] each.
struct NormGroupGrads<'a> {
    dx: &'a mut [f32],
    ds: &'a mut [f32],
    dt: &'a mut [f32],
    dg: &'a mut [f32],
    db: &'a mut [f32],
}

/// [`group_norm_backward`] of one (sample, group), given its (mean, 1/std) and output gradient.
#[inline(always)]
fn norm_backward_group(
    (g, (b, grp), xs, gamma, beta, film, silu): NormGroup<'_>,
    (mu, r): (f32, f32),
    gs: &[f32],
    out: NormGroupGrads<'_>,
) {
    let (cpg, n, pixels) = (g.per_group(), g.group_len(), g.pixels);
    let NormGroupGrads { dx, ds, dt, dg, db } = out;
    let (mut sum1, mut sum2) = (0.0f64, 0.0f64);
    for j in 0..cpg {
        let c = grp * cpg + j;
        let (f, t) = film_at(film, g.channels, b, c);
        let (gm, bt) = (gamma[c], beta[c]);
        let element = |v: f32, go: f32| {
            let xh = (v - mu) * r;
            let y = xh * gm + bt;
            let dz = if silu {
                let z = y * f + t;
                let sg = sigmoid(z);
                go * sg * (1.0 + z * (1.0 - sg))
            } else {
                go
            };
            let dy = dz * f;
            let dxh = dy * gm;
            (dxh, [dz * y, dz, dy * xh, dy, dxh, dxh * xh])
        };
        // Lane-wise partial sums of dz·y, dz, dy·x̂, dy, dx̂ and dx̂·x̂.
        let mut acc = [[0.0f32; LANES]; 6];
        let range = j * pixels..(j + 1) * pixels;
        let (dxs, xj, gj) = (&mut dx[range.clone()], &xs[range.clone()], &gs[range]);
        let full = pixels - pixels % LANES;
        for ((d, xv), gv) in dxs[..full]
            .chunks_exact_mut(LANES)
            .zip(xj[..full].chunks_exact(LANES))
            .zip(gj[..full].chunks_exact(LANES))
        {
            for l in 0..LANES {
                let (dxh, terms) = element(xv[l], gv[l]);
                d[l] = dxh;
                for (a, term) in acc.iter_mut().zip(terms) {
                    a[l] += term;
                }
            }
        }
        let mut sums = acc.map(|a| a.iter().sum::<f32>());
        for ((d, &v), &go) in dxs[full..].iter_mut().zip(&xj[full..]).zip(&gj[full..]) {
            let (dxh, terms) = element(v, go);
            *d = dxh;
            for (s, term) in sums.iter_mut().zip(terms) {
                *s += term;
            }
        }
        let [s_ds, s_dt, s_dg, s_db, s1, s2] = sums;
        ds[j] = s_ds;
        dt[j] = s_dt;
        dg[j] = s_dg;
        db[j] = s_db;
        sum1 += s1 as f64;
        sum2 += s2 as f64;
    }
    let m1 = (sum1 / n as f64) as f32;
    let m2 = (sum2 / n as f64) as f32;
    for (d, &v) in dx.iter_mut().zip(xs) {
        let xh = (v - mu) * r;
        *d = r * (*d - m1 - xh * m2);
    }
}

/// [`norm_backward_group`] compiled for AVX2 + FMA (see [`norm_forward_group_avx2`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn norm_backward_group_avx2(
    args: NormGroup<'_>,
    stats: (f32, f32),
    gs: &[f32],
    out: NormGroupGrads<'_>,
) {
    norm_backward_group(args, stats, gs, out)
}

/// Whether this CPU runs the AVX2 + FMA versions of the GroupNorm kernels.
fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Elsewhere there is no AVX2 version; [`has_avx2`] is false and these are never called.
#[cfg(not(target_arch = "x86_64"))]
unsafe fn norm_forward_group_avx2(args: NormGroup<'_>, y: &mut [f32]) -> (f32, f32) {
    norm_forward_group(args, y)
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn norm_backward_group_avx2(
    args: NormGroup<'_>,
    stats: (f32, f32),
    gs: &[f32],
    out: NormGroupGrads<'_>,
) {
    norm_backward_group(args, stats, gs, out)
}

/// Gradients of [`group_norm_forward`].
#[derive(Debug)]
pub struct NormGrads {
    /// [B, C, H·W]
    pub x: Vec<f32>,
    /// [C]
    pub gamma: Vec<f32>,
    /// [C]
    pub beta: Vec<f32>,
    /// [B, C] (zeros without FiLM)
    pub scale: Vec<f32>,
    /// [B, C] (zeros without FiLM)
    pub shift: Vec<f32>,
}

/// Backward of [`group_norm_forward`] given gout = ∂L/∂out and the forward's statistics.
///
/// With x̂ = (x − μ)·rstd, y = x̂γ + β, z = y(1 + s) + t, out = act(z):
/// dz = gout · act'(z); ds = Σ dz·y, dt = Σ dz (per sample and channel); dy = dz(1 + s);
/// dγ = Σ dy·x̂, dβ = Σ dy (over samples and pixels); dx̂ = dy·γ; and per (sample, group)
/// dx = rstd · (dx̂ − mean(dx̂) − x̂ · mean(dx̂ · x̂)).
#[allow(clippy::too_many_arguments)]
pub fn group_norm_backward(
    g: &NormGeom,
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    film: Option<Film<'_>>,
    silu: bool,
    stats: (&[f32], &[f32]),
    gout: &[f32],
) -> NormGrads {
    let (cpg, n, pixels, c_all) = (g.per_group(), g.group_len(), g.pixels, g.channels);
    assert_eq!(
        x.len(),
        g.batch * c_all * pixels,
        "group_norm backward: input size"
    );
    assert_eq!(
        gout.len(),
        x.len(),
        "group_norm backward: output gradient size"
    );
    let (mean, rstd) = stats;
    let mut dx = vec![0.0f32; x.len()];
    // Per (sample, channel): FiLM's gradients, and the sample's share of dγ and dβ.
    let bc = g.batch * c_all;
    let (mut ds, mut dt) = (vec![0.0f32; bc], vec![0.0f32; bc]);
    let (mut dg_part, mut db_part) = (vec![0.0f32; bc], vec![0.0f32; bc]);
    dx.par_chunks_mut(n.max(1))
        .zip(
            ds.par_chunks_mut(cpg.max(1))
                .zip(dt.par_chunks_mut(cpg.max(1))),
        )
        .zip(
            dg_part
                .par_chunks_mut(cpg.max(1))
                .zip(db_part.par_chunks_mut(cpg.max(1))),
        )
        .enumerate()
        .for_each(|(i, ((dx, (ds, dt)), (dg, db)))| {
            let (xs, gs) = (&x[i * n..(i + 1) * n], &gout[i * n..(i + 1) * n]);
            let args = (g, (i / g.groups, i % g.groups), xs, gamma, beta, film, silu);
            let out = NormGroupGrads { dx, ds, dt, dg, db };
            let stats = (mean[i], rstd[i]);
            // SAFETY: the AVX2 + FMA version runs only where the CPU has both.
            if has_avx2() {
                unsafe { norm_backward_group_avx2(args, stats, gs, out) }
            } else {
                norm_backward_group(args, stats, gs, out)
            }
        });
    let sum_over_batch = |part: &[f32]| {
        let mut out = vec![0.0f32; c_all];
        for row in part.chunks(c_all.max(1)) {
            out.iter_mut().zip(row).for_each(|(o, v)| *o += v);
        }
        out
    };
    NormGrads {
        gamma: sum_over_batch(&dg_part),
        beta: sum_over_batch(&db_part),
        x: dx,
        scale: ds,
        shift: dt,
    }
}

/// Multi-head attention `softmax(q kᵀ / √dh + bias) v` with a per-key additive bias.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnGeom {
    pub batch: usize,
    pub heads: usize,
    /// Queries
    pub lq: usize,
    /// Keys (and values)
    pub lk: usize,
    /// Head width
    pub dh: usize,
}

/// The attention's output and the probabilities its backward reads.
#[derive(Debug)]
pub struct AttnOut {
    /// [B, H, Lq, dh]
    pub o: Vec<f32>,
    /// [B, H, Lq, Lk]: softmax(q kᵀ / √dh + bias)
    pub p: Vec<f32>,
}

/// q: [B, H, Lq, dh], k, v: [B, H, Lk, dh], bias: [B, Lk] (broadcast over heads and queries).
/// Per (sample, head): S = q kᵀ / √dh + bias, P = softmax over keys, O = P v.
pub fn attention_forward(g: &AttnGeom, q: &[f32], k: &[f32], v: &[f32], bias: &[f32]) -> AttnOut {
    let AttnGeom {
        batch,
        heads,
        lq,
        lk,
        dh,
    } = *g;
    assert_eq!(q.len(), batch * heads * lq * dh, "attention: query size");
    assert!(
        k.len() == batch * heads * lk * dh && v.len() == k.len(),
        "attention: key size"
    );
    assert_eq!(bias.len(), batch * lk, "attention: bias size");
    let scale = 1.0 / (dh as f32).sqrt();
    let mut o = vec![0.0f32; q.len()];
    let mut p = vec![0.0f32; batch * heads * lq * lk];
    o.par_chunks_mut((lq * dh).max(1))
        .zip(p.par_chunks_mut((lq * lk).max(1)))
        .enumerate()
        .for_each(|(i, (o, p))| {
            let b = i / heads;
            let (q, k, v) = (
                &q[i * lq * dh..][..lq * dh],
                &k[i * lk * dh..][..lk * dh],
                &v[i * lk * dh..][..lk * dh],
            );
            let none = gemm::Parallelism::None;
            // [Lq, dh] · [dh, Lk] (k read transposed)
            matmul(none, (lq, lk, dh), p, lk, false, q, (dh, 1), k, (1, dh));
            let bias = &bias[b * lk..(b + 1) * lk];
            for row in p.chunks_mut(lk.max(1)) {
                let mut max = f32::NEG_INFINITY;
                for (s, &bv) in row.iter_mut().zip(bias) {
                    *s = *s * scale + bv;
                    max = max.max(*s);
                }
                let mut sum = 0.0f32;
                for s in row.iter_mut() {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                let inv = 1.0 / sum;
                row.iter_mut().for_each(|s| *s *= inv);
            }
            // [Lq, Lk] · [Lk, dh]
            matmul(none, (lq, dh, lk), o, dh, false, p, (lk, 1), v, (dh, 1));
        });
    AttnOut { o, p }
}

/// Gradients of [`attention_forward`] (the bias is a constant: never differentiated).
#[derive(Debug)]
pub struct AttnGrads {
    /// [B, H, Lq, dh]
    pub q: Vec<f32>,
    /// [B, H, Lk, dh]
    pub k: Vec<f32>,
    /// [B, H, Lk, dh]
    pub v: Vec<f32>,
}

/// Backward of [`attention_forward`] given go = ∂L/∂O and its probabilities P, per (sample, head):
/// dV = Pᵀ dO, dP = dO vᵀ, dS = P ⊙ (dP − Σ_keys dP ⊙ P), dq = dS k / √dh, dk = dSᵀ q / √dh.
pub fn attention_backward(
    g: &AttnGeom,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    p: &[f32],
    go: &[f32],
) -> AttnGrads {
    let AttnGeom {
        batch,
        heads,
        lq,
        lk,
        dh,
    } = *g;
    assert_eq!(
        go.len(),
        batch * heads * lq * dh,
        "attention backward: output gradient size"
    );
    assert_eq!(
        p.len(),
        batch * heads * lq * lk,
        "attention backward: probabilities size"
    );
    let scale = 1.0 / (dh as f32).sqrt();
    let (mut dq, mut dk, mut dv) = (
        vec![0.0f32; q.len()],
        vec![0.0f32; k.len()],
        vec![0.0f32; v.len()],
    );
    dq.par_chunks_mut((lq * dh).max(1))
        .zip(
            dk.par_chunks_mut((lk * dh).max(1))
                .zip(dv.par_chunks_mut((lk * dh).max(1))),
        )
        .enumerate()
        .for_each_init(
            || vec![0.0f32; lq * lk],
            |ds, (i, (dq, (dk, dv)))| {
                let (q, k, v) = (
                    &q[i * lq * dh..][..lq * dh],
                    &k[i * lk * dh..][..lk * dh],
                    &v[i * lk * dh..][..lk * dh],
                );
                let (p, go) = (&p[i * lq * lk..][..lq * lk], &go[i * lq * dh..][..lq * dh]);
                let none = gemm::Parallelism::None;
                // dV = Pᵀ [Lk, Lq] · dO [Lq, dh]
                matmul(none, (lk, dh, lq), dv, dh, false, p, (1, lk), go, (dh, 1));
                // dP = dO [Lq, dh] · vᵀ [dh, Lk], then dS in place
                matmul(none, (lq, lk, dh), ds, lk, false, go, (dh, 1), v, (1, dh));
                for (d, pr) in ds.chunks_mut(lk.max(1)).zip(p.chunks(lk.max(1))) {
                    let dot: f32 = d.iter().zip(pr).map(|(a, b)| a * b).sum();
                    for (d, &pv) in d.iter_mut().zip(pr) {
                        *d = pv * (*d - dot) * scale;
                    }
                }
                // dq = dS [Lq, Lk] · k [Lk, dh]; dk = dSᵀ [Lk, Lq] · q [Lq, dh] (dS holds the 1/√dh)
                matmul(none, (lq, dh, lk), dq, dh, false, ds, (lk, 1), k, (dh, 1));
                matmul(none, (lk, dh, lq), dk, dh, false, ds, (1, lk), q, (dh, 1));
            },
        );
    AttnGrads {
        q: dq,
        k: dk,
        v: dv,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(n: usize, seed: u32) -> Vec<f32> {
        // A deterministic, irregular sequence in [-1, 1].
        (0..n)
            .map(|i| {
                let v = (i as u32)
                    .wrapping_mul(2_654_435_761)
                    .wrapping_add(seed.wrapping_mul(40_503));
                (v >> 8) as f32 / (1u32 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// Calls `f(xi, wi, yi)` for every tap of the direct convolution: output element yi
    /// reads input element xi through weight wi (padding taps skipped).
    fn for_each_tap(g: &ConvGeom, mut f: impl FnMut(usize, usize, usize)) {
        let (oh, ow, k) = (g.out_h(), g.out_w(), g.k);
        for b in 0..g.batch {
            for co in 0..g.c_out {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let yi = ((b * g.c_out + co) * oh + oy) * ow + ox;
                        for ci in 0..g.c_in {
                            for ky in 0..k {
                                for kx in 0..k {
                                    let iy = (oy + ky) as isize - g.pad as isize;
                                    let ix = (ox + kx) as isize - g.pad as isize;
                                    if iy < 0 || ix < 0 || iy >= g.h as isize || ix >= g.w as isize
                                    {
                                        continue;
                                    }
                                    let xi =
                                        ((b * g.c_in + ci) * g.h + iy as usize) * g.w + ix as usize;
                                    f(xi, ((co * g.c_in + ci) * k + ky) * k + kx, yi);
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// Direct convolution, for reference. x: [B, Cin, H, W], w: [Cout, Cin, k, k]
    fn conv_direct(g: &ConvGeom, x: &[f32], w: &[f32], bias: &[f32]) -> Vec<f64> {
        let pixels = g.out_h() * g.out_w();
        let mut y: Vec<f64> = (0..g.batch * g.c_out * pixels)
            .map(|i| bias[(i / pixels) % g.c_out] as f64)
            .collect();
        for_each_tap(g, |xi, wi, yi| y[yi] += x[xi] as f64 * w[wi] as f64);
        y
    }

    fn max_rel(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-12);
        a.iter()
            .zip(b)
            .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()))
            / scale
    }

    /// ∂/∂θ of L = Σ gy ⊙ conv(θ), by central differences on the direct convolution (f64 sums).
    fn numeric_conv_grad(
        g: &ConvGeom,
        x: &[f32],
        w: &[f32],
        bias: &[f32],
        gy: &[f32],
        which: usize,
        idx: usize,
    ) -> f32 {
        let loss = |x: &[f32], w: &[f32], bias: &[f32]| {
            conv_direct(g, x, w, bias)
                .iter()
                .zip(gy)
                .map(|(a, b)| a * *b as f64)
                .sum::<f64>()
        };
        let h = 1e-2f32;
        let (mut xp, mut wp, mut bp) = (x.to_vec(), w.to_vec(), bias.to_vec());
        let (mut xm, mut wm, mut bm) = (x.to_vec(), w.to_vec(), bias.to_vec());
        match which {
            0 => {
                xp[idx] += h;
                xm[idx] -= h;
            }
            1 => {
                wp[idx] += h;
                wm[idx] -= h;
            }
            _ => {
                bp[idx] += h;
                bm[idx] -= h;
            }
        }
        ((loss(&xp, &wp, &bp) - loss(&xm, &wm, &bm)) / (2.0 * h as f64)) as f32
    }

    #[test]
    fn should_match_a_direct_convolution_and_finite_differences_for_its_gradients() {
        for g in [
            ConvGeom {
                batch: 2,
                c_in: 3,
                c_out: 4,
                h: 5,
                w: 7,
                k: 3,
                pad: 1,
            },
            ConvGeom {
                batch: 3,
                c_in: 2,
                c_out: 3,
                h: 4,
                w: 3,
                k: 1,
                pad: 0,
            },
            ConvGeom {
                batch: 1,
                c_in: 2,
                c_out: 2,
                h: 6,
                w: 5,
                k: 3,
                pad: 0,
            },
            ConvGeom {
                batch: 2,
                c_in: 1,
                c_out: 2,
                h: 3,
                w: 3,
                k: 5,
                pad: 2,
            },
        ] {
            let x = seq(g.batch * g.c_in * g.h * g.w, 1);
            let w = seq(g.c_out * g.c_in * g.k * g.k, 2);
            let bias = seq(g.c_out, 3);
            let gy = seq(g.batch * g.c_out * g.out_h() * g.out_w(), 4);
            let y = conv2d_forward(&g, &x, &w, &bias);
            let want: Vec<f32> = conv_direct(&g, &x, &w, &bias)
                .iter()
                .map(|&v| v as f32)
                .collect();
            assert!(max_rel(&y, &want) < 1e-6, "{g:?} y {}", max_rel(&y, &want));
            let grads = conv2d_backward(&g, &x, &w, &gy, (true, true, true));
            let (dx, dw, db) = (grads.x.unwrap(), grads.weight.unwrap(), grads.bias.unwrap());
            let nx: Vec<f32> = (0..x.len())
                .map(|i| numeric_conv_grad(&g, &x, &w, &bias, &gy, 0, i))
                .collect();
            let nw: Vec<f32> = (0..w.len())
                .map(|i| numeric_conv_grad(&g, &x, &w, &bias, &gy, 1, i))
                .collect();
            let nb: Vec<f32> = (0..bias.len())
                .map(|i| numeric_conv_grad(&g, &x, &w, &bias, &gy, 2, i))
                .collect();
            assert!(max_rel(&dx, &nx) < 1e-4, "{g:?} dx {}", max_rel(&dx, &nx));
            assert!(max_rel(&dw, &nw) < 1e-4, "{g:?} dw {}", max_rel(&dw, &nw));
            assert!(max_rel(&db, &nb) < 1e-4, "{g:?} db {}", max_rel(&db, &nb));
            // Only what is asked for is computed.
            let some = conv2d_backward(&g, &x, &w, &gy, (false, true, false));
            assert!(some.x.is_none() && some.bias.is_none());
            assert_eq!(some.weight.unwrap(), dw);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn norm_loss(
        g: &NormGeom,
        x: &[f32],
        gamma: &[f32],
        beta: &[f32],
        s: &[f32],
        t: &[f32],
        film: bool,
        silu: bool,
        go: &[f32],
    ) -> f64 {
        let film = film.then_some(Film { scale: s, shift: t });
        let y = group_norm_forward(g, x, gamma, beta, film, silu).y;
        y.iter().zip(go).map(|(a, b)| *a as f64 * *b as f64).sum()
    }

    #[test]
    fn should_match_finite_differences_for_every_group_norm_gradient() {
        let g = NormGeom {
            batch: 2,
            channels: 6,
            groups: 3,
            pixels: 5,
            eps: 1e-5,
        };
        let x: Vec<f32> = seq(g.batch * g.channels * g.pixels, 5)
            .iter()
            .map(|v| 2.0 * v + 0.3)
            .collect();
        let gamma: Vec<f32> = seq(g.channels, 6).iter().map(|v| 1.0 + 0.5 * v).collect();
        let beta = seq(g.channels, 7);
        let s = seq(g.batch * g.channels, 8);
        let t = seq(g.batch * g.channels, 9);
        let go = seq(x.len(), 10);
        for (film, silu) in [(false, false), (false, true), (true, true), (true, false)] {
            let out = group_norm_forward(
                &g,
                &x,
                &gamma,
                &beta,
                film.then_some(Film {
                    scale: &s,
                    shift: &t,
                }),
                silu,
            );
            let grads = group_norm_backward(
                &g,
                &x,
                &gamma,
                &beta,
                film.then_some(Film {
                    scale: &s,
                    shift: &t,
                }),
                silu,
                (&out.mean, &out.rstd),
                &go,
            );
            let h = 1e-3f32;
            let num = |which: usize, i: usize| {
                let mut v = [x.clone(), gamma.clone(), beta.clone(), s.clone(), t.clone()];
                v[which][i] += h;
                let lp = norm_loss(&g, &v[0], &v[1], &v[2], &v[3], &v[4], film, silu, &go);
                v[which][i] -= 2.0 * h;
                let lm = norm_loss(&g, &v[0], &v[1], &v[2], &v[3], &v[4], film, silu, &go);
                ((lp - lm) / (2.0 * h as f64)) as f32
            };
            let check = |name: &str, which: usize, got: &[f32]| {
                let want: Vec<f32> = (0..got.len()).map(|i| num(which, i)).collect();
                let err = max_rel(got, &want);
                assert!(err < 2e-3, "film {film} silu {silu}: d{name} rel err {err}");
            };
            check("x", 0, &grads.x);
            check("gamma", 1, &grads.gamma);
            check("beta", 2, &grads.beta);
            if film {
                check("scale", 3, &grads.scale);
                check("shift", 4, &grads.shift);
            }
        }
    }

    #[test]
    fn should_normalise_each_group_to_zero_mean_and_unit_variance() {
        let g = NormGeom {
            batch: 3,
            channels: 4,
            groups: 2,
            pixels: 9,
            eps: 0.0,
        };
        let x: Vec<f32> = seq(g.batch * g.channels * g.pixels, 11)
            .iter()
            .map(|v| 3.0 * v - 1.0)
            .collect();
        let ones = vec![1.0; g.channels];
        let zeros = vec![0.0; g.channels];
        let out = group_norm_forward(&g, &x, &ones, &zeros, None, false);
        for grp in out.y.chunks(2 * g.pixels) {
            let m = grp.iter().sum::<f32>() / grp.len() as f32;
            let v = grp.iter().map(|y| (y - m).powi(2)).sum::<f32>() / grp.len() as f32;
            assert!(m.abs() < 1e-5 && (v - 1.0).abs() < 1e-4, "mean {m} var {v}");
        }
    }

    #[test]
    fn should_give_the_same_bits_whatever_the_thread_count() {
        let g = ConvGeom {
            batch: 37,
            c_in: 3,
            c_out: 5,
            h: 6,
            w: 5,
            k: 3,
            pad: 1,
        };
        let x = seq(g.batch * g.c_in * g.h * g.w, 12);
        let w = seq(g.c_out * g.c_in * 9, 13);
        let bias = seq(g.c_out, 14);
        let gy = seq(g.batch * g.c_out * g.out_h() * g.out_w(), 15);
        let ng = NormGeom {
            batch: 7,
            channels: 6,
            groups: 2,
            pixels: 11,
            eps: 1e-5,
        };
        let nx = seq(ng.batch * ng.channels * ng.pixels, 16);
        let (gamma, beta) = (seq(6, 17), seq(6, 18));
        let go = seq(nx.len(), 19);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let y = conv2d_forward(&g, &x, &w, &bias);
                let d = conv2d_backward(&g, &x, &w, &gy, (true, true, true));
                let n = group_norm_forward(&ng, &nx, &gamma, &beta, None, true);
                let dn = group_norm_backward(
                    &ng,
                    &nx,
                    &gamma,
                    &beta,
                    None,
                    true,
                    (&n.mean, &n.rstd),
                    &go,
                );
                (
                    y,
                    d.x.unwrap(),
                    d.weight.unwrap(),
                    d.bias.unwrap(),
                    n.y,
                    dn.x,
                    dn.gamma,
                    dn.beta,
                )
            })
        };
        let one = run(1);
        for threads in [2, 3, 8] {
            assert!(run(threads) == one, "{threads} threads changed the result");
        }
    }

    #[test]
    fn should_compute_exp_to_within_a_few_ulps() {
        let mut worst = 0.0f64;
        for i in -87_000..=88_000 {
            let x = i as f32 * 1e-3;
            let want = (x as f64).exp();
            worst = worst.max(((exp(x) as f64 - want) / want).abs());
        }
        assert!(worst < 5e-7, "exp: relative error {worst:e}");
        assert_eq!(sigmoid(-200.0), 1.0 / (1.0 + exp(88.3)));
        assert_eq!(sigmoid(200.0), 1.0);
    }

    #[test]
    fn should_give_the_same_bits_with_and_without_avx2() {
        if !has_avx2() {
            return;
        }
        let g = NormGeom {
            batch: 1,
            channels: 4,
            groups: 2,
            pixels: 37,
            eps: 1e-5,
        };
        let x = seq(2 * g.pixels, 20);
        let (gamma, beta, go) = (seq(4, 21), seq(4, 22), seq(2 * g.pixels, 23));
        let (s, t) = (seq(4, 24), seq(4, 25));
        let film = Some(Film {
            scale: &s,
            shift: &t,
        });
        let args = (
            &g,
            (0, 1),
            x.as_slice(),
            gamma.as_slice(),
            beta.as_slice(),
            film,
            true,
        );
        let (mut y1, mut y2) = (vec![0.0; x.len()], vec![0.0; x.len()]);
        let stats = norm_forward_group(args, &mut y1);
        // SAFETY: this CPU has AVX2 and FMA (checked above).
        assert_eq!(unsafe { norm_forward_group_avx2(args, &mut y2) }, stats);
        assert_eq!(y1, y2);
        let run = |avx2: bool| {
            let (mut dx, mut ds, mut dt, mut dg, mut db) = (
                vec![0.0; x.len()],
                vec![0.0; 2],
                vec![0.0; 2],
                vec![0.0; 2],
                vec![0.0; 2],
            );
            let out = NormGroupGrads {
                dx: &mut dx,
                ds: &mut ds,
                dt: &mut dt,
                dg: &mut dg,
                db: &mut db,
            };
            if avx2 {
                // SAFETY: as above.
                unsafe { norm_backward_group_avx2(args, stats, &go, out) }
            } else {
                norm_backward_group(args, stats, &go, out)
            }
            (dx, ds, dt, dg, db)
        };
        assert!(run(true) == run(false));
    }

    /// dx, dW of L = Σ gy ⊙ conv(x, W) by the direct sums (f64).
    fn conv_direct_backward(
        g: &ConvGeom,
        x: &[f32],
        w: &[f32],
        gy: &[f32],
    ) -> (Vec<f32>, Vec<f32>) {
        let mut dx = vec![0.0f64; x.len()];
        let mut dw = vec![0.0f64; w.len()];
        for_each_tap(g, |xi, wi, yi| {
            dx[xi] += gy[yi] as f64 * w[wi] as f64;
            dw[wi] += gy[yi] as f64 * x[xi] as f64;
        });
        let f = |v: Vec<f64>| v.into_iter().map(|v| v as f32).collect();
        (f(dx), f(dw))
    }

    #[test]
    fn should_tile_large_images_and_give_the_same_convolution() {
        // Cin·k·k · W' = 9216 · 500 elements exceed the im2col budget: one output row per tile.
        let g = ConvGeom {
            batch: 2,
            c_in: 1024,
            c_out: 2,
            h: 3,
            w: 500,
            k: 3,
            pad: 1,
        };
        assert!(g.rows() * g.out_w() > COL_BUDGET && g.tile_rows() == 1 && g.tiles().count() == 3);
        let x = seq(g.batch * g.c_in * g.h * g.w, 26);
        let w = seq(g.c_out * g.c_in * 9, 27);
        let bias = seq(g.c_out, 28);
        let gy = seq(g.batch * g.c_out * g.out_h() * g.out_w(), 29);
        let y = conv2d_forward(&g, &x, &w, &bias);
        let want: Vec<f32> = conv_direct(&g, &x, &w, &bias)
            .iter()
            .map(|&v| v as f32)
            .collect();
        assert!(max_rel(&y, &want) < 1e-5, "y {}", max_rel(&y, &want));
        let grads = conv2d_backward(&g, &x, &w, &gy, (true, true, false));
        let (dx, dw) = conv_direct_backward(&g, &x, &w, &gy);
        assert!(max_rel(grads.x.as_ref().unwrap(), &dx) < 1e-5, "dx");
        assert!(max_rel(grads.weight.as_ref().unwrap(), &dw) < 1e-5, "dw");
    }

    fn attention_direct(g: &AttnGeom, q: &[f32], k: &[f32], v: &[f32], bias: &[f32]) -> Vec<f64> {
        let AttnGeom {
            batch,
            heads,
            lq,
            lk,
            dh,
        } = *g;
        let mut o = vec![0.0f64; batch * heads * lq * dh];
        for b in 0..batch {
            for h in 0..heads {
                let i = b * heads + h;
                for a in 0..lq {
                    let s: Vec<f64> = (0..lk)
                        .map(|j| {
                            let dot: f64 = (0..dh)
                                .map(|d| {
                                    q[(i * lq + a) * dh + d] as f64
                                        * k[(i * lk + j) * dh + d] as f64
                                })
                                .sum();
                            dot / (dh as f64).sqrt() + bias[b * lk + j] as f64
                        })
                        .collect();
                    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for d in 0..dh {
                        o[(i * lq + a) * dh + d] = (0..lk)
                            .map(|j| e[j] / z * v[(i * lk + j) * dh + d] as f64)
                            .sum();
                    }
                }
            }
        }
        o
    }

    #[test]
    fn should_match_direct_attention_and_finite_differences_for_its_gradients() {
        let g = AttnGeom {
            batch: 2,
            heads: 3,
            lq: 5,
            lk: 7,
            dh: 4,
        };
        let q = seq(g.batch * g.heads * g.lq * g.dh, 30);
        let k = seq(g.batch * g.heads * g.lk * g.dh, 31);
        let v = seq(k.len(), 32);
        let mut bias = vec![0.0f32; g.batch * g.lk];
        bias[5..7].fill(-1.0e4); // masked keys, as the model's pad mask
        let go = seq(q.len(), 33);
        let out = attention_forward(&g, &q, &k, &v, &bias);
        let want: Vec<f32> = attention_direct(&g, &q, &k, &v, &bias)
            .iter()
            .map(|&x| x as f32)
            .collect();
        assert!(
            max_rel(&out.o, &want) < 1e-5,
            "o {}",
            max_rel(&out.o, &want)
        );
        let grads = attention_backward(&g, &q, &k, &v, &out.p, &go);
        let loss = |q: &[f32], k: &[f32], v: &[f32]| -> f64 {
            attention_direct(&g, q, k, v, &bias)
                .iter()
                .zip(&go)
                .map(|(a, b)| a * *b as f64)
                .sum()
        };
        let h = 1e-2f32;
        for (which, got) in [(0, &grads.q), (1, &grads.k), (2, &grads.v)] {
            let num: Vec<f32> = (0..got.len())
                .map(|i| {
                    let mut t = [q.clone(), k.clone(), v.clone()];
                    t[which][i] += h;
                    let lp = loss(&t[0], &t[1], &t[2]);
                    t[which][i] -= 2.0 * h;
                    let lm = loss(&t[0], &t[1], &t[2]);
                    ((lp - lm) / (2.0 * h as f64)) as f32
                })
                .collect();
            let err = max_rel(got, &num);
            assert!(err < 1e-3, "input {which}: rel err {err}");
        }
    }
}
