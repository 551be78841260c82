//! The algorithmic core of GRPO for flow models, independent of the model: transition kernels
//! as Gaussian policies and group-relative, step-aware advantages.

pub mod advantage;
pub mod kernel;
pub mod tree;
pub mod window;

pub use advantage::{AdvantageMode, StdScope, noise_aware_weights, normalise, step_advantages};
pub use kernel::{LinearGaussian, gaussian_step, log_prob};
pub use tree::{BranchTree, Fusion, TreeAdvantages, TreeError, WidthPruning, tree_advantages};
pub use window::{SdeWindow, WindowError, WindowStrategy};
