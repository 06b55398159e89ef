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

// ---------------------------------------------------------------------------------------------------------------
// The ground-truth reward
// ---------------------------------------------------------------------------------------------------------------

use crate::error::{Error, Result};
use crate::Reward;
use candle_core::{DType, Device, Tensor};

/// A pixel belongs to a palette colour when it is within this RGB distance (in [0, 1] units) of it and nearer
/// to it than to the background.
pub const COLOUR_THRESHOLD: f32 = 0.22;
/// Width of the shape likelihood in fill ratio.
const FILL_SIGMA: f32 = 0.08;
/// Width of the shape likelihood in vertical skewness.
const SKEW_SIGMA: f32 = 0.2;
/// A relation holds fully once the centroids are this far apart along its axis (fraction of the side).
const RELATION_MARGIN: f32 = 0.1;

/// One connected region of a palette colour.
#[derive(Clone, Debug, PartialEq)]
pub struct Detection {
    pub colour: Colour,
    /// Pixels.
    pub area: usize,
    /// Inclusive pixel box `(x0, y0, x1, y1)`.
    pub bbox: (usize, usize, usize, usize),
    /// Centroid as fractions of the width and height.
    pub centroid: (f32, f32),
    /// Soft fill ratio: coverage-weighted area / (largest column sum × largest row sum) of the coverage, which
    /// is the fill ratio of the bounding box measured to sub-pixel accuracy (circle π/4, square 1, triangle 1/2).
    pub fill: f32,
    /// Coverage-weighted skewness of the rows (triangle −0.566, symmetric shapes 0).
    pub skew: f32,
    /// Mean colour of the region's pixels.
    pub mean_rgb: [f32; 3],
    /// Likelihood of each shape in [`Shape::ALL`] order (sums to 1).
    pub shape_probs: [f32; 3],
}

impl Detection {
    pub fn shape_prob(&self, s: Shape) -> f32 {
        self.shape_probs[Shape::ALL.iter().position(|&x| x == s).unwrap()]
    }

    /// The most likely shape.
    pub fn shape(&self) -> Shape {
        let mut best = 0;
        for i in 1..3 {
            if self.shape_probs[i] > self.shape_probs[best] {
                best = i;
            }
        }
        Shape::ALL[best]
    }
}

/// What [`analyse`] finds in an image.
#[derive(Clone, Debug, PartialEq)]
pub struct Analysis {
    pub width: usize,
    pub height: usize,
    /// Estimated background colour (per-channel median of the border pixels).
    pub background: [f32; 3],
    /// Regions of at least [`min_area`] pixels, in scan order.
    pub detections: Vec<Detection>,
    /// Fraction of pixels that are neither background nor a palette colour, plus those in too-small regions.
    pub ambiguous: f32,
}

/// The smallest region counted as an object: 0.3% of the image, at least 4 pixels.
pub fn min_area(width: usize, height: usize) -> usize {
    ((width * height) as f32 * 0.003).ceil().max(4.0) as usize
}

fn dist(a: [f32; 3], b: [f32; 3]) -> f32 {
    ((a[0] - b[0]).powi(2) + (a[1] - b[1]).powi(2) + (a[2] - b[2]).powi(2)).sqrt()
}

fn median(v: &mut [f32]) -> f32 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

/// The background estimate of a `[3, H, W]` image (row-major planes, values in [0, 1]): the per-channel median of
/// its border pixels.
pub fn estimate_background(chw: &[f32], height: usize, width: usize) -> [f32; 3] {
    let plane = height * width;
    let mut out = [0f32; 3];
    for (c, o) in out.iter_mut().enumerate() {
        let mut v = Vec::with_capacity(2 * (height + width));
        for y in 0..height {
            for x in 0..width {
                if y == 0 || x == 0 || y + 1 == height || x + 1 == width {
                    v.push(chw[c * plane + y * width + x]);
                }
            }
        }
        *o = median(&mut v);
    }
    out
}

/// The vertical skewness of each shape's area (y downwards).
fn shape_skew(s: Shape) -> f32 {
    match s {
        Shape::Triangle => -0.566,
        _ => 0.0,
    }
}

fn shape_probs(fill: f32, skew: f32) -> [f32; 3] {
    let logits = Shape::ALL.map(|s| {
        let a = (fill - s.fill_ratio()) / FILL_SIGMA;
        let b = (skew - shape_skew(s)) / SKEW_SIGMA;
        -0.5 * (a * a + b * b)
    });
    let m = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let e = logits.map(|l| (l - m).exp());
    let s: f32 = e.iter().sum();
    e.map(|x| x / s)
}

/// Segments a `[3, H, W]` image (row-major planes, values in [0, 1]) into palette-coloured regions: each pixel
/// takes its nearest palette colour when within [`COLOUR_THRESHOLD`] of it and nearer to it than to the
/// background; regions are 4-connected components of one colour of at least [`min_area`] pixels. Each region's
/// shape is judged, by Gaussian likelihoods, from its coverage (each pixel's position between the background
/// and the region's colour, over the region and the pixels around it, so anti-aliased edges count in part):
/// its fill ratio of its bounding box (circle π/4, square 1, triangle 1/2) and its vertical skewness (the
/// upward triangle −0.566, the others 0).
pub fn analyse(chw: &[f32], height: usize, width: usize) -> Analysis {
    let plane = height * width;
    assert_eq!(
        chw.len(),
        3 * plane,
        "analyse: expected 3 x {height} x {width} values"
    );
    let bg = estimate_background(chw, height, width);
    let palette: Vec<[f32; 3]> = Colour::ALL.iter().map(|c| c.rgb_f32()).collect();
    const NONE: u8 = u8::MAX;
    let mut labels = vec![NONE; plane];
    let mut ambiguous = 0usize;
    for (i, label) in labels.iter_mut().enumerate() {
        let p = [chw[i], chw[plane + i], chw[2 * plane + i]];
        let dbg = dist(p, bg);
        let (mut best, mut bd) = (0usize, f32::INFINITY);
        for (k, c) in palette.iter().enumerate() {
            let d = dist(p, *c);
            if d < bd {
                best = k;
                bd = d;
            }
        }
        if bd < COLOUR_THRESHOLD && bd < dbg {
            *label = best as u8;
        } else if dbg >= COLOUR_THRESHOLD {
            ambiguous += 1;
        }
    }
    let min = min_area(width, height);
    let mut seen = vec![false; plane];
    let mut stamp = vec![usize::MAX; plane];
    let mut detections = Vec::new();
    let mut stack = Vec::new();
    for start in 0..plane {
        if seen[start] || labels[start] == NONE {
            continue;
        }
        let k = labels[start];
        seen[start] = true;
        stack.push(start);
        let mut pixels = Vec::new();
        while let Some(i) = stack.pop() {
            pixels.push(i);
            let (x, y) = (i % width, i / width);
            let mut visit = |j: usize| {
                if !seen[j] && labels[j] == k {
                    seen[j] = true;
                    stack.push(j);
                }
            };
            if x > 0 {
                visit(i - 1);
            }
            if x + 1 < width {
                visit(i + 1);
            }
            if y > 0 {
                visit(i - width);
            }
            if y + 1 < height {
                visit(i + width);
            }
        }
        if pixels.len() < min {
            ambiguous += pixels.len();
            continue;
        }
        let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0, 0);
        let (mut sx, mut sy) = (0f64, 0f64);
        let mut rgb = [0f64; 3];
        for &i in &pixels {
            let (x, y) = (i % width, i / width);
            x0 = x0.min(x);
            y0 = y0.min(y);
            x1 = x1.max(x);
            y1 = y1.max(y);
            sx += x as f64 + 0.5;
            sy += y as f64 + 0.5;
            for (c, v) in rgb.iter_mut().enumerate() {
                *v += chw[c * plane + i] as f64;
            }
        }
        let n = pixels.len() as f64;
        let cy = (sy / n) as f32;
        // Coverage over the region and its 8-neighbours that belong to no other colour.
        let col = palette[k as usize];
        let dir = [col[0] - bg[0], col[1] - bg[1], col[2] - bg[2]];
        let norm2 = (dir[0] * dir[0] + dir[1] * dir[1] + dir[2] * dir[2]).max(1e-6);
        let id = start;
        let (mut colsum, mut rowsum) = (vec![0f64; width], vec![0f64; height]);
        let mut cover: Vec<(usize, usize, f64)> = Vec::new();
        for &i in &pixels {
            let (x, y) = ((i % width) as isize, (i / width) as isize);
            for (ox, oy) in [
                (-1, -1),
                (0, -1),
                (1, -1),
                (-1, 0),
                (0, 0),
                (1, 0),
                (-1, 1),
                (0, 1),
                (1, 1),
            ] {
                let (nx, ny) = (x + ox, y + oy);
                if nx < 0 || ny < 0 || nx >= width as isize || ny >= height as isize {
                    continue;
                }
                let j = ny as usize * width + nx as usize;
                if stamp[j] == id || (labels[j] != NONE && labels[j] != k) {
                    continue;
                }
                stamp[j] = id;
                let a = ((chw[j] - bg[0]) * dir[0]
                    + (chw[plane + j] - bg[1]) * dir[1]
                    + (chw[2 * plane + j] - bg[2]) * dir[2])
                    / norm2;
                let a = a.clamp(0.0, 1.0) as f64;
                if a > 0.0 {
                    colsum[nx as usize] += a;
                    rowsum[ny as usize] += a;
                    cover.push((nx as usize, ny as usize, a));
                }
            }
        }
        let soft_area: f64 = cover.iter().map(|c| c.2).sum();
        let maxc = colsum.iter().cloned().fold(0.0, f64::max);
        let maxr = rowsum.iter().cloned().fold(0.0, f64::max);
        let fill = (soft_area / (maxc * maxr).max(1e-9)) as f32;
        let my = cover.iter().map(|c| c.1 as f64 * c.2).sum::<f64>() / soft_area.max(1e-9);
        let (mut m2, mut m3) = (0f64, 0f64);
        for &(_, y, a) in &cover {
            let d = y as f64 - my;
            m2 += a * d * d;
            m3 += a * d * d * d;
        }
        let (m2, m3) = (m2 / soft_area.max(1e-9), m3 / soft_area.max(1e-9));
        let skew = (m3 / m2.max(1e-9).powf(1.5)) as f32;
        detections.push(Detection {
            colour: Colour::ALL[k as usize],
            area: pixels.len(),
            bbox: (x0, y0, x1, y1),
            centroid: ((sx / n) as f32 / width as f32, cy / height as f32),
            fill,
            skew,
            mean_rgb: rgb.map(|v| (v / n) as f32),
            shape_probs: shape_probs(fill, skew),
        });
    }
    Analysis {
        width,
        height,
        background: bg,
        detections,
        ambiguous: ambiguous as f32 / plane as f32,
    }
}

/// The terms of the reward for one image (all in [0, 1]).
#[derive(Clone, Debug, PartialEq)]
pub struct Breakdown {
    pub colour: f32,
    pub shape: f32,
    pub count: f32,
    /// `None` when the prompt states no relation.
    pub relation: Option<f32>,
    pub fidelity: f32,
    pub size: f32,
    pub centring: f32,
    pub contrast: f32,
    pub aesthetic: f32,
    pub reward: f32,
}

impl Breakdown {
    /// The names of [`Breakdown::terms`], in its order.
    pub const TERM_NAMES: [&'static str; 10] = [
        "colour",
        "shape",
        "count",
        "relation",
        "fidelity",
        "size",
        "centring",
        "contrast",
        "aesthetic",
        "reward",
    ];

    /// Every term with its name (see [`Breakdown::TERM_NAMES`]); `relation` is `None` when the prompt states none.
    pub fn terms(&self) -> [(&'static str, Option<f32>); 10] {
        let v = [
            Some(self.colour),
            Some(self.shape),
            Some(self.count),
            self.relation,
            Some(self.fidelity),
            Some(self.size),
            Some(self.centring),
            Some(self.contrast),
            Some(self.aesthetic),
            Some(self.reward),
        ];
        std::array::from_fn(|i| (Self::TERM_NAMES[i], v[i]))
    }
}

fn ramp(x: f32, lo: f32, hi: f32) -> f32 {
    ((x - lo) / (hi - lo)).clamp(0.0, 1.0)
}

/// Scores an [`Analysis`] against what a caption asks for (see [`ShapesReward`] for the formula).
pub fn score_analysis(a: &Analysis, spec: &SceneSpec) -> Breakdown {
    let dets = &a.detections;
    let n_req = spec.total().max(1) as f32;
    // Greedy matching, item by item: the unassigned regions of the item's colour, most likely of its shape first.
    let mut used = vec![false; dets.len()];
    let mut matched: Vec<Vec<usize>> = Vec::new();
    let (mut colour, mut shape) = (0f32, 0f32);
    for o in &spec.objects {
        let mut cands: Vec<usize> = (0..dets.len())
            .filter(|&i| !used[i] && dets[i].colour == o.colour)
            .collect();
        cands.sort_by(|&i, &j| {
            (dets[j].shape_prob(o.shape), dets[j].area)
                .partial_cmp(&(dets[i].shape_prob(o.shape), dets[i].area))
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        cands.truncate(o.count);
        for &i in &cands {
            used[i] = true;
            shape += dets[i].shape_prob(o.shape);
        }
        colour += cands.len() as f32;
        matched.push(cands);
    }
    colour /= n_req;
    shape /= n_req;
    let mut miscount = 0usize;
    for c in Colour::ALL {
        let req: usize = spec
            .objects
            .iter()
            .filter(|o| o.colour == c)
            .map(|o| o.count)
            .sum();
        let det = dets.iter().filter(|d| d.colour == c).count();
        miscount += req.abs_diff(det);
    }
    let count = (1.0 - miscount as f32 / n_req).max(0.0);
    let relation = spec.relation.map(|rel| {
        match (
            matched.first().and_then(|m| m.first()),
            matched.get(1).and_then(|m| m.first()),
        ) {
            (Some(&i), Some(&j)) => {
                (rel.margin(dets[i].centroid, dets[j].centroid) / RELATION_MARGIN).clamp(0.0, 1.0)
            }
            _ => 0.0,
        }
    });
    let fidelity = match relation {
        Some(r) => 0.3 * colour + 0.25 * shape + 0.2 * count + 0.25 * r,
        None => 0.4 * colour + 0.3 * shape + 0.3 * count,
    };
    let plane = (a.width * a.height) as f32;
    let (size, centring, colour_contrast) = if dets.is_empty() {
        (0.0, 0.0, 0.0)
    } else {
        let n = dets.len() as f32;
        let size = dets
            .iter()
            .map(|d| {
                let f = d.area as f32 / plane;
                ramp(f, 0.005, 0.02).min(1.0 - ramp(f, 0.2, 0.4))
            })
            .sum::<f32>()
            / n;
        let total: f32 = dets.iter().map(|d| d.area as f32).sum();
        let cx = dets
            .iter()
            .map(|d| d.centroid.0 * d.area as f32)
            .sum::<f32>()
            / total;
        let cy = dets
            .iter()
            .map(|d| d.centroid.1 * d.area as f32)
            .sum::<f32>()
            / total;
        let off = ((cx - 0.5).powi(2) + (cy - 0.5).powi(2)).sqrt();
        let contrast = dets
            .iter()
            .map(|d| (dist(d.mean_rgb, a.background) / 0.3).min(1.0))
            .sum::<f32>()
            / n;
        (size, (1.0 - off / 0.4).clamp(0.0, 1.0), contrast)
    };
    let clean = (1.0 - a.ambiguous / 0.2).clamp(0.0, 1.0);
    let contrast = 0.5 * colour_contrast + 0.5 * clean;
    let aesthetic = (size + centring + contrast) / 3.0;
    Breakdown {
        colour,
        shape,
        count,
        relation,
        fidelity,
        size,
        centring,
        contrast,
        aesthetic,
        reward: 0.8 * fidelity + 0.2 * aesthetic,
    }
}

fn parse_prompt(prompt: &str) -> Result<SceneSpec> {
    parse_caption(prompt).ok_or_else(|| {
        Error::msg(format!(
            "shapes reward: the prompt {prompt:?} is not a shapes caption (e.g. \"a red circle\", \"two blue \
             squares\", \"a red circle above a blue square\"; colours: {}; shapes: circle, square, triangle)",
            Colour::ALL.map(|c| c.name()).join(", ")
        ))
    })
}

/// The shapes world's ground-truth reward, computed from pixels: no weights.
///
/// For an image and its caption (parsed with [`parse_caption`]), the image is segmented with [`analyse`] and
///
/// ```text
/// reward    = 0.8 · fidelity + 0.2 · aesthetic                       in [0, 1]
/// fidelity  = 0.4 · colour + 0.3 · shape + 0.3 · count                (no relation in the caption)
///           = 0.3 · colour + 0.25 · shape + 0.2 · count + 0.25 · relation
/// colour    = (objects asked for that are matched by a region of their colour) / (objects asked for)
/// shape     = Σ over matched regions of P(asked shape | fill ratio, skewness) / (objects asked for)
/// count     = max(0, 1 − Σ_colours |regions − asked| / objects asked for)
/// relation  = clamp(margin / 0.1, 0, 1), margin = how far the first object's centroid lies in the stated
///             direction from the second's (fraction of the side); 0 when either is missing
/// aesthetic = (size + centring + contrast) / 3
/// size      = mean over regions of a trapezoid on the area fraction: 0 at 0.5%, 1 from 2% to 20%, 0 at 40%
/// centring  = clamp(1 − |area-weighted centroid of all regions − image centre| / 0.4, 0, 1)
/// contrast  = 0.5 · mean over regions of min(1, |mean colour − background| / 0.3)
///           + 0.5 · clamp(1 − ambiguous pixel fraction / 0.2, 0, 1)
/// ```
///
/// Matching is greedy in caption order (each item takes the unassigned regions of its colour, most likely of
/// its shape first). A blank image scores about 0.03; a clean render of the caption above 0.9.
///
/// [`Reward::score`] returns these exact values; their gradient with respect to the images is that of the
/// differentiable surrogate [`ShapesReward::score_differentiable`] (a straight-through estimator), so the
/// reward also works where pixel gradients are needed. The exact scorer remains the judge.
#[derive(Clone, Debug, Default)]
pub struct ShapesReward {
    /// Softmax temperature of the surrogate's soft colour masks (squared RGB distance units; default 0.01).
    pub temperature: f64,
}

impl ShapesReward {
    pub fn new() -> Self {
        ShapesReward { temperature: 0.01 }
    }

    /// The full breakdown of the exact reward for each image of `[B, 3, H, W]` (values in [0, 1]).
    pub fn breakdown(&self, images: &Tensor, prompts: &[&str]) -> Result<Vec<Breakdown>> {
        let (b, c, h, w) = images.dims4()?;
        if c != 3 {
            return Err(Error::msg(format!(
                "shapes reward: expected [B, 3, H, W] images, got {:?}",
                images.dims()
            )));
        }
        if prompts.len() != b {
            return Err(Error::msg(format!(
                "{b} images but {} prompts",
                prompts.len()
            )));
        }
        let data: Vec<f32> = images
            .detach()
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        let plane = 3 * h * w;
        (0..b)
            .map(|i| {
                let spec = parse_prompt(prompts[i])?;
                let a = analyse(&data[i * plane..(i + 1) * plane], h, w);
                Ok(score_analysis(&a, &spec))
            })
            .collect()
    }

    /// The exact reward, `[B]` f32 on the images' device, with no gradient.
    pub fn score_exact(&self, images: &Tensor, prompts: &[&str]) -> Result<Tensor> {
        let v: Vec<f32> = self
            .breakdown(images, prompts)?
            .iter()
            .map(|b| b.reward)
            .collect();
        Ok(Tensor::new(v, images.device())?)
    }

    /// A cheap differentiable surrogate of the reward, `[B]` in the images' dtype (f32 for half types):
    ///
    /// * soft colour masks `m_k = softmax_k(−|x − c_k|² / T)` over the palette and the (estimated, constant)
    ///   background;
    /// * colour: per item `1 − exp(−mass_c / (0.01 · asked_c))` (mass = mask mean over the image);
    /// * count: `exp(−mass of colours not asked for / 0.01)`;
    /// * shape (items whose colour is unique in the caption and count 1): a Gaussian classifier on the mask's
    ///   moments, `mass / sqrt(var_x var_y)` (circle 4π, square 12, triangle 10.39) and the vertical skewness
    ///   (triangle −0.566, others 0);
    /// * relation (different colours): `sigmoid(margin of the soft centroids / 0.05)`;
    /// * aesthetic: size (a smooth bump on the mean object mass), centring (Gaussian on the soft centroid of
    ///   all object mass), contrast (`tanh` of the mass-weighted distance to the background / 0.3);
    ///
    /// combined with the weights of the exact reward (terms that do not apply are left out and the rest
    /// renormalised). It tracks the exact reward coarsely; use it for gradients, not for judging.
    pub fn score_differentiable(&self, images: &Tensor, prompts: &[&str]) -> Result<Tensor> {
        let (b, c, h, w) = images.dims4()?;
        if c != 3 {
            return Err(Error::msg(format!(
                "shapes reward: expected [B, 3, H, W] images, got {:?}",
                images.dims()
            )));
        }
        if prompts.len() != b {
            return Err(Error::msg(format!(
                "{b} images but {} prompts",
                prompts.len()
            )));
        }
        let x = match images.dtype() {
            DType::F64 => images.clone(),
            _ => images.to_dtype(DType::F32)?,
        };
        let temp = if self.temperature > 0.0 {
            self.temperature
        } else {
            0.01
        };
        let mut out = Vec::with_capacity(b);
        for (i, prompt) in prompts.iter().enumerate() {
            let spec = parse_prompt(prompt)?;
            out.push(surrogate_one(&x.get(i)?, &spec, temp, h, w)?);
        }
        Ok(Tensor::stack(&out, 0)?)
    }
}

fn scalar(v: f64, like: &Tensor) -> Result<Tensor> {
    Ok(Tensor::new(v, like.device())?.to_dtype(like.dtype())?)
}

fn sigmoid(t: &Tensor) -> Result<Tensor> {
    Ok((t.neg()?.exp()? + 1.0)?.recip()?)
}

/// The surrogate for one `[3, H, W]` image.
fn surrogate_one(x: &Tensor, spec: &SceneSpec, temp: f64, h: usize, w: usize) -> Result<Tensor> {
    let dev = x.device();
    let dt = x.dtype();
    let data: Vec<f32> = x
        .detach()
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    let bg = estimate_background(&data, h, w);
    // Palette colours then the background: [K + 1, 3, 1, 1].
    let mut refs: Vec<f32> = Colour::ALL.iter().flat_map(|c| c.rgb_f32()).collect();
    refs.extend_from_slice(&bg);
    let k1 = Colour::ALL.len() + 1;
    let refs = Tensor::from_vec(refs, (k1, 3, 1, 1), dev)?.to_dtype(dt)?;
    let d2 = x.unsqueeze(0)?.broadcast_sub(&refs)?.sqr()?.sum(1)?; // [K+1, H, W]
    let logits = (d2 * (-1.0 / temp))?;
    let logits = logits.broadcast_sub(&logits.max_keepdim(0)?.detach())?;
    let e = logits.exp()?;
    let m = e.broadcast_div(&e.sum_keepdim(0)?)?; // [K+1, H, W]
    let plane = (h * w) as f64;
    let xs: Vec<f32> = (0..h * w)
        .map(|i| ((i % w) as f32 + 0.5) / w as f32)
        .collect();
    let ys: Vec<f32> = (0..h * w)
        .map(|i| ((i / w) as f32 + 0.5) / h as f32)
        .collect();
    let gx = Tensor::from_vec(xs, (h, w), dev)?.to_dtype(dt)?;
    let gy = Tensor::from_vec(ys, (h, w), dev)?.to_dtype(dt)?;
    let eps = 1e-6;
    let mask = |c: Colour| -> Result<Tensor> { Ok(m.get(c.index())?) };
    let mass = |mc: &Tensor| -> Result<Tensor> { Ok((mc.sum_all()? / plane)?) };
    let centroid = |mc: &Tensor| -> Result<(Tensor, Tensor, Tensor)> {
        let s = (mc.sum_all()? + eps)?;
        let cx = (mc * &gx)?.sum_all()?.div(&s)?;
        let cy = (mc * &gy)?.sum_all()?.div(&s)?;
        Ok((cx, cy, s))
    };
    let asked = |c: Colour| -> usize {
        spec.objects
            .iter()
            .filter(|o| o.colour == c)
            .map(|o| o.count)
            .sum()
    };
    // colour presence
    let mut colour_terms = Vec::new();
    for o in &spec.objects {
        let mc = mass(&mask(o.colour)?)?;
        let t = ((mc * (-1.0 / (0.01 * asked(o.colour) as f64)))?
            .exp()?
            .neg()?
            + 1.0)?;
        colour_terms.push(t);
    }
    let colour = (Tensor::stack(&colour_terms, 0)?.mean_all())?;
    // count: mass of colours not asked for
    let mut extra = scalar(0.0, x)?;
    for c in Colour::ALL {
        if asked(c) == 0 {
            extra = (extra + mass(&mask(c)?)?)?;
        }
    }
    let count = (extra * (-1.0 / 0.01))?.exp()?;
    // shape
    let targets = [
        (Shape::Circle, 4.0 * std::f64::consts::PI, 0.0),
        (Shape::Square, 12.0, 0.0),
        (Shape::Triangle, 10.392, -0.566),
    ];
    let mut shape_terms = Vec::new();
    for o in &spec.objects {
        if o.count != 1 || asked(o.colour) != 1 {
            continue;
        }
        let mc = mask(o.colour)?;
        let (cx, cy, s) = centroid(&mc)?;
        let dx = gx.broadcast_sub(&cx)?;
        let dy = gy.broadcast_sub(&cy)?;
        let vx = ((&mc * dx.sqr()?)?.sum_all()?.div(&s)? + eps)?;
        let vy = ((&mc * dy.sqr()?)?.sum_all()?.div(&s)? + eps)?;
        let m3 = (&mc * dy.powf(3.0)?)?.sum_all()?.div(&s)?;
        let skew = m3.div(&(vy.sqrt()? * &vy)?)?;
        let ratio = (s / plane)?.div(&(&vx * &vy)?.sqrt()?)?;
        let mut logits = Vec::new();
        for (_, q, k) in targets {
            let a = ((&ratio - q)? / 0.6)?.sqr()?;
            let bb = ((&skew - k)? / 0.2)?.sqr()?;
            logits.push(((a + bb)? * -0.5)?);
        }
        let l = Tensor::stack(&logits, 0)?;
        let l = l.broadcast_sub(&l.max_keepdim(0)?.detach())?.exp()?;
        let p = l.broadcast_div(&l.sum_keepdim(0)?)?;
        let idx = targets.iter().position(|t| t.0 == o.shape).unwrap();
        shape_terms.push(p.get(idx)?);
    }
    let shape = if shape_terms.is_empty() {
        None
    } else {
        Some(Tensor::stack(&shape_terms, 0)?.mean_all()?)
    };
    // relation
    let relation = match spec.relation {
        Some(rel)
            if spec.objects.len() == 2 && spec.objects[0].colour != spec.objects[1].colour =>
        {
            let (ax, ay, _) = centroid(&mask(spec.objects[0].colour)?)?;
            let (bx, by, _) = centroid(&mask(spec.objects[1].colour)?)?;
            let margin = match rel {
                Relation::LeftOf => (bx - ax)?,
                Relation::RightOf => (ax - bx)?,
                Relation::Above => (by - ay)?,
                Relation::Below => (ay - by)?,
            };
            Some(sigmoid(&(margin / 0.05)?)?)
        }
        _ => None,
    };
    let (wc, ws, wn, wr) = if spec.relation.is_some() {
        (0.3, 0.25, 0.2, 0.25)
    } else {
        (0.4, 0.3, 0.3, 0.0)
    };
    let mut fid = ((colour * wc)? + (count * wn)?)?;
    let mut wsum = wc + wn;
    if let Some(s) = shape {
        fid = (fid + (s * ws)?)?;
        wsum += ws;
    }
    if let Some(r) = relation {
        fid = (fid + (r * wr)?)?;
        wsum += wr;
    }
    let fidelity = (fid / wsum)?;
    // aesthetic
    let objects = m.narrow(0, 0, Colour::ALL.len())?.sum(0)?; // [H, W]
    let total = mass(&objects)?;
    let per_object = (&total / spec.total().max(1) as f64)?;
    let size = (sigmoid(&((&per_object - 0.01)? / 0.004)?)?
        * sigmoid(&(per_object.affine(-1.0, 0.3)? / 0.04)?)?)?;
    let (cx, cy, s) = centroid(&objects)?;
    let off2 = ((cx - 0.5)?.sqr()? + (cy - 0.5)?.sqr()?)?;
    let centring = (off2 * (-1.0 / (2.0 * 0.25 * 0.25)))?.exp()?;
    let bgt = Tensor::from_vec(bg.to_vec(), (3, 1, 1), dev)?.to_dtype(dt)?;
    let dist_bg = (x.broadcast_sub(&bgt)?.sqr()?.sum(0)? + 1e-8)?.sqrt()?;
    let contrast = ((objects * dist_bg)?.sum_all()?.div(&s)? / 0.3)?.tanh()?;
    let aesthetic = ((size + centring)? + contrast)?.affine(1.0 / 3.0, 0.0)?;
    Ok(((fidelity * 0.8)? + (aesthetic * 0.2)?)?)
}

impl Reward for ShapesReward {
    fn name(&self) -> &str {
        "shapes"
    }

    /// The exact reward, carrying the surrogate's gradient (straight-through) when the images are tracked.
    fn score(&self, images: &Tensor, prompts: &[&str]) -> Result<Tensor> {
        let exact = self.score_exact(images, prompts)?;
        if !images.track_op() {
            return Ok(match images.dtype() {
                DType::F64 => exact.to_dtype(DType::F64)?,
                _ => exact,
            });
        }
        let s = self.score_differentiable(images, prompts)?;
        let exact = exact.to_dtype(s.dtype())?;
        Ok((exact + (&s - s.detach())?)?)
    }
}

#[cfg(test)]
mod reward_tests {
    use super::*;

    /// A minimal supersampled renderer (the real one is `diffpref::data::shapes`).
    fn render(objs: &[(Shape, Colour, f32, (f32, f32))], size: usize) -> Vec<f32> {
        let plane = size * size;
        let mut out = vec![0f32; 3 * plane];
        let bg = BACKGROUND.map(|v| v as f32 / 255.0);
        for py in 0..size {
            for px in 0..size {
                let mut acc = [0f32; 3];
                for sy in 0..4 {
                    for sx in 0..4 {
                        let u = (px as f32 + (sx as f32 + 0.5) / 4.0) / size as f32;
                        let v = (py as f32 + (sy as f32 + 0.5) / 4.0) / size as f32;
                        let mut c = bg;
                        for (s, col, r, (cx, cy)) in objs {
                            if s.contains(u - cx, v - cy, *r) {
                                c = col.rgb_f32();
                            }
                        }
                        for k in 0..3 {
                            acc[k] += c[k] / 16.0;
                        }
                    }
                }
                for k in 0..3 {
                    out[k * plane + py * size + px] = acc[k];
                }
            }
        }
        out
    }

    fn tensor(v: Vec<f32>, size: usize, dtype: DType) -> Tensor {
        Tensor::from_vec(v, (1, 3, size, size), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    fn score(img: &Tensor, prompt: &str) -> f32 {
        ShapesReward::new()
            .score_exact(img, &[prompt])
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[0]
    }

    fn pair_scene() -> Vec<(Shape, Colour, f32, (f32, f32))> {
        vec![
            (Shape::Circle, Colour::Red, 0.15, (0.5, 0.28)),
            (Shape::Square, Colour::Blue, 0.15, (0.5, 0.72)),
        ]
    }

    #[test]
    fn own_caption_scores_high_and_mistakes_lower() {
        for size in [32, 64] {
            let img = tensor(render(&pair_scene(), size), size, DType::F32);
            let good = score(&img, "a red circle above a blue square");
            assert!(good > 0.9, "{size}: {good}");
            for wrong in [
                "a green circle above a blue square",
                "a red triangle above a blue square",
                "a red circle below a blue square",
                "a red circle",
                "two red circles and a blue square",
            ] {
                let s = score(&img, wrong);
                assert!(
                    s < good - 0.05 && s < 0.9,
                    "{size}: {wrong:?} scores {s} vs {good}"
                );
            }
            let single = tensor(
                render(&[(Shape::Triangle, Colour::Yellow, 0.19, (0.5, 0.5))], size),
                size,
                DType::F32,
            );
            let good = score(&single, "a yellow triangle");
            assert!(good > 0.9, "{size}: {good}");
            for wrong in [
                "a yellow circle",
                "a yellow square",
                "a purple triangle",
                "two yellow triangles",
            ] {
                assert!(score(&single, wrong) < good - 0.1, "{wrong}");
            }
            let blank = tensor(render(&[], size), size, DType::F32);
            let b = score(&blank, "a yellow triangle");
            assert!(b < 0.1, "blank: {b}");
        }
    }

    #[test]
    fn segmentation_finds_colours_shapes_and_centroids() {
        let v = render(&pair_scene(), 64);
        let a = analyse(&v, 64, 64);
        assert_eq!(a.detections.len(), 2, "{a:?}");
        let red = a
            .detections
            .iter()
            .find(|d| d.colour == Colour::Red)
            .unwrap();
        assert_eq!(red.shape(), Shape::Circle);
        assert!((red.centroid.0 - 0.5).abs() < 0.02 && (red.centroid.1 - 0.28).abs() < 0.02);
        let blue = a
            .detections
            .iter()
            .find(|d| d.colour == Colour::Blue)
            .unwrap();
        assert_eq!(blue.shape(), Shape::Square);
        for (i, c) in [0.5f32, 0.5, 0.5].iter().enumerate() {
            assert!((a.background[i] - c).abs() < 0.01);
        }
    }

    #[test]
    fn unparseable_prompt_is_an_error() {
        let img = tensor(render(&pair_scene(), 32), 32, DType::F32);
        let e = ShapesReward::new()
            .score(&img, &["a dog"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a shapes caption"), "{e}");
    }

    #[test]
    fn surrogate_has_gradients_matching_finite_differences() {
        let size = 24;
        let v = render(&pair_scene(), size);
        let x = tensor(v.clone(), size, DType::F64);
        let r = ShapesReward::new();
        let prompt = ["a red circle above a blue square"];
        let g = crate::input_gradient(&x, |t| r.score_differentiable(t, &prompt)).unwrap();
        let gv: Vec<f64> = g.flatten_all().unwrap().to_vec1().unwrap();
        assert!(gv.iter().all(|v| v.is_finite()));
        let norm: f64 = gv.iter().map(|v| v * v).sum::<f64>().sqrt();
        assert!(norm > 1e-3, "gradient norm {norm}");
        // The largest few gradient entries agree with central differences.
        let mut idx: Vec<usize> = (0..gv.len()).collect();
        idx.sort_by(|&a, &b| gv[b].abs().partial_cmp(&gv[a].abs()).unwrap());
        let f = |vals: &[f64]| -> f64 {
            let t = Tensor::from_vec(vals.to_vec(), (1, 3, size, size), &Device::Cpu).unwrap();
            r.score_differentiable(&t, &prompt)
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()[0]
        };
        let base: Vec<f64> = v.iter().map(|&a| a as f64).collect();
        for &i in idx.iter().take(5) {
            let hstep = 1e-5;
            let mut p = base.clone();
            p[i] += hstep;
            let mut m = base.clone();
            m[i] -= hstep;
            let fd = (f(&p) - f(&m)) / (2.0 * hstep);
            assert!(
                (fd - gv[i]).abs() <= 1e-4 + 1e-3 * gv[i].abs(),
                "pixel {i}: autograd {} vs finite difference {fd}",
                gv[i]
            );
        }
        // Through the Reward trait: exact values, surrogate gradients.
        let (s, g2) = r.score_and_grad(&x, &prompt, 4).unwrap();
        let exact = r
            .score_exact(&x, &prompt)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[0];
        assert!((s.to_vec1::<f64>().unwrap()[0] - exact as f64).abs() < 1e-6);
        let g2: Vec<f32> = g2
            .flatten_all()
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(g2.iter().any(|v| *v != 0.0));
    }

    #[test]
    fn surrogate_prefers_the_right_caption() {
        let size = 32;
        let x = tensor(render(&pair_scene(), size), size, DType::F32);
        let r = ShapesReward::new();
        let s = |p: &str| {
            r.score_differentiable(&x, &[p])
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()[0]
        };
        let good = s("a red circle above a blue square");
        assert!(good > s("a green circle above a blue square"));
        assert!(good > s("a red circle below a blue square"));
        assert!(good > s("a red triangle above a blue square"));
        let blank = tensor(render(&[], size), size, DType::F32);
        let b = r
            .score_differentiable(&blank, &["a red circle"])
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[0];
        assert!(b < good);
    }
}
