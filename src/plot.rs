//! A small raster plotting kit for `flowrun report`: an RGB canvas, a built-in 5×7 bitmap font,
//! "nice" axis ticks and line charts with axes, grid, numeric tick labels, a title and a legend.
//! No fonts or plotting libraries: everything is drawn pixel by pixel.

pub type Rgb = [u8; 3];

pub const WHITE: Rgb = [255, 255, 255];
pub const BLACK: Rgb = [0, 0, 0];
const INK: Rgb = [30, 30, 30];
const AXIS: Rgb = [60, 60, 60];
const GRID: Rgb = [228, 228, 228];
const MUTED: Rgb = [110, 110, 110];

/// Series colours (the "tab10" palette): distinguishable and none of them grey.
pub const PALETTE: [Rgb; 10] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [188, 189, 34],
    [23, 190, 207],
    [127, 127, 127],
];

/// The colour of the `i`-th series. The tenth palette entry (grey) is skipped, so a plotted
/// curve is never confused with the grid or the axes.
pub fn series_color(i: usize) -> Rgb {
    PALETTE[i % (PALETTE.len() - 1)]
}

// ---------------------------------------------------------------------------------------------
// Canvas

/// An 8-bit RGB image, row-major, 3 bytes per pixel.
pub struct Canvas {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<u8>,
}

/// An axis-aligned rectangle: left, top, right (exclusive), bottom (exclusive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rect {
    pub x0: i64,
    pub y0: i64,
    pub x1: i64,
    pub y1: i64,
}

impl Rect {
    fn contains(&self, x: i64, y: i64) -> bool {
        x >= self.x0 && x < self.x1 && y >= self.y0 && y < self.y1
    }
}

impl Canvas {
    pub fn new(width: usize, height: usize, background: Rgb) -> Self {
        Canvas {
            width,
            height,
            pixels: background.repeat(width * height),
        }
    }

    #[cfg(test)]
    pub fn get(&self, x: usize, y: usize) -> Rgb {
        let i = (y * self.width + x) * 3;
        [self.pixels[i], self.pixels[i + 1], self.pixels[i + 2]]
    }

    /// Set one pixel; coordinates outside the canvas are ignored.
    pub fn set(&mut self, x: i64, y: i64, c: Rgb) {
        if x >= 0 && y >= 0 && (x as usize) < self.width && (y as usize) < self.height {
            let i = (y as usize * self.width + x as usize) * 3;
            self.pixels[i..i + 3].copy_from_slice(&c);
        }
    }

    pub fn fill_rect(&mut self, x: i64, y: i64, w: i64, h: i64, c: Rgb) {
        for yy in y..y + h {
            for xx in x..x + w {
                self.set(xx, yy, c);
            }
        }
    }

    /// A line from (x0, y0) to (x1, y1) drawn with a square pen `pen` pixels wide (Bresenham),
    /// only inside `clip` when given.
    pub fn line(
        &mut self,
        (x0, y0): (i64, i64),
        (x1, y1): (i64, i64),
        c: Rgb,
        pen: i64,
        clip: Option<Rect>,
    ) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        let off = (pen - 1) / 2;
        // Guard against absurd coordinates (a non-finite value mapped to pixels).
        let mut budget = 1 << 16;
        loop {
            for py in y - off..y - off + pen {
                for px in x - off..x - off + pen {
                    if clip.is_none_or(|r| r.contains(px, py)) {
                        self.set(px, py, c);
                    }
                }
            }
            budget -= 1;
            if (x == x1 && y == y1) || budget == 0 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    /// Copy an RGB8 image (`w · h · 3` bytes) with its top-left corner at (x, y).
    pub fn blit(&mut self, x: i64, y: i64, w: usize, h: usize, rgb: &[u8]) {
        for yy in 0..h {
            for xx in 0..w {
                let i = (yy * w + xx) * 3;
                self.set(
                    x + xx as i64,
                    y + yy as i64,
                    [rgb[i], rgb[i + 1], rgb[i + 2]],
                );
            }
        }
    }

    /// Draw `s` with its top-left corner at (x, y), each font pixel `scale`×`scale`.
    /// Returns the width drawn.
    pub fn text(&mut self, x: i64, y: i64, s: &str, scale: usize, c: Rgb) -> usize {
        let k = scale.max(1) as i64;
        for (i, ch) in s.chars().enumerate() {
            let g = glyph(ch);
            let gx = x + i as i64 * ADVANCE as i64 * k;
            for (row, bits) in g.iter().enumerate() {
                for col in 0..GLYPH_W {
                    if bits & (1 << (GLYPH_W - 1 - col)) != 0 {
                        self.fill_rect(gx + col as i64 * k, y + row as i64 * k, k, k, c);
                    }
                }
            }
        }
        text_width(s, scale)
    }

    /// Draw `s` rotated 90° counter-clockwise (reading bottom to top), its baseline on the left:
    /// the text occupies x..x+7·scale and y−width..y.
    pub fn text_vertical(&mut self, x: i64, y: i64, s: &str, scale: usize, c: Rgb) {
        let k = scale.max(1) as i64;
        for (i, ch) in s.chars().enumerate() {
            let g = glyph(ch);
            let base = y - i as i64 * ADVANCE as i64 * k;
            for (row, bits) in g.iter().enumerate() {
                for col in 0..GLYPH_W {
                    if bits & (1 << (GLYPH_W - 1 - col)) != 0 {
                        self.fill_rect(x + row as i64 * k, base - (col as i64 + 1) * k, k, k, c);
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Font

/// Glyph cell: 5 columns × 7 rows above the baseline, plus 2 descender rows (used by g, j,
/// p, q, y only); characters advance by 6 columns.
pub const GLYPH_W: usize = 5;
pub const GLYPH_H: usize = 7;
pub const DESCENT: usize = 2;
/// Rows of a drawn line of text: the glyph cell and its descender rows.
pub const LINE_H: usize = GLYPH_H + DESCENT;
pub const ADVANCE: usize = 6;

/// Rows top to bottom (the last [`DESCENT`] below the baseline); bit 4 is the leftmost column.
pub type Glyph = [u8; LINE_H];

/// 5×7 glyphs without descenders.
#[rustfmt::skip]
const FONT: &[(char, [u8; GLYPH_H])] = &[
    (' ', [0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000]),
    ('0', [0b01110, 0b10001, 0b10011, 0b10101, 0b11001, 0b10001, 0b01110]),
    ('1', [0b00100, 0b01100, 0b00100, 0b00100, 0b00100, 0b00100, 0b01110]),
    ('2', [0b01110, 0b10001, 0b00001, 0b00010, 0b00100, 0b01000, 0b11111]),
    ('3', [0b11111, 0b00010, 0b00100, 0b00010, 0b00001, 0b10001, 0b01110]),
    ('4', [0b00010, 0b00110, 0b01010, 0b10010, 0b11111, 0b00010, 0b00010]),
    ('5', [0b11111, 0b10000, 0b11110, 0b00001, 0b00001, 0b10001, 0b01110]),
    ('6', [0b00110, 0b01000, 0b10000, 0b11110, 0b10001, 0b10001, 0b01110]),
    ('7', [0b11111, 0b00001, 0b00010, 0b00100, 0b01000, 0b01000, 0b01000]),
    ('8', [0b01110, 0b10001, 0b10001, 0b01110, 0b10001, 0b10001, 0b01110]),
    ('9', [0b01110, 0b10001, 0b10001, 0b01111, 0b00001, 0b00010, 0b01100]),
    ('A', [0b01110, 0b10001, 0b10001, 0b10001, 0b11111, 0b10001, 0b10001]),
    ('B', [0b11110, 0b10001, 0b10001, 0b11110, 0b10001, 0b10001, 0b11110]),
    ('C', [0b01110, 0b10001, 0b10000, 0b10000, 0b10000, 0b10001, 0b01110]),
    ('D', [0b11100, 0b10010, 0b10001, 0b10001, 0b10001, 0b10010, 0b11100]),
    ('E', [0b11111, 0b10000, 0b10000, 0b11110, 0b10000, 0b10000, 0b11111]),
    ('F', [0b11111, 0b10000, 0b10000, 0b11110, 0b10000, 0b10000, 0b10000]),
    ('G', [0b01110, 0b10001, 0b10000, 0b10111, 0b10001, 0b10001, 0b01111]),
    ('H', [0b10001, 0b10001, 0b10001, 0b11111, 0b10001, 0b10001, 0b10001]),
    ('I', [0b01110, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b01110]),
    ('J', [0b00111, 0b00010, 0b00010, 0b00010, 0b00010, 0b10010, 0b01100]),
    ('K', [0b10001, 0b10010, 0b10100, 0b11000, 0b10100, 0b10010, 0b10001]),
    ('L', [0b10000, 0b10000, 0b10000, 0b10000, 0b10000, 0b10000, 0b11111]),
    ('M', [0b10001, 0b11011, 0b10101, 0b10101, 0b10001, 0b10001, 0b10001]),
    ('N', [0b10001, 0b10001, 0b11001, 0b10101, 0b10011, 0b10001, 0b10001]),
    ('O', [0b01110, 0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b01110]),
    ('P', [0b11110, 0b10001, 0b10001, 0b11110, 0b10000, 0b10000, 0b10000]),
    ('Q', [0b01110, 0b10001, 0b10001, 0b10001, 0b10101, 0b10010, 0b01101]),
    ('R', [0b11110, 0b10001, 0b10001, 0b11110, 0b10100, 0b10010, 0b10001]),
    ('S', [0b01111, 0b10000, 0b10000, 0b01110, 0b00001, 0b00001, 0b11110]),
    ('T', [0b11111, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100]),
    ('U', [0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b01110]),
    ('V', [0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b01010, 0b00100]),
    ('W', [0b10001, 0b10001, 0b10001, 0b10101, 0b10101, 0b10101, 0b01010]),
    ('X', [0b10001, 0b10001, 0b01010, 0b00100, 0b01010, 0b10001, 0b10001]),
    ('Y', [0b10001, 0b10001, 0b10001, 0b01010, 0b00100, 0b00100, 0b00100]),
    ('Z', [0b11111, 0b00001, 0b00010, 0b00100, 0b01000, 0b10000, 0b11111]),
    ('a', [0b00000, 0b00000, 0b01110, 0b00001, 0b01111, 0b10001, 0b01111]),
    ('b', [0b10000, 0b10000, 0b10110, 0b11001, 0b10001, 0b10001, 0b11110]),
    ('c', [0b00000, 0b00000, 0b01110, 0b10000, 0b10000, 0b10001, 0b01110]),
    ('d', [0b00001, 0b00001, 0b01101, 0b10011, 0b10001, 0b10001, 0b01111]),
    ('e', [0b00000, 0b00000, 0b01110, 0b10001, 0b11111, 0b10000, 0b01110]),
    ('f', [0b00110, 0b01001, 0b01000, 0b11100, 0b01000, 0b01000, 0b01000]),
    ('h', [0b10000, 0b10000, 0b10110, 0b11001, 0b10001, 0b10001, 0b10001]),
    ('i', [0b00100, 0b00000, 0b01100, 0b00100, 0b00100, 0b00100, 0b01110]),
    ('k', [0b10000, 0b10000, 0b10010, 0b10100, 0b11000, 0b10100, 0b10010]),
    ('l', [0b01000, 0b01000, 0b01000, 0b01000, 0b01000, 0b01001, 0b00110]),
    ('m', [0b00000, 0b00000, 0b11010, 0b10101, 0b10101, 0b10001, 0b10001]),
    ('n', [0b00000, 0b00000, 0b10110, 0b11001, 0b10001, 0b10001, 0b10001]),
    ('o', [0b00000, 0b00000, 0b01110, 0b10001, 0b10001, 0b10001, 0b01110]),
    ('r', [0b00000, 0b00000, 0b10110, 0b11001, 0b10000, 0b10000, 0b10000]),
    ('s', [0b00000, 0b00000, 0b01110, 0b10000, 0b01110, 0b00001, 0b11110]),
    ('t', [0b01000, 0b01000, 0b11100, 0b01000, 0b01000, 0b01001, 0b00110]),
    ('u', [0b00000, 0b00000, 0b10001, 0b10001, 0b10001, 0b10011, 0b01101]),
    ('v', [0b00000, 0b00000, 0b10001, 0b10001, 0b10001, 0b01010, 0b00100]),
    ('w', [0b00000, 0b00000, 0b10001, 0b10001, 0b10101, 0b10101, 0b01010]),
    ('x', [0b00000, 0b00000, 0b10001, 0b01010, 0b00100, 0b01010, 0b10001]),
    ('z', [0b00000, 0b00000, 0b11111, 0b00010, 0b00100, 0b01000, 0b11111]),
    ('.', [0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b01100, 0b01100]),
    (',', [0b00000, 0b00000, 0b00000, 0b00000, 0b01100, 0b00100, 0b01000]),
    ('-', [0b00000, 0b00000, 0b00000, 0b11111, 0b00000, 0b00000, 0b00000]),
    ('+', [0b00000, 0b00100, 0b00100, 0b11111, 0b00100, 0b00100, 0b00000]),
    ('=', [0b00000, 0b00000, 0b11111, 0b00000, 0b11111, 0b00000, 0b00000]),
    ('/', [0b00000, 0b00001, 0b00010, 0b00100, 0b01000, 0b10000, 0b00000]),
    ('_', [0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b11111]),
    ('@', [0b01110, 0b10001, 0b00001, 0b01101, 0b10101, 0b10101, 0b01110]),
    (':', [0b00000, 0b01100, 0b01100, 0b00000, 0b01100, 0b01100, 0b00000]),
    ('%', [0b11000, 0b11001, 0b00010, 0b00100, 0b01000, 0b10011, 0b00011]),
    ('(', [0b00010, 0b00100, 0b01000, 0b01000, 0b01000, 0b00100, 0b00010]),
    (')', [0b01000, 0b00100, 0b00010, 0b00010, 0b00010, 0b00100, 0b01000]),
    ('[', [0b01110, 0b01000, 0b01000, 0b01000, 0b01000, 0b01000, 0b01110]),
    (']', [0b01110, 0b00010, 0b00010, 0b00010, 0b00010, 0b00010, 0b01110]),
    ('*', [0b00000, 0b00100, 0b10101, 0b01110, 0b10101, 0b00100, 0b00000]),
    ('#', [0b01010, 0b01010, 0b11111, 0b01010, 0b11111, 0b01010, 0b01010]),
    ('<', [0b00010, 0b00100, 0b01000, 0b10000, 0b01000, 0b00100, 0b00010]),
    ('>', [0b01000, 0b00100, 0b00010, 0b00001, 0b00010, 0b00100, 0b01000]),
    ('\'', [0b01100, 0b00100, 0b01000, 0b00000, 0b00000, 0b00000, 0b00000]),
    ('?', [0b01110, 0b10001, 0b00001, 0b00010, 0b00100, 0b00000, 0b00100]),
];

/// Lower-case letters with descenders: the 7 rows above the baseline, then the 2 below.
#[rustfmt::skip]
const DESCENDERS: &[(char, [u8; GLYPH_H], [u8; DESCENT])] = &[
    ('g', [0b00000, 0b00000, 0b01111, 0b10001, 0b10001, 0b10001, 0b01111], [0b00001, 0b01110]),
    ('j', [0b00010, 0b00000, 0b00110, 0b00010, 0b00010, 0b00010, 0b00010], [0b10010, 0b01100]),
    ('p', [0b00000, 0b00000, 0b11110, 0b10001, 0b10001, 0b10001, 0b11110], [0b10000, 0b10000]),
    ('q', [0b00000, 0b00000, 0b01111, 0b10001, 0b10001, 0b10001, 0b01111], [0b00001, 0b00001]),
    ('y', [0b00000, 0b00000, 0b10001, 0b10001, 0b10001, 0b10001, 0b01111], [0b00001, 0b01110]),
];

/// The glyph of `c`; characters the font lacks are drawn as `?`.
pub fn glyph(c: char) -> Glyph {
    let c = match c {
        '×' => 'x',
        'τ' => 't',
        _ => c,
    };
    let mut g = [0u8; LINE_H];
    if let Some((_, body, desc)) = DESCENDERS.iter().find(|(k, _, _)| *k == c) {
        g[..GLYPH_H].copy_from_slice(body);
        g[GLYPH_H..].copy_from_slice(desc);
    } else if let Some((_, body)) = FONT
        .iter()
        .find(|(k, _)| *k == c)
        .or_else(|| FONT.iter().find(|(k, _)| *k == '?'))
    {
        g[..GLYPH_H].copy_from_slice(body);
    }
    g
}

/// Width in pixels of `s` drawn at `scale` (no trailing spacing column).
pub fn text_width(s: &str, scale: usize) -> usize {
    let n = s.chars().count();
    if n == 0 {
        0
    } else {
        (n * ADVANCE - (ADVANCE - GLYPH_W)) * scale.max(1)
    }
}

/// `s` shortened to at most `max` characters (an ellipsis `..` marks the cut).
pub fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let keep: String = s.chars().take(max.saturating_sub(2)).collect();
        format!("{keep}..")
    }
}

// ---------------------------------------------------------------------------------------------
// Axis ticks

/// An axis range with evenly spaced "nice" ticks (1, 2 or 5 × 10^k apart) covering the data.
#[derive(Debug, Clone, PartialEq)]
pub struct Axis {
    pub lo: f64,
    pub hi: f64,
    pub step: f64,
    pub ticks: Vec<f64>,
}

/// The nice step (1, 2 or 5 × 10^k) that splits `span` into at most about `target` intervals.
pub fn nice_step(span: f64, target: usize) -> f64 {
    let raw = span / target.max(1) as f64;
    if !(raw.is_finite() && raw > 0.0) {
        return 1.0;
    }
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    let nice = if f <= 1.0 + 1e-9 {
        1.0
    } else if f <= 2.0 + 1e-9 {
        2.0
    } else if f <= 5.0 + 1e-9 {
        5.0
    } else {
        10.0
    };
    nice * mag
}

/// Ticks for data in [lo, hi], about `target` intervals; the axis is widened to the ticks
/// around the data. A single value (or an empty or non-finite range) gets a range around it.
/// `integer` keeps the step ≥ 1 (iterations).
pub fn nice_axis(lo: f64, hi: f64, target: usize, integer: bool) -> Axis {
    let (mut lo, mut hi) = if lo.is_finite() && hi.is_finite() {
        (lo.min(hi), lo.max(hi))
    } else {
        (0.0, 1.0)
    };
    if hi - lo <= 1e-12 * lo.abs().max(1e-300) || hi == lo {
        let pad = if integer || lo == 0.0 {
            1.0
        } else {
            lo.abs() * 0.1
        };
        lo -= pad;
        hi += pad;
    }
    let mut step = nice_step(hi - lo, target);
    if integer && step < 1.0 {
        step = 1.0;
    }
    // The epsilon absorbs rounding (1e-5 / 1e-5 = 0.9999…): data on a tick keeps that tick.
    let first = (lo / step + 1e-9).floor() as i64;
    let last = (hi / step - 1e-9).ceil() as i64;
    let ticks: Vec<f64> = (first..=last).map(|k| k as f64 * step).collect();
    Axis {
        lo: first as f64 * step,
        hi: last as f64 * step,
        step,
        ticks,
    }
}

impl Axis {
    /// Tick labels: as many decimals as the step needs; scientific notation (`1.5e-5`) for very
    /// small steps or very large values. No label reads `-0`.
    pub fn labels(&self) -> Vec<String> {
        let max_abs = self.ticks.iter().fold(0f64, |m, v| m.max(v.abs()));
        let step_exp = self.step.log10().floor() as i32;
        let sci = max_abs >= 1e6 || step_exp < -4;
        self.ticks
            .iter()
            .map(|&v| {
                if v.abs() < self.step * 1e-6 {
                    return "0".to_string();
                }
                if sci {
                    let v_exp = v.abs().log10().floor() as i32;
                    let digits = (v_exp - step_exp).clamp(0, 6) as usize;
                    format!("{v:.digits$e}")
                } else {
                    let digits = (-step_exp).max(0) as usize;
                    format!("{v:.digits$}")
                }
            })
            .collect()
    }

    /// Where `v` falls on a pixel range [p0, p1] (p1 may be smaller: y grows downwards).
    pub fn map(&self, v: f64, p0: f64, p1: f64) -> f64 {
        p0 + (v - self.lo) / (self.hi - self.lo) * (p1 - p0)
    }
}

// ---------------------------------------------------------------------------------------------
// Line charts

/// One curve: (x, y) points in x order; a non-finite y breaks the line.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

#[derive(Debug, Clone)]
pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
    /// An x range the axis must cover besides the data (e.g. every iteration of a run when a
    /// metric is only logged now and then).
    pub x_range: Option<(f64, f64)>,
}

/// One chart on its own canvas.
pub fn render_chart(chart: &Chart, width: usize, height: usize) -> Canvas {
    let mut c = Canvas::new(width, height, WHITE);
    draw_chart(&mut c, 0, 0, width, height, chart);
    c
}

/// Charts in a grid of `cols` columns, each panel `panel_w × panel_h`, under a figure title.
pub fn render_panels(
    title: &str,
    charts: &[Chart],
    cols: usize,
    panel_w: usize,
    panel_h: usize,
) -> Canvas {
    let cols = cols.clamp(1, charts.len().max(1));
    let rows = charts.len().div_ceil(cols).max(1);
    let head = 2 * LINE_H + 16;
    let mut c = Canvas::new(cols * panel_w, head + rows * panel_h, WHITE);
    let tw = text_width(title, 2) as i64;
    c.text((c.width as i64 - tw) / 2, 10, title, 2, INK);
    for (i, ch) in charts.iter().enumerate() {
        let (x, y) = ((i % cols) * panel_w, head + (i / cols) * panel_h);
        draw_chart(&mut c, x, y, panel_w, panel_h, ch);
    }
    c
}

/// Draw `chart` into the region (x, y, w, h) of `c`.
pub fn draw_chart(c: &mut Canvas, x: usize, y: usize, w: usize, h: usize, chart: &Chart) {
    let (x, y, w, h) = (x as i64, y as i64, w as i64, h as i64);
    // Text scale: 2 on wide panels, 1 on small ones.
    let s: usize = if w >= 700 && h >= 360 { 2 } else { 1 };
    let si = s as i64;
    // Row height of a text line (with descenders) and the height of capitals and digits.
    let ch_h = (LINE_H * s) as i64;
    let cap_h = (GLYPH_H * s) as i64;
    let pad = 8 * si;

    // Title.
    let title = truncate(
        &chart.title,
        ((w - 2 * pad) / (ADVANCE as i64 * (si + 1))) as usize,
    );
    let tw = text_width(&title, s + 1) as i64;
    c.text(x + (w - tw) / 2, y + pad, &title, s + 1, INK);
    let title_h = (LINE_H * (s + 1)) as i64 + 2 * pad;

    // Data ranges.
    let finite = |p: &&(f64, f64)| p.0.is_finite() && p.1.is_finite();
    let all: Vec<(f64, f64)> = chart
        .series
        .iter()
        .flat_map(|se| se.points.iter().filter(finite).copied())
        .collect();
    let (mut xmin, mut xmax, mut ymin, mut ymax) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for (px, py) in &all {
        xmin = xmin.min(*px);
        xmax = xmax.max(*px);
        ymin = ymin.min(*py);
        ymax = ymax.max(*py);
    }
    if all.is_empty() {
        (xmin, xmax, ymin, ymax) = (0.0, 1.0, 0.0, 1.0);
    }
    let mut integer_x = all.iter().all(|p| p.0.fract() == 0.0);
    if let Some((a, b)) = chart.x_range.filter(|r| r.0.is_finite() && r.1.is_finite()) {
        if all.is_empty() {
            (xmin, xmax) = (a.min(b), a.max(b));
        } else {
            (xmin, xmax) = (xmin.min(a.min(b)), xmax.max(a.max(b)));
        }
        integer_x &= a.fract() == 0.0 && b.fract() == 0.0;
    }

    // Legend on the right.
    let max_name = 30;
    let names: Vec<String> = chart
        .series
        .iter()
        .map(|se| truncate(&se.name, max_name))
        .collect();
    let name_w = names.iter().map(|n| text_width(n, s)).max().unwrap_or(0) as i64;
    let swatch = 14 * si;
    let legend_w = if names.is_empty() {
        0
    } else {
        swatch + 4 * si + name_w + 2 * pad
    };

    // The y axis: ticks and labels decide the left margin.
    let plot_top = y + title_h;
    let xlab_h = if chart.x_label.is_empty() {
        0
    } else {
        ch_h + 6 * si
    };
    let plot_bottom = y + h - pad - xlab_h - ch_h - 8 * si;
    let plot_h = (plot_bottom - plot_top).max(10);
    let y_target = ((plot_h / (ch_h * 4)).clamp(2, 8)) as usize;
    let yaxis = nice_axis(ymin, ymax, y_target, false);
    let ylabels = yaxis.labels();
    let ylab_w = ylabels.iter().map(|l| text_width(l, s)).max().unwrap_or(0) as i64;
    let yname_w = if chart.y_label.is_empty() {
        0
    } else {
        ch_h + 6 * si
    };
    let plot_left = x + pad + yname_w + ylab_w + 6 * si;
    let plot_right = (x + w - legend_w - pad).max(plot_left + 10);
    let plot_w = plot_right - plot_left;

    // The x axis: as many ticks as fit without overlapping labels.
    let mut xaxis = nice_axis(xmin, xmax, 10, integer_x);
    for target in (2..=10).rev() {
        xaxis = nice_axis(xmin, xmax, target, integer_x);
        let widest = xaxis
            .labels()
            .iter()
            .map(|l| text_width(l, s))
            .max()
            .unwrap_or(0) as i64;
        if (widest + 12 * si) * (xaxis.ticks.len() as i64) < plot_w {
            break;
        }
    }

    // Curves may reach a little past the frame so that a marker on an axis limit stays whole.
    let m = 2 * si + 1;
    let area = Rect {
        x0: plot_left - m,
        y0: plot_top - m,
        x1: plot_right + 1 + m,
        y1: plot_bottom + 1 + m,
    };
    let px = |v: f64| xaxis.map(v, plot_left as f64, plot_right as f64).round() as i64;
    let py = |v: f64| yaxis.map(v, plot_bottom as f64, plot_top as f64).round() as i64;

    // Grid, ticks and labels.
    for (t, l) in yaxis.ticks.iter().zip(&ylabels) {
        let yy = py(*t);
        c.line((plot_left, yy), (plot_right, yy), GRID, 1, None);
        c.line((plot_left - 4 * si, yy), (plot_left, yy), AXIS, 1, None);
        let lw = text_width(l, s) as i64;
        c.text(plot_left - 6 * si - lw, yy - cap_h / 2, l, s, INK);
    }
    for (t, l) in xaxis.ticks.iter().zip(xaxis.labels()) {
        let xx = px(*t);
        c.line((xx, plot_top), (xx, plot_bottom), GRID, 1, None);
        c.line((xx, plot_bottom), (xx, plot_bottom + 4 * si), AXIS, 1, None);
        let lw = text_width(&l, s) as i64;
        c.text(xx - lw / 2, plot_bottom + 6 * si, &l, s, INK);
    }
    // Frame.
    for (a, b) in [
        ((plot_left, plot_top), (plot_right, plot_top)),
        ((plot_left, plot_bottom), (plot_right, plot_bottom)),
        ((plot_left, plot_top), (plot_left, plot_bottom)),
        ((plot_right, plot_top), (plot_right, plot_bottom)),
    ] {
        c.line(a, b, AXIS, 1, None);
    }
    // Axis names.
    if !chart.x_label.is_empty() {
        let lw = text_width(&chart.x_label, s) as i64;
        c.text(
            plot_left + (plot_w - lw) / 2,
            plot_bottom + 6 * si + ch_h + 6 * si,
            &chart.x_label,
            s,
            MUTED,
        );
    }
    if !chart.y_label.is_empty() {
        let lw = text_width(&chart.y_label, s) as i64;
        c.text_vertical(
            x + pad,
            plot_top + (plot_h + lw) / 2,
            &chart.y_label,
            s,
            MUTED,
        );
    }

    // Curves: lines between consecutive finite points, markers when points are sparse.
    let pen = si;
    for (i, se) in chart.series.iter().enumerate() {
        let color = series_color(i);
        let markers = se.points.iter().filter(finite).count() <= 40;
        let mut prev: Option<(i64, i64)> = None;
        for p in &se.points {
            if !(p.0.is_finite() && p.1.is_finite()) {
                prev = None;
                continue;
            }
            let q = (px(p.0), py(p.1));
            match prev {
                Some(a) => c.line(a, q, color, pen, Some(area)),
                None => c.line(q, q, color, pen, Some(area)),
            }
            if markers {
                let m = 2 * si;
                for yy in q.1 - m..=q.1 + m {
                    for xx in q.0 - m..=q.0 + m {
                        if area.contains(xx, yy) {
                            c.set(xx, yy, color);
                        }
                    }
                }
            }
            prev = Some(q);
        }
    }
    if all.is_empty() {
        let msg = "no data";
        let lw = text_width(msg, s) as i64;
        c.text(
            plot_left + (plot_w - lw) / 2,
            plot_top + plot_h / 2,
            msg,
            s,
            MUTED,
        );
    }

    // Legend entries (as many as fit; the rest are counted).
    let row_h = ch_h + 6 * si;
    let lx = plot_right + pad;
    let fit = ((plot_bottom - plot_top) / row_h).max(1) as usize;
    for (i, name) in names.iter().enumerate() {
        let ly = plot_top + i as i64 * row_h;
        if i + 1 == fit && names.len() > fit {
            c.text(lx, ly, &format!("+{} more", names.len() - i), s, MUTED);
            break;
        }
        let color = series_color(i);
        c.fill_rect(lx, ly + cap_h / 2 - si, swatch, 2 * si + 1, color);
        c.text(lx + swatch + 4 * si, ly, name, s, INK);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn should_pick_nice_ticks_covering_the_data() {
        let a = nice_axis(0.13, 0.87, 5, false);
        assert_eq!(a.step, 0.2);
        assert!(a.lo <= 0.13 && a.hi >= 0.87);
        assert_eq!(a.labels(), ["0", "0.2", "0.4", "0.6", "0.8", "1.0"]);

        let a = nice_axis(1.0, 12.0, 8, true);
        assert_eq!(a.step, 2.0);
        assert_eq!(a.labels(), ["0", "2", "4", "6", "8", "10", "12"]);

        let a = nice_axis(-3.2, 41.0, 4, false);
        assert_eq!(a.step, 20.0);
        assert_eq!((a.lo, a.hi), (-20.0, 60.0));
        assert_eq!(a.labels(), ["-20", "0", "20", "40", "60"]);
    }

    #[test]
    fn should_keep_integer_steps_for_iterations() {
        let a = nice_axis(1.0, 3.0, 10, true);
        assert_eq!(a.step, 1.0);
        assert_eq!(a.labels(), ["1", "2", "3"]);
    }

    #[test]
    fn should_widen_a_degenerate_range() {
        let a = nice_axis(0.5, 0.5, 5, false);
        assert!(a.lo < 0.5 && a.hi > 0.5, "{a:?}");
        let a = nice_axis(0.0, 0.0, 5, false);
        assert!(a.lo <= -1.0 && a.hi >= 1.0, "{a:?}");
        let a = nice_axis(7.0, 7.0, 5, true);
        assert!(a.lo <= 6.0 && a.hi >= 8.0, "{a:?}");
        let a = nice_axis(f64::NAN, f64::INFINITY, 5, false);
        assert_eq!((a.lo, a.hi), (0.0, 1.0));
        assert!(a.ticks.len() >= 2);
    }

    #[test]
    fn should_use_scientific_labels_for_tiny_steps() {
        let a = nice_axis(1.0e-5, 4.0e-5, 3, false);
        assert!((a.step - 1.0e-5).abs() < 1e-15, "{a:?}");
        assert_eq!(a.labels(), ["1e-5", "2e-5", "3e-5", "4e-5"]);
        let a = nice_axis(1.00e-4, 1.04e-4, 2, false);
        let l = a.labels();
        // Every label distinct although the values share their leading digits.
        let mut d = l.clone();
        d.dedup();
        assert_eq!(d, l);
        assert!(l.iter().all(|s| s.contains('e')), "{l:?}");
    }

    #[test]
    fn should_never_label_a_tick_minus_zero() {
        let a = nice_axis(-0.3, 0.3, 6, false);
        assert!(a.labels().contains(&"0".to_string()), "{:?}", a.labels());
        assert!(!a.labels().iter().any(|l| l == "-0" || l == "-0.0"));
    }

    #[test]
    fn should_render_glyph_bitmaps() {
        // '1': the vertical stroke is in the middle column, the foot spans three columns.
        let g = glyph('1');
        assert_eq!(g[3], 0b00100);
        assert_eq!(g[6], 0b01110);
        // Unknown characters fall back to '?'.
        assert_eq!(glyph('~'), glyph('?'));
        // Every glyph fits in 5 columns and the required characters all exist.
        for (_, g) in FONT {
            assert!(g.iter().all(|row| *row < 32));
        }
        for ch in "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-/_@:% ".chars() {
            let known =
                FONT.iter().any(|(k, _)| *k == ch) || DESCENDERS.iter().any(|(k, _, _)| *k == ch);
            assert!(known, "no glyph for {ch:?}");
            let g = glyph(ch);
            assert!(g.iter().all(|row| *row < 32));
            // Only g, j, p, q, y reach below the baseline.
            let descends = g[GLYPH_H..].iter().any(|r| *r != 0);
            assert_eq!(descends, "gjpqy".contains(ch), "{ch:?}");
        }
        // 'g' and '9' differ (the 5×7 '9' shape is what a descender-less 'g' looks like).
        assert_ne!(glyph('g'), glyph('9'));
        // Distinct glyphs for characters that must not be confused.
        for (a, b) in [('0', 'O'), ('1', 'l'), ('5', 'S'), ('.', ','), ('-', '_')] {
            assert_ne!(glyph(a), glyph(b), "{a} and {b}");
        }
    }

    #[test]
    fn should_draw_text_pixels_where_the_glyph_is() {
        let mut c = Canvas::new(40, 20, WHITE);
        let w = c.text(2, 3, "1.", 2, BLACK);
        assert_eq!(w, text_width("1.", 2));
        assert_eq!(w, (2 * ADVANCE - 1) * 2);
        let inked = |c: &Canvas, x: usize, y: usize| c.get(x, y) == BLACK;
        // '1' row 0 is 0b00100: column 2 → pixels x = 2 + 2·2 .. +2, y = 3 .. 5.
        assert!(inked(&c, 6, 3) && inked(&c, 7, 4));
        assert!(!inked(&c, 2, 3) && !inked(&c, 4, 3));
        // '.' occupies rows 5-6, columns 1-2 of the second cell (x = 2 + 12 + 2..6).
        assert!(inked(&c, 16, 13) && inked(&c, 19, 16));
        assert!(!inked(&c, 16, 3));
        let n = c.pixels.chunks(3).filter(|p| *p == BLACK).count();
        // '1' has 10 set bits, '.' has 4, each drawn as 2×2.
        assert_eq!(n, (10 + 4) * 4);
        assert_eq!(text_width("", 3), 0);
    }

    #[test]
    fn should_draw_vertical_text_in_a_column() {
        let mut c = Canvas::new(20, 40, WHITE);
        c.text_vertical(2, 30, "ab", 1, BLACK);
        let inked: Vec<(usize, usize)> = (0..40)
            .flat_map(|y| (0..20).map(move |x| (x, y)))
            .filter(|&(x, y)| c.get(x, y) == BLACK)
            .collect();
        assert!(!inked.is_empty());
        assert!(
            inked
                .iter()
                .all(|&(x, y)| (2..2 + LINE_H).contains(&x) && (30 - 12..30).contains(&y))
        );
    }

    #[test]
    fn should_draw_a_chart_with_curves_and_labels() {
        let chart = Chart {
            title: "reward".into(),
            x_label: "iteration".into(),
            y_label: "value".into(),
            series: vec![
                Series {
                    name: "a/reward_mean".into(),
                    points: (1..=10).map(|i| (i as f64, i as f64 / 10.0)).collect(),
                },
                Series {
                    name: "b/reward_mean".into(),
                    points: vec![(1.0, 0.5), (2.0, f64::NAN), (3.0, 0.7)],
                },
            ],
            x_range: Some((0.0, 12.0)),
        };
        let c = render_chart(&chart, 800, 400);
        let count = |col: Rgb| c.pixels.chunks(3).filter(|p| *p == col).count();
        assert!(count(series_color(0)) > 200, "first curve drawn");
        assert!(count(series_color(1)) > 50, "second curve drawn");
        assert!(count(INK) > 100, "labels drawn");
        // Nothing drawn outside the canvas bounds panicked; the corner stays background.
        assert_eq!(c.get(0, 0), WHITE);
        // An empty chart still renders (with "no data").
        let empty = Chart {
            series: vec![],
            ..chart
        };
        let c = render_chart(&empty, 300, 200);
        assert!(c.pixels.chunks(3).any(|p| p == MUTED));
    }
}
