//! The ShapeWorld renderer.
//!
//! Objects are placed uniformly at random (rejection sampling) with their
//! bounding boxes at least [`MARGIN`] px inside the image and at least [`GAP`]
//! px apart, then rasterised with 4×4 supersampling (anti-aliased edges) over
//! the plain mid-grey background. For a relation, every (subject, reference)
//! pair is placed *strictly*: fully separated along the relation's axis and
//! within [`MAX_RELATION_ANGLE_DEG`] of it, so the verifier's more lenient
//! GenEval-style check always holds with a margin, and no other relation does.
//!
//! Uncoloured objects get a uniformly random palette colour that does not form
//! a held-out pair with their shape.

use rand::Rng;

use super::dataset::sample_target;
use super::target::{Category, Color, Relation, Shape, Target, is_held_out};
use super::tokenizer::tokenize;
use super::{BACKGROUND, IMAGE_SIZE, Image, WorldError};

/// Minimum distance (px) between an object's bounding box and the image edge.
pub const MARGIN: f32 = 2.0;
/// Minimum gap (px) between the bounding boxes of two objects.
pub const GAP: f32 = 3.0;
/// Maximum angle between a related pair's centre offset and the relation axis.
pub const MAX_RELATION_ANGLE_DEG: f32 = 25.0;
/// Supersampling factor per axis used for anti-aliasing.
const SUPERSAMPLE: usize = 4;
/// Whole-scene placement attempts before giving up.
const SCENE_ATTEMPTS: usize = 2000;
/// Position attempts per object within one scene attempt.
const OBJECT_ATTEMPTS: usize = 60;

/// One object of a rendered scene, in pixel coordinates (`x` right, `y` down,
/// pixel `(i, j)` covering `[i, i+1) × [j, j+1)`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlacedObject {
    /// Index of the target group the object belongs to.
    pub group: usize,
    /// Shape.
    pub shape: Shape,
    /// Colour actually painted.
    pub color: Color,
    /// Bounding-box centre `[x, y]`.
    pub center: [f32; 2],
    /// Bounding-box side length.
    pub size: f32,
}

/// A rendered image with its ground-truth layout.
#[derive(Debug, Clone, PartialEq)]
pub struct Scene {
    /// CHW `[3, 32, 32]` image in `[-1, 1]`.
    pub image: Image,
    /// The objects, in target group order.
    pub objects: Vec<PlacedObject>,
}

/// A random training sample: prompt, target, tokens and image.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainingExample {
    /// Prompt text.
    pub prompt: String,
    /// Prompt category.
    pub category: Category,
    /// Structured target.
    pub target: Target,
    /// `tokenize(prompt)`, padded to [`MAX_TOKENS`](super::MAX_TOKENS).
    pub tokens: Vec<u32>,
    /// CHW `[3, 32, 32]` image in `[-1, 1]`.
    pub image: Image,
}

/// Renders `target` as a CHW `[3, 32, 32]` image with values in `[-1, 1]`
/// (background exactly `0.0`). Deterministic given the state of `rng`.
///
/// Errors if the target is invalid (see [`Target::validate`]) or, in
/// principle, if no placement is found (never observed for valid targets).
pub fn render<R: Rng + ?Sized>(target: &Target, rng: &mut R) -> Result<Image, WorldError> {
    render_scene(target, rng).map(|s| s.image)
}

/// Like [`render`], but also returns the ground-truth layout.
pub fn render_scene<R: Rng + ?Sized>(target: &Target, rng: &mut R) -> Result<Scene, WorldError> {
    target.validate()?;
    let mut objects = Vec::with_capacity(target.total_objects());
    for (gi, g) in target.objects.iter().enumerate() {
        for _ in 0..g.count {
            let color = match g.color {
                Some(c) => c,
                None => random_color_for(g.shape, rng),
            };
            objects.push(PlacedObject {
                group: gi,
                shape: g.shape,
                color,
                center: [0.0; 2],
                size: 0.0,
            });
        }
    }
    place(&mut objects, target.relation, rng)?;
    let mut image = vec![0.0; super::IMAGE_LEN];
    for o in &objects {
        rasterise(&mut image, o);
    }
    Ok(Scene { image, objects })
}

/// Draws a random training example (prompt from the training distribution,
/// uniformly over categories; no held-out pairs anywhere) and renders it.
pub fn sample_training_example<R: Rng + ?Sized>(
    rng: &mut R,
) -> Result<TrainingExample, WorldError> {
    let category = Category::ALL[rng.random_range(0..Category::ALL.len())];
    let target = sample_target(category, super::Split::Train, rng);
    let prompt = target.prompt();
    let tokens = tokenize(&prompt).map_err(WorldError::Tokenize)?;
    let image = render(&target, rng)?;
    Ok(TrainingExample {
        prompt,
        category,
        target,
        tokens,
        image,
    })
}

/// A uniformly random colour that does not form a held-out pair with `shape`.
pub(crate) fn random_color_for<R: Rng + ?Sized>(shape: Shape, rng: &mut R) -> Color {
    let allowed: Vec<Color> = Color::ALL
        .into_iter()
        .filter(|&c| !is_held_out(shape, c))
        .collect();
    allowed[rng.random_range(0..allowed.len())]
}

/// Side-length range for a scene with `n` objects.
fn size_range(n: usize, related: bool) -> (f32, f32) {
    match n {
        0..=2 => (9.5, 13.5),
        3 if !related => (9.0, 12.0),
        _ => (8.5, 10.5),
    }
}

/// Whether `a` stands in `relation` to `b` with the renderer's strict margin.
pub(crate) fn strict_relation(relation: Relation, a: &PlacedObject, b: &PlacedObject) -> bool {
    let dx = a.center[0] - b.center[0];
    let dy = a.center[1] - b.center[1];
    let (along, perp) = match relation {
        Relation::LeftOf => (-dx, dy),
        Relation::RightOf => (dx, dy),
        Relation::Above => (-dy, dx),
        Relation::Below => (dy, dx),
    };
    let tan = MAX_RELATION_ANGLE_DEG.to_radians().tan();
    along >= (a.size + b.size) * 0.5 + GAP && perp.abs() <= tan * along
}

fn separated(a: &PlacedObject, b: &PlacedObject) -> bool {
    let min = (a.size + b.size) * 0.5 + GAP;
    (a.center[0] - b.center[0]).abs() >= min || (a.center[1] - b.center[1]).abs() >= min
}

fn place<R: Rng + ?Sized>(
    objects: &mut [PlacedObject],
    relation: Option<Relation>,
    rng: &mut R,
) -> Result<(), WorldError> {
    let (lo, hi) = size_range(objects.len(), relation.is_some());
    for _ in 0..SCENE_ATTEMPTS {
        let mut ok = true;
        for i in 0..objects.len() {
            let size = rng.random_range(lo..=hi);
            let half = size * 0.5;
            let (min, max) = (MARGIN + half, IMAGE_SIZE as f32 - MARGIN - half);
            let mut placed = false;
            // With a relation, the subject's axis coordinate is drawn from
            // the subject's half of the image and the reference's from the
            // other half (rejection still enforces the exact constraint).
            let axis = relation.map(|r| {
                let first_half =
                    matches!(r, Relation::LeftOf | Relation::Above) == (objects[i].group == 0);
                let mid = IMAGE_SIZE as f32 * 0.5;
                let range = if first_half {
                    (min, mid.max(min))
                } else {
                    (mid.min(max), max)
                };
                (matches!(r, Relation::Above | Relation::Below), range)
            });
            for _ in 0..OBJECT_ATTEMPTS {
                let mut center = [rng.random_range(min..=max), rng.random_range(min..=max)];
                if let Some((vertical, (a0, a1))) = axis {
                    center[usize::from(vertical)] = rng.random_range(a0..=a1);
                }
                let cand = PlacedObject {
                    center,
                    size,
                    ..objects[i]
                };
                let fits = objects[..i].iter().all(|o| {
                    separated(o, &cand)
                        && match relation {
                            Some(r) if o.group == 0 && cand.group == 1 => {
                                strict_relation(r, o, &cand)
                            }
                            _ => true,
                        }
                });
                if fits {
                    objects[i] = cand;
                    placed = true;
                    break;
                }
            }
            if !placed {
                ok = false;
                break;
            }
        }
        if ok {
            return Ok(());
        }
    }
    Err(WorldError::Placement(format!(
        "no layout found for {} objects after {SCENE_ATTEMPTS} attempts",
        objects.len()
    )))
}

/// Paints `o` (anti-aliased) into the CHW `[-1, 1]` image.
fn rasterise(image: &mut [f32], o: &PlacedObject) {
    let n = IMAGE_SIZE;
    let half = o.size * 0.5;
    let x0 = ((o.center[0] - half).floor().max(0.0)) as usize;
    let y0 = ((o.center[1] - half).floor().max(0.0)) as usize;
    let x1 = ((o.center[0] + half).ceil() as usize).min(n);
    let y1 = ((o.center[1] + half).ceil() as usize).min(n);
    let inv = 1.0 / o.size;
    let step = 1.0 / SUPERSAMPLE as f32;
    let rgb = o.color.rgb();
    for py in y0..y1 {
        for px in x0..x1 {
            let mut hits = 0u32;
            for sy in 0..SUPERSAMPLE {
                let v = (py as f32 + (sy as f32 + 0.5) * step - o.center[1]) * inv;
                for sx in 0..SUPERSAMPLE {
                    let u = (px as f32 + (sx as f32 + 0.5) * step - o.center[0]) * inv;
                    hits += u32::from(o.shape.contains(u, v));
                }
            }
            if hits == 0 {
                continue;
            }
            let cov = hits as f32 / (SUPERSAMPLE * SUPERSAMPLE) as f32;
            for c in 0..3 {
                let p = BACKGROUND[c] + cov * (rgb[c] - BACKGROUND[c]);
                image[c * n * n + py * n + px] = 2.0 * p - 1.0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::world::target::ObjectGroup;
    use crate::world::{IMAGE_LEN, Split, generate_split};
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn should_render_deterministically_in_range() {
        let t = Target::pair(
            ObjectGroup::one(Shape::Circle, Some(Color::Red)),
            ObjectGroup::one(Shape::Square, None),
            Some(Relation::Above),
        );
        let a = render(&t, &mut ChaCha8Rng::seed_from_u64(7)).unwrap();
        let b = render(&t, &mut ChaCha8Rng::seed_from_u64(7)).unwrap();
        let c = render(&t, &mut ChaCha8Rng::seed_from_u64(8)).unwrap();
        assert_eq!(a.len(), IMAGE_LEN);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a.iter().all(|v| (-1.0..=1.0).contains(v)));
        // Corners are background (0.0 in [-1, 1]).
        assert_eq!(a[0], 0.0);
        assert_eq!(a[IMAGE_LEN - 1], 0.0);
    }

    #[test]
    fn should_satisfy_targets_in_layout() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for split in Split::ALL {
            for rec in generate_split(11, split, 300) {
                let scene = render_scene(&rec.target, &mut rng).unwrap();
                assert_eq!(scene.objects.len(), rec.target.total_objects());
                for o in &scene.objects {
                    let g = rec.target.objects[o.group];
                    assert!(g.accepts(o.shape, Some(o.color)));
                    if split == Split::Train || g.color.is_none() {
                        assert!(!is_held_out(o.shape, o.color), "{rec:?}");
                    }
                    let lim = o.size * 0.5 + MARGIN - 1e-4;
                    assert!(o.center.iter().all(|&c| c >= lim && c <= 32.0 - lim));
                }
                for (i, a) in scene.objects.iter().enumerate() {
                    for b in &scene.objects[i + 1..] {
                        assert!(separated(a, b));
                        if let Some(r) = rec.target.relation
                            && a.group == 0
                            && b.group == 1
                        {
                            assert!(strict_relation(r, a, b));
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn should_place_the_largest_targets() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let group = |shape, count| ObjectGroup {
            shape,
            color: None,
            count,
        };
        let mut targets = vec![
            Target::pair(group(Shape::Cross, 2), group(Shape::Diamond, 2), None),
            Target::pair(group(Shape::Cross, 3), group(Shape::Diamond, 1), None),
        ];
        for r in Relation::ALL {
            targets.push(Target::pair(
                group(Shape::Cross, 2),
                group(Shape::Diamond, 1),
                Some(r),
            ));
            targets.push(Target::pair(
                group(Shape::Cross, 1),
                group(Shape::Diamond, 2),
                Some(r),
            ));
        }
        for t in &targets {
            for _ in 0..50 {
                let scene = render_scene(t, &mut rng).unwrap();
                assert_eq!(scene.objects.len(), t.total_objects());
            }
        }
        let too_many = Target::single(ObjectGroup {
            shape: Shape::Cross,
            color: None,
            count: 9,
        });
        assert!(render(&too_many, &mut rng).is_err());
    }

    #[test]
    fn should_sample_training_examples_without_held_out_pairs() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        for _ in 0..500 {
            let ex = sample_training_example(&mut rng).unwrap();
            assert!(!ex.target.has_held_out_pair());
            assert_eq!(ex.prompt, ex.target.prompt());
            assert_eq!(ex.category, ex.target.category());
            assert_eq!(ex.image.len(), IMAGE_LEN);
        }
    }
}
