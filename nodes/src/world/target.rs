//! ShapeWorld data model: palette, shapes, relations, structured targets and
//! prompt records, plus the canonical prompt text of a target.

use serde::{Deserialize, Serialize};

use super::{BACKGROUND, MAX_COUNT, MAX_GROUPS, MAX_OBJECTS, MAX_RELATED_OBJECTS, WorldError};

/// A palette colour. Every object is painted in exactly one palette colour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Color {
    /// Red.
    Red,
    /// Green.
    Green,
    /// Blue.
    Blue,
    /// Yellow.
    Yellow,
    /// Purple.
    Purple,
    /// Orange.
    Orange,
}

impl Color {
    /// All palette colours, in canonical order.
    pub const ALL: [Color; 6] = [
        Color::Red,
        Color::Green,
        Color::Blue,
        Color::Yellow,
        Color::Purple,
        Color::Orange,
    ];

    /// The prompt word for this colour.
    pub fn name(self) -> &'static str {
        match self {
            Color::Red => "red",
            Color::Green => "green",
            Color::Blue => "blue",
            Color::Yellow => "yellow",
            Color::Purple => "purple",
            Color::Orange => "orange",
        }
    }

    /// The rendered RGB intensity in `[0, 1]` (image value = `2 * rgb - 1`).
    ///
    /// The colours are saturated and chosen so that, seen from the mid-grey
    /// [`BACKGROUND`], every pair of palette colours differs in direction by
    /// at least ~35°, which is what the verifier's colour classifier relies on.
    pub fn rgb(self) -> [f32; 3] {
        match self {
            Color::Red => [0.90, 0.10, 0.10],
            Color::Green => [0.10, 0.75, 0.15],
            Color::Blue => [0.10, 0.20, 0.90],
            Color::Yellow => [0.95, 0.90, 0.10],
            Color::Purple => [0.60, 0.10, 0.80],
            Color::Orange => [0.95, 0.50, 0.05],
        }
    }

    /// `rgb() - BACKGROUND`: the colour as an offset from the background.
    pub(crate) fn offset(self) -> [f32; 3] {
        let c = self.rgb();
        [
            c[0] - BACKGROUND[0],
            c[1] - BACKGROUND[1],
            c[2] - BACKGROUND[2],
        ]
    }
}

impl std::fmt::Display for Color {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// An object shape. All shapes are axis-aligned and fill a square bounding box
/// of side `size` (see [`Shape::contains`] for the exact geometry).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Shape {
    /// A disc inscribed in the bounding box.
    Circle,
    /// The full bounding box.
    Square,
    /// An isosceles triangle, apex at the top centre, base along the bottom.
    Triangle,
    /// A square rotated by 45°, corners touching the box's edge midpoints.
    Diamond,
    /// A plus sign whose arms are [`CROSS_ARM`] of the box side thick.
    Cross,
}

/// Arm thickness of a [`Shape::Cross`], as a fraction of its bounding box side.
pub const CROSS_ARM: f32 = 0.38;

impl Shape {
    /// All shapes, in canonical order.
    pub const ALL: [Shape; 5] = [
        Shape::Circle,
        Shape::Square,
        Shape::Triangle,
        Shape::Diamond,
        Shape::Cross,
    ];

    /// The singular prompt word.
    pub fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
            Shape::Diamond => "diamond",
            Shape::Cross => "cross",
        }
    }

    /// The plural prompt word.
    pub fn plural(self) -> &'static str {
        match self {
            Shape::Circle => "circles",
            Shape::Square => "squares",
            Shape::Triangle => "triangles",
            Shape::Diamond => "diamonds",
            Shape::Cross => "crosses",
        }
    }

    /// Whether the point `(u, v)`, in bounding-box units relative to the box
    /// centre (`u, v ∈ [-0.5, 0.5]`, `v` pointing down), lies inside the shape.
    #[inline]
    pub fn contains(self, u: f32, v: f32) -> bool {
        match self {
            Shape::Circle => u * u + v * v <= 0.25,
            Shape::Square => u.abs() <= 0.5 && v.abs() <= 0.5,
            Shape::Triangle => v <= 0.5 && u.abs() <= (v + 0.5) * 0.5,
            Shape::Diamond => u.abs() + v.abs() <= 0.5,
            Shape::Cross => {
                let (au, av) = (u.abs(), v.abs());
                (au <= CROSS_ARM * 0.5 && av <= 0.5) || (av <= CROSS_ARM * 0.5 && au <= 0.5)
            }
        }
    }

    /// Area of the shape as a fraction of its bounding box area.
    pub fn area_fraction(self) -> f32 {
        match self {
            Shape::Circle => std::f32::consts::FRAC_PI_4,
            Shape::Square => 1.0,
            Shape::Triangle | Shape::Diamond => 0.5,
            Shape::Cross => 2.0 * CROSS_ARM - CROSS_ARM * CROSS_ARM,
        }
    }

    /// Vertical offset of the area centroid below the bounding-box centre, in
    /// box units (non-zero only for the triangle: `1/6`).
    pub fn centroid_offset(self) -> f32 {
        match self {
            Shape::Triangle => 1.0 / 6.0,
            _ => 0.0,
        }
    }
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A spatial relation between group 0 (the subject) and group 1 (the
/// reference) of a [`Target`]. Image `y` grows downwards, so `above` means a
/// smaller `y`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Relation {
    /// Subject to the left of the reference.
    LeftOf,
    /// Subject to the right of the reference.
    RightOf,
    /// Subject above the reference.
    Above,
    /// Subject below the reference.
    Below,
}

impl Relation {
    /// All relations, in canonical order.
    pub const ALL: [Relation; 4] = [
        Relation::LeftOf,
        Relation::RightOf,
        Relation::Above,
        Relation::Below,
    ];

    /// The prompt phrase.
    pub fn phrase(self) -> &'static str {
        match self {
            Relation::LeftOf => "to the left of",
            Relation::RightOf => "to the right of",
            Relation::Above => "above",
            Relation::Below => "below",
        }
    }

    /// The relation with subject and reference swapped.
    pub fn inverse(self) -> Relation {
        match self {
            Relation::LeftOf => Relation::RightOf,
            Relation::RightOf => Relation::LeftOf,
            Relation::Above => Relation::Below,
            Relation::Below => Relation::Above,
        }
    }
}

/// One group of identical objects: `count` × `shape`, optionally coloured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ObjectGroup {
    /// The shape of every object in the group.
    pub shape: Shape,
    /// The required colour, or `None` when the prompt does not name one (the
    /// renderer then picks a random non-held-out colour per object).
    pub color: Option<Color>,
    /// Number of objects, `1..=3`.
    pub count: u8,
}

impl ObjectGroup {
    /// A single object.
    pub fn one(shape: Shape, color: Option<Color>) -> Self {
        Self {
            shape,
            color,
            count: 1,
        }
    }

    /// Whether an object of `shape` and `color` satisfies this group.
    pub fn accepts(&self, shape: Shape, color: Option<Color>) -> bool {
        self.shape == shape && self.color.is_none_or(|c| color == Some(c))
    }

    /// The noun phrase, e.g. `a circle`, `an orange square`, `three red crosses`.
    pub fn phrase(&self) -> String {
        let noun = if self.count == 1 {
            self.shape.name()
        } else {
            self.shape.plural()
        };
        let adj = self.color.map(Color::name);
        let det = match self.count {
            1 => {
                let next = adj.unwrap_or(noun);
                if next.starts_with(['a', 'e', 'i', 'o', 'u']) {
                    "an"
                } else {
                    "a"
                }
            }
            2 => "two",
            _ => "three",
        };
        match adj {
            Some(a) => format!("{det} {a} {noun}"),
            None => format!("{det} {noun}"),
        }
    }
}

/// The structured content of a prompt: what a correct image must contain.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Target {
    /// One or two object groups.
    pub objects: Vec<ObjectGroup>,
    /// Optional relation of group 0 (subject) to group 1 (reference).
    pub relation: Option<Relation>,
}

impl Target {
    /// A target with a single group.
    pub fn single(group: ObjectGroup) -> Self {
        Self {
            objects: vec![group],
            relation: None,
        }
    }

    /// A target with two groups and an optional relation.
    pub fn pair(a: ObjectGroup, b: ObjectGroup, relation: Option<Relation>) -> Self {
        Self {
            objects: vec![a, b],
            relation,
        }
    }

    /// Checks the structural rules: 1–2 groups, counts in `1..=3`, at most
    /// [`MAX_OBJECTS`] objects overall, a relation only between exactly two
    /// groups with at most [`MAX_RELATED_OBJECTS`] objects (more cannot all be
    /// pairwise related within 32×32 px), and two groups always distinguishable (different shapes, or
    /// both coloured with different colours) so that every object belongs to
    /// at most one group.
    pub fn validate(&self) -> Result<(), WorldError> {
        let bad = |m: String| Err(WorldError::InvalidTarget(m));
        if self.objects.is_empty() || self.objects.len() > MAX_GROUPS {
            return bad(format!(
                "expected 1..={MAX_GROUPS} object groups, got {}",
                self.objects.len()
            ));
        }
        if let Some(g) = self
            .objects
            .iter()
            .find(|g| g.count == 0 || g.count > MAX_COUNT)
        {
            return bad(format!(
                "group count must be in 1..={MAX_COUNT}, got {}",
                g.count
            ));
        }
        if self.total_objects() > MAX_OBJECTS {
            return bad(format!(
                "at most {MAX_OBJECTS} objects in total, got {}",
                self.total_objects()
            ));
        }
        if self.relation.is_some() && self.objects.len() != 2 {
            return bad("a relation needs exactly two object groups".into());
        }
        if self.relation.is_some() && self.total_objects() > MAX_RELATED_OBJECTS {
            return bad(format!(
                "a relation allows at most {MAX_RELATED_OBJECTS} objects in total, got {}",
                self.total_objects()
            ));
        }
        if let [a, b] = self.objects.as_slice() {
            let distinct =
                a.shape != b.shape || matches!((a.color, b.color), (Some(x), Some(y)) if x != y);
            if !distinct {
                return bad(format!(
                    "groups `{}` and `{}` are indistinguishable",
                    a.phrase(),
                    b.phrase()
                ));
            }
        }
        Ok(())
    }

    /// Total number of objects over all groups.
    pub fn total_objects(&self) -> usize {
        self.objects.iter().map(|g| usize::from(g.count)).sum()
    }

    /// The canonical prompt text, e.g. `a red circle to the left of a blue square`.
    pub fn prompt(&self) -> String {
        let phrases: Vec<String> = self.objects.iter().map(ObjectGroup::phrase).collect();
        match (phrases.as_slice(), self.relation) {
            ([a, b], Some(r)) => format!("{a} {} {b}", r.phrase()),
            _ => phrases.join(" and "),
        }
    }

    /// The GenEval-style category this target belongs to.
    pub fn category(&self) -> Category {
        if self.relation.is_some() {
            return Category::Position;
        }
        let coloured = self.objects.iter().any(|g| g.color.is_some());
        match self.objects.as_slice() {
            [g] if g.count > 1 => Category::Counting,
            [_] if coloured => Category::Colors,
            [_] => Category::SingleObject,
            _ if coloured => Category::ColorAttr,
            _ => Category::TwoObjects,
        }
    }

    /// Whether the target explicitly asks for a held-out colour–shape pair.
    pub fn has_held_out_pair(&self) -> bool {
        self.objects
            .iter()
            .any(|g| g.color.is_some_and(|c| is_held_out(g.shape, c)))
    }
}

/// Colour–shape pairs that never appear in training prompts or training renders.
pub const HELD_OUT_PAIRS: [(Shape, Color); 4] = [
    (Shape::Triangle, Color::Purple),
    (Shape::Circle, Color::Orange),
    (Shape::Square, Color::Green),
    (Shape::Diamond, Color::Yellow),
];

/// Whether `(shape, color)` is one of the [`HELD_OUT_PAIRS`].
pub fn is_held_out(shape: Shape, color: Color) -> bool {
    HELD_OUT_PAIRS.contains(&(shape, color))
}

/// GenEval-style prompt category.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    /// `a circle`
    SingleObject,
    /// `a circle and a square`
    TwoObjects,
    /// `three triangles`
    Counting,
    /// `a blue square`
    Colors,
    /// `a red circle to the left of a blue square`
    Position,
    /// `a red circle and a blue square`
    ColorAttr,
}

impl Category {
    /// All categories, in canonical order.
    pub const ALL: [Category; 6] = [
        Category::SingleObject,
        Category::TwoObjects,
        Category::Counting,
        Category::Colors,
        Category::Position,
        Category::ColorAttr,
    ];

    /// Categories that name colours and can therefore contain held-out pairs.
    pub const COLOURED: [Category; 3] = [Category::Colors, Category::Position, Category::ColorAttr];

    /// The serialised name, e.g. `single_object`.
    pub fn as_str(self) -> &'static str {
        match self {
            Category::SingleObject => "single_object",
            Category::TwoObjects => "two_objects",
            Category::Counting => "counting",
            Category::Colors => "colors",
            Category::Position => "position",
            Category::ColorAttr => "color_attr",
        }
    }
}

/// Dataset split of a [`PromptRecord`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    /// Training prompts (no held-out pairs).
    Train,
    /// Evaluation prompts from the training distribution.
    EvalHeldin,
    /// Evaluation prompts that each name at least one held-out pair.
    EvalHeldout,
}

impl Split {
    /// All splits.
    pub const ALL: [Split; 3] = [Split::Train, Split::EvalHeldin, Split::EvalHeldout];

    /// The serialised name, e.g. `eval_heldin`.
    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::EvalHeldin => "eval_heldin",
            Split::EvalHeldout => "eval_heldout",
        }
    }
}

macro_rules! str_like {
    ($t:ty) => {
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
        impl PartialEq<str> for $t {
            fn eq(&self, other: &str) -> bool {
                self.as_str() == other
            }
        }
        impl PartialEq<&str> for $t {
            fn eq(&self, other: &&str) -> bool {
                self.as_str() == *other
            }
        }
        impl std::str::FromStr for $t {
            type Err = WorldError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::ALL
                    .into_iter()
                    .find(|x| x.as_str() == s)
                    .ok_or_else(|| WorldError::Format(format!("unknown {}: `{s}`", stringify!($t))))
            }
        }
    };
}
str_like!(Category);
str_like!(Split);

/// One prompt of a ShapeWorld dataset (one JSONL line).
///
/// Serialised as `{"id", "prompt", "category", "split", "target"}`; `category`
/// and `split` serialise to their snake_case names (e.g. `"color_attr"`,
/// `"eval_heldout"`) and compare equal to those strings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptRecord {
    /// Unique id within the dataset, e.g. `train-00042`.
    pub id: String,
    /// Prompt text (always `target.prompt()`).
    pub prompt: String,
    /// Prompt category (always `target.category()`).
    pub category: Category,
    /// Dataset split.
    pub split: Split,
    /// Structured target the verifier checks.
    pub target: Target,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(shape: Shape, color: Option<Color>, count: u8) -> ObjectGroup {
        ObjectGroup {
            shape,
            color,
            count,
        }
    }

    #[test]
    fn should_phrase_prompts_per_category() {
        let cases = [
            (
                Target::single(g(Shape::Circle, None, 1)),
                "a circle",
                Category::SingleObject,
            ),
            (
                Target::pair(g(Shape::Circle, None, 1), g(Shape::Square, None, 1), None),
                "a circle and a square",
                Category::TwoObjects,
            ),
            (
                Target::single(g(Shape::Cross, None, 3)),
                "three crosses",
                Category::Counting,
            ),
            (
                Target::single(g(Shape::Square, Some(Color::Orange), 1)),
                "an orange square",
                Category::Colors,
            ),
            (
                Target::pair(
                    g(Shape::Circle, Some(Color::Red), 1),
                    g(Shape::Square, Some(Color::Blue), 1),
                    Some(Relation::LeftOf),
                ),
                "a red circle to the left of a blue square",
                Category::Position,
            ),
            (
                Target::pair(
                    g(Shape::Circle, Some(Color::Red), 1),
                    g(Shape::Square, Some(Color::Blue), 1),
                    None,
                ),
                "a red circle and a blue square",
                Category::ColorAttr,
            ),
        ];
        for (t, prompt, cat) in cases {
            assert_eq!(t.prompt(), prompt);
            assert_eq!(t.category(), cat);
            t.validate().unwrap();
        }
    }

    #[test]
    fn should_reject_malformed_targets() {
        let bad = [
            Target {
                objects: vec![],
                relation: None,
            },
            Target::single(g(Shape::Circle, None, 0)),
            Target::single(g(Shape::Circle, None, 4)),
            Target {
                objects: vec![g(Shape::Circle, None, 1); 3],
                relation: None,
            },
            Target::pair(g(Shape::Circle, None, 3), g(Shape::Square, None, 2), None),
            Target {
                objects: vec![g(Shape::Circle, None, 1)],
                relation: Some(Relation::Above),
            },
            Target::pair(
                g(Shape::Circle, None, 1),
                g(Shape::Circle, Some(Color::Red), 1),
                None,
            ),
            Target::pair(
                g(Shape::Circle, None, 2),
                g(Shape::Square, None, 2),
                Some(Relation::Below),
            ),
        ];
        for t in bad {
            assert!(t.validate().is_err(), "{t:?} should be invalid");
        }
    }

    #[test]
    fn should_serialise_target_as_documented() {
        let t = Target::pair(
            g(Shape::Circle, Some(Color::Red), 1),
            g(Shape::Square, None, 1),
            Some(Relation::RightOf),
        );
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(
            json,
            r#"{"objects":[{"shape":"circle","color":"red","count":1},{"shape":"square","color":null,"count":1}],"relation":"right_of"}"#
        );
        assert_eq!(serde_json::from_str::<Target>(&json).unwrap(), t);
        assert!(Category::ColorAttr == "color_attr");
        assert_eq!("eval_heldout".parse::<Split>().unwrap(), Split::EvalHeldout);
    }

    #[test]
    fn should_keep_palette_directions_apart() {
        // The verifier classifies colours by their direction from the background.
        let min_deg = 30.0_f32;
        for (i, a) in Color::ALL.iter().enumerate() {
            for b in &Color::ALL[i + 1..] {
                let (va, vb) = (a.offset(), b.offset());
                let dot: f32 = (0..3).map(|k| va[k] * vb[k]).sum();
                let na: f32 = va.iter().map(|x| x * x).sum::<f32>().sqrt();
                let nb: f32 = vb.iter().map(|x| x * x).sum::<f32>().sqrt();
                let deg = (dot / (na * nb)).clamp(-1.0, 1.0).acos().to_degrees();
                assert!(deg > min_deg, "{a} vs {b}: {deg:.1}°");
            }
        }
    }
}
