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
//! Because l depends on the iteration number only (no counter is carried from one iteration to
//! the next), a resumed run samples exactly the windows an uninterrupted one does.

/// A window schedule, validated against the trajectory's length ([`SdeWindow::new`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
        })
    }

    /// The window's start l at `iteration` (1-based, as the engine counts).
    pub fn start_at(&self, iteration: u64) -> usize {
        if self.every == 0 {
            return self.start;
        }
        let shifts = iteration.saturating_sub(1) / self.every;
        if self.wrap {
            // Positions start, start + stride, … up to max_start, then start again (MixGRPO's
            // roll-back: a start beyond max_start goes back to the first).
            let positions = ((self.max_start - self.start) / self.stride) as u64 + 1;
            self.start + (shifts % positions) as usize * self.stride
        } else {
            // Clipped at max_start, as MixGRPO does without roll-back.
            let l = self.start as u64 + shifts.saturating_mul(self.stride as u64);
            l.min(self.max_start as u64) as usize
        }
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
