//! The "shapes world": its vocabulary (palette colours, shapes, sizes, spatial relations), the caption grammar
//! ([`SceneSpec::caption`] / [`parse_caption`]), and the ground-truth reward [`ShapesReward`] computed from pixels.
//!
//! The scene model and the renderer live in the `diffpref` crate (`diffpref::data::shapes`); this module holds
//! what the reward needs to read a prompt and judge an image, so the reward has no weights and no renderer.
//!
//! # Caption grammar
//!
//! ```text
//! caption  := item (relation item)?            one object each side of a relation
//!           | item ("," item)* ("and" item)?   a list of objects
//! item     := count? size? colour shape        shape plural when count > 1
//! count    := a | an | one | two | three
//! size     := small | large | big
//! relation := (to the)? left of | (to the)? right of | above | below | on top of | under | beneath
//! ```
//!
//! Parsing is case-insensitive and ignores a trailing full stop; `"a red circle above a blue square"` means the
//! red circle's centre is above the blue square's.

/// The palette: every object has one of these colours (the background is none of them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Colour {
    Red,
    Green,
    Blue,
    Yellow,
    Purple,
    Orange,
    White,
    Black,
}

impl Colour {
    pub const ALL: [Colour; 8] = [
        Colour::Red,
        Colour::Green,
        Colour::Blue,
        Colour::Yellow,
        Colour::Purple,
        Colour::Orange,
        Colour::White,
        Colour::Black,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Colour::Red => "red",
            Colour::Green => "green",
            Colour::Blue => "blue",
            Colour::Yellow => "yellow",
            Colour::Purple => "purple",
            Colour::Orange => "orange",
            Colour::White => "white",
            Colour::Black => "black",
        }
    }

    /// The colour's sRGB value (pairwise at least ~90/255 apart, and at least ~85/255 from [`BACKGROUND`]).
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Colour::Red => [220, 40, 40],
            Colour::Green => [40, 170, 60],
            Colour::Blue => [40, 80, 220],
            Colour::Yellow => [240, 220, 40],
            Colour::Purple => [140, 60, 180],
            Colour::Orange => [250, 130, 20],
            Colour::White => [245, 245, 245],
            Colour::Black => [25, 25, 25],
        }
    }

    /// [`Colour::rgb`] in [0, 1].
    pub fn rgb_f32(self) -> [f32; 3] {
        let c = self.rgb();
        [
            c[0] as f32 / 255.0,
            c[1] as f32 / 255.0,
            c[2] as f32 / 255.0,
        ]
    }

    pub fn from_name(word: &str) -> Option<Colour> {
        Colour::ALL.into_iter().find(|c| c.name() == word)
    }

    /// Index in [`Colour::ALL`].
    pub fn index(self) -> usize {
        Colour::ALL.iter().position(|&c| c == self).unwrap()
    }
}

/// The default scene background (neutral grey).
pub const BACKGROUND: [u8; 3] = [128, 128, 128];

/// Object shapes. Each is drawn inside the square of half-side `r` around its centre: the circle of radius `r`,
/// the square of half-side `r`, the upward isosceles triangle with apex at the top middle and base along the
/// bottom edge. Their fill ratios of that bounding box are π/4, 1 and 1/2.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Shape {
    Circle,
    Square,
    Triangle,
}

impl Shape {
    pub const ALL: [Shape; 3] = [Shape::Circle, Shape::Square, Shape::Triangle];

    pub fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
        }
    }

    pub fn plural(self) -> &'static str {
        match self {
            Shape::Circle => "circles",
            Shape::Square => "squares",
            Shape::Triangle => "triangles",
        }
    }

    /// A shape word, singular or plural: `(shape, is_plural)`.
    pub fn from_word(word: &str) -> Option<(Shape, bool)> {
        Shape::ALL.into_iter().find_map(|s| {
            if s.name() == word {
                Some((s, false))
            } else if s.plural() == word {
                Some((s, true))
            } else {
                None
            }
        })
    }

    /// The fraction of its bounding box the shape fills.
    pub fn fill_ratio(self) -> f32 {
        match self {
            Shape::Circle => std::f32::consts::FRAC_PI_4,
            Shape::Square => 1.0,
            Shape::Triangle => 0.5,
        }
    }

    /// How far the shape's centroid lies below its bounding box's centre, as a fraction of the box height
    /// (1/6 for the upward triangle, 0 for the symmetric shapes).
    pub fn centroid_offset(self) -> f32 {
        match self {
            Shape::Triangle => 1.0 / 6.0,
            _ => 0.0,
        }
    }

    /// Whether the point `(dx, dy)` (relative to the centre; y grows downwards) lies inside the shape of
    /// half-size `r`.
    pub fn contains(self, dx: f32, dy: f32, r: f32) -> bool {
        match self {
            Shape::Circle => dx * dx + dy * dy <= r * r,
            Shape::Square => dx.abs() <= r && dy.abs() <= r,
            // Apex (0, -r), base from (-r, r) to (r, r): half-width (dy + r) / 2 at height dy.
            Shape::Triangle => dy <= r && dy >= -r && dx.abs() <= (dy + r) * 0.5,
        }
    }
}

/// Object sizes: the half-size `r` as a fraction of the image side.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Size {
    Small,
    Large,
}

impl Size {
    pub const ALL: [Size; 2] = [Size::Small, Size::Large];

    pub fn name(self) -> &'static str {
        match self {
            Size::Small => "small",
            Size::Large => "large",
        }
    }

    /// Half-size as a fraction of the image side (radius of a circle, half-side of a square).
    pub fn radius(self) -> f32 {
        match self {
            Size::Small => 0.12,
            Size::Large => 0.19,
        }
    }

    pub fn from_word(word: &str) -> Option<Size> {
        match word {
            "small" | "little" | "tiny" => Some(Size::Small),
            "large" | "big" => Some(Size::Large),
            _ => None,
        }
    }
}

/// A spatial relation "A *rel* B" between two objects' centres (image y grows downwards).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Relation {
    LeftOf,
    RightOf,
    Above,
    Below,
}

impl Relation {
    pub const ALL: [Relation; 4] = [
        Relation::LeftOf,
        Relation::RightOf,
        Relation::Above,
        Relation::Below,
    ];

    /// The caption phrase.
    pub fn phrase(self) -> &'static str {
        match self {
            Relation::LeftOf => "to the left of",
            Relation::RightOf => "to the right of",
            Relation::Above => "above",
            Relation::Below => "below",
        }
    }

    /// How far `a` lies in the relation's direction from `b` (positive when "a rel b" holds), in the units of
    /// the coordinates.
    pub fn margin(self, a: (f32, f32), b: (f32, f32)) -> f32 {
        match self {
            Relation::LeftOf => b.0 - a.0,
            Relation::RightOf => a.0 - b.0,
            Relation::Above => b.1 - a.1,
            Relation::Below => a.1 - b.1,
        }
    }

    /// The relation seen from the other object.
    pub fn inverse(self) -> Relation {
        match self {
            Relation::LeftOf => Relation::RightOf,
            Relation::RightOf => Relation::LeftOf,
            Relation::Above => Relation::Below,
            Relation::Below => Relation::Above,
        }
    }
}

/// One item of a caption: `count` objects of one colour and shape (and optionally size).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ObjectSpec {
    pub count: usize,
    pub colour: Colour,
    pub shape: Shape,
    pub size: Option<Size>,
}

/// What a caption asks for: its items in order, and for two single objects optionally their relation
/// (`objects[0]` *relation* `objects[1]`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SceneSpec {
    pub objects: Vec<ObjectSpec>,
    pub relation: Option<Relation>,
}

const COUNT_WORDS: [&str; 4] = ["zero", "one", "two", "three"];

fn item_text(o: &ObjectSpec) -> String {
    let mut words = Vec::new();
    if let Some(s) = o.size {
        words.push(s.name());
    }
    words.push(o.colour.name());
    words.push(if o.count == 1 {
        o.shape.name()
    } else {
        o.shape.plural()
    });
    let rest = words.join(" ");
    let count = if o.count == 1 {
        if rest.starts_with(['a', 'e', 'i', 'o', 'u']) {
            "an".to_string()
        } else {
            "a".to_string()
        }
    } else if o.count < COUNT_WORDS.len() {
        COUNT_WORDS[o.count].to_string()
    } else {
        o.count.to_string()
    };
    format!("{count} {rest}")
}

impl SceneSpec {
    /// The total number of objects asked for.
    pub fn total(&self) -> usize {
        self.objects.iter().map(|o| o.count).sum()
    }

    /// The canonical caption: `"a red circle"`, `"two blue squares"`, `"a red circle above a blue square"`,
    /// `"a red circle, a green square and a blue triangle"`.
    pub fn caption(&self) -> String {
        let items: Vec<String> = self.objects.iter().map(item_text).collect();
        if let (Some(rel), 2) = (self.relation, items.len()) {
            return format!("{} {} {}", items[0], rel.phrase(), items[1]);
        }
        match items.len() {
            0 => String::new(),
            1 => items[0].clone(),
            n => format!("{} and {}", items[..n - 1].join(", "), items[n - 1]),
        }
    }
}

fn parse_item(tokens: &[&str]) -> Option<ObjectSpec> {
    let mut i = 0;
    let mut count = None;
    if let Some(&t) = tokens.first() {
        count = match t {
            "a" | "an" | "one" => Some(1),
            "two" => Some(2),
            "three" => Some(3),
            _ => t.parse::<usize>().ok().filter(|&n| n > 0),
        };
        if count.is_some() {
            i = 1;
        }
    }
    let mut size = None;
    if let Some(s) = tokens.get(i).and_then(|t| Size::from_word(t)) {
        size = Some(s);
        i += 1;
    }
    let colour = Colour::from_name(tokens.get(i)?)?;
    let (shape, plural) = Shape::from_word(tokens.get(i + 1)?)?;
    if tokens.len() != i + 2 {
        return None;
    }
    let count = count.unwrap_or(if plural { 2 } else { 1 });
    Some(ObjectSpec {
        count,
        colour,
        shape,
        size,
    })
}

/// Relation phrases, longest first.
const RELATION_PHRASES: [(&[&str], Relation); 9] = [
    (&["to", "the", "left", "of"], Relation::LeftOf),
    (&["to", "the", "right", "of"], Relation::RightOf),
    (&["on", "top", "of"], Relation::Above),
    (&["left", "of"], Relation::LeftOf),
    (&["right", "of"], Relation::RightOf),
    (&["above"], Relation::Above),
    (&["below"], Relation::Below),
    (&["under"], Relation::Below),
    (&["beneath"], Relation::Below),
];

/// Reads a caption of the shapes grammar (see the module docs): what the prompt asks for, or `None` when the
/// text is not in the grammar. The inverse of [`SceneSpec::caption`].
pub fn parse_caption(text: &str) -> Option<SceneSpec> {
    let text = text.trim().trim_end_matches('.').to_ascii_lowercase();
    let spaced = text.replace(',', " , ");
    let tokens: Vec<&str> = spaced.split_whitespace().collect();
    if tokens.is_empty() {
        return None;
    }
    for start in 0..tokens.len() {
        for (phrase, rel) in RELATION_PHRASES {
            if tokens[start..].starts_with(phrase) {
                let a = parse_item(&tokens[..start])?;
                let b = parse_item(&tokens[start + phrase.len()..])?;
                if a.count != 1 || b.count != 1 {
                    return None;
                }
                return Some(SceneSpec {
                    objects: vec![a, b],
                    relation: Some(rel),
                });
            }
        }
    }
    let mut objects = Vec::new();
    for part in tokens.split(|t| *t == "," || *t == "and") {
        if part.is_empty() {
            continue;
        }
        objects.push(parse_item(part)?);
    }
    if objects.is_empty() {
        return None;
    }
    Some(SceneSpec {
        objects,
        relation: None,
    })
}

#[cfg(test)]
mod grammar_tests {
    use super::*;

    #[test]
    fn parses_the_examples() {
        let s = parse_caption("A red circle above a blue square.").unwrap();
        assert_eq!(s.relation, Some(Relation::Above));
        assert_eq!(s.objects[0].colour, Colour::Red);
        assert_eq!(s.objects[1].shape, Shape::Square);
        let s = parse_caption("two blue squares").unwrap();
        assert_eq!(s.objects.len(), 1);
        assert_eq!(s.objects[0].count, 2);
        let s =
            parse_caption("a small red circle, two green squares and an orange triangle").unwrap();
        assert_eq!(s.total(), 4);
        assert_eq!(s.objects[0].size, Some(Size::Small));
        assert_eq!(
            s.caption(),
            "a small red circle, two green squares and an orange triangle"
        );
        assert_eq!(
            parse_caption("a red circle left of a blue square")
                .unwrap()
                .relation,
            Some(Relation::LeftOf)
        );
        for bad in [
            "",
            "a dog",
            "a red",
            "a red circle above",
            "two red circles above a blue square",
            "a pink circle",
        ] {
            assert!(parse_caption(bad).is_none(), "{bad:?} parsed");
        }
    }
}
