//! MixGRPO's sliding SDE window (and Flow-GRPO-Fast's fixed one) as a pure function of the
//! iteration number.
//!
//! A trajectory of `count` steps (0-based indices 0 .. count) is sampled with SDE (stochastic,
//! trained) steps only inside the window [l, l + size) and deterministic ODE (Euler) steps
//! elsewhere. The window's start l moves over training like MixGRPO's `progressive` strategy
//! (its public code: `GRPOTrainingStates` with `prog_overlap` and `roll_back`): it starts at
//! `start`, moves by `stride` every `every` iterations, and after `max_start` it goes back to
//! `start` (`wrap: true`, MixGRPO's roll-back) or stays at `max_start` (`wrap: false`). With
//! `every: 0` the window never moves: Flow-GRPO-Fast.
//!
//! MixGRPO's other strategies ([`WindowStrategy`], its public `GRPOTrainingStates`) change how
//! long the window stays at each position, or draw the position:
//! - `decay`: a position l holds for max(m, ⌊e·(1 − p) + m·p⌋) iterations, p = l / max_start,
//!   from `every` = e at the first position down to `min_every` = m (default max(1, ⌊e/4⌋)) at
//!   the last, so the window moves faster through the late, low-noise steps;
//! - `exp_decay`: a position holds for ⌈e·exp(−k·max(0, l − threshold))⌉ iterations;
//! - `random`: every `every` iterations the start is drawn uniformly from the positions
//!   start, start + stride, … ≤ max_start, seeded by the pipeline seed and the draw's index, so
//!   every step of the trajectory (and every rank) draws the same start. TempFlow-GRPO's
//!   branching point is this window with one step (`pipelines/tempflow_grpo.yaml`).
//!
//! Because l depends on the iteration number only (no counter is carried from one iteration to
//! the next), a resumed run samples exactly the windows an uninterrupted one does.

/// How the window's start moves over training (MixGRPO's `sample_strategy`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum WindowStrategy {
    /// `every` iterations at each position.
    Progressive,
    /// Linearly fewer iterations at later positions, down to `min_every`.
    Decay { min_every: u64 },
    /// ⌈every·exp(−k·max(0, l − threshold))⌉ iterations at position l.
    ExpDecay { threshold: usize, k: f64 },
    /// A uniformly drawn position every `every` iterations.
    Random { seed: u64 },
}

impl WindowStrategy {
    pub const NAMES: &'static [&'static str] = &["progressive", "decay", "exp_decay", "random"];
}

/// A window schedule, validated against the trajectory's length ([`SdeWindow::new`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SdeWindow {
    /// w: steps per window (≥ 1).
    pub size: usize,
    /// The first window's start (0-based step index).
    pub start: usize,
    /// How far the start moves at each shift (≥ 1).
    pub stride: usize,
    /// Iterations per window position (0 = the window never moves).
    pub every: u64,
    /// The last start (0-based); `start ≤ max_start ≤ count − size`.
    pub max_start: usize,
    /// After `max_start`: back to `start` (true) or stay at `max_start` (false).
    pub wrap: bool,
    /// How the start moves ([`SdeWindow::with_strategy`]; `Progressive` unless set).
    pub strategy: WindowStrategy,
}

/// Which window parameter a [`SdeWindow::new`] error is about, and the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowError {
    pub param: &'static str,
    pub message: String,
}

impl SdeWindow {
    /// The window of a trajectory of `count` steps; `max_start` `None` = `count − size`, the
    /// last start at which the whole window fits.
    pub fn new(
        size: usize,
        start: usize,
        stride: usize,
        every: u64,
        max_start: Option<usize>,
        wrap: bool,
        count: usize,
    ) -> Result<Self, WindowError> {
        let err = |param, message: String| Err(WindowError { param, message });
        if size == 0 {
            return err("window_size", "a window needs at least one step".into());
        }
        if size > count {
            return err(
                "window_size",
                format!("window_size = {size} exceeds the trajectory's {count} steps"),
            );
        }
        if stride == 0 {
            return err(
                "window_stride",
                "the window must move by at least 1 step".into(),
            );
        }
        let last = count - size;
        let max_start = max_start.unwrap_or(last);
        if max_start > last {
            return err(
                "window_max_start",
                format!(
                    "window_max_start = {max_start}: a window of {size} steps starting there \
                     ends after the trajectory's {count} steps (at most {last})"
                ),
            );
        }
        if start > max_start {
            return err(
                "window_start",
                format!(
                    "window_start = {start} is after the last start, {max_start} \
                     (window_max_start, or the trajectory's {count} steps − window_size {size})"
                ),
            );
        }
        Ok(SdeWindow {
            size,
            start,
            stride,
            every,
            max_start,
            wrap,
            strategy: WindowStrategy::Progressive,
        })
    }

    /// The same window moving by `strategy`: every strategy but `progressive` needs a window
    /// that moves (`every` ≥ 1), and `decay`'s `min_every` must be between 1 and `every`.
    pub fn with_strategy(mut self, strategy: WindowStrategy) -> Result<Self, WindowError> {
        let err = |param, message: String| Err(WindowError { param, message });
        let name = match strategy {
            WindowStrategy::Progressive => None,
            WindowStrategy::Decay { .. } => Some("decay"),
            WindowStrategy::ExpDecay { .. } => Some("exp_decay"),
            WindowStrategy::Random { .. } => Some("random"),
        };
        if let Some(name) = name
            && self.every == 0
        {
            return err(
                "window_every",
                format!(
                    "window_strategy `{name}` moves the window every `window_every` iterations \
                     (at the first position): 0 keeps it fixed; set it to 1 or more"
                ),
            );
        }
        match strategy {
            WindowStrategy::Decay { min_every } if min_every == 0 || min_every > self.every => {
                return err(
                    "window_min_every",
                    format!(
                        "window_min_every = {min_every} must be between 1 and window_every = {}",
                        self.every
                    ),
                );
            }
            WindowStrategy::ExpDecay { k, .. } if !(k.is_finite() && k >= 0.0) => {
                return err(
                    "window_decay_k",
                    format!("window_decay_k = {k} must be finite and ≥ 0"),
                );
            }
            _ => {}
        }
        self.strategy = strategy;
        Ok(self)
    }

    /// The default `min_every` of `decay` for a window moving every `every` iterations
    /// (MixGRPO's: a quarter, at least 1).
    pub fn default_min_every(every: u64) -> u64 {
        (every / 4).max(1)
    }

    /// Iterations the window stays at start `l` (`every` ≥ 1).
    fn hold(&self, l: usize) -> u64 {
        let e = self.every;
        match self.strategy {
            WindowStrategy::Progressive | WindowStrategy::Random { .. } => e,
            WindowStrategy::Decay { min_every: m } => {
                // ⌊e·(1 − p) + m·p⌋ with p = l / max_start, in integers (exact floors).
                // A window that cannot move (max_start 0) holds `every`.
                let (l, big) = (l as u64, self.max_start as u64);
                (e * (big - l) + m * l)
                    .checked_div(big)
                    .map_or(e, |d| d.max(m))
            }
            WindowStrategy::ExpDecay { threshold, k } => {
                let over = l.saturating_sub(threshold) as f64;
                ((e as f64 * (-k * over).exp()).ceil() as u64).max(1)
            }
        }
    }

    /// The starts the window takes in order: start, start + stride, … ≤ max_start, and
    /// (without wrapping) max_start itself when the stride does not land on it.
    fn positions(&self) -> Vec<usize> {
        let mut v: Vec<usize> = (self.start..=self.max_start).step_by(self.stride).collect();
        if !self.wrap && v.last() != Some(&self.max_start) {
            v.push(self.max_start);
        }
        v
    }

    /// The window's start l at `iteration` (1-based, as the engine counts).
    pub fn start_at(&self, iteration: u64) -> usize {
        if self.every == 0 {
            return self.start;
        }
        let positions = self.positions();
        if let WindowStrategy::Random { seed } = self.strategy {
            // One draw per `every` iterations, the same for every step of the trajectory.
            let draw = iteration.saturating_sub(1) / self.every;
            let h = runner::node::stream_seed(seed, "flow_sde_step", draw, "window_start");
            // The grid's positions (`wrap` plays no part in a draw).
            let n = (self.max_start - self.start) / self.stride + 1;
            return positions[(h % n as u64) as usize];
        }
        // Walk the positions, each held for `hold(l)` iterations; with wrapping the walk is
        // periodic, without it the last position holds forever.
        let mut i = iteration.saturating_sub(1);
        if self.wrap {
            let cycle: u64 = positions.iter().map(|&l| self.hold(l)).sum();
            i %= cycle;
        }
        for &l in &positions {
            let d = self.hold(l);
            if i < d {
                return l;
            }
            i -= d;
        }
        self.max_start
    }

    /// Whether step `index` (0-based) is an SDE step at `iteration`.
    pub fn contains(&self, index: usize, iteration: u64) -> bool {
        let l = self.start_at(iteration);
        (l..l + self.size).contains(&index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(
        size: usize,
        start: usize,
        stride: usize,
        every: u64,
        max: Option<usize>,
        wrap: bool,
        count: usize,
    ) -> SdeWindow {
        SdeWindow::new(size, start, stride, every, max, wrap, count).unwrap()
    }

    #[test]
    fn should_slide_the_window_as_a_hand_computed_table() {
        // T = 10, w = 2, every 3 iterations by 2 steps, from 1, up to 5, wrapping:
        // starts 1, 3, 5, then 1 again.
        let win = w(2, 1, 2, 3, Some(5), true, 10);
        let table: [(u64, usize); 13] = [
            (1, 1),
            (2, 1),
            (3, 1),
            (4, 3),
            (5, 3),
            (6, 3),
            (7, 5),
            (8, 5),
            (9, 5),
            (10, 1),
            (12, 1),
            (13, 3),
            (19, 1),
        ];
        for (it, l) in table {
            assert_eq!(win.start_at(it), l, "iteration {it}");
        }
        // Steps 5 and 6 (0-based) are the SDE steps of iteration 7, none else.
        let sde: Vec<usize> = (0..10).filter(|&i| win.contains(i, 7)).collect();
        assert_eq!(sde, vec![5, 6]);
        // Without wrapping it stays at the last start.
        let clip = w(2, 1, 2, 3, Some(5), false, 10);
        let starts: Vec<usize> = (1..=13).map(|it| clip.start_at(it)).collect();
        assert_eq!(starts, vec![1, 1, 1, 3, 3, 3, 5, 5, 5, 5, 5, 5, 5]);
        // A stride that does not land on max_start (7): clipped to it, or wrapping after 6.
        let odd = w(3, 0, 3, 1, None, false, 10);
        let starts: Vec<usize> = (1..=5).map(|it| odd.start_at(it)).collect();
        assert_eq!(starts, vec![0, 3, 6, 7, 7]);
        let odd = w(3, 0, 3, 1, None, true, 10);
        let starts: Vec<usize> = (1..=5).map(|it| odd.start_at(it)).collect();
        assert_eq!(starts, vec![0, 3, 6, 0, 3]);
        // MixGRPO's published setting: T = 25, w = 4, shift by 1 every 25 iterations.
        let mix = w(4, 0, 1, 25, None, true, 25);
        assert_eq!(mix.max_start, 21);
        assert_eq!(
            [1, 25, 26, 50, 51, 526, 551].map(|it| mix.start_at(it)),
            [0, 0, 1, 1, 2, 21, 0]
        );
        // Flow-GRPO-Fast: fixed.
        let fast = w(2, 0, 1, 0, None, true, 10);
        assert!((1..100).all(|it| fast.start_at(it) == 0));
    }

    #[test]
    fn should_hold_each_position_as_long_as_the_decay_strategies_say() {
        // decay: T = 10, w = 2, stride 2 up to 6, e = 8, m = 2: positions 0, 2, 4, 6 hold
        // ⌊8·(1 − l/6) + 2·l/6⌋ = 8, 6, 4, 2 iterations; then back to 0.
        let d = w(2, 0, 2, 8, Some(6), true, 10)
            .with_strategy(WindowStrategy::Decay { min_every: 2 })
            .unwrap();
        let starts: Vec<usize> = (1..=22).map(|it| d.start_at(it)).collect();
        let mut want = vec![0; 8];
        want.extend([2; 6]);
        want.extend([4; 4]);
        want.extend([6; 2]);
        want.extend([0, 0]);
        assert_eq!(starts, want);
        // exp_decay: e = 4, threshold 2, k = 1, no wrapping, T = 6, w = 1: positions 0..=2
        // hold 4, then ⌈4/e⌉ = 2, ⌈4/e²⌉ = 1, ⌈4/e³⌉ = 1, and 5 stays.
        let x = w(1, 0, 1, 4, None, false, 6)
            .with_strategy(WindowStrategy::ExpDecay {
                threshold: 2,
                k: 1.0,
            })
            .unwrap();
        let starts: Vec<usize> = (1..=18).map(|it| x.start_at(it)).collect();
        let mut want = vec![0; 4];
        want.extend([1; 4]);
        want.extend([2; 4]);
        want.extend([3, 3, 4, 5, 5, 5]);
        assert_eq!(starts, want);
        // `progressive` through the same walk: the closed form of the first test.
        let p = w(2, 0, 2, 8, Some(6), true, 10);
        assert!((1..=40).all(|it| p.start_at(it) == ((it as usize - 1) / 8 % 4) * 2));
    }

    #[test]
    fn should_draw_random_starts_on_the_grid_shared_by_every_step() {
        let r = |seed| {
            w(1, 0, 2, 3, Some(8), true, 10)
                .with_strategy(WindowStrategy::Random { seed })
                .unwrap()
        };
        let (a, b, other) = (r(42), r(42), r(43));
        let starts: Vec<usize> = (1..=600).map(|it| a.start_at(it)).collect();
        // Steps of one trajectory build the same window: the same starts.
        assert!((1..=600).all(|it| b.start_at(it) == starts[it as usize - 1]));
        // One draw per `every` = 3 iterations, on the grid 0, 2, 4, 6, 8, each drawn.
        assert!(starts.chunks(3).all(|c| c.iter().all(|&l| l == c[0])));
        for l in [0, 2, 4, 6, 8] {
            let n = starts.iter().filter(|&&s| s == l).count();
            assert!((60..=180).contains(&n), "start {l} drawn {n} of 600 times");
        }
        assert!(starts.iter().all(|l| l % 2 == 0 && *l <= 8));
        // Another pipeline seed draws other starts.
        assert!((1..=600).any(|it| other.start_at(it) != starts[it as usize - 1]));
    }

    #[test]
    fn should_refuse_a_strategy_without_a_moving_window() {
        let fixed = w(2, 0, 1, 0, None, true, 10);
        let e = fixed
            .with_strategy(WindowStrategy::Random { seed: 0 })
            .unwrap_err();
        assert_eq!(e.param, "window_every");
        let moving = w(2, 0, 1, 4, None, true, 10);
        let e = moving
            .with_strategy(WindowStrategy::Decay { min_every: 5 })
            .unwrap_err();
        assert_eq!(e.param, "window_min_every");
        let e = moving
            .with_strategy(WindowStrategy::ExpDecay {
                threshold: 0,
                k: f64::NAN,
            })
            .unwrap_err();
        assert_eq!(e.param, "window_decay_k");
        assert_eq!(SdeWindow::default_min_every(25), 6);
        assert_eq!(SdeWindow::default_min_every(3), 1);
    }

    #[test]
    fn should_name_the_window_parameter_at_fault() {
        let e = |r: Result<SdeWindow, WindowError>| r.unwrap_err().param;
        assert_eq!(e(SdeWindow::new(0, 0, 1, 0, None, true, 4)), "window_size");
        assert_eq!(e(SdeWindow::new(5, 0, 1, 0, None, true, 4)), "window_size");
        assert_eq!(
            e(SdeWindow::new(2, 0, 0, 1, None, true, 4)),
            "window_stride"
        );
        assert_eq!(
            e(SdeWindow::new(2, 0, 1, 1, Some(3), true, 4)),
            "window_max_start"
        );
        assert_eq!(e(SdeWindow::new(2, 3, 1, 1, None, true, 4)), "window_start");
        assert!(SdeWindow::new(4, 0, 1, 1, None, true, 4).is_ok());
    }
}
