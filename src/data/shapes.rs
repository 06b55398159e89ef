//! The "shapes world": procedurally rendered scenes of one to three simple shapes in named colours on a plain
//! background, each with a caption naming them (`"a red circle above a blue square"`). Deterministic from a
//! seed; used to pretrain the embedded tiny model and to label synthetic preference pairs with the
//! ground-truth reward ([`diffpref_rewards::shapes::ShapesReward`]).
//!
//! The vocabulary and the caption grammar (colours, shapes, sizes, relations, [`SceneSpec`], [`parse_caption`])
//! live in `diffpref_rewards::shapes` and are re-exported here; this module adds the concrete [`Scene`] (where
//! each object is) and the anti-aliased renderer.
//!
//! Coordinates are fractions of the image side (x to the right, y downwards), so one scene renders at any
//! resolution; an object of size `s` has half-size `s.radius()` × side pixels.

use crate::train::rng::Rng;
use image::{Rgb, RgbImage};

pub use diffpref_rewards::shapes::{
    parse_caption, Colour, ObjectSpec, Relation, SceneSpec, Shape, Size, BACKGROUND,
};

/// Supersampling factor per axis of [`Scene::render`] (16 samples per pixel).
pub const SUPERSAMPLE: u32 = 4;

/// Gap kept between objects and between an object and the image border (fraction of the side).
const GAP: f32 = 0.04;

/// One object of a scene.
#[derive(Clone, Debug, PartialEq)]
pub struct Object {
    pub shape: Shape,
    pub colour: Colour,
    pub size: Size,
    /// Centre of the object's bounding box, as fractions of the image side.
    pub centre: (f32, f32),
}

impl Object {
    /// Half-size in pixels at `image_size` (radius of a circle, half-side of a square).
    pub fn radius_px(&self, image_size: u32) -> f32 {
        self.size.radius() * image_size as f32
    }

    /// The object's centroid (fractions of the side): the bounding box centre, lowered for triangles.
    pub fn centroid(&self) -> (f32, f32) {
        let r = self.size.radius();
        (
            self.centre.0,
            self.centre.1 + 2.0 * r * self.shape.centroid_offset(),
        )
    }
}

/// A scene: objects painted in order (later ones on top) over a plain background, plus the relation its caption
/// states (two-object scenes of different objects).
#[derive(Clone, Debug, PartialEq)]
pub struct Scene {
    pub background: [u8; 3],
    pub objects: Vec<Object>,
    /// `objects[0]` *relation* `objects[1]` (only for two objects that differ in colour or shape).
    pub relation: Option<Relation>,
}

fn pick<T: Copy>(rng: &mut Rng, items: &[T]) -> T {
    items[rng.below(items.len() as u64) as usize]
}

fn uniform(rng: &mut Rng, lo: f32, hi: f32) -> f32 {
    lo + (hi - lo) * rng.uniform() as f32
}

/// Whether two objects' circumscribed circles (plus [`GAP`]) are apart, so they neither overlap nor touch.
fn apart(a: &Object, b: &Object) -> bool {
    let (dx, dy) = (a.centre.0 - b.centre.0, a.centre.1 - b.centre.1);
    let need = std::f32::consts::SQRT_2 * (a.size.radius() + b.size.radius()) + GAP;
    dx * dx + dy * dy >= need * need
}

impl Scene {
    /// A random scene of 1 to `max_objects` (at most 3) objects: one object; two identical objects
    /// ("two blue squares", a quarter of two-object scenes) or two different ones in a spatial relation;
    /// or three objects listed in the caption.
    pub fn random(rng: &mut Rng, max_objects: usize) -> Scene {
        Scene::from_spec(&random_spec(rng, max_objects), rng)
    }

    /// A scene that satisfies `spec` (sizes not given are drawn at random; positions are drawn so that the
    /// relation holds clearly and objects do not touch).
    pub fn from_spec(spec: &SceneSpec, rng: &mut Rng) -> Scene {
        let mut objects: Vec<Object> = Vec::new();
        for o in &spec.objects {
            for _ in 0..o.count {
                objects.push(Object {
                    shape: o.shape,
                    colour: o.colour,
                    size: o.size.unwrap_or_else(|| pick(rng, &Size::ALL)),
                    centre: (0.5, 0.5),
                });
            }
        }
        let relation = spec.relation.filter(|_| objects.len() == 2);
        if let Some(rel) = relation {
            place_pair(&mut objects, rel, rng);
        } else {
            place_free(&mut objects, rng, spec);
        }
        Scene {
            background: BACKGROUND,
            objects,
            relation,
        }
    }

    /// What the caption says: items grouped by (colour, shape) in order of first appearance.
    pub fn spec(&self) -> SceneSpec {
        let mut items: Vec<ObjectSpec> = Vec::new();
        for o in &self.objects {
            match items
                .iter_mut()
                .find(|i| i.colour == o.colour && i.shape == o.shape)
            {
                Some(i) => i.count += 1,
                None => items.push(ObjectSpec {
                    count: 1,
                    colour: o.colour,
                    shape: o.shape,
                    size: None,
                }),
            }
        }
        let relation = if items.len() == 2 && self.objects.len() == 2 {
            self.relation
        } else {
            None
        };
        SceneSpec {
            objects: items,
            relation,
        }
    }

    /// The caption: `"a red circle"`, `"two blue squares"`, `"a red circle above a blue square"`.
    pub fn caption(&self) -> String {
        self.spec().caption()
    }

    /// Renders the scene at `size` x `size` pixels, anti-aliased by [`SUPERSAMPLE`]² samples per pixel.
    pub fn render(&self, size: u32) -> RgbImage {
        let ss = SUPERSAMPLE;
        let n = (ss * ss) as f32;
        let side = size as f32;
        let bg = self.background.map(f32::from);
        let cols: Vec<[f32; 3]> = self
            .objects
            .iter()
            .map(|o| o.colour.rgb().map(f32::from))
            .collect();
        RgbImage::from_fn(size, size, |px, py| {
            let mut acc = [0f32; 3];
            for sy in 0..ss {
                for sx in 0..ss {
                    let u = (px as f32 + (sx as f32 + 0.5) / ss as f32) / side;
                    let v = (py as f32 + (sy as f32 + 0.5) / ss as f32) / side;
                    let mut c = bg;
                    for (o, col) in self.objects.iter().zip(&cols) {
                        if o.shape
                            .contains(u - o.centre.0, v - o.centre.1, o.size.radius())
                        {
                            c = *col;
                        }
                    }
                    for k in 0..3 {
                        acc[k] += c[k];
                    }
                }
            }
            Rgb(acc.map(|a| (a / n).round().clamp(0.0, 255.0) as u8))
        })
    }
}

/// A one-edit corruption of `spec` (what a sample gets wrong): one item's colour or shape replaced, its count
/// changed, an item dropped (of several), or the relation reversed. The result differs from `spec` (no edit
/// leaves an item equal to another one, so the caption stays well-formed).
pub fn corrupt(spec: &SceneSpec, rng: &mut Rng) -> SceneSpec {
    let n = spec.objects.len();
    loop {
        let mut out = spec.clone();
        let i = rng.below(n.max(1) as u64) as usize;
        match rng.below(5) {
            0 => out.objects[i].colour = pick(rng, &Colour::ALL),
            1 => out.objects[i].shape = pick(rng, &Shape::ALL),
            2 if out.relation.is_none() => {
                out.objects[i].count = 1 + rng.below(3) as usize;
            }
            3 if n > 1 => {
                out.objects.remove(i);
                out.relation = None;
            }
            4 => match out.relation {
                Some(r) => out.relation = Some(r.inverse()),
                None => continue,
            },
            _ => continue,
        }
        let distinct = out.objects.iter().enumerate().all(|(a, x)| {
            out.objects[a + 1..]
                .iter()
                .all(|y| (x.colour, x.shape) != (y.colour, y.shape))
        });
        if out != *spec && distinct {
            return out;
        }
    }
}

/// `count` distinct random captions (`data prompts`, and `bench align`'s fresh lists): drawn from the stream
/// `Rng::derive(seed, "prompts")`, each of 1 to `max_objects` objects, none of them in `taken` (which receives
/// them). An error when the caption space runs out.
pub fn fresh_captions(
    seed: u64,
    count: usize,
    max_objects: usize,
    taken: &mut std::collections::HashSet<String>,
) -> anyhow::Result<Vec<String>> {
    let mut rng = Rng::derive(seed, "prompts");
    let mut out = Vec::with_capacity(count);
    let mut misses = 0usize;
    while out.len() < count {
        let caption = random_spec(&mut rng, max_objects).caption();
        if taken.insert(caption.clone()) {
            out.push(caption);
            misses = 0;
        } else {
            misses += 1;
            if misses > 100_000 {
                anyhow::bail!(
                    "only {} distinct captions could be drawn (with at most {max_objects} objects and the \
                     excluded captions)",
                    out.len()
                );
            }
        }
    }
    Ok(out)
}

/// A random caption spec of 1 to `max_objects` (at most 3) objects (sizes unspecified).
pub fn random_spec(rng: &mut Rng, max_objects: usize) -> SceneSpec {
    let n = 1 + rng.below(max_objects.clamp(1, 3) as u64) as usize;
    let item = |rng: &mut Rng| ObjectSpec {
        count: 1,
        colour: pick(rng, &Colour::ALL),
        shape: pick(rng, &Shape::ALL),
        size: None,
    };
    match n {
        1 => SceneSpec {
            objects: vec![item(rng)],
            relation: None,
        },
        2 => {
            let a = item(rng);
            if rng.below(4) == 0 {
                return SceneSpec {
                    objects: vec![ObjectSpec { count: 2, ..a }],
                    relation: None,
                };
            }
            let mut b = item(rng);
            while b == a {
                b = item(rng);
            }
            SceneSpec {
                objects: vec![a, b],
                relation: Some(pick(rng, &Relation::ALL)),
            }
        }
        _ => {
            let mut items: Vec<ObjectSpec> = Vec::new();
            for _ in 0..3 {
                let it = item(rng);
                match items
                    .iter_mut()
                    .find(|i| i.colour == it.colour && i.shape == it.shape)
                {
                    Some(i) => i.count += 1,
                    None => items.push(it),
                }
            }
            SceneSpec {
                objects: items,
                relation: None,
            }
        }
    }
}

/// Places two objects so that `objects[0] rel objects[1]` holds along the relation's axis by a clear margin,
/// with a smaller offset across it, the pair roughly centred.
fn place_pair(objects: &mut [Object], rel: Relation, rng: &mut Rng) {
    let (ra, rb) = (objects[0].size.radius(), objects[1].size.radius());
    let min_d = ra + rb + GAP;
    // The pair must fit between the borders along the axis: ra + d + rb <= 1 - 2 GAP.
    let max_d = (1.0 - 2.0 * GAP - ra - rb).max(min_d);
    let d = uniform(rng, min_d, min_d + 0.5 * (max_d - min_d));
    let across = uniform(rng, -0.25, 0.25) * d;
    // Signed offset of b from a along the axis, and across it.
    let (dx, dy) = match rel {
        Relation::LeftOf => (d, across),
        Relation::RightOf => (-d, across),
        Relation::Above => (across, d),
        Relation::Below => (across, -d),
    };
    // Centre of the pair: jittered around the image centre, then clamped so both objects stay inside.
    let mut mid = (
        0.5 + uniform(rng, -0.08, 0.08),
        0.5 + uniform(rng, -0.08, 0.08),
    );
    for axis in 0..2 {
        let off = if axis == 0 { dx } else { dy };
        let (a_pos, b_pos) = (-off / 2.0, off / 2.0);
        let lo = (GAP + ra - a_pos).max(GAP + rb - b_pos);
        let hi = (1.0 - GAP - ra - a_pos).min(1.0 - GAP - rb - b_pos);
        let m = if axis == 0 { &mut mid.0 } else { &mut mid.1 };
        *m = if lo <= hi { m.clamp(lo, hi) } else { 0.5 };
    }
    objects[0].centre = (mid.0 - dx / 2.0, mid.1 - dy / 2.0);
    objects[1].centre = (mid.0 + dx / 2.0, mid.1 + dy / 2.0);
}

/// Places objects at random, not touching, inside the borders (one object near the centre). Falls back to
/// small sizes (where the spec leaves sizes open) when large ones do not fit.
fn place_free(objects: &mut [Object], rng: &mut Rng, spec: &SceneSpec) {
    let sized: Vec<bool> = spec
        .objects
        .iter()
        .flat_map(|o| std::iter::repeat_n(o.size.is_some(), o.count))
        .collect();
    let spread = if objects.len() == 1 { 0.15 } else { 0.5 };
    for attempt in 0..2000 {
        if attempt == 500 {
            for (o, &fixed) in objects.iter_mut().zip(&sized) {
                if !fixed {
                    o.size = Size::Small;
                }
            }
        }
        let mut ok = true;
        for i in 0..objects.len() {
            let r = objects[i].size.radius();
            let lo = (GAP + r).max(0.5 - spread);
            let hi = (1.0 - GAP - r).min(0.5 + spread);
            let (lo, hi) = if lo <= hi { (lo, hi) } else { (0.5, 0.5) };
            objects[i].centre = (uniform(rng, lo, hi), uniform(rng, lo, hi));
            if (0..i).any(|j| !apart(&objects[i], &objects[j])) {
                ok = false;
                break;
            }
        }
        if ok {
            return;
        }
    }
    // Fallback (only for crowded specs with fixed large sizes): a row across the middle.
    let n = objects.len() as f32;
    for (i, o) in objects.iter_mut().enumerate() {
        o.centre = ((i as f32 + 0.5) / n, 0.5);
    }
}

/// `n` random (scene, caption) pairs from `seed`: the same seed gives the same scenes.
pub fn random_scenes(seed: u64, n: usize, max_objects: usize) -> Vec<Scene> {
    let mut rng = Rng::derive(seed, "shapes-scenes");
    (0..n)
        .map(|_| Scene::random(&mut rng, max_objects))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captions_round_trip_through_parse() {
        let mut rng = Rng::new(1);
        let mut kinds = std::collections::HashSet::new();
        for _ in 0..500 {
            let s = Scene::random(&mut rng, 3);
            let cap = s.caption();
            let spec = parse_caption(&cap).unwrap_or_else(|| panic!("{cap:?} does not parse"));
            assert_eq!(spec, s.spec(), "{cap}");
            assert_eq!(spec.caption(), cap);
            assert_eq!(spec.total(), s.objects.len());
            kinds.insert((s.objects.len(), s.relation.is_some(), spec.objects.len()));
        }
        // One object; twins; related pairs; three objects (some grouped).
        assert!(kinds.contains(&(1, false, 1)));
        assert!(kinds.contains(&(2, false, 1)));
        assert!(kinds.contains(&(2, true, 2)));
        assert!(kinds.contains(&(3, false, 3)));
    }

    #[test]
    fn rendering_is_deterministic() {
        let a = random_scenes(42, 20, 3);
        let b = random_scenes(42, 20, 3);
        assert_eq!(a, b);
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.render(32), y.render(32));
        }
        assert_ne!(random_scenes(43, 20, 3), a);
    }

    #[test]
    fn scenes_are_inside_the_image_and_do_not_overlap() {
        let mut rng = Rng::new(5);
        for _ in 0..300 {
            let s = Scene::random(&mut rng, 3);
            for (i, o) in s.objects.iter().enumerate() {
                let r = o.size.radius();
                assert!(o.centre.0 - r >= 0.0 && o.centre.0 + r <= 1.0, "{s:?}");
                assert!(o.centre.1 - r >= 0.0 && o.centre.1 + r <= 1.0, "{s:?}");
                for p in &s.objects[..i] {
                    // Disjoint bounding boxes.
                    let (dx, dy) = (o.centre.0 - p.centre.0, o.centre.1 - p.centre.1);
                    let sum = r + p.size.radius();
                    assert!(dx.abs() > sum || dy.abs() > sum, "{s:?}");
                }
            }
            if let Some(rel) = s.relation {
                let m = rel.margin(s.objects[0].centre, s.objects[1].centre);
                assert!(m >= 0.2, "{s:?}: margin {m}");
            }
        }
    }

    #[test]
    fn shapes_land_where_the_scene_says() {
        let scene = Scene {
            background: BACKGROUND,
            objects: vec![
                Object {
                    shape: Shape::Circle,
                    colour: Colour::Red,
                    size: Size::Large,
                    centre: (0.3, 0.5),
                },
                Object {
                    shape: Shape::Square,
                    colour: Colour::Blue,
                    size: Size::Small,
                    centre: (0.75, 0.4),
                },
                Object {
                    shape: Shape::Triangle,
                    colour: Colour::Yellow,
                    size: Size::Large,
                    centre: (0.7, 0.78),
                },
            ],
            relation: None,
        };
        let size = 64u32;
        let img = scene.render(size);
        assert_eq!(*img.get_pixel(0, 0), Rgb(BACKGROUND));
        for o in &scene.objects {
            let c = o.colour.rgb();
            // The centre pixel has the object's colour.
            let (cx, cy) = o.centroid();
            let p = img.get_pixel((cx * size as f32) as u32, (cy * size as f32) as u32);
            assert_eq!(p.0, c, "{o:?}");
            // The centroid and area of the object's exact-colour pixels match the geometry.
            let (mut n, mut sx, mut sy) = (0f32, 0f32, 0f32);
            for (x, y, p) in img.enumerate_pixels() {
                if p.0 == c {
                    n += 1.0;
                    sx += x as f32 + 0.5;
                    sy += y as f32 + 0.5;
                }
            }
            let (mx, my) = (sx / n / size as f32, sy / n / size as f32);
            assert!(
                (mx - cx).abs() < 0.02 && (my - cy).abs() < 0.02,
                "{o:?}: {mx} {my}"
            );
            let r = o.radius_px(size);
            let area = 4.0 * r * r * o.shape.fill_ratio();
            // Interior pixels only: a little less than the exact area.
            assert!(n <= area * 1.02 && n >= area * 0.7, "{o:?}: {n} vs {area}");
        }
        // Edges are anti-aliased: some pixels are neither the background nor a palette colour.
        let palette: Vec<[u8; 3]> = Colour::ALL.iter().map(|c| c.rgb()).collect();
        assert!(img
            .pixels()
            .any(|p| p.0 != BACKGROUND && !palette.contains(&p.0)));
    }

    #[test]
    fn from_spec_honours_sizes_and_relations() {
        let spec = parse_caption("a large red circle below a small blue triangle").unwrap();
        let mut rng = Rng::new(9);
        for _ in 0..50 {
            let s = Scene::from_spec(&spec, &mut rng);
            assert_eq!(s.objects[0].size, Size::Large);
            assert_eq!(s.objects[1].size, Size::Small);
            assert!(s.objects[0].centre.1 > s.objects[1].centre.1 + 0.2);
            assert_eq!(s.caption(), "a red circle below a blue triangle");
        }
    }

    #[test]
    fn ground_truth_reward_rates_renders_of_their_captions_high() {
        use diffpref_rewards::shapes::ShapesReward;
        let r = ShapesReward::new();
        for size in [32u32, 64] {
            let scenes = random_scenes(7, 200, 3);
            let imgs: Vec<RgbImage> = scenes.iter().map(|s| s.render(size)).collect();
            let x = crate::imaging::images_to_tensor(&imgs, &candle_core::Device::Cpu).unwrap();
            let caps: Vec<String> = scenes.iter().map(|s| s.caption()).collect();
            let prompts: Vec<&str> = caps.iter().map(|s| s.as_str()).collect();
            let b = r.breakdown(&x, &prompts).unwrap();
            let low: Vec<_> = b
                .iter()
                .zip(&caps)
                .filter(|(b, _)| b.reward <= 0.9)
                .collect();
            // Every render scores high for its own caption...
            assert!(
                low.is_empty(),
                "{size}px: {} of 200 at or below 0.9: {:?}",
                low.len(),
                &low[..low.len().min(3)]
            );
            // ...and lower for another scene's caption.
            let shifted: Vec<&str> = (0..prompts.len())
                .map(|i| prompts[(i + 1) % prompts.len()])
                .collect();
            let other = r.breakdown(&x, &shifted).unwrap();
            let better = b
                .iter()
                .zip(&other)
                .filter(|(a, o)| a.reward > o.reward)
                .count();
            assert!(
                better >= 195,
                "{size}px: own caption higher in only {better} of 200"
            );
        }
    }

    #[test]
    fn corruptions_differ_from_the_caption_and_stay_captions() {
        let mut rng = Rng::new(4);
        for _ in 0..200 {
            let spec = random_spec(&mut rng, 3);
            let bad = corrupt(&spec, &mut rng);
            assert_ne!(bad, spec);
            let back = diffpref_rewards::shapes::parse_caption(&bad.caption()).unwrap();
            assert_eq!(back.objects.len(), bad.objects.len(), "{}", bad.caption());
        }
    }
}
