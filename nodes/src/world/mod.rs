//! **ShapeWorld**: a tiny synthetic compositional text-to-image world with an
//! exact verifier, playing the role GenEval plays for SD3.
//!
//! # The world
//!
//! * **Images** are 32×32 RGB, stored as a flat `Vec<f32>` in CHW layout
//!   (`[3, 32, 32]`, see [`IMAGE_LEN`]) with values in **`[-1, 1]`**
//!   (`-1` = black, `1` = full intensity; intensity `p ∈ [0,1]` maps to
//!   `2p - 1`). Renders never touch the outer 2 px, so the border is pure
//!   background.
//! * The **background** is plain mid-grey (`0.5` intensity, i.e. exactly `0.0`
//!   in `[-1, 1]`), which is not a palette colour and sits at the centre of the
//!   colour cube, maximising the angular separation of the palette colours as
//!   seen from the background.
//! * **Palette** ([`Color`]): red, green, blue, yellow, purple, orange.
//! * **Shapes** ([`Shape`]): circle, square, triangle (apex up), diamond and
//!   cross (plus sign). Every shape fills a square bounding box of side 9–13.5
//!   px (8.5–12 px in crowded scenes), is axis-aligned and anti-aliased by
//!   4×4 supersampling; objects are ≥ 3 px apart.
//! * A structured [`Target`] lists one or two object groups
//!   `{shape, color: Option<Color>, count: 1..=3}` (at most [`MAX_OBJECTS`]
//!   objects in total) and an optional spatial [`Relation`] between group 0 and
//!   group 1 (at most [`MAX_RELATED_OBJECTS`] objects then).
//! * A closed-vocabulary [`tokenize`]r turns prompts into [`MAX_TOKENS`] ids.
//! * The verifier [`evaluate`] (`shape_eval`) checks an image against a
//!   target and returns per-criterion results and a reward in `[0, 1]`.
//!
//! ```
//! use nodes::world::{Target, evaluate, generate_split, render, tokenize, Split};
//! use rand::SeedableRng;
//!
//! let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
//! let record = &generate_split(1, Split::EvalHeldin, 6)[4]; // a `position` prompt
//! let tokens = tokenize(&record.prompt).unwrap();
//! let image = render(&record.target, &mut rng).unwrap();
//! let eval = evaluate(&image, &record.target).unwrap();
//! assert!(eval.correct && eval.reward == 1.0);
//! # let _ = (tokens, Target::single);
//! ```
//!
//! # Prompt categories (mirroring GenEval)
//!
//! | category        | example                                      |
//! |-----------------|----------------------------------------------|
//! | `single_object` | `a circle`                                   |
//! | `two_objects`   | `a circle and a square`                      |
//! | `counting`      | `three triangles`                            |
//! | `colors`        | `a blue square`                              |
//! | `position`      | `a red circle to the left of a blue square`  |
//! | `color_attr`    | `a red circle and a blue square`             |
//!
//! Unlike GenEval, `position` prompts are **coloured** (both objects carry a
//! colour); this disambiguates the two objects and lets held-out colour–shape
//! pairs appear in spatial prompts too.
//!
//! # Held-out compositions
//!
//! The colour–shape pairs in [`HELD_OUT_PAIRS`] (purple triangle, orange circle,
//! green square, yellow diamond) never appear in training prompts **nor in any
//! render of an uncoloured object**: uncoloured objects are always painted in a
//! random colour that does not form a held-out pair with their shape (in every
//! split). They only appear when a prompt explicitly asks for them, which only
//! happens in the `eval_heldout` split.
//!
//! # Modules
//!
//! * [`target`]: data model, prompt text, held-out pairs.
//! * [`render`](mod@render): the renderer and the training-sample fast path.
//! * [`dataset`]: deterministic prompt sets and the committed JSONL files.
//! * [`tokenizer`]: the closed-vocabulary tokenizer.
//! * [`verify`]: the `shape_eval` verifier used as RL reward.
//! * [`png`]: PNG grid output.

pub mod dataset;
pub mod png;
pub mod render;
pub mod target;
pub mod tokenizer;
pub mod verify;

#[cfg(test)]
mod testutil;

pub use dataset::{
    DATASET_SEED, EVAL_HELDIN_PER_CATEGORY, EVAL_HELDOUT_COUNT, TRAIN_COUNT, dataset_dir,
    dataset_files, generate_split, load_jsonl, parse_jsonl, sample_target, to_jsonl,
    write_datasets,
};
pub use png::{chw_to_rgb8, grid_rgb8, image_to_rgb8, write_png_grid};
pub use render::{
    PlacedObject, Scene, TrainingExample, render, render_scene, sample_training_example,
};
pub use target::{
    Category, Color, HELD_OUT_PAIRS, ObjectGroup, PromptRecord, Relation, Shape, Split, Target,
    is_held_out,
};
pub use tokenizer::{MAX_TOKENS, PAD_ID, detokenize, tokenize, vocab, vocab_size};
pub use verify::{
    CRITERIA, Criterion, DetectedObject, Evaluation, detect, evaluate, evaluate_batch,
};

/// Image side length in pixels.
pub const IMAGE_SIZE: usize = 32;
/// Number of colour channels (RGB).
pub const CHANNELS: usize = 3;
/// Number of `f32` values in one CHW image (`3 * 32 * 32`).
pub const IMAGE_LEN: usize = CHANNELS * IMAGE_SIZE * IMAGE_SIZE;
/// Maximum number of objects (summed over groups) a [`Target`] may ask for.
pub const MAX_OBJECTS: usize = 4;
/// Maximum number of objects in a [`Target`] with a [`Relation`].
pub const MAX_RELATED_OBJECTS: usize = 3;
/// Maximum number of object groups in a [`Target`].
pub const MAX_GROUPS: usize = 2;
/// Maximum `count` of a single object group.
pub const MAX_COUNT: u8 = 3;

/// Background intensity in `[0, 1]` (mid-grey); `0.0` in `[-1, 1]` image units.
pub const BACKGROUND: [f32; 3] = [0.5, 0.5, 0.5];

/// A CHW `[3, 32, 32]` image with values in `[-1, 1]`.
pub type Image = Vec<f32>;

/// Errors produced by the ShapeWorld API.
#[derive(Debug)]
pub enum WorldError {
    /// The [`Target`] is malformed (no groups, zero count, too many objects…).
    InvalidTarget(String),
    /// An image buffer has the wrong size or an argument is out of range.
    InvalidInput(String),
    /// The renderer could not find a placement satisfying the target.
    Placement(String),
    /// A prompt contains a word outside the closed vocabulary.
    Tokenize(String),
    /// An I/O error (file writing / reading).
    Io(std::io::Error),
    /// A (de)serialisation error.
    Format(String),
}

impl std::fmt::Display for WorldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::InvalidTarget(m) => write!(f, "invalid ShapeWorld target: {m}"),
            Self::InvalidInput(m) => write!(f, "invalid input: {m}"),
            Self::Placement(m) => write!(f, "cannot place objects: {m}"),
            Self::Tokenize(m) => write!(f, "tokenizer: {m}"),
            Self::Io(e) => write!(f, "i/o error: {e}"),
            Self::Format(m) => write!(f, "format error: {m}"),
        }
    }
}

impl std::error::Error for WorldError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<std::io::Error> for WorldError {
    fn from(e: std::io::Error) -> Self {
        Self::Io(e)
    }
}

/// Checks that `image` is a CHW `[3, 32, 32]` buffer.
pub(crate) fn check_image(image: &[f32]) -> Result<(), WorldError> {
    if image.len() == IMAGE_LEN {
        Ok(())
    } else {
        Err(WorldError::InvalidInput(format!(
            "expected a CHW [3, {IMAGE_SIZE}, {IMAGE_SIZE}] image of {IMAGE_LEN} values, got {}",
            image.len()
        )))
    }
}
