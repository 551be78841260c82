//! Deterministic ShapeWorld prompt sets and the committed dataset files
//! (`datasets/shapes/{train.jsonl, eval.jsonl, README.md}`).
//!
//! Prompt sets are generated from a seed with a ChaCha8 stream per split, so
//! they are identical on every platform. Categories are assigned round-robin
//! ([`Category::ALL`] order for `train` and `eval_heldin`,
//! [`Category::COLOURED`] order for `eval_heldout`), so every split is
//! balanced. Ids are unique; prompt *texts* may repeat (e.g. there are only
//! five distinct `single_object` prompts).
//!
//! The files can be regenerated with [`write_datasets`]; the test
//! `should_match_committed_datasets` fails if the committed files drift from a
//! fresh generation (run it with `FLOWRUN_REGENERATE_DATASETS=1` to rewrite them).

use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::target::{
    Category, Color, HELD_OUT_PAIRS, ObjectGroup, PromptRecord, Relation, Shape, Split, Target,
    is_held_out,
};
use super::{IMAGE_SIZE, MAX_TOKENS, WorldError};

/// Seed of the committed dataset files.
pub const DATASET_SEED: u64 = 20_240_611;
/// Number of prompts in `train.jsonl`.
pub const TRAIN_COUNT: usize = 10_000;
/// Number of `eval_heldin` prompts per category in `eval.jsonl`.
pub const EVAL_HELDIN_PER_CATEGORY: usize = 100;
/// Number of `eval_heldout` prompts in `eval.jsonl` (split evenly over the
/// three coloured categories).
pub const EVAL_HELDOUT_COUNT: usize = 120;

/// Samples a target of `category` for `split`.
///
/// * `Train` / `EvalHeldin`: no group names a held-out pair.
/// * `EvalHeldout`: at least one group names a held-out pair. Only the
///   coloured categories ([`Category::COLOURED`]) can do that; for other
///   categories this falls back to `colors`.
///
/// Rules per category: `two_objects`, `position` and `color_attr` use two
/// different shapes; `color_attr` also uses two different colours (as GenEval);
/// `position` colours are independent; `counting` uses counts 2–3.
pub fn sample_target<R: Rng + ?Sized>(category: Category, split: Split, rng: &mut R) -> Target {
    let held_out = split == Split::EvalHeldout;
    let category = if held_out && !Category::COLOURED.contains(&category) {
        Category::Colors
    } else {
        category
    };
    let shape = |rng: &mut R| Shape::ALL[rng.random_range(0..Shape::ALL.len())];
    let two_shapes = |rng: &mut R| {
        let a = shape(rng);
        loop {
            let b = shape(rng);
            if b != a {
                return (a, b);
            }
        }
    };
    // A coloured single object: a held-out pair if `held`, else a random
    // shape in a colour that does not form a held-out pair with it.
    let coloured = |held: bool, rng: &mut R| {
        if held {
            let (s, c) = HELD_OUT_PAIRS[rng.random_range(0..HELD_OUT_PAIRS.len())];
            return ObjectGroup::one(s, Some(c));
        }
        let s = shape(rng);
        loop {
            let c = Color::ALL[rng.random_range(0..Color::ALL.len())];
            if !is_held_out(s, c) {
                return ObjectGroup::one(s, Some(c));
            }
        }
    };
    match category {
        Category::SingleObject => Target::single(ObjectGroup::one(shape(rng), None)),
        Category::TwoObjects => {
            let (a, b) = two_shapes(rng);
            Target::pair(ObjectGroup::one(a, None), ObjectGroup::one(b, None), None)
        }
        Category::Counting => Target::single(ObjectGroup {
            shape: shape(rng),
            color: None,
            count: rng.random_range(2..=3),
        }),
        Category::Colors => Target::single(coloured(held_out, rng)),
        Category::Position | Category::ColorAttr => loop {
            // Which of the two groups is a held-out pair (eval_heldout only).
            let (ha, hb) = match (held_out, rng.random_range(0..3)) {
                (false, _) => (false, false),
                (true, 0) => (true, false),
                (true, 1) => (false, true),
                (true, _) => (true, true),
            };
            let (ga, gb) = (coloured(ha, rng), coloured(hb, rng));
            if ga.shape == gb.shape {
                continue;
            }
            if category == Category::Position {
                let r = Relation::ALL[rng.random_range(0..Relation::ALL.len())];
                break Target::pair(ga, gb, Some(r));
            }
            if ga.color != gb.color {
                break Target::pair(ga, gb, None);
            }
        },
    }
}

/// Generates `n` prompt records of `split`, deterministically from `seed`.
pub fn generate_split(seed: u64, split: Split, n: usize) -> Vec<PromptRecord> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(match split {
        Split::Train => 1,
        Split::EvalHeldin => 2,
        Split::EvalHeldout => 3,
    });
    let categories: &[Category] = match split {
        Split::EvalHeldout => &Category::COLOURED,
        _ => &Category::ALL,
    };
    (0..n)
        .map(|i| {
            let target = sample_target(categories[i % categories.len()], split, &mut rng);
            PromptRecord {
                id: format!("{}-{i:05}", split.as_str()),
                prompt: target.prompt(),
                category: target.category(),
                split,
                target,
            }
        })
        .collect()
}

/// Serialises records as JSONL (one object per line, trailing newline).
pub fn to_jsonl(records: &[PromptRecord]) -> Result<String, WorldError> {
    let mut out = String::new();
    for r in records {
        out.push_str(&serde_json::to_string(r).map_err(|e| WorldError::Format(e.to_string()))?);
        out.push('\n');
    }
    Ok(out)
}

/// Parses JSONL text into records (blank lines are skipped).
pub fn parse_jsonl(text: &str) -> Result<Vec<PromptRecord>, WorldError> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let rec: PromptRecord = serde_json::from_str(l)
                .map_err(|e| WorldError::Format(format!("line {}: {e}", i + 1)))?;
            rec.target
                .validate()
                .map_err(|e| WorldError::Format(format!("line {}: {e}", i + 1)))?;
            Ok(rec)
        })
        .collect()
}

/// Loads a JSONL prompt file.
pub fn load_jsonl(path: impl AsRef<Path>) -> Result<Vec<PromptRecord>, WorldError> {
    parse_jsonl(&std::fs::read_to_string(path)?)
}

/// The directory holding the committed dataset files (`<workspace>/datasets/shapes`).
pub fn dataset_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../datasets/shapes")
}

/// The exact contents of the committed dataset files, as `(file name, text)`.
pub fn dataset_files() -> Result<Vec<(&'static str, String)>, WorldError> {
    let train = generate_split(DATASET_SEED, Split::Train, TRAIN_COUNT);
    let mut eval = generate_split(
        DATASET_SEED,
        Split::EvalHeldin,
        EVAL_HELDIN_PER_CATEGORY * Category::ALL.len(),
    );
    eval.extend(generate_split(
        DATASET_SEED,
        Split::EvalHeldout,
        EVAL_HELDOUT_COUNT,
    ));
    let example = eval
        .iter()
        .find(|r| r.category == Category::Position)
        .map(|r| serde_json::to_string(r).map_err(|e| WorldError::Format(e.to_string())))
        .transpose()?
        .unwrap_or_default();
    Ok(vec![
        ("train.jsonl", to_jsonl(&train)?),
        ("eval.jsonl", to_jsonl(&eval)?),
        ("README.md", readme(&example)),
    ])
}

/// (Re)writes the dataset files into `dir` (created if missing), each atomically.
pub fn write_datasets(dir: impl AsRef<Path>) -> Result<(), WorldError> {
    let dir = dir.as_ref();
    std::fs::create_dir_all(dir)?;
    for (name, text) in dataset_files()? {
        super::png::write_atomic(&dir.join(name), text.as_bytes())?;
    }
    Ok(())
}

fn readme(example: &str) -> String {
    let held: Vec<String> = HELD_OUT_PAIRS
        .iter()
        .map(|(s, c)| format!("`{c} {s}`"))
        .collect();
    let palette: Vec<String> = Color::ALL
        .iter()
        .map(|c| {
            let [r, g, b] = c.rgb();
            format!("| {c} | ({r:.2}, {g:.2}, {b:.2}) |")
        })
        .collect();
    format!(
        r#"# ShapeWorld prompt datasets

<!-- GENERATED by `nodes::world::dataset::write_datasets` — do not edit by hand.
     Regenerate: FLOWRUN_REGENERATE_DATASETS=1 cargo test --release -p flowrun-nodes should_match_committed_datasets
     The test fails whenever these files differ from a fresh generation. -->

ShapeWorld is flowrun's synthetic compositional text-to-image world (module
`nodes::world`): {IMAGE_SIZE}x{IMAGE_SIZE} RGB images of simple coloured shapes on a plain
mid-grey background, with an exact verifier (`shape_eval`, `nodes::world::verify`)
used as RL reward, in the role GenEval plays for SD3.

## Files

| file | content |
|------|---------|
| `train.jsonl` | {TRAIN_COUNT} prompts, split `train` |
| `eval.jsonl`  | {heldin} prompts of split `eval_heldin` ({EVAL_HELDIN_PER_CATEGORY} per category) followed by {EVAL_HELDOUT_COUNT} prompts of split `eval_heldout` |

Generator seed: `{DATASET_SEED}` (ChaCha8, one stream per split: train=1,
eval_heldin=2, eval_heldout=3). Categories are assigned round-robin, so every
split is balanced. Ids are unique; prompt texts may repeat.

## Format

One JSON object per line:

```json
{example}
```

* `category`: `single_object`, `two_objects`, `counting`, `colors`, `position`, `color_attr`.
* `split`: `train`, `eval_heldin`, `eval_heldout`.
* `target.objects`: one or two groups `{{"shape", "color" (null = any), "count" (1..=3)}}`.
* `target.relation`: `null` or one of `left_of`, `right_of`, `above`, `below`,
  relating group 0 (subject) to group 1 (reference); image y grows downwards.

## Categories (mirroring GenEval)

| category | example | rule |
|----------|---------|------|
| `single_object` | `a circle` | one uncoloured object |
| `two_objects` | `a circle and a square` | two different uncoloured shapes |
| `counting` | `three triangles` | 2 or 3 uncoloured objects of one shape |
| `colors` | `a blue square` | one coloured object |
| `position` | `a red circle to the left of a blue square` | two different shapes, **both coloured** (unlike GenEval), colours independent |
| `color_attr` | `a red circle and a blue square` | two different shapes with two different colours |

## Vocabulary

Shapes: circle, square, triangle, diamond, cross. Colours (intensity in [0, 1]):

| colour | RGB |
|--------|-----|
{palette}

Prompts use a closed vocabulary of words (`nodes::world::tokenizer`, at most
{MAX_TOKENS} tokens, `<pad>` = 0).

## Held-out compositions

{held_list} never appear in `train` prompts, and uncoloured objects are
never rendered in a colour that forms one of these pairs (in any split). Every
`eval_heldout` prompt names at least one of them (categories `colors`,
`position`, `color_attr`); `eval_heldin` prompts follow the training distribution.

## Images

Rendered on the fly by `nodes::world::render` (deterministic given the RNG):
CHW `[3, {IMAGE_SIZE}, {IMAGE_SIZE}]` `f32` in **[-1, 1]** (intensity `p` in [0, 1] is stored as
`2p - 1`); background mid-grey (0.0); shapes 9–13.5 px (smaller in crowded
scenes), anti-aliased, non-overlapping (≥ 3 px apart), at least 2 px from the
border; related pairs are placed within 25° of the relation's axis.

## Verifier (`shape_eval`)

`nodes::world::verify::evaluate(image, target)` segments the image against its
border-estimated background, classifies each connected component's colour (by
direction from the background) and shape (anti-aliased/blurred template
matching), and checks the criteria `objects`, `count` (exact per named shape),
`color` (if colours are named), `position` (if a relation is named; GenEval's
rule on box centres) and `no_extra` (no unrequested objects). `correct` = all
applicable criteria pass; `reward` = fraction passed.
"#,
        heldin = EVAL_HELDIN_PER_CATEGORY * Category::ALL.len(),
        palette = palette.join("\n"),
        held_list = held.join(", "),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::world::tokenize;
    use std::collections::HashSet;

    #[test]
    fn should_generate_deterministically() {
        for split in Split::ALL {
            let a = generate_split(1, split, 200);
            assert_eq!(a, generate_split(1, split, 200));
            assert_ne!(a, generate_split(2, split, 200));
        }
        assert_ne!(
            generate_split(1, Split::Train, 50)
                .iter()
                .map(|r| &r.prompt)
                .collect::<Vec<_>>(),
            generate_split(1, Split::EvalHeldin, 50)
                .iter()
                .map(|r| &r.prompt)
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn should_respect_split_rules() {
        for split in Split::ALL {
            let recs = generate_split(DATASET_SEED, split, 3000);
            let ids: HashSet<_> = recs.iter().map(|r| r.id.as_str()).collect();
            assert_eq!(ids.len(), recs.len());
            for r in &recs {
                r.target.validate().unwrap();
                assert_eq!(r.prompt, r.target.prompt());
                assert_eq!(r.category, r.target.category());
                assert_eq!(r.split, split);
                assert!(tokenize(&r.prompt).is_ok(), "{}", r.prompt);
                assert_eq!(r.target.has_held_out_pair(), split == Split::EvalHeldout);
                if r.category == Category::ColorAttr {
                    assert_ne!(r.target.objects[0].color, r.target.objects[1].color);
                }
            }
            let cats: HashSet<_> = recs.iter().map(|r| r.category).collect();
            let expected = if split == Split::EvalHeldout { 3 } else { 6 };
            assert_eq!(cats.len(), expected);
        }
    }

    #[test]
    fn should_match_committed_datasets() {
        let dir = dataset_dir();
        if std::env::var_os("FLOWRUN_REGENERATE_DATASETS").is_some() {
            write_datasets(&dir).unwrap();
        }
        for (name, fresh) in dataset_files().unwrap() {
            let path = dir.join(name);
            let committed = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
            assert!(
                committed == fresh,
                "{} differs from a fresh generation; regenerate with \
                 FLOWRUN_REGENERATE_DATASETS=1 cargo test --release -p flowrun-nodes \
                 should_match_committed_datasets",
                path.display()
            );
        }
        let eval = load_jsonl(dir.join("eval.jsonl")).unwrap();
        assert_eq!(
            eval.len(),
            EVAL_HELDIN_PER_CATEGORY * Category::ALL.len() + EVAL_HELDOUT_COUNT
        );
        assert_eq!(
            load_jsonl(dir.join("train.jsonl")).unwrap().len(),
            TRAIN_COUNT
        );
    }

    #[test]
    fn should_reject_malformed_jsonl() {
        assert!(parse_jsonl("{not json}\n").is_err());
        let bad = r#"{"id":"x","prompt":"a","category":"colors","split":"train","target":{"objects":[],"relation":null}}"#;
        assert!(parse_jsonl(bad).is_err());
    }
}
